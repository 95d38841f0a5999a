"""LARS: Layer-wise Adaptive Rate Scaling (You, Gitman & Ginsburg, 2017, "Large Batch Training of
Convolutional Networks", arXiv:1708.03888).

For each layer (parameter tensor) k with weights w_k, gradient g_k, weight decay beta, trust
coefficient eta, global learning rate gamma, momentum m and dampening delta:

    (1) lambda_k = eta * ||w_k|| / (||g_k|| + beta * ||w_k|| + eps)       the local (trust) ratio;
                   lambda_k = 1 when ||w_k|| = 0 or ||g_k|| = 0
    (2) lambda_k <- min(lambda_k / gamma, 1)                              optional LARC clipping
    (3) d_i      = lambda_k * (g_i + beta * w_i)                          the rescaled gradient
    (4) v_i      <- m * v_i + (1 - delta) * d_i                           (v_i = d_i at the first step)
    (5) u_i      = d_i + m * v_i  (Nesterov)   or   u_i = v_i
    (6) w_i      <- w_i - gamma * u_i

Equation numbers are those of the chapter (notebooks/optim/lars.ipynb). This is timm's ``Lars``
(the reference the book verifies against): the global rate multiplies the
*output* of the momentum buffer. The paper's Algorithm 1 puts it *inside* the buffer:

    (7) v_i <- m * v_i + gamma_t * lambda_k * (g_i + beta * w_i),    w_i <- w_i - v_i

which is the same trajectory while gamma is constant and differs while it changes (warm-up, decay);
``lr_in_momentum=True`` selects (7). The paper schedules gamma with a linear warm-up over W steps
followed by a polynomial decay of power p (p = 2 in the paper) until step T:

    (8) gamma_t = gamma_0 * (t + 1) / W                      for t < W
        gamma_t = gamma_0 * (1 - (t - W) / (T - W))^p        for W <= t < T,   0 afterwards

timm adapts a group only when its weight decay is non-zero or ``always_adapt=True``; a group with
weight decay 0 (biases and normalization gains, by the usual convention of ``lars_param_groups``)
then takes plain momentum-SGD steps. The paper applies (1) to every layer.

The critical loop is :func:`lars_step`, a functional step on flat buffers (every tensor of a group
laid end to end, see :class:`refimpl.optim.multi_tensor.SegmentLayout`): the per-tensor norm
reductions (1) fused with the element-wise update (3)-(6). Backends: ``"numpy"`` (readable
reference: ``segment_sumsq`` and one NumPy expression per tensor), ``"numba"`` (two parallel
kernels: both norms in one sweep, then the fused update in one sweep), ``"torch"`` (device-agnostic,
flat tensors). :class:`LARS` is a ``torch.optim.Optimizer`` that runs the torch backend.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, Iterable, Optional

import numpy as np
import torch
from numba import njit, prange

from refimpl._common.backend import resolve_backend
from refimpl._common.kernels import FASTMATH as _FASTMATH, PARALLEL_MIN
from refimpl._common.validate import check_finite
from refimpl.optim.multi_tensor import SegmentLayout, segment_sumsq

__all__ = ["lars_trust_ratio", "lars_step", "LARS", "warmup_poly_lr", "warmup_poly_scheduler",
           "lars_param_groups"]

# Elements per work item of the Numba kernels: segments are cut into chunks of at most this many
# elements so that one big tensor still spreads over all threads.
_CHUNK = 1 << 15


# ----------------------------------------------------------------------------- validation
def _real(value: Any, name: str, *, low: float = 0.0, low_open: bool = False, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    bad_low = v <= low if low_open else v < low
    if not math.isfinite(v) or bad_low or v > high:
        lo = f"> {low}" if low_open else f">= {low}"
        hi = "" if high == math.inf else f" and <= {high}"
        raise ValueError(f"{name} must be a finite number {lo}{hi}, got {value!r}")
    return v


def _flag(value: Any, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def _check_hyper(lr, momentum, dampening, weight_decay, nesterov, trust_coeff, eps, trust_clip,
                 always_adapt=False, lr_in_momentum=False) -> dict:
    h = dict(lr=_real(lr, "lr"), momentum=_real(momentum, "momentum"),
             dampening=_real(dampening, "dampening", high=1.0),
             weight_decay=_real(weight_decay, "weight_decay"),
             nesterov=_flag(nesterov, "nesterov"),
             trust_coeff=_real(trust_coeff, "trust_coeff", low_open=True),
             eps=_real(eps, "eps"), trust_clip=_flag(trust_clip, "trust_clip"),
             always_adapt=_flag(always_adapt, "always_adapt"),
             lr_in_momentum=_flag(lr_in_momentum, "lr_in_momentum"))
    if h["nesterov"] and (h["momentum"] <= 0 or h["dampening"] != 0):
        raise ValueError(f"nesterov=True needs momentum > 0 and dampening = 0, got momentum="
                         f"{h['momentum']}, dampening={h['dampening']}")
    return h


# ----------------------------------------------------------------------------- trust ratio (1)-(2)
def lars_trust_ratio(w_norm: Any, g_norm: Any, *, trust_coeff: float = 1e-3, weight_decay: float = 0.0,
                     eps: float = 1e-8, trust_clip: bool = False, lr: float = 1.0) -> Any:
    """The local rate of eq. (1), clipped by eq. (2) when ``trust_clip``.

    w_norm, g_norm: per-tensor norms, (K,) NumPy arrays or tensors (any floating dtype); the result
    has their type and dtype. A tensor whose weight or gradient norm is 0 gets ratio 1 (timm's and
    NVIDIA apex's convention: no information, no rescaling); LARC clipping still applies to it.
    """
    trust_coeff = _real(trust_coeff, "trust_coeff", low_open=True)
    weight_decay, eps, lr = _real(weight_decay, "weight_decay"), _real(eps, "eps"), _real(lr, "lr")
    if isinstance(w_norm, torch.Tensor):
        ratio = trust_coeff * w_norm / (g_norm + w_norm * weight_decay + eps)             # (1)
        ratio = torch.where((w_norm > 0) & (g_norm > 0), ratio, torch.ones_like(ratio))
        if trust_clip:
            ratio = torch.clamp(ratio / lr if lr > 0 else torch.full_like(ratio, math.inf), max=1.0)  # (2)
        return ratio
    w_norm, g_norm = np.asarray(w_norm), np.asarray(g_norm)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = trust_coeff * w_norm / (g_norm + w_norm * weight_decay + eps)             # (1)
    ratio = np.where((w_norm > 0) & (g_norm > 0), ratio, 1.0).astype(w_norm.dtype)
    if trust_clip:
        ratio = np.minimum(ratio / lr if lr > 0 else np.inf, 1.0).astype(w_norm.dtype)  # (2)
    return ratio


# ----------------------------------------------------------------------------- numba kernels
def _chunks(layout: SegmentLayout) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Work items of the Numba kernels: (lo, hi, segment) of chunks of <= _CHUNK elements that never
    cross a segment boundary. Cached on the layout (a private attribute)."""
    cached = getattr(layout, "_lars_chunks", None)
    if cached is not None:
        return cached
    lo, hi, seg = [], [], []
    for k, (a, b) in enumerate(zip(layout.offsets[:-1].tolist(), layout.offsets[1:].tolist())):
        for s in range(a, b, _CHUNK):
            lo.append(s)
            hi.append(min(s + _CHUNK, b))
            seg.append(k)
    out = (np.array(lo, np.int64), np.array(hi, np.int64), np.array(seg, np.int64))
    layout._lars_chunks = out
    return out


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _sumsq2_chunk(w, g, lo, hi):
    T = w.dtype.type
    ws, gs = w[lo:hi], g[lo:hi]     # slices indexed from 0: no wrap-around checks, so the loop vectorises
    sw = T(0)
    sg = T(0)
    for i in range(ws.shape[0]):
        sw += ws[i] * ws[i]
        sg += gs[i] * gs[i]
    return np.float64(sw), np.float64(sg)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _sumsq2_parallel(w, g, clo, chi, pw, pg):
    for j in prange(clo.shape[0]):
        pw[j], pg[j] = _sumsq2_chunk(w, g, clo[j], chi[j])


@njit(cache=True, fastmath=_FASTMATH)
def _sumsq2_serial(w, g, clo, chi, pw, pg):
    for j in range(clo.shape[0]):
        pw[j], pg[j] = _sumsq2_chunk(w, g, clo[j], chi[j])


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _update_chunk(w, g, v, lo, hi, r, fresh, wd, mom, damp, lr, nesterov, has_mom, lr_in_mom):
    T = w.dtype.type
    r, wd, mom, lr = T(r), T(wd), T(mom), T(lr)
    keep = T(1.0 - damp)
    ws, gs = w[lo:hi], g[lo:hi]     # slices indexed from 0: no wrap-around checks, so the loops vectorise
    n = ws.shape[0]
    if not has_mom:
        s = T(-lr * r)
        for i in range(n):
            ws[i] += s * (gs[i] + wd * ws[i])                                    # (3), (6)
        return
    vs = v[lo:hi]
    # (7): the buffer accumulates gamma * d, and w moves by the buffer itself
    scale = r * lr if lr_in_mom else r
    step = T(1) if lr_in_mom else lr
    first = step * (T(1) + mom) if nesterov else step     # at the first step v = d, so u = (1 + m) d or d
    if fresh:
        for i in range(n):
            d = scale * (gs[i] + wd * ws[i])                                     # (3)
            vs[i] = d                                                            # (4), first step
            ws[i] -= first * d                                                   # (5), (6)
    elif nesterov:
        for i in range(n):
            d = scale * (gs[i] + wd * ws[i])                                     # (3)
            b = mom * vs[i] + keep * d                                           # (4)
            vs[i] = b
            ws[i] -= step * (d + mom * b)                                        # (5), (6)
    else:
        for i in range(n):
            d = scale * (gs[i] + wd * ws[i])                                     # (3)
            b = mom * vs[i] + keep * d                                           # (4)
            vs[i] = b
            ws[i] -= step * b                                                    # (5), (6)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _update_parallel(w, g, v, clo, chi, cseg, ratio, fresh, wd, mom, damp, lr, nesterov, has_mom, lr_in_mom):
    for j in prange(clo.shape[0]):
        k = cseg[j]
        _update_chunk(w, g, v, clo[j], chi[j], ratio[k], fresh[k], wd, mom, damp, lr, nesterov, has_mom,
                      lr_in_mom)


@njit(cache=True, fastmath=_FASTMATH)
def _update_serial(w, g, v, clo, chi, cseg, ratio, fresh, wd, mom, damp, lr, nesterov, has_mom, lr_in_mom):
    for j in range(clo.shape[0]):
        k = cseg[j]
        _update_chunk(w, g, v, clo[j], chi[j], ratio[k], fresh[k], wd, mom, damp, lr, nesterov, has_mom,
                      lr_in_mom)


# ----------------------------------------------------------------------------- the functional step
def _fresh_mask(fresh: Any, k: int) -> np.ndarray:
    if isinstance(fresh, (bool, np.bool_)):
        return np.full(k, bool(fresh))
    arr = np.asarray(fresh.detach().cpu() if isinstance(fresh, torch.Tensor) else fresh)
    if arr.dtype != np.bool_ or arr.shape != (k,):
        raise ValueError(f"fresh must be a bool or a bool array of shape ({k},) (one flag per tensor), "
                         f"got {arr.dtype} {arr.shape}")
    return arr


def lars_step(w: Any, g: Any, v: Optional[Any], layout: SegmentLayout, *, lr: float,
              momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
              nesterov: bool = False, trust_coeff: float = 1e-3, eps: float = 1e-8,
              trust_clip: bool = False, adapt: bool = True, fresh: Any = False,
              lr_in_momentum: bool = False, check_finite_grad: bool = True,
              backend: str = "auto") -> Any:
    """One LARS step, eqs. (1)-(6) (or (7) with ``lr_in_momentum``), in place on flat buffers.

    w, g, v: flat (n,) NumPy arrays or tensors of one floating dtype — weights, gradients and momentum
        buffers of the K tensors described by ``layout`` (``v`` may be None when ``momentum == 0``).
        ``w`` and ``v`` are updated in place; ``g`` is only read.
    adapt: apply the trust ratio (1)-(2); False gives plain momentum SGD with L2 weight decay
        (timm's behaviour for a group with ``weight_decay == 0`` and ``always_adapt=False``).
    fresh: bool, or (K,) bools: tensors whose momentum buffer is new this step (v = d, eq. 4).
    check_finite_grad: raise ValueError when w or g holds NaN/inf (seen in the norms; on CPU only).
    Returns the per-tensor ratios lambda_k, (K,): float64 NumPy for the numpy/numba backends, a
    tensor of the input's dtype and device for torch (all ones when ``adapt`` is False).
    """
    if not isinstance(layout, SegmentLayout):
        raise TypeError(f"layout must be a SegmentLayout, got {type(layout).__name__}")
    h = _check_hyper(lr, momentum, dampening, weight_decay, nesterov, trust_coeff, eps, trust_clip,
                     lr_in_momentum=lr_in_momentum)
    adapt = _flag(adapt, "adapt")
    check = _flag(check_finite_grad, "check_finite_grad")
    layout.check(w, "w")
    layout.check(g, "g")
    has_mom = h["momentum"] != 0
    bufs = [("g", g)] + ([("v", v)] if has_mom else [])
    for name, x in bufs:
        if x is None:
            raise ValueError(f"{name} (the momentum buffer) is required when momentum != 0")
        layout.check(x, name)
        if type(x) is not type(w) or x.dtype != w.dtype:
            raise TypeError(f"w and {name} must be of one type and dtype, got {type(w).__name__} {w.dtype} "
                            f"and {type(x).__name__} {x.dtype}")
    fresh_k = _fresh_mask(fresh, len(layout))
    backend = resolve_backend(backend, w)
    if backend == "torch":
        return _step_torch(torch.as_tensor(w), torch.as_tensor(g),
                           torch.as_tensor(v) if has_mom else None, layout, h, adapt, fresh_k, check)
    wa, ga = np.asarray(w), np.asarray(g)
    va = np.asarray(v) if has_mom else wa[:0]
    if backend == "numpy":
        ratio = _step_numpy(wa, ga, va, layout, h, adapt, fresh_k, check)
    else:
        ratio = _step_numba(wa, ga, va, layout, h, adapt, fresh_k, check)
    return ratio


def _ratios_np(sw, sg, h, adapt, check):
    if check and not (np.isfinite(sw).all() and np.isfinite(sg).all()):
        raise ValueError("w or g contains NaN or infinity (a per-tensor norm is not finite)")
    if not adapt:
        return np.ones_like(sw)
    return lars_trust_ratio(np.sqrt(sw), np.sqrt(sg), trust_coeff=h["trust_coeff"], weight_decay=h["weight_decay"],
                            eps=h["eps"], trust_clip=h["trust_clip"], lr=h["lr"])


def _step_numpy(w, g, v, layout, h, adapt, fresh, check):
    """The readable reference: norms with the shared segment_sumsq, then one tensor at a time."""
    ratio = _ratios_np(segment_sumsq(w, layout, backend="numpy"), segment_sumsq(g, layout, backend="numpy"),
                       h, adapt, check)                                                 # (1)-(2)
    T = w.dtype.type
    m, lr, wd = T(h["momentum"]), T(h["lr"]), T(h["weight_decay"])
    for k, (lo, hi) in enumerate(zip(layout.offsets[:-1], layout.offsets[1:])):
        wk, gk = w[lo:hi], g[lo:hi]
        d = T(ratio[k]) * (gk + wd * wk)                                                # (3)
        if h["lr_in_momentum"]:
            d = lr * d                                                                  # (7): gamma inside v
        if m != 0:
            vk = v[lo:hi]
            vk[:] = d if fresh[k] else m * vk + T(1 - h["dampening"]) * d               # (4)
            u = d + m * vk if h["nesterov"] else vk                                     # (5)
        else:
            u = d
        wk -= (u if h["lr_in_momentum"] else lr * u)                                    # (6) / (7)
    return ratio


def _step_numba(w, g, v, layout, h, adapt, fresh, check):
    clo, chi, cseg = _chunks(layout)
    pw, pg = np.empty(len(clo)), np.empty(len(clo))
    parallel = layout.numel >= PARALLEL_MIN
    (_sumsq2_parallel if parallel else _sumsq2_serial)(w, g, clo, chi, pw, pg)          # (1): both norms, one sweep
    sw = np.bincount(cseg, weights=pw, minlength=len(layout))
    sg = np.bincount(cseg, weights=pg, minlength=len(layout))
    ratio = _ratios_np(sw, sg, h, adapt, check)                                         # (1)-(2)
    (_update_parallel if parallel else _update_serial)(
        w, g, v, clo, chi, cseg, ratio, fresh, h["weight_decay"], h["momentum"], h["dampening"], h["lr"],
        h["nesterov"], h["momentum"] != 0, h["lr_in_momentum"])                         # (3)-(7)
    return ratio


def _step_torch(w, g, v, layout, h, adapt, fresh, check):
    """Device-agnostic: per-tensor norms, then element-wise ops on the flat tensors."""
    sw, sg = segment_sumsq(w, layout, backend="torch"), segment_sumsq(g, layout, backend="torch")
    if check and w.device.type == "cpu":
        check_finite(torch.stack([sw.sum(), sg.sum()]), "w or g")
    if adapt:
        ratio = lars_trust_ratio(sw.sqrt(), sg.sqrt(), trust_coeff=h["trust_coeff"],
                                 weight_decay=h["weight_decay"], eps=h["eps"], trust_clip=h["trust_clip"],
                                 lr=h["lr"])                                            # (1)-(2)
    else:
        ratio = torch.ones(len(layout), dtype=w.dtype, device=w.device)
    sizes = torch.as_tensor(layout.sizes, device=w.device)
    d = g.add(w, alpha=h["weight_decay"]) if h["weight_decay"] != 0 else g.clone()
    if adapt:
        d.mul_(torch.repeat_interleave(ratio, sizes, output_size=layout.numel))        # (3)
    if h["lr_in_momentum"]:
        d.mul_(h["lr"])                                                                 # (7)
    m = h["momentum"]
    if m != 0:
        if fresh.all():
            v.copy_(d)                                                                  # (4), first step
        elif not fresh.any():
            v.mul_(m).add_(d, alpha=1 - h["dampening"])                                 # (4)
        else:
            fe = torch.repeat_interleave(torch.as_tensor(fresh, device=w.device), sizes, output_size=layout.numel)
            v.copy_(torch.where(fe, d, v * m + (1 - h["dampening"]) * d))
        u = d.add_(v, alpha=m) if h["nesterov"] else v                                  # (5)
    else:
        u = d
    w.add_(u, alpha=-1.0 if h["lr_in_momentum"] else -h["lr"])                          # (6) / (7)
    return ratio


# ----------------------------------------------------------------------------- the optimizer
class LARS(torch.optim.Optimizer):
    """LARS as a drop-in ``torch.optim.Optimizer``, with timm's ``Lars`` arguments and defaults.

    Per step and parameter group, the parameters that have a gradient are gathered into flat buffers
    (one per dtype and device) and updated by :func:`lars_step` with the torch backend. The state is
    timm's and ``torch.optim.SGD``'s (``state[p]["momentum_buffer"]``), so state dicts are exchangeable.

    lr: global rate gamma (eq. 6); momentum m; dampening delta; weight_decay beta (L2, added to the
    gradient before the rescaling); trust_coeff eta (eq. 1); eps; trust_clip: LARC clipping (eq. 2);
    always_adapt: rescale groups with weight_decay == 0 too (timm adapts only groups with decay; the
    paper adapts every layer); lr_in_momentum: the paper's Algorithm 1 form (7) instead of timm's (4)-(6).
    After each step, ``trust_ratios`` holds the lambda_k used, one (K,) tensor per flat buffer.
    """

    def __init__(self, params: Iterable, lr: float = 1.0, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, trust_coeff: float = 1e-3,
                 eps: float = 1e-8, trust_clip: bool = False, always_adapt: bool = False,
                 lr_in_momentum: bool = False):
        defaults = _check_hyper(lr, momentum, dampening, weight_decay, nesterov, trust_coeff, eps, trust_clip,
                                always_adapt, lr_in_momentum)
        super().__init__(params, defaults)
        self.trust_ratios: list[torch.Tensor] = []

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.trust_ratios = []
        for group in self.param_groups:
            group.setdefault("lr_in_momentum", False)      # state dicts of timm's Lars lack this key
            h = _check_hyper(group["lr"], group["momentum"], group["dampening"], group["weight_decay"],
                             group["nesterov"], group["trust_coeff"], group["eps"], group["trust_clip"],
                             group["always_adapt"], group["lr_in_momentum"])
            buckets: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("LARS does not support sparse gradients")
                buckets.setdefault((p.device, p.dtype), []).append(p)
            for ps in buckets.values():
                self.trust_ratios.append(self._step_bucket(ps, h))
        return loss

    def _step_bucket(self, ps: list[torch.Tensor], h: dict) -> torch.Tensor:
        layout = SegmentLayout.of(ps)
        w = layout.flatten([p.detach() for p in ps])
        g = layout.flatten([p.grad for p in ps])
        has_mom = h["momentum"] != 0
        v, fresh = None, False
        if has_mom:
            old = [self.state[p].get("momentum_buffer") for p in ps]
            fresh = np.array([b is None for b in old])
            v = layout.flatten([torch.zeros_like(p) if b is None else b for p, b in zip(ps, old)])
        ratio = lars_step(w, g, v, layout, lr=h["lr"], momentum=h["momentum"], dampening=h["dampening"],
                          weight_decay=h["weight_decay"], nesterov=h["nesterov"], trust_coeff=h["trust_coeff"],
                          eps=h["eps"], trust_clip=h["trust_clip"],
                          adapt=h["weight_decay"] != 0 or h["always_adapt"], fresh=fresh,
                          lr_in_momentum=h["lr_in_momentum"], check_finite_grad=False, backend="torch")
        for p, wk in zip(ps, layout.unflatten(w)):
            p.copy_(wk)
        if has_mom:
            for p, vk in zip(ps, layout.unflatten(v)):
                buf = self.state[p].get("momentum_buffer")
                if buf is None:
                    self.state[p]["momentum_buffer"] = vk.clone()
                else:
                    buf.copy_(vk)
        return ratio


# ----------------------------------------------------------------------------- schedule (8), groups
def warmup_poly_lr(step: int, base_lr: float, warmup_steps: int, total_steps: int, power: float = 2.0) -> float:
    """The global rate gamma_t of eq. (8) at step t = ``step`` (0-based): linear warm-up over
    ``warmup_steps`` steps, then polynomial decay of power ``power`` to 0 at ``total_steps``."""
    for name, val in (("step", step), ("warmup_steps", warmup_steps), ("total_steps", total_steps)):
        if isinstance(val, bool) or not isinstance(val, numbers.Integral):
            raise TypeError(f"{name} must be an int, got {type(val).__name__}")
        if val < 0:
            raise ValueError(f"{name} must be >= 0, got {val}")
    if total_steps <= warmup_steps:
        raise ValueError(f"total_steps must exceed warmup_steps, got total_steps={total_steps}, "
                         f"warmup_steps={warmup_steps}")
    base_lr, power = _real(base_lr, "base_lr"), _real(power, "power", low_open=True)
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    return base_lr * max(0.0, 1.0 - (step - warmup_steps) / (total_steps - warmup_steps)) ** power


def warmup_poly_scheduler(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int,
                          power: float = 2.0) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` that multiplies each group's initial lr by eq. (8)'s factor; call its
    ``step()`` after every ``optimizer.step()``."""
    warmup_poly_lr(0, 1.0, warmup_steps, total_steps, power)   # validates the arguments
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda t: warmup_poly_lr(t, 1.0, warmup_steps, total_steps, power))


def lars_param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """timm's convention: tensors with ndim <= 1 (biases, normalization gains) go to a group with
    weight_decay 0 — with ``always_adapt=False`` LARS then leaves them unscaled — and the rest to a
    group with ``weight_decay``."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    weight_decay = _real(weight_decay, "weight_decay")
    ps = [p for p in model.parameters() if p.requires_grad]
    return [{"params": [p for p in ps if p.ndim > 1], "weight_decay": weight_decay},
            {"params": [p for p in ps if p.ndim <= 1], "weight_decay": 0.0}]
