"""Dynamic Memory Compression (DMC): retrofitting a transformer to merge its KV cache on-line.

Nawrot, Łańcucki, Chochowski, Tarjan, Ponti, *Dynamic Memory Compression: Retrofitting LLMs for Accelerated
Inference*, ICML 2024 (arXiv:2403.09636). Official code: NVIDIA/Megatron-LM, branch ``dmc``,
``megatron/contrib/dmc/`` (verified against it, see ``tests/golden/dynamic_memory_compression``).

Every head, at every step ``t``, reads two scalars from its own query/key (no new parameters; the official
code uses the LAST feature ``D-1``, which it then removes from the attention dot product and from RoPE)::

    α_t = 1[k_t[D-1] − c > 0]              (decision: 1 = merge into the last slot, 0 = append)   (D1)
    ω_t = σ(q_t[D-1] + c) + ε               (importance of token t inside its group)              (D2)

with ``c = 5`` (so a fresh model appends: ``σ(0 − 5) ≈ 0.007``) and ``ε = 2⁻⁷`` (bf16 eps). The cache of a
head is a list of slots; token ``t`` either opens a new slot (``α_t = 0``; the first token always does) or is
merged into the last one. The paper's update is an unbounded running weighted mean::

    k̄ ← (z k̄ + ω_t k_t) / (z + ω_t),   v̄ ← (z v̄ + ω_t v_t) / (z + ω_t),   z ← z + ω_t          (D3)

The official kernel keeps running sums ``Σ ω k``, ``Σ ω v``, ``Σ ω`` and a ring buffer of the last ``W = 12``
weighted tokens, and subtracts the oldest one when the current merge run gets longer than 12, so a slot is
the ω-weighted mean of only the last ≤ W tokens of its run::

    k̄_t = Σ_{s ∈ run(t), s > t−W} ω_s k_s / Σ_{s ∈ run(t), s > t−W} ω_s                            (D4)

(``window=None`` gives eq. D3.) Heads decide independently, so per-head cache lengths are ragged. The
merged (pre-RoPE) key is rotated at the position of the last token merged into it.

Training replaces the hard decision by a Gumbel-sigmoid relaxation with temperature ``τ``::

    α̃_t = σ((k_t[D-1] − c + g₁ − g₂) / τ),   g₁, g₂ ~ Gumbel(0, 1)                                  (D5)

and computes, for every position at once, the *partial accumulation* of the window (``W`` tokens)::

    k̃_i = Σ_{t=i−W+1}^{i} ω_t (Π_{s=t+1}^{i} α̃_s) k_t  /  Σ_{t=i−W+1}^{i} ω_t (Π_{s=t+1}^{i} α̃_s)      (D6)

(the same for ``v``); query ``i`` sees key ``t < i`` with the additive mask ``log(1 − α̃_{t+1})`` (a token
that will be merged into by its successor is, in expectation, not a slot of its own) and itself unmasked::

    s_{it} = q_i·k̃_t / √d + log(1 − α̃_{t+1}) · 1[t < i]                                          (D7)

The compression loss pushes the mean decision over layers, heads and time towards the prior ``1 − 1/CR``
of a target compression ratio ``CR(n)`` annealed linearly from 1 over the ``N`` training steps::

    ℓ_CR = mean_b max(0, 1 − 1/CR(n) − mean_{l,h,t} α_{b,l,h,t}),   CR(n) = 1 + (CR − 1) min(1, n/N)   (D8)

with straight-through hard decisions in the mean (forward ``1[α̃ > ½]``, gradient of ``α̃``). The achieved
compression ratio is ``tokens / slots = 1 / (1 − mean α)`` (D9).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from refimpl.models.tiny_lm import TinyLM, apply_rope

try:  # numba is optional at import time
    from numba import njit, prange
    from refimpl._common.kernels import FASTMATH
    HAVE_NUMBA = True
except Exception:  # pragma: no cover
    HAVE_NUMBA = False

__all__ = ["dmc_decisions", "dmc_importance", "dmc_compress", "dmc_attention", "poolsum", "gumbel_sigmoid",
           "dmc_attention_bias", "dmc_pool", "dmc_loss", "target_compression", "straight_through", "DMCTinyLM", "DMCCache",
           "evaluate_dmc", "BF16_EPS", "INIT_VAL", "WINDOW"]

INIT_VAL = 5.0  #: ``c`` of eqs. D1-D2 (official ``--dmc-init-val``)
WINDOW = 12  #: official merge window ``W`` (``--dmc-window-size``; the kernel hard-codes 12)
BF16_EPS = float(torch.finfo(torch.bfloat16).eps)  #: ``ε`` of eq. D2 (2⁻⁷)
MASK_CONST = -50000.0  #: official additive mask of merged-away tokens at evaluation time


# ------------------------------------------------------------------------------------ validation helpers
def _check_window(window: Any) -> int:
    if window is None:
        return 0
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive integer or None (unbounded, eq. D3), got {window!r}")
    return window


def _check_float(name: str, v: Any, positive: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (positive and v <= 0):
        raise ValueError(f"{name} must be a finite number{' > 0' if positive else ''}, got {v!r}")
    return float(v)


def dmc_decisions(k_logit, init_val: float = INIT_VAL):
    """Eq. (D1): hard decision ``α = 1[k[D-1] − c > 0]`` (1 = merge) from the decision logit ``k[..., D-1]``."""
    return (k_logit - init_val) > 0


def dmc_importance(q_logit, init_val: float = INIT_VAL, eps: float = BF16_EPS):
    """Eq. (D2): importance ``ω = σ(q[D-1] + c) + ε`` from ``q[..., D-1]`` (NumPy or torch)."""
    if isinstance(q_logit, torch.Tensor):
        return torch.sigmoid(q_logit + init_val) + eps
    x = np.asarray(q_logit)
    one = x.dtype.type(1)
    return one / (one + np.exp(-(x + x.dtype.type(init_val)))) + x.dtype.type(eps)


# ------------------------------------------------------------------------ the critical loop: eqs. D1-D4
def _compress_numpy(qd, k, v, window, init_val, eps, force_first):
    """Readable reference: loop over time, all heads at once. qd (N,T), k, v (N,T,D)."""
    N, T, D = k.shape
    dt = k.dtype.type
    alpha = (k[:, :, D - 1] - dt(init_val)) > 0
    if force_first:
        alpha[:, 0] = False
    w = dmc_importance(qd, init_val, eps).astype(k.dtype)
    kz = k.copy()
    kz[:, :, D - 1] = 0  # the decision neuron is not part of the key
    W = max(window, 1)
    k_sum = np.zeros((N, D), k.dtype); v_sum = np.zeros((N, D), k.dtype); w_sum = np.zeros(N, k.dtype)
    ring_k = np.zeros((W, N, D), k.dtype); ring_v = np.zeros((W, N, D), k.dtype); ring_w = np.ones((W, N), k.dtype)
    run = np.zeros(N, np.int64); slot = np.full(N, -1, np.int64)
    k_out = np.zeros_like(k); v_out = np.zeros_like(v); slots = np.zeros((N, T), np.int64)
    for t in range(T):
        a = alpha[:, t].astype(k.dtype)
        kw, vw, wt = kz[:, t] * w[:, t, None], v[:, t] * w[:, t, None], w[:, t]
        run = np.where(alpha[:, t], run, 0) + 1
        # eq. D4: drop the token that leaves the window (run longer than W); window=0 → eq. D3
        over = ((run > window) if window else np.zeros(N, bool)).astype(k.dtype)
        r = t % W
        k_sum = k_sum * a[:, None] - over[:, None] * ring_k[r] + kw
        v_sum = v_sum * a[:, None] - over[:, None] * ring_v[r] + vw
        w_sum = w_sum * a - over * ring_w[r] + wt
        ring_k[r], ring_v[r], ring_w[r] = kw, vw, wt
        slot = slot + 1 - alpha[:, t]
        k_out[:, t] = k_sum / w_sum[:, None]
        v_out[:, t] = v_sum / w_sum[:, None]
        slots[:, t] = slot
    return k_out, v_out, slots


def _compress_numba_py(qd, k, v, window, init_val, eps, force_first, k_out, v_out, slots, keys, values):  # pragma: no cover
        N, T, D = k.shape
        Tp = k.dtype.type
        W = max(window, 1)
        for n in prange(N):
            k_sum = np.zeros(D, k.dtype); v_sum = np.zeros(D, k.dtype)
            ring_k = np.zeros((W, D), k.dtype); ring_v = np.zeros((W, D), k.dtype); ring_w = np.ones(W, k.dtype)
            w_sum = Tp(0)
            run = 0
            slot = -1
            kn = k[n]; vn = v[n]; qn = qd[n]
            for t in range(T):
                merge = (kn[t, D - 1] - Tp(init_val)) > 0
                if force_first and t == 0:
                    merge = False
                wt = Tp(1) / (Tp(1) + np.exp(-(qn[t] + Tp(init_val)))) + Tp(eps)
                a = Tp(1) if merge else Tp(0)
                run = run + 1 if merge else 1
                over = Tp(1) if (window > 0 and run > window) else Tp(0)
                r = t % W
                rk = ring_k[r]; rv = ring_v[r]
                kt = kn[t]; vt = vn[t]
                ko = k_out[n, t]; vo = v_out[n, t]
                w_sum = w_sum * a - over * ring_w[r] + wt
                for d in range(D - 1):
                    kw = kt[d] * wt
                    k_sum[d] = k_sum[d] * a - over * rk[d] + kw
                    rk[d] = kw
                    ko[d] = k_sum[d] / w_sum
                ko[D - 1] = Tp(0)
                for d in range(D):
                    vw = vt[d] * wt
                    v_sum[d] = v_sum[d] * a - over * rv[d] + vw
                    rv[d] = vw
                    vo[d] = v_sum[d] / w_sum
                ring_w[r] = wt
                if not merge:
                    slot += 1
                slots[n, t] = slot
                kc = keys[n, slot]; vc = values[n, slot]  # the slot's latest value (official: write at lens[0])
                for d in range(D):
                    kc[d] = ko[d]
                    vc[d] = vo[d]
            for s in range(slot + 1, T):  # zero padding after the last slot
                kc = keys[n, s]; vc = values[n, s]
                for d in range(D):
                    kc[d] = Tp(0)
                    vc[d] = Tp(0)


if HAVE_NUMBA:  # one source, two compilations: heads in parallel for large inputs, serial below PARALLEL_MIN
    from refimpl._common.kernels import PARALLEL_MIN
    _compress_numba_kernel = njit(cache=True, parallel=True, fastmath=FASTMATH, error_model="numpy")(_compress_numba_py)
    _compress_numba_serial = njit(cache=True, fastmath=FASTMATH, error_model="numpy")(_compress_numba_py)


def _torch_step(k_sum, v_sum, w_sum, ring_k, ring_v, ring_w, run, merge, kw, vw, wt, window: int):
    """One append-or-merge step (eq. D4) for all heads; ``ring_*`` are the ring-buffer rows to overwrite."""
    a = merge.to(kw.dtype)
    run = torch.where(merge, run, torch.zeros_like(run)) + 1
    over = (run > window).to(kw.dtype) if window else torch.zeros_like(a)
    k_sum = k_sum * a[:, None] - over[:, None] * ring_k + kw
    v_sum = v_sum * a[:, None] - over[:, None] * ring_v + vw
    w_sum = w_sum * a - over * ring_w + wt
    return k_sum, v_sum, w_sum, run, k_sum / w_sum[:, None], v_sum / w_sum[:, None]


def _compress_torch(qd, k, v, window, init_val, eps, force_first, step=_torch_step):
    N, T, D = k.shape
    alpha = (k[:, :, D - 1] - init_val) > 0
    if force_first:
        alpha[:, 0] = False
    w = (torch.sigmoid(qd + init_val) + eps).to(k.dtype)
    kz = k.clone()
    kz[:, :, D - 1] = 0
    kw_all, vw_all = kz * w[..., None], v * w[..., None]
    W = max(window, 1)
    k_sum = k.new_zeros(N, D); v_sum = k.new_zeros(N, D); w_sum = k.new_zeros(N)
    ring_k = k.new_zeros(W, N, D); ring_v = k.new_zeros(W, N, D); ring_w = k.new_ones(W, N)
    run = torch.zeros(N, dtype=torch.long, device=k.device)
    k_out = torch.empty_like(k); v_out = torch.empty_like(v)
    for t in range(T):
        r = t % W
        k_sum, v_sum, w_sum, run, k_out[:, t], v_out[:, t] = step(
            k_sum, v_sum, w_sum, ring_k[r], ring_v[r], ring_w[r], run, alpha[:, t], kw_all[:, t], vw_all[:, t],
            w[:, t], window)
        ring_k[r], ring_v[r], ring_w[r] = kw_all[:, t], vw_all[:, t], w[:, t]
    slots = torch.cumsum((~alpha).long(), dim=1) - 1
    return k_out, v_out, slots


def dmc_compress(q_logit, k, v, window: int | None = WINDOW, init_val: float = INIT_VAL, eps: float = BF16_EPS,
                 force_first_append: bool = True, backend: str = "auto"):
    """Run the DMC append-or-merge cache update (eqs. D1-D4) over ``T`` steps for ``B·H`` heads.

    Args:
        q_logit: ``(B, H, T)`` importance logits ``q_t[D-1]`` (eq. D2).
        k, v: ``(B, H, T, D)`` pre-RoPE keys (their last feature is the decision logit, eq. D1) and values.
        window: merge window ``W`` of eq. D4 (official: 12); ``None`` = the paper's unbounded mean (D3).
        init_val, eps: ``c`` and ``ε`` of eqs. D1-D2.
        force_first_append: the first token opens a slot whatever its decision (official behaviour).
        backend: ``"numpy"`` (reference), ``"numba"``, ``"torch"`` or ``"auto"`` (torch for tensors, numba
            for arrays).

    Returns:
        ``(keys, values, lens, k_out, v_out, slot)``: the compressed cache ``keys, values`` ``(B, H, T, D)``
        (slots ``≥ lens`` are zero padding; the key's last feature is 0), ``lens (B, H)`` slots per head,
        ``k_out, v_out (B, H, T, D)`` the value of the slot written at each step (what the official kernel
        returns in ``k``, ``v``) and ``slot (B, H, T)`` its index. Same array type and dtype as ``k``.
    """
    is_t = isinstance(k, torch.Tensor)
    for name, x in (("q_logit", q_logit), ("k", k), ("v", v)):
        if is_t != isinstance(x, torch.Tensor) or not (is_t or isinstance(x, np.ndarray)):
            raise TypeError(f"{name} must be a {'torch.Tensor' if is_t else 'numpy.ndarray'} like k, got {type(x).__name__}")
        fl = x.is_floating_point() if is_t else np.issubdtype(x.dtype, np.floating)
        if not fl:
            raise TypeError(f"{name} must be floating, got {x.dtype}")
    if k.ndim != 4 or k.shape[-1] < 2:
        raise ValueError(f"k must have shape (B, H, T, D) with D ≥ 2, got {tuple(k.shape)}")
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if tuple(q_logit.shape) != tuple(k.shape[:3]):
        raise ValueError(f"q_logit must have shape (B, H, T) = {tuple(k.shape[:3])}, got {tuple(q_logit.shape)}")
    if v.dtype != k.dtype or q_logit.dtype != k.dtype:
        raise TypeError(f"q_logit, k, v must share a dtype, got {q_logit.dtype}, {k.dtype}, {v.dtype}")
    # one float64 sum per array: finite iff every entry is (a float64 sum of float32/64 data cannot overflow
    # unless entries approach 1e308 / T); cheaper than an elementwise isfinite pass over the whole input
    fin = ((lambda x: bool(torch.isfinite(x.sum(dtype=torch.float64)))) if is_t
           else (lambda x: bool(np.isfinite(np.sum(x, dtype=np.float64)))))
    if not (fin(q_logit) and fin(k) and fin(v)):
        raise ValueError("q_logit, k and v must be finite (no NaN/inf)")
    win = _check_window(window)
    init_val = _check_float("init_val", init_val)
    eps = _check_float("eps", eps)
    if eps < 0:
        raise ValueError(f"eps must be ≥ 0, got {eps}")
    if backend not in ("auto", "numpy", "numba", "torch"):
        raise ValueError(f"backend must be 'auto', 'numpy', 'numba' or 'torch', got {backend!r}")
    if backend == "auto":
        backend = "torch" if is_t else ("numba" if HAVE_NUMBA else "numpy")
    if backend == "numba" and not HAVE_NUMBA:  # pragma: no cover
        backend = "numpy"
    B, H, T, D = k.shape
    if backend == "torch":
        qt, kt, vt = (torch.as_tensor(x) for x in (q_logit, k, v))
        ko, vo, sl = _compress_torch(qt.reshape(B * H, T), kt.reshape(B * H, T, D), vt.reshape(B * H, T, D),
                                     win, init_val, eps, force_first_append)
    else:
        qn, kn, vn = ((x.detach().cpu().numpy() if is_t else x) for x in (q_logit, k, v))
        qn = np.ascontiguousarray(qn.reshape(B * H, T)); kn = np.ascontiguousarray(kn.reshape(B * H, T, D))
        vn = np.ascontiguousarray(vn.reshape(B * H, T, D))
        if backend == "numpy":
            ko, vo, sl = _compress_numpy(qn, kn, vn, win, init_val, eps, force_first_append)
        else:
            ko = np.empty_like(kn); vo = np.empty_like(vn); sl = np.empty((B * H, T), np.int64)
            keys = np.empty_like(kn); values = np.empty_like(vn)  # the kernel writes every entry
            kern = _compress_numba_kernel if kn.size >= PARALLEL_MIN else _compress_numba_serial
            kern(qn, kn, vn, win, init_val, eps, bool(force_first_append), ko, vo, sl, keys, values)
            lens = sl[:, -1] + 1
        if is_t:
            ko, vo, sl = (torch.from_numpy(x).to(k.device) for x in (ko, vo, sl))
    if backend != "numba":
        keys, values, lens = _scatter_slots(ko, vo, sl)
    elif is_t:
        keys, values, lens = (torch.from_numpy(x).to(k.device) for x in (keys, values, lens))
    rs = lambda x, *s: x.reshape(B, H, *s)
    return rs(keys, T, D), rs(values, T, D), rs(lens), rs(ko, T, D), rs(vo, T, D), rs(sl, T)


def _scatter_slots(ko, vo, sl):
    """Final cache: the last value written to each slot (a slot is written at every step of its run)."""
    N, T, D = ko.shape
    if isinstance(ko, torch.Tensor):
        last = torch.ones_like(sl, dtype=torch.bool)
        last[:, :-1] = sl[:, 1:] != sl[:, :-1]  # the last step that wrote each slot
        n, t = last.nonzero(as_tuple=True)
        keys = ko.new_zeros(N, T, D); values = vo.new_zeros(N, T, D)
        keys[n, sl[n, t]] = ko[n, t]
        values[n, sl[n, t]] = vo[n, t]
        return keys, values, sl[:, -1] + 1
    last = np.ones(sl.shape, bool)
    last[:, :-1] = sl[:, 1:] != sl[:, :-1]
    keys = np.zeros_like(ko); values = np.zeros_like(vo)
    lens = sl[:, -1] + 1
    for n in range(N):  # slots are in time order: the last step of each run, in order, fills slots 0..lens-1
        keys[n, :lens[n]] = ko[n, last[n]]
        values[n, :lens[n]] = vo[n, last[n]]
    return keys, values, lens


def dmc_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, lens: torch.Tensor,
                  scale: float | None = None) -> torch.Tensor:
    """Single-query attention of ``q (B, H, D)`` over a ragged compressed cache ``keys, values (B, H, S, D)``
    whose first ``lens (B, H)`` slots are valid → ``(B, H, D)``: ``softmax(q·k/√D) v`` over the valid slots."""
    if q.dim() != 3 or keys.dim() != 4 or keys.shape[:2] != q.shape[:2] or keys.shape[-1] != q.shape[-1]:
        raise ValueError(f"q must be (B, H, D) and keys (B, H, S, D) alike, got {tuple(q.shape)}, {tuple(keys.shape)}")
    if values.shape[:3] != keys.shape[:3]:
        raise ValueError(f"values must have shape (B, H, S, ·) like keys, got {tuple(values.shape)}")
    if lens.shape != q.shape[:2]:
        raise ValueError(f"lens must have shape (B, H) = {tuple(q.shape[:2])}, got {tuple(lens.shape)}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = torch.einsum("bhd,bhsd->bhs", q, keys) * scale
    valid = torch.arange(keys.shape[2], device=q.device) < lens[..., None]
    p = torch.softmax(s.masked_fill(~valid, float("-inf")), dim=-1)
    return torch.einsum("bhs,bhsd->bhd", p, values)


# --------------------------------------------------------------------------- training relaxation D5-D8
def gumbel_sigmoid(logits: torch.Tensor, temperature: float = 0.1, noise: bool = True,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """Eq. (D5): the *noisy logits* ``(logits + g₁ − g₂)/τ`` (apply ``sigmoid`` for α̃; ``log σ(−·)`` for the
    mask). Without ``noise`` just ``logits/τ``."""
    temperature = _check_float("temperature", temperature, positive=True)
    if noise:
        u = torch.rand((2,) + tuple(logits.shape), generator=generator, device=logits.device, dtype=torch.float32)
        g = -torch.log((-torch.log(u.clamp_min(1e-20))).clamp_min(1e-20))  # Gumbel(0, 1)
        logits = logits + (g[0] - g[1]).to(logits.dtype)
    return logits / temperature


def straight_through(probs: torch.Tensor) -> torch.Tensor:
    """Hard decisions ``1[p > ½]`` in the forward pass, the gradient of ``p`` in the backward (official
    ``get_decisions``)."""
    return (probs > 0.5).to(probs.dtype) - probs.detach() + probs


def poolsum(x: torch.Tensor, alpha: torch.Tensor, w: torch.Tensor | None = None, window: int = WINDOW) -> torch.Tensor:
    """Eq. (D6), partial accumulations over a window, time first: ``x (T, N, F)``, ``alpha (T-1, N)`` the
    (relaxed) decisions of tokens ``1..T-1``, ``w (T, N)`` importances (``None``: all ones) → ``(T, N, F)``.

    ``out_i = Σ_{t=i-W+1..i, t≥0} w_t Π_{s=t+1..i} α_s x_t / Σ (same coefficients)``. Differentiable in all
    inputs (plain autograd). Computed in float32 or wider.
    """
    if x.dim() != 3:
        raise ValueError(f"x must have shape (T, N, F), got {tuple(x.shape)}")
    T, N, _ = x.shape
    if alpha.shape != (T - 1, N):
        raise ValueError(f"alpha must have shape (T-1, N) = {(T - 1, N)}, got {tuple(alpha.shape)}")
    if w is not None and w.shape != (T, N):
        raise ValueError(f"w must have shape (T, N) = {(T, N)}, got {tuple(w.shape)}")
    window = _check_window(window)
    if window == 0:
        raise ValueError("poolsum needs a finite window")
    dt = x.dtype
    xf = x.float() if dt in (torch.float16, torch.bfloat16) else x
    af = alpha.to(xf.dtype)
    wf = torch.ones(T, N, dtype=xf.dtype, device=x.device) if w is None else w.to(xf.dtype)
    acc = xf * wf[..., None]
    c = wf.clone()
    coef = torch.ones(T, N, dtype=xf.dtype, device=x.device)
    for j in range(1, min(window, T)):
        # coef_j[i] = Π_{s=i-j+1..i} α_s for i ≥ j: the previous coefficient times α of token i-j+1
        coef = coef[1:] * af[: T - j]
        term_w = coef * wf[: T - j]
        acc = acc + F.pad(term_w[..., None] * xf[: T - j], (0, 0, 0, 0, j, 0))
        c = c + F.pad(term_w, (0, 0, j, 0))
    return (acc / c[..., None]).to(dt)


def dmc_attention_bias(noisy_logits: torch.Tensor, hard: bool = False) -> torch.Tensor:
    """Eq. (D7): additive attention bias ``(B, H, L, L)`` (query, key) from the decision logits
    ``(B, H, L)`` (noisy and divided by ``τ`` in training). Key ``t`` gets ``log(1 − σ(logit_{t+1}))`` for every
    later query (``hard``: ``α_{t+1}·(−50000)`` from straight-through decisions, as the official evaluation
    mode); the diagonal and the last key get 0. The causal mask is *not* included."""
    if noisy_logits.dim() != 3:
        raise ValueError(f"noisy_logits must have shape (B, H, L), got {tuple(noisy_logits.shape)}")
    if hard:
        m = straight_through(torch.sigmoid(noisy_logits)) * MASK_CONST
    else:
        m = F.logsigmoid(-noisy_logits)
    m = F.pad(m[..., 1:], (0, 1))  # key t is masked by the decision of token t+1
    L = m.shape[-1]
    bias = m[..., None, :].expand(*m.shape[:-1], L, L)
    eye = torch.eye(L, dtype=torch.bool, device=m.device)
    return bias.masked_fill(eye, 0.0)


def target_compression(step: int, total_steps: int, target_cr: float) -> tuple[float, float]:
    """Eq. (D8) schedule: ``CR(n) = 1 + (CR − 1)·min(1, n/N)`` and the prior ``1 − 1/CR(n)``."""
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
    target_cr = _check_float("target_cr", target_cr)
    if target_cr < 1:
        raise ValueError(f"target_cr must be ≥ 1, got {target_cr}")
    cr = 1.0 + (target_cr - 1.0) * min(1.0, step / total_steps)
    return cr, 1.0 - 1.0 / cr


def dmc_loss(decisions: torch.Tensor, prior: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (D8): ``decisions (n_layers, B)`` per-layer mean (straight-through) decisions of each sequence (the
    official ``layer_decisions``); returns ``(loss, achieved CR = 1/(1 − mean α))`` (eq. D9, detached)."""
    if decisions.dim() != 2:
        raise ValueError(f"decisions must have shape (n_layers, B), got {tuple(decisions.shape)}")
    loss = (prior - decisions.float().mean(dim=0)).clamp(min=0).mean()
    cr = 1.0 / (1.0 - decisions.detach().float().mean())
    return loss, cr


def dmc_pool(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str = "train", temperature: float = 0.1,
             window: int = WINDOW, init_val: float = INIT_VAL, eps: float = BF16_EPS, noise: bool = True,
             generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training-time DMC layer (official ``DynamicPooler.downsample``) on pre-RoPE ``q, k, v (B, H, L, D)``.

    ``mode="train"``: relaxed decisions α̃ (eq. D5, Gumbel noise unless ``noise=False``), partial accumulations
    (D6) and the soft mask (D7). ``mode="eval"``: straight-through hard decisions, hard mask (−50000).
    Returns ``(k̃, ṽ, bias, α)``: pooled keys/values ``(B, H, L, D)`` (the key's last feature is left as is;
    callers drop it), the additive bias ``(B, H, L, L)`` without the causal mask, and ``α (B, H, L)``.
    """
    if mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    if q.dim() != 4 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share a shape (B, H, L, D), got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    B, H, L, D = q.shape
    logits = k[..., -1] - init_val
    if mode == "train":
        noisy = gumbel_sigmoid(logits, temperature, noise=noise, generator=generator)
        probs = torch.sigmoid(noisy)
    else:
        noisy = logits
        probs = straight_through(torch.sigmoid(logits))
    w = torch.sigmoid(q[..., -1] + init_val) + eps  # eq. D2
    kv = torch.cat([k, v], dim=-1).permute(2, 0, 1, 3).reshape(L, B * H, 2 * D)
    a = probs[..., 1:].permute(2, 0, 1).reshape(L - 1, B * H)
    pooled = poolsum(kv, a, w.permute(2, 0, 1).reshape(L, B * H), window)
    pooled = pooled.reshape(L, B, H, 2 * D).permute(1, 2, 0, 3)
    bias = dmc_attention_bias(noisy, hard=(mode == "eval"))
    return pooled[..., :D], pooled[..., D:], bias, probs


# -------------------------------------------------------------------------------- the DMC tiny model
class DMCCache:
    """Per-layer DMC inference state for :class:`DMCTinyLM`: the ragged compressed cache (keys after RoPE at
    the position of their last merged token, values, ``lens (B, H)``) and the running-sum / ring-buffer state
    of eq. D4 (``window=None``: D3)."""

    def __init__(self, n_layers: int, window: int | None = WINDOW):
        self.n_layers = n_layers
        self.window = _check_window(window)
        self.keys: list[torch.Tensor | None] = [None] * n_layers
        self.values: list[torch.Tensor | None] = [None] * n_layers
        self.lens: list[torch.Tensor | None] = [None] * n_layers
        self.state: list[dict | None] = [None] * n_layers
        self.seen_tokens = 0
        self.decisions: list[list[torch.Tensor]] = [[] for _ in range(n_layers)]

    def compression_ratio(self) -> float:
        """Tokens seen / slots held, over all layers, rows and heads (eq. D9)."""
        slots = sum(float(l.float().sum()) for l in self.lens if l is not None)
        cnt = sum(l.numel() for l in self.lens if l is not None)
        return self.seen_tokens * cnt / slots if slots else 1.0

    def head_lengths(self) -> torch.Tensor:
        """``(n_layers, B, H)`` slots per head."""
        return torch.stack(self.lens)


class DMCTinyLM(nn.Module):
    """A DMC version of :class:`~refimpl.models.TinyLM`: the same weights (shared, not copied), with every
    attention replaced by DMC attention. Feature ``D-1`` of each head's query/key is the importance/decision
    neuron (eqs. D1-D2); it is removed from the attention dot product and from RoPE, as in the official code.

    * ``forward(tokens, mode="train", temperature=0.1)`` → ``(logits, decisions)``: the relaxed training
      forward (eqs. D5-D7); ``decisions (n_layers, B, H, L)`` the relaxed α̃. ``mode="eval"``: hard decisions
      (official evaluation mode: straight-through α, mask −50000), which computes exactly what the
      append-or-merge cache computes; ``mode="none"``: no compression (the neuron is only removed).
    * ``prefill(tokens, cache)`` / ``decode_step(token, cache)``: inference with the append-or-merge cache
      (:class:`DMCCache`).
    """

    def __init__(self, base: TinyLM, window: int | None = WINDOW, init_val: float = INIT_VAL, eps: float = BF16_EPS):
        super().__init__()
        if not isinstance(base, TinyLM):
            raise TypeError(f"base must be a TinyLM, got {type(base).__name__}")
        self.base = base
        self.cfg = base.cfg
        self.window = _check_window(window)
        self.init_val = _check_float("init_val", init_val)
        self.eps = _check_float("eps", eps)
        self.force_alpha: float | None = None  # set to r ≥ 1 to force "merge every r tokens" (uniform baseline)

    # -- per-layer pieces
    def _qkv(self, attn, x):
        b, l, _ = x.shape
        return [p(x).view(b, l, attn.n_heads, attn.d_head).transpose(1, 2) for p in (attn.q_proj, attn.k_proj, attn.v_proj)]

    def _rope(self, x, positions):
        """RoPE with the last neuron zeroed before and after (official rotary kernel)."""
        x = torch.cat([x[..., :-1], torch.zeros_like(x[..., -1:])], dim=-1)
        x = apply_rope(x, positions, self.cfg.rope_theta)
        return torch.cat([x[..., :-1], torch.zeros_like(x[..., -1:])], dim=-1)

    def _forced_logits(self, b, h, l, start, device, dtype):
        r = self.force_alpha
        pos = torch.arange(start, start + l, device=device)
        merge = (pos % int(r)) != 0
        return torch.where(merge, 10.0, -10.0).to(dtype).expand(b, h, l) + self.init_val

    def _attn_train(self, attn, x, positions, mode, temperature, generator):
        q, k, v = self._qkv(attn, x)  # (B, H, L, D), pre-RoPE
        B, H, L, D = q.shape
        if self.force_alpha is not None:
            k = torch.cat([k[..., :-1], self._forced_logits(B, H, L, int(positions[0]), x.device, x.dtype)[..., None]], -1)
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        if mode == "none":
            kp, vp = k, v
            bias = torch.zeros(B, H, L, L, dtype=x.dtype, device=x.device)
            probs = torch.zeros(B, H, L, dtype=x.dtype, device=x.device)
        else:
            kp, vp, bias, probs = dmc_pool(q, k, v, mode, temperature, self.window or L, self.init_val, self.eps,
                                           generator=generator)
        qr, kr = self._rope(q, positions), self._rope(kp, positions)
        mask = bias.masked_fill(~causal, float("-inf"))
        out = F.scaled_dot_product_attention(qr, kr, vp, attn_mask=mask)
        out = out.transpose(1, 2).reshape(B, L, H * D)
        return attn.o_proj(out), probs

    def forward(self, tokens: torch.Tensor, mode: str = "train", temperature: float = 0.1,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if mode not in ("train", "eval", "none"):
            raise ValueError(f"mode must be 'train', 'eval' or 'none', got {mode!r}")
        self.base._check_tokens(tokens)
        L = tokens.shape[1]
        positions = torch.arange(L, device=tokens.device)
        x = self.base.embed_tokens(tokens.long())
        decisions = []
        for blk in self.base.layers:
            a, p = self._attn_train(blk.self_attn, blk.input_layernorm(x), positions, mode, temperature, generator)
            h = x + a
            x = h + blk.mlp(blk.post_attention_layernorm(h))
            decisions.append(p)
        return self.base.lm_head(self.base.norm(x)), torch.stack(decisions)

    # -- inference with the append-or-merge cache
    def new_cache(self) -> DMCCache:
        return DMCCache(self.cfg.n_layers, self.window or None)

    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor, cache: DMCCache | None = None, backend: str = "auto"
                ) -> tuple[torch.Tensor, DMCCache]:
        """Process the prompt ``tokens (B, L)`` token by token through the append-or-merge cache (all ``L``
        steps of eq. D4 at once per layer with :func:`dmc_compress`, which is exact because a layer's cache
        update does not depend on its attention output). Returns last-position logits ``(B, vocab)``."""
        cache = self.new_cache() if cache is None else cache
        if cache.seen_tokens:
            raise ValueError("prefill needs an empty DMCCache")
        self.base._check_tokens(tokens)
        B, L = tokens.shape
        positions = torch.arange(L, device=tokens.device)
        x = self.base.embed_tokens(tokens.long())
        for li, blk in enumerate(self.base.layers):
            attn = blk.self_attn
            q, k, v = self._qkv(attn, blk.input_layernorm(x))
            H, D = q.shape[1], q.shape[-1]
            if self.force_alpha is not None:
                k = k.clone()
                k[..., -1] = self._forced_logits(B, H, L, 0, x.device, x.dtype)
            keys, values, lens, ko, vo, slot = dmc_compress(q[..., -1].contiguous(), k.contiguous(), v.contiguous(),
                                                            self.window or None, self.init_val, self.eps,
                                                            backend=backend)
            # attention of query i over the cache at time i: closed slots + the current slot (ko[i] at i)
            kr = self._rope(ko, positions)  # every step's slot value, rotated at that step's position
            seen = slot[..., None, :] < slot[..., :, None]  # (B,H,i,t): slot of t closed before i ...
            last = torch.ones_like(slot, dtype=torch.bool)
            last[..., :-1] = slot[..., 1:] != slot[..., :-1]  # ... and t is the last token written to it
            vis = (seen & last[..., None, :]) | torch.eye(L, dtype=torch.bool, device=x.device)
            out = F.scaled_dot_product_attention(self._rope(q, positions), kr, vo, attn_mask=vis)
            a = attn.o_proj(out.transpose(1, 2).reshape(B, L, H * D))
            h = x + a
            x = h + blk.mlp(blk.post_attention_layernorm(h))
            # rotated keys of the final cache: each slot at the position of its last token
            lastpos = torch.zeros(B, H, L, dtype=torch.long, device=x.device).scatter_reduce(
                2, slot, positions.expand(B, H, L).contiguous(), reduce="amax")
            cache.keys[li] = self._rope(keys, lastpos)
            cache.values[li], cache.lens[li] = values, lens
            cache.state[li] = self._state_after(q[..., -1], k, v, slot, L)
            cache.decisions[li].append((slot[..., 1:] == slot[..., :-1]))
        cache.seen_tokens = L
        return self.base.lm_head(self.base.norm(x))[:, -1], cache

    def _state_after(self, qd, k, v, slot, L):
        """Running sums and ring buffer of eq. D4 after the prompt (recomputed from the last ≤ W tokens)."""
        B, H, _, D = k.shape
        W = max(self.window, 1)
        w = torch.sigmoid(qd + self.init_val) + self.eps
        kz = torch.cat([k[..., :-1], torch.zeros_like(k[..., -1:])], dim=-1)
        kw, vw = kz * w[..., None], v * w[..., None]
        cur = slot[..., -1:]
        in_run = slot == cur  # tokens of the current (last) run
        run = in_run.sum(-1)
        t = torch.arange(L, device=k.device)
        in_win = in_run & ((t > L - 1 - self.window) if self.window else torch.ones_like(in_run))
        f = in_win.to(k.dtype)
        st = {"k_sum": (kw * f[..., None]).sum(2), "v_sum": (vw * f[..., None]).sum(2), "w_sum": (w * f).sum(2),
              "run": run, "ring_k": k.new_zeros(W, B, H, D), "ring_v": k.new_zeros(W, B, H, D),
              "ring_w": k.new_ones(W, B, H)}
        for s in range(max(0, L - W), L):
            st["ring_k"][s % W], st["ring_v"][s % W], st["ring_w"][s % W] = kw[:, :, s], vw[:, :, s], w[:, :, s]
        return st

    @torch.no_grad()
    def decode_step(self, token: torch.Tensor, cache: DMCCache) -> torch.Tensor:
        """One token per row ``(B,)`` at position ``cache.seen_tokens``: eq. D4 update then attention over the
        ragged cache (:func:`dmc_attention`). Returns ``(B, vocab)``."""
        if not isinstance(cache, DMCCache) or cache.seen_tokens == 0:
            raise ValueError("decode_step needs a DMCCache filled by prefill")
        tok = token.reshape(-1, 1)
        t = cache.seen_tokens
        pos = torch.tensor([t], device=tok.device)
        x = self.base.embed_tokens(tok.long())
        for li, blk in enumerate(self.base.layers):
            attn = blk.self_attn
            q, k, v = (z[:, :, 0] for z in self._qkv(attn, blk.input_layernorm(x)))  # (B, H, D)
            B, H, D = q.shape
            if self.force_alpha is not None:
                k = k.clone()
                k[..., -1] = self._forced_logits(B, H, 1, t, x.device, x.dtype)[..., 0]
            st, W = cache.state[li], max(self.window, 1)
            merge = dmc_decisions(k[..., -1], self.init_val)
            a = merge.to(k.dtype)
            w = torch.sigmoid(q[..., -1] + self.init_val) + self.eps
            kz = torch.cat([k[..., :-1], torch.zeros_like(k[..., -1:])], dim=-1)
            kw, vw = kz * w[..., None], v * w[..., None]
            st["run"] = torch.where(merge, st["run"], torch.zeros_like(st["run"])) + 1
            over = (st["run"] > self.window).to(k.dtype) if self.window else torch.zeros_like(a)
            r = t % W
            st["k_sum"] = st["k_sum"] * a[..., None] - over[..., None] * st["ring_k"][r] + kw
            st["v_sum"] = st["v_sum"] * a[..., None] - over[..., None] * st["ring_v"][r] + vw
            st["w_sum"] = st["w_sum"] * a - over * st["ring_w"][r] + w
            st["ring_k"][r], st["ring_v"][r], st["ring_w"][r] = kw, vw, w
            lens = cache.lens[li] + (~merge).long()
            idx = lens - 1
            keys, values = cache.keys[li], cache.values[li]
            if int(lens.max()) > keys.shape[2]:
                keys = torch.cat([keys, torch.zeros_like(keys[:, :, :1])], 2)
                values = torch.cat([values, torch.zeros_like(values[:, :, :1])], 2)
            knew = self._rope((st["k_sum"] / st["w_sum"][..., None])[:, :, None], pos)[:, :, 0]
            vnew = st["v_sum"] / st["w_sum"][..., None]
            gi = idx[..., None, None].expand(B, H, 1, D)
            keys = keys.scatter(2, gi, knew[:, :, None]); values = values.scatter(2, gi, vnew[:, :, None])
            cache.keys[li], cache.values[li], cache.lens[li] = keys, values, lens
            cache.decisions[li].append(merge[..., None])
            qr = self._rope(q[:, :, None], pos)[:, :, 0]
            o = dmc_attention(qr, keys, values, lens)
            h = x + attn.o_proj(o.reshape(B, 1, H * D))
            x = h + blk.mlp(blk.post_attention_layernorm(h))
        cache.seen_tokens += 1
        return self.base.lm_head(self.base.norm(x))[:, -1]

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, cache: DMCCache | None = None) -> torch.Tensor:
        """Greedy decoding with the append-or-merge cache → ``(B, max_new_tokens)``."""
        logits, cache = self.prefill(tokens, cache)
        out = []
        for i in range(max_new_tokens):
            nxt = logits.argmax(-1)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits = self.decode_step(nxt, cache)
        return torch.stack(out, 1)

    @classmethod
    def load(cls, path: str | None = None, **kwargs: Any) -> "DMCTinyLM":
        """Load a retrofitted checkpoint (default ``refimpl/models/weights/tiny_lm_dmc_cr2.safetensors``)."""
        import os
        from refimpl.models.tiny_lm import WEIGHTS_DIR, load_tiny_lm
        path = os.path.join(WEIGHTS_DIR, "tiny_lm_dmc_cr2.safetensors") if path is None else path
        return cls(load_tiny_lm(path), **kwargs).eval()


@torch.no_grad()
def evaluate_dmc(model: DMCTinyLM, task: Any, n: int = 50, context_len: int = 256, seed: int = 1234,
                 batch_size: int = 25, return_details: bool = False) -> tuple[float, float] | dict[str, Any]:
    """Exact-match accuracy of greedy decoding with the DMC append-or-merge cache on a corpus task, and the
    achieved compression ratio (tokens / slots at the end of decoding, averaged over the batches; eq. D9).
    The KV cache held is on average ``(prompt + answer) / CR`` slots per layer and head. ``task``: a task name
    (examples from :func:`refimpl.models.corpus.make_task`) or a list of ``corpus.Example``."""
    from refimpl.models.corpus import TOKENIZER, make_task
    if not isinstance(model, DMCTinyLM):
        raise TypeError(f"model must be a DMCTinyLM, got {type(model).__name__}")
    examples = make_task(task, n, context_len, seed) if isinstance(task, str) else list(task)
    if not examples:
        raise ValueError("task must be a task name or a non-empty list of Example")
    preds: list[str] = [""] * len(examples)
    groups: dict[tuple[int, int], list[int]] = {}
    enc = [TOKENIZER.encode(e.prompt) for e in examples]
    for i, (e, p) in enumerate(zip(examples, enc)):
        groups.setdefault((len(p), len(e.answer)), []).append(i)
    crs, heads = [], []
    device = next(model.parameters()).device
    for (_, alen), idx in groups.items():
        for s in range(0, len(idx), batch_size):
            chunk = idx[s:s + batch_size]
            toks = torch.tensor([enc[i] for i in chunk], dtype=torch.long, device=device)
            cache = model.new_cache()
            gen = model.generate(toks, alen, cache)
            for i, g in zip(chunk, gen):
                preds[i] = TOKENIZER.decode(g)
            crs.append((cache.compression_ratio(), len(chunk)))
            heads.append(cache.head_lengths().float().mean(1) / cache.seen_tokens)  # (n_layers, H) kept fraction
    answers = [e.answer for e in examples]
    acc = float(np.mean([p == a for p, a in zip(preds, answers)]))
    cr = float(sum(c * m for c, m in crs) / sum(m for _, m in crs))
    if not return_details:
        return acc, cr
    return {"accuracy": acc, "compression_ratio": cr, "kept_fraction": torch.stack(heads).mean(0),
            "predictions": preds, "answers": answers}
