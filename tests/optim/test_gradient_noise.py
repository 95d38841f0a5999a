"""Annealed gradient noise (paper-only verification: no official code was released).

What is checked, and why these tolerances:
- The schedule (eq. 2) exactly: against closed-form values (sigma_0^2 = eta, sigma_3^2 = eta/2 for
  gamma = 1/2, the ratio sigma_t^2 / sigma_{2t+1}^2 = 2^gamma) at 1e-15 relative (one pow, one divide).
- The optimizer injects sigma_t * z_t with z_t = gaussian_noise(step=t): exact up to float64 rounding
  (1e-12 relative).
- The injected noise's statistics, measured on n = 2e5 coordinates per step: sample mean within
  5 standard errors (5/sqrt(n) in units of sigma_t), sample variance / sigma_t^2 within 5*sqrt(2/n),
  kurtosis within 5*sqrt(96/n) of 3, correlation between steps (and groups) within 5/sqrt(n). A
  5-sigma bound fails by chance with probability ~6e-7, while a wrong sigma (e.g. sigma^2 used as the
  std, or a missing sqrt) is off by far more than the bound.
- Backends of the functional step agree given the same noise: float64 to 1e-13, float32 to 1e-6
  relative (one fused multiply-add may round differently from two roundings: a few ulps).
- With eta = 0 the optimizers are torch.optim.SGD / Adam (the canonical implementations): 50-step
  float64 trajectories on ScaleInvariantNet agree to 1e-13 (identical arithmetic: in practice 0).
  With noise, they agree with a hand-written SGD/Adam + clip_grad_norm_ + noise reference to 1e-12.
- state_dict round-trip: a resumed run equals the uninterrupted one exactly (atol 0).
There is no custom backward (the method changes the update, not the gradient computation), so no
gradcheck applies.
"""
import copy

import numpy as np
import pytest
import torch

from refimpl._common import assert_close
from refimpl.optim.gradient_noise import (NoisyAdam, NoisySGD, clip_coefficient, gaussian_noise, noise_std,
                                          noise_variance, noisy_sgd_step)
from refimpl.optim.multi_tensor import SegmentLayout
from refimpl.optim.trajectory import ScaleInvariantNet, regression_batch, run_trajectory

BACKENDS = ["numpy", "numba", "torch"]
SHAPES = [(3, 4), (7,), (2, 3, 5), (1,), (500,)]
TOL = {np.float32: dict(rtol=1e-6, atol=1e-6), np.float64: dict(rtol=1e-13, atol=1e-13)}


# ----------------------------------------------------------------------------- schedule (eq. 2)
def test_schedule_closed_forms():
    for eta in (0.01, 0.3, 1.0):
        assert noise_variance(0, eta, 0.55) == eta
        t = np.arange(0, 1000)
        v = noise_variance(t, eta, 0.55)
        assert v.shape == t.shape and v.dtype == np.float64
        expected = np.array([eta / (1.0 + k) ** 0.55 for k in range(1000)])
        assert_close(v, expected, rtol=1e-15, atol=0)
        assert np.all(np.diff(v) < 0)                                   # annealed: strictly decreasing
        assert_close(v[:500] / v[1::2][:500], np.full(500, 2 ** 0.55), rtol=1e-14, atol=0)
    assert noise_variance(3, 1.0, 0.5) == 0.5
    assert noise_std(8, 0.3, 1.0) == pytest.approx(np.sqrt(0.3 / 9), rel=1e-15)
    assert noise_variance(10, 0.0, 0.55) == 0.0


def _run(opt_factory, steps, seed=0, model_seed=0, dtype=torch.float64, start=None):
    """Train ScaleInvariantNet on regression_batch; returns (model, optimizer) after ``steps``."""
    model = ScaleInvariantNet(seed=model_seed).to(dtype)
    opt = opt_factory(model)
    if start is not None:
        model.load_state_dict(start[0])
        opt.load_state_dict(start[1])
    first = 0 if start is None else start[2]
    for step in range(first, first + steps):
        x, y = (t.to(dtype) for t in regression_batch(step, seed=seed))
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    return model, opt


@pytest.mark.parametrize("eta,gamma", [(0.01, 0.55), (1.0, 0.55), (0.3, 1.0)])
def test_optimizer_injects_sigma_t_times_the_stream(eta, gamma):
    p = torch.nn.Parameter(torch.zeros(1000, dtype=torch.float64))
    opt = NoisySGD([p], lr=1.0, eta=eta, gamma=gamma, seed=7)
    for t in range(6):
        before = p.detach().clone()
        p.grad = torch.zeros_like(p)
        opt.step()
        expected = -noise_std(t, eta, gamma) * gaussian_noise(1000, seed=7, step=t, dtype=torch.float64)
        assert_close(p.detach() - before, expected, rtol=1e-12, atol=1e-15, name=f"noise at step {t}")
        assert opt.param_groups[0]["noise_step"] == t + 1


def test_noise_statistics():
    """Zero gradients, lr = 1: each step moves the parameters by -sigma_t z_t exactly."""
    n, eta, gamma = 200_000, 0.3, 0.55
    a = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))
    b = torch.nn.Parameter(torch.zeros(n, dtype=torch.float64))
    opt = NoisySGD([{"params": [a]}, {"params": [b]}], lr=1.0, eta=eta, gamma=gamma, seed=3)
    prev = None
    se, se_var, se_kurt = 5 / np.sqrt(n), 5 * np.sqrt(2 / n), 5 * np.sqrt(96 / n)
    for t in range(4):
        pa, pb = a.detach().clone(), b.detach().clone()
        a.grad, b.grad = torch.zeros_like(a), torch.zeros_like(b)
        opt.step()
        da, db = (-(a.detach() - pa)).numpy(), (-(b.detach() - pb)).numpy()
        sigma = noise_std(t, eta, gamma)
        za = da / sigma
        assert abs(za.mean()) < se, f"mean at step {t}: {za.mean()}"
        assert abs(da.var() / noise_variance(t, eta, gamma) - 1) < se_var, f"variance at step {t}"
        assert abs((za ** 4).mean() / za.var() ** 2 - 3) < se_kurt, f"kurtosis at step {t}"
        assert abs(np.corrcoef(da, db)[0, 1]) < se, "groups share noise"
        if prev is not None:
            assert abs(np.corrcoef(prev, da)[0, 1]) < se, f"steps {t - 1} and {t} correlated"
        prev = da


def test_noise_stream_is_reproducible_and_distinct():
    z = gaussian_noise(64, seed=1, step=5, dtype=torch.float64)
    assert torch.equal(z, gaussian_noise(64, seed=1, step=5, dtype=torch.float64))
    for other in (dict(seed=2, step=5), dict(seed=1, step=6), dict(seed=1, step=5, group=1)):
        assert not torch.equal(z, gaussian_noise(64, dtype=torch.float64, **other))


# ----------------------------------------------------------------------------- functional step
def _flat_inputs(rng, dtype):
    layout = SegmentLayout(SHAPES)
    n = layout.numel
    p, g, z, b = (rng.standard_normal(n).astype(dtype) for _ in range(4))
    return layout, p, g * 3, z, b


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum", [0.0, 0.9])
@pytest.mark.parametrize("max_grad_norm", [None, 2.0])
def test_backends_agree(rng, dtype, momentum, max_grad_norm):
    layout, p0, g, z, b0 = _flat_inputs(rng, dtype)
    out = {}
    for backend in BACKENDS:
        for as_tensor in (False, True):
            p, b = p0.copy(), b0.copy()
            args = [p, g, z, b]
            if as_tensor:
                args = [torch.from_numpy(a) for a in args]
            res = noisy_sgd_step(args[0], args[1], args[2], lr=0.1, sigma=0.37, momentum=momentum,
                                 momentum_buffer=args[3] if momentum else None, max_grad_norm=max_grad_norm,
                                 layout=layout, backend=backend)
            assert res is args[0] and res.dtype == args[0].dtype
            out[(backend, as_tensor)] = (p.copy(), b.copy())
    # float64 reference written out from eqs. (3)-(7)
    g64 = g.astype(np.float64)
    c = 1.0 if max_grad_norm is None else min(1.0, max_grad_norm / (np.linalg.norm(g64) + 1e-6))
    d = c * g64 + 0.37 * z.astype(np.float64)
    bref = momentum * b0.astype(np.float64) + d if momentum else b0
    pref = p0.astype(np.float64) - 0.1 * (bref if momentum else d)
    for key, (p, b) in out.items():
        assert_close(p, pref, **TOL[dtype], name=f"param {key}")
        assert_close(b, bref, **TOL[dtype], name=f"buffer {key}")
        assert_close(p, out[("numpy", False)][0], **TOL[dtype], name=f"param {key} vs numpy")


def test_clip_coefficient_matches_torch(rng):
    gs = [torch.from_numpy(rng.standard_normal(s)) for s in SHAPES]
    layout = SegmentLayout.of(gs)
    flat = layout.flatten(gs)
    ref = [torch.nn.Parameter(torch.zeros_like(g)) for g in gs]
    for r, g in zip(ref, gs):
        r.grad = g.clone()
    torch.nn.utils.clip_grad_norm_(ref, 1.5)
    for backend in BACKENDS:
        x = flat if backend == "torch" else flat.numpy()
        c = float(clip_coefficient(x, 1.5, layout, backend=backend))
        assert_close(flat * c, layout.flatten([r.grad for r in ref]), rtol=1e-14, atol=1e-15, name=f"clip[{backend}]")
    assert clip_coefficient(flat.numpy(), None, layout) == 1.0
    assert clip_coefficient(flat.numpy(), 1e6, layout) == 1.0         # never scales up


# ----------------------------------------------------------------------------- optimizers vs torch
@torch.no_grad()
def _clip_and_add_noise(opt):
    """clip_grad_norm_ per group, then p.grad += sigma_t * z (the stream of gaussian_noise)."""
    eta, gamma, max_norm, seed = opt.cfg
    for gi, group in enumerate(opt.param_groups):
        ps = [p for p in group["params"] if p.grad is not None]
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(ps, max_norm)
        z = gaussian_noise(sum(p.numel() for p in ps), seed=seed, step=opt.t, group=gi, dtype=ps[0].dtype)
        sigma = np.sqrt(group.get("eta", eta) / (1 + opt.t) ** gamma)
        for p, zk in zip(ps, z.split([p.numel() for p in ps])):
            p.grad.add_(sigma * zk.view_as(p))
    opt.t += 1


class _ReferenceSGD(torch.optim.SGD):
    """torch.optim.SGD + clip_grad_norm_ + the noise stream, written out per group."""

    def __init__(self, params, eta, gamma, max_grad_norm, seed, **kw):
        super().__init__(params, **kw)
        self.cfg, self.t = (eta, gamma, max_grad_norm, seed), 0

    def step(self, closure=None):
        _clip_and_add_noise(self)
        return super().step()


class _ReferenceAdam(torch.optim.Adam):
    def __init__(self, params, eta, gamma, max_grad_norm, seed, **kw):
        super().__init__(params, **kw)
        self.cfg, self.t = (eta, gamma, max_grad_norm, seed), 0

    def step(self, closure=None):
        _clip_and_add_noise(self)
        return super().step()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_no_noise_is_torch_sgd(backend, momentum):
    ours = run_trajectory(lambda ps: NoisySGD(ps, lr=0.05, momentum=momentum, eta=0.0, backend=backend), steps=50)
    ref = run_trajectory(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=momentum), steps=50)
    assert ours.shape == ref.shape == (51, ref.shape[1])
    assert_close(ours, ref, rtol=1e-13, atol=1e-13, name=f"NoisySGD(eta=0)[{backend}] vs SGD")
    assert np.abs(ref[-1] - ref[0]).max() > 1e-2                        # the run moved


def test_no_noise_is_torch_adam():
    ours = run_trajectory(lambda ps: NoisyAdam(ps, lr=0.01, eta=0.0, betas=(0.8, 0.99)), steps=50)
    ref = run_trajectory(lambda ps: torch.optim.Adam(ps, lr=0.01, betas=(0.8, 0.99)), steps=50)
    assert_close(ours, ref, rtol=1e-13, atol=1e-13, name="NoisyAdam(eta=0) vs Adam")


@pytest.mark.parametrize("backend", BACKENDS)
def test_noisy_sgd_matches_reference(backend):
    kw = dict(eta=0.3, gamma=0.55, max_grad_norm=0.5, seed=4)
    ours = run_trajectory(lambda ps: NoisySGD(ps, lr=0.05, momentum=0.9, backend=backend, **kw), steps=50)
    ref = run_trajectory(lambda ps: _ReferenceSGD(ps, lr=0.05, momentum=0.9, **kw), steps=50)
    assert_close(ours, ref, rtol=1e-12, atol=1e-12, name=f"NoisySGD[{backend}] vs reference")
    plain = run_trajectory(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), steps=50)
    assert np.abs(ours[-1] - plain[-1]).max() > 1e-2                    # the noise did something


def test_noisy_adam_matches_reference():
    kw = dict(eta=0.01, gamma=0.55, max_grad_norm=1.0, seed=5)
    ours = run_trajectory(lambda ps: NoisyAdam(ps, lr=0.01, **kw), steps=50)
    ref = run_trajectory(lambda ps: _ReferenceAdam(ps, lr=0.01, **kw), steps=50)
    assert_close(ours, ref, rtol=1e-12, atol=1e-12, name="NoisyAdam vs reference")


def test_closure_gives_same_trajectory():
    make = lambda ps: NoisySGD(ps, lr=0.05, momentum=0.5, eta=0.3)  # noqa: E731
    assert_close(run_trajectory(make, steps=50, use_closure=True), run_trajectory(make, steps=50), rtol=0, atol=0)


def test_param_groups_with_different_hyperparameters():
    def groups(model):
        return [{"params": [model.first.weight], "lr": 0.02, "eta": 1.0},
                {"params": [p for n, p in model.named_parameters() if n != "first.weight"], "momentum": 0.5}]

    model_o, ours = _run(lambda m: NoisySGD(groups(m), lr=0.05, eta=0.01, max_grad_norm=1.0, seed=2), 50)
    model_r, _ = _run(lambda m: _ReferenceSGD(groups(m), lr=0.05, eta=0.01, gamma=0.55, max_grad_norm=1.0,
                                              seed=2), 50)
    for (name, a), b in zip(model_o.named_parameters(), model_r.parameters()):
        assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-12, name=name)
    g0, g1 = ours.param_groups
    assert (g0["lr"], g0["eta"], g0["momentum"]) == (0.02, 1.0, 0.0)
    assert (g1["lr"], g1["eta"], g1["momentum"]) == (0.05, 0.01, 0.5)
    assert g0["noise_step"] == g1["noise_step"] == 50
    assert "momentum_buffer" in ours.state[g1["params"][0]] and not ours.state[g0["params"][0]]


@pytest.mark.parametrize("cls,kw", [(NoisySGD, dict(lr=0.05, momentum=0.9, eta=0.3, max_grad_norm=1.0)),
                                    (NoisyAdam, dict(lr=0.01, eta=0.3, max_grad_norm=1.0))])
def test_state_dict_round_trip(cls, kw):
    full, _ = _run(lambda m: cls(m.parameters(), seed=9, **kw), 50)
    half, opt = _run(lambda m: cls(m.parameters(), seed=9, **kw), 20)
    saved = (copy.deepcopy(half.state_dict()), copy.deepcopy(opt.state_dict()), 20)
    resumed, opt2 = _run(lambda m: cls(m.parameters(), seed=9, **kw), 30, start=saved)
    assert opt2.param_groups[0]["noise_step"] == 50
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


# ----------------------------------------------------------------------------- bad inputs
def test_bad_inputs_raise(rng):
    p = np.zeros(4)
    g = np.ones(4)
    with pytest.raises(ValueError, match="t must be a non-negative integer"):
        noise_variance(-1)
    with pytest.raises(ValueError, match="t must be a non-negative integer"):
        noise_variance(1.5)
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        noise_variance(0, eta=-0.1)
    with pytest.raises(TypeError, match="gamma must be a real number"):
        noise_variance(0, gamma="0.55")
    with pytest.raises(ValueError, match="step must be a non-negative integer"):
        gaussian_noise(3, seed=0, step=-1)
    with pytest.raises(TypeError, match="dtype must be a floating torch.dtype"):
        gaussian_noise(3, seed=0, step=0, dtype=torch.int64)
    with pytest.raises(ValueError, match="lr must be a finite number > 0"):
        noisy_sgd_step(p, g, g, lr=0.0, sigma=0.1)
    with pytest.raises(ValueError, match="sigma must be a finite number >= 0"):
        noisy_sgd_step(p, g, g, lr=0.1, sigma=float("nan"))
    with pytest.raises(ValueError, match="momentum_buffer is required"):
        noisy_sgd_step(p, g, g, lr=0.1, sigma=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="momentum must be a finite number >= 0.0 and < 1.0"):
        noisy_sgd_step(p, g, g, lr=0.1, sigma=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="grad must have the shape of param"):
        noisy_sgd_step(p, np.ones(5), g, lr=0.1, sigma=0.1)
    with pytest.raises(TypeError, match="noise must be a ndarray of dtype float64"):
        noisy_sgd_step(p, g, g.astype(np.float32), lr=0.1, sigma=0.1)
    with pytest.raises(TypeError, match="param must have a floating-point dtype"):
        noisy_sgd_step(np.zeros(4, np.int64), g, g, lr=0.1, sigma=0.1)
    with pytest.raises(ValueError, match="param must be a flat"):
        noisy_sgd_step(np.zeros((2, 2)), g, g, lr=0.1, sigma=0.1)
    with pytest.raises(ValueError, match="max_grad_norm must be a finite number > 0"):
        noisy_sgd_step(p, g, g, lr=0.1, sigma=0.1, max_grad_norm=0)
    with pytest.raises(ValueError, match="layout covers 5 elements"):
        noisy_sgd_step(p, g, g, lr=0.1, sigma=0.1, layout=SegmentLayout([(5,)]))
    with pytest.raises(ValueError, match="backend must be one of"):
        noisy_sgd_step(p, g, g, lr=0.1, sigma=0.1, backend="cuda")
    w = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="eta must be a finite number >= 0"):
        NoisySGD(w, eta=-1.0)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        NoisyAdam(w, seed=-2)
    with pytest.raises(ValueError, match="backend must be one of"):
        NoisySGD(w, backend="fast")


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cuda_matches_cpu():
    dev = torch.device("cuda")
    rng = np.random.default_rng(0)
    layout, p, g, z, b = _flat_inputs(rng, np.float32)
    ref = p.copy()
    noisy_sgd_step(ref, g, z, lr=0.1, sigma=0.3, max_grad_norm=1.0, layout=layout, backend="numpy")
    pt = torch.from_numpy(p).to(dev)
    noisy_sgd_step(pt, torch.from_numpy(g).to(dev), torch.from_numpy(z).to(dev), lr=0.1, sigma=0.3,
                   max_grad_norm=1.0, layout=layout, backend="torch")
    assert_close(pt.cpu(), ref, rtol=1e-5, atol=1e-6)
    w = torch.nn.Parameter(torch.zeros(100_000, device=dev))
    opt = NoisySGD([w], lr=1.0, eta=1.0)
    w.grad = torch.zeros_like(w)
    opt.step()
    assert abs(float(w.var()) - 1.0) < 5 * np.sqrt(2 / 100_000)
