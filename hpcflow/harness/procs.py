"""Process and namespace plumbing shared by the emulated-cluster pieces.

Used by :mod:`hpcflow.harness.netns` (hosts as network namespaces) and
``nfs_baseline.server`` (nfs-ganesha as a child process): stopping children
reliably, making SIGTERM unwind ``with`` blocks so children die with us, and
creating a socket inside another network namespace without moving the
whole process there.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import socket
import subprocess
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any

_CLONE_NEWNET = 0x40000000
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


def stop_at_exit(owner: object, stop: Callable[[], None]) -> None:
    """Run *stop* at interpreter exit (or on SIGTERM) unless :func:`forget` is called first."""
    _exit_hooks[id(owner)] = stop
    _guard_process_exit()


def forget(owner: object) -> None:
    _exit_hooks.pop(id(owner), None)


def _run_exit_hooks() -> None:
    for stop in list(_exit_hooks.values()):
        stop()


def _sigterm_to_exit(signum: int, _frame: FrameType | None) -> None:
    """Turn SIGTERM into SystemExit so ``with`` blocks and atexit tear down."""
    raise SystemExit(128 + signum)


def _guard_process_exit() -> None:
    """Make SIGTERM unwind ``with`` blocks and run atexit, so children die with us.

    Installed once, only if SIGTERM still has its default disposition (then
    it would kill us without any cleanup) and only from the main thread
    (Python's restriction).  It stays installed: restoring it per object
    would race with other users of the same conversion.
    """
    if (threading.current_thread() is threading.main_thread()
            and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL):
        signal.signal(signal.SIGTERM, _sigterm_to_exit)


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
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(ns_path, os.O_RDONLY)
            try:
                if libc.setns(fd, _CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns_path}): {os.strerror(err)}")
            finally:
                os.close(fd)
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
