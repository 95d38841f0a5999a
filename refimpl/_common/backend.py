"""Backend dispatch: every critical loop has a ``numpy`` reference, a ``numba`` kernel and a
``torch`` path; ``auto`` picks torch for tensors and numba for arrays.

The result has the type of the input (a NumPy array in, a NumPy array out; a tensor in, a tensor
on the same device out) whatever backend computes it, so backends are interchangeable.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch

BACKENDS = ("numpy", "numba", "torch")


def resolve_backend(backend: str, x: Any) -> str:
    """Return the concrete backend name for ``backend`` (one of ``BACKENDS`` or ``"auto"``)."""
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a string, got {type(backend).__name__}")
    if backend == "auto":
        return "torch" if isinstance(x, torch.Tensor) else "numba"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {backend!r}")
    return backend


def to_numpy(x: Any) -> np.ndarray:
    """A NumPy view (or copy, for tensors off the CPU) of ``x``, detached from autograd."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def to_torch(x: Any, like: Any = None) -> torch.Tensor:
    """``x`` as a tensor, on ``like``'s device when ``like`` is a tensor."""
    t = x if isinstance(x, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(x))
    if isinstance(like, torch.Tensor):
        t = t.to(like.device)
    return t


def like_input(result: Any, x: Any) -> Any:
    """Convert ``result`` back to the type (and device) of the input ``x``."""
    if isinstance(x, torch.Tensor):
        return to_torch(result, like=x)
    return to_numpy(result)
