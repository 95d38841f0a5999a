"""The book's tiny language model: a from-scratch decoder-only transformer in the Llama layout, with an
explicit, inspectable KV cache.

Architecture (``x_0 = E[tokens]``, ``ℓ = 1..n_layers``)::

    h_ℓ = x_{ℓ-1} + W_o · Attn(RoPE(W_q n), RoPE(W_k n), W_v n),   n = RMSNorm(x_{ℓ-1})       (M1)
    x_ℓ = h_ℓ + W_down (SiLU(W_gate m) ⊙ W_up m),                   m = RMSNorm(h_ℓ)           (M2)
    logits = W_lm · RMSNorm(x_L)                                   (untied head)             (M3)

    RMSNorm(x) = g ⊙ x / sqrt(mean(x²) + ε)                                                  (M4)

Attention is causal softmax attention per head, ``softmax(q kᵀ/√d_head + mask) v``. Rotary position
embedding (RoPE, Su et al. 2021) rotates each pair ``(x_i, x_{i+d/2})`` of a query/key at absolute
position ``p`` by the angle ``p·θ^{-2i/d}`` ("rotate half" layout, exactly as Hugging Face's Llama,
including its float32 computation of the angles), so ``⟨RoPE(q, p), RoPE(k, s)⟩`` depends only on
``p - s`` (RoPE's relative-position property).

The KV cache (:class:`KVCache`) stores, per layer, the keys *after* RoPE and the values, shape
``(B, H, T, d_head)``, together with the absolute position of every cached token, shape ``(B, H, T)``.
Because positions are stored, tokens can be dropped per layer and per head (:meth:`KVCache.keep`) and
later queries still see the kept keys at their original positions; the causal mask is computed from
positions (key position ≤ query position), not from indices.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
DEFAULT_WEIGHTS = os.path.join(WEIGHTS_DIR, "tiny_lm.safetensors")


@dataclass
class TinyLMConfig:
    """Hyper-parameters of :class:`TinyLM`.

    Args:
        vocab_size: number of token ids (the character tokenizer's size).
        d_model: residual width (128–256 for the book's model).
        n_layers: number of transformer blocks.
        n_heads: attention heads; ``d_head = d_model / n_heads`` must be even (RoPE).
        d_ff: hidden width of the SwiGLU MLP.
        max_seq_len: longest sequence the model accepts (positions ``0..max_seq_len-1``).
        rope_theta: RoPE base ``θ``.
        norm_eps: RMSNorm ``ε``.
    """

    vocab_size: int = 53
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    d_ff: int = 384
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "max_seq_len"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive integer, got {v!r}")
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be a multiple of n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"d_head={self.d_model // self.n_heads} must be even for RoPE")
        for name in ("rope_theta", "norm_eps"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise ValueError(f"{name} must be a finite number > 0, got {v!r}")

    @property
    def d_head(self) -> int:
        return self.d_model // self.n_heads

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TinyLMConfig":
        if not isinstance(d, dict):
            raise TypeError(f"from_dict expects a dict, got {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown TinyLMConfig fields: {sorted(unknown)}")
        return cls(**d)


# ----------------------------------------------------------------------------------------------- RoPE
def rope_cos_sin(positions: torch.Tensor, d_head: int, theta: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``cos, sin`` of the RoPE angles for integer ``positions (...)`` → each ``(..., d_head)``.

    ``angle[p, i] = p · θ^{-2i/d}`` for ``i < d/2``, repeated for the second half (rotate-half layout).
    Computed in float32 exactly as ``transformers``' ``LlamaRotaryEmbedding`` (then cast to ``dtype``), so
    that the exported model matches this one bit-for-bit in the angles.
    """
    inv_freq = 1.0 / (theta ** (torch.arange(0, d_head, 2, dtype=torch.int64, device=positions.device).float() / d_head))
    ang = positions.float()[..., None] * inv_freq  # (..., d/2)
    emb = torch.cat([ang, ang], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """``(x1, x2) → (-x2, x1)`` on the two halves of the last dimension."""
    d = x.shape[-1] // 2
    return torch.cat([-x[..., d:], x[..., :d]], dim=-1)


def apply_rope(x: torch.Tensor, positions: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """RoPE of ``x (..., L, d)`` at integer ``positions`` broadcastable to ``(..., L)``:
    ``x cos + rotate_half(x) sin``. Keeps ``<RoPE(q,p), RoPE(k,s)>`` a function of ``p - s``."""
    if x.shape[-1] % 2:
        raise ValueError(f"RoPE needs an even feature size, got {x.shape[-1]}")
    cos, sin = rope_cos_sin(positions, x.shape[-1], theta, x.dtype)
    return x * cos + rotate_half(x) * sin


# ------------------------------------------------------------------------------------------- KV cache
class KVCache:
    """Explicit per-layer key/value cache.

    Per layer ``l``: ``keys[l]`` and ``values[l]`` of shape ``(B, H, T_l, d_head)`` (keys stored after
    RoPE), ``positions[l]`` of shape ``(B, H, T_l)`` (int64 absolute positions of the cached tokens). ``T_l``
    may differ between layers after eviction; within a layer every head holds the same number of tokens
    (ragged per-head selections are expressed as equal per-layer budgets, :meth:`keep` with ``(B, H, T')``
    indices).

    ``seen_tokens`` counts the tokens processed so far: the next token gets absolute position
    ``seen_tokens`` whatever has been evicted.

    When ``record`` is true (or the model is called with ``return_attn=True``) the model stores, for the
    last forward call, ``last_queries[l]`` ``(B, H, L, d_head)`` (after RoPE), ``last_attn[l]`` the softmax
    weights ``(B, H, L, T_l)`` over the cached keys (in cache order) and ``last_query_positions`` ``(L,)``.
    """

    def __init__(self, n_layers: int, record: bool = False):
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ValueError(f"n_layers must be a positive integer, got {n_layers!r}")
        self.n_layers = n_layers
        self.record = bool(record)
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.positions: list[torch.Tensor | None] = [None] * n_layers
        self.last_queries: list[torch.Tensor | None] = [None] * n_layers
        self.last_attn: list[torch.Tensor | None] = [None] * n_layers
        self.last_query_positions: torch.Tensor | None = None
        self.seen_tokens = 0

    def _check_layer(self, layer: int) -> None:
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < self.n_layers:
            raise ValueError(f"layer must be an integer in [0, {self.n_layers}), got {layer!r}")

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Append ``k, v (B, H, L, d_head)`` at ``positions (B, H, L)`` to layer ``layer``; return the layer's
        full ``(keys, values, positions)``. (Does not advance ``seen_tokens``; the model does.)"""
        self._check_layer(layer)
        if k.dim() != 4 or v.shape != k.shape:
            raise ValueError(f"k and v must both have shape (B, H, L, d_head), got {tuple(k.shape)}, {tuple(v.shape)}")
        if positions.shape != k.shape[:3]:
            raise ValueError(f"positions must have shape {tuple(k.shape[:3])}, got {tuple(positions.shape)}")
        if self.keys[layer] is None:
            self.keys[layer], self.values[layer], self.positions[layer] = k, v, positions.long()
        else:
            ck = self.keys[layer]
            if ck.shape[0] != k.shape[0] or ck.shape[1] != k.shape[1] or ck.shape[3] != k.shape[3]:
                raise ValueError(f"cannot append {tuple(k.shape)} to a cache of shape {tuple(ck.shape)}")
            self.keys[layer] = torch.cat([ck, k], dim=2)
            self.values[layer] = torch.cat([self.values[layer], v], dim=2)
            self.positions[layer] = torch.cat([self.positions[layer], positions.long()], dim=2)
        return self.keys[layer], self.values[layer], self.positions[layer]

    def length(self, layer: int = 0) -> int:
        """Number of cached tokens ``T_l`` of ``layer`` (0 when empty)."""
        self._check_layer(layer)
        return 0 if self.keys[layer] is None else self.keys[layer].shape[2]

    def __len__(self) -> int:
        return self.length(0)

    def keep(self, layer: int, indices: torch.Tensor) -> None:
        """Keep only the cached tokens at ``indices`` (positions in the cache, not absolute positions) of ``layer``.

        ``indices``: int64 tensor of shape ``(T',)`` (same tokens for all rows and heads), ``(B, T')`` (per
        row) or ``(B, H, T')`` (per row and head). Order is preserved as given; keys, values and positions
        are gathered together, so later attention uses the tokens' original positions.
        """
        self._check_layer(layer)
        if self.keys[layer] is None:
            raise ValueError(f"layer {layer} of the cache is empty")
        if not isinstance(indices, torch.Tensor):
            raise TypeError(f"indices must be a torch.Tensor, got {type(indices).__name__}")
        if indices.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"indices must be an integer tensor, got {indices.dtype}")
        b, h, t, d = self.keys[layer].shape
        if indices.dim() == 1:
            idx = indices[None, None, :].expand(b, h, -1)
        elif indices.dim() == 2:
            if indices.shape[0] != b:
                raise ValueError(f"indices of shape (B, T') need B={b}, got {tuple(indices.shape)}")
            idx = indices[:, None, :].expand(b, h, -1)
        elif indices.dim() == 3:
            if indices.shape[:2] != (b, h):
                raise ValueError(f"indices of shape (B, H, T') need (B, H)=({b}, {h}), got {tuple(indices.shape)}")
            idx = indices
        else:
            raise ValueError(f"indices must have shape (T',), (B, T') or (B, H, T'), got {tuple(indices.shape)}")
        if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= t):
            raise ValueError(f"indices must lie in [0, {t}), got range [{int(idx.min())}, {int(idx.max())}]")
        idx = idx.long().to(self.keys[layer].device)
        self.keys[layer] = self.keys[layer].gather(2, idx[..., None].expand(-1, -1, -1, d))
        self.values[layer] = self.values[layer].gather(2, idx[..., None].expand(-1, -1, -1, d))
        self.positions[layer] = self.positions[layer].gather(2, idx)

    def nbytes(self) -> int:
        """Bytes held by cached keys and values over all layers."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values if t is not None)

    def clone(self) -> "KVCache":
        """A deep copy (tensors cloned)."""
        c = KVCache(self.n_layers, self.record)
        c.seen_tokens = self.seen_tokens
        for name in ("keys", "values", "positions", "last_queries", "last_attn"):
            setattr(c, name, [None if t is None else t.clone() for t in getattr(self, name)])
        c.last_query_positions = None if self.last_query_positions is None else self.last_query_positions.clone()
        return c


# --------------------------------------------------------------------------------------------- layers
class RMSNorm(nn.Module):
    """Eq. (M4): ``g ⊙ x / sqrt(mean(x²) + ε)`` over the last dimension (statistics in float32 or wider,
    as in Llama)."""

    def __init__(self, d: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        xf = x.float() if dtype in (torch.float16, torch.bfloat16) else x
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(dtype)


class Attention(nn.Module):
    """Multi-head causal self-attention with RoPE and an optional :class:`KVCache` (eq. M1)."""

    def __init__(self, cfg: TinyLMConfig, layer_idx: int):
        super().__init__()
        self.cfg, self.layer_idx = cfg, layer_idx
        self.n_heads, self.d_head = cfg.n_heads, cfg.d_head
        d = cfg.d_model
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, cache: KVCache | None, record: bool
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, l, _ = x.shape
        q, k, v = (p(x).view(b, l, self.n_heads, self.d_head).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))  # (B, H, L, dh)
        q = apply_rope(q, positions, self.cfg.rope_theta)
        k = apply_rope(k, positions, self.cfg.rope_theta)
        if cache is None and not record:  # training / plain forward: fused causal attention
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            weights = None
        else:
            if cache is not None:
                kpos = positions[None, None, :].expand(b, self.n_heads, l)
                k, v, kpos = cache.append(self.layer_idx, k, v, kpos)
            else:
                kpos = positions[None, None, :].expand(b, self.n_heads, l)
            scores = q @ k.transpose(-2, -1) / math.sqrt(self.d_head)  # (B, H, L, T)
            mask = kpos[:, :, None, :] <= positions[None, None, :, None]  # key pos ≤ query pos
            weights = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1)
            out = weights @ v
            if cache is not None and (cache.record or record):
                cache.last_queries[self.layer_idx] = q
                cache.last_attn[self.layer_idx] = weights
        out = out.transpose(1, 2).reshape(b, l, self.n_heads * self.d_head)
        return self.o_proj(out), weights


class MLP(nn.Module):
    """SwiGLU MLP (eq. M2): ``W_down (SiLU(W_gate x) ⊙ W_up x)``."""

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """Pre-norm transformer block (eqs. M1–M2)."""

    def __init__(self, cfg: TinyLMConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, positions, cache, record):
        a, w = self.self_attn(self.input_layernorm(x), positions, cache, record)
        h = x + a
        return h + self.mlp(self.post_attention_layernorm(h)), w


Policy = Callable[["TinyLM", KVCache], None]


class TinyLM(nn.Module):
    """Decoder-only transformer in the Llama layout (eqs. M1–M4); parameter names follow Hugging Face's
    ``LlamaForCausalLM`` (``embed_tokens``, ``layers.i.self_attn.q_proj``, …, ``norm``, ``lm_head``).

    ``forward(tokens (B, L) int64, cache=None, return_attn=False)`` → logits ``(B, L, vocab)`` (float, the
    parameters' dtype); with ``return_attn`` also the list of per-layer attention weights ``(B, H, L, T_l)``.
    With a cache, the ``L`` new tokens get absolute positions ``cache.seen_tokens .. +L-1``; their keys
    (after RoPE) and values are appended to the cache and they attend to every cached token whose
    position is ≤ theirs.
    """

    def __init__(self, cfg: TinyLMConfig):
        super().__init__()
        if not isinstance(cfg, TinyLMConfig):
            raise TypeError(f"cfg must be a TinyLMConfig, got {type(cfg).__name__}")
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Normal(0, 0.02) weights, output projections scaled by ``1/√(2·n_layers)`` (GPT-2 style), unit norms."""
        for name, p in self.named_parameters():
            if name.endswith("layernorm.weight") or name == "norm.weight":
                nn.init.ones_(p)
            else:
                std = 0.02 / math.sqrt(2 * self.cfg.n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def new_cache(self, record: bool = False) -> KVCache:
        """An empty :class:`KVCache` for this model."""
        return KVCache(self.cfg.n_layers, record=record)

    def _check_tokens(self, tokens: Any) -> None:
        if not isinstance(tokens, torch.Tensor):
            raise TypeError(f"tokens must be a torch.Tensor of int64 ids, got {type(tokens).__name__}")
        if tokens.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"tokens must be an integer tensor, got {tokens.dtype}")
        if tokens.dim() != 2 or tokens.shape[1] == 0:
            raise ValueError(f"tokens must have shape (B, L) with L ≥ 1, got {tuple(tokens.shape)}")
        if tokens.numel() and (int(tokens.min()) < 0 or int(tokens.max()) >= self.cfg.vocab_size):
            raise ValueError(f"token ids must lie in [0, {self.cfg.vocab_size}), "
                             f"got range [{int(tokens.min())}, {int(tokens.max())}]")

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None, return_attn: bool = False):
        self._check_tokens(tokens)
        if cache is not None and not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache or None, got {type(cache).__name__}")
        if cache is not None and cache.n_layers != self.cfg.n_layers:
            raise ValueError(f"cache has {cache.n_layers} layers, the model {self.cfg.n_layers}")
        start = 0 if cache is None else cache.seen_tokens
        l = tokens.shape[1]
        if start + l > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {start + l} positions exceeds max_seq_len={self.cfg.max_seq_len}")
        positions = torch.arange(start, start + l, device=tokens.device)
        x = self.embed_tokens(tokens.long())
        attn = []
        for blk in self.layers:
            x, w = blk(x, positions, cache, return_attn)
            attn.append(w)
        if cache is not None:
            cache.seen_tokens += l
            cache.last_query_positions = positions
        logits = self.lm_head(self.norm(x))
        return (logits, attn) if return_attn else logits

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, cache: KVCache | None = None) -> tuple[torch.Tensor, KVCache]:
        """Run the prompt ``tokens (B, L)`` through the model filling a (new) cache; return the logits of the
        last position ``(B, vocab)`` and the cache."""
        cache = self.new_cache() if cache is None else cache
        return self.forward(tokens, cache)[:, -1], cache

    @torch.no_grad()
    def decode_step(self, token: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Feed one token per row, ``token (B,)`` or ``(B, 1)``, at position ``cache.seen_tokens``; return the
        next-token logits ``(B, vocab)``."""
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
        if isinstance(token, torch.Tensor) and token.dim() == 1:
            token = token[:, None]
        return self.forward(token, cache)[:, -1]

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, cache: KVCache | None = None,
                 policy: Policy | None = None) -> torch.Tensor:
        """Greedy decoding: ``max_new_tokens`` tokens after the prompt ``tokens (B, L)`` → ``(B, max_new_tokens)``.

        ``policy(model, cache)``, when given, is called after the prefill and after every decode step (before
        the next token is fed); it may evict tokens with :meth:`KVCache.keep`. Use a cache with
        ``record=True`` to let it read ``cache.last_queries`` / ``cache.last_attn``.
        """
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        logits, cache = self.prefill(tokens, cache)
        out = []
        for i in range(max_new_tokens):
            if policy is not None:
                policy(self, cache)
            nxt = logits.argmax(-1)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits = self.decode_step(nxt, cache)
        return torch.stack(out, dim=1)

    # ------------------------------------------------------------------------------------ persistence
    def save(self, path: str, metadata: dict[str, Any] | None = None) -> None:
        """Write ``path`` (``.safetensors``, float32) and ``path`` with ``.json`` (config + ``metadata``)."""
        from safetensors.torch import save_file
        sd = {k: v.detach().to(torch.float32).contiguous() for k, v in self.state_dict().items()}
        save_file(sd, path)
        with open(os.path.splitext(path)[0] + ".json", "w") as f:
            json.dump({"config": self.cfg.to_dict(), **(metadata or {})}, f, indent=2)
            f.write("\n")


def load_tiny_lm(path: str | None = None, dtype: torch.dtype = torch.float32) -> TinyLM:
    """Load the committed checkpoint (default ``refimpl/models/weights/tiny_lm.safetensors``) in eval mode."""
    path = DEFAULT_WEIGHTS if path is None else path
    meta = os.path.splitext(path)[0] + ".json"
    if not os.path.exists(path) or not os.path.exists(meta):
        raise FileNotFoundError(f"no checkpoint at {path} (+ .json); run `python scripts/train_tiny_lm.py`")
    from safetensors.torch import load_file
    with open(meta) as f:
        cfg = TinyLMConfig.from_dict(json.load(f)["config"])
    model = TinyLM(cfg)
    model.load_state_dict(load_file(path))
    return model.to(dtype).eval()


def load_metadata(path: str | None = None) -> dict[str, Any]:
    """The ``.json`` written next to a checkpoint (config and training metadata)."""
    path = DEFAULT_WEIGHTS if path is None else path
    with open(os.path.splitext(path)[0] + ".json") as f:
        return json.load(f)
