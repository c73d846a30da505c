"""The node daemon: store + catalog + bulk channel + RPC, composed and supervised.

One process, one gevent loop.  Sockets: the RPC ROUTER (zerorpc's protocol,
``rpc/strict.py``), the
catalog's PUB and SUB, and the bulk ROUTER; each has one owner greenlet.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import time
from typing import Any

import gevent
import gevent.event
import numpy as np
import zmq
import zmq.green as zmqg

from ..catalog.base import Catalog, PartLocation
from ..catalog.chunking import Payload
from ..catalog.membership import PeerInfo
from ..catalog.record import (
    DatasetRecord,
    key_of,
    validate_dtype,
    validate_name,
    validate_nparts,
    validate_part,
    validate_shape,
)
from ..catalog.replicated import ReplicatedCatalog
from ..catalog.store import Store
from ..config import NodeConfig, advertised
from ..errors import (
    ConfigError,
    DatasetExists,
    DatasetNotFound,
    HpcflowError,
    InvalidData,
    NotOwner,
    PeerUnavailable,
    ProtocolError,
)
from ..ops import DEFAULT_REGISTRY, OpError, load_op_module
from ..rpc import strict
from ..rpc.bulk import BulkClient, BulkServer, BulkSettings
from ..rpc.calls import PeerClients, refuses_connections
from ..rpc.traffic import Traffic
from .service import NodeService
from .worker import Worker

log = logging.getLogger("hpcflow.node")

#: How long requests still in flight at shutdown get to clean up after being cancelled.
STOP_GRACE_S = 5.0

MEMBERS_FILE = "members.json"
#: How long a restarted node keeps trying the members it remembers (they may be gone).
REJOIN_FOR_S = 60.0


class Node:
    """A running hpcflow daemon.  ``start()`` binds and joins; ``stop()`` tears down."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.name = config.name
        self.pid = os.getpid()
        self.epoch = time.time_ns()
        self.active = 0
        self.traffic = Traffic()
        self.ctx = zmqg.Context()
        self.store = Store(config.data_dir, self.name, config.memory_budget)
        self.store.fault_write_delay_s = config.fault_write_delay_s
        self.settings = BulkSettings(window=config.window, timeout_s=config.transfer_timeout_s,
                                     retries=config.chunk_retries,
                                     corrupt_chunks=config.fault_corrupt_chunks)
        self.peers = PeerClients(config.rpc_timeout_s)
        self.bulk_client = BulkClient(self.ctx, self.traffic, self.name, self.settings,
                                      is_alive=self._peer_alive)
        self.stopped = gevent.event.Event()
        self.exit_code = 0
        self._lock_fd = -1
        self._greenlets: list[gevent.Greenlet] = []
        self.me = PeerInfo(self.name, self.epoch, "", "", "")
        self.registry = DEFAULT_REGISTRY
        self.worker = Worker(self, self.registry)

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> None:
        cfg = self.config
        for module in cfg.ops:
            try:
                added = load_op_module(module)
            except OpError as exc:
                raise ConfigError(f"--ops {module}: {exc}") from exc
            log.info("loaded ops from %s: %s", module, ", ".join(added) or "(none new)")
        self._lock_data_dir()
        records = self.store.open()
        self.store.listeners.append(self._store_changed)
        self.service = NodeService(self)
        try:
            self.rpc = strict.Server(self.service, heartbeat=5, context=self.ctx,
                                     name=self.name)
            rpc_ep = self.rpc.bind(cfg.rpc_endpoint)
            self.bulk = BulkServer(self.ctx, self.store, cfg.bulk_endpoint, self.traffic,
                                   self.settings, admit_put=self._admit_put,
                                   on_commit=lambda rec: None)
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot bind {cfg.rpc_endpoint} / {cfg.bulk_endpoint}: {exc}"
                              ) from exc
        self.catalog = self._make_catalog()
        try:
            self.catalog.start()
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot bind {cfg.pub_endpoint}: {exc}") from exc
        adv = cfg.advertise
        self.me = PeerInfo(self.name, self.epoch, advertised(rpc_ep, adv),
                           advertised(self.catalog.pub_endpoint, adv),
                           advertised(self.bulk.endpoint, adv))
        self.catalog.set_self(self.me)
        for rec in records:
            self.catalog.announce(rec)
        self.bulk.start()
        self._greenlets.append(gevent.spawn(self.rpc.run))
        for ep in cfg.peer_endpoints:
            self._greenlets.append(gevent.spawn(self._join, ep))
        remembered = [ep for ep in self._remembered() if ep not in cfg.peer_endpoints]
        for ep in remembered:  # a restarted node finds its cluster even without --peer
            self._greenlets.append(gevent.spawn(self._join, ep, REJOIN_FOR_S))
        self._greenlets.append(gevent.spawn(self._remember_members))
        self._write_node_json()
        if remembered:
            log.info("rejoining through %d remembered member(s)", len(remembered))
        log.info("node %s ready: rpc=%s pub=%s bulk=%s, %d datasets, peers=%s", self.name,
                 self.me.rpc, self.me.pub, self.me.bulk, len(records), cfg.peers or "none")

    def _make_catalog(self) -> ReplicatedCatalog:
        if self.config.catalog != "replicated":
            raise ConfigError(f"catalog mode {self.config.catalog!r} is not available yet")
        return ReplicatedCatalog(
            self.me, self.ctx, lambda info: self.peers.call(info.rpc, "snapshot"),
            heartbeat_s=self.config.heartbeat_s, ttl_s=self.config.ttl_s, load=self.load,
            ops=self.registry.hashes,
            pub_bind=self.config.pub_endpoint, probe=self.probe,
            introduce=lambda info: self._hello(info.rpc),
            forget_after_s=self.config.forget_dead_s)

    def serve_forever(self) -> None:
        """Run until SIGINT/SIGTERM."""
        self.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            gevent.signal_handler(sig, self.stopped.set)
        self.stopped.wait()
        log.info("node %s stopping", self.name)
        self.stop()

    def stop(self) -> None:
        rpc = getattr(self, "rpc", None)
        if rpc is not None:
            # Stop accepting, then end the requests in flight: a blocking ``wait`` or a
            # long ``execute`` (whose cleanup runs on GreenletExit) within STOP_GRACE_S.
            rpc.stop(STOP_GRACE_S)
        gevent.killall(self._greenlets)
        for part in ("catalog", "bulk"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.stop()
        if getattr(self, "rpc", None) is not None:
            self.rpc.close()
        self.peers.close()
        self.store.close()
        self.ctx.destroy(linger=0)
        (self.config.data_dir / "node.json").unlink(missing_ok=True)
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        log.info("node %s stopped", self.name)

    def _lock_data_dir(self) -> None:
        d = self.config.data_dir
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd = os.open(d / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot use data dir {d}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(f"data dir {d} is in use by another hpcflow node") from None
        self._lock_fd = fd

    def _write_node_json(self) -> None:
        path = self.config.data_dir / "node.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({**self.me.to_wire(), "pid": self.pid}))
        os.replace(tmp, path)

    def _remembered(self) -> list[str]:
        """RPC endpoints of the members this data dir's last run knew (best effort)."""
        try:
            eps = json.loads((self.config.data_dir / MEMBERS_FILE).read_text())
        except (OSError, ValueError):
            return []
        if not isinstance(eps, list):
            return []
        return [ep for ep in eps[:64] if isinstance(ep, str) and len(ep) <= 256
                and ep.startswith(("tcp://", "ipc://")) and ep != self.me.rpc]

    def _remember_members(self) -> None:
        """Keep ``members.json`` up to date with the live members' RPC endpoints."""
        path = self.config.data_dir / MEMBERS_FILE
        last: list[str] | None = None
        while True:
            gevent.sleep(2 * self.config.heartbeat_s)
            eps = sorted(v.info.rpc for v in self.catalog.nodes()
                         if v.alive and v.info.name != self.name)
            if eps == last or not eps:
                continue
            try:
                tmp = path.with_suffix(".json.tmp")
                tmp.write_text(json.dumps(eps))
                os.replace(tmp, path)
                last = eps
            except OSError as exc:
                log.warning("cannot write %s: %s", path, exc)

    def _join(self, endpoint: str, give_up_after: float | None = None) -> None:
        """Introduce ourselves to a peer; retry until it answers (or ``give_up_after`` s,
        for a remembered member that may be gone for good).

        A peer that refuses us outright (our name is taken) stops this daemon:
        two nodes with one name would corrupt every catalog.
        """
        delay, warned = 0.2, False
        deadline = None if give_up_after is None else time.monotonic() + give_up_after
        while True:
            if deadline is not None and time.monotonic() > deadline:
                log.info("remembered member %s did not answer; not trying it again", endpoint)
                return
            try:
                self._hello(endpoint)
                log.info("joined the cluster through %s", endpoint)
                return
            except ConfigError as exc:
                log.error("cannot join through %s: %s", endpoint, exc)
                self.exit_code = 2
                self.stopped.set()
                return
            except HpcflowError as exc:
                if not warned:
                    log.warning("peer %s not reachable yet (%s); retrying", endpoint, exc)
                    warned = True
            gevent.sleep(delay)
            delay = min(delay * 2, 5.0)

    def _hello(self, endpoint: str) -> None:
        """Introduce ourselves at ``endpoint`` and learn the members it knows."""
        reply = self.peers.call(endpoint, "hello", self.me.to_wire())
        try:
            descriptors = [PeerInfo.from_wire(d) for d in [reply["self"], *reply["members"]]]
        except (KeyError, TypeError) as exc:
            raise ProtocolError(f"malformed hello reply from {endpoint}: {exc}") from None
        self.catalog.add_peer(descriptors[0], verified=True)  # it answered at that endpoint
        for info in descriptors[1:]:
            self.catalog.add_peer(info)

    def probe(self, endpoint: str) -> tuple[str, int] | None:
        """Who answers at an RPC endpoint now, as ``(name, epoch)``; None when nothing
        does within the TTL (a refused connection answers at once)."""
        if refuses_connections(endpoint):
            return None
        try:
            r = self.peers.call(endpoint, "ping", timeout_s=self.config.ttl_s)
            return str(r["name"]), int(r["epoch"])
        except (HpcflowError, KeyError, TypeError, ValueError):
            return None

    def _peer_alive(self, name: str) -> bool:
        """False once the catalog has declared ``name`` dead (unknown names: True)."""
        cat = getattr(self, "catalog", None)
        if cat is None:
            return True
        return all(v.alive for v in cat.nodes() if v.info.name == name)

    # -- state for the service ---------------------------------------------------
    def load(self) -> dict[str, Any]:
        return {"active": self.active + self.bulk_active(), "loadavg": os.getloadavg()[0]}

    def bulk_active(self) -> int:
        bulk = getattr(self, "bulk", None)
        return len(bulk.uploads) if bulk is not None else 0

    def catalog_snapshot_wire(self) -> dict[str, Any]:
        assert isinstance(self.catalog, ReplicatedCatalog)
        return self.catalog.snapshot_wire()

    def bulk_endpoints(self) -> dict[str, str]:
        return {v.info.name: v.info.bulk for v in self.catalog.nodes() if v.alive}

    def stats(self) -> dict[str, Any]:
        cat = self.catalog
        return {"traffic": self.traffic.to_wire(),
                "catalog": dict(cat.stats) if isinstance(cat, ReplicatedCatalog) else {},
                "bulk_malformed": self.bulk.malformed,
                "rpc": self.rpc.stats(),
                "uploads_in_progress": len(self.bulk.uploads),
                "store": self.store.stats(),
                "plans": {"hits": self.worker.plans.hits, "misses": self.worker.plans.misses},
                "learned": self.worker.learned.to_wire()}

    def _store_changed(self, key: str, rec: DatasetRecord | None) -> None:
        if rec is None:
            self.catalog.retract(key)
        else:
            self.catalog.announce(rec)

    # -- dataset operations --------------------------------------------------------
    def _admit_put(self, hdr: dict[str, Any]) -> None:
        """Cluster-wide rules a new dataset (part) must follow, checked against the catalog."""
        name, part = validate_name(hdr.get("name")), validate_part(hdr.get("part"))
        dtype = validate_dtype(hdr.get("dtype")).str
        shape = validate_shape(hdr.get("shape"))
        check_put(self.catalog, self.name, name, part, shape, dtype)

    def put_array(self, name: str, arr: Any, *, part: int | None = None,
                  nparts: int | None = None, overwrite: bool = False) -> DatasetRecord:
        validate_nparts(nparts, validate_part(part))
        check_put(self.catalog, self.name, name, part, tuple(arr.shape), arr.dtype.str)
        return self.store.put_array(name, arr, part=part, nparts=nparts, overwrite=overwrite,
                                    chunk_bytes=self.config.chunk_bytes)

    def delete(self, name: str, part: int | None) -> DatasetRecord:
        try:
            return self.store.delete(name, part)
        except DatasetNotFound:
            holders = sorted({r.owner for r in self.catalog.records()
                              if r.name == name and (part is None or r.part == part)})
            if holders:
                raise NotOwner(f"{key_of(name, part)} is held by {', '.join(holders)}, not "
                               f"{self.name}: delete it there") from None
            raise

    def pull(self, rec: DatasetRecord, deliver: Any) -> None:
        """Deliver every chunk of ``rec``: from the local store, or over the bulk path."""
        if rec.owner == self.name:
            reader = self.store.reader(rec.key, rec.version)
            for i in range(len(reader)):
                buf, d = reader.chunk(i)
                deliver(i, reader.chunking.byte_range(i)[0], Payload([buf]), d)
                gevent.sleep(0)  # a multi-GB local read must not starve the heartbeats
            return
        endpoint = self.bulk_endpoints().get(rec.owner)
        if endpoint is None:
            raise PeerUnavailable(f"{rec.owner} (holder of {rec.key}) is not alive")
        self.bulk_client.fetch(endpoint, rec.owner, rec, deliver)

    def pull_any(self, holders: tuple[DatasetRecord, ...], deliver: Any,
                 prefer: str | None = None) -> DatasetRecord:
        """Pull from the first holder that works: ``prefer`` (the source a plan chose)
        first, then our own copy, then the others in catalog order."""
        ordered = sorted(holders, key=lambda r: (r.owner != prefer, r.owner != self.name))
        errors = []
        for rec in ordered:
            try:
                self.pull(rec, deliver)
                return rec
            except PeerUnavailable as exc:
                errors.append(str(exc))
        raise PeerUnavailable("; ".join(errors) or "no holder")

    def gather(self, name: str, part: int | None = None) -> Any:
        """The whole dataset (or one part) as one in-memory array."""
        loc = self.catalog.locate(name)
        parts = [p for p in loc.parts if part is None or p.part == part]
        if part is None and not loc.complete:
            raise DatasetNotFound(f"{name}: parts {list(loc.missing)} are on no live node")
        if not parts:
            raise DatasetNotFound(f"{key_of(name, part)} is on no live node")
        rows = sum(p.row_stop - p.row_start for p in parts)
        out = np.empty((rows, *loc.shape[1:]) if loc.shape else (), dtype=np.dtype(loc.dtype))
        flat = out.reshape(-1).view(np.uint8)
        row_bytes = out.nbytes // max(rows, 1) if loc.shape else out.nbytes
        base = 0
        for p in parts:
            def deliver(i: int, off: int, buf: Payload, d: int, base: int = base) -> None:
                buf.copy_into(flat, base + off)
            self.pull_any(p.holders, deliver)
            base += (p.row_stop - p.row_start) * row_bytes
        return out

    def replicate(self, name: str, part: int | None) -> list[DatasetRecord]:
        """Copy a dataset's parts into the local store (copies are catalogued replicas)."""
        loc = self.catalog.locate(name)
        out = [self.replicate_part(p)[0] for p in loc.parts if part is None or p.part == part]
        if not out:
            raise DatasetNotFound(f"{key_of(name, part)} is on no live node")
        return out

    def replicate_part(self, p: PartLocation, prefer: str | None = None,
                       lineage: dict[str, Any] | None = None) -> tuple[DatasetRecord, str | None]:
        """Copy one part here unless we have it; returns our record and the source used.

        ``prefer`` is tried first (falling back to the other holders if it fails);
        ``lineage`` entries are added to the copy's (e.g. the workflow that made it).
        """
        mine = next((r for r in p.holders if r.owner == self.name), None)
        if mine is not None:
            return mine, None
        src = p.holders[0]
        # A copy a workflow makes (its lineage carries the flow tag) is an intermediate.
        writer = self.store.begin(src.name, src.shape, src.dtype, part=src.part,
                                  nparts=src.nparts, lineage={**src.lineage, **(lineage or {})},
                                  chunk_bytes=src.chunk_bytes, volatile=bool(lineage))
        try:
            used = self.pull_any(p.holders, lambda i, off, buf, d: writer.write_chunk(i, buf, d),
                                 prefer)
            return writer.commit(src.checksum), used.owner
        except BaseException:
            writer.abort()
            raise


def check_put(catalog: Catalog, me: str, name: str, part: int | None,
              shape: tuple[int, ...], dtype: str) -> None:
    """A user's put must not shadow another node's dataset or break a partitioned one.

    A part must match every sibling part the catalog knows of (ours, other live
    nodes' and dead members' alike) in dtype and row shape; replacing our own
    copy of the same part is the store's business (``overwrite``).
    """
    known = [r for r in catalog.records(include_dead=True) if r.name == name]
    live_others = [r for r in catalog.records() if r.name == name and r.owner != me]
    if part is None:
        if live_others:
            raise DatasetExists(f"{name} already exists on {live_others[0].owner}")
        return
    whole = [r for r in known if r.part is None and r.owner != me]
    if whole:
        raise InvalidData(f"{name} is a whole dataset on {whole[0].owner}; it has no parts")
    clash = [r for r in live_others if r.part == part]
    if clash:
        raise DatasetExists(f"part {part} of {name} already exists on {clash[0].owner}")
    for ref in (r for r in known if r.part is not None and r.part != part):
        if ref.dtype != dtype or tuple(ref.shape[1:]) != tuple(shape[1:]):
            raise InvalidData(
                f"part {part} of {name} must match its other parts: part {ref.part} on "
                f"{ref.owner} has dtype {ref.dtype} and rows of shape {list(ref.shape[1:])}, "
                f"got {dtype} and {list(shape[1:])}")


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=None,
    )


def run_node(config: NodeConfig) -> int:
    """Run a daemon until stopped; start-up errors propagate (the CLI prints them)."""
    setup_logging(config.log_level)
    node = Node(config)
    node.serve_forever()
    return node.exit_code


__all__ = ["Node", "check_put", "run_node"]
