"""The book's tiny language model (refimpl.models): KV cache exactness, eviction with original positions,
RoPE, the corpus, the committed checkpoint, and the export to transformers' LlamaForCausalLM.

Tolerances: float64 cache/recompute comparisons 1e-10 (the same sums in another order); RoPE's relative
property 1e-4 (the angles are computed in float32, as in Hugging Face's Llama); export float32 1e-5
relative to the logits' scale, float64 1e-10.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from refimpl.attention.mha import rope as book_rope
from refimpl.models import KVCache, TinyLMConfig, load_tiny_lm
from refimpl.models.corpus import TASKS, TOKENIZER, evaluate, grammar_text, make_task, training_batch
from refimpl.models.tiny_lm import apply_rope, load_metadata

TOL64 = 1e-10


@pytest.fixture(scope="module")
def trained():
    return load_tiny_lm(dtype=torch.float32)


def test_incremental_decoding_equals_full_forward(random_tiny_lm):
    m = random_tiny_lm()
    x = torch.randint(0, m.cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    full = m(x)
    cache = m.new_cache()
    parts = [m(x[:, :10], cache), m(x[:, 10:17], cache)]  # chunked prefill
    for i in range(17, 40):
        parts.append(m.decode_step(x[:, i], cache)[:, None])
    inc = torch.cat(parts, dim=1)
    assert (full - inc).abs().max() < TOL64
    assert cache.seen_tokens == 40 and cache.length(0) == 40
    assert cache.keys[1].shape == (2, 4, 40, 32) and cache.positions[1].shape == (2, 4, 40)
    # the explicit path (return_attn) equals the fused path
    logits, attn = m(x, return_attn=True)
    assert (logits - full).abs().max() < TOL64
    assert attn[0].shape == (2, 4, 40, 40) and torch.allclose(attn[0].sum(-1), torch.ones(2, 4, 40, dtype=torch.float64))


def _reference_decode_after_keep(m, x, new_tok, sel):
    """Recompute, from scratch, the logits of ``new_tok`` at position L when layer l / row b / head h only
    sees the prompt tokens ``sel[l][b, h]`` with their original positions (keys from the prompt's hidden
    states, captured by hooks)."""
    hidden = {}
    hooks = [blk.input_layernorm.register_forward_hook(lambda mod, i, o, l=l: hidden.__setitem__(l, o))
             for l, blk in enumerate(m.layers)]
    m(x)
    for h in hooks:
        h.remove()
    b, L = x.shape
    nh, dh, theta = m.cfg.n_heads, m.cfg.d_head, m.cfg.rope_theta
    pos = torch.arange(L)
    z = m.embed_tokens(new_tok)[:, None]  # (B, 1, d)
    for l, blk in enumerate(m.layers):
        at = blk.self_attn
        n_new = blk.input_layernorm(z)
        q = apply_rope(at.q_proj(n_new).view(b, 1, nh, dh).transpose(1, 2), torch.tensor([L]), theta)
        k_new = apply_rope(at.k_proj(n_new).view(b, 1, nh, dh).transpose(1, 2), torch.tensor([L]), theta)
        v_new = at.v_proj(n_new).view(b, 1, nh, dh).transpose(1, 2)
        k_all = apply_rope(at.k_proj(hidden[l]).view(b, L, nh, dh).transpose(1, 2), pos, theta)
        v_all = at.v_proj(hidden[l]).view(b, L, nh, dh).transpose(1, 2)
        out = torch.empty(b, nh, 1, dh, dtype=z.dtype)
        for bi in range(b):
            for hi in range(nh):
                idx = sel[l][bi, hi]
                k = torch.cat([k_all[bi, hi, idx], k_new[bi, hi]], 0)
                v = torch.cat([v_all[bi, hi, idx], v_new[bi, hi]], 0)
                w = torch.softmax(q[bi, hi] @ k.T / math.sqrt(dh), -1)
                out[bi, hi] = w @ v
        z = z + at.o_proj(out.transpose(1, 2).reshape(b, 1, nh * dh))
        z = z + blk.mlp(blk.post_attention_layernorm(z))
    return m.lm_head(m.norm(z))[:, 0]


def test_keep_then_decode_equals_recompute_over_kept_tokens(random_tiny_lm):
    m = random_tiny_lm(seed=3)
    g = torch.Generator().manual_seed(2)
    b, L, keep = 2, 30, 12
    x = torch.randint(0, m.cfg.vocab_size, (b, L), generator=g)
    new_tok = torch.randint(0, m.cfg.vocab_size, (b,), generator=g)
    _, cache = m.prefill(x)
    sel = []
    for l in range(m.cfg.n_layers):
        if l == 0:  # per-row-and-head selections (ragged per head, equal budget per layer)
            idx = torch.stack([torch.stack([torch.randperm(L, generator=g)[:keep].sort().values
                                            for _ in range(m.cfg.n_heads)]) for _ in range(b)])
            cache.keep(l, idx)
            sel.append(idx)
        else:  # one selection shared by rows and heads (e.g. a sliding window plus sinks)
            idx = torch.cat([torch.arange(2), torch.arange(L - 8, L)])
            cache.keep(l, idx)
            sel.append(idx[None, None].expand(b, m.cfg.n_heads, -1))
        assert torch.equal(cache.positions[l], sel[l])  # positions survive eviction
    got = m.decode_step(new_tok, cache)
    ref = _reference_decode_after_keep(m, x, new_tok, sel)
    assert (got - ref).abs().max() < TOL64
    assert cache.length(0) == keep + 1 and cache.length(1) == 11 and cache.seen_tokens == L + 1
    assert int(cache.positions[0][0, 0, -1]) == L


def test_keep_everything_is_a_no_op_and_records_queries(random_tiny_lm):
    m = random_tiny_lm(seed=4)
    x = torch.randint(0, m.cfg.vocab_size, (1, 16))
    c1, c2 = m.new_cache(), m.new_cache(record=True)
    m(x, c1), m(x, c2)
    for l in range(m.cfg.n_layers):
        c2.keep(l, torch.arange(16).flip(0))  # any order of the same tokens gives the same attention
    t = torch.tensor([5])
    assert (m.decode_step(t, c1) - m.decode_step(t, c2)).abs().max() < TOL64
    assert c2.last_queries[0].shape == (1, 4, 1, 32) and c2.last_attn[1].shape == (1, 4, 1, 17)
    assert torch.equal(c2.last_query_positions, torch.tensor([16]))
    assert c2.nbytes() == 2 * 2 * 4 * 17 * 32 * 8


def test_rope_relative_position_property_and_layout():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 32, generator=g, dtype=torch.float64)
    for p, s, d in ((5, 3, 17), (40, 0, 9), (7, 7, 60)):
        a = apply_rope(q, torch.tensor(p)) @ apply_rope(k, torch.tensor(s))
        b = apply_rope(q, torch.tensor(p + d)) @ apply_rope(k, torch.tensor(s + d))
        assert abs(float(a - b)) < 1e-4 * (1 + abs(float(a)))
    # same rotate-half layout as the book's attention block (which computes the angles in float64)
    x = torch.randn(3, 50, 32, generator=g, dtype=torch.float64)
    assert (apply_rope(x, torch.arange(50)) - book_rope(x)).abs().max() < 1e-4
    # norm-preserving
    assert torch.allclose(apply_rope(x, torch.arange(50)).norm(dim=-1), x.norm(dim=-1), atol=1e-6)


def test_generate_is_greedy_and_calls_policy(random_tiny_lm):
    m = random_tiny_lm(seed=5, dtype=torch.float32)
    x = torch.randint(0, m.cfg.vocab_size, (2, 12))
    calls = []

    def policy(model, cache):
        calls.append(cache.length(0))
        for l in range(cache.n_layers):  # keep the last 8 tokens
            n = cache.length(l)
            if n > 8:
                cache.keep(l, torch.arange(n - 8, n))

    out = m.generate(x, 5)
    seq = x
    for _ in range(5):  # greedy without cache
        seq = torch.cat([seq, m(seq)[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq[:, 12:])
    m.generate(x, 4, cache=m.new_cache(record=True), policy=policy)
    assert calls == [12, 9, 9, 9]


def test_corpus_is_deterministic_and_tokenizer_round_trips():
    rng = lambda: np.random.default_rng(7)  # noqa: E731
    assert grammar_text(300, rng()) == grammar_text(300, rng())
    assert torch.equal(training_batch(rng(), 2, 64), training_batch(rng(), 2, 64))
    for name in TASKS:
        a, b = make_task(name, 5, 200, seed=3), make_task(name, 5, 200, seed=3)
        assert a == b and a != make_task(name, 5, 200, seed=4)
        lens = {len(TOKENIZER.encode(e.prompt)) for e in a}
        assert len(lens) == 1 and lens.pop() <= 200
        for e in a:
            assert TOKENIZER.decode(TOKENIZER.encode(e.prompt)) == e.prompt
            assert e.prompt.startswith("<bos>")
    for e in make_task("kv_recall", 5, 256, seed=0):
        key = e.prompt.rsplit("? ", 1)[1][:-1]
        assert f"{key}={e.answer};" in e.prompt
    assert all(e.answer in e.prompt for e in make_task("needle", 5, 256, seed=0, depth=0.5))
    text = "<bos>hello, world: 42?\n<sep><eos>"
    assert TOKENIZER.decode(TOKENIZER.encode(text)) == text and len(TOKENIZER.encode(text)) == 21


def test_committed_checkpoint_reproduces_recorded_accuracies(trained):
    meta = load_metadata()
    assert trained.num_parameters() == meta["num_parameters"]
    acc = meta["task_accuracy"]
    n, seed = meta["eval"]["n"], meta["eval"]["seed"]
    torch.set_num_threads(max(1, torch.get_num_threads()))
    for task, ctx in (("kv_recall", "256"), ("needle", "256"), ("copy", "64")):
        got = evaluate(trained, task, n=n, context_len=int(ctx), seed=seed)
        assert abs(got - acc[task][ctx]) <= 1.0 / n + 1e-9, (task, ctx, got, acc[task][ctx])
        assert got >= 0.8, (task, got)  # the checkpoint is clearly trained
    # the language-model part: it continues grammar text sensibly (low loss on fresh text)
    b = training_batch(np.random.default_rng(99), 4, 256, p_text=1.0)
    with torch.no_grad():
        loss = F.cross_entropy(trained(b[:, :-1]).flatten(0, 1), b[:, 1:].flatten())
    assert loss < 1.5


def test_export_to_transformers_llama_gives_the_same_logits(trained):
    pytest.importorskip("transformers")
    from refimpl.models.hf_export import to_llama
    x = torch.tensor([TOKENIZER.encode(e.prompt) for e in make_task("kv_recall", 2, 200, seed=0)])
    hf = to_llama(trained)
    with torch.no_grad():
        ours, theirs = trained(x), hf(input_ids=x).logits
    assert (ours - theirs).abs().max() < 1e-5 * max(1.0, float(ours.abs().max()))
    m64 = trained.to(torch.float64)
    try:
        hf64 = to_llama(m64)
        with torch.no_grad():
            assert (m64(x) - hf64(input_ids=x).logits).abs().max() < TOL64
    finally:
        trained.to(torch.float32)


def test_bad_inputs_raise(random_tiny_lm):
    m = random_tiny_lm(dtype=torch.float32)
    with pytest.raises(TypeError):
        m(torch.zeros(1, 4))
    with pytest.raises(TypeError):
        m([[1, 2]])
    with pytest.raises(ValueError):
        m(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        m(torch.full((1, 3), m.cfg.vocab_size))
    with pytest.raises(ValueError):
        m(torch.zeros(1, m.cfg.max_seq_len + 1, dtype=torch.long))
    with pytest.raises(ValueError):
        m(torch.zeros(1, 3, dtype=torch.long), cache=KVCache(m.cfg.n_layers + 1))
    with pytest.raises(TypeError):
        m(torch.zeros(1, 3, dtype=torch.long), cache="cache")
    with pytest.raises(ValueError):
        m.generate(torch.zeros(1, 3, dtype=torch.long), 0)
    for bad in ({"d_model": 130, "n_heads": 4}, {"n_heads": 0}, {"rope_theta": -1.0}, {"d_model": 12, "n_heads": 4}):
        with pytest.raises(ValueError):
            TinyLMConfig(**bad)
    with pytest.raises(ValueError):
        TinyLMConfig.from_dict({"d_modell": 128})
    assert TinyLMConfig.from_dict(m.cfg.to_dict()) == m.cfg
    _, cache = m.prefill(torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError):
        cache.keep(0, torch.tensor([0, 5]))
    with pytest.raises(TypeError):
        cache.keep(0, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError):
        cache.keep(0, torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError):
        cache.keep(7, torch.tensor([0]))
    with pytest.raises(ValueError):
        KVCache(0)
    with pytest.raises(ValueError):
        TOKENIZER.encode("Hello")
    with pytest.raises(ValueError):
        TOKENIZER.encode("<unk>")
    with pytest.raises(ValueError):
        make_task("kv_recall", 3, context_len=10)
    with pytest.raises(ValueError):
        make_task("needle", 3, 256, depth=1.5)
    with pytest.raises(ValueError):
        make_task("sorting", 3)
    with pytest.raises(TypeError):
        evaluate("model", "kv_recall")
