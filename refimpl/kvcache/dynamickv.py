"""DynamicKV: task-aware adaptive KV cache compression (Zhou et al., 2024, arXiv:2412.14838).

During the prefill of a prompt of ``T`` tokens, every layer ``l`` scores the first ``N = T - w`` cached
tokens by the attention the last ``w`` queries (the *observation window*) pay them, as in SnapKV:

    (1) A_{l,i,j} = softmax_j( q_{l,T-w+i} · k_{l,j} / sqrt(d) ),  causal (key j ≤ query T-w+i)
    (2) a_{l,j}   = sum_{i<w} A_{l,i,j}                           (j < N)
    (3) s_{l,j}   = pool_k(a_l)_j      average (zero padding counted) or max pooling, kernel k, stride 1

and temporarily keeps the per-layer maximum budget, the top entries of ``s_l`` (score order) plus the window:

    (4) b_max = min(floor(r_max · base), N),   base = C - w     (C = ``max_capacity_prompt``)

Every ``m`` layers (``m = 4`` in the official code) a global top-k over the scores of ALL layers seen so far
(``n`` layers, every row and head) decides each layer's share of the total budget:

    (5) c_l  = |{winners of top-(base·H·n) over (l', b, h, j), l' < n, in layer l}|  //  n
    (6) f_l  = floor(b_max · c_l / Σ c),   then rescaled so that Σ_l f_l = base · L  (ALL L layers):
        f_l ← floor(f_l / ρ),  ρ = Σ f / (base · L),   the remainder goes to the last updated layer

and the caches of the ``n`` layers are re-pruned to ``min(f_l, N)`` entries plus the window (7). The
official re-pruning (7) truncates the score-ordered cache: ``cache_l ← cache_l[:f_l] ++ cache_l[-w:]``
(Python slicing, so an ``f_l`` larger than the current top-k part also takes window entries, which then
appear twice). Layers after the last multiple of ``m`` keep ``b_max`` entries.

The critical loop is the windowed scoring (1)-(3), the global top-k (5) and the gather, with backends
``"numpy"`` (readable reference), ``"numba"`` (one fused kernel per row and head) and ``"torch"``.

For the part's comparison, :class:`DynamicKVPolicy` applies eqs. (1)-(7) to the book's TinyLM after the
prefill; :class:`SnapKVPolicy` (uniform budgets) and :class:`PyramidKVPolicy` (linearly decreasing
budgets, PyramidKV) use the same scores (1)-(3) and differ only in the allocation
(:func:`uniform_budgets`, :func:`pyramid_budgets`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from refimpl._common.backend import like_input, resolve_backend, to_numpy, to_torch
from refimpl._common.kernels import FASTMATH as _FASTMATH, row_blocks
from refimpl._common.validate import check_floating, check_int
from refimpl.kvcache.eviction import CachePolicy
from refimpl.models.tiny_lm import KVCache

__all__ = ["window_scores", "global_topk_counts", "dynamickv_layer_budgets", "dynamickv_select",
           "DynamicKVSelection", "uniform_budgets", "pyramid_budgets", "topk_keep",
           "DynamicKVPolicy", "SnapKVPolicy", "PyramidKVPolicy", "POOLINGS"]

POOLINGS = ("avgpool", "maxpool")


# ----------------------------------------------------------------------------- validation
def _check_scoring(q: Any, k: Any, window: int, kernel_size: int, pooling: str) -> None:
    check_floating(q, "q")
    check_floating(k, "k")
    if q.ndim != 4 or k.ndim != 4:
        raise ValueError(f"q and k must have shape (B, H, L, d) and (B, H, T, d), got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}")
    if tuple(q.shape[:2]) != tuple(k.shape[:2]) or q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k must agree in B, H and d, got {tuple(q.shape)} and {tuple(k.shape)}")
    if type(q) is not type(k) or q.dtype != k.dtype:
        raise TypeError("q and k must be of the same array type and dtype")
    check_int(window, "window", 1)
    if q.shape[2] < window:
        raise ValueError(f"q must hold at least window={window} queries, got {q.shape[2]}")
    if k.shape[2] <= window:
        raise ValueError(f"k must hold more than window={window} keys, got {k.shape[2]}")
    check_int(kernel_size, "kernel_size", 1)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd (same-length pooling), got {kernel_size}")
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")


# ----------------------------------------------------------------------------- numpy reference
def _pool_numpy(a: np.ndarray, kernel_size: int, pooling: str) -> np.ndarray:
    p = kernel_size // 2
    fill = 0 if pooling == "avgpool" else -np.inf
    pad = np.pad(a, [(0, 0)] * (a.ndim - 1) + [(p, p)], constant_values=fill)
    win = np.lib.stride_tricks.sliding_window_view(pad, kernel_size, axis=-1)  # (..., N, k)
    if pooling == "avgpool":
        return (win.sum(-1) / a.dtype.type(kernel_size)).astype(a.dtype)   # (3), zeros counted
    return win.max(-1)                                                      # (3), padding ignored


def _scores_numpy(q: np.ndarray, k: np.ndarray, window: int, kernel_size: int, pooling: str) -> np.ndarray:
    T = q.dtype.type
    t = k.shape[2]
    n = t - window
    logits = (q[:, :, -window:, :] @ np.swapaxes(k, -1, -2)) * T(1.0 / math.sqrt(q.shape[-1]))  # (B,H,w,T)
    causal = np.arange(t)[None, :] <= (n + np.arange(window))[:, None]                          # (1)
    logits = np.where(causal, logits, -np.inf)
    e = np.exp(logits - logits.max(-1, keepdims=True))
    attn = e / e.sum(-1, keepdims=True)
    a = attn[..., :n].sum(-2)                                                                    # (2)
    return _pool_numpy(a.astype(q.dtype), kernel_size, pooling)                                 # (3)


# ----------------------------------------------------------------------------- numba kernel
@njit(cache=True, fastmath=_FASTMATH, error_model="numpy", inline="always")
def _score_row(qr, kr, window, scale, ks, is_avg, buf, acc, out):
    """Eqs. (1)-(3) for one row and head: qr (L, d), kr (T, d) -> out (N,)."""
    T = qr.dtype.type
    lq, d = qr.shape
    t = kr.shape[0]
    n = t - window
    for j in range(n):
        acc[j] = T(0)
    for i in range(window):
        qi = qr[lq - window + i]
        nv = n + i + 1
        mx = T(-np.inf)
        for j in range(nv):
            kj = kr[j]
            s = T(0)
            for c in range(d):
                s += qi[c] * kj[c]
            s = s * scale
            buf[j] = s
            if s > mx:
                mx = s
        tot = T(0)
        for j in range(nv):
            e = np.exp(buf[j] - mx)
            buf[j] = e
            tot += e
        inv = T(1) / tot
        for j in range(n):
            acc[j] += buf[j] * inv
    p = ks // 2
    for j in range(n):
        lo = max(j - p, 0)
        hi = min(j + p + 1, n)
        if is_avg:
            s = T(0)
            for u in range(lo, hi):
                s += acc[u]
            out[j] = s / T(ks)
        else:
            m = acc[lo]
            for u in range(lo + 1, hi):
                if acc[u] > m:
                    m = acc[u]
            out[j] = m


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy", parallel=True)
def _scores_numba_parallel(q, k, window, ks, is_avg, nblocks):
    """q (R, L, d), k (R, T, d) -> (R, N) pooled window scores, rows split over ``nblocks`` threads."""
    T = q.dtype.type
    r_all = q.shape[0]
    t = k.shape[1]
    n = t - window
    scale = T(1.0 / np.sqrt(q.shape[2]))
    out = np.empty((r_all, n), dtype=q.dtype)
    per = (r_all + nblocks - 1) // nblocks
    for blk in prange(nblocks):
        buf = np.empty(t, dtype=q.dtype)
        acc = np.empty(n, dtype=q.dtype)
        for r in range(blk * per, min(r_all, (blk + 1) * per)):
            _score_row(q[r], k[r], window, scale, ks, is_avg, buf, acc, out[r])
    return out


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy")
def _scores_numba_serial(q, k, window, ks, is_avg):
    """Same as :func:`_scores_numba_parallel` on one thread (small problems: no thread pool is woken)."""
    T = q.dtype.type
    r_all = q.shape[0]
    t = k.shape[1]
    n = t - window
    scale = T(1.0 / np.sqrt(q.shape[2]))
    out = np.empty((r_all, n), dtype=q.dtype)
    buf = np.empty(t, dtype=q.dtype)
    acc = np.empty(n, dtype=q.dtype)
    for r in range(r_all):
        _score_row(q[r], k[r], window, scale, ks, is_avg, buf, acc, out[r])
    return out


# ----------------------------------------------------------------------------- torch
def _scores_torch(q: torch.Tensor, k: torch.Tensor, window: int, kernel_size: int, pooling: str) -> torch.Tensor:
    t = k.shape[2]
    n = t - window
    logits = q[:, :, -window:, :] @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])               # (1)
    causal = torch.arange(t, device=q.device)[None, :] <= (n + torch.arange(window, device=q.device))[:, None]
    attn = torch.softmax(logits.masked_fill(~causal, float("-inf")), dim=-1)
    a = attn[..., :n].sum(-2)                                                                    # (2)
    b, h = a.shape[:2]
    a2 = a.reshape(b * h, 1, n)
    p = kernel_size // 2
    if pooling == "avgpool":                                                                     # (3)
        s = F.avg_pool1d(a2, kernel_size, stride=1, padding=p)
    else:
        s = F.max_pool1d(a2, kernel_size, stride=1, padding=p)
    return s.reshape(b, h, n)


def window_scores(q: Any, k: Any, window: int, kernel_size: int = 7, pooling: str = "avgpool",
                  backend: str = "auto") -> Any:
    """Pooled observation-window scores of the cached tokens, eqs. (1)-(3).

    Args:
        q: queries ``(B, H, L, d)`` after RoPE, ``L ≥ window``; the last ``window`` are the observation window
            (they are the last ``window`` tokens of the prompt).
        k: keys ``(B, H, T, d)`` after RoPE (the whole prompt), same dtype and array type as ``q``.
        window: the observation window ``w``; ``T > w``.
        kernel_size: odd pooling kernel (7 in the paper and the official scripts).
        pooling: ``"avgpool"`` (zero padding counted, as ``F.avg_pool1d``) or ``"maxpool"``.
        backend: ``"numpy"`` | ``"numba"`` | ``"torch"`` | ``"auto"``.

    Returns:
        ``(B, H, T - w)`` scores in the input dtype and array type; the window itself is not scored.
    """
    _check_scoring(q, k, window, kernel_size, pooling)
    be = resolve_backend(backend, q)
    if be == "torch":
        out = _scores_torch(to_torch(q), to_torch(k, like=to_torch(q)), window, kernel_size, pooling)
        return like_input(out, q)
    qn, kn = to_numpy(q), to_numpy(k)
    if be == "numpy":
        out = _scores_numpy(qn, kn, window, kernel_size, pooling)
    else:
        b, h, lq, d = qn.shape
        t = kn.shape[2]
        q3 = np.ascontiguousarray(qn).reshape(b * h, lq, d)
        k3 = np.ascontiguousarray(kn).reshape(b * h, t, d)
        nb = row_blocks(b * h, b * h * window * t * d)
        if nb > 1:
            out = _scores_numba_parallel(q3, k3, window, kernel_size, pooling == "avgpool", nb)
        else:
            out = _scores_numba_serial(q3, k3, window, kernel_size, pooling == "avgpool")
        out = out.reshape(b, h, t - window)
    return like_input(out, q)


# ----------------------------------------------------------------------------- global top-k (5)
@njit(cache=True)
def _counts_numba(flat, kk):
    """Winners per layer of the top-``kk`` of ``flat`` (n, M): everything above the kk-th largest value,
    then ties at the threshold taken in flattened order (what a sort-based top-k would do)."""
    n, m = flat.shape
    counts = np.zeros(n, dtype=np.int64)
    if kk >= n * m:
        counts[:] = m
        return counts
    thr = np.partition(flat.ravel().copy(), n * m - kk)[n * m - kk]
    above = 0
    for l in range(n):
        c = 0
        for j in range(m):
            if flat[l, j] > thr:
                c += 1
        counts[l] = c
        above += c
    need = kk - above
    for l in range(n):
        for j in range(m):
            if need > 0 and flat[l, j] == thr:
                counts[l] += 1
                need -= 1
    return counts


def global_topk_counts(scores: Any, k: int, backend: str = "auto") -> np.ndarray:
    """How many of the ``k`` largest entries of ``scores`` ``(n, ...)`` fall into each leading slice (eq. 5,
    before the division by ``n``). ``k`` larger than the number of entries selects everything (as the
    official ``try/except`` around ``torch.topk``). Returns int64 ``(n,)``."""
    check_floating(scores, "scores")
    check_int(k, "k", 0)
    if scores.ndim < 2:
        raise ValueError(f"scores must have shape (n_layers, ...), got {tuple(scores.shape)}")
    be = resolve_backend(backend, scores)
    n = scores.shape[0]
    if be == "torch":
        s = to_torch(scores)
        flat = s.reshape(-1)
        kk = min(k, flat.numel())
        idx = flat.topk(kk).indices // (flat.numel() // n)
        return torch.bincount(idx, minlength=n).cpu().numpy().astype(np.int64)
    s = np.ascontiguousarray(to_numpy(scores)).reshape(n, -1)
    if be == "numpy":
        order = np.argsort(-s.ravel(), kind="stable")[:k]
        return np.bincount(order // s.shape[1], minlength=n).astype(np.int64)
    return _counts_numba(s, int(k))


# ----------------------------------------------------------------------------- allocation (6)
def dynamickv_layer_budgets(raw_counts: Sequence[int], base: int, budget_size: int, n_layers: int,
                            n_heads: int, last_layer: bool, n_entries: int) -> list[int]:
    """Per-layer budgets of one update, eq. (6), with the official integer and float32 arithmetic.

    Args:
        raw_counts: winners of the global top-k per layer seen so far (``n`` entries), from
            :func:`global_topk_counts`.
        base: ``max_capacity_prompt - window``; budget_size: ``b_max`` of eq. (4); n_layers: all ``L`` layers.
        last_layer: the update happens at the model's last layer (then the official code tops up the last
            layer's count so that the counts sum to ``base · H``, unless they already sum to ``n_entries``).
        n_entries: ``B · H · N``, the entries of one layer's scores (the official ``dim1``).

    Returns:
        ``n`` integer budgets (before the cap at ``N``); they sum to ``base · L``.
    """
    n = len(raw_counts)
    counts = [int(c) // n for c in raw_counts]
    tk = base * n_heads * n
    if last_layer and sum(counts) != n_entries:   # the official condition, true except by coincidence
        counts[-1] += tk // n_layers - sum(counts)
    tot = np.float32(sum(counts))
    fix = [int(np.float32(budget_size) * (np.float32(c) / tot)) for c in counts]
    need = base * n_layers
    ratio = sum(fix) / need
    fix = [int(f // ratio) for f in fix]
    if sum(fix) != need:
        fix[-1] += need - sum(fix)
    return fix


@dataclass
class DynamicKVSelection:
    """Result of :func:`dynamickv_select`.

    ``kept[l]``: int64 ``(B, H, T'_l)`` indices into layer ``l``'s prompt cache (``0..T-1``), in the official
    (score, then window) order; ``budgets``: the budgets of each update (eq. 6, one list per update);
    ``budget_size``: ``b_max`` (eq. 4); ``scores[l]``: the pooled scores ``(B, H, N)`` (eq. 3); ``topk[l]``: the
    first-stage top-``b_max`` indices ``(B, H, b_max)`` in descending score order (eq. 4)."""

    kept: list[np.ndarray]
    budgets: list[list[int]] = field(default_factory=list)
    budget_size: int = 0
    scores: list[np.ndarray] = field(default_factory=list)
    topk: list[np.ndarray] = field(default_factory=list)

    @property
    def lengths(self) -> list[int]:
        """Kept entries per layer, window included."""
        return [int(x.shape[-1]) for x in self.kept]


def topk_keep(scores: np.ndarray, k: int, backend: str = "numpy") -> np.ndarray:
    """Indices of the ``k`` largest ``scores (B, H, N)`` per row and head in descending score order, int64
    ``(B, H, k)``. Ties (frequent with max pooling): ``"numpy"``/``"numba"`` take the lower index first,
    ``"torch"`` uses ``torch.topk`` and so reproduces the official order exactly."""
    if backend == "torch":
        return torch.from_numpy(np.ascontiguousarray(scores)).topk(k, dim=-1).indices.numpy().astype(np.int64)
    if backend == "numba":
        b, h, n = scores.shape
        return _topk_rows_numba(np.ascontiguousarray(scores).reshape(b * h, n), k).reshape(b, h, k)
    return np.argsort(-scores, axis=-1, kind="stable")[..., :k].astype(np.int64)


@njit(cache=True)
def _topk_rows_numba(s, k):
    """Per row of ``s (R, N)``: the ``k`` largest in descending order, ties lower index first (as a stable
    argsort), by a partition to the k-th value, one pass collecting the winners, and a sort of only k items."""
    r_all, n = s.shape
    out = np.empty((r_all, k), dtype=np.int64)
    if k == 0:
        return out
    for r in range(r_all):
        row = s[r]
        kth = -np.partition(-row, k - 1)[k - 1]
        above = 0
        for j in range(n):
            if row[j] > kth:
                above += 1
        ties = k - above
        sel = np.empty(k, dtype=np.int64)
        c = 0
        for j in range(n):
            v = row[j]
            if v > kth or (v == kth and ties > 0):
                if v == kth:
                    ties -= 1
                sel[c] = j
                c += 1
        order = np.argsort(-row[sel], kind="mergesort")
        for i in range(k):
            out[r, i] = sel[order[i]]
    return out


def dynamickv_select(scores: Sequence[Any], window: int, max_capacity_prompt: int, radio_max: float = 10,
                     m: int = 4, backend: str = "auto") -> DynamicKVSelection:
    """DynamicKV's prefill selection for all layers, eqs. (4)-(7), as the official driver runs it.

    Args:
        scores: per layer, pooled window scores ``(B, H, N)`` from :func:`window_scores` (``N = T - window``).
        window: observation window ``w`` (kept in every layer).
        max_capacity_prompt: ``C``; ``base = C - w`` tokens per layer and head on average (plus the window).
        radio_max: ``r_max`` of eq. (4) (the official name).
        m: update period; an update runs after layers ``m-1, 2m-1, ...`` (``m = 4`` in the official code).
        backend: of the top-k's (4), (5); ``"torch"`` (``"auto"`` for tensors) breaks ties exactly as the
            official code, the others take the lower index first.
    """
    if not isinstance(scores, (list, tuple)) or not scores:
        raise TypeError("scores must be a non-empty list of (B, H, N) arrays, one per layer")
    check_int(window, "window", 1)
    check_int(max_capacity_prompt, "max_capacity_prompt", window + 1)
    check_int(m, "m", 1)
    if not isinstance(radio_max, (int, float)) or isinstance(radio_max, bool) or radio_max <= 0:
        raise ValueError(f"radio_max must be a positive number, got {radio_max!r}")
    be = resolve_backend(backend, scores[0])
    s_np = [to_numpy(s) for s in scores]
    shape = s_np[0].shape
    if len(shape) != 3 or any(s.shape != shape for s in s_np):
        raise ValueError(f"every layer's scores must have the same shape (B, H, N), got {[s.shape for s in s_np]}")
    n_layers = len(s_np)
    b, h, n = shape
    base = max_capacity_prompt - window
    budget_size = min(int(radio_max * base), n)                                                 # (4)
    win = np.broadcast_to(np.arange(n, n + window, dtype=np.int64), (b, h, window))
    cur: list[np.ndarray] = []
    first: list[np.ndarray] = []
    budgets: list[list[int]] = []
    for l in range(n_layers):
        first.append(topk_keep(s_np[l], budget_size, be))                                        # (4)
        cur.append(np.concatenate([first[-1], win], axis=-1))
        if l % m == m - 1:
            stack = np.stack(s_np[:l + 1])
            raw = global_topk_counts(stack, base * h * (l + 1), backend=be)                # (5)
            fix = dynamickv_layer_budgets(raw, base, budget_size, n_layers, h, l == n_layers - 1,
                                          b * h * n)                                       # (6)
            budgets.append(fix)
            for j, f in enumerate(fix):                                                          # (7)
                f = min(f, n)
                cur[j] = np.concatenate([cur[j][..., :f], cur[j][..., -window:]], axis=-1)
    return DynamicKVSelection(kept=cur, budgets=budgets, budget_size=budget_size, scores=s_np, topk=first)


# ----------------------------------------------------------------------------- other allocations
def uniform_budgets(base: int, n_layers: int, n: int) -> list[int]:
    """SnapKV: every layer keeps ``min(base, N)`` scored tokens (plus the window)."""
    return [min(base, n)] * n_layers


def pyramid_budgets(base: int, n_layers: int, n: int, beta: int = 20) -> list[int]:
    """PyramidKV (Cai et al., 2024): budgets decrease linearly from the first layer to the last, averaging about
    ``base``; smallest ``base // beta`` (the official ``PyramidKVCluster`` arithmetic)."""
    lo = base // beta
    hi = 2 * base - lo
    if hi >= n:
        hi = n
        lo = 2 * base - hi
    steps = (hi - lo) // max(n_layers - 1, 1)
    return [max(0, min(hi - l * steps, n)) for l in range(n_layers)]


# ----------------------------------------------------------------------------- policies
class _WindowScoredPolicy(CachePolicy):
    """Prefill-time compression of a :class:`~refimpl.models.tiny_lm.KVCache` from the scores (1)-(3).

    ``budget``: tokens kept per layer and head on average, window included (the official
    ``max_capacity_prompt``). ``window`` defaults to ``min(8, budget // 2)``. Acts once, right after the
    prefill; decoding appends as usual (as in the official code). The prompt batch is compressed jointly:
    the allocation is shared by all rows (as the official code does for batch size > 1)."""

    name = "window-scored"

    def __init__(self, budget: int, window: int | None = None, kernel_size: int = 7, pooling: str = "avgpool"):
        super().__init__()
        self.budget = check_int(budget, "budget", 2)
        self.window = min(8, budget // 2) if window is None else check_int(window, "window", 1)
        if self.window >= self.budget:
            raise ValueError(f"window must be smaller than budget, got window={self.window}, budget={budget}")
        self.kernel_size = check_int(kernel_size, "kernel_size", 1)
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
        self.pooling = pooling
        self.last_lengths: list[int] = []

    def _scores(self, cache: KVCache) -> list[torch.Tensor] | None:
        if cache.last_queries[0] is None:
            raise ValueError(f"{type(self).__name__} needs the queries: use a cache made with record=True")
        t = cache.length(0)
        if t <= self.budget or any(cache.length(l) != t for l in range(cache.n_layers)):
            return None
        return [window_scores(cache.last_queries[l], cache.keys[l], self.window, self.kernel_size, self.pooling,
                              backend="torch") for l in range(cache.n_layers)]

    def _kept(self, scores: list[torch.Tensor]) -> list[np.ndarray]:
        raise NotImplementedError

    def step(self, model: torch.nn.Module, cache: KVCache) -> None:
        if not self.prefill:
            return
        scores = self._scores(cache)
        if scores is None:
            self.last_lengths = [cache.length(l) for l in range(cache.n_layers)]
            return
        for l, idx in enumerate(self._kept(scores)):
            cache.keep(l, torch.from_numpy(np.ascontiguousarray(idx)))
        self.last_lengths = [cache.length(l) for l in range(cache.n_layers)]


class DynamicKVPolicy(_WindowScoredPolicy):
    """DynamicKV (eqs. 1-7) as a cache policy: ``DynamicKVPolicy(budget)`` keeps ``budget`` tokens per layer
    and head on average (``max_capacity_prompt = budget``, window included; the official re-pruning (7) can
    make the layers' totals differ from ``L · budget`` by a few tokens). ``radio_max`` and ``m`` as in
    :func:`dynamickv_select`. After each prefill, ``last_selection`` holds the budgets and kept indices."""

    def __init__(self, budget: int, window: int | None = None, kernel_size: int = 7, pooling: str = "avgpool",
                 radio_max: float = 10, m: int = 4):
        super().__init__(budget, window, kernel_size, pooling)
        if not isinstance(radio_max, (int, float)) or isinstance(radio_max, bool) or radio_max <= 0:
            raise ValueError(f"radio_max must be a positive number, got {radio_max!r}")
        self.radio_max = radio_max
        self.m = check_int(m, "m", 1)
        self.last_selection: DynamicKVSelection | None = None

    def _kept(self, scores: list[torch.Tensor]) -> list[np.ndarray]:
        sel = dynamickv_select([s.detach().cpu().numpy() for s in scores], self.window, self.budget,
                               self.radio_max, self.m, backend="torch")
        self.last_selection = sel
        return sel.kept

    def __repr__(self) -> str:
        return (f"DynamicKVPolicy(budget={self.budget}, window={self.window}, kernel_size={self.kernel_size}, "
                f"pooling={self.pooling!r}, radio_max={self.radio_max}, m={self.m})")


class _AllocatedPolicy(_WindowScoredPolicy):
    allocation: Callable[..., list[int]]

    def budgets(self, n_layers: int, n: int) -> list[int]:
        raise NotImplementedError

    def _kept(self, scores: list[torch.Tensor]) -> list[np.ndarray]:
        b, h, n = scores[0].shape
        win = np.broadcast_to(np.arange(n, n + self.window, dtype=np.int64), (b, h, self.window))
        out = []
        for s, f in zip(scores, self.budgets(len(scores), n)):
            top = np.sort(topk_keep(s.detach().cpu().numpy(), f), axis=-1)
            out.append(np.concatenate([top, win], axis=-1))
        return out


class SnapKVPolicy(_AllocatedPolicy):
    """Uniform allocation (SnapKV-style): every layer keeps the top ``budget - window`` scores plus the window."""

    def budgets(self, n_layers: int, n: int) -> list[int]:
        return uniform_budgets(self.budget - self.window, n_layers, n)

    def __repr__(self) -> str:
        return f"SnapKVPolicy(budget={self.budget}, window={self.window}, pooling={self.pooling!r})"


class PyramidKVPolicy(_AllocatedPolicy):
    """Pyramid allocation (PyramidKV): budgets decrease linearly with depth (:func:`pyramid_budgets`)."""

    def __init__(self, budget: int, window: int | None = None, kernel_size: int = 7, pooling: str = "avgpool",
                 beta: int = 20):
        super().__init__(budget, window, kernel_size, pooling)
        self.beta = check_int(beta, "beta", 1)

    def budgets(self, n_layers: int, n: int) -> list[int]:
        return pyramid_budgets(self.budget - self.window, n_layers, n, self.beta)

    def __repr__(self) -> str:
        return f"PyramidKVPolicy(budget={self.budget}, window={self.window}, beta={self.beta})"
