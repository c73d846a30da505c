"""The planner's one error type."""

from __future__ import annotations

from hpcflow.errors import HpcflowError


class PlanningError(HpcflowError, ValueError):
    """The workflow cannot be planned: bad references, shapes, or no node can run a step."""
