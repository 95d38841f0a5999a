"""SCOPE: the decoding-phase selection against the official SCOPE clusters (golden fixtures), every backend of the
critical loop against the reference, the budget schedules against their closed forms, the policy on a TinyLM,
and clear errors on bad input.

Tolerances: none are needed. The outputs are integer index sets, and the comparison is exact: every backend of
:func:`heavy_hitter_topk` returns the same indices (ties broken towards the lower index on every backend, tested
with heavily tied scores); the replayed cache contents (positions kept per layer, row, head and step) must equal
the official ones exactly. The SnapKV prefill uses ``torch.topk`` like the official code; its tie-breaking among the
plateaus of max pooling is implementation-defined, so besides the exact check (valid on torch 2.13 CPU, where the
fixture was made) a tie-invariant check compares the kept scores as multisets.
There is no custom backward in this method (selection is not differentiated), so no gradcheck.
"""
from pathlib import Path

import numpy as np
import pytest
import torch

from refimpl._common import load_golden
from refimpl.kvcache.scope_kv_decoding import (DecodingSchedule, SCOPEPolicy, adaptive_delta, current_step_attention,
                                               decoding_keep, h2o_prefill_scores, heavy_hitter_topk, prefill_keep,
                                               snapkv_prefill_scores)
from refimpl.models.tiny_lm import KVCache

pytestmark = pytest.mark.usefixtures("one_torch_thread")


GOLDEN = Path(__file__).resolve().parents[1] / "golden" / "scope_kv_decoding"
CONFIGS = sorted(p.name for p in GOLDEN.glob("*_*.npz"))
BACKENDS = ["numpy", "numba", "torch"]


# ------------------------------------------------------------------------------------------ the critical loop
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape,start,stop,k", [((2, 3, 50), 10, 46, 7), ((1, 4, 9), 0, 9, 9), ((2, 2, 30), 5, 25, 0),
                                                ((3, 2, 300), 40, 280, 64), ((1, 1, 1), 0, 1, 1),
                                                ((1, 4, 70000), 1000, 69000, 30000)])  # parallel kernel
def test_backends_agree_with_reference(rng, dtype, shape, start, stop, k):
    for tied in (False, True):
        s = rng.standard_normal(shape).astype(dtype)
        if tied:  # few distinct values: ties everywhere, the rule "lower index first" must hold on every backend
            s = np.round(s * 2).astype(dtype)
        ref = heavy_hitter_topk(s, start, stop, k, backend="numpy")
        assert ref.shape == (*shape[:2], k) and ref.dtype == np.int64
        for backend in ("numba", "torch"):
            got = heavy_hitter_topk(s, start, stop, k, backend=backend)
            assert isinstance(got, np.ndarray)
            np.testing.assert_array_equal(got, ref, err_msg=f"{backend} tied={tied}")
        got_t = heavy_hitter_topk(torch.from_numpy(s), start, stop, k)  # auto → torch, tensor out
        assert isinstance(got_t, torch.Tensor)
        np.testing.assert_array_equal(got_t.numpy(), ref)


def test_topk_selects_the_largest(rng):
    s = rng.standard_normal((2, 3, 80))
    idx = heavy_hitter_topk(s, 20, 70, 10, backend="numba")
    for b in range(2):
        for h in range(3):
            kept = set(idx[b, h].tolist())
            assert all(20 <= j < 70 for j in kept) and len(kept) == 10
            assert np.all(np.diff(idx[b, h]) > 0)
            rest = [s[b, h, j] for j in range(20, 70) if j not in kept]
            assert min(s[b, h, list(kept)]) > max(rest)


def test_decoding_keep_layout(rng):
    s = rng.random((1, 2, 30)).astype(np.float32)
    keep = decoding_keep(s, n_prefill=10, n_recent=4, k=5)
    assert keep.shape == (1, 2, 19)
    np.testing.assert_array_equal(keep[0, 0, :10], np.arange(10))
    np.testing.assert_array_equal(keep[0, 0, -4:], np.arange(26, 30))
    keep_u = decoding_keep(torch.from_numpy(s), n_prefill=10, n_recent=4, k=12, unified=True)
    assert isinstance(keep_u, torch.Tensor) and keep_u.shape == (1, 2, 16)
    assert bool((keep_u[..., :12] < 26).all())


# --------------------------------------------------------------------------------------------- golden replay
def _replay(g, q, k, backend):
    nl, l, steps = int(g["n_layers"]), int(g["prompt_len"]), int(g["n_steps"])
    cluster, metric = str(g["cluster"]), str(g["metric"])
    kw = dict(decoding_budget=int(g["decoding_window"]), n_recent=int(g["n_recent"]), delta=int(g["delta"]),
              decoding={"None": "none", "h2o": "unified"}.get(metric, metric), backend=backend)
    if cluster == "ALLKV":
        pol = SCOPEPolicy(prefill="all", **kw)
    else:
        pol = SCOPEPolicy(int(g["capacity"]) + int(g["decoding_window"]), prefill=cluster.lower(),
                          prefill_window=int(g["window"]), kernel_size=int(g["kernel"]), pooling=str(g["pooling"]),
                          h2o_causal=False, **kw)
    cache = KVCache(nl, record=True)
    b, h = q.shape[1:3]
    for layer in range(nl):
        cache.append(layer, k[layer, :, :, :l], torch.zeros_like(k[layer, :, :, :l]), torch.arange(l).expand(b, h, l))
        cache.last_queries[layer] = q[layer, :, :, :l]
    cache.seen_tokens = l
    pol(None, cache)
    out = {"prefill": [cache.positions[layer].sort(-1).values.numpy() for layer in range(nl)], "steps": []}
    for s in range(steps):
        p = l + s
        for layer in range(nl):
            cache.append(layer, k[layer, :, :, p:p + 1], torch.zeros_like(k[layer, :, :, p:p + 1]),
                         torch.full((b, h, 1), p))
            cache.last_queries[layer], cache.last_attn[layer] = q[layer, :, :, p:p + 1], None
        cache.seen_tokens += 1
        pol(None, cache)
        out["steps"].append([cache.positions[layer].sort(-1).values.numpy() for layer in range(nl)])
    return out, pol


@pytest.fixture(scope="module")
def inputs():
    d = load_golden(GOLDEN / "inputs.npz")
    return torch.from_numpy(d["q"]), torch.from_numpy(d["k"])


def test_fixtures_present():
    assert len(CONFIGS) == 11, CONFIGS


# every configuration with the reference backend; the fast backends on one configuration per decoding metric
GOLDEN_CASES = [(n, "numpy") for n in CONFIGS] + [
    (n, b) for n in ("allkv_slide.npz", "allkv_adaptive.npz", "h2o_discontinuous.npz", "h2o_h2o.npz",
                     "snapkv_slide.npz") for b in ("numba", "torch")]


@pytest.mark.parametrize("name,backend", GOLDEN_CASES)
def test_matches_official_clusters(inputs, name, backend):
    g = load_golden(GOLDEN / name)
    out, pol = _replay(g, *inputs, backend)
    n_mismatch = 0
    for layer in range(int(g["n_layers"])):
        n = int(g["prefill_size"][layer])
        n_mismatch += not np.array_equal(out["prefill"][layer], g["prefill_kept"][layer, :, :, :n])
    for s, per_layer in enumerate(out["steps"]):
        for layer, got in enumerate(per_layer):
            n = int(g["sizes"][s, layer])
            assert got.shape[-1] == n, f"{name} step {s} layer {layer}: size {got.shape[-1]} != official {n}"
            n_mismatch += not np.array_equal(got, g["kept"][s, layer, :, :, :n])
    assert n_mismatch == 0, f"{name}[{backend}]: {n_mismatch} (step, layer) cache contents differ from the official"
    if str(g["metric"]) == "None":
        assert pol.n_selections == 0


def test_snapkv_prefill_tie_invariant(inputs):
    """The kept SnapKV prompt tokens carry the same max-pooled scores as the official ones (multiset equality)."""
    q, k = inputs
    g = load_golden(GOLDEN / "snapkv_slide.npz")
    l, cap, w = int(g["prompt_len"]), int(g["capacity"]), int(g["window"])
    for layer in range(int(g["n_layers"])):
        s = snapkv_prefill_scores(q[layer, :, :, :l], k[layer, :, :, :l], w, int(g["kernel"]), str(g["pooling"]))
        ours = prefill_keep(s, l, cap, w)[..., : cap - w]
        off = torch.from_numpy(g["prefill_kept"][layer, :, :, : cap - w].astype(np.int64))
        torch.testing.assert_close(s.gather(-1, ours).sort(-1).values, s.gather(-1, off).sort(-1).values,
                                   rtol=0, atol=0)
        recent = g["prefill_kept"][layer, :, :, cap - w: cap]  # the official window: the last w prompt tokens
        np.testing.assert_array_equal(recent, np.broadcast_to(np.arange(l - w, l), recent.shape))


# ------------------------------------------------------------------------------------------ schedules (6)-(8)
@pytest.mark.parametrize("metric", ["slide", "adaptive", "discontinuous", "unified"])
def test_schedule_closed_forms(metric):
    n_layers, w, r, delta, p = 3, 12, 4, 7, 40
    sch = DecodingSchedule(metric, n_layers, w, r, delta)
    size = [p] * n_layers
    sizes = []
    for t in range(64):
        for layer in range(n_layers):
            size[layer] += 1
            k = sch(size[layer], p)
            window = w if metric in ("slide", "unified") else r + t // delta  # eqs. (6)-(7)
            assert sch.window == window
            if k is not None:
                size[layer] = p + window
                assert k == (p + window - r if metric == "unified" else window - r)
        sizes.append(size[0])
    if metric in ("slide", "unified"):
        assert max(sizes) == p + w and sizes[-1] == p + w
    elif metric == "adaptive":
        assert sizes[-1] == p + r + 63 // delta
    else:  # the cache grows between re-selection rounds, so it is larger than adaptive's on average
        assert sch.n_selections < 64 * n_layers // delta + n_layers and max(sizes) > p + r + 63 // delta


def test_adaptive_delta():
    assert adaptive_delta(64, 12, 4) == 7
    assert adaptive_delta(5, 12, 4) == 1


# ----------------------------------------------------------------------------------------- prefill scores (3)
def test_h2o_prefill_scores(rng):
    q = torch.from_numpy(rng.standard_normal((1, 2, 12, 8)))
    k = torch.from_numpy(rng.standard_normal((1, 2, 12, 8)))
    s = h2o_prefill_scores(q, k, window=4, causal=True)
    future = torch.ones(12, 12).triu(1).bool()
    a = torch.softmax((q @ k.transpose(-1, -2) / 8 ** 0.5).masked_fill(future, -torch.inf), -1)
    torch.testing.assert_close(s, a.sum(-2)[..., :8], rtol=1e-12, atol=1e-12)
    s_off = h2o_prefill_scores(q, k, window=4, causal=False)  # the official mask: early queries see later keys
    assert not torch.allclose(s, s_off)


# --------------------------------------------------------------------------------------------- on the TinyLM
def test_policy_on_tiny_lm(random_tiny_lm):
    model = random_tiny_lm(seed=1, dtype=torch.float32)
    tokens = torch.randint(4, 40, (2, 30), generator=torch.Generator().manual_seed(0))
    full = model.generate(tokens, 20, cache=model.new_cache())
    # a decoding budget larger than the output never evicts: identical tokens
    same = model.generate(tokens, 20, cache=model.new_cache(record=True),
                          policy=SCOPEPolicy(prefill="all", decoding_budget=24))
    assert torch.equal(full, same)
    # every metric keeps at most P + W_t entries per layer after each step, and the prompt stays whole
    for decoding in ("slide", "adaptive", "discontinuous", "unified"):
        pol = SCOPEPolicy(prefill="all", decoding_budget=6, decoding=decoding, max_new_tokens=20)
        cache = model.new_cache(record=True)
        model.generate(tokens, 20, cache=cache, policy=pol)
        bound = 30 + 6 + (20 if decoding == "discontinuous" else 0)
        assert all(cache.length(layer) <= bound for layer in range(cache.n_layers))
        if decoding != "unified":
            assert all(bool((cache.positions[layer][..., :30] == torch.arange(30)).all()) for layer in range(2))
        assert pol.n_selections > 0 and pol.peak_tokens <= bound + 1
    # plug-in: the prompt is compressed to budget - W, and recomputing eq. (1) from the queries = recorded attention
    pol = SCOPEPolicy(24, prefill="snapkv")
    cache = model.new_cache(record=True)
    model.generate(tokens, 10, cache=cache, policy=pol)
    assert pol.capacity == 18 and cache.length(0) <= 24
    cache = model.new_cache(record=True)
    model(tokens, cache)
    model.decode_step(tokens[:, 0], cache)
    for layer in range(cache.n_layers):
        att = current_step_attention(cache.last_queries[layer], cache.keys[layer])
        torch.testing.assert_close(att, cache.last_attn[layer][:, :, -1], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------------ bad inputs
def test_bad_inputs():
    s = np.zeros((1, 2, 10), np.float32)
    with pytest.raises(TypeError, match="scores must be floating"):
        heavy_hitter_topk(np.zeros((1, 2, 10), np.int64), 0, 10, 2)
    with pytest.raises(ValueError, match=r"scores must have shape \(B, H, T\)"):
        heavy_hitter_topk(np.zeros((2, 10), np.float32), 0, 10, 2)
    with pytest.raises(ValueError, match="NaN"):
        heavy_hitter_topk(np.full((1, 1, 4), np.nan, np.float32), 0, 4, 1)
    with pytest.raises(ValueError, match="k must be <= stop - start"):
        heavy_hitter_topk(s, 2, 5, 4)
    with pytest.raises(ValueError, match="stop must be <= T=10"):
        heavy_hitter_topk(s, 0, 11, 1)
    with pytest.raises(ValueError, match="backend must be one of"):
        heavy_hitter_topk(s, 0, 10, 1, backend="cuda")
    with pytest.raises(ValueError, match="prefill must be one of"):
        SCOPEPolicy(32, prefill="pyramid")
    with pytest.raises(ValueError, match="decoding must be one of"):
        SCOPEPolicy(32, decoding="h2o")
    with pytest.raises(ValueError, match="needs decoding_budget"):
        SCOPEPolicy(prefill="all")
    with pytest.raises(ValueError, match="give decoding_budget, not budget"):
        SCOPEPolicy(32, prefill="all", decoding_budget=8)
    with pytest.raises(ValueError, match="needs delta or max_new_tokens"):
        SCOPEPolicy(32, decoding="adaptive")
    with pytest.raises(ValueError, match="n_recent must be < decoding_budget"):
        SCOPEPolicy(32, decoding_budget=8, n_recent=8)
    with pytest.raises(ValueError, match="budget must be >= 4"):
        SCOPEPolicy(2)
    with pytest.raises(ValueError, match="window must be < L"):
        h2o_prefill_scores(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2), window=4)
    with pytest.raises(ValueError, match="kernel_size must be odd"):
        snapkv_prefill_scores(torch.zeros(1, 1, 8, 2), torch.zeros(1, 1, 8, 2), window=2, kernel_size=4)
    with pytest.raises(ValueError, match="one query per row and head"):
        current_step_attention(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 5, 4))
    with pytest.raises(TypeError, match="cache must be a KVCache"):
        SCOPEPolicy(16)(None, object())


@pytest.mark.gpu
def test_cuda_matches_cpu(rng):
    s = rng.standard_normal((4, 8, 2048)).astype(np.float32)
    ref = heavy_hitter_topk(s, 512, 1792, 256, backend="numpy")
    got = heavy_hitter_topk(torch.from_numpy(s).cuda(), 512, 1792, 256)
    assert got.is_cuda
    np.testing.assert_array_equal(got.cpu().numpy(), ref)
