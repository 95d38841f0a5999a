"""SeeDNorm (paper-only verification: no official code exists) and the DyT baseline.

What is checked:
- every backend (numpy, numba, torch) against an independent autograd transcription of the
  paper's formula, forward and hand-derived backward (eqs. 7-11), single- and multi-head;
- ``torch.autograd.gradcheck`` of :class:`SeeDNormFunction` in float64;
- the exact reduction to RMSNorm (``torch.nn.functional.rms_norm``, the canonical implementation)
  when ``beta = 0`` or ``alpha = 0``, forward and ``dx``;
- hypothesis property tests of the equations: the scale response (eq. 12), the bound
  ``|y| <= (|alpha| + |gamma|) |xhat|``, the even/odd split, monotone output norm, head locality;
- clear errors on bad input.

Tolerances: float32 results at rtol 1e-5 / atol 1e-5 (outputs and dx are O(1); a 1000-element
float32 reduction carries ~1e-6 relative rounding, and tanh of a float32 dot product adds as much);
parameter gradients sum over rows, so their atol grows with the number of rows. float64 at 1e-10
(the backends differ only in summation order, ~1e-15). Property tests run in float64 at 1e-9.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl._common import assert_close
from refimpl.norm.seednorm import DyT, SeeDNorm, SeeDNormFunction, dyt, seednorm, seednorm_backward

BACKENDS = ["numpy", "numba", "torch"]
CASES = [((4, 8), 1), ((4, 8), 4), ((3, 5, 16), 2), ((7, 1000), 1), ((7, 1000), 8), ((5, 300), 3),
         ((2, 1), 1), ((6, 12), 12)]
TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-10)}
SETTINGS = settings(max_examples=40, deadline=None, derandomize=True)


def _reference(x, alpha, beta, gamma, heads, eps):
    """The paper's formula written with plain torch ops (autograd differentiates it)."""
    d = x.shape[-1] // heads
    xhat = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
    s = (x * beta).unflatten(-1, (heads, d)).sum(-1)
    t = torch.tanh(s).repeat_interleave(d, dim=-1)
    return (t * alpha + gamma) * xhat


def _inputs(rng, shape, dtype, scale=0.3):
    dim = shape[-1]
    x = (rng.standard_normal(shape) * 2.0 + 0.5).astype(dtype)
    alpha, beta, gamma = (rng.standard_normal(dim).astype(dtype) * s for s in (1.0, scale, 1.0))
    return x, alpha, beta, gamma


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,heads", CASES)
def test_forward_matches_reference(rng, backend, dtype, shape, heads):
    x, a, b, g = _inputs(rng, shape, dtype)
    expected = _reference(*(torch.from_numpy(v).double() for v in (x, a, b, g)), heads, 1e-6)
    y = seednorm(x, a, b, g, heads, backend=backend)
    assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == x.shape
    assert_close(y, expected, **TOL[dtype], name=f"seednorm[{backend}]")
    yt = seednorm(*(torch.from_numpy(v) for v in (x, a, b, g)), num_heads=heads, backend=backend)
    assert isinstance(yt, torch.Tensor) and yt.dtype == torch.from_numpy(x).dtype
    assert_close(yt, expected, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,heads", CASES)
def test_backward_matches_autograd(rng, backend, dtype, shape, heads):
    x, a, b, g = _inputs(rng, shape, dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    leaves = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (x, a, b, g)]
    _reference(*leaves, heads, 1e-6).backward(torch.from_numpy(dy).double())
    grads = seednorm_backward(dy, x, a, b, g, heads, backend=backend)
    tol = TOL[dtype]
    rows = x.size // x.shape[-1]
    for got, leaf, name in zip(grads, leaves, ("dx", "dalpha", "dbeta", "dgamma")):
        assert got.dtype == dtype
        atol = tol["atol"] if name == "dx" else tol["atol"] * rows * 4
        assert_close(got, leaf.grad, rtol=tol["rtol"] * 10, atol=atol, name=f"{name}[{backend}]")


def test_parallel_kernels_match_reference(rng):
    """Inputs of >= PARALLEL_MIN elements run the parallel Numba kernels (the cases above run the
    serial twins): the same numbers, and the parameter partial sums per row block add up right."""
    from refimpl.norm import seednorm as mod

    shape, heads = (300, 1024), 4
    assert np.prod(shape) >= mod.PARALLEL_MIN
    x, a, b, g = _inputs(rng, shape, np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    leaves = [torch.tensor(v, dtype=torch.float64, requires_grad=True) for v in (x, a, b, g)]
    ref = _reference(*leaves, heads, 1e-6)
    ref.backward(torch.from_numpy(dy).double())
    assert_close(seednorm(x, a, b, g, heads, backend="numba"), ref, rtol=1e-5, atol=1e-5, name="y")
    grads = seednorm_backward(dy, x, a, b, g, heads, backend="numba")
    for got, leaf, name in zip(grads, leaves, ("dx", "dalpha", "dbeta", "dgamma")):
        assert_close(got, leaf.grad, rtol=1e-4, atol=1e-5 if name == "dx" else 1e-5 * shape[0] * 4, name=name)


@pytest.mark.parametrize("heads", [1, 4])
def test_autograd_function_matches_reference(rng, heads):
    x, a, b, g = _inputs(rng, (6, 4, 32), np.float32)
    dy = torch.from_numpy(rng.standard_normal((6, 4, 32)).astype(np.float32))
    ours = [torch.tensor(v, requires_grad=True) for v in (x, a, b, g)]
    ref = [torch.tensor(v, requires_grad=True) for v in (x, a, b, g)]
    y, rstd = SeeDNormFunction.apply(*ours, heads, 1e-6)
    assert rstd.shape == (24,) and not rstd.requires_grad
    y.backward(dy)
    _reference(*ref, heads, 1e-6).backward(dy)
    for o, r, name in zip(ours, ref, ("dx", "dalpha", "dbeta", "dgamma")):
        assert_close(o.grad, r.grad, rtol=1e-5, atol=1e-4, name=name)
    # only some inputs need gradients: the others get None and nothing breaks
    xo = torch.tensor(x, requires_grad=True)
    SeeDNormFunction.apply(xo, *(torch.from_numpy(v) for v in (a, b, g)), heads, 1e-6)[0].sum().backward()
    assert xo.grad is not None and torch.isfinite(xo.grad).all()


@pytest.mark.parametrize("heads", [1, 3, 12])
def test_gradcheck_float64(rng, heads):
    x, a, b, g = _inputs(rng, (3, 2, 12), np.float64, scale=0.5)
    leaves = tuple(torch.tensor(v, requires_grad=True) for v in (x, a, b, g))
    fn = lambda x, a, b, g: SeeDNormFunction.apply(x, a, b, g, heads, 1e-3)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["beta", "alpha"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reduces_exactly_to_rmsnorm(rng, backend, which, dtype):
    """beta = 0 (any alpha) or alpha = 0 (any beta): the gain (5) is gamma, and SeeDNorm is RMSNorm
    (compared with torch.nn.functional.rms_norm), forward and dx."""
    x, a, b, g = _inputs(rng, (9, 64), dtype, scale=1.0)
    if which == "beta":
        b = np.zeros_like(b)
    else:
        a = np.zeros_like(a)
    xt, gt = torch.tensor(x, requires_grad=True), torch.from_numpy(g)
    expected = F.rms_norm(xt, (64,), gt, eps=1e-6)
    dy = rng.standard_normal(x.shape).astype(dtype)
    expected.backward(torch.from_numpy(dy))
    tol = TOL[dtype]
    assert_close(seednorm(x, a, b, g, backend=backend), expected, **tol, name="y")
    assert_close(seednorm(x, a, b, g, num_heads=4, backend=backend), expected, **tol, name="y[H=4]")
    dx, da, db, dg = seednorm_backward(dy, x, a, b, g, backend=backend)
    assert_close(dx, xt.grad, **tol, name="dx")
    if which == "beta":
        assert np.array_equal(da, np.zeros_like(da))       # tanh(0) = 0 exactly
        assert np.abs(db).max() > 1e-3                       # but beta does learn (alpha != 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_alpha_beta_zero_is_a_fixed_point(rng, backend):
    """The catalog's "alpha, beta init near zero" taken literally (both exactly 0) freezes both:
    eqs. (8) and (10) vanish. Hence refimpl's default alpha = 1, beta = 0."""
    x, _, _, g = _inputs(rng, (8, 32), np.float64)
    z = np.zeros(32)
    _, da, db, _ = seednorm_backward(rng.standard_normal(x.shape), x, z, z, g, backend=backend)
    assert not da.any() and not db.any()


def test_module_starts_as_rmsnorm_and_learns(rng):
    torch.manual_seed(0)
    m = SeeDNorm(16, num_heads=2)
    assert m.alpha.data.eq(1).all() and m.beta.data.eq(0).all() and m.gamma.data.eq(1).all()
    x = torch.from_numpy(rng.standard_normal((5, 16)).astype(np.float32))
    assert_close(m(x), torch.nn.RMSNorm(16, eps=1e-6)(x), rtol=1e-6, atol=1e-6)
    m(x).pow(3).sum().backward()
    assert all(p.grad is not None and p.grad.abs().max() > 0 for p in (m.beta, m.gamma))
    groups = m.weight_decay_groups(0.1)
    assert groups[0]["params"][1] is m.beta and groups[1]["weight_decay"] == 0.0
    assert "num_heads=2" in repr(m)
    with pytest.raises(ValueError, match="num_heads"):
        SeeDNorm(10, num_heads=3)
    with pytest.raises(ValueError, match="dim"):
        SeeDNorm(0)


# ----------------------------------------------------------------------------- properties
def _row(seed, dim):
    r = np.random.default_rng(seed)
    return r.standard_normal(dim), r.standard_normal(dim), r.standard_normal(dim) * 0.5, r.standard_normal(dim)


@SETTINGS
@given(seed=st.integers(0, 2**31), k=st.floats(0.05, 50.0), heads=st.sampled_from([1, 2, 4]))
def test_scale_response_is_exactly_the_tanh_term(seed, k, heads):
    """Eq. (12): with eps -> 0, y(kx) - y(x) = (tanh(k s_h) - tanh(s_h)) alpha * xhat. RMSNorm's
    scale invariance is broken only through the dot product, and by a bounded amount."""
    x, a, b, g = _row(seed, 8)
    eps = 1e-300
    y1 = seednorm(x[None], a, b, g, heads, eps, backend="numpy")[0]
    yk = seednorm(k * x[None], a, b, g, heads, eps, backend="numpy")[0]
    xhat = x / np.sqrt(np.mean(x * x))
    s = (x * b).reshape(heads, -1).sum(1)
    dt = np.repeat(np.tanh(k * s) - np.tanh(s), 8 // heads)
    assert_close(yk - y1, dt * a * xhat, rtol=1e-9, atol=1e-9)
    assert np.all(np.abs(yk) <= (np.abs(a) + np.abs(g)) * np.abs(xhat) + 1e-12)


@SETTINGS
@given(seed=st.integers(0, 2**31), heads=st.sampled_from([1, 2, 8]))
def test_even_part_is_the_dynamic_term(seed, heads):
    """tanh is odd, xhat is odd: y(x) + y(-x) = 2 tanh(s) alpha xhat and y(x) - y(-x) = 2 gamma xhat."""
    x, a, b, g = _row(seed, 8)
    y = seednorm(np.stack([x, -x]), a, b, g, heads, 1e-6, backend="numba")
    xhat = x / np.sqrt(np.mean(x * x) + 1e-6)
    t = np.repeat(np.tanh((x * b).reshape(heads, -1).sum(1)), 8 // heads)
    assert_close(y[0] + y[1], 2 * t * a * xhat, rtol=1e-9, atol=1e-9)
    assert_close(y[0] - y[1], 2 * g * xhat, rtol=1e-9, atol=1e-9)


@SETTINGS
@given(seed=st.integers(0, 2**31))
def test_output_norm_tracks_input_norm(seed):
    """With alpha, gamma >= 0 and <x, beta> > 0, ||SeeDNorm(k x)|| grows strictly with k (RMSNorm's
    is constant), and it stays below ||(alpha + gamma) * xhat||."""
    x, a, b, g = _row(seed, 16)
    a, g = np.abs(a) + 0.1, np.abs(g) + 0.1
    if x @ b < 0:
        b = -b
    ks = np.geomspace(0.1, 10, 12)
    norms = np.linalg.norm(seednorm(ks[:, None] * x, a, b, g, eps=1e-12, backend="numpy"), axis=1)
    rms = np.linalg.norm(F.rms_norm(torch.from_numpy(ks[:, None] * x), (16,), eps=1e-12).numpy(), axis=1)
    assert np.all(np.diff(norms) > 0)
    assert np.ptp(rms) < 1e-6
    xhat = x / np.sqrt(np.mean(x * x))
    assert norms[-1] < np.linalg.norm((a + g) * xhat)


@SETTINGS
@given(seed=st.integers(0, 2**31), head=st.integers(0, 3))
def test_heads_are_local(seed, head):
    """Changing beta inside head h changes the output only inside head h (the RMS is shared)."""
    x, a, b, g = _row(seed, 12)
    b2 = b.copy()
    b2[3 * head:3 * head + 3] += 1.0
    y, y2 = (seednorm(x[None], a, bb, g, 4, backend="numba")[0] for bb in (b, b2))
    outside = np.ones(12, bool)
    outside[3 * head:3 * head + 3] = False
    assert np.array_equal(y[outside], y2[outside])
    assert not np.allclose(y[~outside], y2[~outside])


# ----------------------------------------------------------------------------- DyT
def test_dyt_matches_formula_and_module(rng):
    x = rng.standard_normal((3, 5, 8))
    g, b = rng.standard_normal(8), rng.standard_normal(8)
    assert_close(dyt(x, 0.7, g, b), g * np.tanh(0.7 * x) + b, rtol=1e-12, atol=1e-12)
    m = DyT(8, alpha_init=0.5)
    xt = torch.from_numpy(x.astype(np.float32))
    assert_close(m(xt), torch.tanh(0.5 * xt), rtol=1e-6, atol=1e-6)
    m(xt).sum().backward()
    assert m.alpha.grad.shape == (1,) and m.alpha.grad.abs() > 0
    with pytest.raises(ValueError, match="alpha must be a scalar"):
        dyt(x, np.ones(2), g, b)
    with pytest.raises(TypeError, match="alpha must be a real scalar"):
        dyt(x, "0.5", g, b)
    with pytest.raises(ValueError, match="gamma must have shape"):
        dyt(x, 0.5, g[:4], b)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise(backend):
    x = np.ones((2, 4), np.float32)
    p = np.ones(4, np.float32)
    with pytest.raises(ValueError, match="num_heads must be a positive divisor"):
        seednorm(x, p, p, p, 3, backend=backend)
    with pytest.raises(ValueError, match="num_heads must be a positive divisor"):
        seednorm(x, p, p, p, 0, backend=backend)
    with pytest.raises(TypeError, match="num_heads must be a positive int"):
        seednorm(x, p, p, p, 2.0, backend=backend)
    with pytest.raises(ValueError, match="eps"):
        seednorm(x, p, p, p, eps=0.0, backend=backend)
    with pytest.raises(TypeError, match="floating"):
        seednorm(np.ones((2, 4), np.int64), p, p, p, backend=backend)
    with pytest.raises(TypeError, match="alpha must have a floating"):
        seednorm(x, np.ones(4, np.int32), p, p, backend=backend)
    with pytest.raises(TypeError, match="numpy.ndarray or torch.Tensor"):
        seednorm([[1.0, 2.0, 3.0, 4.0]], p, p, p, backend=backend)
    with pytest.raises(ValueError, match=r"beta must have shape \(4,\)"):
        seednorm(x, p, np.ones(5, np.float32), p, backend=backend)
    with pytest.raises(ValueError, match="x must have at least one dimension"):
        seednorm(np.ones((2, 0), np.float32), p[:0], p[:0], p[:0], backend=backend)
    with pytest.raises(ValueError, match="gamma contains NaN"):
        seednorm(x, p, p, np.array([1, np.nan, 1, 1], np.float32), backend=backend)
    bad = x.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity .*row 1"):
        seednorm(bad, p, p, p, backend=backend)
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or infinity .*row 1"):
        seednorm(bad, p, p, p, backend=backend)
    with pytest.raises(ValueError, match="NaN or infinity .*row 1"):
        seednorm_backward(np.ones_like(x), bad, p, p, p, backend=backend)
    with pytest.raises(ValueError, match="grad_out must have"):
        seednorm_backward(np.ones((2, 2), np.float32), x, p, p, p, backend=backend)


def test_bad_backend_name():
    p = np.ones(3)
    with pytest.raises(ValueError, match="backend must be one of"):
        seednorm(np.ones((2, 3)), p, p, p, backend="cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("heads", [1, 8])
def test_cuda_matches_reference(dtype, heads):
    torch.manual_seed(0)
    x = (torch.randn(512, 1024, device="cuda") * 2 + 0.5).to(dtype).requires_grad_()
    params = [(torch.randn(1024, device="cuda") * s).to(dtype).requires_grad_() for s in (1.0, 0.05, 1.0)]
    g = torch.randn_like(x)
    y = seednorm(x, *params, num_heads=heads)
    y.backward(g)
    grads = [t.grad.clone() for t in (x, *params)]
    leaves = [t.detach().double().requires_grad_() for t in (x, *params)]
    ref = _reference(*leaves, heads, 1e-6)
    ref.backward(g.double())
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert_close(y, ref, **tol, name="y")
    for got, leaf, name in zip(grads, leaves, ("dx", "dalpha", "dbeta", "dgamma")):
        assert_close(got, leaf.grad, rtol=tol["rtol"], atol=tol["atol"] * (1 if name == "dx" else 512),
                     name=name)
