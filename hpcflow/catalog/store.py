"""The local HDF5 store: one file per dataset part, written atomically.

Layout under ``<data_dir>/datasets``: ``<name>.h5`` or ``<name>@<part>.h5``.
Each file holds ``/data`` (contiguous, allocated up front so its byte offset
is known), ``/chunk_digests`` and the record's fields as attributes, so the
inventory survives restarts with nothing but the files.

Atomicity: a dataset is written into ``.tmp-*.h5`` in the same directory,
fsynced and renamed into place; only then is it visible to ``records()`` and
announced.  Temp files left by a crash are removed on the next start, and a
file that cannot be read back (truncated, not HDF5) is moved to
``<data_dir>/quarantine`` with a log line, never deleted.

Volatile parts (a workflow's intermediates, see :mod:`.memory`) skip all of
that: they are held in memory while the node's ``memory_budget`` allows,
else written to ``<data_dir>/spill`` without fsync; the spill directory is
emptied at start, so a restart forgets them (the initiator re-plans).

Data is written with ``pwrite`` and read through a memory map of the data
region, which lets the bulk path send straight from the page cache.  Chunk
writes (hash + ``pwrite``) and the fsync at commit run in gevent's thread
pool: under dirty-page throttling a write can block for seconds, and the
daemon's heartbeats must not stop meanwhile.  Only raw syscalls on a file
descriptor and xxhash (both release the GIL) run there, never h5py.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import gevent
import gevent.event
import h5py
import numpy as np

from ..errors import DatasetExists, DatasetNotFound, IntegrityError, InvalidData, StoreError
from .chunking import (
    DEFAULT_CHUNK_BYTES,
    MAX_CHUNKS,
    Chunking,
    ChunkWriter,
    Payload,
    chunk_digest,
    chunk_payload,
    dataset_checksum,
)
from .memory import MemoryReader, MemoryWriter, memory_budget_default
from .record import (
    DatasetRecord,
    RecordTable,
    key_of,
    layout_nbytes,
    validate_dtype,
    validate_name,
    validate_nparts,
    validate_part,
)

log = logging.getLogger("hpcflow.store")

FORMAT_VERSION = 1
_NONE = -1  # HDF5 attributes cannot hold None
#: Group of a part's file holding per-frame arrays kept beside the data (H5MD step and
#: time, see :mod:`hpcflow.h5md`): bulky metadata stays out of the catalog's records.
AUX_GROUP = "aux"
#: Chunks at least this big are hashed and written on a pool thread, off the gevent loop.
OFFLOAD_BYTES = 256 * 1024
#: Arrays from this size on are adopted rather than copied by ``put_array(adopt=True)``.
ADOPT_BYTES = 64 * 1024


def _blocking(fn: Callable[..., Any], *args: Any) -> Any:
    """Run a blocking syscall off the gevent loop when a hub is running."""
    return gevent.get_hub().threadpool.apply(fn, args)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_contiguous(f: h5py.File, shape: tuple[int, ...], dtype: np.dtype[Any]) -> int | None:
    """Create ``/data`` allocated now and never filled; return its byte offset."""
    if int(np.prod(shape, dtype=np.int64)) == 0:
        f.create_dataset("data", shape=shape, dtype=dtype)
        return None
    dcpl = h5py.h5p.create(h5py.h5p.DATASET_CREATE)
    dcpl.set_alloc_time(h5py.h5d.ALLOC_TIME_EARLY)
    dcpl.set_fill_time(h5py.h5d.FILL_TIME_NEVER)
    space = h5py.h5s.create_simple(shape) if shape else h5py.h5s.create(h5py.h5s.SCALAR)
    dsid = h5py.h5d.create(f.id, b"data", h5py.h5t.py_create(dtype), space, dcpl=dcpl)
    offset = dsid.get_offset()
    return None if offset is None else int(offset)


class DatasetWriter(ChunkWriter):
    """Receives the chunks of one dataset part into a temp file; commit makes it visible.

    ``durable=False`` (a spilled volatile part) writes into the spill directory and
    commits without fsync."""

    def __init__(self, store: Store, rec: DatasetRecord, durable: bool = True,
                 aux: dict[str, np.ndarray[Any, Any]] | None = None) -> None:
        self.store = store
        self.proto = rec
        self.durable = durable
        self.dir = store.dir if durable else store.spill_dir
        self.chunking = Chunking(rec.shape, np.dtype(rec.dtype).itemsize, rec.chunk_bytes)
        self.digests: list[int | None] = [None] * len(self.chunking)
        self.tmp = self.dir / f".tmp-{uuid.uuid4().hex}.h5"
        self._done = False
        # The fd is shared with pool threads: it is closed only once no write is in flight
        # (a greenlet killed while its write runs must not let the fd number be reused).
        self._fd_lock = threading.Lock()
        self._inflight = 0
        self._close_pending = False
        self.fd = -1
        try:
            with h5py.File(self.tmp, "w") as f:
                self.offset = _create_contiguous(f, rec.shape, np.dtype(rec.dtype))
                for key, arr in (aux or {}).items():  # per-frame metadata (H5MD step, time)
                    f.create_dataset(f"{AUX_GROUP}/{key}", data=arr)
            self.fd = os.open(self.tmp, os.O_RDWR)
        except Exception as exc:  # h5py raises OSError, RuntimeError, ValueError ...
            self._unlink()
            raise StoreError(f"cannot create {rec.key} ({list(rec.shape)} {rec.dtype}, "
                             f"{rec.nbytes} bytes) in {self.dir}: {exc}") from exc
        self.last_activity = time.monotonic()

    def write_chunk(self, i: int, buf: Any, digest: int | None = None) -> None:
        """Write chunk ``i``; raise :class:`IntegrityError` if ``digest`` does not match.

        A failed write (disk full, file too large) raises :class:`StoreError`; the
        caller aborts the writer, which removes the temp file.
        """
        if self._done:
            raise StoreError("writer already finished")
        off, payload = chunk_payload(self.chunking, i, buf)
        length = payload.nbytes
        with self._fd_lock:
            self._inflight += 1
        if length >= OFFLOAD_BYTES:
            actual, error = _blocking(self._hash_and_write, payload, off, digest)
        else:
            actual, error = self._hash_and_write(payload, off, digest)
        if error is not None:
            raise StoreError(f"cannot write chunk {i} of {self.proto.key} to {self.tmp}: "
                             f"{error}") from error
        if digest is not None and actual != digest:
            raise IntegrityError(f"chunk {i} of {self.proto.key} failed its checksum")
        self.digests[i] = actual
        self.last_activity = time.monotonic()

    def _hash_and_write(self, payload: Payload, off: int,
                        digest: int | None) -> tuple[int, OSError | None]:
        """Runs on a pool thread for big chunks: only GIL-releasing work, no h5py.
        Returns the failure rather than raising it (the pool would log a traceback)."""
        try:
            actual = payload.digest()
            if (digest is None or actual == digest) and self.offset is not None:
                if self.store.fault_write_delay_s:
                    time.sleep(self.store.fault_write_delay_s)  # a disk under throttling
                payload.pwrite(self.fd, self.offset + off)
            return actual, None
        except OSError as exc:
            return 0, exc
        finally:
            with self._fd_lock:
                self._inflight -= 1
                if self._close_pending and not self._inflight:
                    self._close_now()

    def _publish(self, checksum: str, digests: list[int]) -> DatasetRecord:
        """fsync (unless spilled), rename into place and register."""
        return self.store._finish(self, checksum, digests)

    def abort(self) -> None:
        """Drop the temp file; nothing becomes visible."""
        if not self._done:
            self._done = True
            self.store._release(self.proto.key)
        self._close_fd()
        self._unlink()

    def _close_fd(self) -> None:
        with self._fd_lock:
            if self._inflight:
                self._close_pending = True  # the last write in flight closes it
            else:
                self._close_now()

    def _close_now(self) -> None:
        fd, self.fd = self.fd, -1
        if fd >= 0:
            os.close(fd)

    def _unlink(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.tmp.unlink()


#: What :meth:`Store.begin` returns: a file (durable or spilled) or a memory writer.
Writer = DatasetWriter | MemoryWriter


class DatasetReader:
    """Chunk-wise access to one stored part, through a memory map where possible."""

    def __init__(self, path: Path, rec: DatasetRecord) -> None:
        self.rec = rec
        self.chunking = Chunking(rec.shape, np.dtype(rec.dtype).itemsize, rec.chunk_bytes)
        self._file: h5py.File | None = None
        self._mm: np.memmap[Any, Any] | None = None
        try:
            f = h5py.File(path, "r")
            self.digests = np.asarray(f["chunk_digests"][...], dtype=np.uint64)
            offset = f["data"].id.get_offset()
            if offset is not None and rec.nbytes:
                f.close()
                self._mm = np.memmap(path, dtype=np.uint8, mode="r", offset=int(offset),
                                     shape=(rec.nbytes,))
            else:
                self._file = f
        except (OSError, KeyError, ValueError) as exc:
            raise StoreError(f"cannot read {path}: {exc}") from exc
        if len(self.digests) != len(self.chunking):
            raise StoreError(f"{path}: digest table does not match the chunk layout")

    def __len__(self) -> int:
        return len(self.chunking)

    def chunk(self, i: int) -> tuple[Any, int]:
        """``(buffer, stored digest)`` of chunk ``i``; the buffer is not copied when mapped."""
        if self._mm is not None:
            off, length = self.chunking.byte_range(i)
            return self._mm[off : off + length], int(self.digests[i])
        assert self._file is not None
        arr = np.ascontiguousarray(self._file["data"][self.chunking.slab(i)])
        return arr, int(self.digests[i])

    def byte_range(self, off: int, length: int) -> Any:
        """Bytes ``[off, off+length)`` of the C-ordered data (a view when mapped)."""
        if off < 0 or length < 0 or off + length > self.rec.nbytes:
            raise InvalidData(f"byte range {off}+{length} outside {self.rec.key} "
                              f"({self.rec.nbytes} bytes)")
        if length == 0:
            return np.empty(0, dtype=np.uint8)
        if self._mm is not None:
            return self._mm[off : off + length]
        assert self._file is not None
        flat = np.ascontiguousarray(self._file["data"][...]).reshape(-1).view(np.uint8)
        return flat[off : off + length]

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        self._mm = None


class Store:
    """All dataset parts held by this node."""

    def __init__(self, data_dir: Path, owner: str, memory_budget: int | None = None) -> None:
        self.root = Path(data_dir)
        self.dir = self.root / "datasets"
        self.spill_dir = self.root / "spill"
        self.owner = owner
        #: Bytes of volatile parts held in memory at most (more are spilled to files).
        self.memory_budget = memory_budget_default() if memory_budget is None else memory_budget
        #: Bytes held in memory now, including writes in progress.
        self.memory_used = 0
        self._memory: dict[str, MemoryReader] = {}
        self._spilled: set[str] = set()
        self._records = RecordTable()
        #: Keys being written, each with an event set when the write ends.
        self._busy: dict[str, gevent.event.Event] = {}
        self._readers: OrderedDict[tuple[str, int], DatasetReader] = OrderedDict()
        self.listeners: list[Callable[[str, DatasetRecord | None], None]] = []
        #: Called with a file-backed part about to become visible; raising keeps it
        #: invisible (the writer is aborted).  The daemon checks its claim on the name.
        self.before_commit: Callable[[DatasetRecord], None] = lambda rec: None
        #: Fault injection for tests: every chunk write blocks this long, as a disk under
        #: dirty-page throttling does.
        self.fault_write_delay_s = 0.0

    # -- startup -------------------------------------------------------------
    def open(self) -> list[DatasetRecord]:
        """Create the layout, clear crash leftovers, load the inventory from the files."""
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            if self.spill_dir.exists():  # volatile parts of an earlier run: gone with it
                shutil.rmtree(self.spill_dir)
            self.spill_dir.mkdir()
        except OSError as exc:
            raise StoreError(f"cannot create data dir {self.dir}: {exc}") from exc
        for tmp in self.dir.glob(".tmp-*"):
            log.info("removing unfinished write %s", tmp.name)
            tmp.unlink(missing_ok=True)
        for path in sorted(self.dir.glob("*.h5")):
            try:
                rec = self._load(path)
            except (OSError, KeyError, ValueError, TypeError, StoreError) as exc:
                self._quarantine(path, str(exc))
                continue
            self._records[rec.key] = rec
        log.info("store %s: %d dataset parts", self.dir, len(self._records))
        return list(self._records.values())

    def _load(self, path: Path) -> DatasetRecord:
        with h5py.File(path, "r") as f:
            a = f.attrs
            if int(a["hpcflow_format"]) != FORMAT_VERSION:
                raise StoreError(f"unknown store format {a['hpcflow_format']}")
            ds = f["data"]
            part = int(a["part"])
            nparts = int(a["nparts"])
            rec = DatasetRecord(
                name=validate_name(str(a["name"])),
                part=None if part == _NONE else part,
                owner=self.owner,
                shape=tuple(int(n) for n in ds.shape),
                dtype=validate_dtype(ds.dtype).str,
                nbytes=int(ds.size) * ds.dtype.itemsize,
                checksum=str(a["checksum"]),
                chunk_bytes=int(a["chunk_bytes"]),
                version=int(a["version"]),
                nparts=None if nparts == _NONE else nparts,
                created=float(a["created"]),
                lineage=json.loads(str(a["lineage"])),
            )
            offset = ds.id.get_offset()
            if rec.nbytes and (offset is None or offset + rec.nbytes > path.stat().st_size):
                raise StoreError("file is truncated: data region runs past its end")
            if len(f["chunk_digests"]) != len(
                Chunking(rec.shape, np.dtype(rec.dtype).itemsize, rec.chunk_bytes)
            ):
                raise StoreError("digest table does not match the chunk layout")
        if path.name != f"{rec.key}.h5":
            raise StoreError(f"file name does not match its record {rec.key}")
        return rec

    def _quarantine(self, path: Path, why: str) -> None:
        qdir = self.root / "quarantine"
        qdir.mkdir(exist_ok=True)
        dest = qdir / f"{path.name}.{int(time.time())}"
        log.error("store: %s is unreadable (%s); moved to %s", path.name, why, dest)
        shutil.move(str(path), dest)

    # -- queries -------------------------------------------------------------
    def records(self) -> list[DatasetRecord]:
        return list(self._records.values())

    def named(self, name: str) -> list[DatasetRecord]:
        """The parts of dataset ``name`` held here."""
        return self._records.named(name)

    def slices_of(self, name: str) -> list[DatasetRecord]:
        """The slices (``NAME:rowsLO-HI``) of dataset ``name`` held here."""
        return self._records.slices_of(name)

    def get(self, name: str, part: int | None = None) -> DatasetRecord:
        key = key_of(validate_name(name), validate_part(part))
        try:
            return self._records[key]
        except KeyError:
            raise DatasetNotFound(f"{key} is not stored on {self.owner}") from None

    def path_of(self, key: str) -> Path:
        return (self.spill_dir if key in self._spilled else self.dir) / f"{key}.h5"

    def busy(self, key: str) -> bool:
        return key in self._busy

    def wait_idle(self, key: str, timeout: float | None = None) -> None:
        """Wait until nobody is writing ``key`` here (a concurrent copy of the same rows
        another execution is making: use it rather than fail to write it twice)."""
        done = self._busy.get(key)
        if done is not None:
            done.wait(timeout)

    def is_volatile(self, key: str) -> bool:
        return key in self._memory or key in self._spilled

    def stats(self) -> dict[str, Any]:
        return {"memory_used": self.memory_used, "memory_budget": self.memory_budget,
                "in_memory": len(self._memory), "spilled": len(self._spilled)}

    # -- writing -------------------------------------------------------------
    def begin(
        self,
        name: str,
        shape: tuple[int, ...],
        dtype: Any,
        *,
        part: int | None = None,
        nparts: int | None = None,
        lineage: dict[str, Any] | None = None,
        overwrite: bool = False,
        chunk_bytes: int = DEFAULT_CHUNK_BYTES,
        volatile: bool = False,
        aux: dict[str, np.ndarray[Any, Any]] | None = None,
    ) -> Writer:
        """Start writing a dataset part; it stays invisible until ``commit``.

        ``volatile`` parts (intermediates) go to memory while the budget allows,
        else to an unsynced spill file; either way a restart forgets them.  ``aux``:
        1-D arrays of one entry per row kept in the part's file beside the data
        (:meth:`read_aux`), for durable parts only."""
        name, part = validate_name(name), validate_part(part)
        dt = validate_dtype(dtype)
        if aux and volatile:
            raise InvalidData("per-row metadata (aux) is kept for stored datasets only")
        rows = shape[0] if shape else 1
        for key, arr in (aux or {}).items():
            if not key.isidentifier() or np.ndim(arr) != 1 or len(arr) != rows:
                raise InvalidData(f"per-row array {key!r} must have one entry per row ({rows})")
        nparts = validate_nparts(nparts, part)
        if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int) or not (
                4096 <= chunk_bytes <= 256 * 1024 * 1024):
            raise InvalidData(f"chunk_bytes {chunk_bytes!r} outside 4 KiB..256 MiB")
        nbytes = layout_nbytes(tuple(shape), dt)
        nchunks = len(Chunking(tuple(shape), dt.itemsize, chunk_bytes))
        if nchunks > MAX_CHUNKS:
            raise InvalidData(f"{nbytes} bytes in chunks of {chunk_bytes} make {nchunks} chunks "
                              f"(at most {MAX_CHUNKS}): use a larger chunk_bytes")
        key = key_of(name, part)
        if key in self._busy:
            raise DatasetExists(f"{key} is being written right now")
        old = self._records.get(key)
        if old is not None and not overwrite:
            raise DatasetExists(f"{key} already exists on {self.owner} (use overwrite)")
        other = key_of(name, None) if part is not None else None
        if other in self._records or (part is None and any(
                r.part is not None for r in self._records.named(name))):
            raise InvalidData(f"{name} cannot be both a whole dataset and a partitioned one")
        proto = DatasetRecord(
            name=name, part=part, owner=self.owner, shape=tuple(shape), dtype=dt.str,
            nbytes=nbytes, checksum="",
            chunk_bytes=chunk_bytes, version=(old.version + 1) if old else 1, nparts=nparts,
            created=time.time(), lineage=dict(lineage or {}),
        )
        writer: Writer
        if volatile and self.memory_used + nbytes <= self.memory_budget:
            writer = MemoryWriter(self, proto)
            self.memory_used += nbytes
        else:
            writer = DatasetWriter(self, proto, durable=not volatile, aux=aux)
        self._busy[key] = gevent.event.Event()
        return writer

    def _finish(self, w: DatasetWriter, checksum: str, digests: list[int]) -> DatasetRecord:
        self.before_commit(w.proto)
        rec = DatasetRecord(**{**w.proto.__dict__, "checksum": checksum})
        try:
            w._close_fd()
            with h5py.File(w.tmp, "r+") as f:
                f.create_dataset("chunk_digests", data=np.asarray(digests, dtype=np.uint64))
                a = f.attrs
                a["hpcflow_format"] = FORMAT_VERSION
                a["name"] = rec.name
                a["part"] = _NONE if rec.part is None else rec.part
                a["nparts"] = _NONE if rec.nparts is None else rec.nparts
                a["checksum"] = rec.checksum
                a["chunk_bytes"] = rec.chunk_bytes
                a["version"] = rec.version
                a["created"] = rec.created
                a["lineage"] = json.dumps(rec.lineage)
            if w.durable:
                fd = os.open(w.tmp, os.O_RDONLY)
                try:
                    _blocking(os.fsync, fd)
                finally:
                    os.close(fd)
            self._forget_old(rec.key, keep=w.dir)
            os.replace(w.tmp, w.dir / f"{rec.key}.h5")
            if w.durable:
                _fsync_dir(self.dir)
        except Exception as exc:  # OSError, and h5py's RuntimeError on a full disk
            w._unlink()
            self._release(rec.key)
            raise StoreError(f"cannot store {rec.key}: {exc}") from exc
        if w.durable:
            self._spilled.discard(rec.key)
        else:
            self._spilled.add(rec.key)
        return self._register(rec)

    def _finish_memory(self, w: MemoryWriter, checksum: str, digests: list[int]) -> DatasetRecord:
        rec = DatasetRecord(**{**w.proto.__dict__, "checksum": checksum})
        try:
            self._forget_old(rec.key)
        except OSError as exc:
            self._release(rec.key, reserved=rec.nbytes)
            raise StoreError(f"cannot replace {rec.key}: {exc}") from exc
        self._memory[rec.key] = MemoryReader(rec, w.buf, digests)
        return self._register(rec)

    def _forget_old(self, key: str, keep: Path | None = None) -> None:
        """Drop the version ``key`` replaces where the new one will not overwrite it
        (in memory, or a file in another directory than ``keep``)."""
        held = self._memory.pop(key, None)
        if held is not None:
            self.memory_used -= held.rec.nbytes
        if key in self._records and held is None:
            old = self.path_of(key)
            if old.parent != keep:
                self._drop_readers(key)
                old.unlink(missing_ok=True)
                self._spilled.discard(key)

    def _register(self, rec: DatasetRecord) -> DatasetRecord:
        self._drop_readers(rec.key)
        self._records[rec.key] = rec
        self._release(rec.key)
        for cb in self.listeners:
            cb(rec.key, rec)
        return rec

    def _release(self, key: str, reserved: int = 0) -> None:
        done = self._busy.pop(key, None)
        if done is not None:
            done.set()
        self.memory_used -= reserved

    def put_array(self, name: str, arr: Any, *, adopt: bool = False, **kw: Any
                  ) -> DatasetRecord:
        """Store a numpy array (chunk by chunk, yielding to other greenlets between chunks).

        ``adopt``: the caller hands ``arr`` over (nobody else holds it, e.g. an op's fresh
        output): a volatile part kept in memory then keeps ``arr``'s own bytes, made
        read-only, instead of a copy."""
        a = np.asarray(arr)
        writer = self.begin(name, a.shape, a.dtype, **kw)
        try:
            if adopt and isinstance(writer, MemoryWriter) and a.flags.owndata and (
                    a.flags.c_contiguous and a.flags.writeable and a.nbytes >= ADOPT_BYTES):
                writer.adopt(a)
                return writer.commit()
            for i in range(len(writer.chunking)):
                writer.write_chunk(i, np.ascontiguousarray(a[writer.chunking.slab(i)], a.dtype))
                if len(writer.chunking) > 1:
                    gevent.sleep(0)
            return writer.commit()
        except BaseException:
            writer.abort()
            raise

    # -- reading -------------------------------------------------------------
    def reader(self, key: str, version: int | None = None) -> DatasetReader | MemoryReader:
        """A (cached) chunk reader; ``version`` guards against reading a replaced dataset."""
        rec = self._records.get(key)
        if rec is None:
            raise DatasetNotFound(f"{key} is not stored on {self.owner}")
        if version is not None and version != rec.version:
            raise DatasetNotFound(
                f"{key} version {version} is gone from {self.owner} (now version {rec.version})"
            )
        held = self._memory.get(key)
        if held is not None:
            return held
        ck = (key, rec.version)
        r = self._readers.get(ck)
        if r is None:
            r = DatasetReader(self.path_of(key), rec)
            self._readers[ck] = r
            while len(self._readers) > 32:
                self._readers.popitem(last=False)[1].close()
        self._readers.move_to_end(ck)
        return r

    def read_array(self, name: str, part: int | None = None, verify: bool = True) -> Any:
        rec = self.get(name, part)
        r = self.reader(rec.key)
        out = np.empty(rec.shape, dtype=np.dtype(rec.dtype))
        flat = out.reshape(-1).view(np.uint8) if rec.nbytes else None
        digests = []
        for i in range(len(r)):
            buf, d = r.chunk(i)
            off, length = r.chunking.byte_range(i)
            assert flat is not None
            flat[off : off + length] = np.frombuffer(memoryview(buf).cast("B"), dtype=np.uint8)
            digests.append(chunk_digest(flat[off : off + length]) if verify else d)
        if verify and dataset_checksum(rec.shape, rec.dtype, rec.chunk_bytes, digests) != (
                rec.checksum):
            raise IntegrityError(
                f"{rec.key} on {self.owner} failed its checksum (disk corruption?)")
        return out

    def read_aux(self, key: str, version: int | None = None) -> dict[str, Any]:
        """The per-row arrays kept beside part ``key`` (empty when it has none: a replica,
        an intermediate, a plain dataset)."""
        rec = self._records.get(key)
        if rec is None or (version is not None and version != rec.version):
            raise DatasetNotFound(f"{key} (version {version}) is not stored on {self.owner}")
        if key in self._memory:
            return {}
        try:
            with h5py.File(self.path_of(key), "r") as f:
                grp = f.get(AUX_GROUP)
                if not isinstance(grp, h5py.Group):
                    return {}
                return {k: np.asarray(v[...]) for k, v in grp.items()
                        if isinstance(v, h5py.Dataset)}
        except (OSError, KeyError, ValueError) as exc:
            raise StoreError(f"cannot read the metadata of {key}: {exc}") from exc

    def iter_keys(self) -> Iterator[str]:
        return iter(list(self._records))

    def delete(self, name: str, part: int | None = None) -> DatasetRecord:
        rec = self.get(name, part)
        if rec.key in self._busy:
            raise DatasetExists(f"{rec.key} is being written right now")
        self._drop_readers(rec.key)
        held = self._memory.pop(rec.key, None)
        if held is not None:
            self.memory_used -= rec.nbytes
        else:
            try:
                self.path_of(rec.key).unlink()
                if rec.key in self._spilled:
                    self._spilled.discard(rec.key)
                else:
                    _fsync_dir(self.dir)
            except OSError as exc:
                raise StoreError(f"cannot delete {rec.key}: {exc}") from exc
        del self._records[rec.key]
        for cb in self.listeners:
            cb(rec.key, None)
        return rec

    def _drop_readers(self, key: str) -> None:
        for ck in [ck for ck in self._readers if ck[0] == key]:
            self._readers.pop(ck).close()

    def close(self) -> None:
        for r in self._readers.values():
            r.close()
        self._readers.clear()
        self._memory.clear()
        self.memory_used = 0
