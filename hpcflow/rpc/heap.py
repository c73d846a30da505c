"""Keep a bulk receiver's heap from being trimmed and refaulted on every chunk.

libzmq's I/O thread allocates every received frame with ``malloc`` and the
Python side frees it a moment later.  With glibc's defaults, once 1 MiB frames
come from the heap, free space at the top of the heap over 2 MiB is handed back
to the kernel, so the next frames land in fresh pages the I/O thread must fault
in and zero: on a 2-core machine that cost a verified 1 GiB fetch about a third
of its throughput (2.4 vs 3.5 GB/s).

:func:`tune_heap` sets two glibc ``mallopt`` parameters for the whole process,
once, on Linux with glibc only: allocations under ``MMAP_THRESHOLD`` come from
the heap (large numpy arrays still get their own mappings and are returned on
free), and up to ``TRIM_THRESHOLD`` of free heap is kept instead of trimmed
(a credit window of chunks in flight is 32 MiB).  Setting them also turns off
glibc's dynamic adjustment, which on its own may raise the mmap threshold to
32 MiB.  ``HPCFLOW_TUNE_HEAP=0`` in the environment leaves the allocator alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import platform

log = logging.getLogger(__name__)

MMAP_THRESHOLD = 4 * 1024 * 1024
TRIM_THRESHOLD = 64 * 1024 * 1024
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # from glibc's malloc.h

_state: bool | None = None


def tune_heap() -> bool:
    """Apply the settings above (first call only); True if they are in effect."""
    global _state
    if _state is not None:
        return _state
    _state = False
    if os.environ.get("HPCFLOW_TUNE_HEAP", "1").strip().lower() in ("0", "no", "off", "false"):
        return False
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    # mallopt returns 1 on success, 0 on error.
    _state = bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)
                  and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    if not _state:
        log.warning("could not tune the heap for bulk transfers (mallopt refused)")
    return _state
