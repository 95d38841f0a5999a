"""LAMB: layer-wise adaptive moments for large-batch training (You et al., ICLR 2020, arXiv:1904.00962).

For every parameter tensor (a "layer") w_k with gradient g_k, at step t, with betas (b1, b2), eps,
weight decay wd, learning rate lr and a scaling function phi:

    (1) m <- b1 * m + (1 - b1) * g                     (first moment, elementwise)
    (2) v <- b2 * v + (1 - b2) * g^2                   (second moment, elementwise)
    (3) u = m * s1 / (sqrt(v * s2) + eps) + wd * w     (Adam direction plus decoupled weight decay)
    (4) phi_k = min(||w_k||, clamp_value)              (phi = identity when clamp_value is None)
    (5) r_k = phi_k / ||u_k||,  and r_k = 1 if phi_k == 0 or ||u_k|| == 0   (layer-wise trust ratio)
    (6) w <- w - lr * c_t * r_k * u

``bias_correction`` chooses (s1, s2, c_t):

* ``"moments"`` (the paper's Algorithm 2): s1 = 1/(1 - b1^t), s2 = 1/(1 - b2^t), c_t = 1, i.e.
  u = m_hat / (sqrt(v_hat) + eps) + wd * w.
* ``"lr"`` (``torch_optimizer.Lamb(debias=True)``): s1 = s2 = 1 and the factor
  c_t = sqrt(1 - b2^t) / (1 - b1^t) multiplies the learning rate *after* the trust ratio.
* ``"none"`` (``torch_optimizer.Lamb`` default, "paper v3"): s1 = s2 = c_t = 1.

``adam=True`` forces r_k = 1 (the ratio is still computed and reported): Adam with decoupled decay.

The critical loop is :func:`lamb_step`, a functional step over the K tensors of a parameter group
laid end to end in flat buffers (:class:`~refimpl.optim.multi_tensor.SegmentLayout`): one fused pass
(1)-(3) that also reduces ||w_k||^2 and ||u_k||^2, then the per-tensor scaled update (6) with the
shared ``segment_axpy``. Backends: ``"numpy"`` (readable reference, one NumPy call per tensor for the
reductions), ``"numba"`` (two kernels over fixed-size chunks of the flat vector, so one large tensor
still uses every core; each chunk of 8192 elements is reduced in the input dtype and the chunks'
partial sums are combined in float64; serial below ``PARALLEL_MIN`` elements, where waking
the worker threads costs more than the work), ``"torch"`` (device-agnostic; what :class:`Lamb` uses).
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import numba
from numba import njit, prange

from refimpl._common.backend import resolve_backend
from refimpl._common.kernels import FASTMATH as _FASTMATH, PARALLEL_MIN
from refimpl._common.validate import check_betas, check_positive
from refimpl.optim.multi_tensor import SegmentLayout, segment_axpy, segment_sumsq

__all__ = ["lamb_step", "trust_ratio", "bias_correction_factors", "Lamb", "BIAS_CORRECTIONS"]

BIAS_CORRECTIONS = ("moments", "lr", "none")
# Elements per work item of the Numba kernel: large enough to amortise the scheduling, small enough
# that a single big tensor splits over all cores.
_CHUNK = 1 << 13


# ----------------------------------------------------------------------------- validation
def _check_hparams(lr: float, betas: Sequence[float], eps: float, weight_decay: float,
                   clamp_value: float | None, bias_correction: str) -> tuple:
    lr = check_positive(lr, "lr")
    b1, b2 = check_betas(betas)
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (0.0 <= eps < math.inf):
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) \
            or not (0.0 <= weight_decay < math.inf):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if clamp_value is not None:
        clamp_value = check_positive(clamp_value, "clamp_value")
    if bias_correction not in BIAS_CORRECTIONS:
        raise ValueError(f"bias_correction must be one of {BIAS_CORRECTIONS}, got {bias_correction!r}")
    return lr, (b1, b2), float(eps), float(weight_decay), clamp_value


def bias_correction_factors(step: Any, betas: Sequence[float], bias_correction: str
                            ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(s1, s2, c_t) of eq. (3) and (6) for step counts ``step`` (int or (K,) ints >= 1), float64."""
    t = np.atleast_1d(np.asarray(step, dtype=np.float64))
    if (t < 1).any() or (t != np.round(t)).any():
        raise ValueError(f"step must hold integers >= 1, got {step!r}")
    b1, b2 = betas
    one = np.ones_like(t)
    if bias_correction == "moments":
        return 1.0 / (1.0 - b1 ** t), 1.0 / (1.0 - b2 ** t), one
    if bias_correction == "lr":
        return one, one, np.sqrt(1.0 - b2 ** t) / (1.0 - b1 ** t)
    return one, one, one


def trust_ratio(weight_norm: Any, update_norm: Any, clamp_value: float | None = 10.0) -> Any:
    """Eqs. (4)-(5): r_k = min(||w_k||, clamp_value) / ||u_k||, or 1 where either norm is 0.

    Args: per-tensor norms (K,) (arrays or tensors, same type). Returns (K,) of the same type/dtype.
    """
    if isinstance(weight_norm, torch.Tensor):
        phi = weight_norm if clamp_value is None else weight_norm.clamp(max=clamp_value)
        ok = (phi > 0) & (update_norm > 0)
        return torch.where(ok, phi / torch.where(ok, update_norm, torch.ones_like(update_norm)),
                           torch.ones_like(phi))
    wn, un = np.asarray(weight_norm), np.asarray(update_norm)
    phi = wn if clamp_value is None else np.minimum(wn, clamp_value)
    ok = (phi > 0) & (un > 0)
    return np.where(ok, phi / np.where(ok, un, 1.0), 1.0)


# ----------------------------------------------------------------------------- numba kernels
@njit(cache=True, fastmath=_FASTMATH, error_model="numpy", inline="always")
def _direction_chunk(c, p, g, m, v, u, seg_s1, seg_s2, b1, b2, eps, wd, chunk_lo, chunk_hi, chunk_seg,
                     wsq, usq):
    """Eqs. (1)-(3) on one chunk; the chunk's sums of w^2 and u^2 (in T, returned as float64)."""
    T = p.dtype.type
    b1t, b2t, c1, c2 = T(b1), T(b2), T(1.0 - b1), T(1.0 - b2)
    epst, wdt = T(eps), T(wd)
    k = chunk_seg[c]
    s1, s2 = T(seg_s1[k]), T(seg_s2[k])
    aw = T(0)   # a chunk's partial sums in T (chunks are short); summed over chunks in float64
    au = T(0)
    lo, hi = chunk_lo[c], chunk_hi[c]
    # slices indexed from 0: the loop carries no wrap-around checks and vectorises
    pc, gc, mc, vc, uc = p[lo:hi], g[lo:hi], m[lo:hi], v[lo:hi], u[lo:hi]
    for i in range(hi - lo):
        gi = gc[i]
        mi = b1t * mc[i] + c1 * gi                              # (1)
        vi = b2t * vc[i] + c2 * gi * gi                         # (2)
        mc[i] = mi
        vc[i] = vi
        wi = pc[i]
        ui = mi * s1 / (math.sqrt(vi * s2) + epst) + wdt * wi   # (3)
        uc[i] = ui
        aw += wi * wi
        au += ui * ui
    wsq[c] = np.float64(aw)
    usq[c] = np.float64(au)


@njit(parallel=True, cache=True, fastmath=_FASTMATH, error_model="numpy")
def _direction_parallel(p, g, m, v, u, seg_s1, seg_s2, b1, b2, eps, wd, chunk_lo, chunk_hi, chunk_seg, wsq, usq):
    for c in prange(chunk_lo.shape[0]):
        _direction_chunk(c, p, g, m, v, u, seg_s1, seg_s2, b1, b2, eps, wd, chunk_lo, chunk_hi, chunk_seg, wsq, usq)


@njit(cache=True, fastmath=_FASTMATH, error_model="numpy")
def _direction_serial(p, g, m, v, u, seg_s1, seg_s2, b1, b2, eps, wd, chunk_lo, chunk_hi, chunk_seg, wsq, usq):
    for c in range(chunk_lo.shape[0]):
        _direction_chunk(c, p, g, m, v, u, seg_s1, seg_s2, b1, b2, eps, wd, chunk_lo, chunk_hi, chunk_seg, wsq, usq)


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _update_chunk(c, p, a, u, chunk_lo, chunk_hi, chunk_seg):
    T = p.dtype.type
    ak = T(a[chunk_seg[c]])
    pc, uc = p[chunk_lo[c]:chunk_hi[c]], u[chunk_lo[c]:chunk_hi[c]]
    for i in range(pc.shape[0]):
        pc[i] += ak * uc[i]                                     # (6)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _update_parallel(p, a, u, chunk_lo, chunk_hi, chunk_seg):
    for c in prange(chunk_lo.shape[0]):
        _update_chunk(c, p, a, u, chunk_lo, chunk_hi, chunk_seg)


@njit(cache=True, fastmath=_FASTMATH)
def _update_serial(p, a, u, chunk_lo, chunk_hi, chunk_seg):
    for c in range(chunk_lo.shape[0]):
        _update_chunk(c, p, a, u, chunk_lo, chunk_hi, chunk_seg)


def _chunks(offsets: np.ndarray, chunk: int = _CHUNK) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Split every segment into pieces of at most ``chunk`` elements: (lo, hi, segment) arrays."""
    sizes = np.diff(offsets)
    counts = np.maximum(1, -(-sizes // chunk))
    seg = np.repeat(np.arange(len(sizes), dtype=np.int64), counts)
    first = np.repeat(offsets[:-1] - np.concatenate([[0], np.cumsum(counts)[:-1]]) * chunk, counts)
    lo = first + np.arange(seg.size, dtype=np.int64) * chunk
    hi = np.minimum(lo + chunk, offsets[1:][seg])
    return lo.astype(np.int64), hi.astype(np.int64), seg


# ----------------------------------------------------------------------------- public API
def _check_buffers(param, grad, exp_avg, exp_avg_sq, layout) -> None:
    names = ("param", "grad", "exp_avg", "exp_avg_sq")
    bufs = (param, grad, exp_avg, exp_avg_sq)
    for name, b in zip(names, bufs):
        layout.check(b, name)
    for name, b in zip(names[1:], bufs[1:]):
        if type(b) is not type(param) or b.dtype != param.dtype:
            raise TypeError(f"{name} must have param's type and dtype ({type(param).__name__} {param.dtype}), "
                            f"got {type(b).__name__} {b.dtype}")
    if isinstance(param, np.ndarray) and not all(b.flags.c_contiguous for b in bufs):
        raise ValueError("param, grad, exp_avg and exp_avg_sq must be C-contiguous flat arrays")


def lamb_step(param: Any, grad: Any, exp_avg: Any, exp_avg_sq: Any, layout: SegmentLayout,
              step: int | Sequence[int], lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
              eps: float = 1e-6, weight_decay: float = 0.0, clamp_value: float | None = 10.0,
              bias_correction: str = "moments", adam: bool = False,
              backend: str = "auto") -> tuple[Any, Any, Any]:
    """One LAMB step (eqs. 1-6) on K tensors stored end to end in flat buffers, **in place**.

    Args:
        param, grad, exp_avg, exp_avg_sq: flat (n,) arrays or tensors of one floating dtype, n =
            ``layout.numel``; param, exp_avg (m) and exp_avg_sq (v) are updated in place.
        layout: where each of the K tensors lives.
        step: the step count t >= 1 *after* this step (int, or (K,) ints when tensors differ).
        lr, betas, eps, weight_decay: as in Adam(W); clamp_value: upper clip of phi(||w||) in (4),
            None for the identity; bias_correction: "moments" | "lr" | "none" (module docstring);
            adam: force r = 1.
        backend: "numpy" | "numba" | "torch" | "auto" (torch for tensors, numba for arrays).
    Returns:
        ``(weight_norm, update_norm, trust_ratio)``, each (K,): ||w_k|| before the update, ||u_k||,
        and r_k of eq. (5) (before ``adam`` overrides it). float64 arrays for numpy/numba, param's
        dtype for torch.
    """
    lr, betas, eps, weight_decay, clamp_value = _check_hparams(lr, betas, eps, weight_decay,
                                                               clamp_value, bias_correction)
    _check_buffers(param, grad, exp_avg, exp_avg_sq, layout)
    backend = resolve_backend(backend, param)
    k = len(layout)
    s1, s2, ct = bias_correction_factors(step, betas, bias_correction)
    if s1.size not in (1, k):
        raise ValueError(f"step must be an int or hold one count per tensor ({k}), got {s1.size}")
    s1, s2, ct = (np.broadcast_to(a, (k,)).copy() for a in (s1, s2, ct))
    b1, b2 = betas

    if backend == "torch":
        pt = torch.as_tensor(param)
        gt, mt, vt = (torch.as_tensor(b) for b in (grad, exp_avg, exp_avg_sq))
        mt.mul_(b1).add_(gt, alpha=1 - b1)                                     # (1)
        vt.mul_(b2).addcmul_(gt, gt, value=1 - b2)                             # (2)
        sizes = torch.as_tensor(layout.sizes, device=pt.device)
        if bias_correction == "moments":
            rep = lambda a: torch.repeat_interleave(torch.as_tensor(a, dtype=pt.dtype, device=pt.device), sizes)  # noqa: E731
            u = (mt * rep(s1)) / ((vt * rep(s2)).sqrt_().add_(eps))            # (3)
        else:
            u = mt / vt.sqrt().add_(eps)
        if weight_decay != 0:
            u.add_(pt, alpha=weight_decay)
        wn = segment_sumsq(pt, layout, backend="torch").sqrt()
        un = segment_sumsq(u, layout, backend="torch").sqrt()
        r = trust_ratio(wn, un, clamp_value)                                   # (4), (5)
        scale = -lr * torch.as_tensor(ct, dtype=pt.dtype, device=pt.device) * (torch.ones_like(r) if adam else r)
        segment_axpy(pt, scale, u, layout, backend="torch")                    # (6)
        return wn, un, r

    p, g, m, v = (np.asarray(b) for b in (param, grad, exp_avg, exp_avg_sq))
    T = p.dtype.type
    if backend == "numpy":
        m *= T(b1)
        m += T(1 - b1) * g                                                     # (1)
        v *= T(b2)
        v += T(1 - b2) * g * g                                                 # (2)
        u = np.empty_like(p)
        for j, (lo, hi) in enumerate(zip(layout.offsets[:-1], layout.offsets[1:])):
            u[lo:hi] = m[lo:hi] * T(s1[j]) / (np.sqrt(v[lo:hi] * T(s2[j])) + T(eps)) \
                + T(weight_decay) * p[lo:hi]                                   # (3)
        wn = np.sqrt(segment_sumsq(p, layout, backend="numpy"))
        un = np.sqrt(segment_sumsq(u, layout, backend="numpy"))
    else:
        lo, hi, seg = _chunks(layout.offsets)
        u = np.empty_like(p)
        wsq = np.empty(lo.size)
        usq = np.empty(lo.size)
        parallel = p.size >= PARALLEL_MIN and numba.get_num_threads() > 1
        (_direction_parallel if parallel else _direction_serial)(p, g, m, v, u, s1, s2, b1, b2, eps,
                                                                 weight_decay, lo, hi, seg, wsq, usq)
        wn = np.sqrt(np.bincount(seg, weights=wsq, minlength=k))
        un = np.sqrt(np.bincount(seg, weights=usq, minlength=k))
    r = trust_ratio(wn, un, clamp_value)                                       # (4), (5)
    scale = -lr * ct * (np.ones_like(r) if adam else r)
    if backend == "numpy":
        segment_axpy(p, scale, u, layout, backend="numpy")                     # (6)
    else:   # chunked like pass 1 (segment_axpy's numba kernel splits by tensor, not by chunk)
        (_update_parallel if parallel else _update_serial)(p, scale, u, lo, hi, seg)
    return wn, un, r


class Lamb(torch.optim.Optimizer):
    """LAMB as a drop-in ``torch.optim.Optimizer`` (eqs. 1-6), built on :func:`lamb_step`.

    Every hyper-parameter is a param-group key, so groups can differ (e.g. ``adam=True`` and
    ``weight_decay=0`` for biases and norm gains: the "exclude from layer adaptation" of BERT's LAMB).

    Args:
        params: parameters or param-group dicts.
        lr: learning rate (> 0). betas: (b1, b2) in [0, 1). eps: >= 0 (default 1e-6, as the paper's
            BERT runs and torch_optimizer). weight_decay: decoupled decay >= 0.
        clamp_value: clip of phi(||w||) (default 10, as torch_optimizer; None: phi = identity).
        bias_correction: "moments" (default; the paper), "lr" (torch_optimizer debias=True) or
            "none" (torch_optimizer default). ``Lamb(..., bias_correction="none")`` with the same
            other arguments reproduces ``torch_optimizer.Lamb(...)``.
        adam: force the trust ratio to 1.

    State per parameter: ``step`` (int), ``exp_avg``, ``exp_avg_sq``, and the last ``weight_norm``,
    ``adam_norm``, ``trust_ratio`` (0-d tensors, for inspection).
    """

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.0, clamp_value: float | None = 10.0,
                 bias_correction: str = "moments", adam: bool = False):
        lr, betas, eps, weight_decay, clamp_value = _check_hparams(lr, betas, eps, weight_decay,
                                                                   clamp_value, bias_correction)
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, clamp_value=clamp_value,
                        bias_correction=bias_correction, adam=bool(adam))
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            _check_hparams(group["lr"], group["betas"], group["eps"], group["weight_decay"],
                           group["clamp_value"], group["bias_correction"])
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            by_dtype: dict[tuple, list] = {}
            for p in params:
                if p.grad.is_sparse:
                    raise RuntimeError("Lamb does not support sparse gradients")
                by_dtype.setdefault((p.dtype, p.device), []).append(p)
            for ps in by_dtype.values():
                self._step_tensors(ps, group)
        return loss

    def _step_tensors(self, ps: list[torch.Tensor], group: dict) -> None:
        steps = []
        for p in ps:
            state = self.state[p]
            if len(state) == 0:
                state["step"] = 0
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["step"] = int(state["step"]) + 1
            steps.append(state["step"])
        layout = SegmentLayout.of(ps)
        flat_p = layout.flatten([p.detach() for p in ps])
        flat_g = layout.flatten([p.grad for p in ps])
        flat_m = layout.flatten([self.state[p]["exp_avg"] for p in ps])
        flat_v = layout.flatten([self.state[p]["exp_avg_sq"] for p in ps])
        wn, un, r = lamb_step(flat_p, flat_g, flat_m, flat_v, layout, steps, lr=group["lr"],
                              betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                              clamp_value=group["clamp_value"], bias_correction=group["bias_correction"],
                              adam=group["adam"], backend="torch")
        for j, (p, np_, nm, nv) in enumerate(zip(ps, layout.unflatten(flat_p), layout.unflatten(flat_m),
                                                 layout.unflatten(flat_v))):
            state = self.state[p]
            p.copy_(np_)
            state["exp_avg"].copy_(nm)
            state["exp_avg_sq"].copy_(nv)
            state["weight_norm"], state["adam_norm"], state["trust_ratio"] = wn[j], un[j], r[j]
