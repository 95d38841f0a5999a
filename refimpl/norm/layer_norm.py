"""Layer Normalization (Ba, Kiros & Hinton, 2016, arXiv:1607.06450).

For every example (row) ``a`` of ``H`` summed inputs, with gain ``g`` and bias ``b``:

    (1) mu      = 1/H * sum_i a_i
    (2) sigma^2 = 1/H * sum_i (a_i - mu)^2            (biased variance, as in the paper and torch)
    (3) xhat_i  = (a_i - mu) / sqrt(sigma^2 + eps)
    (4) y_i     = g_i * xhat_i + b_i

and the hand-derived backward pass, with ``ghat = g * dy`` and ``rstd = 1/sqrt(sigma^2 + eps)``:

    (5) dg   = sum over rows of dy * xhat,      db = sum over rows of dy
    (6) dx_i = rstd * (ghat_i - mean(ghat) - xhat_i * mean(ghat * xhat))

The statistics of two parts A and B of a row (counts n_A, n_B, means, and sums of squared
deviations M2) merge exactly (Chan, Golub & LeVeque's parallel form of Welford's update):

    (7) delta = mu_B - mu_A,  mu = mu_A + delta * n_B / n,  M2 = M2_A + M2_B + delta^2 * n_A * n_B / n

The critical loop is the row-wise reduction (1)-(2). Three interchangeable backends compute it:
``"numpy"`` (readable reference), ``"numba"`` (a parallel kernel that reads each row once, combining
per-chunk statistics with Chan's parallel form of Welford's update), ``"torch"`` (vectorised,
device-agnostic, differentiable through :class:`LayerNormFunction`).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from numba import njit, prange

from refimpl._common.backend import like_input, resolve_backend, to_numpy, to_torch
from refimpl._common.validate import check_floating, check_positive
from refimpl._common.kernels import FASTMATH as _FASTMATH, row_blocks

__all__ = ["layer_norm", "layer_norm_backward", "row_stats", "LayerNormFunction", "LayerNorm"]

# Elements of a row reduced together before their statistics are merged (eq. 7 of the chapter);
# small enough to stay in L1 between the kernel's two looks at it.
_CHUNK = 256


# ----------------------------------------------------------------------------- validation
def _normalized_shape(normalized_shape: int | Sequence[int]) -> tuple[int, ...]:
    if isinstance(normalized_shape, (int, np.integer)) and not isinstance(normalized_shape, bool):
        normalized_shape = (int(normalized_shape),)
    try:
        if isinstance(normalized_shape, str):
            raise TypeError
        shape = tuple(int(s) for s in normalized_shape)
    except (TypeError, ValueError):
        raise TypeError(f"normalized_shape must be an int or a sequence of ints, got "
                        f"{normalized_shape!r}") from None
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"normalized_shape must be a non-empty sequence of positive ints, got {shape}")
    return shape


def _check_inputs(x: Any, normalized_shape, weight: Any, bias: Any, eps: float):
    check_floating(x, "x")
    shape = _normalized_shape(normalized_shape)
    eps = check_positive(eps, "eps")
    k = len(shape)
    if x.ndim < k or tuple(x.shape[x.ndim - k:]) != shape:
        raise ValueError(f"normalized_shape {shape} does not match the trailing dimensions of x "
                         f"with shape {tuple(x.shape)}")
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        check_floating(p, name)
        if tuple(p.shape) != shape:
            raise ValueError(f"{name} must have shape normalized_shape={shape}, got {tuple(p.shape)}")
    return shape, eps


def _check_stats(mean: Any, x: Any) -> None:
    """NaN/inf anywhere in a row shows up in that row's mean: a cheap check on N numbers instead
    of N*H. Skipped on accelerators, where reading the answer back would stall the device."""
    if isinstance(mean, torch.Tensor):
        if mean.device.type != "cpu":
            return
        bad = ~torch.isfinite(mean)
        if bad.any():
            raise ValueError(f"x contains NaN or infinity (first in row {int(bad.nonzero()[0, 0])} of "
                             f"the {mean.numel()} normalized rows)")
        return
    bad = ~np.isfinite(mean)
    if bad.any():
        raise ValueError(f"x contains NaN or infinity (first in row {int(np.flatnonzero(bad)[0])} of "
                         f"the {mean.size} normalized rows)")


# ----------------------------------------------------------------------------- numpy reference
def _forward_numpy(x2: np.ndarray, eps: float):
    with np.errstate(invalid="ignore", over="ignore"):       # NaN/inf rows are reported by _check_stats
        mu = x2.mean(axis=1, keepdims=True)                   # (1)
        var = ((x2 - mu) ** 2).mean(axis=1, keepdims=True)    # (2)
        rstd = 1.0 / np.sqrt(var + eps)
        xhat = (x2 - mu) * rstd                               # (3)
    return xhat, mu[:, 0], rstd[:, 0]


def _backward_numpy(dy2, x2, mean, rstd, w):
    xhat = (x2 - mean[:, None]) * rstd[:, None]
    ghat = dy2 * w                                            # g * dy
    dx = rstd[:, None] * (ghat - ghat.mean(axis=1, keepdims=True)
                          - xhat * (ghat * xhat).mean(axis=1, keepdims=True))    # (6)
    return dx, (dy2 * xhat).sum(axis=0), dy2.sum(axis=0)     # (5)


# ----------------------------------------------------------------------------- numba kernels
# Reassociation lets LLVM vectorise the reductions; no `nnan`/`ninf`, so NaN still propagates
# into the row statistics, where _check_stats finds it.


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _chunk_stats(xr, start, k, T):
    """Mean and sum of squared deviations of xr[start:start+k], in x's dtype T: two short sweeps
    over a chunk that sits in L1, each a loop of fixed shape that the compiler vectorises."""
    s = T(0)
    for j in range(k):
        s += xr[start + j]
    cmean = T(s / k)
    q = T(0)
    for j in range(k):
        d = xr[start + j] - cmean
        q += d * d
    return cmean, q


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _row_stats(xr):
    """Mean and M2 = sum (x - mean)^2 of one row, reading it from memory once: the statistics of
    each chunk are merged into the running ones with Chan's parallel form of Welford's update
    (eq. 7), in float64."""
    h = xr.shape[0]
    T = xr.dtype.type
    nfull = h // _CHUNK
    count = 0
    mean = 0.0
    m2 = 0.0
    for c in range(nfull + 1):
        k = _CHUNK if c < nfull else h - nfull * _CHUNK
        if k == 0:
            break
        cmean, q = _chunk_stats(xr, c * _CHUNK, k, T)
        total = count + k
        delta = cmean - mean
        mean += delta * k / total
        m2 += q + delta * delta * (count * k / total)
        count = total
    return mean, m2


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _stats_numba(x, eps, mean, rstd):
    n, h = x.shape
    for r in prange(n):
        mu, m2 = _row_stats(x[r])
        mean[r] = mu
        rstd[r] = 1.0 / math.sqrt(m2 / h + eps)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _forward_numba(x, w, b, eps, y, mean, rstd):
    n, h = x.shape
    T = x.dtype.type
    for r in prange(n):
        xr = x[r]
        yr = y[r]
        mu, m2 = _row_stats(xr)                               # (1), (2), (7)
        rs = 1.0 / math.sqrt(m2 / h + eps)
        mean[r] = mu
        rstd[r] = rs
        mu_t = T(mu)
        scale = T(rs)
        for j in range(h):
            yr[j] = (xr[j] - mu_t) * scale * w[j] + b[j]      # (3), (4)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _backward_numba(dy, x, mean, rstd, w, dx, dw_part, db_part):
    """dx row by row (eq. 6); dg and db (eq. 5) as one partial sum per block of rows, so that the
    parallel loop never writes to shared memory."""
    n, h = x.shape
    T = x.dtype.type
    nblocks = dw_part.shape[0]
    for blk in prange(nblocks):
        dwb = dw_part[blk]
        dbb = db_part[blk]
        for r in range(blk * n // nblocks, (blk + 1) * n // nblocks):
            xr = x[r]
            dyr = dy[r]
            dxr = dx[r]
            mu_t = T(mean[r])
            scale = T(rstd[r])
            a = T(0)
            c = T(0)
            for j in range(h):
                xh = (xr[j] - mu_t) * scale
                gh = dyr[j] * w[j]
                a += gh
                c += gh * xh
                dwb[j] += dyr[j] * xh
                dbb[j] += dyr[j]
            a = T(a / h)
            c = T(c / h)
            for j in range(h):
                xh = (xr[j] - mu_t) * scale
                dxr[j] = scale * (dyr[j] * w[j] - a - xh * c)


def _forward_numba_host(x2, w, b, eps):
    n = x2.shape[0]
    y = np.empty_like(x2)
    mean = np.empty(n, dtype=np.float64)
    rstd = np.empty(n, dtype=np.float64)
    _forward_numba(x2, w, b, eps, y, mean, rstd)
    return y, mean, rstd


def _backward_numba_host(dy2, x2, mean, rstd, w):
    n, h = x2.shape
    nblocks = row_blocks(n, x2.size)
    dx = np.empty_like(x2)
    dw = np.zeros((nblocks, h), dtype=x2.dtype)
    db = np.zeros((nblocks, h), dtype=x2.dtype)
    _backward_numba(dy2, x2, mean, rstd, w, dx, dw, db)
    return dx, dw.sum(axis=0).astype(x2.dtype), db.sum(axis=0).astype(x2.dtype)


# ----------------------------------------------------------------------------- torch path
def _forward_torch(x2: torch.Tensor, eps: float):
    mu = x2.mean(dim=1, keepdim=True)                                       # (1)
    centered = x2 - mu
    rstd = torch.rsqrt(centered.square().mean(dim=1, keepdim=True) + eps)   # (2)
    return centered * rstd, mu[:, 0], rstd[:, 0]                            # (3)


def _backward_torch(dy2, xhat, rstd, w):
    ghat = dy2 * w if w is not None else dy2
    dx = rstd[:, None] * (ghat - ghat.mean(dim=1, keepdim=True)
                          - xhat * (ghat * xhat).mean(dim=1, keepdim=True))   # (6)
    return dx, (dy2 * xhat).sum(dim=0), dy2.sum(dim=0)                      # (5)


class LayerNormFunction(torch.autograd.Function):
    """Layer norm with the hand-derived backward (eqs. 5-6) instead of autograd's tape.

    ``apply(x, weight, bias, normalized_shape, eps)``: x (..., *normalized_shape); weight and bias
    (*normalized_shape,) or None. Saves xhat and rstd for the backward pass.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, normalized_shape, eps):
        h = math.prod(normalized_shape)
        x2 = x.reshape(-1, h)
        xhat, mean, rstd = _forward_torch(x2, eps)
        y = xhat
        if weight is not None:
            y = y * weight.reshape(h)
        if bias is not None:
            y = y + bias.reshape(h)
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.h = h
        ctx.has_bias = bias is not None
        ctx.mark_non_differentiable(mean, rstd)
        return y.reshape(x.shape), mean, rstd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, _dmean, _drstd):
        xhat, rstd, weight = ctx.saved_tensors
        w = weight.reshape(ctx.h) if weight is not None else None
        dx, dw, db = _backward_torch(dy.reshape(-1, ctx.h), xhat, rstd, w)
        dw = dw.reshape(weight.shape) if weight is not None and ctx.needs_input_grad[1] else None
        db = db.reshape(weight.shape if weight is not None else (ctx.h,)) if ctx.has_bias else None
        if db is not None and not ctx.needs_input_grad[2]:
            db = None
        return dx.reshape(dy.shape), dw, db, None, None


# ----------------------------------------------------------------------------- public API
def _affine_numpy(p, h, fill, dtype):
    return np.full(h, fill, dtype=dtype) if p is None else np.ascontiguousarray(to_numpy(p).reshape(h), dtype=dtype)


def layer_norm(x: Any, normalized_shape: int | Sequence[int], weight: Any = None, bias: Any = None,
               eps: float = 1e-5, backend: str = "auto") -> Any:
    """Layer normalization over the trailing ``normalized_shape`` dimensions (eqs. 1-4).

    Args:
        x: array or tensor of shape (..., *normalized_shape), floating dtype, finite.
        normalized_shape: int or tuple; the trailing dimensions that are normalized together.
        weight, bias: gain g and bias b of shape normalized_shape, or None (g = 1, b = 0).
        eps: > 0, added to the variance.
        backend: "numpy" | "numba" | "torch" | "auto" (torch for tensors, numba for arrays).
    Returns:
        y with x's shape and dtype, of x's type (array or tensor on x's device). Gradients flow
        only through the torch backend (via :class:`LayerNormFunction`).
    """
    shape, eps = _check_inputs(x, normalized_shape, weight, bias, eps)
    backend = resolve_backend(backend, x)
    h = math.prod(shape)
    if backend == "torch":
        xt = to_torch(x)
        wt = None if weight is None else to_torch(weight, like=xt)
        bt = None if bias is None else to_torch(bias, like=xt)
        y, mean, _ = LayerNormFunction.apply(xt, wt, bt, shape, eps)
        _check_stats(mean, x)
        return y if isinstance(x, torch.Tensor) else y.detach().numpy()
    x2 = np.ascontiguousarray(to_numpy(x)).reshape(-1, h)
    if backend == "numpy":
        xhat, mean, _ = _forward_numpy(x2, eps)
        y = xhat
        if weight is not None:
            y = y * to_numpy(weight).reshape(h)
        if bias is not None:
            y = y + to_numpy(bias).reshape(h)
    else:
        w = _affine_numpy(weight, h, 1.0, x2.dtype)
        b = _affine_numpy(bias, h, 0.0, x2.dtype)
        y, mean, _ = _forward_numba_host(x2, w, b, eps)
    _check_stats(mean, x)
    return like_input(y.astype(x2.dtype, copy=False).reshape(x.shape), x)


def row_stats(x: Any, normalized_shape: int | Sequence[int], eps: float = 1e-5,
              backend: str = "auto") -> tuple[Any, Any]:
    """The critical loop alone: per-row ``(mean, rstd)`` of x flattened to (N, H) (eqs. 1-2),
    float64 for the numpy/numba backends, x's dtype for torch. Shapes (N,), (N,)."""
    shape, eps = _check_inputs(x, normalized_shape, None, None, eps)
    backend = resolve_backend(backend, x)
    h = math.prod(shape)
    if backend == "torch":
        with torch.no_grad():
            _, mean, rstd = _forward_torch(to_torch(x).reshape(-1, h), eps)
    else:
        x2 = np.ascontiguousarray(to_numpy(x)).reshape(-1, h)
        if backend == "numpy":
            _, mean, rstd = _forward_numpy(x2.astype(np.float64), eps)
        else:
            mean = np.empty(x2.shape[0])
            rstd = np.empty(x2.shape[0])
            _stats_numba(x2, eps, mean, rstd)
    _check_stats(mean, x)
    return like_input(mean, x), like_input(rstd, x)


def layer_norm_backward(grad_out: Any, x: Any, normalized_shape: int | Sequence[int],
                        weight: Any = None, eps: float = 1e-5,
                        backend: str = "auto") -> tuple[Any, Any, Any]:
    """Gradients of layer norm by the hand-derived eqs. (5)-(6).

    Args:
        grad_out: dL/dy, same shape as x. x, normalized_shape, weight, eps: as in :func:`layer_norm`.
    Returns:
        ``(dx, dweight, dbias)``: dx like x; dweight and dbias of shape normalized_shape (dweight is
        returned even when weight is None, as the gradient for a gain of ones).
    """
    shape, eps = _check_inputs(x, normalized_shape, weight, None, eps)
    check_floating(grad_out, "grad_out")
    if tuple(grad_out.shape) != tuple(x.shape):
        raise ValueError(f"grad_out must have x's shape {tuple(x.shape)}, got {tuple(grad_out.shape)}")
    backend = resolve_backend(backend, x)
    h = math.prod(shape)
    if backend == "torch":
        xt = to_torch(x)
        x2 = xt.reshape(-1, h)
        with torch.no_grad():
            xhat, mean, rstd = _forward_torch(x2, eps)
            w = None if weight is None else to_torch(weight, like=xt).reshape(h)
            dx, dw, db = _backward_torch(to_torch(grad_out, like=xt).reshape(-1, h), xhat, rstd, w)
    else:
        x2 = np.ascontiguousarray(to_numpy(x)).reshape(-1, h)
        dy2 = np.ascontiguousarray(to_numpy(grad_out), dtype=x2.dtype).reshape(-1, h)
        w = _affine_numpy(weight, h, 1.0, x2.dtype)
        if backend == "numpy":
            _, mean, rstd = _forward_numpy(x2, eps)
            dx, dw, db = _backward_numpy(dy2, x2, mean, rstd, w)
        else:
            mean = np.empty(x2.shape[0])
            rstd = np.empty(x2.shape[0])
            _stats_numba(x2, eps, mean, rstd)
            dx, dw, db = _backward_numba_host(dy2, x2, mean, rstd, w)
    _check_stats(mean, x)
    return (like_input(dx.reshape(x.shape), x), like_input(dw.reshape(shape), x),
            like_input(db.reshape(shape), x))


class LayerNorm(torch.nn.Module):
    """``torch.nn.LayerNorm``'s interface on top of :class:`LayerNormFunction`.

    Input (..., *normalized_shape) -> output of the same shape. Gain initialised to 1, bias to 0.
    """

    def __init__(self, normalized_shape: int | Sequence[int], eps: float = 1e-5,
                 elementwise_affine: bool = True, bias: bool = True,
                 device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.normalized_shape = _normalized_shape(normalized_shape)
        self.eps = check_positive(eps, "eps")
        kw = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.ones(self.normalized_shape, **kw)) if elementwise_affine else None
        self.bias = (torch.nn.Parameter(torch.zeros(self.normalized_shape, **kw))
                     if elementwise_affine and bias else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps, backend="torch")

    def extra_repr(self) -> str:
        return (f"{self.normalized_shape}, eps={self.eps}, "
                f"elementwise_affine={self.weight is not None}, bias={self.bias is not None}")
