"""Tropical attention: the max-plus product (every backend against brute force and against each other),
the Hilbert-metric scores against the definition, the module against golden fixtures of the official
code (tests/golden/tropical_attention, float64: outputs, scores and every gradient, for the symmetric /
non-symmetric scores, with and without λ, without tropical projections, and the models.py variant),
gradcheck of the custom arg-max backward, masking, and clear errors on bad input.

Tolerances: the max-plus product only adds and compares, so every backend is bit-for-bit equal to
the brute-force loop and to the official ``torch_maxplus_matmul`` (asserted with ``array_equal``).
The module fixtures are float64; our module computes the same operations except for the order of a
few sums (the non-symmetric score sums q and k separately, eq. (4)), so outputs, scores and
gradients, all O(1)-O(10), agree to a few ulps: we use atol 1e-12, rtol 1e-12 (measured max abs error
< 1e-14). gradcheck in float64 at its default tolerances, on inputs whose largest and second-largest
max-plus terms are > 1e-3 apart (the function is smooth there; gradcheck's eps is 1e-6).
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from refimpl._common import assert_close, load_golden
from refimpl.attention.tropical_attention import (MaxPlusMatmulFunction, TinyEncoder, TropicalAttention,
                                                  TropicalLinear, hilbert_scores, maxplus_matmul,
                                                  maxplus_matmul_argmax)

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "tropical_attention"
BACKENDS = ["numpy", "numba", "torch"]
GTOL = dict(rtol=1e-12, atol=1e-12)
MODULE_FIXTURES = ["module_sym1_norm1", "module_sym1_norm0", "module_sym0_norm1", "module_sym0_norm0",
                   "module_noproj", "models_variant"]


def _brute(a, b):
    a3, b3 = np.broadcast_arrays(a[..., :, :, None], b[..., None, :, :])
    out = np.empty(np.broadcast_shapes(a.shape[:-2], b.shape[:-2]) + (a.shape[-2], b.shape[-1]), a.dtype)
    for idx in np.ndindex(out.shape):
        *lead, i, j = idx
        out[idx] = max(a3[(*lead, i, k, j)] + b3[(*lead, i, k, j)] for k in range(a.shape[-1]))
    return out


# ----------------------------------------------------------------------------- max-plus product
@pytest.mark.parametrize("backend", BACKENDS)
def test_maxplus_golden_brute_force(backend):
    g = load_golden(GOLDEN / "maxplus.npz")
    got = maxplus_matmul(g["a"], g["b"], backend=backend)
    assert got.dtype == np.float64 and np.array_equal(got, g["brute"])
    assert np.isneginf(got[1, :, 3]).all()  # a column of tropical zeros stays -inf
    got32 = maxplus_matmul(torch.from_numpy(g["a32"]), torch.from_numpy(g["b32"]), backend=backend)
    assert isinstance(got32, torch.Tensor) and got32.dtype == torch.float32
    assert np.array_equal(got32.numpy(), g["official32"])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shapes", [((5, 7), (7, 3)), ((2, 1, 4, 6), (3, 6, 5)), ((1, 1), (1, 600)),
                                    ((3, 9, 33), (33, 2))])
def test_maxplus_backends_exact(rng, backend, dtype, shapes):
    a = rng.standard_normal(shapes[0]).astype(dtype)
    b = rng.standard_normal(shapes[1]).astype(dtype)
    got = maxplus_matmul(a, b, backend=backend)
    assert got.dtype == dtype
    assert np.array_equal(got, _brute(a, b))


def test_maxplus_large_parallel_and_argmax(rng):
    a = rng.standard_normal((2, 300, 40)).astype(np.float32)
    b = rng.standard_normal((2, 40, 700)).astype(np.float32)  # > PARALLEL_MIN work, > one j tile
    ref = maxplus_matmul(a, b, backend="numpy")
    assert np.array_equal(maxplus_matmul(a, b, backend="numba"), ref)
    assert np.array_equal(maxplus_matmul(torch.from_numpy(a), torch.from_numpy(b), backend="torch").numpy(), ref)
    for be in ("numpy", "numba"):
        c, arg = maxplus_matmul_argmax(a, b, backend=be)
        assert np.array_equal(c, ref)
        picked = np.take_along_axis(a[:, :, :, None], arg[:, :, None, :], 2)[:, :, 0, :] + \
            np.take_along_axis(b[:, None, :, :], arg[:, :, None, :], 2)[:, :, 0, :]
        assert np.array_equal(picked, ref)


def test_maxplus_is_not_ordinary_matmul(rng):
    # guard against a kernel that silently computes sums of products
    a = rng.standard_normal((4, 5))
    b = rng.standard_normal((5, 3))
    assert not np.allclose(maxplus_matmul(a, b), a @ b)
    # tropical identity: 0 on the diagonal, -inf elsewhere
    eye = np.full((5, 5), -np.inf)
    np.fill_diagonal(eye, 0.0)
    assert np.array_equal(maxplus_matmul(a, eye), a)


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_maxplus_custom_backward_gradcheck(backend):
    g = torch.Generator().manual_seed(3)
    a = torch.randn(2, 4, 5, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, 3, generator=g, dtype=torch.float64, requires_grad=True)  # broadcast over the batch
    terms = (a.detach()[..., :, :, None] + b.detach()[None, None]).sort(dim=-2).values
    assert (terms[..., -1, :] - terms[..., -2, :]).min() > 1e-3  # away from ties
    assert torch.autograd.gradcheck(lambda x, y: MaxPlusMatmulFunction.apply(x, y, backend), (a, b))
    # the custom backward matches autograd through the torch backend
    cot = torch.randn(2, 4, 3, generator=g, dtype=torch.float64)
    ga, gb = torch.autograd.grad((maxplus_matmul(a, b, backend) * cot).sum(), (a, b))
    ta, tb = torch.autograd.grad((maxplus_matmul(a, b, "torch") * cot).sum(), (a, b))
    assert_close(ga, ta, rtol=1e-13, atol=1e-13)
    assert_close(gb, tb, rtol=1e-13, atol=1e-13)  # the batch sum runs in another order


# ----------------------------------------------------------------------------- scores
@pytest.mark.parametrize("backend", BACKENDS)
def test_hilbert_scores_definition_and_invariance(backend):
    g = torch.Generator().manual_seed(1)
    q = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    k = torch.randn(2, 7, 4, generator=g, dtype=torch.float64)
    diff = q[:, :, None, :] - k[:, None, :, :]
    d_h = diff.amax(-1) - diff.amin(-1)                                         # eq. (2)
    assert torch.equal(hilbert_scores(q, k, True, backend), -d_h)
    d_n = diff.sum(-1) - 4 * diff.amin(-1)                                      # eq. (4)
    assert_close(hilbert_scores(q, k, False, backend), -d_n, rtol=1e-13, atol=1e-13)
    assert (d_h >= 0).all()
    # projective invariance: d_H(q + c·1, k) = d_H(q, k); symmetry; zero on the diagonal
    shifted = q + torch.randn(2, 6, 1, generator=g, dtype=torch.float64)
    assert_close(hilbert_scores(shifted, k, True, backend), -d_h, rtol=1e-13, atol=1e-13)
    assert_close(hilbert_scores(k, q, True, backend), -d_h.transpose(1, 2), rtol=0, atol=0)
    assert hilbert_scores(q, q, True, backend).diagonal(dim1=-2, dim2=-1).abs().max() == 0


# ----------------------------------------------------------------------------- the module vs official code
def _module_from_fixture(g, backend):
    if "query_linear.weight" in {k[3:] for k in g if k.startswith("sd.")}:
        m = TropicalAttention(8, 2, qkv_proj=True, tropical_norm=True, backend=backend)
    else:
        m = TropicalAttention(8, 2, tropical_proj=bool(g["tropical_proj"]), tropical_norm=bool(g["tropical_norm"]),
                              symmetric=bool(g["symmetric"]), backend=backend)
    m = m.double()
    m.load_state_dict({k[3:]: torch.from_numpy(v) for k, v in g.items() if k.startswith("sd.")}, strict=True)
    return m


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", MODULE_FIXTURES)
def test_module_matches_official(name, backend):
    g = load_golden(GOLDEN / f"{name}.npz")
    m = _module_from_fixture(g, backend)
    x = torch.from_numpy(g["x"]).requires_grad_(True)
    y, s = m(x, return_weights=True)
    assert y.shape == (2, 5, 8) and s.shape == (2, 2, 5, 5)
    assert_close(y, g["out"], **GTOL, name=f"{name} out")
    assert_close(s.reshape(4, 5, 5), g["scores"], **GTOL, name=f"{name} scores")
    (y * torch.from_numpy(g["cot"])).sum().backward()
    assert_close(x.grad, g["grad_x"], **GTOL, name=f"{name} grad x")
    for key, p in m.named_parameters():
        assert_close(p.grad, g[f"grad.{key}"], **GTOL, name=f"{name} grad {key}")


def test_module_fixture_is_sensitive():
    # a wrong λ sign or a missing expm1 must break the comparison (the test can fail)
    g = load_golden(GOLDEN / "module_sym1_norm1.npz")
    m = _module_from_fixture(g, "torch")
    with torch.no_grad():
        m.lambda_param.neg_()
    assert not np.allclose(m(torch.from_numpy(g["x"])).detach().numpy(), g["out"], atol=1e-6)


def test_module_gradcheck_numba_backend():
    torch.manual_seed(0)
    m = TropicalAttention(4, 2, tropical_norm=True, backend="numba").double()
    x = (torch.rand(1, 3, 4, dtype=torch.float64) + 0.2).requires_grad_(True)  # ReLU smooth here
    assert torch.autograd.gradcheck(lambda t: m(t), (x,))


def test_causal_mask_blocks_the_future():
    torch.manual_seed(0)
    m = TropicalAttention(8, 2, causal=True).double()
    x = torch.randn(2, 6, 8, dtype=torch.float64)
    x2 = x.clone()
    x2[:, -1] += 5.0
    y, y2 = m(x), m(x2)
    assert torch.equal(y[:, :-1], y2[:, :-1]) and not torch.equal(y[:, -1], y2[:, -1])
    _, s = m(x, return_weights=True)
    assert torch.isneginf(s[..., 0, 1:]).all()


def test_tropical_linear_and_tiny_encoder_shapes():
    lin = TropicalLinear(3, 5)
    x = torch.randn(2, 4, 3)
    assert torch.equal(lin(x), (x[..., :, None] + lin.W.T[None, None]).amax(-2))
    assert lin(torch.randn(3)).shape == (5,)
    for attn in ("softmax", "tropical"):
        assert TinyEncoder(1, 8, 2, attn=attn, causal=True)(torch.randn(3, 7, 1)).shape == (3, 7, 1)


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise():
    a = np.zeros((2, 3))
    with pytest.raises(TypeError, match="a must have a floating-point dtype"):
        maxplus_matmul(np.zeros((2, 3), dtype=np.int64), a.T)
    with pytest.raises(ValueError, match="inner dimensions must match"):
        maxplus_matmul(a, a)
    with pytest.raises(TypeError, match="same dtype"):
        maxplus_matmul(a, a.T.astype(np.float32))
    with pytest.raises(TypeError, match="a and b must both be numpy arrays or both torch tensors"):
        maxplus_matmul(a, torch.zeros(3, 2, dtype=torch.float64))
    with pytest.raises(ValueError, match="b contains NaN"):
        maxplus_matmul(a, np.full((3, 2), np.nan))
    with pytest.raises(ValueError, match="at least 2 dimensions"):
        maxplus_matmul(np.zeros(3), a)
    with pytest.raises(ValueError, match="not broadcastable"):
        maxplus_matmul(np.zeros((2, 2, 3)), np.zeros((3, 3, 2)))
    with pytest.raises(ValueError, match="backend must be one of"):
        maxplus_matmul(a, a.T, backend="cuda")
    with pytest.raises(ValueError, match="d_model=6 must be a positive multiple of n_heads=4"):
        TropicalAttention(6, 4)
    with pytest.raises(ValueError, match="qkv_proj=True is the models.py variant"):
        TropicalAttention(8, 2, qkv_proj=True)
    with pytest.raises(ValueError, match=r"x must be a tensor of shape \(B, L, 8\)"):
        TropicalAttention(8, 2)(torch.randn(2, 5, 4))
    with pytest.raises(ValueError, match="attn must be 'softmax' or 'tropical'"):
        TinyEncoder(attn="linear")


@pytest.mark.gpu
def test_cuda_matches_cpu():
    g = load_golden(GOLDEN / "module_sym1_norm1.npz")
    m = _module_from_fixture(g, "torch").cuda()
    y = m(torch.from_numpy(g["x"]).cuda())
    assert_close(y.cpu(), g["out"], **GTOL)
    a = torch.randn(3, 200, 64, device="cuda")
    b = torch.randn(3, 64, 300, device="cuda")
    assert np.array_equal(maxplus_matmul(a, b).cpu().numpy(), maxplus_matmul(a.cpu().numpy(), b.cpu().numpy(), "numba"))
