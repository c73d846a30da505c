"""The derivation of a saved dataset: every step back to the datasets that were put.

A saved dataset's record carries, under ``lineage["derivation"]``, a
:class:`Lineage`: the steps that made it, in dependency order (the last one
made the dataset), each with its op, the op's definition hash, its
parameters and its inputs, and the *sources* those steps read: datasets that
were put or saved, never a flow's temporary ``wf-...`` names, each with the
versions and checksum it had when the steps ran.  A step's input is either
an earlier step (its index, an ``int``) or a source (its name, a ``str``).  A
source that is itself a saved dataset carries its own lineage, so the tree
reaches back to what was put.

``hpcflow lineage NAME`` prints :meth:`Lineage.render`; ``hpcflow recompute``
re-runs the steps from the sources after checking that each source still has
the recorded checksum and versions (:meth:`Source.differs`).

Bounded: the lineage travels with every part's catalog record and is stored
as an HDF5 attribute (64 KiB at most), so :meth:`Lineage.bounded` keeps its
JSON under :data:`MAX_LINEAGE_BYTES`: nested lineages of saved sources are
dropped first (each marked ``omitted``), then the steps themselves (marked
``truncated``; such a dataset cannot be recomputed, and says why).  Pure: no
I/O, nothing here talks to a node.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import Any

import xxhash

from ..errors import InvalidData

#: JSON bytes of one lineage at most (it is stored as an HDF5 attribute, 64 KiB at most,
#: beside the record's other lineage, and replicated with every part's record).
MAX_LINEAGE_BYTES = 32 * 1024
#: Steps of one lineage at most (a longer derivation is truncated).
MAX_STEPS = 1024
#: Saved sources whose own lineage is nested, levels at most.
MAX_DEPTH = 8
FORMAT = 1

Ref = int | str  # an earlier step's index, or a source's name


def source_digest(parts: Iterable[tuple[int | None, str]]) -> str:
    """One checksum for a whole (possibly partitioned) dataset: an xxh3-128 over each
    part's index and checksum, in part order."""
    h = xxhash.xxh3_128()
    for part, checksum in sorted(parts, key=lambda p: -1 if p[0] is None else p[0]):
        h.update(f"{part}:{checksum}\n".encode())
    return h.hexdigest()


@dataclass(frozen=True)
class Source:
    """A dataset the derivation starts from (put, or saved with a lineage of its own)."""

    name: str
    versions: tuple[int, ...]
    checksum: str
    lineage: Lineage | None = None
    #: Why this saved source's own lineage is not here (the size limit), if it is not.
    omitted: str | None = None

    def differs(self, versions: Iterable[int], checksum: str) -> str | None:
        """What differs between this source as recorded and as it is now (None: same)."""
        now = tuple(sorted(set(versions)))
        if checksum != self.checksum:
            return (f"its checksum is {checksum[:16]} now, {self.checksum[:16]} when the "
                    "lineage was recorded")
        if self.versions and now != self.versions:
            return f"its versions are {list(now)} now, {list(self.versions)} when recorded"
        return None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "versions": list(self.versions),
                               "checksum": self.checksum}
        if self.lineage is not None:
            out["lineage"] = self.lineage.to_wire()
        if self.omitted is not None:
            out["omitted"] = self.omitted
        return out

    @classmethod
    def from_wire(cls, d: object, depth: int = 0) -> Source:
        if not isinstance(d, dict):
            raise InvalidData("a lineage source must be a map")
        versions = d.get("versions") or []
        if not isinstance(versions, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in versions):
            raise InvalidData("a lineage source's versions must be a list of ints")
        nested = d.get("lineage")
        return cls(_text(d.get("name"), "source name"), tuple(sorted(set(versions))),
                   _text(d.get("checksum"), "source checksum"),
                   None if nested is None else Lineage.from_wire(nested, depth + 1),
                   None if d.get("omitted") is None else str(d["omitted"]))


@dataclass(frozen=True)
class Step:
    """One op run: ``inputs`` are earlier steps (their index) or sources (their name)."""

    op: str
    op_hash: str
    params: dict[str, Any]
    inputs: tuple[Ref, ...]

    def to_wire(self) -> dict[str, Any]:
        return {"op": self.op, "op_hash": self.op_hash, "params": self.params,
                "inputs": list(self.inputs)}

    @classmethod
    def from_wire(cls, d: object) -> Step:
        if not isinstance(d, dict):
            raise InvalidData("a lineage step must be a map")
        params, inputs = d.get("params") or {}, d.get("inputs")
        if not isinstance(params, dict) or not isinstance(inputs, list) or not inputs:
            raise InvalidData("a lineage step needs params (a map) and inputs (a list)")
        for ref in inputs:
            if isinstance(ref, bool) or not isinstance(ref, int | str):
                raise InvalidData(f"a lineage step's input must be a step index or a source "
                                  f"name, got {ref!r}")
        return cls(_text(d.get("op"), "op"), str(d.get("op_hash") or ""), dict(params),
                   tuple(inputs))


@dataclass(frozen=True)
class Lineage:
    """How a saved dataset was made (see the module doc)."""

    steps: tuple[Step, ...]
    sources: tuple[Source, ...]
    workflow: str = ""
    #: Why the steps are not recorded (the size limit): such a dataset cannot be recomputed.
    truncated: str | None = None

    def __post_init__(self) -> None:
        names = {s.name for s in self.sources}
        if len(names) != len(self.sources):
            raise InvalidData("a lineage names a source twice")
        for k, step in enumerate(self.steps):
            for ref in step.inputs:
                if isinstance(ref, int) and not 0 <= ref < k:
                    raise InvalidData(f"lineage step {k} reads step {ref}, which is not an "
                                      "earlier step")
                if isinstance(ref, str) and ref not in names:
                    raise InvalidData(f"lineage step {k} reads {ref!r}, which is not a source")

    @property
    def result(self) -> Step | None:
        return self.steps[-1] if self.steps else None

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": FORMAT, "workflow": self.workflow,
                               "steps": [s.to_wire() for s in self.steps],
                               "sources": [s.to_wire() for s in self.sources]}
        if self.truncated is not None:
            out["truncated"] = self.truncated
        return out

    @classmethod
    def from_wire(cls, d: object, depth: int = 0) -> Lineage:
        """Validate a lineage from a record (any peer's): :class:`InvalidData` if malformed."""
        if depth > MAX_DEPTH:
            raise InvalidData(f"lineage nested more than {MAX_DEPTH} levels deep")
        if not isinstance(d, dict):
            raise InvalidData("a lineage must be a map")
        if d.get("format", FORMAT) != FORMAT:
            raise InvalidData(f"unknown lineage format {d.get('format')!r}")
        steps, sources = d.get("steps") or [], d.get("sources") or []
        if not isinstance(steps, list) or not isinstance(sources, list):
            raise InvalidData("a lineage's steps and sources must be lists")
        if len(steps) > MAX_STEPS:
            raise InvalidData(f"a lineage has at most {MAX_STEPS} steps")
        truncated = d.get("truncated")
        return cls(tuple(Step.from_wire(s) for s in steps),
                   tuple(Source.from_wire(s, depth) for s in sources),
                   str(d.get("workflow") or ""),
                   None if truncated is None else str(truncated))

    def nbytes(self) -> int:
        return len(json.dumps(self.to_wire()))

    def depth(self) -> int:
        """Levels of lineage: 1, plus those of the deepest saved source's own."""
        return 1 + max((s.lineage.depth() for s in self.sources if s.lineage is not None),
                       default=0)

    def _within(self, levels: int) -> Lineage:
        """Saved sources' lineages cut below ``levels`` levels (marked ``omitted``)."""
        sources = tuple(
            s if s.lineage is None else
            replace(s, lineage=s.lineage._within(levels - 1)) if levels > 1 else
            replace(s, lineage=None, omitted=f"its own lineage was left out: nested deeper "
                    f"than {MAX_DEPTH} levels (see hpcflow lineage {s.name})")
            for s in self.sources)
        return replace(self, sources=sources)

    def bounded(self, limit: int = MAX_LINEAGE_BYTES) -> Lineage:
        """This lineage within ``limit`` JSON bytes and :data:`MAX_DEPTH` nested levels:
        saved sources' own lineages dropped first (marked ``omitted``), then the steps
        (marked ``truncated``)."""
        if self.depth() > MAX_DEPTH + 1:
            return self._within(MAX_DEPTH + 1).bounded(limit)
        size = self.nbytes()
        if size <= limit and len(self.steps) <= MAX_STEPS:
            return self
        sources = tuple(
            replace(s, lineage=None, omitted=f"its own lineage was left out: the whole one was "
                    f"{size} bytes, over the {limit}-byte limit (see hpcflow lineage {s.name})")
            if s.lineage is not None else s for s in self.sources)
        lean = replace(self, sources=sources)
        if lean.nbytes() <= limit and len(self.steps) <= MAX_STEPS:
            return lean
        why = (f"{len(self.steps)} steps, {size} bytes of lineage: over the limit of "
               f"{MAX_STEPS} steps and {limit} bytes; it cannot be recomputed")
        bare = tuple(Source(s.name, s.versions, s.checksum) for s in self.sources)
        out = Lineage((), bare, self.workflow, why)
        if out.nbytes() > limit:  # too many sources to even name: keep none
            out = Lineage((), (), self.workflow, why)
        return out

    def source(self, name: str) -> Source:
        return next(s for s in self.sources if s.name == name)

    def render(self, name: str) -> list[str]:
        """The tree as text lines, ``name`` (the saved dataset) at the root."""
        lines = [name + (f"  (workflow {self.workflow})" if self.workflow else "")]
        if self.truncated is not None:
            lines.append(f"└── (steps not recorded: {self.truncated})")
            for s in self.sources:
                lines.append(f"    · reads {self._source_line(s)}")
            return lines
        if self.result is not None:
            self._render(len(self.steps) - 1, "", True, lines)
        return lines

    def _render(self, ref: Ref, prefix: str, last: bool, lines: list[str]) -> None:
        branch, more = ("└── ", "    ") if last else ("├── ", "│   ")
        if isinstance(ref, str):
            src = self.source(ref)
            lines.append(prefix + branch + self._source_line(src))
            if src.lineage is not None:
                sub = src.lineage.render(src.name)[1:]
                lines.extend(prefix + more + line for line in sub)
            return
        step = self.steps[ref]
        params = " ".join(f"{k}={json.dumps(v)}" for k, v in sorted(step.params.items()))
        lines.append(f"{prefix}{branch}{step.op}" + (f" {params}" if params else "")
                     + f"  [op {step.op_hash[:8]}]")
        for i, r in enumerate(step.inputs):
            self._render(r, prefix + more, i == len(step.inputs) - 1, lines)

    @staticmethod
    def _source_line(s: Source) -> str:
        kind = "saved" if s.lineage is not None or s.omitted else "put"
        line = (f"{s.name}  ({kind}; version {','.join(map(str, s.versions)) or '?'}, "
                f"checksum {s.checksum[:16]})")
        return line + (f"  [{s.omitted}]" if s.omitted else "")


def _text(v: object, what: str) -> str:
    if not isinstance(v, str) or not v or len(v) > 256:
        raise InvalidData(f"a lineage's {what} must be a non-empty string")
    return v


__all__ = ["MAX_DEPTH", "MAX_LINEAGE_BYTES", "Lineage", "Source", "Step", "source_digest"]
