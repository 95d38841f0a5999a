"""AdaQuant / CalibTIP: the fake-quantization backends against the NumPy reference; the quantized
layer, its gradients and AdaQuant runs against golden fixtures of the official CalibTIP code
(tests/golden/adaquant_calibtip); the integer program (scipy milp) against the official pulp/CBC
policies; BN tuning and the sequential variant by their invariants; clear errors on bad input.

Tolerances:
* Backends: the three backends perform the same IEEE operations in the official order (true
  division, round-half-even, and two sweeps so LLVM cannot fuse ``q*s - z*s`` into an FMA), so they
  agree bit for bit here; we allow 1e-6 of the value scale (one float32 ulp at |x| ~ 8) for CPUs whose
  compilers fuse differently.
* Measured ranges, forward and gradients vs the official float32 code: rtol 1e-5 / atol 1e-6
  (measured max abs error 6e-6 on gradients of size ~30, i.e. 2e-7 relative: the official code
  running-averages the per-row weight min/max over the calibration batches, which moves the
  range by one ulp, and sums gradients in another order).
* AdaQuant, 10 Adam steps (short run): W, b, ranges and zero points at atol 1e-6, the MSEs at rtol
  1e-5 (measured: <= 3e-8 on every parameter, MSEs equal). 300 steps (long run): Adam's normalised
  steps amplify ulp differences, so atol 1e-4 on parameters and rtol 1e-3 on the MSE (measured:
  <= 1e-6).
* Integer program: both solvers are exact on this 24-binary problem; the policies must be identical
  and the objective equal to 1e-9 (absolute; objectives are O(1)).
There is no custom ``autograd.Function`` to gradcheck: the straight-through rounding is the toolbox's
``round_ste`` and every other derivative is torch's own; the gradients are compared with the official
code's instead (finite differences of a rounding function are meaningless).
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from refimpl._common import assert_close, load_golden
from refimpl.quant.adaquant_calibtip import (QuantLinear, adaquant, bn_tune, fake_quant, ip_bit_allocation,
                                             layer_degradation, measure_activation_qparams, measure_weight_qparams,
                                             quantize_mlp)
from refimpl.quant.quantizers import fake_quantize

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "adaquant_calibtip"
BACKENDS = ["numpy", "numba", "torch"]
PARAMS = ["weight", "bias", "in_range", "in_zero", "w_range", "w_zero"]


@pytest.fixture
def one_thread():
    """Tiny layers: one torch thread is faster and immune to a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _golden(bits):
    return load_golden(GOLDEN / f"adaquant_w{bits}.npz")


def _layer(g):
    X, Y = torch.from_numpy(g["X"]), torch.from_numpy(g["Y"])
    lin = torch.nn.Linear(*g["W0"].shape[::-1])
    with torch.no_grad():
        lin.weight.copy_(torch.from_numpy(g["W0"]))
        lin.bias.copy_(torch.from_numpy(g["b0"]))
    return lin, X, Y, QuantLinear.from_linear(lin, list(X.split(50)), int(g["bits"]))


# ----------------------------------------------------------------------------- critical loop
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("per_row", [True, False])
def test_backends_agree(backend, dtype, bits, per_row, rng):
    x = (rng.standard_normal((64, 300)) * 3).astype(dtype)
    if per_row:
        r = rng.uniform(1, 6, (64, 1)).astype(dtype)
        m = -rng.uniform(0, 3, (64, 1)).astype(dtype)
    else:
        r, m = np.array([5.0], dtype), np.array([-2.0], dtype)
    ref = fake_quant(x, r, m, bits, backend="numpy")
    out = fake_quant(torch.from_numpy(x), torch.from_numpy(r), torch.from_numpy(m), bits, backend="torch") \
        if backend == "torch" else fake_quant(x, r, m, bits, backend=backend)
    assert type(out) is (torch.Tensor if backend == "torch" else np.ndarray)
    assert_close(out, ref, rtol=0, atol=1e-6 * 8, name=f"fake_quant[{backend}]")
    # the output lies on the grid: at most 2^bits distinct values per group
    assert len(np.unique(ref[0])) <= 2 ** bits


def test_large_input_parallel_path(rng):
    x = rng.standard_normal((600, 600)).astype(np.float32)
    r, m = np.array([4.0], np.float32), np.array([-2.0], np.float32)
    assert_close(fake_quant(x, r, m, 4, backend="numba"), fake_quant(x, r, m, 4, backend="numpy"), rtol=0, atol=8e-6)


def test_matches_toolbox_q2_on_min_max(rng):
    """With the measured min/max of rows that straddle 0, eq. (3) is the toolbox's asymmetric
    quantizer Q2; the two differ only where x/s + z and (x + z s)/s round to different sides of a tie."""
    w = rng.standard_normal((32, 128)).astype(np.float32)
    r, m = measure_weight_qparams(torch.from_numpy(w))
    ours = fake_quant(w, r.numpy(), m.numpy(), 4, backend="numpy")
    q2 = fake_quantize(w, 4, mode="asymmetric", granularity="channel", axis=0, backend="numpy")
    assert np.mean(np.isclose(ours, q2, rtol=0, atol=1e-6)) > 0.999


# ----------------------------------------------------------------------------- official golden
@pytest.mark.parametrize("bits", [4, 8])
def test_measured_qparams_match_official(bits):
    g = _golden(bits)
    _, _, _, q = _layer(g)
    for k in ("in_range", "in_zero", "w_range", "w_zero"):
        assert_close(getattr(q, k).detach(), g["measured_" + k], rtol=1e-5, atol=1e-6, name=k)


@pytest.mark.parametrize("bits", [4, 8])
def test_forward_and_gradients_match_official(bits):
    g = _golden(bits)
    _, X, _, q = _layer(g)
    out = q(X)
    (out * torch.from_numpy(g["G"])).sum().backward()
    assert_close(out.detach(), g["forward"], rtol=1e-5, atol=1e-6, name="forward")
    for k in PARAMS:
        assert_close(getattr(q, k).grad, g["grad_" + k], rtol=1e-5, atol=1e-5, name="grad " + k)


@pytest.mark.parametrize("bits,run", [(4, "short"), (4, "relu"), (8, "short"), (4, "long")])
def test_adaquant_matches_official(bits, run, one_thread):
    g = _golden(bits)
    _, X, Y, q = _layer(g)
    torch.manual_seed(1)
    idx = torch.randperm(X.shape[0])[:50]
    mse = adaquant(q, X, Y, X[idx], Y[idx], iters=int(g[run + "_iters"]), relu=run == "relu")
    ptol, mtol = (dict(rtol=0, atol=1e-4), 1e-3) if run == "long" else (dict(rtol=0, atol=1e-6), 1e-5)
    for k in PARAMS:
        assert_close(getattr(q, k).detach(), g[f"{run}_{k}"], name=f"{run} {k}", **ptol)
    assert_close(np.array(mse), g[run + "_mse"], rtol=mtol, atol=0, name="mse before/after")
    assert mse[1] < mse[0]


def test_adaquant_moves_parameters(one_thread):
    """A test that can fail: without optimisation the parameters stay at the measured values, which
    are far (>> tolerance) from the official AdaQuant result."""
    g = _golden(4)
    _, _, _, q = _layer(g)
    assert np.abs(q.in_range.detach().numpy() - g["long_in_range"]).max() > 1e-3


@pytest.mark.parametrize("method", ["loss", "acc"])
def test_ip_matches_official_policy(method):
    g = load_golden(GOLDEN / "ip.npz")
    tab = g[method + "_table"]                       # (precision [4, 2], baseline + 8 layers)
    base = tab[0, 0]
    dl = layer_degradation(base, tab[:, 1:], higher_is_better=method == "acc")
    for D, pol, exp, comp in zip(g[method + "_D"], g[method + "_policy"], g[method + "_expected"],
                                 g[method + "_compression"]):
        bits, obj, c = ip_bit_allocation(dl, g["sizes"], [4, 2], float(D))
        np.testing.assert_array_equal(bits, pol, err_msg=f"policy at D={D}")
        official_obj = (exp - base) if method == "loss" else (base - exp)
        assert abs(obj - official_obj) < 1e-9
        assert abs(c - comp) < 1e-12 and c <= D + 1e-12


def test_ip_degradation_floor():
    dl = layer_degradation(1.0, [[0.9, 1.5]])       # the first layer improves: clipped to 1e-6
    np.testing.assert_allclose(dl, [[1e-6, 0.5]])


# ----------------------------------------------------------------------------- invariants
def _mlp(seed=0):
    torch.manual_seed(seed)
    return [torch.nn.Linear(12, 16), torch.nn.Linear(16, 16), torch.nn.Linear(16, 5)]


def test_sequential_first_layer_equals_parallel(one_thread):
    x = torch.randn(200, 12)
    lins = _mlp()
    torch.manual_seed(3)
    par = quantize_mlp(lins, x, 4, method="adaquant", iters=20)
    torch.manual_seed(3)
    seq = quantize_mlp(lins, x, 4, method="adaquant_seq", iters=20)
    for k in PARAMS:
        assert torch.equal(getattr(par[0], k), getattr(seq[0], k))
    # the second layer sees different inputs in the two variants
    assert not torch.equal(par[1].in_range, seq[1].in_range)


def test_bn_tune_restores_statistics():
    x = torch.randn(400, 12)
    lins = _mlp(1)
    qs = quantize_mlp(lins, x, 3, method="measure")
    gam, bet = torch.rand(16) + 0.5, torch.randn(16)
    bn_tune(qs, [gam, None, None], [bet, None, None], x)
    y = qs[0](x)
    assert_close(y.mean(0), bet, rtol=0, atol=0.05, name="mean after BN tuning")
    assert_close(y.std(0, unbiased=False), gam, rtol=0.05, atol=0.01, name="std after BN tuning")


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs(rng):
    x = rng.standard_normal((4, 5)).astype(np.float32)
    r, m = np.ones((4, 1), np.float32), -np.ones((4, 1), np.float32)
    with pytest.raises(ValueError, match="bits must be in"):
        fake_quant(x, r, m, 0)
    with pytest.raises(TypeError, match="bits must be an int"):
        fake_quant(x, r, m, 4.0)
    with pytest.raises(TypeError, match="floating-point dtype"):
        fake_quant(x.astype(np.int32), r, m, 4)
    with pytest.raises(ValueError, match="same shape"):
        fake_quant(x, r, m[:2], 4)
    with pytest.raises(ValueError, match="per-row qrange"):
        fake_quant(x, np.ones((3, 1), np.float32), -np.ones((3, 1), np.float32), 4)
    with pytest.raises(ValueError, match="NaN"):
        fake_quant(np.full((4, 5), np.nan, np.float32), r, m, 4, backend="numpy")
    with pytest.raises(ValueError, match="backend must be one of"):
        fake_quant(x, r, m, 4, backend="cuda")
    lin = torch.nn.Linear(5, 3)
    with pytest.raises(TypeError, match="layer must be a QuantLinear"):
        adaquant(lin, torch.randn(10, 5), torch.randn(10, 3))
    q = QuantLinear.from_linear(lin, [torch.randn(10, 5)], 4)
    with pytest.raises(ValueError, match="same N"):
        adaquant(q, torch.randn(10, 5), torch.randn(9, 3))
    with pytest.raises(ValueError, match="iters must be"):
        adaquant(q, torch.randn(10, 5), torch.randn(10, 3), iters=-1)
    with pytest.raises(TypeError, match="linear must be a torch.nn.Linear"):
        QuantLinear.from_linear(q, [torch.randn(10, 5)], 4)
    with pytest.raises(ValueError, match="at least one calibration batch"):
        measure_activation_qparams([])
    with pytest.raises(ValueError, match="method must be"):
        quantize_mlp([lin], torch.randn(10, 5), 4, method="rtn")
    with pytest.raises(ValueError, match="budget must lie"):
        ip_bit_allocation(np.ones((2, 3)), [1, 2, 3], [4, 2], 1.5)
    with pytest.raises(ValueError, match="degradation must have shape"):
        ip_bit_allocation(np.ones((3, 3)), [1, 2, 3], [4, 2], 0.2)
    with pytest.raises(ValueError, match="no bit allocation fits"):
        ip_bit_allocation(np.ones((2, 3)), [1, 2, 3], [4, 2], 0.01)   # below 2 bits everywhere


@pytest.mark.gpu
def test_cuda_matches_numpy(rng):
    x = rng.standard_normal((256, 300)).astype(np.float32)
    r = rng.uniform(1, 6, (256, 1)).astype(np.float32)
    m = -rng.uniform(0, 3, (256, 1)).astype(np.float32)
    out = fake_quant(torch.from_numpy(x).cuda(), torch.from_numpy(r).cuda(), torch.from_numpy(m).cuda(), 4)
    assert out.is_cuda
    assert_close(out.cpu(), fake_quant(x, r, m, 4, backend="numpy"), rtol=0, atol=8e-6)
