"""Input validation at the public boundary: clear ``TypeError``/``ValueError`` messages that name
the argument and say what was expected."""
from __future__ import annotations

import numbers
from typing import Any

import numpy as np
import torch


def _dtype_name(x: Any) -> str:
    return str(x.dtype).replace("torch.", "")


def check_floating(x: Any, name: str) -> None:
    """Raise ``TypeError`` unless ``x`` is a NumPy array or tensor of a floating dtype."""
    if isinstance(x, torch.Tensor):
        ok = x.is_floating_point()
    elif isinstance(x, np.ndarray):
        ok = np.issubdtype(x.dtype, np.floating)
    else:
        raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(x).__name__}")
    if not ok:
        raise TypeError(f"{name} must have a floating-point dtype, got {_dtype_name(x)}")


def check_finite(x: Any, name: str) -> None:
    """Raise ``ValueError`` if ``x`` holds NaN or infinity."""
    finite = bool(torch.isfinite(x).all()) if isinstance(x, torch.Tensor) else bool(np.isfinite(x).all())
    if not finite:
        raise ValueError(f"{name} contains NaN or infinity")


def check_positive(value: Any, name: str) -> float:
    """Return ``value`` as a float, raising unless it is a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)
