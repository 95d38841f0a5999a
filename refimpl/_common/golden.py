"""Golden fixtures: inputs and outputs of an official implementation saved as ``.npz``, next to a
``PROVENANCE.md`` that says how they were produced (tests/golden/<paper_id>/)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from refimpl._common.backend import to_numpy


def save_golden(path: str | Path, **arrays) -> Path:
    """Save named arrays (NumPy arrays, tensors or scalars) to ``path`` (a ``.npz`` file)."""
    path = Path(path)
    if path.suffix != ".npz":
        raise ValueError(f"golden fixtures are .npz files, got {path.name!r}")
    if not arrays:
        raise ValueError("save_golden needs at least one named array")
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **{k: to_numpy(v) for k, v in arrays.items()})
    return path


def load_golden(path: str | Path) -> dict[str, np.ndarray]:
    """Load a fixture saved by :func:`save_golden`; requires ``PROVENANCE.md`` beside it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no golden fixture at {path}")
    if not (path.parent / "PROVENANCE.md").exists():
        raise FileNotFoundError(f"{path.parent} has fixtures but no PROVENANCE.md")
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}
