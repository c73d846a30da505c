"""Full catalog replication over PUB/SUB, after the ZeroMQ Guide's Clone pattern.

* Each node publishes only its own inventory changes, numbered per publisher
  (:class:`~hpcflow.catalog.kvmsg.KVMsg`), on its PUB socket.
* A subscriber connects its SUB socket first, then takes a snapshot of the
  publisher's state over RPC, then applies buffered and later updates whose
  sequence number is newer than the snapshot.  A gap, or a heartbeat that
  announces a higher sequence than we have, triggers a fresh snapshot.
* Idle publishers send heartbeats (default every second; less often beyond
  ``HB_FANIN`` peers, see :mod:`.membership`) carrying load and membership
  deltas with a digest, never the whole membership.  A peer silent for longer
  than the TTL (in units of its heartbeat interval), or that fails a probe
  after ``ttl_s`` of silence, is marked dead and its entries are no longer
  offered; they come back when it does.
  While a live peer is being resynced its last known entries stay offered
  (the Clone pattern serves its last state, never an empty one).
* Membership: a live peer whose membership digest keeps differing from ours
  (it restarted, was started without ``--peer``, or missed a delta) gets a
  hello from us (push/pull), rate-limited.  A
  descriptor new to us (a name, or a run of a name: an epoch, from a hello, a
  gossip, a snapshot or a peer's own stream) is believed only once its own RPC
  endpoint answers ``ping`` with exactly that descriptor, and never when its
  epoch is more than a day ahead of our clock: otherwise any process could
  gossip a member's name with a huge epoch and its own PUB, and every node would
  follow it and ignore the real member, even after a restart.  A
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

Each peer's stream is bound to that peer: it is read on a SUB socket of its
own, connected only to the PUB endpoint the peer gave in its descriptor
(from its hello, its snapshot or a member's gossip), and a message on it
whose sender is another node is dropped (``stats["foreign"]``).  So a
process can only ever speak for the name it joined under: it cannot publish
as another node, with that node's epoch and next sequence number, and make
the real updates look like duplicates.  With keys (``rpc/auth.py``) only a
holder of the node key can be a PUB a node's SUB accepts, and only a node
key can say hello.

Sockets and greenlets: the PUB socket is owned by the publisher greenlet
(others hand it messages through a queue); each peer's SUB socket by that
peer's stream greenlet, which makes, reads and closes it (following another
endpoint, or forgetting the peer, ends the greenlet).  Snapshot fetches run
in short-lived greenlets that only touch plain Python state, so no socket is
shared.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from collections.abc import Callable
from typing import Any

import gevent
import gevent.event
import gevent.queue
import zmq.green as zmq

from ..errors import HpcflowError, ProtocolError
from ..logutil import Throttled
from ..rpc import greenio
from .base import Catalog, NodeView
from .kvmsg import BYE, HB, KV, MAX_BODY, KVMsg
from .membership import (
    HB_FANIN,
    MAX_EPOCH_AHEAD_S,
    NEWS_PER_HEARTBEAT,
    NEWS_RETRANSMIT,
    PROBE_EVERY,
    PeerInfo,
    PeerState,
    epoch_ahead_s,
    generation,
    heartbeat_interval,
    membership_digest,
)
from .record import DatasetRecord, RecordTable

log = logging.getLogger("hpcflow.catalog")

SnapshotFetcher = Callable[[PeerInfo], dict[str, Any]]
#: Who answers at an RPC endpoint right now: the descriptor it gives of itself, or None.
Prober = Callable[[str], "PeerInfo | None"]
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
#: Members at most (each costs a SUB socket, a file descriptor and a greenlet here).
MAX_MEMBERS = 1024


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
        probe: Prober = lambda endpoint: None,
        introduce: Callable[[PeerInfo], None] = lambda info: None,
        forget_after_s: float = 600.0,
        duplicate: Callable[[PeerInfo], None] = lambda info: None,
    ) -> None:
        self.me = me
        self.ctx = ctx
        self.fetch_snapshot = fetch_snapshot
        self.heartbeat_s = heartbeat_s
        self.ttl_s = ttl_s
        self._started = time.monotonic()
        self.load = load
        self.ops = ops
        self.probe = probe
        self.introduce = introduce
        self.forget_after_s = forget_after_s
        self.duplicate = duplicate
        self._verifying: set[tuple[str, int]] = set()
        self._verify_backlog: dict[tuple[str, int], PeerInfo] = {}
        self._refused: dict[tuple[str, int], float] = {}
        self._pub_bind = pub_bind or me.pub
        self.seq = 0
        self.own: RecordTable = RecordTable()
        self.peers: dict[str, PeerState] = {}
        self.peer_records: dict[str, RecordTable] = {}
        self._pending: dict[str, list[KVMsg]] = {}
        self._syncing: set[str] = set()
        # None in the outbox asks the publisher for a heartbeat now (membership news).
        self._outbox: gevent.queue.Queue[KVMsg | None] = gevent.queue.Queue()
        #: peer name -> (PUB endpoint, the greenlet reading it on its own SUB socket)
        self._streams: dict[str, tuple[str, gevent.Greenlet]] = {}
        self._greenlets: list[gevent.Greenlet] = []
        self._garbage_log = Throttled(log)
        #: membership news still to be piggybacked on our heartbeats: descriptors of members
        #: that joined or restarted, and (name, epoch) of members found dead -> beats left
        self._news: dict[tuple[str, int], tuple[dict[str, Any], int]] = {}
        self._dead_news: dict[tuple[str, int], int] = {}
        self._confirming: set[tuple[str, int]] = set()
        self._probe_order: list[str] = []
        self._last_pushpull = float("-inf")
        self._fast_until = float("-inf")
        self.stats = {"received": 0, "malformed": 0, "resyncs": 0, "published": 0,
                      "marked_dead": 0, "introduced": 0, "refused_claims": 0, "forgotten": 0,
                      "foreign": 0, "unverified": 0, "future_epochs": 0, "too_many_members": 0,
                      "heartbeats_received": 0, "bytes_received": 0, "probes": 0,
                      "probes_failed": 0, "dead_reports": 0, "heartbeat_interval_ms": 0}
        self.pub_endpoint = ""
        self._changed = gevent.event.Event()
        self._pub: zmq.Socket | None = None
        self._digest: tuple[object, str] = (None, "")

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
        event, self._changed = self._changed, gevent.event.Event()
        event.set()

    def set_self(self, me: PeerInfo) -> None:
        """Update our own descriptor once all endpoints are bound."""
        self.me = me

    def stop(self) -> None:
        gevent.killall(self._greenlets)
        gevent.killall([g for _, g in self._streams.values()])  # each closes its socket
        self._streams.clear()
        if self._pub is not None:  # its owner greenlet is gone: say goodbye ourselves
            with contextlib.suppress(zmq.ZMQError):
                self._pub.send_multipart(KVMsg(BYE, self.me.name, self.me.epoch,
                                               self.seq).encode())
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
        self._outbox.put(KVMsg(KV, self.me.name, self.me.epoch, self.seq, key, value))

    def add_peer(self, info: PeerInfo, verified: bool = False, spread: bool = True) -> None:
        """Learn of a peer.  A descriptor that is new to us (another name, or another run
        of a name) is believed only once its own RPC endpoint answers with exactly it, and
        a newer run of a live member at another endpoint only once that member no longer
        answers as itself: both are checked in the background, unless ``verified`` (the
        caller checked, see :meth:`answers_as` and :meth:`claim_conflict`).

        A verified newcomer is announced on our next heartbeats when we heard of it first
        hand (``verified`` and ``spread``: it said hello to us); what we learned from gossip
        is not announced again (every member hears the first announcement directly: a
        repeat by every node made each heartbeat O(N) again while a cluster formed)."""
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
            return  # a run's endpoints never change: another descriptor of it is false
        if st is not None and info.epoch < st.info.epoch and st.alive and not verified:
            return  # an older run while the newer lives: a late gossip, or a twin
        if not verified:
            self._verify_later(info)
            return
        if st is None:
            if len(self.peers) >= MAX_MEMBERS:
                self.stats["too_many_members"] += 1
                self._garbage_log.warning("catalog: not following %s: %d members already",
                                          info.name[:64], len(self.peers))
                return
            log.info("learned of peer %s at %s", info.name, info.rpc)
            self.peers[info.name] = PeerState(info)
            self.peer_records[info.name] = RecordTable()
            self._follow(info.name, info.pub)
            self._changed_membership(info, spread)
            return
        log.info("peer %s restarted (epoch %d -> %d)", info.name, st.info.epoch, info.epoch)
        if info.pub != st.info.pub:
            self._follow(info.name, info.pub)
        st.info = info
        st.synced = False
        self._changed_membership(info, spread)

    def _changed_membership(self, info: PeerInfo, spread: bool) -> None:
        """Heartbeat now and every ``heartbeat_s`` for a few beats (a newcomer counts us
        alive once it hears our stream); announce ``info`` if ``spread``, once it is alive
        to us (as the full member lists did: a member not heard from is not vouched for)."""
        st = self.peers.get(info.name)
        if spread and st is not None:
            if st.alive:  # a restart of a live member: it answered as the new run
                self._add_news(info)
            else:
                st.announce = True
        self._fast_until = time.monotonic() + NEWS_RETRANSMIT * self.heartbeat_s
        self._outbox.put(None)

    def answers_as(self, info: PeerInfo) -> bool:
        return self.probe(info.rpc) == info

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
        answer = self.probe(st.info.rpc)
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
                        self.add_peer(info, verified=True, spread=False)
                    return
                owner = self.claim_conflict(info)
                if owner is None:
                    self.add_peer(info, verified=True, spread=False)
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
        """Our heartbeat interval now (see :func:`~.membership.heartbeat_interval`); every
        ``heartbeat_s`` while we have membership news to spread, so that a newcomer (which
        only counts us alive once our stream speaks) hears from us soon."""
        if self._news or self._dead_news or time.monotonic() < self._fast_until:
            return self.heartbeat_s
        return heartbeat_interval(self.heartbeat_s,
                                  sum(1 for st in self.peers.values() if st.alive))

    def digest(self) -> str:
        """Digest of the live members as we see them, ourselves included; computed again
        only after a member changed (every heartbeat received asks for it: at 256 members
        recomputing it was about 0.2 ms a heartbeat)."""
        key = (generation(), len(self.peers), self.me.name, self.me.epoch)
        if self._digest[0] != key:
            self._digest = (key, membership_digest([(self.me.name, self.me.epoch)] + [
                (st.info.name, st.info.epoch) for st in self.peers.values() if st.alive]))
        return self._digest[1]

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

    def records_named(self, name: str, include_dead: bool = False) -> list[DatasetRecord]:
        out = self.own.named(name)
        for peer, recs in self.peer_records.items():
            if include_dead or self.peers[peer].alive:
                out.extend(recs.named(name))
        return out

    def slices_of(self, name: str) -> list[DatasetRecord]:
        out = self.own.slices_of(name)
        for peer, recs in self.peer_records.items():
            if self.peers[peer].alive:
                out.extend(recs.slices_of(name))
        return out

    def records(self, include_dead: bool = False) -> list[DatasetRecord]:
        out = list(self.own.values())
        for name, recs in self.peer_records.items():
            if include_dead or self.peers[name].alive:  # resyncing: last known entries
                out.extend(recs.values())
        return out

    def snapshot_wire(self) -> dict[str, Any]:
        """Our own state for a subscriber's snapshot request (Clone: ICANHAZ -> KTHXBAI)."""
        return {"epoch": self.me.epoch, "seq": self.seq, "self": self.me.to_wire(),
                "records": [r.to_wire() for r in self.own.values()]}

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
        """Our load, ops and seq, plus membership *deltas*: the members that joined or
        restarted recently ("members", each sent ``NEWS_RETRANSMIT`` times), those found
        dead recently ("dead"), and a digest of our live members ("d"), never the whole
        membership (which made every heartbeat O(N) and every node's cost O(N^2))."""
        members = [self.me.to_wire()]
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
        # "i": the time until our next heartbeat (after the news above was counted down),
        # which receivers' TTL for us is measured in
        interval = self._interval()
        self.stats["heartbeat_interval_ms"] = round(interval * 1000)
        return KVMsg(HB, self.me.name, self.me.epoch, self.seq,
                     props={"load": self.load(), "members": members, "ops": self.ops(),
                            "dead": dead, "d": self.digest(), "i": interval})

    # -- subscribers ----------------------------------------------------------------
    def _follow(self, name: str, endpoint: str) -> None:
        """Read ``name``'s stream at ``endpoint`` (instead of any earlier endpoint)."""
        old = self._streams.get(name)
        if old is not None and old[0] == endpoint:
            return
        self._unfollow(name)
        self._streams[name] = (endpoint, gevent.spawn(self._stream, name, endpoint))

    def _unfollow(self, name: str) -> None:
        old = self._streams.pop(name, None)
        if old is not None:
            old[1].kill(block=False)  # may be the current greenlet: it ends at its next switch

    def _stream(self, name: str, endpoint: str) -> None:
        """The one owner of the SUB socket for ``name``'s stream: everything on it must
        come from ``name``."""
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
            sub.setsockopt(zmq.SUBSCRIBE, b"")
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
                if msg.sender != name:
                    self.stats["foreign"] += 1
                    self._garbage_log.warning("catalog: dropped a message from %s's stream "
                                              "that claims to come from %s", name,
                                              msg.sender[:64])
                    continue
                try:
                    self._handle(msg)
                except Exception:  # a bug must not end the stream: log it, read on
                    log.exception("catalog: error handling a message from %s", name)
        except zmq.ZMQError as exc:  # the context is going away
            log.debug("catalog: stream of %s ended: %s", name, exc)
        finally:
            sub.close(linger=0)

    def _handle(self, msg: KVMsg) -> None:
        if msg.sender == self.me.name:
            return
        st = self.peers.get(msg.sender)
        if msg.kind == HB:
            self._gossip(msg)
            st = self.peers.get(msg.sender)
        if st is None:
            return  # not a member we know of; its hello or a gossip will introduce it
        if msg.kind == BYE:
            if msg.epoch == st.info.epoch and st.alive:
                st.alive, st.dead_since = False, time.monotonic()
                log.info("peer %s left the cluster: %d entries withdrawn", msg.sender,
                         len(self.peer_records.get(msg.sender, {})))
                self._notify()
            return
        if msg.epoch != st.info.epoch:
            if msg.epoch > st.info.epoch:  # a new run here: believed once its RPC says so
                self.add_peer(PeerInfo(st.info.name, msg.epoch, st.info.rpc, st.info.pub,
                                       st.info.bulk))
            return  # a late message from a previous run, or one not yet verified
        st.last_seen = time.monotonic()
        if not st.alive:
            st.alive = True
            if st.announce:
                st.announce = False
                self._add_news(st.info)
            log.info("peer %s is alive", msg.sender)
            st.dead_since = None
            self._notify()
            self._outbox.put(None)  # gossip the news now rather than at the next beat
        if msg.kind == HB:
            self.stats["heartbeats_received"] += 1
            load, ops = msg.props.get("load"), msg.props.get("ops")
            st.load = load if isinstance(load, dict) else {}
            if isinstance(ops, dict):
                st.ops = {str(k): str(v) for k, v in list(ops.items())[:10_000]}
            interval = msg.props.get("i")
            if isinstance(interval, int | float) and not isinstance(interval, bool):
                # no longer than a full cluster's: probes find a dead node anyway
                st.interval = min(max(float(interval), self.heartbeat_s),
                                  heartbeat_interval(self.heartbeat_s, MAX_MEMBERS))
            digest = msg.props.get("d")
            if isinstance(digest, str):
                self._check_digest(st, digest)
            else:  # a peer that sends its whole membership (as before digests)
                self._check_known_by(st, msg.props.get("members"))
        if not st.synced and msg.kind == HB and msg.seq == 0 and not self._pending.get(
                msg.sender) and msg.sender not in self._syncing:
            # It has published nothing in this run: its table is empty, and a snapshot
            # would say just that (N of them per joiner were most of a cluster's start-up).
            self.peer_records[msg.sender] = RecordTable()
            st.seq, st.synced = 0, True
            self._notify()
            return
        if not st.synced:
            if msg.kind == KV:
                pend = self._pending.setdefault(msg.sender, [])
                if len(pend) < MAX_PENDING:
                    pend.append(msg)
            self._resync(st)
            return
        if msg.kind == KV:
            if msg.seq <= st.seq:
                return  # duplicate
            if msg.seq != st.seq + 1:
                log.warning("catalog: gap from %s (have %d, got %d): resync",
                            msg.sender, st.seq, msg.seq)
                st.synced = False
                self._pending[msg.sender] = [msg]
                self._resync(st)
                return
            self._apply(st, msg)
        elif msg.seq > st.seq:
            log.warning("catalog: %s is at seq %d, we have %d: resync", msg.sender, msg.seq, st.seq)
            st.synced = False
            self._resync(st)

    def _apply(self, st: PeerState, msg: KVMsg) -> None:
        recs = self.peer_records[st.info.name]
        st.seq = msg.seq
        self._notify()
        if msg.value is None:
            recs.pop(msg.key, None)
            return
        try:
            rec = DatasetRecord.from_wire(msg.value)
        except HpcflowError as exc:
            self._garbage_log.warning("catalog: bad record from %s: %s", st.info.name, exc)
            return
        if rec.owner != st.info.name or rec.key != msg.key:
            self._garbage_log.warning("catalog: %s announced a record it does not own: %s",
                                      st.info.name, msg.key)
            return
        recs[rec.key] = rec

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
        """SWIM's failure detector, simplified: every ``PROBE_EVERY`` heartbeat periods
        ping one live member (round robin over a shuffled list).  One that does not answer
        as itself, and has been silent for ``ttl_s``, is marked dead and announced."""
        while True:
            gevent.sleep(self.heartbeat_s * PROBE_EVERY)
            st = self._next_probe_target()
            if st is not None:
                try:
                    self._probe_one(st)
                except Exception:  # the detector must not die with one probe
                    log.exception("catalog: probing %s failed", st.info.name)

    def _next_probe_target(self) -> PeerState | None:
        while True:
            if not self._probe_order:
                self._probe_order = [n for n, st in self.peers.items() if st.alive]
                random.shuffle(self._probe_order)
                if not self._probe_order:
                    return None
            st = self.peers.get(self._probe_order.pop())
            if st is not None and st.alive:
                return st

    def _probe_one(self, st: PeerState) -> None:
        info = st.info
        self.stats["probes"] += 1
        answer = self.probe(info.rpc)
        if answer == info:
            return  # alive (only its stream's messages keep it alive: see _monitor)
        if answer is not None and answer.name == info.name and answer.epoch > info.epoch:
            self.add_peer(answer)  # it restarted: believed once checked, as any descriptor
        self.stats["probes_failed"] += 1
        if self._silent(st, info):
            self._mark_dead(st, "did not answer a probe")
            self._dead_news[(info.name, info.epoch)] = NEWS_RETRANSMIT
            self._outbox.put(None)  # tell the others now: they check for themselves

    def _silent(self, st: PeerState, info: PeerInfo) -> bool:
        """Still the member we probed, believed alive, and nothing from it for ``ttl_s``."""
        return (self.peers.get(info.name) is st and st.info == info and st.alive
                and time.monotonic() - st.last_seen > self.ttl_s)

    def _confirm_dead(self, name: str, epoch: int) -> None:
        """A member reports ``name`` dead: believe it only if it does not answer our own
        probe either (one member's word must not take a node out of everyone's view)."""
        st, key = self.peers.get(name), (name, epoch)
        if (st is None or st.info.epoch != epoch or not st.alive or key in self._confirming
                or len(self._confirming) >= MAX_VERIFYING):
            return
        self._confirming.add(key)
        info = st.info
        self.stats["dead_reports"] += 1

        def confirm() -> None:
            try:
                if self.probe(info.rpc) != info and self._silent(st, info):
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

    # -- snapshots ------------------------------------------------------------------
    def _resync(self, st: PeerState) -> None:
        name = st.info.name
        if name in self._syncing:
            return
        self._syncing.add(name)
        self.stats["resyncs"] += 1
        gevent.spawn(self._sync, name)

    def _sync(self, name: str) -> None:
        try:
            st = self.peers[name]
            snap = self.fetch_snapshot(st.info)
            epoch, seq = int(snap["epoch"]), int(snap["seq"])
            recs = RecordTable()
            for d in snap["records"]:
                rec = DatasetRecord.from_wire(d)
                if rec.owner == name:
                    recs[rec.key] = rec
            if epoch > st.info.epoch and isinstance(snap.get("self"), dict):
                self.add_peer(PeerInfo.from_wire(snap["self"]))
            if epoch != st.info.epoch:
                raise ProtocolError(f"snapshot epoch {epoch} != expected {st.info.epoch}")
            self.peer_records[name] = recs
            st.seq = seq
            st.synced = True
            for msg in sorted(self._pending.pop(name, []), key=lambda m: m.seq):
                if msg.epoch != epoch or msg.seq <= st.seq:
                    continue
                if msg.seq != st.seq + 1:
                    st.synced = False
                    break
                self._apply(st, msg)
            self._notify()
            log.info("catalog: synced %s at seq %d (%d entries)", name, st.seq, len(recs))
        except (HpcflowError, KeyError, TypeError, ValueError) as exc:
            log.warning("catalog: snapshot from %s failed: %s", name, exc)
        finally:
            self._syncing.discard(name)

    # -- liveness ------------------------------------------------------------------
    def _monitor(self) -> None:
        while True:
            # a large cluster is looked over less often (its heartbeats are sparser too)
            gevent.sleep(self.heartbeat_s / (4 if len(self.peers) <= HB_FANIN else 1))
            now = time.monotonic()
            for st in list(self.peers.values()):
                # silent for ttl_s, in units of its own heartbeat interval
                ttl = self.ttl_s * max(1.0, st.interval / self.heartbeat_s)
                if st.alive and now - st.last_seen > ttl:
                    self._mark_dead(st, "silent")
                elif st.alive and not st.synced and st.info.name not in self._syncing:
                    self._resync(st)
                elif (not st.alive and now - st.last_seen > self.forget_after_s
                      and not self.peer_records.get(st.info.name)):
                    self._forget(st)

    def _forget(self, st: PeerState) -> None:
        """Drop a member silent for a long time that holds nothing (it may come back: a
        hello or a gossip re-introduces it)."""
        name = st.info.name
        log.info("forgetting peer %s: silent for more than %g s and holding no entries", name,
                 self.forget_after_s)
        del self.peers[name]
        self.peer_records.pop(name, None)
        self._pending.pop(name, None)
        self._unfollow(name)
        self.stats["forgotten"] += 1
        self._notify()
