"""How a dataset is cut into transfer chunks, and how it is checksummed.

Every chunk is a contiguous byte range of the C-ordered array *and* a
hyperslab (a fixed index prefix plus a range along one axis), so it can be
read either from a memory map of the file or through h5py slicing, and it
never straddles rows unevenly.  Chunks are at most ``chunk_bytes`` long
unless a single element is larger.

The dataset checksum is ``xxh3-128`` over a header (shape, dtype, chunk
size) and the per-chunk ``xxh3-64`` digests.  Both sides compute chunk
digests anyway to verify each chunk in flight, so the whole-dataset check
costs no second pass over the data.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import xxhash

from ..errors import IntegrityError, InvalidData

DEFAULT_CHUNK_BYTES = 4 * 1024 * 1024
#: Chunks of one dataset part: bounds the per-chunk digest tables both ends keep
#: (16 TiB at the default chunk size).
MAX_CHUNKS = 1 << 22


def chunk_digest(buf: object) -> int:
    """64-bit digest of one chunk's bytes (``buf`` supports the buffer protocol)."""
    return xxhash.xxh3_64_intdigest(buf)  # type: ignore[arg-type]


class Payload:
    """One chunk's bytes as the frames they travelled in, never joined.

    The bulk path sends a chunk as frames of at most 1 MiB: libzmq receives each
    frame into a fresh allocation, and at 4 MiB glibc hands it out as new pages
    the receiving I/O thread must fault in and zero, which halved throughput.
    Consumers copy or write the frames where they belong, so no extra copy is made.
    """

    __slots__ = ("frames", "nbytes")

    def __init__(self, frames: Sequence[Any]) -> None:
        self.frames = [memoryview(f).cast("B") for f in frames]
        self.nbytes = sum(f.nbytes for f in self.frames)

    def digest(self) -> int:
        """The chunk digest of the concatenated frames (same as :func:`chunk_digest`)."""
        if len(self.frames) == 1:
            return chunk_digest(self.frames[0])
        h = xxhash.xxh3_64()
        for f in self.frames:
            h.update(f)
        return h.intdigest()

    def copy_into(self, flat: Any, off: int) -> None:
        """Copy into the flat ``uint8`` array ``flat`` starting at byte ``off``."""
        for f in self.frames:
            flat[off : off + f.nbytes] = np.frombuffer(f, dtype=np.uint8)
            off += f.nbytes

    def pwrite(self, fd: int, off: int) -> None:
        """Write at file offset ``off``; a short write raises OSError."""
        written = os.pwritev(fd, self.frames, off)
        if written != self.nbytes:
            raise OSError(f"short write ({written} of {self.nbytes} bytes)")


def dataset_checksum(
    shape: tuple[int, ...], dtype: str, chunk_bytes: int, digests: Iterable[int]
) -> str:
    h = xxhash.xxh3_128()
    h.update(repr((tuple(shape), np.dtype(dtype).str, chunk_bytes)).encode())
    for d in digests:
        h.update(int(d).to_bytes(8, "little"))
    return "xxh3:" + h.hexdigest()


@dataclass(frozen=True)
class Chunking:
    """The chunk layout of an array of ``shape`` and ``itemsize`` bytes per element."""

    shape: tuple[int, ...]
    itemsize: int
    chunk_bytes: int

    @cached_property
    def _axis(self) -> int:
        # The first axis whose trailing block fits in a chunk.
        for k in range(len(self.shape)):
            if math.prod(self.shape[k + 1 :]) * self.itemsize <= self.chunk_bytes:
                return k
        return max(len(self.shape) - 1, 0)

    @cached_property
    def _unit(self) -> int:
        return math.prod(self.shape[self._axis + 1 :]) * self.itemsize

    @cached_property
    def _per(self) -> int:
        return max(1, self.chunk_bytes // max(self._unit, 1))

    @cached_property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize

    def __len__(self) -> int:
        if self.nbytes == 0:
            return 0
        if not self.shape:
            return 1
        axis = self._axis
        return math.prod(self.shape[:axis]) * math.ceil(self.shape[axis] / self._per)

    def _check_scalar(self, i: int) -> None:
        if i != 0:
            raise IndexError(f"chunk {i} out of range (a scalar has one chunk)")

    def _locate(self, i: int) -> tuple[int, int, int]:
        if not 0 <= i < len(self):
            raise IndexError(f"chunk {i} out of range (0..{len(self) - 1})")
        axis = self._axis
        blocks = math.ceil(self.shape[axis] / self._per)
        outer, b = divmod(i, blocks)
        start = b * self._per
        stop = min(start + self._per, self.shape[axis])
        return outer, start, stop

    def slab(self, i: int) -> tuple[int | slice, ...]:
        """Index expression selecting chunk ``i`` of the array."""
        if not self.shape:
            self._check_scalar(i)
            return ()
        outer, start, stop = self._locate(i)
        prefix = np.unravel_index(outer, self.shape[: self._axis]) if self._axis else ()
        return (*(int(p) for p in prefix), slice(start, stop))

    def byte_range(self, i: int) -> tuple[int, int]:
        """``(offset, length)`` of chunk ``i`` in the C-ordered bytes."""
        if not self.shape:
            self._check_scalar(i)
            return 0, self.itemsize
        outer, start, stop = self._locate(i)
        unit = self._unit
        return (outer * self.shape[self._axis] + start) * unit, (stop - start) * unit


def chunk_payload(chunking: Chunking, i: int, buf: Any) -> tuple[int, Payload]:
    """Chunk ``i``'s byte offset and its bytes (as frames); :class:`InvalidData` for an
    index out of range or a wrong length (what every writer checks first)."""
    if not 0 <= i < len(chunking):
        raise InvalidData(f"chunk index {i} out of range (0..{len(chunking) - 1})")
    off, length = chunking.byte_range(i)
    payload = buf if isinstance(buf, Payload) else Payload([buf])
    if payload.nbytes != length:
        raise InvalidData(f"chunk {i} has {payload.nbytes} bytes, expected {length}")
    return off, payload


def final_checksum(key: str, shape: tuple[int, ...], dtype: str, chunk_bytes: int,
                   digests: Sequence[int | None], expected: str | None) -> tuple[str, list[int]]:
    """The dataset checksum once every chunk has arrived, and the digests; InvalidData
    if some never did, IntegrityError if it is not ``expected``."""
    missing = sum(d is None for d in digests)
    if missing:
        raise InvalidData(f"{key}: {missing} chunks never arrived")
    got = [int(d) for d in digests if d is not None]
    checksum = dataset_checksum(shape, dtype, chunk_bytes, got)
    if expected is not None and checksum != expected:
        raise IntegrityError(f"{key}: checksum {checksum} does not match expected {expected}")
    return checksum, got


class ChunkWriter:
    """What the store's writers (file and memory) share: the chunk digests received,
    and ``commit``, which checks them and hands the part to ``_publish``."""

    proto: Any  # the DatasetRecord being written (without its checksum yet)
    digests: list[int | None]
    _done: bool

    @property
    def received(self) -> int:
        return sum(d is not None for d in self.digests)

    def commit(self, expected_checksum: str | None = None) -> Any:
        """Verify every chunk arrived and the checksum (``expected_checksum`` if given),
        then make the part visible; returns its record."""
        p = self.proto
        try:
            checksum, digests = final_checksum(p.key, p.shape, p.dtype, p.chunk_bytes,
                                               self.digests, expected_checksum)
        except IntegrityError:
            self.abort()
            raise
        rec = self._publish(checksum, digests)
        self._done = True
        return rec

    def _publish(self, checksum: str, digests: list[int]) -> Any:
        raise NotImplementedError

    def abort(self) -> None:
        raise NotImplementedError
