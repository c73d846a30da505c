"""Saving a flow's output: where its parts go, the lineage they carry, and recompute.

* :func:`derive` walks the catalog records of a flow's outputs (each step's
  record says its op, op hash, params and inputs, with the inputs' versions
  and checksum as the step read them) back to the datasets that were put or
  saved, into a :class:`~hpcflow.catalog.lineage.Lineage`: the flow's own
  ``wf-...`` names (outputs, reduce partials) never appear in it.
* :func:`save_in_place` keeps a split output's parts on the nodes that hold
  them, as the parts of one saved dataset (nothing moves): the initiator asks
  each holder to store its part durably (``save_part``, a node-to-node call).
  If one fails, the parts already written are removed.
* :func:`restore` writes the missing parts of a saved dataset (their holders
  are gone) from a recomputed output: each must have exactly the checksum the
  saved part had, so it is a replica of the lost part, stored where the rows
  are if a node holds exactly them, else on the initiator.
"""

from __future__ import annotations

import re
from typing import Any

import gevent
import numpy as np

from ..catalog.base import Catalog, Location
from ..catalog.lineage import Lineage, Source, Step, source_digest
from ..catalog.record import (
    DatasetRecord,
    validate_flag,
    validate_name,
    validate_nparts,
    validate_part,
)
from ..errors import (
    DatasetExists,
    DatasetNotFound,
    IntegrityError,
    InvalidData,
    LineageError,
)
from ..rpc.messages import InputRef
from .datasets import Datasets
from .executor import Executor
from .parts import NodeParts
from .puts import check_put, check_user_put
from .worker import Worker

_PARTIAL = re.compile(r"\.partial\d+$")


def derive(catalog: Catalog, wf: str, output: str) -> Lineage:
    """The derivation of ``output`` (a step output of flow ``wf``) back to put or saved
    datasets, from the records the nodes that ran the steps announced."""
    steps: list[Step] = []
    index: dict[str, int] = {}
    sources: dict[str, Source] = {}

    def lineage_of(name: str) -> dict[str, Any]:
        recs = catalog.records_named(name, include_dead=True)
        if not recs:
            raise DatasetNotFound(f"cannot record the lineage of {output}: step output {name} "
                                  "is gone (its node restarted?): fetch the result again first")
        return recs[0].lineage

    def source(entry: dict[str, Any]) -> str:
        name = str(entry["name"])
        versions = [v for v in entry.get("versions") or [] if isinstance(v, int)]
        checksum = entry.get("checksum")
        if not isinstance(checksum, str):  # recorded before checksums were: read it now
            loc = catalog.locate(name)
            checksum = source_digest((p.part, p.holders[0].checksum) for p in loc.parts)
            versions = sorted({h.version for p in loc.parts for h in p.holders})
        seen = sources.get(name)
        if seen is not None:
            if seen.checksum != checksum:
                raise InvalidData(f"cannot record the lineage of {output}: input {name} "
                                  "changed while the flow ran (two steps read different data)")
            return name
        nested, omitted = None, None
        recs = catalog.records_named(name, include_dead=True)
        if recs and isinstance(recs[0].lineage.get("derivation"), dict):
            try:
                nested = Lineage.from_wire(recs[0].lineage["derivation"])
            except InvalidData as exc:
                omitted = f"its recorded lineage is unreadable: {exc}"
        sources[name] = Source(name, tuple(sorted(set(versions))), checksum, nested, omitted)
        return name

    def visit(entry: dict[str, Any]) -> int | str:
        name = entry.get("name")
        if not isinstance(name, str):
            raise InvalidData(f"cannot record the lineage of {output}: a malformed input entry")
        if not name.startswith(f"{wf}."):
            return source(entry)
        if name in index:
            return index[name]
        lin = lineage_of(name)
        entries = list(lin.get("inputs") or [])
        if lin.get("mode") == "combine":  # a reduce: its inputs are the partials'
            entries = [e for p in entries[:1] for e in lineage_of(p["name"]).get("inputs")
                       or []]
        if not entries:
            raise InvalidData(f"cannot record the lineage of {output}: {name} names no inputs")
        refs = tuple(visit(e) for e in entries)
        steps.append(Step(str(lin.get("op")), str(lin.get("op_hash") or ""),
                          dict(lin.get("params") or {}), refs))
        index[name] = len(steps) - 1
        return index[name]

    if _PARTIAL.search(output) or not output.startswith(f"{wf}."):
        raise InvalidData(f"{output} is not a step output of flow {wf}")
    visit({"name": output})
    return Lineage(tuple(steps), tuple(sources.values()), wf).bounded()


def saved_lineage(lin: Lineage, wf: str, output: str) -> dict[str, Any]:
    """The record lineage of a saved dataset (each part adds its ``rows``)."""
    last = lin.result
    return {"derivation": lin.to_wire(), "saved_from": output, "workflow": wf,
            **({"op": last.op, "op_hash": last.op_hash} if last is not None else {})}


def _holder(node: NodeParts, loc_nodes: tuple[str, ...]) -> str:
    return node.name if node.name in loc_nodes else loc_nodes[0]


def save_in_place(node: NodeParts, executor: Executor, output: str, loc: Location, name: str,
                  overwrite: bool, lineage: dict[str, Any]) -> list[DatasetRecord]:
    """Every part of ``output`` saved as part of ``name`` on a node that holds it.

    The put rules are checked for every part before any is written; a part that
    fails on its holder even so has the parts already written removed.  (With
    ``overwrite``, the older version of those parts is then gone too.)"""
    nparts = None if loc.parts[0].part is None else len(loc.parts)
    shape, dtype = tuple(loc.shape), np.dtype(loc.dtype).str
    check_user_put(name)
    held = sorted({r.owner for r in node.catalog.records_named(name, include_dead=True)})
    if held and not overwrite:
        raise DatasetExists(f"{name} already exists on {', '.join(held)} (use overwrite)")
    for p in loc.parts:  # the put rules, checked here first: most refusals write nothing
        part_shape = (p.row_stop - p.row_start, *shape[1:]) if shape else ()
        check_put(node.catalog, _holder(node, p.nodes), name, p.part, part_shape, dtype)
    jobs = []
    for p in loc.parts:
        rows = None if p.part is None else [p.row_start, p.row_stop]
        req = {"output": output, "rows": rows, "name": name, "part": p.part, "nparts": nparts,
               "lineage": {**lineage, "rows": [p.row_start, p.row_stop]},
               "overwrite": overwrite}
        holder = _holder(node, p.nodes)
        jobs.append((holder, gevent.spawn(executor._call, holder, "save_part", req)))
    gevent.joinall([g for _, g in jobs])
    saved = [(h, DatasetRecord.from_wire(g.value)) for h, g in jobs if g.successful()]
    failed = next((g.exception for _, g in jobs if not g.successful()), None)
    if failed is not None:
        # Never leave a dataset with some of its parts: remove those written.
        executor.cleanup([(h, rec.name, rec.part) for h, rec in saved])
        raise failed
    return [rec for _, rec in saved]


def until_known(catalog: Catalog, recs: list[DatasetRecord], timeout: float) -> None:
    """Wait until this node's catalog shows every record of ``recs`` (their holders
    announce them): a script may locate or fetch a saved dataset through its node as
    soon as the save returns.  Best effort: after ``timeout`` the reply goes anyway."""
    want = {(r.owner, r.key, r.version) for r in recs}
    names = {r.name for r in recs}

    def known() -> bool:
        return want <= {(r.owner, r.key, r.version)
                        for n in names for r in catalog.records_named(n)}

    catalog.wait_until(known, timeout)


def restore(node: NodeParts, executor: Executor, output: str, name: str) -> dict[str, Any]:
    """Write the parts of saved dataset ``name`` that no live node holds from the
    recomputed ``output``; each must match the lost part's checksum (else
    :class:`LineageError` and nothing is stored)."""
    cat = node.catalog
    known = cat.records_named(name, include_dead=True)
    if not known:
        raise DatasetNotFound(f"no node, alive or dead, ever announced {name!r}")
    live = {r.part for r in cat.records_named(name)}
    first: dict[int | None, DatasetRecord] = {}
    for r in sorted(known, key=lambda r: (-r.version, r.owner)):
        first.setdefault(r.part, r)
    order = sorted(first, key=lambda k: -1 if k is None else k)
    if None in first and len(first) > 1:
        raise InvalidData(f"{name} is recorded both whole and in parts")
    rows: dict[int | None, tuple[int, int]] = {}
    start = 0
    for k in order:
        rows[k] = (start, start + first[k].rows)
        start += first[k].rows
    if any(k is not None and k != i for i, k in enumerate(order)):
        raise LineageError(f"{name}: some parts were never announced by any node: their rows "
                           "are unknown, so they cannot be restored")
    missing = [k for k in order if k not in live]
    if not missing:
        return {"restored": [], "moved": {}}
    loc = cat.wait_for(output, node.config.rpc_timeout_s)
    ref = first[order[0]]
    want = ((start, *ref.shape[1:]) if ref.shape else ()) if None not in first else ref.shape
    if tuple(loc.shape) != tuple(want) or loc.dtype != ref.dtype:
        raise LineageError(f"recomputing {name} gave {list(loc.shape)} {loc.dtype}, not the "
                           f"saved {list(want)} {ref.dtype}: nothing was stored")
    restored: list[DatasetRecord] = []
    for k in missing:
        lo, hi = rows[k]
        same = next((p for p in loc.parts if (p.row_start, p.row_stop) == (lo, hi)), None)
        if same is not None:
            holder = _holder(node, same.nodes)
            want_rows = None if same.part is None else [lo, hi]
        else:  # the recomputed output is split differently: its rows come here
            holder = node.name
            executor.pull(node.name, output, (lo, hi))
            want_rows = [lo, hi] if loc.parts[0].part is not None else None
        rec = first[k]
        req = {"output": output, "rows": want_rows, "name": name, "part": rec.part,
               "nparts": rec.nparts, "lineage": rec.lineage, "overwrite": False,
               "replica": {"checksum": rec.checksum, "chunk_bytes": rec.chunk_bytes}}
        restored.append(DatasetRecord.from_wire(executor._call(holder, "save_part", req)))
    until_known(cat, restored, node.config.rpc_timeout_s)
    return {"restored": [r.part for r in restored], "records": [r.to_wire() for r in restored],
            "moved": executor.ex.to_wire()["moved"]}


def describe(catalog: Catalog, name: str) -> dict[str, Any]:
    """What ``hpcflow lineage`` shows: the derivation recorded with ``name`` (None for a
    dataset that was put) and each part's holders, alive or not, with its checksum."""
    known = catalog.records_named(name, include_dead=True)
    if not known:
        raise DatasetNotFound(f"no node, alive or dead, ever announced {name!r}")
    live = {(r.owner, r.key) for r in catalog.records_named(name)}
    by_part: dict[int | None, list[DatasetRecord]] = {}
    for r in sorted(known, key=lambda r: (-r.version, r.owner)):
        by_part.setdefault(r.part, []).append(r)
    derivation = next((r.lineage["derivation"] for r in known
                       if isinstance(r.lineage.get("derivation"), dict)), None)
    parts: list[dict[str, Any]] = []
    for k in sorted(by_part, key=lambda k: -1 if k is None else k):
        recs = by_part[k]
        parts.append({"part": k, "rows": recs[0].lineage.get("rows"),
                      "checksum": recs[0].checksum, "version": recs[0].version,
                      "holders": [{"node": r.owner, "alive": (r.owner, r.key) in live}
                                  for r in recs]})
    missing = [p["part"] for p in parts if not any(h["alive"] for h in p["holders"])]
    return {"name": name, "derivation": derivation, "parts": parts, "missing": missing,
            "saved_from": next((r.lineage.get("saved_from") for r in known), None)}


def save_part(node: NodeParts, worker: Worker, datasets: Datasets, req: object) -> DatasetRecord:
    """On a holder: store rows of a flow output held here, durably, as (part of) a saved
    dataset.  ``replica``: the part's recorded checksum and chunk size; the rows must
    have exactly that checksum (a lost part restored), and the put rules do not apply
    (a replica of a part the catalog knows)."""
    if not isinstance(req, dict):
        raise InvalidData("save_part takes a map")
    ref = InputRef.from_wire({"name": req.get("output"), "rows": req.get("rows")})
    name, part = validate_name(req.get("name")), validate_part(req.get("part"))
    nparts = validate_nparts(req.get("nparts"), part)
    lineage, replica = req.get("lineage") or {}, req.get("replica")
    if not isinstance(lineage, dict):
        raise InvalidData("lineage must be a map")
    overwrite = validate_flag(req.get("overwrite", False), "overwrite")
    with worker.busy():
        arr = worker.local_rows(ref.name, ref.rows)
        if replica is None:
            return datasets.put_array(name, arr, part=part, nparts=nparts, overwrite=overwrite,
                                      lineage=lineage)
        if not isinstance(replica, dict) or not isinstance(replica.get("checksum"), str):
            raise InvalidData("replica must give the part's checksum and chunk_bytes")
        return _store_replica(node, name, part, nparts, arr, lineage, replica)


def _store_replica(node: NodeParts, name: str, part: int | None, nparts: int | None,
                   arr: np.ndarray[Any, Any], lineage: dict[str, Any],
                   replica: dict[str, Any]) -> DatasetRecord:
    chunk_bytes = replica.get("chunk_bytes")
    if isinstance(chunk_bytes, bool) or not isinstance(chunk_bytes, int):
        raise InvalidData("replica chunk_bytes must be an int")
    writer = node.store.begin(name, arr.shape, arr.dtype, part=part, nparts=nparts,
                              lineage=lineage, chunk_bytes=chunk_bytes)
    try:
        for i in range(len(writer.chunking)):
            writer.write_chunk(i, np.ascontiguousarray(arr[writer.chunking.slab(i)], arr.dtype))
            gevent.sleep(0)
        return writer.commit(replica["checksum"])
    except IntegrityError:
        raise LineageError(f"the recomputed part {part} of {name} differs from the saved one "
                           "(another checksum): an op is not deterministic, or an input "
                           "changed; nothing was stored") from None
    except BaseException:
        writer.abort()
        raise


__all__ = [
    "derive",
    "describe",
    "restore",
    "save_in_place",
    "save_part",
    "saved_lineage",
    "until_known",
]
