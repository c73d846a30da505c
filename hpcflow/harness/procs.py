"""Process and namespace plumbing shared by the emulated-cluster pieces.

Used by :mod:`hpcflow.harness.netns` (hosts as network namespaces),
:mod:`hpcflow.harness.local` (daemons), the replay and
``nfs_baseline.server`` (nfs-ganesha as a child process): stopping children
reliably, making SIGTERM unwind ``with`` blocks so children die with us,
holding signals back while tearing down, children that die with their
parent, recognising what a *killed* run left behind (:func:`claim`,
:func:`reap_stale`), and creating a socket inside another network namespace
without moving the whole process there.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import FrameType
from typing import IO, Any

from ..config import timeout_scale
from ..errors import HpcflowError

_CLONE_NEWNET = 0x40000000
_DEFERRED = {signal.SIGINT, signal.SIGTERM}
_exit_hooks: dict[int, Callable[[], None]] = {}


def terminate(proc: subprocess.Popen[Any], grace: float) -> None:
    """SIGTERM, wait up to *grace* seconds, then SIGKILL; always reaps."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """``preexec_fn``: the child gets ``sig`` (SIGTERM) when the thread that started it
    dies (``functools.partial(die_with_parent, signal.SIGKILL)`` for children that
    need no clean exit).

    Linux ``PR_SET_PDEATHSIG``; it survives ``exec`` (also through ``ip netns
    exec``, ``nsenter`` and ``unshare``, which exec without forking), so
    children of a SIGKILLed harness do not linger.  It is cleared when the
    child changes credentials (rpcbind drops to its own user), hence
    :func:`claim`.

    Start such children inside :func:`signals_deferred`: with a
    ``preexec_fn``, subprocess forks and runs Python at-fork hooks, and a
    Ctrl-C whose handler runs inside one is swallowed ("Exception ignored in
    _releaseLock"; seen here).  This function unblocks the two signals again
    in the child.
    """
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(1, sig)  # PR_SET_PDEATHSIG
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _DEFERRED)


def claimed_tmpdir(stack: contextlib.ExitStack, prefix: str) -> Path:
    """A temporary directory claimed by this process (so :func:`reap_stale` removes it
    if we are SIGKILLed) and removed when ``stack`` closes, signals held back meanwhile."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))

    def remove() -> None:
        with signals_deferred():
            shutil.rmtree(tmp, ignore_errors=True)

    stack.callback(remove)
    claim(tmp)
    return tmp


def run_job(argv: list[str], job: dict[str, Any], name: str, work: Path, *, what: str,
            marker: str, progress: Callable[[str], None], timeout_s: float,
            popen: Callable[..., subprocess.Popen[str]] = subprocess.Popen,
            tail_lines: int = 15, **popen_kw: Any) -> dict[str, Any]:
    """Run a job process and return the JSON on the last line of its stdout.

    ``job`` goes to ``<work>/<name>.job.json``, whose path is the last argument
    after ``argv``; stdout goes to ``<work>/<name>.agent.out``.  Its stderr
    lines starting with ``marker`` are handed to ``progress`` (without the
    marker); the last ``tail_lines`` others make the error if it fails
    (:class:`~hpcflow.errors.HpcflowError` "``what`` failed (code)").  Ctrl-C,
    SIGTERM or ``timeout_s`` kill it first.
    """
    job_file = work / f"{name}.job.json"
    job_file.write_text(json.dumps(job))
    out_file = work / f"{name}.agent.out"
    tail: deque[str] = deque(maxlen=tail_lines)

    def relay(stream: IO[str]) -> None:
        for line in stream:
            if line.startswith(marker):
                progress(line[len(marker):].rstrip())
            else:
                tail.append(line.rstrip())

    proc: subprocess.Popen[str] | None = None
    try:
        with open(out_file, "w") as out, signals_deferred():  # see die_with_parent
            proc = popen([*argv, str(job_file)], stdout=out, stderr=subprocess.PIPE,
                         text=True, preexec_fn=die_with_parent, **popen_kw)
        assert proc.stderr is not None
        reader = threading.Thread(target=relay, args=(proc.stderr,), daemon=True)
        reader.start()
        proc.wait(timeout=timeout_s)
        reader.join()
    except BaseException:  # Ctrl-C, SIGTERM, timeout: the job goes first
        if proc is not None:
            proc.kill()
            proc.wait()
        raise
    if proc.returncode != 0:
        raise HpcflowError(f"{what} failed ({proc.returncode}):\n" + "\n".join(tail))
    doc: dict[str, Any] = json.loads(out_file.read_text().strip().splitlines()[-1])
    return doc


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Hold SIGINT/SIGTERM back during the block (a teardown must not be cut short).

    They are delivered when it ends.  Nested use is fine.  Masking alone is not
    enough once other threads exist (a job's stderr reader, ZeroMQ's): the kernel may
    hand the signal to one of them, and Python then runs its handler in the main
    thread anyway -- at worst inside a fork hook, which swallows the exception it
    raises, and a SIGTERM was lost.  So in the main thread the block also holds the
    Python handlers back: a signal arriving meanwhile is noted and raised again at
    the end.
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFERRED)
    outer = not _held and threading.current_thread() is threading.main_thread()
    handlers = {sig: signal.signal(sig, _hold) for sig in _DEFERRED} if outer else {}
    _held.append(None)
    try:
        yield
    finally:
        _held.pop()
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        signal.pthread_sigmask(signal.SIG_SETMASK, old)
        if outer and _caught:
            caught = _caught.pop()
            _caught.clear()
            signal.raise_signal(caught)


#: Open ``signals_deferred`` blocks, and the signals held back by the outermost.
_held: list[None] = []
_caught: list[int] = []


def _hold(signum: int, _frame: FrameType | None) -> None:
    _caught.append(signum)


def stop_at_exit(owner: object, stop: Callable[[], None]) -> None:
    """Run *stop* at interpreter exit (or on SIGTERM) unless :func:`forget` is called first."""
    _exit_hooks[id(owner)] = stop
    guard_process_exit()


def forget(owner: object) -> None:
    _exit_hooks.pop(id(owner), None)


def _run_exit_hooks() -> None:
    for stop in list(_exit_hooks.values()):
        stop()


def _sigterm_to_exit(signum: int, _frame: FrameType | None) -> None:
    """Turn SIGTERM into SystemExit so ``with`` blocks and atexit tear down."""
    raise SystemExit(128 + signum)


def guard_process_exit() -> None:
    """Make SIGTERM unwind ``with`` blocks and run atexit, so children die with us.

    Installed once, only if SIGTERM still has its default disposition (then
    it would kill us without any cleanup) and only from the main thread
    (Python's restriction).  It stays installed: restoring it per object
    would race with other users of the same conversion.
    """
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
        signal.signal(signal.SIGTERM, _sigterm_to_exit)


# -- leftovers of killed runs ---------------------------------------------------------

OWNER_FILE = ".hpcflow-owner.json"


def _start_time(pid: int) -> int | None:
    """Start time of *pid* in clock ticks since boot (``/proc/PID/stat`` field 22), or None.

    With the PID it identifies a process: a recycled PID has a later start.
    """
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def _stat_fields(pid: int) -> list[str] | None:
    """``/proc/PID/stat`` from field 3 (the state) on, or None if there is no such process.
    (Field 2, the command name in parentheses, may itself hold spaces and parentheses.)"""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def claim(directory: str | os.PathLike[str], pids: Iterable[int] = ()) -> None:
    """Mark *directory* as this process's, together with child *pids* that live outside it.

    :func:`reap_stale` removes the directory and kills those children once
    this process is gone without cleaning up (SIGKILL).  Call again to add
    children; the marker is replaced atomically.
    """
    me = os.getpid()
    procs = [[pid, start] for pid in pids if (start := _start_time(pid)) is not None]
    marker = Path(directory) / OWNER_FILE
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps({"pid": me, "start": _start_time(me), "procs": procs}))
    os.replace(tmp, marker)


def reap_stale(pattern: str) -> list[str]:
    """Remove directories matching *pattern*, claimed (:func:`claim`) by a dead process.

    Their recorded children are SIGKILLed first, but only if they are still
    the same processes (PID and start time).  Directories without a readable
    marker, or whose owner is alive, are left alone.  Returns what was removed.
    """
    removed = []
    for directory in sorted(glob.glob(pattern)):
        try:
            info = json.loads((Path(directory) / OWNER_FILE).read_text())
            owner, procs = (int(info["pid"]), info["start"]), info["procs"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if _start_time(owner[0]) == owner[1]:
            continue
        killed = []
        for pid, start in procs:
            if _start_time(pid) == start:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    killed.append(pid)
        _await_death(killed, 5 * timeout_scale())  # they may still write into the directory
        shutil.rmtree(directory, ignore_errors=True)
        removed.append(directory)
    return removed


def _dead(pid: int) -> bool:
    """Gone, or a zombie (killed; only its parent's wait is missing)."""
    fields = _stat_fields(pid)
    return fields is None or fields[0] in ("Z", "X")


def _await_death(pids: list[int], timeout_s: float) -> None:
    """Poll until every SIGKILLed process in *pids* has died (they are not our
    children, so there is nothing to wait on); give up after *timeout_s*."""
    deadline = time.monotonic() + timeout_s
    delay = 0.001
    while not all(_dead(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(delay)
        delay = min(delay * 2, 0.05)


def enter_netns(ns_path: str) -> None:
    """Move the calling *thread* into the network namespace at ``ns_path`` (``setns``
    changes only the calling thread: call it from a throw-away one)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(ns_path, os.O_RDONLY)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({ns_path}): {os.strerror(err)}")
    finally:
        os.close(fd)


def socket_in_netns(ns_path: str | None, family: int = socket.AF_INET,
                    type: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket of this process living in the network namespace at *ns_path* (None: ours).

    ``setns(CLONE_NEWNET)`` affects only the calling thread and a socket keeps
    the namespace it was created in, so a throw-away thread creates it.
    """
    if ns_path is None:
        return socket.socket(family, type)
    result: list[socket.socket | BaseException] = []

    def create() -> None:
        try:
            enter_netns(ns_path)
            result.append(socket.socket(family, type))
        except BaseException as exc:  # handed to the caller's thread
            result.append(exc)

    thread = threading.Thread(target=create, name="setns")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


atexit.register(_run_exit_hooks)
