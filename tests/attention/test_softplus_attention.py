"""Softplus attention with re-weighting (LSSA / LSSAR): paper-only verification.

No official code exists to compare with (see tests/golden: none; the chapter explains why), so the
module is checked against
  * a float64 reference written directly from the paper's equations (eqs. 2-6 of the chapter: cosine
    scores, N_i keys per row, lambda_i = log d log N_i, softplus + l1 normalisation, ReLU(N_i A - o_i)^p
    + l1 normalisation with o_i = 0 for the first three rows), evaluated with Python scalars, loop by loop;
  * invariants: rows sum to 1, the causal (or any) mask is respected, lambda grows with N as log N,
    re-weighting needs no parameters, never raises entropy or lowers the largest weight, keeps the order
    of the weights, has uniform and one-hot rows as fixed points and tends to argmax as p grows;
  * closed-form limits: large scale -> ReLU attention (softplus ~ ReLU), scores far below 0 -> softmax
    with temperature 1/lambda (softplus ~ exp), p -> infinity -> one-hot;
  * agreement of every backend of the fused streaming kernel (eqs. 8-9) with the unfused
    ``mha.attention(..., weight_fn=...)`` and of its torch gradients with autograd through the unfused path.

Tolerances. float64: 1e-12 absolute on weights and outputs (O(1) values, sums of <= 600 terms).
float32 LSSA: 2e-6 (a few ulps of O(1) values after a length-600 reduction). float32 LSSAR: 5e-5
absolute: raising to p = 15 multiplies the relative rounding error of every weight by p, and the
sharpened weights are O(1) (measured max 1.1e-5). Limits (softplus ~ ReLU / ~ exp) are checked to the
size of the neglected term.
"""
import math

import numpy as np
import pytest
import torch

from refimpl._common import assert_close
from refimpl.attention.mha import MultiHeadAttention, TinyTransformer, attention, causal_mask
from refimpl.attention.softplus_attention import (attention_entropy, cosine_scores, fused_lssa_attention,
                                                  length_scale, lssa_weight_fn, lssa_weights, lssar_weights,
                                                  reweight, set_lssa_weights)

BACKENDS = ["numpy", "numba", "torch"]


# ----------------------------------------------------------------------------- float64 reference
def paper_weights(q, k, causal=True, p=None, offset_rows=3):
    """Eqs. (2)-(6) with Python floats, for q (Lq, d), k (Lk, d) numpy float64 arrays."""
    lq, d = q.shape
    lk = k.shape[0]
    A = np.zeros((lq, lk))
    for i in range(lq):
        n = i + 1 + (lk - lq) if causal else lk
        lam = math.log(d) * math.log(n)
        qi = q[i] / math.sqrt(sum(x * x for x in q[i]))
        f = []
        for j in range(n):
            kj = k[j] / math.sqrt(sum(x * x for x in k[j]))
            s = sum(a * b for a, b in zip(qi, kj))
            x = lam * s
            f.append(math.log1p(math.exp(x)) if x < 30 else x + math.log1p(math.exp(-x)))
        z = sum(f)
        a = [fj / z for fj in f]
        if p is not None:
            o = 0.0 if n <= offset_rows else 1.0
            r = [max(n * aj - o, 0.0) ** p for aj in a]
            if sum(r) > 0:
                a = [rj / sum(r) for rj in r]
        A[i, :n] = a
    return A


def _qkv(rng, lq=23, lk=None, d=16, dv=8, lead=(2, 3), dtype=np.float64):
    lk = lq if lk is None else lk
    q = rng.standard_normal(lead + (lq, d)).astype(dtype)
    k = rng.standard_normal(lead + (lk, d)).astype(dtype)
    v = rng.standard_normal(lead + (lk, dv)).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("p", [None, 15, 3])
@pytest.mark.parametrize("causal,lq,lk", [(True, 23, 23), (True, 9, 30), (False, 17, 11)])
def test_weights_match_paper_reference(rng, p, causal, lq, lk):
    q, k, v = _qkv(rng, lq, lk, lead=(2,))
    qt, kt, vt = (torch.from_numpy(a) for a in (q, k, v))
    out, w = attention(qt, kt, vt, causal=causal, score_fn=cosine_scores, weight_fn=lssa_weight_fn(16, p))
    for b in range(2):
        ref = paper_weights(q[b], k[b], causal, p)
        assert_close(w[b], ref, rtol=0, atol=1e-12, name=f"weights p={p}")
        assert_close(out[b], ref @ v[b], rtol=0, atol=1e-12, name="output")
    # the weights differ from plain LSSA when re-weighting is on (the test can fail)
    if p is not None:
        assert np.abs(w[0].numpy() - paper_weights(q[0], k[0], causal, None)).max() > 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("p", [None, 15.0])
@pytest.mark.parametrize("causal,lq,lk", [(True, 37, 37), (True, 5, 40), (False, 29, 13), (True, 400, 400)])
def test_fused_backends_match_unfused(rng, backend, dtype, p, causal, lq, lk):
    lead = (1, 1) if lq == 400 else (2, 3)
    q, k, v = _qkv(rng, lq, lk, lead=lead, dtype=dtype)
    qt, kt, vt = (torch.from_numpy(a) for a in (q, k, v))
    ref, _ = attention(qt.double(), kt.double(), vt.double(), causal=causal, score_fn=cosine_scores,
                       weight_fn=lssa_weight_fn(16, p))
    got = fused_lssa_attention(q, k, v, causal=causal, p=p, backend=backend)
    assert isinstance(got, np.ndarray) and got.dtype == dtype and got.shape == lead + (lq, 8)
    atol = 1e-12 if dtype == np.float64 else (2e-6 if p is None else 5e-5)
    assert_close(got, ref, rtol=0, atol=atol, name=f"fused[{backend}]")
    got_t = fused_lssa_attention(qt, kt, vt, causal=causal, p=p, backend=backend, block=7 if lq < 400 else 128)
    assert isinstance(got_t, torch.Tensor) and got_t.dtype == qt.dtype
    assert_close(got_t, ref, rtol=0, atol=atol)


def test_float32_vectorised_softplus_accuracy():
    # the numba kernel's libm-free float32 softplus (Cody-Waite exp + atanh series for log1p)
    from refimpl.attention.softplus_attention import _softplus_tile_f32
    x = np.concatenate([np.linspace(-100, 100, 4001), [0.0, -87.5, 87.5, 1e-6, -1e-6]]).astype(np.float32)
    got = x.copy()
    _softplus_tile_f32(got, x.size, np.empty(x.size, np.int32))
    exact = np.logaddexp(0.0, x.astype(np.float64))
    err = np.abs(got - exact)
    assert np.all(err <= 3e-7 * exact + 1e-37), float(np.max(err / np.maximum(exact, 1e-37)))


def test_auto_backend_and_unbatched(rng):
    q, k, v = _qkv(rng, 12, lead=())
    a = fused_lssa_attention(q, k, v)                       # numba for arrays
    t = fused_lssa_attention(*(torch.from_numpy(x) for x in (q, k, v)))   # torch for tensors
    assert isinstance(a, np.ndarray) and isinstance(t, torch.Tensor) and a.shape == (12, 8)
    assert_close(a, t, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------- invariants
def test_rows_sum_to_one_and_mask_respected(rng):
    s = torch.from_numpy(rng.uniform(-1, 1, (2, 3, 19, 19)))
    cm = causal_mask(19, 19)
    for w in (lssa_weights(s, cm, d_head=64), lssar_weights(s, cm, d_head=64)):
        assert_close(w.sum(-1), torch.ones(2, 3, 19), rtol=0, atol=1e-13)
        assert bool((w[..., ~cm] == 0).all()) and bool((w >= 0).all())
    # an arbitrary (padding) mask: N_i counts the visible keys of row i, masked keys get weight 0
    pad = torch.from_numpy(rng.uniform(size=(2, 1, 19, 19)) < 0.6)
    pad[..., 0] = True
    w = lssa_weights(s, pad, d_head=64)
    assert bool((w[~pad.expand_as(w)] == 0).all())
    assert_close(w.sum(-1), torch.ones(2, 3, 19), rtol=0, atol=1e-13)
    row = s[0, 0, 5][pad[0, 0, 5]]
    lam = length_scale(int(pad[0, 0, 5].sum()), 64)
    f = torch.nn.functional.softplus(lam * row)
    assert_close(w[0, 0, 5][pad[0, 0, 5]], f / f.sum(), rtol=0, atol=1e-14)
    # a row that sees no key is all zero, not NaN
    none = torch.zeros(1, 19, dtype=torch.bool)
    assert bool((lssar_weights(s[0, 0, :1], none, d_head=64) == 0).all())


def test_length_scale_grows_with_n_as_log_n():
    n = np.array([1, 2, 16, 256, 4096])
    lam = length_scale(n, 64)
    assert_close(lam, np.log(64) * np.log(n), rtol=1e-15, atol=0)
    assert lam[0] == 0 and np.all(np.diff(lam) > 0)
    # doubling N adds the same amount, log d log 2, whatever N is
    assert_close(length_scale(2 * n, 64) - lam, np.full(5, np.log(64) * np.log(2)), rtol=1e-12, atol=1e-12)
    assert length_scale(torch.tensor(8.0), 8).item() == pytest.approx(math.log(8) ** 2)
    with pytest.raises(ValueError, match="n_keys must be >= 1"):
        length_scale(0, 64)


def test_causal_rows_use_their_own_key_count(rng):
    # row i of causal LSSA equals non-causal LSSA on its first i+1 keys (lambda from N_i = i+1)
    q, k, v = _qkv(rng, 20, lead=())
    s = cosine_scores(torch.from_numpy(q), torch.from_numpy(k))
    w = lssa_weights(s, causal_mask(20), d_head=16)
    for i in (0, 1, 7, 19):
        alone = lssa_weights(s[i:i + 1, : i + 1], None, d_head=16)
        assert_close(w[i, : i + 1], alone[0], rtol=0, atol=1e-14)
    assert_close(w[0, 0], torch.tensor(1.0, dtype=torch.float64), rtol=0, atol=0)   # N=1: lambda=0, weight 1


def test_larger_scale_lowers_entropy(rng):
    s = torch.from_numpy(rng.uniform(-1, 1, (64, 256)))
    ent = [attention_entropy(lssa_weights(s, None, d_head=d)).mean().item() for d in (2, 8, 64, 1024)]
    assert all(a > b for a, b in zip(ent, ent[1:])), ent


def test_reweighting_sharpens_and_is_training_free(rng):
    s = torch.from_numpy(rng.uniform(-1, 1, (4, 40, 40)))
    cm = causal_mask(40)
    a = lssa_weights(s, cm, d_head=64)
    for p in (1.0, 3.0, 15.0):
        r = reweight(a, cm, p=p)
        assert bool((attention_entropy(r) <= attention_entropy(a) + 1e-12).all())
        assert bool((r.amax(-1) >= a.amax(-1) - 1e-12).all())
        assert bool((r.argmax(-1) == a.argmax(-1)).all())
        # below-average weights are removed (rows with N_i > 3), above-average ones keep their order
        n = torch.arange(1, 41, dtype=torch.float64)[:, None]
        below = (a * n < 1) & cm & (n > 3)
        assert bool((r[below] == 0).all())
        kept = r[0, 30][a[0, 30] * 31 > 1]
        order = a[0, 30][a[0, 30] * 31 > 1]
        assert bool((torch.argsort(kept) == torch.argsort(order)).all())
    # entropy strictly drops on average with the paper's p = 15
    assert attention_entropy(reweight(a, cm)).mean() < 0.5 * attention_entropy(a).mean()
    # nothing to train: the re-weighting is a pure function of the weights
    assert not any(isinstance(x, torch.nn.Parameter) for x in vars(reweight).values())


def test_reweighting_fixed_points_and_limits():
    uni = torch.full((3, 8), 1 / 8, dtype=torch.float64)
    assert_close(reweight(uni), uni, rtol=0, atol=0)                       # uniform rows: unchanged
    hot = torch.eye(8, dtype=torch.float64)[:3]
    assert_close(reweight(hot), hot, rtol=0, atol=0)                       # one-hot rows: unchanged
    a = torch.tensor([[0.1, 0.25, 0.3, 0.35, 0.0]], dtype=torch.float64)
    assert_close(reweight(a, p=400), torch.tensor([[0, 0, 0, 1.0, 0]], dtype=torch.float64), rtol=0, atol=1e-12)
    # first rows (N_i <= 3) have no offset: R = A^p / sum A^p
    b = torch.tensor([[0.3, 0.7, 0.0]], dtype=torch.float64)
    m = torch.tensor([[True, True, False]])
    assert_close(reweight(b, m, p=3), (b ** 3) / (b ** 3).sum(), rtol=0, atol=1e-15)
    # with offset_rows=0 the offset applies everywhere: the below-mean 0.3 (< 1/2) is removed
    assert_close(reweight(b, m, p=3, offset_rows=0), torch.tensor([[0, 1.0, 0]], dtype=torch.float64),
                 rtol=0, atol=0)


def test_limits_relu_and_softmax(rng):
    s = torch.from_numpy(rng.uniform(-1, 1, (5, 30)))
    lam = length_scale(30, 64)
    # large scale: softplus(c x) / c -> ReLU(x): LSSA -> ReLU attention (error ~ log 2 / c)
    c = 1e4
    relu = torch.relu(s) / torch.relu(s).sum(-1, keepdim=True)
    assert_close(lssa_weights(c * s, None, d_head=64), relu, rtol=0, atol=1e-4)
    # scores far below zero: softplus(x) = exp(x)(1 - exp(x)/2 + ...) -> softmax with temperature 1/lambda
    shifted = s - 60.0 / lam
    sm = torch.softmax(lam * s, dim=-1)
    assert_close(lssa_weights(shifted, None, d_head=64), sm, rtol=0, atol=1e-12)
    assert (lssa_weights(s, None, d_head=64) - sm).abs().max() > 1e-2      # but not for ordinary scores


# ----------------------------------------------------------------------------- gradients, modules
def test_torch_fused_gradients_match_unfused(rng):
    q, k, v = (torch.tensor(a, requires_grad=True) for a in _qkv(rng, 11, lead=(1, 2), d=8, dv=4))
    g = torch.from_numpy(rng.standard_normal((1, 2, 11, 4)))
    for p in (None, 15.0):
        out = fused_lssa_attention(q, k, v, p=p, backend="torch", block=4)
        grads = torch.autograd.grad(out, (q, k, v), g)
        ref, _ = attention(q, k, v, causal=True, score_fn=cosine_scores, weight_fn=lssa_weight_fn(8, p))
        ref_grads = torch.autograd.grad(ref, (q, k, v), g)
        for a, b in zip(grads, ref_grads):
            assert_close(a, b, rtol=0, atol=1e-12)
    # autograd through the weight functions is consistent with finite differences
    qs, ks, vs = (t.detach()[..., :6, :].clone().requires_grad_(True) for t in (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: fused_lssa_attention(a, b, c, p=3.0, backend="torch"),
                                    (qs, ks, vs))


def test_multihead_attention_and_switching(rng):
    torch.manual_seed(0)
    model = TinyTransformer(12, d_model=32, n_heads=4, n_layers=2,
                            attn_kwargs=dict(score_fn=cosine_scores, weight_fn=lssa_weight_fn(8)))
    tok = torch.from_numpy(rng.integers(0, 12, (2, 40)))
    y0 = model(tok)
    assert set_lssa_weights(model, 15) == 2
    y1 = model(tok)
    assert set_lssa_weights(model, None) == 2
    assert_close(model(tok), y0, rtol=0, atol=0)
    assert torch.isfinite(y1).all() and (y1 - y0).abs().max() > 1e-3
    mha = MultiHeadAttention(16, 2, causal=True, score_fn=cosine_scores, weight_fn=lssa_weight_fn(8, 15))
    _, w = mha(torch.randn(1, 9, 16), return_weights=True)
    assert_close(w.sum(-1), torch.ones(1, 2, 9), rtol=0, atol=1e-6)
    assert set_lssa_weights(torch.nn.Linear(2, 2), 3) == 0


# ----------------------------------------------------------------------------- errors
def test_bad_inputs_raise(rng):
    q, k, v = _qkv(rng, 6, lead=(1,))
    with pytest.raises(TypeError, match="q must be a numpy.ndarray or torch.Tensor"):
        fused_lssa_attention(q.tolist(), k, v)
    with pytest.raises(TypeError, match="floating-point dtype"):
        fused_lssa_attention(q.astype(np.int64), k, v)
    with pytest.raises(TypeError, match="one type and dtype"):
        fused_lssa_attention(q.astype(np.float32), k, v)
    with pytest.raises(ValueError, match="same feature size"):
        fused_lssa_attention(q[..., :5], k, v)
    with pytest.raises(ValueError, match="same length"):
        fused_lssa_attention(q, k, v[..., :4, :])
    with pytest.raises(ValueError, match="at least as many keys"):
        fused_lssa_attention(q, k[..., :3, :], v[..., :3, :])
    with pytest.raises(ValueError, match="same leading dimensions"):
        fused_lssa_attention(q, np.concatenate([k, k]), np.concatenate([v, v]))
    with pytest.raises(ValueError, match="p must be a finite number > 0"):
        fused_lssa_attention(q, k, v, p=0)
    with pytest.raises(TypeError, match="p must be a real number"):
        fused_lssa_attention(q, k, v, p="15")
    with pytest.raises(ValueError, match="offset_rows must be >= 0"):
        fused_lssa_attention(q, k, v, p=2, offset_rows=-1)
    with pytest.raises(TypeError, match="causal must be a bool"):
        fused_lssa_attention(q, k, v, causal=1)
    with pytest.raises(ValueError, match="backend must be one of"):
        fused_lssa_attention(q, k, v, backend="cuda")
    bad = q.copy()
    bad[0, 2, 3] = np.nan
    with pytest.raises(ValueError, match="q contains NaN"):
        fused_lssa_attention(bad, k, v, backend="numba")
    s = torch.zeros(3, 3)
    with pytest.raises(TypeError, match="d_head must be an int"):
        lssa_weights(s, d_head=8.0)
    with pytest.raises(ValueError, match="d_head must be >= 1"):
        lssa_weight_fn(0)
    with pytest.raises(TypeError, match="mask must be a boolean tensor"):
        lssa_weights(s, torch.ones(3, 3), d_head=8)
    with pytest.raises(ValueError, match="does not broadcast"):
        reweight(s, torch.ones(2, 2, dtype=torch.bool))
    with pytest.raises(TypeError, match="scores must be a torch.Tensor"):
        lssa_weights(np.zeros((3, 3)), d_head=8)
    with pytest.raises(ValueError, match=r"scores must have shape \(\.\.\., Lq, Lk\)"):
        lssa_weights(torch.zeros(3), d_head=8)


@pytest.mark.gpu
def test_cuda_matches_cpu(rng):
    q, k, v = (torch.from_numpy(a).float() for a in _qkv(rng, 300, lead=(2, 4), d=64, dv=64))
    for p in (None, 15.0):
        cpu = fused_lssa_attention(q, k, v, p=p, backend="torch")
        gpu = fused_lssa_attention(q.cuda(), k.cuda(), v.cuda(), p=p, backend="torch")
        assert gpu.is_cuda
        assert_close(gpu.cpu(), cpu, rtol=0, atol=5e-5 if p else 2e-6)
