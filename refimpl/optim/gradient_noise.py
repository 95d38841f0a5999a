"""Annealed Gaussian gradient noise (Neelakantan, Vilnis, Le, Sutskever, Kaiser, Kurach & Martens,
2015, arXiv:1511.06807).

At training step t = 0, 1, 2, ... every gradient coordinate receives fresh Gaussian noise whose
variance decays polynomially:

    (1) g_t  <- g_t + N(0, sigma_t^2)
    (2) sigma_t^2 = eta / (1 + t)^gamma            (eta in {0.01, 0.3, 1.0}, gamma = 0.55)

The paper combines it with gradient clipping; ``refimpl`` clips first, with the global-norm rule of
``torch.nn.utils.clip_grad_norm_`` (per parameter group), then adds the noise, so that the injected
variance is exactly (2):

    (3) ||g|| = sqrt(sum_k sum_{i in k} g_i^2)      (sum of the per-tensor sums of squares)
    (4) c     = min(1, max_norm / (||g|| + 1e-6))   (c = 1 without clipping)
    (5) d_i   = c * g_i + sigma_t * z_i,  z_i ~ N(0, 1) i.i.d.
    (6) b_i   <- mu * b_i + d_i,   d_i <- b_i       (heavy-ball momentum, as torch.optim.SGD; mu = 0: none)
    (7) p_i   <- p_i - lr * d_i

The critical loop is (3)-(7) on flat buffers, ``noisy_sgd_step``, with a ``backend`` argument:
``"numpy"`` (readable reference), ``"numba"`` (one fused parallel pass), ``"torch"``
(device-agnostic), ``"auto"``. The per-tensor reduction (3) reuses ``refimpl.optim.multi_tensor``.
The noise ``z`` is an input: ``gaussian_noise(n, seed=, step=, group=)`` draws it from a torch
generator seeded by (seed, group, step), so every backend sees the same numbers and an optimizer's
noise stream needs no state beyond its step counter (which makes ``state_dict`` round-trips exact).

``NoisySGD`` (SGD with momentum, clipping and noise; calls the torch backend on flat copies of the
parameters) and ``NoisyAdam`` (``torch.optim.Adam`` fed the clipped, noisy gradient (5)) are drop-in
``torch.optim.Optimizer`` subclasses.
"""
from __future__ import annotations

import numbers
from typing import Any, Callable, Iterable

import numpy as np
import torch
from numba import njit, prange

from refimpl._common.backend import resolve_backend
from refimpl._common.kernels import FASTMATH as _FASTMATH, PARALLEL_MIN as _PARALLEL_MIN
from refimpl._common.validate import check_floating
from refimpl.optim.multi_tensor import SegmentLayout, segment_sumsq

__all__ = ["noise_variance", "noise_std", "gaussian_noise", "clip_coefficient", "noisy_sgd_step",
           "NoisySGD", "NoisyAdam"]

_CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_


# ----------------------------------------------------------------------------- validation
def _real(value: Any, name: str, *, low: float = 0.0, strict: bool = False, high: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    bad = not np.isfinite(v) or (v <= low if strict else v < low) or (high is not None and v >= high)
    if bad:
        rng = f"{'>' if strict else '>='} {low}" + (f" and < {high}" if high is not None else "")
        raise ValueError(f"{name} must be a finite number {rng}, got {value!r}")
    return v


def _max_norm(value: Any) -> float | None:
    return None if value is None else _real(value, "max_grad_norm", strict=True)


# ----------------------------------------------------------------------------- schedule and noise
def noise_variance(t: Any, eta: float = 0.01, gamma: float = 0.55) -> Any:
    """sigma_t^2 = eta / (1 + t)^gamma (eq. 2). ``t``: a step >= 0 (int, or an integer array of
    steps); returns a float (or a float64 array of t's shape)."""
    eta = _real(eta, "eta")
    gamma = _real(gamma, "gamma")
    ta = np.asarray(t)
    if not (np.issubdtype(ta.dtype, np.integer) and not ta.dtype == np.bool_) or (ta < 0).any():
        raise ValueError(f"t must be a non-negative integer step (or array of steps), got {t!r}")
    out = eta / (1.0 + ta.astype(np.float64)) ** gamma
    return float(out) if out.ndim == 0 else out


def noise_std(t: Any, eta: float = 0.01, gamma: float = 0.55) -> Any:
    """sigma_t = sqrt(eta / (1 + t)^gamma), the standard deviation of the noise (eqs. 1-2)."""
    return np.sqrt(noise_variance(t, eta, gamma))


def _stream_seed(seed: int, step: int, group: int) -> int:
    """A 63-bit seed per (seed, group, step): SeedSequence hashes the triple, so neighbouring steps
    get unrelated generator states."""
    state = np.random.SeedSequence([seed, group, step]).generate_state(2, np.uint32)
    return int((int(state[0]) << 31) ^ int(state[1])) & ((1 << 63) - 1)


def gaussian_noise(n: int, *, seed: int, step: int, group: int = 0, dtype: torch.dtype = torch.float32,
                   device: Any = None) -> torch.Tensor:
    """The standard normal vector z (n,) of step ``step`` of parameter group ``group`` (eq. 5),
    from a fresh torch generator on ``device`` seeded by (seed, group, step). Same arguments, same
    numbers (on one device type: CPU and CUDA generators differ)."""
    for name, v in (("n", n), ("seed", seed), ("step", step), ("group", group)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ValueError(f"{name} must be a non-negative integer, got {v!r}")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    device = torch.device("cpu" if device is None else device)
    gen = torch.Generator(device=device).manual_seed(_stream_seed(int(seed), int(step), int(group)))
    return torch.randn(int(n), generator=gen, dtype=dtype, device=device)


# ----------------------------------------------------------------------------- clipping (3)-(4)
def clip_coefficient(grad: Any, max_grad_norm: float | None, layout: SegmentLayout | None = None,
                     backend: str = "auto") -> Any:
    """c = min(1, max_norm / (||g|| + 1e-6)) (eqs. 3-4) of a flat gradient (n,); 1.0 when
    ``max_grad_norm`` is None. ||g||^2 is the sum of per-tensor sums of squares (multi_tensor).
    Returns a float for arrays, a 0-d tensor (no host sync) for the torch backend."""
    max_norm = _max_norm(max_grad_norm)
    layout = layout or SegmentLayout([(grad.shape[0],)])
    backend = resolve_backend(backend, grad)
    if max_norm is None:
        return 1.0
    if backend == "torch":
        sq = segment_sumsq(torch.as_tensor(grad), layout, backend="torch")
        return torch.clamp(max_norm / (sq.sum().sqrt() + _CLIP_EPS), max=1.0)
    g = np.asarray(grad)
    if backend == "numba" and g.shape[0] < _PARALLEL_MIN:
        total = _sumsq_serial(g)          # small: a serial sweep (no thread wake-up); same sum (3)
    else:
        total = float(segment_sumsq(g, layout, backend=backend).sum())  # float64 accumulators
    return min(1.0, max_norm / (float(np.sqrt(total)) + _CLIP_EPS))


@njit(cache=True, fastmath=_FASTMATH)
def _sumsq_serial(x):
    """sum_i x_i^2 in float64 (eq. 3 summed over all segments); a private helper: multi_tensor's
    segment_sumsq is always parallel over segments."""
    acc = 0.0
    for i in range(x.shape[0]):
        acc += np.float64(x[i]) * np.float64(x[i])
    return acc


# ----------------------------------------------------------------------------- update (5)-(7)
@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _sgd_numba(p, g, z, lr, sigma, c):
    T = p.dtype.type
    lr_, s_, c_ = T(lr), T(sigma), T(c)
    for i in prange(p.shape[0]):
        p[i] -= lr_ * (c_ * g[i] + s_ * z[i])                        # (5), (7)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _sgd_momentum_numba(p, g, z, buf, lr, sigma, c, mu):
    T = p.dtype.type
    lr_, s_, c_, mu_ = T(lr), T(sigma), T(c), T(mu)
    for i in prange(p.shape[0]):
        b = mu_ * buf[i] + (c_ * g[i] + s_ * z[i])                   # (5), (6)
        buf[i] = b
        p[i] -= lr_ * b                                               # (7)


# Below PARALLEL_MIN elements waking the worker threads costs more than the work (see kernels.py):
# the same kernels compiled serially.
_sgd_serial = njit(cache=True, fastmath=_FASTMATH)(_sgd_numba.py_func)
_sgd_momentum_serial = njit(cache=True, fastmath=_FASTMATH)(_sgd_momentum_numba.py_func)


def _check_flat(x: Any, name: str, like: Any) -> None:
    check_floating(x, name)
    if type(x) is not type(like) or x.dtype != like.dtype:
        raise TypeError(f"{name} must be a {type(like).__name__} of dtype {like.dtype}, got "
                        f"{type(x).__name__} of dtype {x.dtype}")
    if tuple(x.shape) != tuple(like.shape):
        raise ValueError(f"{name} must have the shape of param {tuple(like.shape)}, got {tuple(x.shape)}")


def noisy_sgd_step(param: Any, grad: Any, noise: Any, *, lr: float, sigma: float, momentum: float = 0.0,
                   momentum_buffer: Any = None, max_grad_norm: float | None = None,
                   layout: SegmentLayout | None = None, backend: str = "auto") -> Any:
    """One step of SGD on the clipped, noisy gradient (eqs. 3-7), in place on flat buffers.

    param, grad, noise, momentum_buffer: flat (n,) arrays or tensors of one floating dtype (the
    parameters of K tensors laid end to end as ``layout`` says; default one segment). ``noise`` is
    the standard normal z of eq. (5) (see ``gaussian_noise``), scaled here by ``sigma`` = sigma_t
    (``noise_std``). ``momentum_buffer`` (required iff momentum > 0) is updated in place.
    Computes in param's dtype; returns ``param``.
    """
    check_floating(param, "param")
    if param.ndim != 1:
        raise ValueError(f"param must be a flat (1-D) vector, got shape {tuple(param.shape)}")
    _check_flat(grad, "grad", param)
    _check_flat(noise, "noise", param)
    lr = _real(lr, "lr", strict=True)
    sigma = _real(sigma, "sigma")
    mu = _real(momentum, "momentum", high=1.0)
    if mu > 0:
        if momentum_buffer is None:
            raise ValueError("momentum_buffer is required when momentum > 0")
        _check_flat(momentum_buffer, "momentum_buffer", param)
    layout = layout or SegmentLayout([(param.shape[0],)])
    if layout.numel != param.shape[0]:
        raise ValueError(f"layout covers {layout.numel} elements, param has {param.shape[0]}")
    backend = resolve_backend(backend, param)
    c = clip_coefficient(grad, max_grad_norm, layout, backend)

    if backend == "torch":
        p, g, z = (torch.as_tensor(a) for a in (param, grad, noise))
        d = g * c if max_grad_norm is not None else g.clone()
        d.add_(z, alpha=sigma)                                         # (5)
        if mu > 0:
            b = torch.as_tensor(momentum_buffer)
            b.mul_(mu).add_(d)                                         # (6)
            d = b
        p.add_(d, alpha=-lr)                                           # (7)
        return param

    p, g, z = np.asarray(param), np.asarray(grad), np.asarray(noise)
    b = None if mu == 0 else np.asarray(momentum_buffer)
    if backend == "numpy":
        T = p.dtype.type
        d = T(c) * g + T(sigma) * z                                    # (5)
        if b is not None:
            b *= T(mu)
            b += d                                                     # (6)
            d = b
        p -= T(lr) * d                                                 # (7)
    else:
        par = p.shape[0] >= _PARALLEL_MIN
        if b is None:
            (_sgd_numba if par else _sgd_serial)(p, g, z, lr, sigma, c)
        else:
            (_sgd_momentum_numba if par else _sgd_momentum_serial)(p, g, z, b, lr, sigma, c, mu)
    return param


# ----------------------------------------------------------------------------- optimizers
def _check_hparams(eta: Any, gamma: Any, max_grad_norm: Any, seed: Any) -> None:
    _real(eta, "eta")
    _real(gamma, "gamma")
    _max_norm(max_grad_norm)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")


class NoisySGD(torch.optim.Optimizer):
    """SGD (optional heavy-ball momentum as ``torch.optim.SGD``, dampening 0) on the clipped gradient
    plus annealed Gaussian noise, eqs. (1)-(7). ``eta=0`` gives plain (clipped) SGD.

    Per parameter group: ``lr``, ``momentum``, ``eta``, ``gamma``, ``max_grad_norm`` (None: no
    clipping; the norm is over the group's gradients) and the group's step counter ``noise_step``
    (t of eq. 2, 0 at the first step). The noise of step t is ``gaussian_noise(n, seed=seed,
    step=t, group=index)`` over the group's parameters that have a gradient, in order.
    ``backend``: the backend of ``noisy_sgd_step`` (default torch, on flat copies).
    """

    def __init__(self, params: Iterable, lr: float = 0.01, momentum: float = 0.0, eta: float = 0.01,
                 gamma: float = 0.55, max_grad_norm: float | None = None, seed: int = 0,
                 backend: str = "torch"):
        _real(lr, "lr", strict=True)
        _real(momentum, "momentum", high=1.0)
        _check_hparams(eta, gamma, max_grad_norm, seed)
        resolve_backend(backend, torch.zeros(1))
        self.seed, self.backend = int(seed), backend
        super().__init__(params, dict(lr=lr, momentum=momentum, eta=eta, gamma=gamma,
                                      max_grad_norm=max_grad_norm, noise_step=0))

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            t = group["noise_step"]
            layout = SegmentLayout.of(params)
            flat_p = layout.flatten([p.detach() for p in params])
            flat_g = layout.flatten([p.grad for p in params])
            z = gaussian_noise(layout.numel, seed=self.seed, step=t, group=gi, dtype=flat_p.dtype,
                               device=flat_p.device)
            buf = None
            if group["momentum"] > 0:
                bufs = [self.state[p].get("momentum_buffer") for p in params]
                buf = layout.flatten([torch.zeros_like(p) if b is None else b for p, b in zip(params, bufs)])
            arrays = (flat_p, flat_g, z, buf)
            if self.backend in ("numpy", "numba"):
                arrays = tuple(None if a is None else a.cpu().numpy() for a in arrays)
            noisy_sgd_step(arrays[0], arrays[1], arrays[2], lr=group["lr"],
                           sigma=float(noise_std(t, group["eta"], group["gamma"])),
                           momentum=group["momentum"], momentum_buffer=arrays[3],
                           max_grad_norm=group["max_grad_norm"], layout=layout, backend=self.backend)
            new_p = torch.as_tensor(arrays[0]).to(flat_p.device)
            for p, v in zip(params, layout.unflatten(new_p)):
                p.copy_(v)
            if buf is not None:
                new_b = torch.as_tensor(arrays[3]).to(flat_p.device)
                for p, v in zip(params, layout.unflatten(new_b)):
                    self.state[p]["momentum_buffer"] = v.clone()
            group["noise_step"] = t + 1
        return loss


class NoisyAdam(torch.optim.Adam):
    """``torch.optim.Adam`` fed the clipped, noisy gradient (eqs. 3-5): the paper's usual setting.
    Extra per-group options ``eta``, ``gamma``, ``max_grad_norm``, the counter ``noise_step``, and
    ``seed``; all other arguments are Adam's. The gradients in ``p.grad`` are replaced by the noisy
    ones (as the paper's g_t <- g_t + noise)."""

    def __init__(self, params: Iterable, lr: float = 1e-3, eta: float = 0.01, gamma: float = 0.55,
                 max_grad_norm: float | None = None, seed: int = 0, **adam_kwargs: Any):
        _check_hparams(eta, gamma, max_grad_norm, seed)
        self.seed = int(seed)
        extra = dict(eta=eta, gamma=gamma, max_grad_norm=max_grad_norm, noise_step=0)
        super().__init__(params, lr=lr, **adam_kwargs)
        self.defaults.update(extra)
        for group in self.param_groups:
            for k, v in extra.items():
                group.setdefault(k, v)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for gi, group in enumerate(self.param_groups):
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            t = group["noise_step"]
            layout = SegmentLayout.of(params)
            flat_g = layout.flatten([p.grad for p in params])
            c = clip_coefficient(flat_g, group["max_grad_norm"], layout, backend="torch")
            z = gaussian_noise(layout.numel, seed=self.seed, step=t, group=gi, dtype=flat_g.dtype,
                               device=flat_g.device)
            d = flat_g * c if group["max_grad_norm"] is not None else flat_g
            d = d.add(z, alpha=float(noise_std(t, group["eta"], group["gamma"])))       # (5)
            for p, v in zip(params, layout.unflatten(d)):
                p.grad.copy_(v)
            group["noise_step"] = t + 1
        super().step()
        return loss
