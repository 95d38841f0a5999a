"""Self-Normalizing Neural Networks (Klambauer, Unterthiner, Mayr & Hochreiter, NeurIPS 2017,
arXiv:1706.02515): the scaled exponential linear unit (SELU), the mean/variance map it induces under
LeCun-normal weights, its fixed point, and alpha-dropout.

Equations (the chapter uses the same numbers):

    (1) selu(x)  = lam * x                  if x > 0
                   lam * alpha * (e^x - 1)  if x <= 0
    (2) selu'(x) = lam                      if x > 0
                   lam * alpha * e^x        if x <= 0   (torch's choice at x = 0; see the chapter)

For a unit whose input is z = sum_i w_i x_i with x_i independent, mean mu, variance nu, and weights
with omega = sum_i w_i, tau = sum_i w_i^2, the CLT gives

    (3) z ~ N(mu*omega, nu*tau).

Write
m = mu*omega, s = sqrt(nu*tau), g = exp(-m^2 / (2 s^2)), e0 = erfc(m / (sqrt(2) s)),
c1 = (m + s^2) / (sqrt(2) s), c2 = (m + 2 s^2) / (sqrt(2) s) and erfcx(c) = exp(c^2) erfc(c):

    (4) mu~  = E[selu(z)]   = lam/2 * ( m (2 - e0) + sqrt(2/pi) s g + alpha (g erfcx(c1) - e0) )
    (5) xi~  = E[selu(z)^2] = lam^2/2 * ( (m^2 + s^2)(2 - e0) + sqrt(2/pi) m s g
                                          + alpha^2 (g erfcx(c2) - 2 g erfcx(c1) + e0) )
    (6) nu~  = xi~ - mu~^2

(the paper's eqs. for mu~ and xi~, rewritten with e^{m + s^2/2} erfc(c1) = g erfcx(c1) and
e^{2(m + s^2)} erfc(c2) = g erfcx(c2) so that they do not overflow for large variances).

    (7) fixed point:  mu~(0, 1, 0, 1; alpha, lam) = 0,  nu~(0, 1, 0, 1; alpha, lam) = 1
        -> alpha_01 = 1.6732632423543772848..., lam_01 = 1.0507009873554804934...
    (8) J(mu, nu) = d(mu~, nu~)/d(mu, nu); the map is a contraction near the fixed point when the
        spectral norm ||J||_2 < 1 (the quantity bounded in the paper's Theorem 1).

Alpha-dropout keeps each unit with probability q = 1 - p and sets dropped units to the SELU's
saturation value alpha' = -lam * alpha, then restores the fixed point (mean mu_f, variance nu_f;
0 and 1 in the paper) with an affine map:

    (9)  y = a * (x d + alpha' (1 - d)) + b,        d ~ Bernoulli(q)
    (10) a = sqrt( nu_f / (q ((1 - q)(alpha' - mu_f)^2 + nu_f)) )   [= (q + alpha'^2 q (1-q))^{-1/2}]
    (11) b = mu_f - a (q mu_f + (1 - q) alpha')                      [= -a (1 - q) alpha']

The critical loops are the elementwise SELU forward (1) and backward (2) and the alpha-dropout
apply (9); backends ``"numpy"`` (readable reference), ``"numba"`` (a parallel kernel whose e^x is a
branch-free range reduction + polynomial, so that the loop vectorises), ``"torch"`` (vectorised,
device-agnostic, differentiable through :class:`SELUFunction`).
"""
from __future__ import annotations

import math
import types
from typing import Any

import numpy as np
import torch
from numba import njit, prange

from refimpl._common.backend import like_input, resolve_backend, to_numpy, to_torch
from refimpl._common.validate import check_floating, check_positive
from refimpl._common.kernels import FASTMATH as _FASTMATH

__all__ = [
    "SELU_ALPHA", "SELU_LAMBDA", "ALPHA_PRIME", "selu", "selu_backward", "SELUFunction", "SELU",
    "alpha_dropout", "alpha_dropout_affine", "alpha_dropout_mask", "AlphaDropout",
    "selu_moments", "selu_moments_jacobian", "solve_selu_parameters", "lecun_normal_",
]

# The paper's constants (its eq. 14 in closed form; the official code's literals).
SELU_ALPHA = 1.6732632423543772848170429916717
SELU_LAMBDA = 1.0507009873554804934193349852946
ALPHA_PRIME = -SELU_LAMBDA * SELU_ALPHA  # -1.7580993408473766, the value dropped units take


# ----------------------------------------------------------------------------- validation
def _check_real(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not math.isfinite(float(value)):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)


def _check_p(p: Any) -> float:
    p = _check_real(p, "p")
    if not 0.0 <= p < 1.0:
        raise ValueError(f"p (the drop probability) must lie in [0, 1), got {p}")
    return p


def _check_x(x: Any, name: str = "x", finite: bool = True) -> None:
    check_floating(x, name)
    if not finite:
        return
    if isinstance(x, torch.Tensor):
        if x.device.type == "cpu" and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name} contains NaN or infinity")
    elif not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or infinity")


# ----------------------------------------------------------------------------- numpy reference
def _selu_numpy(x: np.ndarray, alpha: float, lam: float) -> np.ndarray:
    T = x.dtype.type
    return np.where(x > 0, T(lam) * x, T(lam * alpha) * np.expm1(np.minimum(x, 0)))          # (1)


def _selu_backward_numpy(dy: np.ndarray, x: np.ndarray, alpha: float, lam: float) -> np.ndarray:
    T = x.dtype.type
    return dy * np.where(x > 0, T(lam), T(lam * alpha) * np.exp(np.minimum(x, 0)))           # (2)


def _alpha_dropout_numpy(x: np.ndarray, keep: np.ndarray, a: float, b: float, alpha_p: float):
    T = x.dtype.type
    return np.where(keep, T(a) * x + T(b), T(a * alpha_p + b))                                # (9)


# ----------------------------------------------------------------------------- numba kernels
_LN2_HI = 0.693145751953125          # ln 2 split so that k * _LN2_HI is exact for |k| < 2^11
_LN2_LO = 1.42860682030941723212e-6
_LOG2E = 1.4426950408889634


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _exp_parts64(u, lo, T):
    """e^u = s * (1 + q) for u <= 0 without a libm call, so that the loop around it vectorises:
    u = k ln2 + r with |r| <= ln2/2, q = e^r - 1 by its Taylor series to r^13 (truncation < 4e-18
    relative), and s = 2^k built from its bits (exponent field k + 1023). u is clamped at ``lo``
    (-707 in float64) so that 2^k stays a normal number. Returns (s, q) as float64."""
    u = max(u, lo)
    kf = math.floor(u * T(_LOG2E) + T(0.5))
    r = (u - kf * T(_LN2_HI)) - kf * T(_LN2_LO)
    q = T(1.0 / 6227020800.0)
    for c in (1.0 / 479001600.0, 1.0 / 39916800.0, 1.0 / 3628800.0, 1.0 / 362880.0, 1.0 / 40320.0,
              1.0 / 5040.0, 1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0):
        q = q * r + T(c)
    q = q * r
    s = np.int64((np.int64(kf) + 1023) << 52).view(np.float64)
    return s, q


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _exp_parts32(u, lo, T):
    """:func:`_exp_parts64` for float32: Taylor series to r^7 (truncation < 6e-9 relative, a tenth of
    float32's unit roundoff), 2^k from the float32 exponent field k + 127, clamp ``lo`` = -86."""
    u = max(u, lo)
    kf = math.floor(u * T(_LOG2E) + T(0.5))
    r = (u - kf * T(_LN2_HI)) - kf * T(_LN2_LO)
    q = T(1.0 / 5040.0)
    for c in (1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0):
        q = q * r + T(c)
    q = q * r
    s = np.int32((np.int32(kf) + 127) << 23).view(np.float32)
    return s, q


_exp_parts = _exp_parts64   # the name the kernel bodies call; _kernels rebinds it per dtype


# Every kernel also returns sum(x * 0): NaN exactly when x holds a NaN or an infinity (no `nnan`/`ninf`
# in the fast-math flags, so the product is not folded away). The input check rides along with the
# loop instead of costing a separate pass over memory.
def _selu_numba_body(x, y, alpha, lam, lo):
    T = x.dtype.type
    lo = T(lo)
    lt = T(lam)
    la = T(lam * alpha)
    probe = T(0)
    for i in prange(x.shape[0]):
        v = x[i]
        probe += v * T(0)
        s, q = _exp_parts(min(v, T(0)), lo, T)
        s = T(s)
        em1 = s * q + (s - T(1))                     # e^v - 1, accurate near 0 (k = 0: em1 = q)
        y[i] = lt * v if v > 0 else la * em1         # (1)
    return probe


def _selu_backward_numba_body(dy, x, dx, alpha, lam, lo):
    T = x.dtype.type
    lo = T(lo)
    lt = T(lam)
    la = T(lam * alpha)
    probe = T(0)
    for i in prange(x.shape[0]):
        v = x[i]
        probe += v * T(0)
        s, q = _exp_parts(min(v, T(0)), lo, T)
        s = T(s)
        dx[i] = dy[i] * (lt if v > 0 else la * (s * q + s))  # (2)
    return probe


def _alpha_dropout_numba_body(x, keep, y, a, b, dropped):
    T = x.dtype.type
    at = T(a)
    bt = T(b)
    ct = T(dropped)
    probe = T(0)
    for i in prange(x.shape[0]):
        v = x[i]
        probe += v * T(0)
        y[i] = at * v + bt if keep[i] else ct       # (9)
    return probe


# Each kernel twice: threaded for large arrays, single-threaded below _PARALLEL_MIN elements, where
# waking the thread pool costs more than the loop (prange is range when parallel=False). Both
# vectorise: the loop reads x (and dy), writes y, and loads nothing else.
_PARALLEL_MIN = 1 << 16


def _kernels(body) -> dict:
    """Four compiled variants of a kernel body, keyed by (dtype, threaded): the body's global
    ``_exp_parts`` is bound to the float32 or float64 version. Each variant is a renamed copy of the
    body, so that the variants do not share an on-disk cache entry."""
    out = {}
    for dtype, exp_parts in ((np.dtype(np.float32), _exp_parts32), (np.dtype(np.float64), _exp_parts64)):
        env = dict(body.__globals__, _exp_parts=exp_parts)
        for threaded in (False, True):
            name = f"{body.__name__}_{dtype.name}_{'parallel' if threaded else 'serial'}"
            fn = types.FunctionType(body.__code__, env, name)
            fn.__qualname__ = name
            out[dtype, threaded] = njit(parallel=threaded, cache=True, fastmath=_FASTMATH)(fn)
    return out


_SELU_K = _kernels(_selu_numba_body)
_SELU_BWD_K = _kernels(_selu_backward_numba_body)
_ALPHA_DROPOUT_K = _kernels(_alpha_dropout_numba_body)


def _pick(kernels: dict, x: np.ndarray):
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"the numba backend computes in float32 or float64, got {x.dtype}")
    return kernels[x.dtype, x.size >= _PARALLEL_MIN]


def _exp_floor(dtype: np.dtype) -> float:
    """The clamp of eq. (1)'s e^x in the numba kernels: ln of the smallest normal power of two
    (rounded up), -86.0 for float32 and -707.0 for float64."""
    return float(math.floor((np.finfo(dtype).minexp + 1) * math.log(2.0)) + 1)


def _check_probe(probe: float, name: str = "x") -> None:
    if not math.isfinite(probe):
        raise ValueError(f"{name} contains NaN or infinity")


def _flat(x: Any) -> np.ndarray:
    return np.ascontiguousarray(to_numpy(x)).reshape(-1)


# ----------------------------------------------------------------------------- torch path
def _selu_torch(x: torch.Tensor, alpha: float, lam: float) -> torch.Tensor:
    return torch.where(x > 0, lam * x, (lam * alpha) * torch.expm1(x.clamp(max=0)))           # (1)


def _selu_backward_torch(dy, x, alpha: float, lam: float) -> torch.Tensor:
    return dy * torch.where(x > 0, torch.full_like(x, lam), (lam * alpha) * torch.exp(x.clamp(max=0)))


class SELUFunction(torch.autograd.Function):
    """SELU (eq. 1) with the hand-written derivative (eq. 2) as its backward.

    ``apply(x, alpha, lam)``: x any shape, floating; returns a tensor of x's shape and dtype. Saves x
    (not the output) so that the derivative lam*alpha*e^x keeps full relative accuracy for x << 0.
    """

    @staticmethod
    def forward(ctx, x, alpha, lam):
        ctx.save_for_backward(x)
        ctx.alpha, ctx.lam = alpha, lam
        return _selu_torch(x, alpha, lam)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensors
        return _selu_backward_torch(dy, x, ctx.alpha, ctx.lam), None, None


# ----------------------------------------------------------------------------- public API: SELU
def selu(x: Any, alpha: float = SELU_ALPHA, lam: float = SELU_LAMBDA, backend: str = "auto") -> Any:
    """Scaled exponential linear unit, eq. (1), elementwise.

    Args:
        x: array or tensor of any shape, floating dtype, finite (checked on CPU).
        alpha, lam: the SELU's parameters; default the paper's alpha_01, lambda_01 (eq. 7).
        backend: "numpy" | "numba" | "torch" | "auto" (torch for tensors, numba for arrays).
    Returns:
        selu(x) with x's shape and dtype, of x's type. Gradients flow through the torch backend
        (via :class:`SELUFunction`).
    """
    backend = resolve_backend(backend, x)
    _check_x(x, finite=backend != "numba")                 # numba: checked inside the kernel
    alpha, lam = check_positive(alpha, "alpha"), check_positive(lam, "lam")
    if backend == "torch":
        y = SELUFunction.apply(to_torch(x), alpha, lam)
        return y if isinstance(x, torch.Tensor) else y.detach().numpy()
    xf = _flat(x)
    if backend == "numpy":
        y = _selu_numpy(xf, alpha, lam)
    else:
        y = np.empty_like(xf)
        _check_probe(_pick(_SELU_K, xf)(xf, y, alpha, lam, _exp_floor(xf.dtype)))
    return like_input(y.reshape(tuple(x.shape)), x)


def selu_backward(grad_out: Any, x: Any, alpha: float = SELU_ALPHA, lam: float = SELU_LAMBDA,
                  backend: str = "auto") -> Any:
    """dL/dx = dL/dy * selu'(x), eq. (2). grad_out and x: same shape, floating; result like x."""
    backend = resolve_backend(backend, x)
    _check_x(x, finite=backend != "numba")
    check_floating(grad_out, "grad_out")
    if tuple(grad_out.shape) != tuple(x.shape):
        raise ValueError(f"grad_out must have x's shape {tuple(x.shape)}, got {tuple(grad_out.shape)}")
    alpha, lam = check_positive(alpha, "alpha"), check_positive(lam, "lam")
    if backend == "torch":
        xt = to_torch(x)
        with torch.no_grad():
            dx = _selu_backward_torch(to_torch(grad_out, like=xt).to(xt.dtype), xt, alpha, lam)
        return like_input(dx, x)
    xf = _flat(x)
    dy = np.ascontiguousarray(_flat(grad_out), dtype=xf.dtype)
    if backend == "numpy":
        dx = _selu_backward_numpy(dy, xf, alpha, lam)
    else:
        dx = np.empty_like(xf)
        _check_probe(_pick(_SELU_BWD_K, xf)(dy, xf, dx, alpha, lam, _exp_floor(xf.dtype)))
    return like_input(dx.reshape(tuple(x.shape)), x)


class SELU(torch.nn.Module):
    """``torch.nn.SELU``'s interface on :class:`SELUFunction` (input any shape -> same shape)."""

    def __init__(self, alpha: float = SELU_ALPHA, lam: float = SELU_LAMBDA):
        super().__init__()
        self.alpha, self.lam = check_positive(alpha, "alpha"), check_positive(lam, "lam")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return SELUFunction.apply(x, self.alpha, self.lam)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:.6f}, lam={self.lam:.6f}"


# ----------------------------------------------------------------------------- alpha-dropout
def alpha_dropout_affine(p: float, alpha_prime: float = ALPHA_PRIME, mean: float = 0.0,
                         var: float = 1.0) -> tuple[float, float]:
    """The affine correction (a, b) of eqs. (10)-(11) that restores mean ``mean`` and variance ``var``
    after units are set to ``alpha_prime`` with probability p. Floats."""
    p = _check_p(p)
    alpha_prime, mean = _check_real(alpha_prime, "alpha_prime"), _check_real(mean, "mean")
    var = check_positive(var, "var")
    q = 1.0 - p
    a = math.sqrt(var / (q * ((1.0 - q) * (alpha_prime - mean) ** 2 + var)))               # (10)
    b = mean - a * (q * mean + (1.0 - q) * alpha_prime)                                     # (11)
    return a, b


def alpha_dropout_mask(shape: tuple[int, ...], p: float, generator: Any = None,
                       like: Any = None) -> Any:
    """A keep-mask d ~ Bernoulli(1 - p) of ``shape`` (bool). With ``like`` a tensor (or
    ``generator`` a ``torch.Generator``) it is drawn by torch exactly as ``torch.nn.functional.
    alpha_dropout`` draws its noise (``bernoulli_(1 - p)`` on a tensor of like's dtype and device),
    so the same seed gives the same mask; otherwise with NumPy (``generator``: a
    ``np.random.Generator``, an int seed, or None for a fresh one)."""
    p = _check_p(p)
    if isinstance(like, torch.Tensor) or isinstance(generator, torch.Generator):
        opts = {"dtype": like.dtype, "device": like.device} if isinstance(like, torch.Tensor) else {}
        noise = torch.empty(shape, **opts)
        return noise.bernoulli_(1.0 - p, generator=generator).bool()
    if generator is not None and not isinstance(generator, (np.random.Generator, int, np.integer)):
        raise TypeError(f"generator must be a numpy Generator, an int seed, a torch.Generator or None, "
                        f"got {type(generator).__name__}")
    rng = generator if isinstance(generator, np.random.Generator) else np.random.default_rng(generator)
    return rng.random(shape) < 1.0 - p


def alpha_dropout(x: Any, p: float = 0.5, training: bool = True, mask: Any = None,
                  generator: Any = None, alpha_prime: float = ALPHA_PRIME, mean: float = 0.0,
                  var: float = 1.0, backend: str = "auto") -> Any:
    """Alpha-dropout, eqs. (9)-(11): dropped units take ``alpha_prime``, then ``a * . + b``.

    Args:
        x: array or tensor of any shape, floating dtype, finite (checked on CPU).
        p: drop probability in [0, 1). training: when False (or p == 0) x is returned unchanged.
        mask: optional keep-mask (bool, or 0/1 of any dtype) of x's shape; True = keep. When None it
            is drawn by :func:`alpha_dropout_mask` with ``generator`` (the torch backend with
            generator None uses torch's global RNG, reproducing ``F.alpha_dropout`` for a seed).
        alpha_prime, mean, var: saturation value and the fixed point to restore (paper: -lam*alpha,
            0, 1).
        backend: "numpy" | "numba" | "torch" | "auto".
    Returns:
        y like x (differentiable in x through the torch backend: dy/dx = a * d).
    """
    backend = resolve_backend(backend, x)
    _check_x(x, finite=backend != "numba")
    a, b = alpha_dropout_affine(p, alpha_prime, mean, var)
    if not isinstance(training, (bool, np.bool_)):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if not training or p == 0.0:
        return x
    shape = tuple(x.shape)
    if mask is None:
        like = to_torch(x) if backend == "torch" else None
        mask = alpha_dropout_mask(shape, p, generator, like=like)
    elif not isinstance(mask, (np.ndarray, torch.Tensor)):
        raise TypeError(f"mask must be a numpy.ndarray or torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"mask must have x's shape {shape}, got {tuple(mask.shape)}")
    dropped = a * alpha_prime + b
    if backend == "torch":
        xt = to_torch(x)
        keep = to_torch(mask, like=xt).bool()
        y = torch.where(keep, a * xt + b, torch.full_like(xt, dropped))                      # (9)
        return y if isinstance(x, torch.Tensor) else y.detach().numpy()
    xf = _flat(x)
    keep = _flat(mask).astype(bool, copy=False)
    if backend == "numpy":
        y = _alpha_dropout_numpy(xf, keep, a, b, alpha_prime)
    else:
        y = np.empty_like(xf)
        _check_probe(_pick(_ALPHA_DROPOUT_K, xf)(xf, keep, y, a, b, dropped))
    return like_input(y.reshape(shape), x)


class AlphaDropout(torch.nn.Module):
    """``torch.nn.AlphaDropout``'s interface on :func:`alpha_dropout` (identity in eval mode)."""

    def __init__(self, p: float = 0.5):
        super().__init__()
        self.p = _check_p(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return alpha_dropout(x, self.p, self.training, backend="torch")

    def extra_repr(self) -> str:
        return f"p={self.p}"


# ----------------------------------------------------------------------------- the moment map
def _t64(v: Any) -> torch.Tensor:
    return v.to(torch.float64) if isinstance(v, torch.Tensor) else torch.tensor(float(v), dtype=torch.float64)


def _moments_torch(mu, nu, omega, tau, alpha, lam):
    m = mu * omega
    s2 = nu * tau
    s = torch.sqrt(s2)
    r2 = math.sqrt(2.0)
    g = torch.exp(-m * m / (2.0 * s2))
    e0 = torch.special.erfc(m / (r2 * s))
    x1 = g * torch.special.erfcx((m + s2) / (r2 * s))          # e^{m + s^2/2} erfc(c1)
    x2 = g * torch.special.erfcx((m + 2.0 * s2) / (r2 * s))    # e^{2(m + s^2)} erfc(c2)
    k = math.sqrt(2.0 / math.pi)
    mu_t = 0.5 * lam * (m * (2.0 - e0) + k * s * g + alpha * (x1 - e0))                          # (4)
    xi_t = 0.5 * lam ** 2 * ((m * m + s2) * (2.0 - e0) + k * m * s * g
                             + alpha ** 2 * (x2 - 2.0 * x1 + e0))                              # (5)
    return mu_t, xi_t - mu_t * mu_t                                                             # (6)


def _check_moment_args(mu, nu, omega, tau, alpha, lam):
    out = []
    for name, v in (("mu", mu), ("nu", nu), ("omega", omega), ("tau", tau), ("alpha", alpha), ("lam", lam)):
        if isinstance(v, torch.Tensor):
            if not v.is_floating_point():
                raise TypeError(f"{name} must be floating point, got {v.dtype}")
            if not bool(torch.isfinite(v).all()):
                raise ValueError(f"{name} contains NaN or infinity")
            if name in ("nu", "tau") and bool((v <= 0).any()):
                raise ValueError(f"{name} must be > 0 (a variance / a sum of squared weights)")
            out.append(v)
        elif name in ("nu", "tau"):
            out.append(check_positive(v, name))
        else:
            out.append(_check_real(v, name))
    return out


def selu_moments(mu: Any, nu: Any, omega: Any = 0.0, tau: Any = 1.0, alpha: Any = SELU_ALPHA,
                 lam: Any = SELU_LAMBDA) -> tuple[Any, Any]:
    """The mean/variance map g: (mu, nu) -> (mu~, nu~) of a SELU layer, eqs. (4)-(6).

    Args:
        mu, nu: mean and variance (> 0) of the layer's inputs. omega, tau: sum and sum of squares of
            one unit's incoming weights (LeCun-normal init in expectation: omega = 0, tau = 1).
        alpha, lam: SELU parameters. Any argument may be a float64 tensor (broadcast; autograd flows
            through it), else a float.
    Returns:
        (mu~, nu~): floats when every argument is a number, else float64 tensors.
    """
    args = _check_moment_args(mu, nu, omega, tau, alpha, lam)
    as_tensor = any(isinstance(v, torch.Tensor) for v in args)
    mu_t, nu_t = _moments_torch(*(_t64(v) for v in args))
    if as_tensor:
        return mu_t, nu_t
    return float(mu_t), float(nu_t)


def selu_moments_jacobian(mu: Any = 0.0, nu: Any = 1.0, omega: Any = 0.0, tau: Any = 1.0,
                          alpha: float = SELU_ALPHA, lam: float = SELU_LAMBDA) -> np.ndarray:
    """J = d(mu~, nu~)/d(mu, nu) of eqs. (4)-(6), eq. (8), by autograd in float64.

    mu, nu, omega, tau: numbers or arrays/tensors that broadcast to a common shape S (a grid of
    points). Returns a float64 array of shape S + (2, 2), [[dmu~/dmu, dmu~/dnu], [dnu~/dmu,
    dnu~/dnu]] at every point; its spectral norm is ``np.linalg.norm(J, 2, axis=(-2, -1))``."""
    vals = [torch.as_tensor(to_numpy(v) if isinstance(v, torch.Tensor) else v, dtype=torch.float64)
            for v in (mu, nu, omega, tau)]
    mu_, nu_, om_, tau_ = torch.broadcast_tensors(*vals)
    _check_moment_args(mu_, nu_, om_, tau_, alpha, lam)
    mu_ = mu_.clone().requires_grad_(True)
    nu_ = nu_.clone().requires_grad_(True)
    mu_t, nu_t = _moments_torch(mu_, nu_, om_, tau_, _t64(alpha), _t64(lam))
    rows = []
    for out in (mu_t, nu_t):                       # points are independent: the gradient of the sum
        d_mu, d_nu = torch.autograd.grad(out.sum(), (mu_, nu_), retain_graph=True)  # is pointwise
        rows.append(torch.stack([d_mu, d_nu], dim=-1))
    return torch.stack(rows, dim=-2).detach().numpy()


def solve_selu_parameters(mean: float = 0.0, var: float = 1.0, omega: float = 0.0, tau: float = 1.0,
                          init: tuple[float, float] = (1.67, 1.05), tol: float = 1e-15,
                          max_iter: int = 50) -> tuple[float, float]:
    """Solve eq. (7) generalised: find (alpha, lam) with g(mean, var) = (mean, var) for weights with
    sum ``omega`` and sum of squares ``tau``, by Newton's method on (alpha, lam) with the Jacobian
    from autograd (float64). Returns (alpha, lam); raises RuntimeError when it does not converge."""
    mean, omega = _check_real(mean, "mean"), _check_real(omega, "omega")
    var, tau = check_positive(var, "var"), check_positive(tau, "tau")
    tol = check_positive(tol, "tol")
    if not (isinstance(max_iter, int) and max_iter > 0):
        raise ValueError(f"max_iter must be a positive int, got {max_iter!r}")
    m_, v_, o_, t_ = (torch.tensor(float(v), dtype=torch.float64) for v in (mean, var, omega, tau))

    def residual(theta):
        mu_t, nu_t = _moments_torch(m_, v_, o_, t_, theta[0], theta[1])
        return torch.stack([mu_t - m_, nu_t - v_])

    theta = torch.tensor([float(init[0]), float(init[1])], dtype=torch.float64)
    for _ in range(max_iter):
        f = residual(theta)
        if float(f.abs().max()) < tol:
            break
        jac = torch.autograd.functional.jacobian(residual, theta)
        theta = theta - torch.linalg.solve(jac, f)
    else:
        if float(residual(theta).abs().max()) > 1e3 * tol:
            raise RuntimeError(f"Newton's method did not converge from init={init} "
                               f"(residual {float(residual(theta).abs().max()):.2e})")
    return float(theta[0]), float(theta[1])


def lecun_normal_(weight: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """LeCun-normal initialisation in place: w ~ N(0, 1/fan_in) for a (fan_out, fan_in) weight, so
    that E[omega] = 0 and E[tau] = 1 for every unit (the paper's assumption behind eq. 7)."""
    if not isinstance(weight, torch.Tensor) or weight.ndim < 2:
        raise ValueError("weight must be a tensor of rank >= 2 (fan_out, fan_in, ...)")
    fan_in = weight[0].numel()
    with torch.no_grad():
        return weight.normal_(0.0, 1.0 / math.sqrt(fan_in), generator=generator)
