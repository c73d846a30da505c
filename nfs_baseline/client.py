"""NFSv3 client for the NFS baseline, counting the bytes that cross NFS.

Uses the userspace ``libnfs`` Python binding (no kernel mount needed, works
as any user and inside network namespaces).  We call the low-level SWIG
functions rather than libnfs' ``NFS``/``NFSFH`` wrappers because those ignore
the return codes of read/write/mount (short transfers and errors would pass
silently) and read whole files into memory.

Arrays are stored in NumPy's ``.npy`` format: a small self-describing header
followed by the raw data, so they can be streamed in fixed-size chunks with
``pread``/``pwrite`` (bounded memory) and every file byte crosses NFS exactly
once, which keeps the byte counters exact.  HDF5 is deliberately not used:
h5py over a file-like NFS object issues many small, layout-dependent reads
that would make the counted traffic depend on HDF5 internals rather than on
the dataset size.

Counters: ``bytes_read``/``bytes_written`` are the file-content bytes moved by
NFS READ/WRITE calls (RPC/TCP framing and metadata calls excluded); ``ops``
counts calls of the public data/metadata methods.  A client is bound to one
mount and is not thread-safe (libnfs contexts are not); use one per thread.
"""

from __future__ import annotations

import errno
import io
import os
import warnings
from collections.abc import Iterator
from types import TracebackType
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from nfs_baseline.server import NfsUnavailable

LIBNFS_ERROR: str | None = None
"""Why ``libnfs`` cannot be used (None if it can); see ``available()``."""
try:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # its SWIG loader uses `imp`
        import libnfs
except ImportError as exc:
    libnfs = None
    LIBNFS_ERROR = (f"python module 'libnfs' cannot be imported ({exc}); "
                    "apt-get install libnfs-dev gcc python3-dev && pip install libnfs")

__all__ = ["CHUNK_BYTES", "LIBNFS_ERROR", "NfsClient"]

CHUNK_BYTES = 4 << 20
"""Bytes per READ/WRITE call issued by this client (and peak buffer size)."""

_Order = Literal["C", "F"]


class NfsClient:
    """A mounted NFSv3 export.  Paths are relative to the export root.

    *url_base* is a libnfs URL of the export, e.g. ``GaneshaServer.url`` or
    ``nfs://10.0.0.1/srv/export?nfsport=2049&mountport=20048``.
    """

    def __init__(self, url_base: str) -> None:
        if LIBNFS_ERROR is not None:
            raise NfsUnavailable(LIBNFS_ERROR)
        if "version=4" in url_base:
            raise ValueError("NfsClient speaks NFSv3 (libnfs 4.0 NFSv4 writes > 4 KiB fail)")
        self.url_base = url_base
        self.bytes_read = 0
        self.bytes_written = 0
        self.ops = 0
        self._ctx: Any = libnfs.nfs_init_context()
        self._url: Any = libnfs.nfs_parse_url_dir(self._ctx, url_base)
        if self._url is None:
            message = libnfs.nfs_get_error(self._ctx)
            libnfs.nfs_destroy_context(self._ctx)
            raise ValueError(f"bad NFS URL {url_base!r}: {message}")
        try:
            self._check(libnfs.nfs_mount(self._ctx, self._url.server, self._url.path),
                        f"mount {url_base}")
        except BaseException:
            self.close()
            raise

    # -- lifecycle ----------------------------------------------------------

    def close(self) -> None:
        """Drop the mount and the libnfs context.  Idempotent."""
        if self._ctx is not None:
            libnfs.nfs_destroy_url(self._url)
            libnfs.nfs_destroy_context(self._ctx)
            self._ctx = self._url = None

    def __enter__(self) -> NfsClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # -- arrays -------------------------------------------------------------

    def write_array(self, relpath: str, array: npt.ArrayLike) -> int:
        """Store *array* as ``.npy`` at *relpath*; returns the file size."""
        arr = np.asarray(array)
        if arr.dtype.hasobject:
            raise TypeError("object arrays cannot be stored without pickling")
        header = np.lib.format.header_data_from_array_1_0(arr)
        head = io.BytesIO()
        try:
            np.lib.format.write_array_header_1_0(head, header)
        except ValueError:  # header longer than 64 KiB: needs format 2.0
            head = io.BytesIO()
            np.lib.format.write_array_header_2_0(head, header)
        order: _Order = "F" if header["fortran_order"] else "C"
        return self._write(relpath, _chain(head.getvalue(), _array_chunks(arr, order)))

    def read_array(self, relpath: str) -> np.ndarray[Any, Any]:
        """Load a ``.npy`` file written by :meth:`write_array` (or numpy)."""
        self.ops += 1
        with self._open(relpath, os.O_RDONLY) as fh:
            size = self._fstat_size(fh)
            prefix = bytearray(min(size, CHUNK_BYTES))
            self._pread_into(fh, 0, memoryview(prefix))
            stream = io.BytesIO(prefix)
            try:
                version = np.lib.format.read_magic(stream)  # ValueError if too short
                if version not in ((1, 0), (2, 0)):
                    raise ValueError(f"unsupported .npy version {version}")
                reader = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                          else np.lib.format.read_array_header_2_0)
                shape, fortran, dtype = reader(stream)
            except ValueError as exc:
                raise ValueError(f"{relpath}: not a .npy file ({exc})") from exc
            if dtype.hasobject:
                raise TypeError(f"{relpath}: object arrays are not supported")
            start = stream.tell()
            order: _Order = "F" if fortran else "C"
            out = np.empty(shape, dtype=dtype, order=order)
            if start + out.nbytes != size:
                raise ValueError(f"{relpath}: size {size} != header {start} + data {out.nbytes}")
            dest = _byte_view(out, order)
            have = len(prefix) - start
            dest[:have] = prefix[start:]
            del prefix, stream
            self._pread_into(fh, start + have, dest[have:])
        return out

    # -- bytes --------------------------------------------------------------

    def write_bytes(self, relpath: str, data: bytes | bytearray | memoryview) -> int:
        """Create/truncate *relpath* with *data*; returns the number of bytes."""
        return self._write(relpath, iter([memoryview(data).cast("B")]))

    def read_bytes(self, relpath: str) -> bytes:
        """Return the whole content of *relpath*."""
        self.ops += 1
        with self._open(relpath, os.O_RDONLY) as fh:
            buf = bytearray(self._fstat_size(fh))
            self._pread_into(fh, 0, memoryview(buf))
        return bytes(buf)

    # -- namespace ----------------------------------------------------------

    def exists(self, relpath: str) -> bool:
        self.ops += 1
        rc = libnfs.nfs_stat64(self._live, _abs(relpath), libnfs.nfs_stat_64())
        if rc == -errno.ENOENT:
            return False
        self._check(rc, f"stat {relpath}")
        return True

    def remove(self, relpath: str) -> None:
        """Delete a file (FileNotFoundError if it does not exist)."""
        self.ops += 1
        self._check(libnfs.nfs_unlink(self._live, _abs(relpath)), f"remove {relpath}")

    def makedirs(self, relpath: str) -> None:
        """Create *relpath* and missing parents, like ``os.makedirs(exist_ok=True)``."""
        self.ops += 1
        path = ""
        for part in _abs(relpath).strip("/").split("/"):
            path += "/" + part
            rc = libnfs.nfs_mkdir(self._live, path)
            if rc != -errno.EEXIST:
                self._check(rc, f"mkdir {path}")

    def listdir(self, relpath: str = "") -> list[str]:
        """Sorted entry names of a directory, without ``.`` and ``..``."""
        self.ops += 1
        handle = libnfs.new_NFSDirHandle()
        self._check(libnfs.nfs_opendir(self._live, _abs(relpath), handle), f"listdir {relpath}")
        dirh = libnfs.NFSDirHandle_value(handle)
        names: list[str] = []
        try:
            while (entry := libnfs.nfs_readdir(self._live, dirh)) is not None:
                if entry.name not in (".", ".."):
                    names.append(entry.name)
        finally:
            libnfs.nfs_closedir(self._live, dirh)
        return sorted(names)

    # -- internals ----------------------------------------------------------

    def _check(self, rc: int, what: str) -> int:
        """Raise OSError for a negative libnfs return code (-errno).

        ``OSError(errno, ...)`` becomes the matching subclass, so callers can
        catch e.g. FileNotFoundError as with local files.
        """
        if rc < 0:
            code = -rc
            raise OSError(code, f"{what}: {libnfs.nfs_get_error(self._live) or os.strerror(code)}")
        return rc

    @property
    def _live(self) -> Any:
        """The libnfs context; refuses use after close (NULL would crash libnfs)."""
        if self._ctx is None:
            raise ValueError("NfsClient is closed")
        return self._ctx

    def _open(self, relpath: str, flags: int) -> _Handle:
        handle = libnfs.new_NFSFileHandle()
        if flags & os.O_CREAT:
            rc = libnfs.nfs_create(self._live, _abs(relpath), flags, 0o644, handle)
        else:
            rc = libnfs.nfs_open(self._live, _abs(relpath), flags, handle)
        self._check(rc, f"open {relpath}")
        return _Handle(self, libnfs.NFSFileHandle_value(handle))

    def _fstat_size(self, fh: _Handle) -> int:
        st = libnfs.nfs_stat_64()
        self._check(libnfs.nfs_fstat64(self._live, fh.raw, st), "fstat")
        return int(st.nfs_size)

    def _pread_into(self, fh: _Handle, offset: int, dest: memoryview) -> None:
        """Fill *dest* from *offset*, CHUNK_BYTES per call; EOF is an error."""
        done = 0
        while done < len(dest):
            want = min(CHUNK_BYTES, len(dest) - done)
            got = self._check(libnfs.nfs_pread(self._live, fh.raw, offset + done, want,
                                               dest[done:done + want]), "read")
            if got == 0:
                raise OSError(errno.EIO, f"unexpected EOF at offset {offset + done}")
            done += got
            self.bytes_read += got

    def _write(self, relpath: str, chunks: Iterator[memoryview]) -> int:
        """Write *chunks* to a fresh *relpath*, then COMMIT (close-to-open
        consistency, as a kernel NFS client flushes on close)."""
        self.ops += 1
        staging: bytearray | None = None
        offset = 0
        with self._open(relpath, os.O_WRONLY | os.O_CREAT | os.O_TRUNC) as fh:
            for chunk in chunks:
                for start in range(0, len(chunk), CHUNK_BYTES):
                    piece = chunk[start:start + CHUNK_BYTES]
                    if piece.readonly:  # the binding only accepts writable buffers
                        staging = staging or bytearray(CHUNK_BYTES)
                        memoryview(staging)[:len(piece)] = piece
                        piece = memoryview(staging)[:len(piece)]
                    sent = 0
                    while sent < len(piece):
                        rc = libnfs.nfs_pwrite(self._live, fh.raw, offset, len(piece) - sent,
                                               piece[sent:])
                        n = self._check(rc, f"write {relpath}")
                        if n == 0:
                            raise OSError(errno.EIO, f"write {relpath}: no progress")
                        sent += n
                        offset += n
                        self.bytes_written += n
            self._check(libnfs.nfs_fsync(self._live, fh.raw), f"commit {relpath}")
        return offset


class _Handle:
    """An open libnfs file handle that is closed on leaving the ``with``."""

    def __init__(self, client: NfsClient, raw: Any) -> None:
        self.client = client
        self.raw = raw

    def __enter__(self) -> _Handle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        rc = libnfs.nfs_close(self.client._live, self.raw)
        if exc_type is None:
            self.client._check(rc, "close")


def _abs(relpath: str) -> str:
    """Export-relative path as libnfs wants it; refuses to climb out."""
    parts = [p for p in relpath.replace(os.sep, "/").split("/") if p not in ("", ".")]
    if ".." in parts:
        raise ValueError(f"'..' not allowed in {relpath!r}")
    return "/" + "/".join(parts)


def _chain(head: bytes, rest: Iterator[memoryview]) -> Iterator[memoryview]:
    yield memoryview(head)
    yield from rest


def _array_chunks(arr: np.ndarray[Any, Any], order: _Order) -> Iterator[memoryview]:
    """Raw bytes of *arr* in *order*, at most ~CHUNK_BYTES at a time.

    Contiguous arrays are sliced without copying; others go through a
    buffered ``nditer`` (as ``numpy.save`` does) so memory stays bounded.
    """
    if arr.size == 0:
        return
    if arr.flags.c_contiguous if order == "C" else arr.flags.f_contiguous:
        yield _byte_view(arr, order)
        return
    it = np.nditer(arr, flags=["external_loop", "buffered", "zerosize_ok"],
                   buffersize=max(CHUNK_BYTES // arr.itemsize, 1), order=order)
    for block in it:
        yield _byte_view(np.ascontiguousarray(block), "C")


def _byte_view(arr: np.ndarray[Any, Any], order: _Order) -> memoryview:
    """Flat byte view of a contiguous array without copying.

    Goes through ``view(uint8)`` because the buffer protocol cannot export some
    dtypes (e.g. datetime64) directly.
    """
    return arr.reshape(-1, order=order).view(np.uint8).data
