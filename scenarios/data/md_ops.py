"""User ops for the H5MD trajectory scenario (loaded through the scenario's ``ops`` list).

Shows that scenario-specific analysis code reaches every node: the NFS
workers and the daemons import this file before running a step.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from hpcflow.ops import op


@op("radius_of_gyration", kind="rowwise")
def radius_of_gyration(positions: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """Per frame ``sqrt(mean_i |r_i - r_mean|^2)`` of ``(frames, atoms, 3)``, as ``(frames, 1)``.

    Rowwise because every frame is independent: holders of different frames
    can compute their rows without seeing the others.
    """
    if positions.ndim != 3 or positions.shape[2] != 3:
        raise ValueError(f"needs (frames, atoms, 3) positions, got {positions.shape}")
    centred = positions - positions.mean(axis=1, keepdims=True)
    return np.sqrt((centred**2).sum(axis=2).mean(axis=1, keepdims=True))
