"""Softplus attention with re-weighting (Gao, Spratling & Gionfrida, arXiv:2501.13428, ICML 2026).

No official code could be obtained (the repository named in arXiv v1/v2, ``iminfine/freeatten``, is not
available), so this module is written from the paper's equations: the ICLR 2026 submission / arXiv v4
numbers them (4) (LSSA) and (5) (re-weighting); v5 (ICML 2026) keeps the same two stages. The chapter
numbers its own equations as below.

Softmax is a positive map followed by l1 normalisation, with the attention mask ``M`` (1 = attend):

    (1) A_ij = phi(S_ij) M_ij / sum_k phi(S_ik) M_ik,                  phi = exp for softmax

LSSA ("length scaled softplus attention", paper eq. 4) takes cosine scores, phi = softplus and a
per-row scale that grows with the number of keys the row sees:

    (2) S_ij = q_i . k_j / (|q_i|_2 |k_j|_2)                             (Q and K rows l2-normalised)
    (3) N_i = sum_j M_ij                                                 (causal: N_i = i + 1)
    (4) lambda_i = log(d) * log(N_i)                                     (d = head size)
    (5) A_ij = softplus(lambda_i S_ij) M_ij / sum_k softplus(lambda_i S_ik) M_ik

LSSAR adds the training-free re-weighting (paper eq. 5) on top of the LSSA weights: a row's mean weight
is 1/N_i, so ``N_i A_ij - 1`` is positive exactly for the above-average weights, and a power p sharpens:

    (6) R_ij = ReLU(N_i A_ij - o_i)^p M_ij / sum_k ReLU(N_i A_ik - o_i)^p M_ik,
        o_i = 0 for the first three rows (N_i <= 3), 1 otherwise;  p = 15 in the paper

(6) is invariant to a common factor of the ReLU terms, so it is evaluated as ``(r_ij / max_k r_ik)^p``,
which cannot overflow or underflow to an all-zero row:

    (7) r_ij = ReLU(N_i A_ij - o_i),   R_ij = (r_ij / r_i*)^p / sum_k (r_ik / r_i*)^p,   r_i* = max_k r_ik

A row with ``r_i* = 0`` (every weight exactly the mean, i.e. a uniform row with o_i = 1) makes (6) 0/0;
we keep the LSSA row unchanged there (a uniform row is a fixed point of the re-weighting).

The critical loop is the fused attention ``out_i = sum_j A_ij v_j`` computed row by row without
materialising the (L x L) weight matrix:

    (8) out_i = sum_j f_ij v_j / sum_j f_ij,          f_ij = softplus(lambda_i S_ij)   (one pass over keys)
    (9) LSSAR: pass 1 gives Z_i = sum_j f_ij and F_i = max_j f_ij (so r_i* = ReLU(N_i F_i / Z_i - o_i));
        pass 2 recomputes f_ij and accumulates w_ij = (ReLU(N_i f_ij / Z_i - o_i) / r_i*)^p:
        out_i = sum_j w_ij v_j / sum_j w_ij

Unlike softmax no running maximum is needed in (8): cosine scores are bounded, so softplus(lambda S)
<= lambda + log 2 cannot overflow. Backends for (8)-(9): ``"numpy"`` (readable reference, one query row
at a time), ``"numba"`` (rows in parallel, balanced under the causal mask by pairing row i with row
L-1-i; keys in tiles of 64 whose scores sit in a small buffer; for float32 a libm-free softplus -- Cody-Waite
exp and an atanh series for log1p, relative error < 3e-7 -- that LLVM vectorises, libm for float64), ``"torch"`` (blocks of query rows, differentiable by autograd, device-agnostic); ``"auto"``
picks torch for tensors and numba for arrays.

The weight functions (5)-(6) plug into :func:`refimpl.attention.mha.attention` as ``weight_fn`` (with
``score_fn=cosine_scores``); :func:`lssa_weight_fn` builds one for a given head size.
"""
from __future__ import annotations

import math
import numbers
from functools import partial
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from refimpl._common.backend import like_input, resolve_backend, to_numpy, to_torch
from refimpl._common.kernels import FASTMATH as _FASTMATH, PARALLEL_MIN
from refimpl._common.validate import check_finite, check_floating, check_int
from refimpl.attention.mha import softmax_weights

__all__ = ["cosine_scores", "length_scale", "lssa_weights", "reweight", "lssar_weights", "lssa_weight_fn",
           "fused_lssa_attention", "set_lssa_weights", "attention_entropy", "softmax_weights"]

P_PAPER = 15          # the paper's re-weighting power (its best setting beyond the training length)
OFFSET_ROWS = 3       # rows with N_i <= 3 use the offset o_i = 0 (paper: "first 3 rows" of O are 0)


# ----------------------------------------------------------------------------- validation
def _check_p(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real):
        raise TypeError(f"p must be a real number, got {type(p).__name__}")
    if not math.isfinite(p) or p <= 0:
        raise ValueError(f"p must be a finite number > 0, got {p!r}")
    return float(p)


def _check_mask(mask: Any, scores: torch.Tensor) -> torch.Tensor | None:
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"mask must be a boolean tensor (True = attend), got "
                        f"{type(mask).__name__ if not isinstance(mask, torch.Tensor) else mask.dtype}")
    try:
        torch.broadcast_shapes(mask.shape, scores.shape)
    except RuntimeError:
        raise ValueError(f"mask of shape {tuple(mask.shape)} does not broadcast to the scores' shape "
                         f"{tuple(scores.shape)}") from None
    return mask


def _check_scores(scores: Any, name: str = "scores") -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(scores).__name__}")
    if not scores.is_floating_point():
        raise TypeError(f"{name} must have a floating-point dtype, got {scores.dtype}")
    if scores.dim() < 2:
        raise ValueError(f"{name} must have shape (..., Lq, Lk), got {tuple(scores.shape)}")


def _key_counts(scores: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Eq. (3): N_i, shape (..., Lq, 1) in the scores' dtype."""
    if mask is None:
        return torch.full(scores.shape[:-1] + (1,), scores.shape[-1], dtype=scores.dtype, device=scores.device)
    m = mask.expand(torch.broadcast_shapes(mask.shape, scores.shape))
    return m.sum(-1, keepdim=True).to(scores.dtype)


# ----------------------------------------------------------------------------- weight functions (A1), (A2)
def cosine_scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Eq. (2): cosine similarity ``q̂ k̂ᵀ`` of l2-normalised rows, ``q (..., Lq, d)``, ``k (..., Lk, d)`` →
    ``(..., Lq, Lk)`` in [-1, 1]. Replaces (A1)'s ``q kᵀ/√d`` (the paper has no 1/√d: log d enters (4))."""
    return F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)


def length_scale(n_keys: Any, d_head: int) -> Any:
    """Eq. (4): ``λ = log(d) · log(N)`` for ``N`` keys seen (int, array or tensor, N >= 1)."""
    d_head = check_int(d_head, "d_head", 1)
    if isinstance(n_keys, torch.Tensor):
        return math.log(d_head) * torch.log(n_keys)
    if isinstance(n_keys, numbers.Real) and not isinstance(n_keys, bool):
        if n_keys < 1:
            raise ValueError(f"n_keys must be >= 1, got {n_keys}")
        return math.log(d_head) * math.log(n_keys)
    arr = np.asarray(n_keys, dtype=np.float64)
    if (arr < 1).any():
        raise ValueError("n_keys must be >= 1 everywhere")
    return math.log(d_head) * np.log(arr)


def lssa_weights(scores: torch.Tensor, mask: torch.Tensor | None = None, *, d_head: int) -> torch.Tensor:
    """Eqs. (3)-(5): LSSA weights from scores ``(..., Lq, Lk)`` (cosine scores, eq. 2, in the paper).

    ``mask``: boolean, True = attend, broadcastable to the scores. Each row sums to 1 over its visible keys;
    a row that sees no key is all zero. Differentiable (autograd)."""
    _check_scores(scores)
    d_head = check_int(d_head, "d_head", 1)
    mask = _check_mask(mask, scores)
    n = _key_counts(scores, mask)
    return _lssa_rows(scores, n, mask, math.log(d_head))


def _lssa_rows(scores, n, mask, logd):
    """Eqs. (4)-(5) given the key counts ``n`` (broadcastable to ``scores``) and ``log d``."""
    lam = logd * torch.log(n.clamp_min(1))                                    # (4)
    f = F.softplus(lam * scores)                                              # (5) numerator
    if mask is not None:
        f = torch.where(mask, f, torch.zeros((), dtype=f.dtype, device=f.device))
    z = f.sum(-1, keepdim=True)
    return f / torch.where(z > 0, z, torch.ones((), dtype=z.dtype, device=z.device))


def reweight(weights: torch.Tensor, mask: torch.Tensor | None = None, *, p: float = P_PAPER,
             offset_rows: int = OFFSET_ROWS) -> torch.Tensor:
    """Eqs. (6)-(7): the training-free re-weighting of l1-normalised weights ``(..., Lq, Lk)``.

    Keeps weights above the row mean ``1/N_i`` (for rows with ``N_i > offset_rows``; all positive weights
    for the first rows), raises them to the power ``p`` and renormalises. Rows whose weights all equal the
    mean (uniform rows) are returned unchanged, as are rows that see no key (all zero)."""
    _check_scores(weights, "weights")
    p = _check_p(p)
    offset_rows = check_int(offset_rows, "offset_rows", 0)
    mask = _check_mask(mask, weights)
    n = _key_counts(weights, mask)
    return _reweight_rows(weights, n, mask, p, offset_rows)


def _reweight_rows(weights, n, mask, p, offset_rows):
    """Eqs. (6)-(7) given the key counts ``n``; ReLU^p evaluated as (r / max r)^p (no overflow)."""
    o = (n > offset_rows).to(weights.dtype)                                   # o_i of (6)
    r = torch.relu(n * weights - o)                                           # (7)
    if mask is not None:
        r = torch.where(mask, r, torch.zeros((), dtype=r.dtype, device=r.device))
    rmax = r.amax(-1, keepdim=True)
    ok = rmax > 0
    w = (r / torch.where(ok, rmax, torch.ones((), dtype=r.dtype, device=r.device))) ** p
    w = w / torch.where(ok, w.sum(-1, keepdim=True), torch.ones((), dtype=w.dtype, device=w.device))
    return torch.where(ok, w, weights)


def lssar_weights(scores: torch.Tensor, mask: torch.Tensor | None = None, *, d_head: int, p: float = P_PAPER,
                  offset_rows: int = OFFSET_ROWS) -> torch.Tensor:
    """LSSAR: :func:`lssa_weights` (eq. 5) followed by :func:`reweight` (eq. 6)."""
    return reweight(lssa_weights(scores, mask, d_head=d_head), mask, p=p, offset_rows=offset_rows)


def lssa_weight_fn(d_head: int, p: float | None = None, offset_rows: int = OFFSET_ROWS) -> Callable:
    """A ``weight_fn`` for :func:`refimpl.attention.mha.attention` / ``MultiHeadAttention``: LSSA when
    ``p is None``, LSSAR with power ``p`` otherwise. Use it with ``score_fn=cosine_scores``."""
    d_head = check_int(d_head, "d_head", 1)
    if p is None:
        return partial(lssa_weights, d_head=d_head)
    return partial(lssar_weights, d_head=d_head, p=_check_p(p), offset_rows=check_int(offset_rows, "offset_rows", 0))


def set_lssa_weights(model: torch.nn.Module, p: float | None) -> int:
    """Switch every attention module of ``model`` that uses LSSA/LSSAR weights to LSSA (``p=None``) or to
    LSSAR with power ``p``: the re-weighting needs no training. Returns how many modules were changed."""
    changed = 0
    for mod in model.modules():
        fn = getattr(mod, "weight_fn", None)
        if isinstance(fn, partial) and fn.func in (lssa_weights, lssar_weights):
            mod.weight_fn = lssa_weight_fn(fn.keywords["d_head"], p, fn.keywords.get("offset_rows", OFFSET_ROWS))
            changed += 1
    return changed


def attention_entropy(weights: Any) -> Any:
    """Shannon entropy ``-sum_j A_ij log A_ij`` (nats) of every row of ``weights (..., Lk)``; 0 log 0 = 0."""
    if isinstance(weights, torch.Tensor):
        return -(torch.special.xlogy(weights, weights)).sum(-1)
    w = np.asarray(weights, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return -np.where(w > 0, w * np.log(np.where(w > 0, w, 1.0)), 0.0).sum(-1)


# ----------------------------------------------------------------------------- fused kernels (8), (9)
def _softplus_np(x: np.ndarray) -> np.ndarray:
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _normalize_rows_np(x: np.ndarray) -> np.ndarray:
    nrm = np.sqrt((x * x).sum(-1, keepdims=True))
    return x / np.maximum(nrm, x.dtype.type(1e-12))   # as torch.nn.functional.normalize (eps = 1e-12)


def _fused_numpy(q, k, v, causal, p, offset_rows):
    """Eqs. (8)-(9), one query row at a time: readable reference (keys of a row as a vector)."""
    bh, lq, d = q.shape
    lk = k.shape[1]
    T = q.dtype.type
    qn, kn = _normalize_rows_np(q), _normalize_rows_np(k)
    out = np.zeros((bh, lq, v.shape[2]), dtype=q.dtype)
    logd = math.log(d)
    for b in range(bh):
        for i in range(lq):
            nk = i + 1 + (lk - lq) if causal else lk
            if nk <= 0:
                continue
            lam = T(logd * math.log(nk))                                      # (4)
            f = _softplus_np(lam * (kn[b, :nk] @ qn[b, i]))                   # (5) numerator
            z = f.sum()
            if p is None:
                out[b, i] = (f @ v[b, :nk]) / z                               # (8)
                continue
            o = 0 if nk <= offset_rows else 1
            r = np.maximum(nk * f / z - o, 0)                                 # (7)
            rmax = r.max()
            if rmax <= 0:
                out[b, i] = (f @ v[b, :nk]) / z                               # uniform row: unchanged
                continue
            w = (r / rmax) ** T(p)
            out[b, i] = (w @ v[b, :nk]) / w.sum()                             # (9)
    return out


_TILE = 64   # keys per tile: their scores sit in a small scratch buffer between the three loops of a tile


_LOG2E = 1.4426950408889634
_LN2_HI = 0.693145751953125          # Cephes' split of log 2: n * _LN2_HI is exact for |n| < 2^9
_LN2_LO = 1.428606765330187e-06


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy", inline="always")
def _softplus_tile_f32(buf, m, nbuf):
    """buf[:m] <- softplus(buf[:m]) in float32 with loops LLVM can vectorise (no libm calls):
    softplus(x) = max(x, 0) + log1p(u), u = exp(-|x|) in (0, 1].
    exp: Cody-Waite reduction y = n log2 + r, |r| <= log2/2, e^r by its Taylor polynomial to degree 7
    (relative error < 3e-8), 2^n built from its exponent bits (u flushed to 0 below e^-87).
    log1p(u) = 2 atanh(t), t = u / (2 + u) in (0, 1/3]: odd series to t^15 (relative error < 2e-9)."""
    T = np.float32
    for jj in range(m):                                     # 2^n as bits: (n + 127) << 23
        n = np.floor(max(-abs(buf[jj]), T(-87.0)) * T(_LOG2E) + T(0.5))
        nbuf[jj] = (np.int32(n) + np.int32(127)) << 23
    scale = nbuf.view(np.float32)
    for jj in range(m):
        x = buf[jj]
        y = max(-abs(x), T(-87.0))
        n = np.floor(y * T(_LOG2E) + T(0.5))
        r = (y - n * T(_LN2_HI)) - n * T(_LN2_LO)
        e = T(1.0) + r * (T(1.0) + r * (T(0.5) + r * (T(1 / 6) + r * (T(1 / 24) + r * (
            T(1 / 120) + r * (T(1 / 720) + r * T(1 / 5040)))))))
        u = e * scale[jj]
        u = u if y > T(-87.0) else T(0.0)
        t = u / (T(2.0) + u)
        t2 = t * t
        lg = T(2.0) * t * (T(1.0) + t2 * (T(1 / 3) + t2 * (T(1 / 5) + t2 * (T(1 / 7) + t2 * (
            T(1 / 9) + t2 * (T(1 / 11) + t2 * (T(1 / 13) + t2 * T(1 / 15))))))))
        buf[jj] = max(x, T(0.0)) + lg


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy", inline="always")
def _tile_softplus(qn, kn, b, i, j0, j1, lam, buf, nbuf, fast32):
    """buf[j - j0] = softplus(lam * <q_i, k_j>) for keys j0 <= j < j1 (eqs. 2, 5), branch-free."""
    d = qn.shape[2]
    T = qn.dtype.type
    for j in range(j0, j1):
        s = T(0)
        for t in range(d):
            s += qn[b, i, t] * kn[b, j, t]
        buf[j - j0] = lam * s
    if fast32:                                              # float32 input: vectorisable softplus
        _softplus_tile_f32(buf, j1 - j0, nbuf)
    else:
        for jj in range(j1 - j0):
            x = buf[jj]
            buf[jj] = max(x, T(0)) + T(math.log1p(math.exp(-abs(x))))


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy")
def _row_numba(qn, kn, v, b, i, lq, causal, p, offset_rows, logd, orow, buf, nbuf, fast32):
    lk = kn.shape[1]
    dv = v.shape[2]
    T = qn.dtype.type
    nk = i + 1 + (lk - lq) if causal else lk
    for c in range(dv):
        orow[c] = T(0)
    if nk <= 0:
        return
    lam = T(logd * math.log(nk))
    z = T(0)
    fmax = T(0)
    for j0 in range(0, nk, _TILE):                          # pass 1 (the only pass for LSSA, eq. 8)
        j1 = min(nk, j0 + _TILE)
        _tile_softplus(qn, kn, b, i, j0, j1, lam, buf, nbuf, fast32)
        for jj in range(j1 - j0):
            f = buf[jj]
            z += f
            fmax = max(fmax, f)
        if p <= 0:
            for j in range(j0, j1):
                f = buf[j - j0]
                for c in range(dv):
                    orow[c] += f * v[b, j, c]
    if p > 0:
        o = T(0) if nk <= offset_rows else T(1)
        scale = T(nk) / z
        rmax = scale * fmax - o
        if rmax > 0:                                        # pass 2 (LSSAR, eq. 9)
            inv = T(1) / rmax
            wsum = T(0)
            for j0 in range(0, nk, _TILE):
                j1 = min(nk, j0 + _TILE)
                _tile_softplus(qn, kn, b, i, j0, j1, lam, buf, nbuf, fast32)
                for j in range(j0, j1):
                    r = scale * buf[j - j0] - o
                    if r > 0:
                        w = T((r * inv) ** p)
                        wsum += w
                        for c in range(dv):
                            orow[c] += w * v[b, j, c]
            z = wsum
        else:                                               # uniform row: the LSSA row, unchanged
            for j0 in range(0, nk, _TILE):
                j1 = min(nk, j0 + _TILE)
                _tile_softplus(qn, kn, b, i, j0, j1, lam, buf, nbuf, fast32)
                for j in range(j0, j1):
                    f = buf[j - j0]
                    for c in range(dv):
                        orow[c] += f * v[b, j, c]
    inv = T(1) / z
    for c in range(dv):
        orow[c] *= inv


@njit(parallel=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def _fused_numba_par(qn, kn, v, causal, p, offset_rows, fast32, out):
    bh, lq, d = qn.shape
    logd = math.log(d)
    half = (lq + 1) // 2
    for task in prange(bh * half):                          # row i paired with row lq-1-i: equal causal work
        b = task // half
        i = task - b * half
        buf = np.empty(_TILE, dtype=qn.dtype)
        nbuf = np.empty(_TILE, dtype=np.int32)
        _row_numba(qn, kn, v, b, i, lq, causal, p, offset_rows, logd, out[b, i], buf, nbuf, fast32)
        i2 = lq - 1 - i
        if i2 != i:
            _row_numba(qn, kn, v, b, i2, lq, causal, p, offset_rows, logd, out[b, i2], buf, nbuf, fast32)


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy")
def _fused_numba_seq(qn, kn, v, causal, p, offset_rows, fast32, out):
    bh, lq, d = qn.shape
    logd = math.log(d)
    buf = np.empty(_TILE, dtype=qn.dtype)
    nbuf = np.empty(_TILE, dtype=np.int32)
    for b in range(bh):
        for i in range(lq):
            _row_numba(qn, kn, v, b, i, lq, causal, p, offset_rows, logd, out[b, i], buf, nbuf, fast32)


def _fused_numba(q, k, v, causal, p, offset_rows):
    qn, kn = _normalize_rows_np(q), _normalize_rows_np(k)
    out = np.empty((q.shape[0], q.shape[1], v.shape[2]), dtype=q.dtype)
    pp = 0.0 if p is None else float(p)
    work = q.shape[0] * q.shape[1] * k.shape[1] * q.shape[2]
    kern = _fused_numba_par if work >= PARALLEL_MIN else _fused_numba_seq
    kern(qn, kn, np.ascontiguousarray(v), bool(causal), pp, int(offset_rows), q.dtype == np.float32, out)
    return out


def _fused_torch(q, k, v, causal, p, offset_rows, block):
    """Eqs. (8)-(9) on blocks of ``block`` query rows: memory O(block · Lk), never (Lq · Lk)."""
    lq, lk, d = q.shape[-2], k.shape[-2], q.shape[-1]
    qn, kn = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    logd = math.log(d)
    outs = []
    for start in range(0, lq, block):
        stop = min(lq, start + block)
        s = qn[..., start:stop, :] @ kn.transpose(-2, -1)                    # (..., rows, Lk)
        if causal:
            i = torch.arange(start, stop, device=q.device)[:, None]
            j = torch.arange(lk, device=q.device)[None, :]
            m = j <= i + (lk - lq)
            n = (i + 1 + (lk - lq)).clamp_min(0).to(q.dtype)
        else:
            m = None
            n = torch.full((stop - start, 1), lk, dtype=q.dtype, device=q.device)
        a = _lssa_rows(s, n, m, logd)
        if p is not None:
            a = _reweight_rows(a, n, m, p, offset_rows)
        outs.append(a @ v)
    return torch.cat(outs, dim=-2)


def fused_lssa_attention(q: Any, k: Any, v: Any, *, causal: bool = True, p: float | None = None,
                         offset_rows: int = OFFSET_ROWS, backend: str = "auto", block: int = 128) -> Any:
    """The critical loop: LSSA (``p=None``, eq. 8) or LSSAR (power ``p``, eq. 9) attention output, streamed
    row by row without the (Lq x Lk) weight matrix.

    Args:
        q: ``(..., Lq, d)``, k: ``(..., Lk, d)``, v: ``(..., Lk, dv)``; arrays or tensors of one floating
            dtype with equal leading dimensions. Q and K rows are l2-normalised inside (eq. 2); d is the
            ``d`` of eq. (4).
        causal: query i sees keys ``j <= i + Lk - Lq`` (the mask of ``mha.causal_mask``); else all keys.
        p: re-weighting power (the paper's 15) or None for plain LSSA.
        offset_rows: rows with ``N_i <= offset_rows`` get the offset ``o_i = 0`` in (6).
        backend: "numpy" | "numba" | "torch" | "auto". block: query rows per block (torch backend).
    Returns:
        ``(..., Lq, dv)`` of the input's type and dtype. Gradients flow through the torch backend.
    Equals ``mha.attention(q, k, v, causal=causal, score_fn=cosine_scores, weight_fn=lssa_weight_fn(d, p))[0]``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_floating(t, name)
        if t.ndim < 2:
            raise ValueError(f"{name} must have shape (..., L, d), got {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (type(q) is type(k) is type(v)):
        raise TypeError(f"q, k and v must have one type and dtype, got {type(q).__name__} {q.dtype}, "
                        f"{type(k).__name__} {k.dtype}, {type(v).__name__} {v.dtype}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q and k must have the same feature size, got {q.shape[-1]} and {k.shape[-1]}")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"k and v must have the same length, got {k.shape[-2]} and {v.shape[-2]}")
    if not (tuple(q.shape[:-2]) == tuple(k.shape[:-2]) == tuple(v.shape[:-2])):
        raise ValueError(f"q, k and v must have the same leading dimensions, got {tuple(q.shape[:-2])}, "
                         f"{tuple(k.shape[:-2])}, {tuple(v.shape[:-2])}")
    if not isinstance(causal, (bool, np.bool_)):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if causal and k.shape[-2] < q.shape[-2]:
        raise ValueError(f"a causal mask needs at least as many keys as queries, got Lq={q.shape[-2]}, "
                         f"Lk={k.shape[-2]}")
    if p is not None:
        p = _check_p(p)
    offset_rows = check_int(offset_rows, "offset_rows", 0)
    block = check_int(block, "block", 1)
    backend = resolve_backend(backend, q)
    if backend == "torch":
        qt = to_torch(q)
        out = _fused_torch(qt, to_torch(k, like=qt), to_torch(v, like=qt), bool(causal), p, offset_rows, block)
        if isinstance(q, torch.Tensor):
            return out
        return out.detach().numpy()
    lead = tuple(q.shape[:-2])
    q3, k3, v3 = (np.ascontiguousarray(to_numpy(t)).reshape((-1,) + tuple(t.shape[-2:])) for t in (q, k, v))
    for name, a in (("q", q3), ("k", k3), ("v", v3)):
        check_finite(a, name)
    fn = _fused_numpy if backend == "numpy" else _fused_numba
    out = fn(q3, k3, v3, bool(causal), p, offset_rows)
    return like_input(out.reshape(lead + out.shape[-2:]), q)
