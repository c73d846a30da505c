"""Claims on new names, so that of two puts racing for one name exactly one is acknowledged.

The put rules (:mod:`.puts`) are checked against this node's replica of the
catalog, which learns of another node's put only once that put is stored and
announced: two nodes taking one new name (or one part) at the same instant
both passed them, and both clients were told their data was stored.

Now a put also *claims* the name with every live member before it becomes
visible.  The claim is opened where the put is admitted (an upload's header,
an inline put, a save) and asked of all live members at once, while the bytes
are still arriving; the part is committed only once every member has granted
it (:meth:`Claims.gate`, called by the store just before the rename), else the
writer is aborted and the client gets the member's typed refusal
(``DatasetExists``, or ``InvalidData`` for a sibling part that disagrees).

A member grants a claim unless its catalog already shows the name taken (the
put rules, evaluated for the claimant) or it has an open claim of its own on
the same name and part: then the older claim (smaller ``(time_ns, node)``
token) wins, and a member whose own claim is younger grants the older one and
gives its own up.  A claim that has collected every grant and not given up is
*won*, and a won claim refuses every later one until its record is announced
(from then on the catalog refuses them).  Only claimants keep claims, so
nothing is leased or left behind by a node that dies: a claim is open while
its round runs or its part is being written here.  Because the two claimants
ask each other, it is enough that one of them knows the other is alive.

Uncontended, a put costs one round trip to every live member, concurrent with
the upload (nothing at all on a node alone).  A member that does not answer
is skipped once the catalog declares it dead or its RPC port refuses
connections (it crashed), otherwise the put fails with ``PeerUnavailable``
(after ``rpc_timeout_s`` and a second for a member that heartbeats but leaves
the claim unanswered).  The wait is the committing upload's alone: the bulk
channel commits each upload in a greenlet of its own and serves every other
transfer meanwhile.
Members that do not see each other at all (a partition) can each grant a
name: once they meet, both copies are reported on read as a
``DatasetConflict`` until one is deleted (see :func:`hpcflow.catalog.base.locate`).
"""

from __future__ import annotations

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
    PeerUnavailable,
    TransportError,
)
from ..rpc.calls import refuses_connections
from .parts import NodeParts
from .puts import check_put

log = logging.getLogger("hpcflow.node")


@dataclass(eq=False)
class Claim:
    """This node's claim on a name (or part) it is about to create."""

    name: str
    part: int | None
    shape: tuple[int, ...]
    dtype: str
    token: tuple[int, str]  # (time_ns, node): the smaller is older and wins
    done: gevent.event.Event = field(default_factory=gevent.event.Event)
    error: HpcflowError | None = None
    won: bool = False
    #: Set when an older claim of another node won over ours: what our put gets.
    yielded: HpcflowError | None = None

    @property
    def key(self) -> str:
        return key_of(self.name, self.part)

    def overlaps(self, name: str, part: int | None) -> bool:
        """The same name, and the same part or a whole dataset on either side."""
        return self.name == name and (self.part is None or part is None or self.part == part)


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
    """This node's open claims, and its answers to other nodes' claims."""

    def __init__(self, node: NodeParts) -> None:
        self.node = node
        self._mine: dict[str, Claim] = {}
        #: ``waiting``: puts whose bytes are all here, waiting for their claim's round.
        self.stats = {"rounds": 0, "granted": 0, "refused": 0, "lost": 0, "waiting": 0}

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
        peers = [v.info for v in self.node.catalog.nodes() if v.alive and v.info.name != me]
        if peers:
            self.stats["rounds"] += 1
            gevent.spawn(self._round, claim, peers)
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
            settled = claim.done.wait(self.node.config.rpc_timeout_s + 5.0)  # the round's bound
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

    def _round(self, claim: Claim, peers: list[PeerInfo]) -> None:
        error: HpcflowError | None = PeerUnavailable(f"cannot put {claim.key}: its claim "
                                                     "was interrupted; try again")
        try:
            error = self._ask(claim, peers)
        finally:  # whatever happens, the put waiting at the gate gets an answer
            self._settle(claim, error)

    def _ask(self, claim: Claim, peers: list[PeerInfo]) -> HpcflowError | None:
        """Ask every peer for ``claim`` at once; the first refusal, or None.

        A peer is skipped once the catalog declares it dead, or as soon as its RPC
        endpoint refuses connections (it crashed: its claims died with it), checked
        for peers that have not answered within half a heartbeat.
        """
        request = {"name": claim.name, "part": claim.part, "shape": list(claim.shape),
                   "dtype": claim.dtype, "by": claim.token[1], "token": claim.token[0]}
        timeout = self.node.config.rpc_timeout_s
        rpc_of = {p.name: p.rpc for p in peers}
        calls = {p.name: gevent.spawn(self.node.peers.call, p.rpc, "claim", request,
                                      timeout_s=timeout) for p in peers}
        probes: dict[str, gevent.Greenlet[Any]] = {}

        def gone(peer: str) -> bool:
            probe = probes.get(peer)
            return (probe is not None and probe.ready() and probe.value is True) \
                or self._gone(peer)

        error: HpcflowError | None = None
        deadline = time.monotonic() + timeout + 1.0
        while calls and error is None:
            gevent.joinall(list(calls.values()), timeout=self.node.config.heartbeat_s / 2,
                           count=1)
            for peer, g in list(calls.items()):
                if g.ready():
                    del calls[peer]
                    exc = g.exception
                    if exc is None or gone(peer):
                        continue
                    if isinstance(exc, HpcflowError) and not isinstance(exc, TransportError):
                        error = exc  # a refusal: DatasetExists, InvalidData ...
                    else:
                        why = exc if isinstance(exc, HpcflowError) else repr(exc)
                        error = PeerUnavailable(f"cannot put {claim.key}: {peer} did not "
                                                f"confirm the name is free ({why}); try again")
                elif peer not in probes:
                    probes[peer] = gevent.spawn(refuses_connections, rpc_of[peer], 1.0)
                elif gone(peer) or time.monotonic() > deadline:
                    g.kill(block=False)
                    del calls[peer]
                    if not gone(peer):
                        error = PeerUnavailable(f"cannot put {claim.key}: {peer} did not "
                                                "answer its claim; try again")
        gevent.killall([*calls.values(), *probes.values()], block=False)
        return error

    def drop(self, claim: Claim) -> None:
        """The put failed before it was written: forget its claim now."""
        if self._mine.get(claim.key) is claim:
            del self._mine[claim.key]

    def _gone(self, peer: str) -> bool:
        """The catalog has declared ``peer`` dead (or forgotten it)."""
        return not any(v.alive for v in self.node.catalog.nodes() if v.info.name == peer)

    def _settle(self, claim: Claim, error: HpcflowError | None) -> None:
        if claim.done.is_set():
            return  # settled already (the gate gave up waiting)
        if error is None:
            error = claim.yielded
        claim.error, claim.won = error, error is None
        if error is not None:
            self.stats["lost"] += 1
            log.info("put of %s refused: %s", claim.key, error)
        claim.done.set()

    # -- other nodes' puts -----------------------------------------------------------
    def answer(self, request: Any) -> bool:
        """Grant another node's claim (True) or refuse it with a typed error."""
        if not isinstance(request, dict):
            raise InvalidData("a claim is a map")
        name, part = validate_name(request.get("name")), validate_part(request.get("part"))
        shape = validate_shape(request.get("shape"))
        dtype = validate_dtype(request.get("dtype")).str
        by, ns = request.get("by"), request.get("token")
        if not isinstance(by, str) or not by or len(by) > 128 or by == self.node.name:
            raise InvalidData("a claim names the claiming node")
        if isinstance(ns, bool) or not isinstance(ns, int) or ns < 0:
            raise InvalidData("a claim's token is a non-negative int")
        try:
            check_put(self.node.catalog, by, name, part, shape, dtype)
            self._purge()
            for c in self._mine.values():
                if c.done.is_set() and not c.won:
                    continue  # lost: its writer is being aborted
                bad = _sibling_mismatch(c, name, part, shape, dtype)
                if bad is None and not c.overlaps(name, part):
                    continue
                if c.won or c.token < (ns, by):  # ours came first
                    raise bad or DatasetExists(f"{key_of(name, part)} is being put on "
                                               f"{self.node.name}, which came first")
                if c.yielded is None:  # theirs is older: ours gives up, with the reason
                    theirs = Claim(name, part, shape, dtype, (ns, by))
                    c.yielded = _sibling_mismatch(theirs, c.name, c.part, c.shape, c.dtype) \
                        or DatasetExists(f"{c.key} is being put on {by} at the same moment, "
                                         "and that put came first")
        except (DatasetExists, InvalidData):
            self.stats["refused"] += 1
            raise
        self.stats["granted"] += 1
        return True


__all__ = ["Claim", "Claims"]
