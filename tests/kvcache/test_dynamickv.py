"""DynamicKV: the scores (1)-(3) of every backend against each other and against the official code (golden
fixtures from DreamMr/DynamicKV @ 8ab3c08, see tests/golden/dynamickv/PROVENANCE.md), the selection and budgets
(4)-(7) against the official ones, the policies on a TinyLM, and clear errors on bad input.

Tolerances: the pooled scores are sums of at most w ≤ 8 softmax rows over ≤ 48 keys, values in [0, 8]; float32
backends differ from the official torch code only by summation order, so rtol 1e-5 / atol 1e-6 (measured max
abs error 2e-7); float64 at 1e-12. Indices, budgets and kept positions are integers and compared exactly. Max
pooling makes plateaus of tied scores, whose order ``torch.topk`` leaves unspecified: the ``torch`` backend
(which calls ``torch.topk`` like the official code) must match the official indices exactly; the ``numpy`` and
``numba`` backends (lower index first) must keep tokens with exactly the same scores.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from refimpl._common import assert_close, load_golden
from refimpl.kvcache.dynamickv import (DynamicKVPolicy, PyramidKVPolicy, SnapKVPolicy, dynamickv_layer_budgets,
                                       dynamickv_select, global_topk_counts, pyramid_budgets, uniform_budgets,
                                       window_scores)

BACKENDS = ["numpy", "numba", "torch"]
GOLDEN = sorted((Path(__file__).parents[1] / "golden" / "dynamickv").glob("*.npz"))
TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-12)}


def _params(g):
    L, B, H, T, d, w, mcp, ks, is_max, rmax = g["params"].tolist()
    return L, w, mcp, ks, "maxpool" if is_max else "avgpool", rmax


def _as(x, backend):
    return torch.from_numpy(x) if backend == "torch" else x


def test_fixtures_present():
    assert len(GOLDEN) == 5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", GOLDEN, ids=lambda p: p.stem)
def test_matches_official(path, backend):
    g = load_golden(path)
    L, w, mcp, ks, pool, rmax = _params(g)
    scores = [window_scores(_as(g["q"][l], backend), _as(g["k"][l], backend), w, ks, pool, backend=backend)
              for l in range(L)]
    assert_close(np.stack([np.asarray(s) for s in scores]), g["attn_cache"], **TOL[np.float32],
                 name=f"scores[{backend}]")
    # select from the official scores, so that float rounding cannot reorder near-ties
    official = [g["attn_cache"][l] for l in range(L)]
    sel = dynamickv_select([_as(s, backend) for s in official], w, mcp, rmax, backend=backend)
    budgets = np.array([b + [-1] * (L - len(b)) for b in sel.budgets]).reshape(-1, L)
    np.testing.assert_array_equal(budgets, g["budgets"])
    assert sel.lengths == g["final_lengths"].tolist()
    exact = backend == "torch" or pool == "avgpool"
    for l in range(L):
        kept = sel.kept[l]
        ref = g["final_positions"][l][..., :kept.shape[-1]]
        if exact:
            np.testing.assert_array_equal(sel.topk[l], g["indices"][l])
            np.testing.assert_array_equal(kept, ref)
        else:   # ties in max-pooled scores: same scores kept, in the same (descending) order
            s = official[l]
            np.testing.assert_array_equal(np.take_along_axis(s, sel.topk[l], -1),
                                          np.take_along_axis(s, g["indices"][l], -1))
            n = s.shape[-1]
            val = lambda idx: np.where(idx < n, np.take_along_axis(s, np.minimum(idx, n - 1), -1), -1.0 - idx)
            np.testing.assert_array_equal(val(kept), val(ref))


def test_after_last_multiple_of_m_keeps_max_budget():
    g = load_golden(GOLDEN[[p.stem for p in GOLDEN].index("l6_max")])
    L, w, mcp, ks, pool, rmax = _params(g)
    sel = dynamickv_select([torch.from_numpy(g["attn_cache"][l]) for l in range(L)], w, mcp, rmax)
    assert len(sel.budgets) == 1 and sel.lengths[4] == sel.lengths[5] == sel.budget_size + w


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("pooling", ["avgpool", "maxpool"])
def test_backends_agree(rng, backend, dtype, pooling):
    q = rng.standard_normal((2, 3, 10, 16)).astype(dtype)
    k = rng.standard_normal((2, 3, 70, 16)).astype(dtype)
    ref = window_scores(q, k, 6, 5, pooling, backend="numpy")
    out = window_scores(q, k, 6, 5, pooling, backend=backend)
    assert isinstance(out, np.ndarray) and out.dtype == dtype and out.shape == (2, 3, 64)
    assert_close(out, ref, **TOL[dtype], name=f"window_scores[{backend}]")
    # every window query's softmax sums to one: the unpooled mass over the scored keys is at most w
    assert (out >= 0).all()
    if pooling == "avgpool":
        assert out.sum(-1).max() * 5 <= 6 * 5 + 1e-4


def test_scores_equal_model_attention(random_tiny_lm):
    """Eqs. (1)-(2) are the last w rows of the model's own causal attention."""
    model = random_tiny_lm(dtype=torch.float64)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    cache = model.new_cache(record=True)
    model.prefill(tokens, cache)
    for l in range(model.cfg.n_layers):
        s = window_scores(cache.last_queries[l], cache.keys[l], 5, 1, "avgpool")
        assert_close(s, cache.last_attn[l][:, :, -5:, :35].sum(-2), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_global_topk_counts(rng, backend):
    s = rng.random((3, 2, 4, 50)).astype(np.float32)
    k = 77
    flat = s.reshape(3, -1)
    thr = np.sort(flat.ravel())[-k]
    expected = (flat >= thr).sum(1)
    np.testing.assert_array_equal(global_topk_counts(_as(s, backend), k, backend=backend), expected)
    np.testing.assert_array_equal(global_topk_counts(_as(s, backend), 10 ** 6, backend=backend), [400] * 3)


def test_budgets_sum_to_total():
    fix = dynamickv_layer_budgets([50, 10, 30, 38], base=8, budget_size=80, n_layers=8, n_heads=4,
                                  last_layer=False, n_entries=160)
    assert sum(fix) == 8 * 8 and len(fix) == 4
    assert uniform_budgets(8, 4, 100) == [8] * 4
    p = pyramid_budgets(40, 4, 1000)
    assert p[0] > p[-1] and abs(sum(p) - 160) <= 4


def test_policies_on_tiny_lm(random_tiny_lm):
    model = random_tiny_lm(dtype=torch.float32, n_layers=4)
    tokens = torch.randint(0, model.cfg.vocab_size, (2, 60), generator=torch.Generator().manual_seed(1))
    for pol in (DynamicKVPolicy(16), SnapKVPolicy(16), PyramidKVPolicy(16)):
        cache = model.new_cache(record=True)
        out = model.generate(tokens, 3, cache=cache, policy=pol)
        assert out.shape == (2, 3)
        assert abs(np.mean(pol.last_lengths) - 16) <= 2
        assert all(cache.length(l) == pol.last_lengths[l] + 2 for l in range(4))  # two decoded tokens appended
        # the observation window (the last 8 prompt tokens) is always kept
        for l in range(4):
            assert set(range(52, 60)) <= set(cache.positions[l][0, 0].tolist())
    dyn = DynamicKVPolicy(16)
    model.generate(tokens, 1, cache=model.new_cache(record=True), policy=dyn)
    assert sum(dyn.last_selection.budgets[-1]) == 4 * 8 == sum(dyn.last_lengths) - 4 * 8
    assert "budget=16" in repr(dyn)


@pytest.mark.parametrize("call,match", [
    (lambda: window_scores(np.zeros((1, 2, 4, 8), np.float32), np.zeros((1, 2, 20, 8), np.float32), 8), "at least"),
    (lambda: window_scores(np.zeros((1, 2, 8, 8), np.float32), np.zeros((1, 2, 8, 8), np.float32), 8), "more than"),
    (lambda: window_scores(np.zeros((2, 8, 8), np.float32), np.zeros((2, 20, 8), np.float32), 4), "shape"),
    (lambda: window_scores(np.zeros((1, 2, 8, 8), np.float32), np.zeros((1, 3, 20, 8), np.float32), 4), "agree"),
    (lambda: window_scores(np.zeros((1, 2, 8, 8), np.float32), np.zeros((1, 2, 20, 8), np.float32), 4, 6), "odd"),
    (lambda: window_scores(np.zeros((1, 2, 8, 8), np.float32), np.zeros((1, 2, 20, 8), np.float32), 4, 7, "sum"),
     "pooling"),
    (lambda: window_scores(np.zeros((1, 2, 8, 8), np.float32), np.zeros((1, 2, 20, 8), np.float32), 0), "window"),
    (lambda: window_scores(np.zeros((1, 2, 8, 8), np.float32), np.zeros((1, 2, 20, 8), np.float32), 4,
                           backend="jax"), "backend"),
    (lambda: dynamickv_select([np.zeros((1, 2, 30))], 4, 4), "max_capacity_prompt"),
    (lambda: dynamickv_select([np.zeros((1, 2, 30)), np.zeros((1, 2, 31))], 4, 10), "same shape"),
    (lambda: dynamickv_select([np.zeros((1, 2, 30))], 4, 10, radio_max=0), "radio_max"),
    (lambda: DynamicKVPolicy(8, window=8), "window"),
    (lambda: DynamicKVPolicy(1), "budget"),
    (lambda: SnapKVPolicy(16, pooling="mean"), "pooling"),
    (lambda: global_topk_counts(np.zeros(5), 2), "n_layers"),
])
def test_bad_inputs(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_bad_types():
    with pytest.raises(TypeError, match="q"):
        window_scores(np.zeros((1, 2, 8, 8), np.int64), np.zeros((1, 2, 20, 8), np.float32), 4)
    with pytest.raises(TypeError, match="same"):
        window_scores(np.zeros((1, 2, 8, 8), np.float32), np.zeros((1, 2, 20, 8), np.float64), 4)
    with pytest.raises(TypeError, match="scores"):
        dynamickv_select(np.zeros((1, 2, 30)), 4, 10)
    with pytest.raises(ValueError, match="record=True"):
        model_free_cache = __import__("refimpl.models.tiny_lm", fromlist=["KVCache"]).KVCache(1)
        model_free_cache.append(0, torch.zeros(1, 1, 40, 4), torch.zeros(1, 1, 40, 4), torch.zeros(1, 1, 40))
        DynamicKVPolicy(16)(None, model_free_cache)


@pytest.mark.gpu
@pytest.mark.parametrize("pooling", ["avgpool", "maxpool"])
def test_cuda_matches_cpu(rng, pooling):
    q = rng.standard_normal((1, 4, 16, 32)).astype(np.float32)
    k = rng.standard_normal((1, 4, 300, 32)).astype(np.float32)
    out = window_scores(torch.from_numpy(q).cuda(), torch.from_numpy(k).cuda(), 8, 7, pooling)
    assert out.is_cuda
    assert_close(out.cpu(), window_scores(q, k, 8, 7, pooling, backend="numpy"), rtol=1e-4, atol=1e-5)
