"""D2O: Dynamic Discriminative Operations for KV-cache compression (Wan et al., ICLR 2025, arXiv:2406.13035).

D2O compresses the KV cache at two levels.

**Layer level** (eqs. D1–D3). At the prefill each layer ``l`` measures how *dense* its attention is: the
attention received by every key, summed over the prompt's queries, ``a_{h,j} = Σ_i A_{h,i,j}``; its variance
over the keys, averaged over the batch, min–max normalised over the heads and averaged over the heads::

    σ²_{l,h} = Var_j(a_{l,h,j})   (unbiased, as torch.var),                                     (D1)
    v_l = mean_h (σ²_{l,h} − min_h σ²) / (max_h σ² − min_h σ² + 1e-6)                          (D2)
    r_l = clip(L · ρ · softmax(−v)_l, 0.01, 1)                                                  (D3)

``ρ`` is the uniform cache ratio (kept / total); a layer with a *flat* attention (low variance) gets a larger
share. ``r_l`` is split between heavy hitters and the recent window in the uniform proportions.

**Token level** (eqs. D4–D8), per layer with ``n_hh + n_recent`` kept tokens: the H2O scores (accumulated
attention, eq. E2 of the part) select the heavy hitters among the non-recent tokens, the first ``n_sink = 4``
tokens are forced in, and the last ``n_recent`` are kept (eq. D4, = eq. E1 of the part). Each *evicted* token
``e`` finds its most cosine-similar *retained* key per head::

    u_{h,e} = max_c cos(k_{h,e}, k_{h,c}),  c*_{h,e} = argmax_c cos(k_{h,e}, k_{h,c})             (D5)

A scalar threshold follows an exponential moving average of the mean best similarity (per sequence)::

    τ_1 = mean_{h,e} u_{h,e},   τ_t = α τ_{t-1} + β mean_{h,e} u_{h,e}                           (D6)

and token ``e`` is recalled when ``mean_h u_{h,e} ≥ τ_t`` (same decision for every head). The recalled
tokens are merged into their nearest retained slot. The official code (``scatter_reduce(mean,
include_self=True)`` of ``u·k``) computes::

    k_c ← (k_c + Σ_{e→c} u_e k_e) / (1 + n_c),     same for v                                   (D7, official)

whereas the paper writes a normalised, softmax-weighted average with the retained token's self-similarity 1::

    k_c ← (e·k_c + Σ_{e→c} exp(u_e) k_e) / (e + Σ_{e→c} exp(u_e))                              (D8, paper)

(D7) is not a convex combination (its weights sum to (1 + Σu)/(1+n) ≤ 1): merged keys and values shrink.
Both are available through ``formula="official" | "paper"``.

(D1)–(D8) are equations (1)–(8) of the chapter ``notebooks/kvcache/d2o_kv_eviction.ipynb`` (labels ``d2o-var``,
``d2o-norm``, ``d2o-ratio``, ``d2o-keep``, ``d2o-nearest``, ``d2o-ema``, ``d2o-merge-official``, ``d2o-merge-paper``).

The critical loop is :func:`nearest_retained_key` (D5) + :func:`scatter_merge` (D7/D8), with ``backend``
``"numpy" | "numba" | "torch" | "auto"``. :func:`d2o_compress` is one token-level step on a layer's cache, and
:class:`D2OPolicy` the policy for :meth:`refimpl.models.TinyLM.generate`.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from numba import njit, prange

from refimpl._common.backend import resolve_backend, to_numpy
from refimpl._common.kernels import FASTMATH, row_blocks
from refimpl._common.validate import check_int
from refimpl.kvcache.eviction import CachePolicy, select_keep
from refimpl.models.tiny_lm import KVCache

__all__ = ["layer_attention_variance", "layer_budget_ratios", "nearest_retained_key", "scatter_merge",
           "d2o_compress", "D2OPolicy", "FORMULAS"]

FORMULAS = ("official", "paper")


# ------------------------------------------------------------------------------------------ validation
def _check_float(name: str, value: Any, lo: float, hi: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not lo <= float(value) <= hi:
        raise ValueError(f"{name} must be a number in [{lo}, {hi}], got {value!r}")
    return float(value)


def _check_array(x: Any, name: str, ndim: int, what: str) -> None:
    if not isinstance(x, (np.ndarray, torch.Tensor)):
        raise TypeError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    dt = x.dtype
    floating = x.is_floating_point() if isinstance(x, torch.Tensor) else np.issubdtype(dt, np.floating)
    if not floating:
        raise TypeError(f"{name} must be floating, got {dt}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have shape {what}, got {tuple(x.shape)}")


# ---------------------------------------------------------------------------------------- layer level
def layer_attention_variance(attn: torch.Tensor) -> torch.Tensor:
    """Eqs. (D1–D2): the attention-density statistic ``v_l`` of one layer from its prefill attention.

    Args:
        attn: ``(B, H, L, T)`` softmax attention weights of the prompt's queries (masked entries 0).

    Returns:
        0-d tensor (attn's dtype): ``mean_h`` of the min–max normalised (over heads) ``Var_j Σ_i A_{h,i,j}``
        (variance over keys, unbiased; averaged over the batch first, as the official code).
    """
    if not isinstance(attn, torch.Tensor) or not attn.is_floating_point():
        raise TypeError(f"attn must be a floating torch.Tensor, got {type(attn).__name__}")
    if attn.dim() != 4:
        raise ValueError(f"attn must have shape (B, H, L, T), got {tuple(attn.shape)}")
    if attn.shape[-1] < 2:
        raise ValueError(f"attn needs T ≥ 2 keys for a variance, got T={attn.shape[-1]}")
    var = attn.sum(dim=-2).var(dim=-1).mean(dim=0)  # (H,)            (D1)
    norm = (var - var.min()) / (var.max() - var.min() + 1e-6)  # (D2)
    return norm.mean(dim=0)


def layer_budget_ratios(variances: torch.Tensor, rho: float, lo: float = 0.01, hi: float = 1.0) -> torch.Tensor:
    """Eq. (D3): per-layer cache ratios ``clip(L ρ softmax(−v), lo, hi)``.

    Args:
        variances: ``(L,)`` statistics ``v_l`` of :func:`layer_attention_variance`.
        rho: uniform ratio of tokens kept (``hh_ratio + recent_ratio`` in the official code), in (0, 1].

    Returns:
        ``(L,)`` ratios; before clipping they average to ``ρ``.
    """
    if not isinstance(variances, torch.Tensor) or not variances.is_floating_point() or variances.dim() != 1:
        raise ValueError(f"variances must be a floating 1-D tensor (L,), got {getattr(variances, 'shape', variances)}")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho <= 1:
        raise ValueError(f"rho must be a number in (0, 1], got {rho!r}")
    n = variances.shape[0]
    return torch.clamp(torch.softmax(-variances, dim=0) * n * rho, min=lo, max=hi)


# ------------------------------------------------------------------------- critical loop: eq. (D5)
def _nearest_numpy(ke: np.ndarray, kk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    ne = ke / np.linalg.norm(ke, axis=-1, keepdims=True)
    nk = kk / np.linalg.norm(kk, axis=-1, keepdims=True)
    sim = ne @ np.swapaxes(nk, -1, -2)  # (N, E, K)
    idx = sim.argmax(axis=-1)
    return np.take_along_axis(sim, idx[..., None], axis=-1)[..., 0], idx.astype(np.int64)


def _nearest_kernel(ke, kk, n_blocks):  # pragma: no cover - compiled
    # keys are normalised once into scratch buffers; evicted keys are then processed four at a time, so every
    # retained key loaded from cache serves four dot products (register tiling, as a BLAS micro-kernel)
    n, e, d = ke.shape
    k = kk.shape[1]
    T = ke.dtype.type
    best = np.empty((n, e), dtype=ke.dtype)
    arg = np.empty((n, e), dtype=np.int64)
    per = (n + n_blocks - 1) // n_blocks
    for blk in prange(n_blocks):
        nk = np.empty((k, d), dtype=ke.dtype)
        ne = np.empty((e, d), dtype=ke.dtype)
        for r in range(blk * per, min(n, (blk + 1) * per)):
            for src, dst, m in ((kk[r], nk, k), (ke[r], ne, e)):
                for c in range(m):
                    row = src[c]
                    acc = T(0)
                    for t in range(d):
                        acc += row[t] * row[t]
                    inv = T(1) / np.sqrt(acc)
                    out = dst[c]
                    for t in range(d):
                        out[t] = row[t] * inv
            i = 0
            while i + 4 <= e:
                q0, q1, q2, q3 = ne[i], ne[i + 1], ne[i + 2], ne[i + 3]
                b0 = b1 = b2 = b3 = T(-np.inf)
                i0 = i1 = i2 = i3 = 0
                for c in range(k):
                    row = nk[c]
                    s0 = s1 = s2 = s3 = T(0)
                    for t in range(d):
                        x = row[t]
                        s0 += q0[t] * x
                        s1 += q1[t] * x
                        s2 += q2[t] * x
                        s3 += q3[t] * x
                    if s0 > b0:
                        b0, i0 = s0, c
                    if s1 > b1:
                        b1, i1 = s1, c
                    if s2 > b2:
                        b2, i2 = s2, c
                    if s3 > b3:
                        b3, i3 = s3, c
                best[r, i], best[r, i + 1], best[r, i + 2], best[r, i + 3] = b0, b1, b2, b3
                arg[r, i], arg[r, i + 1], arg[r, i + 2], arg[r, i + 3] = i0, i1, i2, i3
                i += 4
            while i < e:
                q = ne[i]
                bv = T(-np.inf)
                bi = 0
                for c in range(k):
                    row = nk[c]
                    dot = T(0)
                    for t in range(d):
                        dot += q[t] * row[t]
                    if dot > bv:
                        bv, bi = dot, c
                best[r, i], arg[r, i] = bv, bi
                i += 1
    return best, arg


# a parallel and a serial build of each kernel: below PARALLEL_MIN elements waking the thread pool costs more
# than the work (row_blocks gives 1 block there, and the serial build runs it without touching the pool)
_nearest_par = njit(cache=True, fastmath=FASTMATH, parallel=True)(_nearest_kernel)
_nearest_ser = njit(cache=True, fastmath=FASTMATH)(_nearest_kernel)


def _nearest_numba(ke: np.ndarray, kk: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    blocks = row_blocks(ke.shape[0], ke.size * kk.shape[1])
    return (_nearest_par if blocks > 1 else _nearest_ser)(ke, kk, blocks)


def _nearest_torch(ke: torch.Tensor, kk: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    ne = ke / ke.norm(dim=-1, keepdim=True)
    nk = kk / kk.norm(dim=-1, keepdim=True)
    return (ne @ nk.transpose(-1, -2)).max(dim=-1)


def nearest_retained_key(k_evicted: Any, k_kept: Any, backend: str = "auto") -> tuple[Any, Any]:
    """Eq. (D5): for every evicted key, the cosine similarity to and index of its nearest retained key.

    Args:
        k_evicted: ``(N, E, d)`` floating (N = batch × heads), NumPy array or torch tensor.
        k_kept: ``(N, K, d)``, same dtype, ``K ≥ 1``.
        backend: ``"numpy" | "numba" | "torch" | "auto"``.

    Returns:
        ``(u, c)``: ``u (N, E)`` max cosine similarity (input dtype), ``c (N, E)`` int64 argmax, of the input's
        type. Ties in the argmax are broken towards the first index (numpy/numba; torch's CPU max does the same).
    """
    _check_array(k_evicted, "k_evicted", 3, "(N, E, d)")
    _check_array(k_kept, "k_kept", 3, "(N, K, d)")
    if k_evicted.shape[0] != k_kept.shape[0] or k_evicted.shape[2] != k_kept.shape[2]:
        raise ValueError(f"k_evicted (N, E, d) and k_kept (N, K, d) must agree in N and d, got "
                         f"{tuple(k_evicted.shape)} and {tuple(k_kept.shape)}")
    if k_kept.shape[1] < 1:
        raise ValueError("k_kept must hold at least one retained key (K ≥ 1)")
    if k_evicted.dtype != k_kept.dtype:
        raise TypeError(f"k_evicted and k_kept must have the same dtype, got {k_evicted.dtype} and {k_kept.dtype}")
    be = resolve_backend(backend, k_evicted)
    if be == "torch":
        u, c = _nearest_torch(torch.as_tensor(k_evicted), torch.as_tensor(k_kept))
        if not isinstance(k_evicted, torch.Tensor):
            return u.numpy(), c.numpy()
        return u, c
    ke, kk = np.ascontiguousarray(to_numpy(k_evicted)), np.ascontiguousarray(to_numpy(k_kept))
    if be == "numpy":
        u, c = _nearest_numpy(ke, kk)
    else:
        u, c = _nearest_numba(ke, kk)
    if isinstance(k_evicted, torch.Tensor):
        return torch.from_numpy(u).to(k_evicted.device), torch.from_numpy(c).to(k_evicted.device)
    return u, c


# ---------------------------------------------------------------------- critical loop: eqs. (D7–D8)
def _merge_coefficients(weight, select, formula: str, lib):
    """(numerator weight a_i, denominator weight b_i, self weight c0) of the unified merge
    ``x_c ← (c0 x_c + Σ a_i x_i) / (c0 + Σ b_i)`` over the selected evicted tokens."""
    if formula == "official":
        a, b, c0 = weight, lib.ones_like(weight), 1.0
    else:
        a = lib.exp(weight)
        b, c0 = a, math.e
    zero = lib.zeros_like(weight)
    return lib.where(select, a, zero), lib.where(select, b, zero), c0


def _merge_numpy(xk, xe, idx, w, sel, formula):
    a, b, c0 = _merge_coefficients(w, sel, formula, np)
    num = c0 * xk.copy()
    den = np.full(xk.shape[:2], c0, dtype=xk.dtype)
    n = xk.shape[0]
    rows = np.repeat(np.arange(n), idx.shape[1])
    np.add.at(num, (rows, idx.ravel()), (a[..., None] * xe).reshape(-1, xe.shape[-1]))
    np.add.at(den, (rows, idx.ravel()), b.ravel())
    return (num / den[..., None]).astype(xk.dtype)


def _merge_kernel(xk, xe, idx, w, sel, paper, n_blocks):  # pragma: no cover - compiled
    n, k, d = xk.shape
    e = xe.shape[1]
    T = xk.dtype.type
    c0 = T(np.e) if paper else T(1)
    out = np.empty_like(xk)
    per = (n + n_blocks - 1) // n_blocks
    for blk in prange(n_blocks):
        den = np.empty(k, dtype=xk.dtype)
        for r in range(blk * per, min(n, (blk + 1) * per)):
            o = out[r]
            src = xk[r]
            for c in range(k):
                den[c] = c0
                for t in range(d):
                    o[c, t] = c0 * src[c, t]
            er = xe[r]
            for i in range(e):
                if sel[r, i]:
                    c = idx[r, i]
                    if paper:
                        a = T(np.exp(w[r, i]))
                        den[c] += a
                    else:
                        a = w[r, i]
                        den[c] += T(1)
                    oc = o[c]
                    row = er[i]
                    for t in range(d):
                        oc[t] += a * row[t]
            for c in range(k):
                inv = T(1) / den[c]
                oc = o[c]
                for t in range(d):
                    oc[t] *= inv
    return out


_merge_par = njit(cache=True, fastmath=FASTMATH, parallel=True, error_model="numpy")(_merge_kernel)
_merge_ser = njit(cache=True, fastmath=FASTMATH, error_model="numpy")(_merge_kernel)


def _merge_numba(xk, xe, idx, w, sel, paper):
    blocks = row_blocks(xk.shape[0], xk.size + xe.size)
    return (_merge_par if blocks > 1 else _merge_ser)(xk, xe, idx, w, sel, paper, blocks)


def _merge_torch(xk, xe, idx, w, sel, formula):
    a, b, c0 = _merge_coefficients(w, sel, formula, torch)
    num = (c0 * xk).scatter_add(1, idx[..., None].expand(-1, -1, xk.shape[-1]), a[..., None] * xe)
    den = torch.full(xk.shape[:2], c0, dtype=xk.dtype, device=xk.device).scatter_add(1, idx, b)
    return num / den[..., None]


def scatter_merge(x_kept: Any, x_evicted: Any, index: Any, weight: Any, select: Any,
                  formula: str = "official", backend: str = "auto") -> Any:
    """Eqs. (D7) / (D8): merge the selected evicted rows into their nearest retained rows.

    Args:
        x_kept: ``(N, K, d)`` retained keys or values.
        x_evicted: ``(N, E, d)`` evicted keys or values (same dtype).
        index: ``(N, E)`` integer, target slot ``c*`` in ``[0, K)`` of every evicted row.
        weight: ``(N, E)`` floating, the similarity ``u`` of every evicted row to its target.
        select: ``(N, E)`` bool, which evicted rows are merged (the others are dropped).
        formula: ``"official"`` (D7: ``(x_c + Σ u_e x_e)/(1 + n_c)``) or ``"paper"`` (D8: softmax weights
            with the retained row's self-similarity 1).

    Returns:
        ``(N, K, d)`` merged rows, input dtype, of ``x_kept``'s type.
    """
    _check_array(x_kept, "x_kept", 3, "(N, K, d)")
    _check_array(x_evicted, "x_evicted", 3, "(N, E, d)")
    _check_array(weight, "weight", 2, "(N, E)")
    if formula not in FORMULAS:
        raise ValueError(f"formula must be one of {FORMULAS}, got {formula!r}")
    n, k, d = x_kept.shape
    e = x_evicted.shape[1]
    if x_evicted.shape[0] != n or x_evicted.shape[2] != d:
        raise ValueError(f"x_evicted must have shape ({n}, E, {d}), got {tuple(x_evicted.shape)}")
    for name, arr in (("index", index), ("weight", weight), ("select", select)):
        if tuple(arr.shape) != (n, e):
            raise ValueError(f"{name} must have shape ({n}, {e}), got {tuple(arr.shape)}")
    idx_np = to_numpy(index)
    if not np.issubdtype(idx_np.dtype, np.integer):
        raise TypeError(f"index must be an integer array, got {idx_np.dtype}")
    if idx_np.size and (idx_np.min() < 0 or idx_np.max() >= k):
        raise ValueError(f"index must lie in [0, {k}), got range [{idx_np.min()}, {idx_np.max()}]")
    if to_numpy(select).dtype != np.bool_:
        raise TypeError(f"select must be a bool array, got {to_numpy(select).dtype}")
    be = resolve_backend(backend, x_kept)
    if be == "torch":
        t = lambda z: torch.as_tensor(z).to(x_kept.device) if isinstance(x_kept, torch.Tensor) else torch.as_tensor(z)
        out = _merge_torch(t(x_kept), t(x_evicted), t(index).long(), t(weight).to(t(x_kept).dtype), t(select), formula)
        return out if isinstance(x_kept, torch.Tensor) else out.numpy()
    xk = np.ascontiguousarray(to_numpy(x_kept))
    xe = np.ascontiguousarray(to_numpy(x_evicted))
    w = np.ascontiguousarray(to_numpy(weight)).astype(xk.dtype)
    sel = np.ascontiguousarray(to_numpy(select))
    idx_np = np.ascontiguousarray(idx_np.astype(np.int64))
    if be == "numpy":
        out = _merge_numpy(xk, xe, idx_np, w, sel, formula)
    else:
        out = _merge_numba(xk, xe, idx_np, w, sel, formula == "paper")
    return torch.from_numpy(out).to(x_kept.device) if isinstance(x_kept, torch.Tensor) else out


# --------------------------------------------------------------------------------- token level (D4–D8)
def d2o_compress(keys: torch.Tensor, values: torch.Tensor, scores: torch.Tensor, n_hh: int, n_recent: int,
                 threshold: torch.Tensor | None = None, alpha: float = 0.5, beta: float = 0.5, n_sink: int = 4,
                 merge: bool = True, formula: str = "official", backend: str = "auto"
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """One token-level D2O step on a layer's cache: keep heavy hitters + sinks + recent (D4), then recall and
    merge the evicted tokens (D5–D8). Mirrors the official ``D2O_LayerKVCache.__call__`` after its score update.

    Args:
        keys, values: ``(B, H, T, d)`` the layer's cache (keys after RoPE).
        scores: ``(B, H, T)`` accumulated attention (eq. E2) of the cached tokens, this step included.
        n_hh, n_recent: heavy hitters and recent tokens to keep (``T' = n_hh + n_recent``).
        threshold: ``(B,)`` the EMA threshold τ of each sequence, or ``None`` before the first merge.
        alpha, beta: EMA coefficients of eq. (D6).
        n_sink: the first ``n_sink`` cache entries are forced in (score set to +inf, as the official code).
        merge: recall-and-merge (D2O) or plain eviction (= H2O with these sizes).
        formula: ``"official"`` (D7) or ``"paper"`` (D8).

    Returns:
        ``(keys', values', scores', threshold', keep)``: the compressed ``(B, H, T', d)`` cache and ``(B, H, T')``
        scores (sinks at +inf), the updated ``(B,)`` threshold (unchanged when nothing is evicted or ``merge`` is
        false), and the kept indices ``(B, H, T')`` (sorted). When ``T ≤ n_hh + n_recent`` nothing changes.
    """
    for name, x, nd in (("keys", keys, 4), ("values", values, 4), ("scores", scores, 3)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() != nd:
            raise ValueError(f"{name} must be a floating torch.Tensor with {nd} dims, got "
                             f"{getattr(x, 'shape', type(x).__name__)}")
    if values.shape != keys.shape or scores.shape != keys.shape[:3]:
        raise ValueError(f"keys, values (B, H, T, d) and scores (B, H, T) disagree: {tuple(keys.shape)}, "
                         f"{tuple(values.shape)}, {tuple(scores.shape)}")
    n_hh = check_int(n_hh, "n_hh", 0)
    n_recent = check_int(n_recent, "n_recent", 0)
    n_sink = check_int(n_sink, "n_sink", 0)
    if n_hh + n_recent < 1:
        raise ValueError("n_hh + n_recent must be ≥ 1")
    if formula not in FORMULAS:
        raise ValueError(f"formula must be one of {FORMULAS}, got {formula!r}")
    alpha = _check_float("alpha", alpha, 0.0, 1.0)
    beta = _check_float("beta", beta, 0.0, 1.0)
    b, h, t, d = keys.shape
    size = n_hh + n_recent
    if t <= size:
        return keys, values, scores, threshold, torch.arange(t).expand(b, h, t)
    keep = select_keep(scores, size, n_recent=n_recent, n_sink=min(n_sink, n_hh))  # (D4)
    new_scores = scores.gather(-1, keep).clone()
    new_scores[..., :min(n_sink, n_hh)] = float("inf")
    idx4 = keep[..., None].expand(-1, -1, -1, d)
    k_kept, v_kept = keys.gather(2, idx4), values.gather(2, idx4)
    if not merge:
        return k_kept, v_kept, new_scores, threshold, keep
    evicted_mask = torch.ones(b, h, t, dtype=torch.bool, device=keys.device).scatter(-1, keep, False)
    ev = evicted_mask.nonzero()[:, 2].view(b, h, t - size)  # sorted evicted indices (same count per head)
    ev4 = ev[..., None].expand(-1, -1, -1, d)
    k_ev, v_ev = keys.gather(2, ev4), values.gather(2, ev4)
    u, c = nearest_retained_key(k_ev.reshape(b * h, -1, d), k_kept.reshape(b * h, -1, d), backend)  # (D5)
    u, c = u.view(b, h, -1), c.view(b, h, -1)
    m = u.mean(dim=(1, 2))  # (B,)
    thr = m if threshold is None else alpha * threshold + beta * m  # (D6)
    sel = (u.mean(dim=1) >= thr[:, None])[:, None, :].expand(b, h, -1)  # (B, H, E), same for all heads
    args = (c.reshape(b * h, -1), u.reshape(b * h, -1), sel.reshape(b * h, -1).contiguous())
    k_new = scatter_merge(k_kept.reshape(b * h, -1, d), k_ev.reshape(b * h, -1, d), *args, formula=formula,
                          backend=backend).view(b, h, size, d)
    v_new = scatter_merge(v_kept.reshape(b * h, -1, d), v_ev.reshape(b * h, -1, d), *args, formula=formula,
                          backend=backend).view(b, h, size, d)
    return k_new, v_new, new_scores, thr, keep


# ------------------------------------------------------------------------------------------- the policy
class D2OPolicy(CachePolicy):
    """D2O as a cache policy for :meth:`refimpl.models.TinyLM.generate` / :func:`refimpl.models.corpus.evaluate`.

    ``budget`` is the average number of tokens kept per layer and head: the uniform ratio is
    ``ρ = budget / T₀`` (``T₀`` the cache length when compression starts), each layer gets
    ``⌊T₀ r_l ρ_hh/ρ⌋`` heavy hitters and ``⌊T₀ r_l ρ_rec/ρ⌋`` recent tokens (eq. D3; the clip may leave the
    total a little below ``L · budget``), and from then on every step evicts (and merges) one token per layer.

    Args:
        budget: average kept tokens per layer and head (≥ 2).
        recent_fraction: share of each layer's budget given to the recent window (official: hh_ratio =
            recent_ratio, i.e. 0.5).
        alpha, beta: EMA coefficients of the threshold (eq. D6; official defaults 0.5 / 0.5).
        merge: recall and merge evicted tokens (False = H2O with D2O's per-layer budgets).
        layer_budgets: ``"variance"`` (eq. D3) or ``"uniform"`` (every layer gets ``budget``).
        official: reproduce the official driver: no eviction at the prefill, compression starts at the first
            decoding step (``T₀ = prompt + 1``), and layers 0, 1 and the last are never compressed (they keep
            the full cache, so the average kept is above ``budget``). Otherwise (default, used in the part's
            comparison table) the cache is compressed right after the prefill (``T₀`` = prompt length), in every
            layer, so the budget is met at every decoding step as for H2O / SlidingWindow.
        n_sink: first tokens forced in (official 4).
        formula: ``"official"`` (D7) or ``"paper"`` (D8).
        backend: backend of the merge loop.

    Needs a recording cache (``model.new_cache(record=True)``; ``evaluate`` makes one). Sequences of a batch are
    independent (each keeps its own threshold); the official code runs batch 1.
    """

    def __init__(self, budget: int, recent_fraction: float = 0.5, alpha: float = 0.5, beta: float = 0.5,
                 merge: bool = True, layer_budgets: str = "variance", official: bool = False, n_sink: int = 4,
                 formula: str = "official", backend: str = "auto"):
        super().__init__()
        self.budget = check_int(budget, "budget", 2)
        self.recent_fraction = _check_float("recent_fraction", recent_fraction, 0.0, 1.0)
        self.alpha = _check_float("alpha", alpha, 0.0, 1.0)
        self.beta = _check_float("beta", beta, 0.0, 1.0)
        if layer_budgets not in ("variance", "uniform"):
            raise ValueError(f"layer_budgets must be 'variance' or 'uniform', got {layer_budgets!r}")
        if formula not in FORMULAS:
            raise ValueError(f"formula must be one of {FORMULAS}, got {formula!r}")
        resolve_backend(backend, torch.zeros(1))
        self.merge, self.official, self.layer_budgets = bool(merge), bool(official), layer_budgets
        self.n_sink = check_int(n_sink, "n_sink", 0)
        self.formula, self.backend = formula, backend
        self._ratios: tuple[float, float] | None = None

    @classmethod
    def from_ratios(cls, hh_ratio: float, recent_ratio: float, **kwargs: Any) -> "D2OPolicy":
        """The official parametrisation: ``hh_ratio``, ``recent_ratio`` of the cache length ``T₀`` (the official
        scripts' ``--hh_ratio`` / ``--recent_ratio``) instead of a token ``budget``."""
        hh = _check_float("hh_ratio", hh_ratio, 0.0, 1.0)
        rec = _check_float("recent_ratio", recent_ratio, 0.0, 1.0)
        if not 0 < hh + rec <= 1:
            raise ValueError(f"hh_ratio + recent_ratio must lie in (0, 1], got {hh + rec}")
        pol = cls(budget=2, recent_fraction=rec / (hh + rec), **kwargs)
        pol._ratios = (hh, rec)
        return pol

    def reset(self, cache: KVCache) -> None:
        n = cache.n_layers
        self.scores: list[torch.Tensor | None] = [None] * n
        self.threshold: list[torch.Tensor | None] = [None] * n
        self.variances: torch.Tensor | None = None
        self.ratios: torch.Tensor | None = None
        self.sizes: list[tuple[int, int] | None] = [None] * n
        self.started = False

    def _compressed_layers(self, n: int) -> list[int]:
        if self.official:
            return [l for l in range(n) if l not in (0, 1, n - 1)]
        return list(range(n))

    def _set_sizes(self, t0: int, n: int) -> None:
        if self._ratios is None:
            rho = min(1.0, self.budget / t0)
            hh, rec = rho * (1 - self.recent_fraction), rho * self.recent_fraction
        else:
            hh, rec = self._ratios
            rho = hh + rec
        if self.layer_budgets == "variance":
            self.ratios = layer_budget_ratios(self.variances, rho)
        else:
            self.ratios = torch.full((n,), rho, dtype=self.variances.dtype)
        if self.official or self._ratios is not None:
            # as the official code: layer_hh_ratio = r_l · (hh/ρ) (float32), hh_size = int(T₀ · layer_hh_ratio)
            self.sizes = [(int(t0 * (r * (hh / rho))), int(t0 * (r * (rec / rho)))) for r in self.ratios]
        else:  # token budgets: round the layer's total, floor its recent share (uniform = exactly `budget`)
            totals = [max(1, int(round(float(t0 * r)))) for r in self.ratios]
            self.sizes = [(n - int(n * self.recent_fraction), int(n * self.recent_fraction)) for n in totals]

    def step(self, model: torch.nn.Module, cache: KVCache) -> None:
        n = cache.n_layers
        for l in range(n):
            if cache.last_attn[l] is None:
                raise ValueError("D2OPolicy needs the attention weights: use a cache made with record=True")
        if self.prefill:
            self.variances = torch.stack([layer_attention_variance(cache.last_attn[l]) for l in range(n)])
        for l in range(n):  # eq. (E2): accumulate the received attention
            received = cache.last_attn[l].sum(dim=2)
            old = self.scores[l]
            if old is not None:
                received[..., :old.shape[-1]] += old
            self.scores[l] = received
        if self.official and self.prefill:
            return  # the official code starts at the first decoding step
        if not self.started:
            self._set_sizes(cache.length(0), n)
            self.started = True
        for l in self._compressed_layers(n):
            n_hh, n_rec = self.sizes[l]
            if n_hh + n_rec < 1:
                n_hh = 1
            k, v, s, thr, keep = d2o_compress(cache.keys[l], cache.values[l], self.scores[l], n_hh, n_rec,
                                            self.threshold[l], self.alpha, self.beta, self.n_sink, self.merge,
                                            self.formula, self.backend)
            if k.shape[2] != cache.keys[l].shape[2]:
                cache.positions[l] = cache.positions[l].gather(2, keep.to(cache.positions[l].device))
            cache.keys[l], cache.values[l], self.scores[l], self.threshold[l] = k, v, s, thr

    def __repr__(self) -> str:
        return (f"D2OPolicy(budget={self.budget}, merge={self.merge}, layer_budgets={self.layer_budgets!r}, "
                f"official={self.official}, formula={self.formula!r})")

