"""S4D: the kernel, the recurrent scan, the initialisations and the layer against golden fixtures of the
official state-spaces/s4 code (tests/golden/s4d_diagonal_ssm/PROVENANCE.md), every backend against the NumPy
reference, the convolutional mode against the recurrent mode, and clear errors on bad input.

Tolerances (float32, as the official code computes):
- kernels and outputs: atol 2e-6 + rtol 2e-5. Each K_l sums N/2 <= 8 complex terms of size <= ~10 (LegS B up to 2,
  C ~ CN(0,1)), each carrying a few float32 roundings (eps 6e-8) in exp/cos/sin of arguments up to ~L * dt * |A| ~ 400
  rad, where the float32 argument itself has an absolute error ~2e-5 * 6e-8... measured max errors are 3e-7 abs;
  the bounds leave ~10x headroom while still failing for any wrong sign, factor 2, missing B or wrong discretisation
  (those change K by O(1)).
- recurrent mode vs convolution: the scan accumulates L = 64 roundings per state: atol 1e-5, rtol 1e-4 (measured 3e-6).
- float64 cross-backend checks: 1e-10 (the numba Vandermonde kernel multiplies powers for up to 32 steps between
  exact re-evaluations: ~32 * 1e-16 relative).
- HiPPO-LegS (float64 official path): 1e-12; float32 official path: 1e-5 relative.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from refimpl._common import assert_close, load_golden
from refimpl.attention.s4d_diagonal_ssm import (S4D, S4DKernel, discretize, fft_conv, hippo_legs, hippo_legs_nplr,
                                               s4d_init, s4d_kernel, ssm_scan, vandermonde_kernel)

GOLDEN = Path(__file__).parent.parent / "golden" / "s4d_diagonal_ssm"
BACKENDS = ["numpy", "numba", "torch"]
F32 = dict(rtol=2e-5, atol=2e-6)
FULL_CASES = ["lin_zoh", "inv_zoh", "legs_zoh", "lin_bilinear"]


def _c(a):
    """Official view_as_real pairs -> complex."""
    return a[..., 0] + 1j * a[..., 1]


def _ri(z):
    """Complex -> stacked (real, imag) for assert_close."""
    z = z.detach().numpy() if isinstance(z, torch.Tensor) else np.asarray(z)
    return np.stack([z.real, z.imag])


def _full_params(d):
    dt = np.exp(d["sd_inv_dt"]).astype(np.float32)                       # dt_transform 'exp', (H, 1)
    A = (-np.exp(d["sd_A_real"]) - 1j * d["sd_A_imag"]).astype(np.complex64)  # s4.py: A = -real - i imag
    return dt, A, _c(d["sd_B"])[0].astype(np.complex64), _c(d["sd_C"])[0].astype(np.complex64)


@pytest.fixture(scope="module")
def minimal():
    return load_golden(GOLDEN / "s4d_minimal.npz")


# ----------------------------------------------------------------------------- official: minimal S4D
def test_same_seed_same_parameters_as_official(minimal):
    torch.manual_seed(0)
    layer = S4D(4, 8)
    for k, v in layer.state_dict().items():
        assert np.array_equal(v.numpy(), minimal["sd_" + k.replace(".", "__")]), k


@pytest.mark.parametrize("L", [16, 64])
def test_minimal_kernel_and_layer_match_official(minimal, L):
    layer = S4D(4, 8)
    layer.load_state_dict({k: torch.from_numpy(minimal["sd_" + k.replace(".", "__")]) for k in layer.state_dict()})
    u = torch.from_numpy(minimal[f"u_{L}"])
    with torch.no_grad():
        assert_close(layer.kernel(L), minimal[f"K_{L}"], **F32, name="K")
        assert_close(layer(u), minimal[f"y_{L}"], **F32, name="y (convolution)")
        for backend in BACKENDS:
            assert_close(layer.forward_recurrent(u, backend=backend), minimal[f"y_{L}"], rtol=1e-4, atol=1e-5,
                         name=f"y (recurrent, {backend})")


def test_minimal_gradients_match_official(minimal):
    layer = S4D(4, 8)
    layer.load_state_dict({k: torch.from_numpy(minimal["sd_" + k.replace(".", "__")]) for k in layer.state_dict()})
    (layer(torch.from_numpy(minimal["u_16"])) ** 2).sum().backward()
    for k, p in layer.named_parameters():
        ref = minimal["grad_" + k.replace(".", "__")]
        assert_close(p.grad, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(), name=f"grad {k}")


# ----------------------------------------------------------------------------- official: SSMKernelDiag
@pytest.mark.parametrize("case", FULL_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_full_kernel_matches_official(case, backend):
    d = load_golden(GOLDEN / f"ssm_kernel_diag_{case}.npz")
    dt, A, B, C = _full_params(d)
    K = s4d_kernel(dt, A, B, C, 64, disc=case.split("_")[1], backend=backend)
    assert K.dtype == np.float32 and K.shape == (3, 64)
    assert_close(K, d["K"][0], **F32, name=f"K {case}")


@pytest.mark.parametrize("case", FULL_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_recurrent_steps_match_official(case, backend):
    d = load_golden(GOLDEN / f"ssm_kernel_diag_{case}.npz")
    dt, A, B, C = _full_params(d)
    dA, dB = discretize(dt, A, B, case.split("_")[1])
    assert_close(_ri(dA), np.stack([d["dA_re"], d["dA_im"]]), rtol=1e-6, atol=1e-6, name="Abar")
    assert_close(_ri(dB), np.stack([d["dB_re"], d["dB_im"]]), rtol=1e-5, atol=1e-7, name="Bbar")
    y, x = ssm_scan(d["u"], dA, dB, C, backend=backend)
    assert_close(y, d["y_step"][:, 0], rtol=1e-4, atol=1e-5, name="y_step")
    assert_close(_ri(x), np.stack([d["state_re"], d["state_im"]]), rtol=1e-4, atol=1e-5, name="final state")
    # the recurrent mode equals the convolution with the kernel (eqs. 4-5)
    assert_close(y, fft_conv(d["u"], d["K"][0]), rtol=1e-4, atol=1e-5, name="scan vs conv")


@pytest.mark.parametrize("case", FULL_CASES[:3])
def test_inits_match_official(case):
    d = load_golden(GOLDEN / f"ssm_kernel_diag_{case}.npz")
    A, B = s4d_init(case.split("_")[0], 16, 3)
    # the official full code stores A_imag clamped at >= 1e-4 (inv_transform), so the S4D-Lin n = 0 mode is 1e-4
    assert_close(np.maximum(A.imag, 1e-4), d["sd_A_imag"], rtol=1e-6, atol=1e-6, name="A_imag")
    assert_close(-A.real, np.exp(d["sd_A_real"]), rtol=1e-6, name="A_real")
    Boff = _c(d["sd_B"])[0]
    if case.startswith("legs"):
        # B's phase is the eigensolver's choice; magnitudes agree where the official clip (|Im B| <= 2) is inactive
        free = np.abs(Boff.imag) < 2 - 1e-6
        assert (~free).any() and free.any()
        assert_close(np.abs(B)[free], np.abs(Boff)[free], rtol=1e-5, name="|B| LegS")
        assert np.all(np.abs(Boff[~free]) < np.abs(B[~free]) - 1e-3)      # clipping shrinks |B|
    else:
        assert np.array_equal(B, np.ones_like(B)) and np.allclose(Boff, 1)


# ----------------------------------------------------------------------------- official: HiPPO-LegS
@pytest.mark.parametrize("n", [8, 64])
def test_hippo_legs_and_nplr_match_official(n):
    h = load_golden(GOLDEN / "hippo_legs.npz")
    A, B = hippo_legs(n)
    assert_close(A, h[f"hippo_A_{n}"], rtol=1e-12, atol=1e-12, name="HiPPO A")
    assert_close(B, h[f"hippo_B_{n}"], rtol=1e-12, atol=1e-12, name="HiPPO B")
    lam, P, Bt, V = hippo_legs_nplr(n)
    for pre, tol, clip in (("", dict(rtol=1e-5, atol=1e-5 * n), True), ("64", dict(rtol=1e-12, atol=1e-12), False)):
        W = h[f"W{pre}_re_{n}"] + 1j * h[f"W{pre}_im_{n}"]
        Poff = h[f"P{pre}_re_{n}"] + 1j * h[f"P{pre}_im_{n}"]
        Boff = h[f"B{pre}_re_{n}"] + 1j * h[f"B{pre}_im_{n}"]
        assert_close(_ri(np.conj(lam)), _ri(W), **tol, name="eigenvalues")   # s4.py keeps the conjugates
        phase = Poff / np.abs(Poff)                                        # align the free eigenvector phases via P
        assert_close(_ri(phase * P), _ri(Poff), **tol, name="V^* P")
        Bm = phase * Bt
        if clip:
            Bm = Bm.real + 1j * np.clip(Bm.imag, -2.0, 2.0)
        assert_close(_ri(Bm), _ri(Boff), **tol, name="V^* B")


def test_nplr_reconstructs_hippo():
    """A = V diag(lam) V^* + conj - P P^T (eq. 10) and B = sqrt(2) P in the eigenbasis."""
    n = 16
    A, B = hippo_legs(n)
    lam, Pt, Bt, V = hippo_legs_nplr(n)
    AN = 2 * (V @ np.diag(lam) @ V.conj().T).real
    p = np.sqrt(np.arange(n) + 0.5)
    assert_close(AN - np.outer(p, p), A, rtol=1e-10, atol=1e-10, name="A")
    assert_close(2 * (V @ Bt).real, B, rtol=1e-10, atol=1e-10, name="B")
    assert np.allclose(Bt.imag, 0) and np.allclose(Bt.real, np.sqrt(2) * Pt.real) and np.all(Pt.real > 0)
    assert np.allclose(lam.real, -0.5) and np.all(np.diff(lam.imag) < 0)


# ----------------------------------------------------------------------------- backends and modes
@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
@pytest.mark.parametrize("H,N,L", [(3, 8, 50), (2, 32, 1000), (1, 2, 1), (64, 32, 200)])
def test_vandermonde_backends_agree(rng, dtype, H, N, L):
    w = (rng.standard_normal((H, N)) + 1j * rng.standard_normal((H, N))).astype(dtype)
    x = (-rng.uniform(0, 0.05, (H, N)) + 1j * rng.uniform(0, 2, (H, N))).astype(dtype)
    ref = vandermonde_kernel(w.astype(np.complex128), x.astype(np.complex128), L, backend="numpy")
    tol = dict(rtol=1e-10, atol=1e-10 * N) if dtype == np.complex128 else dict(rtol=1e-4, atol=2e-5 * N)
    for backend in BACKENDS:
        K = vandermonde_kernel(w, x, L, backend=backend)
        assert K.shape == (H, L) and K.dtype == (np.float64 if dtype == np.complex128 else np.float32)
        assert_close(K, ref, **tol, name=f"K[{backend}]")
    Kt = vandermonde_kernel(torch.from_numpy(w), torch.from_numpy(x), L)
    assert isinstance(Kt, torch.Tensor)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("Bsz,H,N,L", [(2, 3, 8, 40), (1, 1, 2, 1), (4, 64, 32, 64)])
def test_scan_backends_agree_and_equal_convolution(rng, dtype, Bsz, H, N, L):
    cdt = np.complex128 if dtype == np.float64 else np.complex64
    A, B = s4d_init("inv", 2 * N, H)
    dt = np.exp(rng.uniform(np.log(1e-3), np.log(1e-1), (H, 1)))
    C = rng.standard_normal((H, N)) + 1j * rng.standard_normal((H, N))
    dA, dB = discretize(dt, A, B, "zoh")
    u = rng.standard_normal((Bsz, H, L)).astype(dtype)
    x0 = (rng.standard_normal((Bsz, H, N)) + 1j * rng.standard_normal((Bsz, H, N))).astype(cdt)
    ref, xref = ssm_scan(u.astype(np.float64), dA, dB, C, state=x0.astype(np.complex128), backend="numpy")
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=1e-4, atol=1e-4)
    for backend in BACKENDS:
        y, x = ssm_scan(u, dA.astype(cdt), dB.astype(cdt), C.astype(cdt), state=x0, backend=backend)
        assert y.dtype == dtype and x.dtype == cdt and y.shape == u.shape
        assert_close(y, ref, **tol, name=f"y[{backend}]")
        assert_close(_ri(x), _ri(xref), **tol, name=f"state[{backend}]")
    # from a zero state, the recurrent mode equals the FFT convolution with the kernel (eqs. 4-8)
    y0, _ = ssm_scan(u.astype(np.float64), dA, dB, C, backend="numba")
    K = s4d_kernel(dt, A, B, C, L, backend="numpy")
    assert_close(y0, fft_conv(u.astype(np.float64), K), rtol=1e-9, atol=1e-9, name="scan vs conv")


def test_bilinear_and_zoh_agree_for_small_steps(rng):
    A, B = s4d_init("lin", 16, 2)
    dt = np.full((2, 1), 1e-4)
    C = rng.standard_normal((2, 8)) + 0j
    K1 = s4d_kernel(dt, A, B, C, 32, "zoh", backend="numpy")
    K2 = s4d_kernel(dt, A, B, C, 32, "bilinear", backend="numpy")
    assert_close(K2, K1, rtol=1e-6, atol=1e-9 * np.abs(K1).max() + 1e-12)


def test_fft_conv_is_causal_convolution(rng):
    u = rng.standard_normal((2, 3, 20))
    K = rng.standard_normal((3, 20))
    D = rng.standard_normal(3)
    direct = np.stack([[np.convolve(u[b, h], K[h])[:20] for h in range(3)] for b in range(2)]) + u * D[:, None]
    assert_close(fft_conv(u, K, D), direct, rtol=1e-10, atol=1e-10)
    assert_close(fft_conv(torch.from_numpy(u), torch.from_numpy(K), torch.from_numpy(D)), direct, rtol=1e-10,
                 atol=1e-10)


def test_gradients_flow_and_gradcheck_float64():
    """No custom backward: autograd through the torch backend; gradcheck the kernel and the scan in float64."""
    rng = np.random.default_rng(1)
    dt = torch.tensor(rng.uniform(0.01, 0.1, (2, 1)), requires_grad=True)
    A = torch.tensor(-0.5 + 1j * rng.uniform(0, 3, (2, 3)), requires_grad=True)
    C = torch.tensor(rng.standard_normal((2, 3)) + 1j * rng.standard_normal((2, 3)), requires_grad=True)
    B = torch.ones(2, 3, dtype=torch.complex128)
    assert torch.autograd.gradcheck(lambda dt, A, C: s4d_kernel(dt, A, B, C, 5, backend="torch"), (dt, A, C))
    u = torch.tensor(rng.standard_normal((1, 2, 4)), requires_grad=True)
    fn = lambda u, A, C: ssm_scan(u, torch.exp(A), torch.ones_like(A), C, backend="torch")[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (u, A, C))
    layer = S4D(3, 8, init="legs")
    layer(torch.randn(2, 3, 16)).sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in layer.parameters())


@pytest.mark.parametrize("init", ["lin", "inv", "legs", "rand", "real"])
def test_layer_conv_equals_recurrent_for_every_init(init):
    torch.manual_seed(3)
    layer = S4D(4, 16, init=init, transposed=False).double()
    u = torch.randn(2, 40, 4, dtype=torch.float64)
    with torch.no_grad():
        y = layer(u)
        assert y.shape == u.shape
        for backend in BACKENDS:
            assert_close(layer.forward_recurrent(u, backend=backend), y, rtol=1e-9, atol=1e-9, name=backend)


def test_init_formulas():
    A, B = s4d_init("lin", 8)
    assert np.allclose(A, -0.5 + 1j * np.pi * np.arange(4)) and A.shape == (1, 4)
    A, _ = s4d_init("inv", 8, 2)
    assert np.allclose(A[1], -0.5 + 1j * 8 / np.pi * (8 / (2 * np.arange(4) + 1) - 1))
    A, _ = s4d_init("real", 8)
    assert np.allclose(A, -(np.arange(4) + 1))
    g = torch.Generator().manual_seed(0)
    A1, _ = s4d_init("rand", 8, 3, generator=g)
    assert A1.shape == (3, 4) and np.all(A1.imag > 0) and np.allclose(A1.real, -0.5)
    # S4D-Inv tracks the S4D-LegS frequencies (the paper's motivation for Inv): they span O(N^2), yet differ
    # by less than N/pi everywhere (measured: 81 at the top, where both are ~2e4)
    lam, *_ = hippo_legs_nplr(256)
    inv, _ = s4d_init("inv", 256)
    assert lam.imag[0] > 2e4 and np.abs(lam.imag - inv[0].imag).max() < 256 / np.pi


def test_kernel_module_options():
    k = S4DKernel(4, N=8, lr=0.0)
    assert {n for n, _ in k.named_buffers()} == {"log_dt", "log_A_real", "A_imag"}
    k = S4DKernel(4, N=8, lr=1e-3)
    assert k.log_dt._optim == {"weight_decay": 0.0, "lr": 1e-3}
    assert "init='lin'" in repr(k)
    k = S4DKernel(2, N=8, init="legs", disc="bilinear")
    assert k(10).shape == (2, 10)
    layer = S4D(4, 8, dropout=0.5)
    layer.train()
    assert layer(torch.randn(2, 4, 8)).shape == (2, 4, 8)


def test_bad_inputs_raise():
    w = np.ones((2, 3), np.complex64)
    with pytest.raises(TypeError, match="w must have a complex dtype"):
        vandermonde_kernel(np.ones((2, 3), np.float32), w, 4)
    with pytest.raises(ValueError, match="same shape"):
        vandermonde_kernel(w, np.ones((2, 4), np.complex64), 4)
    with pytest.raises(ValueError, match="w must have 2 dimensions"):
        vandermonde_kernel(np.ones(3, np.complex64), np.ones(3, np.complex64), 4)
    with pytest.raises(ValueError, match="L must be a positive int"):
        vandermonde_kernel(w, w, 0)
    with pytest.raises(TypeError, match="numpy.ndarray or torch.Tensor"):
        vandermonde_kernel([[1j]], w, 4)
    with pytest.raises(ValueError, match="backend must be one of"):
        vandermonde_kernel(w, w, 4, backend="cuda")
    u = np.ones((1, 2, 5), np.float32)
    with pytest.raises(ValueError, match="u must have 3 dimensions"):
        ssm_scan(u[0], w, w, w)
    with pytest.raises(ValueError, match="C must have shape"):
        ssm_scan(u, w, w, np.ones((2, 4), np.complex64))
    with pytest.raises(ValueError, match="state must have shape"):
        ssm_scan(u, w, w, w, state=np.zeros((1, 2, 4), np.complex64))
    bad = u.copy()
    bad[0, 1, 2] = np.nan
    with pytest.raises(ValueError, match="u contains NaN"):
        ssm_scan(bad, w, w, w)
    with pytest.raises(ValueError, match="method must be one of"):
        discretize(np.ones((2, 1)), w, w, "euler")
    with pytest.raises(ValueError, match="init must be one of"):
        s4d_init("hippo", 8)
    with pytest.raises(ValueError, match="N must be an even int"):
        s4d_init("lin", 7)
    with pytest.raises(ValueError, match="K must have shape"):
        fft_conv(np.ones((1, 2, 5)), np.ones((2, 4)))
    with pytest.raises(ValueError, match="dt_min must be <= dt_max"):
        S4DKernel(2, dt_min=0.1, dt_max=0.01)
    with pytest.raises(ValueError, match="d_model must be a positive int"):
        S4DKernel(0)
    with pytest.raises(ValueError, match=r"u must have shape \(B, H=4, L\)"):
        S4D(4, 8)(torch.ones(2, 3, 8))
    with pytest.raises(TypeError, match="u must be a floating-point torch.Tensor"):
        S4D(4, 8)(np.ones((2, 4, 8)))


@pytest.mark.gpu
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    layer = S4D(8, 64, init="inv")
    u = torch.randn(4, 8, 512)
    with torch.no_grad():
        ref = layer(u)
        layer_c = layer.cuda()
        y = layer_c(u.cuda())
        y_rec = layer_c.forward_recurrent(u[..., :64].cuda())
    assert_close(y.cpu(), ref, rtol=1e-4, atol=1e-4, name="conv cuda")
    assert_close(y_rec.cpu(), ref[..., :64], rtol=1e-4, atol=1e-4, name="recurrent cuda")
