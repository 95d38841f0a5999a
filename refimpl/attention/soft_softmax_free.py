"""SOFT: softmax-free attention with a Gaussian kernel, Nyström landmarks and a Newton–Raphson inverse.

Lu et al., "SOFT: Softmax-free Transformer with Linear Complexity" (NeurIPS 2021) and "Softmax-free
Linear Transformers" (IJCV 2024, SOFT++). Equation numbers are those of the book's chapter.

With queries pre-scaled by ``d^{-1/4}`` and keys tied to queries (``K = Q``),

    S_ij = exp(-||q_i - q_j||² / 2)                      Gaussian-kernel attention, no normalisation   (1)
    S ≈ S(Q, Q̃) S(Q̃, Q̃)⁺ S(Q̃, Q)                          Nyström with m landmarks Q̃ (m ≪ n)        (2)
    O = S(Q, Q̃) · [S(Q̃, Q̃)⁺ · (S(Q̃, Q) V)]               computed right to left: O(n m d)          (3)
    V_{k+1} = 2 V_k − V_k P V_k,   V_0 = α P              Newton–Raphson iteration for P⁻¹/P⁺        (4)
    ∂L/∂P = −V_kᵀ (∂L/∂V_k) V_kᵀ                          the gradient "computed once" (of P⁻¹)     (5)
    O_SOFT++ = S(Q, Q̃) D^{-1/2} S(Q̃, Q̃)⁺ D^{-1/2} S(Q̃, Q) V,   D = diag(S(Q̃, Q̃) 1)                  (6)

The official code (fudan-zvg/SOFT @ d3febc3) inverts ``P = S(Q̃, Q̃) + 0.01·I`` with
``α = 0.9 · 2 / max_i(Σ_j S_ij)²`` per matrix (:func:`newton_inverse`); its SOFT++ variant inverts
``P = S(Q̃, Q̃)`` with ``α = 2 / max(row sums)²`` over the whole batch, halved (at most ten times)
until ``max_j Σ_i |I − P V_0|_ij ≤ 1.01`` (:func:`newton_inverse_norm`). Landmarks come from a
learned strided convolution + LayerNorm + GELU (:class:`SoftmaxFreeAttention`); ``landmarks="avgpool"``
gives the paper's parameter-free alternative. The critical loop is the batched Newton iteration (4),
with ``backend="numpy" | "numba" | "torch" | "auto"``.
"""
from __future__ import annotations

import math
from typing import Any

import numba
import numpy as np
import torch
from torch import nn

from refimpl._common.backend import like_input, resolve_backend, to_numpy, to_torch
from refimpl._common.validate import check_finite, check_floating
from refimpl.attention.mha import attention

OFFICIAL_REG = 0.01  # the official newton_inv inverts S + 0.01 I


# ----------------------------------------------------------------------------------------------
# Eq. (1): the Gaussian kernel, and full (quadratic) softmax-free attention through the shared block.
# ----------------------------------------------------------------------------------------------
def gaussian_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``-||q_i - k_j||² / 2`` for ``q (..., n, d)``, ``k (..., m, d)`` → ``(..., n, m)`` (the exponent of eq. 1),
    expanded as ``-(|q|² + |k|² − 2 q·k) / 2`` like the official torch kernel."""
    return -((q * q).sum(-1, keepdim=True) + (k * k).sum(-1)[..., None, :] - 2 * q @ k.transpose(-1, -2)) / 2


def gaussian_kernel(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Eq. (1): ``exp(-||q_i - k_j||² / 2)``, shape ``(..., n, m)``."""
    return torch.exp(gaussian_scores(q, k))


def exp_weights(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The (A2) step of SOFT: ``exp`` of the scores, **no** row normalisation; masked pairs get 0."""
    w = torch.exp(scores)
    return w if mask is None else w.masked_fill(~mask, 0.0)


def gaussian_attention(q: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Full softmax-free attention, eq. (1): ``S V`` with ``K = Q`` (``q`` already scaled by ``d^{-1/4}``).
    ``q (B, H, n, d)``, ``v (B, H, n, dv)`` → ``(B, H, n, dv)``. Quadratic in ``n``: the reference that the
    Nyström form (3) approximates."""
    return attention(q, q, v, mask=mask, score_fn=gaussian_scores, weight_fn=exp_weights)[0]


# ----------------------------------------------------------------------------------------------
# Eq. (4): Newton-Raphson iteration, three backends.
# ----------------------------------------------------------------------------------------------
def _newton_numpy(p: np.ndarray, v: np.ndarray, iters: int) -> np.ndarray:
    """Reference: ``V ← 2V − V P V`` on a batch ``(G, m, m)``."""
    for _ in range(iters):
        v = 2 * v - v @ p @ v
    return v


@numba.njit(cache=True)
def _newton_numba_kernel(p, v, iters):
    two = p.dtype.type(2)
    for g in range(p.shape[0]):
        vg = v[g].copy()
        pg = p[g]
        for _ in range(iters):
            vg = two * vg - np.dot(np.dot(vg, pg), vg)
        v[g] = vg


def _newton_numba(p: np.ndarray, v: np.ndarray, iters: int) -> np.ndarray:
    """All ``iters`` steps of every matrix in one compiled loop. The products are BLAS calls (``np.dot``): a
    written-out triple loop is 3-10x slower than BLAS at m >= 32, and BLAS must not be called inside a Numba
    ``prange`` region (OpenBLAS then warns about nested OpenMP loops and may hang), so the batch loop is serial."""
    p = np.ascontiguousarray(p)
    v = np.array(v, copy=True, order="C")
    _newton_numba_kernel(p, v, iters)
    return v


def _newton_torch(p: torch.Tensor, v: torch.Tensor, iters: int) -> torch.Tensor:
    for _ in range(iters):
        v = 2 * v - v @ p @ v
    return v


_NEWTON = {"numpy": _newton_numpy, "numba": _newton_numba, "torch": _newton_torch}


def _check_square(mat: Any, name: str = "mat") -> None:
    check_floating(mat, name)
    if mat.ndim < 2 or mat.shape[-1] != mat.shape[-2]:
        raise ValueError(f"{name} must be a batch of square matrices (..., m, m), got shape {tuple(mat.shape)}")
    check_finite(mat, name)


def _check_iters(iters: int) -> None:
    if isinstance(iters, bool) or not isinstance(iters, (int, np.integer)) or iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters!r}")


def newton_inverse(mat: Any, iters: int = 20, *, reg: float = OFFICIAL_REG, alpha: Any = None,
                   backend: str = "auto"):
    """Eq. (4) with the official start: the Newton–Raphson inverse of ``P = mat + reg·I``.

    Args:
        mat: ``(..., m, m)`` float32/float64 array or tensor (a landmark kernel ``S(Q̃, Q̃)``: symmetric,
            non-negative).
        iters: Newton iterations (official default 20).
        reg: ridge added to the diagonal (official 0.01; 0 gives the paper's plain iteration, which converges
            to ``mat⁺`` from ``V_0 = α matᵀ`` when ``0 < α < 2/σ_max²``).
        alpha: step of ``V_0 = α P``; default ``0.9 · 2 / max_i(Σ_j mat_ij)²`` per matrix (official), which
            satisfies the convergence condition because ``σ_max(P) ≤ max row sum`` for symmetric non-negative P.
        backend: ``"numpy" | "numba" | "torch" | "auto"``.

    Returns ``V_iters`` with ``mat``'s shape, type and device.
    """
    _check_square(mat)
    _check_iters(iters)
    if not (isinstance(reg, (int, float)) and reg >= 0 and math.isfinite(reg)):
        raise ValueError(f"reg must be a finite number >= 0, got {reg!r}")
    b = resolve_backend(backend, mat)
    m = mat.shape[-1]
    if b == "torch":
        mt = to_torch(mat)
        p = mt + reg * torch.eye(m, dtype=mt.dtype, device=mt.device)
        a = 0.9 * 2 / _rowsum_max(mt) ** 2 if alpha is None else torch.as_tensor(alpha, dtype=mt.dtype,
                                                                                   device=mt.device)
        return like_input(_newton_torch(p, a[..., None, None] * p, iters), mat)
    mn = to_numpy(mat)
    p = mn + mn.dtype.type(reg) * np.eye(m, dtype=mn.dtype)
    a = np.asarray(0.9 * 2 / _rowsum_max(mn) ** 2 if alpha is None else alpha, dtype=mn.dtype)
    v0 = a[..., None, None] * p
    out = _NEWTON[b](p.reshape(-1, m, m), v0.reshape(-1, m, m), iters).reshape(p.shape)
    return like_input(out, mat)


def _rowsum_max(mat):
    """``max_i Σ_j mat_ij`` per matrix of a batch ``(..., m, m)`` → ``(...)`` (array or tensor)."""
    return mat.sum(-1).max(-1) if isinstance(mat, np.ndarray) else mat.sum(-1).amax(-1)


def newton_inverse_norm(mat: torch.Tensor, iters: int = 20) -> torch.Tensor:
    """The SOFT++ (official ``SoftmaxFreeNormAttentionKernel.newton_inv``) start: ``P = mat`` (no ridge),
    ``α = 2 / max(row sums over the whole batch)²``, halved up to ten times until
    ``max_j Σ_i |(I − P V_0)_ij| ≤ 1.01``; then ``iters`` steps of eq. (4). Torch only (it runs inside the module)."""
    _check_square(mat)
    _check_iters(iters)
    eye = torch.eye(mat.shape[-1], dtype=mat.dtype, device=mat.device)
    alpha = 2 / mat.sum(-1).max() ** 2
    v = alpha * mat
    for _ in range(10):
        if (eye - mat @ v).abs().sum(-2).max() <= 1.01:
            break
        alpha = alpha / 2
        v = alpha * mat
    return _newton_torch(mat, v, iters)


class _NewtonInverse(torch.autograd.Function):
    """Forward: eq. (4) without autograd. Backward: eq. (5), the gradient of an exact inverse, evaluated once."""

    @staticmethod
    def forward(ctx, mat, iters, reg, norm):
        with torch.no_grad():
            v = newton_inverse_norm(mat, iters) if norm else newton_inverse(mat, iters, reg=reg, backend="torch")
        ctx.save_for_backward(v)
        return v

    @staticmethod
    def backward(ctx, g):
        (v,) = ctx.saved_tensors
        vt = v.transpose(-1, -2)
        return -(vt @ g @ vt), None, None, None


def newton_inverse_autograd(mat: torch.Tensor, iters: int = 20, *, reg: float = OFFICIAL_REG,
                            norm: bool = False) -> torch.Tensor:
    """:func:`newton_inverse` (or :func:`newton_inverse_norm` when ``norm``) on a tensor with the backward of
    eq. (5) instead of differentiating through the ``iters`` matrix products."""
    if not isinstance(mat, torch.Tensor):
        raise TypeError(f"mat must be a torch.Tensor, got {type(mat).__name__}")
    return _NewtonInverse.apply(mat, iters, reg, norm)


# ----------------------------------------------------------------------------------------------
# Eqs. (2), (3), (6): Nyström attention.
# ----------------------------------------------------------------------------------------------
def nystrom_attention(q: torch.Tensor, landmarks: torch.Tensor, v: torch.Tensor, *, iters: int = 20,
                      reg: float = OFFICIAL_REG, sym_norm: bool = False) -> torch.Tensor:
    """Eq. (3) (eq. 6 when ``sym_norm``): ``S(Q, Q̃) S(Q̃, Q̃)⁺ (S(Q̃, Q) V)``.

    ``q (B, H, n, d)`` (scaled by ``d^{-1/4}``), ``landmarks (B, H, m, d)``, ``v (B, H, n, dv)`` → ``(B, H, n, dv)``.
    """
    if q.shape[-1] != landmarks.shape[-1]:
        raise ValueError(f"q and landmarks must have the same feature size, got {q.shape[-1]} and "
                         f"{landmarks.shape[-1]}")
    k1 = gaussian_kernel(q, landmarks)          # (B, H, n, m)
    k2 = gaussian_kernel(landmarks, landmarks)  # (B, H, m, m)
    k2_inv = newton_inverse_autograd(k2, iters, reg=reg, norm=sym_norm)
    if sym_norm:
        d = k2.sum(-1, keepdim=True).rsqrt()
        k2_inv = d * k2_inv * d.transpose(-1, -2)
    return (k1 @ k2_inv) @ (k1.transpose(-1, -2) @ v)


class SoftmaxFreeAttention(nn.Module):
    """SOFT attention layer with the official structure and parameter names (``W_q``, ``W_v``,
    ``attn.Qlandmark_op``, ``attn.Qnorm_act``, ``attn.conv``, ``ff``), so official ``state_dict``s load.

    Args:
        dim: model width; num_heads: heads (``dim`` divisible by it).
        ratio: landmark stride: ``m = (H/ratio)(W/ratio)`` landmarks (``ratio ≥ 2``).
        conv_size: kernel of the depthwise convolution of ``V`` added to the output (0 = none).
        max_iter: Newton iterations. sym_norm: SOFT++ (eq. 6 and :func:`newton_inverse_norm`).
        landmarks: ``"conv"`` (official: strided conv + LayerNorm + GELU, weights shared by heads) or
            ``"avgpool"`` (average pooling of the scaled queries, no parameters).

    ``forward(X (B, H·W, dim), H, W)`` → ``(B, H·W, dim)``.
    """

    def __init__(self, dim: int, num_heads: int, ratio: int, conv_size: int = 3, max_iter: int = 20, *,
                 sym_norm: bool = False, landmarks: str = "conv"):
        super().__init__()
        if num_heads < 1 or dim % num_heads:
            raise ValueError(f"dim={dim} must be a positive multiple of num_heads={num_heads}")
        if isinstance(ratio, bool) or not isinstance(ratio, int) or ratio < 2:
            raise ValueError(f"ratio must be an int >= 2 (the official ratio=1 path is broken), got {ratio!r}")
        if landmarks not in ("conv", "avgpool"):
            raise ValueError(f"landmarks must be 'conv' or 'avgpool', got {landmarks!r}")
        self.dim, self.num_head, self.head_dim = dim, num_heads, dim // num_heads
        self.ratio, self.max_iter, self.sym_norm, self.landmarks = ratio, max_iter, sym_norm, landmarks
        self.W_q = nn.Linear(dim, dim)
        self.W_v = nn.Linear(dim, dim)
        self.attn = nn.Module()
        if landmarks == "conv":
            self.attn.Qlandmark_op = nn.Conv2d(self.head_dim, self.head_dim, ratio, stride=ratio, bias=False)
            self.attn.Qnorm_act = nn.Sequential(nn.LayerNorm(self.head_dim), nn.GELU())
        self.attn.conv = (nn.Conv2d(num_heads, num_heads, conv_size, padding=conv_size // 2, bias=False,
                                    groups=num_heads) if conv_size else None)
        self.ff = nn.Linear(dim, dim)

    def landmark_queries(self, q: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """``Q̃ (B, nh, m, d)`` from the scaled queries ``q (B, nh, H·W, d)`` laid out on the ``H × W`` grid."""
        b, nh, n, d = q.shape
        grid = q.reshape(b * nh, h, w, d).permute(0, 3, 1, 2)  # (B·nh, d, H, W)
        if self.landmarks == "avgpool":
            pooled = nn.functional.avg_pool2d(grid, self.ratio)
            return pooled.flatten(2).transpose(1, 2).reshape(b, nh, -1, d)
        lm = self.attn.Qlandmark_op(grid).flatten(2).transpose(1, 2).reshape(b, nh, -1, d)
        return self.attn.Qnorm_act(lm)

    def kernel_forward(self, q: torch.Tensor, v: torch.Tensor, h: int, w: int) -> torch.Tensor:
        """Per-head part: ``q, v (B, nh, H·W, d)`` → ``(B, nh, H·W, d)`` (eq. 3 or 6, plus the conv of ``V``)."""
        b, nh, n, d = q.shape
        q = q / math.sqrt(math.sqrt(d))
        out = nystrom_attention(q, self.landmark_queries(q, h, w), v, iters=self.max_iter, sym_norm=self.sym_norm)
        if self.attn.conv is not None:
            vg = v.reshape(b, nh, h, w, d).permute(0, 4, 1, 2, 3).reshape(b * d, nh, h, w)
            out = out + self.attn.conv(vg).reshape(b, d, nh, h, w).flatten(3).permute(0, 2, 3, 1)
        return out

    def forward(self, x: torch.Tensor, h: int, w: int) -> torch.Tensor:
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"x must have shape (B, H*W, {self.dim}), got {tuple(x.shape)}")
        if x.shape[1] != h * w or h % self.ratio or w % self.ratio:
            raise ValueError(f"x has {x.shape[1]} tokens; need H*W = {h}*{w} with H and W divisible by "
                             f"ratio={self.ratio}")
        b, n, _ = x.shape
        split = lambda t: t.reshape(b, n, self.num_head, self.head_dim).transpose(1, 2)  # noqa: E731
        out = self.kernel_forward(split(self.W_q(x)), split(self.W_v(x)), h, w)
        return self.ff(out.transpose(1, 2).reshape(b, n, self.dim))
