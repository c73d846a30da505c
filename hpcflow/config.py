"""Typed configuration: node settings from a TOML file, overridden by CLI options.

Endpoints: ``--listen`` is the RPC endpoint (``HOST:PORT``, ``tcp://HOST:PORT``
or ``ipc:///path``).  The catalog publisher and the bulk channel default to
the next two ports (``PORT+1``, ``PORT+2``) or, for ipc, to ``PATH.pub`` and
``PATH.bulk``.  Port 0 binds every socket to an ephemeral port; the bound
endpoints are then written to ``<data_dir>/node.json``.

A node listening on a wildcard address (``0.0.0.0:PORT``) advertises an
address of this host that other machines can reach: the host name's address
unless it is a loopback one (Debian maps the host name to 127.0.1.1), else
the first non-loopback interface address; with none, it warns and advertises
127.0.0.1.  ``--advertise HOST`` always wins.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import logging
import math
import os
import socket
import struct
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .catalog.chunking import DEFAULT_CHUNK_BYTES
from .errors import ConfigError
from .peers import read_peers_file, select_peers, slurm_hosts, this_host

CATALOG_MODES = ("replicated", "dht")
DEFAULT_LISTEN = "127.0.0.1:7101"
WILDCARD_HOSTS = ("0.0.0.0", "*", "[::]", "::")
log = logging.getLogger("hpcflow.config")


def timeout_scale() -> float:
    """One knob to stretch every timeout on slow or loaded machines (tests use it too)."""
    try:
        return max(0.1, float(os.environ.get("HPCFLOW_TIMEOUT_SCALE", "1")))
    except ValueError:
        return 1.0


def normalize_endpoint(addr: str) -> str:
    """``HOST:PORT`` -> ``tcp://HOST:PORT``; ``tcp://`` and ``ipc://`` pass through."""
    addr = addr.strip()
    if addr.startswith(("tcp://", "ipc://")):
        return addr
    if "://" in addr:
        raise ConfigError(f"unsupported endpoint {addr!r}: use HOST:PORT, tcp:// or ipc://")
    host, sep, port = addr.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ConfigError(f"endpoint {addr!r} is not HOST:PORT")
    return f"tcp://{host}:{port}"


def derive_endpoint(rpc: str, offset: int, suffix: str) -> str:
    """The endpoint ``offset`` ports above ``rpc`` (or ``rpc`` + ``suffix`` for ipc)."""
    if rpc.startswith("ipc://"):
        return rpc + suffix
    host, _, port = rpc[len("tcp://"):].rpartition(":")
    p = int(port)
    return f"tcp://{host}:{0 if p == 0 else p + offset}"


def advertised(endpoint: str, advertise_host: str | None) -> str:
    """Replace a wildcard bind host with one peers can connect to."""
    if not endpoint.startswith("tcp://"):
        return endpoint
    host, _, port = endpoint[len("tcp://"):].rpartition(":")
    if advertise_host:
        host = advertise_host
    elif host in WILDCARD_HOSTS:
        host = wildcard_host()
    return f"tcp://{host}:{port}"


def is_local_only(addr: str) -> bool:
    """Loopback, link-local or unspecified: no other machine reaches us there."""
    return addr.startswith(("127.", "169.254.")) or addr in ("0.0.0.0", "::1", "::")


def pick_host(candidates: list[str]) -> str | None:
    """The first address other machines can reach, in order of preference."""
    return next((a for a in candidates if not is_local_only(a)), None)


@functools.cache
def wildcard_host() -> str:
    """The address to advertise for a wildcard bind (see the module docstring)."""
    candidates: list[str] = []
    with contextlib.suppress(OSError):
        candidates += sorted({str(ai[4][0]) for ai in socket.getaddrinfo(
            socket.gethostname(), None, socket.AF_INET)})
    candidates += interface_addresses()
    host = pick_host(candidates)
    if host is None:
        log.warning("listening on a wildcard address, but this host has no address other "
                    "machines can reach (only %s): advertising 127.0.0.1, so only local nodes "
                    "can join; set --advertise HOST for a multi-machine cluster",
                    ", ".join(candidates) or "loopback")
        return "127.0.0.1"
    log.info("listening on a wildcard address: advertising %s to peers (--advertise to "
             "choose another)", host)
    return host


def interface_addresses() -> list[str]:
    """IPv4 addresses of this host's network interfaces (Linux ``SIOCGIFADDR``)."""
    out: list[str] = []
    try:
        names = [name for _, name in socket.if_nameindex()]
    except OSError:
        return out
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        for name in names:
            try:
                req = struct.pack("256s", name.encode()[:15])
                out.append(socket.inet_ntoa(fcntl.ioctl(s.fileno(), 0x8915, req)[20:24]))
            except OSError:
                continue  # no IPv4 address on this interface
    return out


def _number(name: str, value: float, lo: float, hi: float) -> None:
    if not (isinstance(value, int | float) and math.isfinite(value) and lo <= value <= hi):
        raise ConfigError(f"{name} must be a number from {lo:g} to {hi:g}, got {value!r}")


@dataclass
class NodeConfig:
    """Everything a daemon needs; every field can come from TOML or the command line."""

    data_dir: Path
    name: str = ""
    listen: str = DEFAULT_LISTEN
    pub: str | None = None
    bulk: str | None = None
    advertise: str | None = None
    peers: list[str] = field(default_factory=list)
    #: ``"slurm"``: peers are the job's other hosts (``SLURM_JOB_NODELIST``), all on this
    #: node's port; the name defaults to the host name and ``listen`` to 0.0.0.0:7101.
    peers_from: str | None = None
    #: A file of peers (``HOST`` or ``HOST:PORT`` per line), e.g. written by a job script.
    peers_file: str | None = None
    #: ``HOST:PORT`` to serve Prometheus metrics on (HTTP ``/metrics``); None: no endpoint.
    metrics: str | None = None
    catalog: str = "replicated"
    #: ``--catalog dht``: how often this node stores again every pointer it wrote (the
    #: DHT's nodes drop what is not stored again within 30 minutes).
    dht_republish_s: float = 300.0
    heartbeat_s: float = 1.0
    ttl_s: float = 3.5
    rpc_timeout_s: float = 10.0
    transfer_timeout_s: float = 30.0
    link_gbit: float = 10.0  # assumed link speed until transfers have measured it
    chunk_bytes: int = DEFAULT_CHUNK_BYTES
    window: int = 8
    chunk_retries: int = 3
    ops: list[str] = field(default_factory=list)
    #: Directory of the cluster's CURVE keys (``hpcflow keygen``); None: ``$HPCFLOW_KEYS``,
    #: and without that no authentication (see README, Security).
    keys: str | None = None
    log_level: str = "INFO"
    #: Bytes of workflow intermediates held in memory (None: a quarter of RAM); more are
    #: spilled to unsynced files under data_dir/spill.
    memory_budget: int | None = None
    #: Members dead this long that hold no datasets are dropped from the membership.
    forget_dead_s: float = 600.0
    #: Bulk uploads open at once, in total and per connection (each holds a file
    #: descriptor and a temp file); more are refused with Overloaded.
    max_uploads: int = 128
    max_uploads_per_connection: int = 16
    #: Bytes of inline fetch replies (at most 15 MiB each) being built or queued for
    #: their clients, in total and per connection; more are refused with Overloaded.
    max_inline_bytes: int = 64 * 1024 * 1024
    max_inline_bytes_per_connection: int = 32 * 1024 * 1024
    #: Fault injection for tests and drills: corrupt the next N chunks this node sends
    #: (receivers must detect and re-request them).  Never set it in production.
    fault_corrupt_chunks: int = 0
    #: Fault injection: every chunk write blocks this long, as a disk under dirty-page
    #: throttling does (heartbeats must go on).  Never set it in production.
    fault_write_delay_s: float = 0.0

    def __post_init__(self) -> None:
        self.data_dir = Path(self.data_dir).expanduser()
        if self.peers_from not in (None, "slurm"):
            raise ConfigError(f"peers_from must be \"slurm\", not {self.peers_from!r}")
        if self.peers_from == "slurm":
            if self.listen == DEFAULT_LISTEN:  # every host of the job, on one port
                self.listen = f"0.0.0.0:{DEFAULT_LISTEN.rsplit(':', 1)[1]}"
            self.name = self.name or this_host()
        self.rpc_endpoint = normalize_endpoint(self.listen)
        self.pub_endpoint = normalize_endpoint(self.pub) if self.pub else derive_endpoint(
            self.rpc_endpoint, 1, ".pub")
        self.bulk_endpoint = normalize_endpoint(self.bulk) if self.bulk else derive_endpoint(
            self.rpc_endpoint, 2, ".bulk")
        if self.peers_from or self.peers_file:
            self.peers = [*self.peers, *self._allocation_peers()]
        self.peer_endpoints = list(dict.fromkeys(normalize_endpoint(p) for p in self.peers))
        if self.metrics is not None:
            normalize_endpoint(self.metrics)  # HOST:PORT, checked before anything starts
            if not self.metrics.rpartition(":")[0] or "://" in self.metrics:
                raise ConfigError(f"metrics must be HOST:PORT, not {self.metrics!r}")
        if not self.name:
            tail = self.rpc_endpoint.rsplit("/", 1)[-1].rsplit(":", 1)[-1]
            self.name = f"{socket.gethostname()}-{tail}"
        if not 0 < len(self.name) <= 64 or any(c in self.name for c in "/\\ \t\n\r\0"):
            raise ConfigError(f"node name {self.name!r} must be 1-64 characters, no "
                              "slashes or whitespace")
        if self.catalog not in CATALOG_MODES:
            raise ConfigError(f"catalog must be one of {CATALOG_MODES}, not {self.catalog!r}")
        # NaN passes every comparison it fails, so ranges are checked as "finite and in".
        _number("heartbeat_s", self.heartbeat_s, 0.01, 3600)
        _number("ttl_s", self.ttl_s, 0.02, 86400)
        _number("rpc_timeout_s", self.rpc_timeout_s, 0.1, 86400)
        _number("transfer_timeout_s", self.transfer_timeout_s, 0.1, 86400)
        _number("link_gbit", self.link_gbit, 0.001, 100_000)
        _number("forget_dead_s", self.forget_dead_s, 0.1, 1e7)
        _number("dht_republish_s", self.dht_republish_s, 0.1, 1200)
        _number("fault_write_delay_s", self.fault_write_delay_s, 0, 10)
        if self.ttl_s <= self.heartbeat_s:
            raise ConfigError("need heartbeat_s > 0 and ttl_s > heartbeat_s")
        if self.forget_dead_s <= self.ttl_s:
            raise ConfigError("need forget_dead_s > ttl_s")
        if not 0 <= self.fault_write_delay_s <= 10:
            raise ConfigError("fault_write_delay_s must be between 0 and 10 s")
        if not 4096 <= self.chunk_bytes <= 256 * 1024 * 1024:
            raise ConfigError("chunk_bytes must be between 4 KiB and 256 MiB")
        if self.memory_budget is not None and self.memory_budget < 0:
            raise ConfigError("memory_budget must be >= 0 bytes")
        if not 1 <= self.max_uploads_per_connection <= self.max_uploads <= 100_000:
            raise ConfigError("need 1 <= max_uploads_per_connection <= max_uploads <= 100000")
        if not 0 <= self.max_inline_bytes_per_connection <= self.max_inline_bytes:
            raise ConfigError("need 0 <= max_inline_bytes_per_connection <= max_inline_bytes")
        if self.window < 1 or self.chunk_retries < 0:
            raise ConfigError("window must be >= 1 and chunk_retries >= 0")

    def _allocation_peers(self) -> list[str]:
        """Peers from SLURM's node list and/or the peers file (see :mod:`hpcflow.peers`)."""
        host, _, port = self.rpc_endpoint[len("tcp://"):].rpartition(":")
        if not self.rpc_endpoint.startswith("tcp://") or port == "0":
            raise ConfigError("--peers-from/--peers-file need a fixed TCP port in --listen "
                              "(every node of the job listens on the same one)")
        if self.peers_from == "slurm" and not self.advertise and host in WILDCARD_HOSTS:
            self.advertise = this_host()  # how the job's node list names this host
        me = {this_host(), socket.gethostname(), host}
        if self.advertise:
            me.add(self.advertise)
        entries = slurm_hosts() if self.peers_from == "slurm" else []
        if self.peers_file:
            entries += read_peers_file(self.peers_file)
        return select_peers(entries, me, int(port))

    @classmethod
    def load(cls, path: Path | None, overrides: dict[str, Any]) -> NodeConfig:
        """Merge a TOML file (optional) with non-None ``overrides`` (CLI options win)."""
        values: dict[str, Any] = {}
        if path is not None:
            values.update(read_toml(path, {f.name for f in fields(cls)}))
        values.update({k: v for k, v in overrides.items() if v is not None and v != []})
        if "data_dir" not in values:
            raise ConfigError("data_dir is required (--data-dir or data_dir in the config file)")
        _check_types(cls, values, path)
        where = f"{path}: " if path else ""
        try:
            return cls(**values)
        except TypeError as exc:
            raise ConfigError(f"{where}invalid configuration: {exc}") from exc
        except ConfigError as exc:
            raise ConfigError(f"{where}{exc}") from None

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["data_dir"] = str(self.data_dir)
        return d


MAX_TOML_DEPTH = 32
"""Deepest nesting of arrays and tables accepted in a config or scenario file."""


def parse_toml(text: str, where: object) -> dict[str, Any]:
    """Parse TOML; bad syntax and nesting deeper than :data:`MAX_TOML_DEPTH` levels are
    a :class:`ConfigError` naming ``where`` (tomllib recurses once per level, so a few
    thousand would be a RecursionError)."""
    too_deep = ConfigError(f"{where}: arrays or tables nested more than {MAX_TOML_DEPTH} "
                           "levels deep")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{where}: invalid TOML: {exc}") from None
    except RecursionError:
        raise too_deep from None
    stack: list[tuple[object, int]] = [(data, 1)]
    while stack:  # no recursion of our own: dotted keys nest without limit in tomllib
        value, depth = stack.pop()
        if depth > MAX_TOML_DEPTH:
            raise too_deep
        children = list(value.values()) if isinstance(value, dict) else value
        if isinstance(children, list):
            stack += [(c, depth + 1) for c in children if isinstance(c, dict | list)]
    return data


def read_toml(path: Path, known: set[str]) -> dict[str, Any]:
    """Read a TOML config file; unknown keys and bad syntax name the file and the key."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read config file {path}: {exc}") from exc
    data = parse_toml(text, path)
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"{path}: unknown key(s) {', '.join(unknown)}; known keys: "
                          f"{', '.join(sorted(known))}")
    return data


def _check_types(cls: type, values: dict[str, Any], path: Path | None) -> None:
    """Reject wrongly typed values with a message naming the key (TOML gives us raw types)."""
    where = f"{path}: " if path else ""
    for f in fields(cls):
        if f.name not in values:
            continue
        v, t = values[f.name], str(f.type)
        if f.name == "data_dir":
            ok = isinstance(v, str | Path)
        elif t.startswith("list"):
            ok = isinstance(v, list) and all(isinstance(x, str) for x in v)
        elif t.startswith("float"):
            ok = isinstance(v, int | float) and not isinstance(v, bool)
        elif t.startswith("int"):
            ok = isinstance(v, int) and not isinstance(v, bool)
        else:
            ok = isinstance(v, str) or (v is None and "None" in t)
        if not ok:
            raise ConfigError(f"{where}{f.name} must be of type {t}, got {v!r}")
