"""ReZero: every backend of the residual update against a float64 reference, the hand-derived
backward against autograd and gradcheck, the from-scratch encoder layer against the official PyPI
package (``rezero.transformer.RZTXEncoderLayer``, weights copied by name, resweight set to 0.3 so
that both sublayers contribute), the fully connected nets against their defining equations, and
clear errors on bad input.

Tolerances:
- update y = x + alpha*F (one rounding per element): float32 rtol/atol 1e-6, float64 1e-14.
- dalpha = <g, F> is a sum of n products: its error grows like eps * sum|g*F|, so it is compared
  with atol = 1e-6 * sum|g*F| (float32) / 1e-13 * sum|g*F| (float64).
- encoder layer vs official: the two compute the same operations in the same order (measured
  error 0 on torch 2.13), but other torch versions may pick other kernels (e.g. fused attention),
  so float32 is compared at rtol/atol 1e-5 (outputs and grads are O(1)-O(10), softmax and
  matmuls over <= 32 terms carry ~1e-6 relative rounding) and float64 at 1e-12.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from refimpl._common import assert_close
from refimpl.norm.rezero import (FC_BLOCKS, DeepFCNet, ReZero, ReZeroFCNet, ReZeroFunction,
                                 ReZeroTransformerEncoderLayer, io_jacobian,
                                 multi_head_self_attention, rezero_update, rezero_update_backward)

rztx = pytest.importorskip("rezero.transformer")

BACKENDS = ["numpy", "numba", "torch"]
SHAPES = [(1,), (5, 7), (3, 4, 33), (4097,), (3, 50_000)]
TOL = {np.float32: dict(rtol=1e-6, atol=1e-6), np.float64: dict(rtol=1e-14, atol=1e-14)}
DOT_TOL = {np.float32: 1e-6, np.float64: 1e-13}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_update_matches_reference(rng, backend, dtype, shape):
    x, fx = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    alpha = 0.37
    y = rezero_update(x, fx, alpha, backend=backend)
    assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == x.shape
    assert_close(y, x.astype(np.float64) + alpha * fx.astype(np.float64), **TOL[dtype],
                 name=f"y[{backend}]")
    yt = rezero_update(torch.from_numpy(x), torch.from_numpy(fx), np.array([alpha]), backend=backend)
    assert isinstance(yt, torch.Tensor)
    assert_close(yt, y, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_reference(rng, backend, dtype, shape):
    g, fx = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    alpha = -0.8
    dx, dfx, dalpha = rezero_update_backward(g, fx, alpha, backend=backend)
    g64, f64 = g.astype(np.float64), fx.astype(np.float64)
    assert np.array_equal(dx, g)                                       # eq. (4), skip path
    assert dfx.dtype == dtype and dalpha.dtype == dtype and dalpha.shape == ()
    assert_close(dfx, alpha * g64, **TOL[dtype], name="dfx")           # eq. (6)
    scale = float(np.abs(g64 * f64).sum())
    assert_close(dalpha, (g64 * f64).sum(), rtol=0, atol=DOT_TOL[dtype] * scale, name="dalpha")  # (5)


@pytest.mark.parametrize("alpha_shape", [(), (1,)])
def test_function_matches_autograd(rng, alpha_shape):
    x, fx, g = (torch.from_numpy(rng.standard_normal((6, 9))) for _ in range(3))
    a = torch.full(alpha_shape, 0.6, dtype=torch.float64)
    ours = [t.clone().requires_grad_() for t in (x, fx, a)]
    ref = [t.clone().requires_grad_() for t in (x, fx, a)]
    ReZeroFunction.apply(*ours).backward(g)
    (ref[0] + ref[2] * ref[1]).backward(g)
    for o, r, name in zip(ours, ref, ("dx", "dfx", "dalpha")):
        assert o.grad.shape == r.grad.shape
        assert_close(o.grad, r.grad, rtol=1e-12, atol=1e-12, name=name)
    # the torch backend of the functional form carries the same gradients
    xs = x.clone().requires_grad_()
    rezero_update(xs, fx, a, backend="torch").backward(g)
    assert torch.equal(xs.grad, g)


def test_gradcheck_float64(rng):
    x, fx = (torch.tensor(rng.standard_normal((3, 4, 5)), requires_grad=True) for _ in range(2))
    for shape in ((), (1,)):
        a = torch.full(shape, -0.45, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(ReZeroFunction.apply, (x, fx, a), eps=1e-6, atol=1e-8)
    # through a real sublayer: dx = g + alpha J_F^T g (eq. 4)
    torch.manual_seed(0)
    block = ReZero(torch.nn.Sequential(torch.nn.Linear(5, 5), torch.nn.Tanh()), alpha_init=0.7).double()
    assert torch.autograd.gradcheck(block, (x,), eps=1e-6, atol=1e-8)


def _pair(d_model, nhead, ff, dtype, activation="relu", dropout=0.0, resweight=0.3):
    torch.manual_seed(1)
    off = rztx.RZTXEncoderLayer(d_model, nhead, dim_feedforward=ff, dropout=dropout,
                                activation=activation).to(dtype)
    with torch.no_grad():
        off.resweight.fill_(resweight)
        for name, p in off.named_parameters():
            if name.endswith("bias"):               # official biases start at 0: make them count
                p.normal_(0.0, 0.1)
    ours = ReZeroTransformerEncoderLayer(d_model, nhead, ff, dropout, activation).to(dtype)
    ours.load_state_dict(off.state_dict())          # parameter names are the official ones
    return off, ours


def _masks(t, b, kind):
    causal = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)
    pad = torch.zeros(b, t, dtype=torch.bool)
    pad[1, t - 2:] = True
    pad[2, 3:] = True
    if kind == "bool":
        return causal, pad
    if kind == "float":
        neg = lambda m: torch.zeros(m.shape).masked_fill(m, float("-inf"))  # noqa: E731
        return neg(causal), neg(pad)
    if kind == "padding":
        return None, pad
    return None, None


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("masks", ["bool", "float", "padding", "none"])
def test_encoder_matches_official(dtype, activation, masks):
    t, b, d, h, ff = 9, 3, 16, 4, 40
    off, ours = _pair(d, h, ff, dtype, activation)
    off.eval(), ours.eval()
    torch.manual_seed(2)
    x = torch.randn(t, b, d, dtype=dtype)
    src_mask, pad = _masks(t, b, masks)
    if src_mask is not None:
        src_mask = src_mask.to(dtype) if src_mask.is_floating_point() else src_mask
        pad = pad.to(dtype) if pad.is_floating_point() else pad
    g = torch.randn(t, b, d, dtype=dtype)
    xo, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, ys = off(xo, src_mask, pad), ours(xs, src_mask, pad)
    yo.backward(g)
    ys.backward(g)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-12)
    assert (yo - x).abs().max() > 0.1                 # the layer is far from the identity
    assert_close(ys, yo, **tol, name="y")
    assert_close(xs.grad, xo.grad, **tol, name="dsrc")
    po = dict(off.named_parameters())
    names = [n for n, _ in ours.named_parameters()]
    assert sorted(names) == sorted(po)
    for name, p in ours.named_parameters():
        scale = max(1.0, float(po[name].grad.abs().max()))   # dresweight sums over T*B*D terms
        assert_close(p.grad, po[name].grad, rtol=tol["rtol"], atol=tol["atol"] * scale, name=name)


def test_encoder_is_identity_at_init_like_official():
    torch.manual_seed(0)
    off = rztx.RZTXEncoderLayer(8, 2, dim_feedforward=16, dropout=0.1)
    ours = ReZeroTransformerEncoderLayer(8, 2, 16, 0.1)
    x = torch.randn(5, 2, 8)
    assert ours.resweight.shape == off.resweight.shape == (1,) and float(ours.resweight.detach()) == 0.0
    assert torch.equal(off(x), x) and torch.equal(ours(x), x)      # train mode, dropout on


def test_encoder_dropout_matches_official_in_train_mode():
    """Same seed, same random-number consumption order: dropout masks coincide, and
    alpha * dropout(F) equals dropout(alpha * F) up to rounding (dropout is linear)."""
    off, ours = _pair(16, 4, 32, torch.float64, dropout=0.25)
    x = torch.randn(6, 2, 16, dtype=torch.float64)
    torch.manual_seed(5)
    yo = off(x)
    torch.manual_seed(5)
    ys = ours(x)
    assert_close(ys, yo, rtol=1e-12, atol=1e-12, name="y (train, dropout 0.25)")
    torch.manual_seed(6)
    assert not torch.allclose(ours(x), yo)           # another seed, other masks


def test_attention_matches_torch_mha(rng):
    mha = torch.nn.MultiheadAttention(12, 3, bias=False).double().eval()
    x = torch.from_numpy(rng.standard_normal((5, 2, 12)))
    ref = mha(x, x, x, need_weights=False)[0]
    got = multi_head_self_attention(x, mha.in_proj_weight, None, mha.out_proj.weight, None, 3)
    assert_close(got, ref, rtol=1e-12, atol=1e-12)


def test_rezero_block_identity_and_gradient():
    torch.manual_seed(0)
    blk = ReZero(torch.nn.Linear(4, 4))
    x = torch.randn(3, 4)
    y = blk(x)
    assert torch.equal(y, x) and blk.alpha.shape == ()
    y.square().sum().backward()
    # at alpha = 0: dL/dalpha = <g, F(x)> (eq. 5), and F's weights get no gradient (eq. 6)
    expected = (2 * x * blk.sublayer(x)).sum()
    assert_close(blk.alpha.grad, expected.detach(), rtol=1e-6, atol=1e-6)
    assert torch.count_nonzero(blk.sublayer.weight.grad) == 0


def test_toy_chain_closed_form():
    """Eq. (3): L ReZero layers with F(x) = w x give (1 + alpha w)^L x."""
    w, alpha, depth = 1.3, 0.05, 40
    x = torch.tensor([[0.7]], dtype=torch.float64)
    lin = torch.nn.Linear(1, 1, bias=False).double()
    with torch.no_grad():
        lin.weight.fill_(w)
    blocks = [ReZero(lin, alpha_init=alpha).double() for _ in range(depth)]
    y = x
    with torch.no_grad():
        for blk in blocks:
            y = blk(y)
    a = float(blocks[0].alpha.detach())                      # 0.05 rounded to the parameter's float32
    assert_close(y, x * (1 + a * w) ** depth, rtol=1e-13, atol=0)


@pytest.mark.parametrize("block", FC_BLOCKS)
def test_fc_blocks_follow_table_1(block):
    from refimpl.norm.layer_norm import layer_norm

    torch.manual_seed(0)
    net = DeepFCNet(6, 8, 3, 4, block=block).double()
    x = torch.randn(5, 6, dtype=torch.float64)
    h = net.inp(x)
    for layer in net.layers:
        if block == "rezero":
            with torch.no_grad():
                layer.alpha.fill_(0.25)
        lin = lambda v: F.relu(layer.linear(v))  # noqa: E731
        ln = lambda v: layer_norm(v, 8, layer.norm.weight, layer.norm.bias) if layer.norm else v  # noqa: E731
        expected = {"plain": lambda v: lin(v), "residual": lambda v: v + lin(v),
                    "residual_postnorm": lambda v: ln(v + lin(v)),
                    "residual_prenorm": lambda v: v + lin(ln(v)),
                    "rezero": lambda v: v + 0.25 * lin(v)}[block](h)
        h_next = layer(h)
        assert_close(h_next, expected, rtol=1e-12, atol=1e-12, name=block)
        h = h_next
    assert_close(net(x), net.out(h), rtol=1e-12, atol=1e-12)


def test_rezero_fc_net_dynamical_isometry():
    """Eq. (2) at initialisation: J_io = I, all singular values 1, whatever the depth."""
    torch.manual_seed(0)
    net = ReZeroFCNet(64, 32, 128, 10).double()
    h = torch.randn(32, dtype=torch.float64)
    assert torch.equal(io_jacobian(net, h), torch.eye(32, dtype=torch.float64))
    assert torch.equal(net.hidden(h[None])[0], h)
    plain = DeepFCNet(64, 32, 128, 10, block="plain").double()
    s = torch.linalg.svdvals(io_jacobian(plain, h))
    assert s.max() / s.min() > 1e3                    # far from isometry


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise(backend):
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="fx must have x's shape"):
        rezero_update(x, np.ones((3, 2), np.float32), 0.1, backend=backend)
    with pytest.raises(TypeError, match="fx must have x's dtype"):
        rezero_update(x, np.ones((2, 3), np.float64), 0.1, backend=backend)
    with pytest.raises(TypeError, match="x must have a floating-point dtype"):
        rezero_update(np.ones((2, 3), np.int64), np.ones((2, 3), np.int64), 0.1, backend=backend)
    with pytest.raises(TypeError, match="numpy.ndarray or torch.Tensor"):
        rezero_update([[1.0]], np.ones((1, 1)), 0.1, backend=backend)
    with pytest.raises(ValueError, match="alpha must be finite"):
        rezero_update(x, x, float("nan"), backend=backend)
    with pytest.raises(ValueError, match="alpha must have exactly one element"):
        rezero_update(x, x, np.array([0.1, 0.2]), backend=backend)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        rezero_update(x, x, "0.1", backend=backend)
    with pytest.raises(TypeError, match="alpha must be a real number"):
        rezero_update(x, x, True, backend=backend)
    with pytest.raises(ValueError, match="fx must have grad_out's shape"):
        rezero_update_backward(x, np.ones((3,), np.float32), 0.1, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        rezero_update(x, x, 0.1, backend="cuda")


def test_bad_module_arguments_raise():
    with pytest.raises(ValueError, match="divisible by nhead"):
        ReZeroTransformerEncoderLayer(10, 3)
    with pytest.raises(ValueError, match="dropout must be a probability"):
        ReZeroTransformerEncoderLayer(8, 2, dropout=1.0)
    with pytest.raises(ValueError, match="activation must be one of"):
        ReZeroTransformerEncoderLayer(8, 2, activation="swish")
    with pytest.raises(TypeError, match="nhead must be an int"):
        ReZeroTransformerEncoderLayer(8, 2.0)
    with pytest.raises(ValueError, match="block must be one of"):
        DeepFCNet(4, 8, 2, 3, block="densenet")
    with pytest.raises(ValueError, match="depth must be >= 0"):
        DeepFCNet(4, 8, -1, 3)
    with pytest.raises(ValueError, match="gain must be"):
        DeepFCNet(4, 8, 2, 3, gain=0.0)
    with pytest.raises(TypeError, match="sublayer must be a torch.nn.Module"):
        ReZero(lambda v: v)
    with pytest.raises(ValueError, match="keep x's shape"):
        ReZero(torch.nn.Linear(4, 3))(torch.ones(2, 4))
    layer = ReZeroTransformerEncoderLayer(8, 2, 16, 0.0)
    x = torch.ones(5, 2, 8)
    with pytest.raises(ValueError, match="src must have shape"):
        layer(torch.ones(5, 8))
    with pytest.raises(ValueError, match="src_mask must have shape"):
        layer(x, torch.zeros(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="src_key_padding_mask must have shape"):
        layer(x, None, torch.zeros(5, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="src_mask must be bool"):
        layer(x, torch.zeros(5, 5, dtype=torch.int64))
    with pytest.raises(TypeError, match="src must have a floating-point dtype"):
        layer(torch.ones(5, 2, 8, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"h must have shape \(8,\)"):
        io_jacobian(DeepFCNet(4, 8, 2, 3), torch.ones(4))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_cuda_encoder_matches_official(dtype):
    off, ours = _pair(64, 8, 128, dtype)
    off, ours = off.cuda().eval(), ours.cuda().eval()
    x = torch.randn(32, 4, 64, device="cuda", dtype=dtype)
    causal, pad = (m.cuda() for m in _masks(32, 4, "bool"))
    xo, xs = x.clone().requires_grad_(), x.clone().requires_grad_()
    yo, ys = off(xo, causal, pad), ours(xs, causal, pad)
    g = torch.randn_like(yo)
    yo.backward(g)
    ys.backward(g)
    # on the GPU torch may use TF32 / fused kernels for the official MHA: looser float32 tolerance
    tol = dict(rtol=1e-3, atol=1e-3) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-10)
    assert_close(ys, yo, **tol, name="y")
    assert_close(xs.grad, xo.grad, **tol, name="dsrc")
    y = rezero_update(x, x, torch.tensor(0.5, device="cuda", dtype=dtype))
    assert y.is_cuda and torch.allclose(y, 1.5 * x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numba_kernels_at_awkward_sizes(rng, dtype):
    """The multi-threaded numba kernels on sizes that do not split evenly between threads."""
    for n in (1, 3, 5000, 20_011, 1_000_003):
        x, fx, g = (rng.standard_normal(n).astype(dtype) for _ in range(3))
        assert_close(rezero_update(x, fx, 1.5, backend="numba"),
                     x.astype(np.float64) + 1.5 * fx, **TOL[dtype], name="y parallel")
        _, dfx, dalpha = rezero_update_backward(g, fx, 1.5, backend="numba")
        ref = g.astype(np.float64) * fx
        assert_close(dfx, 1.5 * g.astype(np.float64), **TOL[dtype], name="dfx parallel")
        assert_close(dalpha, ref.sum(), rtol=0, atol=DOT_TOL[dtype] * np.abs(ref).sum(), name="dalpha")
