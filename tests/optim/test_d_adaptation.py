"""D-Adaptation: trajectories and D estimates against the official package ``dadaptation`` 3.2
(DAdaptSGD, DAdaptAdam) for 50 steps in float64, every backend of the functional steps against the
NumPy reference, param groups, state_dict round-trips, the lower-bound property, and clear errors.

Tolerances. Trajectories (float64, 50 steps): parameters atol 1e-11 and d rtol 1e-11. The package
sums per tensor in torch and accumulates in Python floats; we reduce over one flat buffer, so the
two differ by reassociation only (~1e-16 per step, measured 1e-13 after 50 Adam steps, where
1/(sqrt(v)+eps) amplifies it). Functional steps across backends: float64 rtol 1e-12; float32 rtol
2e-5 / atol 1e-6 (one step of float32 element-wise updates, reductions of 10^4 elements in float32
for torch vs float64 accumulators for numpy/numba). There is no custom backward (an optimizer
defines none), so there is no gradcheck.
"""
import copy
import math

import numpy as np
import pytest
import torch

dadaptation = pytest.importorskip("dadaptation")

from refimpl._common import assert_close  # noqa: E402
from refimpl.optim.d_adaptation import (DAdaptAdam, DAdaptSGD, dadapt_adam_step,  # noqa: E402
                                        dadapt_sgd_accumulate, dadapt_sgd_step, update_d)
from refimpl.optim.trajectory import ScaleInvariantNet, regression_batch, run_trajectory  # noqa: E402

BACKENDS = ["numpy", "numba", "torch"]


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """The models are tiny: torch's worker threads only add contention (10x slower on a busy
    2-core machine, measured), so this file runs torch on one thread and restores the setting."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _trajectory(make, steps=50):
    """Parameters (steps+1, n) and the d used after every step (steps,)."""
    ds = []

    def make_hooked(params):
        opt = make(params)
        opt.register_step_post_hook(lambda o, args, kwargs: ds.append(o.param_groups[0]["d"]))
        return opt

    return run_trajectory(make_hooked, steps=steps), np.array(ds)


def _compare(ours, official, steps=50):
    x1, d1 = _trajectory(ours, steps)
    x2, d2 = _trajectory(official, steps)
    assert d2[-1] > 1e3 * d2[0], "d must have grown, or the comparison is trivial"
    assert_close(d1, d2, rtol=1e-11, atol=0, name="d")
    assert_close(x1, x2, rtol=0, atol=1e-11, name="parameters")
    assert np.abs(x2[-1] - x2[0]).max() > 1e-2, "the parameters must have moved"


SGD_CASES = [dict(), dict(momentum=0.5, weight_decay=1e-2, growth_rate=1.5, lr=0.5, d0=1e-4)]
ADAM_CASES = [dict(weight_decay=0.1), dict(weight_decay=0.1, decouple=True, use_bias_correction=True,
                                           betas=(0.8, 0.99), eps=1e-6, growth_rate=1.5, lr=2.0)]


@pytest.mark.parametrize("kw", SGD_CASES)
def test_sgd_trajectory_matches_official(kw):
    _compare(lambda p: DAdaptSGD(p, **kw), lambda p: dadaptation.DAdaptSGD(p, **kw))


@pytest.mark.parametrize("kw", ADAM_CASES)
def test_adam_trajectory_matches_official(kw, capsys):
    _compare(lambda p: DAdaptAdam(p, **kw), lambda p: dadaptation.DAdaptAdam(p, **kw))


def test_optimizer_numba_backend_matches_official():
    _compare(lambda p: DAdaptSGD(p, momentum=0.9, backend="numba"), lambda p: dadaptation.DAdaptSGD(p, momentum=0.9))
    _compare(lambda p: DAdaptAdam(p, backend="numba"), lambda p: dadaptation.DAdaptAdam(p))


def _groups(params, a: dict, b: dict):
    return [dict(params=params[:2], **a), dict(params=params[2:], **b)]


def test_sgd_param_groups_match_official():
    """A frozen group (lr = 0) next to a trained one, as the package supports it."""
    _compare(lambda p: DAdaptSGD(_groups(p, dict(lr=0.0), {}), momentum=0.9),
             lambda p: dadaptation.DAdaptSGD(_groups(p, dict(lr=0.0), {}), momentum=0.9))


def test_adam_param_groups_match_official(capsys):
    a, b = dict(weight_decay=0.1, eps=1e-6, layer_scale=0.5), dict(weight_decay=0.0, layer_scale=2.0)
    _compare(lambda p: DAdaptAdam(_groups(p, a, b)), lambda p: dadaptation.DAdaptAdam(_groups(p, a, b)))
    a, b = dict(weight_decay=0.2), dict(lr=0.0)
    _compare(lambda p: DAdaptAdam(_groups(p, a, b), decouple=True),
             lambda p: dadaptation.DAdaptAdam(_groups(p, a, b), decouple=True))


def test_sgd_per_group_weight_decay():
    """Our DAdaptSGD honours each group's weight_decay (the package reads group 0's for all): it
    equals one group without decay whose gradients get wd * p added by hand."""
    wd = 0.05

    def by_hand(params):
        for p in params[:2]:
            p.register_hook(lambda g, p=p: g + wd * p.detach())
        return DAdaptSGD(params, momentum=0.5)

    x1, d1 = _trajectory(lambda p: DAdaptSGD(_groups(p, dict(weight_decay=wd), {}), momentum=0.5, decay_in_g0=True))
    x2, d2 = _trajectory(by_hand)
    assert_close(d1, d2, rtol=1e-12, atol=0, name="d")
    assert_close(x1, x2, rtol=0, atol=1e-12, name="parameters")
    x3, _ = _trajectory(lambda p: DAdaptSGD(p, momentum=0.5))
    assert np.abs(x3[-1] - x1[-1]).max() > 1e-4     # the decay changed something


def test_mismatched_group_lrs_raise():
    model = ScaleInvariantNet()
    opt = DAdaptSGD(_groups(list(model.parameters()), dict(lr=0.5), {}))
    x, y = regression_batch(0)
    torch.nn.functional.mse_loss(model(x), y).backward()
    with pytest.raises(ValueError, match="lr must be 1.0 or 0"):
        opt.step()


@pytest.mark.parametrize("cls,kw", [(DAdaptSGD, dict(momentum=0.9)), (DAdaptAdam, dict(weight_decay=0.01)),
                                    (DAdaptAdam, dict(decouple=True, weight_decay=0.1, backend="numba"))])
def test_state_dict_round_trip(cls, kw):
    """Save after 5 steps, load into a fresh optimizer on a copy of the model, continue 10 steps:
    the trajectory is identical to an uninterrupted run."""
    def train(model, opt, steps, start):
        for step in range(start, start + steps):
            x, y = (t.double() for t in regression_batch(step))
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(x), y).backward()
            opt.step()

    model = ScaleInvariantNet().double()
    opt = cls(model.parameters(), **kw)
    train(model, opt, 5, 0)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    train(model, opt, 10, 5)
    model2 = ScaleInvariantNet(seed=1).double()
    model2.load_state_dict(saved_model)
    opt2 = cls(model2.parameters(), **kw)
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["k"] == 5 and opt2.param_groups[0]["d"] == saved_opt["param_groups"][0]["d"]
    train(model2, opt2, 10, 5)
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)
    assert opt.param_groups[0]["d"] == opt2.param_groups[0]["d"]


def test_closure_is_called_and_returns_loss():
    model = ScaleInvariantNet().double()
    opt = DAdaptAdam(model.parameters())
    x, y = (t.double() for t in regression_batch(0))

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and opt.param_groups[0]["k"] == 1


def _flat(rng, n, dtype, *, positive=False):
    a = rng.standard_normal(n)
    return (np.abs(a) * 1e-3 if positive else a).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_sgd_backends_agree(rng, dtype):
    n = 10_007
    x, g, x0 = (_flat(rng, n, dtype) for _ in range(3))
    s = (_flat(rng, n, dtype) * 1e-3).astype(dtype)
    outs = {}
    for bk in BACKENDS:
        xx, ss = x.copy(), s.copy()
        d, num, dh = 1e-3, 0.0, 0.0
        for _ in range(3):
            d, num, dh = dadapt_sgd_step(xx, g, ss, x0, d, num, 2.0, momentum=0.9, weight_decay=0.01, backend=bk)
        outs[bk] = (xx, ss, np.array([d, num, dh]))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=1e-6)
    for bk in ("numba", "torch"):
        for a, b, name in zip(outs[bk], outs["numpy"], ("x", "s", "(d, numerator, d_hat)")):
            assert_close(a, b, **tol, name=f"{name}[{bk}]")
    # tensors in, tensors updated in place (the torch backend is what the optimizers call)
    xt, st = torch.from_numpy(x.copy()), torch.from_numpy(s.copy())
    dadapt_sgd_step(xt, torch.from_numpy(g), st, torch.from_numpy(x0), 1e-3, 0.0, 2.0, momentum=0.9,
                    weight_decay=0.01, backend="auto")
    assert not np.allclose(xt.numpy(), x)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("kw", [dict(), dict(weight_decay=0.1, use_bias_correction=True, layer_scale=0.5),
                                dict(weight_decay=0.1, decouple=True)])
def test_adam_backends_agree(rng, dtype, kw):
    n = 10_007
    x, g = _flat(rng, n, dtype), _flat(rng, n, dtype)
    s, m, v = _flat(rng, n, dtype) * dtype(1e-3), _flat(rng, n, dtype) * dtype(1e-3), _flat(rng, n, dtype, positive=True)
    outs = {}
    for bk in BACKENDS:
        bufs = [a.copy() for a in (x, s, m, v)]
        d, num, dh = 1e-3, 1e-4, 0.0
        for k in range(3):
            d, num, dh = dadapt_adam_step(bufs[0], g, *bufs[1:], d, num, k=k, backend=bk, **kw)
        outs[bk] = bufs + [np.array([d, num, dh])]
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=1e-6)
    for bk in ("numba", "torch"):
        for a, b, name in zip(outs[bk], outs["numpy"], ("x", "s", "exp_avg", "exp_avg_sq", "(d, num, d_hat)")):
            assert_close(a, b, **tol, name=f"{name}[{bk}]")


def test_functional_step_matches_official_first_steps(rng):
    """The first three steps of the functional SGD step on one tensor equal the package's."""
    x_init, grads = rng.standard_normal(50), rng.standard_normal((3, 50))
    p = torch.nn.Parameter(torch.from_numpy(x_init.copy()))
    off = dadaptation.DAdaptSGD([p], momentum=0.5)
    x, s, x0 = x_init.copy(), np.zeros(50), x_init.copy()
    d, num = 1e-6, 0.0
    for k in range(3):
        p.grad = torch.from_numpy(grads[k].copy())
        off.step()
        d, num, _ = dadapt_sgd_step(x, grads[k], s, x0, d, num, float(np.linalg.norm(grads[0])), momentum=0.5,
                                    backend="numpy")
        assert_close(x, p.detach(), rtol=1e-13, atol=1e-15, name=f"x at step {k}")
        assert math.isclose(d, off.param_groups[0]["d"], rel_tol=1e-13)


@pytest.mark.parametrize("d_coef,bound", [(1.0, 1.0), (2.0, 2.0)])
def test_d_is_a_lower_bound_on_distance_to_solution(rng, d_coef, bound):
    """On a convex problem (full-batch least squares, no momentum) the proof's estimate (c = 1)
    never exceeds D = ||x0 - x*||; the package's doubled estimate stays below 2D. And d does grow
    to within a small factor of D, from d0 = 1e-6."""
    A = rng.standard_normal((200, 20))
    b = A @ rng.standard_normal(20) + 0.1 * rng.standard_normal(200)
    x_star = np.linalg.lstsq(A, b, rcond=None)[0]
    x = np.zeros(20)
    D = np.linalg.norm(x - x_star)
    s, x0, d, num, g0 = np.zeros(20), x.copy(), 1e-6, 0.0, None
    ds = []
    for _ in range(300):
        g = A.T @ (A @ x - b) / len(b)
        g0 = np.linalg.norm(g) if g0 is None else g0
        d, num, _ = dadapt_sgd_step(x, g, s, x0, d, num, g0, d_coef=d_coef, backend="numpy")
        ds.append(d)
    assert max(ds) <= bound * D * (1 + 1e-12)
    assert ds[-1] > 0.2 * D


def test_update_d_is_monotone_and_respects_growth_rate():
    assert update_d(1.0, 0.5) == 1.0
    assert update_d(1.0, 10.0) == 10.0
    assert update_d(1.0, 10.0, growth_rate=1.02) == 1.02


def test_zero_first_gradient_waits():
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    opt = DAdaptSGD([p])
    p.grad = torch.zeros(3, dtype=torch.float64)
    opt.step()
    assert opt.param_groups[0]["k"] == 0 and torch.equal(p.detach(), torch.ones(3, dtype=torch.float64))
    p.grad = torch.ones(3, dtype=torch.float64)
    opt.step()
    assert opt.param_groups[0]["k"] == 1 and not torch.equal(p.detach(), torch.ones(3, dtype=torch.float64))


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_raise(backend):
    x = np.zeros(4)
    with pytest.raises(TypeError, match="floating"):
        dadapt_sgd_accumulate(np.zeros(4, np.int64), x, x.copy(), 0.1, backend=backend)
    with pytest.raises(ValueError, match="flat 1-D"):
        dadapt_sgd_accumulate(np.zeros((2, 2)), np.zeros((2, 2)), np.zeros((2, 2)), 0.1, backend=backend)
    with pytest.raises(ValueError, match="s must have 4 elements"):
        dadapt_sgd_accumulate(x, x, np.zeros(5), 0.1, backend=backend)
    with pytest.raises(TypeError, match="g must have the type and dtype of x"):
        dadapt_sgd_accumulate(x, np.zeros(4, np.float32), x.copy(), 0.1, backend=backend)
    with pytest.raises(ValueError, match="g0_norm must be a finite number > 0"):
        dadapt_sgd_step(x, x, x.copy(), x, 1e-6, 0.0, 0.0, backend=backend)
    with pytest.raises(ValueError, match="momentum must lie in"):
        dadapt_sgd_step(x, x, x.copy(), x, 1e-6, 0.0, 1.0, momentum=1.0, backend=backend)
    with pytest.raises(ValueError, match="betas\\[1\\] must lie in"):
        dadapt_adam_step(x, x, x.copy(), x.copy(), x.copy(), 1e-6, 0.0, betas=(0.9, 1.0), backend=backend)
    with pytest.raises(ValueError, match="eps must be"):
        dadapt_adam_step(x, x, x.copy(), x.copy(), x.copy(), 1e-6, 0.0, eps=0.0, backend=backend)


def test_bad_optimizer_arguments_raise():
    p = [torch.nn.Parameter(torch.ones(3))]
    with pytest.raises(ValueError, match="lr must be"):
        DAdaptSGD(p, lr=0.0)
    with pytest.raises(ValueError, match="d0 must be"):
        DAdaptSGD(p, d0=-1.0)
    with pytest.raises(ValueError, match="growth_rate must be >= 1"):
        DAdaptAdam(p, growth_rate=0.5)
    with pytest.raises(ValueError, match="weight_decay must be"):
        DAdaptSGD(p, weight_decay=-0.1)
    with pytest.raises(TypeError, match="betas must be a pair"):
        DAdaptAdam(p, betas=0.9)
    with pytest.raises(ValueError, match="backend must be one of"):
        DAdaptAdam(p, backend="cuda")
    with pytest.raises(ValueError, match="param group 0 layer_scale"):
        DAdaptAdam([dict(params=p, layer_scale=-1.0)])
    with pytest.raises(ValueError, match="backend must be one of"):
        dadapt_sgd_accumulate(np.zeros(2), np.zeros(2), np.zeros(2), 0.1, backend="jax")


@pytest.mark.gpu
@pytest.mark.parametrize("cls,off", [(DAdaptSGD, "DAdaptSGD"), (DAdaptAdam, "DAdaptAdam")])
def test_cuda_matches_official(cls, off):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.ReLU(), torch.nn.Linear(256, 10)).cuda()
    model2 = copy.deepcopy(model)
    opt, opt2 = cls(model.parameters()), getattr(dadaptation, off)(model2.parameters())
    for step in range(20):
        x = torch.randn(128, 64, device="cuda", generator=torch.Generator("cuda").manual_seed(step))
        for m, o in ((model, opt), (model2, opt2)):
            o.zero_grad()
            m(x).square().mean().backward()
            o.step()
    for p, q in zip(model.parameters(), model2.parameters()):
        assert_close(p, q, rtol=1e-4, atol=1e-5)
    assert math.isclose(opt.param_groups[0]["d"], opt2.param_groups[0]["d"], rel_tol=1e-4)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_parallel_numba_kernels_agree(rng, dtype):
    """Above PARALLEL_MIN elements the numba backend splits the buffers into one block per thread."""
    n = 300_001
    x, g, x0 = (_flat(rng, n, dtype) for _ in range(3))
    s, m, v = _flat(rng, n, dtype) * dtype(1e-3), _flat(rng, n, dtype) * dtype(1e-3), _flat(rng, n, dtype, positive=True)
    tol = dict(rtol=1e-11, atol=1e-12) if dtype == np.float64 else dict(rtol=2e-5, atol=1e-6)
    res = {}
    for bk in ("numpy", "numba"):
        b = [a.copy() for a in (x, s, m, v)]
        sgd = dadapt_sgd_step(b[0], g, b[1], x0, 1e-3, 0.0, 2.0, momentum=0.9, backend=bk)
        adam = dadapt_adam_step(b[0], g, *b[1:], 1e-3, 1e-4, weight_decay=0.1, backend=bk)
        res[bk] = b + [np.array(sgd + adam)]
    for a, b, name in zip(res["numba"], res["numpy"], ("x", "s", "exp_avg", "exp_avg_sq", "scalars")):
        assert_close(a, b, **tol, name=name)
