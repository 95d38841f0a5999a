"""AdamP / SGDP: every backend of the functional step against the others, the optimizers against the
official package (``adamp`` 0.3.0, clovaai/AdamP) over 50-step float64 trajectories, the state_dict
round-trip, param groups, and clear errors.

Tolerances. Float64 trajectories against the official package: 1e-10 absolute/relative (measured:
~5e-16; our fused update w <- d*w - eta*(u - c*w) rounds differently from the official three
in-place ops, and 50 steps of a small net amplify a 1e-16 difference by far less than 1e6).
Backends against each other after three steps: float64 1e-12; float32 rtol 2e-5 / atol 1e-6
(element-wise Adam arithmetic in float32 with one sqrt and one division per element, the per-row
dot products accumulated in float64 by numpy/numba but in float32 by torch). The test inputs keep
every cosine far from the threshold delta/sqrt(dim), so no backend can flip a projection decision.
There is no custom backward (optimizers do not define gradients), so there is no gradcheck.
"""
import copy
import functools

import adamp as official
import numpy as np
import pytest
import torch

from refimpl._common import assert_close
from refimpl.optim.adamp import (SGDP, AdamP, ProjectionLayout, adamp_step, cosine_test, project_radial,
                                 sgdp_step)
from refimpl.optim.multi_tensor import SegmentLayout
from refimpl.optim.trajectory import ScaleInvariantNet, regression_batch, run_trajectory

BACKENDS = ["numpy", "numba", "torch"]
SHAPES = [(5, 12), (6, 3, 2, 2), (7, 9), (9,), (), (4, 300)]
TOL = {np.float32: dict(rtol=2e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-12)}
TRAJ_TOL = dict(rtol=1e-10, atol=1e-10)


def _make_grads(ws, rng):
    """Gradients with known projection decisions: tensor 0 orthogonal to w row by row (channel view
    fires), tensor 1 orthogonal only as a whole (layer view), tensor 2 aligned with w (neither);
    the rest random. Built from the current weights so the decisions hold at every step."""
    out = []
    for k, w in enumerate(ws):
        g = rng.standard_normal(w.shape).astype(w.dtype)
        if k == 0:
            w2, g2 = w.reshape(w.shape[0], -1), g.reshape(w.shape[0], -1)
            g2 -= w2 * ((w2 * g2).sum(1, keepdims=True) / (w2 * w2).sum(1, keepdims=True))
        elif k == 1:
            g2 = g.reshape(w.shape[0], -1)
            g2 += 3 * w.reshape(w.shape[0], -1) * np.array([1, -1, 1, -1, 1, -1])[:, None]  # rows: not small
            g -= w * ((w * g).sum() / (w * w).sum())
        elif k == 2:
            g += 2 * w
        out.append(g)
    return out


def _functional_run(kind, backend, dtype, steps=3, **hp):
    rng = np.random.default_rng(0)
    ws = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    layout = ProjectionLayout.of(ws)
    flat = layout.segments.flatten(ws)
    bufs = [np.zeros_like(flat) for _ in range(2 if kind == "adam" else 1)]
    flags = []
    for t in range(1, steps + 1):
        g = layout.segments.flatten(_make_grads(layout.segments.unflatten(flat), np.random.default_rng(t)))
        args = [flat, g] + bufs
        if backend == "torch":
            args = [torch.from_numpy(a) for a in args]
        if kind == "adam":
            info = adamp_step(*args, layout, step=t, backend=backend, **hp)
        else:
            info = sgdp_step(*args, layout, backend=backend, **hp)
        flags.append((np.asarray(info["channel"]).tolist(), np.asarray(info["layer"]).tolist()))
    return flat, bufs, flags


ADAM_HP = [dict(lr=1e-2), dict(lr=3e-2, betas=(0.8, 0.99), weight_decay=0.1, nesterov=True, wd_ratio=0.3)]
SGD_HP = [dict(lr=0.05, momentum=0.9), dict(lr=0.1, momentum=0.5, dampening=0.2, weight_decay=0.1),
          dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01),
          dict(lr=0.05, momentum=0.9, project_buffer=False)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kind,hp", [("adam", h) for h in ADAM_HP] + [("sgd", h) for h in SGD_HP])
def test_backends_agree(kind, hp, dtype):
    ref_w, ref_b, ref_flags = _functional_run(kind, "numpy", dtype, **hp)
    # the decisions the inputs were built for: channel view for tensor 0, layer view for tensor 1
    assert ref_flags[0][0][:3] == [True, False, False] and ref_flags[0][1][:3] == [False, True, False]
    for backend in ["numba", "torch"]:
        w, bufs, flags = _functional_run(kind, backend, dtype, **hp)
        assert flags == ref_flags
        assert_close(w, ref_w, **TOL[dtype], name=f"param[{backend}]")
        for b, rb in zip(bufs, ref_b):
            assert_close(b, rb, **TOL[dtype], name=f"state[{backend}]")


@pytest.mark.parametrize("kind", ["adam", "sgd"])
def test_parallel_numba_kernels_match_numpy(kind):
    """Groups above PARALLEL_MIN elements run the parallel build of the Numba kernels."""
    shapes = [(600, 500), (500,), (30, 20)]
    layout = ProjectionLayout(shapes)
    n = layout.segments.numel
    outs, ref_flags = [], None
    for backend in ("numpy", "numba"):
        rng = np.random.default_rng(1)
        w, g = rng.standard_normal(n), rng.standard_normal(n)
        bufs = [np.zeros(n) for _ in range(2 if kind == "adam" else 1)]
        w0 = layout.segments.unflatten(w)[0]
        layout.segments.unflatten(g)[0][:] = project_radial(torch.from_numpy(rng.standard_normal((600, 500))),
                                                            torch.from_numpy(w0), "channel").numpy()
        flags = []
        for t in (1, 2):
            info = (adamp_step(w, g, *bufs, layout, step=t, lr=1e-2, weight_decay=0.1, backend=backend)
                    if kind == "adam" else
                    sgdp_step(w, g, *bufs, layout, lr=0.1, momentum=0.9, weight_decay=0.1, backend=backend))
            flags.append(np.asarray(info["channel"]).tolist())
        assert flags[0] == [True, False, False]   # step 1: g orthogonal to every row of w0
        if backend == "numba":
            assert flags == ref_flags
        ref_flags = flags
        outs.append((w, bufs))
    assert_close(outs[1][0], outs[0][0], **TOL[np.float64], name="param")
    for b1, b0 in zip(outs[1][1], outs[0][1]):
        assert_close(b1, b0, **TOL[np.float64], name="state")


def _official_functional(kind, hp, steps=3):
    """The same run as _functional_run, with the official optimizer on the separate tensors."""
    rng = np.random.default_rng(0)
    ps = [torch.nn.Parameter(torch.from_numpy(rng.standard_normal(s))) for s in SHAPES]
    hp = {k: v for k, v in hp.items() if k != "project_buffer"}
    opt = official.AdamP(ps, **hp) if kind == "adam" else official.SGDP(ps, **hp)
    for t in range(1, steps + 1):
        for p, g in zip(ps, _make_grads([p.detach().numpy() for p in ps], np.random.default_rng(t))):
            p.grad = torch.from_numpy(g)
        opt.step()
    return np.concatenate([p.detach().reshape(-1).numpy() for p in ps])


@pytest.mark.parametrize("kind,hp", [("adam", h) for h in ADAM_HP] + [("sgd", h) for h in SGD_HP[:3]])
def test_functional_step_matches_official(kind, hp):
    """Channel view, layer view and no projection, on tensors of rank 0 to 4, against the package."""
    w, _, _ = _functional_run(kind, "numpy", np.float64, **hp)
    assert_close(w, _official_functional(kind, hp), **TRAJ_TOL, name="param")


@pytest.fixture(autouse=True)
def _one_thread():
    """The benchmark net is tiny: one thread is faster, and results do not depend on the machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _official_trajectory(name, hp_items, steps=50):
    return run_trajectory(lambda p: getattr(official, name)(p, **dict(hp_items)), steps=steps)


@pytest.mark.parametrize("hp", [dict(lr=1e-2, weight_decay=0.1, nesterov=True),
                                dict(lr=3e-2, betas=(0.8, 0.99), weight_decay=1e-2, delta=0.5, wd_ratio=0.5)])
def test_adamp_trajectory_matches_official(hp):
    ours = run_trajectory(lambda p: AdamP(p, **hp), steps=50)
    ref = _official_trajectory("AdamP", tuple(hp.items()))
    assert np.abs(ref[-1] - ref[0]).max() > 0.1          # the run moves the weights
    assert_close(ours, ref, **TRAJ_TOL, name="AdamP trajectory")


@pytest.mark.parametrize("hp", [SGD_HP[0], SGD_HP[2]])
def test_sgdp_trajectory_matches_official(hp):
    ours = run_trajectory(lambda p: SGDP(p, **hp), steps=50)
    ref = _official_trajectory("SGDP", tuple(hp.items()))
    assert_close(ours, ref, **TRAJ_TOL, name="SGDP trajectory")


def test_projection_changes_the_trajectory():
    """The comparison above can fail: without projection (delta = 0) AdamP is AdamW-like Adam, and
    the scale-invariant layer moves differently."""
    ours = run_trajectory(lambda p: AdamP(p, lr=1e-2, delta=0.0), steps=10)
    ref = _official_trajectory("AdamP", (("lr", 1e-2),), steps=10)
    assert np.abs(ours - ref).max() > 1e-3
    adam = run_trajectory(lambda p: torch.optim.Adam(p, lr=1e-2), steps=10)
    assert_close(ours, adam, rtol=1e-10, atol=1e-10, name="AdamP(delta=0) vs Adam")


def test_sgdp_paper_buffer_differs_from_official():
    """project_buffer=False (the paper's Algorithm 1) keeps the unprojected momentum: a different
    trajectory from the official code once the projection fires with momentum."""
    paper = run_trajectory(lambda p: SGDP(p, lr=0.05, momentum=0.9, project_buffer=False), steps=50)
    offi = _official_trajectory("SGDP", tuple(SGD_HP[0].items()))
    assert np.abs(paper - offi).max() > 1e-4


def _train(opt, model, steps, start=0):
    for step in range(start, start + steps):
        x, y = (t.double() for t in regression_batch(step))
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("cls,kw", [(AdamP, dict(lr=1e-2, weight_decay=0.1)),
                                    (SGDP, dict(lr=0.05, momentum=0.9, weight_decay=0.01))])
def test_state_dict_roundtrip(cls, kw):
    model = ScaleInvariantNet().double()
    opt = cls(model.parameters(), **kw)
    _train(opt, model, 5)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(opt, model, 5, start=5)
    fresh = ScaleInvariantNet(seed=1).double()
    fresh.load_state_dict(saved_model)
    fresh_opt = cls(fresh.parameters(), **kw)
    fresh_opt.load_state_dict(copy.deepcopy(saved_opt))  # load_state_dict shares the tensors
    _train(fresh_opt, fresh, 5, start=5)
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    # the state has the official layout: an official optimizer continues from our state_dict
    ref_model = ScaleInvariantNet(seed=1).double()
    ref_model.load_state_dict(saved_model)
    ref_opt = (official.AdamP if cls is AdamP else official.SGDP)(ref_model.parameters(), **kw)
    ref_opt.load_state_dict(copy.deepcopy(saved_opt))
    _train(ref_opt, ref_model, 5, start=5)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert_close(a, b, **TRAJ_TOL)


def test_param_groups_with_different_hyperparameters():
    """Group 0 (the scale-invariant layer and the LayerNorm gain): its own lr, weight decay and
    Nesterov; group 1: no projection (delta = 0) and other betas."""
    def make(cls):
        return lambda ps: cls([{"params": ps[:3], "lr": 3e-2, "weight_decay": 0.1, "nesterov": True},
                               {"params": ps[3:], "delta": 0.0, "betas": (0.5, 0.9)}], lr=1e-2)
    a = run_trajectory(make(AdamP), steps=50)
    b = run_trajectory(make(official.AdamP), steps=50)
    assert_close(a, b, **TRAJ_TOL, name="AdamP param groups")

    def make_sgd(cls):
        return lambda ps: cls([{"params": ps[:3], "momentum": 0.5, "weight_decay": 0.1},
                               {"params": ps[3:], "lr": 0.01, "wd_ratio": 0.5}], lr=0.05, momentum=0.9)
    assert_close(run_trajectory(make_sgd(SGDP), steps=50), run_trajectory(make_sgd(official.SGDP), steps=50),
                 **TRAJ_TOL, name="SGDP param groups")


def test_closure_and_params_without_grad():
    model = ScaleInvariantNet().double()
    model.mid.weight.requires_grad_(False)
    opt = AdamP(model.parameters(), lr=1e-2)
    x, y = (t.double() for t in regression_batch(0))
    before = model.mid.weight.clone()

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and torch.equal(model.mid.weight, before)
    assert opt.state[model.first.weight]["step"] == 1 and model.mid.weight not in opt.state


def test_single_tensor_helpers_match_official():
    torch.manual_seed(0)
    w = torch.randn(6, 4, 3, dtype=torch.float64)
    u = torch.randn_like(w)
    ref = official.AdamP([torch.nn.Parameter(w)])
    for g, expected in [(torch.randn_like(w), None),
                        (project_radial(torch.randn_like(w), w, "channel"), "channel"),
                        (project_radial(torch.randn_like(w) + 5 * w * torch.tensor([1., -1] * 3)[:, None, None],
                                        w, "layer"), "layer")]:
        assert cosine_test(g, w) == expected
        want, wd = ref._projection(torch.nn.Parameter(w.clone()), g, u.clone(), 0.1, 0.1, 1e-8)
        got = u if expected is None else project_radial(u, w, expected)
        assert_close(got, want, rtol=1e-12, atol=1e-12)
        assert wd == (1 if expected is None else 0.1)
    # the projected update has no radial component
    q = project_radial(u, w, "layer")
    assert abs(float((q * w).sum())) < 1e-8 * float(u.norm() * w.norm())   # exact up to eps / ||w||


def test_layout():
    lay = ProjectionLayout([(3, 4), (5,), (2, 3, 2), ()])
    assert lay.n_rows == 3 + 1 + 2 + 1 and lay.row_len.tolist() == [4, 4, 4, 5, 6, 6, 1]
    assert lay.projectable.tolist() == [True, False, True, False]
    assert lay.segments.numel == 12 + 5 + 12 + 1 and "7 rows" in repr(lay)
    assert ProjectionLayout(SegmentLayout([(2, 2)])).rows.numel == 4


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise(backend):
    lay = ProjectionLayout([(2, 3), (4,)])
    z = np.zeros(10)
    with pytest.raises(ValueError, match="grad must be a flat vector of 10"):
        adamp_step(z, np.zeros(9), z.copy(), z.copy(), lay, step=1, backend=backend)
    with pytest.raises(TypeError, match="exp_avg must have the type and dtype of param"):
        adamp_step(z, z.copy(), z.astype(np.float32), z.copy(), lay, step=1, backend=backend)
    with pytest.raises(TypeError, match="floating"):
        sgdp_step(z, np.zeros(10, np.int64), z.copy(), lay, lr=0.1, backend=backend)
    with pytest.raises(ValueError, match="step must be >= 1"):
        adamp_step(z, z.copy(), z.copy(), z.copy(), lay, step=0, backend=backend)
    with pytest.raises(ValueError, match="step must be a scalar or hold one value per tensor"):
        adamp_step(z, z.copy(), z.copy(), z.copy(), lay, step=[1, 2, 3], backend=backend)
    with pytest.raises(ValueError, match=r"betas\[1\] must lie in"):
        adamp_step(z, z.copy(), z.copy(), z.copy(), lay, step=1, betas=(0.9, 1.0), backend=backend)
    with pytest.raises(ValueError, match="momentum must be in"):
        sgdp_step(z, z.copy(), z.copy(), lay, lr=0.1, momentum=1.0, backend=backend)
    with pytest.raises(ValueError, match="eps must be > 0"):
        sgdp_step(z, z.copy(), z.copy(), lay, lr=0.1, eps=0.0, backend=backend)
    with pytest.raises(TypeError, match="layout must be a ProjectionLayout"):
        sgdp_step(z, z.copy(), z.copy(), SegmentLayout([(2, 3), (4,)]), lr=0.1, backend=backend)
    with pytest.raises(ValueError, match="backend must be one of"):
        sgdp_step(z, z.copy(), z.copy(), lay, lr=0.1, backend="cuda")


def test_bad_optimizer_arguments_raise():
    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ValueError, match="lr must be >= 0"):
        AdamP(p, lr=-1.0)
    with pytest.raises(TypeError, match="betas must be a pair"):
        AdamP(p, betas=0.9)
    with pytest.raises(ValueError, match="delta must be >= 0"):
        SGDP(p, lr=0.1, delta=-0.1)
    with pytest.raises(ValueError, match="dampening must be in"):
        SGDP(p, lr=0.1, dampening=2.0)
    with pytest.raises(TypeError, match="weight_decay must be a real number"):
        SGDP(p, lr=0.1, weight_decay="0.1")
    with pytest.raises(ValueError, match="ndim > 1"):
        cosine_test(torch.zeros(3), torch.ones(3))
    with pytest.raises(ValueError, match="view must be"):
        project_radial(torch.zeros(2, 3), torch.ones(2, 3), view="row")
    p[0].grad = torch.zeros(2, 2).to_sparse()
    with pytest.raises(TypeError, match="sparse"):
        AdamP(p).step()


@pytest.mark.gpu
@pytest.mark.parametrize("cls,kw", [(AdamP, dict(lr=1e-2, weight_decay=0.1)), (SGDP, dict(lr=0.05, momentum=0.9))])
def test_cuda_matches_official(cls, kw):
    ref_cls = official.AdamP if cls is AdamP else official.SGDP
    torch.manual_seed(0)
    model, ref_model = ScaleInvariantNet().double().cuda(), ScaleInvariantNet().double().cuda()
    opt, ref_opt = cls(model.parameters(), **kw), ref_cls(ref_model.parameters(), **kw)
    for step in range(50):
        x, y = (t.double().cuda() for t in regression_batch(step))
        for m, o in ((model, opt), (ref_model, ref_opt)):
            o.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
            o.step()
    for a, b in zip(model.parameters(), ref_model.parameters()):
        assert_close(a, b, rtol=1e-9, atol=1e-9)
