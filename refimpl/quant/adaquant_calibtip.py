"""AdaQuant, integer-programming bit allocation and BN tuning (Hubara, Nahshan, Hanani, Banner & Soudry,
"Improving Post Training Neural Quantization: Layer-wise Calibration and Integer Programming", ICML 2021,
arXiv:2006.10518; official code: github.com/itayhubara/CalibTIP).

Equation numbers are the chapter's (notebooks/quant/adaquant_calibtip.ipynb).

The quantizer (the official ``quantize_with_grad`` of ``QuantThUpdate``): ``M`` bits, ``qmax = 2^M - 1``,
a learnable *range* ``r`` and a learnable *zero point* ``m`` (the real value mapped to code 0, i.e. the
clipping minimum) per group (one for an activation tensor, one per output channel of a weight):

    (2) s = clamp(r, 1e-6, 1e5) / qmax,      z = clamp(round(-m / s), 0, qmax)         (rounded zero point)
    (3) x_hat = s * round(clamp((x + z s) / s, 0, qmax)) - z s

``round`` is round-half-to-even with a straight-through estimator (:func:`~refimpl.quant.quantizers.round_ste`,
``d round(u)/du := 1``); ``clamp`` keeps its true derivative, so elements outside the range get no
gradient and their clipping error flows into ``r`` and ``m`` (eq. 4). Eq. (3) is the asymmetric
quantizer Q2 of :mod:`refimpl.quant.quantizers` with a *learnable* scale and zero point instead of the
min-max ones; operations are written in the official order so that every backend reproduces the
official code bit for bit.

    (1) AdaQuant, per layer:  min_{V, b', r_w, m_w, r_x, m_x}  || W X + b - (Q(V) Q(X) + Q(b')) ||^2 / (N d)

solved with Adam on minibatches of cached calibration inputs/outputs (official learning rates: V 1e-5,
b' 1e-3, (r_x, m_x) 1e-1, (r_w, m_w) 1e-3). Initial ranges are measured (eq. 5): activations: the
running average over calibration batches of the batch-mean per-sample min (clipped to <= 0) and range;
weights: per-row min (<= 0) and range. The bias is quantized on the fly to ``M_w + M_x`` bits with
min-max and an unrounded zero point (eq. 6), with a plain straight-through gradient.

    (7) Integer program (bit allocation):   min_I  sum_l sum_b I_{l,b} dL_l(b)
        s.t. sum_b I_{l,b} = 1 (each layer one precision),  sum_l sum_b I_{l,b} n_l b <= D * 32 * sum_l n_l,
        I binary;  dL_l(b) = measured loss increase (or accuracy drop) when only layer l is at b bits.

    (8) BN tuning: a layer whose batch norm (gamma, beta) was folded into it gets re-normalised on the
        calibration set after quantization:  a = sqrt(gamma^2 + eps) / sqrt(var_q + eps),
        W <- a W,  b <- a (b - mu_q) + beta   (mu_q, var_q: statistics of the quantized layer's outputs).

The critical loop is the fake-quantization forward (3) (``fake_quant``): ``backend="numpy" | "numba" |
"torch" | "auto"``. The training path uses the torch backend under autograd.
"""
from __future__ import annotations

from typing import Any, Sequence

import numba
import numpy as np
import torch
import torch.nn.functional as F
from scipy.optimize import Bounds, LinearConstraint, milp

from refimpl._common.backend import like_input, resolve_backend, to_numpy, to_torch
from refimpl._common.kernels import row_blocks
from refimpl._common.validate import check_finite, check_floating
from refimpl.quant.quantizers import _check_bits, round_ste

__all__ = ["fake_quant", "measure_activation_qparams", "measure_weight_qparams", "quantize_bias",
           "QuantLinear", "adaquant", "quantize_mlp", "bn_tune", "layer_degradation", "ip_bit_allocation",
           "RANGE_MIN", "RANGE_MAX", "ADAQUANT_LR"]

RANGE_MIN, RANGE_MAX = 1e-6, 1e5          # the official clamp of the range in eq. (2)
#: Adam learning rates hard-coded in the official ``adaquant`` (its lr1/lr2 arguments are ignored).
ADAQUANT_LR = {"weight": 1e-5, "bias": 1e-3, "input_qparams": 1e-1, "weight_qparams": 1e-3}


# ----------------------------------------------------------------------------------------------
# The critical loop: fake quantization with given range / zero point, eqs. (2)-(3).
# ----------------------------------------------------------------------------------------------
def _fq_numpy(x: np.ndarray, r: np.ndarray, m: np.ndarray, qmax: float) -> np.ndarray:
    T = x.dtype.type
    s = (np.clip(r, T(RANGE_MIN), T(RANGE_MAX)) / T(qmax)).astype(x.dtype)          # (2)
    z = np.clip(np.round(T(0) - m / s), 0, T(qmax))                                   # (2) rounded zero point
    zp = (T(0) - z) * s
    u = (x + (T(0) * s - zp)) / s
    q = np.round(np.clip(u, 0, T(qmax)))                                              # (3)
    return (q * s + (zp - T(0) * s)).astype(x.dtype)


# No fastmath: the map is elementwise (it vectorises without reassociation), and contraction or
# reciprocal division would move values across rounding ties.
@numba.njit(cache=True, error_model="numpy")
def _fq_rows(x, s, zs, qmax, r0, r1, out):
    T = x.dtype.type
    n = x.shape[1]
    for i in range(r0, r1):
        si = s[i]
        zi = zs[i]
        xi = x[i]
        oi = out[i]
        for j in range(n):
            u = (xi[j] + zi) / si
            u = min(max(u, T(0)), qmax)
            oi[j] = np.round(u) * si
        # a second sweep, so that LLVM cannot fuse q*s - z*s into one FMA (the reference rounds twice)
        for j in range(n):
            oi[j] = oi[j] - zi
    return out


@numba.njit(parallel=True, cache=True, error_model="numpy")
def _fq_numba_kernel(x, s, zs, qmax, nblocks, out):
    g = x.shape[0]
    step = (g + nblocks - 1) // nblocks
    for b in numba.prange(nblocks):
        _fq_rows(x, s, zs, qmax, b * step, min(g, (b + 1) * step), out)
    return out


def _fq_numba(x: np.ndarray, r: np.ndarray, m: np.ndarray, qmax: float) -> np.ndarray:
    T = x.dtype.type
    x2 = np.ascontiguousarray(x)
    # per-row parameters (eq. 2), computed once per row exactly like the reference
    s = (np.clip(r, T(RANGE_MIN), T(RANGE_MAX)) / T(qmax)).astype(x.dtype)
    z = np.clip(np.round(T(0) - m / s), 0, T(qmax))
    zs = (z * s).astype(x.dtype)   # = -(zp) of the reference; x + z s and q s - z s round identically
    s = np.ascontiguousarray(np.broadcast_to(s.reshape(-1, 1), (x2.shape[0], 1))[:, 0])
    zs = np.ascontiguousarray(np.broadcast_to(zs.reshape(-1, 1), (x2.shape[0], 1))[:, 0])
    out = np.empty_like(x2)
    nblocks = row_blocks(x2.shape[0], x2.size)
    if nblocks == 1:        # small: no thread-pool wake-up
        _fq_rows(x2, s, zs, T(qmax), 0, x2.shape[0], out)
    else:
        _fq_numba_kernel(x2, s, zs, T(qmax), nblocks, out)
    return out


def _fq_torch(x: torch.Tensor, r: torch.Tensor, m: torch.Tensor, qmax: float) -> torch.Tensor:
    """The official op sequence; differentiable (STE through both roundings, eq. 4)."""
    s = r.clamp(RANGE_MIN, RANGE_MAX) / qmax                                          # (2)
    z = round_ste(0.0 - m / s).clamp(0, qmax)                                         # (2)
    zp = (0.0 - z) * s
    u = (x + (0.0 * s - zp)) / s
    q = round_ste(u.clamp(0, qmax))                                                   # (3)
    return q * s + (zp - 0.0 * s)


_FQ = {"numpy": _fq_numpy, "numba": _fq_numba, "torch": _fq_torch}


def fake_quant(x: Any, qrange: Any, zero_point: Any, bits: int, *, backend: str = "auto") -> Any:
    """Asymmetric fake quantization with a given range and zero point (eqs. 2-3, the official
    ``quantize_with_grad``).

    Args:
        x: float32/float64 array or tensor of shape ``(G, n)`` (rows = groups) or any shape when the
            parameters are scalars.
        qrange: the range ``r`` (max - min), shape ``(1,)`` (one group) or ``(G, 1)`` (per row).
        zero_point: the real value ``m`` mapped to code 0 (the clipping minimum), same shape as ``qrange``.
        bits: code width ``M`` (codes ``0 .. 2^M - 1``).
        backend: ``"numpy" | "numba" | "torch" | "auto"``; only ``"torch"`` is differentiable
            (straight-through rounding, true clamp gradients).

    Returns:
        ``x_hat`` with ``x``'s shape, dtype and type.
    """
    _check_bits(bits, 1, 16)
    check_floating(x, "x")
    b = resolve_backend(backend, x)
    shape = tuple(x.shape)
    rs, ms = tuple(qrange.shape), tuple(zero_point.shape)
    if rs != ms:
        raise ValueError(f"qrange and zero_point must have the same shape, got {rs} and {ms}")
    n_par = int(np.prod(rs)) if rs else 1
    if n_par != 1 and (len(shape) != 2 or rs not in ((shape[0], 1), (shape[0],))):
        raise ValueError(f"per-row qrange/zero_point need x of shape (G, n) and parameters of shape (G, 1); "
                         f"got x {shape} and parameters {rs}")
    qmax = float(2 ** bits - 1)
    if b == "torch":
        xt = to_torch(x)
        r = to_torch(qrange, like=xt).to(xt.dtype)
        m = to_torch(zero_point, like=xt).to(xt.dtype)
        shp = (-1, 1) if n_par != 1 else ()
        return like_input(_fq_torch(xt, r.reshape(shp), m.reshape(shp), qmax), x)
    xn = to_numpy(x)
    check_finite(xn, "x")
    r = to_numpy(qrange).astype(xn.dtype).reshape(-1, 1)
    m = to_numpy(zero_point).astype(xn.dtype).reshape(-1, 1)
    x2 = xn.reshape(shape[0], -1) if n_par != 1 else xn.reshape(1, -1)
    if b == "numpy":
        out = _fq_numpy(x2, r, m, qmax)
    else:
        if n_par == 1 and x2.size >= 1 << 12:        # split a single group into rows for the parallel kernel
            x2 = xn.reshape(-1, shape[-1]) if len(shape) > 1 else xn.reshape(1, -1)
            r, m = np.repeat(r, x2.shape[0], 0), np.repeat(m, x2.shape[0], 0)
        out = _fq_numba(x2, r, m, qmax)
    return like_input(out.reshape(shape), x)


# ----------------------------------------------------------------------------------------------
# Initial ranges (eq. 5) and the bias quantizer (eq. 6).
# ----------------------------------------------------------------------------------------------
def _minmax_clipped(lo: torch.Tensor, hi: torch.Tensor):
    lo = torch.where(lo > 0, torch.zeros_like(lo), lo)
    hi = torch.where(hi < 0, torch.zeros_like(hi), hi)
    rng = hi - lo
    return torch.where(rng == 0, torch.ones_like(rng), rng), lo


def measure_activation_qparams(batches: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Measured input range and zero point (eq. 5, the official ``QuantMeasure`` in measure mode).

    For every batch ``x`` (``(B, ...)``): the batch means of the per-sample min and max, with
    ``min <= 0 <= max`` enforced; these are averaged over batches with the official running average
    ``v <- v n/(n+1) + v_new / (n+1)``. Returns ``(range, zero_point)``, each of shape ``(1,)``.
    """
    if len(batches) == 0:
        raise ValueError("batches must hold at least one calibration batch")
    r_run = z_run = None
    n = torch.zeros(1)
    with torch.no_grad():
        for x in batches:
            check_floating(x, "batches[i]")
            if x.dim() < 2:
                raise ValueError(f"each batch must have shape (B, ...), got {tuple(x.shape)}")
            flat = x.flatten(1)
            rng, lo = _minmax_clipped(flat.min(-1)[0].mean(0, keepdim=True), flat.max(-1)[0].mean(0, keepdim=True))
            mom = n / (n + 1)
            if r_run is None:
                r_run, z_run = torch.zeros_like(rng), torch.zeros_like(lo)
            z_run = z_run * mom + lo * (1 - mom)
            r_run = r_run * mom + rng * (1 - mom)
            n += 1
    return r_run, z_run


def measure_weight_qparams(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel range and zero point of a weight ``(out, in)`` (eq. 5): row min (<= 0) and
    row max - min. Returns ``(range, zero_point)``, each ``(out, 1)``."""
    check_floating(weight, "weight")
    if weight.dim() < 2:
        raise ValueError(f"weight must have shape (out, in, ...), got {tuple(weight.shape)}")
    with torch.no_grad():
        flat = weight.flatten(1)
        rng, lo = _minmax_clipped(flat.min(-1, keepdim=True)[0], flat.max(-1, keepdim=True)[0])
    return rng, lo


def quantize_bias(bias: torch.Tensor, bits: int) -> torch.Tensor:
    """Min-max quantization of the bias with an *unrounded* zero point (eq. 6, the official
    ``UniformQuantize`` call in ``QLinear``); the gradient is straight-through (identity)."""
    _check_bits(bits, 1, 32)
    with torch.no_grad():
        rng, lo = _minmax_clipped(bias.min().reshape(()), bias.max().reshape(()))
        qmax = 2.0 ** bits - 1.0
        s = rng.clamp(RANGE_MIN, RANGE_MAX) / qmax
        u = (bias + (0.0 * s - lo)) / s
        bq = u.clamp(0, qmax).round() * s + (lo - 0.0 * s)
    return bias + (bq - bias).detach()


# ----------------------------------------------------------------------------------------------
# The quantized linear layer.
# ----------------------------------------------------------------------------------------------
class QuantLinear(torch.nn.Module):
    """``y = Q(W) Q(x) + Q(b)`` with learnable quantization parameters (eqs. 2-6; the official ``QLinear``
    with ``measure=False``, ``perC=True``).

    Parameters: ``weight (out, in)``, ``bias (out,)``, ``in_range``/``in_zero`` ``(1,)`` (activation,
    eq. 2) and ``w_range``/``w_zero`` ``(out, 1)`` (per output channel). ``bits`` quantizes both the
    weights and the input (the official layer quantizes weights with ``num_bits``, see the chapter);
    the bias uses ``2 * bits``. ``quantize=False`` makes it a plain linear layer.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 8, bias: bool = True):
        super().__init__()
        _check_bits(bits, 1, 16)
        self.bits = int(bits)
        self.quantize = True
        self.weight = torch.nn.Parameter(torch.empty(out_features, in_features))
        self.bias = torch.nn.Parameter(torch.zeros(out_features)) if bias else None
        self.in_range = torch.nn.Parameter(torch.ones(1))
        self.in_zero = torch.nn.Parameter(torch.ones(1))
        self.w_range = torch.nn.Parameter(torch.ones(out_features, 1))
        self.w_zero = torch.nn.Parameter(torch.ones(out_features, 1))
        torch.nn.init.kaiming_uniform_(self.weight, a=5 ** 0.5)

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear, calib_batches: Sequence[torch.Tensor], bits: int) -> "QuantLinear":
        """Copy ``linear`` and set the initial ranges from calibration inputs (eq. 5)."""
        if not isinstance(linear, torch.nn.Linear):
            raise TypeError(f"linear must be a torch.nn.Linear, got {type(linear).__name__}")
        q = cls(linear.in_features, linear.out_features, bits, bias=linear.bias is not None)
        with torch.no_grad():
            q.weight.copy_(linear.weight)
            if linear.bias is not None:
                q.bias.copy_(linear.bias)
            r, m = measure_activation_qparams(calib_batches)
            q.in_range.copy_(r)
            q.in_zero.copy_(m)
            r, m = measure_weight_qparams(linear.weight)
            q.w_range.copy_(r)
            q.w_zero.copy_(m)
        return q

    def quantized_weight(self) -> torch.Tensor:
        return _fq_torch(self.weight, self.w_range, self.w_zero, 2.0 ** self.bits - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.quantize:
            return F.linear(x, self.weight, self.bias)
        qx = _fq_torch(x, self.in_range, self.in_zero, 2.0 ** self.bits - 1)
        qb = quantize_bias(self.bias, 2 * self.bits) if self.bias is not None else None
        return F.linear(qx, self.quantized_weight(), qb)

    def extra_repr(self) -> str:
        return f"in_features={self.weight.shape[1]}, out_features={self.weight.shape[0]}, bits={self.bits}"


# ----------------------------------------------------------------------------------------------
# AdaQuant (eq. 1).
# ----------------------------------------------------------------------------------------------
def _mse(out: torch.Tensor, target: torch.Tensor, relu: bool) -> torch.Tensor:
    return F.mse_loss(F.relu(out), F.relu(target)) if relu else F.mse_loss(out, target)


def adaquant(layer: QuantLinear, inputs: torch.Tensor, outputs: torch.Tensor, test_inputs: torch.Tensor | None = None,
             test_outputs: torch.Tensor | None = None, *, iters: int = 100, batch_size: int = 50, relu: bool = False,
             lr: dict | None = None, generator: torch.Generator | None = None) -> tuple[float, float]:
    """Optimize ``layer``'s weight, bias and quantization parameters in place to minimise eq. (1).

    Args:
        layer: a :class:`QuantLinear` with measured initial ranges.
        inputs: cached calibration inputs ``X``, ``(N, in)``; outputs: the full-precision outputs
            ``W X + b``, ``(N, out)``.
        test_inputs/test_outputs: where the before/after MSE is measured (default: all the data).
        iters: Adam steps; each draws ``batch_size`` samples with ``torch.randperm`` (the global RNG
            unless ``generator`` is given: seed with ``torch.manual_seed`` to reproduce the official run).
        relu: compare ``relu(out)`` with ``relu(target)`` (the official choice for layers followed by ReLU).
        lr: learning rates, default :data:`ADAQUANT_LR` (four Adam optimizers, as in the official code).

    Returns:
        ``(mse_before, mse_after)`` on the test data.
    """
    if not isinstance(layer, QuantLinear):
        raise TypeError(f"layer must be a QuantLinear, got {type(layer).__name__}")
    for name, t in (("inputs", inputs), ("outputs", outputs)):
        check_floating(t, name)
    if inputs.dim() != 2 or outputs.dim() != 2 or inputs.shape[0] != outputs.shape[0]:
        raise ValueError(f"inputs (N, in) and outputs (N, out) must be 2-D with the same N, got "
                         f"{tuple(inputs.shape)} and {tuple(outputs.shape)}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise ValueError(f"iters must be a non-negative int, got {iters!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    lr = {**ADAQUANT_LR, **(lr or {})}
    if test_inputs is None:
        test_inputs, test_outputs = inputs, outputs
    with torch.no_grad():
        mse_before = _mse(layer(test_inputs), test_outputs, relu).item()
    opts = [torch.optim.Adam([layer.weight], lr=lr["weight"])]
    if layer.bias is not None:
        opts.append(torch.optim.Adam([layer.bias], lr=lr["bias"]))
    opts.append(torch.optim.Adam([layer.in_range, layer.in_zero], lr=lr["input_qparams"]))
    opts.append(torch.optim.Adam([layer.w_range, layer.w_zero], lr=lr["weight_qparams"]))
    n = inputs.shape[0]
    for _ in range(iters):
        idx = torch.randperm(n, generator=generator)[:batch_size]
        loss = _mse(layer(inputs[idx]), outputs[idx], relu)
        for o in opts:
            o.zero_grad()
        loss.backward()
        for o in opts:
            o.step()
    with torch.no_grad():
        mse_after = _mse(layer(test_inputs), test_outputs, relu).item()
    return mse_before, mse_after


def quantize_mlp(linears: Sequence[torch.nn.Linear], calib: torch.Tensor, bits: int | Sequence[int], *,
                 method: str = "adaquant", iters: int = 200, batch_size: int = 50, relu_between: bool = True,
                 calib_batch: int = 100) -> list[QuantLinear]:
    """Quantize an MLP ``linears[0] -> ReLU -> linears[1] -> ... -> linears[-1]`` layer by layer.

    ``method``: ``"measure"`` (measured ranges only, no optimization: the naive baseline),
    ``"adaquant"`` (parallel: every layer sees full-precision inputs, eq. 1) or ``"adaquant_seq"``
    (sequential: layer l sees the outputs of the already-quantized layers 0..l-1, against
    full-precision targets). ``bits``: one int or one per layer. Uses the global torch RNG.
    """
    if method not in ("measure", "adaquant", "adaquant_seq"):
        raise ValueError(f"method must be 'measure', 'adaquant' or 'adaquant_seq', got {method!r}")
    bits = [bits] * len(linears) if isinstance(bits, (int, np.integer)) else list(bits)
    if len(bits) != len(linears):
        raise ValueError(f"bits must be an int or have one entry per layer ({len(linears)}), got {len(bits)}")
    act = (lambda t: F.relu(t)) if relu_between else (lambda t: t)
    h_fp, h_q = calib, calib
    out: list[QuantLinear] = []
    with torch.no_grad():
        for i, (lin, b) in enumerate(zip(linears, bits)):
            y_fp = lin(h_fp)
            x_in = h_q if method == "adaquant_seq" else h_fp
            q = QuantLinear.from_linear(lin, list(x_in.split(calib_batch)), b)
            last = i == len(linears) - 1
            if method != "measure":
                with torch.enable_grad():
                    adaquant(q, x_in, y_fp, iters=iters, batch_size=batch_size, relu=relu_between and not last)
            out.append(q)
            h_fp = y_fp if last else act(y_fp)
            yq = q(h_q)
            h_q = yq if last else act(yq)
    return out


def bn_tune(layers: Sequence[QuantLinear], gammas: Sequence[torch.Tensor | None], betas: Sequence[torch.Tensor | None],
            calib: torch.Tensor, *, eps: float = 1e-5, relu_between: bool = True) -> None:
    """BN tuning (eq. 8), in place: for every layer with folded batch-norm parameters ``(gamma, beta)``
    (``None`` to skip a layer), run the quantized network on ``calib``, take the mean and (biased)
    variance of the layer's outputs, and re-normalise the layer so they become ``beta`` and
    ``gamma^2 + eps``-scaled again; the weight's quantization range scales with it (codes unchanged)."""
    if not (len(layers) == len(gammas) == len(betas)):
        raise ValueError("layers, gammas and betas must have the same length")
    h = calib
    with torch.no_grad():
        for i, (q, g, b) in enumerate(zip(layers, gammas, betas)):
            y = q(h)
            if g is not None:
                mu, var = y.mean(0), y.var(0, unbiased=False)
                a = torch.sqrt(g ** 2 + eps) / torch.sqrt(var + eps)
                q.weight.mul_(a[:, None])
                q.w_range.mul_(a[:, None])
                q.w_zero.mul_(a[:, None])
                if q.bias is None:
                    raise ValueError(f"layer {i} has no bias to absorb beta")
                q.bias.copy_((q.bias - mu) * a + b)
                y = q(h)
            h = F.relu(y) if relu_between and i < len(layers) - 1 else y


# ----------------------------------------------------------------------------------------------
# Integer program for mixed precision (eq. 7), solved with scipy.optimize.milp (HiGHS).
# ----------------------------------------------------------------------------------------------
def layer_degradation(base: float, measured: Any, *, higher_is_better: bool = False, floor: float = 1e-6) -> np.ndarray:
    """``dL_l(b)`` of eq. (7) from per-layer measurements ``measured[p, l]`` (precision p, layer l
    alone at low precision): the loss increase (or accuracy drop when ``higher_is_better``), clipped
    at ``floor`` like the official code."""
    m = np.asarray(measured, dtype=np.float64)
    if m.ndim != 2:
        raise ValueError(f"measured must have shape (precisions, layers), got {m.shape}")
    d = (base - m) if higher_is_better else (m - base)
    return np.maximum(d, floor)


def ip_bit_allocation(degradation: Any, sizes: Any, precisions: Sequence[int], budget: float, *,
                      base_precision: int = 8) -> tuple[np.ndarray, float, float]:
    """Solve the integer program (7) with ``scipy.optimize.milp``.

    Args:
        degradation: ``dL[p, l]``, shape ``(P, L)``, for the low precisions ``precisions[p]``
            (:func:`layer_degradation`); the base precision costs 0.
        sizes: ``n_l``, the number of parameters of every layer, shape ``(L,)``.
        precisions: the low bit widths, e.g. ``[4, 2]``.
        budget: ``D``, the model size allowed as a fraction of its float32 size.
        base_precision: the precision a layer keeps when it is not lowered.

    Returns:
        ``(bits, objective, compression)``: the chosen bit width per layer ``(L,)``, the summed
        predicted degradation, and the achieved size as a fraction of float32.

    Raises:
        ValueError: when no allocation satisfies the budget.
    """
    dl = np.asarray(degradation, dtype=np.float64)
    n = np.asarray(sizes, dtype=np.float64)
    if dl.ndim != 2 or dl.shape[0] != len(precisions):
        raise ValueError(f"degradation must have shape (len(precisions)={len(precisions)}, L), got {dl.shape}")
    if n.shape != (dl.shape[1],) or np.any(n <= 0):
        raise ValueError(f"sizes must be {dl.shape[1]} positive numbers, got shape {n.shape}")
    if not 0 < budget <= 1:
        raise ValueError(f"budget must lie in (0, 1], got {budget}")
    P, L = dl.shape
    bits = np.array(list(precisions) + [base_precision], dtype=np.float64)       # (P+1,)
    cost = np.vstack([dl, np.zeros((1, L))])                                     # (P+1, L)
    c = cost.T.reshape(-1)                                                        # variable (l, p) -> l*(P+1)+p
    one = np.kron(np.eye(L), np.ones((1, P + 1)))                                 # one precision per layer
    saved = ((base_precision - bits)[None, :] * n[:, None]).reshape(1, -1)        # memory saved, official form
    total = n.sum() * base_precision
    cons = [LinearConstraint(one, 1, 1), LinearConstraint(saved, total * (1 - budget * (32 / base_precision)), np.inf)]
    res = milp(c, constraints=cons, integrality=np.ones_like(c), bounds=Bounds(0, 1))
    if res.x is None:
        raise ValueError(f"no bit allocation fits the budget D={budget}: {res.message}")
    choice = np.round(res.x).reshape(L, P + 1).argmax(1)
    chosen = bits[choice].astype(int)
    obj = float(cost[choice, np.arange(L)].sum())
    return chosen, obj, float((n * chosen).sum() / (32 * n.sum()))
