"""8-bit optimizers via block-wise dynamic quantization (Dettmers, Lewis, Shleifer & Zettlemoyer,
ICLR 2022, arXiv:2110.02861).

An optimizer state tensor ``S`` (Adam's first moment ``m`` or second moment ``v``, the momentum
buffer of SGD) is stored as one byte per element plus one float32 per block:

    (1) blocks:   S is flattened and cut into B = ceil(n / K) blocks of K consecutive values
                  (the last block may be shorter); N_b = max_{i in block b} |S_i|
    (2) codes:    q_i = argmin_j | Q_j - S_i / N_b |           (nearest of the 256 sorted code values)
    (3) dequant:  S~_i = Q_{q_i} * N_b

``Q`` is the *dynamic (tree) quantization map*: an 8-bit float-like code made of a sign bit (absent in
the unsigned variant), an exponent written as the number ``e`` of leading zero bits, one indicator bit
``1`` that ends the exponent, and the remaining ``F = 6 - e`` (signed) or ``7 - e`` (unsigned) bits as
a *linear* fraction:

    (4) Q(sign, e, f) = sign * 10^(-e) * p_f,   p_f = 0.1 + 0.9 (f + 1/2) / 2^F,   f = 0 .. 2^F - 1

for e = 0 .. 6, plus the two codes 0 and 1. Every exponent gives the midpoints of 2^F equal bins of
[0.1, 1], so the map spans seven decades ``[~5.5e-7, 1]`` with 2^F values per decade; large
exponents (small numbers) spend bits on the exponent and keep few fraction bits. Signed map: 2 * 127
+ 2 = 256 codes in ``[-0.993, 1]``; unsigned (for Adam's ``v >= 0``): 254 + 2 codes in ``[0, 1]``.
:func:`create_dynamic_map` builds it; it equals ``bitsandbytes.functional.create_dynamic_map`` bit
for bit (the linear fraction grid is made with ``torch.linspace`` in float32, as there: NumPy's
``linspace`` rounds ~40 of the 256 values to the neighbouring float32).

Nearest code by binary search. With the 255 midpoints ``mu_j = (Q_j + Q_{j+1}) / 2`` (float32),

    (5) q_i = #{ j : mu_j < x_i },   x_i = S_i * (1 / N_b)

(``np.searchsorted(mu, x, side="left")``): the code whose interval contains ``x`` (a value on a
midpoint goes to the lower code). The normalisation multiplies by the float32 reciprocal of the
absmax, as both bitsandbytes kernels do. An all-zero block has ``N_b = 0`` and takes ``x = 0``.

``rounding="lut"`` reproduces bitsandbytes' CPU kernel instead (``csrc/cpu_ops.cpp``): ``x`` is
clamped to [-1, 1], rounded to one of 65536 equally spaced bins, ``k = int((x + 1) * 0.5 * 65535 + 0.5)``,
and the bin's centre ``-1 + 2k/65535`` is mapped by (5). It is the nearest code except for values
within half a bin (1.5e-5) of a midpoint, and near 0 where the codes are closer together than the
bins (all |x| < 1.5e-5 land on the code nearest to +-1.5e-5); an all-zero block gets code 0.

The 8-bit optimizer step (per parameter tensor, per step t; the states never exist in 32 bits between
steps):

    (6) m, v = dequant(state1), dequant(state2)                          (eq. 3)
    (7) m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2               (Adam, fp32)
    (8) w <- w (1 - lr wd) - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
    (9) state1, state2 = quant(m, signed map), quant(v, unsigned map)    (eqs. 1-2, 5)

and for momentum SGD (bitsandbytes' convention: coupled weight decay, no dampening, m_1 = g):

    (10) g <- g + wd w;   m <- g (t = 1),  m <- b1 m + g (t > 1);   w <- w - lr m

The critical loop is block-wise quantization (1)-(2)/(5) — per-block absmax, then an 8-step binary
search per value — and dequantization (3). Backends: ``"numpy"`` (readable reference:
``np.searchsorted``), ``"numba"`` (a branch-free binary search over the midpoints, parallel over blocks
above ``PARALLEL_MIN`` values), ``"torch"`` (``torch.searchsorted``; device-agnostic).
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, Iterable, Sequence

import numba
import numpy as np
import torch
from numba import njit, prange

from refimpl._common.backend import like_input, resolve_backend, to_numpy, to_torch
from refimpl._common.kernels import PARALLEL_MIN
from refimpl._common.validate import check_betas, check_floating
from refimpl.quant.quantizers import dequantize_groups, quantize_groups

__all__ = ["create_dynamic_map", "code_midpoints", "quantize_blockwise", "dequantize_blockwise",
           "blockwise_roundtrip", "quantize_linear", "dequantize_linear", "Adam8bit", "SGD8bit",
           "StableEmbedding", "ROUNDINGS", "STATE_QUANTIZERS"]

ROUNDINGS = ("nearest", "lut")
STATE_QUANTIZERS = ("blockwise", "linear")
_LUT_SIZE = 65536


# ----------------------------------------------------------------------------- the dynamic map
def create_dynamic_map(signed: bool = True, max_exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic (tree) quantization map, eq. (4): ``2**total_bits`` sorted float32 values.

    Exponent ``e = 0 .. max_exponent_bits - 1`` (number of leading zeros) scales the value by
    ``10**-e``; after the indicator bit, ``F = total_bits - 2 - e`` (signed) or ``total_bits - 1 - e``
    (unsigned) bits remain for the linear fraction (for the defaults; in general
    ``F = total_bits - 1 - max_exponent_bits + (max_exponent_bits - 1 - e)``, plus one when unsigned). The fraction values are the midpoints of ``2**F`` equal bins of [0.1, 1]. When the
    exponent field cannot use all bits (``max_exponent_bits < total_bits - 1``) the all-zero-exponent
    case adds ``2**(total_bits - 1 - max_exponent_bits) - 1`` more values in the last decade, and
    unused slots are filled with zeros (as bitsandbytes does). Returns a (2**total_bits,) float32 tensor.
    """
    for name, v in (("max_exponent_bits", max_exponent_bits), ("total_bits", total_bits)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(v).__name__}")
    if not 2 <= total_bits <= 8:
        raise ValueError(f"total_bits must be in [2, 8], got {total_bits}")
    if not 1 <= max_exponent_bits <= total_bits - 1:
        raise ValueError(f"max_exponent_bits must be in [1, total_bits - 1 = {total_bits - 1}], got {max_exponent_bits}")
    non_sign = total_bits - 1
    values: list[float] = []

    def decade(n_fraction: int, power: int) -> None:
        edges = torch.linspace(0.1, 1, n_fraction + 1, dtype=torch.float32)
        mids = (edges[:-1] + edges[1:]) / 2.0              # p_f of eq. (4)
        scale = 10 ** power
        values.extend((scale * mids).tolist())
        if signed:
            values.extend((-scale * mids).tolist())

    for i in range(max_exponent_bits):                     # i = max_exponent_bits - 1 - e
        n = 2 ** (i + non_sign - max_exponent_bits + (0 if signed else 1))
        decade(n, -(max_exponent_bits - 1) + i)
    extra = 2 ** (non_sign - max_exponent_bits) - 1
    if extra > 0:
        decade(extra, 0)
    values += [0.0, 1.0]
    values += [0.0] * (2 ** total_bits - len(values))
    if len(values) != 2 ** total_bits:
        raise ValueError(f"the map has {len(values)} values for total_bits={total_bits}; "
                         f"lower max_exponent_bits")
    return torch.tensor(sorted(values), dtype=torch.float32)


def code_midpoints(code: Any) -> np.ndarray:
    """The 255 float32 midpoints ``mu_j = 0.5 * (Q_j + Q_{j+1})`` of a sorted 256-entry code (eq. 5)."""
    c = _check_code(code)
    return (np.float32(0.5) * (c[:-1] + c[1:])).astype(np.float32)


def _check_code(code: Any) -> np.ndarray:
    if not isinstance(code, (np.ndarray, torch.Tensor)):
        raise TypeError(f"code must be a numpy.ndarray or torch.Tensor, got {type(code).__name__}")
    c = np.ascontiguousarray(to_numpy(code), dtype=np.float32)
    if c.shape != (256,):
        raise ValueError(f"code must have shape (256,), got {tuple(c.shape)}")
    if not np.isfinite(c).all() or np.any(np.diff(c) < 0):
        raise ValueError("code must hold 256 finite values sorted in ascending order")
    return c


_MAPS: dict[bool, np.ndarray] = {}


def _default_code(signed: bool = True) -> np.ndarray:
    if signed not in _MAPS:
        _MAPS[signed] = create_dynamic_map(signed).numpy()
    return _MAPS[signed]


@functools.lru_cache(maxsize=8)
def _lut_from_bytes(code_bytes: bytes) -> np.ndarray:
    """bitsandbytes' CPU lookup table: bin k of 65536 over [-1, 1] -> code index (eq. 5 at the bin centre)."""
    c = np.frombuffer(code_bytes, dtype=np.float32)
    mid = (np.float32(0.5) * (c[:-1] + c[1:])).astype(np.float32)
    k = np.arange(_LUT_SIZE, dtype=np.float32)
    centre = (np.float32(-1) + (np.float32(2) * k) / np.float32(_LUT_SIZE - 1)).astype(np.float32)
    return np.searchsorted(mid, centre, side="left").astype(np.uint8)


def _lut(c: np.ndarray) -> np.ndarray:
    return _lut_from_bytes(c.tobytes())


@functools.lru_cache(maxsize=8)
def _buckets_from_bytes(mid_bytes: bytes) -> tuple[np.ndarray, bool]:
    """Exact search table for the Numba kernel: the float32 bit patterns of x are cut into 65536 buckets
    by their top 16 bits (sign, exponent, 7 mantissa bits), each an interval [lo_x, hi_x]. ``start[k]`` =
    #{mu_j < lo_x}; if at most one midpoint lies inside any bucket, eq. (5) is
    ``q = start[k] + (mu[start[k]] < x)`` (one table load and one comparison instead of 8 search steps)."""
    mid = np.frombuffer(mid_bytes, dtype=np.float32)
    k = np.arange(_LUT_SIZE, dtype=np.uint32) << 16
    a = k.view(np.float32)
    b = (k | np.uint32(0xFFFF)).view(np.float32)
    with np.errstate(invalid="ignore"):
        lo, hi = np.minimum(a, b), np.maximum(a, b)
    start = np.searchsorted(mid, lo, side="left")
    stop = np.searchsorted(mid, hi, side="left")
    ok = np.isnan(lo) | (stop - start <= 1)
    start = np.where(np.isnan(lo), 0, np.minimum(start, mid.size - 1))
    return start.astype(np.uint8), bool(ok.all())


# ----------------------------------------------------------------------------- numpy reference
def _pad_blocks(x: np.ndarray, blocksize: int) -> np.ndarray:
    n = x.size
    pad = (-n) % blocksize
    flat = x.reshape(-1)
    if pad:
        flat = np.concatenate([flat, np.zeros(pad, dtype=flat.dtype)])
    return flat.reshape(-1, blocksize)


def _quantize_numpy(x: np.ndarray, c: np.ndarray, blocksize: int, rounding: str):
    xb = _pad_blocks(x, blocksize)
    absmax = np.abs(xb).max(axis=1)                                     # (1)
    with np.errstate(divide="ignore"):
        inv = np.where(absmax > 0, np.float32(1) / absmax, np.float32(0)).astype(np.float32)
    xn = (xb * inv[:, None]).astype(np.float32)                          # x = S / N_b
    if rounding == "nearest":
        q = np.searchsorted(code_midpoints(c), xn, side="left")          # (2), (5)
    else:
        t = ((np.clip(xn, -1, 1) + np.float32(1)) * np.float32(0.5)).astype(np.float32)
        k = (t * np.float32(_LUT_SIZE - 1) + np.float32(0.5)).astype(np.float32).astype(np.uint16)
        q = np.where(absmax[:, None] > 0, _lut(c)[k], 0)
    return q.astype(np.uint8).reshape(-1)[: x.size].reshape(x.shape), absmax.astype(np.float32)


def _dequantize_numpy(q: np.ndarray, absmax: np.ndarray, c: np.ndarray, blocksize: int) -> np.ndarray:
    vals = _pad_blocks(c[q], blocksize)                                  # Q_{q_i}
    return (vals * absmax[:, None]).reshape(-1)[: q.size].reshape(q.shape)   # (3)


# ----------------------------------------------------------------------------- numba kernels
@njit(cache=True, fastmath={"reassoc", "nsz"}, inline="always")
def _block_absmax(x, lo, hi):
    """max |x[lo:hi]| and a flag sum(x - x) that is NaN iff the block holds NaN or infinity."""
    T = x.dtype.type
    m = T(0)
    bad = T(0)
    for i in range(lo, hi):
        v = x[i]
        m = max(m, abs(v))
        bad += v - v
    return m, bad


@njit(cache=True, inline="always")
def _search(mid, v):
    """#{j : mid[j] < v} for the 255 sorted midpoints: branch-free binary lifting, 8 steps (eq. 5)."""
    idx = 0
    s = 128
    while s > 0:
        idx += s if mid[idx + s - 1] < v else 0
        s >>= 1
    return idx


@njit(cache=True)
def _quant_blocks(x, mid, lut, start, use_buckets, blocksize, use_lut, b0, b1, q, absmax, flags):
    n = x.shape[0]
    T = x.dtype.type
    buf = np.empty(blocksize, np.float32)
    bits = buf.view(np.uint32)
    for b in range(b0, b1):
        lo = b * blocksize
        hi = min(lo + blocksize, n)
        m, bad = _block_absmax(x, lo, hi)
        absmax[b] = m
        flags[b] = bad
        inv = T(1) / m if m > 0 else T(0)
        if use_lut:
            if not m > 0:
                for i in range(lo, hi):
                    q[i] = 0
                continue
            for i in range(lo, hi):
                xn = min(max(x[i] * inv, T(-1)), T(1))
                t = (xn + T(1)) * T(0.5)
                k = np.uint16(t * T(65535) + T(0.5))
                q[i] = lut[k]
        elif use_buckets:
            k = hi - lo
            for i in range(k):
                buf[i] = x[lo + i] * inv
            for i in range(k):
                j = np.int64(start[bits[i] >> 16])
                q[lo + i] = j + (1 if mid[j] < buf[i] else 0)
        else:
            for i in range(lo, hi):
                q[i] = _search(mid, x[i] * inv)


@njit(cache=True, parallel=True)
def _quant_parallel(x, mid, lut, start, use_buckets, blocksize, use_lut, nchunks, q, absmax, flags):
    nb = absmax.shape[0]
    per = (nb + nchunks - 1) // nchunks
    for c in prange(nchunks):
        _quant_blocks(x, mid, lut, start, use_buckets, blocksize, use_lut, c * per, min(nb, (c + 1) * per), q,
                      absmax, flags)


@njit(cache=True)
def _dequant_blocks(q, code, absmax, blocksize, b0, b1, out):
    n = q.shape[0]
    for b in range(b0, b1):
        lo = b * blocksize
        hi = min(lo + blocksize, n)
        s = absmax[b]
        for i in range(lo, hi):
            out[i] = code[q[i]] * s                                      # (3)


@njit(cache=True, parallel=True)
def _dequant_parallel(q, code, absmax, blocksize, nchunks, out):
    nb = absmax.shape[0]
    per = (nb + nchunks - 1) // nchunks
    for c in prange(nchunks):
        _dequant_blocks(q, code, absmax, blocksize, c * per, min(nb, (c + 1) * per), out)


def _nchunks(nblocks: int, n: int) -> int:
    return 1 if n < PARALLEL_MIN else max(1, min(numba.get_num_threads() * 4, nblocks))


def _quantize_numba(x: np.ndarray, c: np.ndarray, blocksize: int, rounding: str):
    flat = np.ascontiguousarray(x).reshape(-1)
    nb = -(-flat.size // blocksize)
    q = np.empty(flat.size, np.uint8)
    absmax = np.empty(nb, flat.dtype)
    flags = np.empty(nb, flat.dtype)
    mid = code_midpoints(c)
    use_lut = rounding == "lut"
    lut = _lut(c) if use_lut else np.zeros(1, np.uint8)
    start, use_buckets = _buckets_from_bytes(mid.tobytes())
    nchunks = _nchunks(nb, flat.size)
    if nchunks == 1:
        _quant_blocks(flat, mid, lut, start, use_buckets, blocksize, use_lut, 0, nb, q, absmax, flags)
    else:
        _quant_parallel(flat, mid, lut, start, use_buckets, blocksize, use_lut, nchunks, q, absmax, flags)
    if not np.isfinite(flags).all():
        raise ValueError("x contains NaN or infinity")
    return q.reshape(x.shape), absmax.astype(np.float32, copy=False)


def _dequantize_numba(q: np.ndarray, absmax: np.ndarray, c: np.ndarray, blocksize: int) -> np.ndarray:
    flat = np.ascontiguousarray(q).reshape(-1)
    out = np.empty(flat.size, np.float32)
    nchunks = _nchunks(absmax.size, flat.size)
    if nchunks == 1:
        _dequant_blocks(flat, c, absmax, blocksize, 0, absmax.size, out)
    else:
        _dequant_parallel(flat, c, absmax, blocksize, nchunks, out)
    return out.reshape(q.shape)


# ----------------------------------------------------------------------------- torch path
def _blocks_torch(x: torch.Tensor, blocksize: int) -> torch.Tensor:
    flat = x.reshape(-1)
    pad = (-flat.numel()) % blocksize
    if pad:
        flat = torch.nn.functional.pad(flat, (0, pad))
    return flat.view(-1, blocksize)


def _quantize_torch(x: torch.Tensor, code: torch.Tensor, blocksize: int, rounding: str):
    xb = _blocks_torch(x, blocksize)
    absmax = xb.abs().amax(dim=1)                                        # (1)
    inv = torch.where(absmax > 0, 1.0 / absmax, torch.zeros_like(absmax))
    xn = xb * inv[:, None]
    if rounding == "nearest":
        mid = 0.5 * (code[:-1] + code[1:])
        q = torch.searchsorted(mid, xn, right=False)                     # (2), (5)
    else:
        t = (xn.clamp(-1, 1) + 1.0) * 0.5
        k = (t * float(_LUT_SIZE - 1) + 0.5).to(torch.int32)
        lut = torch.from_numpy(_lut(code.detach().cpu().numpy())).to(x.device)
        q = torch.where(absmax[:, None] > 0, lut[k.long()], torch.zeros_like(lut[k.long()]))
    q = q.to(torch.uint8).reshape(-1)[: x.numel()].reshape(x.shape)
    return q, absmax


def _dequantize_torch(q: torch.Tensor, absmax: torch.Tensor, code: torch.Tensor, blocksize: int) -> torch.Tensor:
    vals = _blocks_torch(code[q.long()], blocksize)
    return (vals * absmax[:, None]).reshape(-1)[: q.numel()].reshape(q.shape)     # (3)


# ----------------------------------------------------------------------------- public API
def _check_blocksize(blocksize: int) -> int:
    if isinstance(blocksize, bool) or not isinstance(blocksize, (int, np.integer)):
        raise TypeError(f"blocksize must be an int, got {type(blocksize).__name__}")
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    return int(blocksize)


def quantize_blockwise(x: Any, code: Any = None, blocksize: int = 256, *, rounding: str = "nearest",
                       backend: str = "auto") -> tuple[Any, Any]:
    """Block-wise quantization with a 256-entry code (eqs. 1, 2, 5).

    Args:
        x: float32 array or tensor, any shape, finite; flattened in C order into blocks of ``blocksize``.
        code: sorted (256,) float32 code values in [-1, 1]; default the signed dynamic map (eq. 4).
        blocksize: K, values per block (bitsandbytes' optimizers: 256; the paper: 2048).
        rounding: ``"nearest"`` (eq. 5, exact) or ``"lut"`` (bitsandbytes' CPU kernel, see module doc).
        backend: ``"numpy" | "numba" | "torch" | "auto"``.
    Returns:
        ``(q, absmax)``: uint8 codes with x's shape, and the (ceil(n / K),) float32 block absmax,
        both of x's type (and device).
    """
    check_floating(x, "x")
    if x.dtype not in (np.float32, torch.float32):
        raise TypeError(f"x must be float32, got {str(x.dtype).replace('torch.', '')}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
    blocksize = _check_blocksize(blocksize)
    c = _default_code(True) if code is None else _check_code(code)
    b = resolve_backend(backend, x)
    if (x.numel() if isinstance(x, torch.Tensor) else x.size) == 0:
        raise ValueError("x must not be empty")
    if b == "torch":
        xt = to_torch(x)
        q, absmax = _quantize_torch(xt, torch.from_numpy(c).to(xt.device), blocksize, rounding)
        if not bool(torch.isfinite(absmax).all()):
            raise ValueError("x contains NaN or infinity")
    elif b == "numpy":
        xn = to_numpy(x)
        with np.errstate(invalid="ignore"):
            q, absmax = _quantize_numpy(xn, c, blocksize, rounding)
        if not np.isfinite(absmax).all():
            raise ValueError("x contains NaN or infinity")
    else:
        q, absmax = _quantize_numba(to_numpy(x), c, blocksize, rounding)
    return like_input(q, x), like_input(absmax, x)


def dequantize_blockwise(q: Any, absmax: Any, code: Any = None, blocksize: int = 256, *,
                         backend: str = "auto") -> Any:
    """``S~_i = Q_{q_i} * N_b`` (eq. 3). ``q``: uint8 codes (any shape); ``absmax``: (ceil(n / K),)
    float32. Returns float32 of q's shape and type (and device)."""
    if q.dtype not in (np.uint8, torch.uint8):
        raise TypeError(f"q must be uint8, got {str(q.dtype).replace('torch.', '')}")
    blocksize = _check_blocksize(blocksize)
    check_floating(absmax, "absmax")
    n = q.numel() if isinstance(q, torch.Tensor) else q.size
    nb = -(-n // blocksize)
    if tuple(absmax.shape) != (nb,):
        raise ValueError(f"absmax must have shape ({nb},) for {n} codes in blocks of {blocksize}, "
                         f"got {tuple(absmax.shape)}")
    c = _default_code(True) if code is None else _check_code(code)
    b = resolve_backend(backend, q)
    if b == "torch":
        qt = to_torch(q)
        out = _dequantize_torch(qt, to_torch(absmax, like=qt).float(), torch.from_numpy(c).to(qt.device), blocksize)
    elif b == "numpy":
        out = _dequantize_numpy(to_numpy(q), to_numpy(absmax).astype(np.float32), c, blocksize)
    else:
        out = _dequantize_numba(to_numpy(q), np.ascontiguousarray(to_numpy(absmax), dtype=np.float32), c, blocksize)
    return like_input(out, q)


def blockwise_roundtrip(x: Any, code: Any = None, blocksize: int = 256, *, rounding: str = "nearest",
                        backend: str = "auto") -> Any:
    """``dequant(quant(x))`` (eqs. 1-3): the values an 8-bit state holds after one store."""
    q, absmax = quantize_blockwise(x, code, blocksize, rounding=rounding, backend=backend)
    return dequantize_blockwise(q, absmax, code, blocksize, backend=backend)


def quantize_linear(x: torch.Tensor, signed: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The paper's *linear* baseline: one scale for the whole tensor, 8-bit uniform codes.

    Signed states use the toolbox's symmetric absmax quantizer (eq. Q1, codes in [-127, 127], int8);
    unsigned states (Adam's v >= 0) its min-max quantizer (eq. Q2, codes in [0, 255], uint8), so both
    use all 8 bits. Returns ``(codes, scale, zero)``."""
    q, scale, zero = quantize_groups(x, 8, mode="symmetric" if signed else "asymmetric",
                                     granularity="tensor", backend="torch")
    return q.to(torch.int8 if signed else torch.uint8), scale, zero


def dequantize_linear(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`quantize_linear` (eq. Q1 / Q2)."""
    return dequantize_groups(q.to(scale.dtype), scale, zero, granularity="tensor")


# ----------------------------------------------------------------------------- optimizers
class _Optimizer8bit(torch.optim.Optimizer):
    """Shared machinery: the per-parameter 8-bit state (uint8 codes + per-block float32 absmax), its
    dequantize -> fp32 update -> requantize cycle (eqs. 6, 9), and the 32-bit fallback for small tensors
    and for parameters flagged ``param.optim_bits = 32`` (:class:`StableEmbedding`)."""

    _n_states = 1
    _signed = (True,)

    def __init__(self, params: Iterable[Any], defaults: dict, *, optim_bits: int = 8, blocksize: int = 256,
                 min_8bit_size: int = 4096, state_quantizer: str = "blockwise", rounding: str = "nearest",
                 backend: str = "torch"):
        if optim_bits not in (8, 32):
            raise ValueError(f"optim_bits must be 8 or 32, got {optim_bits!r}")
        _check_blocksize(blocksize)
        if isinstance(min_8bit_size, bool) or not isinstance(min_8bit_size, int) or min_8bit_size < 0:
            raise ValueError(f"min_8bit_size must be an int >= 0, got {min_8bit_size!r}")
        if state_quantizer not in STATE_QUANTIZERS:
            raise ValueError(f"state_quantizer must be one of {STATE_QUANTIZERS}, got {state_quantizer!r}")
        if rounding not in ROUNDINGS:
            raise ValueError(f"rounding must be one of {ROUNDINGS}, got {rounding!r}")
        if backend not in ("numpy", "numba", "torch"):
            raise ValueError(f"backend must be 'numpy', 'numba' or 'torch', got {backend!r}")
        defaults = dict(defaults, optim_bits=optim_bits, blocksize=int(blocksize), min_8bit_size=min_8bit_size,
                        state_quantizer=state_quantizer, rounding=rounding)
        self.backend = backend
        super().__init__(params, defaults)

    # -- state storage
    def _uses_8bit(self, p: torch.Tensor, group: dict) -> bool:
        bits = getattr(p, "optim_bits", group["optim_bits"])
        return bits == 8 and p.numel() >= group["min_8bit_size"]

    def _init_state(self, p: torch.Tensor, group: dict) -> None:
        state = self.state[p]
        state["step"] = 0
        for i in range(1, self._n_states + 1):
            if not self._uses_8bit(p, group):
                state[f"state{i}"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
            elif group["state_quantizer"] == "blockwise":
                nb = -(-p.numel() // group["blocksize"])
                state[f"state{i}"] = torch.zeros_like(p, dtype=torch.uint8, memory_format=torch.preserve_format)
                state[f"absmax{i}"] = torch.zeros(nb, dtype=torch.float32, device=p.device)
            else:
                signed = self._signed[i - 1]
                state[f"state{i}"] = torch.zeros_like(p, dtype=torch.int8 if signed else torch.uint8)
                state[f"scale{i}"] = torch.ones(1, 1, dtype=torch.float32, device=p.device)
                state[f"zero{i}"] = torch.zeros(1, 1, dtype=torch.float32, device=p.device)

    def _load(self, state: dict, i: int, group: dict) -> torch.Tensor:
        s = state[f"state{i}"]
        if s.dtype == torch.float32:
            return s.clone()
        if f"absmax{i}" in state:                                               # eq. (6)
            code = torch.from_numpy(_default_code(self._signed[i - 1])).to(s.device)
            return self._dequant(s, state[f"absmax{i}"], code, group["blocksize"])
        return dequantize_linear(s, state[f"scale{i}"], state[f"zero{i}"]).to(torch.float32)

    def _store(self, state: dict, i: int, value: torch.Tensor, group: dict) -> None:
        s = state[f"state{i}"]
        if s.dtype == torch.float32:
            s.copy_(value)
        elif f"absmax{i}" in state:                                             # eq. (9)
            code = _default_code(self._signed[i - 1])
            q, absmax = self._quant(value, code, group["blocksize"], group["rounding"])
            s.copy_(q.reshape(s.shape))
            state[f"absmax{i}"].copy_(absmax)
        else:
            q, scale, zero = quantize_linear(value, self._signed[i - 1])
            s.copy_(q)
            state[f"scale{i}"].copy_(scale)
            state[f"zero{i}"].copy_(zero)

    def _quant(self, value, code, blocksize, rounding):
        if self.backend == "torch":
            return quantize_blockwise(value, code, blocksize, rounding=rounding, backend="torch")
        q, absmax = quantize_blockwise(value.detach().cpu().numpy(), code, blocksize, rounding=rounding,
                                       backend=self.backend)
        return torch.from_numpy(q).to(value.device), torch.from_numpy(absmax).to(value.device)

    def _dequant(self, s, absmax, code, blocksize):
        if self.backend == "torch":
            return dequantize_blockwise(s, absmax, code, blocksize, backend="torch")
        out = dequantize_blockwise(s.cpu().numpy(), absmax.cpu().numpy(), code.cpu().numpy(), blocksize,
                                   backend=self.backend)
        return torch.from_numpy(out).to(s.device)

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict``, then the 8-bit codes are cast back to int8/uint8
        (torch casts every state tensor to the parameter's dtype; the round trip is exact)."""
        dtypes = {k: {kk: vv.dtype for kk, vv in v.items() if isinstance(vv, torch.Tensor)}
                  for k, v in state_dict["state"].items()}
        super().load_state_dict(state_dict)
        params = [p for g in self.param_groups for p in g["params"]]
        for k, kinds in dtypes.items():
            st = self.state[params[k]]
            for kk, dt in kinds.items():
                if kk != "step":
                    st[kk] = st[kk].to(dt)

    def state_bytes(self) -> int:
        """Bytes held by the optimizer states (codes, absmax / scales, fp32 fallbacks)."""
        return sum(v.numel() * v.element_size() for st in self.state.values() for k, v in st.items()
                   if isinstance(v, torch.Tensor) and k != "step")

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError("sparse gradients are not supported")
                if len(self.state[p]) == 0:
                    self._init_state(p, group)
                state = self.state[p]
                state["step"] += 1
                states = [self._load(state, i, group) for i in range(1, self._n_states + 1)]
                p_fp32 = p.detach().float()
                self._update(p_fp32, p.grad.detach().float(), states, state["step"], group)
                p.copy_(p_fp32)
                for i, s in enumerate(states, start=1):
                    self._store(state, i, s, group)
        return loss

    def _update(self, p, g, states, step, group):  # pragma: no cover - abstract
        raise NotImplementedError


def _check_common(lr: float, eps: float, weight_decay: float, betas: Sequence[float]) -> tuple[float, float]:
    for name, v in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v < math.inf:
            raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
    return check_betas(betas)


class Adam8bit(_Optimizer8bit):
    """Adam / AdamW with 8-bit block-wise dynamic states (eqs. 6-9).

    ``state1`` (m) uses the signed dynamic map, ``state2`` (v) the unsigned one; both are uint8 tensors
    of the parameter's shape with float32 ``absmax1/absmax2`` of ceil(n / blocksize) entries. Weight
    decay is decoupled (AdamW, eq. 8), as in ``bitsandbytes.optim.Adam8bit``.

    Args:
        params, lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        optim_bits: 8, or 32 for fp32 states (the same arithmetic, no quantization).
        blocksize: K of eq. (1); bitsandbytes' optimizers use 256, the paper 2048.
        min_8bit_size: tensors with fewer elements keep fp32 states (bitsandbytes: 4096).
        state_quantizer: ``"blockwise"`` (the paper) or ``"linear"`` (per-tensor uniform, the baseline).
        rounding: ``"nearest"`` (eq. 5) or ``"lut"`` (bitsandbytes' CPU kernel).
        backend: backend of the (de)quantization kernels: ``"torch"`` (any device) or ``"numpy"|"numba"`` (CPU).
    """

    _n_states = 2
    _signed = (True, False)

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: Sequence[float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, **kwargs: Any):
        betas = _check_common(lr, eps, weight_decay, betas)
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay), **kwargs)

    def _update(self, p, g, states, step, group):
        m, v = states
        b1, b2 = group["betas"]
        lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
        m.mul_(b1).add_(g, alpha=1.0 - b1)                                  # (7)
        v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
        c1 = 1.0 - b1 ** step
        c2 = math.sqrt(1.0 - b2 ** step)
        denom = (v.sqrt() / c2).add_(eps)
        if wd > 0.0:
            p.mul_(1.0 - lr * wd)
        p.addcdiv_(m, denom, value=-lr / c1)                                # (8)


class SGD8bit(_Optimizer8bit):
    """Momentum SGD with an 8-bit block-wise dynamic momentum buffer (eq. 10; signed map), following
    ``bitsandbytes.optim.SGD8bit``: coupled weight decay, no dampening, and ``m_1 = g``."""

    def __init__(self, params: Iterable[Any], lr: float = 1e-2, momentum: float = 0.9, weight_decay: float = 0.0,
                 **kwargs: Any):
        _check_common(lr, 0.0, weight_decay, (momentum, 0.0))
        if momentum == 0:
            raise ValueError("momentum must be > 0 (plain SGD keeps no state to quantize)")
        super().__init__(params, dict(lr=lr, momentum=float(momentum), weight_decay=weight_decay), **kwargs)

    def _update(self, p, g, states, step, group):
        (m,) = states
        g = g.add(p, alpha=group["weight_decay"])                           # (10)
        if step == 1:
            m.copy_(g)
        else:
            m.mul_(group["momentum"]).add_(g)
        p.add_(m, alpha=-group["lr"])


# ----------------------------------------------------------------------------- stable embedding
class StableEmbedding(torch.nn.Module):
    """The paper's stable embedding layer: ``LayerNorm(E[idx])`` with ``E`` initialised Xavier-uniform,
    and a flag ``E.optim_bits = 32`` that makes :class:`Adam8bit` / :class:`SGD8bit` keep this
    parameter's optimizer state in 32 bits (bitsandbytes records the same request in its
    ``GlobalOptimManager`` with ``register_module_override(self, "weight", {"optim_bits": 32})``).

    Input: integer indices of any shape; output: (..., embedding_dim) float.
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx: int | None = None,
                 device: Any = None, dtype: torch.dtype | None = None):
        super().__init__()
        for name, v in (("num_embeddings", num_embeddings), ("embedding_dim", embedding_dim)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        self.padding_idx = padding_idx
        self.weight = torch.nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        self.weight.optim_bits = 32
        self.norm = torch.nn.LayerNorm(embedding_dim, device=device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        torch.nn.init.xavier_uniform_(self.weight)
        if self.padding_idx is not None:
            with torch.no_grad():
                self.weight[self.padding_idx].fill_(0)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        emb = torch.nn.functional.embedding(idx, self.weight, self.padding_idx)
        return self.norm(emb.to(torch.get_default_dtype())).to(self.weight.dtype)
