"""Results of replaying a scenario under several approaches: JSON, table, plot.

Every approach (decentralised, centralised, NFS ...) reports an
:class:`ApproachResult`; this module only compares and presents them, so the
approaches stay independent of each other and of the output format.

Result check: :func:`compare` accepts float differences of the size that
splitting a computation causes (a sum over parts adds in a different order
than a sum over the whole), i.e. ``|result - reference| <= rtol * max(1,
max|reference|)`` element-wise, with ``rtol = sqrt(eps)`` of the reference's
dtype (1.5e-8 for float64/complex128, 3.5e-4 for float32).  The error is
measured against the array's scale, not each element's, because a column
mean near zero is the difference of large sums and carries the sums'
absolute rounding error.  Integer and bool results must be equal.  Shapes,
dtypes and NaN positions must match.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np


class Named(Protocol):
    """What a report uses of a :class:`~hpcflow.harness.scenario.Scenario`: its name."""

    @property
    def name(self) -> str: ...


__all__ = [
    "MATPLOTLIB_REQUIREMENT",
    "MESSAGES",
    "ApproachResult",
    "array_checksum",
    "compare",
    "format_table",
    "human_bytes",
    "plot",
    "to_json",
]

MATPLOTLIB_REQUIREMENT = "matplotlib>=3.4"
"""What :func:`plot` needs (``Axes.bar_label`` appeared in 3.4)."""


@dataclass
class ApproachResult:
    """What one approach did for one scenario.

    ``links`` maps ``"src->dst"`` to payload bytes; ``bytes_moved`` is their
    sum over the workflow (set-up traffic such as initial data placement goes
    in ``extra``).  ``messages`` counts what each approach exchanges, in its
    own unit (see :data:`MESSAGES`).  ``skipped`` holds the reason when the
    approach could not run here, ``failed`` the error when it ran and broke;
    the numbers are then meaningless zeros.
    """

    approach: str
    bytes_moved: int
    wall_s: float
    links: dict[str, int]
    messages: int
    result_checksum: str
    matches_reference: bool
    max_abs_err: float
    skipped: str | None = None
    failed: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ran(self) -> bool:
        return self.skipped is None and self.failed is None

    @classmethod
    def skip(cls, approach: str, reason: str) -> ApproachResult:
        """The result of an approach that could not run here, with the reason."""
        return cls._empty(approach, skipped=reason)

    @classmethod
    def fail(cls, approach: str, error: str) -> ApproachResult:
        """The result of an approach that started and broke, with the error."""
        return cls._empty(approach, failed=error)

    @classmethod
    def _empty(cls, approach: str, skipped: str | None = None,
               failed: str | None = None) -> ApproachResult:
        return cls(approach=approach, bytes_moved=0, wall_s=0.0, links={}, messages=0,
                   result_checksum="", matches_reference=False, max_abs_err=math.nan,
                   skipped=skipped, failed=failed)


MESSAGES = {
    "decentralised": "RPC requests and replies of the initiator's executor, plus bulk-channel "
                     "data chunks received by a host from another host",
    "centralised": "RPC requests and replies of the orchestrator, plus bulk-channel data "
                   "chunks it sent and received",
    "nfs": "NFS file operations: one per whole-file read or write (not NFS RPCs)",
}
"""What the ``messages`` column counts per approach (the units differ)."""


def array_checksum(arr: np.ndarray[Any, Any]) -> str:
    """sha256 (hex) over dtype, shape and C-order bytes: equal iff bit-identical arrays."""
    a = np.ascontiguousarray(arr)
    digest = hashlib.sha256()
    digest.update(f"{a.dtype.str}|{a.shape}|".encode())
    digest.update(a.view(np.uint8).data if a.size else b"")
    return digest.hexdigest()


def compare(result: np.ndarray[Any, Any],
            reference: np.ndarray[Any, Any]) -> tuple[bool, float]:
    """``(matches, max_abs_err)`` within the rounding tolerance in the module docstring.

    ``max_abs_err`` is ``inf`` when shapes differ (nothing to compare).
    """
    res, ref = np.asarray(result), np.asarray(reference)
    if res.shape != ref.shape:
        return False, math.inf
    if res.size == 0:
        return res.dtype == ref.dtype, 0.0
    nan_res, nan_ref = _isnan(res), _isnan(ref)
    if not np.array_equal(nan_res, nan_ref):
        return False, math.inf
    ok = ~nan_ref
    diff = np.abs(res[ok].astype(np.complex128 if "c" in res.dtype.kind + ref.dtype.kind
                                 else np.float64) - ref[ok])
    err = float(diff.max()) if diff.size else 0.0
    if ref.dtype.kind in "fc":
        rtol = math.sqrt(float(np.finfo(ref.dtype).eps))
        scale = max(1.0, float(np.abs(ref[ok]).max()) if diff.size else 0.0)
        within = err <= rtol * scale
    else:
        within = err == 0.0
    return within and res.dtype == ref.dtype, err


def _isnan(a: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    return np.isnan(a) if a.dtype.kind in "fc" else np.zeros(a.shape, dtype=bool)


def _name(scenario: Named | str) -> str:
    return scenario if isinstance(scenario, str) else scenario.name


def _json_float(x: float) -> float | None:
    """JSON has no inf/nan: they become null."""
    return x if math.isfinite(x) else None


def to_json(scenario: Named | str, results: Sequence[ApproachResult]) -> dict[str, Any]:
    """``{"scenario": name, "approaches": {NAME: {bytes_moved, wall_s, links, ...}}}``.

    Every field of :class:`ApproachResult` except ``approach`` (the key);
    non-finite floats become ``null``.
    """
    approaches: dict[str, Any] = {}
    for r in results:
        entry = asdict(r)
        del entry["approach"]
        entry["wall_s"] = _json_float(r.wall_s)
        entry["max_abs_err"] = _json_float(r.max_abs_err)
        approaches[r.approach] = entry
    return {"scenario": _name(scenario), "approaches": approaches}


def human_bytes(n: float) -> str:
    """``1536 -> "1.50 KiB"``: binary units, three significant digits."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"):
        if abs(n) < 1024 or unit == "EiB":
            return f"{int(n)} B" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _human_time(s: float) -> str:
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.2f} s"


def _grid(rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
             for r in rows]
    lines.insert(1, "-" * len(lines[0]))
    return lines


def format_table(scenario: Named | str, results: Sequence[ApproachResult]) -> str:
    """A plain-text report: totals per approach, bytes per link, skipped and failed ones."""
    ran = [r for r in results if r.ran]
    out = [f"scenario {_name(scenario)}"]
    if ran:
        rows = [["approach", "bytes moved", "wall time", "messages", "result"]]
        for r in ran:
            check = "ok" if r.matches_reference else "MISMATCH"
            rows.append([r.approach, human_bytes(r.bytes_moved), _human_time(r.wall_s),
                         str(r.messages), f"{check} (max err {r.max_abs_err:.2g})"])
        out += _grid(rows)
        links = sorted({k for r in ran for k in r.links})
        if links:
            out.append("")
            rows = [["link", *(r.approach for r in ran)]]
            rows += [[link, *(human_bytes(r.links[link]) if link in r.links else "-"
                              for r in ran)] for link in links]
            out += _grid(rows)
    for r in results:
        if r.skipped is not None:
            out.append(f"{r.approach}: skipped: {r.skipped}")
        if r.failed is not None:
            out.append(f"{r.approach}: FAILED: {r.failed}")
    return "\n".join(out)


def plot(results_by_scenario: Mapping[str, Sequence[ApproachResult]], path: str | Path) -> None:
    """Bar charts of bytes moved and wall time per approach, one row per scenario.

    Needs matplotlib (:data:`MATPLOTLIB_REQUIREMENT`); uses the Agg backend,
    so no display is required.  Skipped approaches get an empty slot.
    """
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(f"plot() needs matplotlib: pip install '{MATPLOTLIB_REQUIREMENT}' "
                          f"({exc})") from exc
    if not results_by_scenario:
        raise ValueError("nothing to plot: no scenarios")
    n = len(results_by_scenario)
    fig, axes = plt.subplots(n, 2, figsize=(11, 2.8 * n), squeeze=False)
    try:
        for row, (name, results) in enumerate(results_by_scenario.items()):
            labels = [r.approach for r in results]
            mib = [r.bytes_moved / 2**20 if r.ran else 0.0 for r in results]
            secs = [r.wall_s if r.ran else 0.0 for r in results]
            for ax, values, unit, text in (
                    (axes[row][0], mib, "MiB moved", [human_bytes(r.bytes_moved)
                                                      for r in results]),
                    (axes[row][1], secs, "wall time (s)", [_human_time(r.wall_s)
                                                           for r in results])):
                bars = ax.bar(labels, values, color="tab:blue")
                ax.bar_label(bars, labels=[t if r.ran else "skipped" if r.skipped else "failed"
                                           for r, t in zip(results, text, strict=True)],
                             fontsize=8)
                ax.set_ylabel(unit)
                ax.set_title(name, fontsize=10)
                ax.margins(y=0.2)
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
