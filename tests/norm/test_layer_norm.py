"""Layer norm: every backend against torch.nn.functional.layer_norm (the canonical implementation),
the hand-derived backward against autograd and gradcheck, and clear errors on bad input.

Tolerances: float32 results are compared at rtol 1e-5 / atol 1e-5 (normalized outputs are O(1), and
a 1000-element float32 reduction carries ~1e-6 relative rounding); float64 at 1e-10.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from refimpl._common import assert_close
from refimpl.norm.layer_norm import LayerNorm, LayerNormFunction, layer_norm, layer_norm_backward, row_stats

BACKENDS = ["numpy", "numba", "torch"]
CASES = [((4, 8), (8,)), ((3, 5, 16), (16,)), ((2, 3, 4, 32), (4, 32)), ((7, 1000), (1000,)),
         ((5, 300), (300,)), ((2, 1), (1,))]
TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-10)}


def _inputs(rng, shape, nshape, dtype, offset=3.0):
    x = (rng.standard_normal(shape) * 2.5 + offset).astype(dtype)
    w = rng.standard_normal(nshape).astype(dtype)
    b = rng.standard_normal(nshape).astype(dtype)
    return x, w, b


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,nshape", CASES)
def test_forward_matches_torch(rng, backend, dtype, shape, nshape):
    x, w, b = _inputs(rng, shape, nshape, dtype)
    expected = F.layer_norm(torch.from_numpy(x), nshape, torch.from_numpy(w), torch.from_numpy(b))
    y = layer_norm(x, nshape, w, b, backend=backend)
    assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == x.shape
    assert_close(y, expected, **TOL[dtype], name=f"layer_norm[{backend}]")
    # without affine parameters, and with a tensor input (the output follows the input's type)
    y0 = layer_norm(torch.from_numpy(x), nshape, backend=backend)
    assert isinstance(y0, torch.Tensor)
    assert_close(y0, F.layer_norm(torch.from_numpy(x), nshape), **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,nshape", CASES[:-1])
def test_backward_matches_autograd(rng, backend, dtype, shape, nshape):
    x, w, b = _inputs(rng, shape, nshape, dtype)
    g = rng.standard_normal(shape).astype(dtype)
    xt, wt, bt = (torch.tensor(a, requires_grad=True) for a in (x, w, b))
    F.layer_norm(xt, nshape, wt, bt).backward(torch.from_numpy(g))
    dx, dw, db = layer_norm_backward(g, x, nshape, w, backend=backend)
    tol = TOL[dtype]
    assert_close(dx, xt.grad, **tol, name="dx")
    # dw and db sum over rows: scale the absolute tolerance with the number of rows summed
    rows = x.size // w.size
    assert_close(dw, wt.grad, rtol=tol["rtol"], atol=tol["atol"] * rows, name="dweight")
    assert_close(db, bt.grad, rtol=tol["rtol"], atol=tol["atol"] * rows, name="dbias")


@pytest.mark.parametrize("affine", [True, False])
def test_autograd_function_matches_torch(rng, affine):
    x, w, b = _inputs(rng, (6, 4, 24), (24,), np.float32)
    g = torch.from_numpy(rng.standard_normal((6, 4, 24)).astype(np.float32))
    ours = [torch.tensor(a, requires_grad=True) for a in (x, w, b)]
    ref = [torch.tensor(a, requires_grad=True) for a in (x, w, b)]
    args = (ours[1], ours[2]) if affine else (None, None)
    y, _, _ = LayerNormFunction.apply(ours[0], *args, (24,), 1e-5)
    y.backward(g)
    rargs = (ref[1], ref[2]) if affine else (None, None)
    F.layer_norm(ref[0], (24,), *rargs).backward(g)
    assert_close(ours[0].grad, ref[0].grad, rtol=1e-5, atol=1e-5, name="dx")
    if affine:
        assert_close(ours[1].grad, ref[1].grad, rtol=1e-5, atol=1e-4, name="dweight")
        assert_close(ours[2].grad, ref[2].grad, rtol=1e-5, atol=1e-4, name="dbias")


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_feature_rows_are_exact(backend):
    """With H = 1 every row equals its mean: y = b and dg = 0 exactly. (torch's fused kernel leaves
    rounding noise of ~1e-5 here, so the comparisons above skip this case.)"""
    x = np.array([[0.3], [-7.0]], np.float32)
    b = np.array([0.25], np.float32)
    assert np.array_equal(layer_norm(x, 1, bias=b, backend=backend), np.full_like(x, 0.25))
    dx, dw, db = layer_norm_backward(np.ones_like(x), x, 1, backend=backend)
    assert np.array_equal(dx, np.zeros_like(x)) and dw[0] == 0 and db[0] == 2


def test_gradcheck_float64(rng):
    x, w, b = (torch.tensor(a, requires_grad=True) for a in _inputs(rng, (3, 5, 7), (5, 7), np.float64))
    fn = lambda x, w, b: LayerNormFunction.apply(x, w, b, (5, 7), 1e-5)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-7)
    assert torch.autograd.gradcheck(lambda x: LayerNormFunction.apply(x, None, None, (7,), 1e-3)[0],
                                    (x,), eps=1e-6, atol=1e-7)


def test_module_matches_torch_module(rng):
    torch.manual_seed(0)
    ours, ref = LayerNorm((4, 16)), torch.nn.LayerNorm((4, 16))
    with torch.no_grad():
        ours.weight.copy_(torch.randn(4, 16))
        ref.weight.copy_(ours.weight)
    x = torch.from_numpy(rng.standard_normal((3, 4, 16)).astype(np.float32))
    assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
    assert "elementwise_affine=True" in repr(ours)
    assert LayerNorm(8, elementwise_affine=False).weight is None


@pytest.mark.parametrize("backend", BACKENDS)
def test_row_stats(rng, backend):
    x = (rng.standard_normal((9, 777)) * 0.01 + 1e3).astype(np.float32)  # large offset, tiny spread
    mean, rstd = row_stats(x, 777, eps=1e-12, backend=backend)
    x64 = x.astype(np.float64)
    assert_close(mean, x64.mean(1), rtol=1e-6, name="mean")
    # the variance of float32 data with a 1e5 mean-to-spread ratio: Welford/Chan keeps ~1e-3
    assert_close(rstd, 1 / np.sqrt(x64.var(1) + 1e-12), rtol=2e-3, name="rstd")


def test_backends_agree_on_tensor_and_array_inputs(rng):
    x, w, b = _inputs(rng, (16, 64), (64,), np.float64)
    outs = [layer_norm(x, 64, w, b, backend=bk) for bk in BACKENDS]
    for o in outs[1:]:
        assert_close(o, outs[0], rtol=1e-12, atol=1e-12)
    assert isinstance(layer_norm(torch.from_numpy(x), 64, backend="auto"), torch.Tensor)


def test_invariance_to_input_rescaling_and_recentering(rng):
    """The paper's Table 1: LN output is invariant to scaling and shifting of each example."""
    x = rng.standard_normal((5, 50))
    y = layer_norm(x, 50, eps=1e-12, backend="numpy")
    assert_close(layer_norm(3.7 * x + 11.0, 50, eps=1e-12), y, rtol=1e-8, atol=1e-8)
    assert not np.allclose(layer_norm(x * np.linspace(1, 2, 50), 50), y)  # per-feature scaling is not


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise(backend):
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="normalized_shape"):
        layer_norm(x, 4, backend=backend)
    with pytest.raises(ValueError, match="normalized_shape"):
        layer_norm(x, (0,), backend=backend)
    with pytest.raises(TypeError, match="normalized_shape"):
        layer_norm(x, "3", backend=backend)
    with pytest.raises(ValueError, match="eps"):
        layer_norm(x, 3, eps=0.0, backend=backend)
    with pytest.raises(ValueError, match="eps"):
        layer_norm(x, 3, eps=-1e-5, backend=backend)
    with pytest.raises(TypeError, match="floating"):
        layer_norm(np.ones((2, 3), np.int64), 3, backend=backend)
    with pytest.raises(TypeError, match="floating"):
        layer_norm(torch.ones(2, 3, dtype=torch.int32), 3, backend=backend)
    with pytest.raises(TypeError, match="numpy.ndarray or torch.Tensor"):
        layer_norm([[1.0, 2.0, 3.0]], 3, backend=backend)
    with pytest.raises(ValueError, match="weight must have shape"):
        layer_norm(x, 3, weight=np.ones(4, np.float32), backend=backend)
    bad = x.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity .*row 1"):
        layer_norm(bad, 3, backend=backend)
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or infinity"):
        layer_norm(bad, 3, backend=backend)
    with pytest.raises(ValueError, match="grad_out must have"):
        layer_norm_backward(np.ones((2, 2), np.float32), x, 3, backend=backend)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        layer_norm(np.ones((2, 3)), 3, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_matches_torch(dtype):
    torch.manual_seed(0)
    x = (torch.randn(512, 1024, device="cuda") * 2 + 1).to(dtype).requires_grad_()
    w = torch.randn(1024, device="cuda", dtype=dtype, requires_grad=True)
    b = torch.randn(1024, device="cuda", dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)
    y = layer_norm(x, 1024, w, b)
    y.backward(g)
    grads = [t.grad.clone() for t in (x, w, b)]
    for t in (x, w, b):
        t.grad = None
    ref = F.layer_norm(x, (1024,), w, b)
    ref.backward(g)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert_close(y, ref, **tol, name="y")
    for got, t, name in zip(grads, (x, w, b), ("dx", "dw", "db")):
        assert_close(got, t.grad, rtol=tol["rtol"], atol=tol["atol"] * 64, name=name)
