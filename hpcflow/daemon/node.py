"""The node daemon: store + catalog + bulk channel + RPC, composed and supervised.

The Node wires its parts and starts and stops them; the parts see it only
through the protocols of :mod:`.parts` (none of them imports this module).
One process, one gevent loop.  Sockets: the RPC ROUTER (zerorpc's protocol,
``rpc/strict.py``), the
catalog's PUB and SUB, and the bulk ROUTER; each has one owner greenlet.
With keys (``--keys``) every one of them is CURVE-secured through the
node's context and a ZAP handler admits only the cluster's keys
(``rpc/auth.py``); node-to-node calls are refused to client keys.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import signal
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import gevent
import gevent.event
import zmq

from ..catalog.membership import PeerInfo
from ..catalog.record import DatasetRecord
from ..catalog.replicated import ReplicatedCatalog
from ..catalog.signing import Signer
from ..catalog.store import Store
from ..config import NodeConfig, advertised, timeout_scale
from ..errors import ConfigError
from ..ops import DEFAULT_REGISTRY, OpError, load_op_module
from ..rpc import auth, strict
from ..rpc.bulk import BulkClient, BulkServer, BulkSettings
from ..rpc.calls import PeerClients
from ..rpc.traffic import Traffic
from . import opcheck
from .datasets import Datasets
from .epoch import next_epoch
from .members import REJOIN_FOR_S, Members
from .service import NODE_ONLY, NodeService
from .worker import Worker

if TYPE_CHECKING:  # imported where used: only --catalog dht and --metrics need them
    from ..catalog.dht.catalog import DhtCatalog
    from .metrics import MetricsServer

log = logging.getLogger("hpcflow.node")

#: How long requests still in flight at shutdown get to clean up after being cancelled.
STOP_GRACE_S = 5.0


class Node:
    """A running hpcflow daemon.  ``start()`` binds and joins; ``stop()`` tears down."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.name = config.name
        self.pid = os.getpid()
        self.epoch = 0  # set by start(), once the data dir is ours (see epoch.py)
        self.active = 0
        self.traffic = Traffic()
        self.keys = auth.load(config.keys, auth.NODE)  # ConfigError naming a bad key file
        self.ctx = auth.context(self.keys)
        self.zap: auth.ZapHandler | None = None
        self.metrics: MetricsServer | None = None
        self.store = Store(config.data_dir, self.name, config.memory_budget)
        self.store.fault_write_delay_s = config.fault_write_delay_s
        self.settings = BulkSettings(window=config.window, timeout_s=config.transfer_timeout_s,
                                     retries=config.chunk_retries,
                                     corrupt_chunks=config.fault_corrupt_chunks,
                                     max_uploads=config.max_uploads,
                                     max_uploads_per_connection=config.max_uploads_per_connection)
        # the node's one context, with or without keys: another one (pyzmq's shared
        # instance) is two more threads (its I/O thread and reaper) in every daemon
        self.peers = PeerClients(config.rpc_timeout_s, context=self.ctx)
        self.bulk_client = BulkClient(self.ctx, self.traffic, self.name, self.settings,
                                      is_alive=self._peer_alive)
        self.stopped = gevent.event.Event()
        self.exit_code = 0
        self._lock_fd = -1
        self._greenlets: list[gevent.Greenlet] = []
        self.signer = Signer()  # this run's catalog key (see catalog/signing.py)
        self.me = PeerInfo(self.name, self.epoch, "", "", "", self.signer.public_hex)
        self.registry = DEFAULT_REGISTRY
        self.datasets = Datasets(self)
        self.members = Members(self, self._refused)
        self.worker = Worker(self, self.datasets, self.registry)
        # the janitor waits for the node to start, and stops with its other greenlets
        self._greenlets.append(gevent.spawn(self.worker.janitor.run))

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
        self.epoch = next_epoch(cfg.data_dir)
        records = self.store.open()
        self.store.listeners.append(self._store_changed)
        self.store.before_commit = self.datasets.claims.gate
        self.service = NodeService(self, self.worker, self.datasets)
        self._secure()
        if cfg.catalog == "dht":
            self._check_dht_port(cfg.rpc_endpoint)
        try:
            self.rpc = strict.Server(self.service, heartbeat=5, context=self.ctx,
                                     name=self.name,
                                     node_only=NODE_ONLY if self.keys else frozenset())
            rpc_ep = self.rpc.bind(cfg.rpc_endpoint)
            self.bulk = BulkServer(self.ctx, self.store, cfg.bulk_endpoint, self.traffic,
                                   self.settings, admit_put=self.datasets.admit_put,
                                   on_commit=lambda rec: None)
        except zmq.ZMQError as exc:
            raise ConfigError(f"cannot bind {cfg.rpc_endpoint} / {cfg.bulk_endpoint}: {exc}"
                              ) from exc
        self.catalog = self._make_catalog(rpc_ep)
        try:
            self.catalog.start()
        except (zmq.ZMQError, OSError) as exc:  # OSError: the DHT's UDP port (--catalog dht)
            raise ConfigError(f"cannot bind {cfg.pub_endpoint}: {exc}") from exc
        adv = cfg.advertise
        self.me = PeerInfo(self.name, self.epoch, advertised(rpc_ep, adv),
                           advertised(self.catalog.pub_endpoint, adv),
                           advertised(self.bulk.endpoint, adv), self.signer.public_hex)
        self.catalog.set_self(self.me)
        for rec in records:
            self.catalog.announce(rec)
        self.bulk.start()
        if cfg.metrics:
            from .metrics import MetricsServer, NodeCollector  # prometheus_client: ~4 MB

            self.metrics = MetricsServer(cfg.metrics, NodeCollector(
                self, self.worker.events, self.bulk_active))
            self.metrics.start()
        self._greenlets.append(gevent.spawn(self.rpc.run))
        for ep in cfg.peer_endpoints:
            self._greenlets.append(gevent.spawn(self.members.join, ep))
        remembered = [ep for ep in self.members.remembered() if ep not in cfg.peer_endpoints]
        for ep in remembered:  # a restarted node finds its cluster even without --peer
            self._greenlets.append(gevent.spawn(self.members.join, ep, REJOIN_FOR_S))
        self._greenlets.append(gevent.spawn(self.members.remember))
        self._greenlets.append(gevent.spawn(opcheck.watch, self, opcheck.EVERY * cfg.heartbeat_s))
        self._write_node_json()
        if remembered:
            log.info("rejoining through %d remembered member(s)", len(remembered))
        log.info("node %s ready: rpc=%s pub=%s bulk=%s, %d datasets, peers=%s", self.name,
                 self.me.rpc, self.me.pub, self.me.bulk, len(records), cfg.peers or "none")

    def _secure(self) -> None:
        """With keys, serve ZAP before any socket binds; without, warn when other hosts
        can reach this node (anyone there can read and delete its data)."""
        cfg = self.config
        if self.keys is not None:
            self.zap = auth.ZapHandler(self.ctx, self.keys)
            self.zap.start()
            log.info("CURVE keys from %s: only this cluster's node and client keys are "
                     "admitted", self.keys.directory)
            return
        exposed = [ep for ep in (cfg.rpc_endpoint, cfg.pub_endpoint, cfg.bulk_endpoint)
                   if ep.startswith("tcp://") and not _loopback(ep)]
        if exposed:
            log.warning("!!! NO AUTHENTICATION: listening on %s without --keys: any process "
                        "that reaches these ports can read, overwrite and delete this "
                        "cluster's data and run its node-to-node calls. Make keys with "
                        "`hpcflow keygen KEYDIR` and start every node with --keys KEYDIR "
                        "(README, Security) !!!", ", ".join(exposed))

    def _make_catalog(self, rpc_ep: str) -> ReplicatedCatalog | DhtCatalog:
        membership = self._make_replicated()
        if self.config.catalog == "replicated":
            return membership
        # --catalog dht: the replicated catalog only keeps the membership (it is never
        # given a dataset record); the pointers go to the DHT, whose UDP port is the
        # number of our bound RPC port (so every member's RPC endpoint says where its
        # DHT node is).
        if not rpc_ep.startswith("tcp://"):
            raise ConfigError("--catalog dht needs a TCP --listen address (its UDP port is "
                              "the RPC port's number)")
        # kademlia, rpcudp and asyncio are imported only in this mode
        from ..catalog.dht.catalog import DhtCatalog, dht_port_of
        from ..catalog.dht.facade import DhtFacade, member_id
        from ..catalog.dht.storage import PointerStorage
        from ..catalog.dht.values import mac_key

        host = rpc_ep[len("tcp://"):].rpartition(":")[0].strip("[]")
        storage = PointerStorage(mac_key(self.keys.secret if self.keys else None))
        scale = timeout_scale()  # a loaded host answers UDP late: not a dead contact
        # our DHT id is the digest of the RPC endpoint members know us by (as they
        # compute it: see member_id)
        facade = DhtFacade(storage, interface=host, port=dht_port_of(rpc_ep),
                           rpc_timeout_s=min(5.0, self.config.rpc_timeout_s / 4) * scale,
                           call_timeout_s=self.config.rpc_timeout_s * scale,
                           node_id=member_id(advertised(rpc_ep, self.config.advertise)))
        return DhtCatalog(membership, facade, secret=storage.secret,
                          republish_s=self.config.dht_republish_s,
                          cache_ttl_s=min(1.0, self.config.ttl_s))

    @staticmethod
    def _check_dht_port(rpc_endpoint: str) -> None:
        """A fixed --listen port whose UDP twin is taken fails before any TCP bind, so
        the error names the UDP port rather than whichever TCP port we reached next."""
        if not rpc_endpoint.startswith("tcp://"):
            return  # _make_catalog says why dht needs TCP
        host, _, port = rpc_endpoint[len("tcp://"):].rpartition(":")
        host = host.strip("[]")
        if port == "0":
            return  # ephemeral: the DHT takes the number the RPC socket got
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_DGRAM) as probe:
            try:
                probe.bind(("" if host in ("*", "0.0.0.0", "::") else host, int(port)))
            except OSError as exc:
                raise ConfigError(f"--catalog dht: cannot bind UDP port {port} on {host} "
                                  f"(the RPC port's number): {exc}") from exc

    def _make_replicated(self) -> ReplicatedCatalog:
        return ReplicatedCatalog(
            self.me, self.ctx,
            lambda info, origins: self.peers.call(info.rpc, "snapshot", origins),
            heartbeat_s=self.config.heartbeat_s, ttl_s=self.config.ttl_s, load=self.load,
            ops=self.registry.hashes,
            pub_bind=self.config.pub_endpoint, probe=self.members.probe,
            probe_head=self.members.probe_head,
            introduce=lambda info: self.members.hello(info.rpc),
            forget_after_s=self.config.forget_dead_s, duplicate=lambda info: self._refused(),
            signer=self.signer)

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
        for part in ("catalog", "bulk", "metrics"):
            obj = getattr(self, part, None)
            if obj is not None:
                obj.stop()
        if getattr(self, "rpc", None) is not None:
            self.rpc.close()
        self.peers.close()
        self.store.close()
        if self.zap is not None:
            self.zap.stop()
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
        metrics = {"metrics": self.metrics.url} if self.metrics else {}
        tmp.write_text(json.dumps({**self.me.to_wire(), "pid": self.pid, **metrics}))
        os.replace(tmp, path)

    def _refused(self) -> None:
        """A peer refused us (our name is taken): stop, exit code 2."""
        self.exit_code = 2
        self.stopped.set()

    def _peer_alive(self, name: str) -> bool:
        """False once the catalog has declared ``name`` dead (unknown names: True)."""
        cat = getattr(self, "catalog", None)
        if cat is None:
            return True
        return all(v.alive for v in cat.nodes() if v.info.name == name)

    # -- what the parts may use (see parts.py) -------------------------------------
    @property
    def ready(self) -> bool:
        return getattr(self, "service", None) is not None and hasattr(self, "catalog")

    def call_local(self, method: str, *args: Any) -> Any:
        return getattr(self.service, method)(*args)

    def load(self) -> dict[str, Any]:
        return {"active": self.active + self.bulk_active(), "loadavg": os.getloadavg()[0]}

    def bulk_active(self) -> int:
        bulk = getattr(self, "bulk", None)
        return len(bulk.uploads) if bulk is not None else 0

    def catalog_snapshot_wire(self, origins: object = None) -> dict[str, Any]:
        return self.catalog.snapshot_wire(origins)

    def bulk_endpoints(self, owners: Iterable[str]) -> dict[str, str]:
        members = (self.catalog.member(o) for o in owners)
        return {v.info.name: v.info.bulk for v in members if v is not None and v.alive}

    def stats(self) -> dict[str, Any]:
        cat = self.catalog
        members = cat.nodes()  # cheap in both modes (``info`` lists the catalog: in DHT
        # mode a lookup per member), so monitoring polls the membership here
        return {"traffic": self.traffic.to_wire(),
                "catalog": {**_catalog_stats(cat), "members": len(members),
                            "members_alive": sum(1 for v in members if v.alive)},
                "bulk_malformed": self.bulk.malformed,
                "rpc": self.rpc.stats(),
                "uploads_in_progress": len(self.bulk.uploads),
                "uploads_refused": self.bulk.refused,
                "store": self.store.stats(),
                "plans": {"hits": self.worker.plans.hits, "misses": self.worker.plans.misses,
                          "stale": self.worker.plans.stale},
                "claims": dict(self.datasets.claims.stats),
                "learned": self.worker.learned.to_wire(),
                "streamed": dict(self.worker.events.streamed)}

    def _store_changed(self, key: str, rec: DatasetRecord | None) -> None:
        if rec is None:
            self.catalog.retract(key)
        else:
            self.catalog.announce(rec)


def _catalog_stats(cat: object) -> dict[str, Any]:
    if isinstance(cat, ReplicatedCatalog):
        return dict(cat.stats)
    from ..catalog.dht.catalog import DhtCatalog  # loaded already if this is one

    if isinstance(cat, DhtCatalog):
        return {**cat.membership.stats, "dht": {**cat.stats, **cat.facade.stats,
                                                "storage": dict(cat.facade.storage.stats)}}
    return {}


def _loopback(endpoint: str) -> bool:
    """A tcp:// endpoint only this host can reach (the wildcard is not one)."""
    host = endpoint[len("tcp://"):].rpartition(":")[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


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


__all__ = ["Node", "run_node"]
