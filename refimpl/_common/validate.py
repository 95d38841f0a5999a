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


def check_int(value: Any, name: str, minimum: int | None = None, maximum: int | None = None) -> int:
    """Return ``value`` as an ``int``; ``TypeError`` unless it is an integer (``bool`` is not), ``ValueError``
    unless ``minimum ≤ value`` (and ``value ≤ maximum`` when given)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    low = minimum is not None and value < minimum
    if maximum is not None and (low or value > maximum):
        raise ValueError(f"{name} must be in [{minimum}, {maximum}], got {value}")
    if low:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def check_betas(betas: Any, name: str = "betas") -> tuple[float, float]:
    """Return Adam-style ``(beta1, beta2)`` as floats, raising unless ``betas`` is a pair of real numbers in [0, 1)."""
    if isinstance(betas, (str, bytes)) or not hasattr(betas, "__len__") or len(betas) != 2:
        raise TypeError(f"{name} must be a pair (beta1, beta2), got {betas!r}")
    out = []
    for i, b in enumerate(betas):
        if isinstance(b, bool) or not isinstance(b, numbers.Real):
            raise TypeError(f"{name}[{i}] must be a real number, got {type(b).__name__}")
        if not 0.0 <= b < 1.0:
            raise ValueError(f"{name}[{i}] must lie in [0, 1), got {b!r}")
        out.append(float(b))
    return out[0], out[1]


def check_flat_buffers(named: dict[str, Any]) -> None:
    """Raise unless every value is a 1-D floating array/tensor of the first one's type, dtype and
    length (the flat buffers of an optimizer step). ``named``: {argument name: buffer}."""
    first_name, first = next(iter(named.items()))
    for name, a in named.items():
        check_floating(a, name)
        if a.ndim != 1:
            raise ValueError(f"{name} must be a flat 1-D buffer, got shape {tuple(a.shape)}")
        if type(a) is not type(first) or a.dtype != first.dtype:
            raise TypeError(f"{name} must have the type and dtype of {first_name} "
                            f"({type(first).__name__} {first.dtype}), got {type(a).__name__} {a.dtype}")
        if a.shape[0] != first.shape[0]:
            raise ValueError(f"{name} must have {first.shape[0]} elements like {first_name}, got {a.shape[0]}")
