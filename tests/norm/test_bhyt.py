"""BHyT: every backend against the official implementation (golden fixtures from
MLAI-Yonsei/BHyT @ e170c9b, see tests/golden/bhyt/PROVENANCE.md), the hand-derived backward
against autograd, gradcheck and a full decoder layer's gradients, and clear errors on bad input.

Tolerances:
- float32 against the official code: rtol 1e-5 / atol 2e-6. Outputs are tanh values in (-1, 1)
  times gains near 1; the official code reduces in a different order (torch's mean) and the numba
  backend uses a rational tanh with max abs error 3.4e-7, so agreement is a few float32 ulps
  (measured: <= 5e-7 absolute).
- Gradients of a whole decoder layer: atol 2e-6 on dx (sums of three paths of O(1) terms) and
  atol 1e-5 on dweight/dlam (sums over 32 rows of O(1) terms, scaled accordingly).
- float64 backends against each other and autograd: 1e-10 (the numba float64 path uses libm's tanh).
"""
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from refimpl._common import assert_close, load_golden
from refimpl.norm.bhyt import (BHyT, BHyTApproxFunction, BHyTFunction, DyT, attention_variance_scaler,
                               bhyt, bhyt_approx, bhyt_approx_backward, bhyt_approx_rstd, bhyt_backward,
                               bhyt_stats, dyt)

BACKENDS = ["numpy", "numba", "torch"]
GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "bhyt"
F32 = dict(rtol=1e-5, atol=2e-6)
F64 = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def helpers():
    return load_golden(GOLDEN / "helpers.npz")


@pytest.fixture(scope="module")
def layer():
    return load_golden(GOLDEN / "decoder_layer.npz")


def _ref_bhyt64(x, w, lam, kappa=10.0, eps=1e-6):
    x = x.astype(np.float64)
    r = 1.0 / (kappa * np.sqrt((x * x).mean(-1, keepdims=True) + eps))
    return w * np.tanh(lam * r * x)


# ----------------------------------------------------------------------------- official code
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_matches_official(helpers, backend):
    g = helpers
    y = bhyt(g["x"], g["weight"], g["lam"], float(g["kappa"]), backend=backend)
    assert y.dtype == np.float32 and y.shape == g["x"].shape
    assert_close(y, g["y1"], **F32, name=f"BHyT.forward [{backend}]")
    r, s = bhyt_stats(g["x"], float(g["kappa"]), backend=backend)
    assert_close(r, g["rstd1"], rtol=1e-6, atol=0, name="rstd1")
    assert_close(s, g["var_x"], rtol=1e-6, atol=0, name="var_x")


def test_update_scaler_and_rstd2_match_official(helpers):
    g = helpers
    c = attention_variance_scaler(g["W_V"], g["W_O"], int(g["seq_len"]), int(g["num_kv_groups"]), head_dim=16)
    assert_close(np.float64(c), g["c_attn"], rtol=1e-6, atol=0, name="c_attn")
    # without the grouped-query expansion the scaler is wrong: the test can fail
    with pytest.raises(ValueError, match="w_o must have shape"):
        attention_variance_scaler(g["W_V"], g["W_O"], int(g["seq_len"]))
    r2 = bhyt_approx_rstd(g["var_x"], c, g["lam_in"], float(g["kappa"]))
    assert_close(r2, g["rstd2"], rtol=1e-6, atol=0, name="rstd2")
    r2t = bhyt_approx_rstd(torch.from_numpy(g["var_x"]), c, torch.from_numpy(g["lam_in"]), float(g["kappa"]))
    assert_close(r2t, g["rstd2"], rtol=1e-6, atol=0, name="rstd2 (torch)")


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoder_layer_norms_and_gradients_match_official(layer, backend):
    """Both norms of one official LlamaDecoderLayer and every gradient they produce: the layer's
    input gradient is rebuilt as grad_out (residual) + the second norm's path + the first norm's
    path, including the gradient through the reused statistic s (eq. 10 into eq. 8)."""
    g = layer
    kappa, c = float(g["kappa"]), float(g["c_attn"])
    y1 = bhyt(g["x"], g["in_weight"], g["in_lam"], kappa, backend=backend)
    assert_close(y1, g["in_out"], **F32, name="input_layernorm output")
    _, s = bhyt_stats(g["x"], kappa, backend=backend)
    y2 = bhyt_approx(g["post_in"], s, g["post_weight"], g["post_lam"], c, g["in_lam"], kappa, backend=backend)
    assert_close(y2, g["post_out"], **F32, name="post_attention_layernorm output")
    dh, ds, dwp, dlp = bhyt_approx_backward(g["post_gout"], g["post_in"], s, g["post_weight"], g["post_lam"],
                                            c, g["in_lam"], kappa, backend=backend)
    dx1, dwi, dli = bhyt_backward(g["in_gout"], g["x"], g["in_weight"], g["in_lam"], kappa, grad_var=ds,
                                  backend=backend)
    assert_close(dx1 + dh + g["grad_out"], g["grad_x"], rtol=1e-5, atol=2e-6, name="dx")
    assert_close(dwi, g["grad_in_weight"], rtol=1e-5, atol=1e-5, name="d input weight")
    assert_close(dwp, g["grad_post_weight"], rtol=1e-5, atol=1e-5, name="d post weight")
    assert_close(np.reshape(dli, 1), g["grad_in_lam"], rtol=1e-5, atol=1e-5, name="d input lam")
    assert_close(np.reshape(dlp, 1), g["grad_post_lam"], rtol=1e-5, atol=1e-5, name="d post lam")
    # dropping the path through s (the official code keeps it) changes dx beyond tolerance
    dx_nos, _, _ = bhyt_backward(g["in_gout"], g["x"], g["in_weight"], g["in_lam"], kappa, backend=backend)
    assert not np.allclose(dx_nos + dh + g["grad_out"], g["grad_x"], rtol=1e-5, atol=2e-6)


def test_autograd_functions_match_official_layer(layer):
    g = layer
    kappa = float(g["kappa"])
    t = {k: torch.tensor(g[k], requires_grad=True) for k in ("x", "post_in", "in_weight", "in_lam",
                                                               "post_weight", "post_lam")}
    norm_in, norm_post = BHyT(64, 2.0, kappa), BHyT(64, 1.0, kappa)
    with torch.no_grad():
        norm_in.weight.copy_(t["in_weight"])
        norm_post.weight.copy_(t["post_weight"])
    y1, s = norm_in.forward_with_stats(t["x"])
    y2 = norm_post.forward_approx(t["post_in"], s, float(g["c_attn"]), norm_in.lam.detach())
    assert_close(y1, g["in_out"], **F32)
    assert_close(y2, g["post_out"], **F32)
    (y1 * torch.from_numpy(g["in_gout"])).sum().backward(retain_graph=True)
    dh, = torch.autograd.grad((y2 * torch.from_numpy(g["post_gout"])).sum(), t["post_in"], retain_graph=True)
    (y2 * torch.from_numpy(g["post_gout"])).sum().backward()
    # t["x"].grad holds the first norm's path and the path through s; add the residual paths
    assert_close(t["x"].grad + dh + torch.from_numpy(g["grad_out"]), g["grad_x"], rtol=1e-5, atol=2e-6)
    assert_close(norm_in.lam.grad, g["grad_in_lam"], rtol=1e-5, atol=1e-5)
    assert_close(norm_post.lam.grad, g["grad_post_lam"], rtol=1e-5, atol=1e-5)
    assert_close(norm_in.weight.grad, g["grad_in_weight"], rtol=1e-5, atol=1e-5)
    assert_close(norm_post.weight.grad, g["grad_post_weight"], rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------- backends, autograd
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(4, 8), (3, 5, 16), (7, 1000), (2, 1), (5, 1300)])
def test_forward_and_backward_against_float64_reference(rng, backend, dtype, shape):
    x = (rng.standard_normal(shape) * 3 + 0.5).astype(dtype)
    w = rng.standard_normal(shape[-1]).astype(dtype)
    lam = 2.5
    y = bhyt(x, w, lam, backend=backend)
    tol = F32 if dtype == np.float32 else F64
    assert y.dtype == dtype
    assert_close(y, _ref_bhyt64(x, w, lam), **tol, name=f"y [{backend}]")
    # backward against autograd on the float64 composition of torch ops
    gy = rng.standard_normal(shape).astype(dtype)
    gs = rng.standard_normal(shape[:-1] + (1,)).astype(dtype)
    xt = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    wt = torch.tensor(w, dtype=torch.float64, requires_grad=True)
    lt = torch.tensor(lam, dtype=torch.float64, requires_grad=True)
    s = xt.square().mean(-1, keepdim=True)
    yt = wt * torch.tanh(lt * torch.rsqrt(s + 1e-6) / 10.0 * xt)
    ((yt * torch.from_numpy(gy.astype(np.float64))).sum() + (s * torch.from_numpy(gs.astype(np.float64))).sum()).backward()
    dx, dw, dl = bhyt_backward(gy, x, w, lam, grad_var=gs, backend=backend)
    rows = x.size // shape[-1]
    assert_close(dx, xt.grad, rtol=tol["rtol"], atol=tol["atol"] * 5, name="dx")
    assert_close(dw, wt.grad, rtol=tol["rtol"], atol=tol["atol"] * rows, name="dweight")
    assert_close(np.float64(dl), lt.grad, rtol=tol["rtol"] * 10, atol=tol["atol"] * rows * 10, name="dlam")


@pytest.mark.parametrize("backend", BACKENDS)
def test_approx_norm_against_autograd(rng, backend):
    h = rng.standard_normal((6, 48))
    s = rng.uniform(0.5, 3.0, (6, 1))
    w = rng.standard_normal(48)
    c, lam, lam_in = 0.03, 1.5, 2.0
    ht, st, wt, lt = (torch.tensor(a, requires_grad=True) for a in (h, s, w, np.float64(lam)))
    y = wt * torch.tanh(lt * h.dtype.type(1) * torch.rsqrt(st + c * lam_in ** 2 / 100 + 1e-6) / 10 * ht)
    gy = rng.standard_normal(h.shape)
    (y * torch.from_numpy(gy)).sum().backward()
    assert_close(bhyt_approx(h, s, w, lam, c, lam_in, backend=backend), y.detach(), **F64)
    dh, ds, dw, dl = bhyt_approx_backward(gy, h, s, w, lam, c, lam_in, backend=backend)
    for got, ref, name in ((dh, ht.grad, "dh"), (ds, st.grad, "ds"), (dw, wt.grad, "dw"), (np.float64(dl), lt.grad, "dlam")):
        assert_close(got, ref, **F64, name=name)


def test_gradcheck_float64(rng):
    x = torch.tensor(rng.standard_normal((2, 3, 7)) * 2, requires_grad=True)
    w = torch.tensor(rng.standard_normal(7), requires_grad=True)
    lam = torch.tensor([1.7], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, l: BHyTFunction.apply(x, w, l, 10.0, 1e-6), (x, w, lam),
                                    eps=1e-6, atol=1e-7)
    h = torch.tensor(rng.standard_normal((2, 3, 7)), requires_grad=True)
    s = torch.tensor(rng.uniform(0.5, 2, (2, 3, 1)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, s, w, l: BHyTApproxFunction.apply(h, s, w, l, 0.04, 10.0, 1e-6),
                                    (h, s, w, lam), eps=1e-6, atol=1e-7)
    # the chained pair, as inside a block: gradient reaches x through s
    assert torch.autograd.gradcheck(
        lambda x, h: BHyTApproxFunction.apply(h, BHyTFunction.apply(x, None, lam, 3.0, 1e-6)[1], None, lam, 0.1, 3.0, 1e-6),
        (x, h), eps=1e-6, atol=1e-7)


def test_backends_agree_and_keep_input_type(rng):
    x = rng.standard_normal((16, 64))
    outs = [bhyt(x, None, 2.0, backend=bk) for bk in BACKENDS]
    for o in outs[1:]:
        assert_close(o, outs[0], **F64)
    assert isinstance(bhyt(torch.from_numpy(x), backend="auto"), torch.Tensor)
    assert isinstance(bhyt(x.astype(np.float32), backend="auto"), np.ndarray)


def test_paper_properties(rng):
    """The pre-tanh argument has RMS lam/kappa (bounded, whatever the input scale); the output is
    invariant to rescaling a row; and with a near-zero lam BHyT is RMSNorm times lam/kappa."""
    x = rng.standard_normal((8, 256)) * 50.0
    r, _ = bhyt_stats(x, backend="numpy")
    z = 2.0 * r * x
    assert_close(np.sqrt((z * z).mean(-1)), np.full(8, 0.2), rtol=1e-6)
    assert_close(bhyt(1e3 * x, lam=2.0, backend="numba"), bhyt(x, lam=2.0, backend="numba"), rtol=1e-6, atol=1e-9)
    xt = torch.from_numpy(x)
    lam = 1e-4
    rms = F.rms_norm(xt, (256,), eps=1e-6)
    assert_close(bhyt(xt, lam=lam) * (10.0 / lam), rms, rtol=1e-6, atol=1e-6)


def test_dyt_and_modules(rng):
    x = torch.from_numpy(rng.standard_normal((2, 5, 8)).astype(np.float32))
    m = DyT(8, alpha_init=0.7)
    assert_close(m(x), torch.tanh(0.7 * x), rtol=1e-6)
    assert_close(dyt(x.numpy(), alpha=0.7), torch.tanh(0.7 * x), rtol=1e-6)
    b = BHyT(8, lam_init=2.0)
    assert b.lam.requires_grad and "kappa=10" in repr(b)
    assert not BHyT(8, learnable_lam=False).lam.requires_grad
    assert_close(b(x), bhyt(x.numpy(), lam=2.0, backend="numpy"), **F32)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise(backend):
    x = np.ones((2, 3), np.float32)
    with pytest.raises(ValueError, match="weight must have shape"):
        bhyt(x, np.ones(4, np.float32), backend=backend)
    with pytest.raises(ValueError, match="kappa"):
        bhyt(x, kappa=0.0, backend=backend)
    with pytest.raises(ValueError, match="eps"):
        bhyt(x, eps=-1.0, backend=backend)
    with pytest.raises(ValueError, match="lam must be finite"):
        bhyt(x, lam=float("nan"), backend=backend)
    with pytest.raises(ValueError, match="lam must be a scalar"):
        bhyt(x, lam=np.ones(3), backend=backend)
    with pytest.raises(TypeError, match="lam must be a real number"):
        bhyt(x, lam="2", backend=backend)
    with pytest.raises(TypeError, match="floating"):
        bhyt(np.ones((2, 3), np.int64), backend=backend)
    with pytest.raises(TypeError, match="numpy.ndarray or torch.Tensor"):
        bhyt([[1.0, 2.0]], backend=backend)
    with pytest.raises(ValueError, match="non-empty last"):
        bhyt(np.ones((2, 0), np.float32), backend=backend)
    bad = x.copy()
    bad[1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity .*row 1"):
        bhyt(bad, backend=backend)
    bad[1, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or infinity"):
        bhyt_stats(bad, backend=backend)
    with pytest.raises(ValueError, match="grad_out must have"):
        bhyt_backward(np.ones((2, 2), np.float32), x, backend=backend)
    with pytest.raises(ValueError, match="grad_var must hold one value per row"):
        bhyt_backward(x, x, grad_var=np.ones(3, np.float32), backend=backend)
    with pytest.raises(ValueError, match="s must hold one value per row"):
        bhyt_approx(x, np.ones((3, 1)), backend=backend)
    with pytest.raises(ValueError, match="c must be >= 0"):
        bhyt_approx(x, np.ones((2, 1)), c=-1.0, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        bhyt(x, backend="cuda")


def test_scaler_bad_inputs():
    wv, wo = np.ones((8, 8)), np.ones((8, 16))
    with pytest.raises(ValueError, match="seq_len"):
        attention_variance_scaler(wv, wo[:, :8], 0)
    with pytest.raises(ValueError, match="head_dim"):
        attention_variance_scaler(wv, wo, 4, num_kv_groups=2)
    with pytest.raises(ValueError, match="2-D"):
        attention_variance_scaler(wv[0], wo, 4)
    with pytest.raises(ValueError, match="hidden_size"):
        BHyT(0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(dtype):
    torch.manual_seed(0)
    x = (torch.randn(512, 1024) * 2 + 0.3)
    w = torch.randn(1024)
    g = torch.randn(512, 1024)
    ref = bhyt(x.double(), w.double(), 2.0)
    xc = x.to("cuda", dtype).requires_grad_()
    wc = w.to("cuda", dtype).requires_grad_()
    y = bhyt(xc, wc, 2.0)
    y.backward(g.to("cuda", dtype))
    dx, dw, _ = bhyt_backward(g.double(), x.double(), w.double(), 2.0)
    tol = dict(rtol=1e-5, atol=2e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    assert_close(y.float().cpu(), ref, **tol, name="y")
    assert_close(xc.grad.float().cpu(), dx, rtol=tol["rtol"], atol=tol["atol"] * 8, name="dx")
    assert_close(wc.grad.float().cpu(), dw, rtol=tol["rtol"] * 10, atol=tol["atol"] * 512, name="dw")
