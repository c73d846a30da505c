"""Full catalog replication over PUB/SUB, after the ZeroMQ Guide's Clone pattern,
disseminated through a bounded fan-in overlay.

* Each node publishes its own inventory changes, numbered per publisher
  (:class:`~hpcflow.catalog.kvmsg.KVMsg`) and signed with the key of its run
  (:mod:`.signing`), on its PUB socket.
* A node follows (one SUB socket each) at most :func:`~.membership.fanin`
  members: every member when the cluster is that small, else its ring successor
  (the next live name after its own, so the "who follows whom" graph is always
  connected) and random live members, re-chosen when one dies, leaves or
  restarts.  It **relays** (re-publishes once, on its own PUB) every KV and BYE
  it accepts as new from any origin, so an update reaches every node in about
  log(N)/log(fan-in) hops; heartbeats are not relayed.
* Per origin, updates are applied in ``(epoch, seq)`` order: duplicates (the
  same update through several relays) are dropped before anything else, an
  update after a missing one is buffered for up to ``GAP_WAIT`` heartbeat
  periods, and a gap that stays open (or a followed node's heartbeat announcing
  a higher sequence) is repaired by pulling that origin's section of the catalog
  from the origin itself, or from one live member when the origin does not
  answer, never from everyone.  Every ``ANTI_ENTROPY_EVERY`` heartbeat periods a
  node compares its per-origin ``(epoch, seq)`` vector with the digests on the
  heartbeats it takes, asks a member whose digest differs for its vector, and
  pulls the origins it is behind on: the safety net for what a dropped message or
  a dead relay left out.
* A joiner takes the whole catalog (every live origin's records with their
  signatures and sequence numbers) from ONE member, after a jittered delay,
  asking another when that one fails or answers
  :class:`~hpcflow.errors.CatalogBusy` (a member serves ``SNAPSHOT_SLOTS`` full
  snapshots per heartbeat period at most).  A member learned later is synced
  from its first update (seq 1), its heartbeat's seq 0 (if we follow it), or the
  answer of the ``ping`` that verified it, which carries its stream's seq (0:
  an empty table); only otherwise is its section pulled.
* Idle publishers send heartbeats every ``heartbeat_s`` carrying load and
  membership deltas with a digest, never the whole membership; beyond a full
  mesh a node takes the heartbeats of ``HB_FANIN`` of the members it follows
  (the rest of its streams bring updates only).  A peer whose heartbeats we take,
  silent for longer than the TTL, or any member that fails a probe after ``ttl_s``
  of silence (a successful probe counts as hearing from a member we do not
  hear), is marked dead and its entries are no longer offered; they come back
  when it does (every ``DEAD_PROBE_EVERY`` periods one member we think dead is
  pinged).  While our own event loop runs late, these timeouts stretch (see
  :meth:`ReplicatedCatalog.patience`).  A report of a death is passed on at once,
  the first time a node hears it, and believed by each node only after its own
  probe.  While a live peer is
  being resynced its last known entries stay offered (the Clone pattern serves
  its last state, never an empty one).
* Membership: a live peer whose membership digest keeps differing from ours
  (it restarted, was started without ``--peer``, or missed a delta) gets a
  hello from us (push/pull), rate-limited.  A
  descriptor new to us (a name, or a run of a name: an epoch, from a hello, a
  gossip, a snapshot or a peer's own stream) is believed only once its own RPC
  endpoint answers ``ping`` with exactly that descriptor, and never when its
  epoch is more than a day ahead of our clock: otherwise any process could
  gossip a member's name with a huge epoch and its own PUB and key, and every node
  would follow it and ignore the real member, even after a restart.  A
  descriptor that claims the name of a live member at another endpoint is
  only accepted once that member no longer answers there as itself: two
  daemons with one name would otherwise take over each other's identity.
  A descriptor with an *older* epoch than the member we know is accepted only
  once that member is dead and the older run answers at its endpoint as
  itself (the earlier of two same-named daemons, after the later one left).
  A descriptor with *our* name and another epoch that answers as itself is a
  second daemon with our name: the later of the two (larger epoch, then
  endpoint) is told through ``duplicate`` and must stop, whichever members
  let each in (two members can each accept one before they hear of the other).
  Members dead for ``forget_after_s`` that hold no entries are forgotten.

Authenticity: relays and snapshot servers pass on other nodes' updates, so an
update is believed only when it carries its origin's signature over ``(kind,
sender, epoch, seq, key, value)``, checked against the public key in the
origin's verified descriptor (which its own RPC endpoint confirmed); anything
else is dropped and counted (``stats["forged"]``), including a record inside a
snapshot served by a third node (a section with one forged record is refused
whole, and asked of another member).  So a process can only ever speak for the
name it joined under: it cannot publish, relay or serve an update as another
node, or delete another node's record.  Heartbeats are not relayed: one is
taken only on the stream of the node that sent it (anything else is
``stats["foreign"]``).  With keys (``rpc/auth.py``) only a holder of the node
key can be a PUB a node's SUB accepts, and only a node key can say hello.

Sockets and greenlets: the PUB socket is owned by the publisher greenlet
(others hand it messages through a queue); each followed peer's SUB socket by
that peer's stream greenlet, which makes, reads and closes it (no longer
following it, or following another endpoint, ends the greenlet).  Snapshot
fetches run in short-lived greenlets that only touch plain Python state, so
no socket is shared.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.queue
import zmq.green as zmq

from ..errors import CatalogBusy, HpcflowError, ProtocolError
from ..logutil import Throttled
from ..rpc import greenio
from .base import Catalog, NodeView
from .kvmsg import BYE, HB, KV, MAX_BODY, KVMsg
from .membership import (
    MAX_EPOCH_AHEAD_S,
    NEWS_PER_HEARTBEAT,
    NEWS_RETRANSMIT,
    PROBE_EVERY,
    PROBE_IDLE_EVERY,
    PeerInfo,
    PeerState,
    epoch_ahead_s,
    fanin,
    hb_fanin,
    heard_members,
    membership_digest,
    vector_digest,
)
from .record import DatasetRecord, RecordTable, RecordTables
from .signing import Signer, Verifier

log = logging.getLogger("hpcflow.catalog")

#: Asks a member (by its descriptor) for sections of its catalog: those of the named
#: origins, or (None) the whole catalog; ``[]`` asks for its per-origin vector only.
SnapshotFetcher = Callable[[PeerInfo, "list[str] | None"], dict[str, Any]]
#: One record as its origin signed it: (seq it was set at, its wire map, signature).
Signed = tuple[int, dict[str, Any], bytes]
#: Who answers at an RPC endpoint right now (waiting at most the seconds given): the
#: descriptor it gives of itself, or None.
Prober = Callable[[str, float], "PeerInfo | None"]
#: The same, with the rest of its ``ping`` answer: the sequence number its catalog stream
#: is at ("seq"), its ops ("ops") and load ("load"), unchecked (see :meth:`_take_head`).
HeadProber = Callable[[str, float], "tuple[PeerInfo, dict[str, Any]] | None"]
MAX_PENDING = 10_000
#: Heartbeats from a peer that omit us, in heartbeat periods, before we say hello to it,
#: and the shortest interval between two such hellos.
INTRODUCE_AFTER = 3
INTRODUCE_EVERY = 5
#: A refused name claim is not probed again for this long (it arrives with every gossip).
RECHECK_REFUSED_S = 30.0
#: A descriptor its RPC endpoint did not confirm is not probed again for this many
#: heartbeat periods (a rogue repeats it every beat; a real one may just have been slow).
RECHECK_UNVERIFIED = 5
#: A stream greenlet yields to the others after this many messages in a row (a green
#: recv does not yield while messages are queued).
STREAM_BATCH = 64
#: Name claims being checked at once (each costs one probe of a member).
MAX_VERIFYING = 16
#: The largest catalog message a SUB socket takes at all (see ``_stream``).
MAX_SUB_MESSAGE = 4 * MAX_BODY + 1024
#: Members at most (a descriptor, a record table and a vector entry each; only
#: ``fanin()`` of them cost a SUB socket).
MAX_MEMBERS = 16_384
#: Heartbeat periods an update after a missing one waits for the missing one (it may
#: come through another relay) before the origin's section is pulled.
GAP_WAIT = 1.0
#: Heartbeat periods between two probes of members we think dead (one each time).
DEAD_PROBE_EVERY = 2
#: Heartbeat periods between two anti-entropy rounds (one random member's vector).
ANTI_ENTROPY_EVERY = 10
#: Full snapshots a node serves per heartbeat period; more are refused (CatalogBusy).
SNAPSHOT_SLOTS = 4
#: A joiner's first snapshot waits a random part of this many heartbeat periods (many
#: nodes started at once must not all ask at the same moment).
JOIN_JITTER = 1.0
#: Members a joiner asks for the whole catalog before it falls back to per-origin pulls.
SNAPSHOT_TRIES = 8
#: Sections of origins not verified yet that a joiner keeps from its snapshot.
MAX_OFFERED = 4096
#: Most an overloaded node stretches its failure detector's timeouts by (1 + this):
#: see :meth:`ReplicatedCatalog.patience`.
MAX_STRAIN = 8


class ReplicatedCatalog(Catalog):
    """Every node holds the whole catalog; see the module docstring for the protocol."""

    def __init__(
        self,
        me: PeerInfo,
        ctx: zmq.Context,
        fetch_snapshot: SnapshotFetcher,
        *,
        heartbeat_s: float = 1.0,
        ttl_s: float = 3.5,
        load: Callable[[], dict[str, Any]] = dict,
        ops: Callable[[], dict[str, str]] = dict,
        pub_bind: str | None = None,
        probe: Prober = lambda endpoint, timeout_s: None,
        introduce: Callable[[PeerInfo], object] = lambda info: None,
        forget_after_s: float = 600.0,
        duplicate: Callable[[PeerInfo], None] = lambda info: None,
        signer: Signer | None = None,
        fan_in: int | None = None,
        probe_head: HeadProber | None = None,
    ) -> None:
        #: this run's key pair: ``me.key`` must be its public half (see :meth:`set_self`)
        self.signer = signer or Signer()
        self._verifier = Verifier()
        self.fan_in = fan_in if fan_in is not None else fanin()
        #: of those, how many we take the heartbeats of beyond a full mesh (``HB_FANIN``)
        self.hb_fan_in = hb_fanin()
        self.me = me
        self.ctx = ctx
        self.fetch_snapshot = fetch_snapshot
        self.heartbeat_s = heartbeat_s
        self.ttl_s = ttl_s
        self._started = time.monotonic()
        self.load = load
        self.ops = ops
        self.probe = probe
        self.probe_head = probe_head
        #: what the verifying probe of a run said besides its descriptor (until added)
        self._heads: dict[tuple[str, int], dict[str, Any]] = {}
        self.introduce = introduce
        self.forget_after_s = forget_after_s
        self.duplicate = duplicate
        self._verifying: set[tuple[str, int]] = set()
        self._verify_backlog: dict[tuple[str, int], PeerInfo] = {}
        self._refused: dict[tuple[str, int], float] = {}
        self._pub_bind = pub_bind or me.pub
        self.seq = 0
        self.own: RecordTable = RecordTable()
        self._own_signed: dict[str, Signed] = {}
        self.peers: dict[str, PeerState] = {}
        self.peer_records = RecordTables()
        #: per origin, its records as it signed them (what we serve in snapshots)
        self.signed: dict[str, dict[str, Signed]] = {}
        #: sections of a joiner's snapshot whose origins are not verified yet
        self._offered: dict[tuple[str, int], dict[str, Any]] = {}
        self._bootstrapping = False
        self._bootstrapped = False
        self._served: list[float] = []  # when we served the last full snapshots
        self._pending: dict[str, list[KVMsg]] = {}
        self._syncing: set[str] = set()
        # None in the outbox asks the publisher for a heartbeat now (membership news).
        self._outbox: gevent.queue.Queue[KVMsg | None] = gevent.queue.Queue()
        #: peer name -> (PUB endpoint, whether we take its heartbeats too, the greenlet
        #: reading it on its own SUB socket)
        self._streams: dict[str, tuple[str, bool, gevent.Greenlet]] = {}
        self._digest: str | None = None  # of the live members: see digest()
        self._changes = 0  # calls of _notify: what vdigest()'s cache is keyed on
        self._vdigest: tuple[int, int, str] | None = None  # (changes, seq, digest)
        #: whose heartbeats we take beyond a full mesh, for the live members of digest
        self._heard: tuple[str, set[str]] = ("", set())
        self._me_wire: dict[str, Any] = me.to_wire()
        self._greenlets: list[gevent.Greenlet] = []
        self._garbage_log = Throttled(log)
        #: membership news still to be piggybacked on our heartbeats: descriptors of members
        #: that joined or restarted, and (name, epoch) of members found dead -> beats left
        self._news: dict[tuple[str, int], tuple[dict[str, Any], int]] = {}
        self._dead_news: dict[tuple[str, int], int] = {}
        self._confirming: set[tuple[str, int]] = set()
        self._probe_order: list[str] = []
        self._dead_order: list[str] = []
        self._asked_ops: set[tuple[str, int]] = set()
        #: dead reports we passed on -> until when we do not pass them on again
        self._seen_reports: dict[tuple[str, int], float] = {}
        self._last_pushpull = float("-inf")
        self._strain = 0  # see patience()
        self._judged = True  # whether the monitor's last tick judged silences
        self.stats = {"received": 0, "malformed": 0, "resyncs": 0, "published": 0,
                      "marked_dead": 0, "introduced": 0, "refused_claims": 0, "forgotten": 0,
                      "foreign": 0, "unverified": 0, "future_epochs": 0, "too_many_members": 0,
                      "heartbeats_received": 0, "bytes_received": 0, "probes": 0,
                      "probes_failed": 0, "dead_reports": 0, "heartbeat_interval_ms": 0,
                      "forged": 0, "relayed": 0, "duplicates": 0, "followed": 0, "heard": 0,
                      "snapshots": 0, "snapshots_served": 0, "snapshots_refused": 0,
                      "sections_pulled": 0, "anti_entropy": 0, "news_pending": 0,
                      "unsynced": 0, "strain": 0}
        self.pub_endpoint = ""
        self._changed = gevent.event.Event()
        self._pub: zmq.Socket | None = None

    # -- Catalog interface -----------------------------------------------------
    @property
    def self_name(self) -> str:
        return self.me.name

    def settling(self) -> bool:
        if time.monotonic() - self._started < 2 * self.ttl_s:
            return True  # the members we will hear from may not have said hello yet
        return any(st.alive and not st.synced for st in self.peers.values())

    def start(self) -> None:
        self._started = time.monotonic()
        self._pub = self.ctx.socket(zmq.PUB)
        self._pub.setsockopt(zmq.LINGER, 0)
        self._pub.setsockopt(zmq.SNDHWM, 100_000)
        self._pub.bind(self._pub_bind)
        self.pub_endpoint = self._pub.getsockopt_string(zmq.LAST_ENDPOINT)
        self._greenlets = [
            gevent.spawn(self._publisher),
            gevent.spawn(self._monitor),
            gevent.spawn(self._prober),
        ]

    def wait_changed(self, timeout: float) -> None:
        self._changed.wait(timeout)

    def _notify(self) -> None:
        """Wake the waiters on a change of the catalog; every change of the membership
        comes through here too (so it also drops the cached digest of it)."""
        self._digest = None
        self._changes += 1
        event, self._changed = self._changed, gevent.event.Event()
        event.set()

    def set_self(self, me: PeerInfo) -> None:
        """Update our own descriptor once all endpoints are bound (its ``key`` is always
        our signer's public key)."""
        self.me = dataclasses.replace(me, key=self.signer.public_hex)
        self._me_wire = self.me.to_wire()
        self._digest = None
        self._changes += 1  # (vdigest's cache)

    def stop(self) -> None:
        gevent.killall(self._greenlets)
        gevent.killall([g for _, _, g in self._streams.values()])  # each closes its socket
        self._streams.clear()
        if self._pub is not None:  # its owner greenlet is gone: say goodbye ourselves
            with contextlib.suppress(zmq.ZMQError):
                self._pub.send_multipart(self._signed(BYE, "", None).encode())
            self._pub.close(linger=200)

    def announce(self, rec: DatasetRecord) -> None:
        self.own[rec.key] = rec
        self._emit(rec.key, rec.to_wire())

    def retract(self, key: str) -> None:
        if self.own.pop(key, None) is not None:
            self._emit(key, None)

    def _emit(self, key: str, value: dict[str, Any] | None) -> None:
        self._notify()
        self.seq += 1
        msg = self._signed(KV, key, value)
        if value is None:
            self._own_signed.pop(key, None)
        else:
            self._own_signed[key] = (msg.seq, value, msg.sig)
        self._outbox.put(msg)

    def _signed(self, kind: bytes, key: str, value: dict[str, Any] | None) -> KVMsg:
        """A KV or BYE of ours at our current seq, signed with this run's key."""
        me = self.me
        sig = self.signer.sign(kind, me.name, me.epoch, self.seq, key, value)
        return KVMsg(kind, me.name, me.epoch, self.seq, key, value, sig=sig)

    def add_peer(self, info: PeerInfo, verified: bool = False, spread: bool = True) -> None:
        """Learn of a peer.  A descriptor that is new to us (another name, or another run
        of a name) is believed only once its own RPC endpoint answers with exactly it, and
        a newer run of a live member at another endpoint only once that member no longer
        answers as itself: both are checked in the background, unless ``verified`` (the
        caller checked, see :meth:`answers_as` and :meth:`claim_conflict`).  A verified
        member just answered us: it is alive.

        A verified newcomer (or a member back from the dead) is announced on our next
        ``NEWS_RETRANSMIT`` heartbeats when ``spread``, whether we heard of it first hand
        or from gossip: our heartbeats reach only our followers, so news travels as
        memberlist's does, each node retransmitting what is new to it a few times."""
        if info.name == self.me.name:
            if info.epoch != self.me.epoch and info.rpc != self.me.rpc:
                self._verify_later(info)  # a second daemon with our name, or our last run
            return
        ahead = epoch_ahead_s(info.epoch)
        if ahead > MAX_EPOCH_AHEAD_S:
            self.stats["future_epochs"] += 1
            self._garbage_log.warning("catalog: ignoring %s with an epoch %.0f s ahead of our "
                                      "clock", info.name[:64], ahead)
            return
        st = self.peers.get(info.name)
        if st is not None and info.epoch == st.info.epoch:
            # a run's endpoints never change: another descriptor of it is false; the same
            # one of a member we think dead says it is back (checked by a probe of ours)
            if info == st.info and not st.alive:
                if verified:
                    self._revive(st)
                else:
                    self._confirm_alive(st)
            return
        if st is not None and info.epoch < st.info.epoch and st.alive and not verified:
            return  # an older run while the newer lives: a late gossip, or a twin
        if not verified:
            self._verify_later(info)
            return
        now = time.monotonic()
        if st is None:
            if len(self.peers) >= MAX_MEMBERS:
                self.stats["too_many_members"] += 1
                self._garbage_log.warning("catalog: not following %s: %d members already",
                                          info.name[:64], len(self.peers))
                return
            log.info("learned of peer %s at %s", info.name, info.rpc)
            st = self.peers[info.name] = PeerState(info, alive=True, last_seen=now)
            self.peer_records[info.name] = RecordTable()
            self.signed[info.name] = {}
        else:
            log.info("peer %s restarted (epoch %d -> %d)", info.name, st.info.epoch,
                     info.epoch)
            st.info, st.synced, st.seq, st.gap_since = info, False, 0, None
            st.alive, st.last_seen, st.dead_since = True, now, None
            self._pending.pop(info.name, None)
            if info.name in self._streams:  # its new PUB (a no-op if unchanged)
                self._follow(info.name, info.pub, self._hears(info.name))
        head = self._heads.pop((info.name, info.epoch), None)
        if head is not None:
            self._take_head(st, head)
            if head.get("seq") == 0 and not st.synced and not self._pending.get(info.name) \
                    and info.name not in self._syncing:
                # its own endpoint said it had published nothing: its table is empty
                self.peer_records[info.name], self.signed[info.name] = RecordTable(), {}
                st.seq, st.synced = 0, True
        self._notify()
        self._choose_follows()
        offered = self._offered.pop((info.name, info.epoch), None)
        if offered is not None:
            self._take_section(offered, None)
        self._changed_membership(info, spread)

    def _revive(self, st: PeerState) -> None:
        """A member we had found dead answers (or speaks) again as the same run."""
        if st.alive:
            return
        st.alive, st.last_seen, st.dead_since = True, time.monotonic(), None
        log.info("peer %s is alive", st.info.name)
        self._add_news(st.info)
        self._notify()
        self._choose_follows()
        self._outbox.put(None)  # gossip the news now rather than at the next beat

    def _confirm_alive(self, st: PeerState) -> None:
        """Gossip says a member we think dead is back: believe our own probe of it."""
        key = (st.info.name, st.info.epoch)
        if key in self._confirming or len(self._confirming) >= MAX_VERIFYING:
            return
        self._confirming.add(key)
        info = st.info

        def confirm() -> None:
            try:
                if self.peers.get(info.name) is st and st.info == info and \
                        self.probe(info.rpc, self.patience()) == info:
                    self._revive(st)
            finally:
                self._confirming.discard(key)

        gevent.spawn(confirm)

    def _changed_membership(self, info: PeerInfo, spread: bool) -> None:
        """Heartbeat now; announce ``info`` on our next heartbeats if ``spread`` (it is
        verified, so it has just answered us: alive)."""
        st = self.peers.get(info.name)
        if spread and st is not None and st.alive:
            self._add_news(info)
        self._outbox.put(None)

    def answers_as(self, info: PeerInfo) -> bool:
        """Whether ``info.rpc`` answers with exactly ``info``.  An answer that also says
        the member has published nothing yet lets us take its (empty) table as synced
        when we add it, rather than pull it: in a cluster forming, every node learns
        every other long before it follows or hears from most of them."""
        if self.probe_head is None:
            return self.probe(info.rpc, self.patience()) == info
        head = self.probe_head(info.rpc, self.patience())
        if head is None or head[0] != info:
            return False
        if len(self._heads) >= MAX_OFFERED:
            self._heads.clear()  # answers come from peers: stay bounded
        self._heads[(info.name, info.epoch)] = head[1]
        return True

    def _take_head(self, st: PeerState, head: dict[str, Any]) -> None:
        """A member's ops and load from its own ``ping`` answer: what its heartbeats say
        to its followers, for the many members we do not follow (the planner needs
        every member's ops to delegate to it)."""
        load, ops = head.get("load"), head.get("ops")
        if isinstance(load, dict):
            st.load = load
        if isinstance(ops, dict):
            st.ops = {str(k): str(v) for k, v in list(ops.items())[:10_000]}

    def published(self) -> int:
        return self.seq

    def claim_conflict(self, info: PeerInfo) -> PeerInfo | None:
        """The live member whose name ``info`` claims, if it still answers as itself.

        Blocks (cooperatively) for one probe of the member's RPC endpoint.  A genuine
        restart passes: the old run is silent (dead to us, or nothing answers at its
        endpoint), or its endpoint now answers with the new run's epoch.
        """
        st = self.peers.get(info.name)
        if st is None or st.info.epoch == info.epoch or not st.alive:
            return None
        if st.info.rpc == info.rpc:
            return None  # one endpoint cannot be bound twice: the same daemon, restarted
        answer = self.probe(st.info.rpc, self.patience())
        current = self.peers.get(info.name)
        if answer is not None and (answer.name, answer.epoch) == (st.info.name, st.info.epoch) \
                and current is st:
            return st.info
        return None

    def _verify_later(self, info: PeerInfo) -> None:
        claim, now = (info.name, info.epoch), time.monotonic()
        until = self._refused.get(claim)
        if claim in self._verifying or (until is not None and now < until):
            return
        if len(self._verifying) >= MAX_VERIFYING:
            # Gossip carries each member once (deltas), and a hello reply lists them all
            # at once: a claim is queued, not dropped (a bounded queue: claims come from
            # peers), and checked when a check ends.
            if len(self._verify_backlog) < MAX_MEMBERS:
                self._verify_backlog[claim] = info
            return
        if len(self._refused) > 1024:  # claims come from peers: keep the memory bounded
            self._refused = {k: t for k, t in self._refused.items() if now < t}
            if len(self._refused) > 1024:
                self._refused.clear()  # re-probing costs a ping, never correctness
        self._verifying.add(claim)

        def verify() -> None:
            try:
                if info.name == self.me.name:
                    self._check_twin(info)
                    return
                if not self.answers_as(info):  # a stale, or false, descriptor
                    self.stats["unverified"] += 1
                    self._refused[claim] = (time.monotonic()
                                            + RECHECK_UNVERIFIED * self.heartbeat_s)
                    self._garbage_log.warning(
                        "catalog: ignoring a descriptor of %s (epoch %d) that %s does not "
                        "answer with", info.name[:64], info.epoch, info.rpc[:64])
                    return
                st = self.peers.get(info.name)
                if st is not None and info.epoch < st.info.epoch:
                    if not st.alive:  # the earlier of two twins, after the later one left
                        self.add_peer(info, verified=True)
                    return
                owner = self.claim_conflict(info)
                if owner is None:
                    self.add_peer(info, verified=True)
                    return
                self._refused[claim] = time.monotonic() + RECHECK_REFUSED_S
                self.stats["refused_claims"] += 1
                log.error("ignoring a second node named %s at %s: %s still answers at %s "
                          "(duplicate --name?)", info.name, info.rpc, owner.name, owner.rpc)
            finally:
                self._verifying.discard(claim)
                while self._verify_backlog and len(self._verifying) < MAX_VERIFYING:
                    queued = self._verify_backlog.pop(next(iter(self._verify_backlog)))
                    known = self.peers.get(queued.name)
                    if known is None or known.info.epoch != queued.epoch:
                        self._verify_later(queued)

        gevent.spawn(verify)

    def _add_news(self, info: PeerInfo) -> None:
        self._news.pop((info.name, info.epoch), None)
        self._news[(info.name, info.epoch)] = (info.to_wire(), NEWS_RETRANSMIT)
        while len(self._news) > 4 * NEWS_PER_HEARTBEAT:  # the oldest go first
            self._news.pop(next(iter(self._news)))

    def _interval(self) -> float:
        """Our heartbeat interval: ``heartbeat_s``.  Only our followers (about ``fan_in``
        of them) hear it, and each node follows at most ``fan_in`` members, so the
        heartbeats a node receives do not grow with the cluster."""
        return self.heartbeat_s

    def digest(self) -> str:
        """Digest of the live members as we see them, ourselves included; compared on
        every heartbeat received, so kept until the next change (:meth:`_notify`)."""
        if self._digest is None:
            self._digest = membership_digest([(self.me.name, self.me.epoch)] + [
                (st.info.name, st.info.epoch) for st in self.peers.values() if st.alive])
        return self._digest

    def _check_twin(self, info: PeerInfo) -> None:
        """``info`` has our name: if it answers as itself it is a second daemon, and the
        later of us two (larger epoch, then endpoint) must go."""
        if not self.answers_as(info):
            return  # our own previous run, gone (or a stale or false descriptor)
        self._refused[(info.name, info.epoch)] = time.monotonic() + RECHECK_REFUSED_S
        if (self.me.epoch, self.me.rpc) > (info.epoch, info.rpc):
            log.error("the node name %r is already used by the node at %s (epoch %d), which "
                      "started first and is still running: give every node a unique --name",
                      info.name, info.rpc, info.epoch)
            self.duplicate(info)
        else:  # it may not hear of us by itself (its members refuse our claim): tell it
            log.error("a second node named %s runs at %s (started later, epoch %d): telling "
                      "it to stop", info.name, info.rpc, info.epoch)
            with contextlib.suppress(HpcflowError):
                self.introduce(info)  # it refuses our hello, and checks us as above

    def nodes(self) -> list[NodeView]:
        views = [NodeView(self.me, True, self.load(), self.ops())]
        views += [NodeView(st.info, st.alive, st.load, st.ops) for st in self.peers.values()]
        return views

    def member(self, name: str) -> NodeView | None:
        if name == self.me.name:
            return NodeView(self.me, True, self.load(), self.ops())
        st = self.peers.get(name)
        return None if st is None else NodeView(st.info, st.alive, st.load, st.ops)

    def records_named(self, name: str, include_dead: bool = False) -> list[DatasetRecord]:
        out = self.own.named(name)
        for peer in self.peer_records.holding(name):
            if include_dead or self.peers[peer].alive:
                out.extend(self.peer_records[peer].named(name))
        return out

    def slices_of(self, name: str) -> list[DatasetRecord]:
        out = self.own.slices_of(name)
        for peer in self.peer_records.slicing(name):
            if self.peers[peer].alive:
                out.extend(self.peer_records[peer].slices_of(name))
        return out

    def records(self, include_dead: bool = False) -> list[DatasetRecord]:
        out = list(self.own.values())
        for name, recs in self.peer_records.items():
            if include_dead or self.peers[name].alive:  # resyncing: last known entries
                out.extend(recs.values())
        return out

    def vector(self) -> dict[str, tuple[int, int]]:
        """Per origin (ourselves and every live member we are synced with): its
        ``(epoch, seq)`` as far as our replica goes."""
        out = {self.me.name: (self.me.epoch, self.seq)}
        for name, st in self.peers.items():
            if st.alive and st.synced:
                out[name] = (st.info.epoch, st.seq)
        return out

    def vdigest(self) -> str:
        """:func:`~.membership.vector_digest` of :meth:`vector`, which every heartbeat
        carries, computed again only after a change (our seq, or anything that went
        through :meth:`_notify`): at 256 members it cost 0.2 ms a beat."""
        key = (self._changes, self.seq)
        if self._vdigest is None or self._vdigest[:2] != key:
            self._vdigest = (*key, vector_digest(self.vector()))
        return self._vdigest[2]

    def snapshot_wire(self, origins: object = None) -> dict[str, Any]:
        """A snapshot request's answer (Clone: ICANHAZ -> KTHXBAI): with ``origins``
        None, the whole catalog (every live origin we are synced with, ourselves
        included: its descriptor, seq and records with their signatures); with a list
        of names, those origins' sections only; ``[]``: just our per-origin vector.
        Full snapshots are rationed (``SNAPSHOT_SLOTS`` per heartbeat period): past
        that, :class:`~hpcflow.errors.CatalogBusy` (the joiner asks another member).
        ``records`` (our own, unsigned) is kept for callers of the previous format."""
        vec = {name: list(v) for name, v in self.vector().items()}
        base: dict[str, Any] = {"epoch": self.me.epoch, "seq": self.seq,
                                "self": self.me.to_wire(), "vector": vec}
        if origins is None:
            now = time.monotonic()
            self._served = [t for t in self._served if now - t < self.heartbeat_s]
            if len(self._served) >= SNAPSHOT_SLOTS:
                self.stats["snapshots_refused"] += 1
                raise CatalogBusy(f"{self.me.name} is serving {len(self._served)} catalog "
                                  "snapshots already: ask another member")
            self._served.append(now)
            self.stats["snapshots_served"] += 1
            names = list(vec)
            base["records"] = [r.to_wire() for r in self.own.values()]
        elif isinstance(origins, list) and len(origins) <= MAX_MEMBERS and all(
                isinstance(n, str) for n in origins):
            names = [n for n in dict.fromkeys(origins) if n in vec]
        else:
            raise ProtocolError("snapshot: origins must be a list of node names, or nil")
        base["origins"] = [self._section(n) for n in names]
        return base

    def _section(self, name: str) -> dict[str, Any]:
        if name == self.me.name:
            info, seq, signed = self.me, self.seq, self._own_signed
        else:
            st = self.peers[name]
            info, seq, signed = st.info, st.seq, self.signed.get(name, {})
        return {"info": info.to_wire(), "seq": seq,
                "entries": [[k, q, v, sig] for k, (q, v, sig) in signed.items()]}

    def _take_section(self, sec: object, via: str | None) -> bool:
        """Apply one origin's section of a snapshot (from the origin or a third node):
        every record must carry the origin's signature, checked against the key of its
        verified descriptor, or the whole section is refused (``stats["forged"]``).  A
        section of an origin we have not verified yet is kept until we have (bounded).
        True when we are synced with that origin afterwards."""
        try:
            if not isinstance(sec, dict):
                raise ProtocolError("a snapshot section must be a map")
            info = PeerInfo.from_wire(sec.get("info"))
            seq, entries = sec.get("seq"), sec.get("entries")
            if isinstance(seq, bool) or not isinstance(seq, int) or seq < 0 or \
                    not isinstance(entries, list):
                raise ProtocolError("a snapshot section needs a seq and entries")
        except ProtocolError as exc:
            self.stats["malformed"] += 1
            self._garbage_log.warning("catalog: bad snapshot section from %s: %s", via, exc)
            return False
        name = info.name
        if name == self.me.name:
            return False
        st = self.peers.get(name)
        if st is None or st.info.epoch != info.epoch:
            if st is None or info.epoch > st.info.epoch:  # believed once it answers as it
                if len(self._offered) < MAX_OFFERED:
                    self._offered[(name, info.epoch)] = sec
                self.add_peer(info)
            return False
        if st.info != info:
            self.stats["forged"] += 1  # the run we verified, with other endpoints or key
            self._garbage_log.warning("catalog: %s served a section of %s with a descriptor "
                                      "that is not the one %s answers with", via, name, name)
            return False
        if st.synced and seq <= st.seq:
            return True  # nothing newer than what we have
        recs, signed = RecordTable(), {}
        for entry in entries[:1_000_000]:
            if not self._verify_entry(st, entry, seq):
                self.stats["forged"] += 1
                self._garbage_log.warning("catalog: refused %s's section of %s: a record "
                                          "without %s's signature", via, name, name)
                return False
            key, q, value, sig = entry
            try:
                rec = DatasetRecord.from_wire(value)
            except HpcflowError:
                continue  # signed by its origin, but not a record we can read
            if rec.owner == name and rec.key == key:
                recs[key] = rec
                signed[key] = (q, value, sig)
        self.peer_records[name], self.signed[name] = recs, signed
        st.seq, st.synced, st.gap_since = seq, True, None
        self._drain(st)
        self._notify()
        log.info("catalog: synced %s at seq %d (%d entries) from %s", name, st.seq, len(recs),
                 via or "a snapshot")
        return st.synced

    def _verify_entry(self, st: PeerState, entry: object, seq: int) -> bool:
        if not (isinstance(entry, list) and len(entry) == 4):
            return False
        key, q, value, sig = entry
        if not (isinstance(key, str) and isinstance(q, int) and not isinstance(q, bool)
                and 0 < q <= seq and isinstance(value, dict) and isinstance(sig, bytes)):
            return False
        return self._verifier.verify(st.info.key, sig, KV, st.info.name, st.info.epoch, q,
                                     key, value)

    # -- publisher ----------------------------------------------------------------
    def _publisher(self) -> None:
        assert self._pub is not None
        next_hb = time.monotonic()
        while True:
            timeout = max(0.0, next_hb - time.monotonic())
            try:
                msg = self._outbox.get(timeout=timeout)
            except gevent.queue.Empty:
                msg = None
            if msg is None:
                msg = self._heartbeat()
                next_hb = time.monotonic() + float(msg.props["i"])  # as it announces
            greenio.send_multipart(self._pub, msg.encode())
            self.stats["published"] += 1

    def _heartbeat(self) -> KVMsg:
        """Our load, ops and seq, plus membership *deltas*: the members that joined,
        restarted or came back recently ("members", each sent ``NEWS_RETRANSMIT`` times),
        those found dead recently ("dead"), a digest of our live members ("d") and one of
        our per-origin vector ("v"), never the whole membership (which made every
        heartbeat O(N) and every node's cost O(N^2))."""
        members = [self._me_wire]
        for key, (wire, left) in list(self._news.items())[:NEWS_PER_HEARTBEAT]:
            members.append(wire)
            if left <= 1:
                del self._news[key]
            else:
                self._news[key] = (wire, left - 1)
        dead = []
        for dkey, left in list(self._dead_news.items())[:NEWS_PER_HEARTBEAT]:
            dead.append(list(dkey))
            if left <= 1:
                del self._dead_news[dkey]
            else:
                self._dead_news[dkey] = left - 1
        self.stats["news_pending"] = len(self._news) + len(self._dead_news)
        # "i": the time until our next heartbeat, which receivers' TTL for us is
        # measured in
        interval = self._interval()
        self.stats["heartbeat_interval_ms"] = round(interval * 1000)
        self.stats["followed"] = len(self._streams)
        self.stats["unsynced"] = sum(1 for st in self.peers.values()
                                     if st.alive and not st.synced)
        return KVMsg(HB, self.me.name, self.me.epoch, self.seq,
                     props={"load": self.load(), "members": members, "ops": self.ops(),
                            "dead": dead, "d": self.digest(), "i": interval,
                            "v": self.vdigest()})

    # -- the overlay: whom we follow -------------------------------------------------
    def _choose_follows(self) -> None:
        """Follow at most ``fan_in`` live members: all of them in a small cluster; else
        our ring successor (the next live name after ours: every node following its
        successor makes one cycle through all, so the overlay stays connected whatever
        the random choices) and, for short paths, the members we already follow, topped
        up at random.  Of those we take the heartbeats of all in a full mesh, else of
        ``HB_FANIN`` (:func:`~.membership.heard_members`: the successor, and members
        spread round a hash ring, so a node is watched by its predecessor and about
        ``HB_FANIN - 1`` others, unlikely to fail with it).  Called on every
        membership change: stable while nothing changes, and a join or a death moves
        few choices."""
        live = [n for n, st in self.peers.items() if st.alive]
        if len(live) <= self.fan_in:
            want, beats = set(live), set(live)
        else:
            digest = self.digest()
            if self._heard[0] != digest:  # (0.35 ms at 256 members: kept)
                self._heard = (digest, heard_members(
                    self.me.name, live, min(self.hb_fan_in, self.fan_in)))
            beats = set(self._heard[1])
            keep = [n for n in self._streams if n not in beats and n in self.peers
                    and self.peers[n].alive]
            random.shuffle(keep)
            want = beats | set(keep[:max(0, self.fan_in - len(beats))])
            if len(want) < self.fan_in:
                others = [n for n in live if n not in want]
                want.update(random.sample(others, min(len(others), self.fan_in - len(want))))
        for name in list(self._streams):
            if name not in want:
                self._unfollow(name)
        now = time.monotonic()
        for name in want:
            st = self.peers[name]
            if not self._hears(name) and name in beats:
                st.last_seen = max(st.last_seen, now)  # its silence counts from now
            self._follow(name, st.info.pub, name in beats)
        self.stats["followed"] = len(self._streams)
        self.stats["heard"] = sum(1 for _, hb, _ in self._streams.values() if hb)

    def _hears(self, name: str) -> bool:
        """Whether we take ``name``'s heartbeats (on its stream, which we follow)."""
        stream = self._streams.get(name)
        return stream is not None and stream[1]

    def _heard_alive(self) -> list[PeerState]:
        """The live members whose heartbeats we take (at most ``hb_fan_in`` beyond a
        full mesh): read from our streams, not by a scan of every member."""
        out = []
        for name, (_, beats, _) in list(self._streams.items()):
            st = self.peers.get(name)
            if beats and st is not None and st.alive:
                out.append(st)
        return out

    def _follow(self, name: str, endpoint: str, beats: bool) -> None:
        """Read ``name``'s stream at ``endpoint`` (instead of any earlier endpoint), with
        its heartbeats when ``beats``."""
        old = self._streams.get(name)
        if old is not None and old[:2] == (endpoint, beats):
            return
        self._unfollow(name)
        self._streams[name] = (endpoint, beats,
                               gevent.spawn(self._stream, name, endpoint, beats))

    def _unfollow(self, name: str) -> None:
        old = self._streams.pop(name, None)
        if old is not None:
            old[2].kill(block=False)  # may be the current greenlet: it ends at its next switch

    def _stream(self, name: str, endpoint: str, beats: bool) -> None:
        """The one owner of the SUB socket for ``name``'s stream: the updates it relays
        (its own and other origins', each signed), and its own heartbeats if ``beats``."""
        sub = self.ctx.socket(zmq.SUB)
        try:
            sub.setsockopt(zmq.LINGER, 0)
            sub.setsockopt(zmq.RCVHWM, 100_000)
            # libzmq drops a connection that sends a larger message before allocating it,
            # and does not reconnect it: a peer cannot queue GBs here (64 MiB messages
            # took a node to 580 MB).  Between MAX_BODY (what decode takes) and this,
            # a message is dropped as malformed and a resync follows, as before: a
            # node's own updates can be that large (a record's lineage holds the op's
            # parameters, which one RPC message of at most 16 MiB brought).
            sub.setsockopt(zmq.MAXMSGSIZE, MAX_SUB_MESSAGE)
            for kind in (KV, BYE, HB) if beats else (KV, BYE):
                sub.setsockopt(zmq.SUBSCRIBE, kind)
            sub.connect(endpoint)
        except zmq.ZMQError as exc:
            log.warning("catalog: cannot follow %s at %s: %s", name, endpoint, exc)
            sub.close(linger=0)
            return
        try:
            n = 0
            while True:
                n += 1
                if n % STREAM_BATCH == 0:
                    gevent.sleep(0)
                frames = [f.bytes for f in greenio.recv_multipart(sub)]
                self.stats["received"] += 1
                self.stats["bytes_received"] += sum(len(f) for f in frames)
                try:
                    msg = KVMsg.decode(frames)
                except ProtocolError as exc:
                    self.stats["malformed"] += 1
                    self._garbage_log.warning("catalog: dropped malformed message from %s: %s",
                                              name, exc)
                    continue
                if msg.kind == HB and msg.sender != name:
                    self.stats["foreign"] += 1
                    self._garbage_log.warning("catalog: dropped a heartbeat on %s's stream "
                                              "that claims to come from %s", name,
                                              msg.sender[:64])
                    continue
                try:
                    self._handle(msg, name)
                except Exception:  # a bug must not end the stream: log it, read on
                    log.exception("catalog: error handling a message from %s", name)
        except zmq.ZMQError as exc:  # the context is going away
            log.debug("catalog: stream of %s ended: %s", name, exc)
        finally:
            sub.close(linger=0)

    def _handle(self, msg: KVMsg, via: str = "") -> None:
        """One message from the stream of ``via``: a heartbeat of ``via`` itself, or an
        update (KV or BYE) of any origin, believed only with the origin's signature."""
        if msg.sender == self.me.name:
            return  # our own update, relayed back to us
        if msg.kind == HB:
            self._heartbeat_from(msg)
            return
        st = self.peers.get(msg.sender)
        if st is None:
            return  # not a member we know of; its hello or a gossip will introduce it
        if msg.epoch != st.info.epoch:
            if msg.epoch > st.info.epoch:
                self._learn_restart(st)  # a new run: believed once its RPC says so
            return  # a late message from a previous run, or one not yet verified
        if msg.kind == BYE:
            if not st.alive or not self._authentic(st, msg, via):
                return
            st.alive, st.dead_since = False, time.monotonic()
            log.info("peer %s left the cluster: %d entries withdrawn", msg.sender,
                     len(self.peer_records.get(msg.sender, {})))
            self._relay(msg)
            self._notify()
            self._choose_follows()
            return
        if st.synced and msg.seq <= st.seq:
            self.stats["duplicates"] += 1  # already applied (through another relay)
            return
        if any(m.seq == msg.seq for m in self._pending.get(msg.sender, ())):
            self.stats["duplicates"] += 1
            return
        if not self._authentic(st, msg, via):
            return
        if not st.alive:
            self._revive(st)  # it published something new: it lives
        if not st.synced:
            if msg.seq == 1 and not self._pending.get(msg.sender) and \
                    msg.sender not in self._syncing:
                # its first update in this run: nothing came before it
                self.peer_records[msg.sender], self.signed[msg.sender] = RecordTable(), {}
                st.seq, st.synced = 0, True
            else:
                self._buffer(st, msg)
                return
        if msg.seq != st.seq + 1:
            self._buffer(st, msg)  # a gap: the missing one may still come another way
            if st.gap_since is None:
                st.gap_since = time.monotonic()
            return
        self._apply(st, msg)
        self._drain(st)

    def _heartbeat_from(self, msg: KVMsg) -> None:
        """A followed member's own heartbeat: membership deltas, liveness, load, and the
        sequence it is at (higher than ours: we missed its last updates)."""
        self._gossip(msg)
        st = self.peers.get(msg.sender)
        if st is None:
            return
        if msg.epoch != st.info.epoch:
            if msg.epoch > st.info.epoch:
                self._learn_restart(st)
            return
        st.last_seen = time.monotonic()
        if not st.alive:
            self._revive(st)
        self.stats["heartbeats_received"] += 1
        load, ops = msg.props.get("load"), msg.props.get("ops")
        st.load = load if isinstance(load, dict) else {}
        if isinstance(ops, dict) and ops != st.ops:  # (the same on almost every beat)
            st.ops = {str(k): str(v) for k, v in list(ops.items())[:10_000]}
        interval = msg.props.get("i")
        if isinstance(interval, int | float) and not isinstance(interval, bool):
            # no longer than ten of ours: probes find a dead node anyway
            st.interval = min(max(float(interval), self.heartbeat_s), 10 * self.heartbeat_s)
        vdigest = msg.props.get("v")
        st.vdigest = vdigest if isinstance(vdigest, str) else ""
        digest = msg.props.get("d")
        if isinstance(digest, str):
            self._check_digest(st, digest)
        else:  # a peer that sends its whole membership (as before digests)
            self._check_known_by(st, msg.props.get("members"))
        if not st.synced and msg.seq == 0 and not self._pending.get(
                msg.sender) and msg.sender not in self._syncing:
            # It has published nothing in this run: its table is empty, and a snapshot
            # would say just that (N of them per joiner were most of a cluster's start-up).
            self.peer_records[msg.sender] = RecordTable()
            self.signed[msg.sender] = {}
            st.seq, st.synced = 0, True
            self._notify()
            return
        if st.synced and msg.seq > st.seq and st.gap_since is None:
            log.warning("catalog: %s is at seq %d, we have %d: resync", msg.sender, msg.seq,
                        st.seq)
            self._resync(st)

    def _authentic(self, st: PeerState, msg: KVMsg, via: str = "") -> bool:
        """Whether ``msg`` carries its origin's signature (made with the key of the run
        we verified); anything else is dropped and counted.  An update read on its
        origin's own stream (``via``: our SUB connected to the PUB endpoint of the
        descriptor we verified, and the epoch checked) is the origin's without checking
        the signature, as before relays: a check costs ~0.2 ms, and in a small cluster
        every update comes that way."""
        stream = self._streams.get(via)
        if via == msg.sender == st.info.name and stream is not None and \
                stream[0] == st.info.pub:
            return True
        if self._verifier.verify(st.info.key, msg.sig, msg.kind, msg.sender, msg.epoch,
                                 msg.seq, msg.key, msg.value):
            return True
        self.stats["forged"] += 1
        self._garbage_log.warning("catalog: dropped a %s of %s (seq %d) without its "
                                  "signature", msg.kind.decode(), msg.sender[:64], msg.seq)
        return False

    def _learn_restart(self, st: PeerState) -> None:
        """A message of a later run of a member: ask its RPC endpoint who runs there now
        (its descriptor, with the new run's key, is then checked as any other)."""
        key = (st.info.name, -1)
        if key in self._confirming or len(self._confirming) >= MAX_VERIFYING:
            return
        self._confirming.add(key)
        rpc, name = st.info.rpc, st.info.name

        def learn() -> None:
            try:
                answer = self.probe(rpc, self.patience())
                if answer is not None and answer.name == name:
                    self.add_peer(answer)
            finally:
                self._confirming.discard(key)

        gevent.spawn(learn)

    def _buffer(self, st: PeerState, msg: KVMsg) -> None:
        pend = self._pending.setdefault(st.info.name, [])
        if len(pend) < MAX_PENDING:
            pend.append(msg)
        if not st.synced:
            self._resync(st)

    def _drain(self, st: PeerState) -> None:
        """Apply buffered updates that now follow on; the gap closes when none is left
        missing before them."""
        pend = self._pending.get(st.info.name)
        if not pend:
            st.gap_since = None
            return
        pend.sort(key=lambda m: m.seq)
        rest = []
        for msg in pend:
            if msg.epoch != st.info.epoch or msg.seq <= st.seq:
                continue
            if msg.seq == st.seq + 1 and st.synced:
                self._apply(st, msg)
            else:
                rest.append(msg)
        if rest:
            self._pending[st.info.name] = rest
            if st.synced and st.gap_since is None:
                st.gap_since = time.monotonic()
        else:
            self._pending.pop(st.info.name, None)
            st.gap_since = None

    def _apply(self, st: PeerState, msg: KVMsg) -> None:
        """Apply an authentic update that follows on from what we have, and relay it."""
        name = st.info.name
        recs, signed = self.peer_records[name], self.signed.setdefault(name, {})
        st.seq = msg.seq
        self._relay(msg)
        self._notify()
        if msg.value is None:
            recs.pop(msg.key, None)
            signed.pop(msg.key, None)
            return
        try:
            rec = DatasetRecord.from_wire(msg.value)
        except HpcflowError as exc:
            self._garbage_log.warning("catalog: bad record from %s: %s", name, exc)
            return
        if rec.owner != name or rec.key != msg.key:
            self._garbage_log.warning("catalog: %s announced a record it does not own: %s",
                                      name, msg.key)
            return
        recs[rec.key] = rec
        signed[rec.key] = (msg.seq, msg.value, msg.sig)

    def _relay(self, msg: KVMsg) -> None:
        """Re-publish an update we accepted as new, once, for our followers -- unless the
        cluster is small enough that every member follows every other (a full mesh):
        there each follower has the update from its origin already, and the copies only
        cost CPU (each decoded and dropped as a duplicate: +50% wall time for a 4-node
        flow).  A member whose view is larger misses nothing for long: the origin's next
        update or heartbeat, or anti-entropy, shows the gap."""
        if sum(1 for st in self.peers.values() if st.alive) <= self.fan_in:
            return
        self.stats["relayed"] += 1
        self._outbox.put(msg)

    def _check_known_by(self, st: PeerState, members: object) -> None:
        """Say hello to a live peer whose heartbeats keep leaving us out of its membership
        (it restarted without ``--peer``, or lost us): nobody else would tell it."""
        knows_us = isinstance(members, list) and any(
            isinstance(d, dict) and d.get("name") == self.me.name
            and d.get("epoch") == self.me.epoch for d in members[:4096])
        self._introduce_unless(st, knows_us)

    def _check_digest(self, st: PeerState, digest: str) -> None:
        """Push/pull with a live peer whose view of the live members keeps differing from
        ours: the anti-entropy path of the delta gossip (it may have missed a piggybacked
        change, or lost us), at most one per heartbeat period for the whole node."""
        if digest == self.digest():
            st.unknown_since = None
            return
        if st.unknown_since is not None and time.monotonic() - self._last_pushpull < \
                self.heartbeat_s:
            return
        if self._introduce_unless(st, False):
            self._last_pushpull = time.monotonic()

    def _introduce_unless(self, st: PeerState, knows_us: bool) -> bool:
        now = time.monotonic()
        if knows_us:
            st.unknown_since = None
            return False
        if st.unknown_since is None:
            st.unknown_since = now
        if (now - st.unknown_since < INTRODUCE_AFTER * self.heartbeat_s
                or now - st.introduced_at < INTRODUCE_EVERY * self.heartbeat_s):
            return False
        st.introduced_at = now
        self.stats["introduced"] += 1
        log.info("peer %s does not know us, or sees other members: introducing ourselves "
                 "(push/pull)", st.info.name)
        info = st.info

        def hello() -> None:
            try:
                self.introduce(info)
            except HpcflowError as exc:
                log.warning("could not introduce ourselves to %s: %s", info.name, exc)

        gevent.spawn(hello)
        return True

    def _gossip(self, msg: KVMsg) -> None:
        """Membership deltas on a heartbeat: members new to its sender, members it found
        dead (each checked by a probe of our own before we believe it)."""
        dead = msg.props.get("dead")
        if isinstance(dead, list):
            for d in dead[:NEWS_PER_HEARTBEAT]:
                if (isinstance(d, list) and len(d) == 2 and isinstance(d[0], str)
                        and isinstance(d[1], int) and not isinstance(d[1], bool)):
                    self._confirm_dead(d[0], d[1])
        members = msg.props.get("members")
        if not isinstance(members, list):
            return
        for d in members[:4096]:
            try:
                info = PeerInfo.from_wire(d)
            except ProtocolError:
                continue
            self.add_peer(info)

    # -- liveness by probes ----------------------------------------------------------
    def _prober(self) -> None:
        """SWIM's failure detector, simplified, beside the heartbeats: every
        ``PROBE_EVERY`` heartbeat periods ping a live member whose ops we do not know
        yet, and every ``PROBE_IDLE_EVERY`` periods one whose heartbeats we do not take
        (round robin over a shuffled list; none in a full mesh, where we hear every
        member: those probes were a third of an idle node's CPU).  One that does not
        answer as itself, and has been silent for :meth:`patience`, is marked dead and
        announced.  Every ``DEAD_PROBE_EVERY`` periods, one member we think dead is
        pinged too (round robin): we no longer read its stream, so its answer is how we
        find it back, or a new run of it (as Serf reconnects to failed members)."""
        ticks, dead_probe = 0, None
        while True:
            gevent.sleep(self.heartbeat_s * PROBE_EVERY)
            ticks += 1
            st = self._next_probe_target(ticks % PROBE_IDLE_EVERY == 0)
            if st is not None:
                try:
                    self._probe_one(st)
                except Exception:  # the detector must not die with one probe
                    log.exception("catalog: probing %s failed", st.info.name)
            if ticks % DEAD_PROBE_EVERY == 0 and (dead_probe is None or dead_probe.dead):
                dead = self._next_dead_target()
                if dead is not None:  # in a greenlet: a hung one takes ttl_s to time out
                    dead_probe = gevent.spawn(self._probe_dead, dead)

    def _next_dead_target(self) -> PeerState | None:
        while True:
            if not self._dead_order:
                self._dead_order = [n for n, st in self.peers.items() if not st.alive]
                random.shuffle(self._dead_order)
                if not self._dead_order:
                    return None
            st = self.peers.get(self._dead_order.pop())
            if st is not None and not st.alive:
                return st

    def _probe_dead(self, st: PeerState) -> None:
        info = st.info
        answer = self.probe(info.rpc, self.patience())
        if answer is None or answer.name != info.name or self.peers.get(info.name) is not st:
            return
        if answer == info:
            self._revive(st)  # it was hung, or cut off, and answers again
        elif answer.epoch > info.epoch:
            self.add_peer(answer)  # a new run: believed once checked, as any descriptor

    def _next_probe_target(self, any_unheard: bool) -> PeerState | None:
        if self.probe_head is not None:  # a member we know no ops of yet goes first, once
            for name, new in self.peers.items():
                key = (name, new.info.epoch)
                if new.alive and not new.ops and not self._hears(name) and \
                        key not in self._asked_ops:
                    if len(self._asked_ops) >= MAX_MEMBERS:
                        self._asked_ops.clear()
                    self._asked_ops.add(key)
                    return new
        while any_unheard:
            if not self._probe_order:
                self._probe_order = [n for n, st in self.peers.items()
                                     if st.alive and not self._hears(n)]
                random.shuffle(self._probe_order)
                if not self._probe_order:
                    return None
            st = self.peers.get(self._probe_order.pop())
            if st is not None and st.alive and not self._hears(st.info.name):
                return st
        return None

    def _probe_one(self, st: PeerState) -> None:
        info = st.info
        self.stats["probes"] += 1
        wait = min(self.patience(), 2 * self.ttl_s)  # inline: the prober waits for it
        head = self.probe_head(info.rpc, wait) if self.probe_head is not None else None
        answer = head[0] if head is not None else (
            None if self.probe_head is not None else self.probe(info.rpc, wait))
        if answer == info:
            if not self._hears(info.name) and self.peers.get(info.name) is st:
                # we do not read its stream: its answer is what we hear of it (the stream
                # of a member we follow must speak for itself: see _monitor)
                st.last_seen = time.monotonic()
                if head is not None:
                    self._take_head(st, head[1])
            return
        if answer is not None and answer.name == info.name and answer.epoch > info.epoch:
            self.add_peer(answer)  # it restarted: believed once checked, as any descriptor
        self.stats["probes_failed"] += 1
        if self._silent(st, info):
            self._mark_dead(st, "did not answer a probe")
            self._announce_dead(info)

    def _announce_dead(self, info: PeerInfo) -> None:
        """Tell the others now (on our next heartbeats): few of them hear that member,
        and each receiver checks with a probe of its own before it believes it."""
        self._dead_news[(info.name, info.epoch)] = NEWS_RETRANSMIT
        self._outbox.put(None)

    def _silent(self, st: PeerState, info: PeerInfo, window: float | None = None) -> bool:
        """Still the member we probed, believed alive, and nothing from it for ``window``
        (default :meth:`patience`)."""
        return (self.peers.get(info.name) is st and st.info == info and st.alive
                and time.monotonic() - st.last_seen > (window or self.patience()))

    def _confirm_dead(self, name: str, epoch: int) -> None:
        """A member reports ``name`` dead: believe it only if it does not answer our own
        probe either (one member's word must not take a node out of everyone's view).
        The report is passed on at once, the first time we hear it (our followers may
        not hear the first report, and waiting for our probe at every hop made a hung
        node's death travel one probe timeout per hop); each receiver checks for itself,
        and a report is passed on once per ``forget_after_s``, so a false one costs each
        node one probe of the member, not a storm."""
        st, key = self.peers.get(name), (name, epoch)
        if st is None or st.info.epoch != epoch or not st.alive:
            return
        now = time.monotonic()
        if self._seen_reports.get(key, 0.0) < now:
            if len(self._seen_reports) > 4096:
                self._seen_reports = {k: t for k, t in self._seen_reports.items() if t > now}
            if len(self._seen_reports) <= 4096:
                self._seen_reports[key] = now + self.forget_after_s
                self._dead_news[key] = NEWS_RETRANSMIT
                self._outbox.put(None)
        if key in self._confirming or len(self._confirming) >= MAX_VERIFYING:
            return
        self._confirming.add(key)
        info = st.info
        self.stats["dead_reports"] += 1

        def confirm() -> None:
            try:
                # twice as patient as its accuser, which already waited out a TTL of
                # silence: on an overloaded host a starved member answers late, and every
                # node that gives up on it too soon takes it out of its view (a death
                # found by silence is announced to all: 256 daemons starting on two
                # cores made 13,000 such false confirmations with one TTL)
                if self.probe(info.rpc, 2 * self.patience()) == info:
                    return
                # reported dead and not answering: silent for two of its heartbeat
                # intervals is enough (for a member we do not follow, that is since it
                # last answered a probe of ours)
                window = 2 * max(st.interval, self.heartbeat_s) * (1 + self._strain)
                wait = window - (time.monotonic() - st.last_seen)
                if 0 < wait <= window:
                    gevent.sleep(wait + 0.01)
                if self._silent(st, info, window):
                    self._mark_dead(st, "reported dead, and did not answer our probe")
            finally:
                self._confirming.discard(key)

        gevent.spawn(confirm)

    def _mark_dead(self, st: PeerState, why: str) -> None:
        now = time.monotonic()
        st.alive = False
        st.dead_since = now
        self.stats["marked_dead"] += 1
        self._notify()
        log.warning("peer %s %s (silent for %.1f s): marked dead, %d entries withdrawn",
                    st.info.name, why, now - st.last_seen,
                    len(self.peer_records.get(st.info.name, {})))
        self._choose_follows()  # follow another live member instead

    # -- snapshots ------------------------------------------------------------------
    def bootstrap(self, source: PeerInfo) -> None:
        """Take the whole catalog from one member (``source``, the member that let us
        in; another if it fails or is busy), once per run, after a jittered delay."""
        if self._bootstrapped or self._bootstrapping:
            return
        self._bootstrapping = True
        gevent.spawn(self._bootstrap, source)

    def _bootstrap(self, source: PeerInfo) -> None:
        """Ask ``source``, then random live members (we learn more of them meanwhile),
        ``SNAPSHOT_TRIES`` in all, a jittered pause before each: many nodes started at
        once through one seed find it busy and spread over the members they learn."""
        try:
            tried: set[str] = set()
            src: PeerInfo | None = source
            for _ in range(SNAPSHOT_TRIES):
                gevent.sleep(random.uniform(0, JOIN_JITTER * self.heartbeat_s))
                if src is None:
                    others = [st.info for st in self.peers.values()
                              if st.alive and st.info.name not in tried]
                    if not others:
                        others = [st.info for st in self.peers.values() if st.alive]
                    if not others:
                        continue
                    src = random.choice(others)
                tried.add(src.name)
                try:
                    snap = self.fetch_snapshot(src, None)
                    sections = snap["origins"]
                    if not isinstance(sections, list):
                        raise ProtocolError("a snapshot without sections")
                except CatalogBusy as exc:
                    log.info("catalog: %s is busy (%s): asking another member", src.name, exc)
                    src = None
                    continue
                except (HpcflowError, KeyError, TypeError) as exc:
                    log.warning("catalog: snapshot from %s failed: %s", src.name, exc)
                    src = None
                    continue
                self.stats["snapshots"] += 1
                for sec in sections[:MAX_MEMBERS]:
                    self._take_section(sec, src.name)
                self._bootstrapped = True
                log.info("catalog: took the catalog from %s (%d origins)", src.name,
                         len(sections))
                return
            log.warning("catalog: no member gave us its catalog: pulling origin by origin")
        finally:
            self._bootstrapping = False

    def _resync(self, st: PeerState) -> None:
        name = st.info.name
        if name in self._syncing or self._bootstrapping:
            return  # (the whole catalog is on its way)
        self._syncing.add(name)
        self.stats["resyncs"] += 1
        gevent.spawn(self._sync, name)

    def _sync(self, name: str) -> None:
        """Pull ``name``'s section from ``name`` itself, else from one live member."""
        try:
            st = self.peers[name]
            sources = [st.info] if st.alive else []
            others = [p.info for p in self.peers.values() if p.alive and p is not st]
            if others:
                sources.append(random.choice(others))
            for src in sources:
                if self._pull(src, [name]) and self.peers.get(name) is st and st.synced \
                        and st.gap_since is None:
                    return
        finally:
            self._syncing.discard(name)

    def _pull(self, src: PeerInfo, origins: list[str]) -> bool:
        """Take the sections of ``origins`` from ``src``; False if it did not answer."""
        try:
            snap = self.fetch_snapshot(src, origins)
            sections = snap["origins"]
            if not isinstance(sections, list):
                raise ProtocolError("a snapshot without sections")
        except (HpcflowError, KeyError, TypeError) as exc:
            log.warning("catalog: sections of %s from %s failed: %s",
                        ", ".join(origins[:4]), src.name, exc)
            return False
        self.stats["sections_pulled"] += len(sections)
        for sec in sections[:len(origins)]:
            self._take_section(sec, src.name)
        return True

    def _anti_entropy(self) -> None:
        """Compare our per-origin vector with a member's and pull the origins it has
        further than we do, from it.  The members whose heartbeats we take carry their
        vector's digest: one whose digest differs from ours is asked; when all agree, no
        round trip (the answer lists every origin: asking a random member, almost never
        one we hear beyond a full mesh, made idle traffic grow with N).  A node that
        hears no one asks a random live member."""
        if self._bootstrapping:
            return
        mine = self.vdigest()
        heard = self._heard_alive()
        differ = [st for st in heard if st.vdigest != mine]
        if heard and not differ:
            return
        live = differ or [st for st in self.peers.values() if st.alive]
        if not live:
            return
        st = random.choice(live)
        self.stats["anti_entropy"] += 1
        try:
            theirs = self.fetch_snapshot(st.info, [])["vector"]
            if not isinstance(theirs, dict):
                raise ProtocolError("a vector must be a map")
        except (HpcflowError, KeyError, TypeError) as exc:
            log.debug("catalog: anti-entropy with %s failed: %s", st.info.name, exc)
            return
        behind = []
        for name, v in list(theirs.items())[:MAX_MEMBERS]:
            peer = self.peers.get(name) if isinstance(name, str) else None
            if peer is None or not peer.alive or not isinstance(v, list) or len(v) != 2:
                continue
            if v[0] == peer.info.epoch and isinstance(v[1], int) and (
                    not peer.synced or v[1] > peer.seq) and name not in self._syncing:
                behind.append(name)
        if behind:
            log.info("catalog: anti-entropy: %s has more of %d origin(s) than we do",
                     st.info.name, len(behind))
            self._pull(st.info, behind[:256])

    # -- liveness ------------------------------------------------------------------
    def patience(self) -> float:
        """How long a member may stay silent, or take to answer a probe, before we find
        it dead: ``ttl_s``, stretched while this node is itself overloaded.

        After Lifeguard's local health awareness (memberlist's "awareness"): a node
        whose own event loop runs late (a starved process, or a heavy op holding the
        CPU) would find members silent whose heartbeats wait unread in its own sockets,
        and probes time out at a node that cannot answer in time either.  Each monitor
        tick (one per heartbeat period) that comes a quarter of the TTL late or more
        raises the strain by one (at most ``MAX_STRAIN``), each tick on time lowers it by
        one; timeouts are ``ttl_s * (1 + strain)``.  256 daemons starting on two cores
        made 30,000 false deaths without it, each announced, checked by every node and
        repaired."""
        return self.ttl_s * (1 + self._strain)

    def _feel(self, late: float) -> bool:
        """Update the strain from how late the monitor's tick came (late by a quarter
        of the TTL or more: strained); True when silences may be judged now (not on a
        strained tick, whose heartbeats may be waiting in our own sockets: the next
        tick judges, strained or not)."""
        if late > self.ttl_s / 4:
            self._strain = min(MAX_STRAIN, self._strain + 1)
            judge, self._judged = not self._judged, not self._judged
        else:
            if self._strain:
                self._strain -= 1
            judge = self._judged = True
        self.stats["strain"] = self._strain
        return judge

    def _monitor(self) -> None:
        """Once per heartbeat period: judge the silences of the members whose heartbeats
        we take, resync gaps, forget the long dead, and every ``ANTI_ENTROPY_EVERY``
        periods compare vectors with a member.  (It ticked four times a period: a
        silence was found at most a quarter period sooner, for a tenth of an idle
        node's CPU.)"""
        ticks = 0
        tick = self.heartbeat_s
        while True:
            t0 = time.monotonic()
            gevent.sleep(tick)
            now = time.monotonic()
            ticks += 1
            if self._feel(now - t0 - tick):
                for st in self._heard_alive():
                    # silent for patience(), in units of its own heartbeat interval (the
                    # others' death is news from those who hear them, or a probe's
                    # finding)
                    if now - st.last_seen > self.patience() * max(
                            1.0, st.interval / self.heartbeat_s):
                        self._mark_dead(st, "silent")
                        self._announce_dead(st.info)
            for st in list(self.peers.values()):
                if st.alive and not st.synced and st.info.name not in self._syncing:
                    self._resync(st)
                elif (st.alive and st.gap_since is not None
                      and now - st.gap_since > GAP_WAIT * self.heartbeat_s
                      and st.info.name not in self._syncing):
                    log.warning("catalog: gap from %s after seq %d: pulling its updates",
                                st.info.name, st.seq)
                    self._resync(st)
                elif (not st.alive and now - st.last_seen > self.forget_after_s
                      and not self.peer_records.get(st.info.name)):
                    self._forget(st)
            self._choose_follows()  # (membership changes choose at once: a backstop)
            if ticks % ANTI_ENTROPY_EVERY == 0:
                gevent.spawn(self._anti_entropy)

    def _forget(self, st: PeerState) -> None:
        """Drop a member silent for a long time that holds nothing (it may come back: a
        hello or a gossip re-introduces it)."""
        name = st.info.name
        log.info("forgetting peer %s: silent for more than %g s and holding no entries", name,
                 self.forget_after_s)
        del self.peers[name]
        self.peer_records.pop(name, None)
        self.signed.pop(name, None)
        self._pending.pop(name, None)
        self._unfollow(name)
        self.stats["forgotten"] += 1
        self._notify()
