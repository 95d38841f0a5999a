"""The Two-Pass Softmax Algorithm (Dukhan & Ablavatski, 2020, arXiv:2001.04438).

Softmax over the last axis of ``x`` (rows x n), computed three ways:

    (1) y_i = exp(x_i) / sum_j exp(x_j)
    (2) y_i = exp(x_i - c) / sum_j exp(x_j - c),  c = max_j x_j        (the three-pass algorithm)

Three-pass, "recompute" variant: pass 1 finds c, pass 2 sums exp(x_j - c), pass 3 recomputes
exp(x_i - c) and scales it. "Reload" variant: pass 2 also stores exp(x_j - c) into y, pass 3
reloads y and scales it.

Two-pass (the paper's algorithm): every exponential is kept in "extended-exponent" form

    (3) exp(x) = m * 2^n,   n = round(x * log2(e)),   m = exp(x - n * ln 2)  in [2^-1/2, 2^1/2]

and two such numbers add without overflow by moving both to the larger exponent:

    (4) m_a 2^{n_a} + m_b 2^{n_b} = (m_a 2^{n_a - N} + m_b 2^{n_b - N}) 2^N,   N = max(n_a, n_b)

Pass 1 streams over the row once, keeping the running sum as a pair (S, N):

    (5) N_i = max(N_{i-1}, n_i),   S_i = S_{i-1} 2^{N_{i-1} - N_i} + m_i 2^{n_i - N_i}

(S_0 = 0, N_0 = -inf), and pass 2 recomputes each m_i 2^{n_i} and scales it:

    (6) y_i = (m_i / S) * 2^{n_i - N}

Memory traffic per element (float32, 4 bytes): three-pass recompute reads x three times and writes y
once (16 B); reload reads x twice, writes y, reads and writes y again (20 B); two-pass reads x twice
and writes y once (12 B):

    (7) bytes(two-pass) : bytes(recompute) : bytes(reload) = 3 : 4 : 5

The reduction of (3) is Cody-Waite: with ln 2 = L_hi + L_lo, L_hi holding few significant bits so
that n * L_hi is exact,

    (8) t = (x - n L_hi) - n L_lo,   m = exp(t) ~= p(t)  (a polynomial on |t| <= ln2 / 2)

Backends: ``"numpy"`` (readable reference; libm exp; pass 1 streams over blocks of columns with (5)),
``"numba"`` (row-parallel kernels that work on chunks of ``_CHUNK`` elements held in L1, all in x's
dtype: the reduction (8) with Cephes' float32 split of ln 2 (n * L_hi exact for |x| < 2.2e4) or
fdlibm's float64 split, the polynomial p of (8) (XNNPACK's degree-5 minimax for float32, Taylor to
degree 12 for float64), 2^d built from its bits and flushed to 0 below the smallest normal number,
as XNNPACK does), ``"torch"`` (vectorised, device-agnostic,
differentiable by autograd). ``"auto"`` picks torch for tensors and numba for arrays.

``xnnpack_*``: an own NumPy float32 emulation of XNNPACK's AVX2 microkernels
``xnn_f32_raddextexp_ukernel__avx2_p5_u32`` (pass 1) and ``xnn_f32_vscaleextexp_ukernel__avx2_p5_u8``
(pass 2), bit for bit: degree-5 minimax polynomial, round-half-even n, FMA Cody-Waite reduction,
2^d by the magic-bias trick (0 for d <= -127), 8 SIMD lanes with a per-32-element block maximum, and
the horizontal sum order ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7)).

Inputs with -inf (masks): the numpy/numba/torch backends give exp(-inf) = 0 exactly; XNNPACK's
kernels (and their emulation) return NaN for the whole row (t = -inf - (-inf)). NaN or +inf inputs
give NaN rows (not checked: a check would cost the pass the algorithm saves). The numba kernels
keep n as int32, clamped to +-2^29: inputs beyond |x| ~ 3.7e8 lose accuracy there.
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from numba import njit, prange

from refimpl._common.backend import like_input, resolve_backend, to_numpy, to_torch
from refimpl._common.kernels import FASTMATH as _FASTMATH, row_blocks

__all__ = [
    "softmax_two_pass", "softmax_three_pass", "extexp_sum", "softmax_bytes",
    "xnnpack_raddextexp_f32", "xnnpack_vscaleextexp_f32", "xnnpack_softmax_f32",
]

# ----------------------------------------------------------------------------- constants
LOG2E = 1.4426950408889634
# fdlibm's split of ln 2: L_HI has 32 significant bits, so n * L_HI is exact for |n| < 2^21 (eq. 8).
LN2_HI = 6.93147180369123816490e-01
LN2_LO = 1.90821492927058770002e-10
# Cephes' float32 split: 0.693359375 has 9 significant bits, exact products for |n| < 2^15.
LN2_HI_F32 = 0.693359375
LN2_LO_F32 = -2.12194440e-4

# Polynomials for exp(t), |t| <= ln2/2, highest degree first (Horner).
# float32: XNNPACK's degree-5 minimax coefficients (max rel. error ~1e-7 on the interval).
_P5_F32 = np.array([float.fromhex(h) for h in
                    ("0x1.0F9F9Cp-7", "0x1.573A1Ap-5", "0x1.555A80p-3", "0x1.FFFDC6p-2",
                     "0x1.FFFFF6p-1", "0x1.0p0")], dtype=np.float32)
# float64: Taylor to degree 12 (truncation < (ln2/2)^13 / 13! ~ 2e-16).
_P12_F64 = np.array([1.0 / math.factorial(k) for k in range(12, -1, -1)], dtype=np.float64)

# Elements handled together by the numba kernels: n, t, p and the 2^d bits of one chunk stay in L1.
_CHUNK = 512
_VARIANTS = ("recompute", "reload")


# ----------------------------------------------------------------------------- validation
def _check_x(x: Any, name: str = "x") -> None:
    if isinstance(x, torch.Tensor):
        ok = x.dtype in (torch.float32, torch.float64)
    elif isinstance(x, np.ndarray):
        ok = x.dtype in (np.float32, np.float64)
    else:
        raise TypeError(f"{name} must be a numpy.ndarray or torch.Tensor, got {type(x).__name__}")
    if not ok:
        raise TypeError(f"{name} must be float32 or float64, got {str(x.dtype).replace('torch.', '')}")
    if x.ndim < 1:
        raise ValueError(f"{name} must have at least 1 dimension (softmax runs over the last axis), "
                         f"got a 0-d {type(x).__name__}")
    if x.shape[-1] == 0:
        raise ValueError(f"{name} must have at least one element in its last axis, got shape {tuple(x.shape)}")


def _check_variant(variant: Any) -> str:
    if not isinstance(variant, str) or variant not in _VARIANTS:
        raise ValueError(f"variant must be one of {_VARIANTS}, got {variant!r}")
    return variant


def _rows(x: Any) -> np.ndarray:
    a = np.ascontiguousarray(to_numpy(x))
    return a.reshape(-1, a.shape[-1])


# ----------------------------------------------------------------------------- numpy reference
def _extexp_numpy(xb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Eq. (3) with the reduction (8) in float64 and libm exp in x's dtype: (m, n), n as float64."""
    x64 = xb.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        n = np.floor(x64 * LOG2E + 0.5)
        t = (x64 - n * LN2_HI) - n * LN2_LO
        t = np.where(x64 == -np.inf, 0.0, t)              # exp(-inf) = 0: m = 1, n = -inf
    return np.exp(t.astype(xb.dtype)), n


def _pow2(d: np.ndarray) -> np.ndarray:
    """2^d for integer-valued float64 d <= 0 (0 for d = -inf; NaN when d is NaN)."""
    return np.exp2(d)


def _extexp_sum_numpy(x2: np.ndarray, block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Pass 1 (eq. 5), streaming over blocks of columns, vectorised over rows. Returns (S, N),
    float64, with sum_j exp(x_j) = S * 2^N."""
    rows, n = x2.shape
    s = np.zeros(rows)
    big_n = np.full(rows, -np.inf)
    with np.errstate(invalid="ignore"):
        for start in range(0, n, block):
            m, e = _extexp_numpy(x2[:, start:start + block])
            new_n = np.maximum(big_n, e.max(axis=1))                    # N_i = max(N_{i-1}, n_i)
            old = np.where(big_n == -np.inf, 0.0, s * _pow2(big_n - new_n))
            add = (m * _pow2(e - new_n[:, None])).sum(axis=1, dtype=np.float64)
            s, big_n = old + add, new_n                                  # S_i (eq. 5), block-wise
    return s, big_n


def _two_pass_numpy(x2: np.ndarray) -> np.ndarray:
    s, big_n = _extexp_sum_numpy(x2)                                      # pass 1
    m, e = _extexp_numpy(x2)                                              # pass 2 recomputes (3)
    with np.errstate(invalid="ignore", divide="ignore"):
        y = (m / s[:, None].astype(x2.dtype)) * _pow2(e - big_n[:, None])  # eq. (6)
    return y.astype(x2.dtype, copy=False)


def _three_pass_numpy(x2: np.ndarray, variant: str) -> np.ndarray:
    with np.errstate(invalid="ignore", over="ignore"):
        c = x2.max(axis=1, keepdims=True)                                 # pass 1: c = max x
        if variant == "reload":
            y = np.exp(x2 - c)                                            # pass 2 stores exp(x - c)
            s = y.sum(axis=1, keepdims=True)
            y *= 1 / s                                                    # pass 3 reloads y
            return y
        s = np.exp(x2 - c).sum(axis=1, keepdims=True)                     # pass 2
        return np.exp(x2 - c) * (1 / s)                                   # pass 3 recomputes


# ----------------------------------------------------------------------------- numba kernels
# Exponents n are kept as int32 (integer max reductions and shifts vectorise; float max does not).
# n is clamped to +-_NBIG: -_NBIG stands for exp(-inf) = 0 (any n - ref <= -bias flushes to 0).
_NBIG = 1 << 29


@njit(cache=True)
def _chunk_extexp(xs, k, shift, c, ln2_hi, ln2_lo, nb, pb):
    """For z_j = xs[j] - shift, j < k (xs: a zero-based slice of the row, so that indexing needs
    no wrap-around check and the loop vectorises), in x's dtype T: nb[j] = n_j (int32) and pb[j] = p(t_j)
    ~= m_j (eqs. 3, 8), Horner in registers. One elementwise loop of fixed shape, which LLVM
    vectorises; compiled *without* fastmath so that the Cody-Waite order (z - n L_hi) - n L_lo is
    kept. z = -inf gives (n, t) = (-_NBIG, 0), i.e. exp(z) = 1 * 2^-big = 0."""
    T = xs.dtype.type
    log2e = T(LOG2E)
    half = T(0.5)
    zero = T(0)
    big = T(_NBIG)
    if c.shape[0] == 6:                                 # float32: degree 5
        c0, c1, c2, c3, c4, c5 = c[0], c[1], c[2], c[3], c[4], c[5]
        for j in range(k):
            z = xs[j] - shift
            n = np.floor(z * log2e + half)
            t = (z - n * ln2_hi) - n * ln2_lo
            t = t if z != -np.inf else zero
            n = n if n > -big else -big                 # -inf (and NaN, whose t is NaN) -> -big
            n = n if n < big else big
            nb[j] = np.int32(n)
            pb[j] = ((((c0 * t + c1) * t + c2) * t + c3) * t + c4) * t + c5
    else:                                               # float64: degree 12
        d0, d1, d2, d3, d4, d5, d6 = c[0], c[1], c[2], c[3], c[4], c[5], c[6]
        d7, d8, d9, d10, d11, d12 = c[7], c[8], c[9], c[10], c[11], c[12]
        for j in range(k):
            z = xs[j] - shift
            n = np.floor(z * log2e + half)
            t = (z - n * ln2_hi) - n * ln2_lo
            t = t if z != -np.inf else zero
            n = n if n > -big else -big
            n = n if n < big else big
            nb[j] = np.int32(n)
            p = ((((((d0 * t + d1) * t + d2) * t + d3) * t + d4) * t + d5) * t + d6) * t + d7
            pb[j] = ((((p * t + d8) * t + d9) * t + d10) * t + d11) * t + d12


@njit(cache=True)
def _chunk_pow2_bits(nb, ref, k, eb, bias, mbits):
    """eb[j] = the bit pattern of 2^(n_j - ref) in x's dtype, or 0 when n_j - ref <= -bias
    (flush below the smallest normal number, as XNNPACK's magic-bias trick does)."""
    for j in range(k):
        e = nb[j] - ref + bias
        e = e if e > 0 else 0
        eb[j] = eb.dtype.type(e) << mbits


@njit(cache=True)
def _chunk_max(nb, k):
    m = nb[0]
    for j in range(1, k):
        v = nb[j]
        m = v if v > m else m
    return m


@njit(cache=True, fastmath=_FASTMATH)
def _row_max(xr):
    """max of a row with 16 independent running maxima (a float max reduction does not vectorise
    without "nnan"; independent chains at least overlap)."""
    n = xr.shape[0]
    acc = np.empty(16, dtype=xr.dtype)
    for lane in range(16):
        acc[lane] = xr[0]
    n16 = n - n % 16
    for j in range(0, n16, 16):
        blk = xr[j:j + 16]
        for lane in range(16):
            v = blk[lane]
            acc[lane] = v if v > acc[lane] else acc[lane]
    m = xr[0]
    for lane in range(16):
        m = acc[lane] if acc[lane] > m else m
    for j in range(n16, n):
        m = xr[j] if xr[j] > m else m
    return m


@njit(cache=True, fastmath=_FASTMATH)
def _chunk_dot(pb, sc, k):
    """sum_j pb[j] * sc[j] in x's dtype; reassociation lets LLVM vectorise the sum."""
    acc = pb.dtype.type(0)
    for j in range(k):
        acc += pb[j] * sc[j]
    return acc


@njit(cache=True, fastmath=_FASTMATH)
def _chunk_store_dot(pb, sc, k, ys):
    """ys[j] = pb[j] * sc[j] and their sum (pass 2 of the reload variant; ys a zero-based slice)."""
    acc = pb.dtype.type(0)
    for j in range(k):
        v = pb[j] * sc[j]
        ys[j] = v
        acc += v
    return acc


# The row kernels below are compiled WITHOUT fastmath: LLVM inlines _chunk_extexp into them, and a
# fastmath caller lets it reassociate (z - n L_hi) - n L_lo into z - n (L_hi + L_lo), an error of
# ~2e-9 n (measured: 3e-5 relative at |x| = 1e4). Only the reductions above carry reassociation.
@njit(cache=True)
def _row_two_pass(xr, yr, c, hi, lo, nb, pb, eb, sc, bias, mbits):
    """Both passes of the two-pass algorithm on one row; returns (S, N) of eq. (5)."""
    n = xr.shape[0]
    T = xr.dtype.type
    zero = T(0)
    s = 0.0                                             # S in float64, N an int32
    big_n = np.int32(-_NBIG)
    for start in range(0, n, _CHUNK):                   # pass 1 (eq. 5), a chunk at a time
        k = min(_CHUNK, n - start)
        _chunk_extexp(xr[start:start + k], k, zero, c, hi, lo, nb, pb)
        cn = _chunk_max(nb, k)                          # N of this chunk
        _chunk_pow2_bits(nb, cn, k, eb, bias, mbits)
        cs = _chunk_dot(pb, sc, k)                      # sum of m_j 2^(n_j - N_chunk)
        new_n = cn if cn > big_n else big_n
        s = s * 2.0 ** np.float64(big_n - new_n) + np.float64(cs) * 2.0 ** np.float64(cn - new_n)  # (4)
        big_n = new_n
    if big_n == -_NBIG:                                 # every entry -inf: 0/0
        for j in range(n):
            yr[j] = np.nan
        return np.nan, -np.inf
    inv = T(1.0 / s)
    for start in range(0, n, _CHUNK):                   # pass 2 (eq. 6)
        k = min(_CHUNK, n - start)
        _chunk_extexp(xr[start:start + k], k, zero, c, hi, lo, nb, pb)
        _chunk_pow2_bits(nb, big_n, k, eb, bias, mbits)
        ys = yr[start:start + k]
        for j in range(k):
            ys[j] = pb[j] * inv * sc[j]
    return s, np.float64(big_n)


@njit(cache=True)
def _row_three_pass(xr, yr, c, hi, lo, nb, pb, eb, sc, bias, mbits, reload):
    n = xr.shape[0]
    T = xr.dtype.type
    shift = _row_max(xr)                                # pass 1
    ref = np.int32(0)
    s = T(0)
    for start in range(0, n, _CHUNK):                   # pass 2: sum exp(x - c)
        k = min(_CHUNK, n - start)
        _chunk_extexp(xr[start:start + k], k, shift, c, hi, lo, nb, pb)
        _chunk_pow2_bits(nb, ref, k, eb, bias, mbits)
        if reload:
            s += _chunk_store_dot(pb, sc, k, yr[start:start + k])
        else:
            s += _chunk_dot(pb, sc, k)
    inv = T(1) / s
    if reload:                                          # pass 3 reloads y
        for j in range(n):
            yr[j] *= inv
    else:                                               # pass 3 recomputes exp(x - c)
        for start in range(0, n, _CHUNK):
            k = min(_CHUNK, n - start)
            _chunk_extexp(xr[start:start + k], k, shift, c, hi, lo, nb, pb)
            _chunk_pow2_bits(nb, ref, k, eb, bias, mbits)
            ys = yr[start:start + k]
            for j in range(k):
                ys[j] = pb[j] * sc[j] * inv


@njit(parallel=True, cache=True)
def _softmax_numba(x, y, c, hi, lo, nbs, pbs, ebs, scs, bias, mbits, mode, s_out, n_out):
    """mode 0: two-pass (also writes S, N per row); 1: three-pass recompute; 2: three-pass reload.
    Rows are split into ``nbs.shape[0]`` blocks, one per thread; block b uses row b of the scratch
    arrays (``scs`` is ``ebs`` viewed as x's dtype), allocated by the caller."""
    rows = x.shape[0]
    nblocks = nbs.shape[0]
    for b in prange(nblocks):
        nb = nbs[b]
        pb = pbs[b]
        eb = ebs[b]
        sc = scs[b]
        for r in range(b * rows // nblocks, (b + 1) * rows // nblocks):
            if mode == 0:
                s, e = _row_two_pass(x[r], y[r], c, hi, lo, nb, pb, eb, sc, bias, mbits)
                s_out[r] = s
                n_out[r] = e
            else:
                _row_three_pass(x[r], y[r], c, hi, lo, nb, pb, eb, sc, bias, mbits, mode == 2)


@njit(cache=True)
def _softmax_serial(x, y, c, hi, lo, nbs, pbs, ebs, scs, bias, mbits, mode, s_out, n_out):
    """The same on the calling thread (no thread-pool wake-up: small inputs, or parallel=False)."""
    nb = nbs[0]
    pb = pbs[0]
    eb = ebs[0]
    sc = scs[0]
    for r in range(x.shape[0]):
        if mode == 0:
            s, e = _row_two_pass(x[r], y[r], c, hi, lo, nb, pb, eb, sc, bias, mbits)
            s_out[r] = s
            n_out[r] = e
        else:
            _row_three_pass(x[r], y[r], c, hi, lo, nb, pb, eb, sc, bias, mbits, mode == 2)


def _numba_consts(dtype):
    if dtype == np.float32:
        return (_P5_F32, np.float32(LN2_HI_F32), np.float32(LN2_LO_F32), np.int32, np.int32(127),
                np.int32(23))
    return _P12_F64, np.float64(LN2_HI), np.float64(LN2_LO), np.int64, np.int32(1023), np.int64(52)


def _run_numba(x2: np.ndarray, mode: int, parallel: bool):
    c, hi, lo, itype, bias, mbits = _numba_consts(x2.dtype)
    rows = x2.shape[0]
    y = np.empty_like(x2)
    s = np.zeros(rows)
    e = np.zeros(rows)
    nblocks = row_blocks(rows, x2.size) if parallel else 1
    nbs = np.empty((nblocks, _CHUNK), np.int32)
    pbs = np.empty((nblocks, _CHUNK), x2.dtype)
    ebs = np.empty((nblocks, _CHUNK), itype)
    kernel = _softmax_numba if nblocks > 1 else _softmax_serial
    kernel(x2, y, c, hi, lo, nbs, pbs, ebs, ebs.view(x2.dtype), bias, mbits, mode, s, e)
    return y, s, e


# ----------------------------------------------------------------------------- torch path
def _extexp_torch(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. (3) in x's dtype with a Cody-Waite split (8) whose n * L_hi is exact: (m, n)."""
    hi, lo = (LN2_HI_F32, LN2_LO_F32) if x.dtype == torch.float32 else (LN2_HI, LN2_LO)
    n = torch.floor(x * LOG2E + 0.5)
    t = (x - n * hi) - n * lo
    t = torch.where(x == -math.inf, torch.zeros_like(t), t)
    return torch.exp(t), n


def _extexp_sum_torch(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m, n = _extexp_torch(x2)
    big_n = n.amax(dim=-1, keepdim=True)       # the N that recurrence (5) ends with
    s = (m * torch.exp2(n - big_n)).sum(dim=-1, keepdim=True)
    return s, big_n


def _two_pass_torch(x2: torch.Tensor) -> torch.Tensor:
    s, big_n = _extexp_sum_torch(x2)           # pass 1
    m, n = _extexp_torch(x2)                   # pass 2 recomputes (3)
    return (m / s) * torch.exp2(n - big_n)     # eq. (6)


def _three_pass_torch(x2: torch.Tensor, variant: str) -> torch.Tensor:
    c = x2.amax(dim=-1, keepdim=True)
    if variant == "reload":
        y = torch.exp(x2 - c)
        return y / y.sum(dim=-1, keepdim=True)
    s = torch.exp(x2 - c).sum(dim=-1, keepdim=True)
    return torch.exp(x2 - c) / s


# ----------------------------------------------------------------------------- public API
def softmax_two_pass(x: Any, backend: str = "auto", parallel: bool = True) -> Any:
    """Softmax over the last axis by the two-pass extended-exponent algorithm (eqs. 3-6).

    Args:
        x: array or tensor (..., n), float32 or float64, n >= 1. -inf entries give 0 exactly.
        backend: "numpy" | "numba" | "torch" | "auto" (torch for tensors, numba for arrays).
        parallel: numba only; False runs the kernel on one thread.
    Returns:
        y of x's shape, dtype and type (tensor on x's device); rows sum to 1. The torch backend is
        differentiable (autograd through eqs. 3-6; n has zero gradient, so the gradient is softmax's).
    """
    _check_x(x)
    backend = resolve_backend(backend, x)
    if backend == "torch":
        xt = to_torch(x)
        y = _two_pass_torch(xt.reshape(-1, xt.shape[-1])).reshape(xt.shape)
        return y if isinstance(x, torch.Tensor) else y.detach().numpy()
    x2 = _rows(x)
    y = _two_pass_numpy(x2) if backend == "numpy" else _run_numba(x2, 0, parallel)[0]
    return like_input(y.reshape(x.shape), x)


def softmax_three_pass(x: Any, variant: str = "recompute", backend: str = "auto",
                       parallel: bool = True) -> Any:
    """Softmax over the last axis by the three-pass algorithm (eq. 2).

    Args:
        x: array or tensor (..., n), float32 or float64, n >= 1.
        variant: "recompute" (pass 3 recomputes exp(x - max)) or "reload" (pass 2 stores
            exp(x - max) in y, pass 3 rescales y in place).
        backend, parallel: as in :func:`softmax_two_pass`.
    Returns:
        y of x's shape, dtype and type.
    """
    _check_x(x)
    variant = _check_variant(variant)
    backend = resolve_backend(backend, x)
    if backend == "torch":
        xt = to_torch(x)
        y = _three_pass_torch(xt.reshape(-1, xt.shape[-1]), variant).reshape(xt.shape)
        return y if isinstance(x, torch.Tensor) else y.detach().numpy()
    x2 = _rows(x)
    if backend == "numpy":
        y = _three_pass_numpy(x2, variant)
    else:
        y = _run_numba(x2, 1 if variant == "recompute" else 2, parallel)[0]
    return like_input(y.reshape(x.shape), x)


def extexp_sum(x: Any, backend: str = "auto") -> tuple[Any, Any]:
    """Pass 1 alone (eq. 5): per row (S, N) with sum_j exp(x_j) = S * 2^N, N = max_j n_j.

    Args: x (..., n) float32/float64; backend as in :func:`softmax_two_pass`.
    Returns: (S, N) of shape x.shape[:-1]; float64 for numpy/numba, x's dtype for torch.
    S lies in [2^-1/2, n * 2^1/2]: no overflow whatever the range of x.
    """
    _check_x(x)
    backend = resolve_backend(backend, x)
    if backend == "torch":
        xt = to_torch(x)
        with torch.no_grad():
            s, e = _extexp_sum_torch(xt.reshape(-1, xt.shape[-1]))
        return s.reshape(xt.shape[:-1]), e.reshape(xt.shape[:-1])
    x2 = _rows(x)
    if backend == "numpy":
        s, e = _extexp_sum_numpy(x2)
    else:
        _, s, e = _run_numba(x2, 0, True)
    shape = tuple(x.shape[:-1])
    return like_input(s.reshape(shape), x), like_input(e.reshape(shape), x)


def softmax_bytes(n_elements: int, algorithm: str, itemsize: int = 4) -> int:
    """Bytes moved between memory and the core by one softmax over ``n_elements`` (eq. 7):
    two-pass 3 accesses per element, three-pass recompute 4, reload 5."""
    passes = {"two_pass": 3, "recompute": 4, "reload": 5}
    if algorithm not in passes:
        raise ValueError(f"algorithm must be one of {tuple(passes)}, got {algorithm!r}")
    return passes[algorithm] * int(n_elements) * int(itemsize)


# ----------------------------------------------------------------------------- XNNPACK emulation
_F32 = np.float32
_X_LOG2E = _F32(float.fromhex("0x1.715476p+0"))
_X_MINUS_LN2_HI = _F32(float.fromhex("-0x1.62E43p-1"))
_X_MINUS_LN2_LO = _F32(float.fromhex("0x1.05C61p-29"))
_X_MAGIC = _F32(float.fromhex("0x1.8000FEp23"))
_X_MIN_EXP = _F32(-127.0)


def _fma32(a, b, c) -> np.ndarray:
    """Single-rounding float32 a*b + c: the float64 product is exact (24+24 bits); the float64 sum
    is rounded once more, so a float32 tie created by that rounding is broken with the TwoSum
    residual."""
    a64 = np.asarray(a, np.float64)
    c64 = np.asarray(c, np.float64)
    p = a64 * np.asarray(b, np.float64)
    s = p + c64
    bb = s - p
    err = (p - (s - bb)) + (c64 - bb)                      # s + err = a*b + c exactly
    r = s.astype(_F32)
    r64 = r.astype(np.float64)
    up = s > r64
    nb = np.nextafter(r, np.where(up, _F32(np.inf), _F32(-np.inf)).astype(_F32))
    tie = (s != r64) & (s == (r64 + nb.astype(np.float64)) * 0.5) & (err != 0)
    go = tie & ((err > 0) == up)                            # the exact value lies beyond the tie
    return np.where(go, nb, r).astype(_F32)


def _maxps(a, b) -> np.ndarray:
    """_mm256_max_ps(a, b): b unless a > b (so b when either is NaN)."""
    return np.where(a > b, a, b).astype(_F32)


def _magic_pow2(d) -> np.ndarray:
    """2^d for integer-valued float32 d in [-127, 0] by the magic-bias trick; d = -127 gives 0."""
    f = (np.asarray(d, _F32) + _X_MAGIC).astype(_F32)
    return (f.view(np.uint32) << np.uint32(23)).view(_F32)


def _p5_f32(x) -> tuple[np.ndarray, np.ndarray]:
    n = np.rint((x * _X_LOG2E).astype(_F32))               # round half to even
    t = _fma32(n, _X_MINUS_LN2_HI, x)
    t = _fma32(n, _X_MINUS_LN2_LO, t)
    c = _P5_F32
    p = _fma32(c[0], t, c[1])
    for ci in c[2:]:
        p = _fma32(p, t, ci)
    return n, p


def _check_f32_rows(x: Any) -> np.ndarray:
    if not isinstance(x, np.ndarray):
        raise TypeError(f"x must be a numpy.ndarray, got {type(x).__name__}")
    if x.dtype != np.float32:
        raise TypeError(f"x must be float32 (the XNNPACK kernels are f32), got {x.dtype}")
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"x must have at least one element in its last axis, got shape {x.shape}")
    return np.ascontiguousarray(x).reshape(-1, x.shape[-1])


def xnnpack_raddextexp_f32(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bit-exact emulation of ``xnn_f32_raddextexp_ukernel__avx2_p5_u32`` on every row of x.

    Args: x (..., n) float32.
    Returns: (sum0, sum1), each float32 of shape x.shape[:-1]: sum_j exp(x_j) ~= sum0 * 2^sum1, with
    sum1 = max_j n_j and sum0 *not* normalised.
    """
    x2 = _check_f32_rows(x)
    rows, n = x2.shape
    accv = np.zeros((rows, 8), _F32)
    acce = np.full((rows, 8), -np.inf, _F32)
    i = 0
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        while n - i >= 32:                                      # 4 vectors of 8 lanes
            nv, pv = _p5_f32(x2[:, i:i + 32].reshape(rows, 4, 8))
            maxe = acce
            for k in range(4):
                maxe = _maxps(maxe, nv[:, k])
            accv = (accv * _magic_pow2(_maxps((acce - maxe).astype(_F32), _X_MIN_EXP))).astype(_F32)
            for k in range(4):
                s = _magic_pow2(_maxps((nv[:, k] - maxe).astype(_F32), _X_MIN_EXP))
                accv = _fma32(pv[:, k], s, accv)
            acce = maxe
            i += 32
        while n - i >= 8:
            nv, pv = _p5_f32(x2[:, i:i + 8])
            maxe = _maxps(acce, nv)
            da = _maxps((acce - maxe).astype(_F32), _X_MIN_EXP)
            de = _maxps((nv - maxe).astype(_F32), _X_MIN_EXP)
            accv = _fma32(pv, _magic_pow2(de), (accv * _magic_pow2(da)).astype(_F32))
            acce = maxe
            i += 8
        if n - i > 0:                                            # masked tail of 1-7 elements
            rem = n - i
            vx = np.zeros((rows, 8), _F32)
            vx[:, :rem] = x2[:, i:]
            mask = np.arange(8) < rem
            nv, pv = _p5_f32(vx)
            nv = np.where(mask, nv, acce).astype(_F32)
            pv = np.where(mask, pv, _F32(0)).astype(_F32)
            maxe = _maxps(acce, nv)
            de = _maxps((nv - maxe).astype(_F32), _X_MIN_EXP)
            da = _maxps((acce - maxe).astype(_F32), _X_MIN_EXP)
            accv = _fma32(pv, _magic_pow2(de), (accv * _magic_pow2(da)).astype(_F32))
            acce = maxe
        lanes = np.arange(8)
        m = _maxps(acce, acce[:, lanes ^ 4])                     # permute2f128: swap halves
        m = _maxps(m, m[:, lanes ^ 2])                           # shuffle (1,0,3,2)
        m = _maxps(m, m[:, lanes ^ 1])                           # shuffle (2,3,0,1)
        accv = (accv * _magic_pow2(_maxps((acce - m).astype(_F32), _X_MIN_EXP))).astype(_F32)
        v = (accv[:, :4] + accv[:, 4:]).astype(_F32)
        total = ((v[:, 0] + v[:, 2]).astype(_F32) + (v[:, 1] + v[:, 3]).astype(_F32)).astype(_F32)
    shape = x.shape[:-1]
    return total.reshape(shape), m[:, 0].reshape(shape)


def xnnpack_vscaleextexp_f32(x: np.ndarray, scale_value: Any, scale_exp: Any) -> np.ndarray:
    """Bit-exact emulation of ``xnn_f32_vscaleextexp_ukernel__avx2_p5_u8``:
    y = fl(fl(p * scale_value) * 2^max(n + scale_exp, -127)), row by row.

    Args: x (..., n) float32; scale_value, scale_exp: float32 scalars or arrays of shape x.shape[:-1].
    """
    x2 = _check_f32_rows(x)
    sv = np.broadcast_to(np.asarray(scale_value, _F32), x.shape[:-1]).reshape(-1, 1)
    se = np.broadcast_to(np.asarray(scale_exp, _F32), x.shape[:-1]).reshape(-1, 1)
    with np.errstate(invalid="ignore", over="ignore", under="ignore"):
        nv, pv = _p5_f32(x2)
        f = (pv * sv).astype(_F32)
        e = _maxps((nv + se).astype(_F32), _X_MIN_EXP)
        y = (f * _magic_pow2(e)).astype(_F32)
    return y.reshape(x.shape)


def xnnpack_softmax_f32(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """XNNPACK's ``TwoPassSoftMax`` driver (bench/f32-softmax.cc) emulated bit for bit: pass 1, then
    pass 2 with scale_value = 1.0f / sum0 (a float32 reciprocal) and scale_exp = -sum1.
    Returns (y, sum0, sum1)."""
    s0, s1 = xnnpack_raddextexp_f32(x)
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = (_F32(1.0) / s0).astype(_F32)
    return xnnpack_vscaleextexp_f32(x, inv, (-s1).astype(_F32)), s0, s1
