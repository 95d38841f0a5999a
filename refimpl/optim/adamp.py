"""AdamP and SGDP (Heo, Chun, Oh, Han, Yun, Kim, Uh & Ha, ICLR 2021, arXiv:2006.08217).

Momentum optimizers make the norm of scale-invariant weights (weights followed by a normalization
layer) grow fast, which shrinks their effective step size ||dw||/||w||. AdamP/SGDP remove the radial
(norm-increasing) component of the update of every weight that *looks* scale-invariant.

For one parameter tensor w (ndim > 1), gradient g, and the base optimizer's update u:

    SGD:   (1) b <- mu * b + (1 - dampening) * g,        u = b   (nesterov: u = g + mu * b)
    Adam:  (2) m <- beta1 * m + (1 - beta1) * g,         v <- beta2 * v + (1 - beta2) * g^2
           (3) u = m / (sqrt(v) / sqrt(1 - beta2^t) + eps)    (nesterov: beta1 * m + (1 - beta1) * g
                                                               in place of m), step size lr / (1 - beta1^t)
    Test:  (4) cos(x, y) = <x, y> / (max(||x||, eps) * max(||y||, eps));  a view of w (rows of the
               channel view: w reshaped to (w.shape[0], -1); the layer view: w as one row) is taken as
               scale-invariant when  max_rows |cos(g_row, w_row)| < delta / sqrt(row length)
    Proj.: (5) u_row <- u_row - <w_row, u_row> / (||w_row|| + eps)^2 * w_row
               (the channel view is tried first; the layer view only when the channel view fails)
    WD:    (6) w <- w * (1 - lr * lambda * r)        AdamP;   w <- w * (1 - lr * lambda * r / (1 - mu)) SGDP
               with r = wd_ratio when (5) fired, else 1
    Step:  (7) w <- w - eta * u                      eta = lr / (1 - beta1^t) (AdamP), lr (SGDP)

Tensors with ndim <= 1 (biases, gains) are never projected.

The critical loop works on the tensors of a parameter group laid end to end in one flat vector
(:class:`refimpl.optim.multi_tensor.SegmentLayout`); the projection needs per-*row* reductions, so
:class:`ProjectionLayout` also cuts every tensor into the rows of its channel view. One step is

    pass 1: the element-wise moment update (1)/(2)-(3) and four per-row dot products
            <g,w>, <g,g>, <w,w>, <w,u>   (one sweep over memory)
    decide: (4) per row and per tensor, on R + K numbers; the projection coefficients of (5)
    pass 2: (5)-(7) fused:  w <- (1 - lr*lambda*r) * w - eta * (u - c_row * w)

Backends: ``"numpy"`` (readable reference built on ``segment_dot``/``segment_axpy`` of the shared
multi-tensor kernel), ``"numba"`` (the two passes as kernels over rows, parallel for large
groups, float64 accumulators), ``"torch"`` (vectorised and device-agnostic: per-row sums with
``torch.segment_reduce``, per-row values broadcast with ``repeat_interleave``), ``"auto"``
(torch for tensors, numba for arrays). :class:`AdamP` and :class:`SGDP` are drop-in
``torch.optim.Optimizer`` subclasses whose state has the official package's layout.
"""
from __future__ import annotations

import math
import types
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
from numba import njit, prange

from refimpl._common.backend import resolve_backend
from refimpl._common.kernels import FASTMATH as _FASTMATH, PARALLEL_MIN
from refimpl._common.validate import check_betas, check_floating
from refimpl.optim.multi_tensor import SegmentLayout, segment_axpy, segment_dot

__all__ = ["ProjectionLayout", "cosine_test", "project_radial", "adamp_step", "sgdp_step", "AdamP", "SGDP"]


# ----------------------------------------------------------------------------- layout
class ProjectionLayout:
    """The rows of the channel views of K tensors laid end to end in a flat vector.

    Built from a :class:`SegmentLayout` (or a list of shapes). A tensor of shape (d0, d1, ...) with
    ndim > 1 contributes d0 rows of d1*d2*... elements; a 0-d or 1-d tensor one row (never
    projected). Attributes: ``segments`` (the SegmentLayout of the tensors), ``rows`` (a
    SegmentLayout of the R rows), ``row_offsets`` (R+1,) int64, ``row_tensor`` (R,) int64 (which
    tensor a row belongs to), ``row_len`` (R,), ``projectable`` (K,) bool (ndim > 1 and non-empty),
    ``numel`` (K,).
    """

    def __init__(self, layout: SegmentLayout | Sequence[Sequence[int]]):
        self.segments = layout if isinstance(layout, SegmentLayout) else SegmentLayout(layout)
        row_len, row_tensor = [], []
        for k, shape in enumerate(self.segments.shapes):
            size = math.prod(shape)
            if len(shape) > 1:
                n_rows = shape[0]
                row_len += [size // n_rows if n_rows else 0] * n_rows
                row_tensor += [k] * n_rows
            else:
                row_len.append(size)
                row_tensor.append(k)
        self.numel = np.asarray(self.segments.sizes, dtype=np.int64)
        self.projectable = np.array([len(s) > 1 and math.prod(s) > 0 for s in self.segments.shapes])
        self.row_len = np.asarray(row_len, dtype=np.int64)
        self.row_tensor = np.asarray(row_tensor, dtype=np.int64)
        self.row_offsets = np.concatenate([[0], np.cumsum(self.row_len)]).astype(np.int64)
        self.rows = SegmentLayout([(n,) for n in row_len]) if row_len else None
        self._torch_cache: dict[Any, dict[str, torch.Tensor]] = {}

    @classmethod
    def of(cls, tensors: Sequence[Any]) -> "ProjectionLayout":
        return cls(SegmentLayout.of(tensors))

    @property
    def n_rows(self) -> int:
        return int(self.row_len.shape[0])

    def __len__(self) -> int:
        return len(self.segments)

    def torch_index(self, device: Any) -> dict[str, torch.Tensor]:
        """Index tensors on ``device`` (cached): ``row_tensor`` (R,), ``row_len`` (R,) and ``numel``
        (K,) as int64, ``projectable`` (K,) bool."""
        key = str(torch.device(device))
        if key not in self._torch_cache:
            dev = torch.device(device)
            self._torch_cache[key] = {
                "row_tensor": torch.from_numpy(self.row_tensor).to(dev),
                "row_len": torch.from_numpy(self.row_len).to(dev),
                "numel": torch.from_numpy(self.numel).to(dev),
                "projectable": torch.from_numpy(self.projectable).to(dev),
            }
        return self._torch_cache[key]

    def __repr__(self) -> str:
        return f"ProjectionLayout({len(self)} tensors, {self.n_rows} rows, {self.segments.numel} elements)"


# ----------------------------------------------------------------------------- single-tensor helpers
def _check_tensor_pair(a: torch.Tensor, b: torch.Tensor, na: str, nb: str) -> None:
    for t, name in ((a, na), (b, nb)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        check_floating(t, name)
    if a.shape != b.shape:
        raise ValueError(f"{na} and {nb} must have one shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.ndim < 2:
        raise ValueError(f"{na} must have ndim > 1 (AdamP never projects biases or gains), got ndim {a.ndim}")


def cosine_test(grad: torch.Tensor, weight: torch.Tensor, delta: float = 0.1,
                eps: float = 1e-8) -> str | None:
    """Eq. (4) for one tensor: ``"channel"`` when every row of the channel view passes the test,
    else ``"layer"`` when the whole tensor does, else ``None``. grad, weight: (d0, ...) float."""
    _check_tensor_pair(grad, weight, "grad", "weight")
    _check_hparams(delta=delta, eps=eps)
    for view, name in ((lambda x: x.reshape(x.shape[0], -1), "channel"), (lambda x: x.reshape(1, -1), "layer")):
        g, w = view(grad), view(weight)
        cos = (g * w).sum(1).abs() / (g.norm(dim=1).clamp_min(eps) * w.norm(dim=1).clamp_min(eps))
        if bool(cos.max() < delta / math.sqrt(w.shape[1])):
            return name
    return None


def project_radial(update: torch.Tensor, weight: torch.Tensor, view: str = "layer",
                   eps: float = 1e-8) -> torch.Tensor:
    """Eq. (5): ``update`` minus its component along ``weight``, per row of the channel view
    (``view="channel"``) or for the whole tensor (``"layer"``). Returns a new tensor."""
    _check_tensor_pair(update, weight, "update", "weight")
    if view not in ("channel", "layer"):
        raise ValueError(f"view must be 'channel' or 'layer', got {view!r}")
    rows = weight.shape[0] if view == "channel" else 1
    w, u = weight.reshape(rows, -1), update.reshape(rows, -1)
    w_n = w / (w.norm(dim=1, keepdim=True) + eps)
    return (u - w_n * (w_n * u).sum(1, keepdim=True)).reshape(update.shape)


# ----------------------------------------------------------------------------- validation
def _check_hparams(**hp: Any) -> None:
    for name, value in hp.items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
            raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
        if not math.isfinite(value):
            raise ValueError(f"{name} must be finite, got {value!r}")
        if name in ("beta1", "beta2", "momentum") and not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        elif name == "dampening" and not 0.0 <= value <= 1.0:
            raise ValueError(f"dampening must be in [0, 1], got {value!r}")
        elif name == "eps" and value <= 0:
            raise ValueError(f"eps must be > 0, got {value!r}")
        elif value < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")


def _check_buffers(layout: ProjectionLayout, **bufs: Any) -> Any:
    if not isinstance(layout, ProjectionLayout):
        raise TypeError(f"layout must be a ProjectionLayout, got {type(layout).__name__}")
    first = None
    for name, x in bufs.items():
        layout.segments.check(x, name)
        if first is None:
            first = (name, x)
        elif type(x) is not type(first[1]) or x.dtype != first[1].dtype:
            raise TypeError(f"{name} must have the type and dtype of {first[0]} ({type(first[1]).__name__} "
                            f"{first[1].dtype}), got {type(x).__name__} {x.dtype}")
        elif isinstance(x, torch.Tensor) and x.device != first[1].device:
            raise ValueError(f"{name} is on {x.device}, {first[0]} on {first[1].device}")
    return first[1]


def _per_tensor(value: Any, layout: ProjectionLayout, name: str) -> np.ndarray:
    """A scalar or K values -> (K,) float64 (the step counter may differ between tensors)."""
    arr = np.asarray(value.detach().cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64)
    if arr.ndim == 0:
        arr = np.full(len(layout), float(arr))
    if arr.shape != (len(layout),):
        raise ValueError(f"{name} must be a scalar or hold one value per tensor ({len(layout)},), got {arr.shape}")
    return arr


# ----------------------------------------------------------------------------- the decision (4)-(6)
def _decide_numpy(gw, gg, ww, wu, layout: ProjectionLayout, delta, eps, wd_ratio):
    """Per-row projection coefficients c (R,) of eq. (5) and per-tensor weight-decay ratios (K,)."""
    rt, k = layout.row_tensor, len(layout)
    cos = np.abs(gw) / (np.maximum(np.sqrt(gg), eps) * np.maximum(np.sqrt(ww), eps))       # (4), rows
    worst = np.full(k, -np.inf)
    np.maximum.at(worst, rt, cos)
    row_len_k = np.zeros(k)
    row_len_k[rt] = layout.row_len
    channel = layout.projectable & (worst < delta / np.sqrt(np.maximum(row_len_k, 1)))
    GW, GG, WW, WU = (np.bincount(rt, weights=a, minlength=k) for a in (gw, gg, ww, wu))
    cos_l = np.abs(GW) / (np.maximum(np.sqrt(GG), eps) * np.maximum(np.sqrt(WW), eps))    # (4), layer
    layer = layout.projectable & ~channel & (cos_l < delta / np.sqrt(np.maximum(layout.numel, 1)))
    c_channel = wu / (np.sqrt(ww) + eps) ** 2                                               # (5)
    c_layer = WU / (np.sqrt(WW) + eps) ** 2
    c = np.where(channel[rt], c_channel, np.where(layer[rt], c_layer[rt], 0.0))
    ratio = np.where(channel | layer, wd_ratio, 1.0)                                        # (6)
    return c, ratio, channel, layer


def _decide_torch(gw, gg, ww, wu, layout: ProjectionLayout, delta, eps, wd_ratio):
    idx = layout.torch_index(gw.device)
    rt, k = idx["row_tensor"], len(layout)
    cos = gw.abs() / (gg.sqrt().clamp_min(eps) * ww.sqrt().clamp_min(eps))                  # (4), rows
    worst = torch.full((k,), -math.inf, dtype=gw.dtype, device=gw.device).scatter_reduce(0, rt, cos, "amax")
    row_len_k = torch.zeros(k, dtype=gw.dtype, device=gw.device).scatter(0, rt, idx["row_len"].to(gw.dtype))
    channel = idx["projectable"] & (worst < delta / row_len_k.clamp_min(1).sqrt())
    sums = torch.zeros(4, k, dtype=gw.dtype, device=gw.device).index_add_(1, rt, torch.stack([gw, gg, ww, wu]))
    GW, GG, WW, WU = sums
    cos_l = GW.abs() / (GG.sqrt().clamp_min(eps) * WW.sqrt().clamp_min(eps))               # (4), layer
    layer = idx["projectable"] & ~channel & (cos_l < delta / idx["numel"].to(gw.dtype).clamp_min(1).sqrt())
    c = torch.where(channel[rt], wu / (ww.sqrt() + eps) ** 2,
                    torch.where(layer[rt], (WU / (WW.sqrt() + eps) ** 2)[rt], torch.zeros_like(wu)))   # (5)
    ratio = torch.where(channel | layer, torch.full_like(GW, wd_ratio), torch.ones_like(GW))           # (6)
    return c, ratio, channel, layer


# ----------------------------------------------------------------------------- numba kernels
def _adam_pass_numba(w, g, m, v, u, row_offsets, sqrt_bc2, beta1, beta2, eps, nesterov, dots):
    """Pass 1 of AdamP: eqs. (2)-(3) in place on m, v; u = the Adam direction; per-row dots."""
    T = w.dtype.type
    b1, b2, e = T(beta1), T(beta2), T(eps)
    one = T(1)
    for r in prange(row_offsets.shape[0] - 1):
        s2 = T(sqrt_bc2[r])
        gw = 0.0
        gg = 0.0
        ww = 0.0
        wu = 0.0
        for i in range(row_offsets[r], row_offsets[r + 1]):
            gi = g[i]
            wi = w[i]
            mi = b1 * m[i] + (one - b1) * gi                                   # (2)
            vi = b2 * v[i] + (one - b2) * gi * gi
            m[i] = mi
            v[i] = vi
            num = b1 * mi + (one - b1) * gi if nesterov else mi
            ui = num / (math.sqrt(vi) / s2 + e)                                # (3)
            u[i] = ui
            gw += np.float64(gi) * np.float64(wi)                              # for (4), (5)
            gg += np.float64(gi) * np.float64(gi)
            ww += np.float64(wi) * np.float64(wi)
            wu += np.float64(wi) * np.float64(ui)
        dots[0, r] = gw
        dots[1, r] = gg
        dots[2, r] = ww
        dots[3, r] = wu


def _sgd_pass_numba(w, g, b, u, row_offsets, momentum, dampening, nesterov, dots):
    """Pass 1 of SGDP: eq. (1) in place on the momentum buffer b; u = the SGD direction; dots."""
    T = w.dtype.type
    mu, damp = T(momentum), T(1 - dampening)
    for r in prange(row_offsets.shape[0] - 1):
        gw = 0.0
        gg = 0.0
        ww = 0.0
        wu = 0.0
        for i in range(row_offsets[r], row_offsets[r + 1]):
            gi = g[i]
            wi = w[i]
            bi = mu * b[i] + damp * gi                                         # (1)
            b[i] = bi
            ui = gi + mu * bi if nesterov else bi
            u[i] = ui
            gw += np.float64(gi) * np.float64(wi)
            gg += np.float64(gi) * np.float64(gi)
            ww += np.float64(wi) * np.float64(wi)
            wu += np.float64(wi) * np.float64(ui)
        dots[0, r] = gw
        dots[1, r] = gg
        dots[2, r] = ww
        dots[3, r] = wu


def _apply_numba(w, u, row_offsets, decay, eta, c):
    """Pass 2: eqs. (5)-(7) fused, w <- decay_r * w - eta_r * (u - c_r * w), per row r."""
    T = w.dtype.type
    for r in prange(row_offsets.shape[0] - 1):
        d = T(decay[r])
        s = T(eta[r])
        cr = T(c[r])
        for i in range(row_offsets[r], row_offsets[r + 1]):
            wi = w[i]
            w[i] = d * wi - s * (u[i] - cr * wi)


def _apply_store_numba(w, u, buf, row_offsets, decay, eta, c):
    """Pass 2 of SGDP as the official code runs it without Nesterov: the projected direction is
    also written back into the momentum buffer (buf <- u - c_r * w), then the weights are updated."""
    T = w.dtype.type
    for r in prange(row_offsets.shape[0] - 1):
        d = T(decay[r])
        s = T(eta[r])
        cr = T(c[r])
        for i in range(row_offsets[r], row_offsets[r + 1]):
            wi = w[i]
            q = u[i] - cr * wi
            buf[i] = q
            w[i] = d * wi - s * q


# Each kernel compiled twice: parallel over rows, and serial for small groups, where waking the
# worker threads costs more than the work (refimpl._common.kernels.PARALLEL_MIN).
def _renamed(fn, suffix: str):
    """A copy of ``fn`` under another name, so that Numba's on-disk cache keeps the two builds apart."""
    f = types.FunctionType(fn.__code__, fn.__globals__, fn.__name__ + suffix, fn.__defaults__, fn.__closure__)
    f.__qualname__ = fn.__qualname__ + suffix
    return f


_KERNELS = {name: (njit(cache=True, fastmath=_FASTMATH)(_renamed(fn, "_serial")),
                   njit(parallel=True, cache=True, fastmath=_FASTMATH)(fn))
            for name, fn in (("adam", _adam_pass_numba), ("sgd", _sgd_pass_numba), ("apply", _apply_numba),
                             ("apply_store", _apply_store_numba))}


def _kernel(name: str, n: int):
    return _KERNELS[name][n >= PARALLEL_MIN]


# ----------------------------------------------------------------------------- the step
def _projected_step(kind: str, param: Any, grad: Any, bufs: tuple, layout: ProjectionLayout, *,
                    lr: float, eta_k: np.ndarray, sqrt_bc2_k: np.ndarray | None, hp: dict, delta: float,
                    eps: float, weight_decay: float, wd_scale: float, wd_ratio: float, backend: str) -> dict:
    """Shared body of :func:`adamp_step` and :func:`sgdp_step` (after validation)."""
    backend = resolve_backend(backend, param)
    rt = layout.row_tensor
    if backend == "torch":
        dev = param.device if isinstance(param, torch.Tensor) else "cpu"
        w, g = torch.as_tensor(param), torch.as_tensor(grad)
        b = [torch.as_tensor(x) for x in bufs]
        idx = layout.torch_index(dev)
        n = layout.segments.numel
        per_el = lambda x: torch.repeat_interleave(x, idx["row_len"], output_size=n)  # noqa: E731 (row -> elements)
        if kind == "adam":
            b1, b2 = hp["beta1"], hp["beta2"]
            m, v = b
            m.mul_(b1).add_(g, alpha=1 - b1)                                             # (2)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            s2 = per_el(torch.as_tensor(sqrt_bc2_k[rt], dtype=w.dtype, device=dev))
            num = b1 * m + (1 - b1) * g if hp["nesterov"] else m
            u = num / (v.sqrt() / s2 + eps)                                              # (3)
        else:
            mom, damp = hp["momentum"], hp["dampening"]
            (buf,) = b
            buf.mul_(mom).add_(g, alpha=1 - damp)                                        # (1)
            u = g + mom * buf if hp["nesterov"] else buf.clone()
        dots = [torch.segment_reduce(x * y, "sum", lengths=idx["row_len"], initial=0)     # (R,) each
                for x, y in ((g, w), (g, g), (w, w), (w, u))]
        c, ratio, channel, layer = _decide_torch(*dots, layout, delta, eps, wd_ratio)
        decay = 1 - lr * weight_decay * wd_scale * ratio                                 # (6)
        eta = torch.as_tensor(eta_k, dtype=w.dtype, device=dev)
        rows_t = idx["row_tensor"]
        q = u - per_el(c) * w                                                            # (5)
        if kind == "sgd" and hp["store"]:
            b[0].copy_(q)                     # the official SGDP keeps the projected buffer
        w.mul_(per_el(decay[rows_t])).sub_(per_el(eta[rows_t]) * q)                      # (6), (7)
        return {"channel": channel, "layer": layer}

    w, g = np.asarray(param), np.asarray(grad)
    b = [np.asarray(x) for x in bufs]
    T = w.dtype.type
    if backend == "numpy":
        if kind == "adam":
            b1, b2 = T(hp["beta1"]), T(hp["beta2"])
            m, v = b
            m *= b1
            m += (T(1) - b1) * g                                                        # (2)
            v *= b2
            v += (T(1) - b2) * g * g
            s2 = np.repeat(sqrt_bc2_k[rt], layout.row_len).astype(w.dtype)
            num = b1 * m + (T(1) - b1) * g if hp["nesterov"] else m
            u = num / (np.sqrt(v) / s2 + T(eps))                                         # (3)
        else:
            mom, damp = T(hp["momentum"]), T(1 - hp["dampening"])
            (buf,) = b
            buf *= mom
            buf += damp * g                                                              # (1)
            u = g + mom * buf if hp["nesterov"] else (buf if hp["store"] else buf.copy())
        dots = [segment_dot(x, y, layout.rows, backend="numpy") for x, y in ((g, w), (g, g), (w, w), (w, u))]
        c, ratio, channel, layer = _decide_numpy(*dots, layout, delta, eps, wd_ratio)
        segment_axpy(u, -c, w, layout.rows, backend="numpy")                             # (5)
        decay = 1 - lr * weight_decay * wd_scale * ratio                                 # (6)
        segment_axpy(w, decay - 1, w, layout.segments, backend="numpy")
        segment_axpy(w, -eta_k, u, layout.segments, backend="numpy")                     # (7)
        return {"channel": channel, "layer": layer}

    # numba
    u = np.empty_like(w)
    dots = np.empty((4, layout.n_rows))
    if kind == "adam":
        _kernel("adam", w.shape[0])(w, g, b[0], b[1], u, layout.row_offsets, sqrt_bc2_k[rt], hp["beta1"], hp["beta2"],
                         eps, bool(hp["nesterov"]), dots)
    else:
        _kernel("sgd", w.shape[0])(w, g, b[0], u, layout.row_offsets, hp["momentum"], hp["dampening"],
                        bool(hp["nesterov"]), dots)
    c, ratio, channel, layer = _decide_numpy(*dots, layout, delta, eps, wd_ratio)
    decay = 1 - lr * weight_decay * wd_scale * ratio
    if kind == "sgd" and hp["store"]:
        _kernel("apply_store", w.shape[0])(w, u, b[0], layout.row_offsets, decay[rt], eta_k[rt], c)
    else:
        _kernel("apply", w.shape[0])(w, u, layout.row_offsets, decay[rt], eta_k[rt], c)
    return {"channel": channel, "layer": layer}


def adamp_step(param: Any, grad: Any, exp_avg: Any, exp_avg_sq: Any, layout: ProjectionLayout, *,
               step: int | Sequence[int], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
               eps: float = 1e-8, weight_decay: float = 0.0, delta: float = 0.1, wd_ratio: float = 0.1,
               nesterov: bool = False, backend: str = "auto") -> dict:
    """One AdamP step (eqs. 2-7) on K tensors laid end to end, **in place** on param, exp_avg, exp_avg_sq.

    param, grad, exp_avg, exp_avg_sq: flat (n,) buffers of one floating dtype and type (NumPy arrays
    or tensors), in ``layout``'s order. ``step``: the step number t >= 1 *after* this step's
    increment, a scalar or one per tensor (K,). Returns ``{"channel": (K,) bool, "layer": (K,) bool}``,
    which view of each tensor passed the scale-invariance test (4) and was projected.
    """
    p = _check_buffers(layout, param=param, grad=grad, exp_avg=exp_avg, exp_avg_sq=exp_avg_sq)
    betas = check_betas(betas)
    _check_hparams(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay,
                   delta=delta, wd_ratio=wd_ratio)
    t = _per_tensor(step, layout, "step")
    if (t < 1).any():
        raise ValueError(f"step must be >= 1 (the count after this step's increment), got {t.min():g}")
    beta1, beta2 = float(betas[0]), float(betas[1])
    eta_k = lr / (1 - beta1 ** t)                                                       # (7)
    sqrt_bc2_k = np.sqrt(1 - beta2 ** t)
    return _projected_step("adam", p, grad, (exp_avg, exp_avg_sq), layout, lr=lr, eta_k=eta_k,
                           sqrt_bc2_k=sqrt_bc2_k, hp=dict(beta1=beta1, beta2=beta2, nesterov=bool(nesterov)),
                           delta=delta, eps=eps, weight_decay=weight_decay, wd_scale=1.0,
                           wd_ratio=wd_ratio, backend=backend)


def sgdp_step(param: Any, grad: Any, momentum_buffer: Any, layout: ProjectionLayout, *, lr: float,
              momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
              nesterov: bool = False, eps: float = 1e-8, delta: float = 0.1, wd_ratio: float = 0.1,
              project_buffer: bool = True, backend: str = "auto") -> dict:
    """One SGDP step (eqs. 1, 4-7) on K tensors laid end to end, **in place** on param and
    momentum_buffer (flat (n,) buffers of one floating dtype; the buffer starts at zero).
    Weight decay is scaled by 1/(1 - momentum) as in the official code. Returns which view of each
    tensor was projected, as :func:`adamp_step`.

    ``project_buffer=True`` (the official code, whose projection works in place on the momentum
    buffer when ``nesterov=False``): the buffer keeps the projected direction. ``False``: the
    paper's Algorithm 1, where the projection only touches the step and the buffer stays b of (1).
    """
    p = _check_buffers(layout, param=param, grad=grad, momentum_buffer=momentum_buffer)
    _check_hparams(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, eps=eps,
                   delta=delta, wd_ratio=wd_ratio)
    eta_k = np.full(len(layout), float(lr))
    return _projected_step("sgd", p, grad, (momentum_buffer,), layout, lr=lr, eta_k=eta_k, sqrt_bc2_k=None,
                           hp=dict(momentum=float(momentum), dampening=float(dampening),
                                   nesterov=bool(nesterov), store=bool(project_buffer) and not nesterov),
                           delta=delta, eps=eps, weight_decay=weight_decay, wd_scale=1 / (1 - momentum),
                           wd_ratio=wd_ratio, backend=backend)


# ----------------------------------------------------------------------------- optimizers
class _ProjectedOptimizer(torch.optim.Optimizer):
    """Groups the parameters that have gradients by (device, dtype), flattens them with their state,
    runs the functional step with the torch backend, and copies the results back."""

    _state_keys: tuple[str, ...] = ()

    def _init_state(self, p: torch.Tensor) -> dict:
        raise NotImplementedError

    def _functional(self, flat_p, flat_g, bufs, layout, group, steps) -> dict:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimization step over every parameter group. ``closure`` (optional) re-evaluates
        the model and returns the loss; it is called first, with gradients enabled."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple, list[torch.Tensor]] = {}
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise TypeError(f"{type(self).__name__} does not support sparse gradients")
                buckets.setdefault((p.device, p.dtype), []).append(p)
            for params in buckets.values():
                steps = []
                for p in params:
                    state = self.state[p]
                    if len(state) == 0:
                        state.update(self._init_state(p))
                    if "step" in state:
                        state["step"] += 1
                        steps.append(state["step"])
                shapes = tuple(tuple(p.shape) for p in params)
                cache = self.__dict__.setdefault("_layouts", {})
                layout = cache.get(shapes) or cache.setdefault(shapes, ProjectionLayout(shapes))
                flat_p = torch.cat([p.reshape(-1) for p in params])
                flat_g = torch.cat([p.grad.reshape(-1) for p in params])
                bufs = [torch.cat([self.state[p][k].reshape(-1) for p in params]) for k in self._state_keys]
                info = self._functional(flat_p, flat_g, bufs, layout, group, steps)
                self._last_projection = info
                torch._foreach_copy_(params, layout.segments.unflatten(flat_p))
                for k, buf in zip(self._state_keys, bufs):
                    torch._foreach_copy_([self.state[p][k] for p in params], layout.segments.unflatten(buf))
        return loss


class AdamP(_ProjectedOptimizer):
    """AdamP (eqs. 2-7): Adam whose update of every scale-invariant-looking weight has its radial
    component removed, with decoupled weight decay reduced by ``wd_ratio`` where it was.

    A drop-in ``torch.optim.Optimizer`` with the arguments and the per-parameter state
    (``step``, ``exp_avg``, ``exp_avg_sq``) of the official ``adamp.AdamP``.
    """

    _state_keys = ("exp_avg", "exp_avg_sq")

    def __init__(self, params: Iterable[Any], lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, delta: float = 0.1, wd_ratio: float = 0.1,
                 nesterov: bool = False):
        betas = check_betas(betas)
        _check_hparams(lr=lr, beta1=betas[0], beta2=betas[1], eps=eps, weight_decay=weight_decay,
                       delta=delta, wd_ratio=wd_ratio)
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, delta=delta,
                        wd_ratio=wd_ratio, nesterov=nesterov)
        super().__init__(params, defaults)

    def _init_state(self, p):
        return {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}

    def _functional(self, flat_p, flat_g, bufs, layout, group, steps):
        return adamp_step(flat_p, flat_g, bufs[0], bufs[1], layout, step=steps, lr=group["lr"],
                          betas=group["betas"], eps=group["eps"], weight_decay=group["weight_decay"],
                          delta=group["delta"], wd_ratio=group["wd_ratio"], nesterov=group["nesterov"],
                          backend="torch")


class SGDP(_ProjectedOptimizer):
    """SGDP (eqs. 1, 4-7): SGD with momentum whose update of every scale-invariant-looking weight
    has its radial component removed. A drop-in ``torch.optim.Optimizer`` with the arguments and
    the per-parameter state (``momentum``) of the official ``adamp.SGDP``."""

    _state_keys = ("momentum",)

    def __init__(self, params: Iterable[Any], lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, eps: float = 1e-8, delta: float = 0.1,
                 wd_ratio: float = 0.1, project_buffer: bool = True):
        _check_hparams(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay, eps=eps,
                       delta=delta, wd_ratio=wd_ratio)
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                        nesterov=nesterov, eps=eps, delta=delta, wd_ratio=wd_ratio, project_buffer=project_buffer)
        super().__init__(params, defaults)

    def _init_state(self, p):
        return {"momentum": torch.zeros_like(p)}

    def _functional(self, flat_p, flat_g, bufs, layout, group, steps):
        return sgdp_step(flat_p, flat_g, bufs[0], layout, lr=group["lr"], momentum=group["momentum"],
                         dampening=group["dampening"], weight_decay=group["weight_decay"],
                         nesterov=group["nesterov"], eps=group["eps"], delta=group["delta"],
                         wd_ratio=group["wd_ratio"], project_buffer=group.get("project_buffer", True),
                         backend="torch")
