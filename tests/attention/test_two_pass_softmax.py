"""Two-pass softmax: the XNNPACK emulation against golden outputs of the official AVX2 kernels (bit for
bit), every backend of the two-pass and three-pass algorithms against float64 softmax
(scipy.special.softmax) on seeded and extreme inputs, the pass-1 pair (S, N) against the exact sum,
autograd through the torch path, and clear errors on bad input.

Tolerances (relative to the float64 reference, on entries above 1e-30; plus a tiny absolute floor):
- XNNPACK emulation vs the compiled kernels: 0 (identical bits), the point of the emulation.
- float32, rtol 2e-5: each y_i carries the error of one polynomial/libm exp (~1e-7 relative), of the
  reduction t = x - n ln2 (~1e-7 at |x| = 1e4, where ulp(x) ~ 1e-3 but n*L_hi is exact) and of a
  float32 sum of up to 4096 terms (measured worst ~4e-6 for numpy's sequential three-pass sum).
- float64, rtol 1e-12: the same error budget in double precision (measured worst ~1e-14).
- XNNPACK (and its emulation) vs float64 softmax: rtol 1e-5 (the degree-5 polynomial, ~2e-7 measured).
"""
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.special import softmax as sp_softmax

from refimpl._common import assert_close, load_golden
from refimpl.attention.two_pass_softmax import (
    extexp_sum, softmax_bytes, softmax_three_pass, softmax_two_pass, xnnpack_raddextexp_f32,
    xnnpack_softmax_f32, xnnpack_vscaleextexp_f32)

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "two_pass_softmax"
BACKENDS = ["numpy", "numba", "torch"]
TOL = {np.float32: dict(rtol=2e-5, atol=1e-30), np.float64: dict(rtol=1e-12, atol=1e-300)}
SHAPES = [(1, 1), (5, 3), (7, 37), (3, 1000), (2, 4097), (33, 64)]
SCALES = [1.0, 1e3, 1e4]


def _ref(x):
    return sp_softmax(np.asarray(x, np.float64), axis=-1)


def _algorithms(backend):
    return {"two_pass": lambda x, **k: softmax_two_pass(x, backend=backend, **k),
            "recompute": lambda x, **k: softmax_three_pass(x, "recompute", backend=backend, **k),
            "reload": lambda x, **k: softmax_three_pass(x, "reload", backend=backend, **k)}


# ----------------------------------------------------------------------------- official (golden)
def _golden_rows():
    g = load_golden(GOLDEN / "xnnpack_avx2_p5.npz")
    offsets = np.concatenate([[0], np.cumsum(g["lengths"])])
    for i, n in enumerate(g["lengths"]):
        a, b = offsets[i], offsets[i + 1]
        yield i, int(n), g["x"][a:b], g["y"][a:b], g["sums"][i]


def test_emulation_is_bit_identical_to_xnnpack():
    rows = list(_golden_rows())
    assert len(rows) == 60
    for i, n, x, y, sums in rows:
        ye, s0, s1 = xnnpack_softmax_f32(x)
        assert ye.dtype == np.float32 and s0.dtype == np.float32 and ye.shape == (n,)
        assert s0.view(np.uint32) == sums[0].view(np.uint32), f"row {i} (n={n}): sum[0] {s0!r} vs {sums[0]!r}"
        assert s1 == sums[1], f"row {i} (n={n}): sum[1] {s1!r} vs {sums[1]!r}"
        np.testing.assert_array_equal(ye.view(np.uint32), y.view(np.uint32), err_msg=f"row {i} (n={n})")


def test_emulation_passes_separately_and_batched():
    """Pass 1 and pass 2 called on a 2-D batch of equal-length rows give the kernel's bits too."""
    rows = [r for r in _golden_rows() if r[1] == 1000]
    x = np.stack([r[2] for r in rows])
    s0, s1 = xnnpack_raddextexp_f32(x)
    np.testing.assert_array_equal(s0, [r[4][0] for r in rows])
    np.testing.assert_array_equal(s1, [r[4][1] for r in rows])
    y = xnnpack_vscaleextexp_f32(x, np.float32(1) / s0, -s1)
    np.testing.assert_array_equal(y.view(np.uint32), np.stack([r[3] for r in rows]).view(np.uint32))


def test_xnnpack_is_a_correct_softmax():
    """The official outputs (and so the emulation) agree with float64 softmax: the method is right."""
    for i, n, x, y, _ in _golden_rows():
        assert_close(y, _ref(x), rtol=1e-5, atol=1e-30, name=f"xnnpack row {i} (n={n})")


def test_neginf_quirk_is_reproduced():
    """XNNPACK returns NaN for a whole row holding -inf; the emulation does the same, refimpl's
    backends give the mathematically right answer (exp(-inf) = 0)."""
    g = load_golden(GOLDEN / "xnnpack_neginf_quirk.npz")
    assert np.isnan(g["y"]).all() and np.isnan(g["sums"][0])
    ye, s0, s1 = xnnpack_softmax_f32(g["x"])
    assert np.isnan(ye).all() and np.isnan(s0) and s1 == g["sums"][1]
    finite = np.isfinite(g["x"])
    expected = np.zeros(g["x"].shape)
    expected[finite] = _ref(g["x"][finite])
    for backend in BACKENDS:
        for name, f in _algorithms(backend).items():
            y = f(g["x"])
            assert y[5] == 0.0
            assert_close(y, expected, rtol=2e-5, atol=1e-30, name=f"{name}[{backend}] with -inf")


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_chunks_and_all_masked_rows(rng, backend):
    """-inf over whole 512-element chunks (before and after the finite entries) contributes 0; a row
    that is entirely -inf gives NaN, as torch.softmax does."""
    x = np.full((2, 2000), -np.inf, dtype=np.float32)
    x[0, 1100:1300] = rng.standard_normal(200) * 50
    expected = np.zeros(x.shape)
    expected[0, 1100:1300] = _ref(x[0, 1100:1300])
    for name, f in _algorithms(backend).items():
        y = f(x)
        assert_close(y[0], expected[0], rtol=2e-5, atol=1e-30, name=f"{name}[{backend}] masked")
        assert np.isnan(y[1]).all(), f"{name}[{backend}]: an all -inf row must give NaN"


def test_refimpl_f32_matches_xnnpack_outputs():
    """Our float32 kernels against the official outputs (different polynomial/rounding: ~1e-6)."""
    for i, n, x, y, _ in _golden_rows():
        for backend in BACKENDS:
            assert_close(softmax_two_pass(x[None], backend=backend)[0], y, rtol=2e-5, atol=1e-30,
                         name=f"two_pass[{backend}] vs xnnpack row {i}")


# ----------------------------------------------------------------------------- backends vs float64
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_algorithms_match_float64_softmax(rng, backend, dtype):
    for shape in SHAPES:
        for scale in SCALES:
            x = (rng.standard_normal(shape) * scale).astype(dtype)
            expected = _ref(x)
            for name, f in _algorithms(backend).items():
                y = f(x)
                assert isinstance(y, np.ndarray) and y.dtype == dtype and y.shape == x.shape
                assert_close(y, expected, **TOL[dtype], name=f"{name}[{backend}] {shape} scale {scale}")
                yt = f(torch.from_numpy(x))                       # a tensor in, a tensor out
                assert isinstance(yt, torch.Tensor) and yt.dtype == torch.from_numpy(x).dtype
                assert_close(yt, expected, **TOL[dtype], name=f"{name}[{backend}] tensor")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_inputs_do_not_overflow(backend, dtype):
    """At +-1e4 the naive exp overflows to inf (and gives NaN); every algorithm stays exact."""
    x = np.array([[1e4, -1e4, 9999.0, 0.0, 1e4 - 3.0],
                  [-1e4, -1e4 + 1.0, -1e4 + 2.0, -1e4, -1e4 + 0.5],
                  [88.0, 89.0, 90.0, 710.0, 709.0]], dtype=dtype)
    with np.errstate(over="ignore", invalid="ignore"):
        naive = np.exp(x) / np.exp(x).sum(axis=1, keepdims=True)
    assert np.isnan(naive).any()
    for name, f in _algorithms(backend).items():
        y = f(x)
        assert np.isfinite(y).all()
        assert_close(y, _ref(x), **TOL[dtype], name=f"{name}[{backend}] extreme")


def test_numba_single_thread_and_parallel_agree(rng):
    x = (rng.standard_normal((300, 1024)) * 20).astype(np.float32)       # above PARALLEL_MIN
    for name, f in _algorithms("numba").items():     # two compiled kernels: sums may vectorise differently
        assert_close(f(x, parallel=True), f(x, parallel=False), rtol=1e-6, atol=1e-30, name=name)


def test_higher_rank_inputs_run_over_the_last_axis(rng):
    x = rng.standard_normal((2, 3, 50)).astype(np.float32)
    for backend in BACKENDS:
        y = softmax_two_pass(x, backend=backend)
        assert y.shape == x.shape
        assert_close(y, _ref(x), **TOL[np.float32], name=backend)


# ----------------------------------------------------------------------------- pass 1 alone
@pytest.mark.parametrize("backend", BACKENDS)
def test_extexp_sum_is_the_sum_in_extended_form(rng, backend):
    x = rng.standard_normal((4, 777)) * 40
    s, n = extexp_sum(x, backend=backend)
    assert s.shape == n.shape == (4,)
    s, n = np.asarray(s), np.asarray(n)
    np.testing.assert_array_equal(n, np.floor(x * np.log2(np.e) + 0.5).max(axis=1))   # N = max n_i
    assert np.all((s >= 2 ** -0.5) & (s <= 777 * 2 ** 0.5))                          # no overflow
    lse = np.log(s) + n * np.log(2.0)                                                # log sum exp
    m = x.max(axis=1)
    assert_close(lse, m + np.log(np.exp(x - m[:, None]).sum(axis=1)), rtol=1e-13, name="log-sum-exp")
    big = np.full((1, 3), 1e4)
    s, n = extexp_sum(big, backend=backend)                                           # 3 e^1e4
    assert_close(np.log(np.asarray(s)) + np.asarray(n) * np.log(2.0), [1e4 + np.log(3.0)], rtol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_extexp_sum_float32_is_accurate_at_large_exponents(rng, backend):
    """An error in the reduction t = x - n ln2 that grows with n cancels in y (it is common to
    neighbouring entries) but not in S: check S itself at |x| ~ 1e4 (n ~ 14427)."""
    x = np.concatenate([rng.uniform(9990.0, 1e4, (3, 40)), rng.uniform(-1e4, -9990.0, (3, 40))]).astype(np.float32)
    s, n = extexp_sum(x, backend=backend)
    x64 = x.astype(np.float64)
    m = x64.max(axis=1)
    lse = m + np.log(np.exp(x64 - m[:, None]).sum(axis=1))
    expected = np.exp(lse - np.asarray(n, np.float64) * np.log(2.0))   # S = sum exp(x) / 2^N
    assert_close(np.asarray(s, np.float64), expected, rtol=2e-6, name=f"S[{backend}] float32")


def test_softmax_bytes():
    assert softmax_bytes(1000, "two_pass") == 12000
    assert softmax_bytes(1000, "recompute") == 16000
    assert softmax_bytes(1000, "reload", itemsize=8) == 40000


# ----------------------------------------------------------------------------- autograd
def test_torch_two_pass_gradient_is_softmax_gradient(rng):
    """No custom backward: autograd through eqs. (3)-(6) (n has zero gradient) equals softmax's."""
    x = torch.tensor(rng.standard_normal((3, 9)) * 4, requires_grad=True)
    g = torch.tensor(rng.standard_normal((3, 9)))
    softmax_two_pass(x).backward(g)
    x2 = x.detach().clone().requires_grad_(True)
    torch.softmax(x2, dim=-1).backward(g)
    assert_close(x.grad, x2.grad, rtol=1e-12, atol=1e-15, name="dx")
    xs = torch.tensor(rng.standard_normal((2, 5)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: softmax_two_pass(t, backend="torch"), (xs,))


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    with pytest.raises(TypeError, match="x must be a numpy.ndarray or torch.Tensor"):
        softmax_two_pass([1.0, 2.0])
    with pytest.raises(TypeError, match="x must be float32 or float64, got int64"):
        softmax_two_pass(np.arange(4))
    with pytest.raises(TypeError, match="x must be float32 or float64, got float16"):
        softmax_three_pass(torch.zeros(3, dtype=torch.float16))
    with pytest.raises(ValueError, match="at least 1 dimension"):
        softmax_two_pass(np.ones((), np.float64))
    with pytest.raises(ValueError, match="at least one element in its last axis"):
        extexp_sum(np.zeros((3, 0)))
    with pytest.raises(ValueError, match="variant must be one of"):
        softmax_three_pass(np.zeros(3), variant="fused")
    with pytest.raises(ValueError, match="backend must be one of"):
        softmax_two_pass(np.zeros(3), backend="cuda")
    with pytest.raises(ValueError, match="algorithm must be one of"):
        softmax_bytes(10, "one_pass")
    with pytest.raises(TypeError, match="x must be float32"):
        xnnpack_softmax_f32(np.zeros(8))
    with pytest.raises(TypeError, match="x must be a numpy.ndarray"):
        xnnpack_raddextexp_f32(torch.zeros(8))


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cuda_torch_path_matches_float64():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((64, 4097)) * 1e3).astype(np.float32)
    xt = torch.from_numpy(x).cuda()
    for name, f in _algorithms("torch").items():
        y = f(xt)
        assert y.is_cuda
        assert_close(y.cpu(), _ref(x), rtol=2e-5, atol=1e-30, name=f"{name}[cuda]")
