"""A node's dataset operations: put, delete, pull from a dataset's holders, gather, replicate.

Local reads come from the store; anything held elsewhere comes over the bulk
channel from a live holder (failing over to the others, see
:func:`~hpcflow.rpc.bulk.from_holders`).  New datasets follow the put rules
of :mod:`.puts`.
"""

from __future__ import annotations

from typing import Any

import gevent
import numpy as np

from ..catalog.base import PartLocation
from ..catalog.chunking import Payload
from ..catalog.record import DatasetRecord, key_of, validate_nparts, validate_part
from ..errors import DatasetNotFound, NotOwner
from ..rpc.bulk import from_holders
from .claims import Claims
from .h5mdmeta import copy_axes
from .parts import NodeParts
from .puts import admit_put, check_put
from .stream import Feed


class Datasets:
    """The dataset operations of the node ``node`` (its store, catalog and bulk client)."""

    def __init__(self, node: NodeParts) -> None:
        self.node = node
        self.claims = Claims(node)

    def admit_put(self, hdr: dict[str, Any]) -> None:
        """Cluster-wide rules a new dataset (part) must follow, checked against the catalog;
        then the name is claimed from its arbiters while the bytes arrive."""
        name, part, shape, dtype = admit_put(self.node.catalog, self.node.name, hdr)
        self.claims.open(name, part, shape, dtype)

    def put_array(self, name: str, arr: Any, *, part: int | None = None,
                  nparts: int | None = None, overwrite: bool = False,
                  lineage: dict[str, Any] | None = None) -> DatasetRecord:
        """Store ``arr`` here under a user's name, following the put rules and claims."""
        node = self.node
        validate_nparts(nparts, validate_part(part))
        check_put(node.catalog, node.name, name, part, tuple(arr.shape), arr.dtype.str)
        claim = self.claims.open(name, part, tuple(arr.shape), arr.dtype.str)
        try:
            return node.store.put_array(name, arr, part=part, nparts=nparts,
                                        overwrite=overwrite, lineage=lineage,
                                        chunk_bytes=node.config.chunk_bytes)
        finally:
            self.claims.drop(claim)  # stored and announced, or failed: either way over

    def delete(self, name: str, part: int | None) -> DatasetRecord:
        node = self.node
        try:
            return node.store.delete(name, part)
        except DatasetNotFound:
            recs = node.catalog.records_named(name, include_dead=True)
            split = sorted({r.owner for r in recs if r.part is not None})
            if part is None and split:
                nparts = len({r.part for r in recs if r.part is not None})
                raise NotOwner(f"{name} is split over {', '.join(split)} ({nparts} parts): "
                               "use --all-parts (delete(name, all_parts=True)), or --part K "
                               "on each holder") from None
            holders = sorted({r.owner for r in node.catalog.records_named(name)
                              if part is None or r.part == part})
            if holders:
                raise NotOwner(f"{key_of(name, part)} is held by {', '.join(holders)}, not "
                               f"{node.name}: delete it there") from None
            raise

    def pull(self, rec: DatasetRecord, endpoint: str | None, deliver: Any) -> None:
        """Deliver every chunk of ``rec``: from the local store (our own copy), or over
        the bulk path from ``endpoint``."""
        node = self.node
        if rec.owner == node.name:
            reader = node.store.reader(rec.key, rec.version)
            for i in range(len(reader)):
                buf, d = reader.chunk(i)
                deliver(i, reader.chunking.byte_range(i)[0], Payload([buf]), d)
                gevent.sleep(0)  # a multi-GB local read must not starve the heartbeats
            return
        assert endpoint is not None
        node.bulk_client.fetch(endpoint, rec.owner, rec, deliver)

    def pull_any(self, holders: tuple[DatasetRecord, ...], deliver: Any,
                 prefer: str | None = None) -> DatasetRecord:
        """Pull from the first holder that works: ``prefer`` (the source a plan chose)
        first, then our own copy, then the others in catalog order."""
        node = self.node
        used, _ = from_holders(holders, lambda rec, ep: self.pull(rec, ep, deliver),
                               lambda owner: node.bulk_endpoints([owner]).get(owner),
                               what=holders[0].key if holders else "the dataset",
                               prefer=prefer, here=node.name, local=True)
        return used

    def gather(self, name: str, part: int | None = None) -> Any:
        """The whole dataset (or one part) as one in-memory array."""
        loc = self.node.catalog.locate(name)
        parts = [p for p in loc.parts if part is None or p.part == part]
        if part is None and not loc.complete:
            raise DatasetNotFound(f"{name}: parts {list(loc.missing)} are on no live node")
        if not parts:
            raise DatasetNotFound(f"{key_of(name, part)} is on no live node")
        rows = sum(p.row_stop - p.row_start for p in parts)
        out = np.empty((rows, *loc.shape[1:]) if loc.shape else (), dtype=np.dtype(loc.dtype))
        flat = out.reshape(-1).view(np.uint8)
        row_bytes = out.nbytes // max(rows, 1) if loc.shape else out.nbytes
        base = 0
        for p in parts:
            def deliver(i: int, off: int, buf: Payload, d: int, base: int = base) -> None:
                buf.copy_into(flat, base + off)
            self.pull_any(p.holders, deliver)
            base += (p.row_stop - p.row_start) * row_bytes
        return out

    def replicate(self, name: str, part: int | None) -> list[DatasetRecord]:
        """Copy a dataset's parts into the local store (copies are catalogued replicas)."""
        loc = self.node.catalog.locate(name)
        out = [self.replicate_part(p)[0] for p in loc.parts if part is None or p.part == part]
        if not out:
            raise DatasetNotFound(f"{key_of(name, part)} is on no live node")
        return out

    def replicate_part(self, p: PartLocation, prefer: str | None = None,
                       lineage: dict[str, Any] | None = None, feed: Feed | None = None
                       ) -> tuple[DatasetRecord, str | None]:
        """Copy one part here unless we have it; returns our record and the source used.

        ``prefer`` is tried first (falling back to the other holders if it fails);
        ``lineage`` entries are added to the copy's (e.g. the workflow that made it).
        ``feed`` hears of each verified chunk of an in-memory copy as it lands.
        """
        mine = next((r for r in p.holders if r.owner == self.node.name), None)
        if mine is not None:
            return mine, None
        src = p.holders[0]
        # A copy a workflow makes (its lineage carries the flow tag) is an intermediate;
        # a durable copy keeps the part's step/time beside it too (see h5mdmeta).
        writer = self.node.store.begin(src.name, src.shape, src.dtype, part=src.part,
                                       nparts=src.nparts,
                                       lineage={**src.lineage, **(lineage or {})},
                                       chunk_bytes=src.chunk_bytes, volatile=bool(lineage),
                                       aux=None if lineage else copy_axes(self.node, p.holders))
        buf = getattr(writer, "buf", None)
        if feed is not None and isinstance(buf, np.ndarray):
            feed.open(buf, src.dtype, src.shape)

        def landed(i: int, off: int, payload: Payload, d: int) -> None:
            writer.write_chunk(i, payload, d)
            if feed is not None:
                feed.landed(off, payload.nbytes)

        try:
            used = self.pull_any(p.holders, landed, prefer)
            return writer.commit(src.checksum), used.owner
        except BaseException:
            writer.abort()
            raise


__all__ = ["Datasets"]
