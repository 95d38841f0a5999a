"""The quantization toolbox every chapter of Part "quant" shares.

Round-to-nearest (RTN) uniform quantizers at three granularities, block floating point (MXINT),
fake quantization with a straight-through estimator, and bit packing of 1- to 8-bit codes.

Every granularity reduces to one kernel over the rows of a 2-D array ("groups" × group size):

* ``"tensor"``  — one group holding every element;
* ``"channel"`` — one group per index along ``axis`` (a weight's output channels: ``axis=0``);
* ``"block"``   — consecutive blocks of ``block_size`` elements along the last axis.

Uniform quantization of a group ``g`` with ``b`` bits (the equations the chapters cite):

    symmetric:   s_g = max|x_g| / (2^(b-1) - 1),   q = clamp(round(x / s_g), -(2^(b-1)-1), 2^(b-1)-1),   x̂ = s_g q   (Q1)
    asymmetric:  s_g = (max x_g - min x_g) / (2^b - 1),  z_g = round(-min x_g / s_g),
                 q = clamp(round(x / s_g) + z_g, 0, 2^b - 1),   x̂ = s_g (q - z_g)                          (Q2)

``round`` is round-half-to-even (NumPy, Numba and torch agree on it). A group whose scale would be 0
(all zeros, or constant for the asymmetric form) gets ``s_g = 1``, so it quantizes exactly.

Block floating point with a ``w``-bit signed mantissa and a shared power-of-two exponent per block
(MXINT, as in the LQER chapter):

    e_g = ceil(log2 max|x_g|),  s_g = 2^(e_g - (w-1)),  q = clamp(round(x / s_g), -(2^(w-1)-1), 2^(w-1)-1),  x̂ = s_g q   (Q3)

so the largest representable magnitude in a block is (1 - 2^(1-w)) 2^e_g and values above it clip.

The critical loop (per-group reduction, then scale-round-clamp) has ``backend="numpy" | "numba" |
"torch" | "auto"``; the result has the type (and device) of the input.
"""
from __future__ import annotations

from typing import Any

import numba
import numpy as np
import torch

from refimpl._common.backend import like_input, resolve_backend, to_numpy, to_torch
from refimpl._common.kernels import FASTMATH, row_blocks
from refimpl._common.validate import check_finite, check_floating

GRANULARITIES = ("tensor", "channel", "block")


# ----------------------------------------------------------------------------------------------
# Grouping: every granularity as a 2-D (groups, group_size) view, and back.
# ----------------------------------------------------------------------------------------------
def _check_bits(bits: int, lo: int = 1, hi: int = 16, name: str = "bits") -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(bits).__name__}")
    if not lo <= bits <= hi:
        raise ValueError(f"{name} must be in [{lo}, {hi}], got {bits}")


def to_groups(x: Any, granularity: str = "tensor", *, axis: int = 0, block_size: int | None = None):
    """Reshape ``x`` to ``(groups, group_size)`` for ``granularity``; return the 2-D array and a
    ``restore`` function mapping a 2-D array of the same shape back to ``x``'s shape.

    ``"block"`` needs ``block_size`` dividing the last dimension.
    """
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    shape = tuple(x.shape)
    if len(shape) == 0:
        raise ValueError("x must have at least one dimension, got a scalar")
    is_t = isinstance(x, torch.Tensor)
    if granularity == "tensor":
        return x.reshape(1, -1), (lambda y: y.reshape(shape))
    if granularity == "block":
        if block_size is None or isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) \
                or block_size < 1:
            raise ValueError(f"block_size must be a positive int for granularity='block', got {block_size!r}")
        if shape[-1] % block_size:
            raise ValueError(f"block_size={block_size} must divide the last dimension {shape[-1]} of x")
        return x.reshape(-1, block_size), (lambda y: y.reshape(shape))
    nd = len(shape)
    if not -nd <= axis < nd:
        raise ValueError(f"axis={axis} is out of range for x of shape {shape}")
    axis %= nd
    moved = x.movedim(axis, 0) if is_t else np.moveaxis(x, axis, 0)
    moved_shape = tuple(moved.shape)

    def restore(y):
        y = y.reshape(moved_shape)
        return y.movedim(0, axis) if isinstance(y, torch.Tensor) else np.moveaxis(y, 0, axis)

    return moved.reshape(moved_shape[0], -1), restore


def qrange(bits: int, symmetric: bool = True) -> tuple[int, int]:
    """The integer code range: ``[-(2^(b-1)-1), 2^(b-1)-1]`` (symmetric, eq. Q1) or ``[0, 2^b-1]`` (eq. Q2)."""
    _check_bits(bits, 2 if symmetric else 1)
    return (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if symmetric else (0, 2 ** bits - 1)


# ----------------------------------------------------------------------------------------------
# The critical loop: per-row scale, round, clamp (eqs. Q1-Q3), three backends.
# ----------------------------------------------------------------------------------------------
MODES = ("symmetric", "asymmetric", "mxint")


def _rows_numpy(x: np.ndarray, bits: int, mode: str):
    """Reference: x (G, n) -> codes (G, n) float (integer values), scale (G, 1), zero (G, 1)."""
    if mode == "asymmetric":
        lo, hi = x.min(axis=1, keepdims=True), x.max(axis=1, keepdims=True)
        scale = (hi - lo) / (2 ** bits - 1)
        scale = np.where(scale > 0, scale, 1).astype(x.dtype)
        zero = np.round(-lo / scale)
        q = np.clip(np.round(x / scale) + zero, 0, 2 ** bits - 1)
        return q, scale, zero
    amax = np.abs(x).max(axis=1, keepdims=True)
    qmax = 2 ** (bits - 1) - 1
    if mode == "symmetric":
        scale = amax / qmax
    else:  # mxint: a power of two per row, eq. Q3
        with np.errstate(divide="ignore"):
            scale = np.exp2(np.ceil(np.log2(amax)) - (bits - 1))
    scale = np.where(amax > 0, scale, 1).astype(x.dtype)
    q = np.clip(np.round(x / scale), -qmax, qmax)
    return q, scale, np.zeros_like(scale)


# No "arcp": x / s must round exactly like NumPy and torch (x * (1/s) can land on the other side of a tie).
@numba.njit(cache=True, fastmath=FASTMATH - {"arcp"}, error_model="numpy")
def _rows_range(x, r0, r1, bits, mode, q, scale, zero):
    T = x.dtype.type
    n = x.shape[1]
    for r in range(r0, r1):
        row = x[r]
        lo = row[0]
        hi = row[0]
        amax = T(0)
        for j in range(n):
            v = row[j]
            lo = min(lo, v)
            hi = max(hi, v)
            amax = max(amax, abs(v))
        if mode == 1:  # asymmetric
            s = (hi - lo) / T(2 ** bits - 1)
            if not s > 0:
                s = T(1)
            z = np.round(-lo / s)
            top = T(2 ** bits - 1)
            for j in range(n):
                q[r, j] = min(max(np.round(row[j] / s) + z, T(0)), top)
            scale[r, 0] = s
            zero[r, 0] = z
            continue
        qmax = T(2 ** (bits - 1) - 1)
        if mode == 0:
            s = amax / qmax
        else:
            s = T(np.exp2(np.ceil(np.log2(amax)) - (bits - 1))) if amax > 0 else T(1)
        if not amax > 0:
            s = T(1)
        for j in range(n):
            q[r, j] = min(max(np.round(row[j] / s), -qmax), qmax)
        scale[r, 0] = s
        zero[r, 0] = T(0)


@numba.njit(parallel=True, cache=True)
def _rows_numba_kernel(x, bits, mode, nblocks, q, scale, zero):
    g = x.shape[0]
    step = (g + nblocks - 1) // nblocks
    for b in numba.prange(nblocks):
        _rows_range(x, b * step, min(g, (b + 1) * step), bits, mode, q, scale, zero)


def _rows_numba(x: np.ndarray, bits: int, mode: str):
    x = np.ascontiguousarray(x)
    g = x.shape[0]
    q = np.empty_like(x)
    scale = np.empty((g, 1), x.dtype)
    zero = np.empty((g, 1), x.dtype)
    nblocks = row_blocks(g, x.size)
    if nblocks == 1:  # small inputs: no thread wake-up (it costs more than the work on a busy machine)
        _rows_range(x, 0, g, bits, MODES.index(mode), q, scale, zero)
    else:
        _rows_numba_kernel(x, bits, MODES.index(mode), nblocks, q, scale, zero)
    return q, scale, zero


def _rows_torch(x: torch.Tensor, bits: int, mode: str):
    if mode == "asymmetric":
        lo, hi = x.aminmax(dim=1, keepdim=True)
        scale = (hi - lo) / (2 ** bits - 1)
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zero = torch.round(-lo / scale)
        q = torch.clamp(torch.round(x / scale) + zero, 0, 2 ** bits - 1)
        return q, scale, zero
    amax = x.abs().amax(dim=1, keepdim=True)
    qmax = 2 ** (bits - 1) - 1
    if mode == "symmetric":
        scale = amax / qmax
    else:
        scale = torch.exp2(torch.ceil(torch.log2(amax)) - (bits - 1))
    scale = torch.where(amax > 0, scale, torch.ones_like(scale))
    q = torch.clamp(torch.round(x / scale), -qmax, qmax)
    return q, scale, torch.zeros_like(scale)


_ROWS = {"numpy": _rows_numpy, "numba": _rows_numba, "torch": _rows_torch}


def quantize_groups(x: Any, bits: int, *, mode: str = "symmetric", granularity: str = "tensor", axis: int = 0,
                    block_size: int | None = None, backend: str = "auto"):
    """Quantize ``x`` group-wise (eqs. Q1-Q3).

    Args:
        x: float32/float64 array or tensor, any shape.
        bits: code width ``b`` (mantissa width ``w`` for ``mode="mxint"``).
        mode: ``"symmetric"`` (Q1), ``"asymmetric"`` (Q2, min-max with a zero point) or ``"mxint"`` (Q3).
        granularity, axis, block_size: the groups, see :func:`to_groups`.
        backend: ``"numpy" | "numba" | "torch" | "auto"``.

    Returns:
        ``(q, scale, zero)``: integer-valued codes with ``x``'s shape and dtype, and the per-group
        scale and zero point with shape ``(groups, 1)``; ``x̂ = scale * (q - zero)`` group-wise
        (:func:`dequantize_groups`).
    """
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    _check_bits(bits, 1 if mode == "asymmetric" else 2)
    check_floating(x, "x")
    check_finite(x, "x")
    b = resolve_backend(backend, x)
    x2, restore = to_groups(x, granularity, axis=axis, block_size=block_size)
    xb = to_torch(x2) if b == "torch" else to_numpy(x2)
    q, scale, zero = _ROWS[b](xb, bits, mode)
    return like_input(restore(q), x), like_input(scale, x), like_input(zero, x)


def dequantize_groups(q: Any, scale: Any, zero: Any, *, granularity: str = "tensor", axis: int = 0,
                      block_size: int | None = None):
    """``x̂ = scale * (q - zero)`` per group — the inverse map of :func:`quantize_groups` (same grouping)."""
    q2, restore = to_groups(q, granularity, axis=axis, block_size=block_size)
    return restore((q2 - zero) * scale)


def fake_quantize(x: Any, bits: int, *, mode: str = "symmetric", granularity: str = "tensor", axis: int = 0,
                  block_size: int | None = None, backend: str = "auto"):
    """Round-trip ``x → q → x̂`` (quantize then dequantize; eqs. Q1-Q3): the values a quantized model computes with."""
    q, scale, zero = quantize_groups(x, bits, mode=mode, granularity=granularity, axis=axis, block_size=block_size,
                                     backend=backend)
    return dequantize_groups(q, scale, zero, granularity=granularity, axis=axis, block_size=block_size)


def rtn(x: Any, bits: int, *, symmetric: bool = True, granularity: str = "channel", axis: int = 0,
        block_size: int | None = None, backend: str = "auto"):
    """Round-to-nearest weight quantization — the baseline of every PTQ chapter (eq. Q1 or Q2).

    Defaults to per-output-channel (``axis=0`` of a ``(out, in)`` weight)."""
    return fake_quantize(x, bits, mode="symmetric" if symmetric else "asymmetric", granularity=granularity,
                         axis=axis, block_size=block_size, backend=backend)


def mxint(x: Any, width: int, block_size: int, *, backend: str = "auto"):
    """MXINT block floating point (eq. Q3): blocks of ``block_size`` along the last axis share a power-of-two
    exponent; each element keeps a ``width``-bit signed mantissa. Returns ``x̂`` (fake-quantized)."""
    return fake_quantize(x, width, mode="mxint", granularity="block", block_size=block_size, backend=backend)


# ----------------------------------------------------------------------------------------------
# Straight-through estimator.
# ----------------------------------------------------------------------------------------------
class _STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, x_hat):
        return x_hat

    @staticmethod
    def backward(ctx, g):
        return g, None


def fake_quantize_ste(x: torch.Tensor, bits: int, **kwargs) -> torch.Tensor:
    """:func:`fake_quantize` on a tensor with the straight-through estimator: the forward pass returns
    ``x̂``, the backward pass treats quantization as the identity (``∂x̂/∂x := I``)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor for the straight-through estimator, got {type(x).__name__}")
    with torch.no_grad():
        x_hat = fake_quantize(x.detach(), bits, **kwargs)
    return _STE.apply(x, x_hat)


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """``round(x)`` in the forward pass, the identity in the backward pass (for learnable scales/zero points)."""
    return x + (torch.round(x) - x).detach()


# ----------------------------------------------------------------------------------------------
# Bit packing of low-bit codes (storage: 8 / bits codes per byte).
# ----------------------------------------------------------------------------------------------
def _check_pack_bits(bits: int) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise ValueError(f"bits must be an int in [1, 8], got {bits!r}")


def pack_bits(codes: Any, bits: int):
    """Pack unsigned integer codes in ``[0, 2^bits)`` (any shape, ``bits`` in 1..8) into a flat uint8 array/tensor
    of ``ceil(numel * bits / 8)`` bytes: every 8 codes form one little-endian word of ``bits`` bytes (code ``i`` in
    bits ``i·b … i·b+b-1``). For 1, 2, 4 and 8 bits this is the plain layout of ``8 / bits`` codes per byte."""
    _check_pack_bits(bits)
    is_t = isinstance(codes, torch.Tensor)
    c = codes.reshape(-1) if is_t else np.asarray(codes).reshape(-1)
    if c.dtype not in (np.uint8, torch.uint8):
        raise TypeError(f"codes must be uint8, got {c.dtype}")
    n = c.shape[0]
    if n and int(c.max()) >= 2 ** bits:
        raise ValueError(f"codes must be < 2**bits = {2 ** bits}, got a maximum of {int(c.max())}")
    pad, size = (-n) % 8, -(-n * bits // 8)
    if is_t:  # int64 words: the top code of an 8-bit word wraps the sign, which shifts and masks undo exactly
        c = torch.cat([c, c.new_zeros(pad)]).reshape(-1, 8).to(torch.int64)
        word = (c << (torch.arange(8, device=c.device) * bits)).sum(dim=1)
        out = (word[:, None] >> (torch.arange(bits, device=c.device) * 8)) & 255
        return out.reshape(-1)[:size].to(torch.uint8)
    c = np.concatenate([c, np.zeros(pad, np.uint8)]).reshape(-1, 8).astype(np.uint64)
    word = (c << (np.arange(8, dtype=np.uint64) * np.uint64(bits))).sum(axis=1, dtype=np.uint64)
    out = (word[:, None] >> (np.arange(bits, dtype=np.uint64) * np.uint64(8))) & np.uint64(255)
    return out.reshape(-1)[:size].astype(np.uint8)


def unpack_bits(packed: Any, bits: int, numel: int):
    """Inverse of :func:`pack_bits`: the first ``numel`` codes as a flat uint8 array/tensor."""
    _check_pack_bits(bits)
    mask = 2 ** bits - 1
    if isinstance(packed, torch.Tensor):
        p = packed.reshape(-1).to(torch.int64)
        p = torch.cat([p, p.new_zeros((-p.numel()) % bits)]).reshape(-1, bits)
        word = (p << (torch.arange(bits, device=p.device) * 8)).sum(dim=1)
        out = (word[:, None] >> (torch.arange(8, device=p.device) * bits)) & mask
        return out.reshape(-1)[:numel].to(torch.uint8)
    p = np.asarray(packed).reshape(-1).astype(np.uint64)
    p = np.concatenate([p, np.zeros((-p.size) % bits, np.uint64)]).reshape(-1, bits)
    word = (p << (np.arange(bits, dtype=np.uint64) * np.uint64(8))).sum(axis=1, dtype=np.uint64)
    out = (word[:, None] >> (np.arange(8, dtype=np.uint64) * np.uint64(bits))) & np.uint64(mask)
    return out.reshape(-1)[:numel].astype(np.uint8)
