"""Few-bit backward: the official tables and gradients (golden fixtures from skolai/fewbit), the DP's backends and
optimality, bucketize/pack backends, the saved memory, and clear errors on bad input.

Tolerances and why:
* official tables vs :func:`alternating_stepwise`: atol 1e-12. The iteration is deterministic and the same
  arithmetic; only f and f' differ in the last bit (scipy's erf/expit vs torch's autograd), and the measured
  difference after up to 5528 iterations is <= 6e-15.
* gradients vs fewbit: exact (atol 0). Both bucketize float32 x against the float32 borders and multiply the
  float32 level by g, so every bit must agree; any other tolerance would hide a wrong bucket at a border.
* DP backends: the same arithmetic in float64 (numba without reassociation), so the optimal border indices must be
  identical and E* agrees to rtol 1e-12.
* DP vs brute force and random border sets: E* <= every other cost + 1e-12 (float64 rounding of sums of ~10 terms).
* prefix integrals vs scipy quad: rel 1e-7 on a coarse test grid of 0.2-wide cells (Simpson with 16 sub-intervals:
  measured 7e-9;
  quad's own error estimate is ~1e-10).
"""
import itertools
import math

import numpy as np
import pytest
import scipy.integrate
import torch
import torch.nn.functional as F

from refimpl._common import assert_close, load_golden
from refimpl.quant import few_bit_backward as fb
from refimpl.quant.quantizers import pack_bits

GOLDEN = load_golden(__import__("pathlib").Path(__file__).parents[1] / "golden/few_bit_backward/fewbit_tables_grads.npz")
BACKENDS = ["numpy", "numba", "torch"]
CASES = [(name, b) for name in ("gelu", "silu") for b in range(1, 5)]


def _random_table(rng, bits):
    borders = np.sort(rng.standard_normal(2 ** bits - 1) * 2)
    levels = rng.standard_normal(2 ** bits)
    return borders, levels


# ----------------------------------------------------------------------------- official tables and gradients
@pytest.mark.parametrize("name,bits", CASES)
def test_alternating_iteration_reproduces_official_tables(name, bits):
    table = fb.builtin_table(name, bits)
    assert_close(table.borders, GOLDEN[f"{name}{bits:02d}_borders"], rtol=0, atol=1e-12, name="borders")
    assert_close(table.levels, GOLDEN[f"{name}{bits:02d}_levels"], rtol=0, atol=1e-12, name="levels")
    # the default settings converge; a tiny iteration budget does not
    if bits >= 2:
        assert fb.alternating_stepwise(name, bits, max_iters=2)[1]["status"] == "not-converged"


@pytest.mark.parametrize("name,bits", CASES)
def test_backward_matches_official_gradients_exactly(name, bits):
    x = torch.tensor(GOLDEN[f"x_{name}{bits:02d}"], requires_grad=True)
    g = torch.tensor(GOLDEN["g"])
    y = fb.few_bit_activation(x, name, bits)
    y.backward(g)
    assert_close(x.grad, GOLDEN[f"grad_{name}{bits:02d}"], rtol=0, atol=0, name="x.grad")
    # the forward is the exact activation (fewbit's CPU forward is not: it returns tanhshrink)
    assert torch.equal(y, getattr(F, name)(x.detach()))
    # the module form, too
    x2 = x.detach().clone().requires_grad_(True)
    mod = fb.FewBitGELU(bits) if name == "gelu" else fb.FewBitSiLU(bits)
    mod(x2).backward(g)
    assert torch.equal(x2.grad, x.grad)


def test_backward_is_not_the_exact_gradient():
    """A test that could not fail would be no test: the few-bit gradient differs from autograd's."""
    x = torch.tensor(GOLDEN["x_gelu02"], requires_grad=True)
    fb.few_bit_activation(x, "gelu", 2).sum().backward()
    xr = x.detach().clone().requires_grad_(True)
    F.gelu(xr).sum().backward()
    assert (x.grad - xr.grad).abs().max() > 0.1


# ----------------------------------------------------------------------------- the backward rule (3)
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_is_level_of_bucket_times_g(rng, bits, dtype):
    borders, levels = _random_table(rng, bits)
    x = torch.tensor(rng.standard_normal(1003) * 3, dtype=dtype)
    x[: borders.size] = torch.tensor(borders, dtype=dtype)           # exactly on the borders: right-closed
    x.requires_grad_(True)
    g = torch.tensor(rng.standard_normal(1003), dtype=dtype)
    fb.few_bit_activation(x, "silu", borders=borders, levels=levels).backward(g)
    b_t = torch.tensor(borders, dtype=dtype).numpy()
    code = np.searchsorted(b_t, x.detach().numpy(), side="left")
    expected = torch.tensor(levels, dtype=dtype).numpy()[code] * g.numpy()
    assert np.array_equal(x.grad.numpy(), expected)
    # a value on a border belongs to the piece on its left
    assert np.array_equal(code[: borders.size], np.arange(borders.size))


@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_saved_memory_is_bits_over_32(bits):
    x = torch.randn(64, 1000, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fb.FewBitGELU(bits)(x)
    few = sum(saved)
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        F.gelu(x)
    exact = sum(saved)
    assert exact == 4 * x.numel()
    assert few == math.ceil(x.numel() * bits / 8)
    assert few / exact == bits / 32


# ----------------------------------------------------------------------------- packing and encoding
@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("n", [1, 7, 8, 13, 64, 1001])
def test_pack_roundtrip_and_toolbox_layout(rng, bits, n):
    codes = rng.integers(0, 2 ** bits, n).astype(np.uint8)
    for c in (codes, torch.from_numpy(codes)):
        packed = fb.pack_codes(c, bits)
        assert packed.shape[0] == math.ceil(n * bits / 8)
        assert np.array_equal(np.asarray(fb.unpack_codes(packed, bits, n)), codes)
        assert np.array_equal(np.asarray(packed), np.asarray(pack_bits(c, bits)))  # the toolbox's layout


# the multi-threaded numba encoder (normally from ENCODE_PARALLEL_MIN elements on) is exercised at n = 20005 for two
# widths only: once a parallel Numba kernel has run, torch's own threads slow down for the rest of the process
ENCODE_CASES = [(bits, dtype, n) for bits in range(1, 9) for dtype in (np.float32, np.float64) for n in (1, 9, 1000)]
ENCODE_CASES += [(3, np.float32, 20_005), (4, np.float32, 20_005)]


@pytest.mark.parametrize("bits,dtype,n", ENCODE_CASES)
def test_encode_decode_backends_agree(rng, monkeypatch, bits, dtype, n):
    if n > 1000:
        monkeypatch.setattr(fb, "ENCODE_PARALLEL_MIN", 1000)
    borders, levels = _random_table(rng, bits)
    borders = borders.astype(dtype)
    x = (rng.standard_normal(n) * 3).astype(dtype)
    x[: min(n, borders.size)] = borders[: min(n, borders.size)]
    if n > 2:
        x[-1] = np.nan                                              # NaN goes to the last piece, like searchsorted
    ref = fb.encode(x, borders, backend="numpy")
    codes = np.searchsorted(borders, x, side="left").astype(np.uint8)
    assert np.array_equal(fb.unpack_codes(ref, bits, n), codes)
    for backend in ("numba", "torch"):
        xin = torch.from_numpy(x) if backend == "torch" else x
        out = fb.encode(xin, borders if backend != "torch" else torch.from_numpy(borders), backend=backend)
        assert type(out) is type(xin)
        assert np.array_equal(np.asarray(out), ref), backend
    lev = levels.astype(dtype)
    expected = lev[codes]
    for backend in BACKENDS:
        out = fb.decode(ref if backend != "torch" else torch.from_numpy(ref), lev, n, backend=backend)
        assert np.array_equal(np.asarray(out), expected), backend


# ----------------------------------------------------------------------------- the DP (7)
@pytest.mark.parametrize("weight", ["uniform", "normal"])
@pytest.mark.parametrize("name,bits", [("gelu", 1), ("gelu", 3), ("silu", 2), ("silu", 4)])
def test_dp_backends_agree(weight, name, bits):
    grid = fb.default_grid((-100, 100), 6.0, 301)
    big_w, f1, f2 = fb.prefix_integrals(name, grid, weight)
    idx0, e0 = fb.stepwise_dp(big_w, f1, f2, 2 ** bits, backend="numpy")
    for backend in ("numba", "torch"):
        idx, e = fb.stepwise_dp(big_w, f1, f2, 2 ** bits, backend=backend)
        assert np.array_equal(idx, idx0), backend
        assert e == pytest.approx(e0, rel=1e-12)
    back = np.empty((2 ** bits, grid.size), np.int64)               # the multi-threaded numba kernel
    assert fb._dp_numba_parallel(big_w, f1, f2, 2 ** bits, 2, back) == pytest.approx(e0, rel=1e-12)
    assert back[-1, -1] == idx0[-2]


def test_dp_equals_brute_force_and_beats_random_borders(rng):
    grid = fb.default_grid((-100, 100), 4.0, 14)
    big_w, f1, f2 = fb.prefix_integrals("gelu", grid, "normal")
    cost = fb.segment_costs(big_w, f1, f2)
    n = grid.size

    def total(idx):
        return sum(cost[a, b] for a, b in zip(idx[:-1], idx[1:]))

    for k in (1, 2, 3, 4):
        idx, e = fb.stepwise_dp(big_w, f1, f2, k, backend="numba")
        assert total(idx) == pytest.approx(e, rel=1e-12)
        brute = min(total((0, *inner, n - 1)) for inner in itertools.combinations(range(1, n - 1), k - 1))
        assert e == pytest.approx(brute, rel=1e-12, abs=1e-15)
    # a finer grid: random border sets never beat the DP
    grid = fb.default_grid((-100, 100), 6.0, 201)
    big_w, f1, f2 = fb.prefix_integrals("silu", grid, "uniform")
    cost = fb.segment_costs(big_w, f1, f2)
    idx, e = fb.stepwise_dp(big_w, f1, f2, 8, backend="numba")
    for _ in range(300):
        inner = np.sort(rng.choice(np.arange(1, grid.size - 1), 7, replace=False))
        assert total((0, *inner, grid.size - 1)) >= e - 1e-12
        # and a local perturbation of the optimum neither
        pert = idx.copy()
        j = rng.integers(1, 8)
        pert[j] = np.clip(pert[j] + rng.choice([-1, 1]), pert[j - 1] + 1, pert[j + 1] - 1)
        assert total(pert) >= e - 1e-12


@pytest.mark.parametrize("name,bits", CASES)
def test_dp_is_no_worse_than_the_official_table(name, bits):
    """Under the official objective (uniform weight on [-100, 100]) the grid DP is within its grid's resolution of
    the official table, and strictly better where the alternating iteration stopped in a local optimum."""
    dp = fb.optimal_stepwise(name, bits, weight="uniform")
    e_dp = fb.stepwise_error(name, dp.borders, dp.levels, weight="uniform")
    e_off = fb.stepwise_error(name, GOLDEN[f"{name}{bits:02d}_borders"], GOLDEN[f"{name}{bits:02d}_levels"],
                              weight="uniform")
    assert e_dp <= e_off * (1 + 1e-3)
    assert dp.error == pytest.approx(e_dp, rel=1e-4)                  # E* on the grid = the integral (4)
    if (name, bits) in {("gelu", 4), ("silu", 3), ("silu", 4)}:
        assert e_dp < 0.9 * e_off


@pytest.mark.parametrize("name", ["gelu", "silu"])
@pytest.mark.parametrize("weight", ["normal", "uniform"])
def test_error_decreases_with_bits(name, weight):
    errs = [fb.optimal_stepwise(name, b, weight=weight, n_grid=401).error for b in range(1, 6)]
    assert all(a > b for a, b in zip(errs, errs[1:])), errs
    if weight == "uniform":
        off = [fb.stepwise_error(name, GOLDEN[f"{name}{b:02d}_borders"], GOLDEN[f"{name}{b:02d}_levels"],
                                 weight="uniform") for b in range(1, 5)]
        assert all(a > b for a, b in zip(off, off[1:])), off


def test_normal_weight_table_is_the_papers_not_the_official():
    """The N(0,1)-weighted optimum (the paper's) and the uniform one (fewbit's) are different tables."""
    normal = fb.optimal_stepwise("gelu", 2, weight="normal")
    uniform = fb.optimal_stepwise("gelu", 2, weight="uniform")
    assert_close(normal.interior, [-0.5, 0.0, 0.5], rtol=0, atol=0.011, name="normal borders")
    assert_close(uniform.interior, GOLDEN["gelu02_borders"][1:-1], rtol=0, atol=0.011, name="uniform borders")
    assert abs(normal.levels[0] - uniform.levels[0]) > 0.04


@pytest.mark.parametrize("weight", ["uniform", "normal"])
def test_prefix_integrals_and_levels(weight):
    grid = fb.default_grid((-100, 100), 6.0, 61)
    big_w, f1, f2 = fb.prefix_integrals("silu", grid, weight)
    w = (lambda t: 1.0) if weight == "uniform" else (lambda t: math.exp(-t * t / 2) / math.sqrt(2 * math.pi))
    d = lambda t: float(fb.activation_derivative("silu", t))  # noqa: E731
    for j in (1, 17, 30, 45, grid.size - 1):
        pts = [p for p in (-6.0, 0.0, 6.0) if grid[0] < p < grid[j]]
        q = lambda fn: scipy.integrate.quad(fn, grid[0], grid[j], points=pts or None, limit=400,  # noqa: E731
                                            epsabs=1e-13)[0]
        assert big_w[j] == pytest.approx(q(w), rel=1e-7, abs=1e-12)
        assert f1[j] == pytest.approx(q(lambda t: d(t) * w(t)), rel=1e-7, abs=1e-12)
        assert f2[j] == pytest.approx(q(lambda t: d(t) ** 2 * w(t)), rel=1e-7, abs=1e-12)
    # levels (5) are weighted means of f'
    t = fb.optimal_stepwise("silu", 2, weight=weight, grid=grid)
    a, b = t.borders[1], t.borders[2]
    num = scipy.integrate.quad(lambda s: d(s) * w(s), a, b)[0]
    assert t.levels[1] == pytest.approx(num / scipy.integrate.quad(w, a, b)[0], rel=1e-9)


def test_activation_derivative_matches_autograd():
    x = torch.linspace(-12, 12, 2001, dtype=torch.float64, requires_grad=True)
    for name in ("gelu", "silu"):
        (gx,) = torch.autograd.grad(getattr(F, name)(x).sum(), x)
        assert_close(fb.activation_derivative(name, x.detach().numpy()), gx, rtol=1e-13, atol=1e-14, name=name)
        assert_close(fb.activation(name, x.detach().numpy()), getattr(F, name)(x.detach()), rtol=1e-13,
                     atol=1e-14, name=name)


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise():
    b, lv = np.array([-1.0, 0.0, 1.0]), np.arange(4.0)
    with pytest.raises(ValueError, match="activation must be one of"):
        fb.builtin_table("relu", 2)
    with pytest.raises(ValueError, match=r"bits must be in \[1, 8\]"):
        fb.optimal_stepwise("gelu", 0)
    with pytest.raises(TypeError, match="bits must be an int"):
        fb.FewBitGELU(2.0)
    with pytest.raises(ValueError, match="weight must be one of"):
        fb.optimal_stepwise("gelu", 2, weight="laplace")
    with pytest.raises(ValueError, match="domain must be finite with L < R"):
        fb.alternating_stepwise("gelu", 2, domain=(1, -1))
    with pytest.raises(ValueError, match="grid must be a strictly increasing"):
        fb.prefix_integrals("gelu", np.array([0.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="refine must be an even int"):
        fb.prefix_integrals("gelu", np.linspace(-1, 1, 5), refine=3)
    with pytest.raises(ValueError, match="big_w must be strictly increasing"):
        fb.optimal_stepwise("gelu", 2, weight="normal", span=12.0)
    with pytest.raises(ValueError, match="pieces must be an int"):
        fb.stepwise_dp(np.arange(4.0), np.zeros(4), np.zeros(4), 4)
    with pytest.raises(ValueError, match="same length"):
        fb.stepwise_dp(np.arange(4.0), np.zeros(3), np.zeros(4), 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        fb.encode(np.zeros(3), b, backend="cuda")
    with pytest.raises(ValueError, match="interior borders"):
        fb.encode(np.zeros(3), np.zeros(2))
    with pytest.raises(TypeError, match="x must have a floating-point dtype"):
        fb.encode(np.zeros(3, np.int32), b)
    with pytest.raises(ValueError, match=r"levels must have shape \(4,\)"):
        fb.few_bit_activation(torch.zeros(3), "gelu", borders=b, levels=np.arange(3.0))
    with pytest.raises(ValueError, match="pass both borders and levels"):
        fb.few_bit_activation(torch.zeros(3), "gelu", borders=b)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fb.few_bit_activation(np.zeros(3), "gelu")
    with pytest.raises(ValueError, match="codes must be < 2\\*\\*bits"):
        fb.pack_codes(np.array([8], np.uint8), 3)
    with pytest.raises(TypeError, match="codes must be uint8"):
        fb.pack_codes(np.array([1], np.int64), 3)
    with pytest.raises(ValueError, match="table has 4 levels, expected 2\\*\\*bits = 8"):
        fb.FewBitSiLU(3, table=fb.StepwiseTable(np.r_[-100, b, 100], lv))
    with pytest.raises(ValueError, match="levels must be 1-D with 2\\^bits entries"):
        fb.decode(np.zeros(2, np.uint8), np.zeros(3), 4)


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("bits", [1, 2, 3, 4])
def test_cuda_matches_cpu(bits):
    gen = torch.Generator().manual_seed(bits)
    x = torch.randn(4097, generator=gen) * 3
    g = torch.randn(4097, generator=gen)
    grads = []
    for dev in ("cpu", "cuda"):
        xd = x.to(dev).requires_grad_(True)
        y = fb.FewBitGELU(bits).to(dev)(xd)
        y.backward(g.to(dev))
        grads.append(xd.grad.cpu())
        assert torch.allclose(y.detach().cpu(), F.gelu(x), atol=1e-6)
    assert torch.equal(grads[0], grads[1])
    t = fb.builtin_table("silu", bits)
    assert torch.equal(fb.encode(x.cuda(), torch.tensor(t.interior).float().cuda()).cpu(),
                       fb.encode(x, torch.tensor(t.interior).float()))
