"""Tropical attention (Hashemi, Pasque, Teska & Yoshida, 2025, arXiv:2505.17190).

Attention in the max-plus semiring ``(R ∪ {-inf}, max, +)``. The pieces, with the numbers the
chapter uses:

    (1) (A ⊗ B)_ij  = max_k (A_ik + B_kj)                          max-plus (tropical) matrix product
    (2) d_H(q, k)   = max_i (q_i - k_i) - min_i (q_i - k_i)          tropical Hilbert projective metric
    (3) d_H(q, k)   = (q ⊗ (-k)ᵀ) + (k ⊗ (-q)ᵀ)                       (2) as two max-plus products
    (4) d_N(q, k)   = Σ_i (q_i - k_i) - d · min_i (q_i - k_i)         the official non-symmetric variant
    (5) u           = log1p(ReLU(x)) [- λ]                            lift to the tropical side (λ optional)
    (6) q = u ⊗ W_Qᵀ, k = u ⊗ W_Kᵀ, v = u ⊗ W_Vᵀ                     per-head TropicalLinear, shared over heads
    (7) S_ij        = -d_H(q_i, k_j)                                  scores (no scaling, no softmax)
    (8) c_i         = max_j (S_ij + v_j)  =  (S ⊗ V)_i               max-plus aggregation
    (9) y           = W_O expm1(concat_heads(c))                      back to the ordinary side
    (10) ∂C_ij/∂A_ik = ∂C_ij/∂B_kj = [k = k*_ij]                       k*_ij the arg-max of (1); a subgradient at ties

In the shared attention block (refimpl/attention/mha.py, eqs. A1-A3) tropical attention replaces all
three pieces: score (A1) = (7), weight (A2) = masking only (masked keys get -inf, the tropical zero),
aggregate (A3) = (8).

:class:`TropicalAttention` follows the official ``TropicalAttention.py`` (Baran-phys/Tropical-Attention
@ e3c12f3) and loads its ``state_dict``: there are **no** ordinary Q/K/V projections, q = k = v = (5).
``qkv_proj=True`` gives the ``models.py`` variant: bias-free ``W_Q, W_K, W_V`` before (5), λ always on.

The critical loop is the max-plus product (1) (:func:`maxplus_matmul`): O(m·k·n) like a matrix
product, but BLAS cannot do it. Backends ``"numpy"`` (readable reference, a loop over k), ``"numba"``
(parallel over rows, i-k-j loop order so the inner loop runs over contiguous rows of B and
vectorises) and ``"torch"`` (broadcast-and-reduce in chunks of k, device-agnostic, autograd through
``amax``). On tensors the numpy/numba backends run inside :class:`MaxPlusMatmulFunction`, whose
backward routes each output gradient to the arg-max term, eq. (10).
"""
from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange
from torch import nn

from refimpl._common.backend import resolve_backend, to_numpy
from refimpl._common.kernels import FASTMATH as _FASTMATH, row_blocks
from refimpl.attention.mha import MultiHeadAttention, TransformerBlock, attention

__all__ = ["maxplus_matmul", "maxplus_matmul_argmax", "MaxPlusMatmulFunction", "hilbert_scores",
           "tropical_weights", "maxplus_aggregate", "TropicalLinear", "TropicalAttention", "PostNormBlock",
           "TinyEncoder"]

_TORCH_CHUNK = 1 << 18  # elements of the (…, m, kc, n) broadcast tensor in one torch chunk (1 MB float32)
_J_TILE = 512  # columns of C kept hot while the numba kernel sweeps over k


# ----------------------------------------------------------------------------- validation
def _check_pair(a: Any, b: Any) -> None:
    for name, t in (("a", a), ("b", b)):
        if not isinstance(t, (np.ndarray, torch.Tensor)):
            raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(t).__name__}")
        fl = t.is_floating_point() if isinstance(t, torch.Tensor) else np.issubdtype(t.dtype, np.floating)
        if not fl:
            raise TypeError(f"{name} must have a floating-point dtype, got {t.dtype}")
        if t.ndim < 2:
            raise ValueError(f"{name} must have shape (..., rows, cols) with at least 2 dimensions, "
                             f"got {tuple(t.shape)}")
    if type(a) is not type(b):
        raise TypeError(f"a and b must both be numpy arrays or both torch tensors, got "
                        f"{type(a).__name__} and {type(b).__name__}")
    if a.dtype != b.dtype:
        raise TypeError(f"a and b must have the same dtype, got {a.dtype} and {b.dtype}")
    if a.shape[-1] != b.shape[-2]:
        raise ValueError(f"inner dimensions must match: a is (..., m, {a.shape[-1]}), b is "
                         f"(..., {b.shape[-2]}, n)")
    if a.shape[-1] == 0:
        raise ValueError("the inner dimension must be >= 1 (a max over no terms is undefined)")
    if isinstance(a, torch.Tensor) and a.device != b.device:
        raise ValueError(f"a and b must be on the same device, got {a.device} and {b.device}")
    try:
        np.broadcast_shapes(tuple(a.shape[:-2]), tuple(b.shape[:-2]))
    except ValueError:
        raise ValueError(f"leading (batch) dimensions of a {tuple(a.shape[:-2])} and b "
                         f"{tuple(b.shape[:-2])} are not broadcastable") from None
    for name, t in (("a", a), ("b", b)):
        bad = (torch.isnan(t) | (t == float("inf"))).any() if isinstance(t, torch.Tensor) else \
            (np.isnan(t) | (t == np.inf)).any()
        if bool(bad):
            raise ValueError(f"{name} contains NaN or +inf (only -inf, the tropical zero, is allowed)")


# ----------------------------------------------------------------------------- kernels
def _maxplus_numpy(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reference for (1) on ``a (Z, m, K)``, ``b (Z, K, n)``: a running max over k, first arg-max kept."""
    c = a[:, :, 0, None] + b[:, None, 0, :]
    arg = np.zeros(c.shape, dtype=np.int64)
    for k in range(1, a.shape[2]):
        v = a[:, :, k, None] + b[:, None, k, :]  # the k-th term of every (i, j)
        better = v > c
        c = np.where(better, v, c)
        arg[better] = k
    return c, arg


def _maxplus_kernel(a, b, c, arg, n_blocks, want_arg):  # pragma: no cover - compiled below
    z_n, m, kk = a.shape
    n = b.shape[2]
    rows = z_n * m
    for blk in prange(n_blocks):
        lo = blk * rows // n_blocks
        hi = (blk + 1) * rows // n_blocks
        for r in range(lo, hi):
            z = r // m
            i = r - z * m
            ci = c[z, i]
            gi = arg[z, i]
            ai = a[z, i]
            bz = b[z]
            for j0 in range(0, n, _J_TILE):
                j1 = min(n, j0 + _J_TILE)
                cs = ci[j0:j1]
                b0 = bz[0, j0:j1]
                a0 = ai[0]
                for j in range(j1 - j0):
                    cs[j] = a0 + b0[j]
                if want_arg:
                    gs = gi[j0:j1]
                    for j in range(j1 - j0):
                        gs[j] = 0
                    for k in range(1, kk):
                        ak = ai[k]
                        bk = bz[k, j0:j1]
                        for j in range(j1 - j0):
                            v = ak + bk[j]
                            if v > cs[j]:
                                cs[j] = v
                                gs[j] = k
                else:
                    for k in range(1, kk):
                        ak = ai[k]
                        bk = bz[k, j0:j1]
                        for j in range(j1 - j0):
                            v = ak + bk[j]
                            cs[j] = v if v > cs[j] else cs[j]


# The same kernel compiled twice: a serial version for small products (waking worker threads costs more than
# the work, and milliseconds on a busy machine) and a parallel one for n_blocks > 1.
_maxplus_nb_serial = njit(cache=True, fastmath=_FASTMATH)(_maxplus_kernel)
_maxplus_nb_parallel = njit(cache=True, fastmath=_FASTMATH, parallel=True)(_maxplus_kernel)


def _maxplus_numba(a: np.ndarray, b: np.ndarray, want_arg: bool = True) -> tuple[np.ndarray, np.ndarray]:
    z_n, m, _ = a.shape
    n = b.shape[2]
    c = np.empty((z_n, m, n), dtype=a.dtype)
    arg = np.empty((z_n, m, n) if want_arg else (z_n, m, 1), dtype=np.int64)
    blocks = row_blocks(z_n * m, z_n * m * n * a.shape[2])
    (_maxplus_nb_parallel if blocks > 1 else _maxplus_nb_serial)(a, b, c, arg, blocks, want_arg)
    return c, arg


def _maxplus_torch(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(1) by broadcasting ``a[..., i, k, None] + b[..., None, k, j]`` and ``amax`` over k, in chunks of k
    so the temporary stays below ``_TORCH_CHUNK`` elements. Differentiable by autograd."""
    m, kk, n = a.shape[-2], a.shape[-1], b.shape[-1]
    lead = math.prod(torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    kc = max(1, min(kk, _TORCH_CHUNK // max(1, lead * m * n)))
    out = None
    for k0 in range(0, kk, kc):
        part = (a[..., :, k0:k0 + kc, None] + b[..., None, k0:k0 + kc, :]).amax(dim=-2)
        out = part if out is None else torch.maximum(out, part)
    return out


def _flat3(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[int, ...]]:
    lead = np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
    a3 = np.ascontiguousarray(np.broadcast_to(a, lead + a.shape[-2:])).reshape(-1, *a.shape[-2:])
    b3 = np.ascontiguousarray(np.broadcast_to(b, lead + b.shape[-2:])).reshape(-1, *b.shape[-2:])
    return a3, b3, lead


def maxplus_matmul_argmax(a: np.ndarray, b: np.ndarray, backend: str = "numba") -> tuple[np.ndarray, np.ndarray]:
    """(1) on NumPy arrays, also returning the arg-max ``k`` of every entry (the first one on ties).

    ``a (..., m, K)``, ``b (..., K, n)`` (leading dimensions broadcast) → ``C (..., m, n)`` in the input
    dtype and ``argmax (..., m, n)`` int64. ``backend``: ``"numpy"`` or ``"numba"``.
    """
    _check_pair(a, b)
    if isinstance(a, torch.Tensor):
        raise TypeError("maxplus_matmul_argmax takes numpy arrays; use maxplus_matmul for tensors")
    if backend not in ("numpy", "numba"):
        raise ValueError(f"backend must be 'numpy' or 'numba', got {backend!r}")
    a3, b3, lead = _flat3(a, b)
    c, arg = _maxplus_numpy(a3, b3) if backend == "numpy" else _maxplus_numba(a3, b3)
    shape = lead + (a.shape[-2], b.shape[-1])
    return c.reshape(shape), arg.reshape(shape)


class MaxPlusMatmulFunction(torch.autograd.Function):
    """(1) on CPU tensors computed by the numpy or numba kernel, with the arg-max backward (10)
    ``dA_ik = Σ_j g_ij [argmax_ij = k]``, ``dB_kj = Σ_i g_ij [argmax_ij = k]`` (a subgradient of max;
    exact away from ties). Leading dimensions broadcast; gradients are summed back to each input's shape."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, backend: str = "numba") -> torch.Tensor:
        an, bn = to_numpy(a), to_numpy(b)
        a3, b3, lead = _flat3(an, bn)
        c, arg = _maxplus_numpy(a3, b3) if backend == "numpy" else _maxplus_numba(a3, b3)
        ctx.save_for_backward(torch.from_numpy(arg))
        ctx.shapes = (a.shape, b.shape, lead)
        return torch.from_numpy(c.reshape(lead + (an.shape[-2], bn.shape[-1]))).to(a.device)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        (arg,) = ctx.saved_tensors
        a_shape, b_shape, _ = ctx.shapes
        arg = arg.to(g.device)
        g3 = g.reshape(arg.shape)
        z_n, m, n = arg.shape
        kk = a_shape[-1]
        ga = gb = None
        if ctx.needs_input_grad[0]:
            ga = torch.zeros(z_n, m, kk, dtype=g.dtype, device=g.device).scatter_add_(2, arg, g3)
            ga = ga.reshape(*g.shape[:-2], m, kk).sum_to_size(a_shape)
        if ctx.needs_input_grad[1]:
            gbt = torch.zeros(z_n, n, kk, dtype=g.dtype, device=g.device)
            gbt.scatter_add_(2, arg.transpose(1, 2), g3.transpose(1, 2))
            gb = gbt.transpose(1, 2).reshape(*g.shape[:-2], kk, n).sum_to_size(b_shape)
        return ga, gb, None


def maxplus_matmul(a: Any, b: Any, backend: str = "auto") -> Any:
    """Eq. (1), the max-plus product ``C[..., i, j] = max_k (a[..., i, k] + b[..., k, j])``.

    Args:
        a: ``(..., m, K)`` float array or tensor; ``-inf`` allowed (the tropical zero), NaN/+inf not.
        b: ``(..., K, n)``, same type and dtype as ``a``; leading dimensions broadcast.
        backend: ``"numpy"`` | ``"numba"`` | ``"torch"`` | ``"auto"`` (torch for tensors, numba for arrays).

    Returns:
        ``(..., m, n)`` in the input's type, dtype and device. Tensors keep autograd: the torch backend
        through ``amax`` (ties share the gradient, as in the official code), numpy/numba through
        :class:`MaxPlusMatmulFunction` (the first arg-max takes it; CPU tensors only).
    """
    _check_pair(a, b)
    return _maxplus(a, b, resolve_backend(backend, a))


def _maxplus(a: Any, b: Any, backend: str) -> Any:
    """(1) without input checks (the attention pieces call it on tensors they made themselves)."""
    if isinstance(a, torch.Tensor):
        if backend == "torch":
            return _maxplus_torch(a, b)
        return MaxPlusMatmulFunction.apply(a, b, backend)
    if backend == "torch":
        return _maxplus_torch(torch.from_numpy(np.asarray(a)), torch.from_numpy(np.asarray(b))).numpy()
    a3, b3, lead = _flat3(a, b)
    c = _maxplus_numpy(a3, b3)[0] if backend == "numpy" else _maxplus_numba(a3, b3, want_arg=False)[0]
    return c.reshape(lead + (a.shape[-2], b.shape[-1]))


# ----------------------------------------------------------------------------- attention pieces
def hilbert_scores(q: torch.Tensor, k: torch.Tensor, symmetric: bool = True, backend: str = "torch") -> torch.Tensor:
    """Eq. (7) with (3): ``-d_H(q_i, k_j)`` for ``q (..., Lq, d)``, ``k (..., Lk, d)`` → ``(..., Lq, Lk)``.

    ``symmetric=False`` gives the official non-symmetric score ``-d_N`` of eq. (4),
    ``-(Σ_i (q_i - k_i) - d · min_i (q_i - k_i))``. Both are computed with max-plus products, never
    materialising the ``(Lq, Lk, d)`` difference tensor; ``max_i (k_i - q_i) = -min_i (q_i - k_i)`` exactly.
    """
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same feature size, got {q.shape[-1]} and {k.shape[-1]}")
    backend = resolve_backend(backend, q)
    neg_min = _maxplus(k, -q.transpose(-2, -1), backend).transpose(-2, -1)  # max_i (k_i - q_i)
    if symmetric:
        return -(_maxplus(q, -k.transpose(-2, -1), backend) + neg_min)
    d = q.shape[-1]
    sum_diff = q.sum(-1)[..., :, None] - k.sum(-1)[..., None, :]
    return -(sum_diff + d * neg_min)


def tropical_weights(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(A2) for tropical attention: no normalisation; masked keys get ``-inf``, the tropical zero."""
    return scores if mask is None else scores.masked_fill(~mask, float("-inf"))


def maxplus_aggregate(weights: torch.Tensor, v: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """Eq. (8): ``c_i = max_j (S_ij + v_j)`` for ``S (..., Lq, Lk)``, ``v (..., Lk, dv)`` → ``(..., Lq, dv)``."""
    return _maxplus(weights, v, resolve_backend(backend, weights))


# ----------------------------------------------------------------------------- modules
class TropicalLinear(nn.Module):
    """Eq. (6): ``y = x ⊗ Wᵀ``, i.e. ``y_o = max_i (x_i + W_oi)``; ``W (out, in)`` initialised ``randn``
    like the official code. ``x (..., in)`` → ``(..., out)``."""

    def __init__(self, input_dim: int, output_dim: int, backend: str = "torch"):
        super().__init__()
        if input_dim < 1 or output_dim < 1:
            raise ValueError(f"input_dim and output_dim must be >= 1, got {input_dim}, {output_dim}")
        self.input_dim, self.output_dim, self.backend = input_dim, output_dim, backend
        self.W = nn.Parameter(torch.randn(output_dim, input_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.input_dim:
            raise ValueError(f"x must have last dimension {self.input_dim}, got {tuple(x.shape)}")
        w, backend = self.W.transpose(0, 1), resolve_backend(self.backend, x)
        if x.dim() > 2:
            return _maxplus(x, w, backend)
        return _maxplus(x if x.dim() == 2 else x[None], w, backend).reshape(*x.shape[:-1], -1)


class TropicalAttention(nn.Module):
    """Multi-head tropical attention, eqs. (5)-(9), structured like the official module.

    Args:
        d_model, n_heads: width and heads (``d_model % n_heads == 0``); ``d_k = d_model / n_heads``.
        tropical_proj: per-role ``TropicalLinear(d_k, d_k)`` (6), shared across heads (official default).
        tropical_norm: subtract a learnable ``λ (1, 1, d_model)`` in (5) (initialised to ones).
        symmetric: scores ``-d_H`` (2) or the non-symmetric ``-d_N`` (4).
        qkv_proj: the ``models.py`` variant: bias-free ``W_Q, W_K, W_V`` before (5) (λ then always on).
        causal: mask future keys (the official module has no mask; ``-inf`` is the tropical zero).
        backend: backend of the max-plus products (``"torch"`` keeps autograd on any device).

    ``forward(x (B, L, d_model), mask=None, return_weights=False)`` → ``(B, L, d_model)`` (and the
    ``(B, H, L, L)`` scores), the :class:`~refimpl.attention.mha.MultiHeadAttention` call signature.
    The state_dict keys match the official ones (``out.weight``, ``query_trop.W``, ``lambda_param``, …).
    """

    def __init__(self, d_model: int, n_heads: int, *, tropical_proj: bool = True, tropical_norm: bool = False,
                 symmetric: bool = True, qkv_proj: bool = False, causal: bool = False, backend: str = "torch"):
        super().__init__()
        if n_heads < 1 or d_model < 1 or d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a positive multiple of n_heads={n_heads}")
        if backend not in ("numpy", "numba", "torch", "auto"):
            raise ValueError(f"backend must be 'numpy', 'numba', 'torch' or 'auto', got {backend!r}")
        if qkv_proj and not (tropical_proj and tropical_norm):
            raise ValueError("qkv_proj=True is the models.py variant, which always has tropical_proj and tropical_norm")
        self.d_model, self.n_heads, self.d_k = d_model, n_heads, d_model // n_heads
        self.tropical_proj, self.tropical_norm, self.symmetric = tropical_proj, tropical_norm, symmetric
        self.qkv_proj, self.causal, self.backend = qkv_proj, causal, backend
        if qkv_proj:
            self.query_linear = nn.Linear(d_model, d_model, bias=False)
            self.key_linear = nn.Linear(d_model, d_model, bias=False)
            self.value_linear = nn.Linear(d_model, d_model, bias=False)
        self.out = nn.Linear(d_model, d_model, bias=False)
        if tropical_proj:
            self.query_trop = TropicalLinear(self.d_k, self.d_k, backend)
            self.key_trop = TropicalLinear(self.d_k, self.d_k, backend)
            self.value_trop = TropicalLinear(self.d_k, self.d_k, backend)
        if tropical_norm:
            self.lambda_param = nn.Parameter(torch.ones(1, 1, d_model))
        self.score_fn = functools.partial(hilbert_scores, symmetric=symmetric, backend=backend)
        self.aggregate_fn = functools.partial(maxplus_aggregate, backend=backend)

    def lift(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Eqs. (5)-(6): ``x (B, L, d_model)`` → q, k, v of shape ``(B, H, L, d_k)``."""
        b, l, _ = x.shape
        if self.qkv_proj:
            raw = (self.query_linear(x), self.key_linear(x), self.value_linear(x))
        else:
            raw = (x, x, x)
        out = []
        for r, trop in zip(raw, ("query_trop", "key_trop", "value_trop")):
            u = torch.log1p(F.relu(r))
            if self.tropical_norm:
                u = u - self.lambda_param
            u = u.reshape(b, l, self.n_heads, self.d_k).transpose(1, 2)
            out.append(getattr(self, trop)(u) if self.tropical_proj else u)
        return out[0], out[1], out[2]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        if not isinstance(x, torch.Tensor) or x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be a tensor of shape (B, L, {self.d_model}), got "
                             f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        q, k, v = self.lift(x)
        ctx, scores = attention(q, k, v, mask=mask, causal=self.causal, score_fn=self.score_fn,
                                weight_fn=tropical_weights, aggregate_fn=self.aggregate_fn)  # (7), (8)
        b, h, l, d = ctx.shape
        y = self.out(torch.expm1(ctx.transpose(1, 2).reshape(b, l, h * d)))  # (9)
        return (y, scores) if return_weights else y


class PostNormBlock(nn.Module):
    """The official ``models.py`` block (``pre_norm=False``, no dropout): ``x = LN(x + attn(x))``, then
    ``x = LN(x + FF(x))`` with a ReLU feed-forward of width ``4·d_model``. The first attention therefore
    sees the raw input embedding, not a LayerNorm'd one."""

    def __init__(self, d_model: int, attn: nn.Module):
        super().__init__()
        self.attn = attn
        self.ff = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.ReLU(), nn.Linear(4 * d_model, d_model))
        self.norm1, self.norm2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x + self.attn(x, mask=mask))
        return self.norm2(x + self.ff(x))


class TinyEncoder(nn.Module):
    """A tiny model for real-valued sequence tasks, shaped like the official ``SimpleTransformerModel``:
    ``Linear(input_dim, d_model)`` → ``n_layers`` blocks → ``Linear(d_model, n_out)``, one output per position.

    ``attn="softmax"`` uses the shared :class:`~refimpl.attention.mha.MultiHeadAttention` with its defaults
    (the baseline), ``attn="tropical"`` uses :class:`TropicalAttention` (``attn_kwargs`` go to either).
    ``norm="post"`` (official default) uses :class:`PostNormBlock`; ``norm="pre"`` the shared pre-LN
    :class:`~refimpl.attention.mha.TransformerBlock` plus a final LayerNorm.
    ``x (B, L, input_dim)`` → ``(B, L, n_out)``.
    """

    def __init__(self, input_dim: int = 1, d_model: int = 16, n_heads: int = 2, n_layers: int = 1, *,
                 n_out: int = 1, attn: str = "softmax", causal: bool = False, norm: str = "post",
                 attn_kwargs: dict | None = None):
        super().__init__()
        if attn not in ("softmax", "tropical"):
            raise ValueError(f"attn must be 'softmax' or 'tropical', got {attn!r}")
        if norm not in ("post", "pre"):
            raise ValueError(f"norm must be 'post' or 'pre', got {norm!r}")
        kw = dict(attn_kwargs or {})
        cls = MultiHeadAttention if attn == "softmax" else TropicalAttention
        block = PostNormBlock if norm == "post" else TransformerBlock
        self.inp = nn.Linear(input_dim, d_model)
        self.blocks = nn.ModuleList(block(d_model, cls(d_model, n_heads, causal=causal, **kw)) for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model) if norm == "pre" else nn.Identity()
        self.head = nn.Linear(d_model, n_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.inp.in_features:
            raise ValueError(f"x must have shape (B, L, {self.inp.in_features}), got {tuple(x.shape)}")
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h)
        return self.head(self.ln_f(h))
