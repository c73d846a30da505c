"""The bulk receiver's heap tuning, observed in a real process's resident memory."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
    reason="the heap tuning applies to glibc on Linux only")

# Frees 32 MiB of 1 MiB blocks (the size of received frames) three times and prints
# how much resident memory each free gave back to the kernel.
CHURN = """
import ctypes, os, sys
import zmq.green as zmq
from hpcflow.rpc.bulk import BulkClient
from hpcflow.rpc.traffic import Traffic
BulkClient(zmq.Context(), Traffic(), "me")  # what every fetching process creates
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def rss():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
drops = []
for _ in range(3):
    blocks = [libc.malloc(1 << 20) for _ in range(32)]
    for b in blocks:
        ctypes.memset(b, 1, 1 << 20)
    before = rss()
    for b in blocks:
        libc.free(b)
    drops.append((before - rss()) >> 20)
print(*drops)
"""


def _drops(**env: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", CHURN], env={**os.environ, **env},
                         capture_output=True, text=True, timeout=60, check=True)
    return [int(x) for x in out.stdout.split()]


def test_a_bulk_receiver_keeps_freed_frames_instead_of_refaulting_them() -> None:
    assert max(_drops(HPCFLOW_TUNE_HEAP="1")[1:]) <= 2  # kept for the next frames
    # Without the tuning glibc trims the heap every time: the control that shows
    # the measurement can tell the difference.
    assert min(_drops(HPCFLOW_TUNE_HEAP="0")[1:]) >= 16
