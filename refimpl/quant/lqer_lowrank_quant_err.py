"""LQER: Low-Rank Quantization Error Reconstruction for LLMs (Zhang, Cheng, Constantinides & Zhao,
ICML 2024, arXiv:2402.02446).

A linear layer ``y = x Wᵀ`` (``W`` of shape ``(out, in)``, the ``nn.Linear`` convention) is quantized to
``W_q`` and the quantization error, in the paper's ``(in, out)`` layout, is

    (1) E_q = (W - W_q)ᵀ,        y = x W_qᵀ + x E_q   exactly.

``W_q`` is MXINT block floating point (the toolbox's eq. Q3) with the official code's details: blocks of
``b`` consecutive elements along one axis (zero-padded at the end) share an exponent, each element keeps
a ``w``-bit signed mantissa, and

    (2) e = clamp(ceil(log2 max_block |x|), -(2^(E-1)-1), 2^(E-1)),
        m = min(round((|x| + 1e-9) · 2^(w-1-e)), 2^(w-1) - 1),     x̂ = sign(x) · m · 2^(e-(w-1)),
        x̂ = x where |x| <= 1e-8 (passed through unchanged; an all-zero block is therefore returned as is).

LQER approximates ``E_q`` by its rank-``k`` truncated SVD (Eckart-Young), stored as two 8-bit MXINT
matrices (blocks along their first axis, as in the official configs):

    (3) E_q ≈ U_k Σ_k V_kᵀ,         A_k = Q_8(U_k),  B_k = Q_8(Σ_k V_kᵀ)
    (4) y ≈ x W_qᵀ + (x A_k) B_k

whose extra cost is ``k (in + out)`` multiply-adds per token against ``in · out`` for the dense product (8).

L²QER first scales the rows of ``E_q`` (the input channels) by an activation-induced diagonal ``S``, so
that the SVD spends its rank on the channels that see large activations:

    (6) s_j = max over calibration batches of  mean_t |x_{t,j}|,   s_j ← max(s_j, 1e-4),
        s ← s / sqrt(min_j s_j · max_j s_j)                              (S = diag(s))
    (7) S E_q ≈ U_k Σ_k V_kᵀ,        A_k = Q_8(S⁻¹ U_k),  B_k = Q_8(Σ_k V_kᵀ)

(eq. 5 of the chapter is the output-error objective that motivates eq. 7). The paper writes
``s_j = mean |x_j|``; the max over batches, the clamp and the geometric-mean normalization (6) are what
the official code does (``statistic_profiler/scale.py``).

The critical loop is the MXINT block quantizer (2): ``backend="numpy" | "numba" | "torch" | "auto"``.
The SVD runs in torch in the weight's dtype, as in the official code (which asks for the full SVD; we ask
for the reduced one, which gives the same leading factors — bit for bit on the golden fixtures). LQER is post-training
quantization: nothing here defines a custom backward.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import numba
import numpy as np
import torch
import torch.nn.functional as F

from refimpl._common.backend import like_input, resolve_backend, to_numpy, to_torch
from refimpl._common.kernels import FASTMATH, row_blocks
from refimpl._common.validate import check_finite, check_floating, check_int
from refimpl.quant.quantizers import to_groups

__all__ = ["mxint_quantize", "mxint_quantize_blocks", "activation_scale", "LQERFactors", "lqer_decompose",
           "approximated_weight", "LQERLinear"]

EPS_ABS = 1e-9     # added to |x| before the mantissa is rounded (official block_fp.py)
EPS_ZERO = 1e-8    # torch.isclose(x, 0) with its default atol: such elements pass through unchanged
SCALE_CLAMP_MIN = 1e-4


# ----------------------------------------------------------------------------- validation
def _exponent_range(exponent_width: int) -> tuple[int, int]:
    bias = 2 ** (exponent_width - 1) - 1
    return -bias, 2 ** exponent_width - 1 - bias


# ----------------------------------------------------------------------------- the critical loop, eq. (2)
def _blocks_numpy(x: np.ndarray, width: int, emin: int, emax: int) -> np.ndarray:
    """Reference: x (G, b) -> x̂ (G, b), every row one block."""
    T = x.dtype.type
    a = np.abs(x)
    amax = a.max(axis=1, keepdims=True)
    safe = np.where(amax > 0, amax, T(1))                   # all-zero blocks pass through below
    e = np.clip(np.ceil(np.log2(safe)), emin, emax).astype(x.dtype)
    up = np.exp2(T(width - 1) - e)
    down = np.exp2(e - T(width - 1))
    m = np.minimum(np.round((a + T(EPS_ABS)) * up), T(2 ** (width - 1) - 1))
    y = np.sign(x) * (m * down)
    return np.where(a <= T(EPS_ZERO), x, y)


# No "arcp": the power-of-two scalings must stay exact multiplications, like NumPy's and torch's.
@numba.njit(cache=True, fastmath=FASTMATH - {"arcp"}, error_model="numpy")
def _blocks_range(x, r0, r1, width, emin, emax, y):
    T = x.dtype.type
    n = x.shape[1]
    qmax = T(2 ** (width - 1) - 1)
    eps = T(EPS_ABS)
    tiny = T(EPS_ZERO)
    wm1 = T(width - 1)
    for r in range(r0, r1):
        row = x[r]
        out = y[r]
        amax = T(0)
        for j in range(n):
            amax = max(amax, abs(row[j]))
        if not amax > 0:
            for j in range(n):
                out[j] = row[j]
            continue
        e = np.ceil(T(np.log2(amax)))
        e = min(max(e, T(emin)), T(emax))
        up = T(np.exp2(wm1 - e))
        down = T(np.exp2(e - wm1))
        for j in range(n):
            v = row[j]
            a = abs(v)
            m = min(np.round((a + eps) * up), qmax) * down
            out[j] = v if a <= tiny else (m if v > 0 else -m)


@numba.njit(parallel=True, cache=True)
def _blocks_numba_kernel(x, width, emin, emax, nblocks, y):
    g = x.shape[0]
    step = (g + nblocks - 1) // nblocks
    for b in numba.prange(nblocks):
        _blocks_range(x, b * step, min(g, (b + 1) * step), width, emin, emax, y)


def _blocks_numba(x: np.ndarray, width: int, emin: int, emax: int) -> np.ndarray:
    x = np.ascontiguousarray(x)
    y = np.empty_like(x)
    nblocks = row_blocks(x.shape[0], x.size)
    if nblocks == 1:   # small inputs: skip the parallel region (waking the thread pool costs more than the work)
        _blocks_range(x, 0, x.shape[0], width, emin, emax, y)
    else:
        _blocks_numba_kernel(x, width, emin, emax, nblocks, y)
    return y


def _blocks_torch(x: torch.Tensor, width: int, emin: int, emax: int) -> torch.Tensor:
    a = x.abs()
    amax = a.amax(dim=1, keepdim=True)
    safe = torch.where(amax > 0, amax, torch.ones_like(amax))
    e = torch.ceil(torch.log2(safe)).clamp(emin, emax)
    up = torch.exp2((width - 1) - e)
    down = torch.exp2(e - (width - 1))
    m = torch.clamp(torch.round((a + EPS_ABS) * up), max=2 ** (width - 1) - 1)
    y = torch.sign(x) * (m * down)
    return torch.where(a <= EPS_ZERO, x, y)


_BLOCKS = {"numpy": _blocks_numpy, "numba": _blocks_numba, "torch": _blocks_torch}


def mxint_quantize_blocks(blocks: Any, width: int = 4, *, exponent_width: int = 8, backend: str = "auto") -> Any:
    """The critical loop alone: MXINT-quantize every row of ``blocks`` (shape ``(G, b)``, one block per
    row, float32/float64) by eq. (2). Returns ``x̂`` with the shape, dtype and type of ``blocks``."""
    width = check_int(width, "width", 2, 16)
    exponent_width = check_int(exponent_width, "exponent_width", 2, 11)
    check_floating(blocks, "blocks")
    if blocks.ndim != 2:
        raise ValueError(f"blocks must be 2-D (groups, block_size), got shape {tuple(blocks.shape)}")
    check_finite(blocks, "blocks")
    b = resolve_backend(backend, blocks)
    emin, emax = _exponent_range(exponent_width)
    xb = to_torch(blocks) if b == "torch" else np.ascontiguousarray(to_numpy(blocks))
    return like_input(_BLOCKS[b](xb, width, emin, emax), blocks)


def mxint_quantize(x: Any, width: int = 4, block_size: int = 16, *, axis: int = -1, exponent_width: int = 8,
                   backend: str = "auto") -> Any:
    """MXINT block floating point with the official LQER semantics (eq. 2; the toolbox's eq. Q3 plus the
    official epsilon, pass-through and exponent-clamp details).

    Args:
        x: float32/float64 array or tensor, any shape (ndim >= 1), finite.
        width: mantissa width ``w`` in bits, sign included (4 for the weights, 8 for A, B and activations).
        block_size: ``b`` consecutive elements along ``axis`` share one exponent. The axis is zero-padded to
            a multiple of ``b`` (the official ``block``/``unblock``; a shorter axis is one block).
        axis: the blocked axis. A weight ``(out, in)`` with the official ``block_size=[1, 16]`` is
            ``axis=-1``; ``A (in, k)`` and ``B (k, out)`` with ``[16, 1]`` are ``axis=0``; activations
            ``(..., in)`` with ``skip_first_dim=True`` are ``axis=-1``.
        exponent_width: bits ``E`` of the shared exponent (bias ``2^(E-1)-1``, the official default).
        backend: ``"numpy" | "numba" | "torch" | "auto"``.

    Returns:
        ``x̂`` with ``x``'s shape, dtype and type (and device).
    """
    check_floating(x, "x")
    block_size = check_int(block_size, "block_size", 1, 1 << 30)
    if x.ndim == 0:
        raise ValueError("x must have at least one dimension, got a scalar")
    if isinstance(axis, bool) or not isinstance(axis, (int, np.integer)) or not -x.ndim <= axis < x.ndim:
        raise ValueError(f"axis must be an int in [{-x.ndim}, {x.ndim - 1}] for x of shape {tuple(x.shape)}, "
                         f"got {axis!r}")
    b = resolve_backend(backend, x)
    xt = to_torch(x) if b == "torch" else to_numpy(x)
    moved = xt.movedim(axis, -1) if b == "torch" else np.moveaxis(xt, axis, -1)
    n = moved.shape[-1]
    pad = (-n) % block_size
    if pad:
        moved = F.pad(moved, (0, pad)) if b == "torch" else np.pad(moved, [(0, 0)] * (moved.ndim - 1) + [(0, pad)])
    groups, restore = to_groups(moved, "block", block_size=block_size)
    y = restore(mxint_quantize_blocks(groups, width, exponent_width=exponent_width, backend=b))[..., :n]
    y = y.movedim(-1, axis) if b == "torch" else np.moveaxis(y, -1, axis)
    return like_input(y if b == "torch" else np.ascontiguousarray(y), x)


# ----------------------------------------------------------------------------- calibration, eq. (6)
def activation_scale(batches: Any, *, clamp_min: float = SCALE_CLAMP_MIN, normalize: bool = True) -> Any:
    """The L²QER scale ``s`` (eq. 6) from calibration activations.

    Args:
        batches: one array/tensor ``(..., in)`` (one batch) or an iterable of them (the layer's inputs
            over the calibration set). Each batch contributes ``mean |x|`` over all its leading dims.
        clamp_min: lower clamp of ``s`` (official ``SCALE_CLAMP_MIN = 1e-4``); must be > 0.
        normalize: divide by ``sqrt(min s · max s)`` (official); ``False`` returns the clamped statistic.

    Returns:
        ``s`` of shape ``(in,)``, type and dtype of the (first) batch.
    """
    if isinstance(batches, (np.ndarray, torch.Tensor)):
        batches = [batches]
    if not isinstance(clamp_min, (int, float)) or isinstance(clamp_min, bool) or not clamp_min > 0:
        raise ValueError(f"clamp_min must be a positive number, got {clamp_min!r}")
    s = None
    first = None
    for i, xb in enumerate(batches):
        check_floating(xb, f"batches[{i}]")
        check_finite(xb, f"batches[{i}]")
        if xb.ndim < 1 or xb.shape[-1] == 0:
            raise ValueError(f"batches[{i}] must have shape (..., in) with in >= 1, got {tuple(xb.shape)}")
        xt = to_torch(xb).detach()
        m = xt.abs().reshape(-1, xt.shape[-1]).mean(0)
        if s is None:
            first, s = xb, torch.zeros_like(m)
        if m.shape != s.shape:
            raise ValueError(f"batches[{i}] has {m.shape[0]} channels, batches[0] has {s.shape[0]}")
        s = torch.maximum(s, m.to(s.device))
    if s is None:
        raise ValueError("batches must hold at least one batch of activations")
    s = s.clamp(min=clamp_min)
    if normalize:
        s = s / torch.sqrt(s.min() * s.max())
    return like_input(s, first)


# ----------------------------------------------------------------------------- LQER / L²QER, eqs. (3), (7)
class LQERFactors(NamedTuple):
    """``w_q`` (out, in): the MXINT weight; ``a`` (in, k) and ``b`` (k, out): the 8-bit low-rank factors,
    so that ``y = x w_qᵀ + (x a) b`` (eq. 4)."""
    w_q: Any
    a: Any
    b: Any


def lqer_decompose(weight: Any, rank: int, scale: Any = None, *, w_width: int = 4, ab_width: int | None = 8,
                   block_size: int = 16, exponent_width: int = 8, backend: str = "auto") -> LQERFactors:
    """Quantize ``weight`` and reconstruct its quantization error with rank ``rank``.

    ``scale=None`` is plain LQER (eq. 3); a scale ``s`` (shape ``(in,)``, positive, e.g. from
    :func:`activation_scale`) gives L²QER (eq. 7).

    Args:
        weight: ``(out, in)`` float32/float64 array or tensor (``nn.Linear.weight``), finite.
        rank: ``k``, 1 <= k <= min(in, out).
        scale: ``None`` or ``(in,)`` positive.
        w_width: MXINT mantissa width of ``W_q`` (blocks of ``block_size`` along ``in``).
        ab_width: MXINT width of ``A`` and ``B`` (blocks along their first axis), or ``None`` to keep them in
            full precision.
        block_size, exponent_width: the MXINT block and exponent sizes (official: 16 and 8).
        backend: backend of the MXINT quantizer (the SVD always runs in torch, in the weight's dtype).

    Returns:
        :class:`LQERFactors` ``(w_q, a, b)`` of ``weight``'s type and dtype.
    """
    check_floating(weight, "weight")
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (out, in), got shape {tuple(weight.shape)}")
    check_finite(weight, "weight")
    out_f, in_f = weight.shape
    rank = check_int(rank, "rank", 1, min(in_f, out_f))
    if ab_width is not None:
        check_int(ab_width, "ab_width", 2, 16)
    w = to_torch(weight).detach()
    if scale is not None:
        check_floating(scale, "scale")
        if tuple(scale.shape) != (in_f,):
            raise ValueError(f"scale must have shape (in,) = ({in_f},), got {tuple(scale.shape)}")
        check_finite(scale, "scale")
        st = to_torch(scale, like=w).detach().to(w.dtype)
        if not bool((st > 0).all()):
            raise ValueError("scale must be positive")
    qkw = dict(block_size=block_size, exponent_width=exponent_width, backend=backend)
    w_q = to_torch(mxint_quantize(w, w_width, axis=-1, **qkw), like=w)       # eq. (2)
    err_t = (w - w_q).T                                                      # eq. (1): E_q, (in, out)
    if scale is not None:
        err_t = st[:, None] * err_t                                          # S E_q
    u, sv, vh = torch.linalg.svd(err_t, full_matrices=False)                 # eqs. (3) / (7)
    u_k, b = u[:, :rank], sv[:rank, None] * vh[:rank]
    a = u_k if scale is None else (1 / st)[:, None] * u_k                    # S⁻¹ U_k
    if ab_width is not None:
        a = mxint_quantize(a, ab_width, axis=0, **qkw)
        b = mxint_quantize(b, ab_width, axis=0, **qkw)
    return LQERFactors(like_input(w_q, weight), like_input(a, weight), like_input(b, weight))


def approximated_weight(factors: LQERFactors) -> Any:
    """The weight the LQER layer effectively applies: ``W_q + (A B)ᵀ``, shape ``(out, in)``."""
    w_q, a, b = factors
    return w_q + (a @ b).T


class LQERLinear(torch.nn.Module):
    """A linear layer computing ``y = x W_qᵀ + (x A_k) B_k + bias`` (eq. 4).

    ``act_width=None`` keeps the activations in full precision (the W4 setting of the chapter's
    experiments); ``act_width=8`` quantizes ``x``, ``x A`` and ``(x A) B`` with MXINT blocks along the
    last axis, as the official ``LinearFlexibleLqer`` does in its W4A8 configuration (its bias
    quantizer is not reproduced: the bias stays in full precision).

    Input ``(..., in)``, output ``(..., out)``. ``W_q``, ``A`` and ``B`` are buffers (post-training
    quantization: nothing is trained); gradients flow to ``x`` through the matmuls when
    ``act_width is None``.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True, *,
                 act_width: int | None = None, block_size: int = 16, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.in_features = check_int(in_features, "in_features", 1, 1 << 30)
        self.out_features = check_int(out_features, "out_features", 1, 1 << 30)
        self.rank = check_int(rank, "rank", 1, min(in_features, out_features))
        self.act_width = None if act_width is None else check_int(act_width, "act_width", 2, 16)
        self.block_size = check_int(block_size, "block_size", 1, 1 << 30)
        self.register_buffer("weight_q", torch.zeros(out_features, in_features, dtype=dtype))
        self.register_buffer("A", torch.zeros(in_features, rank, dtype=dtype))
        self.register_buffer("B", torch.zeros(rank, out_features, dtype=dtype))
        self.bias = torch.nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, rank: int, scale: Any = None, *, w_width: int = 4,
                    ab_width: int | None = 8, act_width: int | None = None, block_size: int = 16,
                    backend: str = "torch") -> "LQERLinear":
        """Quantize a trained ``nn.Linear`` with LQER (``scale=None``) or L²QER (``scale`` from
        :func:`activation_scale`)."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        w = linear.weight.detach()
        f = lqer_decompose(w, rank, scale, w_width=w_width, ab_width=ab_width, block_size=block_size,
                           backend=backend)
        m = cls(linear.in_features, linear.out_features, rank, linear.bias is not None, act_width=act_width,
                block_size=block_size, dtype=w.dtype).to(w.device)
        with torch.no_grad():
            m.weight_q.copy_(f.w_q)
            m.A.copy_(f.a)
            m.B.copy_(f.b)
            if linear.bias is not None:
                m.bias.copy_(linear.bias.detach())
        return m

    def _q(self, t: torch.Tensor) -> torch.Tensor:
        if self.act_width is None:
            return t
        return mxint_quantize(t.detach(), self.act_width, self.block_size, axis=-1, backend="torch")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
        if x.shape[-1] != self.in_features:
            raise ValueError(f"x must have shape (..., {self.in_features}), got {tuple(x.shape)}")
        x = self._q(x)
        xab = self._q(self._q(x @ self.A) @ self.B)
        return F.linear(x, self.weight_q, self.bias) + xab

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
                f"bias={self.bias is not None}, act_width={self.act_width}")
