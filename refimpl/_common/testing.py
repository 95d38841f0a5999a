"""Comparison with reasons: max absolute and relative error, and an assert that reports both."""
from __future__ import annotations

from typing import Any

import numpy as np

from refimpl._common.backend import to_numpy


def max_errors(actual: Any, expected: Any) -> tuple[float, float]:
    """``(max |a - e|, max |a - e| / max |e|)`` in float64. The relative error is taken against the
    largest expected magnitude, so entries near zero do not blow it up."""
    a = to_numpy(actual).astype(np.float64)
    e = to_numpy(expected).astype(np.float64)
    if a.shape != e.shape:
        raise ValueError(f"shapes differ: actual {a.shape} vs expected {e.shape}")
    if a.size == 0:
        return 0.0, 0.0
    abs_err = float(np.max(np.abs(a - e)))
    scale = float(np.max(np.abs(e)))
    return abs_err, (abs_err / scale if scale > 0 else abs_err)


def assert_close(actual: Any, expected: Any, *, rtol: float = 1e-5, atol: float = 1e-8,
                 name: str = "value") -> tuple[float, float]:
    """Assert ``|a - e| <= atol + rtol * |e|`` elementwise; on failure the message gives the max
    absolute and relative error and where the worst element is. Returns ``max_errors``."""
    a = to_numpy(actual).astype(np.float64)
    e = to_numpy(expected).astype(np.float64)
    abs_err, rel_err = max_errors(a, e)
    if np.isnan(a).any() or np.isnan(e).any():
        if not np.array_equal(np.isnan(a), np.isnan(e)):
            raise AssertionError(f"{name}: NaNs in different places")
    bad = np.abs(a - e) > atol + rtol * np.abs(e)
    bad &= ~(np.isnan(a) & np.isnan(e))
    if bad.any():
        idx = np.unravel_index(np.argmax(np.where(bad, np.abs(a - e), -1.0)), a.shape)
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{a.size} elements differ beyond atol={atol:g}, rtol={rtol:g}; "
            f"max abs err {abs_err:.3e}, max rel err {rel_err:.3e}; worst at {tuple(int(i) for i in idx)}: "
            f"{a[idx]!r} vs {e[idx]!r}")
    return abs_err, rel_err
