"""SeeDNorm: Self-Rescaled Dynamic Normalization (Cai, Zhu, Liu & Min, ICLR 2026, arXiv:2510.22777),
and the DyT baseline (Zhu, Chen, He, LeCun & Liu, 2025, arXiv:2503.10622).

For every row (token) ``x`` of ``D`` features, split into ``H`` contiguous heads of ``d = D / H``
features (``h(i) = i // d`` is the head of feature ``i``; ``H = 1`` is the paper's main form), with
learnable vectors ``alpha``, ``beta``, ``gamma`` of length ``D``:

    (1) r       = 1 / sqrt(1/D * sum_i x_i^2 + eps)                (inverse RMS, as in RMSNorm)
    (2) xhat_i  = x_i * r
    (3) s_h     = sum_{i in head h} x_i * beta_i                   (one dot product per head)
    (4) t_h     = tanh(s_h)
    (5) g_i     = t_{h(i)} * alpha_i + gamma_i                     (the self-rescaled, dynamic gain)
    (6) y_i     = g_i * xhat_i

The hand-derived backward pass, for an upstream gradient ``dy`` (sums over rows for the
parameters):

    (7)  dgamma_i = sum_rows dy_i * xhat_i
    (8)  dalpha_i = sum_rows dy_i * xhat_i * t_{h(i)}
    (9)  u_h      = (1 - t_h^2) * sum_{i in head h} dy_i * alpha_i * xhat_i      (= dL/ds_h)
    (10) dbeta_i  = sum_rows u_{h(i)} * x_i
    (11) dx_i     = r * (dy_i * g_i - xhat_i * mean_j(dy_j * g_j * xhat_j)) + u_{h(i)} * beta_i

Eq. (11) is RMSNorm's backward with the per-row gain ``g`` of eq. (5), plus the path through the
dot product (3). Special cases used by the tests: with ``alpha = 0`` or ``beta = 0`` the gain is
``gamma`` and (6) is exactly RMSNorm; scaling a row by ``k > 0`` changes the output only through
``tanh(k s_h)`` (eq. 12 of the chapter: ``y(kx) - y(x) = (tanh(k s) - tanh(s)) alpha * xhat`` for
``eps = 0``), so ``|y_i| <= (|alpha_i| + |gamma_i|) |xhat_i|`` however large ``x`` grows.

DyT replaces the normalization by an element-wise squashing with a learnable scalar ``a``:

    (13) DyT(x)_i = gamma_i * tanh(a * x_i) + b_i

The critical loop is the fused row-wise kernel (1)-(6) and its backward (7)-(11). Three
interchangeable backends compute it: ``"numpy"`` (readable reference), ``"numba"`` (one kernel,
parallel over rows for inputs of at least 2**18 elements, that reads a row once for the statistics
and once more, from cache, for the output), ``"torch"`` (vectorised, device-agnostic,
differentiable through :class:`SeeDNormFunction`).

Initialisation (no official code exists; see the chapter's "Paper vs official code" box):
``SeeDNorm`` starts at ``gamma = 1``, ``alpha = 1``, ``beta = 0`` like the public third-party ports,
so the layer starts as exact RMSNorm and ``beta`` receives a non-zero gradient from the first step
(eq. 10 with ``alpha != 0``). ``alpha = beta = 0`` would be a fixed point: eqs. (8) and (10) both
vanish there, and neither parameter could ever move.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from numba import njit, prange

from refimpl._common.backend import like_input, resolve_backend, to_numpy, to_torch
from refimpl._common.validate import check_finite, check_floating, check_positive
from refimpl._common.kernels import FASTMATH as _FASTMATH, PARALLEL_MIN, row_blocks

__all__ = ["seednorm", "seednorm_backward", "SeeDNormFunction", "SeeDNorm", "dyt", "DyT"]


# ----------------------------------------------------------------------------- validation
def _check_heads(num_heads: Any, dim: int) -> int:
    if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)):
        raise TypeError(f"num_heads must be a positive int, got {type(num_heads).__name__}")
    num_heads = int(num_heads)
    if num_heads <= 0 or dim % num_heads != 0:
        raise ValueError(f"num_heads must be a positive divisor of the feature dimension {dim}, "
                         f"got {num_heads}")
    return num_heads


def _check_inputs(x: Any, alpha: Any, beta: Any, gamma: Any, num_heads: Any, eps: float):
    check_floating(x, "x")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have at least one dimension with features in the last one, got "
                         f"shape {tuple(x.shape)}")
    dim = int(x.shape[-1])
    for name, p in (("alpha", alpha), ("beta", beta), ("gamma", gamma)):
        check_floating(p, name)
        if tuple(p.shape) != (dim,):
            raise ValueError(f"{name} must have shape ({dim},) to match the last dimension of x, "
                             f"got {tuple(p.shape)}")
        if not (isinstance(p, torch.Tensor) and p.device.type != "cpu"):
            check_finite(p, name)
    heads = _check_heads(num_heads, dim)
    eps = check_positive(eps, "eps")
    return dim, heads, eps


def _check_rows(rstd: Any) -> None:
    """NaN/inf anywhere in a row makes its mean square NaN or inf, so its rstd NaN or 0: a check
    on N numbers instead of N*D. Skipped on accelerators, where reading it back would stall."""
    if isinstance(rstd, torch.Tensor):
        if rstd.device.type != "cpu":
            return
        rstd = rstd.detach().numpy()
    bad = ~(np.isfinite(rstd) & (rstd > 0))
    if bad.any():
        raise ValueError(f"x contains NaN or infinity (first in row {int(np.flatnonzero(bad)[0])} "
                         f"of the {rstd.size} normalized rows)")


# ----------------------------------------------------------------------------- numpy reference
def _forward_numpy(x2: np.ndarray, alpha, beta, gamma, heads: int, eps: float):
    n, dim = x2.shape
    with np.errstate(invalid="ignore", over="ignore"):           # bad rows are reported by _check_rows
        rstd = 1.0 / np.sqrt((x2 * x2).mean(axis=1) + eps)        # (1)
        xhat = x2 * rstd[:, None]                                 # (2)
        s = (x2 * beta).reshape(n, heads, dim // heads).sum(axis=2)   # (3)
        t = np.tanh(s)                                            # (4)
        g = np.repeat(t, dim // heads, axis=1) * alpha + gamma    # (5)
        y = g * xhat                                              # (6)
    return y, rstd, t


def _backward_numpy(dy2, x2, alpha, beta, gamma, heads: int, eps: float):
    n, dim = x2.shape
    _, rstd, t = _forward_numpy(x2, alpha, beta, gamma, heads, eps)
    with np.errstate(invalid="ignore", over="ignore"):           # bad rows are reported by _check_rows
        xhat = x2 * rstd[:, None]
        t_full = np.repeat(t, dim // heads, axis=1)
        g = t_full * alpha + gamma
        dgamma = (dy2 * xhat).sum(axis=0)                                         # (7)
        dalpha = (dy2 * xhat * t_full).sum(axis=0)                                # (8)
        u = (1 - t * t) * (dy2 * alpha * xhat).reshape(n, heads, dim // heads).sum(axis=2)  # (9)
        u_full = np.repeat(u, dim // heads, axis=1)
        dbeta = (u_full * x2).sum(axis=0)                                         # (10)
        dx = rstd[:, None] * (dy2 * g - xhat * (dy2 * g * xhat).mean(axis=1, keepdims=True)) \
            + u_full * beta                                                       # (11)
    return dx, dalpha, dbeta, dgamma, rstd


# ----------------------------------------------------------------------------- numba kernels
# Reassociation lets LLVM vectorise the reductions; no `nnan`/`ninf`, so NaN and inf still reach
# the row statistics, where _check_rows finds them.


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _row_stats(xr, beta, heads, eps, tr):
    """Eqs. (1), (3), (4) for one row in x's dtype: one sweep per head that accumulates the sum of
    squares and the head's dot product together. Writes t_h to tr; returns r."""
    dim = xr.shape[0]
    d = dim // heads
    T = xr.dtype.type
    ss = T(0)
    for h in range(heads):
        base = h * d
        dot = T(0)
        for j in range(d):                                   # zero-based: LLVM vectorises this
            v = xr[base + j]
            ss += v * v
            dot += v * beta[base + j]
        tr[h] = math.tanh(dot)
    return 1.0 / math.sqrt(ss / dim + eps)


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _forward_row(x, alpha, beta, gamma, heads, eps, y, rstd, t, r):
    """Eqs. (1)-(6) for row r: one sweep for the statistics, one (from cache) for the output."""
    xr = x[r]
    yr = y[r]
    tr = t[r]
    d = x.shape[1] // heads
    T = x.dtype.type
    rs = _row_stats(xr, beta, heads, eps, tr)                    # (1), (3), (4)
    rstd[r] = rs
    scale = T(rs)
    for h in range(heads):
        th = T(tr[h])
        base = h * d
        for j in range(d):
            k = base + j
            yr[k] = (th * alpha[k] + gamma[k]) * (xr[k] * scale)       # (5), (6)


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _backward_block(dy, x, alpha, beta, gamma, heads, rstd, t, dx, da_part, db_part, dg_part, u_buf, blk):
    """dx for the rows of block ``blk`` (eqs. 9, 11), and that block's partial sums of dalpha,
    dbeta, dgamma (eqs. 7, 8, 10): blocks never write to the same memory."""
    n, dim = x.shape
    d = dim // heads
    T = x.dtype.type
    nblocks = da_part.shape[0]
    dab = da_part[blk]
    dbb = db_part[blk]
    dgb = dg_part[blk]
    u = u_buf[blk]
    for r in range(blk * n // nblocks, (blk + 1) * n // nblocks):
        xr = x[r]
        dyr = dy[r]
        dxr = dx[r]
        tr = t[r]
        rs = T(rstd[r])
        c = T(0)
        for h in range(heads):
            th = T(tr[h])
            base = h * d
            a = T(0)
            for j in range(d):
                k = base + j
                gx = dyr[k] * (xr[k] * rs)                       # dy * xhat
                a += gx * alpha[k]
                c += gx * (th * alpha[k] + gamma[k])
                dgb[k] += gx                                     # (7)
                dab[k] += gx * th                                # (8)
            u[h] = (T(1) - th * th) * a                          # (9)
        c = T(c / dim)                                           # mean(dy * g * xhat)
        for h in range(heads):
            th = T(tr[h])
            uh = u[h]
            base = h * d
            for j in range(d):
                k = base + j
                xk = xr[k]
                dxr[k] = rs * (dyr[k] * (th * alpha[k] + gamma[k]) - xk * rs * c) + uh * beta[k]  # (11)
                dbb[k] += uh * xk                                # (10)


# Parallel kernels (prange over rows or row blocks) and serial twins for small problems, where
# waking the thread pool costs more than the work (and far more on a busy, shared machine).
@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _stats_numba(x, beta, heads, eps, rstd, t):
    for r in prange(x.shape[0]):
        rstd[r] = _row_stats(x[r], beta, heads, eps, t[r])


@njit(cache=True, fastmath=_FASTMATH)
def _stats_numba_serial(x, beta, heads, eps, rstd, t):
    for r in range(x.shape[0]):
        rstd[r] = _row_stats(x[r], beta, heads, eps, t[r])


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _forward_numba(x, alpha, beta, gamma, heads, eps, y, rstd, t):
    for r in prange(x.shape[0]):
        _forward_row(x, alpha, beta, gamma, heads, eps, y, rstd, t, r)


@njit(cache=True, fastmath=_FASTMATH)
def _forward_numba_serial(x, alpha, beta, gamma, heads, eps, y, rstd, t):
    for r in range(x.shape[0]):
        _forward_row(x, alpha, beta, gamma, heads, eps, y, rstd, t, r)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _backward_numba(dy, x, alpha, beta, gamma, heads, rstd, t, dx, da_part, db_part, dg_part, u_buf):
    for blk in prange(da_part.shape[0]):
        _backward_block(dy, x, alpha, beta, gamma, heads, rstd, t, dx, da_part, db_part, dg_part, u_buf, blk)


@njit(cache=True, fastmath=_FASTMATH)
def _backward_numba_serial(dy, x, alpha, beta, gamma, heads, rstd, t, dx, da_part, db_part, dg_part, u_buf):
    for blk in range(da_part.shape[0]):
        _backward_block(dy, x, alpha, beta, gamma, heads, rstd, t, dx, da_part, db_part, dg_part, u_buf, blk)




def _params_numpy(p: Any, dtype) -> np.ndarray:
    return np.ascontiguousarray(to_numpy(p), dtype=dtype)


def _forward_numba_host(x2, alpha, beta, gamma, heads, eps):
    n = x2.shape[0]
    y = np.empty_like(x2)
    rstd = np.empty(n, dtype=np.float64)
    t = np.empty((n, heads), dtype=np.float64)
    kernel = _forward_numba if x2.size >= PARALLEL_MIN else _forward_numba_serial
    kernel(x2, alpha, beta, gamma, heads, eps, y, rstd, t)
    return y, rstd, t


def _backward_numba_host(dy2, x2, alpha, beta, gamma, heads, eps):
    n, dim = x2.shape
    rstd = np.empty(n, dtype=np.float64)
    t = np.empty((n, heads), dtype=np.float64)
    parallel = x2.size >= PARALLEL_MIN
    (_stats_numba if parallel else _stats_numba_serial)(x2, beta, heads, eps, rstd, t)
    nblocks = row_blocks(n, x2.size)
    dx = np.empty_like(x2)
    parts = [np.zeros((nblocks, dim), dtype=x2.dtype) for _ in range(3)]
    u_buf = np.empty((nblocks, heads), dtype=x2.dtype)
    (_backward_numba if parallel else _backward_numba_serial)(dy2, x2, alpha, beta, gamma, heads, rstd, t,
                                                              dx, *parts, u_buf)
    da, db, dg = (p.sum(axis=0).astype(x2.dtype) for p in parts)
    return dx, da, db, dg, rstd


# ----------------------------------------------------------------------------- torch path
def _compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Half-precision inputs are computed in float32 (like fused RMSNorm kernels); others as is."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _forward_torch(x2: torch.Tensor, alpha, beta, gamma, heads: int, eps: float):
    n, dim = x2.shape
    rstd = torch.rsqrt(x2.square().mean(dim=1) + eps)                        # (1)
    xhat = x2 * rstd[:, None]                                                # (2)
    t = torch.tanh((x2 * beta).reshape(n, heads, dim // heads).sum(dim=2))   # (3), (4)
    g = (t[:, :, None] * alpha.reshape(heads, -1) + gamma.reshape(heads, -1)).reshape(n, dim)  # (5)
    return g * xhat, xhat, g, rstd, t                                        # (6)


def _backward_torch(dy2, x2, xhat, g, rstd, t, alpha, beta, heads: int):
    n, dim = x2.shape
    d = dim // heads
    gx = dy2 * xhat
    dgamma = gx.sum(dim=0)                                                   # (7)
    dalpha = (gx.reshape(n, heads, d) * t[:, :, None]).sum(dim=0).reshape(dim)   # (8)
    u = (1 - t * t) * (gx * alpha).reshape(n, heads, d).sum(dim=2)          # (9)
    u_full = u.repeat_interleave(d, dim=1)
    dbeta = (u_full * x2).sum(dim=0)                                         # (10)
    dx = rstd[:, None] * (dy2 * g - xhat * (gx * g).mean(dim=1, keepdim=True)) + u_full * beta  # (11)
    return dx, dalpha, dbeta, dgamma


class SeeDNormFunction(torch.autograd.Function):
    """SeeDNorm with the hand-derived backward (eqs. 7-11) instead of autograd's tape.

    ``apply(x, alpha, beta, gamma, num_heads, eps) -> (y, rstd)``: x (..., D); alpha, beta, gamma
    (D,); y like x; rstd (N,) for the N = x.numel() // D rows (not differentiable). Half-precision
    inputs are computed in float32 and y is cast back.
    """

    @staticmethod
    def forward(ctx, x, alpha, beta, gamma, num_heads, eps):
        dim = x.shape[-1]
        ct = _compute_dtype(x)
        x2 = x.reshape(-1, dim).to(ct)
        a, b, c = (p.to(ct) for p in (alpha, beta, gamma))
        y, xhat, g, rstd, t = _forward_torch(x2, a, b, c, num_heads, eps)
        ctx.save_for_backward(x2, xhat, g, rstd, t, a, b)
        ctx.heads = num_heads
        ctx.mark_non_differentiable(rstd)
        return y.to(x.dtype).reshape(x.shape), rstd

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy, _drstd):
        x2, xhat, g, rstd, t, a, b = ctx.saved_tensors
        dy2 = dy.reshape(x2.shape).to(x2.dtype)
        dx, da, db, dg = _backward_torch(dy2, x2, xhat, g, rstd, t, a, b, ctx.heads)
        need = ctx.needs_input_grad
        return (dx.to(dy.dtype).reshape(dy.shape) if need[0] else None,
                da.to(dy.dtype) if need[1] else None,
                db.to(dy.dtype) if need[2] else None,
                dg.to(dy.dtype) if need[3] else None, None, None)


# ----------------------------------------------------------------------------- public API
def seednorm(x: Any, alpha: Any, beta: Any, gamma: Any, num_heads: int = 1, eps: float = 1e-6,
             backend: str = "auto") -> Any:
    """SeeDNorm over the last dimension (eqs. 1-6).

    Args:
        x: array or tensor of shape (..., D), floating dtype, finite.
        alpha, beta, gamma: (D,) parameters (dynamic gain, self-rescaling vector, static gain),
            of x's type; cast to x's dtype.
        num_heads: H, a divisor of D; the dot product (3) is taken over H contiguous slices.
        eps: > 0, added to the mean square.
        backend: "numpy" | "numba" | "torch" | "auto" (torch for tensors, numba for arrays).
    Returns:
        y with x's shape and dtype, of x's type (array, or tensor on x's device). Gradients flow
        only through the torch backend (via :class:`SeeDNormFunction`).
    """
    dim, heads, eps = _check_inputs(x, alpha, beta, gamma, num_heads, eps)
    backend = resolve_backend(backend, x)
    if backend == "torch":
        xt = to_torch(x)
        a, b, c = (to_torch(p, like=xt) for p in (alpha, beta, gamma))
        y, rstd = SeeDNormFunction.apply(xt, a, b, c, heads, eps)
        _check_rows(rstd)
        return y if isinstance(x, torch.Tensor) else y.detach().numpy()
    x2 = np.ascontiguousarray(to_numpy(x)).reshape(-1, dim)
    a, b, c = (_params_numpy(p, x2.dtype) for p in (alpha, beta, gamma))
    if backend == "numpy":
        y, rstd, _ = _forward_numpy(x2, a, b, c, heads, eps)
    else:
        y, rstd, _ = _forward_numba_host(x2, a, b, c, heads, eps)
    _check_rows(rstd)
    return like_input(y.astype(x2.dtype, copy=False).reshape(x.shape), x)


def seednorm_backward(grad_out: Any, x: Any, alpha: Any, beta: Any, gamma: Any, num_heads: int = 1,
                      eps: float = 1e-6, backend: str = "auto") -> tuple[Any, Any, Any, Any]:
    """Gradients of SeeDNorm by the hand-derived eqs. (7)-(11).

    Args:
        grad_out: dL/dy, x's shape. The other arguments as in :func:`seednorm`.
    Returns:
        ``(dx, dalpha, dbeta, dgamma)``: dx like x; the others of shape (D,), summed over rows.
    """
    dim, heads, eps = _check_inputs(x, alpha, beta, gamma, num_heads, eps)
    check_floating(grad_out, "grad_out")
    if tuple(grad_out.shape) != tuple(x.shape):
        raise ValueError(f"grad_out must have x's shape {tuple(x.shape)}, got {tuple(grad_out.shape)}")
    backend = resolve_backend(backend, x)
    if backend == "torch":
        xt = to_torch(x)
        x2 = xt.reshape(-1, dim)
        a, b, c = (to_torch(p, like=xt).to(x2.dtype) for p in (alpha, beta, gamma))
        with torch.no_grad():
            _, xhat, g, rstd, t = _forward_torch(x2, a, b, c, heads, eps)
            dy2 = to_torch(grad_out, like=xt).reshape(-1, dim).to(x2.dtype)
            dx, da, db, dg = _backward_torch(dy2, x2, xhat, g, rstd, t, a, b, heads)
    else:
        x2 = np.ascontiguousarray(to_numpy(x)).reshape(-1, dim)
        dy2 = np.ascontiguousarray(to_numpy(grad_out), dtype=x2.dtype).reshape(-1, dim)
        a, b, c = (_params_numpy(p, x2.dtype) for p in (alpha, beta, gamma))
        if backend == "numpy":
            dx, da, db, dg, rstd = _backward_numpy(dy2, x2, a, b, c, heads, eps)
        else:
            dx, da, db, dg, rstd = _backward_numba_host(dy2, x2, a, b, c, heads, eps)
    _check_rows(rstd)
    return (like_input(dx.reshape(x.shape), x), like_input(da, x), like_input(db, x),
            like_input(dg, x))


class SeeDNorm(torch.nn.Module):
    """SeeDNorm layer over the last dimension: input (..., dim) -> output of the same shape.

    Parameters ``alpha``, ``beta``, ``gamma`` of shape (dim,), initialised to ``alpha_init``,
    ``beta_init``, ``gamma_init`` (defaults 1, 0, 1: exact RMSNorm at step 0, and a non-zero gradient
    for ``beta`` from the first step). ``num_heads`` splits the dot product (3) into contiguous
    slices. The public Megatron-LM port decays ``alpha`` and ``beta`` but not ``gamma``;
    :meth:`weight_decay_groups` returns those optimizer parameter groups.
    """

    def __init__(self, dim: int, num_heads: int = 1, eps: float = 1e-6, alpha_init: float = 1.0,
                 beta_init: float = 0.0, gamma_init: float = 1.0, device: Any = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        self.dim = int(dim)
        self.num_heads = _check_heads(num_heads, self.dim)
        self.eps = check_positive(eps, "eps")
        kw = {"device": device, "dtype": dtype}
        self.alpha = torch.nn.Parameter(torch.full((self.dim,), float(alpha_init), **kw))
        self.beta = torch.nn.Parameter(torch.full((self.dim,), float(beta_init), **kw))
        self.gamma = torch.nn.Parameter(torch.full((self.dim,), float(gamma_init), **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return seednorm(x, self.alpha, self.beta, self.gamma, self.num_heads, self.eps, backend="torch")

    def weight_decay_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer parameter groups: alpha and beta decayed, gamma not."""
        return [{"params": [self.alpha, self.beta], "weight_decay": weight_decay},
                {"params": [self.gamma], "weight_decay": 0.0}]

    def extra_repr(self) -> str:
        return f"{self.dim}, num_heads={self.num_heads}, eps={self.eps}"


def dyt(x: Any, alpha: Any, gamma: Any, beta: Any) -> Any:
    """Dynamic Tanh (eq. 13): ``gamma * tanh(alpha * x) + beta`` over the last dimension.

    Args:
        x: array or tensor (..., D), floating. alpha: scalar (python float, or a 0-d/1-element
        array or tensor). gamma, beta: (D,). Computed with x's library; autograd flows for tensors.
    Returns:
        like x.
    """
    check_floating(x, "x")
    dim = int(x.shape[-1]) if x.ndim else 0
    for name, p in (("gamma", gamma), ("beta", beta)):
        check_floating(p, name)
        if tuple(p.shape) != (dim,):
            raise ValueError(f"{name} must have shape ({dim},) to match the last dimension of x, "
                             f"got {tuple(p.shape)}")
    if isinstance(alpha, (torch.Tensor, np.ndarray)):
        size = alpha.numel() if isinstance(alpha, torch.Tensor) else alpha.size
        if size != 1:
            raise ValueError(f"alpha must be a scalar, got shape {tuple(alpha.shape)}")
    elif isinstance(alpha, bool) or not isinstance(alpha, (int, float, np.floating, np.integer)):
        raise TypeError(f"alpha must be a real scalar, got {type(alpha).__name__}")
    if isinstance(x, torch.Tensor):
        a = alpha.reshape(()) if isinstance(alpha, torch.Tensor) else alpha
        return gamma * torch.tanh(a * x) + beta
    a = np.asarray(alpha, dtype=x.dtype).reshape(())
    return (np.asarray(gamma, x.dtype) * np.tanh(a * x) + np.asarray(beta, x.dtype)).astype(x.dtype)


class DyT(torch.nn.Module):
    """Dynamic Tanh (Zhu et al., 2025): ``gamma * tanh(alpha * x) + beta`` with a learnable scalar
    alpha (init ``alpha_init``, 0.5 in the DyT paper for non-LLM models), gamma = 1, beta = 0."""

    def __init__(self, dim: int, alpha_init: float = 0.5, device: Any = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        if isinstance(dim, bool) or not isinstance(dim, (int, np.integer)) or dim <= 0:
            raise ValueError(f"dim must be a positive int, got {dim!r}")
        kw = {"device": device, "dtype": dtype}
        self.alpha = torch.nn.Parameter(torch.full((1,), float(alpha_init), **kw))
        self.gamma = torch.nn.Parameter(torch.ones(int(dim), **kw))
        self.beta = torch.nn.Parameter(torch.zeros(int(dim), **kw))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dyt(x, self.alpha, self.gamma, self.beta)

    def extra_repr(self) -> str:
        return f"{self.gamma.shape[0]}"
