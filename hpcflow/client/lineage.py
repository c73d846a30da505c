"""A saved dataset's lineage from the script's side: read it, and recompute from it.

:func:`recompute` re-derives the parts of a saved dataset that no live node
holds (their holders are gone) by re-running its recorded steps through an
ordinary :class:`~hpcflow.client.flow.Flow` (planned, executed and cleaned up
like any other), after checking that every source still is the data it was
derived from (:class:`~hpcflow.errors.InputChanged`,
:class:`~hpcflow.errors.InputMissing` otherwise, naming it) and that every
op is still defined as it was (its definition hash).  The node then stores
each lost part only if the recomputed rows have exactly the saved checksum.
"""

from __future__ import annotations

from typing import Any

from ..catalog.lineage import Lineage, source_digest
from ..catalog.record import validate_name
from ..errors import DatasetNotFound, InputChanged, InputMissing, InvalidData, LineageError
from .flow import Connection, Flow, Handle


def describe(client: Connection, name: str) -> dict[str, Any]:
    """The node's answer to ``lineage``: derivation (wire form) and parts with holders."""
    return dict(client._call("lineage", validate_name(name)))


def lineage(client: Connection, name: str) -> Lineage | None:
    """The derivation of saved dataset ``name`` (None for a dataset that was put)."""
    d = describe(client, name).get("derivation")
    if d is None:
        return None
    try:
        return Lineage.from_wire(d)
    except InvalidData as exc:
        raise LineageError(f"the lineage recorded with {name} is unreadable: {exc}") from None


def check_sources(client: Connection, name: str, lin: Lineage) -> None:
    """Every source is still there, whole, with the recorded checksum and versions."""
    for src in lin.sources:
        try:
            loc = client._call("locate", src.name)
        except DatasetNotFound:
            raise InputMissing(f"cannot recompute {name}: its input {src.name} is gone (no "
                               "live node holds it)") from None
        if not loc["complete"]:
            raise InputMissing(f"cannot recompute {name}: parts {loc['missing']} of its input "
                               f"{src.name} are on no live node")
        parts = loc["parts"]
        versions = {h["version"] for p in parts for h in p["holders"]}
        digest = source_digest((p["part"], p["holders"][0]["checksum"]) for p in parts)
        why = src.differs(versions, digest)
        if why is not None:
            raise InputChanged(f"cannot recompute {name}: its input {src.name} changed since "
                               f"it was derived ({why})")


def check_ops(client: Connection, name: str, lin: Lineage) -> None:
    """Every op is defined here as it was when the lineage was recorded."""
    hashes = client._call("ops")
    for step in lin.steps:
        have = hashes.get(step.op)
        if have is None:
            raise LineageError(f"cannot recompute {name}: op {step.op!r} is unknown on "
                               f"{client.node}")
        if step.op_hash and have != step.op_hash:
            raise LineageError(f"cannot recompute {name}: op {step.op!r} is defined "
                               f"differently now ({have[:8]}, recorded {step.op_hash[:8]})")


def recompute(client: Connection, name: str) -> dict[str, Any]:
    """Re-derive the parts of ``name`` whose holders are gone; returns the node's reply
    (``restored``: the parts written, ``moved``: bytes per link of the save) plus the
    flow's ``report`` (``restored`` is empty, and nothing runs, when no part is lost)."""
    info = describe(client, name)
    if info.get("derivation") is None:
        raise LineageError(f"{name} was put, not saved from a flow: it has no lineage to "
                           "recompute it from")
    lin = lineage(client, name)
    assert lin is not None
    if lin.truncated is not None or not lin.steps:
        raise LineageError(f"cannot recompute {name}: its lineage was not recorded in full "
                           f"({lin.truncated or 'no steps'})")
    if not info["missing"]:
        return {"restored": [], "moved": {}, "report": None}
    check_sources(client, name, lin)
    check_ops(client, name, lin)
    flow = Flow(client)
    try:
        handles: list[Handle] = []
        for step in lin.steps:
            inputs = [handles[r] if isinstance(r, int) else r for r in step.inputs]
            handles.append(flow.run(step.op, *inputs, **step.params))
        reply = flow._save(handles[-1], name, restore=True)
        return {**reply, "report": flow.report()}
    finally:
        flow.close()


__all__ = ["check_ops", "check_sources", "describe", "lineage", "recompute"]
