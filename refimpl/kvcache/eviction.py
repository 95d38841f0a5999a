"""Eviction policies for the book's tiny language model, and the baselines of the KV-cache part.

A *policy* is a callable ``policy(model, cache)``: :meth:`refimpl.models.TinyLM.generate` (and
:func:`refimpl.models.corpus.evaluate`) call it after the prefill and after every decoding step, and it
shrinks the :class:`~refimpl.models.tiny_lm.KVCache` in place with ``cache.keep(layer, indices)``. With a
recording cache (``model.new_cache(record=True)``; ``evaluate`` makes one whenever a policy is given) it can
read the queries and attention weights of the call that just ran: ``cache.last_queries[l]``
``(B, H, L, d_head)`` and ``cache.last_attn[l]`` ``(B, H, L, T_l)``, ``L`` the prompt length after the prefill
and 1 after a decoding step.

Every method of the part reduces to a score per cached token and head, and one selection rule (eq. E1):

$$ \\mathcal K_{l,b,h} = \\underbrace{\\{j < n_\\text{sink}\\}}_{\\text{sinks}} \\cup
   \\underbrace{\\{j \\ge T - n_\\text{recent}\\}}_{\\text{recent window}} \\cup
   \\operatorname{top-}k_{\\,j\\ \\text{otherwise}}\\; s_{l,b,h,j},\\qquad
   k = \\text{budget} - n_\\text{sink} - n_\\text{recent}. $$

The baselines are its two simplest instances:

* :class:`SlidingWindow` — StreamingLLM (Xiao et al., 2024): ``n_sink`` attention sinks plus the most recent
  tokens, no scores (``n_sink=0`` gives a plain sliding window);
* :class:`H2O` — Heavy-Hitter Oracle (Zhang et al., 2023): the score of a token is the attention it has
  received so far, summed over every query that saw it (eq. E2, ``s_j ← s_j + Σ_i A_ij``), plus a recent
  window;
* :class:`FullCache` keeps everything (the reference every table starts from).

The cache is kept in position order (the selection returns sorted indices), so "the last ``n`` entries" are
the ``n`` most recent tokens.
"""
from __future__ import annotations

import torch

from refimpl._common.validate import check_int
from refimpl.models.tiny_lm import KVCache

__all__ = ["select_keep", "CachePolicy", "FullCache", "SlidingWindow", "H2O"]


def select_keep(scores: torch.Tensor, budget: int, n_recent: int = 0, n_sink: int = 0) -> torch.Tensor:
    """Indices of the cache entries to keep, eq. (E1).

    Args:
        scores: ``(B, H, T)`` floating scores of the cached tokens, in cache (= position) order; larger is
            more important. NaN is rejected.
        budget: number of entries to keep per row and head (``T' = min(budget, T)``).
        n_recent: the last ``n_recent`` entries are always kept.
        n_sink: the first ``n_sink`` entries are always kept.

    Returns:
        int64 ``(B, H, T')``, sorted increasingly per row and head (so the kept cache stays in position order).
        When ``T ≤ budget`` every entry is kept.
    """
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point():
        raise TypeError(f"scores must be a floating torch.Tensor, got {getattr(scores, 'dtype', type(scores).__name__)}")
    if scores.dim() != 3:
        raise ValueError(f"scores must have shape (B, H, T), got {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    check_int(budget, "budget", 1)
    check_int(n_recent, "n_recent", 0)
    check_int(n_sink, "n_sink", 0)
    if n_recent + n_sink > budget:
        raise ValueError(f"n_recent + n_sink must not exceed budget, got {n_recent} + {n_sink} > {budget}")
    b, h, t = scores.shape
    if t <= budget:
        return torch.arange(t, device=scores.device).expand(b, h, t).clone()
    s = scores.clone()
    s[..., :n_sink] = float("inf")
    if n_recent:
        s[..., t - n_recent:] = float("inf")
    return s.topk(budget, dim=-1).indices.sort(dim=-1).values


class CachePolicy:
    """Base class of stateful policies: ``policy(model, cache)``.

    A policy object is reused across prompts (``evaluate`` runs many batches): it calls :meth:`reset` the first
    time it sees a new cache object, then :meth:`step` on every call. ``self.prefill`` is true during the first
    call for a cache (right after the prompt was processed).
    """

    def __init__(self) -> None:
        self._cache: KVCache | None = None
        self.prefill = False

    def __call__(self, model: torch.nn.Module, cache: KVCache) -> None:
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache must be a KVCache, got {type(cache).__name__}")
        self.prefill = cache is not self._cache
        if self.prefill:
            self._cache = cache
            self.reset(cache)
        self.step(model, cache)

    def reset(self, cache: KVCache) -> None:
        """Forget the state kept for the previous cache."""

    def step(self, model: torch.nn.Module, cache: KVCache) -> None:
        raise NotImplementedError


class FullCache(CachePolicy):
    """Keep every token (no eviction)."""

    def step(self, model: torch.nn.Module, cache: KVCache) -> None:
        pass

    def __repr__(self) -> str:
        return "FullCache()"


class SlidingWindow(CachePolicy):
    """StreamingLLM: the first ``n_sink`` tokens and the most recent ``budget - n_sink`` (eq. E1 with no scores)."""

    def __init__(self, budget: int, n_sink: int = 4):
        super().__init__()
        self.budget = check_int(budget, "budget", 1)
        self.n_sink = check_int(n_sink, "n_sink", 0)
        if n_sink > budget:
            raise ValueError(f"n_sink must not exceed budget, got {n_sink} > {budget}")

    def step(self, model: torch.nn.Module, cache: KVCache) -> None:
        for layer in range(cache.n_layers):
            t = cache.length(layer)
            if t > self.budget:
                keep = torch.cat([torch.arange(self.n_sink), torch.arange(t - self.budget + self.n_sink, t)])
                cache.keep(layer, keep)

    def __repr__(self) -> str:
        return f"SlidingWindow(budget={self.budget}, n_sink={self.n_sink})"


class H2O(CachePolicy):
    """Heavy-Hitter Oracle: accumulated attention (eq. E2) plus a recent window, per layer, row and head.

    ``n_recent`` defaults to half the budget, as in the paper's experiments. Needs a recording cache.
    """

    def __init__(self, budget: int, n_recent: int | None = None):
        super().__init__()
        self.budget = check_int(budget, "budget", 1)
        self.n_recent = budget // 2 if n_recent is None else check_int(n_recent, "n_recent", 0)
        if self.n_recent > budget:
            raise ValueError(f"n_recent must not exceed budget, got {self.n_recent} > {budget}")
        self.scores: list[torch.Tensor | None] = []

    def reset(self, cache: KVCache) -> None:
        self.scores = [None] * cache.n_layers

    def step(self, model: torch.nn.Module, cache: KVCache) -> None:
        for layer in range(cache.n_layers):
            attn = cache.last_attn[layer]
            if attn is None:
                raise ValueError("H2O needs the attention weights: use a cache made with record=True")
            received = attn.sum(dim=2)  # (B, H, T_l): eq. (E2), summed over this call's queries
            old = self.scores[layer]
            if old is not None:  # the new tokens have received nothing before this call
                received[..., :old.shape[-1]] += old
            keep = select_keep(received, self.budget, n_recent=self.n_recent)
            if keep.shape[-1] < received.shape[-1]:
                cache.keep(layer, keep)
                received = received.gather(-1, keep)
            self.scores[layer] = received

    def __repr__(self) -> str:
        return f"H2O(budget={self.budget}, n_recent={self.n_recent})"
