"""Q-Filters (refimpl.kvcache.q_filters): backends, the official implementations, the policy, bad inputs.

Verification: official-package (kvpress 0.5.5 ``QFilterPress``, imported when installed) and official-golden
(always run): ``tests/golden/q_filters/`` holds kvpress' scores, kept indices and compressed cache on the book's
exported model, the official SVD block's filters, and the official ``QFiltersCache.update`` selections (see
PROVENANCE.md there). The kvpress fixture depends on the trained checkpoint: every test using it first checks
the checkpoint's sha256 and fails with "fixture made with checkpoint <sha>; regenerate it" on a mismatch.

Tolerances:
* backends: float64 1e-12 relative (the same d_h-term dot products summed in another order); float32 1e-5.
* vs kvpress on the exported model (float64 export, exact to round-off): scores 1e-9 absolute (the keys come
  from two float64 forward passes that differ only in summation order; measured ~1e-14); kept index *sets*
  identical (no near-ties at that precision).
* vs the official SVD block (float32 there and here): 1e-5 absolute on unit vectors (SVD round-off in float32).
* vs QFiltersCache: kept positions identical (a pure selection on float64 scores).
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from refimpl._common import load_golden
from refimpl.kvcache.eviction import select_keep
from refimpl.kvcache.q_filters import (QFilterPolicy, calibration_tokens, collect_queries, q_filters,
                                       qfilter_scores, qfilter_select)
from refimpl.models import KVCache, load_tiny_lm

GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "q_filters"


@pytest.fixture(scope="module")
def model64():
    return load_tiny_lm(dtype=torch.float64)


# kvpress_qfilterpress.npz was made on the trained checkpoint (its filters, keys and kept sets depend on the
# weights); sha256 of refimpl/models/weights/tiny_lm.safetensors at that time (PROVENANCE.md):
KVPRESS_CHECKPOINT_SHA256 = "2327d9deaa649b73f81ce9691880a2b82f7239ff7c02cc0b75275fcbfe902278"


def _check_checkpoint():
    """Fail clearly, before any numeric comparison, when the checkpoint is not the one the fixture was made with."""
    import hashlib
    from refimpl.models.tiny_lm import WEIGHTS_DIR
    with open(Path(WEIGHTS_DIR) / "tiny_lm.safetensors", "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    assert sha == KVPRESS_CHECKPOINT_SHA256, (
        f"fixture made with checkpoint {KVPRESS_CHECKPOINT_SHA256}; regenerate it (tests/golden/q_filters/"
        f"PROVENANCE.md): tiny_lm.safetensors is now {sha}")


@pytest.fixture(scope="module")
def kvpress_golden():
    _check_checkpoint()
    return load_golden(GOLDEN / "kvpress_qfilterpress.npz")


# ------------------------------------------------------------------------------------------ backends
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
@pytest.mark.parametrize("shape", [(1, 1, 1, 2), (2, 4, 37, 32), (1, 3, 3000, 128)])
def test_backends_agree(dtype, tol, shape):
    rng = np.random.default_rng(0)
    k = rng.standard_normal(shape).astype(dtype)
    f = rng.standard_normal((shape[1], shape[3])).astype(dtype)
    ref = qfilter_scores(k, f, backend="numpy")
    assert ref.shape == shape[:3] and ref.dtype == dtype
    # closed form for one entry
    assert abs(ref[0, 0, 0] + float(k[0, 0, 0] @ f[0])) <= tol * (1 + abs(ref[0, 0, 0]))
    scale = np.abs(ref).max()
    for backend in ("numba", "torch"):
        out = qfilter_scores(k, f, backend=backend)
        assert isinstance(out, np.ndarray) and out.dtype == dtype
        np.testing.assert_allclose(out, ref, rtol=0, atol=tol * scale)
    tout = qfilter_scores(torch.from_numpy(k), torch.from_numpy(f))     # auto → torch, tensor out
    assert isinstance(tout, torch.Tensor) and tout.dtype == torch.from_numpy(k).dtype
    np.testing.assert_allclose(tout.numpy(), ref, rtol=0, atol=tol * scale)


def test_numba_parallel_path_agrees():
    rng = np.random.default_rng(1)
    k = rng.standard_normal((2, 8, 4096, 64))  # > PARALLEL_MIN elements: the multi-block kernel
    f = rng.standard_normal((8, 64))
    np.testing.assert_allclose(qfilter_scores(k, f, "numba"), qfilter_scores(k, f, "numpy"), rtol=0, atol=1e-11)


def test_select_keeps_top_scores_and_window():
    torch.manual_seed(0)
    k = torch.randn(2, 3, 50, 8, dtype=torch.float64)
    f = torch.randn(3, 8, dtype=torch.float64)
    idx = qfilter_select(k, f, budget=12, n_recent=4)
    assert idx.shape == (2, 3, 12) and bool((idx.diff(dim=-1) > 0).all())
    s = qfilter_scores(k, f)
    for b in range(2):
        for h in range(3):
            rest = set(torch.argsort(s[b, h, :46], descending=True)[:8].tolist())
            assert set(idx[b, h].tolist()) == rest | {46, 47, 48, 49}


# ------------------------------------------------------------------- official: kvpress (golden + package)
@torch.no_grad()
def _prefill_policy(model, tokens, filters, budget):
    cache = model.new_cache(record=True)
    model(tokens, cache)
    raw = [k.clone() for k in cache.keys]
    QFilterPolicy(filters, budget, n_recent=0, n_sink=0)(model, cache)
    return raw, cache


@pytest.mark.parametrize("budget", [32, 64])
def test_scores_and_kept_sets_match_kvpress_golden(model64, kvpress_golden, budget):
    g = kvpress_golden
    filters, tokens = torch.from_numpy(g["filters"]), torch.from_numpy(g["tokens"])
    raw, cache = _prefill_policy(model64, tokens, filters, budget)
    for layer in range(4):
        ours = qfilter_scores(raw[layer], filters[layer])
        np.testing.assert_allclose(ours.numpy(), g[f"scores_b{budget}"][layer], rtol=0, atol=1e-9)
        official = np.sort(g[f"topk_b{budget}"][layer], axis=-1)
        np.testing.assert_array_equal(select_keep(ours, budget).numpy(), official)
        # the policy's cache after the prefill holds exactly those tokens
        np.testing.assert_array_equal(cache.positions[layer].numpy(), official)
        if budget == 32:  # kvpress' compressed HF cache (kept in top-k order) equals ours up to the order
            order = np.argsort(g["topk_b32"][layer], axis=-1)
            hf_keys = np.take_along_axis(g["keys_b32"][layer], order[..., None], axis=2)
            np.testing.assert_allclose(cache.keys[layer].numpy(), hf_keys, rtol=0, atol=1e-9)


def test_random_scores_match_kvpress_golden(kvpress_golden):
    g = kvpress_golden
    k, f = g["rand_keys"], g["rand_filters"][1]  # the stub layer has layer_idx = 1
    for backend in ("numpy", "numba", "torch"):
        np.testing.assert_allclose(qfilter_scores(k, f, backend=backend), g["rand_scores"], rtol=0, atol=1e-12)
    idx = qfilter_select(torch.from_numpy(k), torch.from_numpy(f), budget=16)
    np.testing.assert_array_equal(idx.numpy(), np.sort(g["rand_topk"], axis=-1))
    kept = np.take_along_axis(k, idx.numpy()[..., None], axis=2)
    order = np.argsort(g["rand_topk"], axis=-1)
    np.testing.assert_array_equal(kept, np.take_along_axis(g["rand_kept_keys"], order[..., None], axis=2))


def test_against_kvpress_package(model64, kvpress_golden):
    kvpress = pytest.importorskip("kvpress")
    from transformers import DynamicCache
    from refimpl.models.hf_export import to_llama
    filters, tokens = torch.from_numpy(kvpress_golden["filters"]), torch.from_numpy(kvpress_golden["tokens"])

    class Injected(kvpress.QFilterPress):
        def post_init_from_model(self, model):
            self.q_filters = filters.to(model.dtype)

    budget, t = 32, tokens.shape[1]
    hf, cache = to_llama(model64), DynamicCache()
    with torch.no_grad(), Injected(compression_ratio=1 - (budget + 0.5) / t)(hf):
        hf(tokens, past_key_values=cache)
    _, ours = _prefill_policy(model64, tokens, filters, budget)
    for layer in range(4):
        d = torch.cdist(cache.layers[layer].keys, ours.keys[layer], compute_mode="donot_use_mm_for_euclid_dist")  # same set of kept keys, any order
        assert float(d.min(-1).values.max()) < 1e-9 and float(d.min(-2).values.max()) < 1e-9


# ------------------------------------------------------------------- official: SVD block and QFiltersCache
@pytest.mark.parametrize("kv,n", [(4, 100), (2, 100), (4, 1000)])
def test_filters_match_official_svd_block(kv, n):
    g = load_golden(GOLDEN / "official_svd_filters.npz")
    queries = torch.from_numpy(g["queries"])
    ours = q_filters(queries, num_svd_samples=n, n_kv_heads=kv, seed=0)
    np.testing.assert_allclose(ours.numpy(), g[f"filters_kv{kv}_n{n}"], rtol=0, atol=1e-5)
    if kv == 4:  # unit vectors oriented so that most queries project positively on -f
        np.testing.assert_allclose(ours.norm(dim=-1).numpy(), 1.0, atol=1e-5)
        proj = -(queries @ ours[..., None])[..., 0]
        assert bool(((proj > 0).double().mean(-1) > 0.5).all())


def test_sign_rule_is_invariant_to_svd_sign():
    g = load_golden(GOLDEN / "official_svd_filters.npz")
    q = torch.from_numpy(g["queries"])
    a = q_filters(q, num_svd_samples=1000, seed=0)
    b = q_filters(-q, num_svd_samples=1000, seed=0)   # flipping every query flips the orientation
    np.testing.assert_allclose(a.numpy(), -b.numpy(), atol=1e-5)


def test_decoding_matches_official_qfilters_cache():
    g = load_golden(GOLDEN / "official_qfilters_cache.npz")
    keys, vals, filters = (torch.from_numpy(g[n]) for n in ("keys", "values", "filters"))
    t0, n_dec, budget, window = (int(g[n]) for n in ("T0", "n_dec", "max_length", "window_length"))
    n_layers, b, h, _, _ = keys.shape
    cache = KVCache(n_layers)
    policy = QFilterPolicy(filters, budget, n_recent=window)
    for step in range(n_dec + 1):
        sl = slice(0, t0) if step == 0 else slice(t0 + step - 1, t0 + step)
        for layer in range(n_layers):
            pos = torch.arange(sl.start, sl.stop).expand(b, h, -1)
            cache.append(layer, keys[layer, :, :, sl], vals[layer, :, :, sl], pos)
        policy(None, cache)
        for layer in range(n_layers):
            np.testing.assert_array_equal(cache.positions[layer].numpy(), g["kept_positions"][step, layer])
    np.testing.assert_array_equal(torch.stack(cache.keys).numpy(), g["final_keys"])


# --------------------------------------------------------------------------------- on the tiny model
def test_policy_on_model_keeps_budget_and_collect_queries(model64):
    tokens = calibration_tokens(2, 64, seed=3)
    qs = collect_queries(model64, tokens)
    assert len(qs) == 4 and qs[0].shape == (4, 128, 32)
    cache = model64.new_cache(record=True)
    with torch.no_grad():
        model64(tokens[:1], cache)
    torch.testing.assert_close(qs[1][:, :64], cache.last_queries[1][0])
    f = q_filters(qs)
    assert f.shape == (4, 4, 32)
    cal = QFilterPolicy.calibrate(load_tiny_lm(), 16, n_sequences=2, seq_len=64, seed=3)  # float32 model
    assert cal.filters.dtype == torch.float32 and cal.budget == 16 and cal.n_recent == 2
    torch.testing.assert_close(cal.filters, q_filters(qs, seed=3).float())
    pol = QFilterPolicy(f, budget=16)
    out = model64.generate(tokens[:, :40], 5, cache=model64.new_cache(record=True), policy=pol)
    assert out.shape == (2, 5) and all(pol._cache.length(l) == 16 for l in range(4))
    assert int(pol._cache.positions[0][..., -1].min()) == 43  # newest token (fed at position 40 + 4 - 1) kept by the recent window


# ---------------------------------------------------------------------------------------- bad inputs
def test_bad_inputs():
    k, f = np.zeros((1, 2, 3, 4)), np.zeros((2, 4))
    with pytest.raises(TypeError, match="keys must have a floating"):
        qfilter_scores(k.astype(np.int64), f)
    with pytest.raises(ValueError, match=r"keys must have shape \(B, H, T, d_h\)"):
        qfilter_scores(k[0], f)
    with pytest.raises(ValueError, match=r"filters must have shape \(H, d_h\)"):
        qfilter_scores(k, np.zeros((3, 4)))
    with pytest.raises(TypeError, match="must both be numpy arrays or both torch tensors"):
        qfilter_scores(k, torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="backend must be one of"):
        qfilter_scores(k, f, backend="cuda")
    with pytest.raises(ValueError, match="n_kv_heads=3 must divide"):
        q_filters([torch.randn(4, 10, 8)], n_kv_heads=3)
    with pytest.raises(ValueError, match=r"queries\[0\] must have shape \(H, N, d_h\)"):
        q_filters([torch.randn(10, 8)])
    with pytest.raises(ValueError, match=r"queries\[0\] contains NaN"):
        q_filters([torch.full((2, 5, 4), float("nan"))])
    with pytest.raises(ValueError, match="num_svd_samples must be >= 1"):
        q_filters([torch.randn(2, 5, 4)], num_svd_samples=0)
    with pytest.raises(ValueError, match=r"filters must have shape \(n_layers, H, d_h\)"):
        QFilterPolicy(torch.zeros(2, 4), 8)
    with pytest.raises(ValueError, match="budget must be >= 1"):
        QFilterPolicy(torch.zeros(1, 2, 4), 0)
    with pytest.raises(ValueError, match="n_recent \\+ n_sink must not exceed budget"):
        QFilterPolicy(torch.zeros(1, 2, 4), 8, n_recent=6, n_sink=4)
    with pytest.raises(TypeError, match="filters must be a torch.Tensor"):
        QFilterPolicy(np.zeros((1, 2, 4)), 8)
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        QFilterPolicy(torch.zeros(1, 2, 4), 8)(None, object())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    torch.manual_seed(0)
    k, f = torch.randn(2, 8, 1000, 64), torch.randn(8, 64)
    out = qfilter_scores(k.cuda(), f.cuda())
    assert out.is_cuda
    torch.testing.assert_close(out.cpu(), qfilter_scores(k, f, backend="numpy"), rtol=1e-5, atol=1e-5)
    idx = qfilter_select(k.cuda(), f.cuda(), 100, n_recent=10)
    assert torch.equal(idx.cpu(), qfilter_select(k, f, 100, n_recent=10))
