"""Quantization Error Propagation (QEP): layer-wise post-training quantization that compensates the
error the already-quantized layers pass on (Arai & Ichikawa, 2025, arXiv:2504.09629).

Notation (columns are tokens, as in the paper): a linear layer ``y = W x`` with ``W`` of shape
``(out, d)``; ``X`` (d × T) are the layer's inputs in the full-precision network, ``X̂`` the inputs it
receives from the already-quantized prefix, ``δ = X − X̂`` the error that reaches it.

    (1) layer-wise PTQ (GPTQ, RTN, ...):   min_{Ŵ ∈ Q}  ‖W X̂ − Ŵ X̂‖²_F
    (2) QEP's objective:                   min_{Ŵ ∈ Q}  ‖W X − Ŵ X̂‖²_F
    (3) Pythagoras, for the least-squares minimiser W* of ‖W X − W' X̂‖² over all real W':
            ‖W X − Ŵ X̂‖² = ‖W X − W* X̂‖² + ‖(W* − Ŵ) X̂‖²
        so (2) = quantize W* with the ordinary layer-wise objective (1) and Hessian X̂ X̂ᵀ.
    (4) W* = W X X̂ᵀ (X̂ X̂ᵀ)⁻¹ = W + W δ X̂ᵀ (X̂ X̂ᵀ)⁻¹
    (5) damped (ridge toward W, weight λ) and tempered by the propagation strength α ∈ [0, 1]:
            W*(α) = W + α · W δ X̂ᵀ (X̂ X̂ᵀ + λ I)⁻¹,        λ = percdamp · mean diag(H)
    (6) statistics as the official ``Helper.add_batch_qep`` keeps them, running means over N samples
        (a sample = one leading-axis slice; its tokens are summed):
            H = (2/N) Σ_n X̂_n X̂_nᵀ,      H_δ = (2/N) Σ_n δ_n X̂_nᵀ,
        so (5) reads  W*(α) = W + α · W H_δ (H + λ I)⁻¹  (the 2/N cancels; λ scales with H).

The base quantizers, with ``b`` bits and ``M = 2^b − 1``:

    (7) GPTQ's ``quant.Quantizer`` (asymmetric, per output channel): eq. Q2 of the toolbox applied to
        the row with a 0 appended, x_min = min(0, min_j w_j), x_max = max(0, max_j w_j),
            s = (x_max − x_min)/M,  z = round(−x_min / s),  q(w) = s · (clamp(round(w/s) + z, 0, M) − z)
        (an all-zero row gets x_min, x_max = −1, 1).
    (8) GPTQ (Frantar et al., 2023), column by column with U = chol((H + λI)⁻¹) upper-triangular:
            e_i = (w_i − q(w_i)) / U_ii,     w_{j} ← w_{j} − e_i U_ij   for j > i
    (9) lazy batches of B columns: inside a block (8) runs on the block only, then
            W[:, i2:] ← W[:, i2:] − E · U[i1:i2, i2:]    (E = the block's e columns)
   (10) the driver's RTN (AWQ's ``pseudo_quantize_tensor``, zero point on, per output channel):
            s = max(max w − min w, 1e-5)/M,  z = clamp(−round(min w / s), 0, M),  q(w) = s (clamp(round(w/s) + z, 0, M) − z)
        — eq. Q2 of the toolbox whenever min w < 0 < max w and the range is ≥ 1e-5.

The critical loop is GPTQ's column sweep (8)-(9): ``backend="numpy"`` (a readable reference with the
official lazy-batch structure), ``"numba"`` (rows are independent given U: a kernel sweeps each column block
over tiles of rows, in parallel for large layers, keeping U's row i in L1 across a tile; the trailing update
(9) stays one BLAS product per block), ``"torch"`` (the lazy-batch structure,
device-agnostic), ``"auto"`` (torch for tensors, numba for arrays).
"""
from __future__ import annotations

import copy
import math
import numbers
from typing import Any, Sequence

import numba
import numpy as np
import scipy.linalg
import scipy.linalg.lapack
import torch
from torch import nn

from refimpl._common.backend import like_input, resolve_backend, to_numpy, to_torch
from refimpl._common.kernels import FASTMATH, row_blocks
from refimpl._common.validate import check_finite, check_floating, check_int
from refimpl.quant.quantizers import _check_bits, quantize_groups

__all__ = ["HessianAccumulator", "qep_correct", "gptq_minmax_params", "gptq_quantize", "gptq_sweep", "rtn_minmax",
           "quantize_mlp_layerwise", "layer_errors"]


# ----------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------
def _check_matrix(x: Any, name: str) -> None:
    check_floating(x, name)
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D matrix, got shape {tuple(x.shape)}")
    check_finite(x, name)


def _check_hessian(H: Any, W: Any, name: str = "H") -> None:
    _check_matrix(H, name)
    d = W.shape[1]
    if tuple(H.shape) != (d, d):
        raise ValueError(f"{name} must have shape (d, d) = ({d}, {d}) for W of shape {tuple(W.shape)}, "
                         f"got {tuple(H.shape)}")
    if type(H) is not type(W):
        raise TypeError(f"{name} must be a {type(W).__name__} like W, got {type(H).__name__}")


def _check_nonneg(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


# ----------------------------------------------------------------------------------------------
# statistics, eq. (6)
# ----------------------------------------------------------------------------------------------
class HessianAccumulator:
    """Running means ``H = (2/N) Σ X̂_n X̂_nᵀ`` and ``H_δ = (2/N) Σ (X_n − X̂_n) X̂_nᵀ`` (eq. 6), updated
    exactly as the official ``Helper.add_batch`` / ``add_batch_qep``.

    ``add(x_hat, x=None)``: ``x_hat`` of shape ``(tokens, d)`` (one sample) or ``(batch, tokens, d)``
    (``batch`` samples), float NumPy array or tensor; ``x`` (same shape) the full-precision inputs —
    omit it to accumulate ``H`` only (``H_δ`` is then left unchanged). ``N`` counts samples, not tokens.
    The statistics keep the type and dtype of the first ``x_hat`` (the official code casts to float32).
    """

    def __init__(self, d: int):
        self.d = check_int(d, "d", 1)
        self.H: Any = None
        self.H_delta: Any = None
        self.nsamples = 0

    def add(self, x_hat: Any, x: Any = None) -> "HessianAccumulator":
        check_floating(x_hat, "x_hat")
        if x_hat.ndim not in (2, 3) or x_hat.shape[-1] != self.d:
            raise ValueError(f"x_hat must have shape (tokens, {self.d}) or (batch, tokens, {self.d}), "
                             f"got {tuple(x_hat.shape)}")
        check_finite(x_hat, "x_hat")
        if x is not None:
            check_floating(x, "x")
            if tuple(x.shape) != tuple(x_hat.shape) or type(x) is not type(x_hat):
                raise ValueError(f"x must be a {type(x_hat).__name__} of the shape of x_hat {tuple(x_hat.shape)}, "
                                 f"got {type(x).__name__} {tuple(x.shape)}")
            check_finite(x, "x")
        is_t = isinstance(x_hat, torch.Tensor)
        if self.H is None:
            self.H = (torch.zeros((self.d, self.d), dtype=x_hat.dtype, device=x_hat.device) if is_t
                      else np.zeros((self.d, self.d), x_hat.dtype))
            self.H_delta = self.H * 0
        elif type(self.H) is not type(x_hat) or self.H.dtype != x_hat.dtype:
            raise TypeError(f"x_hat must be a {type(self.H).__name__} of dtype {self.H.dtype} like the first batch, "
                            f"got {type(x_hat).__name__} {x_hat.dtype}")
        batch = 1 if x_hat.ndim == 2 else x_hat.shape[0]
        xh = x_hat.reshape(-1, self.d)
        self.H *= self.nsamples / (self.nsamples + batch)
        if x is not None:
            self.H_delta *= self.nsamples / (self.nsamples + batch)
        self.nsamples += batch
        c = math.sqrt(2 / self.nsamples)
        xs = c * xh
        self.H += xs.T @ xs
        if x is not None:
            ds = c * (x.reshape(-1, self.d) - xh)
            self.H_delta += ds.T @ xs
        return self


def _damped_cholesky_inverse(H: Any, percdamp: float):
    """``(H' + λI)⁻¹`` with dead inputs (diag H = 0) set to 1 and ``λ = percdamp · mean diag H'``; also
    returns the dead mask. Follows the official code: Cholesky, then the inverse from the factor."""
    if isinstance(H, torch.Tensor):
        H = H.clone()
        dead = torch.diag(H) == 0
        H[dead, dead] = 1
        H.diagonal().add_(percdamp * torch.mean(torch.diag(H)))
        return torch.cholesky_inverse(torch.linalg.cholesky(H)), dead
    H = np.array(H, copy=True)
    dead = np.diag(H) == 0
    H[dead, dead] = 1
    H[np.diag_indices_from(H)] += H.dtype.type(percdamp * np.mean(np.diag(H)))
    L = np.linalg.cholesky(H)
    potri, = scipy.linalg.lapack.get_lapack_funcs(("potri",), (L,))  # LAPACK's inverse from the factor, like
    inv, info = potri(L, lower=1)                                    # torch.cholesky_inverse
    if info != 0:
        raise np.linalg.LinAlgError(f"potri failed with info={info}")
    return np.tril(inv) + np.tril(inv, -1).T, dead


# ----------------------------------------------------------------------------------------------
# the correction, eq. (5)
# ----------------------------------------------------------------------------------------------
def qep_correct(W: Any, H: Any, H_delta: Any, *, alpha: float = 0.5, percdamp: float = 1.0) -> Any:
    """QEP's weight correction ``W*(α) = W + α · W H_δ (H + λI)⁻¹`` with ``λ = percdamp · mean diag H``
    (eq. 5 with the statistics of eq. 6).

    Args:
        W: ``(out, d)`` float weight (NumPy array or tensor), not modified.
        H, H_delta: ``(d, d)`` statistics from :class:`HessianAccumulator` (same type as ``W``).
        alpha: propagation strength α (0: no correction, 1: the full least-squares fix; the official
            driver's default is 0.5).
        percdamp: λ relative to the mean of diag H (the official driver's ``--percdampqep`` default is
            1.0, a hundred times GPTQ's).

    Returns:
        the corrected ``(out, d)`` weight, type and dtype of ``W``. As in the official code, input
        columns that never see a non-zero input (diag H = 0) are zeroed.
    """
    _check_matrix(W, "W")
    _check_hessian(H, W, "H")
    _check_hessian(H_delta, W, "H_delta")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha):
        raise TypeError(f"alpha must be a finite real number, got {alpha!r}")
    percdamp = _check_nonneg(percdamp, "percdamp")
    Hinv, dead = _damped_cholesky_inverse(H, percdamp)
    W = W.clone() if isinstance(W, torch.Tensor) else np.array(W, copy=True)
    W[:, dead] = 0
    return W + (W @ H_delta @ Hinv) * alpha


# ----------------------------------------------------------------------------------------------
# quantizers, eqs. (7) and (10)
# ----------------------------------------------------------------------------------------------
def gptq_minmax_params(W: Any, bits: int, *, backend: str = "auto"):
    """Per-output-channel scale and zero point of GPTQ's ``quant.Quantizer(sym=False)`` (eq. 7): the
    toolbox's eq. Q2 on each row with a 0 appended (so the grid always holds 0). Returns ``(scale, zero)``
    of shape ``(out, 1)``, type and dtype of ``W``."""
    _check_matrix(W, "W")
    _check_bits(bits, 1, 16)
    if isinstance(W, torch.Tensor):
        aug = torch.cat([W, W.new_zeros(W.shape[0], 1)], dim=1)
    else:
        aug = np.concatenate([W, np.zeros((W.shape[0], 1), W.dtype)], axis=1)
    _, scale, zero = quantize_groups(aug, bits, mode="asymmetric", granularity="channel", axis=0, backend=backend)
    # the toolbox gives an all-zero row s = 1, z = 0; quant.Quantizer widens it to [-1, 1]
    flat = (W == 0).all(1)
    if bool(flat.any()):
        maxq = 2 ** bits - 1
        scale[flat] = 2 / maxq
        one = scale[flat] * 0 + 1
        zero[flat] = (one / scale[flat]).round() if isinstance(W, torch.Tensor) else np.round(one / scale[flat])
    return scale, zero


def rtn_minmax(W: Any, bits: int) -> Any:
    """The official driver's RTN: AWQ's ``pseudo_quantize_tensor(w, n_bit=bits, zero_point=True,
    q_group_size=-1)`` (eq. 10), per output channel; returns the dequantized weight (type of ``W``).

    Equal to the toolbox's ``rtn(W, bits, symmetric=False)`` (eq. Q2) for every row with
    ``min < 0 < max`` and a range >= 1e-5; differs on one-signed rows (the zero point is clamped to
    ``[0, 2^b − 1]``) and on constant rows (scale 1e-5/M instead of 1)."""
    _check_matrix(W, "W")
    _check_bits(bits, 1, 16)
    maxq = 2 ** bits - 1
    if isinstance(W, torch.Tensor):
        lo, hi = W.aminmax(dim=1, keepdim=True)
        s = (hi - lo).clamp(min=1e-5) / maxq
        z = (-torch.round(lo / s)).clamp(0, maxq)
        return (torch.clamp(torch.round(W / s) + z, 0, maxq) - z) * s
    T = W.dtype.type
    lo, hi = W.min(1, keepdims=True), W.max(1, keepdims=True)
    s = np.maximum(hi - lo, T(1e-5)) / T(maxq)
    z = np.clip(-np.round(lo / s), 0, maxq)
    return (np.clip(np.round(W / s) + z, 0, maxq) - z) * s


# ----------------------------------------------------------------------------------------------
# GPTQ, eqs. (8)-(9): the critical loop
# ----------------------------------------------------------------------------------------------
def _gptq_numpy(W, U, scale, zero, maxq, blocksize):
    """Reference: the official lazy-batch sweep in NumPy. W is a working copy (modified)."""
    n = W.shape[1]
    Q = np.zeros_like(W)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[:, i1:i2].copy()
        Err1 = np.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            c = np.clip(np.round(w / scale[:, 0]) + zero[:, 0], 0, maxq)
            q = scale[:, 0] * (c - zero[:, 0])
            Q[:, i1 + i] = q
            err = (w - q) / U1[i, i]                                    # eq. (8)
            W1[:, i:] -= np.outer(err, U1[i, i:])
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]                                # eq. (9)
    return Q


_TILE = 8  # rows swept together: U's row i is read once per tile


@numba.njit(cache=True, fastmath=FASTMATH - {"arcp"}, error_model="numpy")
def _gptq_block_rows(W, U, scale, zero, maxq, i1, i2, r0, r1, Q, Err):
    """Eq. (8) inside the column block [i1, i2) for rows [r0, r1): quantize, record e, update the block."""
    T = W.dtype.type
    err = np.empty(_TILE, W.dtype)
    top = T(maxq)
    for t0 in range(r0, r1, _TILE):
        t1 = min(t0 + _TILE, r1)
        for i in range(i1, i2):
            d = U[i, i]
            for r in range(t0, t1):
                s = scale[r, 0]
                z = zero[r, 0]
                w = W[r, i]
                c = min(max(np.round(w / s) + z, T(0)), top)
                q = s * (c - z)
                Q[r, i] = q
                e = (w - q) / d
                err[r - t0] = e
                Err[r, i - i1] = e
            ui = U[i, i + 1:i2]
            for r in range(t0, t1):
                e = err[r - t0]
                wr = W[r, i + 1:i2]
                for j in range(i2 - i - 1):
                    wr[j] -= e * ui[j]


@numba.njit(parallel=True, cache=True)
def _gptq_block_parallel(W, U, scale, zero, maxq, i1, i2, nblocks, Q, Err):
    m = W.shape[0]
    step = (m + nblocks - 1) // nblocks
    step = ((step + _TILE - 1) // _TILE) * _TILE
    for b in numba.prange(nblocks):
        r0 = b * step
        if r0 < m:
            _gptq_block_rows(W, U, scale, zero, maxq, i1, i2, r0, min(m, r0 + step), Q, Err)


def _gptq_numba(W, U, scale, zero, maxq, blocksize):
    """The in-block sweep (eq. 8) in a Numba kernel over tiles of rows (parallel for large layers), the
    trailing update (eq. 9) as one BLAS matrix product per block."""
    W = np.ascontiguousarray(W)
    U, scale, zero = np.ascontiguousarray(U), np.ascontiguousarray(scale), np.ascontiguousarray(zero)
    m, n = W.shape
    Q = np.empty_like(W)
    Err = np.empty((m, min(blocksize, n)), W.dtype)
    # threads only when one block's sweep is several ms of work (m >= 1024 rows at B = 128): waking the pool
    # for less costs more than it saves on a busy 2-core machine
    nblocks = row_blocks(m, m * min(blocksize, n), parallel_min=1 << 17)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        if nblocks == 1:  # no thread-pool wake-up for small layers
            _gptq_block_rows(W, U, scale, zero, maxq, i1, i2, 0, m, Q, Err)
        else:
            _gptq_block_parallel(W, U, scale, zero, maxq, i1, i2, nblocks, Q, Err)
        if i2 < n:
            W[:, i2:] -= Err[:, :i2 - i1] @ U[i1:i2, i2:]
    return Q


def _gptq_torch(W, U, scale, zero, maxq, blocksize):
    n = W.shape[1]
    Q = torch.zeros_like(W)
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        W1 = W[:, i1:i2].clone()
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[:, i]
            q = scale[:, 0] * (torch.clamp(torch.round(w / scale[:, 0]) + zero[:, 0], 0, maxq) - zero[:, 0])
            Q[:, i1 + i] = q
            err = (w - q) / U1[i, i]
            W1[:, i:] -= err.unsqueeze(1) @ U1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ U[i1:i2, i2:]
    return Q


_GPTQ = {"numpy": _gptq_numpy, "numba": _gptq_numba, "torch": _gptq_torch}


def gptq_sweep(W: Any, U: Any, scale: Any, zero: Any, bits: int, *, blocksize: int = 128,
               backend: str = "auto") -> Any:
    """The critical loop alone: GPTQ's column sweep (eqs. 8-9) on a prepared problem.

    Args:
        W: ``(out, d)`` float weight (dead columns already zeroed); not modified.
        U: ``(d, d)`` upper Cholesky factor of the damped inverse Hessian ``(H + λI)⁻¹``.
        scale, zero: ``(out, 1)`` grid of eq. (7) (:func:`gptq_minmax_params`).
        bits, blocksize, backend: as in :func:`gptq_quantize`.

    Returns:
        the dequantized weight ``Q``, type and dtype of ``W``.
    """
    _check_matrix(W, "W")
    _check_hessian(U, W, "U")
    _check_bits(bits, 1, 16)
    blocksize = check_int(blocksize, "blocksize", 1)
    for name, a in (("scale", scale), ("zero", zero)):
        if tuple(a.shape) != (W.shape[0], 1):
            raise ValueError(f"{name} must have shape ({W.shape[0]}, 1), got {tuple(a.shape)}")
    b = resolve_backend(backend, W)
    maxq = 2 ** bits - 1
    if b == "torch":
        Wt = to_torch(W).clone()
        Q = _gptq_torch(Wt, to_torch(U, like=Wt), to_torch(scale, like=Wt), to_torch(zero, like=Wt), maxq, blocksize)
    else:
        Q = _GPTQ[b](np.array(to_numpy(W), copy=True), to_numpy(U), to_numpy(scale), to_numpy(zero), maxq, blocksize)
    return like_input(Q, W)


def gptq_quantize(W: Any, H: Any, bits: int, *, blocksize: int = 128, percdamp: float = 0.01,
                  backend: str = "auto", return_params: bool = False):
    """GPTQ with asymmetric per-channel min-max quantization (eqs. 7-9), as the official ``Helper.run_gptq``
    (``groupsize=-1``, ``actorder=False``).

    Args:
        W: ``(out, d)`` float weight (NumPy array or tensor); not modified.
        H: ``(d, d)`` Hessian ``(2/N) Σ X̂ X̂ᵀ`` (eq. 6), same type as ``W``.
        bits: code width b (2..8 in practice; 1..16 accepted).
        blocksize: lazy-batch width B of eq. (9) (the result depends on it only through float rounding).
        percdamp: GPTQ's damping, λ = percdamp · mean diag H.
        backend: ``"numpy" | "numba" | "torch" | "auto"``.
        return_params: also return the integer codes and the per-row ``(scale, zero)`` of eq. (7).

    Returns:
        the dequantized weight ``Q`` (type and dtype of ``W``), or ``(Q, codes, scale, zero)``. Input
        columns with diag H = 0 are zeroed before the sweep (as in the official code); the scale and
        zero point come from the original ``W``.
    """
    _check_matrix(W, "W")
    _check_hessian(H, W, "H")
    _check_bits(bits, 1, 16)
    blocksize = check_int(blocksize, "blocksize", 1)
    percdamp = _check_nonneg(percdamp, "percdamp")
    b = resolve_backend(backend, W)
    scale, zero = gptq_minmax_params(W, bits, backend="torch" if isinstance(W, torch.Tensor) else "numpy")
    if b == "torch":
        Wp, Hp = to_torch(W).clone(), to_torch(H, like=to_torch(W))
        Hinv, dead = _damped_cholesky_inverse(Hp, percdamp)
        U = torch.linalg.cholesky(Hinv, upper=True)
    else:
        Wp, Hp = np.array(to_numpy(W), copy=True), to_numpy(H)
        Hinv, dead = _damped_cholesky_inverse(Hp, percdamp)
        U = np.linalg.cholesky(Hinv).T.copy()
    Wp[:, dead] = 0
    Q = like_input(gptq_sweep(Wp, U, like_input(scale, Wp), like_input(zero, Wp), bits, blocksize=blocksize,
                              backend=b), W)
    if not return_params:
        return Q
    codes = Q / scale + zero
    codes = codes.round() if isinstance(codes, torch.Tensor) else np.round(codes)
    return Q, codes, scale, zero


# ----------------------------------------------------------------------------------------------
# a layer-wise PTQ driver for an nn.Sequential MLP
# ----------------------------------------------------------------------------------------------
def _quantize_weight(W, H, method, bits, percdamp, blocksize, backend):
    if method == "rtn":
        return rtn_minmax(W, bits)
    return gptq_quantize(W, H, bits, blocksize=blocksize, percdamp=percdamp, backend=backend)


@torch.no_grad()
def quantize_mlp_layerwise(model: nn.Sequential, x_calib: torch.Tensor, bits: int, *, method: str = "gptq",
                           qep: bool = False, alpha: float = 0.5, percdamp_qep: float = 1.0,
                           percdamp: float = 0.01, blocksize: int = 128, skip_correction: Sequence[int] = (),
                           backend: str = "auto") -> nn.Sequential:
    """Quantize every ``nn.Linear`` of ``model`` (weights only; biases stay in float), one layer at a time,
    feeding each layer the inputs ``X̂`` of the already-quantized prefix — the official driver's loop.

    With ``qep=True`` each layer's weight is first corrected by eq. (5) (``alpha``, ``percdamp_qep``) from
    the statistics of ``(X̂, X)`` (eq. 6), ``X`` being the full-precision network's inputs to it; then
    the base method quantizes it with ``H`` from ``X̂``: ``"rtn"`` (eq. 10) or ``"gptq"`` (eqs. 7-9).
    ``skip_correction``: indices (into ``model``) of Linear layers quantized without the correction (the
    official driver never corrects ``mlp.down_proj``).

    Args:
        model: an ``nn.Sequential`` of ``nn.Linear`` and element-wise/parameter-free modules; not modified.
        x_calib: ``(N, d_in)`` float calibration inputs (one sample of N tokens for eq. 6).

    Returns:
        a quantized deep copy of ``model``.
    """
    if not isinstance(model, nn.Sequential):
        raise TypeError(f"model must be an nn.Sequential, got {type(model).__name__}")
    if not isinstance(x_calib, torch.Tensor) or not x_calib.is_floating_point() or x_calib.ndim != 2:
        raise ValueError("x_calib must be a 2-D floating torch.Tensor (N, d_in), got "
                         f"{type(x_calib).__name__} {tuple(getattr(x_calib, 'shape', ()))}")
    if method not in ("rtn", "gptq"):
        raise ValueError(f"method must be 'rtn' or 'gptq', got {method!r}")
    _check_bits(bits, 1, 16)
    qmodel = copy.deepcopy(model)
    x_true, x_hat = x_calib, x_calib
    for k, (layer, qlayer) in enumerate(zip(model, qmodel)):
        if isinstance(layer, nn.Linear):
            W = qlayer.weight.detach().clone()
            acc = HessianAccumulator(W.shape[1])
            if qep and k not in skip_correction:
                acc.add(x_hat.to(W.dtype), x_true.to(W.dtype))
                W = qep_correct(W, acc.H, acc.H_delta, alpha=alpha, percdamp=percdamp_qep)
            else:
                acc.add(x_hat.to(W.dtype))
            qlayer.weight.copy_(_quantize_weight(W, acc.H, method, bits, percdamp, blocksize, backend))
        x_true, x_hat = layer(x_true), qlayer(x_hat)
    return qmodel


@torch.no_grad()
def layer_errors(model: nn.Sequential, qmodel: nn.Sequential, x: torch.Tensor) -> list[float]:
    """Relative error ``‖h_k − ĥ_k‖_F / ‖h_k‖_F`` after every ``nn.Linear`` k of ``model`` vs ``qmodel``
    on inputs ``x`` (how the quantization error grows with depth)."""
    out = []
    h, hq = x, x
    for layer, qlayer in zip(model, qmodel):
        h, hq = layer(h), qlayer(hq)
        if isinstance(layer, nn.Linear):
            out.append(float(torch.linalg.norm(h - hq) / torch.linalg.norm(h)))
    return out
