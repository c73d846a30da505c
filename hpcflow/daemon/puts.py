"""The cluster-wide rules a new dataset (or part) must follow, checked against the catalog.

A node's own store only knows its own copies; these rules look at what the
catalog says every node holds.  They apply to every way data enters a store:
an upload over the bulk channel (:func:`admit_put`, before the first byte is
written), an inline ``put`` and a saved workflow output (:func:`check_put`).
"""

from __future__ import annotations

import re
from typing import Any

from ..catalog.base import Catalog
from ..catalog.record import validate_dtype, validate_name, validate_part, validate_shape
from ..errors import DatasetExists, InvalidData, InvalidName, PermissionDenied
from ..rpc.auth import CLIENT
from ..rpc.messages import FLOW_ID

#: Lineage keys only the daemons write: a partial's layout, a flow's tag, a per-frame
#: result's time axis (see daemon/h5mdmeta.py).
INTERNAL_LINEAGE = frozenset({"source_version", "partial", "layout", "flow", "workflow", "axis"})
#: A slice's lineage: workflows read such a dataset as rows of ``slice_of``.  Uploads
#: carrying it come from nodes and from the centralised baseline (which forwards rows
#: that way, holding the node key); with keys, a client key may not send it.  Without
#: keys nobody can tell a script from the baseline, so it stays open (README, Security).
SLICE_LINEAGE = frozenset({"slice_of", "rows"})
#: How the daemons name a slice of a dataset (``NAME:rowsLO-HI``): reserved.
SLICE_NAME = re.compile(r":rows\d+-\d+$")
#: What flows name what they make (``wf-<24 hex>.<n>.<op>``, its partials and copies):
#: reserved, so nobody can take a flow's next output name before the flow gets there.
FLOW_NAME = re.compile(FLOW_ID.pattern + r"\.")


def check_user_put(name: str, lineage: Any = None) -> None:
    """What only the daemons may create: slices and flow outputs (by name) and internal
    lineage."""
    if SLICE_NAME.search(name):
        raise InvalidName(f"{name!r} looks like a slice hpcflow makes (NAME:rowsLO-HI); "
                          "choose another name")
    if FLOW_NAME.match(name):
        raise InvalidName(f"{name!r} looks like a workflow output (wf-<24 hex digits>.<n>.<op>):"
                          " such names are reserved for flows; choose another name (save a "
                          "flow's output with handle.save)")
    forged = sorted(INTERNAL_LINEAGE & set(lineage or {}))
    if forged:
        raise InvalidData(f"lineage keys {', '.join(forged)} are written by hpcflow itself, "
                          "not by a put")


def check_put(catalog: Catalog, me: str, name: str, part: int | None,
              shape: tuple[int, ...], dtype: str) -> None:
    """A user's put must not shadow another node's dataset or break a partitioned one.

    A part must match every sibling part the catalog knows of (ours, other live
    nodes' and dead members' alike) in dtype and row shape; replacing our own
    copy of the same part is the store's business (``overwrite``).  A name (part)
    held only by a member that is down now is not free either: it comes back with
    its data, and two different datasets would then share one name.
    """
    check_user_put(name)
    known = catalog.records_named(name, include_dead=True)
    live_others = [r for r in catalog.records_named(name) if r.owner != me]
    live = {(r.owner, r.key) for r in live_others}
    mine = {r.key for r in known if r.owner == me}
    down = [r for r in known if r.owner != me and (r.owner, r.key) not in live]
    if part is None:
        if live_others:
            raise DatasetExists(f"{name} already exists on {live_others[0].owner}")
        if down and name not in mine:
            raise DatasetExists(f"{name} already exists on {down[0].owner}, which is not alive "
                                "now: delete it there once it is back, or choose another name")
        return
    whole = [r for r in known if r.part is None and r.owner != me]
    if whole:
        raise InvalidData(f"{name} is a whole dataset on {whole[0].owner}; it has no parts")
    clash = [r for r in live_others if r.part == part]
    if clash:
        raise DatasetExists(f"part {part} of {name} already exists on {clash[0].owner}")
    gone = [r for r in down if r.part == part and r.key not in mine]
    if gone:
        raise DatasetExists(f"part {part} of {name} already exists on {gone[0].owner}, which is "
                            "not alive now: delete it there once it is back, or choose another "
                            "name")
    for ref in (r for r in known if r.part is not None and r.part != part):
        if ref.dtype != dtype or tuple(ref.shape[1:]) != tuple(shape[1:]):
            raise InvalidData(
                f"part {part} of {name} must match its other parts: part {ref.part} on "
                f"{ref.owner} has dtype {ref.dtype} and rows of shape {list(ref.shape[1:])}, "
                f"got {dtype} and {list(shape[1:])}")


def admit_put(catalog: Catalog, me: str, hdr: dict[str, Any]
              ) -> tuple[str, int | None, tuple[int, ...], str]:
    """An upload's header (from the network) against :func:`check_put`; ``role`` is the
    uploader's authenticated role (set by the bulk server, None without keys).  Returns
    its validated name, part, shape and dtype."""
    name, part = validate_name(hdr.get("name")), validate_part(hdr.get("part"))
    dtype = validate_dtype(hdr.get("dtype")).str
    shape = validate_shape(hdr.get("shape"))
    lineage = hdr.get("lineage")
    if hdr.get("role") == CLIENT and isinstance(lineage, dict) and SLICE_LINEAGE & set(lineage):
        raise PermissionDenied(f"uploads of {name!r}: a slice's lineage (slice_of, rows) is "
                               "written by nodes; a client key may not send it")
    check_user_put(name, lineage if isinstance(lineage, dict) else None)
    check_put(catalog, me, name, part, shape, dtype)
    return name, part, shape, dtype


__all__ = ["FLOW_NAME", "INTERNAL_LINEAGE", "SLICE_LINEAGE", "admit_put", "check_put",
           "check_user_put"]
