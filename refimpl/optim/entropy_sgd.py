"""Entropy-SGD: Biasing Gradient Descent Into Wide Valleys (Chaudhari, Choromanska, Soatto, LeCun,
Baldassi, Borgs, Chayes, Sagun & Zecchina, ICLR 2017, arXiv:1611.01838).

Entropy-SGD minimises the negative *local entropy* of the loss f instead of f itself:

    (1) F(x; gamma) = log  int exp( -f(x') - gamma/2 * ||x - x'||^2 ) dx'
    (2) P(x'; x, gamma)  proportional to  exp( -f(x') - gamma/2 * ||x - x'||^2 )      (local Gibbs measure)
    (3) -grad F(x; gamma) = gamma * (x - <x'>_P)

<x'> is estimated with L steps of stochastic gradient Langevin dynamics (SGLD) started at x', mu = x:

    (4) x' <- x' - eta' * (grad f(x') - gamma * (x - x')) + sqrt(eta') * eps * N(0, I)
    (5) mu <- (1 - alpha) * mu + alpha * x'
    (6) x  <- x - eta * gamma * (x - mu)
    (7) gamma_t = gamma_0 * (1 + gamma_1)^t                                            (scoping)

What the official PyTorch code (ucla-vision/entropy-sgd, python/optim.py) computes, and what this
module implements by default, adds weight decay lambda and (Nesterov) momentum m with dampening delta
to both loops; for every element, with xi ~ N(0, 1), b the inner momentum buffer (zeroed every outer
step) and B the outer one:

    (8)  d  = grad f(x') + lambda * x'
         b <- m * b + (1 - delta) * d                  (only when m > 0)
         d <- d + m * b      (Nesterov)   or   d := b  (heavy ball: d *is* b, so b also takes the next two terms)
         d <- d - gamma * (x - x') + eps / sqrt(eta'/2) * xi
         x' <- x' - eta' * d
         mu <- beta * mu + (1 - beta) * x'             (beta = 0.75, i.e. alpha = 0.25 in (5))
    (9)  D  = s * (x - mu) + lambda * x                (s = 1 in the code, s = gamma in (6); D = grad f(x) when L = 0)
         B <- m * B + (1 - delta) * D                  (B starts as grad f(x_0), not 0)
         x <- x - eta * (D + m * B)   (Nesterov)   or   x <- x - eta * B

The critical loop is one inner SGLD iteration (8) on flat buffers: :func:`sgld_inner_step`, with
``backend="numpy"`` (readable reference), ``"numba"`` (one fused parallel pass), ``"torch"``
(device-agnostic in-place ops; what :class:`EntropySGD` calls) or ``"auto"`` (torch for tensors,
numba for arrays). :func:`entropy_outer_step` is the outer update (9). :class:`EntropySGD` is a
``torch.optim.Optimizer`` that needs a closure; it lays each parameter group end to end with
:class:`refimpl.optim.multi_tensor.SegmentLayout`. The update is purely element-wise, so no
per-segment reduction of the multi-tensor kernel is needed.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable

import numpy as np
import torch
from numba import njit, prange

from refimpl._common.backend import resolve_backend
from refimpl._common.kernels import FASTMATH as _FASTMATH, row_blocks
from refimpl._common.validate import check_flat_buffers
from refimpl.optim.multi_tensor import SegmentLayout

__all__ = ["scoped_gamma", "sgld_inner_step", "entropy_outer_step", "EntropySGD"]

_NO_MOMENTUM, _NESTEROV, _HEAVY_BALL = 0, 1, 2
# The step is memory-bound and one fused serial pass already runs at memory speed (measured on the 2-core
# CI machine: 1.8 ms for 2^20 float32 elements, 12x the NumPy reference); waking worker threads costs
# milliseconds when the cores are shared, so the parallel kernel starts only at 2^23 elements (32 MiB).
_PARALLEL_MIN = 1 << 23


# ----------------------------------------------------------------------------- validation
def _real(value: Any, name: str, lo: float, hi: float = math.inf, *, lo_open: bool = False,
          hi_open: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    ok = math.isfinite(v) and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi)
    if not ok:
        left, right = "(" if lo_open else "[", ")" if hi_open else "]"
        raise ValueError(f"{name} must lie in {left}{lo}, {hi}{right}, got {value!r}")
    return v


def _as_numpy_views(arrays: list[Any]) -> list[np.ndarray]:
    out = []
    for a in arrays:
        if isinstance(a, torch.Tensor):
            if a.device.type != "cpu":
                raise ValueError("the numpy and numba backends work on CPU buffers; use backend='torch' "
                                 f"for tensors on {a.device}")
            out.append(a.detach().numpy())
        else:
            out.append(a)
    return out


def _momentum_mode(momentum: float, nesterov: bool) -> int:
    if not isinstance(nesterov, (bool, np.bool_)):
        raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")
    if momentum == 0.0:
        return _NO_MOMENTUM
    return _NESTEROV if nesterov else _HEAVY_BALL


def scoped_gamma(gamma: float, scoping: float, t: int) -> float:
    """Eq. (7): the coupling gamma_t = gamma * (1 + scoping)^t after t outer steps."""
    _real(gamma, "gamma", 0.0)
    _real(scoping, "scoping", 0.0)
    if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or t < 0:
        raise ValueError(f"t must be a non-negative int, got {t!r}")
    return float(gamma) * (1.0 + float(scoping)) ** int(t)


# ----------------------------------------------------------------------------- numpy reference
def _inner_numpy(xp, grad, anchor, mu, buf, noise, gamma, sgld_lr, eps, mu_decay, momentum,
                 dampening, weight_decay, mode):
    T = xp.dtype.type
    d = grad + T(weight_decay) * xp if weight_decay > 0 else grad.copy()          # (8) loss gradient
    if mode != _NO_MOMENTUM:
        buf *= T(momentum)
        buf += T(1 - dampening) * d
        if mode == _NESTEROV:
            d = d + T(momentum) * buf
        else:
            d = buf                                                                 # aliased, as the code
    d += T(-gamma) * (anchor - xp)                                                  # coupling to x
    if noise is not None:
        d += T(eps / math.sqrt(0.5 * sgld_lr)) * noise                              # thermal noise
    xp += T(-sgld_lr) * d                                                           # SGLD step (4)
    mu *= T(mu_decay)
    mu += T(1 - mu_decay) * xp                                                      # running mean (5)


def _outer_numpy(x, direction, buf, lr, momentum, dampening, weight_decay, mode):
    T = x.dtype.type
    d = direction + T(weight_decay) * x if weight_decay > 0 else direction.copy()  # (9)
    if mode != _NO_MOMENTUM:
        buf *= T(momentum)
        buf += T(1 - dampening) * d
        d = d + T(momentum) * buf if mode == _NESTEROV else buf
    x += T(-lr) * d


# ----------------------------------------------------------------------------- numba kernels
# One element of eq. (8) / eq. (9), inlined into a serial kernel (small buffers: waking worker
# threads costs more than the work, and milliseconds on a busy machine) and a parallel one.
@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _inner_elem(x_i, g_i, a_i, mu_i, b_i, z_i, has_noise, wd, m, om_damp, g, c, step, beta,
                one_m_beta, mode):
    d = g_i + wd * x_i                                                              # (8)
    if mode != 0:
        b_i = m * b_i + om_damp * d
        if mode == 1:
            d = d + m * b_i
        else:
            d = b_i
    d = d + g * (a_i - x_i)
    if has_noise:
        d = d + c * z_i
    if mode == 2:
        b_i = d                                                                     # heavy ball: d is b
    x_i = x_i + step * d
    return x_i, beta * mu_i + one_m_beta * x_i, b_i


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _outer_elem(x_i, d_i, b_i, wd, m, om_damp, step, mode):
    d = d_i + wd * x_i                                                              # (9)
    if mode != 0:
        b_i = m * b_i + om_damp * d
        d = d + m * b_i if mode == 1 else b_i
    return x_i + step * d, b_i


@njit(cache=True, fastmath=_FASTMATH)
def _inner_serial(xp, grad, anchor, mu, buf, noise, has_noise, gamma, sgld_lr, eps, mu_decay,
                  momentum, dampening, weight_decay, mode):
    T = xp.dtype.type
    wd, m, om_damp = T(weight_decay), T(momentum), T(1.0 - dampening)
    g, c, step = T(-gamma), T(eps / math.sqrt(0.5 * sgld_lr)), T(-sgld_lr)
    beta, one_m_beta = T(mu_decay), T(1.0 - mu_decay)
    for i in range(xp.shape[0]):
        z = noise[i] if has_noise else T(0.0)
        xp[i], mu[i], buf[i] = _inner_elem(xp[i], grad[i], anchor[i], mu[i], buf[i], z, has_noise, wd, m,
                                           om_damp, g, c, step, beta, one_m_beta, mode)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _inner_parallel(xp, grad, anchor, mu, buf, noise, has_noise, gamma, sgld_lr, eps, mu_decay,
                    momentum, dampening, weight_decay, mode, nblocks):
    T = xp.dtype.type
    n = xp.shape[0]
    wd, m, om_damp = T(weight_decay), T(momentum), T(1.0 - dampening)
    g, c, step = T(-gamma), T(eps / math.sqrt(0.5 * sgld_lr)), T(-sgld_lr)
    beta, one_m_beta = T(mu_decay), T(1.0 - mu_decay)
    size = (n + nblocks - 1) // nblocks
    for blk in prange(nblocks):
        for i in range(blk * size, min(n, (blk + 1) * size)):
            z = noise[i] if has_noise else T(0.0)
            xp[i], mu[i], buf[i] = _inner_elem(xp[i], grad[i], anchor[i], mu[i], buf[i], z, has_noise, wd,
                                               m, om_damp, g, c, step, beta, one_m_beta, mode)


@njit(cache=True, fastmath=_FASTMATH)
def _outer_serial(x, direction, buf, lr, momentum, dampening, weight_decay, mode):
    T = x.dtype.type
    wd, m, om_damp, step = T(weight_decay), T(momentum), T(1.0 - dampening), T(-lr)
    for i in range(x.shape[0]):
        x[i], buf[i] = _outer_elem(x[i], direction[i], buf[i], wd, m, om_damp, step, mode)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _outer_parallel(x, direction, buf, lr, momentum, dampening, weight_decay, mode, nblocks):
    T = x.dtype.type
    n = x.shape[0]
    wd, m, om_damp, step = T(weight_decay), T(momentum), T(1.0 - dampening), T(-lr)
    size = (n + nblocks - 1) // nblocks
    for blk in prange(nblocks):
        for i in range(blk * size, min(n, (blk + 1) * size)):
            x[i], buf[i] = _outer_elem(x[i], direction[i], buf[i], wd, m, om_damp, step, mode)


# ----------------------------------------------------------------------------- torch path
def _inner_torch(xp, grad, anchor, mu, buf, noise, gamma, sgld_lr, eps, mu_decay, momentum,
                 dampening, weight_decay, mode):
    d = grad.add(xp, alpha=weight_decay) if weight_decay > 0 else grad.clone()     # (8)
    if mode != _NO_MOMENTUM:
        buf.mul_(momentum).add_(d, alpha=1 - dampening)
        if mode == _NESTEROV:
            d.add_(buf, alpha=momentum)
        else:
            d = buf                                                                 # aliased, as the code
    d.add_(anchor - xp, alpha=-gamma)
    if noise is not None:
        d.add_(noise, alpha=eps / math.sqrt(0.5 * sgld_lr))
    xp.add_(d, alpha=-sgld_lr)                                                      # (4)
    mu.mul_(mu_decay).add_(xp, alpha=1 - mu_decay)                                  # (5)


def _outer_torch(x, direction, buf, lr, momentum, dampening, weight_decay, mode):
    d = direction.add(x, alpha=weight_decay) if weight_decay > 0 else direction.clone()
    if mode != _NO_MOMENTUM:
        buf.mul_(momentum).add_(d, alpha=1 - dampening)
        d = d.add_(buf, alpha=momentum) if mode == _NESTEROV else buf
    x.add_(d, alpha=-lr)                                                            # (9)


# ----------------------------------------------------------------------------- public functional API
def sgld_inner_step(x_inner: Any, grad: Any, anchor: Any, mu: Any, buf: Any, noise: Any = None, *,
                    gamma: float, sgld_lr: float = 0.1, eps: float = 1e-4, mu_decay: float = 0.75,
                    momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                    nesterov: bool = True, backend: str = "auto") -> Any:
    """One inner SGLD iteration of Entropy-SGD, eq. (8) (eq. (4)-(5) with momentum and weight decay),
    in place on flat buffers.

    Args:
        x_inner: (n,) the Langevin iterate x' (updated in place).
        grad: (n,) grad f(x') at x_inner (read only).
        anchor: (n,) the outer weights x that x' is coupled to (read only).
        mu: (n,) running average of x' (updated in place).
        buf: (n,) inner momentum buffer b (updated in place; ignored when momentum == 0).
        noise: (n,) standard normal draws xi, or None (required when eps > 0).
        gamma: coupling (scope) gamma >= 0 of eq. (1).  sgld_lr: inner step size eta' > 0.
        eps: thermal noise; the step adds eta' * eps / sqrt(eta'/2) * xi = sqrt(2 eta') eps xi.
        mu_decay: beta in [0, 1): mu <- beta mu + (1 - beta) x'.
        momentum, dampening, weight_decay, nesterov: as in eq. (8).
        backend: "numpy" | "numba" | "torch" | "auto".

    All buffers share one type (NumPy arrays or tensors) and one floating dtype; the arithmetic runs
    in that dtype. Returns ``x_inner``.
    """
    bufs = {"x_inner": x_inner, "grad": grad, "anchor": anchor, "mu": mu, "buf": buf}
    if noise is not None:
        bufs["noise"] = noise
    check_flat_buffers(bufs)
    gamma = _real(gamma, "gamma", 0.0)
    sgld_lr = _real(sgld_lr, "sgld_lr", 0.0, lo_open=True)
    eps = _real(eps, "eps", 0.0)
    mu_decay = _real(mu_decay, "mu_decay", 0.0, 1.0, hi_open=True)
    momentum = _real(momentum, "momentum", 0.0, 1.0, hi_open=True)
    dampening = _real(dampening, "dampening", 0.0, 1.0)
    weight_decay = _real(weight_decay, "weight_decay", 0.0)
    mode = _momentum_mode(momentum, nesterov)
    if eps > 0 and noise is None:
        raise ValueError("noise must be given (standard normal draws, shape (n,)) when eps > 0")
    if eps == 0:
        noise = None
    backend = resolve_backend(backend, x_inner)
    if backend == "torch":
        t = [torch.as_tensor(a) for a in (x_inner, grad, anchor, mu, buf)]
        _inner_torch(*t, None if noise is None else torch.as_tensor(noise), gamma, sgld_lr, eps,
                     mu_decay, momentum, dampening, weight_decay, mode)
        return x_inner
    xa, ga, aa, ma, ba = _as_numpy_views([x_inner, grad, anchor, mu, buf])
    na = None if noise is None else _as_numpy_views([noise])[0]
    if backend == "numpy":
        _inner_numpy(xa, ga, aa, ma, ba, na, gamma, sgld_lr, eps, mu_decay, momentum, dampening,
                     weight_decay, mode)
    else:
        args = (xa, ga, aa, ma, ba, xa[:0] if na is None else na, na is not None, gamma, sgld_lr, eps,
                mu_decay, momentum, dampening, weight_decay, mode)
        nblocks = row_blocks(xa.shape[0], xa.shape[0], _PARALLEL_MIN)
        _inner_serial(*args) if nblocks == 1 else _inner_parallel(*args, nblocks)
    return x_inner


def entropy_outer_step(x: Any, direction: Any, buf: Any, *, lr: float, momentum: float = 0.0,
                       dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = True,
                       backend: str = "auto") -> Any:
    """The outer update of Entropy-SGD, eq. (9), in place on flat buffers.

    Args:
        x: (n,) weights (updated in place).
        direction: (n,) the local-entropy gradient s * (x - mu) (s = 1 as in the official code,
            s = gamma as in eq. (6)), or grad f(x) when L = 0 (read only).
        buf: (n,) outer momentum buffer B (updated in place; ignored when momentum == 0).
        lr: outer step size eta > 0.  momentum, dampening, weight_decay, nesterov: eq. (9).
        backend: "numpy" | "numba" | "torch" | "auto".

    Returns ``x``.
    """
    check_flat_buffers({"x": x, "direction": direction, "buf": buf})
    lr = _real(lr, "lr", 0.0, lo_open=True)
    momentum = _real(momentum, "momentum", 0.0, 1.0, hi_open=True)
    dampening = _real(dampening, "dampening", 0.0, 1.0)
    weight_decay = _real(weight_decay, "weight_decay", 0.0)
    mode = _momentum_mode(momentum, nesterov)
    backend = resolve_backend(backend, x)
    if backend == "torch":
        _outer_torch(torch.as_tensor(x), torch.as_tensor(direction), torch.as_tensor(buf), lr,
                     momentum, dampening, weight_decay, mode)
        return x
    xa, da, ba = _as_numpy_views([x, direction, buf])
    if backend == "numpy":
        _outer_numpy(xa, da, ba, lr, momentum, dampening, weight_decay, mode)
    else:
        args = (xa, da, ba, lr, momentum, dampening, weight_decay, mode)
        nblocks = row_blocks(xa.shape[0], xa.shape[0], _PARALLEL_MIN)
        _outer_serial(*args) if nblocks == 1 else _outer_parallel(*args, nblocks)
    return x


# ----------------------------------------------------------------------------- the optimizer
NoiseFn = Callable[[int, int, int, torch.Tensor], torch.Tensor]


class EntropySGD(torch.optim.Optimizer):
    """Entropy-SGD (Algorithm 1 of the paper, with the official code's momentum and weight decay).

    ``step(closure)`` requires a closure that zeroes the gradients, computes the loss, calls
    ``backward()`` and returns the loss; it is called L + 1 times per step (once at x, then once per
    SGLD iteration, with the parameters set to x'). All parameter groups move together in the inner
    loop (one closure call serves all of them), so ``L`` must be the same in every group; the other
    hyper-parameters may differ between groups.

    Args:
        params: parameters or parameter groups.
        lr: outer step size eta.  momentum, dampening, weight_decay, nesterov: used in both loops, eq. (8)-(9).
        L: number of SGLD iterations per step (L = 0: plain (Nesterov) SGD with momentum).
        gamma: coupling gamma_0 of eq. (7).  scoping: gamma_1 of eq. (7).
        eps: thermal noise of eq. (8).  sgld_lr: inner step size eta' (0.1 in the official code).
        mu_decay: beta of eq. (8) (0.75 in the official code).
        gamma_in_outer: False (official code): the outer direction is x - mu; True (paper, eq. 6): gamma (x - mu).
        advance_scope: False (official PyTorch code, whose step counter never advances, so gamma_t = gamma);
            True (paper and the official Lua code): gamma_t = gamma (1 + scoping)^t.
        generator: torch.Generator for the noise (the global RNG when None).
        noise_fn: ``noise_fn(t, l, group_index, like) -> (n,) tensor`` supplies the standard normal
            draws of outer step t, SGLD iteration l, for a group's flat buffer ``like``; used to replay
            a recorded noise stream. Overrides ``generator``.

    State per parameter: ``step`` (outer steps taken) and ``momentum_buffer`` (B of eq. 9, when
    momentum > 0; initialised to the first loss gradient as in the official code).
    """

    def __init__(self, params: Iterable[Any], lr: float = 0.01, momentum: float = 0.0,
                 dampening: float = 0.0, weight_decay: float = 0.0, nesterov: bool = True, L: int = 0,
                 gamma: float = 0.01, scoping: float = 0.0, eps: float = 1e-4, sgld_lr: float = 0.1,
                 mu_decay: float = 0.75, gamma_in_outer: bool = False, advance_scope: bool = False, *,
                 generator: torch.Generator | None = None, noise_fn: NoiseFn | None = None):
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, L=L, gamma=gamma, scoping=scoping, eps=eps, sgld_lr=sgld_lr,
                        mu_decay=mu_decay, gamma_in_outer=gamma_in_outer, advance_scope=advance_scope)
        self._check_group(defaults)
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if noise_fn is not None and not callable(noise_fn):
            raise TypeError(f"noise_fn must be callable or None, got {type(noise_fn).__name__}")
        self.generator, self.noise_fn = generator, noise_fn
        super().__init__(params, defaults)

    @staticmethod
    def _check_group(g: dict) -> None:
        _real(g["lr"], "lr", 0.0, lo_open=True)
        _real(g["momentum"], "momentum", 0.0, 1.0, hi_open=True)
        _real(g["dampening"], "dampening", 0.0, 1.0)
        _real(g["weight_decay"], "weight_decay", 0.0)
        _real(g["gamma"], "gamma", 0.0)
        _real(g["scoping"], "scoping", 0.0)
        _real(g["eps"], "eps", 0.0)
        _real(g["sgld_lr"], "sgld_lr", 0.0, lo_open=True)
        _real(g["mu_decay"], "mu_decay", 0.0, 1.0, hi_open=True)
        L = g["L"]
        if isinstance(L, bool) or not isinstance(L, (int, np.integer)) or L < 0:
            raise ValueError(f"L must be a non-negative int (SGLD iterations per step), got {L!r}")
        for flag in ("nesterov", "gamma_in_outer", "advance_scope"):
            if not isinstance(g[flag], (bool, np.bool_)):
                raise TypeError(f"{flag} must be a bool, got {type(g[flag]).__name__}")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self._check_group(self.param_groups[-1])

    def _noise(self, t: int, l: int, gi: int, like: torch.Tensor) -> torch.Tensor:
        if self.noise_fn is not None:
            z = torch.as_tensor(self.noise_fn(t, l, gi, like), dtype=like.dtype, device=like.device)
            if z.shape != like.shape:
                raise ValueError(f"noise_fn must return a tensor of shape {tuple(like.shape)}, got {tuple(z.shape)}")
            return z
        return torch.randn(like.shape, generator=self.generator, dtype=like.dtype, device=like.device)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One outer step (eq. 8 L times, then eq. 9). Returns the loss at x (the first closure call)."""
        if closure is None:
            raise ValueError("EntropySGD.step needs a closure that zeroes the gradients, computes the "
                             "loss, calls backward() and returns the loss")
        Ls = {int(g["L"]) for g in self.param_groups}
        if len(Ls) != 1:
            raise ValueError(f"L must be the same in every parameter group, got {sorted(Ls)}")
        L = Ls.pop()
        with torch.enable_grad():
            loss = closure()

        work = []  # per group: (group, params, layout, x, direction or None, t)
        for g in self.param_groups:
            params = [p for p in g["params"] if p.grad is not None]
            if not params:
                continue
            layout = SegmentLayout.of(params)
            for p in params:
                st = self.state[p]
                if "step" not in st:
                    st["step"] = 0
                    if g["momentum"] > 0:
                        st["momentum_buffer"] = p.grad.detach().clone()    # official init: grad f(x_0)
            t = int(self.state[params[0]]["step"])
            x = layout.flatten([p.detach() for p in params])                # anchor x (a copy)
            work.append(dict(group=g, params=params, layout=layout, x=x, t=t,
                             grad0=layout.flatten([p.grad.detach() for p in params])))

        if L > 0:
            for w in work:
                w["xp"], w["mu"] = w["x"].clone(), w["x"].clone()
                w["buf"] = torch.zeros_like(w["x"])
            for l in range(L):
                with torch.enable_grad():
                    closure()
                for gi, w in enumerate(work):
                    g, params = w["group"], w["params"]
                    grad = w["layout"].flatten([p.grad.detach() if p.grad is not None else torch.zeros_like(p)
                                                for p in params])
                    gamma = scoped_gamma(g["gamma"], g["scoping"], w["t"] if g["advance_scope"] else 0)
                    noise = self._noise(w["t"], l, gi, w["xp"]) if g["eps"] > 0 else None
                    sgld_inner_step(w["xp"], grad, w["x"], w["mu"], w["buf"], noise, gamma=gamma,
                                    sgld_lr=g["sgld_lr"], eps=g["eps"], mu_decay=g["mu_decay"],
                                    momentum=g["momentum"], dampening=g["dampening"],
                                    weight_decay=g["weight_decay"], nesterov=g["nesterov"], backend="torch")
                    for p, v in zip(params, w["layout"].unflatten(w["xp"])):
                        p.copy_(v)

        for w in work:
            g, params, layout = w["group"], w["params"], w["layout"]
            if L > 0:
                direction = w["x"] - w["mu"]                                # x - mu, eq. (3)
                if g["gamma_in_outer"]:
                    gamma = scoped_gamma(g["gamma"], g["scoping"], w["t"] if g["advance_scope"] else 0)
                    direction.mul_(gamma)
            else:
                direction = w["grad0"]
            if g["momentum"] > 0:
                buf = layout.flatten([self.state[p]["momentum_buffer"] for p in params])
            else:
                buf = torch.zeros_like(w["x"])
            entropy_outer_step(w["x"], direction, buf, lr=g["lr"], momentum=g["momentum"],
                               dampening=g["dampening"], weight_decay=g["weight_decay"],
                               nesterov=g["nesterov"], backend="torch")
            for p, v, b in zip(params, layout.unflatten(w["x"]), layout.unflatten(buf)):
                p.copy_(v)
                st = self.state[p]
                if g["momentum"] > 0:
                    st["momentum_buffer"].copy_(b)
                st["step"] = int(st["step"]) + 1
        return loss
