"""The daemon's thread pools, one per kind of blocking work.

gevent's default pool (10 threads) runs the store's chunk hashing and writes;
op code and planning get pools of their own, so a dozen long user ops cannot
hold up the planning of an unrelated flow or the arrival of a transfer.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import gevent.threadpool

from ..errors import HpcflowError

log = logging.getLogger("hpcflow.pools")
_POOLS: dict[str, gevent.threadpool.ThreadPool] = {}


def op_pool() -> gevent.threadpool.ThreadPool:
    """Threads for op code (at least 4, two per core)."""
    pool = _POOLS.get("ops")
    if pool is None:
        pool = _POOLS["ops"] = gevent.threadpool.ThreadPool(max(4, 2 * (os.cpu_count() or 1)))
    return pool


def plan_pool() -> gevent.threadpool.ThreadPool:
    """Threads for planning (which runs op code on tiny samples): two are plenty."""
    pool = _POOLS.get("plan")
    if pool is None:
        pool = _POOLS["plan"] = gevent.threadpool.ThreadPool(2)
    return pool


def run_in(pool: gevent.threadpool.ThreadPool, fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on ``pool``; its exception is raised here, in the calling greenlet.

    An exception raised on a pool thread itself is printed with its traceback by
    gevent's hub before it reaches the caller: every planning error a user's input
    causes (an unknown dataset, bad op params) would be a traceback in the log.  The
    callers log typed errors as one line; anything else is a bug, logged here with
    its traceback."""
    def guarded() -> tuple[bool, Any]:
        try:
            return True, fn(*args)
        except Exception as exc:
            return False, exc

    ok, value = pool.apply(guarded)
    if ok:
        return value
    if not isinstance(value, HpcflowError):
        log.error("unexpected error in %s", getattr(fn, "__qualname__", fn), exc_info=value)
    raise value
