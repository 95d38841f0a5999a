"""D2O: the critical loop (nearest retained key + scatter merge) on every backend, the token- and layer-level
steps against golden fixtures of the official code (AIoT-MLSys-Lab/D2O @ 12c99d8, see
tests/golden/d2o_kv_eviction/PROVENANCE.md), the policy end to end on the book's tiny LM against the official
model run on the same weights, and clear errors on bad input.

Tolerances (float32 throughout):
* backends vs the NumPy reference: rtol/atol 1e-5 — cosine similarities are O(1) and the merged rows are
  weighted sums of O(1) entries over d = 32 (3e-7 relative round-off per term); the argmax is compared exactly
  away from ties (random keys have no ties).
* token-level step vs the official ``D2O_LayerKVCache``: atol 1e-5 on keys / values / scores (the official
  ``scatter_reduce(mean)`` sums in another order), 1e-6 on the scalar threshold; +inf entries (the forced first 4
  tokens) must coincide exactly.
* layer level and the end-to-end policy: atol 1e-5 / 1e-4 (measured 0 on CPU: the exported HF Llama and the book's
  model run the same float32 operations); generated tokens and per-layer cache lengths exactly.

The end-to-end fixtures (``e2e_*``, ``short_*``) were made with one checkpoint of the book's tiny LM; the test that
runs the model against them first checks that the committed checkpoint is that one (sha256 below and in
PROVENANCE.md).
"""
import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch

from refimpl._common import assert_close, load_golden
from refimpl.kvcache.d2o_kv_eviction import (D2OPolicy, d2o_compress, layer_attention_variance,
                                             layer_budget_ratios, nearest_retained_key, scatter_merge)
from refimpl.kvcache.eviction import H2O

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "d2o_kv_eviction" / "official_d2o.npz"
BACKENDS = ["numpy", "numba", "torch"]
TOL = dict(rtol=1e-5, atol=1e-5)
# sha256 of refimpl/models/weights/tiny_lm.safetensors when the end-to-end fixtures were made (PROVENANCE.md, part B)
CHECKPOINT_SHA256 = "2327d9deaa649b73f81ce9691880a2b82f7239ff7c02cc0b75275fcbfe902278"


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def golden():
    return load_golden(GOLDEN)


@pytest.fixture(scope="module")
def model():
    from refimpl.models import load_tiny_lm
    return load_tiny_lm()


@pytest.fixture(scope="module")
def fixture_checkpoint():
    """Fail clearly (not with a numeric diff) when the checkpoint differs from the one the fixtures were made with."""
    from refimpl.models.tiny_lm import DEFAULT_WEIGHTS
    sha = hashlib.sha256(Path(DEFAULT_WEIGHTS).read_bytes()).hexdigest()
    if sha != CHECKPOINT_SHA256:
        pytest.fail(f"fixture made with checkpoint {CHECKPOINT_SHA256}; the committed tiny_lm.safetensors is {sha}: "
                    "regenerate it (tests/golden/d2o_kv_eviction/PROVENANCE.md, part B)")


def _keys(rng, n, e, k, d, dtype=np.float32):
    return (rng.standard_normal((n, e, d)).astype(dtype), rng.standard_normal((n, k, d)).astype(dtype))


# ------------------------------------------------------------------------------- critical loop: backends
def _nearest_bruteforce(ke, kk):
    u = np.empty(ke.shape[:2]); c = np.empty(ke.shape[:2], dtype=np.int64)
    for n in range(ke.shape[0]):
        for i in range(ke.shape[1]):
            s = [float(ke[n, i] @ kk[n, j]) / (np.linalg.norm(ke[n, i]) * np.linalg.norm(kk[n, j]))
                 for j in range(kk.shape[1])]
            c[n, i] = int(np.argmax(s)); u[n, i] = max(s)
    return u, c


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1, 1, 4), (8, 5, 12, 32), (3, 40, 7, 16)])
def test_nearest_retained_key_backends(rng, backend, dtype, shape):
    ke, kk = _keys(rng, *shape, dtype=dtype)
    u_ref, c_ref = _nearest_bruteforce(ke.astype(np.float64), kk.astype(np.float64))
    u, c = nearest_retained_key(ke, kk, backend=backend)
    assert isinstance(u, np.ndarray) and u.dtype == dtype and c.dtype == np.int64 and u.shape == shape[:2]
    np.testing.assert_array_equal(c, c_ref)
    assert_close(u, u_ref, **TOL)
    ut, ct = nearest_retained_key(torch.from_numpy(ke), torch.from_numpy(kk), backend=backend)
    assert isinstance(ut, torch.Tensor) and torch.equal(ct, torch.from_numpy(c_ref))


def _merge_bruteforce(xk, xe, idx, w, sel, formula):
    out = np.empty_like(xk, dtype=np.float64)
    for n in range(xk.shape[0]):
        for c in range(xk.shape[1]):
            srcs = [i for i in range(xe.shape[1]) if sel[n, i] and idx[n, i] == c]
            if formula == "official":
                out[n, c] = (xk[n, c] + sum(w[n, i] * xe[n, i] for i in srcs)) / (1 + len(srcs))
            else:
                wts = [np.exp(w[n, i]) for i in srcs]
                out[n, c] = (np.e * xk[n, c] + sum(a * xe[n, i] for a, i in zip(wts, srcs))) / (np.e + sum(wts))
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("formula", ["official", "paper"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 4), (6, 9, 5, 32), (2, 30, 3, 8)])
def test_scatter_merge_backends(rng, backend, formula, shape):
    n, e, k, d = shape
    xe, xk = _keys(rng, n, e, k, d)
    idx = rng.integers(0, k, (n, e))
    w = rng.uniform(-0.5, 1.0, (n, e)).astype(np.float32)
    sel = rng.random((n, e)) < 0.6
    ref = _merge_bruteforce(xk, xe, idx, w, sel, formula)
    out = scatter_merge(xk, xe, idx, w, sel, formula=formula, backend=backend)
    assert out.dtype == np.float32 and out.shape == xk.shape
    assert_close(out, ref, **TOL)
    out_t = scatter_merge(torch.from_numpy(xk), torch.from_numpy(xe), torch.from_numpy(idx), torch.from_numpy(w),
                          torch.from_numpy(sel), formula=formula, backend=backend)
    assert isinstance(out_t, torch.Tensor)
    assert_close(out_t, ref, **TOL)


def test_merge_formulas_differ_and_paper_is_convex(rng):
    """(D7) shrinks the merged rows (weights sum to (1+Σu)/(1+n) < 1); (D8) is a convex combination."""
    xk = np.ones((1, 1, 4), np.float32)
    xe = np.ones((1, 3, 4), np.float32)
    idx = np.zeros((1, 3), np.int64); w = np.full((1, 3), 0.5, np.float32); sel = np.ones((1, 3), bool)
    assert_close(scatter_merge(xk, xe, idx, w, sel, "official"), np.full((1, 1, 4), 2.5 / 4), **TOL)
    assert_close(scatter_merge(xk, xe, idx, w, sel, "paper"), np.ones((1, 1, 4)), **TOL)
    # nothing selected: the retained rows come back unchanged
    assert_close(scatter_merge(xk, xe, idx, w, ~sel, "official"), xk, **TOL)


# ------------------------------------------------------------------------- official: token level (golden)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", ["a", "b"])
def test_token_level_matches_official(golden, name, backend):
    h, d, p, hr, rr, a, b, steps = golden[f"{name}_cfg"]
    scores = thr = None
    n_hh = n_rec = None
    for t in range(int(steps)):
        k, v, s = (torch.from_numpy(golden[f"{name}_{x}_in{t}"]) for x in "kvs")
        s = s[None].clone()
        if scores is not None:  # eq. (E2): the official _update_hh_score
            s[..., :-1] += scores
        if t == 0:  # the official code fixes the sizes at the first decoding step (T = P + 1)
            n_hh, n_rec = int(k.shape[2] * hr), int(k.shape[2] * rr)
            assert (n_hh, n_rec) == tuple(golden[f"{name}_sizes{t}"])
        k2, v2, scores, thr, keep = d2o_compress(k, v, s, n_hh, n_rec, thr, float(a), float(b), backend=backend)
        for ours, key in ((k2, "k_out"), (v2, "v_out"), (scores[0], "hh_score")):
            ref = torch.from_numpy(golden[f"{name}_{key}{t}"])
            fin = torch.isfinite(ref)
            assert torch.equal(torch.isfinite(ours), fin), f"{key} step {t}: +inf entries differ"
            assert_close(ours[fin], ref[fin], atol=1e-5, rtol=1e-5, name=f"{name}/{key}/{t}")
        assert abs(float(thr[0]) - float(golden[f"{name}_threshold{t}"])) < 1e-6


def test_token_level_without_merge_is_h2o_selection(golden):
    k, v, s = (torch.from_numpy(golden[f"a_{x}_in0"]) for x in "kvs")
    k2, v2, s2, thr, keep = d2o_compress(k, v, s[None], 6, 6, merge=False)
    assert thr is None and keep.shape == (1, 4, 12)
    assert torch.equal(k2, k.gather(2, keep[..., None].expand(-1, -1, -1, k.shape[-1])))
    assert (keep[..., :4] == torch.arange(4)).all() and (keep[..., -6:] == torch.arange(35, 41)).all()
    # with merging, the same slots are kept but their contents change
    k3, *_ = d2o_compress(k, v, s[None], 6, 6, merge=True)
    assert not torch.allclose(k3, k2)


# ------------------------------------------------------------------------- official: layer level (golden)
def test_layer_level_matches_official(golden):
    attn = [torch.from_numpy(golden[f"short_attn{l}"]) for l in range(4)]
    v = torch.stack([layer_attention_variance(a) for a in attn])
    assert_close(v, golden["short_entropy"], atol=1e-5, rtol=1e-5, name="layer variance (D1-D2)")
    r = layer_budget_ratios(v, 0.2)
    assert_close(r / 2, golden["short_hh_ratio"], atol=1e-6, rtol=1e-6, name="layer ratios (D3)")
    assert_close(r / 2, golden["short_recent_ratio"], atol=1e-6, rtol=1e-6)
    # the clip: a tiny rho hits the 0.01 floor, a huge share the 1.0 ceiling
    assert torch.all(layer_budget_ratios(v, 1e-4) == 0.01)
    assert torch.all(layer_budget_ratios(torch.tensor([0.0, 50.0]), 1.0)[0] == 1.0)


@pytest.mark.parametrize("tag,n_new", [("e2e", 8), ("short", 6)])
def test_policy_matches_official_model(fixture_checkpoint, golden, model, tag, n_new):
    """The whole official driver (no prefill eviction, layers 0/1/last exempt) vs D2OPolicy(official=True)."""
    pol = D2OPolicy.from_ratios(0.1, 0.1, official=True)
    cache = model.new_cache(record=True)
    toks = model.generate(torch.from_numpy(golden[f"{tag}_ids"]), n_new, cache, pol)
    assert toks[0].tolist() == golden[f"{tag}_tokens"].tolist()
    assert [cache.length(l) for l in range(4)] == golden[f"{tag}_lengths"].tolist()
    assert_close(pol.variances, golden[f"{tag}_entropy"], atol=1e-5, rtol=1e-4)
    assert_close(cache.keys[2], golden[f"{tag}_k2"], atol=1e-4, rtol=1e-4, name=f"{tag} layer-2 keys")
    assert_close(cache.values[2], golden[f"{tag}_v2"], atol=1e-4, rtol=1e-4, name=f"{tag} layer-2 values")


# ---------------------------------------------------------------------------------------- the policy
def _prompt(n=2, length=96, seed=3):
    from refimpl.models.corpus import TOKENIZER, make_task
    return torch.tensor([TOKENIZER.encode(e.prompt) for e in make_task("kv_recall", n, length, seed=seed)])


def test_policy_meets_budget_and_positions(model):
    pol = D2OPolicy(24)
    cache = model.new_cache(record=True)
    model.generate(_prompt(), 4, cache, pol)
    lengths = [cache.length(l) for l in range(4)]
    assert sum(n_hh + n_rec for n_hh, n_rec in pol.sizes) == sum(lengths) <= 4 * 24 + 2
    for l in range(4):  # positions stay sorted, the sinks and the newest token are in
        pos = cache.positions[l]
        assert (pos.diff(dim=-1) > 0).all() and (pos[..., :4] == torch.arange(4)).all()
        assert (pos[..., -1] == cache.seen_tokens - 1).all()


def test_uniform_no_merge_equals_h2o(model):
    """D2O without the layer allocation, the sinks and the merge is H2O."""
    ids = _prompt()
    outs = []
    for pol in (H2O(20), D2OPolicy(20, merge=False, layer_budgets="uniform", n_sink=0)):
        cache = model.new_cache(record=True)
        outs.append((model.generate(ids, 5, cache, pol), cache))
    assert torch.equal(outs[0][0], outs[1][0])
    for l in range(4):
        assert torch.equal(outs[0][1].positions[l], outs[1][1].positions[l])


def test_policy_needs_recording_cache(model):
    from refimpl.models.tiny_lm import KVCache
    with pytest.raises(ValueError, match="record=True"):
        model.generate(_prompt(1, 48), 2, KVCache(4), D2OPolicy(8))


# ------------------------------------------------------------------------------------------- bad input
def test_bad_inputs(rng):
    ke, kk = _keys(rng, 2, 3, 4, 8)
    with pytest.raises(TypeError, match="k_evicted"):
        nearest_retained_key(ke.astype(np.int32), kk)
    with pytest.raises(ValueError, match="agree in N and d"):
        nearest_retained_key(ke, kk[:1])
    with pytest.raises(ValueError, match="backend"):
        nearest_retained_key(ke, kk, backend="cuda")
    idx = np.zeros((2, 3), np.int64); w = np.ones((2, 3), np.float32); sel = np.ones((2, 3), bool)
    with pytest.raises(ValueError, match="index must lie"):
        scatter_merge(kk, ke, idx + 9, w, sel)
    with pytest.raises(ValueError, match="formula"):
        scatter_merge(kk, ke, idx, w, sel, formula="mean")
    with pytest.raises(TypeError, match="select"):
        scatter_merge(kk, ke, idx, w, sel.astype(np.float32).astype(np.int8))
    with pytest.raises(ValueError, match="weight must have shape"):
        scatter_merge(kk, ke, idx, w[:, :2], sel)
    k = torch.zeros(1, 2, 10, 4)
    with pytest.raises(ValueError, match="scores"):
        d2o_compress(k, k, torch.zeros(1, 2, 9), 2, 2)
    with pytest.raises(ValueError, match="alpha"):
        d2o_compress(k, k, torch.zeros(1, 2, 10), 2, 2, alpha=1.5)
    with pytest.raises(ValueError, match="n_hh"):
        d2o_compress(k, k, torch.zeros(1, 2, 10), -1, 2)
    with pytest.raises(ValueError, match="budget"):
        D2OPolicy(1)
    with pytest.raises(ValueError, match="layer_budgets"):
        D2OPolicy(16, layer_budgets="pyramid")
    with pytest.raises(ValueError, match="hh_ratio \\+ recent_ratio"):
        D2OPolicy.from_ratios(0.8, 0.5)
    with pytest.raises(ValueError, match="attn must have shape"):
        layer_attention_variance(torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="rho"):
        layer_budget_ratios(torch.zeros(3), 0.0)


@pytest.mark.gpu
def test_cuda_matches_cpu(rng):
    ke, kk = _keys(rng, 16, 40, 24, 32)
    u, c = nearest_retained_key(torch.from_numpy(ke).cuda(), torch.from_numpy(kk).cuda())
    u0, c0 = nearest_retained_key(ke, kk, backend="numpy")
    assert u.is_cuda and torch.equal(c.cpu(), torch.from_numpy(c0))
    assert_close(u.cpu(), u0, **TOL)
    w = u.clone(); sel = torch.ones_like(c, dtype=torch.bool)
    out = scatter_merge(torch.from_numpy(kk).cuda(), torch.from_numpy(ke).cuda(), c, w, sel)
    assert_close(out.cpu(), scatter_merge(kk, ke, c0, u0, sel.cpu().numpy(), backend="numpy"), **TOL)
