"""The shared multi-head attention block (refimpl.attention.mha).

Compared with torch's own ``F.scaled_dot_product_attention`` and ``nn.MultiheadAttention`` (the
canonical implementation) in float64, where both compute the same sums in a different order:
tolerance 1e-12 absolute. The pluggable pieces are checked to be actually used.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from refimpl.attention.mha import (MultiHeadAttention, TinyTransformer, attention, causal_mask, dot_product_scores,
                                   rope, softmax_weights)

TOL = 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_sdpa(causal):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 7, 8, generator=g, dtype=torch.float64) for _ in range(3))
    out, w = attention(q, k, v, causal=causal)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert (out - ref).abs().max() < TOL
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 7, dtype=torch.float64), rtol=0, atol=TOL)
    if causal:
        assert (w.triu(1) == 0).all()


def test_causal_mask_with_longer_cache():
    m = causal_mask(2, 5)
    assert m.tolist() == [[True, True, True, True, False], [True] * 5]
    with pytest.raises(ValueError, match="at least as many keys"):
        causal_mask(3, 2)


def test_padding_mask():
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(1, 2, 4, 6, generator=g, dtype=torch.float64) for _ in range(3))
    keep = torch.tensor([True, True, False, True])
    out, w = attention(q, k, v, mask=keep[None, None, None, :])
    assert (w[..., 2] == 0).all()
    ref, _ = attention(q, k[..., [0, 1, 3], :], v[..., [0, 1, 3], :])
    assert (out - ref).abs().max() < TOL


def test_module_matches_nn_multihead_attention():
    torch.manual_seed(0)
    d, h = 16, 4
    ours = MultiHeadAttention(d, h, causal=True, bias=True).double()
    ref = torch.nn.MultiheadAttention(d, h, batch_first=True, dtype=torch.float64)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.o_proj.weight)
        ref.out_proj.bias.copy_(ours.o_proj.bias)
    x = torch.randn(2, 5, d, dtype=torch.float64)
    y, w = ours(x, return_weights=True)
    y_ref, w_ref = ref(x, x, x, attn_mask=~causal_mask(5), average_attn_weights=False)
    assert (y - y_ref).abs().max() < TOL and (w - w_ref).abs().max() < TOL


def test_pluggable_pieces_are_used():
    q = k = v = torch.eye(3, dtype=torch.float64)[None, None]
    uniform = lambda s, m: torch.full_like(s, 1 / s.shape[-1])  # noqa: E731
    out, _ = attention(q, k, v, weight_fn=uniform)
    assert torch.allclose(out, torch.full_like(out, 1 / 3))
    neg_dist = lambda a, b: -torch.cdist(a, b)  # noqa: E731
    _, w = attention(q, k, v, score_fn=neg_dist)
    assert torch.allclose(w, torch.softmax(-torch.cdist(q, k), -1))
    maxagg = lambda w, v: (w[..., None] * v[..., None, :, :]).amax(-2)  # noqa: E731
    ones = torch.ones(1, 1, 3, 2, dtype=torch.float64)
    out, w = attention(q, k, ones, aggregate_fn=maxagg)  # max_j w_ij, where A V would give the row sums (= 1)
    assert torch.equal(out, w.amax(-1, keepdim=True).expand(-1, -1, -1, 2)) and (out < 0.9).all()


def test_rope_is_relative():
    """<rope(q, i), rope(k, j)> depends only on i - j; rope preserves norms."""
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(1, 8, generator=g, dtype=torch.float64), torch.randn(1, 8, generator=g, dtype=torch.float64)
    def dot(i, j):
        return (rope(q, torch.tensor([i])) * rope(k, torch.tensor([j]))).sum()
    assert abs(dot(3, 1) - dot(10, 8)) < 1e-12 and abs(dot(3, 1) - dot(1, 3)) > 1e-3
    assert abs(rope(q, torch.tensor([7])).norm() - q.norm()) < 1e-12
    assert torch.equal(rope(q, torch.tensor([0])), q)


@pytest.mark.parametrize("pos", ["rope", "learned", "none"])
def test_tiny_transformer_causality(pos):
    torch.manual_seed(0)
    m = TinyTransformer(11, d_model=16, n_heads=2, n_layers=2, pos=pos, max_len=16).double()
    t = torch.randint(0, 11, (2, 9))
    t2 = t.clone()
    t2[:, 6:] = (t2[:, 6:] + 1) % 11
    a, b = m(t), m(t2)
    assert a.shape == (2, 9, 11)
    assert (a[:, :6] - b[:, :6]).abs().max() < TOL and (a[:, 6:] - b[:, 6:]).abs().max() > 1e-6


def test_bad_inputs():
    with pytest.raises(ValueError, match="multiple of n_heads"):
        MultiHeadAttention(10, 3)
    m = MultiHeadAttention(8, 2)
    with pytest.raises(ValueError, match=r"x must have shape \(B, L, 8\)"):
        m(torch.randn(2, 3, 6))
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ValueError, match="same feature size"):
        attention(q, torch.randn(1, 1, 3, 5), q)
    with pytest.raises(ValueError, match="same length"):
        attention(q, q, torch.randn(1, 1, 2, 4))
    with pytest.raises(TypeError, match="mask must be a boolean"):
        attention(q, q, q, mask=torch.ones(3, 3))
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        attention(q.numpy(), q, q)
    with pytest.raises(ValueError, match="even feature size"):
        rope(torch.randn(2, 3))
    with pytest.raises(ValueError, match="pos must be"):
        TinyTransformer(5, pos="alibi")
    with pytest.raises(ValueError, match="exceeds max_len"):
        TinyTransformer(5, d_model=8, n_heads=2, pos="learned", max_len=4)(torch.zeros(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="tokens must be an integer tensor"):
        TinyTransformer(5, d_model=8, n_heads=2)(torch.zeros(1, 5))


def test_default_scale():
    q = torch.ones(1, 1, 1, 4)
    assert dot_product_scores(q, q).item() == pytest.approx(4 / math.sqrt(4))
    assert softmax_weights(torch.zeros(1, 3), torch.tensor([True, False, True])).tolist() == [[0.5, 0, 0.5]]
