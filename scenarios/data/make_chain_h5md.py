"""Write ``chain.h5md``: a small, valid H5MD 1.1 trajectory of a random-walk polymer.

Run ``python scenarios/data/make_chain_h5md.py`` to regenerate it (the
output is deterministic).  The layout follows the H5MD specification
(https://www.nongnu.org/h5md/h5md.html) as MDAnalysis' writer does:
``/h5md`` with ``version`` and author/creator groups, and the time-dependent
element ``/particles/chain/position/{value,step,time}`` with ``value`` of
shape ``(frames, atoms, 3)`` float32, chunked one frame per chunk.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

FRAMES, ATOMS, BOX = 160, 256, 60.0
OUT = Path(__file__).with_name("chain.h5md")


def trajectory(seed: int = 7) -> np.ndarray:
    """A freely jointed chain (bond length 1.5) that diffuses and breathes over time."""
    rng = np.random.default_rng(seed)
    bonds = rng.normal(size=(ATOMS, 3))
    bonds *= 1.5 / np.linalg.norm(bonds, axis=1, keepdims=True)
    frames = np.empty((FRAMES, ATOMS, 3))
    for t in range(FRAMES):
        bonds += rng.normal(scale=0.3, size=bonds.shape)
        bonds *= 1.5 / np.linalg.norm(bonds, axis=1, keepdims=True)
        frames[t] = BOX / 2 + np.cumsum(bonds, axis=0) - bonds.sum(axis=0) / 2
    return frames.astype(np.float32)


def main() -> None:
    positions = trajectory()
    with h5py.File(OUT, "w", track_order=True) as f:
        h5md = f.create_group("h5md")
        h5md.attrs["version"] = np.array([1, 1], dtype=np.int32)
        h5md.create_group("author").attrs["name"] = "hpcflow"
        creator = h5md.create_group("creator")
        creator.attrs["name"] = "hpcflow scenarios/data/make_chain_h5md.py"
        creator.attrs["version"] = "1"
        chain = f.create_group("particles/chain")
        box = chain.create_group("box")
        box.attrs["dimension"] = np.int32(3)
        box.attrs["boundary"] = np.array([b"none"] * 3)
        box.create_dataset("edges", data=np.full(3, BOX, dtype=np.float32)).attrs["unit"] = "nm"
        pos = chain.create_group("position")
        value = pos.create_dataset("value", data=positions, chunks=(1, ATOMS, 3))
        value.attrs["unit"] = "nm"
        pos.create_dataset("step", data=np.arange(FRAMES, dtype=np.int64) * 1000)
        time = pos.create_dataset("time", data=np.arange(FRAMES, dtype=np.float64) * 2.0)
        time.attrs["unit"] = "ps"


if __name__ == "__main__":
    main()
