"""Task functions the Dask workers of ``bench/vs_dask.py`` run.

Kept in their own small module (no hpcflow daemon code) so that the client
pickles them by reference and every ``dask worker``, started with this
directory on its ``PYTHONPATH``, imports the same code.  Each worker loads a
scenario (and its user op modules) at most once per process.

* :func:`make_part` generates one row part of one dataset exactly as the
  replay places it in an hpcflow node's store (same seed, same rows).
* :func:`rowwise_block`, :func:`reduce_partial`, :func:`reduce_combine` and
  :func:`whole_op` run an op with hpcflow's own numpy code
  (:mod:`hpcflow.ops.exec`), for the ops that have no dask.array equivalent
  (user ops, per-column quantiles, lexicographic row sort).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from hpcflow import ops
from hpcflow.harness.scenario import Scenario, generate, load_scenario

Array = np.ndarray[Any, Any]


@functools.lru_cache(maxsize=8)
def _scenario(path: str) -> Scenario:
    sc = load_scenario(path)  # imports the scenario's user op modules here too
    sc.load_ops()
    return sc


def make_part(path: str, name: str, index: int) -> Array:
    """Row part *index* of dataset *name*, bit-identical to what the replay places."""
    sc = _scenario(path)
    only = dataclasses.replace(sc, datasets={name: sc.datasets[name]})
    return generate(only)[name][index][1]


def load_ops(path: str) -> None:
    """Make the scenario's user ops known in this process (also used by the client)."""
    _scenario(path)


def rowwise_block(path: str, op: str, params: Mapping[str, Any], *blocks: Array) -> Array:
    """A rowwise op on one row block of each row input (broadcast operands whole)."""
    _scenario(path)
    return ops.run_rowwise_part(ops.get_op(op), list(blocks), params)


def reduce_partial(path: str, op: str, params: Mapping[str, Any], block: Array) -> Any:
    """A reduce op's partial over one row block."""
    _scenario(path)
    return ops.run_partial(ops.get_op(op), block, params)


def reduce_combine(path: str, op: str, params: Mapping[str, Any],
                   partials: Sequence[Any]) -> Array:
    """Combine the partials of every row block into the op's result."""
    _scenario(path)
    return ops.combine_partials(ops.get_op(op), list(partials), params)


def whole_op(path: str, op: str, params: Mapping[str, Any], *inputs: Array) -> Array:
    """An op on whole inputs (each already one chunk): a global op, or a reduce op
    that cannot be split (a histogram whose edges need the global range)."""
    _scenario(path)
    return ops.apply(ops.get_op(op), list(inputs), params)
