"""Volatile dataset parts held in memory: a workflow's intermediates.

Outputs, partials, copies and slices a flow makes are needed for seconds and
can be made again (the initiator re-plans when one is gone), so they skip the
HDF5 file, the fsyncs and the rename that make a ``put`` durable.  A
:class:`MemoryWriter` fills one flat buffer chunk by chunk (same interface
and the same digests as the file writer); a :class:`MemoryReader` serves
chunks and byte ranges from it without copying, as the file reader does from
its memory map.  The :class:`~hpcflow.catalog.store.Store` decides where a
volatile part goes: into memory while the node's budget allows, otherwise
into a spill file that is never fsynced and is removed on restart.
"""

from __future__ import annotations

import os
import time
from typing import Any, Protocol

import gevent
import numpy as np

from ..errors import IntegrityError, InvalidData, StoreError
from .chunking import Chunking, ChunkWriter, Payload, chunk_digest, chunk_payload
from .record import DatasetRecord


class Owner(Protocol):
    """What a :class:`MemoryWriter` asks of the store that made it (the
    :class:`~hpcflow.catalog.store.Store`): publish the part, or release its name."""

    def _finish_memory(self, w: MemoryWriter, checksum: str, digests: list[int]
                       ) -> DatasetRecord: ...

    def _release(self, key: str, reserved: int = 0) -> None: ...

#: Chunks at least this big are copied and hashed on a pool thread, off the gevent loop.
OFFLOAD_BYTES = 256 * 1024
#: An adopted array at least this big is hashed on a pool thread (all its chunks in one
#: hop).  Hashing runs at 5-30 GB/s (xxh3; cold to cached memory): 16 MiB holds the
#: loop 0.5-3 ms, while a hop to a pool thread and back cost ~0.5 ms on a loaded host.
OFFLOAD_DIGEST_BYTES = 16 * 1024 * 1024


def memory_budget_default() -> int:
    """A quarter of the machine's RAM (several daemons may share one machine)."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 4
    except (ValueError, OSError, AttributeError):
        return 1 << 30


class MemoryWriter(ChunkWriter):
    """Receives the chunks of one volatile part into memory; commit makes it visible."""

    durable = False

    def __init__(self, store: Owner, rec: DatasetRecord) -> None:
        self.store = store
        self.proto = rec
        self.chunking = Chunking(rec.shape, np.dtype(rec.dtype).itemsize, rec.chunk_bytes)
        self.digests: list[int | None] = [None] * len(self.chunking)
        try:
            self.buf = np.empty(rec.nbytes, dtype=np.uint8)
        except MemoryError as exc:
            raise StoreError(f"cannot hold {rec.key} ({rec.nbytes} bytes) in memory") from exc
        self._done = False
        self.last_activity = time.monotonic()

    def write_chunk(self, i: int, buf: Any, digest: int | None = None) -> None:
        """Copy chunk ``i`` in; :class:`IntegrityError` if ``digest`` does not match."""
        if self._done:
            raise StoreError("writer already finished")
        off, payload = chunk_payload(self.chunking, i, buf)
        length = payload.nbytes
        if length >= OFFLOAD_BYTES:
            actual = gevent.get_hub().threadpool.apply(self._copy_and_hash, (payload, off))
        else:
            actual = self._copy_and_hash(payload, off)
        if digest is not None and actual != digest:
            raise IntegrityError(f"chunk {i} of {self.proto.key} failed its checksum")
        self.digests[i] = actual
        self.last_activity = time.monotonic()

    def adopt(self, a: np.ndarray[Any, Any]) -> None:
        """Take the C-contiguous array ``a``'s own bytes as the part's, without a copy:
        only the chunk digests are computed.  ``a`` is made read-only, so whoever made it
        cannot change the part behind the catalog's back (a view taken of it earlier
        could: callers hand over arrays nobody else holds, like an op's fresh output)."""
        if self._done or self.received:
            raise StoreError("writer already started")
        if not a.flags.c_contiguous or a.nbytes != self.proto.nbytes:
            raise InvalidData(f"cannot adopt {a.shape} {a.dtype} as {self.proto.key}")
        a.flags.writeable = False
        self.buf = a.reshape(-1).view(np.uint8)
        if self.buf.nbytes >= OFFLOAD_DIGEST_BYTES:
            gevent.get_hub().threadpool.apply(self._digest_all)
        else:
            self._digest_all()
        self.last_activity = time.monotonic()

    def _digest_all(self) -> None:
        assert self.buf is not None
        for i in range(len(self.chunking)):
            off, length = self.chunking.byte_range(i)
            self.digests[i] = chunk_digest(self.buf[off : off + length])

    def _copy_and_hash(self, payload: Payload, off: int) -> int:
        payload.copy_into(self.buf, off)
        return chunk_digest(self.buf[off : off + payload.nbytes])

    def _publish(self, checksum: str, digests: list[int]) -> DatasetRecord:
        return self.store._finish_memory(self, checksum, digests)

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self.store._release(self.proto.key, reserved=self.proto.nbytes)


class MemoryReader:
    """Chunk-wise access to one part held in memory (views, never copies)."""

    def __init__(self, rec: DatasetRecord, buf: np.ndarray[Any, Any], digests: list[int]) -> None:
        self.rec = rec
        self.chunking = Chunking(rec.shape, np.dtype(rec.dtype).itemsize, rec.chunk_bytes)
        self.buf = buf
        self.digests = digests

    def __len__(self) -> int:
        return len(self.chunking)

    def chunk(self, i: int) -> tuple[Any, int]:
        off, length = self.chunking.byte_range(i)
        return self.buf[off : off + length], int(self.digests[i])

    def byte_range(self, off: int, length: int) -> Any:
        if off < 0 or length < 0 or off + length > self.rec.nbytes:
            raise InvalidData(f"byte range {off}+{length} outside {self.rec.key} "
                              f"({self.rec.nbytes} bytes)")
        return self.buf[off : off + length]

    def array(self) -> np.ndarray[Any, Any]:
        """The part as a read-only array (no copy)."""
        view = self.buf.view(np.dtype(self.rec.dtype)).reshape(self.rec.shape)
        view.flags.writeable = False
        return view

    def close(self) -> None:
        pass


__all__ = ["MemoryReader", "MemoryWriter", "memory_budget_default"]
