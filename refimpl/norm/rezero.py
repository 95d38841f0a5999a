"""ReZero (Bachlechner, Majumder, Mao, Cottrell & McAuley, UAI 2021, arXiv:2003.04887).

Every residual connection is gated by one learned scalar that starts at zero:

    (1) x_{i+1} = x_i + alpha_i * F_i(x_i),          alpha_i = 0 at initialisation

so at initialisation every layer is the identity map and the input-output Jacobian of L layers,

    (2) J_io = d x_L / d x_0 = prod_{i=L-1..0} (I + alpha_i * J_{F_i}(x_i)),

equals I: all its singular values are exactly 1 (dynamical isometry). For one unit and linear
layers F_i(x) = w x the whole network is

    (3) x_L = (1 + alpha w)^L x_0,

well-conditioned for every depth L while alpha w is O(1/L). The backward pass of one update (1),
with g = dL/dx_{i+1}, is

    (4) dL/dx_i    = g + alpha * J_F(x_i)^T g       (the skip path carries g unchanged)
    (5) dL/dalpha  = <g, F(x_i)>                    (a sum over every element of the batch)
    (6) dL/dF(x_i) = alpha * g                      (then F's own backward gives the J_F^T part)

The ReZero Transformer encoder layer of the official package (``rezero.transformer.
RZTXEncoderLayer``) uses ONE scalar ``resweight`` for both of its sublayers and no LayerNorm;
input is sequence-first (T, B, D):

    (7) h = x + alpha * Dropout(MHA(x, x, x; masks)),
        y = h + alpha * Dropout(W_2 sigma(W_1 h + b_1) + b_2)
    (8) MHA(x) = concat_heads(softmax(Q_h K_h^T / sqrt(D/H) + M) V_h) W_o^T + b_o,
        [Q, K, V] = x W_in^T + b_in  with the packed W_in of shape (3D, D)

where M is -inf at masked (query, key) pairs (a causal ``src_mask`` and/or a key padding mask).

Equation numbers are those of the chapter (notebooks/norm/rezero.ipynb). The critical loop is the
update (1) and its backward (5)-(6): elementwise, memory-bound, with one reduction for dL/dalpha.
Three interchangeable backends compute it: ``"numpy"`` (readable reference), ``"numba"`` (one
vectorised, multi-threaded pass forward; one fused pass backward that writes dL/dF while it
accumulates <g, F> in float64), ``"torch"``
(vectorised, device-agnostic, differentiable through :class:`ReZeroFunction`).
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from numba import njit, prange

from refimpl._common.backend import like_input, resolve_backend, to_numpy, to_torch
from refimpl._common.validate import check_floating, check_int
from refimpl._common.kernels import FASTMATH as _FASTMATH

__all__ = [
    "rezero_update", "rezero_update_backward", "ReZeroFunction", "ReZero",
    "DeepFCNet", "ReZeroFCNet", "FC_BLOCKS", "io_jacobian", "multi_head_self_attention",
    "ReZeroMultiheadSelfAttention", "ReZeroTransformerEncoderLayer",
]



# ----------------------------------------------------------------------------- validation
def _check_alpha(alpha: Any) -> float:
    """alpha as a Python float: a real number, or an array/tensor with exactly one element."""
    if isinstance(alpha, bool):
        raise TypeError("alpha must be a real number or a one-element array/tensor, got bool")
    if isinstance(alpha, (torch.Tensor, np.ndarray)):
        count = alpha.numel() if isinstance(alpha, torch.Tensor) else alpha.size
        if count != 1:
            raise ValueError(f"alpha must have exactly one element, got shape {tuple(alpha.shape)}")
        value = float(to_numpy(alpha).reshape(()))
    elif isinstance(alpha, numbers.Real):
        value = float(alpha)
    else:
        raise TypeError(f"alpha must be a real number or a one-element array/tensor, got "
                        f"{type(alpha).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"alpha must be finite, got {value!r}")
    return value


def _check_pair(a: Any, b: Any, name_a: str, name_b: str) -> None:
    check_floating(a, name_a)
    check_floating(b, name_b)
    if tuple(a.shape) != tuple(b.shape):
        raise ValueError(f"{name_b} must have {name_a}'s shape {tuple(a.shape)}, got {tuple(b.shape)}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_b} must have {name_a}'s dtype {a.dtype}, got {b.dtype}")


# ----------------------------------------------------------------------------- numpy reference
def _update_numpy(x: np.ndarray, fx: np.ndarray, alpha: float) -> np.ndarray:
    return x + x.dtype.type(alpha) * fx                                   # (1)


def _backward_numpy(g: np.ndarray, fx: np.ndarray, alpha: float):
    dfx = g.dtype.type(alpha) * g                                         # (6)
    dalpha = np.dot(g.ravel(), fx.ravel())                                # (5)
    return dfx, dalpha


# ----------------------------------------------------------------------------- numba kernels
@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _update_numba(x, fx, alpha, y):
    """Eq. (1) in one pass over memory; prange splits the flat loop between the threads and each
    thread's share is vectorised."""
    a = x.dtype.type(alpha)
    for i in prange(x.shape[0]):
        y[i] = x[i] + a * fx[i]                                           # (1)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _backward_numba(g, fx, alpha, dfx):
    """Eqs. (6) and (5) fused in one pass: dF = alpha*g is written while <g, F> is accumulated
    (a prange reduction: one float64 partial sum per thread, added at the end)."""
    a = g.dtype.type(alpha)
    acc = 0.0
    for i in prange(g.shape[0]):
        dfx[i] = a * g[i]                                                 # (6)
        acc += g[i] * fx[i]                                               # (5)
    return acc


def _update_numba_host(x: np.ndarray, fx: np.ndarray, alpha: float) -> np.ndarray:
    y = np.empty_like(x)
    _update_numba(x.reshape(-1), fx.reshape(-1), alpha, y.reshape(-1))
    return y


def _backward_numba_host(g: np.ndarray, fx: np.ndarray, alpha: float):
    dfx = np.empty_like(g)
    dalpha = _backward_numba(g.reshape(-1), fx.reshape(-1), alpha, dfx.reshape(-1))
    return dfx, g.dtype.type(dalpha)


# ----------------------------------------------------------------------------- torch path
class ReZeroFunction(torch.autograd.Function):
    """The update (1) with the hand-derived backward (4)-(6).

    ``apply(x, fx, alpha)``: x and fx of the same shape and dtype; alpha a tensor with one element
    (shape () or (1,), like the official ``resweight``). Returns x + alpha * fx. The backward
    returns g for x (the skip path of eq. 4), alpha * g for fx (eq. 6; F's own backward then adds
    J_F^T(alpha g) to dL/dx) and <g, fx> for alpha (eq. 5), shaped like alpha.
    """

    @staticmethod
    def forward(ctx, x, fx, alpha):
        ctx.save_for_backward(fx, alpha)
        return x + alpha.reshape(()) * fx

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        fx, alpha = ctx.saved_tensors
        dfx = alpha.reshape(()) * g if ctx.needs_input_grad[1] else None
        dalpha = (g * fx).sum().reshape(alpha.shape) if ctx.needs_input_grad[2] else None
        return (g if ctx.needs_input_grad[0] else None), dfx, dalpha


# ----------------------------------------------------------------------------- public API
def rezero_update(x: Any, fx: Any, alpha: Any, backend: str = "auto") -> Any:
    """The ReZero residual update y = x + alpha * F(x) (eq. 1).

    Args:
        x: array or tensor of any shape, floating dtype (the layer's input).
        fx: F(x), the sublayer's output, x's shape and dtype.
        alpha: the gate: a real number or a one-element array/tensor (finite). With the torch
            backend and a tensor alpha, gradients flow to x, fx and alpha (via
            :class:`ReZeroFunction`).
        backend: "numpy" | "numba" | "torch" | "auto" (torch for tensors, numba for arrays).
    Returns:
        y with x's shape and dtype, of x's type (array, or tensor on x's device).
    """
    _check_pair(x, fx, "x", "fx")
    value = _check_alpha(alpha)
    backend = resolve_backend(backend, x)
    if backend == "torch":
        xt = to_torch(x)
        ft = to_torch(fx, like=xt)
        at = (alpha.to(device=xt.device, dtype=xt.dtype) if isinstance(alpha, torch.Tensor)
              else torch.tensor(value, dtype=xt.dtype, device=xt.device))
        y = ReZeroFunction.apply(xt, ft, at)
        return y if isinstance(x, torch.Tensor) else y.detach().numpy()
    xn = np.ascontiguousarray(to_numpy(x))
    fn = np.ascontiguousarray(to_numpy(fx))
    y = _update_numpy(xn, fn, value) if backend == "numpy" else _update_numba_host(xn, fn, value)
    return like_input(y, x)


def rezero_update_backward(grad_out: Any, fx: Any, alpha: Any,
                           backend: str = "auto") -> tuple[Any, Any, Any]:
    """Gradients of the update (1) by the hand-derived eqs. (4)-(6).

    Args:
        grad_out: g = dL/dy, floating, any shape. fx: F(x), g's shape and dtype. alpha: as in
            :func:`rezero_update`. backend: as in :func:`rezero_update`.
    Returns:
        ``(dx_skip, dfx, dalpha)``: dx_skip = g (the skip path's part of eq. 4; the sublayer part
        J_F^T dfx comes from F's own backward), dfx = alpha * g (eq. 6) like g, and
        dalpha = <g, F(x)> (eq. 5) as a 0-d array/tensor of g's dtype.
    """
    _check_pair(grad_out, fx, "grad_out", "fx")
    value = _check_alpha(alpha)
    backend = resolve_backend(backend, grad_out)
    if backend == "torch":
        gt = to_torch(grad_out)
        ft = to_torch(fx, like=gt)
        with torch.no_grad():
            dfx = value * gt
            dalpha = torch.dot(gt.reshape(-1), ft.reshape(-1))
        return like_input(gt, grad_out), like_input(dfx, grad_out), like_input(dalpha, grad_out)
    gn = np.ascontiguousarray(to_numpy(grad_out))
    fn = np.ascontiguousarray(to_numpy(fx))
    if backend == "numpy":
        dfx, dalpha = _backward_numpy(gn, fn, value)
    else:
        dfx, dalpha = _backward_numba_host(gn, fn, value)
    return grad_out, like_input(dfx, grad_out), like_input(np.asarray(dalpha, dtype=gn.dtype), grad_out)


def _check_dropout(p: Any) -> float:
    if isinstance(p, bool) or not isinstance(p, numbers.Real) or not 0.0 <= float(p) < 1.0:
        raise ValueError(f"dropout must be a probability in [0, 1), got {p!r}")
    return float(p)


_ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "relu": F.relu, "gelu": F.gelu, "tanh": torch.tanh}


def _activation(name: Any, allowed: tuple[str, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    if name not in allowed:
        raise ValueError(f"activation must be one of {allowed}, got {name!r}")
    return _ACTIVATIONS[name]


class ReZero(torch.nn.Module):
    """A ReZero residual block around any sublayer F: y = x + alpha * F(x) (eq. 1).

    ``sublayer`` maps (..., D) -> (..., D) (the same shape as its input). ``alpha`` is a scalar
    parameter (shape ()) initialised to ``alpha_init`` (0 in the paper). Extra positional/keyword
    arguments of ``forward`` are passed to the sublayer.
    """

    def __init__(self, sublayer: torch.nn.Module, alpha_init: float = 0.0):
        super().__init__()
        if not isinstance(sublayer, torch.nn.Module):
            raise TypeError(f"sublayer must be a torch.nn.Module, got {type(sublayer).__name__}")
        self.sublayer = sublayer
        self.alpha = torch.nn.Parameter(torch.tensor(_check_alpha(alpha_init)))

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        fx = self.sublayer(x, *args, **kwargs)
        if fx.shape != x.shape:
            raise ValueError(f"the sublayer must keep x's shape {tuple(x.shape)}, got {tuple(fx.shape)}")
        return ReZeroFunction.apply(x, fx, self.alpha.to(x.dtype))


# ----------------------------------------------------------------------------- fully connected nets
FC_BLOCKS = ("plain", "residual", "residual_postnorm", "residual_prenorm", "rezero")


class _FCBlock(torch.nn.Module):
    """One hidden layer of :class:`DeepFCNet`; F(x) = sigma(W x + b). ``block`` chooses the
    paper's Table 1 row: plain x' = F(x); residual x' = x + F(x); residual_postnorm
    x' = LN(x + F(x)); residual_prenorm x' = x + F(LN(x)); rezero x' = x + alpha F(x) (eq. 1)."""

    def __init__(self, width: int, block: str, act: Callable, gain: float):
        super().__init__()
        from refimpl.norm.layer_norm import LayerNorm

        self.block = block
        self.act = act
        self.linear = torch.nn.Linear(width, width)
        with torch.no_grad():
            self.linear.weight.normal_(0.0, gain / math.sqrt(width))
            self.linear.bias.zero_()
        self.norm = LayerNorm(width) if block in ("residual_postnorm", "residual_prenorm") else None
        self.alpha = torch.nn.Parameter(torch.zeros(())) if block == "rezero" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.block == "plain":
            return self.act(self.linear(x))
        if self.block == "residual":
            return x + self.act(self.linear(x))
        if self.block == "residual_postnorm":
            return self.norm(x + self.act(self.linear(x)))
        if self.block == "residual_prenorm":
            return x + self.act(self.linear(self.norm(x)))
        return ReZeroFunction.apply(x, self.act(self.linear(x)), self.alpha.to(x.dtype))


class DeepFCNet(torch.nn.Module):
    """A deep fully connected network: Linear(in, width) -> ``depth`` hidden blocks of width
    ``width`` -> Linear(width, out). ``block`` in :data:`FC_BLOCKS` (the rows of the paper's
    Table 1). Hidden weights are drawn from N(0, gain^2/width) (He initialisation for ReLU with
    the default gain sqrt(2)), biases 0; ReZero gates start at 0.

    Input (N, in_features) -> logits (N, out_features). :meth:`hidden` exposes the map from the
    first hidden state to the last, whose Jacobian is eq. (2).
    """

    def __init__(self, in_features: int, width: int, depth: int, out_features: int,
                 block: str = "rezero", activation: str = "relu", gain: float = math.sqrt(2.0)):
        super().__init__()
        in_features = check_int(in_features, "in_features", 1)
        width = check_int(width, "width", 1)
        depth = check_int(depth, "depth", minimum=0)
        out_features = check_int(out_features, "out_features", 1)
        if block not in FC_BLOCKS:
            raise ValueError(f"block must be one of {FC_BLOCKS}, got {block!r}")
        if isinstance(gain, bool) or not isinstance(gain, numbers.Real) or not gain > 0:
            raise ValueError(f"gain must be a real number > 0, got {gain!r}")
        act = _activation(activation, ("relu", "tanh", "gelu"))
        self.block = block
        self.inp = torch.nn.Linear(in_features, width)
        self.layers = torch.nn.ModuleList(_FCBlock(width, block, act, float(gain)) for _ in range(depth))
        self.out = torch.nn.Linear(width, out_features)

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        """The stack of hidden blocks alone: (N, width) -> (N, width)."""
        for layer in self.layers:
            h = layer(h)
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.hidden(self.inp(x)))


class ReZeroFCNet(DeepFCNet):
    """:class:`DeepFCNet` with ReZero blocks x' = x + alpha_i sigma(W_i x + b_i) (eq. 1)."""

    def __init__(self, in_features: int, width: int, depth: int, out_features: int,
                 activation: str = "relu", gain: float = math.sqrt(2.0)):
        super().__init__(in_features, width, depth, out_features, "rezero", activation, gain)


def io_jacobian(net: DeepFCNet, h: torch.Tensor) -> torch.Tensor:
    """The input-output Jacobian of eq. (2): d hidden(h) / d h at one hidden state h of shape
    (width,), as a (width, width) tensor. Its singular values measure dynamical isometry."""
    if not isinstance(net, DeepFCNet):
        raise TypeError(f"net must be a DeepFCNet, got {type(net).__name__}")
    check_floating(h, "h")
    if h.ndim != 1 or h.shape[0] != net.inp.out_features:
        raise ValueError(f"h must have shape ({net.inp.out_features},), got {tuple(h.shape)}")
    return torch.autograd.functional.jacobian(lambda v: net.hidden(v[None])[0], h)


# ----------------------------------------------------------------------------- transformer layer
def _additive_mask(mask: torch.Tensor, name: str, dtype: torch.dtype) -> torch.Tensor:
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    if not mask.is_floating_point():
        raise TypeError(f"{name} must be bool (True = masked) or floating (added to the scores), "
                        f"got {mask.dtype}")
    return mask.to(dtype)


def multi_head_self_attention(x: torch.Tensor, in_proj_weight: torch.Tensor,
                              in_proj_bias: torch.Tensor | None, out_weight: torch.Tensor,
                              out_bias: torch.Tensor | None, nhead: int,
                              attn_mask: torch.Tensor | None = None,
                              key_padding_mask: torch.Tensor | None = None,
                              dropout: float = 0.0, training: bool = False) -> torch.Tensor:
    """Multi-head self-attention, eq. (8), sequence-first like ``nn.MultiheadAttention``.

    Args:
        x: (T, B, D) floating. in_proj_weight: (3D, D) packed [W_q; W_k; W_v]; in_proj_bias (3D,)
            or None. out_weight (D, D), out_bias (D,) or None. nhead: H, dividing D.
        attn_mask: (T, T) or (B*H, T, T); bool (True = not allowed) or float (added to scores).
        key_padding_mask: (B, T); bool (True = padding key) or float (added).
        dropout: on the attention probabilities when ``training``.
    Returns:
        (T, B, D). A query whose keys are all masked gives NaN, as in torch.
    """
    check_floating(x, "x")
    if x.ndim != 3:
        raise ValueError(f"x must have shape (T, B, D) (sequence first), got {tuple(x.shape)}")
    t, b, d = x.shape
    if d % nhead:
        raise ValueError(f"d_model {d} must be divisible by nhead {nhead}")
    hd = d // nhead
    q, k, v = F.linear(x, in_proj_weight, in_proj_bias).chunk(3, dim=-1)
    q, k, v = (u.reshape(t, b * nhead, hd).transpose(0, 1) for u in (q, k, v))   # (B*H, T, hd)
    scores = torch.bmm(q * (1.0 / math.sqrt(hd)), k.transpose(1, 2))           # (B*H, T, T)
    if attn_mask is not None:
        if tuple(attn_mask.shape) not in ((t, t), (b * nhead, t, t)):
            raise ValueError(f"src_mask must have shape ({t}, {t}) or ({b * nhead}, {t}, {t}), got "
                             f"{tuple(attn_mask.shape)}")
        scores = scores + _additive_mask(attn_mask, "src_mask", x.dtype)
    if key_padding_mask is not None:
        if tuple(key_padding_mask.shape) != (b, t):
            raise ValueError(f"src_key_padding_mask must have shape (B, T) = ({b}, {t}), got "
                             f"{tuple(key_padding_mask.shape)}")
        kpm = _additive_mask(key_padding_mask, "src_key_padding_mask", x.dtype)
        scores = (scores.view(b, nhead, t, t) + kpm[:, None, None, :]).view(b * nhead, t, t)
    p = torch.softmax(scores, dim=-1)
    if dropout > 0.0 and training:
        p = F.dropout(p, dropout, training=True)
    out = torch.bmm(p, v).transpose(0, 1).reshape(t, b, d)
    return F.linear(out, out_weight, out_bias)


class ReZeroMultiheadSelfAttention(torch.nn.Module):
    """Self-attention with ``nn.MultiheadAttention``'s parameter names and initialisation
    (``in_proj_weight`` (3D, D) Xavier-uniform, ``in_proj_bias`` 0, ``out_proj`` Linear with
    bias 0), so that an official state dict loads as it is. forward(x, attn_mask,
    key_padding_mask) -> (T, B, D), eq. (8)."""

    def __init__(self, d_model: int, nhead: int, dropout: float = 0.0):
        super().__init__()
        self.nhead = nhead
        self.dropout = dropout
        self.in_proj_weight = torch.nn.Parameter(torch.empty(3 * d_model, d_model))
        self.in_proj_bias = torch.nn.Parameter(torch.zeros(3 * d_model))
        self.out_proj = torch.nn.Linear(d_model, d_model)
        torch.nn.init.xavier_uniform_(self.in_proj_weight)
        torch.nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        return multi_head_self_attention(x, self.in_proj_weight, self.in_proj_bias,
                                         self.out_proj.weight, self.out_proj.bias, self.nhead,
                                         attn_mask, key_padding_mask, self.dropout, self.training)


class ReZeroTransformerEncoderLayer(torch.nn.Module):
    """The ReZero Transformer encoder layer, eqs. (7)-(8), written from scratch with the official
    ``RZTXEncoderLayer``'s interface and parameter names (``resweight`` of shape (1,), init 0;
    ``self_attn.{in_proj_weight, in_proj_bias, out_proj.weight, out_proj.bias}``;
    ``linear1.*``, ``linear2.*``), so ``load_state_dict(official.state_dict())`` works.

    forward(src (T, B, D), src_mask (T, T) or None, src_key_padding_mask (B, T) or None)
    -> (T, B, D). One gate is shared by the attention and feed-forward sublayers; no LayerNorm.
    Dropout is applied to F before the gate; as dropout is linear this equals the official
    alpha-then-dropout order for the same mask. Both residual updates go through
    :class:`ReZeroFunction`.
    """

    def __init__(self, d_model: int, nhead: int, dim_feedforward: int = 2048, dropout: float = 0.1,
                 activation: str = "relu"):
        super().__init__()
        d_model = check_int(d_model, "d_model", 1)
        nhead = check_int(nhead, "nhead", 1)
        dim_feedforward = check_int(dim_feedforward, "dim_feedforward", 1)
        if d_model % nhead:
            raise ValueError(f"d_model {d_model} must be divisible by nhead {nhead}")
        self.dropout_p = _check_dropout(dropout)
        self.activation_name = activation
        self.activation = _activation(activation, ("relu", "gelu"))
        self.self_attn = ReZeroMultiheadSelfAttention(d_model, nhead, self.dropout_p)
        self.linear1 = torch.nn.Linear(d_model, dim_feedforward)
        self.linear2 = torch.nn.Linear(dim_feedforward, d_model)
        self.resweight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, src: torch.Tensor, src_mask: torch.Tensor | None = None,
                src_key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        check_floating(src, "src")
        if src.ndim != 3 or src.shape[-1] != self.linear1.in_features:
            raise ValueError(f"src must have shape (T, B, d_model={self.linear1.in_features}) "
                             f"(sequence first), got {tuple(src.shape)}")
        p, train = self.dropout_p, self.training
        alpha = self.resweight.to(src.dtype)
        attn = self.self_attn(src, src_mask, src_key_padding_mask)
        h = ReZeroFunction.apply(src, F.dropout(attn, p, train), alpha)                   # (7), first
        ff = self.linear2(F.dropout(self.activation(self.linear1(h)), p, train))
        return ReZeroFunction.apply(h, F.dropout(ff, p, train), alpha)                    # (7), second

    def extra_repr(self) -> str:
        return (f"d_model={self.linear1.in_features}, nhead={self.self_attn.nhead}, "
                f"dim_feedforward={self.linear1.out_features}, dropout={self.dropout_p}, "
                f"activation={self.activation_name!r}")
