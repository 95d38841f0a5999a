"""SCOPE: separate KV-cache budgets for the prefill and the decoding phase (Wu, Wang, Zhang, Lai, He & Zhou,
ACL 2025, arXiv:2412.13649; official code: Linking-ai/SCOPE, ``model/kv_utils.py``).

Notation, per layer, row and head: the cache holds ``T`` entries in position order; the first ``P`` are the
*prefill part* (the prompt, kept whole or compressed once after the prefill), the rest the *decoding part*
(tokens generated so far); ``r`` recent entries are always kept; ``W`` is the decoding budget.

    (1) a_{t,j}   = softmax_j( q_t . k_j / sqrt(d_head) ),   j = 0 .. T-1
                    the attention of the current query over the cache, the new token included; SCOPE scores the
                    decoding part with the *current step's* attention only (no accumulation over steps).
    (2) prefill:  P = L (ALLKV), or the prompt compressed once to a capacity C with a window w of recent tokens:
                  K_pre = top_{C-w}{ s_j : j < L-w } U { L-w .. L-1 },  P = C  (only when L >= C)
    (3) prefill scores:  H2O     s_j = sum_i a_{i,j}   (over every prompt query i)
                         SnapKV  s_j = pool_k( sum_{i >= L-w} a_{i,j} )   (max or average pooling, width k)
    (4) decoding selection, applied when T >= P + W_t:
                  K_t = {0 .. P-1}  U  top_{W_t - r}{ a_{t,j} : P <= j < T-r }  U  {T-r .. T-1}
                  so the cache holds P + W_t entries afterwards.
    (5) schedules: 'slide'     W_t = W
                   'adaptive'  W_t = r + floor(t / delta),  t = decoding step (0-based); the official run scripts set
                               delta = floor((n_out - r) / (W - r)) so that W_t reaches about W at the last step
    (6) 'discontinuous': W_t as 'adaptive', but a re-selection (4) happens only after delta * n_layers layer-calls
                         without one (the cache grows by about delta tokens in between), then once in each of the
                         next n_layers layer-calls: about n_out / (delta + 1) re-selections per layer
    (7) 'unified' (the paper's baseline, the official 'h2o' metric): one budget P + W over the whole cache:
                  K_t = top_{P + W - r}{ a_{t,j} : j < T-r }  U  {T-r .. T-1}

(The chapter notebooks/kvcache/scope_kv_decoding.ipynb numbers its equations the same way.) The official counters
of (5) and (6) are class attributes incremented once per layer call; with one call per layer and step,
``counter // (delta * n_layers) = t // delta`` for every layer, which is (5).

The critical loop is the per-step top-k of (4) over the decoding part of every row and head,
:func:`heavy_hitter_topk`, with three interchangeable backends: ``"numpy"`` (a stable arg-sort, the readable
reference), ``"numba"`` (a radix selection for float32, a partition for float64: O(T) per row) and ``"torch"``
(``torch.topk`` plus an exact tie rule). All three return the same indices: among equal scores the lower index wins.

:class:`SCOPEPolicy` runs the whole method on :class:`refimpl.models.tiny_lm.KVCache`.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from refimpl._common.backend import like_input, resolve_backend, to_numpy
from refimpl._common.kernels import FASTMATH as _FASTMATH
from refimpl._common.kernels import PARALLEL_MIN
from refimpl._common.validate import check_int
from refimpl.kvcache.eviction import CachePolicy
from refimpl.models.tiny_lm import KVCache

__all__ = ["heavy_hitter_topk", "current_step_attention", "h2o_prefill_scores", "snapkv_prefill_scores",
           "prefill_keep", "decoding_keep", "adaptive_delta", "DecodingSchedule", "SCOPEPolicy",
           "PREFILL_METHODS", "DECODING_METRICS"]

PREFILL_METHODS = ("all", "h2o", "snapkv")
DECODING_METRICS = ("none", "slide", "adaptive", "discontinuous", "unified")


# ---------------------------------------------------------------------------------------------- validation
def _check_scores(scores: Any) -> None:
    if isinstance(scores, torch.Tensor):
        if not scores.is_floating_point():
            raise TypeError(f"scores must be floating point, got {scores.dtype}")
        bad = bool(torch.isnan(scores).any())
    elif isinstance(scores, np.ndarray):
        if scores.dtype.kind != "f":
            raise TypeError(f"scores must be floating point, got {scores.dtype}")
        bad = bool(np.isnan(scores).any())
    else:
        raise TypeError(f"scores must be a numpy array or a torch tensor, got {type(scores).__name__}")
    if scores.ndim != 3:
        raise ValueError(f"scores must have shape (B, H, T), got {tuple(scores.shape)}")
    if bad:
        raise ValueError("scores contain NaN")


# ----------------------------------------------------------------------------- critical loop: eq. (4) top-k
def _topk_numpy(s: np.ndarray, start: int, stop: int, k: int) -> np.ndarray:
    """Reference: a stable arg-sort of the negated scores (ties: lower index first), the first k, sorted."""
    order = np.argsort(-s[..., start:stop], axis=-1, kind="stable")[..., :k]
    return np.sort(order, axis=-1).astype(np.int64) + start


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _collect_row(seg, thr, need, out_row, offset):
    """Write, in position order, the indices of the scores above ``thr`` and of the first ``need`` equal to it."""
    c = 0
    for j in range(seg.shape[0]):
        v = seg[j]
        if v > thr:
            out_row[c] = offset + j
            c += 1
        elif v == thr and need > 0:
            out_row[c] = offset + j
            c += 1
            need -= 1


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _topk_row(seg, k, out_row, offset):
    n = seg.shape[0]
    buf = seg.copy()
    part = np.partition(buf, n - k)  # part[n-k:] holds the k largest scores, part[n-k] the smallest of them
    thr = part[n - k]
    n_gt = 0
    for j in range(n - k + 1, n):
        if part[j] > thr:
            n_gt += 1
    need = k - n_gt  # how many entries equal to the threshold are kept: the first ones
    _collect_row(seg, thr, need, out_row, offset)


_RADIX_BITS = 11  # float32 rows: a histogram of the top 11 bits of the order-preserving key (2048 bins)


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _topk_row_radix(seg, k, out_row, offset, hist, cand):
    """float32 rows: radix select. Map each score to an unsigned key with the same order (flip all bits of a
    negative float, the sign bit of a positive one), histogram the top bits, find the bin holding the k-th largest,
    then partition only that bin's candidates. Three linear passes, no copy of the row."""
    n = seg.shape[0]
    bits = seg.view(np.uint32)
    shift = np.uint32(32 - _RADIX_BITS)
    sign = np.uint32(0x80000000)
    hist[:] = 0
    for j in range(n):
        u = bits[j]
        key = ~u if u & sign else u | sign
        hist[key >> shift] += 1
    above = 0
    b = hist.shape[0] - 1
    while above + hist[b] < k:  # the bin of the k-th largest: more than k - above keys at or above it
        above += hist[b]
        b -= 1
    m = 0
    for j in range(n):
        u = bits[j]
        key = ~u if u & sign else u | sign
        if (key >> shift) == b:
            cand[m] = seg[j]
            m += 1
    need_in_bin = k - above
    thr = np.partition(cand[:m], m - need_in_bin)[m - need_in_bin]
    n_gt = above
    for i in range(m):
        if cand[i] > thr:
            n_gt += 1
    need = k - n_gt
    _collect_row(seg, thr, need, out_row, offset)


@njit(cache=True, fastmath=_FASTMATH)
def _topk_numba_serial(s, start, stop, k, out, radix):
    if radix:
        hist = np.empty(1 << _RADIX_BITS, np.int64)
        cand = np.empty(stop - start, s.dtype)
        for r in range(s.shape[0]):
            _topk_row_radix(s[r, start:stop], k, out[r], start, hist, cand)
    else:
        for r in range(s.shape[0]):
            _topk_row(s[r, start:stop], k, out[r], start)


@njit(cache=True, fastmath=_FASTMATH, parallel=True)
def _topk_numba_parallel(s, start, stop, k, out, radix):
    for r in prange(s.shape[0]):
        if radix:
            _topk_row_radix(s[r, start:stop], k, out[r], start, np.empty(1 << _RADIX_BITS, np.int64),
                            np.empty(stop - start, s.dtype))
        else:
            _topk_row(s[r, start:stop], k, out[r], start)


def _topk_numba(s: np.ndarray, start: int, stop: int, k: int) -> np.ndarray:
    b, h, t = s.shape
    s2 = np.ascontiguousarray(s.reshape(b * h, t))
    out = np.empty((b * h, k), np.int64)
    if k:
        kern = _topk_numba_parallel if s2.size >= PARALLEL_MIN and b * h > 1 else _topk_numba_serial
        kern(s2, start, stop, k, out, s2.dtype == np.float32)
    return out.reshape(b, h, k)


def _topk_torch(s: torch.Tensor, start: int, stop: int, k: int) -> torch.Tensor:
    seg = s[..., start:stop]
    if k == 0:
        return torch.empty(*s.shape[:2], 0, dtype=torch.int64, device=s.device)
    thr = seg.topk(k, dim=-1, sorted=False).values.amin(dim=-1, keepdim=True)  # the k-th largest
    gt = seg > thr
    eq = seg == thr
    need = k - gt.sum(dim=-1, keepdim=True)
    keep = gt | (eq & (eq.cumsum(dim=-1) <= need))  # exactly k per row; ties: lower index first
    idx = keep.nonzero()[:, -1]  # row-major: increasing index within each row
    return idx.view(*s.shape[:2], k) + start


def heavy_hitter_topk(scores: Any, start: int, stop: int, k: int, backend: str = "auto") -> Any:
    """The ``k`` highest-scoring cache entries in ``[start, stop)`` of every row and head (eq. 4).

    Args:
        scores: ``(B, H, T)`` float scores (NumPy array or tensor), e.g. the current step's attention (eq. 1).
            NaN is rejected.
        start, stop: the candidate range ``start <= j < stop`` (for SCOPE: ``P`` and ``T - r``).
        k: how many to keep, ``0 <= k <= stop - start``.
        backend: ``"numpy"`` | ``"numba"`` | ``"torch"`` | ``"auto"`` (torch for tensors, numba for arrays).

    Returns:
        int64 ``(B, H, k)`` indices into the cache (not into the range), increasing along the last axis; the same
        type (and device) as ``scores``. Among equal scores the lower index is kept, on every backend.
    """
    _check_scores(scores)
    t = scores.shape[-1]
    start = check_int(start, "start", 0)
    stop = check_int(stop, "stop", start)
    if stop > t:
        raise ValueError(f"stop must be <= T={t}, got {stop}")
    k = check_int(k, "k", 0)
    if k > stop - start:
        raise ValueError(f"k must be <= stop - start = {stop - start}, got {k}")
    backend = resolve_backend(backend, scores)
    if backend == "torch":
        s = scores if isinstance(scores, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(scores))
        return like_input(_topk_torch(s, start, stop, k), scores)
    s = to_numpy(scores)
    out = _topk_numpy(s, start, stop, k) if backend == "numpy" else _topk_numba(s, start, stop, k)
    return like_input(out, scores)


# ------------------------------------------------------------------------------------------- scores (1)-(3)
def _check_qk(q: torch.Tensor, k: torch.Tensor, name_q: str = "q") -> None:
    for name, x in ((name_q, q), ("keys", k)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor, got {getattr(x, 'dtype', type(x).__name__)}")
        if x.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, ., d_head), got {tuple(x.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{name_q} {tuple(q.shape)} and keys {tuple(k.shape)} disagree in (B, H, d_head)")


def _softmax_dtype(x: torch.Tensor) -> torch.dtype:
    """float32 for half-precision inputs (as the official code), the input dtype otherwise."""
    return torch.float32 if x.dtype in (torch.float16, torch.bfloat16) else x.dtype


def _upper_mask(n: int, like: torch.Tensor) -> torch.Tensor:
    """``(n, n)``: the dtype's lowest value above the diagonal (a query must not see later keys), 0 elsewhere."""
    m = torch.zeros(n, n, dtype=like.dtype, device=like.device)
    return m.masked_fill(torch.ones(n, n, dtype=torch.bool, device=like.device).triu(1), torch.finfo(like.dtype).min)


def current_step_attention(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Eq. (1): ``softmax(q keys^T / sqrt(d_head))`` of the newest query over the whole cache.

    Args:
        q: ``(B, H, 1, d)`` or ``(B, H, d)`` query of the current step (after RoPE).
        keys: ``(B, H, T, d)`` cached keys, the current token included.

    Returns:
        ``(B, H, T)`` attention weights, computed in float32 for half-precision inputs (the official code always
        uses float32; identical for float32 inputs) and returned in the input dtype.
    """
    if isinstance(q, torch.Tensor) and q.dim() == 3:
        q = q[:, :, None, :]
    _check_qk(q, keys)
    if q.shape[2] != 1:
        raise ValueError(f"q must hold one query per row and head, got {tuple(q.shape)}")
    logits = torch.matmul(q, keys.transpose(2, 3)) / math.sqrt(q.shape[-1])
    return F.softmax(logits, dim=-1, dtype=_softmax_dtype(q)).to(q.dtype)[:, :, 0, :]


def h2o_prefill_scores(q: torch.Tensor, keys: torch.Tensor, window: int, causal: bool = True) -> torch.Tensor:
    """Eq. (3), H2O: attention received by every prompt token outside the last ``window``, summed over all queries.

    Args:
        q, keys: ``(B, H, L, d)`` prompt queries and keys (after RoPE).
        window: the last ``window`` tokens are kept anyway and are not scored.
        causal: ``True`` masks future keys for every query (H2O as published). ``False`` reproduces the official
            ``H2OKVCluster.update_kv``, which masks only the last ``window x window`` block, so the first
            ``L - window`` queries also attend to later tokens.

    Returns:
        ``(B, H, L - window)`` scores.
    """
    _check_qk(q, keys)
    l = keys.shape[2]
    if q.shape[2] != l:
        raise ValueError(f"q and keys must both hold the L={l} prompt tokens, got {q.shape[2]} queries")
    window = check_int(window, "window", 1)
    if window >= l:
        raise ValueError(f"window must be < L={l}, got {window}")
    logits = torch.matmul(q, keys.transpose(2, 3)) / math.sqrt(q.shape[-1])
    if causal:
        logits = logits + _upper_mask(l, logits)
    else:
        logits[:, :, -window:, -window:] += _upper_mask(window, logits)
    a = F.softmax(logits, dim=-1, dtype=_softmax_dtype(q)).to(q.dtype)
    return a[:, :, :, : l - window].sum(dim=-2)


def snapkv_prefill_scores(q: torch.Tensor, keys: torch.Tensor, window: int, kernel_size: int = 7,
                          pooling: str = "maxpool") -> torch.Tensor:
    """Eq. (3), SnapKV: attention from the last ``window`` prompt queries, summed, then pooled over neighbouring tokens.

    Args:
        q, keys: ``(B, H, L, d)`` prompt queries and keys (only the last ``window`` queries are used).
        window: the observation window (kept anyway, not scored).
        kernel_size: odd pooling width; pooling uses padding ``kernel_size // 2`` and stride 1.
        pooling: ``"maxpool"`` or ``"avgpool"`` (average over the window, zero padding counted).

    Returns:
        ``(B, H, L - window)`` scores.
    """
    _check_qk(q, keys)
    l = keys.shape[2]
    window = check_int(window, "window", 1)
    if window >= l or q.shape[2] < window:
        raise ValueError(f"window must be < L={l} and <= the number of queries {q.shape[2]}, got {window}")
    kernel_size = check_int(kernel_size, "kernel_size", 1)
    if kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be odd, got {kernel_size}")
    if pooling not in ("maxpool", "avgpool"):
        raise ValueError(f"pooling must be 'maxpool' or 'avgpool', got {pooling!r}")
    logits = torch.matmul(q[:, :, -window:, :], keys.transpose(2, 3)) / math.sqrt(q.shape[-1])
    logits[:, :, :, -window:] += _upper_mask(window, logits)
    a = F.softmax(logits, dim=-1, dtype=_softmax_dtype(q)).to(q.dtype)
    s = a[:, :, :, : l - window].sum(dim=-2)
    pool = F.max_pool1d if pooling == "maxpool" else F.avg_pool1d
    b, h, n = s.shape
    return pool(s.reshape(b * h, 1, n), kernel_size=kernel_size, padding=kernel_size // 2, stride=1).reshape(b, h, n)


def prefill_keep(scores: torch.Tensor, prompt_len: int, capacity: int, window: int) -> torch.Tensor:
    """Eq. (2): indices kept after the prefill: the top ``capacity - window`` scored tokens plus the last ``window``.

    Args:
        scores: ``(B, H, L - window)`` from :func:`h2o_prefill_scores` or :func:`snapkv_prefill_scores`.
        prompt_len: ``L``. When ``L < capacity`` everything is kept (as the official code does).
        capacity, window: ``C`` and ``w`` with ``0 < w < C``.

    Returns:
        int64 ``(B, H, min(L, C))`` sorted indices into the prompt.

    The selection is ``torch.topk``, as in the official code, so that ties (frequent after max pooling, whose
    plateaus repeat a value up to ``kernel_size`` times) are broken the same way as there; which of several equal
    scores ``torch.topk`` keeps is not specified by torch.
    """
    if not isinstance(scores, torch.Tensor) or not scores.is_floating_point() or scores.dim() != 3:
        raise TypeError(f"scores must be a floating (B, H, L - window) torch.Tensor, got "
                        f"{getattr(scores, 'shape', type(scores).__name__)}")
    check_int(prompt_len, "prompt_len", 1)
    capacity = check_int(capacity, "capacity", 2)
    window = check_int(window, "window", 1)
    if window >= capacity:
        raise ValueError(f"window must be < capacity={capacity}, got {window}")
    b, h = scores.shape[:2]
    if prompt_len < capacity:
        return torch.arange(prompt_len, device=scores.device).expand(b, h, prompt_len).clone()
    if scores.shape[-1] != prompt_len - window:
        raise ValueError(f"scores must have L - window = {prompt_len - window} entries, got {scores.shape[-1]}")
    top = scores.topk(capacity - window, dim=-1).indices.sort(dim=-1).values
    recent = torch.arange(prompt_len - window, prompt_len, device=scores.device).expand(b, h, window)
    return torch.cat([top, recent], dim=-1)


def decoding_keep(scores: Any, n_prefill: int, n_recent: int, k: int, unified: bool = False,
                  backend: str = "auto") -> Any:
    """Eq. (4) (or eq. 7 with ``unified``): the sorted cache indices kept after a decoding step.

    Args:
        scores: ``(B, H, T)`` current-step attention (eq. 1) over the cache.
        n_prefill: ``P``, the length of the prefill part (kept whole unless ``unified``).
        n_recent: ``r``, the last ``r`` entries are kept.
        k: heavy hitters to keep: ``W_t - r`` among ``[P, T - r)``, or ``P + W - r`` among ``[0, T - r)`` when
            ``unified``.

    Returns:
        int64 ``(B, H, P + k + r)`` (``(B, H, k + r)`` when ``unified``), same type as ``scores``.
    """
    _check_scores(scores)
    b, h, t = scores.shape
    n_prefill = check_int(n_prefill, "n_prefill", 0)
    n_recent = check_int(n_recent, "n_recent", 0)
    if n_prefill + n_recent > t:
        raise ValueError(f"n_prefill + n_recent must be <= T={t}, got {n_prefill} + {n_recent}")
    start = 0 if unified else n_prefill
    top = heavy_hitter_topk(scores, start, t - n_recent, k, backend=backend)
    if isinstance(scores, torch.Tensor):
        top = top.to(scores.device)
        ar = torch.arange(t, device=scores.device)
        parts = [] if unified else [ar[:n_prefill].expand(b, h, n_prefill)]
        return torch.cat(parts + [top, ar[t - n_recent:].expand(b, h, n_recent)], dim=-1)
    parts = [] if unified else [np.broadcast_to(np.arange(n_prefill), (b, h, n_prefill))]
    parts += [top, np.broadcast_to(np.arange(t - n_recent, t), (b, h, n_recent))]
    return np.concatenate(parts, axis=-1).astype(np.int64)


def adaptive_delta(max_new_tokens: int, decoding_budget: int, n_recent: int) -> int:
    """The official run scripts' ``delta = (n_out - r) // (W - r)`` (eq. 5), at least 1."""
    max_new_tokens = check_int(max_new_tokens, "max_new_tokens", 1)
    if decoding_budget <= n_recent:
        raise ValueError(f"decoding_budget must exceed n_recent, got {decoding_budget} <= {n_recent}")
    return max(1, (max_new_tokens - n_recent) // (decoding_budget - n_recent))


# ------------------------------------------------------------------------------------------ schedules (5)-(7)
class DecodingSchedule:
    """The budget schedule of eqs. (5)-(7), stepped once per layer call in layer order, as the official counters.

    ``__call__(n_cached, n_prefill)`` → ``None`` (keep everything this call) or the number ``k`` of heavy hitters
    to select (eq. 4; for ``"unified"``, eq. 7 over the whole cache). ``reset()`` starts a new generation.
    Attributes ``n_selections`` (re-selections since the reset) and ``window`` (``W_t`` of the last call).
    """

    def __init__(self, metric: str, n_layers: int, decoding_budget: int, n_recent: int, delta: int | None = None):
        if metric not in DECODING_METRICS:
            raise ValueError(f"metric must be one of {DECODING_METRICS}, got {metric!r}")
        self.metric = metric
        self.n_layers = check_int(n_layers, "n_layers", 1)
        self.decoding_budget = check_int(decoding_budget, "decoding_budget", 1)
        self.n_recent = check_int(n_recent, "n_recent", 0)
        if self.n_recent >= self.decoding_budget:
            raise ValueError(f"n_recent must be < decoding_budget={decoding_budget}, got {n_recent}")
        if metric in ("adaptive", "discontinuous"):
            if delta is None:
                raise ValueError(f"metric {metric!r} needs delta (see adaptive_delta)")
            delta = check_int(delta, "delta", 1)
        self.delta = delta
        self.reset()

    def reset(self) -> None:
        self.counter = 0  # layer calls so far (official current_decoding_step)
        self.jump_step = 0  # layer calls skipped since the last re-selection round (official jump_step)
        self.jump_layer = 0  # layer calls of the current re-selection round (official jump_layer)
        self.n_selections = 0
        self.window = self.decoding_budget if self.metric in ("slide", "unified") else self.n_recent

    def __call__(self, n_cached: int, n_prefill: int) -> int | None:
        m, r = self.metric, self.n_recent
        if m == "none":
            return None
        if m in ("slide", "unified"):
            w = self.decoding_budget
        else:  # eq. (5): W_t = r + counter // (delta L) = r + t // delta
            w = r + self.counter // (self.delta * self.n_layers)
            self.counter += 1
        self.window = w
        if n_cached < n_prefill + w:
            return None
        if m == "discontinuous":
            if self.jump_step < self.delta * self.n_layers:
                self.jump_step += 1
                return None
            self.jump_layer += 1
            if self.jump_layer == self.n_layers:
                self.jump_step = self.jump_layer = 0
        self.n_selections += 1
        return n_prefill + w - r if m == "unified" else w - r


# ------------------------------------------------------------------------------------------------- the policy
class SCOPEPolicy(CachePolicy):
    """SCOPE on the book's :class:`~refimpl.models.tiny_lm.KVCache` (a :class:`CachePolicy`).

    Budgets, in tokens per layer, row and head:

    * ``prefill="all"`` (the paper's main setting, ALLKV): the prompt is kept whole, ``P = L``; give
      ``decoding_budget`` ``W``; ``budget`` must be ``None``. Memory after a step: ``L + W_t``.
    * ``prefill="h2o"`` or ``"snapkv"`` (SCOPE as a plug-in): ``budget`` is the total ``P + W``; the decoding
      budget defaults to ``W = max(2, budget // 4)`` and the prefill capacity is ``P = budget - W``
      (compressed once by eq. 2 with a score of eq. 3, window ``min(prefill_window, P // 2)``).

    ``n_recent`` defaults to ``W // 2`` (the paper's 256 of 512). ``decoding`` picks eqs. (5)-(7);
    ``"adaptive"`` and ``"discontinuous"`` need ``delta`` or ``max_new_tokens`` (then ``delta`` =
    :func:`adaptive_delta`). ``h2o_causal=False`` reproduces the official H2O prefill mask (see
    :func:`h2o_prefill_scores`).

    The policy uses the recorded attention of each call (``cache.last_attn``), or recomputes eq. (1) from
    ``cache.last_queries`` and the keys when no attention was recorded. Statistics since :meth:`reset_stats`:
    ``n_selections`` (layer-level re-selections), ``n_decode_steps``, ``token_steps`` (sum over decoding steps of
    the cached tokens per layer and head, averaged over layers) and ``peak_tokens``.
    """

    def __init__(self, budget: int | None = None, *, decoding_budget: int | None = None,
                 n_recent: int | None = None, prefill: str = "h2o", decoding: str = "slide",
                 delta: int | None = None, max_new_tokens: int | None = None, prefill_window: int = 8,
                 kernel_size: int = 7, pooling: str = "maxpool", h2o_causal: bool = True, backend: str = "auto"):
        super().__init__()
        if prefill not in PREFILL_METHODS:
            raise ValueError(f"prefill must be one of {PREFILL_METHODS}, got {prefill!r}")
        if decoding not in DECODING_METRICS:
            raise ValueError(f"decoding must be one of {DECODING_METRICS}, got {decoding!r}")
        if prefill == "all":
            if budget is not None:
                raise ValueError("with prefill='all' the prompt is kept whole: give decoding_budget, not budget")
            if decoding_budget is None:
                raise ValueError("prefill='all' needs decoding_budget")
            w = check_int(decoding_budget, "decoding_budget", 2)
            self.capacity = None
        else:
            budget = check_int(budget, "budget", 4)
            w = max(2, budget // 4) if decoding_budget is None else check_int(decoding_budget, "decoding_budget", 2)
            if budget - w < 2:
                raise ValueError(f"decoding_budget must leave a prefill capacity >= 2, got {w} of {budget}")
            self.capacity = budget - w
        self.budget, self.prefill_method, self.decoding = budget, prefill, decoding
        self.decoding_budget = w
        self.n_recent = w // 2 if n_recent is None else check_int(n_recent, "n_recent", 0)
        if self.n_recent >= w:
            raise ValueError(f"n_recent must be < decoding_budget={w}, got {self.n_recent}")
        if decoding in ("adaptive", "discontinuous") and delta is None:
            if max_new_tokens is None:
                raise ValueError(f"decoding={decoding!r} needs delta or max_new_tokens")
            delta = adaptive_delta(max_new_tokens, w, self.n_recent)
        self.delta = None if delta is None else check_int(delta, "delta", 1)
        self.prefill_window = check_int(prefill_window, "prefill_window", 1)
        if self.capacity is not None:
            self.prefill_window = min(self.prefill_window, max(1, self.capacity // 2))
        self.kernel_size = check_int(kernel_size, "kernel_size", 1)
        if pooling not in ("maxpool", "avgpool"):
            raise ValueError(f"pooling must be 'maxpool' or 'avgpool', got {pooling!r}")
        self.pooling, self.h2o_causal = pooling, bool(h2o_causal)
        resolve_backend(backend, None)
        self.backend = backend
        self.schedule: DecodingSchedule | None = None
        self.n_prefill: list[int] = []
        self.reset_stats()

    def reset_stats(self) -> None:
        self.n_selections = 0
        self.n_decode_steps = 0
        self.token_steps = 0.0
        self.peak_tokens = 0

    def reset(self, cache: KVCache) -> None:
        self.schedule = DecodingSchedule(self.decoding, cache.n_layers, self.decoding_budget, self.n_recent,
                                         self.delta)
        self.n_prefill = [0] * cache.n_layers

    def _scores(self, cache: KVCache, layer: int) -> torch.Tensor:
        attn = cache.last_attn[layer]
        if attn is not None and attn.shape[-1] == cache.length(layer):
            return attn[:, :, -1, :]
        q = cache.last_queries[layer]
        if q is None:
            raise ValueError("SCOPEPolicy needs the attention or the queries: use a cache made with record=True")
        return current_step_attention(q[:, :, -1:, :], cache.keys[layer])

    def _prefill(self, cache: KVCache, layer: int) -> None:
        l = cache.length(layer)
        if self.prefill_method == "all" or l < self.capacity:
            self.n_prefill[layer] = l
            return
        q, k = cache.last_queries[layer], cache.keys[layer]
        if q is None or q.shape[2] != l:
            raise ValueError("the prefill compression needs the prompt queries: use a cache made with record=True")
        w = self.prefill_window
        if self.prefill_method == "h2o":
            s = h2o_prefill_scores(q, k, w, causal=self.h2o_causal)
        else:
            s = snapkv_prefill_scores(q, k, w, self.kernel_size, self.pooling)
        keep = prefill_keep(s, l, self.capacity, w)
        cache.keep(layer, keep)
        self.n_prefill[layer] = self.capacity

    def step(self, model: torch.nn.Module, cache: KVCache) -> None:
        if self.prefill:
            for layer in range(cache.n_layers):
                self._prefill(cache, layer)
            return
        for layer in range(cache.n_layers):
            t = cache.length(layer)
            k = self.schedule(t, self.n_prefill[layer])
            if k is None:
                continue
            scores = self._scores(cache, layer)
            keep = decoding_keep(scores, self.n_prefill[layer], self.n_recent, k,
                                 unified=self.decoding == "unified", backend=self.backend)
            cache.keep(layer, keep)
            self.n_selections += 1
        lengths = [cache.length(layer) for layer in range(cache.n_layers)]
        self.n_decode_steps += 1
        self.token_steps += sum(lengths) / len(lengths)
        self.peak_tokens = max(self.peak_tokens, max(lengths))

    def __repr__(self) -> str:
        size = f"decoding_budget={self.decoding_budget}" if self.budget is None else f"budget={self.budget}"
        return (f"SCOPEPolicy({size}, prefill={self.prefill_method!r}, decoding={self.decoding!r}, "
                f"P={'L' if self.capacity is None else self.capacity}, W={self.decoding_budget}, r={self.n_recent}"
                + (f", delta={self.delta})" if self.delta is not None else ")"))
