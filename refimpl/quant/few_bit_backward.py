"""Few-Bit Backward (Novikov, Bershatsky, Gusak, Shonenkov, Dimitrov & Oseledets, ICML 2023, arXiv:2202.00441).

A pointwise activation ``y = f(x)`` normally keeps its input ``x`` (32 bits per element) for the
backward pass ``dL/dx = f'(x) g``.  Few-bit backward keeps only a ``b``-bit code per element and
replaces ``f'`` by a piecewise-constant function ``q`` with ``K = 2^b`` pieces:

    (1) q(x) = c_k   for  x in (beta_{k-1}, beta_k],   k = 1..K,   beta_0 = L,  beta_K = R
    (2) forward:  y = f(x) exactly;  save  code(x) = #{ k in 1..K-1 : beta_k < x }   (b bits, right-closed)
    (3) backward: dL/dx ~= c_{code(x)} * g

The borders and levels minimise the weighted squared error of the derivative

    (4) E(beta, c) = int_L^R (f'(x) - q(x))^2 w(x) dx

For fixed borders the optimal level of a piece is the weighted mean of ``f'`` on it, and the error of a
piece needs only three prefix integrals ``W(x) = int w``, ``F1(x) = int f' w``, ``F2(x) = int f'^2 w``:

    (5) c_k = (F1(beta_k) - F1(beta_{k-1})) / (W(beta_k) - W(beta_{k-1}))
    (6) cost(a, b) = F2(b) - F2(a) - (F1(b) - F1(a))^2 / (W(b) - W(a))

With the borders restricted to a grid ``x_0 < ... < x_N`` (``x_0 = L``, ``x_N = R``) the optimum is a
dynamic programme over the number of pieces used so far (the paper's Section 3):

    (7) D_0(0) = 0,  D_0(j > 0) = inf,   D_k(j) = min_{i < j} D_{k-1}(i) + cost(x_i, x_j),   E* = D_K(N)

which is the critical loop (``O(K N^2)``; backends numpy | numba | torch).  The official tables of
``fewbit`` come instead from an alternating (Lloyd-like) iteration with uniform weight ``w = 1`` on
``[-100, 100]``: levels by (5), then a unit gradient step on every interior border, since
``dE/dbeta_k = 2 (c_{k+1} - c_k) (f'(beta_k) - (c_k + c_{k+1})/2)`` for ``w = 1``:

    (8) beta_k <- beta_k - 2 (c_{k+1} - c_k) (f'(beta_k) - (c_k + c_{k+1}) / 2)

:func:`alternating_stepwise` reproduces that iteration (and the official tables) exactly,
:func:`optimal_stepwise` solves the DP (7) with the weight ``"normal"`` (the paper's N(0, 1)) or
``"uniform"``.  :class:`FewBitActivationFunction` is the forward/backward pair (2)-(3); the codes are
bit-packed with the quantization toolbox's :func:`~refimpl.quant.quantizers.pack_bits` (1, 2, 4, 8 bits;
3, 5, 6, 7 bits use the same little-endian layout, implemented here).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import numba
import numpy as np
import scipy.integrate
import scipy.special
import torch
import torch.nn.functional as F

from refimpl._common.backend import like_input, resolve_backend, to_numpy, to_torch
from refimpl._common.kernels import FASTMATH
from refimpl._common.validate import check_floating
from refimpl.quant.quantizers import pack_bits, unpack_bits

__all__ = [
    "ACTIVATIONS", "WEIGHTS", "activation", "activation_derivative", "StepwiseTable", "prefix_integrals",
    "segment_costs", "stepwise_dp", "optimal_stepwise", "alternating_stepwise", "builtin_table", "stepwise_error",
    "stepwise_eval", "pack_codes", "unpack_codes", "encode", "decode", "FewBitActivationFunction",
    "few_bit_activation", "FewBitActivation", "FewBitGELU", "FewBitSiLU",
]

ACTIVATIONS = ("gelu", "silu")
WEIGHTS = ("uniform", "normal")
_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


# ----------------------------------------------------------------------------- activations (float64)
def _check_activation(name: str) -> str:
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {name!r}")
    return name


def activation(name: str, x: np.ndarray) -> np.ndarray:
    """``f(x)`` in float64: GELU ``x Phi(x)`` (the exact, erf form) or SiLU ``x sigmoid(x)``."""
    x = np.asarray(x, dtype=np.float64)
    if _check_activation(name) == "gelu":
        return 0.5 * x * (1.0 + scipy.special.erf(x / _SQRT2))
    return x * scipy.special.expit(x)


def activation_derivative(name: str, x: np.ndarray) -> np.ndarray:
    """``f'(x)`` in float64: GELU ``Phi(x) + x phi(x)``; SiLU ``s (1 + x (1 - s))`` with ``s = sigmoid(x)``."""
    x = np.asarray(x, dtype=np.float64)
    if _check_activation(name) == "gelu":
        return 0.5 * (1.0 + scipy.special.erf(x / _SQRT2)) + x * np.exp(-0.5 * x * x) * _INV_SQRT_2PI
    s = scipy.special.expit(x)
    return s * (1.0 + x * (1.0 - s))


# ----------------------------------------------------------------------------- tables
@dataclass(frozen=True)
class StepwiseTable:
    """A piecewise-constant approximation (1): ``borders`` (K+1,) float64 with the domain's end points,
    ``levels`` (K,) float64, and the error (4) it attains (``nan`` when not computed)."""

    borders: np.ndarray
    levels: np.ndarray
    error: float = float("nan")

    @property
    def interior(self) -> np.ndarray:
        """The K-1 interior borders beta_1..beta_{K-1}: what the forward pass bucketizes against."""
        return self.borders[1:-1]

    @property
    def bits(self) -> int:
        return int(round(math.log2(self.levels.size)))


def _check_bits(bits: int, hi: int = 8) -> int:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)):
        raise TypeError(f"bits must be an int, got {type(bits).__name__}")
    if not 1 <= bits <= hi:
        raise ValueError(f"bits must be in [1, {hi}], got {bits}")
    return int(bits)


def _check_domain(domain) -> tuple[float, float]:
    try:
        lo, hi = (float(v) for v in domain)
    except (TypeError, ValueError):
        raise TypeError(f"domain must be a pair of numbers (L, R), got {domain!r}") from None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        raise ValueError(f"domain must be finite with L < R, got {(lo, hi)}")
    return lo, hi


def prefix_integrals(name: str, grid: np.ndarray, weight: str = "normal",
                     refine: int = 16) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The prefix integrals ``W, F1, F2`` of eq. (6) at the grid points (each (N+1,), float64, starting at 0).

    ``W`` is exact (``x - x_0`` or ``Phi(x) - Phi(x_0)``), ``F1`` is exact for the uniform weight
    (``f(x) - f(x_0)``); the rest use composite Simpson with ``refine`` (even) sub-intervals per grid cell, and
    adaptive quadrature (``scipy.integrate.quad``) on the few cells wider than 4x the median cell.
    """
    _check_activation(name)
    if weight not in WEIGHTS:
        raise ValueError(f"weight must be one of {WEIGHTS}, got {weight!r}")
    grid = np.asarray(grid, dtype=np.float64)
    if grid.ndim != 1 or grid.size < 2 or not np.all(np.diff(grid) > 0):
        raise ValueError("grid must be a strictly increasing 1-D array with at least 2 points")
    if isinstance(refine, bool) or not isinstance(refine, (int, np.integer)) or refine < 2 or refine % 2:
        raise ValueError(f"refine must be an even int >= 2, got {refine!r}")
    t = np.linspace(0.0, 1.0, refine + 1)
    xs = grid[:-1, None] + (grid[1:] - grid[:-1])[:, None] * t[None, :]        # (N, refine+1)
    simpson = np.ones(refine + 1)
    simpson[1:-1:2], simpson[2:-1:2] = 4.0, 2.0
    h = (grid[1:] - grid[:-1]) / (3.0 * refine)
    d = activation_derivative(name, xs)
    w = np.ones_like(xs) if weight == "uniform" else np.exp(-0.5 * xs * xs) * _INV_SQRT_2PI

    widths = grid[1:] - grid[:-1]
    wide = np.flatnonzero(widths > 4.0 * np.median(widths))  # e.g. the outer cells [-100, -8], [8, 100]

    def cum(values, integrand):
        inc = h * (values @ simpson)
        for c in wide:  # Simpson on a few points is too coarse there: adaptive quadrature instead
            inc[c] = scipy.integrate.quad(integrand, grid[c], grid[c + 1], limit=200, epsabs=1e-13)[0]
        return np.concatenate([[0.0], np.cumsum(inc)])

    def wfun(t):
        return 1.0 if weight == "uniform" else math.exp(-0.5 * t * t) * _INV_SQRT_2PI

    def dfun(t):
        return float(activation_derivative(name, np.float64(t)))

    if weight == "uniform":
        big_w = grid - grid[0]
        f1 = activation(name, grid) - activation(name, grid[0])
    else:
        big_w = scipy.special.ndtr(grid) - scipy.special.ndtr(grid[0])
        f1 = cum(d * w, lambda t: dfun(t) * wfun(t))
    return big_w, f1, cum(d * d * w, lambda t: dfun(t) ** 2 * wfun(t))


def default_grid(domain: tuple[float, float] = (-100.0, 100.0), span: float = 8.0, n: int = 801) -> np.ndarray:
    """Candidate borders: the domain's end points plus ``n`` equispaced points on ``[-span, span]``
    (the optimal borders of GELU/SiLU lie within a few units of 0)."""
    lo, hi = _check_domain(domain)
    inner = np.linspace(max(lo, -span), min(hi, span), n)
    return np.unique(np.concatenate([[lo], inner, [hi]]))


def segment_costs(big_w: np.ndarray, f1: np.ndarray, f2: np.ndarray) -> np.ndarray:
    """The (N+1, N+1) matrix of eq. (6): ``C[i, j]`` = error of one piece on ``[x_i, x_j]`` (``inf`` for j <= i)."""
    dw = big_w[None, :] - big_w[:, None]
    d1 = f1[None, :] - f1[:, None]
    d2 = f2[None, :] - f2[:, None]
    upper = np.triu(np.ones(dw.shape, dtype=bool), k=1) & (dw > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = d2 - d1 * d1 / dw
    return np.where(upper, np.maximum(c, 0.0), np.inf)


# --- the DP (7): three backends --------------------------------------------------------------
def _dp_numpy(big_w, f1, f2, k):
    cost = segment_costs(big_w, f1, f2)
    n = big_w.size
    dp = np.full(n, np.inf)
    dp[0] = 0.0
    back = np.empty((k, n), dtype=np.int64)
    for s in range(k):
        cand = dp[:, None] + cost                  # D_{s}(i) + cost(i, j)
        back[s] = np.argmin(cand, axis=0)
        dp = cand[back[s], np.arange(n)]
    return dp[-1], back


def _dp_torch(big_w, f1, f2, k, device=None):
    t = lambda a: torch.as_tensor(a, dtype=torch.float64, device=device)  # noqa: E731
    big_w, f1, f2 = t(big_w), t(f1), t(f2)
    n = big_w.numel()
    dw = big_w[None, :] - big_w[:, None]
    d1 = f1[None, :] - f1[:, None]
    cost = (f2[None, :] - f2[:, None]) - d1 * d1 / torch.where(dw > 0, dw, torch.ones_like(dw))
    upper = torch.ones(n, n, dtype=torch.bool, device=big_w.device).triu(1) & (dw > 0)
    cost = torch.where(upper, cost.clamp_min(0.0), torch.full_like(cost, math.inf))
    dp = torch.full((n,), math.inf, dtype=torch.float64, device=big_w.device)
    dp[0] = 0.0
    back = []
    for _ in range(k):
        dp, idx = (dp[:, None] + cost).min(dim=0)
        back.append(idx)
    return float(dp[-1]), torch.stack(back).cpu().numpy()


@numba.njit(cache=True, fastmath=FASTMATH - {"arcp", "reassoc"}, error_model="numpy")
def _dp_column(dp, big_w, f1, f2, j, tmp):
    """min over i < j of D(i) + cost(x_i, x_j), eq. (7), with cost (6) computed on the fly (no N^2 memory): one
    branch-free pass that the compiler vectorises (divisions included), then a scan for the first minimum."""
    wj = big_w[j]
    aj = f1[j]
    bj = f2[j]
    for i in range(j):
        d1 = aj - f1[i]
        tmp[i] = dp[i] + max((bj - f2[i]) - d1 * d1 / (wj - big_w[i]), 0.0)
    best = np.inf
    arg = 0
    for i in range(j):
        if tmp[i] < best:
            best = tmp[i]
            arg = i
    return best, arg


@numba.njit(cache=True)
def _dp_numba_serial(big_w, f1, f2, k, back):
    """All K layers of (7), one thread."""
    n = big_w.shape[0]
    dp = np.full(n, np.inf)
    dp[0] = 0.0
    new = np.empty(n)
    tmp = np.empty(n)
    for s in range(k):
        new[0] = np.inf
        back[s, 0] = 0
        for j in range(1, n):
            new[j], back[s, j] = _dp_column(dp, big_w, f1, f2, j, tmp)
        dp[:] = new
    return dp[n - 1]


@numba.njit(cache=True, parallel=True)
def _dp_numba_parallel(big_w, f1, f2, k, nblocks, back):
    """All K layers of (7); the columns j of one layer are independent and go to ``nblocks`` threads,
    interleaved (column j costs O(j), so interleaving balances the load)."""
    n = big_w.shape[0]
    dp = np.full(n, np.inf)
    dp[0] = 0.0
    new = np.empty(n)
    for s in range(k):
        new[0] = np.inf
        back[s, 0] = 0
        for blk in numba.prange(nblocks):
            tmp = np.empty(n)
            for j in range(1 + blk, n, nblocks):
                new[j], back[s, j] = _dp_column(dp, big_w, f1, f2, j, tmp)
        dp[:] = new
    return dp[n - 1]


# Below this many inner steps (K N^2 / 2) waking the worker threads K times costs more than it saves.
DP_PARALLEL_MIN = 1 << 26


def _dp_numba(big_w, f1, f2, k):
    n = big_w.size
    back = np.empty((k, n), dtype=np.int64)
    if k * n * n // 2 < DP_PARALLEL_MIN or numba.get_num_threads() == 1:
        return _dp_numba_serial(big_w, f1, f2, k, back), back
    return _dp_numba_parallel(big_w, f1, f2, k, numba.get_num_threads(), back), back


_DP = {"numpy": _dp_numpy, "numba": _dp_numba, "torch": _dp_torch}


def stepwise_dp(big_w: Any, f1: Any, f2: Any, pieces: int, backend: str = "auto") -> tuple[np.ndarray, float]:
    """The dynamic programme (7) over grid borders: the critical loop, ``O(pieces N^2)``.

    Args:
        big_w, f1, f2: prefix integrals at the N+1 grid points (eq. 6), 1-D float64; ``big_w`` increasing.
        pieces: K >= 1 pieces (``2^bits``).
        backend: ``"numpy"`` (reference, builds the N^2 cost matrix), ``"numba"`` (cost on the fly, parallel
            over j), ``"torch"`` (cost matrix on the tensor's device), ``"auto"`` (torch for tensors, else numba).
    Returns:
        ``(idx, E)``: the K+1 grid indices of the optimal borders (``idx[0] = 0``, ``idx[-1] = N``) and the
        optimal error E* of eq. (4) on the grid.
    """
    b = resolve_backend(backend, big_w)
    arrs = [np.ascontiguousarray(to_numpy(a), dtype=np.float64) for a in (big_w, f1, f2)]
    n = arrs[0].size
    if any(a.ndim != 1 or a.size != n for a in arrs):
        raise ValueError("big_w, f1 and f2 must be 1-D arrays of the same length")
    if isinstance(pieces, bool) or not isinstance(pieces, (int, np.integer)) or not 1 <= pieces <= n - 1:
        raise ValueError(f"pieces must be an int in [1, N] = [1, {n - 1}] for a grid of {n} points, got {pieces!r}")
    if not np.all(np.isfinite(np.concatenate(arrs))):
        raise ValueError("big_w, f1 and f2 must be finite")
    if not np.all(np.diff(arrs[0]) > 0):
        raise ValueError("big_w must be strictly increasing: the weight has no mass on some grid cell "
                         "(shrink the domain or the span of the grid)")
    if b == "torch":
        dev = big_w.device if isinstance(big_w, torch.Tensor) else None
        err, back = _dp_torch(*arrs, int(pieces), device=dev)
    else:
        err, back = _DP[b](*arrs, int(pieces))
    idx = [n - 1]
    for s in range(pieces - 1, -1, -1):
        idx.append(int(back[s][idx[-1]]))
    return np.array(idx[::-1], dtype=np.int64), float(err)


def optimal_stepwise(name: str, bits: int, *, weight: str = "normal", domain: tuple[float, float] = (-100.0, 100.0),
                     span: float | None = None, n_grid: int = 801, refine: int = 16, grid: np.ndarray | None = None,
                     backend: str = "auto") -> StepwiseTable:
    """The optimal ``2^bits``-piece approximation of ``f'`` with borders on a grid (eqs. 4-7).

    ``weight="normal"`` is the paper's ``w = N(0, 1)`` density; ``"uniform"`` (``w = 1`` on ``domain``) is what
    the official tables optimise. The grid is :func:`default_grid` ``(domain, span, n_grid)`` unless ``grid``
    is given; ``span`` defaults to 8 for the uniform weight (SiLU's outer 4-bit borders sit near -5.4 and 4.5) and
    to 6 for the normal one (beyond |x| = 6 the increments of Phi vanish in float64, and so does the weight). Levels by (5); ``error`` is E* (4) as computed on the grid.
    """
    bits = _check_bits(bits)
    if grid is None:
        grid = default_grid(domain, (8.0 if weight == "uniform" else 6.0) if span is None else span, n_grid)
    big_w, f1, f2 = prefix_integrals(name, grid, weight, refine)
    grid = np.asarray(grid, dtype=np.float64)
    idx, err = stepwise_dp(big_w, f1, f2, 2 ** bits, backend=backend)
    levels = np.diff(f1[idx]) / np.diff(big_w[idx])                         # (5)
    return StepwiseTable(grid[idx].copy(), levels, err)


def alternating_stepwise(name: str, bits: int, *, domain: tuple[float, float] = (-100.0, 100.0),
                         max_iters: int = 100_000, beps: float = 1e-6, leps: float = 1e-6,
                         seed: int | None = 42) -> tuple[StepwiseTable, dict]:
    """The official table generator (``fewbit.approx.approximate``): alternate levels (5) and border steps (8)
    with uniform weight on ``domain``.

    Initial interior borders: ``np.random.RandomState(seed).normal(0, 1.5, K-1)``, sorted (redrawn until the gaps
    exceed 1e-3). Stops when the border step's norm < ``beps`` (then the levels are *not* re-estimated, as in
    fewbit) or the relative change of the levels < ``leps``. The defaults are ``tools/quantize-builtins.sh``'s.
    Returns the table and ``{"status", "iterations"}``; status is "converged", "failed" (borders crossed)
    or "not-converged".
    """
    _check_activation(name)
    bits = _check_bits(bits)
    lo, hi = _check_domain(domain)
    k = 2 ** bits
    rng = np.random.RandomState(seed)
    bs = np.empty(k + 1)
    bs[0], bs[-1] = lo, hi
    for _ in range(16):
        bs[1:-1] = rng.normal(0.0, 1.5, k - 1)
        bs.sort()
        if np.all(np.diff(bs) > 1e-3):
            break
    else:  # pragma: no cover - needs 16 unlucky draws
        raise RuntimeError("failed to draw an initial set of borders")
    ls = np.diff(activation(name, bs)) / np.diff(bs)                        # (5), w = 1
    status, it = "not-converged", max_iters
    for it in range(max_iters):
        step = -2.0 * np.diff(ls) * (activation_derivative(name, bs[1:-1]) - 0.5 * (ls[:-1] + ls[1:]))   # (8)
        bs[1:-1] += step
        if np.linalg.norm(step) < beps:
            status = "converged"
            break
        ls_next = np.diff(activation(name, bs)) / np.diff(bs)
        ls_diff = np.linalg.norm(ls_next - ls) / np.linalg.norm(ls)
        ls = ls_next
        if ls_diff < leps:
            status = "converged"
            break
        if not np.all(np.diff(bs) > 0):
            status = "failed"
            break
    return StepwiseTable(bs, ls), {"status": status, "iterations": it}


@functools.lru_cache(maxsize=None)
def _builtin(name: str, bits: int) -> StepwiseTable:
    table, info = alternating_stepwise(name, bits)
    if info["status"] != "converged":  # pragma: no cover - the defaults converge for gelu/silu 1..8 bits
        raise RuntimeError(f"the alternating iteration did not converge for {name}, {bits} bits: {info}")
    return table


def builtin_table(name: str, bits: int) -> StepwiseTable:
    """The table ``fewbit`` ships for ``name`` at ``bits`` bits, recomputed by :func:`alternating_stepwise` with
    the official settings (cached)."""
    return _builtin(_check_activation(name), _check_bits(bits))


def stepwise_eval(borders: np.ndarray, levels: np.ndarray, x: np.ndarray) -> np.ndarray:
    """``q(x)`` of eq. (1) (right-closed pieces; values outside the domain take the end levels)."""
    borders = np.asarray(borders, dtype=np.float64)
    return np.asarray(levels, dtype=np.float64)[np.searchsorted(borders[1:-1], np.asarray(x), side="left")]


def stepwise_error(name: str, borders: np.ndarray, levels: np.ndarray, *, weight: str = "normal",
                   domain: tuple[float, float] | None = None, n: int = 200_001) -> float:
    """The error (4) of a table, by the trapezoid rule on ``n`` points of ``domain`` (default: the table's),
    splitting exactly at the borders."""
    if weight not in WEIGHTS:
        raise ValueError(f"weight must be one of {WEIGHTS}, got {weight!r}")
    borders = np.asarray(borders, dtype=np.float64)
    lo, hi = _check_domain(domain if domain is not None else (borders[0], borders[-1]))
    xs = np.unique(np.concatenate([np.linspace(lo, hi, n), borders[(borders > lo) & (borders < hi)]]))
    total = 0.0
    q_all = stepwise_eval(borders, levels, xs)
    d = activation_derivative(name, xs)
    w = np.ones_like(xs) if weight == "uniform" else np.exp(-0.5 * xs * xs) * _INV_SQRT_2PI
    # integrate piece by piece so the jump of q at a border is not smeared over a cell
    cuts = np.searchsorted(xs, borders[(borders > lo) & (borders < hi)])
    for a, b in zip(np.r_[0, cuts], np.r_[cuts, xs.size - 1]):
        seg = slice(a, b + 1)
        lev = q_all[min(b, a + 1)] if b > a else q_all[a]
        total += float(np.trapezoid((d[seg] - lev) ** 2 * w[seg], xs[seg]))
    return total


# ----------------------------------------------------------------------------- packing of b-bit codes
def _packed_size(numel: int, bits: int) -> int:
    return (numel * bits + 7) // 8


def pack_codes(codes: Any, bits: int) -> Any:
    """Pack uint8 codes < 2^bits (any shape) into ``ceil(numel bits / 8)`` bytes: the toolbox's
    :func:`~refimpl.quant.quantizers.pack_bits` layout (every 8 codes one little-endian word of ``bits`` bytes),
    which the numba encoder writes directly."""
    return pack_bits(codes, _check_bits(bits))


def unpack_codes(packed: Any, bits: int, numel: int) -> Any:
    """Inverse of :func:`pack_codes`: the first ``numel`` codes, flat uint8."""
    return unpack_bits(packed, _check_bits(bits), numel)


# ----------------------------------------------------------------------------- encode (2): bucketize + pack
@numba.njit(cache=True, fastmath=FASTMATH, inline="always")
def _code_of(v, borders):
    # right-closed pieces: code = #{beta_k < v}; `not v <= b` also sends NaN to the last piece, like searchsorted
    c = 0
    for k in range(borders.shape[0]):
        c += not (v <= borders[k])
    return c


@numba.njit(cache=True, fastmath=FASTMATH)
def _encode_range(x, borders, bits, g0, g1, out):
    """Groups g0..g1-1 of 8 codes -> ``bits`` bytes each (one little-endian word); the last group of x may be short."""
    n = x.shape[0]
    nbytes = out.shape[0]
    full = min(g1, n // 8)
    for g in range(g0, full):                      # whole groups: no bounds checks, the compiler unrolls them
        base = g * 8
        word = np.uint64(0)
        for j in range(8):
            word |= np.uint64(_code_of(x[base + j], borders)) << np.uint64(j * bits)
        ob = g * bits
        for m in range(bits):
            out[ob + m] = np.uint8((word >> np.uint64(8 * m)) & np.uint64(255))
    for g in range(max(g0, full), g1):             # the tail
        base = g * 8
        word = np.uint64(0)
        for j in range(8):
            if base + j < n:
                word |= np.uint64(_code_of(x[base + j], borders)) << np.uint64(j * bits)
        ob = g * bits
        for m in range(bits):
            if ob + m < nbytes:
                out[ob + m] = np.uint8((word >> np.uint64(8 * m)) & np.uint64(255))


# One thread encodes ~100 M floats/s: below 2^20 elements the second thread does not pay for its wake-up.
ENCODE_PARALLEL_MIN = 1 << 20


@numba.njit(cache=True)
def _encode_numba_serial(x, borders, bits, out):
    _encode_range(x, borders, bits, 0, (x.shape[0] + 7) // 8, out)


@numba.njit(cache=True, parallel=True)
def _encode_numba_kernel(x, borders, bits, nblocks, out):
    groups = (x.shape[0] + 7) // 8
    step = (groups + nblocks - 1) // nblocks
    for blk in numba.prange(nblocks):
        _encode_range(x, borders, bits, blk * step, min(groups, (blk + 1) * step), out)


@numba.njit(cache=True, fastmath=FASTMATH)
def _decode_numba(packed, levels, bits, numel, out):
    mask = np.uint64(2 ** bits - 1)
    nbytes = packed.shape[0]
    for g in range((numel + 7) // 8):
        word = np.uint64(0)
        for m in range(bits):
            if g * bits + m < nbytes:
                word |= np.uint64(packed[g * bits + m]) << np.uint64(8 * m)
        for j in range(8):
            i = g * 8 + j
            if i < numel:
                out[i] = levels[(word >> np.uint64(j * bits)) & mask]


def _check_table(borders: Any, levels: Any | None = None) -> None:
    check_floating(borders, "borders")
    if borders.ndim != 1:
        raise ValueError(f"borders must be 1-D (the K-1 interior borders), got shape {tuple(borders.shape)}")
    k = borders.shape[0] + 1
    if k & (k - 1) or k > 256:
        raise ValueError(f"borders must hold 2^bits - 1 interior borders (bits in 1..8), got {borders.shape[0]}")
    if levels is not None:
        check_floating(levels, "levels")
        if tuple(levels.shape) != (k,):
            raise ValueError(f"levels must have shape ({k},) for {k - 1} interior borders, got {tuple(levels.shape)}")


def encode(x: Any, borders: Any, backend: str = "auto") -> Any:
    """Eq. (2): bucketize ``x`` against the K-1 interior ``borders`` (right-closed pieces, ``code = #{beta_k < x}``,
    the comparison in ``x``'s dtype) and pack the b-bit codes, ``b = log2 K``.

    Args:
        x: float array/tensor, any shape. borders: (K-1,) increasing interior borders, K = 2^b, b in 1..8.
        backend: ``"numpy"`` (searchsorted + pack), ``"numba"`` (one fused pass, parallel above
            ``ENCODE_PARALLEL_MIN`` elements), ``"torch"`` (bucketize + pack on x's device), ``"auto"``.
    Returns:
        flat uint8 of ``ceil(x.numel * b / 8)`` bytes, of x's type.
    """
    check_floating(x, "x")
    _check_table(borders)
    bits = int(math.log2(borders.shape[0] + 1))
    b = resolve_backend(backend, x)
    if b == "torch":
        xt = to_torch(x)
        codes = torch.bucketize(xt, to_torch(borders, like=xt).to(xt.dtype), right=False).to(torch.uint8)
        return like_input(pack_codes(codes, bits), x)
    xn = np.ascontiguousarray(to_numpy(x)).reshape(-1)
    bn = np.ascontiguousarray(to_numpy(borders), dtype=xn.dtype)
    if b == "numpy":
        return like_input(pack_codes(np.searchsorted(bn, xn, side="left").astype(np.uint8), bits), x)
    out = np.empty(_packed_size(xn.size, bits), np.uint8)
    # below ENCODE_PARALLEL_MIN a serial kernel: waking numba's thread pool costs more than the work, and its idle
    # OpenMP workers would then spin against torch's own threads (measured: a small MLP trains 8x slower after)
    if xn.size < ENCODE_PARALLEL_MIN or numba.get_num_threads() == 1:
        _encode_numba_serial(xn, bn, bits, out)
    else:
        _encode_numba_kernel(xn, bn, bits, numba.get_num_threads(), out)
    return like_input(out, x)


def decode(packed: Any, levels: Any, numel: int, backend: str = "auto") -> Any:
    """Eq. (3) without the product: ``levels[code]`` for the first ``numel`` packed codes (flat, levels' dtype)."""
    check_floating(levels, "levels")
    k = levels.shape[0]
    if levels.ndim != 1 or k & (k - 1) or not 2 <= k <= 256:
        raise ValueError(f"levels must be 1-D with 2^bits entries (bits in 1..8), got shape {tuple(levels.shape)}")
    bits = int(math.log2(k))
    b = resolve_backend(backend, packed)
    if b == "torch":
        pt = to_torch(packed)
        codes = unpack_codes(pt, bits, numel).to(torch.int64)
        return like_input(to_torch(levels, like=pt)[codes], packed)
    pn = np.ascontiguousarray(to_numpy(packed))
    ln = np.ascontiguousarray(to_numpy(levels))
    if b == "numpy":
        return like_input(ln[unpack_codes(pn, bits, numel)], packed)
    out = np.empty(numel, ln.dtype)
    _decode_numba(pn, ln, bits, numel, out)
    return like_input(out, packed)


# ----------------------------------------------------------------------------- autograd (2)-(3)
_FORWARD = {"gelu": F.gelu, "silu": F.silu}


class FewBitActivationFunction(torch.autograd.Function):
    """``apply(x, name, borders, levels)``: ``y = f(x)`` exactly (torch's GELU/SiLU), saving only the packed
    b-bit codes of eq. (2) (``ceil(numel b / 8)`` bytes); backward ``levels[code] * g`` (eq. 3).

    ``borders`` (K-1,) interior borders and ``levels`` (K,), K = 2^b, on x's device. The table is a constant
    of the layer and is kept on ``ctx`` as it is, not saved per call.
    """

    @staticmethod
    def forward(ctx, x, name, borders, levels):
        with torch.no_grad():
            y = _FORWARD[name](x)
            packed = encode(x.detach(), borders, backend="torch")
        ctx.save_for_backward(packed)
        ctx.levels = levels
        ctx.numel = x.numel()
        return y

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (packed,) = ctx.saved_tensors
        slope = decode(packed, ctx.levels.to(g.dtype), ctx.numel, backend="torch").reshape(g.shape)
        return slope * g, None, None, None


def few_bit_activation(x: torch.Tensor, name: str = "gelu", bits: int = 3, *, borders: Any = None,
                       levels: Any = None) -> torch.Tensor:
    """Functional few-bit ``f(x)`` (eqs. 2-3). Default table: :func:`builtin_table` ``(name, bits)`` (the official
    one); pass ``borders`` (K-1 interior) and ``levels`` (K) for another, e.g. :func:`optimal_stepwise`'s."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    check_floating(x, "x")
    _check_activation(name)
    if (borders is None) != (levels is None):
        raise ValueError("pass both borders and levels, or neither (then bits picks the builtin table)")
    if borders is None:
        t = builtin_table(name, bits)
        borders, levels = t.interior, t.levels
    borders = to_torch(np.asarray(borders) if not isinstance(borders, torch.Tensor) else borders, like=x).to(x.dtype)
    levels = to_torch(np.asarray(levels) if not isinstance(levels, torch.Tensor) else levels, like=x).to(x.dtype)
    _check_table(borders, levels)
    return FewBitActivationFunction.apply(x, name, borders, levels)


class FewBitActivation(torch.nn.Module):
    """A drop-in activation whose backward keeps ``bits`` bits per element (eqs. 2-3).

    ``table``: a :class:`StepwiseTable` (default: the official builtin table for ``name``/``bits``).
    Input any shape, float; output the same shape.
    """

    def __init__(self, name: str, bits: int = 3, table: StepwiseTable | None = None):
        super().__init__()
        self.name = _check_activation(name)
        self.bits = _check_bits(bits)
        table = builtin_table(name, bits) if table is None else table
        if table.levels.size != 2 ** bits:
            raise ValueError(f"table has {table.levels.size} levels, expected 2**bits = {2 ** bits}")
        self.register_buffer("borders", torch.tensor(table.interior, dtype=torch.float32))
        self.register_buffer("levels", torch.tensor(table.levels, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return few_bit_activation(x, self.name, self.bits, borders=self.borders, levels=self.levels)

    def extra_repr(self) -> str:
        return f"{self.name}, bits={self.bits}"


class FewBitGELU(FewBitActivation):
    """GELU (exact erf form) with a ``bits``-bit backward."""

    def __init__(self, bits: int = 3, table: StepwiseTable | None = None):
        super().__init__("gelu", bits, table)


class FewBitSiLU(FewBitActivation):
    """SiLU with a ``bits``-bit backward."""

    def __init__(self, bits: int = 3, table: StepwiseTable | None = None):
        super().__init__("silu", bits, table)
