"""PowerNorm: every backend of the critical loops against the numpy reference and against the
closed form; the ``official_compat`` module step by step against golden fixtures of the official
MaskPowerNorm (tests/golden/powernorm); the paper's mode against Algorithm 1 written out by hand;
gradcheck of the custom backward; clear errors on bad input.

Tolerances: the golden fixtures are float32 outputs of the official code. Our compat mode computes
the same float32 operations in a slightly different order (rsqrt-multiply instead of divide, one
reduction instead of nested means), so outputs and gradients, all O(1)-O(10), agree to a few ulps:
we use rtol 1e-5 / atol 1e-5 (measured max abs error < 2e-6). Backend comparisons: float32 at
rtol 1e-5 / atol 1e-5 (reductions over <= 4096 rows, accumulated in float64 by numpy and in
256-row float32 chunks by numba: ~1e-6 relative), float64 at 1e-10. gradcheck in float64 at its
default tolerances.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from refimpl._common import assert_close, load_golden
from refimpl.norm.powernorm import (PowerNorm, PowerNormFunction, group_scaling, power_norm,
                                    power_norm_backward, quadratic_mean)

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "powernorm"
BACKENDS = ["numpy", "numba", "torch"]
SHAPES = [(6, 4), (5, 3, 16), (4096, 8), (300, 33), (1, 1)]
TOL = {np.float32: dict(rtol=1e-5, atol=1e-5), np.float64: dict(rtol=1e-10, atol=1e-10)}
GTOL = dict(rtol=1e-5, atol=1e-5)


def _valid(rng, shape):
    v = rng.random(shape[:-1]) < 0.7
    v.reshape(-1)[0] = True
    return v


# ----------------------------------------------------------------------------- critical loops
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("masked", [False, True])
def test_quadratic_mean(rng, backend, dtype, shape, masked):
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    v = _valid(rng, shape) if masked else None
    x64 = x.reshape(-1, shape[-1]).astype(np.float64)
    keep = x64 if v is None else x64[v.reshape(-1)]
    expected = (keep ** 2).sum(0) / keep.shape[0]                      # eq. (1) in closed form
    got = quadratic_mean(x, v, backend=backend)
    assert isinstance(got, np.ndarray) and got.dtype == dtype and got.shape == (shape[-1],)
    assert_close(got, expected, **TOL[dtype], name=f"quadratic_mean[{backend}]")
    got_t = quadratic_mean(torch.from_numpy(x), None if v is None else torch.from_numpy(v), backend=backend)
    assert isinstance(got_t, torch.Tensor)
    assert_close(got_t, expected, **TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("running", [False, True])
def test_power_norm_forward(rng, backend, dtype, running):
    x = (rng.standard_normal((7, 3, 24)) * 3).astype(dtype)
    w, b = rng.standard_normal(24).astype(dtype), rng.standard_normal(24).astype(dtype)
    psi2 = (rng.random(24) + 0.5).astype(dtype) if running else None
    v = _valid(rng, x.shape)
    y, psi2_b = power_norm(x, w, b, psi2, eps=1e-5, valid=v, backend=backend)
    x64 = x.astype(np.float64)
    pb = (x64[v] ** 2).mean(0)
    denom = np.sqrt((pb if psi2 is None else psi2.astype(np.float64)) + 1e-5)
    assert_close(psi2_b, pb, **TOL[dtype], name="psi2_B")
    assert_close(y, w * x64 / denom + b, **TOL[dtype], name=f"y[{backend}]")   # eqs. (2)-(3)
    assert y.dtype == dtype and y.shape == x.shape


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(9, 5), (4096, 16), (3, 7, 40)])
@pytest.mark.parametrize("masked", [False, True])
def test_power_norm_backward_backends_agree(rng, backend, dtype, shape, masked):
    c = shape[-1]
    dy, z = (rng.standard_normal(shape).astype(dtype) for _ in range(2))
    w, nu = rng.standard_normal(c).astype(dtype), (0.3 * rng.standard_normal(c)).astype(dtype)
    rstd = (rng.random(c) + 0.5).astype(dtype)
    v = _valid(rng, shape) if masked else None
    ref = power_norm_backward(dy, z, w, nu, rstd, v, backend="numpy")
    got = power_norm_backward(dy, z, w, nu, rstd, v, backend=backend)
    n_rows = z.size // c
    for name, a, e in zip(["dx", "dweight", "dbias", "Gamma", "Lambda"], got, ref):
        atol = TOL[dtype]["atol"] * (n_rows if name in ("dweight", "dbias") else 1)
        assert_close(a, e, rtol=TOL[dtype]["rtol"], atol=atol, name=f"{name}[{backend}]")
    # the numpy reference against eqs. (5), (6), (8) written out in float64
    d, zz = dy.reshape(-1, c).astype(np.float64), z.reshape(-1, c).astype(np.float64)
    g = d * w
    keep = np.ones(len(zz), bool) if v is None else v.reshape(-1)
    assert_close(ref[0].reshape(-1, c), (g - nu * zz) * rstd, **TOL[dtype], name="dx eq. 5")
    assert_close(ref[3], (zz[keep] ** 2).mean(0), **TOL[dtype], name="Gamma eq. 6")
    assert_close(ref[4], (g[keep] * zz[keep]).mean(0), **TOL[dtype], name="Lambda eq. 6")
    assert_close(ref[1], (d * zz).sum(0), rtol=1e-5, atol=1e-5 * n_rows, name="dgamma eq. 8")


# ----------------------------------------------------------------------------- official golden
def _run_compat(d, official_compat=True):
    g = int(d["group_num"])
    m = PowerNorm(d["x"].shape[-1], eps=float(d["eps"]), alpha_fwd=float(d["alpha_fwd"]),
                  alpha_bkw=float(d["alpha_bkw"]), warmup_iters=int(d["warmup_iters"]), group_num=g,
                  official_compat=official_compat)
    m.train()
    for s in range(d["x"].shape[0]):
        with torch.no_grad():
            m.weight.copy_(torch.from_numpy(d["weight"][s]))
            m.bias.copy_(torch.from_numpy(d["bias"][s]))
        m.zero_grad()
        x = torch.from_numpy(d["x"][s]).requires_grad_()
        y = m(x, torch.from_numpy(d["mask"][s]))
        y.backward(torch.from_numpy(d["G"][s]))
        yield s, m, x, y


@pytest.mark.parametrize("group_num", [1, 2])
def test_compat_matches_official_golden_step_by_step(group_num):
    d = load_golden(GOLDEN / f"mask_powernorm_g{group_num}.npz")
    assert int(d["group_num"]) == group_num
    for s, m, x, y in _run_compat(d):
        tag = f"g{group_num} step {s + 1}"
        assert int(m.iters) == int(d["iters"][s][0])
        assert_close(y, d["y"][s], **GTOL, name=f"y {tag}")
        assert_close(x.grad, d["x_grad"][s], **GTOL, name=f"x.grad {tag}")
        assert_close(m.weight.grad, d["weight_grad"][s], **GTOL, name=f"weight.grad {tag}")
        assert_close(m.bias.grad, d["bias_grad"][s], **GTOL, name=f"bias.grad {tag}")
        assert_close(m.running_phi, d["running_phi"][s], **GTOL, name=f"running_phi {tag}")
        assert_close(m.ema_gz, d["ema_gz"][s], **GTOL, name=f"ema_gz {tag}")
    m.eval()
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(d["eval_weight"]))
        m.bias.copy_(torch.from_numpy(d["eval_bias"]))
        assert_close(m(torch.from_numpy(d["x_eval"])), d["y_eval"], **GTOL, name="eval output")


def test_golden_fixtures_discriminate():
    """The fixtures are not trivially matched: the paper's mode (no group scaling, no warm-up,
    running statistics in the backward pass) misses them by far."""
    d = load_golden(GOLDEN / "mask_powernorm_g2.npz")
    s, m, x, y = list(_run_compat(d, official_compat=False))[-1]
    assert np.abs(y.detach().numpy() - d["y"][s]).max() > 0.1
    assert np.abs(x.grad.numpy() - d["x_grad"][s]).max() > 0.1


# ----------------------------------------------------------------------------- paper mode
def test_paper_mode_is_algorithm_1(rng):
    """Four training steps of PowerNorm(official_compat=False) against Algorithm 1 by hand."""
    c, a_f, a_b, eps = 6, 0.9, 0.8, 1e-5
    m = PowerNorm(c, eps=eps, alpha_fwd=a_f, alpha_bkw=a_b).double()
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(rng.standard_normal(c)))
    psi2, nu = np.ones(c), np.zeros(c)
    w = m.weight.detach().numpy().copy()
    for _ in range(4):
        x = rng.standard_normal((5, 3, c)) * 2
        pad = rng.random((3, 5)) < 0.3
        pad[0, 0] = False
        dy = rng.standard_normal((5, 3, c))
        xt = torch.tensor(x, requires_grad=True)
        m(xt, torch.from_numpy(pad)).backward(torch.from_numpy(dy))
        keep = ~pad.T                                                   # (T, B)
        psi2_b = (x[keep] ** 2).mean(0)                                 # (1)
        xhat = x / np.sqrt(psi2 + eps)                                  # (2)
        g = dy * w                                                      # (5)
        dx = (g - nu * xhat) / np.sqrt(psi2 + eps)
        gam, lam = (xhat[keep] ** 2).mean(0), (g[keep] * xhat[keep]).mean(0)   # (6)
        nu = nu * (1 - (1 - a_b) * gam) + (1 - a_b) * lam               # (7)
        psi2 = a_f * psi2 + (1 - a_f) * psi2_b                          # (4)
        assert_close(xt.grad, dx, rtol=1e-10, atol=1e-12, name="dx")
        assert_close(m.weight.grad, (dy * xhat).reshape(-1, c).sum(0), rtol=1e-10, atol=1e-12)
        assert_close(m.nu, nu, rtol=1e-10, atol=1e-12, name="nu")
        assert_close(m.running_phi, psi2, rtol=1e-10, atol=1e-12, name="psi2")
        m.weight.grad = None
        m.bias.grad = None
    m.eval()
    x = rng.standard_normal((4, c))
    with torch.no_grad():
        assert_close(m(torch.from_numpy(x)), w * x / np.sqrt(psi2 + eps), rtol=1e-10, atol=1e-12)


def test_exact_pnv_gradient_is_the_correction_with_batch_lambda(rng):
    """Eq. (9): autograd through x / sqrt(psi2_B + eps) equals eq. (5) with nu = Lambda_B and the
    batch statistic; PN's approximation only swaps Lambda_B for its running average."""
    x = torch.tensor(rng.standard_normal((40, 5)) * 3, requires_grad=True)
    w = torch.tensor(rng.standard_normal(5))
    dy = torch.tensor(rng.standard_normal((40, 5)))
    psi2 = x.square().mean(0)
    (w * x / torch.sqrt(psi2 + 1e-5)).backward(dy)
    with torch.no_grad():
        r = torch.rsqrt(psi2 + 1e-5)
        z = x * r
        lam_b = (dy * w * z).mean(0)
        for backend in BACKENDS:
            dx = power_norm_backward(dy, z, w, lam_b, r, backend=backend)[0]
            assert_close(dx, x.grad, rtol=1e-10, atol=1e-12, name=f"PN-V gradient [{backend}]")


def test_gradcheck_float64(rng):
    """With nu = 0 the backward of PowerNormFunction is the exact gradient of (2)-(3) at fixed psi2;
    with nu != 0 it is not a gradient at all (it is affine, not linear, in dL/dy), so gradcheck
    must fail there: the check below would catch a backward that ignored nu."""
    x, w, b = (torch.tensor(rng.standard_normal(s), requires_grad=True) for s in ((6, 4), (4,), (4,)))
    r = torch.tensor(rng.random(4) + 0.5)
    nu0 = torch.zeros(4, dtype=torch.float64)
    fn = lambda x, w, b: PowerNormFunction.apply(x, w, b, r, r, nu0, None, 0.9, None)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b), eps=1e-6, atol=1e-7)
    nu = torch.full((4,), 0.5, dtype=torch.float64)
    bad = lambda x: PowerNormFunction.apply(x, w, b, r, r, nu, None, 0.9, None)  # noqa: E731
    assert not torch.autograd.gradcheck(bad, (x,), eps=1e-6, atol=1e-7, raise_exception=False)


def test_gradcheck_compat_group_scaling(rng):
    """In compat mode the gradient flows through the group pre-scaling (eq. 10) by autograd."""
    x = torch.tensor(rng.standard_normal((3, 2, 8)), requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: group_scaling(x, 2), (x,), eps=1e-6, atol=1e-7)
    y = group_scaling(x.detach(), 4, eps=1e-12).reshape(3, 2, 4, 2)
    assert_close(y.square().mean(-1), torch.ones(3, 2, 4, dtype=torch.float64), rtol=1e-9)


def test_warmup_and_state_updates():
    torch.manual_seed(0)
    m = PowerNorm(4, warmup_iters=1)
    x = torch.randn(3, 2, 4) * 5
    y = m(x.requires_grad_())
    psi2_b = x.detach().reshape(-1, 4).square().mean(0)
    assert_close(y, x.detach() / torch.sqrt(psi2_b + 1e-5), rtol=1e-5, atol=1e-6)   # batch stat in warm-up
    assert_close(m.running_phi, 0.9 + 0.1 * psi2_b, rtol=1e-6)
    y.sum().backward()
    assert bool((m.nu != 0).all())
    y2 = m(x)                                                                       # after warm-up
    assert_close(y2, x.detach() / torch.sqrt(0.9 + 0.1 * psi2_b + 1e-5), rtol=1e-5, atol=1e-6)
    assert int(m.iters) == 2 and "official_compat=False" in repr(m)


# ----------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise(backend):
    x = np.ones((4, 3), np.float32)
    with pytest.raises(TypeError, match="floating"):
        quadratic_mean(np.ones((4, 3), np.int64), backend=backend)
    with pytest.raises(TypeError, match="numpy.ndarray or torch.Tensor"):
        quadratic_mean([[1.0, 2.0]], backend=backend)
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        quadratic_mean(np.ones(3, np.float32), backend=backend)
    with pytest.raises(ValueError, match="valid must have x's leading shape"):
        quadratic_mean(x, np.ones(3, bool), backend=backend)
    with pytest.raises(TypeError, match="valid must have a bool dtype"):
        quadratic_mean(x, np.ones(4, np.int8), backend=backend)
    with pytest.raises(ValueError, match="at least one token"):
        quadratic_mean(x, np.zeros(4, bool), backend=backend)
    bad = x.copy()
    bad[2, 1] = np.nan
    with pytest.raises(ValueError, match="NaN or infinity .*channel 1"):
        quadratic_mean(bad, backend=backend)
    with pytest.raises(ValueError, match="eps"):
        power_norm(x, eps=0.0, backend=backend)
    with pytest.raises(ValueError, match=r"weight must have shape \(3,\)"):
        power_norm(x, weight=np.ones(4, np.float32), backend=backend)
    with pytest.raises(ValueError, match="running_psi2 must have shape"):
        power_norm(x, running_psi2=np.ones(2, np.float32), backend=backend)
    with pytest.raises(ValueError, match="grad_out must have xhat's shape"):
        power_norm_backward(np.ones((2, 3), np.float32), x, None, np.zeros(3, np.float32),
                            np.ones(3, np.float32), backend=backend)
    with pytest.raises(ValueError, match="nu and rstd are required"):
        power_norm_backward(x, x, None, None, np.ones(3, np.float32), backend=backend)


def test_bad_module_arguments():
    with pytest.raises(ValueError, match="num_features"):
        PowerNorm(0)
    with pytest.raises(ValueError, match="alpha_fwd"):
        PowerNorm(4, alpha_fwd=1.0)
    with pytest.raises(ValueError, match="alpha_bkw"):
        PowerNorm(4, alpha_bkw=-0.1)
    with pytest.raises(ValueError, match="warmup_iters"):
        PowerNorm(4, warmup_iters=-1)
    with pytest.raises(ValueError, match="group_num"):
        PowerNorm(6, group_num=4)
    with pytest.raises(ValueError, match="eps"):
        PowerNorm(4, eps=0)
    m = PowerNorm(4)
    with pytest.raises(ValueError, match=r"x must have shape \(T, B, 4\)"):
        m(torch.ones(2, 3, 5))
    with pytest.raises(ValueError, match=r"pad_mask must have shape \(3, 2\)"):
        m(torch.ones(2, 3, 4), torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(TypeError, match="pad_mask must be a bool tensor"):
        m(torch.ones(2, 3, 4), torch.zeros(3, 2))
    with pytest.raises(ValueError, match="masks out every token"):
        m(torch.ones(2, 3, 4), torch.ones(3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN or infinity"):
        m(torch.full((2, 3, 4), float("nan")))
    with pytest.raises(ValueError, match="group_num=4 must divide"):
        group_scaling(torch.ones(2, 6), 4)


def test_bad_backend_name():
    with pytest.raises(ValueError, match="backend must be one of"):
        quadratic_mean(np.ones((2, 3)), backend="cuda")


@pytest.mark.gpu
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    x = torch.randn(64, 32, 256) * 2
    pad = torch.rand(32, 64) < 0.2
    g = torch.randn_like(x)
    outs = []
    for dev in ("cpu", "cuda"):
        m = PowerNorm(256, warmup_iters=1, group_num=4, official_compat=True).to(dev)
        xs = x.to(dev).requires_grad_()
        for _ in range(3):
            y = m(xs, pad.to(dev))
            y.backward(g.to(dev))
        outs.append([t.detach().cpu() for t in (y, xs.grad, m.weight.grad, m.running_phi, m.nu)])
    for a, e, name in zip(outs[1], outs[0], ["y", "x.grad", "weight.grad", "running_phi", "nu"]):
        assert_close(a, e, rtol=1e-4, atol=1e-4 * (1 if name != "weight.grad" else 100), name=name)
    qm = quadratic_mean(x.cuda(), (~pad.t()).cuda())
    assert qm.is_cuda
    assert_close(qm, quadratic_mean(x, ~pad.t(), backend="numpy"), rtol=1e-5)
