"""The planner's error type (defined in :mod:`hpcflow.errors`, the one exception tree).

Problems with an op itself (unknown op, arity, shapes, params) are raised as
the specific :class:`~hpcflow.errors.OpError` subclass instead.
"""

from __future__ import annotations

from hpcflow.errors import PlanningError

__all__ = ["PlanningError"]
