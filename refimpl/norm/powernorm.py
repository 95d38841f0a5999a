"""Power Normalization (Shen, Yao, Gholami, Mahoney & Keutzer, ICML 2020, arXiv:2003.07845).

PN is batch normalization without the mean, with running statistics in *both* passes. For one
channel (all formulas act per channel c of C), a mini-batch of token activations x_i (i over the
B non-pad tokens of the batch), step t, forward decay alpha_f and backward decay alpha_b:

    (1) psi2_B  = 1/B * sum_i x_i^2                              batch quadratic mean (no centring)
    (2) xhat_i  = x_i / sqrt(psi2_{t-1} + eps)                    normalise by the RUNNING statistic
    (3) y_i     = gamma * xhat_i + beta
    (4) psi2_t  = alpha_f * psi2_{t-1} + (1 - alpha_f) * psi2_B

and the approximate backward pass (Algorithm 1 of the paper), with g_i = gamma * dL/dy_i:

    (5) dL/dx_i = (g_i - nu_{t-1} * xhat_i) / sqrt(psi2_{t-1} + eps)
    (6) Gamma_t = 1/B * sum_i xhat_i^2,          Lambda_t = 1/B * sum_i g_i * xhat_i
    (7) nu_t    = nu_{t-1} * (1 - (1 - alpha_b) * Gamma_t) + (1 - alpha_b) * Lambda_t
    (8) dL/dgamma = sum_i dL/dy_i * xhat_i,      dL/dbeta = sum_i dL/dy_i

(9) is what (5) approximates: the exact gradient of PN-V, x / sqrt(psi2_B + eps) with the *batch*
statistic, is dL/dx_i = (g_i - Lambda_B * xhat_i) / sqrt(psi2_B + eps); PN replaces the batch
Lambda_B by its running average nu, which keeps the gradient bounded. At inference y = gamma * x /
sqrt(psi2 + eps) + beta with the final psi2, as in (2)-(3).

``official_compat=True`` reproduces the official code (sIncerass/powernorm,
fairseq/modules/norms/mask_powernorm.py:MaskPowerNorm) instead, which departs from the paper:
(10) a per-token RMS pre-scaling over ``group_num`` channel groups, x <- x / sqrt(mean_group x^2 + 1e-5)
(``GroupScaling1D``, differentiated by autograd); batch statistics in the forward pass while
``iters <= warmup_iters``; during warm-up (``iters < warmup_iters``) a cumulative-average update of
psi2 followed by the EMA (4) in the same step; the backward pass always divides by the *batch*
sqrt(psi2_B + eps); the backward means (6) run over all T*B positions, pads included. The official
buffer ``ema_gz`` is nu / (1 - alpha_b); :attr:`PowerNorm.ema_gz` exposes it.

Critical loops, each with backends ``"numpy"`` (readable reference), ``"numba"`` (parallel kernels
over blocks of rows; per-channel partial sums in x's dtype over chunks of rows, merged in float64)
and ``"torch"`` (vectorised, device-agnostic): :func:`quadratic_mean` (1), the forward
normalisation :func:`power_norm` (2)-(3), and the backward correction :func:`power_norm_backward`
(5), (6), (8), which reads every token once.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from numba import njit, prange

from refimpl._common.backend import like_input, resolve_backend, to_numpy, to_torch
from refimpl._common.validate import check_floating, check_positive
from refimpl._common.kernels import FASTMATH as _FASTMATH, PARALLEL_MIN, row_blocks

__all__ = ["quadratic_mean", "power_norm", "power_norm_backward", "group_scaling",
           "PowerNormFunction", "PowerNorm"]

# Rows summed in x's dtype before the per-channel partial sums are flushed to float64.
_CHUNK = 256


# ----------------------------------------------------------------------------- validation
def _check_x(x: Any, name: str = "x") -> int:
    check_floating(x, name)
    if x.ndim < 2:
        raise ValueError(f"{name} must have shape (..., C) with at least 2 dimensions "
                         f"(tokens x channels), got shape {tuple(x.shape)}")
    if x.shape[-1] == 0 or math.prod(x.shape[:-1]) == 0:
        raise ValueError(f"{name} must have at least one token and one channel, got shape {tuple(x.shape)}")
    return int(x.shape[-1])


def _check_valid(valid: Any, x: Any) -> Any:
    """``valid``: bool mask over the leading (token) dimensions of x, True = the token counts."""
    if valid is None:
        return None
    if not isinstance(valid, (np.ndarray, torch.Tensor)):
        raise TypeError(f"valid must be a numpy.ndarray or torch.Tensor of bools, got {type(valid).__name__}")
    if (valid.dtype != torch.bool) if isinstance(valid, torch.Tensor) else (valid.dtype != np.bool_):
        raise TypeError(f"valid must have a bool dtype, got {valid.dtype}")
    if tuple(valid.shape) != tuple(x.shape[:-1]):
        raise ValueError(f"valid must have x's leading shape {tuple(x.shape[:-1])}, got {tuple(valid.shape)}")
    if not bool(valid.any()):
        raise ValueError("valid must select at least one token (all tokens are masked out)")
    return valid


def _check_channel_vec(p: Any, name: str, c: int) -> None:
    if p is None:
        return
    check_floating(p, name)
    if tuple(p.shape) != (c,):
        raise ValueError(f"{name} must have shape ({c},), one value per channel, got {tuple(p.shape)}")


def _check_finite_stat(stat: Any, name: str) -> None:
    """NaN/inf in x shows up in its per-channel sums: a check on C numbers instead of N*C."""
    if isinstance(stat, torch.Tensor):
        if stat.device.type != "cpu":
            return
        bad = ~torch.isfinite(stat)
        if bad.any():
            raise ValueError(f"{name} contains NaN or infinity (first in channel {int(bad.nonzero()[0, 0])})")
        return
    bad = ~np.isfinite(stat)
    if bad.any():
        raise ValueError(f"{name} contains NaN or infinity (first in channel {int(np.flatnonzero(bad)[0])})")


# ----------------------------------------------------------------------------- numpy reference
def _qmean_numpy(x2: np.ndarray, valid: np.ndarray | None) -> np.ndarray:
    xs = x2 if valid is None else x2[valid]
    with np.errstate(invalid="ignore", over="ignore"):
        return np.mean(xs.astype(np.float64) ** 2, axis=0)                           # (1)


def _backward_numpy(dy, z, w, nu, rstd, valid):
    g = dy * w                                                                       # (5)
    dx = (g - nu * z) * rstd
    zs, gs = (z, g) if valid is None else (z[valid], g[valid])
    n = zs.shape[0]
    gamma = (zs.astype(np.float64) ** 2).sum(axis=0) / n                             # (6)
    lam = (gs.astype(np.float64) * zs).sum(axis=0) / n
    dw = (dy.astype(np.float64) * z).sum(axis=0)                                     # (8)
    db = dy.astype(np.float64).sum(axis=0)
    return dx, dw, db, gamma, lam


# ----------------------------------------------------------------------------- numba kernels
def _qsum_py(x, valid, use_valid, part):
    """part[blk, c] = sum of x[r, c]^2 over the valid rows r of block blk (eq. 1, unnormalised).
    Rows are summed in x's dtype over chunks of _CHUNK rows (a loop over contiguous channels that
    the compiler vectorises), each chunk flushed into float64."""
    n, c = x.shape
    T = x.dtype.type
    nblocks = part.shape[0]
    for blk in prange(nblocks):
        acc = np.zeros(c, dtype=x.dtype)
        out = part[blk]
        lo = blk * n // nblocks
        hi = (blk + 1) * n // nblocks
        for start in range(lo, hi, _CHUNK):
            stop = min(start + _CHUNK, hi)
            for j in range(c):
                acc[j] = T(0)
            for r in range(start, stop):
                if use_valid and not valid[r]:
                    continue
                xr = x[r]
                for j in range(c):
                    acc[j] += xr[j] * xr[j]
            for j in range(c):
                out[j] += acc[j]


def _normalize_py(x, r, w, b, y):
    """y = w * (x * r) + b per channel (eqs. 2-3)."""
    n, c = x.shape
    for i in prange(n):
        xr = x[i]
        yr = y[i]
        for j in range(c):
            yr[j] = w[j] * (xr[j] * r[j]) + b[j]


def _backward_py(dy, z, w, nu, rstd, valid, use_valid, dx, part):
    """One read of every token: dx (eq. 5) and, per block of rows, the partial sums
    part[blk] = (sum z^2, sum dy*z [valid rows], sum dy*z, sum dy [all rows]) of eqs. (6), (8)."""
    n, c = z.shape
    T = z.dtype.type
    nblocks = part.shape[0]
    for blk in prange(nblocks):
        szz = np.zeros(c, dtype=z.dtype)
        sgz = np.zeros(c, dtype=z.dtype)
        swz = np.zeros(c, dtype=z.dtype)
        sdy = np.zeros(c, dtype=z.dtype)
        out = part[blk]
        lo = blk * n // nblocks
        hi = (blk + 1) * n // nblocks
        for start in range(lo, hi, _CHUNK):
            stop = min(start + _CHUNK, hi)
            for j in range(c):
                szz[j] = T(0)
                sgz[j] = T(0)
                swz[j] = T(0)
                sdy[j] = T(0)
            for r in range(start, stop):
                dyr = dy[r]
                zr = z[r]
                dxr = dx[r]
                keep = T(1) if (not use_valid or valid[r]) else T(0)
                for j in range(c):
                    d = dyr[j]
                    zz = zr[j]
                    dxr[j] = (d * w[j] - nu[j] * zz) * rstd[j]
                    dz = d * zz
                    swz[j] += dz
                    sdy[j] += d
                    szz[j] += keep * (zz * zz)
                    sgz[j] += keep * dz
            for j in range(c):
                out[0, j] += szz[j]
                out[1, j] += sgz[j]
                out[2, j] += swz[j]
                out[3, j] += sdy[j]


# Each kernel compiled twice: parallel over blocks of rows, and serial for small inputs, where
# waking the thread pool costs more than the work (and, on a loaded machine, a scheduler slice).
_PAR = dict(parallel=True, cache=True, fastmath=_FASTMATH)
_SER = dict(cache=True, fastmath=_FASTMATH)
_qsum_par, _qsum_ser = njit(**_PAR)(_qsum_py), njit(**_SER)(_qsum_py)
_normalize_par, _normalize_ser = njit(**_PAR)(_normalize_py), njit(**_SER)(_normalize_py)
_backward_par, _backward_ser = njit(**_PAR)(_backward_py), njit(**_SER)(_backward_py)


def _nblocks(n: int, c: int) -> int:
    return row_blocks(n, n * c)


def _qmean_numba_host(x2, valid):
    n, c = x2.shape
    nb = _nblocks(n, c)
    part = np.zeros((nb, c))
    v = np.ones(1, np.bool_) if valid is None else np.ascontiguousarray(valid)
    (_qsum_ser if nb == 1 else _qsum_par)(x2, v, valid is not None, part)
    count = n if valid is None else int(np.count_nonzero(valid))
    return part.sum(axis=0) / count


def _backward_numba_host(dy, z, w, nu, rstd, valid):
    n, c = z.shape
    dx = np.empty_like(z)
    nb = _nblocks(n, c)
    part = np.zeros((nb, 4, c))
    v = np.ones(1, np.bool_) if valid is None else np.ascontiguousarray(valid)
    (_backward_ser if nb == 1 else _backward_par)(dy, z, w, nu, rstd, v, valid is not None, dx, part)
    s = part.sum(axis=0)
    count = n if valid is None else int(np.count_nonzero(valid))
    return dx, s[2], s[3], s[0] / count, w * s[1] / count


# ----------------------------------------------------------------------------- torch path
def _qmean_torch(x2: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    xs = x2 if valid is None else x2[valid]
    return xs.square().mean(dim=0)                                                   # (1)


def _backward_torch(dy, z, w, nu, rstd, valid):
    g = dy * w
    dx = (g - nu * z) * rstd                                                         # (5)
    zs, gs = (z, g) if valid is None else (z[valid], g[valid])
    gamma = zs.square().mean(dim=0)                                                  # (6)
    lam = (gs * zs).mean(dim=0)
    return dx, (dy * z).sum(dim=0), dy.sum(dim=0), gamma, lam                        # (8)


# ----------------------------------------------------------------------------- public API
def _flat(x: Any, c: int):
    if isinstance(x, torch.Tensor):
        return x.reshape(-1, c)
    return np.ascontiguousarray(x).reshape(-1, c)


def _flat_valid(valid: Any):
    if valid is None:
        return None
    return valid.reshape(-1) if isinstance(valid, torch.Tensor) else np.ascontiguousarray(valid).reshape(-1)


def quadratic_mean(x: Any, valid: Any = None, backend: str = "auto") -> Any:
    """Per-channel batch quadratic mean psi2_B = mean over tokens of x^2 (eq. 1).

    Args:
        x: (..., C) array or tensor, floating dtype; every leading index is a token.
        valid: None or a bool mask of shape x.shape[:-1], True = the token counts (False = pad).
        backend: "numpy" | "numba" | "torch" | "auto" (torch for tensors, numba for arrays).
    Returns:
        (C,) in x's dtype and type. The numpy and numba backends accumulate in float64 (numba:
        chunks of 256 rows in x's dtype, then float64); no gradient flows through it.
    """
    c = _check_x(x)
    valid = _check_valid(valid, x)
    backend = resolve_backend(backend, x)
    if backend == "torch":
        xt = to_torch(x)
        vt = None if valid is None else to_torch(valid, like=xt).reshape(-1)
        with torch.no_grad():
            out = _qmean_torch(xt.reshape(-1, c), vt)
    else:
        x2 = _flat(to_numpy(x), c)
        v = None if valid is None else _flat_valid(to_numpy(valid))
        out = (_qmean_numpy(x2, v) if backend == "numpy" else _qmean_numba_host(x2, v)).astype(x2.dtype)
    _check_finite_stat(out, "x")
    return like_input(out, x)


def power_norm(x: Any, weight: Any = None, bias: Any = None, running_psi2: Any = None,
               eps: float = 1e-5, valid: Any = None, backend: str = "auto") -> tuple[Any, Any]:
    """One PN forward step without state (eqs. 1-3): returns ``(y, psi2_B)``.

    Args:
        x: (..., C), floating, finite. weight, bias: (C,) or None (gamma = 1, beta = 0).
        running_psi2: (C,) running quadratic mean psi2_{t-1} to normalise by (eq. 2), or None to
            normalise by the batch statistic psi2_B (PN-V, and the official code's warm-up).
        eps: > 0, added to psi2 under the square root. valid: as in :func:`quadratic_mean`
            (pads are normalised too; they only do not enter psi2_B).
    Returns:
        y like x, and psi2_B (C,) to feed the running update (4). No gradient flows here; use
        :class:`PowerNorm` (or :class:`PowerNormFunction`) for training.
    """
    c = _check_x(x)
    eps = check_positive(eps, "eps")
    for name, p in (("weight", weight), ("bias", bias), ("running_psi2", running_psi2)):
        _check_channel_vec(p, name, c)
    psi2_b = quadratic_mean(x, valid, backend)
    backend = resolve_backend(backend, x)
    psi2 = psi2_b if running_psi2 is None else running_psi2
    if backend == "torch":
        xt = to_torch(x)
        with torch.no_grad():
            r = torch.rsqrt(to_torch(psi2, like=xt).to(xt.dtype) + eps)
            y = xt * r
            if weight is not None:
                y = y * to_torch(weight, like=xt)
            if bias is not None:
                y = y + to_torch(bias, like=xt)
        return like_input(y, x), psi2_b
    x2 = _flat(to_numpy(x), c)
    dt = x2.dtype
    r = (1.0 / np.sqrt(to_numpy(psi2).astype(np.float64) + eps)).astype(dt)
    w = np.ones(c, dt) if weight is None else np.ascontiguousarray(to_numpy(weight), dtype=dt)
    b = np.zeros(c, dt) if bias is None else np.ascontiguousarray(to_numpy(bias), dtype=dt)
    if backend == "numpy":
        y = w * (x2 * r) + b                                                         # (2), (3)
    else:
        y = np.empty_like(x2)
        (_normalize_ser if x2.size < PARALLEL_MIN else _normalize_par)(x2, r, w, b, y)
    return like_input(y.reshape(x.shape), x), psi2_b


def power_norm_backward(grad_out: Any, xhat: Any, weight: Any, nu: Any, rstd: Any,
                        valid: Any = None, backend: str = "auto") -> tuple[Any, Any, Any, Any, Any]:
    """The approximate backward pass of PN (eqs. 5, 6, 8), in one read of every token.

    Args:
        grad_out: dL/dy, (..., C). xhat: the normalised input of the forward pass, same shape.
        weight: gamma (C,) or None (ones). nu: (C,) running correction nu_{t-1}.
        rstd: (C,) the factor dL/dx is scaled by, 1/sqrt(psi2 + eps).
        valid: None or bool mask over the tokens that enter Gamma and Lambda (eq. 6).
    Returns:
        ``(dx, dweight, dbias, Gamma, Lambda)``: dx like xhat; the other four (C,). dweight and
        dbias sum over all tokens; Gamma and Lambda average over the valid ones. The numpy and
        numba backends return the four (C,) sums in float64.
    """
    c = _check_x(xhat, "xhat")
    check_floating(grad_out, "grad_out")
    if tuple(grad_out.shape) != tuple(xhat.shape):
        raise ValueError(f"grad_out must have xhat's shape {tuple(xhat.shape)}, got {tuple(grad_out.shape)}")
    for name, p in (("weight", weight), ("nu", nu), ("rstd", rstd)):
        _check_channel_vec(p, name, c)
    if nu is None or rstd is None:
        raise ValueError("nu and rstd are required (C,) vectors")
    valid = _check_valid(valid, xhat)
    backend = resolve_backend(backend, xhat)
    if backend == "torch":
        zt = to_torch(xhat)
        k = dict(like=zt)
        with torch.no_grad():
            w = torch.ones(c, dtype=zt.dtype, device=zt.device) if weight is None else to_torch(weight, **k)
            out = _backward_torch(to_torch(grad_out, **k).reshape(-1, c), zt.reshape(-1, c), w,
                                  to_torch(nu, **k), to_torch(rstd, **k),
                                  None if valid is None else to_torch(valid, **k).reshape(-1))
    else:
        z2 = _flat(to_numpy(xhat), c)
        dt = z2.dtype
        dy2 = np.ascontiguousarray(to_numpy(grad_out), dtype=dt).reshape(-1, c)
        w = np.ones(c, dt) if weight is None else np.ascontiguousarray(to_numpy(weight), dtype=dt)
        nu_, rs = (np.ascontiguousarray(to_numpy(a), dtype=dt) for a in (nu, rstd))
        v = None if valid is None else _flat_valid(to_numpy(valid))
        fn = _backward_numpy if backend == "numpy" else _backward_numba_host
        out = fn(dy2, z2, w, nu_, rs, v)
    _check_finite_stat(out[4], "grad_out or xhat")
    dx = out[0].reshape(xhat.shape)
    return tuple(like_input(o, xhat) for o in (dx,) + tuple(out[1:]))


def group_scaling(x: torch.Tensor, group_num: int = 1, eps: float = 1e-5) -> torch.Tensor:
    """The official code's pre-scaling (eq. 10, not in the paper): every token's C channels split
    into ``group_num`` groups of C/group_num, each divided by its root mean square,
    x / sqrt(mean_group x^2 + eps). Differentiable (plain torch ops). x: (..., C) tensor."""
    c = _check_x(x)
    if isinstance(group_num, bool) or not isinstance(group_num, (int, np.integer)) or group_num < 1:
        raise ValueError(f"group_num must be a positive int, got {group_num!r}")
    if c % group_num:
        raise ValueError(f"group_num={group_num} must divide the number of channels C={c}")
    eps = check_positive(eps, "eps")
    xg = x.reshape(*x.shape[:-1], group_num, c // group_num)
    ms = xg.square().mean(dim=-1, keepdim=True)
    return (xg / torch.sqrt(ms + eps)).reshape(x.shape)


class PowerNormFunction(torch.autograd.Function):
    """PN's forward (2)-(3) with the approximate backward (5)-(8).

    ``apply(x, weight, bias, fwd_rstd, bwd_rstd, nu, nu_out, alpha_bkw, valid)``:
    x (N, C); weight, bias (C,); fwd_rstd (C,) = 1/sqrt(psi2 + eps) used in the forward pass;
    bwd_rstd (C,) the factor of the backward pass (eq. 5: the same running value in the paper,
    the batch value in the official code); nu (C,) read at backward time; nu_out (C,) or None:
    when given, the backward pass writes nu_t (eq. 7) into it in place (pass the same tensor as
    nu for the running state); valid: None or (N,) bool, the tokens of Gamma/Lambda (eq. 6).
    With nu = 0 the backward is the exact gradient of (2)-(3) with psi2 held fixed.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, fwd_rstd, bwd_rstd, nu, nu_out, alpha_bkw, valid):
        z = x * fwd_rstd                                                             # (2)
        y = z * weight + bias                                                        # (3)
        ctx.save_for_backward(z, weight, bwd_rstd, valid)
        ctx.nu, ctx.nu_out, ctx.alpha_bkw = nu, nu_out, alpha_bkw
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        z, weight, bwd_rstd, valid = ctx.saved_tensors
        nu = ctx.nu.detach()
        dx, dw, db, gamma, lam = _backward_torch(dy, z, weight, nu, bwd_rstd, valid)
        if ctx.nu_out is not None:
            a = 1.0 - ctx.alpha_bkw
            with torch.no_grad():
                ctx.nu_out.copy_(nu * (1.0 - a * gamma) + a * lam)                   # (7)
        return dx, dw, db, None, None, None, None, None, None


class PowerNorm(torch.nn.Module):
    """Power Normalization over the last dimension of token activations.

    Input x: (T, B, C) with ``pad_mask`` (B, T) bool, True = pad (the official convention), or
    (N, C) with ``pad_mask`` (N,). Output: x's shape. Parameters gamma = 1, beta = 0 at init;
    buffers ``running_phi`` (C,) = psi2 (init 1), ``nu`` (C,) (init 0), ``iters``.

    ``official_compat=False`` (default) is the paper's Algorithm 1, eqs. (1)-(8): forward and
    backward use psi2_{t-1}; batch statistics only during the first ``warmup_iters`` steps (0 by
    default: none); Gamma/Lambda over non-pad tokens. ``official_compat=True`` reproduces
    MaskPowerNorm of the official code (see the module docstring), ``group_num`` included.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, alpha_fwd: float = 0.9,
                 alpha_bkw: float = 0.9, warmup_iters: int = 0, group_num: int = 1,
                 official_compat: bool = False, device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, (int, np.integer)) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        for name, a in (("alpha_fwd", alpha_fwd), ("alpha_bkw", alpha_bkw)):
            if isinstance(a, bool) or not isinstance(a, (int, float)) or not 0.0 <= a < 1.0:
                raise ValueError(f"{name} must be a float in [0, 1), got {a!r}")
        if isinstance(warmup_iters, bool) or not isinstance(warmup_iters, (int, np.integer)) or warmup_iters < 0:
            raise ValueError(f"warmup_iters must be a non-negative int, got {warmup_iters!r}")
        if isinstance(group_num, bool) or not isinstance(group_num, (int, np.integer)) or group_num < 1 \
                or num_features % group_num:
            raise ValueError(f"group_num must be a positive int dividing num_features={num_features}, "
                             f"got {group_num!r}")
        self.num_features = int(num_features)
        self.eps = check_positive(eps, "eps")
        self.alpha_fwd, self.alpha_bkw = float(alpha_fwd), float(alpha_bkw)
        self.warmup_iters, self.group_num = int(warmup_iters), int(group_num)
        self.official_compat = bool(official_compat)
        kw = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.ones(num_features, **kw))
        self.bias = torch.nn.Parameter(torch.zeros(num_features, **kw))
        self.register_buffer("running_phi", torch.ones(num_features, **kw))
        self.register_buffer("nu", torch.zeros(num_features, **kw))
        self.register_buffer("iters", torch.zeros((), dtype=torch.long, device=device))

    @property
    def ema_gz(self) -> torch.Tensor:
        """The official code's backward buffer, nu / (1 - alpha_bkw)."""
        return self.nu / (1.0 - self.alpha_bkw)

    def _valid(self, x: torch.Tensor, pad_mask: torch.Tensor | None) -> torch.Tensor | None:
        if pad_mask is None:
            return None
        if not isinstance(pad_mask, torch.Tensor) or pad_mask.dtype != torch.bool:
            raise TypeError("pad_mask must be a bool tensor (True = pad)")
        want = (x.shape[1], x.shape[0]) if x.ndim == 3 else (x.shape[0],)
        if tuple(pad_mask.shape) != want:
            raise ValueError(f"pad_mask must have shape {want} (B, T) for x of shape {tuple(x.shape)}, "
                             f"got {tuple(pad_mask.shape)}")
        valid = ~pad_mask.t() if x.ndim == 3 else ~pad_mask
        return valid.reshape(-1).to(x.device)

    def forward(self, x: torch.Tensor, pad_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_floating(x, "x")
        if not isinstance(x, torch.Tensor):
            raise TypeError("x must be a torch.Tensor")
        if x.ndim not in (2, 3) or x.shape[-1] != self.num_features:
            raise ValueError(f"x must have shape (T, B, {self.num_features}) or (N, {self.num_features}), "
                             f"got {tuple(x.shape)}")
        valid = self._valid(x, pad_mask)
        if valid is not None and not bool(valid.any()):
            raise ValueError("pad_mask masks out every token")
        if self.official_compat:
            x = group_scaling(x, self.group_num, 1e-5)                               # (10)
        c = self.num_features
        x2 = x.reshape(-1, c)
        if not self.training:
            r = torch.rsqrt(self.running_phi + self.eps)
            return (x2 * r * self.weight + self.bias).reshape(x.shape)
        with torch.no_grad():
            self.iters += 1
            it = int(self.iters)
            psi2_b = _qmean_torch(x2.detach(), valid)                                # (1)
            _check_finite_stat(psi2_b, "x")
            warm = it <= self.warmup_iters
            r_batch = torch.rsqrt(psi2_b + self.eps)
            r_run = torch.rsqrt(self.running_phi + self.eps)
            fwd_r = r_batch if warm else r_run
            if self.official_compat:
                bwd_r, bwd_valid = r_batch, None
                if it < self.warmup_iters:       # cumulative average, then the EMA below as well
                    self.running_phi.mul_((it - 1) / it).add_(psi2_b / it)
            else:
                bwd_r, bwd_valid = fwd_r, valid
            self.running_phi.mul_(self.alpha_fwd).add_((1 - self.alpha_fwd) * psi2_b)   # (4)
        y = PowerNormFunction.apply(x2, self.weight, self.bias, fwd_r, bwd_r, self.nu, self.nu,
                                    self.alpha_bkw, bwd_valid)
        return y.reshape(x.shape)

    def extra_repr(self) -> str:
        return (f"{self.num_features}, eps={self.eps}, alpha_fwd={self.alpha_fwd}, "
                f"alpha_bkw={self.alpha_bkw}, warmup_iters={self.warmup_iters}, "
                f"group_num={self.group_num}, official_compat={self.official_compat}")
