"""LARS (refimpl.optim.lars): the optimizer against golden trajectories of timm's official-reference
``timm.optim.Lars`` (tests/golden/lars, see PROVENANCE.md), every backend of the functional step
against the NumPy reference, the paper's momentum form, the schedule, state_dict, and clear errors.

Tolerances:
- float64 trajectories vs timm, 50 steps: rtol = atol = 1e-12. Both compute the same operations;
  the only differences are the order of the norm reductions (timm: ``Tensor.norm``; here a sum of
  squares then sqrt) — ~1e-16 relative per step, measured 2e-15 after 50 steps. A wrong trust
  ratio, momentum or weight-decay convention moves the trajectory by > 1e-4 (checked below).
- float32 functional step vs timm (edge fixture, 4 steps, zero-norm tensors): rtol 1e-5, atol 1e-6:
  our norms accumulate in float64 (numpy/numba) or in float32 pairwise sums (torch, timm), and the
  trust ratio multiplies every element, so a few float32 ulps per step.
- backends vs the NumPy reference: float64 1e-12 (FMA contraction and summation order only),
  float32 1e-5 relative (float32 update of O(1) values over 3 steps, ratios from float32 norms in torch).
There is no custom backward (LARS is an optimizer), so no gradcheck applies.
"""
import copy
from pathlib import Path

import numpy as np
import pytest
import torch

from refimpl._common import assert_close, load_golden, max_errors
from refimpl.optim.lars import (LARS, lars_param_groups, lars_step, lars_trust_ratio, warmup_poly_lr,
                                warmup_poly_scheduler)
from refimpl.optim.multi_tensor import SegmentLayout
from refimpl.optim.trajectory import ScaleInvariantNet, run_trajectory

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "lars"
BACKENDS = ["numpy", "numba", "torch"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The trajectories use tensors of <= 300 elements: one torch thread is faster, and immune to a
    busy machine (two spinning OpenMP threads on a loaded 2-core runner cost seconds per test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _kwargs(d):
    return {k: d[k].item() for k in d if k != "traj"}


def _golden_groups(params):
    """The three groups of traj_groups.npz (PROVENANCE.md): A adapted + dampening + LARC clip,
    B no momentum and its own lr, C (ndim <= 1) weight_decay 0, so not adapted, own lr."""
    two_d = [p for p in params if p.ndim > 1]
    return [{"params": two_d[:-1], "weight_decay": 1e-3, "dampening": 0.3, "trust_clip": True},
            {"params": two_d[-1:], "weight_decay": 1e-3, "momentum": 0.0, "lr": 2.0},
            {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0, "lr": 0.05}]


class _Scheduled:
    """An optimizer with a warmup_poly_scheduler stepped after every step (what run_trajectory drives)."""

    def __init__(self, opt, warmup, total):
        self.opt, self.sched = opt, warmup_poly_scheduler(opt, warmup, total)

    def zero_grad(self):
        self.opt.zero_grad()

    def step(self, closure=None):
        loss = self.opt.step(closure)
        self.sched.step()
        return loss


def _make(name, **override):
    d = load_golden(GOLDEN / f"traj_{name}.npz")
    if name == "groups":
        kw = dict(lr=1.0, momentum=0.9, trust_coeff=0.02, **override)
        return d["traj"], (lambda ps: LARS(_golden_groups(ps), **kw))
    if name == "schedule":
        kw = dict(lr=float(d["base_lr"]), momentum=float(d["momentum"]), weight_decay=float(d["weight_decay"]),
                  trust_coeff=float(d["trust_coeff"]), **override)
        return d["traj"], (lambda ps: _Scheduled(LARS(ps, **kw), int(d["warmup"]), int(d["total"])))
    kw = {**_kwargs(d), **override}
    return d["traj"], (lambda ps: LARS(ps, **kw))


# ----------------------------------------------------------------------------- official golden
@pytest.mark.parametrize("name", ["wd_momentum", "always_adapt_nesterov_clip", "groups", "schedule"])
def test_trajectory_matches_timm(name):
    expected, make = _make(name)
    assert expected.shape[0] == 51
    got = run_trajectory(make, steps=50)
    assert_close(got, expected, rtol=1e-12, atol=1e-12, name=f"trajectory {name}")


@pytest.mark.parametrize("name, override", [("wd_momentum", {"trust_coeff": 0.021}),
                                            ("always_adapt_nesterov_clip", {"trust_clip": False}),
                                            ("groups", {"always_adapt": True}),
                                            ("schedule", {"lr_in_momentum": True})])
def test_golden_trajectories_discriminate(name, override):
    """A different convention (or a 5% different trust coefficient) is far outside the tolerance."""
    expected, make = _make(name, **override)
    abs_err, _ = max_errors(run_trajectory(make, steps=50), expected)
    assert abs_err > 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_functional_step_matches_timm_float32_edge_cases(backend):
    d = load_golden(GOLDEN / "edge_float32.npz")
    layout = SegmentLayout([(int(s),) for s in d["sizes"]])
    w, v = d["init"].copy(), np.zeros_like(d["init"])
    if backend == "torch":
        w, v = torch.from_numpy(w), torch.from_numpy(v)
    assert w.dtype in (np.float32, torch.float32)
    for s in range(d["grads"].shape[0]):
        g = d["grads"][s] if backend != "torch" else torch.from_numpy(d["grads"][s])
        ratio = lars_step(w, g, v, layout, lr=float(d["lr"]), momentum=float(d["momentum"]),
                          weight_decay=float(d["weight_decay"]), trust_coeff=float(d["trust_coeff"]),
                          trust_clip=True, fresh=s == 0, backend=backend)
        assert_close(w, d["params"][s], rtol=1e-5, atol=1e-6, name=f"step {s}")
        if s == 0:  # the zero tensor (segment 2) and the zero-gradient one (3) get ratio min(1/lr, 1) = 1
            assert float(ratio[2]) == 1.0 and float(ratio[3]) == 1.0 and float(ratio[0]) < 1.0


# ----------------------------------------------------------------------------- backends agree
SHAPES = [(40, 30), (30,), (3, 3, 8), (1,), (0,), (70000,), (5, 4)]


def _buffers(rng, dtype, shapes=SHAPES):
    layout = SegmentLayout(shapes)
    n = layout.numel
    w = rng.standard_normal(n).astype(dtype)
    w[layout.offsets[-2]:layout.offsets[-1]] = 0                   # a zero weight tensor: ratio 1
    v = rng.standard_normal(n).astype(dtype)
    grads = [rng.standard_normal(n).astype(dtype) * 0.1 for _ in range(3)]
    grads[1][layout.offsets[1]:layout.offsets[2]] = 0              # a zero gradient at one step
    return layout, w, v, grads


OPTIONS = [dict(momentum=0.9, weight_decay=1e-3),
           dict(momentum=0.9, nesterov=True, trust_clip=True, weight_decay=0.0),
           dict(momentum=0.8, dampening=0.25, weight_decay=5e-4, lr_in_momentum=True),
           dict(momentum=0.9, weight_decay=0.0, adapt=False),
           dict(momentum=0.0, weight_decay=1e-2, trust_clip=True)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_backends_agree(rng, dtype, opts):
    layout, w0, v0, grads = _buffers(rng, dtype)
    fresh = np.array([True, False, True, False, False, True, False])
    tol = 1e-5 if dtype == np.float32 else 1e-12
    results = {}
    for backend in BACKENDS:
        w, v = w0.copy(), v0.copy()
        if backend == "torch":
            w, v = torch.from_numpy(w), torch.from_numpy(v)
        for s, g in enumerate(grads):
            g = torch.from_numpy(g) if backend == "torch" else g
            r = lars_step(w, g, v if opts["momentum"] else None, layout, lr=0.5, trust_coeff=0.02,
                          fresh=fresh if s == 0 else False, backend=backend, **opts)
        results[backend] = (np.asarray(w), np.asarray(v), np.asarray(r, dtype=np.float64))
    ref = results["numpy"]
    assert not np.allclose(ref[0], w0)
    for backend in ("numba", "torch"):
        for name, a, b in zip(("w", "v", "ratio"), results[backend], ref):
            assert_close(a, b, rtol=tol, atol=tol, name=f"{backend} {name}")


def test_reference_equals_equations_written_out(rng):
    """The NumPy reference against eqs. (1)-(6) for one tensor, by hand, in float64."""
    w = rng.standard_normal(50)
    g = rng.standard_normal(50)
    v = rng.standard_normal(50)
    lr, m, wd, eta, damp = 0.7, 0.9, 1e-2, 0.05, 0.1
    lam = eta * np.linalg.norm(w) / (np.linalg.norm(g) + wd * np.linalg.norm(w) + 1e-8)
    d = lam * (g + wd * w)
    v_exp = m * v + (1 - damp) * d
    w_exp = w - lr * v_exp
    ratio = lars_step(w, g, v, SegmentLayout([(50,)]), lr=lr, momentum=m, dampening=damp, weight_decay=wd,
                      trust_coeff=eta, backend="numpy")
    assert_close(ratio, [lam], rtol=1e-14, atol=0)
    assert_close(v, v_exp, rtol=1e-13, atol=1e-15)
    assert_close(w, w_exp, rtol=1e-13, atol=1e-15)


# ----------------------------------------------------------------------------- paper form, schedule
def test_paper_momentum_form_equals_timm_at_constant_lr_only():
    kw = dict(lr=0.8, momentum=0.9, weight_decay=5e-4, trust_coeff=0.02)
    timm_form = run_trajectory(lambda ps: LARS(ps, **kw), steps=50)
    paper_form = run_trajectory(lambda ps: LARS(ps, lr_in_momentum=True, **kw), steps=50)
    assert_close(paper_form, timm_form, rtol=1e-10, atol=1e-12)
    sched_timm = run_trajectory(lambda ps: _Scheduled(LARS(ps, **kw), 10, 50), steps=50)
    sched_paper = run_trajectory(lambda ps: _Scheduled(LARS(ps, lr_in_momentum=True, **kw), 10, 50), steps=50)
    assert max_errors(sched_paper, sched_timm)[0] > 1e-3


def test_warmup_poly_lr_closed_form():
    f = [warmup_poly_lr(t, 2.0, 4, 12) for t in range(14)]
    assert f[:4] == [0.5, 1.0, 1.5, 2.0]
    assert f[4] == 2.0 and f[8] == pytest.approx(0.5) and f[12] == 0.0 and f[13] == 0.0
    assert warmup_poly_lr(8, 2.0, 4, 12, power=1.0) == pytest.approx(1.0)


def test_trust_ratio_closed_form():
    w, g = np.array([3.0, 0.0, 2.0, 1.0]), np.array([4.0, 1.0, 0.0, 1e-3])
    r = lars_trust_ratio(w, g, trust_coeff=0.1, weight_decay=0.5, eps=0.0)
    assert_close(r, [0.1 * 3 / 5.5, 1.0, 1.0, 0.1 / (1e-3 + 0.5)], rtol=1e-15, atol=0)
    rc = lars_trust_ratio(w, g, trust_coeff=0.1, weight_decay=0.5, eps=0.0, trust_clip=True, lr=0.1)
    assert_close(rc, [0.3 / 5.5 / 0.1, 1.0, 1.0, 1.0], rtol=1e-15, atol=0)
    rt = lars_trust_ratio(torch.from_numpy(w), torch.from_numpy(g), trust_coeff=0.1, weight_decay=0.5, eps=0.0)
    assert_close(rt, r, rtol=1e-15, atol=0)


# ----------------------------------------------------------------------------- optimizer API
def _train(model, opt, steps, start=0):
    for step in range(start, start + steps):
        x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step), dtype=torch.float64)
        opt.zero_grad()
        model(x).pow(2).mean().backward()
        opt.step()


def test_state_dict_roundtrip():
    kw = dict(lr=0.5, momentum=0.9, weight_decay=1e-3, trust_coeff=0.02, nesterov=True)
    ref = ScaleInvariantNet(seed=3).double()
    opt = LARS(lars_param_groups(ref, 1e-3), **kw)
    _train(ref, opt, 5)
    model_sd = {k: t.clone() for k, t in ref.state_dict().items()}
    opt_sd = copy.deepcopy(opt.state_dict())   # state_dict() holds references to the live buffers
    _train(ref, opt, 5, start=5)

    resumed = ScaleInvariantNet(seed=99).double()
    resumed.load_state_dict(model_sd)
    opt2 = LARS(lars_param_groups(resumed, 1e-3), **kw)
    opt2.load_state_dict(opt_sd)
    _train(resumed, opt2, 5, start=5)
    for a, b in zip(ref.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    assert set(opt2.state_dict()["state"][0]) == {"momentum_buffer"}


def test_param_groups_use_their_own_hyper_parameters():
    model = ScaleInvariantNet(seed=1).double()
    groups = lars_param_groups(model, 1e-3)
    assert [len(g["params"]) for g in groups] == [3, 4]
    groups[1]["lr"] = 0.0                                   # 1-D group frozen
    opt = LARS(groups, lr=0.5, momentum=0.9, trust_coeff=0.02)
    before = [p.detach().clone() for p in model.parameters()]
    _train(model, opt, 3)
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b) == (p.ndim <= 1)
    assert [r.shape[0] for r in opt.trust_ratios] == [3, 4]
    assert torch.all(opt.trust_ratios[1] == 1)              # weight_decay 0, not adapted: ratio 1


def test_closure_and_skipped_params():
    model = torch.nn.Linear(4, 2)
    extra = torch.nn.Parameter(torch.ones(3))               # never gets a gradient
    opt = LARS([*model.parameters(), extra], lr=0.1, momentum=0.9, weight_decay=1e-4)

    def closure():
        opt.zero_grad()
        loss = model(torch.ones(5, 4)).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and torch.equal(extra, torch.ones(3))
    assert extra not in opt.state


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise_clear_errors():
    lay = SegmentLayout([(3,), (2,)])
    w, g, v = np.ones(5), np.ones(5), np.zeros(5)
    with pytest.raises(ValueError, match="lr must be a finite number >= 0"):
        LARS([torch.nn.Parameter(torch.ones(2))], lr=-1.0)
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        LARS([torch.nn.Parameter(torch.ones(2))], nesterov=True)
    with pytest.raises(ValueError, match="trust_coeff must be a finite number > 0"):
        lars_step(w, g, v, lay, lr=0.1, trust_coeff=0.0)
    with pytest.raises(TypeError, match="trust_clip must be a bool"):
        lars_step(w, g, v, lay, lr=0.1, trust_clip=1)
    with pytest.raises(TypeError, match="layout must be a SegmentLayout"):
        lars_step(w, g, v, [3, 2], lr=0.1)
    with pytest.raises(ValueError, match="g must be a flat vector of 5 elements"):
        lars_step(w, np.ones(4), v, lay, lr=0.1)
    with pytest.raises(TypeError, match="w and g must be of one type and dtype"):
        lars_step(w, g.astype(np.float32), v, lay, lr=0.1)
    with pytest.raises(ValueError, match="momentum buffer"):
        lars_step(w, g, None, lay, lr=0.1, momentum=0.9)
    with pytest.raises(ValueError, match="fresh must be a bool or a bool array of shape"):
        lars_step(w, g, v, lay, lr=0.1, momentum=0.9, fresh=np.array([True]))
    with pytest.raises(ValueError, match="NaN or infinity"):
        lars_step(w, np.array([1.0, np.nan, 0, 0, 0]), v, lay, lr=0.1, backend="numba")
    with pytest.raises(ValueError, match="NaN or infinity"):
        lars_step(torch.ones(5), torch.tensor([1.0, np.inf, 0, 0, 0]), None, lay, lr=0.1, backend="torch")
    with pytest.raises(TypeError, match="must have a floating-point dtype"):
        lars_step(np.ones(5, np.int64), np.ones(5, np.int64), None, lay, lr=0.1)
    with pytest.raises(ValueError, match="backend must be one of"):
        lars_step(w, g, v, lay, lr=0.1, backend="cuda")
    with pytest.raises(ValueError, match="total_steps must exceed warmup_steps"):
        warmup_poly_lr(0, 1.0, 10, 10)
    with pytest.raises(TypeError, match="step must be an int"):
        warmup_poly_lr(1.5, 1.0, 1, 10)
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        lars_param_groups([torch.ones(2)], 1e-4)


def test_numba_parallel_path_and_auto(rng):
    """A flat vector above PARALLEL_MIN runs the parallel kernels; "auto" picks numba for arrays.
    Kept last among the CPU tests: after a parallel Numba region the OpenMP workers spin-wait for a
    while, which slows the torch tests that follow on a busy 2-core machine (measured: 0.3 s -> 4 s)."""
    layout, w, v, grads = _buffers(rng, np.float32, shapes=[(600, 500), (30,), (300000,), (2, 2)])
    w2, v2 = w.copy(), v.copy()
    kw = dict(lr=0.3, momentum=0.9, weight_decay=1e-4, trust_coeff=0.01, fresh=True)
    r1 = lars_step(w, grads[0], v, layout, backend="auto", **kw)
    r2 = lars_step(w2, grads[0], v2, layout, backend="numpy", **kw)
    assert_close(r1, r2, rtol=1e-6, atol=0, name="ratio")
    assert_close(w, w2, rtol=1e-5, atol=1e-6, name="w")


# ----------------------------------------------------------------------------- GPU
@pytest.mark.gpu
def test_cuda_trajectory_matches_timm_golden():
    expected, _ = _make("wd_momentum")
    d = load_golden(GOLDEN / "traj_wd_momentum.npz")
    kw = _kwargs(d)
    model = ScaleInvariantNet(seed=0).double().cuda()
    params = list(model.parameters())
    opt = LARS(params, **kw)
    from refimpl.optim.trajectory import regression_batch
    for step in range(50):
        x, y = (t.double().cuda() for t in regression_batch(step))
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
    got = torch.cat([p.detach().reshape(-1) for p in params]).cpu().numpy()
    assert_close(got, expected[-1], rtol=1e-10, atol=1e-10, name="cuda trajectory")
