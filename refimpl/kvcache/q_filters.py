"""Q-Filters: KV-cache compression from the geometry of queries and keys (Godey et al., 2025, arXiv:2503.02812).

Offline, once per model, for every layer ``l`` and attention head ``h``: collect post-RoPE query vectors
``Q_{l,h}`` ``(N, d_h)`` on calibration text and take their principal right-singular vector

    (1) Q_{l,h} = U S Vᵀ,   v = V[:, 0]                                    (SVD, s_1 ≥ s_2 ≥ …)
    (2) σ = +1 if #{i : U[i, 0] > 0} > N/2 else −1                        (majority vote: most queries
                                                                           project positively on σ v)
    (3) u_{l,h} = σ v,      f_{l,h} = −u_{l,h}                             (f: the official *stored* filter)

Online, score every cached key by its projection on the filter and keep the best ones:

    (4) s_{l,b,h,j} = −⟨k_{l,b,h,j}, f_{l,h}⟩ = ⟨k_{l,b,h,j}, u_{l,h}⟩       (kvpress' QFilterPress.score)
    (5) keep = sinks ∪ recent window ∪ top-k_j s_{l,b,h,j}                 (eq. E1 of the part, select_keep)

Why (4) estimates attention: the paper observes that ``E[⟨Q, v⟩] ≠ 0`` along one direction (anisotropy), while
the query components orthogonal to it average out, so ``E_Q⟨Q, k⟩ ≈ E[⟨Q, u⟩] · ⟨k, u⟩`` with
``E[⟨Q, u⟩] > 0`` by (2): ranking keys by ``⟨k, u⟩`` ranks them by their expected attention logit, without
computing any attention weight (FlashAttention-compatible). The sign (2) matters because the SVD returns
``v`` only up to sign: without it, (4) would keep the *least* attended keys for half of the heads.

The official code (``make_filters.py`` of NathanGodey/qfilters) stores the *negative* ``f = −σ v`` and both
official consumers negate it again: kvpress' ``QFilterPress`` scores ``−(f·k)``, the repository's
``QFiltersCache`` keeps ``topk(−k·f)``. :func:`q_filters` returns ``f`` in the official storage convention, and
:func:`qfilter_scores` implements (4), so filters from either source plug in unchanged. With grouped-query
attention the official per-KV-head filter is the (unnormalised) mean of its query heads' ``f``; our model is
multi-head (``n_kv_heads = n_heads``), where the mean is the identity.

The critical loop is (4) over the whole cache: a per-head dot product of every cached key with a ``d_h``-vector,
``B·H·T·d_h`` multiply-adds, then a top-k. Backends: ``"numpy"`` (readable reference, ``einsum``), ``"numba"``
(one streaming pass with a vectorised ``d_h``-dot per key; work items of 2048 tokens of one head spread over the
threads above ``PARALLEL_MIN`` elements), ``"torch"`` (``einsum``: a mat-vec per head, device-agnostic). The loop
is memory-bound: it reads every key once and does 2 flops per 4 bytes (float32).

:class:`QFilterPolicy` is the method as a :class:`~refimpl.kvcache.eviction.CachePolicy` for the book's tiny
model: after the prefill it compresses every layer to ``budget`` tokens per head (like kvpress' QFilterPress),
and after every decoding step it evicts back to ``budget`` keeping the ``n_recent`` most recent tokens (like
the official ``QFiltersCache``, ``max_length = budget``, ``window_length = n_recent``).
"""
from __future__ import annotations

import copy
from typing import Any, Sequence

import numpy as np
import torch
from numba import njit, prange

from refimpl._common.backend import like_input, resolve_backend, to_numpy
from refimpl._common.kernels import FASTMATH as _FASTMATH, row_blocks
from refimpl._common.validate import check_finite, check_floating, check_int
from refimpl.kvcache.eviction import CachePolicy, select_keep
from refimpl.models.tiny_lm import KVCache, TinyLM

__all__ = ["collect_queries", "q_filters", "qfilter_scores", "qfilter_select", "calibration_tokens",
           "QFilterPolicy"]


# ------------------------------------------------------------------------------------------- offline
@torch.no_grad()
def collect_queries(model: TinyLM, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Post-RoPE queries of every layer for a batch of calibration sequences.

    Args:
        model: a :class:`~refimpl.models.TinyLM`.
        tokens: int64 ``(B, L)`` token ids.

    Returns:
        ``n_layers`` tensors ``(H, B·L, d_h)`` in the model's dtype: sequence ``b``'s queries occupy rows
        ``b·L .. (b+1)·L − 1`` (the order of the official code, which stacks one sequence after the other).
    """
    if not isinstance(model, TinyLM):
        raise TypeError(f"model must be a TinyLM, got {type(model).__name__}")
    if not isinstance(tokens, torch.Tensor) or tokens.dtype not in (torch.int64, torch.int32) or tokens.dim() != 2:
        raise ValueError(f"tokens must be an integer tensor of shape (B, L), got "
                         f"{getattr(tokens, 'dtype', type(tokens).__name__)} {tuple(getattr(tokens, 'shape', ()))}")
    cache = model.new_cache(record=True)
    model(tokens.to(next(model.parameters()).device), cache)
    out = []
    for q in cache.last_queries:  # (B, H, L, dh)
        b, h, l, d = q.shape
        out.append(q.permute(1, 0, 2, 3).reshape(h, b * l, d))
    return out


def q_filters(queries: Sequence[torch.Tensor] | torch.Tensor, num_svd_samples: int = 3000,
              n_kv_heads: int | None = None, seed: int | None = 0) -> torch.Tensor:
    """Q-Filters of every layer and head, eqs. (1)–(3), in the official storage convention ``f = −σ v``.

    Args:
        queries: per layer ``(H, N, d_h)`` floating query vectors (a list, or a tensor ``(L, H, N, d_h)``),
            e.g. from :func:`collect_queries`.
        num_svd_samples: at most this many of the ``N`` query vectors (a random subset, the same for all
            heads of a layer, as in the official code) enter the SVD.
        n_kv_heads: number of key/value heads (default ``H``); with grouped-query attention the filter of a
            KV head is the mean of its ``H / n_kv_heads`` query heads' filters (official rule, not renormalised).
        seed: seeds the subset draw exactly as the official script does after ``torch.manual_seed(seed)``
            (one ``torch.rand(N)`` per layer, in layer order); ``None`` uses the first ``num_svd_samples``
            rows in order.

    Returns:
        ``(L, n_kv_heads, d_h)`` in the queries' dtype. Row ``f[l, h]`` is minus the unit principal direction
        oriented so that most queries project positively on ``−f``.
    """
    layers = list(queries) if not isinstance(queries, torch.Tensor) else list(queries.unbind(0))
    if not layers:
        raise ValueError("queries must hold at least one layer")
    check_int(num_svd_samples, "num_svd_samples", 1)
    gen = None
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int or None, got {type(seed).__name__}")
        gen = torch.Generator().manual_seed(seed)
    out = []
    for i, q in enumerate(layers):
        if not isinstance(q, torch.Tensor):
            raise TypeError(f"queries[{i}] must be a torch.Tensor, got {type(q).__name__}")
        check_floating(q, f"queries[{i}]")
        if q.dim() != 3 or q.shape[1] < 1:
            raise ValueError(f"queries[{i}] must have shape (H, N, d_h) with N ≥ 1, got {tuple(q.shape)}")
        check_finite(q, f"queries[{i}]")
        h, n, d = q.shape
        kv = h if n_kv_heads is None else check_int(n_kv_heads, "n_kv_heads", 1)
        if h % kv:
            raise ValueError(f"n_kv_heads={kv} must divide the number of query heads {h}")
        if gen is not None:
            idx = torch.argsort(torch.rand(n, generator=gen))[:num_svd_samples]
            x = q[:, idx.to(q.device)]
        else:
            x = q[:, :num_svd_samples]
        _, _, vh = torch.linalg.svd(x, full_matrices=False)          # (1): x = U S Vᵀ, batched over heads
        v = vh[:, 0, :]                                              # (H, d) principal right-singular vectors
        proj = (x @ v[..., None])[..., 0]                            # (H, n') = s_1 · U[:, 0]
        sign = ((proj > 0).to(x.dtype).mean(-1) > 0.5).to(x.dtype) * 2 - 1   # (2) majority vote
        f = -sign[:, None] * v                                       # (3) stored filter
        out.append(f.reshape(kv, h // kv, d).mean(1))
    return torch.stack(out)


def calibration_tokens(n_sequences: int = 16, seq_len: int = 256, seed: int = 2025) -> torch.Tensor:
    """Seeded calibration text from the model's own corpus (grammar text and task prompts, packed as in
    training), ``(n_sequences, seq_len)`` int64. Uses a seed distinct from the evaluation prompts' (1234)."""
    from refimpl.models.corpus import training_batch
    check_int(n_sequences, "n_sequences", 1)
    check_int(seq_len, "seq_len", 2)
    return training_batch(np.random.default_rng(seed), n_sequences, seq_len)[:, :seq_len]


# ------------------------------------------------------------------------------------ the critical loop
def _check_keys_filters(keys: Any, filters: Any) -> None:
    check_floating(keys, "keys")
    check_floating(filters, "filters")
    if keys.ndim != 4:
        raise ValueError(f"keys must have shape (B, H, T, d_h), got {tuple(keys.shape)}")
    if filters.ndim != 2 or tuple(filters.shape) != (keys.shape[1], keys.shape[3]):
        raise ValueError(f"filters must have shape (H, d_h) = {(keys.shape[1], keys.shape[3])}, "
                         f"got {tuple(filters.shape)}")
    if type(keys) is not type(filters):
        raise TypeError(f"keys and filters must both be numpy arrays or both torch tensors, got "
                        f"{type(keys).__name__} and {type(filters).__name__}")


def _scores_numpy(k: np.ndarray, f: np.ndarray) -> np.ndarray:
    return -np.einsum("bhtd,hd->bht", k, f)                          # (4)


_CHUNK = 2048  # rows (cached tokens) per work item: one head's filter stays in registers over a chunk


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _score_rows(k, f, out, bh, h, lo, hi):
    """out[bh, t] = −⟨k[bh, t], f[h]⟩ for t in [lo, hi): the d_h-reduction vectorises (FASTMATH)."""
    d = k.shape[2]
    T = k.dtype.type
    fr = f[h, :d]
    for t in range(lo, hi):
        kr = k[bh, t, :d]
        acc = T(0)
        for j in range(d):
            acc += kr[j] * fr[j]
        out[bh, t] = -acc


@njit(cache=True, fastmath=_FASTMATH)
def _scores_numba_serial(k, f, n_heads, out):
    """k (B·H, T, d), f (H, d), out (B·H, T): eq. (4), one thread."""
    bh_tot, t_len, _ = k.shape
    for bh in range(bh_tot):
        _score_rows(k, f, out, bh, bh % n_heads, 0, t_len)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _scores_numba_parallel(k, f, n_heads, out):
    """As :func:`_scores_numba_serial`, work items (row of the cache, chunk of ``_CHUNK`` tokens) over threads."""
    bh_tot, t_len, _ = k.shape
    n_chunks = (t_len + _CHUNK - 1) // _CHUNK
    for item in prange(bh_tot * n_chunks):
        bh = item // n_chunks
        lo = (item - bh * n_chunks) * _CHUNK
        _score_rows(k, f, out, bh, bh % n_heads, lo, min(t_len, lo + _CHUNK))


def _scores_numba_host(k: np.ndarray, f: np.ndarray) -> np.ndarray:
    b, h, t, d = k.shape
    k3 = np.ascontiguousarray(k).reshape(b * h, t, d)
    f2 = np.ascontiguousarray(f, dtype=k.dtype)
    out = np.empty((b * h, t), dtype=k.dtype)
    if out.size:
        kernel = _scores_numba_serial if row_blocks(b * h * t, k3.size) == 1 else _scores_numba_parallel
        kernel(k3, f2, h, out)
    return out.reshape(b, h, t)


def _scores_torch(k: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    return -torch.einsum("bhtd,hd->bht", k, f.to(k.dtype))          # (4), one mat-vec per head


def qfilter_scores(keys: Any, filters: Any, backend: str = "auto") -> Any:
    """Eq. (4): the Q-Filter score of every cached key, ``s[b, h, j] = −⟨keys[b, h, j], filters[h]⟩``.

    Args:
        keys: ``(B, H, T, d_h)`` post-RoPE cached keys, NumPy array or tensor, float32/float64.
        filters: ``(H, d_h)`` stored filters of this layer (official convention, from :func:`q_filters`),
            the same array type as ``keys`` (cast to ``keys``' dtype).
        backend: ``"numpy" | "numba" | "torch" | "auto"`` (torch for tensors, numba for arrays).

    Returns:
        ``(B, H, T)`` scores in ``keys``' dtype and type (larger = keep).
    """
    _check_keys_filters(keys, filters)
    backend = resolve_backend(backend, keys)
    if backend == "torch":
        k = keys if isinstance(keys, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(keys))
        f = filters if isinstance(filters, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(filters))
        return like_input(_scores_torch(k, f.to(k.device)), keys)
    k, f = to_numpy(keys), to_numpy(filters).astype(to_numpy(keys).dtype, copy=False)
    out = _scores_numpy(k, f) if backend == "numpy" else _scores_numba_host(k, f)
    return like_input(out.astype(k.dtype, copy=False), keys)


def qfilter_select(keys: torch.Tensor, filters: torch.Tensor, budget: int, n_recent: int = 0, n_sink: int = 0,
                   backend: str = "auto") -> torch.Tensor:
    """Eqs. (4)–(5): sorted int64 ``(B, H, T')`` indices of the cache entries to keep, ``T' = min(budget, T)``:
    the ``n_sink`` first, the ``n_recent`` last and the top-scoring rest (:func:`select_keep`)."""
    if not isinstance(keys, torch.Tensor):
        raise TypeError(f"keys must be a torch.Tensor, got {type(keys).__name__}")
    scores = qfilter_scores(keys, filters, backend=backend)
    return select_keep(scores, budget, n_recent=n_recent, n_sink=n_sink)


# ------------------------------------------------------------------------------------------- policy
class QFilterPolicy(CachePolicy):
    """Q-Filters as a cache policy for :class:`~refimpl.models.TinyLM` (eqs. 4–5).

    After the prefill and after every decoding step, each layer holding more than ``budget`` tokens keeps, per
    row and head, the ``n_sink`` first tokens, the ``n_recent`` most recent ones and the best-scoring rest, so
    every layer and head ends with exactly ``budget`` tokens. ``n_recent=0, n_sink=0`` at the prefill is
    kvpress' ``QFilterPress``; ``n_recent = window_length`` during decoding is the official ``QFiltersCache``.

    Args:
        filters: ``(n_layers, H, d_h)`` stored filters (:func:`q_filters`; official convention).
        budget: tokens kept per layer and head.
        n_recent: most recent tokens always kept (default ``budget // 8``).
        n_sink: first tokens always kept (default 0: Q-Filters has no sinks).
        backend: backend of :func:`qfilter_scores`.
    """

    def __init__(self, filters: torch.Tensor, budget: int, n_recent: int | None = None, n_sink: int = 0,
                 backend: str = "torch"):
        super().__init__()
        if not isinstance(filters, torch.Tensor):
            raise TypeError(f"filters must be a torch.Tensor, got {type(filters).__name__}")
        check_floating(filters, "filters")
        if filters.dim() != 3:
            raise ValueError(f"filters must have shape (n_layers, H, d_h), got {tuple(filters.shape)}")
        check_finite(filters, "filters")
        self.filters = filters.detach()
        self.budget = check_int(budget, "budget", 1)
        self.n_recent = budget // 8 if n_recent is None else check_int(n_recent, "n_recent", 0)
        self.n_sink = check_int(n_sink, "n_sink", 0)
        if self.n_recent + self.n_sink > budget:
            raise ValueError(f"n_recent + n_sink must not exceed budget, got {self.n_recent} + {self.n_sink} > {budget}")
        self.backend = resolve_backend(backend, self.filters)

    @classmethod
    def calibrate(cls, model: TinyLM, budget: int, n_sequences: int = 16, seq_len: int = 256, seed: int = 2025,
                  num_svd_samples: int = 3000, **kwargs: Any) -> "QFilterPolicy":
        """Filters from :func:`calibration_tokens` (seeded corpus text, not the evaluation prompts) through
        :func:`collect_queries` and :func:`q_filters`; ``kwargs`` go to the constructor.

        The queries are collected with a float64 copy of ``model`` and the SVD runs in float64 (the official
        code uses float32): for heads whose top two singular values are close, float32 round-off — which on CPU
        differs between processes with memory alignment — visibly moves ``v``. The filters are returned in the
        model's dtype."""
        if not isinstance(model, TinyLM):
            raise TypeError(f"model must be a TinyLM, got {type(model).__name__}")
        dtype = next(model.parameters()).dtype
        model64 = copy.deepcopy(model).to(torch.float64)
        queries = collect_queries(model64, calibration_tokens(n_sequences, seq_len, seed))
        filters = q_filters(queries, num_svd_samples=num_svd_samples, seed=seed).to(dtype)
        return cls(filters, budget, **kwargs)

    def step(self, model: torch.nn.Module, cache: KVCache) -> None:
        if len(self.filters) != cache.n_layers:
            raise ValueError(f"filters hold {len(self.filters)} layers, the cache {cache.n_layers}")
        for layer in range(cache.n_layers):
            keys = cache.keys[layer]
            if keys is None or keys.shape[2] <= self.budget:
                continue
            f = self.filters[layer].to(device=keys.device, dtype=keys.dtype)
            cache.keep(layer, qfilter_select(keys, f, self.budget, self.n_recent, self.n_sink, self.backend))

    def __repr__(self) -> str:
        return f"QFilterPolicy(budget={self.budget}, n_recent={self.n_recent}, n_sink={self.n_sink})"
