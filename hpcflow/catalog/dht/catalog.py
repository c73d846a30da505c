"""The catalog in a Kademlia DHT (``--catalog dht``).

What is stored (:mod:`.keys`, :mod:`.values`): *pointers*, never data.  Each
holder writes, for every part it holds, a pointer under a key of its own
(``ptr/NAME@PART/HOLDER``: the dataset record -- size, dtype, shape, version,
checksum, lineage) and one entry in the name's **index** (``idx/NAME``: which
parts and which slices of NAME it holds).  Index values are merged entry by
entry by the nodes that store them (:class:`.storage.PointerStorage`), so
several holders of one name never overwrite each other, and every entry
carries its writer's stamp (epoch, counter), so an older value never replaces
a newer one.  A lookup of NAME is one DHT lookup of its index, then one
concurrent batch of lookups of the pointers it lists (fan-out bounded by the
holders x parts found); each is one hop: the k members nearest the key are
computed from the membership (ids are digests of RPC endpoints, see
:func:`.facade.member_id`) and asked at once.  A delete writes **tombstones** (a newer entry that
says "nothing"): the index entry without the part, and the part's pointer.

Writes go through one publisher greenlet (``announce``/``retract`` only mark a
name dirty and return); each writer **republishes** everything it wrote every
``republish_s`` (default 5 min), after a restart (the store announces every
record it holds) and when its DHT routing table reaches more contacts than
before (a write made while it knew few nodes then reaches the k nearest);
a node admitting a new contact hands it the values it should hold (Kademlia's
join rule, which kademlia 2.2.3 gets wrong, see the facade).  Storing nodes
drop entries not stored again for 30 min, so a holder that is gone for good
disappears by itself, tombstones too.  kademlia's own
hourly republishing by every replica is switched off (storage.py).

Reads are **cached** per name for ``cache_ttl_s`` (default 1 s) when another
node holds something of it ("nobody else" is never cached: a put elsewhere is
seen by the next lookup): our own announce/retract of a name invalidates it at
once, other nodes' changes and deletes are seen within the TTL (``wait_for``
polls past the cache), a dead holder at once (liveness is applied on every
read, after the cache).  Our own records
are always answered from our own table, never from the DHT.

**Membership and liveness** come from the replicated mode's machinery: this
catalog owns a :class:`~hpcflow.catalog.replicated.ReplicatedCatalog` to
which it never announces a dataset, so its stream carries only heartbeats,
membership gossip and empty snapshots, and delegates ``nodes``, ``add_peer``,
``answers_as``, ``claim_conflict``, ``settling`` and the snapshot RPC to it.
A pointer whose holder that membership does not list as alive is not
offered (``include_dead`` offers it: a part whose only holder died is
reported missing, as in replicated mode).  The DHT is bootstrapped from the
members it lists (the membership joins through ``--peer``): a node's DHT UDP
port is its RPC port number, so a member's RPC endpoint says where its DHT
node is.  The routing table admits only live members' DHT addresses
(:meth:`.facade.DhtFacade.set_allowed`): a dead member is dropped from it
when the membership says so, and a datagram from a stranger does not make
it a contact that lookups would wait on.

**Listing** (``records()``, what ``hpcflow ls`` and ``c.catalog()`` show):
our own records, plus those in the **inventories** (``inv/HOLDER/PAGE``: the
keys a holder holds, paged) of every member alive now (with
``include_dead``, of every member known), read with their pointers.  It costs
a lookup per member page and per record, so it is meant for people, not for
the planner (which asks for the names it plans with).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import gevent
import gevent.event
import gevent.queue
import msgpack

from ...errors import (
    CatalogValueTooLarge,
    ConfigError,
    HpcflowError,
    ProtocolError,
)
from ...logutil import Throttled
from ..base import Catalog, NodeView
from ..membership import PeerInfo
from ..record import DatasetRecord, RecordTable
from ..replicated import ReplicatedCatalog
from . import keys as K
from .facade import DhtFacade, member_id
from .values import (
    Entry,
    decode_value,
    index_body,
    make_entry,
    merge,
    parts_of,
    pointer_body,
    record_of,
)

log = logging.getLogger("hpcflow.catalog.dht")

#: Keys listed in one inventory page at most (and bytes of them, to stay in a value).
INVENTORY_PAGE_BYTES = 4000
MAX_INVENTORY_PAGES = 256
#: Slices of one name a holder lists in its index entry at most.
MAX_SLICES_LISTED = 64
#: Lookups of a name, and listings, read at most this many pointers.
MAX_POINTERS = 4096
#: Contacts the routing table should have before we stop bootstrapping from members.
WANT_CONTACTS = 3
#: New members pinged into the routing table per tick at most.
MAX_INTRODUCE = 16
#: Endpoints remembered (resolved, tried) at most before those of non-members are dropped.
MAX_REMEMBERED = 4096
#: Republishing because the routing table grew happens at most once per this many ticks.
REGROW_TICKS = 5
#: While the membership does not change and the routing table is not thin, the live
#: members are matched with the routing table once per this many ticks (a pass costs
#: O(members) and a call into the DHT thread: every tick, it was a third of an idle
#: node's CPU at 256).
REJOIN_TICKS = 10


class DhtCatalog(Catalog):
    """A :class:`Catalog` whose dataset pointers live in a Kademlia DHT (module docstring)."""

    pushed = False  # another node's change is seen by a lookup after the cache's second

    def __init__(self, membership: ReplicatedCatalog, facade: DhtFacade, *,
                 secret: bytes | None = None, republish_s: float = 300.0,
                 cache_ttl_s: float = 1.0, poll_s: float = 0.25) -> None:
        self.membership = membership
        self.facade = facade
        self.secret = secret
        self.republish_s = republish_s
        self.cache_ttl_s = cache_ttl_s
        self.poll_s = poll_s
        self.own = RecordTable()
        self.seq = 0
        #: key -> the entry we last wrote there (republished until a tombstone expires)
        self.written: dict[str, tuple[float, Entry]] = {}
        self._dirty: gevent.queue.Queue[str | None] = gevent.queue.Queue()
        self._pending: set[str] = set()
        self._inventory_dirty = False
        self._inventory_pages = 0
        self._cache: dict[str, tuple[float, list[tuple[str, DatasetRecord]], list[str]]] = {}
        self._inflight: dict[str, gevent.event.AsyncResult] = {}
        self._changed = gevent.event.Event()
        self._greenlets: list[gevent.Greenlet] = []
        #: name -> part -> the pointer key we wrote for it (to tombstone it when dropped)
        self._pointers_of: dict[str, dict[int | None, str]] = {}
        self._resolved: dict[str, tuple[str, int] | None] = {}
        self._introduced: set[tuple[str, int]] = set()
        self._introduce_tried: dict[tuple[str, int], float] = {}
        self._tried: dict[str, float] = {}
        self._tick = max(0.05, membership.heartbeat_s)
        self._joined: tuple[str, float] = ("", 0.0)  # membership digest, next pass due
        self._runs: dict[str, int] = {}  # live members' epochs by RPC endpoint, last pass
        self._log = Throttled(log)
        self.stats = {"lookups": 0, "cache_hits": 0, "written": 0, "republished": 0,
                      "bad_values": 0, "write_errors": 0, "bootstraps": 0, "contacts": 0,
                      "too_large": 0}

    # -- lifecycle ---------------------------------------------------------------
    @property
    def self_name(self) -> str:
        return self.membership.me.name

    @property
    def me(self) -> PeerInfo:
        return self.membership.me

    @property
    def pub_endpoint(self) -> str:
        return self.membership.pub_endpoint

    def set_self(self, me: PeerInfo) -> None:
        self.membership.set_self(me)

    def start(self) -> None:
        self.membership.start()
        try:
            self.facade.start()
        except OSError as exc:
            raise ConfigError(f"--catalog dht: cannot bind UDP port {self.facade.requested_port}"
                              f" on {self.facade.interface} (the RPC port's number): {exc}"
                              ) from exc
        self._greenlets = [gevent.spawn(self._publisher), gevent.spawn(self._maintain)]

    def stop(self) -> None:
        gevent.killall(self._greenlets)
        self.facade.stop()
        self.membership.stop()

    # -- delegated to the membership ----------------------------------------------
    def add_peer(self, info: PeerInfo, verified: bool = False) -> None:
        self.membership.add_peer(info, verified)

    def answers_as(self, info: PeerInfo) -> bool:
        return self.membership.answers_as(info)

    def claim_conflict(self, info: PeerInfo) -> PeerInfo | None:
        return self.membership.claim_conflict(info)

    def nodes(self) -> list[NodeView]:
        return self.membership.nodes()

    def member(self, name: str) -> NodeView | None:
        return self.membership.member(name)

    def settling(self) -> bool:
        """The membership is settling, or our DHT node has not joined the live members
        yet (its lookups would miss what they hold)."""
        alive = sum(1 for v in self.nodes() if v.alive) - 1
        return (self.membership.settling()
                or self.stats["contacts"] < min(WANT_CONTACTS, alive))

    def snapshot_wire(self, origins: object = None) -> dict[str, Any]:
        return self.membership.snapshot_wire(origins)

    def bootstrap(self, source: PeerInfo) -> None:
        self.membership.bootstrap(source)

    def wait_changed(self, timeout: float) -> None:
        """Our own changes wake us; other nodes' are polled for (``poll_s``)."""
        self._changed.wait(min(timeout, self.poll_s))

    def _notify(self) -> None:
        event, self._changed = self._changed, gevent.event.Event()
        event.set()

    # -- writes ----------------------------------------------------------------------
    def announce(self, rec: DatasetRecord) -> None:
        self.own[rec.key] = rec
        self._mark(rec)

    def retract(self, key: str) -> None:
        rec = self.own.pop(key, None)
        if rec is not None:
            self._mark(rec)

    def _mark(self, rec: DatasetRecord) -> None:
        self._inventory_dirty = True
        for name in (rec.name, rec.lineage.get("slice_of")):
            if isinstance(name, str):
                self._cache.pop(name, None)
                if name not in self._pending:
                    self._pending.add(name)
                    self._dirty.put(name)
        self._notify()

    def _stamp(self) -> tuple[int, int]:
        self.seq += 1
        return (self.me.epoch, self.seq)

    def _entry(self, key: str, body: Any) -> Entry:
        e = make_entry(key, self.self_name, self._stamp(), body, self.secret)
        self.written[key] = (time.monotonic(), e)
        return e

    def _entries_for(self, name: str) -> list[Entry]:
        """The pointers and the index entry saying what we hold of ``name`` now."""
        me = self.self_name
        held = self.own.named(name)
        out = []
        parts = {r.part for r in held}
        for rec in held:
            out.append(self._entry(K.pointer_key(name, rec.part, me), pointer_body(rec)))
        wrote = self._pointers_of.setdefault(name, {})
        for part, key in list(wrote.items()):  # tombstones for the parts we dropped
            if part not in parts and not self.written[key][1].tombstone:
                out.append(self._entry(key, {"deleted": True}))
        for rec in held:
            wrote[rec.part] = K.pointer_key(name, rec.part, me)
        slices = sorted(r.name for r in self.own.slices_of(name))[:MAX_SLICES_LISTED]
        body = index_body(sorted(parts, key=lambda p: -1 if p is None else p))
        if slices:
            body = {**({} if body.get("deleted") else body), "slices": slices}
        idx = K.index_key(name)
        if not held and not slices and idx not in self.written:
            return out
        out.append(self._entry(idx, body))
        return out

    def _inventory_entries(self) -> list[Entry]:
        pages: list[list[str]] = [[]]
        size = 0
        for key in sorted(self.own):
            if size + len(key) + 8 > INVENTORY_PAGE_BYTES and pages[-1]:
                if len(pages) >= MAX_INVENTORY_PAGES:
                    self._log.warning("dht: inventory over %d pages: the rest is not listed "
                                      "(lookups by name still work)", MAX_INVENTORY_PAGES)
                    break
                pages.append([])
                size = 0
            pages[-1].append(key)
            size += len(key) + 8
        me = self.self_name
        out = [self._entry(K.inventory_key(me, i), {"keys": page, "pages": len(pages)})
               for i, page in enumerate(pages)]
        out += [self._entry(K.inventory_key(me, i), {"deleted": True})
                for i in range(len(pages), self._inventory_pages)]
        self._inventory_pages = len(pages)
        return out

    def _publisher(self) -> None:
        """The one writer: takes dirty names (batching what queued up meanwhile)."""
        while True:
            names = [self._dirty.get()]
            while not self._dirty.empty() and len(names) < 256:
                names.append(self._dirty.get())
            entries: list[Entry] = []
            for name in names:
                if name is None:
                    continue
                self._pending.discard(name)
                entries += self._entries_for(name)
            if self._inventory_dirty:
                self._inventory_dirty = False
                entries += self._inventory_entries()
            try:
                self._join()
            except HpcflowError as exc:  # stored here anyway; republished once joined
                self._log.warning("dht: joining before a write: %s", exc)
            self._store(entries)
            for name in names:
                if name is not None:
                    self._cache.pop(name, None)
            self._notify()

    def _store(self, entries: list[Entry]) -> None:
        items = []
        for e in entries:  # one entry over the value limit must not cost the batch
            value = _value([e])
            try:
                self.facade.check_size(e.key, value)
            except CatalogValueTooLarge as exc:
                self.stats["too_large"] += 1
                self.written.pop(e.key, None)
                log.error("dht: not stored, other nodes will not find it: %s", exc)
                continue
            items.append((e.key, value))
        if not items:
            return
        try:
            self.facade.set_many(items)
            self.stats["written"] += len(items)
        except HpcflowError as exc:  # peers unreachable: our copy stays; republished later
            self.stats["write_errors"] += 1
            self._log.warning("dht: storing %d entries failed: %s", len(entries), exc)

    def republish(self) -> int:
        """Store again everything we wrote (tombstones until they expire)."""
        limit = time.monotonic() - self.facade.storage.expire_s
        for key in [k for k, (t, e) in self.written.items() if e.tombstone and t < limit]:
            del self.written[key]
        for name, wrote in list(self._pointers_of.items()):
            for part in [p for p, k in wrote.items() if k not in self.written]:
                del wrote[part]
            if not wrote:
                del self._pointers_of[name]
        entries = [e for _, e in self.written.values()]
        for i in range(0, len(entries), 256):
            self._store(entries[i:i + 256])
        self.stats["republished"] += len(entries)
        return len(entries)

    # -- membership -> DHT routing ---------------------------------------------------
    def _join(self) -> int:
        """Admit only live members to the routing table and bootstrap from them while it
        is thin; the number of contacts.  Called every tick, and by the publisher before
        it writes (a put right after start must not be stored only here); it does the
        work when the membership changed, the table is thin, or ``REJOIN_TICKS`` ticks
        passed (a member that did not answer its introduction is tried again then)."""
        digest, now = self.membership.digest(), time.monotonic()
        if digest == self._joined[0] and now < self._joined[1]:
            return self.stats["contacts"]
        runs = {v.info.rpc: v.info.epoch for v in self.nodes()
                if v.alive and v.info.name != self.self_name}
        members = list(runs)
        if len(self._resolved) + len(self._tried) + len(self._introduce_tried) > MAX_REMEMBERED:
            keep = set(members)  # restarts on new ports leave old endpoints behind
            self._resolved = {e: a for e, a in self._resolved.items() if e in keep}
            self._tried = {e: t for e, t in self._tried.items() if e in keep}
            self._introduce_tried = {}
        for ep in members:
            if ep not in self._resolved:
                self._resolved[ep] = self.dht_address(ep)
        ids = {a: member_id(ep) for ep in members if (a := self._resolved[ep]) is not None}
        self.facade.set_allowed(ids)
        allowed = set(ids)
        restarted = {a: ids[a] for ep, epoch in runs.items()
                     if self._runs.get(ep, epoch) != epoch
                     and (a := self._resolved[ep]) is not None}
        if restarted:  # a new run at the same endpoint: introduced afresh (facade.forget)
            self.facade.forget(restarted)
            self._introduced -= set(restarted)
            for a in restarted:
                self._introduce_tried.pop(a, None)
        self._runs = runs
        self._introduced &= allowed
        now = time.monotonic()
        new = [a for a in sorted(allowed - self._introduced)
               if now - self._introduce_tried.get(a, -1e9) >= 10 * self._tick][:MAX_INTRODUCE]
        if new:  # a member we have not met in the DHT: make it a contact now (and hand it
            # its share of what we store), whether or not our table is thin; one that does
            # not answer is tried again 10 ticks later, not before every write
            self._introduce_tried.update((a, now) for a in new)
            self._introduced.update(self.facade.introduce(new))
        contacts = self.facade.contacts()
        thin = contacts < min(WANT_CONTACTS, len(allowed))
        if thin:
            addrs = self._bootstrap_addresses(members, self._resolved, self._tried,
                                              self._tick)
            if addrs:
                self.stats["bootstraps"] += 1
                contacts = self.facade.bootstrap(addrs)
        self.stats["contacts"] = contacts
        self._joined = (digest, now + self._tick * (1 if thin else REJOIN_TICKS))
        return contacts

    def _maintain(self) -> None:
        """Join (:meth:`_join`) every tick; republish on schedule, and whenever the
        routing table reaches more contacts than ever before (at most every
        ``REGROW_TICKS`` ticks): what we wrote while we knew fewer nodes then reaches
        the k nearest, not just the ones we knew."""
        next_republish = time.monotonic() + self.republish_s
        last_regrow = -1e9
        most = 0
        tick = self._tick
        while True:
            try:
                contacts = self._join()
                now = time.monotonic()
                if contacts > most and now - last_regrow >= REGROW_TICKS * tick:
                    most, last_regrow = contacts, now
                    self.republish()
                    next_republish = now + self.republish_s
                if now >= next_republish:
                    self.republish()
                    next_republish = now + self.republish_s
            except HpcflowError as exc:
                self._log.warning("dht: maintenance: %s", exc)
            gevent.sleep(tick)

    def dht_address(self, endpoint: str) -> tuple[str, int] | None:
        """Where the DHT node of the member at RPC ``endpoint`` listens, as the (IP, port)
        kademlia takes (it takes no host names); a host name is resolved by the DHT
        thread's asyncio loop, off the hub."""
        addr = dht_address_of(endpoint)
        if addr is None:
            return None
        try:
            return (self.facade.resolve(addr[0]), addr[1])
        except (OSError, HpcflowError) as exc:
            self._log.warning("dht: cannot resolve %s: %s", addr[0][:80], exc)
            return None

    @staticmethod
    def _bootstrap_addresses(members: list[str], resolved: dict[str, tuple[str, int] | None],
                             tried: dict[str, float], tick: float) -> list[tuple[str, int]]:
        """The DHT addresses of up to 8 live members not tried in the last 10 ticks."""
        now = time.monotonic()
        out = []
        for ep in members:
            if now - tried.get(ep, -1e9) < 10 * tick:
                continue
            tried[ep] = now
            addr = resolved.get(ep)
            if addr is not None:
                out.append(addr)
            if len(out) >= 8:
                break
        return out

    # -- reads -------------------------------------------------------------------------
    def _lookup(self, name: str, fresh: bool = False
                ) -> tuple[list[tuple[str, DatasetRecord]], list[str]]:
        """Every other holder's records of ``name`` and the slices listed, cached."""
        now = time.monotonic()
        hit = self._cache.get(name)
        if hit is not None and not fresh and now - hit[0] < self.cache_ttl_s:
            self.stats["cache_hits"] += 1
            return hit[1], hit[2]
        running = self._inflight.get(name)
        if running is not None:
            result: tuple[list[tuple[str, DatasetRecord]], list[str]] = running.get()
            return result
        ar: gevent.event.AsyncResult = gevent.event.AsyncResult()
        self._inflight[name] = ar
        try:
            found = self._fetch(name)
            # "nobody else" is not cached (a put may come any time), nor a split dataset
            # missing parts (their holders' pointers are being written right now)
            if (found[0] or found[1]) and self._whole(name, found[0]):
                self._cache[name] = (time.monotonic(), *found)
            ar.set(found)
            return found
        except BaseException as exc:
            ar.set_exception(exc)
            raise
        finally:
            self._inflight.pop(name, None)

    def _whole(self, name: str, others: list[tuple[str, DatasetRecord]]) -> bool:
        """Whether every part the records of ``name`` announce is among them."""
        recs = [r for _, r in others] + self.own.named(name)
        nparts = max((r.nparts or 1 for r in recs if r.part is not None), default=0)
        return len({r.part for r in recs if r.part is not None}) >= nparts

    def _fetch(self, name: str) -> tuple[list[tuple[str, DatasetRecord]], list[str]]:
        self.stats["lookups"] += 1
        idx = K.index_key(name)
        entries = self._read(idx)
        me = self.self_name
        wanted: list[tuple[str, str]] = []
        slices: list[str] = []
        for e in entries:
            if e.writer == me:
                continue
            try:
                parts = parts_of(e)
            except ProtocolError as exc:
                self._bad(idx, exc)
                continue
            body = e.body if isinstance(e.body, dict) else {}
            listed = body.get("slices")
            if isinstance(listed, list):
                slices += [s for s in listed[:MAX_SLICES_LISTED] if isinstance(s, str)]
            wanted += [(e.writer, K.pointer_key(name, p, e.writer)) for p in parts]
        return self._pointers(wanted[:MAX_POINTERS]), list(dict.fromkeys(slices))

    def _pointers(self, wanted: list[tuple[str, str]]) -> list[tuple[str, DatasetRecord]]:
        values = self.facade.get_many([k for _, k in wanted]) if wanted else {}
        out = []
        for holder, key in wanted:
            best = merge([e for v in values.get(key, [])
                          for e in decode_value(v, self.secret, key)], holder)
            if not best or best[0].tombstone:
                continue
            try:
                rec = record_of(best[0], holder)
            except (ProtocolError, HpcflowError) as exc:
                self._bad(key, exc)
                continue
            if rec is not None and K.pointer_key(rec.name, rec.part, holder) == key:
                out.append((holder, rec))
        return out

    def _read(self, key: str) -> list[Entry]:
        values = self.facade.get_many([key]).get(key, [])
        return merge([e for v in values for e in decode_value(v, self.secret, key)])

    def _bad(self, key: str, exc: Exception) -> None:
        self.stats["bad_values"] += 1
        self._log.warning("dht: ignoring a bad value under %s: %s", key[:120], exc)

    def _lives(self, name: str) -> bool:
        view = self.membership.member(name)
        return view is not None and view.alive

    def records_named(self, name: str, include_dead: bool = False) -> list[DatasetRecord]:
        out = self.own.named(name)
        others, _ = self._lookup(name)
        out += [r for holder, r in others if include_dead or self._lives(holder)]
        return out

    def slices_of(self, name: str) -> list[DatasetRecord]:
        out = self.own.slices_of(name)
        _, slices = self._lookup(name)
        for s in slices:
            out += [r for r in self.records_named(s) if r.owner != self.self_name
                    and r.lineage.get("slice_of") == name]
        return out

    def forget(self, name: str) -> None:
        self._cache.pop(name, None)

    def wait_again(self, remaining: float, attempt: int) -> None:
        """Other nodes' changes are found by polling the DHT: soon at first, then every
        ``poll_s`` (our own changes wake us at once)."""
        self._changed.wait(min(remaining, self.poll_s, 0.02 * 2 ** attempt))

    def records(self, include_dead: bool = False) -> list[DatasetRecord]:
        """Our records and those in the inventories of members alive (or all known)."""
        out = list(self.own.values())
        holders = [v.info.name for v in self.nodes()
                   if v.info.name != self.self_name and (include_dead or v.alive)]
        first = [K.inventory_key(h, 0) for h in holders]
        got = self.facade.get_many(first) if first else {}
        wanted: list[tuple[str, str]] = []
        more: list[tuple[str, str]] = []
        for h, key in zip(holders, first, strict=True):
            body = self._inventory_page(h, key, got.get(key, []))
            pages = body.get("pages", 1) if isinstance(body.get("pages"), int) else 1
            wanted += _pointer_keys(body, h)
            more += [(h, K.inventory_key(h, i)) for i in range(1, min(pages,
                                                                      MAX_INVENTORY_PAGES))]
        if more:
            got = self.facade.get_many([k for _, k in more])
            for h, key in more:
                wanted += _pointer_keys(self._inventory_page(h, key, got.get(key, [])), h)
        out += [r for _, r in self._pointers(wanted[:MAX_POINTERS])]
        return out

    def _inventory_page(self, holder: str, key: str, values: list[bytes]) -> dict[str, Any]:
        best = merge([e for v in values for e in decode_value(v, self.secret, key)], holder)
        if not best or best[0].tombstone or not isinstance(best[0].body, dict):
            return {}
        return best[0].body


def _pointer_keys(body: dict[str, Any], holder: str) -> list[tuple[str, str]]:
    keys = body.get("keys")
    if not isinstance(keys, list):
        return []
    out = []
    for k in keys[:MAX_POINTERS]:
        if isinstance(k, str):
            name, _, num = k.rpartition("@")
            if name and num.isdigit():
                out.append((holder, K.pointer_key(name, int(num), holder)))
            else:
                out.append((holder, K.pointer_key(k, None, holder)))
    return out


def _value(entries: list[Entry]) -> bytes:
    return msgpack.packb([e.raw for e in entries], use_bin_type=True)


def dht_address_of(endpoint: str) -> tuple[str, int] | None:
    """(host, port) of the DHT node of the daemon at RPC ``endpoint``: its host and its
    RPC port number (over UDP); None for ipc:// or no fixed port."""
    if not endpoint.startswith("tcp://"):
        return None
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    if not port.isdigit() or int(port) == 0 or not host:
        return None
    return (host.strip("[]"), int(port))


def dht_port_of(endpoint: str) -> int:
    """The UDP port our DHT binds: the bound RPC port's number."""
    return int(endpoint.rsplit(":", 1)[1])

