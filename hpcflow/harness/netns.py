"""Emulated cluster: one Linux network namespace per host, shaped links.

The scenario replay harness runs every node (and the NFS server) as its own
"host" so that all traffic crosses a link whose bandwidth we control.  The
scenarios specify bandwidth *per pair of hosts*, so hosts are joined by a
full mesh of veth pairs (12 hosts = 66 pairs), each end shaped on egress with
``tc ... tbf`` (``netem`` is unavailable); a shared bridge could only shape
per host.

Addressing, all inside our own namespaces (nothing is added to the root
namespace, so runs cannot collide with the machine's networks or each other):

* every pair link is a /30 in ``10.200.0.0/16``;
* every host also has one *host address* in ``10.201.0.0/16`` on its
  loopback, routed to each peer over their direct link.  Nodes advertise this
  single address to everybody (as on a real cluster), and traffic still takes
  the shaped pair link.

Namespaces are named ``hf<pid>-<n>-<host>`` so concurrent runs never clash
and leftovers of killed runs can be recognised (:func:`remove_stale`).
Teardown is guaranteed by the context manager, an atexit hook and SIGTERM
being turned into SystemExit; deleting a namespace deletes its veths, and
processes still inside are killed first so nothing keeps them alive.
"""

from __future__ import annotations

import ipaddress
import itertools
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterable, Mapping, Sequence
from contextlib import suppress
from types import TracebackType
from typing import Any

from .procs import forget, signals_deferred, socket_in_netns, stop_at_exit, terminate

__all__ = ["MAX_GBIT", "MIN_GBIT", "Topology", "available", "remove_stale"]

_LINK_NET = ipaddress.IPv4Network("10.200.0.0/16")
_HOST_NET = ipaddress.IPv4Network("10.201.0.0/16")
_NETNS_DIR = "/run/netns"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_STALE_RE = re.compile(r"^hf(\d+)-\d+-")
_counter = itertools.count()

MIN_GBIT = 1e-5
"""Slowest link shaped (10 kbit/s).  Below ~2 kbit/s tbf's 64 KiB burst no longer fits its
32-bit time budget and tc silently shrinks it (measured: 1 kbit/s gave a 31 KB burst)."""
MAX_GBIT = 100.0
"""Fastest link shaped (100 Gbit/s).  Above ~600 Gbit/s tbf's queue limit (rate x 50 ms
latency + burst) overflows 32 bits; veths reach a few tens of Gbit/s anyway."""


def _which(binary: str) -> str | None:
    """Resolve like a root shell would (sbin dirs are often missing in PATH)."""
    return shutil.which(binary, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


_IP = _which("ip") or "ip"
_TC = _which("tc") or "tc"


def _run(argv: Sequence[str], batch: str | None = None) -> None:
    """Run an iproute2 command (optionally ``-batch -`` fed from *batch*)."""
    done = subprocess.run(argv, input=batch, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed: {done.stderr.strip() or done.stdout.strip()}")


def available() -> tuple[bool, str]:
    """Check that namespaces, veths and tbf shaping work here.

    Creates (and removes) a throw-away namespace with a tbf qdisc, because
    being root is not enough in restricted containers.  Returns
    ``(True, "")`` or ``(False, reason)``.
    """
    if os.geteuid() != 0:
        return False, "network namespaces need root; not running as root"
    for binary in ("ip", "tc"):
        if _which(binary) is None:
            return False, f"{binary!r} not found (apt-get install iproute2)"
    name = f"hf{os.getpid()}-{next(_counter)}-probe"
    try:
        _run([_IP, "netns", "add", name])
    except RuntimeError as exc:
        return False, f"cannot create a network namespace: {exc}"
    try:
        _run([_IP, "-n", name, "link", "add", "p0", "type", "veth", "peer", "name", "p1"])
        _run([_TC, "-n", name, "qdisc", "add", "dev", "p0", "root", "tbf",
              "rate", "1gbit", "burst", "256kb", "latency", "50ms"])
    except RuntimeError as exc:
        return False, f"cannot create shaped veth links: {exc}"
    finally:
        subprocess.run([_IP, "netns", "del", name], capture_output=True, check=False)
    return True, ""


def remove_stale() -> list[str]:
    """Delete namespaces left behind by *dead* processes (e.g. SIGKILLed runs).

    Only names of our own scheme whose creating PID no longer exists are
    touched; returns the names actually removed (none unless root).
    """
    if os.geteuid() != 0 or not os.path.isdir(_NETNS_DIR):
        return []
    removed = []
    for name in sorted(os.listdir(_NETNS_DIR)):
        match = _STALE_RE.match(name)
        if match is None or _pid_alive(int(match.group(1))):
            continue
        _kill_inside(name)
        subprocess.run([_IP, "netns", "del", name], capture_output=True, check=False)
        if not os.path.exists(os.path.join(_NETNS_DIR, name)):
            removed.append(name)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _kill_inside(netns: str) -> None:
    """SIGKILL every process in *netns* (they would keep it alive)."""
    out = subprocess.run([_IP, "netns", "pids", netns], capture_output=True, text=True,
                         check=False).stdout
    for pid in (int(p) for p in out.split()):
        with suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def _tbf_args(gbit: float) -> list[str]:
    """tbf parameters for *gbit* (:data:`MIN_GBIT`..:data:`MAX_GBIT`): a burst of ~2 ms of
    traffic (>= 64 KiB).

    tbf needs a burst of a few hundred KB at 1 Gbit/s to reach the rate with
    the kernel's timer granularity; 64 KiB covers a GSO super-packet.
    """
    rate_bps = gbit * 1e9
    burst = max(int(rate_bps / 8 * 0.002), 64 * 1024)
    return ["rate", f"{int(rate_bps)}bit", "burst", str(burst), "latency", "50ms"]


class Topology:
    """Hosts in private network namespaces, fully meshed by shaped veth links.

    *bandwidth_gbit* is the default per-link rate (None: unshaped); *links*
    overrides it per unordered host pair, e.g. ``{("n1", "n3"): 0.1}``.
    *mtu* matters when links are unshaped or fast: per-packet CPU cost, not
    the wire, then limits throughput (NFS over an unshaped veth measured
    ~0.27 GiB/s at 1500 vs ~1 GiB/s at 9000); 9000 mimics HPC jumbo frames.
    Build with ``with Topology(...) as topo:`` (or :meth:`build` /
    :meth:`teardown`).
    """

    def __init__(self, hosts: Iterable[str], bandwidth_gbit: float | None = None,
                 links: Mapping[tuple[str, str], float | None] | None = None,
                 mtu: int = 1500, stop_grace: float = 5.0) -> None:
        self.hosts = list(hosts)
        if len(set(self.hosts)) != len(self.hosts) or not self.hosts:
            raise ValueError(f"host names must be unique and non-empty: {self.hosts}")
        for host in self.hosts:
            if not _NAME_RE.match(host):
                raise ValueError(f"bad host name {host!r} (letters, digits, '_.-', <= 64)")
        if len(self.hosts) * (len(self.hosts) - 1) // 2 > _LINK_NET.num_addresses // 4:
            raise ValueError(f"too many hosts for a full mesh in {_LINK_NET}")
        self._index = {h: i for i, h in enumerate(self.hosts)}
        self._bandwidth: dict[frozenset[str], float | None] = {
            frozenset(p): bandwidth_gbit for p in itertools.combinations(self.hosts, 2)}
        for (a, b), gbit in (links or {}).items():
            key = frozenset((a, b))
            if key not in self._bandwidth:
                raise ValueError(f"link override for unknown pair {(a, b)}")
            self._bandwidth[key] = gbit
        for gbit in self._bandwidth.values():
            if gbit is not None and not MIN_GBIT <= gbit <= MAX_GBIT:  # nan and inf too
                raise ValueError(f"bandwidth must be positive and within {MIN_GBIT:g}.."
                                 f"{MAX_GBIT:g} Gbit/s (what tc tbf shapes), got {gbit}")
        if not 68 <= mtu <= 65535:
            raise ValueError(f"mtu must be within 68..65535, got {mtu}")
        self.mtu = mtu
        self.stop_grace = stop_grace
        self._prefix = f"hf{os.getpid()}-{next(_counter)}-"
        self._procs: list[subprocess.Popen[Any]] = []
        self._built = False

    # -- queries -------------------------------------------------------------

    def netns(self, host: str) -> str:
        """Name of *host*'s namespace (for ``ip netns exec`` / ``nsenter``)."""
        return self._prefix + self.hosts[self._index[host]]

    def address(self, host: str) -> str:
        """*host*'s host address, reachable from every peer over the direct link."""
        return str(_HOST_NET[self._index[host] + 1])

    def link_address(self, host: str, peer: str) -> str:
        """*host*'s address on the link to *peer* (what *peer* sees as source)."""
        net = self._link_net(host, peer)
        return str(net[1] if self._index[host] < self._index[peer] else net[2])

    def interface(self, host: str, peer: str) -> str:
        """Name of *host*'s veth towards *peer*: ``to<peer index>`` (<= 15 chars)."""
        if host == peer:
            raise ValueError("no link from a host to itself")
        return f"to{self._index[peer]}"

    def bandwidth(self, a: str, b: str) -> float | None:
        """Configured rate of the a--b link in Gbit/s (None: unshaped)."""
        return self._bandwidth[frozenset((a, b))]

    # -- lifecycle -------------------------------------------------------------

    def build(self) -> Topology:
        """Create namespaces, links, addresses, routes and shaping.

        Uses one ``ip -batch`` for all namespaces and links plus one ``ip``
        and one ``tc`` batch per host, so 12 hosts take ~25 processes.  On any
        failure everything created so far is removed again.
        """
        if self._built:
            raise RuntimeError("topology already built")
        stop_at_exit(self, self.teardown)
        self._built = True
        try:
            self._create()
        except BaseException:
            self.teardown()
            raise
        return self

    def _create(self) -> None:
        pairs = list(itertools.combinations(self.hosts, 2))
        root = [f"netns add {self.netns(h)}" for h in self.hosts]
        root += [f"link add dev {self.interface(a, b)} mtu {self.mtu} netns {self.netns(a)} "
                 f"type veth peer name {self.interface(b, a)} mtu {self.mtu} netns {self.netns(b)}"
                 for a, b in pairs]
        _run([_IP, "-batch", "-"], "\n".join(root) + "\n")
        for host in self.hosts:
            peers = [p for p in self.hosts if p != host]
            cmds = ["link set lo up", f"addr add {self.address(host)}/32 dev lo"]
            for peer in peers:
                dev = self.interface(host, peer)
                prefix = self._link_net(host, peer).prefixlen
                cmds += [f"addr add {self.link_address(host, peer)}/{prefix} dev {dev}",
                         f"link set {dev} up"]
            cmds += [f"route add {self.address(peer)}/32 via {self.link_address(peer, host)} "
                     f"dev {self.interface(host, peer)} src {self.address(host)}"
                     for peer in peers]
            _run([_IP, "-n", self.netns(host), "-batch", "-"], "\n".join(cmds) + "\n")
            shaping = [f"qdisc add dev {self.interface(host, peer)} root tbf "
                       + " ".join(_tbf_args(gbit))
                       for peer in peers if (gbit := self.bandwidth(host, peer)) is not None]
            if shaping:
                _run([_TC, "-n", self.netns(host), "-batch", "-"], "\n".join(shaping) + "\n")

    def teardown(self) -> None:
        """Stop our processes, kill stragglers, delete the namespaces.  Idempotent.

        SIGINT/SIGTERM are held back meanwhile so a second Ctrl-C cannot leave
        half-deleted state; they are delivered afterwards.
        """
        if not self._built:
            return
        with signals_deferred():
            for proc in self._procs:
                terminate(proc, self.stop_grace)
            self._procs.clear()
            existing = [n for n in map(self.netns, self.hosts)
                        if os.path.exists(os.path.join(_NETNS_DIR, n))]
            for name in existing:
                _kill_inside(name)
            if existing:
                subprocess.run([_IP, "-force", "-batch", "-"], check=False, capture_output=True,
                               text=True, input="".join(f"netns del {n}\n" for n in existing))
            self._built = False
            forget(self)

    def __enter__(self) -> Topology:
        return self.build()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.teardown()

    # -- running things inside hosts -------------------------------------------

    def popen(self, host: str, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start *argv* inside *host* (``ip netns exec``; kwargs go to Popen).

        The process is terminated at teardown if still running.  Note that
        ``ip netns exec`` also gives it a private mount namespace; use
        ``nsenter --net=/run/netns/<netns(host)>`` where mounts must be shared.
        """
        self._require_built()
        proc = subprocess.Popen([_IP, "netns", "exec", self.netns(host), *argv], **kwargs)
        self._procs.append(proc)
        return proc

    def socket(self, host: str, family: int = socket.AF_INET,
               type: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket of this process that lives in *host*'s network namespace.

        ``setns`` affects only the calling thread and sockets keep the
        namespace they were created in, so a short-lived thread creates it.
        Lets the harness talk to hosts without helper processes.
        """
        self._require_built()
        return socket_in_netns(os.path.join(_NETNS_DIR, self.netns(host)), family, type)

    # -- internals ---------------------------------------------------------------

    def _require_built(self) -> None:
        if not self._built:
            raise RuntimeError("topology not built (use 'with Topology(...)' or build())")

    def _link_net(self, a: str, b: str) -> ipaddress.IPv4Network:
        i, j = sorted((self._index[a], self._index[b]))
        n = len(self.hosts)
        k = i * n - i * (i + 1) // 2 + (j - i - 1)  # index of pair (i, j) among n choose 2
        return ipaddress.IPv4Network((int(_LINK_NET.network_address) + 4 * k, 30))
