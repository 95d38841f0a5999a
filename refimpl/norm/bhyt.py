"""Bounded Hyperbolic Tangent (BHyT) normalization (Bounded Hyperbolic Tangent: A Stable and
Efficient Alternative to Pre-Layer Normalization in Large Language Models, ICML 2026).

For one row ``x`` of ``H`` features (one token's hidden state), with gain ``w``, a scalar
``lam`` (lambda) and a constant ``kappa``:

    (1) s      = 1/H * sum_i x_i^2                       (second moment, computed once per block)
    (2) r      = 1 / (kappa * sqrt(s + eps))             (official ``rstd1``)
    (3) y_i    = w_i * tanh(lam * r * x_i)               (the BHyT pre-norm)

The argument of tanh has root-mean-square ``lam/kappa`` (0.2 for the repository's lam = 2,
kappa = 10): bounded, and inside tanh's near-linear range. The second norm of a block, applied to
``h = x + Attn(y)``, does not recompute statistics; it reuses ``s`` of the block input:

    (4) c      = ||W_V^T W_O^T||_F^2 / (T * d)           (``update_scaler``; W in nn.Linear layout)
    (5) s_hat  = s + c * lam_in^2 / kappa^2               (variance approximation of h)
    (6) r2     = 1 / (kappa * sqrt(s_hat + eps))         (official ``rstd2``)
    (7) y2_i   = w2_i * tanh(lam2 * r2 * h_i)

The backward pass, with ``a = lam * r``, ``t = tanh(a x)``, ``u = dy * w * (1 - t^2)`` and an
incoming gradient ``dvar`` on ``s`` (from the second norm, which reads ``s`` through eq. 5):

    (8)  dx_i  = a * u_i + (2/H) * x_i * (dvar - a * sum_j(u_j x_j) / (2 (s + eps)))
    (9)  dw_i  = sum over rows of dy_i * t_i,      dlam = sum over rows of r * sum_j u_j x_j
    (10) for eq. 7 (r2 does not depend on h): dh_i = a2 * u2_i,
         dvar = -a2 * sum_j(u2_j h_j) / (2 (s_hat + eps)),  dlam2 = sum over rows of r2 * sum_j u2_j h_j

``c`` and ``lam_in`` in eq. (5) are constants for the gradient (the official code computes c
under ``no_grad`` and detaches ``lam_in``); gradients do flow into ``x`` through ``s``.

The critical loop is the fused row-wise pass (1)-(3) and its backward (8)-(9). Backends:
``"numpy"`` (readable reference), ``"numba"`` (one parallel pass per row; in float32 a
vectorisable rational tanh, Eigen's ``generic_fast_tanh_float``, max abs error 3.4e-7, instead of
the scalar libm call), ``"torch"`` (vectorised, device-agnostic, differentiable through
:class:`BHyTFunction` and :class:`BHyTApproxFunction`).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from numba import njit, prange, types
from numba.extending import overload

from refimpl._common.backend import like_input, resolve_backend, to_numpy, to_torch
from refimpl._common.validate import check_floating, check_positive
from refimpl._common.kernels import FASTMATH as _FASTMATH, row_blocks

__all__ = ["bhyt", "bhyt_backward", "bhyt_stats", "bhyt_approx", "bhyt_approx_backward", "bhyt_approx_rstd",
           "attention_variance_scaler", "dyt", "BHyTFunction", "BHyTApproxFunction", "BHyT", "DyT"]

EPS = 1e-6          # hard-coded in the official code (the ``eps`` argument of its BHyT is unused)
KAPPA = 10.0        # ``bhyt_kappa`` of the repository's configs


# ----------------------------------------------------------------------------- validation
def _check_scalar(value: Any, name: str) -> float:
    """A Python/NumPy number or a one-element array/tensor, returned as a finite float."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        n = value.size if isinstance(value, np.ndarray) else value.numel()
        if n != 1:
            raise ValueError(f"{name} must be a scalar or a one-element tensor, got shape {tuple(value.shape)}")
        value = float(value.detach().reshape(-1)[0]) if isinstance(value, torch.Tensor) \
            else float(value.reshape(-1)[0])
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return value


def _check_x(x: Any, name: str = "x") -> int:
    check_floating(x, name)
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one dimension with a non-empty last (feature) "
                         f"dimension, got shape {tuple(x.shape)}")
    return int(x.shape[-1])


def _check_weight(weight: Any, h: int) -> None:
    if weight is None:
        return
    check_floating(weight, "weight")
    if tuple(weight.shape) != (h,):
        raise ValueError(f"weight must have shape ({h},) (the last dimension of x), got {tuple(weight.shape)}")


def _check_rows(v: Any, x: Any, name: str) -> None:
    check_floating(v, name)
    n_rows = math.prod(tuple(x.shape[:-1]))
    n_v = v.size if isinstance(v, np.ndarray) else v.numel()
    if n_v != n_rows:
        raise ValueError(f"{name} must hold one value per row of x (shape {tuple(x.shape[:-1])} + (1,)), "
                         f"got shape {tuple(v.shape)}")


def _check_finite_rows(s: Any, what: str = "x") -> None:
    """NaN/inf anywhere in a row shows up in that row's second moment (N checks instead of N*H).
    Skipped on accelerators, where reading the answer back would stall the device."""
    if isinstance(s, torch.Tensor):
        if s.device.type != "cpu":
            return
        bad = ~torch.isfinite(s.reshape(-1))
        if bad.any():
            raise ValueError(f"{what} contains NaN or infinity (first in row {int(bad.nonzero()[0, 0])})")
        return
    bad = ~np.isfinite(np.asarray(s).reshape(-1))
    if bad.any():
        raise ValueError(f"{what} contains NaN or infinity (first in row {int(np.flatnonzero(bad)[0])})")


# ----------------------------------------------------------------------------- numpy reference
def _forward_numpy(x2: np.ndarray, w: np.ndarray, lam: float, kappa: float, eps: float):
    T = x2.dtype.type
    with np.errstate(invalid="ignore", over="ignore"):        # NaN/inf rows are reported afterwards
        s = (x2 * x2).mean(axis=1, keepdims=True)             # (1)
        r = T(1.0) / (T(kappa) * np.sqrt(s + T(eps)))         # (2)
        t = np.tanh(T(lam) * r * x2)
    return w * t, s[:, 0], r[:, 0]                            # (3)


def _backward_numpy(dy2, x2, w, a, inv_s, dvar, stats: bool):
    """Eqs. (8)-(10) for rows with per-row slope ``a = lam * r``; ``inv_s = 1/(s + eps)``.
    Returns dx, dw, and per row sum_j u_j x_j (for dlam and, in eq. 10, dvar)."""
    t = np.tanh(a[:, None] * x2)
    u = dy2 * w * (1 - t * t)
    sux = (u * x2).sum(axis=1)
    dx = a[:, None] * u
    if stats:                                                  # (8): the path through s
        h = x2.shape[1]
        dx = dx + (2.0 / h) * x2 * (dvar - 0.5 * a * sux * inv_s)[:, None]
    return dx, (dy2 * t).sum(axis=0), sux                      # (9)


# ----------------------------------------------------------------------------- numba kernels
# Reassociation lets LLVM vectorise the reductions; no `nnan`/`ninf`, so NaN still propagates
# into the row statistics, where _check_finite_rows finds it.
_CHUNK = 512

# Eigen's generic_fast_tanh_float: an odd 13/6 rational minimax fit on [-7.905, 7.905].
_A1, _A3, _A5, _A7 = 4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05, 5.12229709037114e-08
_A9, _A11, _A13 = -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16
_B0, _B2, _B4, _B6 = 4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06
_CLAMP = 7.90531110763549805


def _tanh(z):
    """tanh(z) in z's dtype (numba only; the implementation is picked at compile time below)."""
    return math.tanh(z)


@overload(_tanh, inline="always", fastmath=_FASTMATH)
def _tanh_impl(z):
    """float32: the rational fit (branch-free, so the loops around it vectorise); float64: libm's
    tanh, because the fit's 3e-7 error would be too coarse there."""
    if isinstance(z, types.Float) and z.bitwidth == 32:
        def impl(z):
            c = np.float32(_CLAMP)
            z = min(max(z, -c), c)
            z2 = z * z
            p = z * (np.float32(_A1) + z2 * (np.float32(_A3) + z2 * (np.float32(_A5) + z2 * (
                np.float32(_A7) + z2 * (np.float32(_A9) + z2 * (np.float32(_A11) + z2 * np.float32(_A13)))))))
            q = np.float32(_B0) + z2 * (np.float32(_B2) + z2 * (np.float32(_B4) + z2 * np.float32(_B6)))
            return p / q
        return impl
    return lambda z: math.tanh(z)


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _chunk_sumsq(xr, start, k, T):
    """sum of squares of xr[start:start+k] in T: a loop of fixed shape that LLVM vectorises."""
    acc = T(0)
    for j in range(k):
        acc += xr[start + j] * xr[start + j]
    return acc


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _sumsq(xr, T):
    """sum_i x_i^2 of one row: chunks of _CHUNK elements summed in T (vectorised), merged in float64."""
    h = xr.shape[0]
    nfull = h // _CHUNK
    total = 0.0
    for c in range(nfull):
        total += _chunk_sumsq(xr, c * _CHUNK, _CHUNK, T)
    total += _chunk_sumsq(xr, nfull * _CHUNK, h - nfull * _CHUNK, T)
    return total


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _stats_numba(x, kappa, eps, s_out, r_out):
    n, h = x.shape
    T = x.dtype.type
    for i in prange(n):
        s = _sumsq(x[i], T) / h                                    # (1)
        s_out[i] = s
        r_out[i] = 1.0 / (kappa * math.sqrt(s + eps))             # (2)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _forward_numba(x, w, lam, kappa, eps, y, s_out, r_out):
    n, h = x.shape
    T = x.dtype.type
    for i in prange(n):
        xr = x[i]
        yr = y[i]
        s = _sumsq(xr, T) / h                                      # (1)
        r = 1.0 / (kappa * math.sqrt(s + eps))                     # (2)
        s_out[i] = s
        r_out[i] = r
        a = T(lam * r)
        for j in range(h):
            yr[j] = w[j] * _tanh(a * xr[j])                     # (3)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _apply_numba(x, w, a_rows, y):
    """Eq. (7): tanh with a given per-row slope a = lam * r (no statistics read)."""
    n, h = x.shape
    T = x.dtype.type
    for i in prange(n):
        xr = x[i]
        yr = y[i]
        a = T(a_rows[i])
        for j in range(h):
            yr[j] = w[j] * _tanh(a * xr[j])


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _backward_numba(dy, x, w, a_rows, inv_s, dvar, stats, dx, sux_out, dw_part):
    """Eqs. (8)-(10), one block of rows per thread: pass 1 writes u = dy*w*(1-t^2) into dx and
    sums u*x and dy*t; pass 2 turns u into dx in place. dw is one partial sum per block, so the
    parallel loop never writes to shared memory."""
    n, h = x.shape
    T = x.dtype.type
    nblocks = dw_part.shape[0]
    for blk in prange(nblocks):
        dwb = dw_part[blk]
        for i in range(blk * n // nblocks, (blk + 1) * n // nblocks):
            xr = x[i]
            dyr = dy[i]
            dxr = dx[i]
            a = T(a_rows[i])
            acc = T(0)
            for j in range(h):
                t = _tanh(a * xr[j])
                dwb[j] += dyr[j] * t
                u = dyr[j] * w[j] * (T(1) - t * t)
                dxr[j] = u
                acc += u * xr[j]
            sux_out[i] = acc
            if stats:
                coef = T((2.0 / h) * (dvar[i] - 0.5 * a_rows[i] * acc * inv_s[i]))
                for j in range(h):
                    dxr[j] = a * dxr[j] + coef * xr[j]             # (8)
            else:
                for j in range(h):
                    dxr[j] = a * dxr[j]                            # (10)


def _backward_numba_host(dy2, x2, w, a, inv_s, dvar, stats: bool):
    n, h = x2.shape
    nblocks = row_blocks(n, x2.size)
    dx = np.empty_like(x2)
    sux = np.empty(n, dtype=np.float64)
    dw = np.zeros((nblocks, h), dtype=x2.dtype)
    _backward_numba(dy2, x2, w, a, inv_s, dvar, stats, dx, sux, dw)
    return dx, dw.sum(axis=0).astype(x2.dtype), sux


# ----------------------------------------------------------------------------- torch path
def _var_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics in float32 for half/bfloat16 inputs (as the official ``var_dtype``), else x's dtype."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _stats_torch(x2: torch.Tensor, kappa: float, eps: float):
    s = x2.square().mean(dim=-1, keepdim=True, dtype=_var_dtype(x2))            # (1)
    r = torch.rsqrt(s + eps) * (1.0 / kappa)                                    # (2)
    return s, r


def _backward_torch(dy2, x2, t, w, a, inv_s, dvar, stats: bool):
    u = dy2 * (1 - t * t)
    if w is not None:
        u = u * w
    sux = (u * x2).sum(dim=-1, keepdim=True, dtype=a.dtype)
    dx = a.to(x2.dtype) * u
    if stats:
        coef = (2.0 / x2.shape[-1]) * (dvar - 0.5 * a * sux * inv_s)
        dx = dx + coef.to(x2.dtype) * x2                                        # (8)
    return dx, sux


def _lam_tensor(lam: Any, like: torch.Tensor) -> torch.Tensor:
    """lam as a tensor on x's device: a tensor is used as is (so that it receives a gradient)."""
    if isinstance(lam, torch.Tensor):
        return lam.to(like.device)
    return torch.tensor(_check_scalar(lam, "lam"), dtype=like.dtype, device=like.device)


def _reduce_like(g: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    return g.reshape(p.shape).to(p.dtype)


class BHyTFunction(torch.autograd.Function):
    """BHyT with exact statistics (eqs. 1-3) and the hand-derived backward (eqs. 8-9).

    ``apply(x, weight, lam, kappa, eps) -> (y, s)``: x (..., H); weight (H,) or None; lam a tensor
    with one element (gradient returned in its shape). ``s`` (..., 1) is the row second moment in
    the statistics dtype; it is differentiable, because the block's second norm reads it (eq. 5).
    """

    @staticmethod
    def forward(ctx, x, weight, lam, kappa, eps):
        s, r = _stats_torch(x, kappa, eps)
        a = lam.to(r.dtype).reshape(()) * r
        t = torch.tanh(a.to(x.dtype) * x)
        y = t if weight is None else weight * t
        ctx.save_for_backward(x, t, weight, lam, r, a, s)
        ctx.eps = eps
        return y, s

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, dvar):
        x, t, weight, lam, r, a, s = ctx.saved_tensors
        if dvar is None:
            dvar = torch.zeros_like(s)
        dx, sux = _backward_torch(dy, x, t, weight, a, 1.0 / (s + ctx.eps), dvar, True)
        dw = None
        if weight is not None and ctx.needs_input_grad[1]:
            dw = _reduce_like((dy * t).reshape(-1, x.shape[-1]).sum(0), weight)
        dlam = _reduce_like((r * sux).sum(), lam) if ctx.needs_input_grad[2] else None
        return dx, dw, dlam, None, None


class BHyTApproxFunction(torch.autograd.Function):
    """The block's second norm (eqs. 5-7) with the backward of eq. (10).

    ``apply(h, s, weight, lam, correction, kappa, eps) -> y2``: h (..., H); s (..., 1) the second
    moment of the block input (from :class:`BHyTFunction`); ``correction = c * lam_in^2 / kappa^2``
    a constant (no gradient, as in the official code).
    """

    @staticmethod
    def forward(ctx, h, s, weight, lam, correction, kappa, eps):
        s_hat = s + correction                                                  # (5)
        r2 = torch.rsqrt(s_hat + eps) * (1.0 / kappa)                           # (6)
        a = lam.to(r2.dtype).reshape(()) * r2
        t = torch.tanh(a.to(h.dtype) * h)
        y = t if weight is None else weight * t                                 # (7)
        ctx.save_for_backward(h, t, weight, lam, r2, a, s_hat)
        ctx.eps = eps
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        h, t, weight, lam, r2, a, s_hat = ctx.saved_tensors
        dh, sux = _backward_torch(dy, h, t, weight, a, None, None, False)
        ds = -0.5 * a * sux / (s_hat + ctx.eps)                                # (10)
        dw = None
        if weight is not None and ctx.needs_input_grad[2]:
            dw = _reduce_like((dy * t).reshape(-1, h.shape[-1]).sum(0), weight)
        dlam = _reduce_like((r2 * sux).sum(), lam) if ctx.needs_input_grad[3] else None
        return dh, ds.to(s_hat.dtype), dw, dlam, None, None, None


# ----------------------------------------------------------------------------- public API
def _weight_numpy(weight: Any, h: int, dtype) -> np.ndarray:
    if weight is None:
        return np.ones(h, dtype=dtype)
    return np.ascontiguousarray(to_numpy(weight).reshape(h), dtype=dtype)


def _hyper(kappa: float, eps: float) -> tuple[float, float]:
    return check_positive(kappa, "kappa"), check_positive(eps, "eps")


def bhyt_stats(x: Any, kappa: float = KAPPA, eps: float = EPS, backend: str = "auto") -> tuple[Any, Any]:
    """Row statistics of eqs. (1)-(2), the official ``compute_rstd1``.

    Args:
        x: (..., H) floating array or tensor, finite.
        kappa, eps: > 0.
    Returns:
        ``(r, s)`` of shape (..., 1): ``r = 1/(kappa sqrt(s + eps))`` and the second moment ``s``;
        float64 for the numpy/numba backends, the statistics dtype (float32 for half inputs, else
        x's dtype) for torch.
    """
    h = _check_x(x)
    kappa, eps = _hyper(kappa, eps)
    backend = resolve_backend(backend, x)
    out_shape = tuple(x.shape[:-1]) + (1,)
    if backend == "torch":
        with torch.no_grad():
            s, r = _stats_torch(to_torch(x).reshape(-1, h), kappa, eps)
    else:
        x2 = np.ascontiguousarray(to_numpy(x)).reshape(-1, h)
        if backend == "numpy":
            x64 = x2.astype(np.float64)
            s = (x64 * x64).mean(axis=1)
            r = 1.0 / (kappa * np.sqrt(s + eps))
        else:
            s = np.empty(x2.shape[0])
            r = np.empty(x2.shape[0])
            _stats_numba(x2, kappa, eps, s, r)
    _check_finite_rows(s)
    return like_input(r.reshape(out_shape), x), like_input(s.reshape(out_shape), x)


def bhyt(x: Any, weight: Any = None, lam: Any = 2.0, kappa: float = KAPPA, eps: float = EPS,
         backend: str = "auto") -> Any:
    """BHyT pre-norm with exact statistics, ``y = w * tanh(lam * x / (kappa sqrt(mean(x^2) + eps)))``
    (eqs. 1-3).

    Args:
        x: (..., H) floating array or tensor, finite; computed in x's dtype.
        weight: gain ``w`` of shape (H,) or None (ones).
        lam: the scalar lambda (number or one-element tensor; a tensor that requires grad gets its
            gradient through the torch backend).
        kappa, eps: > 0 (the official code: kappa = 10, eps = 1e-6).
        backend: "numpy" | "numba" | "torch" | "auto" (torch for tensors, numba for arrays).
    Returns:
        y of x's shape, dtype and type. Gradients flow only through the torch backend.
    """
    h = _check_x(x)
    _check_weight(weight, h)
    lam_f = _check_scalar(lam, "lam")
    kappa, eps = _hyper(kappa, eps)
    backend = resolve_backend(backend, x)
    if backend == "torch":
        xt = to_torch(x)
        wt = None if weight is None else to_torch(weight, like=xt)
        y, s = BHyTFunction.apply(xt, wt, _lam_tensor(lam, xt), kappa, eps)
        _check_finite_rows(s)
        return y if isinstance(x, torch.Tensor) else y.detach().numpy()
    x2 = np.ascontiguousarray(to_numpy(x)).reshape(-1, h)
    w = _weight_numpy(weight, h, x2.dtype)
    if backend == "numpy":
        y, s, _ = _forward_numpy(x2, w, lam_f, kappa, eps)
    else:
        y = np.empty_like(x2)
        s = np.empty(x2.shape[0])
        _forward_numba(x2, w, lam_f, kappa, eps, y, s, np.empty(x2.shape[0]))
    _check_finite_rows(s)
    return like_input(y.reshape(x.shape), x)


def bhyt_backward(grad_out: Any, x: Any, weight: Any = None, lam: Any = 2.0, kappa: float = KAPPA,
                  eps: float = EPS, grad_var: Any = None, backend: str = "auto") -> tuple[Any, Any, Any]:
    """Gradients of :func:`bhyt` by the hand-derived eqs. (8)-(9).

    Args:
        grad_out: dL/dy, x's shape. x, weight, lam, kappa, eps: as in :func:`bhyt`.
        grad_var: optional dL/ds of shape (..., 1), the gradient reaching the second moment from the
            block's second norm (eq. 10); None for zero.
    Returns:
        ``(dx, dweight, dlam)``: dx like x, dweight (H,) (also when weight is None, as the gradient
        of a gain of ones), dlam a 0-d value of x's type.
    """
    h = _check_x(x)
    _check_weight(weight, h)
    check_floating(grad_out, "grad_out")
    if tuple(grad_out.shape) != tuple(x.shape):
        raise ValueError(f"grad_out must have x's shape {tuple(x.shape)}, got {tuple(grad_out.shape)}")
    if grad_var is not None:
        _check_rows(grad_var, x, "grad_var")
    lam_f = _check_scalar(lam, "lam")
    kappa, eps = _hyper(kappa, eps)
    backend = resolve_backend(backend, x)
    if backend == "torch":
        xt = to_torch(x)
        x2 = xt.reshape(-1, h)
        with torch.no_grad():
            s, r = _stats_torch(x2, kappa, eps)
            a = lam_f * r
            t = torch.tanh(a.to(x2.dtype) * x2)
            dvar = (torch.zeros_like(s) if grad_var is None
                    else to_torch(grad_var, like=xt).reshape(-1, 1).to(s.dtype))
            w = None if weight is None else to_torch(weight, like=xt).reshape(h)
            dy2 = to_torch(grad_out, like=xt).reshape(-1, h)
            dx, sux = _backward_torch(dy2, x2, t, w, a, 1.0 / (s + eps), dvar, True)
            dw = (dy2 * t).sum(0)
            dlam = (r * sux).sum()
    else:
        x2 = np.ascontiguousarray(to_numpy(x)).reshape(-1, h)
        dy2 = np.ascontiguousarray(to_numpy(grad_out), dtype=x2.dtype).reshape(-1, h)
        w = _weight_numpy(weight, h, x2.dtype)
        dvar = (np.zeros(x2.shape[0]) if grad_var is None
                else np.ascontiguousarray(to_numpy(grad_var), dtype=np.float64).reshape(-1))
        if backend == "numpy":
            _, s, r = _forward_numpy(x2, w, lam_f, kappa, eps)
            s, r = s.astype(np.float64), r.astype(np.float64)
        else:
            s = np.empty(x2.shape[0])
            r = np.empty(x2.shape[0])
            _stats_numba(x2, kappa, eps, s, r)
        a = lam_f * r
        inv_s = 1.0 / (s + eps)
        if backend == "numpy":
            dx, dw, sux = _backward_numpy(dy2, x2, w, a.astype(x2.dtype), inv_s, dvar, True)
        else:
            dx, dw, sux = _backward_numba_host(dy2, x2, w, a, inv_s, dvar, True)
        dlam = np.asarray((r * sux).sum(), dtype=x2.dtype)
    _check_finite_rows(s)
    return like_input(dx.reshape(x.shape), x), like_input(dw.reshape(h), x), like_input(dlam, x)


def attention_variance_scaler(w_v: Any, w_o: Any, seq_len: int, num_kv_groups: int = 1,
                              head_dim: int | None = None) -> float:
    """Eq. (4), the official ``update_scaler``: ``c = ||W_V^T W_O^T||_F^2 / (seq_len * d)``.

    Args:
        w_v: ``v_proj.weight`` of shape (n_kv_heads * head_dim, d) (nn.Linear layout).
        w_o: ``o_proj.weight`` of shape (d, n_kv_heads * num_kv_groups * head_dim).
        seq_len: T > 0, the training sequence length.
        num_kv_groups: query heads per key/value head (grouped-query attention); each value head
            is repeated ``num_kv_groups`` times, as ``repeat_kv`` does. head_dim: needed when > 1.
    Returns:
        c as a Python float (computed in float64; no gradient).
    """
    check_floating(w_v, "w_v")
    check_floating(w_o, "w_o")
    if w_v.ndim != 2 or w_o.ndim != 2:
        raise ValueError(f"w_v and w_o must be 2-D, got shapes {tuple(w_v.shape)} and {tuple(w_o.shape)}")
    for name, v in (("seq_len", seq_len), ("num_kv_groups", num_kv_groups)):
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name} must be a positive int, got {v!r}")
    # float64 torch on the CPU: tiny matrices, and torch's thread pool is the one the model uses
    wv = to_torch(w_v).detach().to("cpu", torch.float64)
    wo = to_torch(w_o).detach().to("cpu", torch.float64)
    d = wv.shape[1]
    if tuple(wo.shape) != (d, wv.shape[0] * num_kv_groups):
        raise ValueError(f"w_o must have shape ({d}, {wv.shape[0] * num_kv_groups}) for w_v of shape "
                         f"{tuple(wv.shape)} and num_kv_groups={num_kv_groups}, got {tuple(wo.shape)}")
    if num_kv_groups > 1:
        if (not isinstance(head_dim, (int, np.integer)) or isinstance(head_dim, bool) or head_dim <= 0
                or wv.shape[0] % head_dim):
            raise ValueError(f"head_dim must be a positive int dividing {wv.shape[0]} when "
                             f"num_kv_groups > 1, got {head_dim!r}")
        wv = wv.reshape(-1, head_dim, d).repeat_interleave(num_kv_groups, dim=0).reshape(-1, d)
    m = wv.T @ wo.T                                                             # (d, d)
    return float(m.square().sum()) / (seq_len * d)


def bhyt_approx_rstd(s: Any, c: float, lam_in: Any, kappa: float = KAPPA, eps: float = EPS) -> Any:
    """Eqs. (5)-(6), the official ``compute_rstd2``: ``r2 = 1/(kappa sqrt(s + c lam_in^2/kappa^2 + eps))``.

    Args:
        s: second moments (..., 1) of the block input (from :func:`bhyt_stats`).
        c: the attention scaler of eq. (4), >= 0. lam_in: the first norm's lambda (no gradient).
    Returns:
        r2 of s's shape and type.
    """
    check_floating(s, "s")
    c = _check_scalar(c, "c")
    if c < 0:
        raise ValueError(f"c must be >= 0, got {c}")
    lam_in = _check_scalar(lam_in, "lam_in")
    kappa, eps = _hyper(kappa, eps)
    corr = c * lam_in * lam_in / (kappa * kappa)
    if isinstance(s, torch.Tensor):
        return torch.rsqrt(s + corr + eps) * (1.0 / kappa)
    return 1.0 / (kappa * np.sqrt(np.asarray(s) + corr + eps))


def bhyt_approx(h: Any, s: Any, weight: Any = None, lam: Any = 1.0, c: float = 0.0, lam_in: Any = 2.0,
                kappa: float = KAPPA, eps: float = EPS, backend: str = "auto") -> Any:
    """The block's second BHyT norm with the variance approximation (eqs. 5-7).

    Args:
        h: (..., H) input of the second norm (x + attention output).
        s: (..., 1) second moment of the block input x, as returned by :func:`bhyt_stats`.
        weight, lam: the second norm's gain and lambda. c, lam_in: eq. (5)'s scaler and the first
            norm's lambda. kappa, eps, backend: as in :func:`bhyt`.
    Returns:
        y2 like h. With the torch backend, gradients flow into h, s (hence x), weight and lam.
    """
    hdim = _check_x(h, "h")
    _check_weight(weight, hdim)
    _check_rows(s, h, "s")
    lam_f = _check_scalar(lam, "lam")
    cf = _check_scalar(c, "c")
    if cf < 0:
        raise ValueError(f"c must be >= 0, got {cf}")
    lam_in_f = _check_scalar(lam_in, "lam_in")
    kappa, eps = _hyper(kappa, eps)
    corr = cf * lam_in_f * lam_in_f / (kappa * kappa)
    backend = resolve_backend(backend, h)
    if backend == "torch":
        ht = to_torch(h)
        st = to_torch(s, like=ht).reshape(tuple(ht.shape[:-1]) + (1,))
        wt = None if weight is None else to_torch(weight, like=ht)
        y = BHyTApproxFunction.apply(ht, st, wt, _lam_tensor(lam, ht), corr, kappa, eps)
        return y if isinstance(h, torch.Tensor) else y.detach().numpy()
    h2 = np.ascontiguousarray(to_numpy(h)).reshape(-1, hdim)
    s1 = np.asarray(to_numpy(s), dtype=np.float64).reshape(-1)
    _check_finite_rows(s1, "s")
    w = _weight_numpy(weight, hdim, h2.dtype)
    r2 = 1.0 / (kappa * np.sqrt(s1 + corr + eps))                               # (5), (6)
    if backend == "numpy":
        y = w * np.tanh((lam_f * r2).astype(h2.dtype)[:, None] * h2)           # (7)
    else:
        y = np.empty_like(h2)
        _apply_numba(h2, w, lam_f * r2, y)
    return like_input(y.reshape(h.shape), h)


def bhyt_approx_backward(grad_out: Any, h: Any, s: Any, weight: Any = None, lam: Any = 1.0, c: float = 0.0,
                         lam_in: Any = 2.0, kappa: float = KAPPA, eps: float = EPS,
                         backend: str = "auto") -> tuple[Any, Any, Any, Any]:
    """Gradients of :func:`bhyt_approx` by eq. (10).

    Returns:
        ``(dh, ds, dweight, dlam)``: dh like h; ds (..., 1) the gradient on the block input's second
        moment (pass it as ``grad_var`` to :func:`bhyt_backward`); dweight (H,); dlam 0-d.
    """
    hdim = _check_x(h, "h")
    _check_weight(weight, hdim)
    _check_rows(s, h, "s")
    check_floating(grad_out, "grad_out")
    if tuple(grad_out.shape) != tuple(h.shape):
        raise ValueError(f"grad_out must have h's shape {tuple(h.shape)}, got {tuple(grad_out.shape)}")
    lam_f = _check_scalar(lam, "lam")
    cf = _check_scalar(c, "c")
    if cf < 0:
        raise ValueError(f"c must be >= 0, got {cf}")
    lam_in_f = _check_scalar(lam_in, "lam_in")
    kappa, eps = _hyper(kappa, eps)
    backend = resolve_backend(backend, h)
    h2 = np.ascontiguousarray(to_numpy(h)).reshape(-1, hdim)
    dy2 = np.ascontiguousarray(to_numpy(grad_out), dtype=h2.dtype).reshape(-1, hdim)
    s1 = np.asarray(to_numpy(s), dtype=np.float64).reshape(-1)
    _check_finite_rows(s1, "s")
    s_hat = s1 + cf * lam_in_f * lam_in_f / (kappa * kappa)                    # (5)
    r2 = 1.0 / (kappa * np.sqrt(s_hat + eps))                                  # (6)
    a = lam_f * r2
    w = _weight_numpy(weight, hdim, h2.dtype)
    if backend == "torch":
        ht = to_torch(h2)
        with torch.no_grad():
            at = torch.from_numpy(a.astype(h2.dtype))[:, None]
            t = torch.tanh(at * ht)
            dyt_ = torch.from_numpy(dy2)
            dh, sux = _backward_torch(dyt_, ht, t, torch.from_numpy(w), at, None, None, False)
            dw = (dyt_ * t).sum(0).numpy()
            dh, sux = dh.numpy(), sux.numpy()[:, 0].astype(np.float64)
    elif backend == "numpy":
        dh, dw, sux = _backward_numpy(dy2, h2, w, a.astype(h2.dtype), None, None, False)
    else:
        dh, dw, sux = _backward_numba_host(dy2, h2, w, a, np.empty(0), np.empty(0), False)
    ds = -0.5 * a * sux / (s_hat + eps)                                         # (10)
    dlam = np.asarray((r2 * sux).sum(), dtype=h2.dtype)
    return (like_input(dh.reshape(h.shape), h), like_input(ds.reshape(tuple(h.shape[:-1]) + (1,)), h),
            like_input(dw.reshape(hdim), h), like_input(dlam, h))


def dyt(x: Any, weight: Any = None, bias: Any = None, alpha: Any = 0.5) -> Any:
    """Dynamic Tanh (Zhu et al., 2025), the statistics-free baseline: ``w * tanh(alpha x) + b``.
    x: (..., H) tensor or array; weight, bias (H,) or None."""
    h = _check_x(x)
    _check_weight(weight, h)
    if isinstance(x, torch.Tensor):
        a = alpha if isinstance(alpha, torch.Tensor) else _check_scalar(alpha, "alpha")
        y = torch.tanh(a * x)
    else:
        y = np.tanh(x.dtype.type(_check_scalar(alpha, "alpha")) * x)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


class BHyT(torch.nn.Module):
    """A BHyT norm layer (official ``BHyT``): gain ``weight`` (H,) initialised to 1 and a scalar
    ``lam`` (learnable by default, as in the repository's configs).

    - ``forward(x) -> y``: eqs. (1)-(3), exact statistics (the block's first norm).
    - ``forward_with_stats(x) -> (y, s)``: the same, also returning the differentiable second moment.
    - ``forward_approx(h, s, c, lam_in) -> y``: eqs. (5)-(7), the block's second norm.
    """

    def __init__(self, hidden_size: int, lam_init: float = 2.0, kappa: float = KAPPA, eps: float = EPS,
                 learnable_lam: bool = True, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        if not isinstance(hidden_size, (int, np.integer)) or isinstance(hidden_size, bool) or hidden_size <= 0:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        self.kappa, self.eps = _hyper(kappa, eps)
        kw = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.ones(int(hidden_size), **kw))
        self.lam = torch.nn.Parameter(torch.full((1,), _check_scalar(lam_init, "lam_init"), **kw),
                                      requires_grad=learnable_lam)

    def forward_with_stats(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_x(x)
        _check_weight(self.weight, int(self.weight.shape[0]))
        if x.shape[-1] != self.weight.shape[0]:
            raise ValueError(f"x must have {self.weight.shape[0]} features in its last dimension, got {x.shape[-1]}")
        y, s = BHyTFunction.apply(x, self.weight, self.lam, self.kappa, self.eps)
        return y, s

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_stats(x)[0]

    def forward_approx(self, h: torch.Tensor, s: torch.Tensor, c: float, lam_in: Any) -> torch.Tensor:
        corr = _check_scalar(c, "c") * _check_scalar(lam_in, "lam_in") ** 2 / self.kappa ** 2
        return BHyTApproxFunction.apply(h, s, self.weight, self.lam, corr, self.kappa, self.eps)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, kappa={self.kappa:g}, lam={float(self.lam.detach()[0]):g}"


class DyT(torch.nn.Module):
    """Dynamic Tanh baseline ``weight * tanh(alpha x) + bias`` with a learnable scalar alpha."""

    def __init__(self, hidden_size: int, alpha_init: float = 0.5):
        super().__init__()
        self.alpha = torch.nn.Parameter(torch.full((1,), _check_scalar(alpha_init, "alpha_init")))
        self.weight = torch.nn.Parameter(torch.ones(hidden_size))
        self.bias = torch.nn.Parameter(torch.zeros(hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dyt(x, self.weight, self.bias, self.alpha)
