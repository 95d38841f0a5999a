"""The shared multi-tensor kernel: every backend against a float64 per-tensor reference, and clear
errors. Tolerances: reductions accumulate in float64 (numpy/numba) or float32 pairwise sums (torch),
so float32 inputs agree to 1e-6 relative; the axpy is one rounding per element."""
import numpy as np
import pytest
import torch

from refimpl._common import assert_close
from refimpl.optim.multi_tensor import SegmentLayout, segment_axpy, segment_dot, segment_sumsq

BACKENDS = ["numpy", "numba", "torch"]
SHAPES = [(3, 4), (7,), (2, 3, 5), (1,), (0,), (1000,)]


def _tensors(rng, dtype):
    return [rng.standard_normal(s).astype(dtype) for s in SHAPES]


def test_layout_roundtrip(rng):
    ts = _tensors(rng, np.float32)
    lay = SegmentLayout.of(ts)
    assert lay.numel == sum(t.size for t in ts) and len(lay) == len(ts) and lay.sizes[4] == 0
    flat = lay.flatten(ts)
    for a, b in zip(lay.unflatten(flat), ts):
        assert np.array_equal(a, b)
    tt = [torch.from_numpy(t) for t in ts]
    assert torch.equal(lay.flatten(tt), torch.from_numpy(flat))
    assert "6 tensors" in repr(lay)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_reductions_match_reference(rng, backend, dtype):
    xs, ys = _tensors(rng, dtype), _tensors(rng, dtype)
    lay = SegmentLayout.of(xs)
    x, y = lay.flatten(xs), lay.flatten(ys)
    dot_ref = np.array([np.dot(a.ravel().astype(np.float64), b.ravel().astype(np.float64)) for a, b in zip(xs, ys)])
    sq_ref = np.array([np.sum(a.astype(np.float64) ** 2) for a in xs])
    tol = 1e-6 if dtype == np.float32 else 1e-12
    assert_close(segment_dot(x, y, lay, backend=backend), dot_ref, rtol=tol, atol=tol * 50, name="dot")
    assert_close(segment_sumsq(x, lay, backend=backend), sq_ref, rtol=tol, atol=tol, name="sumsq")
    out = segment_sumsq(torch.from_numpy(x), lay, backend=backend)
    assert isinstance(out, torch.Tensor)
    assert_close(out, sq_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_axpy_matches_reference(rng, backend, dtype):
    xs, ys = _tensors(rng, dtype), _tensors(rng, dtype)
    lay = SegmentLayout.of(xs)
    a = rng.standard_normal(len(lay))
    x, y = lay.flatten(xs), lay.flatten(ys)
    expected = np.concatenate([(xk.astype(np.float64) + ak * yk).ravel() for xk, ak, yk in zip(xs, a, ys)])
    out = segment_axpy(x, a, y, lay, backend=backend)
    assert out is x
    tol = 1e-6 if dtype == np.float32 else 1e-14
    assert_close(x, expected, rtol=tol, atol=tol, name="axpy")
    xt = torch.from_numpy(lay.flatten(xs))
    segment_axpy(xt, torch.from_numpy(a), torch.from_numpy(y), lay, backend=backend)
    assert_close(xt, expected, rtol=tol, atol=tol, name="axpy on a tensor")


def test_bad_inputs():
    lay = SegmentLayout([(2,), (3,)])
    x = np.zeros(5, np.float32)
    with pytest.raises(ValueError, match="flat vector of 5 elements"):
        segment_sumsq(np.zeros(4, np.float32), lay)
    with pytest.raises(TypeError, match="floating"):
        segment_sumsq(np.zeros(5, np.int64), lay)
    with pytest.raises(TypeError, match="one type and dtype"):
        segment_dot(x, np.zeros(5), lay)
    with pytest.raises(ValueError, match="one scale per segment"):
        segment_axpy(x, np.ones(3), x.copy(), lay)
    with pytest.raises(ValueError, match="shapes"):
        lay.flatten([np.zeros(2), np.zeros(4)])
    with pytest.raises(ValueError, match="at least one tensor"):
        SegmentLayout([])


@pytest.mark.gpu
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    ts = [torch.randn(s) for s in SHAPES]
    lay = SegmentLayout.of(ts)
    x = lay.flatten(ts)
    assert_close(segment_sumsq(x.cuda(), lay).cpu(), segment_sumsq(x, lay, backend="numpy"), rtol=1e-6, atol=1e-6)


def test_trajectory_is_seeded_and_sgd_matches_by_hand():
    from refimpl.optim.trajectory import ScaleInvariantNet, regression_batch, run_trajectory

    a = run_trajectory(lambda p: torch.optim.SGD(p, lr=0.1), steps=5)
    b = run_trajectory(lambda p: torch.optim.SGD(p, lr=0.1), steps=5)
    assert a.shape == (6, sum(p.numel() for p in ScaleInvariantNet().parameters())) and np.array_equal(a, b)
    assert not np.allclose(a[0], a[-1])
    # the first SGD step by hand
    model = ScaleInvariantNet().double()
    x, y = (t.double() for t in regression_batch(0))
    torch.nn.functional.mse_loss(model(x), y).backward()
    g = torch.cat([p.grad.reshape(-1) for p in model.parameters()]).numpy()
    assert_close(a[1], a[0] - 0.1 * g, rtol=1e-12, atol=1e-12)
    # the first layer is scale-invariant: scaling it changes nothing
    m2 = ScaleInvariantNet().double()
    with torch.no_grad():
        m2.first.weight.mul_(3.0)
    assert torch.allclose(model(x), m2(x), atol=1e-7)
    with pytest.raises(ValueError, match="steps"):
        run_trajectory(lambda p: torch.optim.SGD(p, lr=0.1), steps=0)
