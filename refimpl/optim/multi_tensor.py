"""The critical loop shared by the optimizers of Part "optim": per-tensor reductions and per-tensor
scaled updates over many parameter tensors, computed on one flat vector.

The tensors p_1 .. p_K of a parameter group (any shapes, one dtype) are laid end to end in a flat
vector of n = sum_k |p_k| elements; segment k is ``flat[offsets[k]:offsets[k+1]]`` and ``k(i)`` is the
segment of element i. Layer-wise optimizers (LARS, LAMB, AdamP, ...) need, per tensor,

    (1) sumsq_k = sum_{i in k} x_i^2                  (so ||p_k|| = sqrt(sumsq_k))
    (2) dot_k   = sum_{i in k} x_i * y_i
    (3) x_i    <- x_i + a_{k(i)} * y_i                (a per-tensor scaled update, in place)

Backends: ``"numpy"`` (readable reference: one NumPy call per segment), ``"numba"`` (one parallel
kernel, one segment per thread, vectorised sums of 1024-element chunks in the input dtype added in float64), ``"torch"`` (device-agnostic: the flat
tensor split into segment views). ``"auto"``: torch for tensors, numba for arrays. Reductions return
float64 for the numpy/numba backends and the input's dtype for torch.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from numba import njit, prange

from refimpl._common.backend import resolve_backend
from refimpl._common.kernels import FASTMATH as _FASTMATH
from refimpl._common.validate import check_floating

__all__ = ["SegmentLayout", "segment_sumsq", "segment_dot", "segment_axpy"]

# Elements reduced in the input dtype before the partial sum is added to a float64 accumulator.
_CHUNK = 1024


class SegmentLayout:
    """Where each of K tensors lives in a flat vector: ``offsets`` (K+1,) int64, ``shapes``.

    ``SegmentLayout.of(tensors)`` builds it from tensors or arrays; ``flatten`` concatenates them
    (a copy); ``unflatten`` returns views of a flat vector with the original shapes.
    """

    def __init__(self, shapes: Sequence[Sequence[int]]):
        self.shapes = [tuple(int(d) for d in s) for s in shapes]
        if not self.shapes:
            raise ValueError("a SegmentLayout needs at least one tensor")
        if any(d < 0 for s in self.shapes for d in s):
            raise ValueError(f"shapes must have non-negative dimensions, got {self.shapes}")
        sizes = [math.prod(s) for s in self.shapes]
        self.offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    @classmethod
    def of(cls, tensors: Sequence[Any]) -> "SegmentLayout":
        return cls([tuple(t.shape) for t in tensors])

    @property
    def numel(self) -> int:
        return int(self.offsets[-1])

    @property
    def sizes(self) -> list[int]:
        return np.diff(self.offsets).tolist()

    def __len__(self) -> int:
        return len(self.shapes)

    def flatten(self, tensors: Sequence[Any]) -> Any:
        if [tuple(t.shape) for t in tensors] != self.shapes:
            raise ValueError(f"tensors have shapes {[tuple(t.shape) for t in tensors]}, the layout {self.shapes}")
        if isinstance(tensors[0], torch.Tensor):
            return torch.cat([t.reshape(-1) for t in tensors])
        return np.concatenate([np.asarray(t).reshape(-1) for t in tensors])

    def unflatten(self, flat: Any) -> list[Any]:
        self.check(flat, "flat")
        return [flat[a:b].reshape(s) for a, b, s in zip(self.offsets[:-1], self.offsets[1:], self.shapes)]

    def check(self, flat: Any, name: str) -> None:
        check_floating(flat, name)
        if flat.ndim != 1 or flat.shape[0] != self.numel:
            raise ValueError(f"{name} must be a flat vector of {self.numel} elements, got shape {tuple(flat.shape)}")

    def __repr__(self) -> str:
        return f"SegmentLayout({len(self)} tensors, {self.numel} elements)"


# ----------------------------------------------------------------------------- numba kernels
@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _dot_numba(x, y, offsets, out):
    """One segment per parallel iteration; within it, float64 sums of chunks that are reduced in x's
    dtype over zero-based slices (no wrap-around checks, so the loop vectorises)."""
    T = x.dtype.type
    for k in prange(offsets.shape[0] - 1):
        acc = 0.0
        for lo in range(offsets[k], offsets[k + 1], _CHUNK):
            hi = min(lo + _CHUNK, offsets[k + 1])
            xs, ys = x[lo:hi], y[lo:hi]
            part = T(0)
            for i in range(hi - lo):
                part += xs[i] * ys[i]                                     # (1), (2)
            acc += np.float64(part)
        out[k] = acc


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _axpy_numba(x, a, y, offsets):
    T = x.dtype.type
    for k in prange(offsets.shape[0] - 1):
        ak = T(a[k])
        xs, ys = x[offsets[k]:offsets[k + 1]], y[offsets[k]:offsets[k + 1]]
        for i in range(xs.shape[0]):
            xs[i] += ak * ys[i]                                           # (3)


# ----------------------------------------------------------------------------- public API
def _check_pair(x: Any, y: Any, layout: SegmentLayout) -> None:
    layout.check(x, "x")
    layout.check(y, "y")
    if type(x) is not type(y) or x.dtype != y.dtype:
        raise TypeError(f"x and y must be of one type and dtype, got {type(x).__name__} {x.dtype} "
                        f"and {type(y).__name__} {y.dtype}")


def segment_dot(x: Any, y: Any, layout: SegmentLayout, backend: str = "auto") -> Any:
    """Per-segment dot products (eq. 2): x, y flat (n,) of one floating dtype -> (K,)."""
    _check_pair(x, y, layout)
    backend = resolve_backend(backend, x)
    if backend == "torch":
        xt, yt = torch.as_tensor(x), torch.as_tensor(y)
        out = torch.stack([(a * b).sum() for a, b in zip(xt.split(layout.sizes), yt.split(layout.sizes))])
        return out if isinstance(x, torch.Tensor) else out.numpy().astype(np.float64)
    xa, ya = np.asarray(x), np.asarray(y)
    if backend == "numpy":
        out = np.array([np.dot(xa[a:b].astype(np.float64), ya[a:b].astype(np.float64))
                        for a, b in zip(layout.offsets[:-1], layout.offsets[1:])])
    else:
        out = np.empty(len(layout))
        _dot_numba(xa, ya, layout.offsets, out)
    return torch.from_numpy(out) if isinstance(x, torch.Tensor) else out


def segment_sumsq(x: Any, layout: SegmentLayout, backend: str = "auto") -> Any:
    """Per-segment sums of squares (eq. 1): x flat (n,) -> (K,); ``sqrt`` gives the tensors' norms."""
    return segment_dot(x, x, layout, backend)


def segment_axpy(x: Any, a: Any, y: Any, layout: SegmentLayout, backend: str = "auto") -> Any:
    """In place, x_i += a_{k(i)} * y_i (eq. 3). x, y flat (n,); a (K,) per-segment scales. Returns x."""
    _check_pair(x, y, layout)
    if tuple(a.shape) != (len(layout),):
        raise ValueError(f"a must hold one scale per segment, shape ({len(layout)},), got {tuple(a.shape)}")
    backend = resolve_backend(backend, x)
    if backend == "torch":
        xt, yt = torch.as_tensor(x), torch.as_tensor(y)
        at = torch.as_tensor(a, dtype=xt.dtype, device=xt.device)
        xt.add_(torch.repeat_interleave(at, torch.as_tensor(layout.sizes, device=xt.device)) * yt)
        return x
    xa, ya = np.asarray(x), np.asarray(y)
    aa = np.asarray(a.detach().cpu() if isinstance(a, torch.Tensor) else a, dtype=np.float64)
    if backend == "numpy":
        for k, (lo, hi) in enumerate(zip(layout.offsets[:-1], layout.offsets[1:])):
            xa[lo:hi] += xa.dtype.type(aa[k]) * ya[lo:hi]
    else:
        _axpy_numba(xa, aa, ya, layout.offsets)
    return x
