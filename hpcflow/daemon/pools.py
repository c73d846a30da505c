"""The daemon's thread pools, one per kind of blocking work.

gevent's default pool (10 threads) runs the store's chunk hashing and writes;
op code and planning get pools of their own, so a dozen long user ops cannot
hold up the planning of an unrelated flow or the arrival of a transfer.
"""

from __future__ import annotations

import os

import gevent.threadpool

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
