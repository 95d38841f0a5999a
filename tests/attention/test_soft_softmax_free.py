"""SOFT (refimpl.attention.soft_softmax_free) against the official fudan-zvg/SOFT code (golden fixtures).

Tolerances: float64 fixtures are reproduced to 1e-12 absolute (the same operations; only summation order in
BLAS may differ); float32 to 2e-6 absolute on outputs of size ~1 (20 Newton steps of 16×16 products, each a few
ulps). The three backends of the Newton iteration run the same products: 1e-6 relative in float32,
1e-12 in float64.
"""
import numpy as np
import pytest
import torch

from refimpl._common.golden import load_golden
from refimpl.attention.soft_softmax_free import (SoftmaxFreeAttention, gaussian_attention, gaussian_kernel,
                                                 newton_inverse, newton_inverse_autograd, newton_inverse_norm,
                                                 nystrom_attention)

GOLD = "tests/golden/soft_softmax_free"


def _spd_kernel(rng, b=3, m=12, d=8, dtype=np.float64):
    z = rng.standard_normal((b, m, d)) / d ** 0.25 * 1.5
    return np.exp(-((z[:, :, None] - z[:, None]) ** 2).sum(-1) / 2).astype(dtype)


@pytest.mark.parametrize("backend", ["numpy", "numba", "torch"])
@pytest.mark.parametrize("k", [1, 5, 20])
def test_newton_matches_official(backend, k):
    g = load_golden(f"{GOLD}/newton_inv.npz")
    s = g["S"]
    out = newton_inverse(torch.from_numpy(s) if backend == "torch" else s, k, backend=backend)
    err = np.abs(np.asarray(out) - g[f"newton_{k}"]).max()
    assert err <= 2e-6 * np.abs(g[f"newton_{k}"]).max(), err


@pytest.mark.parametrize("dtype,tol", [(np.float32, 1e-5), (np.float64, 1e-12)])
def test_backends_agree(rng, dtype, tol):
    s = _spd_kernel(rng, dtype=dtype)
    ref = newton_inverse(s, 15, backend="numpy")
    for backend, x in (("numba", s), ("torch", torch.from_numpy(s))):
        out = newton_inverse(x, 15, backend=backend)
        assert type(out) is type(x) and out.dtype == x.dtype
        assert np.abs(np.asarray(out) - ref).max() <= tol * np.abs(ref).max()


def test_newton_converges_to_inverse_and_pinv(rng):
    s = _spd_kernel(rng)
    reg = np.linalg.inv(s + 0.01 * np.eye(s.shape[-1]))
    assert np.abs(newton_inverse(s, 40) - reg).max() < 1e-10 * np.abs(reg).max()
    # reg = 0: the paper's plain iteration converges to the Moore-Penrose inverse (checked on a rank-deficient S:
    # three distinct tokens, each repeated twice, give a 6 x 6 kernel of rank 3)
    z = np.repeat(rng.standard_normal((3, 2)), 2, axis=0)
    low_rank = np.exp(-((z[:, None] - z[None]) ** 2).sum(-1) / 2)
    assert np.linalg.matrix_rank(low_rank) == 3
    pinv = np.linalg.pinv(low_rank, rcond=1e-10)
    out = newton_inverse(low_rank, 200, reg=0.0)
    assert np.abs(out - pinv).max() < 1e-8 * np.abs(pinv).max()
    # why the official code adds the ridge: two nearly equal tokens make S ill-conditioned (cond ~ 1e6); 20 plain
    # steps are nowhere near inv(S), while 20 steps on S + 0.01 I reach inv(S + 0.01 I) to 1e-12
    z = np.random.default_rng(1).standard_normal((8, 4))
    z[1] = z[0] + 1e-3
    ill = np.exp(-((z[:, None] - z[None]) ** 2).sum(-1) / 2)
    i0, i1 = np.linalg.inv(ill), np.linalg.inv(ill + 0.01 * np.eye(8))
    assert np.abs(newton_inverse(ill, 20, reg=0.0) - i0).max() > 0.5 * np.abs(i0).max()
    assert np.abs(newton_inverse(ill, 20) - i1).max() < 1e-12 * np.abs(i1).max()


def test_newton_norm_start():
    """The SOFT++ start halves alpha until ||I - P V0||_1 <= 1.01 and then converges to inv(P) (no ridge)."""
    rng = np.random.default_rng(3)
    s = torch.from_numpy(_spd_kernel(rng, m=8))
    out = newton_inverse_norm(s, 60)
    assert (out - torch.linalg.inv(s)).abs().max() < 1e-8 * torch.linalg.inv(s).abs().max()


@pytest.mark.parametrize("name", ["attention", "norm_attention"])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.float64, 1e-12)])
def test_module_matches_official(name, dtype, tol):
    g = load_golden(f"{GOLD}/{name}_{str(dtype)[6:]}.npz")
    m = SoftmaxFreeAttention(32, 2, 2, 3, 20, sym_norm=name == "norm_attention").to(dtype)
    m.load_state_dict({k[3:]: torch.from_numpy(v) for k, v in g.items() if k.startswith("sd.")})
    with torch.no_grad():
        y = m(torch.from_numpy(g["X"]), 8, 8)
        inner = m.kernel_forward(torch.from_numpy(g["Q"]), torch.from_numpy(g["V"]), 8, 8)
    assert (y - torch.from_numpy(g["y"])).abs().max() <= tol * np.abs(g["y"]).max()
    assert (inner - torch.from_numpy(g["kernel_out"])).abs().max() <= tol * np.abs(g["kernel_out"]).max()


def test_custom_backward_gradcheck():
    """Eq. (5) is the exact gradient of the inverse: gradcheck against finite differences of P -> inv(P + 0.01 I)
    holds once the forward iteration has converged (60 steps)."""
    rng = np.random.default_rng(4)
    s = torch.from_numpy(_spd_kernel(rng, b=2, m=5)).requires_grad_()
    assert torch.autograd.gradcheck(lambda p: newton_inverse_autograd(p, 60), (s,), eps=1e-6, atol=1e-6)
    # and it equals autograd through torch.linalg.inv
    g = torch.randn(2, 5, 5, dtype=torch.float64)
    (a,) = torch.autograd.grad((newton_inverse_autograd(s, 60) * g).sum(), s)
    (b,) = torch.autograd.grad((torch.linalg.inv(s + 0.01 * torch.eye(5, dtype=torch.float64)) * g).sum(), s)
    assert (a - b).abs().max() < 1e-10


def test_nystrom_exact_with_all_tokens_as_landmarks():
    """With every token a landmark, S S^+ S = S: eq. (3) reproduces the full attention of eq. (1)."""
    rng = np.random.default_rng(5)
    q = torch.from_numpy(rng.standard_normal((1, 2, 6, 4)) * 1.2)
    v = torch.from_numpy(rng.standard_normal((1, 2, 6, 3)))
    full = gaussian_attention(q, v)
    ny = nystrom_attention(q, q, v, iters=200, reg=0.0)
    assert (ny - full).abs().max() < 1e-8 * full.abs().max()
    assert torch.equal(gaussian_kernel(q, q).diagonal(dim1=-2, dim2=-1), torch.ones(1, 2, 6, dtype=torch.float64))


def test_avgpool_landmarks_and_gradients():
    torch.manual_seed(0)
    m = SoftmaxFreeAttention(16, 2, 2, 0, 10, landmarks="avgpool").double()
    x = torch.randn(2, 16, 16, dtype=torch.float64, requires_grad=True)
    y = m(x, 4, 4)
    y.sum().backward()
    assert y.shape == (2, 16, 16) and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    assert not hasattr(m.attn, "Qlandmark_op")


def test_bad_inputs():
    with pytest.raises(ValueError, match="square matrices"):
        newton_inverse(np.ones((3, 4)))
    with pytest.raises(TypeError, match="floating-point"):
        newton_inverse(np.ones((3, 3), np.int64))
    with pytest.raises(ValueError, match="NaN or infinity"):
        newton_inverse(np.full((2, 2), np.nan))
    with pytest.raises(ValueError, match="iters must be a non-negative int"):
        newton_inverse(np.eye(2), -1)
    with pytest.raises(ValueError, match="reg must be a finite number"):
        newton_inverse(np.eye(2), reg=-1.0)
    with pytest.raises(ValueError, match="backend must be one of"):
        newton_inverse(np.eye(2), backend="cuda")
    with pytest.raises(TypeError, match="mat must be a torch.Tensor"):
        newton_inverse_autograd(np.eye(2))
    with pytest.raises(ValueError, match="ratio must be an int >= 2"):
        SoftmaxFreeAttention(8, 2, 1)
    with pytest.raises(ValueError, match="multiple of num_heads"):
        SoftmaxFreeAttention(9, 2, 2)
    with pytest.raises(ValueError, match="landmarks must be"):
        SoftmaxFreeAttention(8, 2, 2, landmarks="kmeans")
    m = SoftmaxFreeAttention(8, 2, 2)
    with pytest.raises(ValueError, match="divisible by ratio=2"):
        m(torch.randn(1, 9, 8), 3, 3)
    with pytest.raises(ValueError, match=r"x must have shape \(B, H\*W, 8\)"):
        m(torch.randn(1, 16, 6), 4, 4)
    with pytest.raises(ValueError, match="same feature size"):
        nystrom_attention(torch.randn(1, 1, 4, 3), torch.randn(1, 1, 2, 2), torch.randn(1, 1, 4, 3))


@pytest.mark.gpu
def test_cuda_matches_cpu():
    g = load_golden(f"{GOLD}/attention_float32.npz")
    m = SoftmaxFreeAttention(32, 2, 2, 3, 20)
    m.load_state_dict({k[3:]: torch.from_numpy(v) for k, v in g.items() if k.startswith("sd.")})
    with torch.no_grad():
        y = m.cuda()(torch.from_numpy(g["X"]).cuda(), 8, 8)
    assert (y.cpu() - torch.from_numpy(g["y"])).abs().max() < 1e-4
