"""Multi-head attention from scratch, with the three places where attention variants differ made pluggable.

For one head with queries ``Q ∈ R^{Lq×d}``, keys ``K ∈ R^{Lk×d}`` and values ``V ∈ R^{Lk×dv}``,

    S = score(Q, K)            e.g. Q Kᵀ / √d                         (A1)
    A = weight(S, M)           e.g. softmax over keys, M the mask     (A2)
    O = aggregate(A, V)        e.g. A V                               (A3)

Softmax attention uses the defaults (:func:`dot_product_scores`, :func:`softmax_weights`,
:func:`matmul_aggregate`); softplus attention replaces (A2), SOFT's Gaussian kernel replaces (A1) and
(A2), tropical attention replaces all three (Hilbert-metric scores, no normalisation, max-plus
aggregation). Each is a plain function on tensors of shape ``(B, H, L, ·)``.

Masks are boolean, ``True`` where a query may attend to a key, broadcastable to ``(B, H, Lq, Lk)``.
:func:`causal_mask` aligns the diagonal to the *end* of the keys, so it also serves queries that
attend to a longer cache (``Lk ≥ Lq``).
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

Scores = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Weights = Callable[[torch.Tensor, "torch.Tensor | None"], torch.Tensor]
Aggregate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def dot_product_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Eq. (A1): ``q kᵀ / √d`` for ``q (..., Lq, d)``, ``k (..., Lk, d)`` → ``(..., Lq, Lk)``."""
    return q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])


def softmax_weights(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Eq. (A2) for softmax attention: masked keys get weight 0; each row sums to 1."""
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, dim=-1)


def matmul_aggregate(weights: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Eq. (A3): ``A V`` for ``A (..., Lq, Lk)``, ``v (..., Lk, dv)`` → ``(..., Lq, dv)``."""
    return weights @ v


def causal_mask(lq: int, lk: int | None = None, device: torch.device | str | None = None) -> torch.Tensor:
    """``(lq, lk)`` boolean mask: query ``i`` sees keys ``j ≤ i + (lk - lq)`` (the last ``lq`` positions of the keys)."""
    lk = lq if lk is None else lk
    if lk < lq:
        raise ValueError(f"a causal mask needs at least as many keys as queries, got lq={lq}, lk={lk}")
    i = torch.arange(lq, device=device)[:, None]
    j = torch.arange(lk, device=device)[None, :]
    return j <= i + (lk - lq)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
              causal: bool = False, score_fn: Scores = dot_product_scores, weight_fn: Weights = softmax_weights,
              aggregate_fn: Aggregate = matmul_aggregate) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. (A1)-(A3) on ``q (B, H, Lq, d)``, ``k (B, H, Lk, d)``, ``v (B, H, Lk, dv)``.

    Returns ``(out (B, H, Lq, dv), weights (B, H, Lq, Lk))``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() < 2:
            raise ValueError(f"{name} must have shape (..., L, d), got {tuple(t.shape)}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same feature size, got {q.shape[-1]} and {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same length, got {k.shape[-2]} and {v.shape[-2]}")
    if causal:
        cm = causal_mask(q.shape[-2], k.shape[-2], q.device)
        mask = cm if mask is None else mask & cm
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask must be a boolean tensor (True = attend), got {mask.dtype}")
    weights = weight_fn(score_fn(q, k), mask)
    return aggregate_fn(weights, v), weights


def rope(x: torch.Tensor, positions: torch.Tensor | None = None, base: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding of ``x (..., L, d)`` (``d`` even), rotating pairs ``(x_i, x_{i+d/2})`` by
    ``pos · base^(-2i/d)`` ("rotate half" layout, as in GPT-NeoX and Llama). ``positions`` defaults to ``0..L-1``."""
    d = x.shape[-1]
    if d % 2:
        raise ValueError(f"rope needs an even feature size, got {d}")
    if positions is None:
        positions = torch.arange(x.shape[-2], device=x.device)
    inv = base ** (-torch.arange(0, d, 2, device=x.device, dtype=torch.float64) / d)
    ang = positions.to(torch.float64)[..., None] * inv  # (L, d/2)
    cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


class MultiHeadAttention(nn.Module):
    """Multi-head attention: ``Q, K, V = x W_q, x W_k, x W_v`` split into ``n_heads``, eqs. (A1)-(A3) per head,
    heads concatenated and projected by ``W_o``.

    Args:
        d_model: model width (divisible by ``n_heads``).
        n_heads: number of heads.
        causal: mask future keys.
        score_fn, weight_fn, aggregate_fn: the pluggable pieces (defaults: softmax attention).
        bias: biases in the four projections.
        use_rope: apply :func:`rope` to queries and keys.

    ``forward(x (B, L, d_model), mask=None, return_weights=False)`` → ``(B, L, d_model)``
    (and the ``(B, H, L, L)`` weights when ``return_weights``).
    """

    def __init__(self, d_model: int, n_heads: int, *, causal: bool = False, score_fn: Scores = dot_product_scores,
                 weight_fn: Weights = softmax_weights, aggregate_fn: Aggregate = matmul_aggregate, bias: bool = False,
                 use_rope: bool = False):
        super().__init__()
        if n_heads < 1 or d_model % n_heads:
            raise ValueError(f"d_model={d_model} must be a positive multiple of n_heads={n_heads}")
        self.d_model, self.n_heads, self.d_head = d_model, n_heads, d_model // n_heads
        self.causal, self.use_rope = causal, use_rope
        self.score_fn, self.weight_fn, self.aggregate_fn = score_fn, weight_fn, aggregate_fn
        self.q_proj = nn.Linear(d_model, d_model, bias=bias)
        self.k_proj = nn.Linear(d_model, d_model, bias=bias)
        self.v_proj = nn.Linear(d_model, d_model, bias=bias)
        self.o_proj = nn.Linear(d_model, d_model, bias=bias)

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, L, H·dh)`` → ``(B, H, L, dh)``."""
        b, l, _ = x.shape
        return x.view(b, l, self.n_heads, self.d_head).transpose(1, 2)

    @staticmethod
    def merge_heads(x: torch.Tensor) -> torch.Tensor:
        """``(B, H, L, dh)`` → ``(B, L, H·dh)``."""
        b, h, l, d = x.shape
        return x.transpose(1, 2).reshape(b, l, h * d)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None, return_weights: bool = False):
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must have shape (B, L, {self.d_model}), got {tuple(x.shape)}")
        q, k, v = (self.split_heads(p(x)) for p in (self.q_proj, self.k_proj, self.v_proj))
        if self.use_rope:
            q, k = rope(q), rope(k)
        out, weights = attention(q, k, v, mask=mask, causal=self.causal, score_fn=self.score_fn,
                                 weight_fn=self.weight_fn, aggregate_fn=self.aggregate_fn)
        out = self.o_proj(self.merge_heads(out))
        return (out, weights) if return_weights else out


class TransformerBlock(nn.Module):
    """Pre-LayerNorm block: ``x + attn(LN(x))``, then ``x + MLP(LN(x))`` with a GELU MLP of width ``mlp_ratio·d``.
    ``attn`` is any module with the :class:`MultiHeadAttention` call signature."""

    def __init__(self, d_model: int, attn: nn.Module, mlp_ratio: int = 4):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = attn
        self.mlp = nn.Sequential(nn.Linear(d_model, mlp_ratio * d_model), nn.GELU(),
                                 nn.Linear(mlp_ratio * d_model, d_model))

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), mask=mask)
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """A token-sequence model for the chapters' synthetic tasks: embedding, ``n_layers`` pre-LN blocks, final LN
    and a linear head giving logits ``(B, L, n_out)``.

    Args:
        vocab: input vocabulary size.
        n_out: output classes per position (defaults to ``vocab``).
        d_model, n_heads, n_layers, mlp_ratio: the usual sizes.
        causal: decoder (masked) or encoder attention.
        pos: ``"rope"`` (rotary, no length limit), ``"learned"`` (absolute, up to ``max_len``) or ``"none"``.
        attn_kwargs: passed to every :class:`MultiHeadAttention` (e.g. ``weight_fn=...``).
    """

    def __init__(self, vocab: int, d_model: int = 64, n_heads: int = 4, n_layers: int = 2, *, n_out: int | None = None,
                 causal: bool = True, pos: str = "rope", max_len: int = 512, mlp_ratio: int = 4,
                 attn_kwargs: dict | None = None):
        super().__init__()
        if pos not in ("rope", "learned", "none"):
            raise ValueError(f"pos must be 'rope', 'learned' or 'none', got {pos!r}")
        self.pos, self.max_len = pos, max_len
        self.embed = nn.Embedding(vocab, d_model)
        self.pos_embed = nn.Embedding(max_len, d_model) if pos == "learned" else None
        kw = dict(attn_kwargs or {})
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, MultiHeadAttention(d_model, n_heads, causal=causal, use_rope=pos == "rope", **kw),
                             mlp_ratio)
            for _ in range(n_layers))
        self.ln_f = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab if n_out is None else n_out)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"tokens must be an integer tensor of shape (B, L), got {tokens.dtype} {tuple(tokens.shape)}")
        x = self.embed(tokens)
        if self.pos_embed is not None:
            if tokens.shape[1] > self.max_len:
                raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_len={self.max_len} of learned positions")
            x = x + self.pos_embed(torch.arange(tokens.shape[1], device=tokens.device))
        for blk in self.blocks:
            x = blk(x, mask=mask)
        return self.head(self.ln_f(x))
