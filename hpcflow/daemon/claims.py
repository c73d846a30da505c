"""Claims on new names, so that of two puts racing for one name exactly one is acknowledged.

The put rules (:mod:`.puts`) are checked against this node's replica of the
catalog, which learns of another node's put only once that put is stored and
announced: two nodes taking one new name (or one part) at the same instant
both passed them, and both clients were told their data was stored.

Now a put also *claims* the name before it becomes visible, from the name's
**arbiters**: the :data:`ARBITERS` live members (this node among them, if it
ranks) that rank first for the name by rendezvous hashing, so every node that
sees the same members picks the same arbiters, whatever N is.  The claim is
opened where the put is admitted (an upload's header, an inline put, a save)
and asked of the arbiters *one after another in rank order*, while the bytes
are still arriving; the part is committed only once every arbiter it could ask
has granted it (all members, in a cluster of at most ARBITERS;
:meth:`Claims.gate`, called by the store just before the rename), else the
writer is aborted and the client gets the arbiter's typed refusal
(``DatasetExists``, or ``InvalidData`` for a sibling part that disagrees).

An arbiter grants a claim unless its catalog already shows the name taken (the
put rules, evaluated for the claimant) or it holds a grant of an overlapping
claim by another node (same name and part, or a sibling part that disagrees):
first come, first served.  Because two racing claimants ask the arbiters in
the same global order, the first arbiter they share decides, and exactly one
of them wins; one that is refused releases what it was granted.  Two nodes
whose views differ by a member or two still share an arbiter: only members
that do not see ARBITERS of the same members at all (a partition) can both
take a name (see below).

A grant in another claim's way refuses it while its put stands: if the
arbiter's catalog shows the record that put made (made after the claim: an
older record of the key, an overwrite's or one deleted since, does not count),
at once; otherwise the arbiter asks the claimant (``claim_stands``), whose put
may be over with nothing stored (a lost release, a record deleted since): then
the grant is dropped.  Grants are also dropped when their claimant releases
them (its put lost or failed) or is declared dead, and, every
:data:`SWEEP_EVERY` grants, in the background, once their record has been seen
for a while or, after :data:`RECHECK_S`, their claimant says the put is over.
An arbiter holds at most :data:`MAX_GRANTS` (beyond, claims are ``Overloaded``).

Uncontended, a put costs ARBITERS round trips at most (more only when an
arbiter is skipped or a grant in the way is checked), one after another and
concurrent with the upload, whatever the cluster's size (nothing on a node
alone).  An arbiter that does not answer is skipped, and the next member in
rank takes its place, once the catalog declares it dead or its RPC port
refuses connections (it crashed); otherwise the put fails with
``PeerUnavailable`` (after ``rpc_timeout_s`` and a second for an arbiter that
heartbeats but leaves the claim unanswered).  The wait is the committing
upload's alone: the bulk channel commits each upload in a greenlet of its own
and serves every other transfer meanwhile.
Members that do not see each other at all (a partition) can each grant a
name: once they meet, both copies are reported on read as a
``DatasetConflict`` until one is deleted (see :func:`hpcflow.catalog.base.locate`).
"""

from __future__ import annotations

import hashlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import gevent
import gevent.event

from ..catalog.membership import PeerInfo
from ..catalog.record import (
    DatasetRecord,
    key_of,
    validate_dtype,
    validate_name,
    validate_part,
    validate_shape,
)
from ..errors import (
    DatasetExists,
    HpcflowError,
    InvalidData,
    Overloaded,
    PeerUnavailable,
    TransportError,
)
from ..rpc.calls import refuses_connections
from .parts import NodeParts
from .puts import check_put

log = logging.getLogger("hpcflow.node")

#: How many members arbitrate each name (the same on every node).  Three keep a
#: name's arbiters shared by two nodes whose views of the membership differ by a
#: member or two (a join or a death not yet heard everywhere).
ARBITERS = 3
#: Every this many grants, all are swept (not only those on the name claimed) ...
SWEEP_EVERY = 64
#: ... and those older than this are checked with their claimants.
RECHECK_S = 60.0
#: Grants held at most (a claim beyond is ``Overloaded``): each is about 0.5 KB.
MAX_GRANTS = 20_000


def rank(name: str, members: list[str]) -> list[str]:
    """``members`` in the order in which they arbitrate ``name`` (rendezvous hashing:
    the same order on every node, and a member's joining or leaving moves no other)."""
    pre = name.encode() + b"\0"
    return sorted(members, key=lambda m: hashlib.blake2b(pre + m.encode(),
                                                          digest_size=8).digest())


@dataclass(eq=False)
class Claim:
    """A claim on a name (or part): this node's own, or one it granted as an arbiter."""

    name: str
    part: int | None
    shape: tuple[int, ...]
    dtype: str
    token: tuple[int, str]  # (time_ns, node): which claim of which claimant
    done: gevent.event.Event = field(default_factory=gevent.event.Event)
    error: HpcflowError | None = None
    won: bool = False
    #: Arbiters that granted it (this node's name for a grant of its own).
    granted: list[PeerInfo | str] = field(default_factory=list)
    since: float = field(default_factory=time.monotonic)
    #: (A grant) when our catalog was first seen to show its put's record.
    recorded_at: float | None = None

    @property
    def key(self) -> str:
        return key_of(self.name, self.part)

    @property
    def by(self) -> str:
        return self.token[1]

    def overlaps(self, name: str, part: int | None) -> bool:
        """The same name, and the same part or a whole dataset on either side."""
        return self.name == name and (self.part is None or part is None or self.part == part)


def _token(ns: Any) -> int:
    if isinstance(ns, bool) or not isinstance(ns, int) or ns < 0:
        raise InvalidData("a claim's token is a non-negative int")
    return ns


def _sibling_mismatch(c: Claim, name: str, part: int | None, shape: tuple[int, ...],
                      dtype: str) -> InvalidData | None:
    if c.name != name or c.overlaps(name, part):
        return None
    if c.dtype != dtype or tuple(c.shape[1:]) != tuple(shape[1:]):
        return InvalidData(f"part {part} of {name} must match its other parts: part {c.part} "
                           f"being put has dtype {c.dtype} and rows of shape "
                           f"{list(c.shape[1:])}, got {dtype} and {list(shape[1:])}")
    return None


class Claims:
    """This node's open claims, and the grants it holds as an arbiter."""

    def __init__(self, node: NodeParts) -> None:
        self.node = node
        self._mine: dict[str, Claim] = {}
        #: Grants this node holds as an arbiter, by name (its own claims' included).
        self._grants: dict[str, list[Claim]] = {}
        self._added = 0
        self._count = 0  # grants held, over all names
        self._rechecking: gevent.Greenlet[Any] | None = None
        #: ``waiting``: puts whose bytes are all here, waiting for their claim's round;
        #: ``asked``: claims sent to other arbiters; ``released``: grants given back.
        self.stats = {"rounds": 0, "granted": 0, "refused": 0, "lost": 0, "waiting": 0,
                      "asked": 0, "released": 0, "stale": 0}

    # -- our own puts --------------------------------------------------------------
    def open(self, name: str, part: int | None, shape: tuple[int, ...], dtype: str) -> Claim:
        """Claim ``name`` (``part``) for a put about to be written here; the round of
        asks runs in the background and :meth:`gate` waits for it at commit."""
        me = self.node.name
        self._purge()
        for c in self._mine.values():
            if c.overlaps(name, part):
                raise DatasetExists(f"{key_of(name, part)} is being written on {me} right now")
            bad = _sibling_mismatch(c, name, part, shape, dtype)
            if bad is not None:
                raise bad
        claim = Claim(name, part, tuple(shape), dtype, (time.time_ns(), me))
        self._mine[claim.key] = claim
        live = {v.info.name: v.info for v in self.node.catalog.nodes()
                if v.alive and v.info.name != me}
        if live:
            self.stats["rounds"] += 1
            order = rank(name, [*live, me])
            gevent.spawn(self._round, claim, [live.get(m, m) for m in order])
        else:
            self._settle(claim, None)
        return claim

    def gate(self, proto: DatasetRecord) -> None:
        """Called by the store just before ``proto``'s part becomes visible: wait for our
        claim on it to be settled; raise the refusal if we lost."""
        claim = self._mine.get(proto.key)
        if claim is None:
            return  # not a put (a copy, a flow's intermediate): nothing was claimed
        self.stats["waiting"] += 1
        try:
            # The round's bound: each arbiter's answer, one after another.
            settled = claim.done.wait((self.node.config.rpc_timeout_s + 1.0)
                                      * ARBITERS + 5.0)
        finally:
            self.stats["waiting"] -= 1
        if not settled:
            self._settle(claim, PeerUnavailable(f"cannot put {proto.key}: its claim was not "
                                                "settled in time; try again"))
        if claim.error is not None:
            self._mine.pop(proto.key, None)
            raise claim.error

    def _purge(self) -> None:
        """Forget claims whose put is over: stored and announced, failed, or refused by
        the store before it began (a put that exists here without ``overwrite``).

        A claim is open exactly while the store is writing its key: :meth:`open` is
        always followed by the store's ``begin`` in the same greenlet, with no yield
        in between, so no other greenlet sees a claim whose writer is not there yet.
        """
        for key in [k for k in self._mine if not self.node.store.busy(k)]:
            del self._mine[key]

    def _round(self, claim: Claim, order: list[PeerInfo | str]) -> None:
        error: HpcflowError | None = PeerUnavailable(f"cannot put {claim.key}: its claim "
                                                     "was interrupted; try again")
        try:
            error = self._ask(claim, order)
        finally:  # whatever happens, the put waiting at the gate gets an answer
            self._settle(claim, error)
            if error is not None:
                self._release(claim)
        # Won: once the put is over, give the grants back unless it was stored (then
        # the arbiters' catalogs refuse the name from the record on).
        self.node.store.wait_idle(claim.key)
        if not self._holds(claim.name, claim.key):
            self._release(claim)

    def _ask(self, claim: Claim, order: list[PeerInfo | str]) -> HpcflowError | None:
        """Ask the arbiters in rank order until :data:`ARBITERS` have granted;
        the first refusal, or None.

        An arbiter is skipped, and the next member in rank asked instead, once the
        catalog declares it dead, or as soon as its RPC endpoint refuses connections
        (it crashed: its grants died with it), checked for an arbiter that has not
        answered within half a heartbeat.
        """
        request = {"name": claim.name, "part": claim.part, "shape": list(claim.shape),
                   "dtype": claim.dtype, "by": claim.by, "token": claim.token[0]}
        for arbiter in order:
            if len(claim.granted) >= ARBITERS:
                break
            if isinstance(arbiter, str):  # this node
                try:
                    self._grant(claim.name, claim.part, claim.shape, claim.dtype, claim.token)
                except (DatasetExists, InvalidData) as exc:
                    return exc
                claim.granted.append(arbiter)
                continue
            answered, error = self._ask_one(claim, arbiter, request)
            if error is not None:
                return error
            if answered:
                claim.granted.append(arbiter)
        return None

    def _ask_one(self, claim: Claim, peer: PeerInfo, request: dict[str, Any]
                 ) -> tuple[bool, HpcflowError | None]:
        """One arbiter's answer: (granted, None), (False, None) when it is gone, or
        (False, the refusal or why it could not answer)."""
        self.stats["asked"] += 1
        state, value = self._watched(peer, self.node.config.rpc_timeout_s + 1.0, "claim",
                                     request)
        if state == "ok":
            return True, None
        if state == "gone":
            return False, None
        if state == "late":
            return False, PeerUnavailable(f"cannot put {claim.key}: {peer.name} did not "
                                          "answer its claim; try again")
        if isinstance(value, HpcflowError) and not isinstance(value, TransportError):
            return False, value  # a refusal: DatasetExists, InvalidData ...
        why = value if isinstance(value, HpcflowError) else repr(value)
        return False, PeerUnavailable(f"cannot put {claim.key}: {peer.name} did not confirm "
                                      f"the name is free ({why}); try again")

    def _watched(self, peer: PeerInfo, budget: float, method: str, *args: Any
                 ) -> tuple[str, Any]:
        """Call ``method`` on ``peer`` for at most ``budget`` seconds, watching it:
        ``("ok", value)``, ``("error", exception)``, ``("gone", None)`` as soon as the
        catalog declares it dead or its RPC endpoint refuses connections (checked once
        it has not answered within half a heartbeat), or ``("late", None)``."""
        call = gevent.spawn(self.node.peers.call, peer.rpc, method, *args,
                            timeout_s=max(0.1, budget))
        probe: gevent.Greenlet[Any] | None = None

        def gone() -> bool:
            return (probe is not None and probe.ready() and probe.value is True) \
                or self._gone(peer.name)

        deadline = time.monotonic() + budget
        try:
            while not call.ready():
                call.join(timeout=min(self.node.config.heartbeat_s / 2,
                                      max(0.0, deadline - time.monotonic())))
                if call.ready():
                    break
                if gone():
                    return "gone", None
                if time.monotonic() >= deadline:
                    return "late", None
                if probe is None:
                    probe = gevent.spawn(refuses_connections, peer.rpc, 1.0)
        finally:
            gevent.killall([g for g in (call, probe) if g is not None], block=False)
        if call.exception is None:
            return "ok", call.value
        return ("gone", None) if gone() else ("error", call.exception)

    def drop(self, claim: Claim) -> None:
        """The put is over (stored, or failed before it was written): forget its claim."""
        if self._mine.get(claim.key) is claim:
            del self._mine[claim.key]

    def _holds(self, name: str, key: str) -> bool:
        """Our store holds ``key`` (of dataset ``name``)."""
        return any(r.key == key for r in self.node.store.named(name))

    def _release(self, claim: Claim) -> None:
        """Give back the grants of a claim that lost, or whose put failed."""
        granted, claim.granted = claim.granted, []
        for arbiter in granted:
            if isinstance(arbiter, str):
                self._ungrant(claim.name, claim.key, claim.token)
            else:
                gevent.spawn(self._release_at, arbiter, claim)

    def _release_at(self, peer: PeerInfo, claim: Claim) -> None:
        try:
            self.node.peers.call(peer.rpc, "release_claim", claim.name, claim.part,
                                 claim.by, claim.token[0], timeout_s=self.node.config.rpc_timeout_s)
        except HpcflowError as exc:  # it is checked with us when it stands in a claim's way
            log.info("could not release %s's claim at %s: %s", claim.key, peer.name, exc)

    def _gone(self, peer: str) -> bool:
        """The catalog has declared ``peer`` dead (or forgotten it)."""
        return not self._lives(peer)

    def _lives(self, name: str) -> bool:
        """``name`` is us or a live member (one lookup, not a scan of the members)."""
        if name == self.node.name:
            return True
        view = self.node.catalog.member(name)
        return view is not None and view.alive

    def _settle(self, claim: Claim, error: HpcflowError | None) -> None:
        if claim.done.is_set():
            return  # settled already (the gate gave up waiting)
        claim.error, claim.won = error, error is None
        if error is not None:
            self.stats["lost"] += 1
            log.info("put of %s refused: %s", claim.key, error)
        claim.done.set()

    # -- as an arbiter -----------------------------------------------------------------
    def answer(self, request: Any) -> bool:
        """Grant another node's claim (True) or refuse it with a typed error."""
        if not isinstance(request, dict):
            raise InvalidData("a claim is a map")
        name, part = validate_name(request.get("name")), validate_part(request.get("part"))
        shape = validate_shape(request.get("shape"))
        dtype = validate_dtype(request.get("dtype")).str
        by, ns = self._claimant(request.get("by"), request.get("token"))
        try:
            self._grant(name, part, shape, dtype, (ns, by))
        except (DatasetExists, InvalidData):
            self.stats["refused"] += 1
            raise
        return True

    def release(self, name: Any, part: Any, by: Any, token: Any) -> bool:
        """The claimant ``by`` gives back its grant (its put lost or failed)."""
        name, part = validate_name(name), validate_part(part)
        by, ns = self._claimant(by, token)
        return self._ungrant(name, key_of(name, part), (ns, by))

    def stands(self, name: Any, part: Any, token: Any) -> str:
        """Does our claim ``token`` on ``name`` (``part``) still stand: ``"open"`` (its
        put is under way), ``"stored"`` (the part is here), or ``""`` (it is over and
        nothing was stored)?  Asked by an arbiter whose grant of it is in another claim's
        way (its release may have been lost, or the record deleted since)."""
        key = key_of(validate_name(name), validate_part(part))
        ns = _token(token)
        self._purge()
        c = self._mine.get(key)
        if c is not None and c.token[0] == ns and not (c.done.is_set() and not c.won):
            return "open"
        return "stored" if self._holds(name, key) else ""

    def _claimant(self, by: Any, ns: Any) -> tuple[str, int]:
        if not isinstance(by, str) or not by or len(by) > 128 or by == self.node.name:
            raise InvalidData("a claim names the claiming node")
        return by, _token(ns)

    def _grant(self, name: str, part: int | None, shape: tuple[int, ...], dtype: str,
               token: tuple[int, str]) -> None:
        """Grant the claim or raise the refusal: the put rules against our catalog, then
        the grants we hold.  A grant in the way whose record we have not seen is checked
        with its claimant first (its put may be over with nothing stored: a lost
        release, a record deleted since); checks that yield are followed by all of them
        again, and the last check and the grant itself do not yield.  The whole answer
        takes at most ``rpc_timeout_s`` (the asker waits that and a second).  Called for
        our own claims too, when this node is an arbiter."""
        me, by = self.node.name, token[1]
        deadline = time.monotonic() + max(0.5, self.node.config.rpc_timeout_s - 1.0)
        while True:
            check_put(self.node.catalog, by, name, part, shape, dtype)  # may yield (DHT)
            g = self._conflict(name, part, shape, dtype, token)
            if g is None:
                break  # no yield from here to the grant
            state = "stored" if self._recorded(g) else self._stands(
                g, deadline - time.monotonic())
            if state:
                raise _sibling_mismatch(g, name, part, shape, dtype) or DatasetExists(
                    f"{key_of(name, part)} is being put on {g.by}, which asked first"
                    if state == "open" else f"{key_of(name, part)} already exists on {g.by}")
            self._ungrant(g.name, g.key, g.token)
            self.stats["stale"] += 1
        grants = self._grants.setdefault(name, [])
        mine = [g for g in grants if g.by == by and g.overlaps(name, part)]
        if any(g.token > token for g in mine):  # a late round of a put since given up
            raise DatasetExists(f"{key_of(name, part)}: a newer claim of {by}'s holds it")
        if mine:
            grants[:] = [g for g in grants if g not in mine]
        elif self._count >= MAX_GRANTS:
            self._sweep_all()
            if self._count >= MAX_GRANTS:
                raise Overloaded(f"{self._count} claims are open here; try again")
        grants.append(Claim(name, part, shape, dtype, token))
        self._count += 1 - len(mine)
        if by != me:
            self.stats["granted"] += 1
        self._added += 1
        if self._added % SWEEP_EVERY == 0:
            self._sweep_all()

    def _conflict(self, name: str, part: int | None, shape: tuple[int, ...], dtype: str,
                  token: tuple[int, str]) -> Claim | None:
        """The first grant we hold that is in the claim's way (another claimant's, on the
        same part or a disagreeing sibling), or None; grants of the dead are dropped."""
        if name not in self._grants:
            return None
        self._drop_dead(name)
        for g in self._grants.get(name, []):
            if g.by == token[1]:
                continue  # its own earlier claim (a sibling part, or a put since over)
            if g.overlaps(name, part) or _sibling_mismatch(g, name, part, shape, dtype):
                return g
        return None

    def _drop_dead(self, name: str) -> None:
        for g in [g for g in self._grants.get(name, []) if not self._lives(g.by)]:
            self._ungrant(g.name, g.key, g.token)

    def _recorded(self, g: Claim) -> bool:
        """Our catalog shows the record ``g``'s put made (not an older one of its key:
        an overwrite's, or one deleted since): made after the claim, on its maker's
        clock, as the token."""
        if g.by == self.node.name:
            return self.stands(g.name, g.part, g.token[0]) == "stored"
        return any(r.owner == g.by and r.key == g.key and r.created * 1e9 >= g.token[0]
                   for r in self.node.catalog.records_named(g.name))

    def _stands(self, g: Claim, budget: float) -> str:
        """Ask ``g``'s claimant whether its claim stands (see :meth:`stands`), for at
        most ``budget`` seconds; "" once the claimant is dead, "open" if it cannot
        tell (the grant stays)."""
        if g.by == self.node.name:
            return self.stands(g.name, g.part, g.token[0])
        view = self.node.catalog.member(g.by)
        if view is None or not view.alive:
            return ""
        info = view.info
        if budget <= 0:
            return "open"
        state, value = self._watched(info, budget, "claim_stands", g.name, g.part, g.token[0])
        if state == "gone":
            return ""
        if state != "ok":
            return "open"
        g.since = time.monotonic()
        return value if value in ("open", "stored") else ""

    def _sweep_all(self) -> None:
        """Every :data:`SWEEP_EVERY` grants (and when they reach :data:`MAX_GRANTS`):
        drop the grants of dead claimants now, and in the background those whose put is
        over (:meth:`_recheck`), so grants do not pile up."""
        for name in list(self._grants):
            self._drop_dead(name)
        if self._count and (self._rechecking is None or self._rechecking.ready()):
            self._rechecking = gevent.spawn(self._recheck)

    def _recheck(self) -> None:
        """Drop grants whose record our catalog has shown for ``rpc_timeout_s`` and 5 s
        (a claim whose check began before the record arrived has been answered by
        then), and grants older than :data:`RECHECK_S` whose claimant says its put is
        over (stored long ago, or nothing stored: a release or a record we missed)."""
        settled = self.node.config.rpc_timeout_s + 5.0
        for g in [g for gs in self._grants.values() for g in gs]:
            now = time.monotonic()
            if g not in self._grants.get(g.name, []) or now - g.since < settled:
                continue
            if g.recorded_at is None and self._recorded(g):  # may yield (a DHT lookup)
                g.recorded_at = time.monotonic()
            elif g.recorded_at is not None and now - g.recorded_at > settled:
                self._ungrant(g.name, g.key, g.token)
            elif g.recorded_at is None and now - g.since > RECHECK_S and self._stands(
                    g, self.node.config.rpc_timeout_s) != "open":
                self._ungrant(g.name, g.key, g.token)
                self.stats["stale"] += 1

    def _ungrant(self, name: str, key: str, token: tuple[int, str]) -> bool:
        grants = self._grants.get(name, [])
        keep = [g for g in grants if not (g.key == key and g.token == token)]
        if len(keep) == len(grants):
            return False
        self.stats["released"] += 1
        self._count -= len(grants) - len(keep)
        if keep:
            self._grants[name] = keep
        else:
            self._grants.pop(name, None)
        return True


__all__ = ["ARBITERS", "Claim", "Claims", "rank"]
