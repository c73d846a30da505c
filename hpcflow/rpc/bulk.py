"""The bulk data path: dataset bytes in chunks over a dedicated ZeroMQ channel.

zerorpc cannot carry a message over ~100 MiB and is slow for bulk bytes, so
dataset contents never travel over RPC.  This is the ZeroMQ Guide's
file-transfer pattern (model 3): the client asks for chunks by index and
keeps at most ``window`` requests in flight — its credit — so memory stays
bounded however large the dataset is, and a lost or corrupted chunk is
simply asked for again.

Wire format: every message is ``[verb, msgpack header, (payload)]``; the
server's ROUTER adds the peer identity in front.

=========  ================================  ============================
client     header                            server replies
=========  ================================  ============================
``GET``    r, key, v (version), i, by        ``CHUNK`` r, i, d + payload frames
``RANGE``  r, key, v, o (offset), n, by,     ``CHUNK`` r, i=o, d + payload frames
           c (checksum, optional)
``PUT``    r, name, part, nparts, shape,     ``OK`` r, u
           dtype, chunk_bytes, overwrite,
           lineage, by, (aux + payload)
``DATA``   r, u, i, d + payload              ``ACK`` r, u, i / ``NACK``
``END``    r, u, checksum                    ``DONE`` r, record
``ABORT``  r, u                              (none)
=========  ================================  ============================

A payload (of ``CHUNK`` and ``DATA``) travels as frames of at most 1 MiB (``FRAME_BYTES``),
concatenated by position at the receiver: libzmq allocates each received frame
afresh, and 4 MiB allocations come from new pages the receiving I/O thread must
fault in, which cost half the throughput on loopback.  For the same reason both
ends keep glibc from trimming the heap under the frames (:mod:`.heap`).

A ``PUT`` may carry per-row arrays to keep beside the data (an H5MD element's step and
time): ``aux`` lists ``[key, dtype, entries]`` and the payload holds their bytes in that
order, one entry per row of the dataset.

Any request can be answered with ``ERR`` r, type, msg: the client raises the
same hpcflow error type.  A failed upload (bad header, disk full) always
removes its temp file before the error is sent.  ``d`` is the xxh3-64 digest of the payload; the
client also checks the whole-dataset checksum of the record at the end, so
corruption in flight (retried) and at rest (reported) are both caught.  A
``RANGE`` reply's digest is computed as it is sent, so the server first checks
the stored chunks the range touches against their stored digests (IntegrityError).

Both ends yield to the gevent hub after every message: a zmq.green receive
returns without yielding when a message is already queued, so a fast
transfer would otherwise starve the heartbeats for its whole duration.  A
receiver that hears nothing asks ``is_alive`` (the catalog's view) and gives
up at once on a holder the cluster has declared dead.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import random
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import gevent
import gevent.event
import gevent.lock
import numpy as np
import zmq.green as zmq

from ..catalog.chunking import Chunking, Payload, chunk_digest, dataset_checksum
from ..catalog.record import (
    DatasetRecord,
    key_of,
    layout_nbytes,
    validate_dtype,
    validate_flag,
    validate_nparts,
    validate_part,
    validate_shape,
)
from ..catalog.store import OFFLOAD_BYTES, Store, Writer
from ..errors import (
    DatasetChanged,
    HpcflowError,
    IntegrityError,
    InvalidData,
    Overloaded,
    PeerUnavailable,
    ProtocolError,
    StoreError,
    from_wire,
    to_wire,
)
from ..logutil import Throttled
from ..wire import pack, unpack_map
from .auth import role_of
from .heap import tune_heap
from .traffic import Traffic

log = logging.getLogger("hpcflow.bulk")

MAX_HEADER = 64 * 1024
MAX_RANGE = 64 * 1024 * 1024
#: Largest payload frame of a CHUNK or DATA message (see the module docstring).
FRAME_BYTES = 1024 * 1024
#: Payload frames one message may have (a 256 MiB chunk, the largest a store accepts).
MAX_FRAMES = 256
#: How often a silent transfer asks whether its peer has been declared dead.
LIVENESS_POLL_S = 0.25
Deliver = Callable[[int, int, Payload, int], None]
"""Called with (chunk index, byte offset in the dataset, payload, digest)."""

H = TypeVar("H")
R = TypeVar("R")


def _owner(holder: Any) -> str:
    return str(holder.owner)


def from_holders(holders: Iterable[H], fetch: Callable[[H, str | None], R],
                 endpoint_of: Callable[[str], str | None], *, what: str,
                 prefer: str | None = None, here: str | None = None, local: bool = False,
                 retry_on: tuple[type[Exception], ...] = (PeerUnavailable,),
                 owner: Callable[[H], str] = _owner) -> tuple[H, R]:
    """Fetch from the first of a dataset's holders that works: the one place that fails
    over across holders.  Returns the holder used and what ``fetch`` returned.

    Holders are tried in order: ``prefer`` (the source a plan chose) first, then
    ``here``'s own copy, then the others in the order given.  ``fetch(holder,
    endpoint)`` gets the holder's bulk endpoint (``endpoint_of(owner)``, asked just
    before the attempt); a holder without one (not alive) is skipped, except
    ``here``'s own copy with ``local=True``, which ``fetch`` reads locally (endpoint
    None).  A ``fetch`` failing with one of ``retry_on`` moves on to the next holder;
    when none is left, :class:`PeerUnavailable` says what each holder did.
    """
    ordered = sorted(holders, key=lambda h: (owner(h) != prefer, owner(h) != here))
    errors: list[str] = []
    for h in ordered:
        who = owner(h)
        endpoint = None if local and who == here else endpoint_of(who)
        if endpoint is None and not (local and who == here):
            errors.append(f"{who} is not alive")
            continue
        try:
            return h, fetch(h, endpoint)
        except retry_on as exc:
            errors.append(str(exc))
    raise PeerUnavailable(f"no holder of {what} answered: " + ("; ".join(errors) or "none"))



def _frames(buf: Any) -> list[memoryview]:
    """``buf``'s bytes as zero-copy views of at most ``FRAME_BYTES`` each."""
    mv = memoryview(buf).cast("B")
    if mv.nbytes <= FRAME_BYTES:
        return [mv]
    return [mv[o : o + FRAME_BYTES] for o in range(0, mv.nbytes, FRAME_BYTES)]


def _unpack_header(raw: bytes) -> dict[str, Any]:
    return unpack_map(raw, MAX_HEADER, "bulk header")


def _int(hdr: dict[str, Any], k: str) -> int:
    v = hdr.get(k)
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ProtocolError(f"bulk header field {k!r} must be a non-negative int")
    return v


def _str(hdr: dict[str, Any], k: str) -> str:
    v = hdr.get(k)
    if not isinstance(v, str) or len(v) > 256:
        raise ProtocolError(f"bulk header field {k!r} must be a string")
    return v


#: Per-row arrays a PUT may carry (H5MD step and time), and their bytes at most.
MAX_AUX = 4
MAX_AUX_BYTES = 256 * 1024 * 1024


def _aux(spec: Any, payload: Payload | None, shape: tuple[int, ...]
         ) -> dict[str, np.ndarray[Any, Any]] | None:
    """The per-row arrays of a PUT, checked against its header: at most ``MAX_AUX``,
    each 1-D numeric with one entry per row, filling the payload exactly."""
    if spec is None:
        if payload is not None:
            raise ProtocolError("PUT with a payload but no aux")
        return None
    if not isinstance(spec, list) or not 1 <= len(spec) <= MAX_AUX or payload is None:
        raise ProtocolError(f"PUT aux must list 1..{MAX_AUX} arrays and come with a payload")
    rows = shape[0] if shape else 1
    if payload.nbytes > MAX_AUX_BYTES:
        raise InvalidData(f"per-row arrays of {payload.nbytes} bytes: at most {MAX_AUX_BYTES}")
    data = b"".join(bytes(f) for f in payload.frames)
    out: dict[str, np.ndarray[Any, Any]] = {}
    pos = 0
    for item in spec:
        if (not isinstance(item, list) or len(item) != 3 or not isinstance(item[0], str)
                or not item[0].isidentifier() or len(item[0]) > 32 or item[0] in out):
            raise ProtocolError("PUT aux entries are [key, dtype, entries]")
        dt = validate_dtype(item[1])
        if item[2] != rows:
            raise InvalidData(f"per-row array {item[0]!r} has {item[2]!r} entries, the "
                              f"dataset {rows} rows")
        size = rows * dt.itemsize
        if pos + size > len(data):
            raise ProtocolError("PUT aux payload is shorter than its arrays")
        out[item[0]] = np.frombuffer(data, dtype=dt, count=rows, offset=pos).copy()
        pos += size
    if pos != len(data):
        raise ProtocolError("PUT aux payload is longer than its arrays")
    return out


@dataclass
class BulkSettings:
    window: int = 8
    timeout_s: float = 30.0
    retries: int = 3
    corrupt_chunks: int = 0  # fault injection for tests: corrupt the next N chunks sent
    #: Uploads open at once (each holds a file descriptor and a sparse temp file) in
    #: total and per connection (one client socket: a transfer uses its own).
    max_uploads: int = 128
    max_uploads_per_connection: int = 16
    #: Free disk space an upload may not claim: what open uploads have yet to write
    #: plus a new one must fit in the data directory's free space minus this.
    disk_reserve_bytes: int = 64 * 1024 * 1024


@dataclass
class _Upload:
    writer: Writer
    peer: str
    ident: bytes
    started: float
    #: Bytes the finished dataset will take, and payload bytes written so far.
    nbytes: int = 0
    received: int = 0


class BulkServer:
    """Serves chunk reads from the store and receives uploads into it."""

    def __init__(
        self,
        ctx: zmq.Context,
        store: Store,
        bind: str,
        traffic: Traffic,
        settings: BulkSettings,
        *,
        admit_put: Callable[[dict[str, Any]], None] = lambda hdr: None,
        on_commit: Callable[[DatasetRecord], None] = lambda rec: None,
    ) -> None:
        self.ctx, self.store, self.traffic, self.settings = ctx, store, traffic, settings
        self.admit_put, self.on_commit = admit_put, on_commit
        tune_heap()  # it receives uploads
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 512 * 1024 * 1024)
        self.sock.bind(bind)
        self.endpoint = self.sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self.uploads: dict[str, _Upload] = {}
        self._uploading = gevent.event.Event()  # set when an upload begins: see _reaper
        self.active = 0
        self.malformed = 0
        #: Uploads refused over a limit (count or disk space).
        self.refused = 0
        self.caller: str | None = None
        self._garbage_log = Throttled(log)
        self._greenlets: list[gevent.Greenlet] = []
        #: Uploads being committed, each in a greenlet of its own (see ``_end``); they
        #: count against the upload limits until they are done.
        self.committing: dict[str, _Upload] = {}
        self._commits: set[gevent.Greenlet] = set()
        #: The loop is the socket's one reader; it and the commits send, one at a time.
        self._send_lock = gevent.lock.Semaphore()
        #: Per part version served by RANGE: its chunks' byte offsets and the chunks
        #: already checked against their stored digests (see ``_check_at_rest``).
        self._checked: OrderedDict[tuple[str, int, str], tuple[np.ndarray[Any, Any], set[int]]]
        self._checked = OrderedDict()

    def start(self) -> None:
        self._greenlets = [gevent.spawn(self._loop), gevent.spawn(self._reaper)]

    def stop(self) -> None:
        gevent.killall([*self._greenlets, *self._commits])  # a killed commit aborts
        for up in list(self.uploads.values()):
            up.writer.abort()
        self.uploads.clear()
        self.sock.close(linger=0)

    def _loop(self) -> None:
        while True:
            gevent.sleep(0)  # recv does not yield when a message is queued
            frames = self.sock.recv_multipart(copy=False)
            ident = frames[0].bytes
            if len(frames) < 3 or len(frames) > 3 + MAX_FRAMES:
                self.malformed += 1
                continue
            hdr: dict[str, Any] = {}
            self.caller = role_of(frames[-1])  # ZAP's role for the sender (None: no keys)
            try:
                verb = frames[1].bytes
                hdr = _unpack_header(frames[2].bytes)
                self._dispatch(ident, verb, hdr,
                               Payload([f.buffer for f in frames[3:]]) if len(frames) > 3
                               else None)
            except ProtocolError as exc:
                self.malformed += 1
                self._garbage_log.warning("bulk: malformed request: %s", exc)
                self._error(ident, hdr, exc)
            except HpcflowError as exc:
                self._error(ident, hdr, exc)
            except Exception as exc:  # never let one bad request kill the server
                log.exception("bulk: unexpected error")
                self._error(ident, hdr, exc)

    def _send(self, frames: list[Any], copy: bool = True) -> None:
        with self._send_lock:
            self.sock.send_multipart(frames, copy=copy)

    def _error(self, ident: bytes, hdr: dict[str, Any], exc: BaseException) -> None:
        r = hdr.get("r") if isinstance(hdr.get("r"), int) else 0
        name, msg = to_wire(exc)
        self._send([ident, b"ERR", pack({"r": r, "type": name, "msg": msg})])

    def _dispatch(self, ident: bytes, verb: bytes, hdr: dict[str, Any],
                  payload: Payload | None) -> None:
        if verb == b"GET":
            self._get(ident, hdr)
        elif verb == b"RANGE":
            self._range(ident, hdr)
        elif verb == b"PUT":
            self._put(ident, hdr, payload)
        elif verb == b"DATA":
            if payload is None:
                raise ProtocolError("DATA without payload")
            self._data(ident, hdr, payload)
        elif verb == b"END":
            self._end(ident, hdr)
        elif verb == b"ABORT":
            u = _str(hdr, "u")
            up = self.uploads.get(u)
            if up is not None and up.ident == ident:  # only its own client may abort it
                del self.uploads[u]
                up.writer.abort()
        else:
            raise ProtocolError(f"unknown bulk verb {verb[:16]!r}")

    def _get(self, ident: bytes, hdr: dict[str, Any]) -> None:
        r, i, version = _int(hdr, "r"), _int(hdr, "i"), _int(hdr, "v")
        key, by = _str(hdr, "key"), _str(hdr, "by")
        reader = self.store.reader(key, version)
        if i >= len(reader):
            raise InvalidData(f"chunk {i} out of range for {key}")
        buf, digest = reader.chunk(i)
        if self.settings.corrupt_chunks > 0:
            self.settings.corrupt_chunks -= 1
            bad = np.array(memoryview(buf).cast("B"), dtype=np.uint8, copy=True)
            bad[0] ^= 0xFF
            buf = bad
            log.warning("bulk: fault injection corrupted chunk %d of %s", i, key)
        self._send(
            [ident, b"CHUNK", pack({"r": r, "i": i, "d": digest}), *_frames(buf)], copy=False
        )
        self.traffic.sent(by, memoryview(buf).nbytes)

    def _range(self, ident: bytes, hdr: dict[str, Any]) -> None:
        """Bytes of a row range: the digest is computed here, on the fly."""
        r, off, n, version = _int(hdr, "r"), _int(hdr, "o"), _int(hdr, "n"), _int(hdr, "v")
        key, by = _str(hdr, "key"), _str(hdr, "by")
        if n > MAX_RANGE:
            raise InvalidData(f"range requests are limited to {MAX_RANGE} bytes")
        reader = self.store.reader(key, version)
        if "c" in hdr and _str(hdr, "c") != reader.rec.checksum:
            # deleted and put again: the same version number, other bytes
            raise DatasetChanged(f"{key} version {version} on {self.store.owner} is not the "
                                 f"one asked for (checksum {reader.rec.checksum}, not "
                                 f"{_str(hdr, 'c')})")
        buf = reader.byte_range(off, n)
        self._check_at_rest(reader, off, n)
        self._send(
            [ident, b"CHUNK", pack({"r": r, "i": off, "d": chunk_digest(buf)}), *_frames(buf)],
            copy=False)
        self.traffic.sent(by, n)

    def _check_at_rest(self, reader: Any, off: int, n: int) -> None:
        """Check every stored chunk that bytes ``[off, off+n)`` touch against its stored
        digest, once per chunk of a part version: a range's digest is computed here on
        the fly, so without this a copy corrupted at rest would be served as good (a
        reader of part of a part cannot check the part's checksum).  IntegrityError,
        as a fetch of a corrupted copy gets."""
        rec = reader.rec
        if n == 0:
            return
        ck = (rec.key, rec.version, rec.checksum)
        entry = self._checked.get(ck)
        if entry is None:
            ch = reader.chunking
            starts = np.fromiter((ch.byte_range(i)[0] for i in range(len(ch))),
                                 dtype=np.int64, count=len(ch))
            entry = self._checked[ck] = (starts, set())
            while len(self._checked) > 256:
                self._checked.popitem(last=False)
        self._checked.move_to_end(ck)
        starts, done = entry
        first = int(np.searchsorted(starts, off, side="right")) - 1
        last = int(np.searchsorted(starts, off + n - 1, side="right")) - 1
        for i in range(first, last + 1):
            if i not in done:
                buf, digest = reader.chunk(i)
                # a big chunk (maybe read from disk) is hashed off the loop: heartbeats go on
                got = (chunk_digest(buf) if memoryview(buf).nbytes < OFFLOAD_BYTES else
                       gevent.get_hub().threadpool.apply(chunk_digest, (buf,)))
                if got != digest:
                    raise IntegrityError(
                        f"chunk {i} of {rec.key} on {self.store.owner} does not match its "
                        "stored digest: the stored copy is corrupted")
                done.add(i)

    def _put(self, ident: bytes, hdr: dict[str, Any], payload: Payload | None = None) -> None:
        r, by = _int(hdr, "r"), _str(hdr, "by")
        part = validate_part(hdr.get("part"))
        nparts = validate_nparts(hdr.get("nparts"), part)
        shape = validate_shape(hdr.get("shape"))
        dtype = validate_dtype(_str(hdr, "dtype"))
        lineage = hdr.get("lineage") or {}
        if not isinstance(lineage, dict):
            raise ProtocolError("lineage must be a map")
        overwrite = validate_flag(hdr.get("overwrite", False), "overwrite")
        nbytes = layout_nbytes(shape, dtype)
        aux = _aux(hdr.get("aux"), payload, shape)
        self._admit_upload(ident, nbytes)
        self.admit_put({**hdr, "part": part, "shape": list(shape), "dtype": dtype.str,
                        "role": self.caller})
        writer = self.store.begin(
            _str(hdr, "name"), shape, dtype,
            part=part, nparts=nparts, lineage=lineage,
            overwrite=overwrite, chunk_bytes=_int(hdr, "chunk_bytes"), aux=aux,
        )
        u = uuid.uuid4().hex
        self.uploads[u] = _Upload(writer, by, ident, time.monotonic(), nbytes)
        self._uploading.set()
        self._send([ident, b"OK", pack({"r": r, "u": u})])

    def _admit_upload(self, ident: bytes, nbytes: int) -> None:
        """Refuse, before any file is created, an upload over the limits: too many open
        (``Overloaded``), bigger than the free disk (``StoreError``), or not fitting
        beside what the open uploads have yet to write (``Overloaded``)."""
        st = self.settings
        open_ = [*self.uploads.values(), *self.committing.values()]
        mine = sum(1 for up in open_ if up.ident == ident)
        if mine >= st.max_uploads_per_connection or len(open_) >= st.max_uploads:
            self.refused += 1
            raise Overloaded(f"{len(open_)} uploads are open ({mine} on this "
                             f"connection; limits {st.max_uploads_per_connection} and "
                             f"{st.max_uploads}): retry later")
        try:
            vfs = os.statvfs(self.store.dir)
        except OSError as exc:
            raise StoreError(f"cannot tell the free space of {self.store.dir}: {exc}") from exc
        free = vfs.f_bavail * vfs.f_frsize - st.disk_reserve_bytes
        claimed = sum(max(0, up.nbytes - up.received) for up in self.uploads.values())
        if nbytes > free:
            self.refused += 1
            raise StoreError(f"an upload of {nbytes} bytes does not fit in the "
                             f"{max(0, free)} bytes free on {self.store.owner}")
        if claimed + nbytes > free:
            self.refused += 1
            raise Overloaded(f"{len(self.uploads)} open uploads still claim {claimed} of the "
                             f"{free} bytes free on {self.store.owner}: an upload of {nbytes} "
                             "bytes does not fit beside them: retry later")

    def _upload(self, ident: bytes, hdr: dict[str, Any]) -> tuple[str, _Upload]:
        u = _str(hdr, "u")
        up = self.uploads.get(u)
        if up is None or up.ident != ident:
            raise ProtocolError(f"unknown upload {u[:40]!r} (timed out or never started)")
        return u, up

    def _data(self, ident: bytes, hdr: dict[str, Any], payload: Payload) -> None:
        r, i, d = _int(hdr, "r"), _int(hdr, "i"), _int(hdr, "d")
        u, up = self._upload(ident, hdr)
        self.traffic.received(up.peer, payload.nbytes)
        try:
            up.writer.write_chunk(i, payload, d)
            up.received += payload.nbytes
        except IntegrityError as exc:
            self._send([ident, b"NACK", pack({"r": r, "u": u, "i": i, "why": str(exc)})])
            return
        except BaseException:  # disk full, bad chunk index ...: the upload is over
            self.uploads.pop(u, None)
            up.writer.abort()
            raise
        self._send([ident, b"ACK", pack({"r": r, "u": u, "i": i})])

    def _end(self, ident: bytes, hdr: dict[str, Any]) -> None:
        """Commit in a greenlet of its own: the store waits there for the put's claim (a
        round trip to each of the name's arbiters; for one that does not answer, up to
        ``rpc_timeout_s``) and for fsync, and the channel serves everyone else meanwhile."""
        r = _int(hdr, "r")
        u, up = self._upload(ident, hdr)
        del self.uploads[u]
        try:
            checksum = _str(hdr, "checksum")
        except BaseException:
            up.writer.abort()
            raise
        self.committing[u] = up
        g = gevent.spawn(self._commit, ident, r, u, up, checksum)
        self._commits.add(g)
        g.link(self._commits.discard)

    def _commit(self, ident: bytes, r: int, u: str, up: _Upload, checksum: str) -> None:
        try:
            try:
                rec = up.writer.commit(checksum)
            except BaseException:
                up.writer.abort()
                raise
            self.on_commit(rec)
        except HpcflowError as exc:
            self._error(ident, {"r": r}, exc)
            return
        except Exception as exc:  # as in the loop: an unexpected error is still answered
            log.exception("bulk: unexpected error")
            self._error(ident, {"r": r}, exc)
            return
        finally:
            self.committing.pop(u, None)
        self._send([ident, b"DONE", pack({"r": r, "record": rec.to_wire()})])

    def _reaper(self) -> None:
        """Abandoned uploads (dead or silent client) are dropped, temp file and all.
        Asleep while there are none (its wake-up every second was one of an idle
        node's few)."""
        while True:
            if not self.uploads:
                self._uploading.clear()
                self._uploading.wait()
            gevent.sleep(min(1.0, self.settings.timeout_s / 4))
            now = time.monotonic()
            for u, up in list(self.uploads.items()):
                if now - up.writer.last_activity > self.settings.timeout_s:
                    log.warning("bulk: upload of %s from %s idle for %.0f s: discarded",
                                up.writer.proto.key, up.peer, now - up.writer.last_activity)
                    self.uploads.pop(u, None)
                    up.writer.abort()


#: Idle DEALER sockets a client keeps per bulk endpoint, and endpoints at most, for the
#: next pull: a connect (and with keys a CURVE handshake) costs more than a small pull.
IDLE_PER_ENDPOINT = 2
IDLE_ENDPOINTS = 64


class BulkClient:
    """Fetches and uploads datasets over a peer's bulk endpoint.

    Each transfer has its own DEALER socket, owned by the calling greenlet for the
    transfer's lifetime.  A pull that ended with every request answered exactly once
    (nothing re-sent, so no reply can still be on its way) hands its socket back for
    a later pull from the same endpoint; any other ends by closing it.  Kept sockets
    close with the context (their owners destroy it with ``linger=0``).
    """

    def __init__(self, ctx: zmq.Context, traffic: Traffic, me: str,
                 settings: BulkSettings | None = None,
                 is_alive: Callable[[str], bool] = lambda peer: True) -> None:
        self.ctx, self.traffic, self.me = ctx, traffic, me
        self.settings = settings or BulkSettings()
        tune_heap()  # see heap.py: a third of a fetch's throughput on 2 cores
        #: Asked (only while a transfer hears nothing) whether the cluster still
        #: believes ``peer`` alive; False ends the transfer with PeerUnavailable.
        self.is_alive = is_alive
        self._idle: OrderedDict[str, list[zmq.Socket]] = OrderedDict()

    def _socket(self, endpoint: str, reuse: bool = False) -> zmq.Socket:
        idle = self._idle.get(endpoint) if reuse else None
        if idle:
            s = idle.pop()
            if not idle:
                del self._idle[endpoint]
            return s
        s = self.ctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(endpoint)
        self.traffic.bulk_sockets += 1
        return s

    def _keep(self, endpoint: str, s: zmq.Socket) -> None:
        """Keep ``s`` (no reply outstanding on it) for the next pull from ``endpoint``."""
        idle = self._idle.setdefault(endpoint, [])
        self._idle.move_to_end(endpoint)
        if len(idle) >= IDLE_PER_ENDPOINT:
            s.close(linger=0)
        else:
            idle.append(s)
        while len(self._idle) > IDLE_ENDPOINTS:
            for old in self._idle.popitem(last=False)[1]:
                old.close(linger=0)

    def _recv(self, s: zmq.Socket, peer: str, what: str,
              timeout: float | None = None) -> tuple[bytes, dict[str, Any], list[Any]]:
        timeout = self.settings.timeout_s if timeout is None else timeout
        exc = PeerUnavailable(f"{peer} did not answer within {timeout:g} s during {what}")
        with gevent.Timeout(timeout, exc):
            frames = s.recv_multipart(copy=False)
        if len(frames) < 2:
            raise ProtocolError(f"short bulk reply from {peer}")
        hdr = _unpack_header(frames[1].bytes)
        verb = frames[0].bytes
        if verb == b"ERR":
            raise from_wire(hdr.get("type"), hdr.get("msg"))
        return verb, hdr, frames[2:]

    def _pull(self, endpoint: str, peer: str, what: str, keys: list[int],
              request: Callable[[int], tuple[bytes, dict[str, Any]]],
              length: Callable[[int], int],
              deliver: Callable[[int, Payload, int], None]) -> None:
        """The credit window: keep ``window`` requests in flight, verify each reply's
        digest (asking again up to ``retries`` times), and after a silent third of the
        timeout re-send what is outstanding (a holder restarted behind the same endpoint
        loses requests in flight) before declaring the peer gone.  While silent, give up
        as soon as the catalog declares the peer dead (no need to wait out the timeout)."""
        window, r = max(1, self.settings.window), random.getrandbits(62)
        timeout = self.settings.timeout_s
        attempts: dict[int, int] = {}
        next_k = done = 0
        heard = resent = time.monotonic()
        asked = 0
        s = self._socket(endpoint, reuse=True)
        try:
            def ask(key: int) -> None:
                nonlocal asked
                asked += 1
                verb, hdr = request(key)
                s.send_multipart([verb, pack({"r": r, **hdr})])

            while done < len(keys):
                while next_k < len(keys) and len(attempts) < window:
                    attempts[keys[next_k]] = 0
                    ask(keys[next_k])
                    next_k += 1
                try:
                    verb, hdr, payload = self._recv(s, peer, what,
                                                    min(LIVENESS_POLL_S, timeout / 3))
                except PeerUnavailable:
                    now = time.monotonic()
                    if not self.is_alive(peer):
                        raise PeerUnavailable(
                            f"{peer} was declared dead during {what} ({done}/{len(keys)} "
                            "chunks)") from None
                    if now - heard >= timeout:
                        raise PeerUnavailable(
                            f"{peer} stopped answering during {what} ({done}/{len(keys)} "
                            f"chunks after {timeout:g} s)") from None
                    if now - resent >= timeout / 3:
                        resent = now
                        for key in attempts:
                            ask(key)
                    continue
                heard = resent = time.monotonic()
                if verb != b"CHUNK" or hdr.get("r") != r or not payload:
                    continue
                key = _int(hdr, "i")
                if key not in attempts:
                    continue  # a late duplicate of a retried request
                buf = Payload([f.buffer for f in payload])
                digest = buf.digest()
                if buf.nbytes != length(key) or digest != hdr.get("d"):
                    self.traffic.chunk_retries += 1
                    attempts[key] += 1
                    if attempts[key] > self.settings.retries:
                        raise IntegrityError(
                            f"chunk at {key} of {what} from {peer} failed verification "
                            f"{attempts[key]} times: the copy on {peer} may be corrupted")
                    log.warning("bulk: chunk at %d of %s from %s corrupted: retrying", key,
                                what, peer)
                    ask(key)
                    continue
                deliver(key, buf, digest)
                self.traffic.received(peer, buf.nbytes)
                del attempts[key]
                done += 1
                gevent.sleep(0)  # a queued reply is received without yielding
        except BaseException:
            s.close(linger=0)
            raise
        if asked == len(keys):  # each request answered once: nothing more can arrive
            self._keep(endpoint, s)
        else:
            s.close(linger=0)

    def fetch(self, endpoint: str, peer: str, rec: DatasetRecord, deliver: Deliver) -> int:
        """Pull every chunk of ``rec`` from ``peer``; returns the bytes received.

        Chunks are verified against their digest on arrival and the whole against
        the record's checksum at the end (which catches corruption at rest).
        """
        ch = Chunking(rec.shape, np.dtype(rec.dtype).itemsize, rec.chunk_bytes)
        digests: list[int] = [0] * len(ch)
        started = time.monotonic()

        def request(i: int) -> tuple[bytes, dict[str, Any]]:
            return b"GET", {"key": rec.key, "v": rec.version, "i": i, "by": self.me}

        def arrived(i: int, buf: Payload, digest: int) -> None:
            deliver(i, ch.byte_range(i)[0], buf, digest)
            digests[i] = digest

        self._pull(endpoint, peer, f"the fetch of {rec.key}", list(range(len(ch))), request,
                   lambda i: ch.byte_range(i)[1], arrived)
        self.traffic.observe(peer, rec.nbytes, time.monotonic() - started)
        if dataset_checksum(rec.shape, rec.dtype, rec.chunk_bytes, digests) != rec.checksum:
            raise IntegrityError(
                f"{rec.key} from {peer} does not match its catalog checksum: the stored copy "
                "is corrupted")
        return rec.nbytes

    def fetch_range(self, endpoint: str, peer: str, rec: DatasetRecord, off: int, length: int,
                    deliver: Deliver, piece: int) -> int:
        """Pull bytes ``[off, off+length)`` of ``rec`` in pieces of ``piece`` bytes.

        Each piece is digest-checked (and retried); there is no whole-dataset
        checksum for a range.  ``deliver`` gets offsets relative to ``off``.
        """
        piece = max(1, min(piece, MAX_RANGE))
        starts = list(range(off, off + length, piece))

        def size(o: int) -> int:
            return min(piece, off + length - o)

        def request(o: int) -> tuple[bytes, dict[str, Any]]:
            return b"RANGE", {"key": rec.key, "v": rec.version, "o": o, "n": size(o),
                              "by": self.me}

        self._pull(endpoint, peer, f"rows of {rec.key}", starts, request, size,
                   lambda o, buf, d: deliver((o - off) // piece, o - off, buf, d))
        return length

    def fetch_ranges(self, endpoint: str, peer: str, rec: DatasetRecord,
                     ranges: list[tuple[int, int]], deliver: Callable[[int, Payload], None],
                     piece: int) -> int:
        """Pull several byte ranges ``(offset, length)`` of ``rec`` (disjoint, each cut in
        pieces of at most ``piece`` bytes) over one socket and one credit window;
        ``deliver(offset, payload)`` gets each piece with its offset in the part.

        Each piece is digest-checked (and retried); the holder refuses with
        :class:`DatasetChanged` when its copy is not ``rec`` (version and checksum), so
        bytes of another version are never delivered.  Returns the bytes received."""
        piece = max(1, min(piece, MAX_RANGE))
        sizes: dict[int, int] = {}
        for off, length in ranges:
            for o in range(off, off + length, piece):
                sizes[o] = min(piece, off + length - o)

        def request(o: int) -> tuple[bytes, dict[str, Any]]:
            return b"RANGE", {"key": rec.key, "v": rec.version, "c": rec.checksum, "o": o,
                              "n": sizes[o], "by": self.me}

        self._pull(endpoint, peer, f"rows of {rec.key}", list(sizes), request, sizes.__getitem__,
                   lambda o, buf, d: deliver(o, buf))
        return sum(sizes.values())

    def upload(
        self,
        endpoint: str,
        peer: str,
        name: str,
        shape: tuple[int, ...],
        dtype: np.dtype[Any],
        read: Callable[[tuple[int | slice, ...]], Any],
        *,
        part: int | None = None,
        nparts: int | None = None,
        overwrite: bool = False,
        lineage: dict[str, Any] | None = None,
        chunk_bytes: int,
        progress: Callable[[int, int], None] | None = None,
        aux: dict[str, np.ndarray[Any, Any]] | None = None,
    ) -> DatasetRecord:
        """Push a dataset chunk by chunk; ``read(slab)`` returns the array for one chunk.
        ``progress(done_bytes, total_bytes)`` is called as chunks are acknowledged.
        ``aux``: per-row arrays kept beside the data (sent with the ``PUT``)."""
        ch = Chunking(tuple(shape), dtype.itemsize, chunk_bytes)
        total, done = math.prod(shape) * dtype.itemsize, 0
        n, window, r = len(ch), max(1, self.settings.window), random.getrandbits(62)
        s = self._socket(endpoint)
        what = f"upload of {key_of(name, part)}"
        u = ""
        try:
            items = [(k, np.ascontiguousarray(a)) for k, a in (aux or {}).items()]
            head = {"r": r, "name": name, "part": part, "nparts": nparts, "shape": list(shape),
                    "dtype": dtype.str, "chunk_bytes": chunk_bytes, "overwrite": overwrite,
                    "lineage": lineage or {}, "by": self.me}
            if items:
                head["aux"] = [[k, a.dtype.str, int(a.size)] for k, a in items]
            blob = b"".join(a.tobytes() for _, a in items)
            s.send_multipart([b"PUT", pack(head), *(_frames(blob) if blob else [])])
            _, hdr, _ = self._recv(s, peer, what)
            u = _str(hdr, "u")
            inflight: dict[int, tuple[Any, int, int]] = {}
            digests: list[int] = [0] * n
            next_i = acked = 0

            def send(i: int) -> None:
                buf, d, _ = inflight[i]
                s.send_multipart([b"DATA", pack({"r": r, "u": u, "i": i, "d": d}),
                                  *_frames(buf)], copy=False)
                self.traffic.sent(peer, memoryview(buf).nbytes)

            while acked < n:
                while next_i < n and len(inflight) < window:
                    buf = np.ascontiguousarray(read(ch.slab(next_i)), dtype=dtype)
                    if buf.nbytes != ch.byte_range(next_i)[1]:
                        raise InvalidData(f"source chunk {next_i} has the wrong size")
                    digests[next_i] = chunk_digest(buf)
                    inflight[next_i] = (buf, digests[next_i], 0)
                    send(next_i)
                    next_i += 1
                verb, hdr, _ = self._recv(s, peer, what)
                i = _int(hdr, "i")
                if i not in inflight or hdr.get("u") != u:
                    continue
                if verb == b"NACK":
                    buf, d, tries = inflight[i]
                    if tries >= self.settings.retries:
                        raise IntegrityError(f"chunk {i} of {what} rejected {tries + 1} times")
                    self.traffic.chunk_retries += 1
                    inflight[i] = (buf, d, tries + 1)
                    send(i)
                    continue
                del inflight[i]
                acked += 1
                done += ch.byte_range(i)[1]
                if progress is not None:
                    progress(done, total)
                gevent.sleep(0)
            checksum = dataset_checksum(tuple(shape), dtype.str, chunk_bytes, digests)
            s.send_multipart([b"END", pack({"r": r, "u": u, "checksum": checksum})])
            _, hdr, _ = self._recv(s, peer, what)
            u = ""
            return DatasetRecord.from_wire(hdr.get("record"))
        finally:
            if u:  # tell the server to drop the temp file now rather than at its timeout
                with contextlib.suppress(zmq.ZMQError):
                    s.send_multipart([b"ABORT", pack({"r": r, "u": u})])
            s.close(linger=0 if not u else 100)
