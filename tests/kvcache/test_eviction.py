"""The KV-cache part's shared selection rule (eq. E1) and baselines (StreamingLLM, H2O, full cache).

Selections are integer sets, compared exactly. H2O's accumulated scores are checked against a brute-force
replay that recomputes every attention row from the kept cache: float64, tolerance 1e-12 (same sums, another
order). Accuracies of the trained checkpoint are exact-match counts on seeded prompts.
"""
import pytest
import torch

from refimpl.kvcache.eviction import H2O, CachePolicy, FullCache, SlidingWindow, select_keep
from refimpl.models import load_tiny_lm
from refimpl.models.corpus import evaluate


def test_select_keep_brute_force():
    g = torch.Generator().manual_seed(0)
    s = torch.rand(2, 3, 20, generator=g, dtype=torch.float64)
    keep = select_keep(s, budget=9, n_recent=3, n_sink=2)
    assert keep.shape == (2, 3, 9) and keep.dtype == torch.int64
    for b in range(2):
        for h in range(3):
            mid = sorted(range(2, 17), key=lambda j: -float(s[b, h, j]))[:4]
            want = sorted([0, 1, 17, 18, 19] + mid)
            assert keep[b, h].tolist() == want


def test_select_keep_short_cache_keeps_everything():
    s = torch.rand(1, 2, 5)
    assert select_keep(s, budget=8).tolist() == [[[0, 1, 2, 3, 4]] * 2]


@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(scores=torch.rand(2, 5), budget=2), ValueError, "shape"),
    (dict(scores=torch.arange(5)[None, None], budget=2), TypeError, "floating"),
    (dict(scores=torch.tensor([[[0.0, float("nan")]]]), budget=1), ValueError, "NaN"),
    (dict(scores=torch.rand(1, 1, 5), budget=0), ValueError, "budget"),
    (dict(scores=torch.rand(1, 1, 5), budget=3, n_recent=2, n_sink=2), ValueError, "exceed"),
])
def test_select_keep_bad_inputs(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        select_keep(**kwargs)


def test_sliding_window_keeps_sinks_and_recent_tokens(random_tiny_lm):
    m = random_tiny_lm()
    x = torch.randint(0, m.cfg.vocab_size, (2, 30), generator=torch.Generator().manual_seed(1))
    pol = SlidingWindow(budget=10, n_sink=3)
    m.generate(x, 5, cache=(cache := m.new_cache()), policy=pol)
    # the policy runs after the prefill and after each of the 4 decode steps: 34 tokens processed, 10 kept
    for layer in range(m.cfg.n_layers):
        assert cache.positions[layer][0, 0].tolist() == [0, 1, 2] + list(range(27, 34))


def test_h2o_scores_equal_brute_force_replay(random_tiny_lm):
    """H2O's running scores = Σ over every query so far of its attention to each still-cached token."""
    m = random_tiny_lm()
    x = torch.randint(0, m.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    pol = H2O(budget=12, n_recent=4)
    cache = m.new_cache(record=True)
    history = []  # per call: positions of queries and their attention over (positions of) cached keys

    def spy(model, c):
        history.append([(c.last_query_positions.clone(), c.positions[l].clone(), c.last_attn[l].clone())
                        for l in range(c.n_layers)])
        pol(model, c)

    m.generate(x, 6, cache=cache, policy=spy)
    for layer in range(m.cfg.n_layers):
        kept = cache.positions[layer]  # (B, H, 12)
        assert kept.shape[-1] == 12
        want = torch.zeros(kept.shape, dtype=torch.float64)
        for call in history:
            _, kpos, attn = call[layer]
            # attention each kept token received in this call: match by absolute position
            hit = kept[..., :, None] == kpos[..., None, :]  # (B, H, 12, T)
            want += (attn.sum(2)[..., None, :] * hit).sum(-1)
        assert (pol.scores[layer] - want).abs().max() < 1e-12
        # the recent window: the 4 most recent processed tokens of the last call are kept
        assert (kept[..., -4:] == torch.arange(25, 29)).all()


def test_policy_resets_on_a_new_cache(random_tiny_lm):
    m = random_tiny_lm()
    x = torch.randint(0, m.cfg.vocab_size, (1, 20), generator=torch.Generator().manual_seed(3))
    pol = H2O(budget=8)
    m.generate(x, 3, cache=m.new_cache(record=True), policy=pol)
    first = [s.clone() for s in pol.scores]
    m.generate(x, 3, cache=m.new_cache(record=True), policy=pol)
    for a, b in zip(first, pol.scores):
        assert torch.equal(a, b)


def test_h2o_needs_a_recording_cache(random_tiny_lm):
    m = random_tiny_lm()
    x = torch.randint(0, m.cfg.vocab_size, (1, 10))
    with pytest.raises(ValueError, match="record=True"):
        m.generate(x, 2, cache=m.new_cache(), policy=H2O(budget=4))


@pytest.mark.parametrize("make, exc, match", [
    (lambda: SlidingWindow(budget=0), ValueError, "budget must be >= 1"),
    (lambda: SlidingWindow(budget=4, n_sink=5), ValueError, "n_sink"),
    (lambda: H2O(budget=4, n_recent=5), ValueError, "n_recent"),
    (lambda: H2O(budget=2.5), TypeError, "budget must be an int"),
])
def test_bad_policy_arguments(make, exc, match):
    with pytest.raises(exc, match=match):
        make()


def test_policy_rejects_a_non_cache(random_tiny_lm):
    with pytest.raises(TypeError, match="KVCache"):
        FullCache()(None, object())
    with pytest.raises(NotImplementedError):
        CachePolicy()(None, random_tiny_lm().new_cache())


def test_baselines_on_the_trained_model():
    """Eviction costs accuracy on the book's model: full cache ≫ a 32-token window on key–value recall."""
    model = load_tiny_lm()
    full = evaluate(model, "kv_recall", n=25, context_len=256, policy=FullCache())
    window = evaluate(model, "kv_recall", n=25, context_len=256, policy=SlidingWindow(32))
    assert full >= 0.9 and window <= 0.3
