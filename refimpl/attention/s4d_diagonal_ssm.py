"""S4D: diagonal state space models (Gu, Gupta, Goel & Ré, NeurIPS 2022, arXiv:2206.11893).

A state space model (SSM) maps a 1-D input u(t) to an output y(t) through an N-dimensional state x(t):

    (1)  x'(t) = A x(t) + B u(t),      y(t) = C x(t) + D u(t).

S4D takes A = diag(lambda_1, ..., lambda_N) complex diagonal. Sampled with step Delta, the diagonal
system has closed-form discretisations, element by element:

    (2)  zero-order hold (ZOH):  Abar = exp(Delta A),   Bbar = (exp(Delta A) - 1) / A * B
    (3)  bilinear:               Abar = (1 + Delta A/2) / (1 - Delta A/2),   Bbar = Delta / (1 - Delta A/2) * B

and the discrete system is the linear recurrence (the "recurrent mode")

    (4)  x_k = Abar x_{k-1} + Bbar u_k,      y_k = C x_k + D u_k.

Unrolling (4) from x_{-1} = 0 gives y = K * u + D u, a causal convolution with the SSM kernel

    (5)  K_l = C Abar^l Bbar,     l = 0 .. L-1,

which for diagonal A is a Vandermonde product (the "convolutional mode"):

    (6)  K_l = sum_n C_n Bbar_n Abar_n^l = sum_n W_n exp(l log Abar_n),   W = C * Bbar.

A real SSM has its eigenvalues in conjugate pairs, so only N/2 of them are kept and

    (7)  K_l = 2 Re sum_{n < N/2} W_n Abar_n^l.

The convolution is computed with FFTs of length 2L (so that the circular convolution is causal):

    (8)  y = irfft(rfft(K, 2L) * rfft(u, 2L))[:L] + D u.

Initialisations of (A, B) (``s4d_init``), for n = 0 .. N/2-1:

    (9)  HiPPO-LegS:  A_nk = -sqrt(2n+1) sqrt(2k+1) (n > k),  -(n+1) (n = k),  0 (n < k);  B_n = sqrt(2n+1)
    (10) normal plus low rank:  A = A_N - P P^T,  P_n = sqrt(n + 1/2),  A_N = -I/2 + S,  S skew-symmetric
    (11) S4D-LegS:  lambda = eigenvalues of A_N (= -1/2 + i omega),  B = V^* B  (V: eigenvectors of A_N)
    (12) S4D-Inv:   lambda_n = -1/2 + i (N/pi) (N/(2n+1) - 1),  B_n = 1
    (13) S4D-Lin:   lambda_n = -1/2 + i pi n,  B_n = 1

and the trainable parameterisation of the official minimal S4D (``S4DKernel``):

    (14) A = -exp(log_A_real) + i A_imag,   Delta = exp(log_dt),  log_dt ~ U[log dt_min, log dt_max],
         C ~ CN(0, 1),  B folded into C.

The critical loops are the Vandermonde kernel (6)-(7) (:func:`vandermonde_kernel`) and the recurrent scan
(4) (:func:`ssm_scan`); both take ``backend="numpy" | "numba" | "torch" | "auto"``. Sign convention: this module
keeps the eigenvalues with *positive* imaginary part (as the paper and the official ``models/s4/s4d.py``);
the official ``models/s4/s4.py`` keeps their conjugates, which gives the same real kernel when C and B are
conjugated too.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from numba import njit, prange

from refimpl._common.backend import like_input, resolve_backend, to_numpy, to_torch
from refimpl._common.kernels import FASTMATH as _FASTMATH, PARALLEL_MIN
from refimpl._common.validate import check_positive

__all__ = [
    "hippo_legs", "hippo_legs_nplr", "s4d_init", "discretize", "vandermonde_kernel", "s4d_kernel",
    "ssm_scan", "fft_conv", "S4DKernel", "S4D", "INITS",
]

INITS = ("lin", "inv", "legs", "rand", "real")
DISCS = ("zoh", "bilinear")
# Steps between exact re-evaluations of Abar^l in the numba Vandermonde kernel: the powers in between
# come from repeated multiplication, whose rounding error grows with the number of steps taken.
_RESYNC = 32


# ----------------------------------------------------------------------------- validation
def _is_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, torch.Tensor))


def _check_type(x: Any, name: str) -> None:
    if not _is_array(x):
        raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(x).__name__}")


def _is_complex(x: Any) -> bool:
    return x.is_complex() if isinstance(x, torch.Tensor) else np.iscomplexobj(x)


def _is_real_float(x: Any) -> bool:
    return x.is_floating_point() if isinstance(x, torch.Tensor) else np.issubdtype(x.dtype, np.floating)


def _check_complex(x: Any, name: str, ndim: int | None = None) -> None:
    _check_type(x, name)
    if not _is_complex(x):
        raise TypeError(f"{name} must have a complex dtype (complex64 or complex128), got "
                        f"{str(x.dtype).replace('torch.', '')}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def _check_real(x: Any, name: str, ndim: int | None = None) -> None:
    _check_type(x, name)
    if not _is_real_float(x):
        raise TypeError(f"{name} must have a real floating-point dtype, got {str(x.dtype).replace('torch.', '')}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(x.shape)}")


def _check_finite(x: Any, name: str) -> None:
    ok = bool(torch.isfinite(x).all()) if isinstance(x, torch.Tensor) else bool(np.isfinite(x).all())
    if not ok:
        raise ValueError(f"{name} contains NaN or infinity")


def _check_length(L: Any) -> int:
    if isinstance(L, bool) or not isinstance(L, (int, np.integer)) or L < 1:
        raise ValueError(f"L must be a positive int, got {L!r}")
    return int(L)


def _check_state_size(N: Any, name: str = "N") -> int:
    if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or N < 2 or N % 2:
        raise ValueError(f"{name} must be an even int >= 2 (N/2 conjugate pairs are kept), got {N!r}")
    return int(N)


def _real_dtype(c: Any):
    if isinstance(c, torch.Tensor):
        return torch.float64 if c.dtype == torch.complex128 else torch.float32
    return np.float64 if c.dtype == np.complex128 else np.float32


# ----------------------------------------------------------------------------- HiPPO and inits
def hippo_legs(N: int) -> tuple[np.ndarray, np.ndarray]:
    """The HiPPO-LegS matrices (eq. 9): ``A`` (N, N) and ``B`` (N,), float64."""
    if isinstance(N, bool) or not isinstance(N, (int, np.integer)) or N < 1:
        raise ValueError(f"N must be a positive int, got {N!r}")
    q = np.arange(N, dtype=np.float64)
    r = np.sqrt(2 * q + 1)
    A = -np.tril(np.outer(r, r), -1) - np.diag(q + 1)
    return A, r.copy()


def hippo_legs_nplr(N: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Diagonalise the normal part of HiPPO-LegS (eqs. 10-11).

    ``A = A_N - P P^T`` with ``P_n = sqrt(n + 1/2)``; ``A_N = -I/2 + S`` with S real skew-symmetric, so
    ``A_N = V diag(lambda) V^*`` with a unitary V and ``lambda = -1/2 + i omega``. The eigenvalues come in
    conjugate pairs; the N/2 with omega > 0 are kept, largest omega first (the official ordering).

    Each eigenvector's phase is free; it is fixed here so that ``V^* P`` is real and positive. Then,
    because ``B = sqrt(2) P`` for LegS, ``V^* B = sqrt(2) V^* P`` is real and positive too.

    Returns ``(lam, P, B, V)``: lam (N/2,) complex128, P = V^* P and B = V^* B (N/2,) complex128 (real
    valued), V (N, N/2) complex128.
    """
    N = _check_state_size(N)
    A, B = hippo_legs(N)
    p = np.sqrt(np.arange(N) + 0.5)
    AN = A + np.outer(p, p)                                  # (10): -I/2 + skew-symmetric
    S = AN + 0.5 * np.eye(N)
    omega, V = np.linalg.eigh(-1j * S)                      # -iS is Hermitian, S v = i omega v
    order = np.argsort(-omega)[: N // 2]                    # omega > 0, largest first
    omega, V = omega[order], V[:, order]
    Pt = V.conj().T @ p
    V = V * (Pt / np.abs(Pt))[None, :]                      # phase: V^* P real and positive
    Pt = V.conj().T @ p
    Bt = V.conj().T @ B
    lam = -0.5 + 1j * omega
    return lam, Pt, Bt, V


def s4d_init(init: str, N: int, H: int = 1, *, b_clip: float | None = None,
             generator: torch.Generator | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Initial diagonal ``A`` and ``B`` of S4D, shapes (H, N/2), complex128 (eqs. 11-13).

    Args:
        init: "lin" (S4D-Lin, eq. 13), "inv" (S4D-Inv, eq. 12), "legs" (S4D-LegS, eq. 11), "real"
            (S4D-Real, lambda_n = -(n+1), a real-valued ablation), or "rand" (the official code's random
            init: lambda_n = -1/2 + i exp(z), z ~ N(0, 1), drawn with ``torch.randn``).
        N: state size, even (N/2 conjugate pairs are kept).
        H: number of independent copies (rows).
        b_clip: for "legs" only, clip the imaginary part of B to [-b_clip, b_clip] (the official code
            uses 2.0; with this module's phase convention B is real, so clipping changes nothing).
        generator: torch generator for "rand".
    """
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    N = _check_state_size(N)
    if isinstance(H, bool) or not isinstance(H, (int, np.integer)) or H < 1:
        raise ValueError(f"H must be a positive int, got {H!r}")
    n = np.arange(N // 2, dtype=np.float64)
    B = np.ones(N // 2, dtype=np.complex128)
    if init == "lin":
        A = -0.5 + 1j * math.pi * n                                       # (13)
    elif init == "inv":
        A = -0.5 + 1j * (N / math.pi) * (N / (2 * n + 1) - 1)            # (12)
    elif init == "legs":
        A, _, B, _ = hippo_legs_nplr(N)                                  # (11)
        if b_clip is not None:
            b_clip = check_positive(b_clip, "b_clip")
            B = B.real + 1j * np.clip(B.imag, -b_clip, b_clip)
    elif init == "real":
        A = -(n + 1) + 0j
    else:
        z = torch.randn(H, N // 2, generator=generator, dtype=torch.float64).numpy()
        return -0.5 + 1j * np.exp(z), np.ones((H, N // 2), dtype=np.complex128)
    return np.tile(A, (H, 1)), np.tile(B, (H, 1))


# ----------------------------------------------------------------------------- discretisation
def discretize(dt: Any, A: Any, B: Any, method: str = "zoh") -> tuple[Any, Any]:
    """Discretise the diagonal SSM (eq. 2 ZOH or eq. 3 bilinear).

    Args:
        dt: step sizes, real, shape broadcastable against A, e.g. (H, 1) or (H, N/2).
        A, B: complex, (H, N/2).
        method: "zoh" | "bilinear".
    Returns:
        ``(Abar, Bbar)``, complex, A's shape; NumPy arrays or tensors like ``A`` (differentiable in torch).
    """
    if method not in DISCS:
        raise ValueError(f"method must be one of {DISCS}, got {method!r}")
    _check_real(dt, "dt")
    _check_complex(A, "A")
    _check_complex(B, "B")
    if isinstance(A, torch.Tensor):
        dt, B = to_torch(dt, like=A), to_torch(B, like=A)
        exp = torch.exp
    else:
        dt, B = to_numpy(dt), to_numpy(B)
        exp = np.exp
    dtA = dt * A
    if method == "zoh":
        dA = exp(dtA)
        return dA, (dA - 1.0) / A * B                       # (2)
    den = 1.0 - dtA / 2
    return (1.0 + dtA / 2) / den, dt / den * B               # (3)


# ----------------------------------------------------------------------------- Vandermonde kernel
def _vandermonde_numpy(w: np.ndarray, x: np.ndarray, L: int) -> np.ndarray:
    """Eq. (7) row by row: K[h] = 2 Re(w[h] @ exp(x[h, :, None] * l))."""
    ell = np.arange(L)
    K = np.empty((w.shape[0], L), dtype=np.float64 if w.dtype == np.complex128 else np.float32)
    for h in range(w.shape[0]):
        K[h] = 2 * (w[h] @ np.exp(np.outer(x[h], ell))).real
    return K


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _vandermonde_row(wr, wi, xr, xi, L, out, zr, zi, dr, di):
    """One row of eq. (7), vectorised across the N/2 modes: z_n = w_n Abar_n^l is advanced by one
    complex multiplication per step and re-evaluated exactly (in float64) every _RESYNC steps."""
    N = wr.shape[0]
    T = out.dtype.type
    for n in range(N):
        e = math.exp(xr[n])
        dr[n] = T(e * math.cos(xi[n]))
        di[n] = T(e * math.sin(xi[n]))
    for l0 in range(0, L, _RESYNC):
        for n in range(N):
            m = math.exp(l0 * float(xr[n]))
            pr = m * math.cos(l0 * float(xi[n]))
            pi = m * math.sin(l0 * float(xi[n]))
            zr[n] = T(wr[n] * pr - wi[n] * pi)
            zi[n] = T(wr[n] * pi + wi[n] * pr)
        for ll in range(l0, min(l0 + _RESYNC, L)):
            acc = T(0)
            for n in range(N):
                a = zr[n]
                b = zi[n]
                acc += a
                zr[n] = a * dr[n] - b * di[n]
                zi[n] = a * di[n] + b * dr[n]
            out[ll] = T(2) * acc


@njit(cache=True, fastmath=_FASTMATH)
def _vandermonde_serial(wr, wi, xr, xi, L, out):
    N = wr.shape[1]
    zr = np.empty(N, out.dtype)
    zi = np.empty(N, out.dtype)
    dr = np.empty(N, out.dtype)
    di = np.empty(N, out.dtype)
    for h in range(wr.shape[0]):
        _vandermonde_row(wr[h], wi[h], xr[h], xi[h], L, out[h], zr, zi, dr, di)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _vandermonde_parallel(wr, wi, xr, xi, L, out):
    N = wr.shape[1]
    for h in prange(wr.shape[0]):
        zr = np.empty(N, out.dtype)
        zi = np.empty(N, out.dtype)
        dr = np.empty(N, out.dtype)
        di = np.empty(N, out.dtype)
        _vandermonde_row(wr[h], wi[h], xr[h], xi[h], L, out[h], zr, zi, dr, di)


def _vandermonde_numba(w: np.ndarray, x: np.ndarray, L: int) -> np.ndarray:
    rdt = np.float64 if w.dtype == np.complex128 else np.float32
    parts = [np.ascontiguousarray(a, dtype=rdt) for a in (w.real, w.imag, x.real, x.imag)]
    out = np.empty((w.shape[0], L), dtype=rdt)
    big = w.shape[0] > 1 and w.size * L >= PARALLEL_MIN
    (_vandermonde_parallel if big else _vandermonde_serial)(*parts, L, out)
    return out


def _vandermonde_torch(w: torch.Tensor, x: torch.Tensor, L: int) -> torch.Tensor:
    ell = torch.arange(L, device=x.device, dtype=_real_dtype(x))
    return 2 * torch.einsum("...n,...nl->...l", w, torch.exp(x.unsqueeze(-1) * ell)).real


def vandermonde_kernel(w: Any, log_a: Any, L: int, backend: str = "auto") -> Any:
    """The critical loop of the convolutional mode (eqs. 6-7): ``K_l = 2 Re sum_n w_n exp(l log_a_n)``.

    Args:
        w: (H, N/2) complex (``C * Bbar``); log_a: (H, N/2) complex (``log Abar``; ``Delta A`` for ZOH).
        L: kernel length.
        backend: "numpy" | "numba" | "torch" | "auto".
    Returns:
        K (H, L), real (float32 for complex64 inputs, float64 for complex128), of w's type. Gradients
        flow through the torch backend (autograd; no custom backward is needed).
    """
    _check_complex(w, "w", 2)
    _check_complex(log_a, "log_a", 2)
    if tuple(w.shape) != tuple(log_a.shape):
        raise ValueError(f"w and log_a must have the same shape, got {tuple(w.shape)} and {tuple(log_a.shape)}")
    L = _check_length(L)
    backend = resolve_backend(backend, w)
    if backend == "torch":
        wt = to_torch(w)
        K = _vandermonde_torch(wt, to_torch(log_a, like=wt).to(wt.dtype), L)
        return K if isinstance(w, torch.Tensor) else K.detach().numpy()
    wn = to_numpy(w)
    xn = to_numpy(log_a).astype(wn.dtype, copy=False)
    K = _vandermonde_numpy(wn, xn, L) if backend == "numpy" else _vandermonde_numba(wn, xn, L)
    return like_input(K, w)


def s4d_kernel(dt: Any, A: Any, B: Any, C: Any, L: int, disc: str = "zoh", backend: str = "auto") -> Any:
    """The S4D convolution kernel (eqs. 2/3 then 6-7): K (H, L) real.

    Args:
        dt: real, (H,) or (H, 1) or (H, N/2); A, B, C: complex (H, N/2) (B may be all ones, B folded into C).
        L: kernel length; disc: "zoh" | "bilinear"; backend: as :func:`vandermonde_kernel`.
    """
    if isinstance(dt, (np.ndarray, torch.Tensor)) and dt.ndim == 1:
        dt = dt[:, None]
    dA, dB = discretize(dt, A, B, disc)
    _check_complex(C, "C", 2)
    C = to_torch(C, like=A) if isinstance(A, torch.Tensor) else to_numpy(C)
    if disc == "zoh":
        log_a = to_torch(dt, like=A) * A if isinstance(A, torch.Tensor) else to_numpy(dt) * A
    else:
        log_a = torch.log(dA) if isinstance(dA, torch.Tensor) else np.log(dA)
    return vandermonde_kernel(C * dB, log_a, L, backend=backend)


# ----------------------------------------------------------------------------- recurrent scan
def _scan_numpy(u, dA, dB, C, x):
    """Eq. (4) step by step, vectorised over batch, channels and modes."""
    L = u.shape[-1]
    y = np.empty(u.shape, dtype=u.dtype)
    for k in range(L):
        x = dA * x + dB * u[..., k, None]                      # x_k = Abar x_{k-1} + Bbar u_k
        y[..., k] = 2 * (C * x).sum(-1).real                   # y_k = 2 Re C x_k
    return y, x


@njit(cache=True, fastmath=_FASTMATH, inline="always")
def _scan_row(u, ar, ai, br, bi, cr, ci, xr, xi, y):
    N = ar.shape[0]
    T = y.dtype.type
    for k in range(u.shape[0]):
        uk = u[k]
        acc = T(0)
        for n in range(N):
            a = xr[n]
            b = xi[n]
            nr = ar[n] * a - ai[n] * b + br[n] * uk
            ni = ar[n] * b + ai[n] * a + bi[n] * uk
            xr[n] = nr
            xi[n] = ni
            acc += cr[n] * nr - ci[n] * ni
        y[k] = T(2) * acc


@njit(cache=True, fastmath=_FASTMATH)
def _scan_serial(u, ar, ai, br, bi, cr, ci, xr, xi, y):
    Bsz, H = u.shape[0], u.shape[1]
    for i in range(Bsz * H):
        b, h = i // H, i % H
        _scan_row(u[b, h], ar[h], ai[h], br[h], bi[h], cr[h], ci[h], xr[b, h], xi[b, h], y[b, h])


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _scan_parallel(u, ar, ai, br, bi, cr, ci, xr, xi, y):
    Bsz, H = u.shape[0], u.shape[1]
    for i in prange(Bsz * H):
        b, h = i // H, i % H
        _scan_row(u[b, h], ar[h], ai[h], br[h], bi[h], cr[h], ci[h], xr[b, h], xi[b, h], y[b, h])


def _scan_numba(u, dA, dB, C, x):
    rdt = u.dtype
    split = [np.ascontiguousarray(p, dtype=rdt) for c in (dA, dB, C) for p in (c.real, c.imag)]
    xr = np.ascontiguousarray(x.real, dtype=rdt)
    xi = np.ascontiguousarray(x.imag, dtype=rdt)
    y = np.empty_like(u)
    big = u.shape[0] * u.shape[1] > 1 and u.size * dA.shape[-1] >= PARALLEL_MIN
    (_scan_parallel if big else _scan_serial)(u, *split, xr, xi, y)
    return y, (xr + 1j * xi).astype(x.dtype)


def _scan_torch(u, dA, dB, C, x):
    ys = []
    for k in range(u.shape[-1]):
        x = dA * x + dB * u[..., k, None]
        ys.append(2 * (C * x).sum(-1).real)
    return torch.stack(ys, dim=-1), x


def ssm_scan(u: Any, dA: Any, dB: Any, C: Any, state: Any = None, backend: str = "auto") -> tuple[Any, Any]:
    """The critical loop of the recurrent mode (eq. 4), without the D term:
    ``x_k = Abar x_{k-1} + Bbar u_k``, ``y_k = 2 Re(C x_k)``.

    Args:
        u: (B, H, L) real input; dA, dB, C: (H, N/2) complex (discretised A, B and the output matrix).
        state: (B, H, N/2) complex initial state x_{-1}, or None for zeros.
        backend: "numpy" | "numba" | "torch" | "auto".
    Returns:
        ``(y, x_last)``: y (B, H, L) with u's dtype, the final state (B, H, N/2) complex; of u's type.
        Gradients flow through the torch backend.
    """
    _check_real(u, "u", 3)
    for name, a in (("dA", dA), ("dB", dB), ("C", C)):
        _check_complex(a, name, 2)
        if tuple(a.shape) != tuple(dA.shape) or a.shape[0] != u.shape[1]:
            raise ValueError(f"{name} must have shape (H, N/2) = ({u.shape[1]}, {dA.shape[-1]}) to match u "
                             f"{tuple(u.shape)}, got {tuple(a.shape)}")
    _check_finite(u, "u")
    backend = resolve_backend(backend, u)
    shape = (u.shape[0], u.shape[1], dA.shape[-1])
    if state is not None:
        _check_complex(state, "state", 3)
        if tuple(state.shape) != shape:
            raise ValueError(f"state must have shape {shape}, got {tuple(state.shape)}")
    if backend == "torch":
        ut = to_torch(u)
        cdt = torch.complex128 if ut.dtype == torch.float64 else torch.complex64
        mats = [to_torch(a, like=ut).to(cdt) for a in (dA, dB, C)]
        x = torch.zeros(shape, dtype=cdt, device=ut.device) if state is None else to_torch(state, like=ut).to(cdt)
        y, x = _scan_torch(ut, *mats, x)
        if isinstance(u, torch.Tensor):
            return y, x
        return y.detach().numpy(), x.detach().numpy()
    un = np.ascontiguousarray(to_numpy(u))
    cdt = np.complex128 if un.dtype == np.float64 else np.complex64
    mats = [to_numpy(a).astype(cdt, copy=False) for a in (dA, dB, C)]
    x = np.zeros(shape, dtype=cdt) if state is None else to_numpy(state).astype(cdt)
    y, x = (_scan_numpy if backend == "numpy" else _scan_numba)(un, *mats, x)
    return like_input(y.astype(un.dtype, copy=False), u), like_input(x, u)


# ----------------------------------------------------------------------------- FFT convolution
def fft_conv(u: Any, K: Any, D: Any = None) -> Any:
    """Causal convolution by FFT of length 2L plus the skip term (eq. 8): y = K * u + D u.

    Args:
        u: (..., H, L) real; K: (H, L) real; D: (H,) real or None.
    Returns:
        y like u (differentiable for tensors).
    """
    _check_real(u, "u")
    _check_real(K, "K", 2)
    if u.ndim < 2 or tuple(K.shape) != tuple(u.shape[-2:]):
        raise ValueError(f"K must have shape (H, L) = {tuple(u.shape[-2:])} to match u, got {tuple(K.shape)}")
    L = u.shape[-1]
    if isinstance(u, torch.Tensor):
        K = to_torch(K, like=u)
        y = torch.fft.irfft(torch.fft.rfft(u, n=2 * L) * torch.fft.rfft(K, n=2 * L), n=2 * L)[..., :L]
        return y if D is None else y + u * to_torch(D, like=u).unsqueeze(-1)
    K = to_numpy(K)
    y = np.fft.irfft(np.fft.rfft(u, n=2 * L) * np.fft.rfft(K, n=2 * L), n=2 * L)[..., :L].astype(u.dtype)
    return y if D is None else y + u * to_numpy(D)[:, None]


# ----------------------------------------------------------------------------- modules
class S4DKernel(torch.nn.Module):
    """The S4D kernel generator with the official minimal ``S4DKernel``'s parameters (eq. 14).

    Parameters (names and shapes as ``models/s4/s4d.py``): ``C`` (H, N/2, 2) (a complex (H, N/2) stored with
    ``view_as_real``; B is folded into it), ``log_dt`` (H,), ``log_A_real`` (H, N/2), ``A_imag`` (H, N/2).
    With ``init="lin"`` the random draws (``log_dt`` then ``C``) follow the official order, so the same torch
    seed gives the same parameters. ``lr=0.0`` registers log_dt/log_A_real/A_imag as buffers; otherwise each
    gets an ``_optim`` attribute ``{"weight_decay": 0.0[, "lr": lr]}``.

    ``forward(L)`` -> K (H, L), eqs. (2), (6)-(7) (or (3) with ``disc="bilinear"``).
    """

    def __init__(self, d_model: int, N: int = 64, dt_min: float = 0.001, dt_max: float = 0.1,
                 lr: float | None = None, init: str = "lin", disc: str = "zoh", b_clip: float | None = None):
        super().__init__()
        if isinstance(d_model, bool) or not isinstance(d_model, int) or d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {d_model!r}")
        N = _check_state_size(N)
        dt_min, dt_max = check_positive(dt_min, "dt_min"), check_positive(dt_max, "dt_max")
        if dt_min > dt_max:
            raise ValueError(f"dt_min must be <= dt_max, got {dt_min} > {dt_max}")
        if disc not in DISCS:
            raise ValueError(f"disc must be one of {DISCS}, got {disc!r}")
        self.H, self.N, self.init, self.disc = d_model, N, init, disc
        H = d_model
        log_dt = torch.rand(H) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)   # (14)
        C = torch.randn(H, N // 2, dtype=torch.cfloat)
        A, B = s4d_init(init, N, H, b_clip=b_clip)
        C = C * torch.from_numpy(B).to(torch.cfloat)                                          # fold B into C
        self.C = torch.nn.Parameter(torch.view_as_real(C))
        A = torch.from_numpy(A)
        self._register("log_dt", log_dt, lr)
        self._register("log_A_real", torch.log(-A.real).float(), lr)
        self._register("A_imag", A.imag.float().contiguous(), lr)

    def _register(self, name: str, tensor: torch.Tensor, lr: float | None) -> None:
        if lr == 0.0:
            self.register_buffer(name, tensor)
        else:
            self.register_parameter(name, torch.nn.Parameter(tensor))
            optim = {"weight_decay": 0.0}
            if lr is not None:
                optim["lr"] = lr
            getattr(self, name)._optim = optim

    def ssm(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(dt (H, 1), A (H, N/2), C (H, N/2))`` of eq. (14) (B = 1, folded into C)."""
        dt = torch.exp(self.log_dt).unsqueeze(-1)
        A = -torch.exp(self.log_A_real) + 1j * self.A_imag
        return dt, A, torch.view_as_complex(self.C)

    def discrete(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(Abar, Bbar, C)`` (H, N/2) complex, for the recurrent mode (eqs. 2-4)."""
        dt, A, C = self.ssm()
        dA, dB = discretize(dt, A, torch.ones_like(A), self.disc)
        return dA, dB, C

    def forward(self, L: int) -> torch.Tensor:
        dt, A, C = self.ssm()
        return s4d_kernel(dt, A, torch.ones_like(A), C, L, disc=self.disc, backend="torch")

    def extra_repr(self) -> str:
        return f"d_model={self.H}, N={self.N}, init={self.init!r}, disc={self.disc!r}"


class _TiedDropout(torch.nn.Module):
    """Dropout with one mask per (batch, channel), shared along the sequence (the official DropoutNd)."""

    def __init__(self, p: float):
        super().__init__()
        if not 0.0 <= p < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {p}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        mask = (torch.rand(*x.shape[:-1], 1, device=x.device) >= self.p).to(x.dtype)
        return x * mask / (1.0 - self.p)


class S4D(torch.nn.Module):
    """An S4D layer as the official minimal ``S4D``: kernel convolution + D skip (eq. 8), GELU, dropout,
    then a position-wise Conv1d(H, 2H, 1) + GLU that mixes the channels.

    Input and output (B, H, L) (``transposed=True``) or (B, L, H). Parameter names and shapes are the
    official ones (``D``, ``kernel.C``, ``kernel.log_dt``, ``kernel.log_A_real``, ``kernel.A_imag``,
    ``output_linear.0.weight``, ``output_linear.0.bias``), so official state_dicts load; with
    ``init="lin"`` the same torch seed gives the same initial parameters. ``forward`` returns y alone (the
    official returns ``(y, None)``). ``forward_recurrent`` computes the same output with the scan (eq. 4).
    """

    def __init__(self, d_model: int, d_state: int = 64, dropout: float = 0.0, transposed: bool = True,
                 **kernel_args: Any):
        super().__init__()
        self.h, self.n, self.d_output, self.transposed = d_model, d_state, d_model, transposed
        self.D = torch.nn.Parameter(torch.randn(d_model))
        self.kernel = S4DKernel(d_model, N=d_state, **kernel_args)
        self.activation = torch.nn.GELU()
        self.dropout = _TiedDropout(dropout) if dropout > 0.0 else torch.nn.Identity()
        self.output_linear = torch.nn.Sequential(torch.nn.Conv1d(d_model, 2 * d_model, kernel_size=1),
                                                 torch.nn.GLU(dim=-2))

    def _check(self, u: torch.Tensor) -> torch.Tensor:
        if not isinstance(u, torch.Tensor) or not u.is_floating_point():
            raise TypeError(f"u must be a floating-point torch.Tensor, got {getattr(u, 'dtype', type(u).__name__)}")
        if not self.transposed:
            u = u.transpose(-1, -2)
        if u.ndim != 3 or u.shape[1] != self.h:
            raise ValueError(f"u must have shape (B, H={self.h}, L)"
                             f"{'' if self.transposed else ' before transposing from (B, L, H)'}, got {tuple(u.shape)}")
        return u

    def _pointwise(self, y: torch.Tensor) -> torch.Tensor:
        y = self.output_linear(self.dropout(self.activation(y)))
        return y if self.transposed else y.transpose(-1, -2)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        u = self._check(u)
        k = self.kernel(u.shape[-1])
        return self._pointwise(fft_conv(u, k, self.D))

    def forward_recurrent(self, u: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        """The same output as ``forward`` by the recurrent scan (eq. 4) instead of the convolution."""
        u = self._check(u)
        dA, dB, C = self.kernel.discrete()
        y, _ = ssm_scan(u, dA, dB, C, backend=backend)
        return self._pointwise(y + u * self.D.unsqueeze(-1))
