"""Entropy-SGD: the inner SGLD step and the outer step on every backend, the optimizer against golden
trajectories of the official code (ucla-vision/entropy-sgd, python/optim.py) with its noise stream
replayed, against an independent per-parameter reference, the state_dict round trip, parameter
groups, scoping, and clear errors on bad input.

Tolerances:
- Backends, float64: rtol 1e-12 / atol 1e-12. Every element goes through ~10 flops; the numba kernel
  may contract a*b + c into one FMA (fastmath "contract"), so results differ by a few ulps.
- Backends, float32: rtol 1e-5 / atol 1e-6 (a few float32 ulps on O(1) values).
- Official golden trajectories (float64, 50 outer steps, up to 300 gradient evaluations): rtol 1e-10
  / atol 1e-12. The torch path performs the same operations in the same order as the official code
  and matches it bit for bit today; the slack absorbs a few ulps of drift should a future torch
  change the order of its add/mul kernels (the trajectory is not chaotic at these step sizes).
- The per-parameter reference (numpy backend on each tensor) vs the optimizer: rtol 1e-10 as above.
No custom backward is defined (the optimizer only reads gradients), so there is no gradcheck.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from refimpl._common import assert_close, load_golden
import refimpl.optim.entropy_sgd as esgd
from refimpl.optim.entropy_sgd import EntropySGD, entropy_outer_step, scoped_gamma, sgld_inner_step
from refimpl.optim.trajectory import ScaleInvariantNet, regression_batch, run_trajectory

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "entropy_sgd"
FIXTURES = ["nesterov_L5_eps0", "nesterov_L2_noise", "heavyball_L3_eps0"]
BACKENDS = ["numpy", "numba", "torch"]
TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-12)}
TRAJ_TOL = dict(rtol=1e-10, atol=1e-12)
MODES = [dict(momentum=0.0), dict(momentum=0.9, nesterov=True, weight_decay=1e-2),
         dict(momentum=0.5, nesterov=False, dampening=0.1, weight_decay=1e-3)]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _buffers(rng, n, dtype):
    x = rng.standard_normal(n).astype(dtype)
    return dict(x_inner=x + 0.1 * rng.standard_normal(n).astype(dtype), grad=rng.standard_normal(n).astype(dtype),
                anchor=x, mu=x + 0.05 * rng.standard_normal(n).astype(dtype),
                buf=rng.standard_normal(n).astype(dtype), noise=rng.standard_normal(n).astype(dtype))


def _copy(bufs, as_tensor=False):
    return {k: torch.from_numpy(v.copy()) if as_tensor else v.copy() for k, v in bufs.items()}


# ----------------------------------------------------------------------------- functional steps
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("n", [1, 37])
def test_inner_step_backends_agree(rng, dtype, mode, n):
    bufs = _buffers(rng, n, dtype)
    hp = dict(gamma=0.3, sgld_lr=0.1, eps=1e-2, mu_decay=0.75, **mode)
    ref = _copy(bufs)
    sgld_inner_step(**ref, **hp, backend="numpy")
    for backend in BACKENDS:
        for as_tensor in (False, True):
            got = _copy(bufs, as_tensor)
            out = sgld_inner_step(**got, **hp, backend=backend)
            assert out is got["x_inner"]
            for k in ("x_inner", "mu", "buf"):
                assert_close(got[k], ref[k], **TOL[dtype], name=f"{k}[{backend}, tensor={as_tensor}]")
    # the inputs that are read only stay untouched
    assert np.array_equal(ref["grad"], bufs["grad"]) and np.array_equal(ref["anchor"], bufs["anchor"])


@pytest.mark.parametrize("dtype,mode", [(np.float32, MODES[1]), (np.float64, MODES[2])])
def test_inner_step_backends_agree_parallel(rng, dtype, mode, monkeypatch):
    """The parallel numba kernels (several blocks), forced with a lowered threshold."""
    monkeypatch.setattr(esgd, "_PARALLEL_MIN", 1000)
    test_inner_step_backends_agree(rng, dtype, mode, 30_001)
    x, d, b = (rng.standard_normal(30_001).astype(dtype) for _ in range(3))
    ref = [x.copy(), d.copy(), b.copy()]
    entropy_outer_step(*ref, lr=0.2, **mode, backend="numpy")
    entropy_outer_step(x, d, b, lr=0.2, **mode, backend="numba")
    assert_close(x, ref[0], **TOL[dtype], name="x[numba, parallel]")
    assert_close(b, ref[2], **TOL[dtype], name="buf[numba, parallel]")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("mode", MODES)
def test_outer_step_backends_agree(rng, dtype, mode):
    n = 1001
    x, d, b = (rng.standard_normal(n).astype(dtype) for _ in range(3))
    ref = [x.copy(), d.copy(), b.copy()]
    entropy_outer_step(*ref, lr=0.2, **mode, backend="numpy")
    for backend in BACKENDS:
        got = [torch.from_numpy(v.copy()) for v in (x, d, b)] if backend == "torch" else [v.copy() for v in (x, d, b)]
        entropy_outer_step(*got, lr=0.2, **mode, backend=backend)
        assert_close(got[0], ref[0], **TOL[dtype], name=f"x[{backend}]")
        assert_close(got[2], ref[2], **TOL[dtype], name=f"buf[{backend}]")


def test_inner_step_by_hand():
    """Eq. (8) worked out for one element, Nesterov and heavy ball."""
    gamma, lr, eps, beta, m, damp, wd = 0.5, 0.1, 0.2, 0.75, 0.9, 0.1, 0.01
    xp, g, x, mu, b, z = 1.0, 2.0, 1.5, 1.2, 0.3, -0.7
    c = eps / np.sqrt(0.5 * lr)
    d = g + wd * xp
    b_new = m * b + (1 - damp) * d
    # Nesterov
    d_n = d + m * b_new - gamma * (x - xp) + c * z
    xp_n = xp - lr * d_n
    # heavy ball: d is the buffer itself, which also takes the coupling and the noise
    d_h = b_new - gamma * (x - xp) + c * z
    xp_h = xp - lr * d_h
    for nesterov, xp_exp, b_exp in ((True, xp_n, b_new), (False, xp_h, d_h)):
        for backend in BACKENDS:
            a = [np.array([v]) for v in (xp, g, x, mu, b, z)]
            sgld_inner_step(*a, gamma=gamma, sgld_lr=lr, eps=eps, mu_decay=beta, momentum=m,
                            dampening=damp, weight_decay=wd, nesterov=nesterov, backend=backend)
            assert a[0][0] == pytest.approx(xp_exp, rel=1e-14)
            assert a[3][0] == pytest.approx(beta * mu + (1 - beta) * xp_exp, rel=1e-14)
            assert a[4][0] == pytest.approx(b_exp, rel=1e-14)


def test_sgld_mean_solves_the_coupled_problem():
    """With eps = 0 the inner loop is gradient descent on f(x') + gamma/2 ||x - x'||^2; for the
    quadratic f = a/2 x'^2 its fixed point is gamma x / (a + gamma), so x - mu -> a x / (a + gamma)
    = grad of -F, eq. (3) (for a quadratic the Gibbs mean and the mode coincide)."""
    a = np.array([0.5, 2.0, 8.0])
    x = np.array([1.0, -2.0, 3.0])
    gamma = 1.0
    xp, mu, buf = x.copy(), x.copy(), np.zeros(3)
    for _ in range(400):
        sgld_inner_step(xp, a * xp, x, mu, buf, gamma=gamma, sgld_lr=0.1, eps=0.0, backend="numpy")
    np.testing.assert_allclose(xp, gamma * x / (a + gamma), rtol=1e-10)
    np.testing.assert_allclose(x - mu, a * x / (a + gamma), rtol=1e-10)


# ----------------------------------------------------------------------------- official golden
def _kwargs(f):
    return dict(lr=float(f["lr"]), momentum=float(f["momentum"]), dampening=float(f["damp"]),
                weight_decay=float(f["weight_decay"]), nesterov=bool(f["nesterov"]), L=int(f["L"]),
                eps=float(f["eps"]), gamma=float(f["g0"]), scoping=float(f["g1"]))


@pytest.mark.parametrize("name", FIXTURES)
def test_trajectory_matches_official(name):
    f = load_golden(GOLDEN / f"{name}.npz")
    noise = f.get("noise")
    noise_fn = None if noise is None else (lambda t, l, gi, like: torch.from_numpy(noise[t, l]))
    ours = run_trajectory(lambda p: EntropySGD(p, noise_fn=noise_fn, **_kwargs(f)), steps=int(f["steps"]),
                          use_closure=True)
    assert ours.shape == f["trajectory"].shape == (51, 500)
    assert np.abs(f["trajectory"][-1] - f["trajectory"][0]).max() > 0.1      # the fixture actually moves
    assert_close(ours, f["trajectory"], **TRAJ_TOL, name=name)


def test_recorded_noise_is_the_official_rng_stream():
    """PROVENANCE.md: before step t the official step ran after torch.manual_seed(seeds[t]) and drew,
    per parameter, one wasted normal_ and then L normal_ (per SGLD iteration, in parameter order)."""
    f = load_golden(GOLDEN / "nesterov_L2_noise.npz")
    shapes = [tuple(p.shape) for p in ScaleInvariantNet().parameters()]
    for t in (0, 17, 49):
        torch.manual_seed(int(f["seeds"][t]))
        for s in shapes:
            torch.empty(s, dtype=torch.float64).normal_()
        for l in range(int(f["L"])):
            z = torch.cat([torch.empty(s, dtype=torch.float64).normal_().reshape(-1) for s in shapes])
            assert np.array_equal(z.numpy(), f["noise"][t, l])


def test_noise_changes_the_trajectory():
    """The noisy fixture is sensitive to the noise: replaying other draws moves it far off."""
    f = load_golden(GOLDEN / "nesterov_L2_noise.npz")
    gen = torch.Generator().manual_seed(5)
    ours = run_trajectory(lambda p: EntropySGD(p, generator=gen, **_kwargs(f)), steps=5, use_closure=True)
    assert np.abs(ours[5] - f["trajectory"][5]).max() > 1e-4


# ----------------------------------------------------------------------------- optimizer semantics
def _noise_fn(t, l, gi, like):
    g = torch.Generator().manual_seed(10_000 * t + 100 * l + gi)
    return torch.randn(like.shape, generator=g, dtype=torch.float64).to(like.dtype)


def _train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        x, y = (v.double() for v in regression_batch(step))

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()]).numpy()


HP = dict(lr=0.1, momentum=0.9, weight_decay=1e-3, L=3, gamma=0.1, eps=1e-3)


def test_state_dict_round_trip():
    m1 = ScaleInvariantNet().double()
    o1 = EntropySGD(m1.parameters(), noise_fn=_noise_fn, **HP)
    full = _train(m1, o1, 8)

    m2 = ScaleInvariantNet().double()
    o2 = EntropySGD(m2.parameters(), noise_fn=_noise_fn, **HP)
    _train(m2, o2, 3)
    sd_model, sd_opt = m2.state_dict(), o2.state_dict()
    m3 = ScaleInvariantNet(seed=7).double()
    m3.load_state_dict(sd_model)
    o3 = EntropySGD(m3.parameters(), noise_fn=_noise_fn, **HP)
    o3.load_state_dict(sd_opt)
    assert o3.state[next(iter(m3.parameters()))]["step"] == 3
    resumed = _train(m3, o3, 5, start=3)
    np.testing.assert_array_equal(resumed, full)


def _reference_step(params, groups, closure, t, noise_fn, state):
    """Eq. (8)-(9) per parameter tensor with the numpy backend: an independent re-implementation of
    EntropySGD.step (no flat layout, groups handled one tensor at a time)."""
    closure()
    x = [p.detach().numpy().copy() for p in params]
    for p, g in zip(params, groups):
        if g["momentum"] > 0 and id(p) not in state:
            state[id(p)] = p.grad.numpy().copy()
    xp = [v.copy() for v in x]
    mu = [v.copy() for v in x]
    buf = [np.zeros_like(v) for v in x]
    L = groups[0]["L"]
    for l in range(L):
        closure()
        for gi in sorted({g["index"] for g in groups}):
            idx = [i for i, g in enumerate(groups) if g["index"] == gi]
            flat_noise = noise_fn(t, l, gi, torch.zeros(sum(x[i].size for i in idx), dtype=torch.float64)).numpy()
            off = 0
            for i in idx:
                g = groups[i]
                z = flat_noise[off:off + x[i].size].reshape(x[i].shape)
                off += x[i].size
                grad = params[i].grad.numpy().copy()
                sgld_inner_step(xp[i].reshape(-1), grad.reshape(-1), x[i].reshape(-1), mu[i].reshape(-1),
                                buf[i].reshape(-1), z.reshape(-1), gamma=g["gamma"], sgld_lr=0.1, eps=g["eps"],
                                momentum=g["momentum"], weight_decay=g["weight_decay"], backend="numpy")
        with torch.no_grad():
            for p, v in zip(params, xp):
                p.copy_(torch.from_numpy(v))
    for i, g in enumerate(groups):
        b = state[id(params[i])] if g["momentum"] > 0 else np.zeros_like(x[i])
        entropy_outer_step(x[i].reshape(-1), (x[i] - mu[i]).reshape(-1), b.reshape(-1), lr=g["lr"],
                           momentum=g["momentum"], weight_decay=g["weight_decay"], backend="numpy")
        with torch.no_grad():
            params[i].copy_(torch.from_numpy(x[i]))


def test_param_groups_with_different_hyper_parameters():
    ga = dict(lr=0.05, momentum=0.9, weight_decay=1e-2, gamma=0.3, eps=1e-3, L=2)
    gb = dict(lr=0.2, momentum=0.0, weight_decay=0.0, gamma=0.05, eps=0.0, L=2)
    m1, m2 = ScaleInvariantNet().double(), ScaleInvariantNet().double()
    first = ["first.weight", "norm.weight"]
    split = lambda m: [{"params": [p for n, p in m.named_parameters() if n in first], **ga},  # noqa: E731
                       {"params": [p for n, p in m.named_parameters() if n not in first], **gb}]
    ours = _train(m1, EntropySGD(split(m1), noise_fn=_noise_fn), 6)

    params, groups = [], []
    for gi, grp in enumerate(split(m2)):
        params += grp["params"]
        groups += [dict(grp, index=gi)] * len(grp["params"])
    state = {}
    for step in range(6):
        x, y = (v.double() for v in regression_batch(step))

        def closure():
            for p in params:
                p.grad = None
            torch.nn.functional.mse_loss(m2(x), y).backward()
        _reference_step(params, groups, closure, step, _noise_fn, state)
    ref = torch.cat([p.detach().reshape(-1) for p in m2.parameters()]).numpy()
    assert_close(ours, ref, **TRAJ_TOL, name="param groups")
    single = _train(ScaleInvariantNet().double(), EntropySGD(ScaleInvariantNet().double().parameters(), **gb), 1)
    assert np.abs(single - ours).max() > 1e-3          # the groups' settings matter


def test_scoping_and_gamma_in_outer():
    assert scoped_gamma(0.03, 1e-3, 0) == 0.03
    assert scoped_gamma(0.03, 1e-3, 100) == pytest.approx(0.03 * 1.001 ** 100)
    hp = dict(lr=0.1, L=2, gamma=0.5, eps=0.0)
    traj = lambda **kw: run_trajectory(lambda p: EntropySGD(p, **hp, **kw), steps=3, use_closure=True)  # noqa: E731
    base = traj()
    np.testing.assert_array_equal(traj(scoping=0.5), base)                 # official: scope never advances
    assert np.abs(traj(scoping=0.5, advance_scope=True) - base).max() > 1e-4
    # paper form (eq. 6): the direction is gamma (x - mu); with lr' = lr / gamma it equals the code's form
    paper = run_trajectory(lambda p: EntropySGD(p, **dict(hp, lr=0.2), gamma_in_outer=True), steps=3,
                           use_closure=True)
    assert_close(paper, base, rtol=1e-12, atol=1e-13, name="gamma_in_outer")


def test_L0_without_momentum_is_sgd():
    ours = run_trajectory(lambda p: EntropySGD(p, lr=0.1, L=0), steps=10, use_closure=True)
    ref = run_trajectory(lambda p: torch.optim.SGD(p, lr=0.1), steps=10)
    assert_close(ours, ref, rtol=1e-13, atol=1e-14, name="L=0")


def test_float32_parameters():
    ours = run_trajectory(lambda p: EntropySGD(p, **HP, noise_fn=_noise_fn), steps=5, use_closure=True,
                          dtype=torch.float32)
    ref = run_trajectory(lambda p: EntropySGD(p, **HP, noise_fn=_noise_fn), steps=5, use_closure=True)
    assert ours.dtype == np.float32
    assert_close(ours, ref, rtol=1e-4, atol=1e-5, name="float32 vs float64")


# ----------------------------------------------------------------------------- bad input
def test_bad_inputs():
    x = np.zeros(4)
    ok = dict(x_inner=x.copy(), grad=x.copy(), anchor=x.copy(), mu=x.copy(), buf=x.copy())
    with pytest.raises(TypeError, match="grad must have a floating-point dtype"):
        sgld_inner_step(**dict(ok, grad=np.zeros(4, dtype=np.int64)), gamma=0.1)
    with pytest.raises(TypeError, match="mu must have the type and dtype of x_inner"):
        sgld_inner_step(**dict(ok, mu=np.zeros(4, dtype=np.float32)), gamma=0.1)
    with pytest.raises(ValueError, match="anchor must have 4 elements"):
        sgld_inner_step(**dict(ok, anchor=np.zeros(5)), gamma=0.1)
    with pytest.raises(ValueError, match="buf must be a flat 1-D buffer"):
        sgld_inner_step(**dict(ok, buf=np.zeros((2, 2))), gamma=0.1)
    with pytest.raises(ValueError, match="noise must be given"):
        sgld_inner_step(**ok, gamma=0.1, eps=1e-3)
    with pytest.raises(ValueError, match=r"gamma must lie in \[0.0, inf\]"):
        sgld_inner_step(**ok, gamma=-1.0)
    with pytest.raises(ValueError, match=r"mu_decay must lie in \[0.0, 1.0\)"):
        sgld_inner_step(**ok, gamma=0.1, mu_decay=1.0)
    with pytest.raises(TypeError, match="sgld_lr must be a real number"):
        sgld_inner_step(**ok, gamma=0.1, sgld_lr="0.1")
    with pytest.raises(ValueError, match="backend must be one of"):
        sgld_inner_step(**ok, gamma=0.1, eps=0.0, backend="cuda")
    with pytest.raises(ValueError, match=r"lr must lie in \(0.0, inf\]"):
        entropy_outer_step(x.copy(), x.copy(), x.copy(), lr=0.0)
    with pytest.raises(TypeError, match="nesterov must be a bool"):
        entropy_outer_step(x.copy(), x.copy(), x.copy(), lr=0.1, momentum=0.5, nesterov="yes")
    params = list(ScaleInvariantNet().parameters())
    with pytest.raises(ValueError, match="L must be a non-negative int"):
        EntropySGD(params, L=-1)
    with pytest.raises(ValueError, match=r"momentum must lie in \[0.0, 1.0\)"):
        EntropySGD(params, momentum=1.5)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        EntropySGD(params, generator=0)
    with pytest.raises(ValueError, match="needs a closure"):
        EntropySGD(params).step()
    opt = EntropySGD([{"params": params[:1], "L": 1}, {"params": params[1:], "L": 2}])
    with pytest.raises(ValueError, match="L must be the same in every parameter group"):
        opt.step(lambda: 0.0)


@pytest.mark.gpu
def test_cuda_matches_cpu():
    f = load_golden(GOLDEN / "nesterov_L2_noise.npz")
    noise = f["noise"]
    fn = lambda t, l, gi, like: torch.from_numpy(noise[t, l]).to(like.device)  # noqa: E731

    def make(params):
        return EntropySGD(params, noise_fn=fn, **_kwargs(f))
    model = ScaleInvariantNet().double().cuda()
    opt = make(list(model.parameters()))
    for step in range(50):
        x, y = (v.double().cuda() for v in regression_batch(step))

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.mse_loss(model(x), y)
            loss.backward()
            return loss
        opt.step(closure)
    got = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).cpu().numpy()
    assert_close(got, f["trajectory"][-1], rtol=1e-8, atol=1e-10, name="cuda trajectory")
    # the functional step on the device agrees with the numba kernel
    rng = np.random.default_rng(0)
    bufs = _buffers(rng, 1 << 20, np.float32)
    ref = _copy(bufs)
    sgld_inner_step(**ref, gamma=0.3, eps=1e-2, momentum=0.9, backend="numba")
    got = {k: torch.from_numpy(v.copy()).cuda() for k, v in bufs.items()}
    sgld_inner_step(**got, gamma=0.3, eps=1e-2, momentum=0.9, backend="torch")
    assert_close(got["x_inner"], ref["x_inner"], **TOL[np.float32], name="cuda inner step")
