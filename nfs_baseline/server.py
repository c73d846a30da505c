"""Run a real userspace NFS server (nfs-ganesha) as a child process.

The NFS baseline must measure a *real* NFS data path, but CI machines have no
kernel NFS server.  nfs-ganesha runs as an ordinary foreground process, so we
start it (plus the ``rpcbind`` portmapper it needs to register NFSv3/MOUNT
with) from a generated config in a private work directory and tear both down
again, whatever happens.

Why a private mount namespace for our rpcbind: ganesha registers its programs
through the unix socket ``/run/rpcbind.sock``, and rpcbind refuses to run
twice against one ``/run``.  Each rpcbind we start therefore gets a fresh
tmpfs on ``/run`` in its own mount namespace, and ganesha is started inside
that same mount namespace, so it always registers with *its* rpcbind -- also
when several network namespaces each run a server.  If a portmapper already
answers in the target network namespace (e.g. the system rpcbind on the host)
it is reused instead, because a second one could not bind port 111.

Both children die with the thread that started them (``PR_SET_PDEATHSIG``),
and their work directory records them (:func:`hpcflow.harness.procs.claim`),
so :func:`remove_stale` can clean up after a run that was SIGKILLed.

Readiness is established at the protocol level, without fixed sleeps: the
portmapper and the NFSv3 and MOUNTv3 services must answer an RPC NULL call and
the portmapper must map NFSv3/TCP to our port.  Probes for a server inside a
network namespace use sockets created in that namespace (``setns`` in a
short-lived thread), so no helper processes are needed.
"""

from __future__ import annotations

import glob
import ipaddress
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType

from hpcflow.harness.procs import (
    claim,
    die_with_parent,
    forget,
    reap_stale,
    signals_deferred,
    socket_in_netns,
    stop_at_exit,
    terminate,
)

__all__ = ["GaneshaServer", "NfsUnavailable", "available", "remove_stale"]

_PMAP_PROG, _PMAP_VERS, _PMAP_PORT = 100000, 2, 111
_NFS_PROG, _NFS_VERS = 100003, 3
_MOUNT_PROG, _MOUNT_VERS = 100005, 3
_IPPROTO_TCP = 6
_PMAPPROC_GETPORT = 3
_EXTRA_PATH = "/usr/local/sbin:/usr/sbin:/sbin"
_VFS_FSAL_GLOBS = ("/usr/lib/*/ganesha/libfsalvfs.so", "/usr/lib*/ganesha/libfsalvfs.so")


_WORKDIR_PREFIX = "hf-ganesha-"


def remove_stale() -> list[str]:
    """Stop servers (ganesha, rpcbind) of runs that died without stopping them.

    Only work directories this module created and claimed, whose creating
    process is gone, are touched; returns the directories removed.
    """
    return reap_stale(os.path.join(tempfile.gettempdir(), f"{_WORKDIR_PREFIX}*"))


class NfsUnavailable(RuntimeError):
    """The NFS baseline cannot run here; ``str(exc)`` says why (for skip messages)."""


def _which(binary: str) -> str | None:
    """Resolve *binary* like a root shell would (sbin dirs are often missing in PATH)."""
    if os.sep in binary:
        return binary if os.access(binary, os.X_OK) else None
    return shutil.which(binary, path=os.environ.get("PATH", "") + os.pathsep + _EXTRA_PATH)


def available(ganesha_bin: str = "ganesha.nfsd", rpcbind_bin: str = "rpcbind") -> tuple[bool, str]:
    """Cheaply check the prerequisites of the NFS baseline without starting anything.

    Returns ``(True, "")`` or ``(False, reason)``; the reason names the missing
    piece and how to get it, so callers can skip the NFS approach with it.
    Port conflicts are only detected by :meth:`GaneshaServer.start`.
    """
    if os.geteuid() != 0:
        return False, "nfs-ganesha needs root (namespaces, privileged ports); not running as root"
    for binary, pkg in ((ganesha_bin, "nfs-ganesha"), (rpcbind_bin, "rpcbind"),
                        ("nsenter", "util-linux"), ("unshare", "util-linux")):
        if _which(binary) is None:
            return False, (f"{binary!r} not found (apt-get install {pkg}; "
                           "see nfs_baseline/install-system-deps.sh)")
    if not any(glob.glob(pattern) for pattern in _VFS_FSAL_GLOBS):
        return False, "ganesha VFS FSAL libfsalvfs.so not found (apt-get install nfs-ganesha-vfs)"
    from nfs_baseline.client import LIBNFS_ERROR  # lazy: the client imports this module

    if LIBNFS_ERROR is not None:
        return False, LIBNFS_ERROR
    return True, ""


# --- sockets and tiny ONC-RPC client used for readiness probes -------------

def _socket_in_netns(netns: str | None) -> socket.socket:
    """A TCP socket in network namespace *netns* (None: our own)."""
    return socket_in_netns(None if netns is None else f"/run/netns/{netns}")


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed during RPC reply")
        buf += chunk
    return bytes(buf)


def _rpc_call(netns: str | None, addr: str, port: int, prog: int, vers: int,
              proc: int = 0, args: bytes = b"", timeout: float = 1.0) -> bytes:
    """One ONC-RPC call over TCP with AUTH_NONE; returns the result body.

    Hand-rolled (RFC 5531 + record marking) because libnfs has no timeout for
    its synchronous calls and cannot run inside another network namespace.
    """
    xid = int.from_bytes(os.urandom(4), "big")
    call = struct.pack(">6I4I", xid, 0, 2, prog, vers, proc, 0, 0, 0, 0) + args
    with _socket_in_netns(netns) as sock:
        sock.settimeout(timeout)
        sock.connect((addr, port))
        sock.sendall(struct.pack(">I", 0x80000000 | len(call)) + call)
        reply = b""
        last = False
        while not last:
            (mark,) = struct.unpack(">I", _recv_exact(sock, 4))
            last = bool(mark & 0x80000000)
            reply += _recv_exact(sock, mark & 0x7FFFFFFF)
    rxid, mtype, stat, _flavor, verf_len = struct.unpack_from(">5I", reply)
    offset = 20 + (verf_len + 3) // 4 * 4
    (accept,) = struct.unpack_from(">I", reply, offset)
    if rxid != xid or mtype != 1 or stat != 0 or accept != 0:
        raise ConnectionError(f"RPC {prog}/{vers}/{proc} rejected (stat={stat}, accept={accept})")
    return reply[offset + 4:]


def _port_accepts(netns: str | None, addr: str, port: int) -> bool:
    with _socket_in_netns(netns) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((addr, port)) == 0


def _portmapper_answers(netns: str | None, addr: str) -> bool:
    try:
        _rpc_call(netns, addr, _PMAP_PORT, _PMAP_PROG, _PMAP_VERS)
    except OSError:
        return False
    return True





_CONFIG = """\
# Generated by nfs_baseline.server.GaneshaServer
NFS_CORE_PARAM {{
    Protocols = 3, 4;
    Bind_Addr = {bind_addr};
    NFS_Port = {nfs_port};
    MNT_Port = {mount_port};
    Enable_NLM = false;
    Enable_RQUOTA = false;
    Enable_UDP = false;
}}
NFSV4 {{
    Graceless = true;
    RecoveryBackend = fs;
    RecoveryRoot = {recovery};
}}
EXPORT {{
    Export_Id = 1;
    Path = {export};
    Pseudo = /export;
    Protocols = 3, 4;
    Transports = TCP;
    Access_Type = RW;
    Squash = No_Root_Squash;
    SecType = sys;
    FSAL {{ Name = VFS; }}
}}
"""


class GaneshaServer:
    """An nfs-ganesha NFSv3/v4 server exporting one directory.

    Use as a context manager (or call :meth:`start`/:meth:`stop`)::

        with GaneshaServer() as srv:
            client = NfsClient(srv.url)

    *export_dir* defaults to a fresh directory in the private work dir; after
    start, change its contents only through NFS (ganesha caches handles).
    *bind_addr* is an IPv4 address; ``0.0.0.0`` serves every address of the
    namespace.  *netns* names an ``ip netns`` namespace to run in.  Run one
    server per network namespace: a second one would share (and on stop
    clear) the first one's rpcbind registration.
    """

    def __init__(self, export_dir: str | os.PathLike[str] | None = None, *,
                 bind_addr: str = "127.0.0.1", netns: str | None = None,
                 nfs_port: int = 2049, mount_port: int = 20048,
                 ganesha_bin: str = "ganesha.nfsd", rpcbind_bin: str = "rpcbind",
                 start_timeout: float = 10.0, stop_grace: float = 10.0) -> None:
        ipaddress.IPv4Address(bind_addr)  # fail early on typos
        self.bind_addr = bind_addr
        self.netns = netns
        self.nfs_port = nfs_port
        self.mount_port = mount_port
        self.ganesha_bin = ganesha_bin
        self.rpcbind_bin = rpcbind_bin
        self.start_timeout = start_timeout
        self.stop_grace = stop_grace
        self._export_arg = None if export_dir is None else Path(export_dir).resolve()
        self.export_dir: Path | None = None
        self.workdir: Path | None = None
        self._ganesha: subprocess.Popen[bytes] | None = None
        self._rpcbind: subprocess.Popen[bytes] | None = None

    # -- public API ---------------------------------------------------------

    @property
    def url(self) -> str:
        """NFSv3 URL of the export for clients in the server's own namespace."""
        return self.url_via(self.probe_addr)

    def url_via(self, addr: str) -> str:
        """NFSv3 URL of the export for clients that reach the server at *addr*.

        NFSv3 addresses the real export path.  The ports are given explicitly
        so clients skip the portmapper round trip; the server is still
        registered with rpcbind for ordinary clients.
        """
        if self.export_dir is None:
            raise RuntimeError("server not started")
        return (f"nfs://{addr}{self.export_dir}"
                f"?nfsport={self.nfs_port}&mountport={self.mount_port}")

    @property
    def probe_addr(self) -> str:
        """Address at which this server is reachable from inside its namespace."""
        return "127.0.0.1" if self.bind_addr == "0.0.0.0" else self.bind_addr

    @property
    def running(self) -> bool:
        return self._ganesha is not None and self._ganesha.poll() is None

    @property
    def pids(self) -> list[int]:
        """PIDs of the child processes we started (ganesha, and rpcbind if ours)."""
        return [p.pid for p in (self._ganesha, self._rpcbind) if p is not None]

    def start(self) -> GaneshaServer:
        """Start rpcbind (if needed) and ganesha; return once NFS answers.

        Raises :class:`NfsUnavailable` (with the reason, and ganesha's log
        tail when it died) if the server cannot be brought up; nothing is left
        running in that case.
        """
        if self._ganesha is not None:
            raise RuntimeError("server already started")
        ok, reason = available(self.ganesha_bin, self.rpcbind_bin)
        if not ok:
            raise NfsUnavailable(reason)
        if self.netns is not None and not os.path.exists(f"/run/netns/{self.netns}"):
            raise NfsUnavailable(f"network namespace {self.netns!r} does not exist")
        for port in (self.nfs_port, self.mount_port):
            if _port_accepts(self.netns, self.probe_addr, port):
                raise NfsUnavailable(f"port {port} on {self.probe_addr} already in use "
                                     "(another NFS server running?)")
        stop_at_exit(self, self.stop)
        try:
            self._launch()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop ganesha, then our rpcbind (SIGTERM, SIGKILL after the grace
        period), and remove the work dir.  Idempotent."""
        with signals_deferred():
            self._stop()

    def _stop(self) -> None:
        try:
            for proc in (self._ganesha, self._rpcbind):
                if proc is not None:
                    terminate(proc, self.stop_grace)
        finally:
            self._ganesha = self._rpcbind = None
            self.export_dir = None
            if self.workdir is not None:
                shutil.rmtree(self.workdir, ignore_errors=True)
                self.workdir = None
            forget(self)

    def __enter__(self) -> GaneshaServer:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    # -- internals ----------------------------------------------------------

    def _launch(self) -> None:
        self.workdir = Path(tempfile.mkdtemp(prefix=_WORKDIR_PREFIX))
        claim(self.workdir)
        if self._export_arg is None:
            self.export_dir = self.workdir / "export"
            self.export_dir.mkdir()
        elif not self._export_arg.is_dir():
            raise NfsUnavailable(f"export directory {self._export_arg} does not exist")
        else:
            self.export_dir = self._export_arg
        for path in (self.workdir, self.export_dir):
            if path == Path("/run") or Path("/run") in path.parents:
                raise NfsUnavailable(f"{path} is under /run, which rpcbind's private /run hides")
        recovery = self.workdir / "recovery"
        recovery.mkdir()
        conf = self.workdir / "ganesha.conf"
        conf.write_text(_CONFIG.format(bind_addr=self.bind_addr, nfs_port=self.nfs_port,
                                       mount_port=self.mount_port, recovery=recovery,
                                       export=self.export_dir))
        deadline = time.monotonic() + self.start_timeout
        prefix = [] if self.netns is None else ["nsenter", f"--net=/run/netns/{self.netns}"]

        if _portmapper_answers(self.netns, "127.0.0.1"):
            mount_ns: list[str] = []
        else:
            rpcbind = _which(self.rpcbind_bin)
            assert rpcbind is not None  # checked by available()
            self._spawn("_rpcbind",
                        [*prefix, "unshare", "--mount", "--propagation", "private", "--", "sh",
                         "-c", 'mount -t tmpfs -o mode=0755 hf-rpcbind-run /run && exec "$0" -f',
                         rpcbind], "rpcbind.stderr")
            assert self._rpcbind is not None
            self._await("rpcbind", deadline, self._rpcbind,
                        lambda: _portmapper_answers(self.netns, "127.0.0.1"))
            mount_ns = [f"--mount=/proc/{self._rpcbind.pid}/ns/mnt"]

        ganesha = _which(self.ganesha_bin)
        assert ganesha is not None
        argv = [ganesha, "-F", "-f", str(conf), "-L", str(self.workdir / "ganesha.log"),
                "-p", str(self.workdir / "ganesha.pid")]
        if prefix or mount_ns:
            argv = ["nsenter", *prefix[1:], *mount_ns, *argv]
        self._spawn("_ganesha", argv, "ganesha.stderr")
        assert self._ganesha is not None
        self._await("ganesha", deadline, self._ganesha, self._nfs_ready)

    def _spawn(self, attr: str, argv: list[str], stderr_name: str) -> None:
        """Start a child into ``self.<attr>`` and record it in the work dir's claim.

        Signals wait until both are done (see ``die_with_parent``), so stop()
        and the reaper always know the child.
        """
        assert self.workdir is not None
        with open(self.workdir / stderr_name, "wb") as err, signals_deferred():
            setattr(self, attr, subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err,
                start_new_session=True, preexec_fn=die_with_parent))
            claim(self.workdir, self.pids)

    def _nfs_ready(self) -> bool:
        addr = self.probe_addr
        try:
            _rpc_call(self.netns, addr, self.nfs_port, _NFS_PROG, _NFS_VERS)
            _rpc_call(self.netns, addr, self.mount_port, _MOUNT_PROG, _MOUNT_VERS)
            mapping = _rpc_call(self.netns, "127.0.0.1", _PMAP_PORT, _PMAP_PROG, _PMAP_VERS,
                                _PMAPPROC_GETPORT,
                                struct.pack(">4I", _NFS_PROG, _NFS_VERS, _IPPROTO_TCP, 0))
        except OSError:
            return False
        return struct.unpack(">I", mapping[:4])[0] == self.nfs_port

    def _await(self, what: str, deadline: float, proc: subprocess.Popen[bytes],
               ready: Callable[[], bool]) -> None:
        """Poll *ready* until it holds, *proc* dies, or *deadline* passes."""
        interval = 0.005
        while not ready():
            if proc.poll() is not None:
                raise NfsUnavailable(f"{what} exited with status {proc.returncode}: "
                                     f"{self._diagnostics()}")
            if time.monotonic() > deadline:
                raise NfsUnavailable(f"{what} not ready within {self.start_timeout:g} s: "
                                     f"{self._diagnostics()}")
            time.sleep(interval)  # polling back-off, not synchronisation
            interval = min(interval * 2, 0.1)

    def _diagnostics(self, lines: int = 8) -> str:
        """Last meaningful lines of the children's output, for error messages."""
        assert self.workdir is not None
        noise = ("DBUS", "dbus", "krb5", "credentials for principal", "RADOS", "default realm")
        tail: list[str] = []
        for name in ("rpcbind.stderr", "ganesha.stderr", "ganesha.log"):
            path = self.workdir / name
            if path.exists():
                text = path.read_text(errors="replace").splitlines()
                tail += [f"{name}: {line.strip()}" for line in text
                         if line.strip() and not any(n in line for n in noise)]
        return " | ".join(tail[-lines:]) or "(no output)"

