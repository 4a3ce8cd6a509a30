"""minillm.attention: the explicit formula against the fused kernel, causality, MHA/GQA/MQA, the cache."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from minillm.attention import AttentionError, CausalSelfAttention, KVCache, attention_mask_for, causal_mask, scaled_dot_product

torch.manual_seed(0)


def test_causal_mask_with_offset():
    assert causal_mask(3, 3).tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    # Two new queries after three cached positions: they sit at positions 3 and 4.
    assert causal_mask(2, 5).tolist() == [[True, True, True, True, False], [True, True, True, True, True]]


@pytest.mark.parametrize("masked", [False, True])
def test_explicit_formula_matches_sdpa(masked):
    q, k, v = torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8), torch.randn(2, 3, 7, 8)
    mask = causal_mask(7, 7) if masked else None
    y, w = scaled_dot_product(q, k, v, mask)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=masked)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 7))
    if masked:
        assert (w.triu(1) == 0).all()


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_explicit_path_equals_fused_path(heads, kv_heads):
    attn = CausalSelfAttention(32, heads, kv_heads).eval()
    x = torch.randn(2, 9, 32)
    y_fused = attn(x)
    y_explicit, w = attn(x, need_weights=True)
    torch.testing.assert_close(y_fused, y_explicit, atol=1e-6, rtol=1e-5)
    assert w.shape == (2, heads, 9, 9)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_causality(heads, kv_heads):
    attn = CausalSelfAttention(32, heads, kv_heads).eval()
    x = torch.randn(2, 10, 32)
    y = attn(x)
    for t in range(10):
        x2 = x.clone()
        x2[:, t + 1 :] = torch.randn_like(x2[:, t + 1 :])  # change the future of position t
        y2 = attn(x2)
        torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], atol=1e-6, rtol=1e-5)
        if t < 9:
            assert not torch.allclose(y2[:, t + 1 :], y[:, t + 1 :])


def test_matches_torch_multihead_attention():
    C, H = 24, 3
    ours = CausalSelfAttention(C, H, bias=True).eval()
    ref = torch.nn.MultiheadAttention(C, H, bias=True, batch_first=True).eval()
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.q_proj.weight, ours.k_proj.weight, ours.v_proj.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.q_proj.bias, ours.k_proj.bias, ours.v_proj.bias]))
        ref.out_proj.weight.copy_(ours.o_proj.weight)
        ref.out_proj.bias.copy_(ours.o_proj.bias)
    x = torch.randn(2, 6, C)
    y_ref, w_ref = ref(x, x, x, attn_mask=~causal_mask(6, 6), average_attn_weights=False)
    y, w = ours(x, need_weights=True)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(w, w_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(ours(x), y_ref, atol=1e-6, rtol=1e-5)


def test_gqa_equals_mha_with_shared_heads():
    C, H, G = 32, 4, 2
    gqa = CausalSelfAttention(C, H, G).eval()
    mha = CausalSelfAttention(C, H, H).eval()
    D = C // H
    with torch.no_grad():
        mha.q_proj.weight.copy_(gqa.q_proj.weight)
        mha.o_proj.weight.copy_(gqa.o_proj.weight)
        # Each of the G key/value heads serves H/G consecutive query heads: repeat its rows.
        for name in ("k_proj", "v_proj"):
            w = getattr(gqa, name).weight.view(G, D, C).repeat_interleave(H // G, dim=0).reshape(H * D, C)
            getattr(mha, name).weight.copy_(w)
    x = torch.randn(3, 7, C)
    torch.testing.assert_close(gqa(x), mha(x), atol=1e-6, rtol=1e-5)
    # And n_kv_heads == n_heads is plain multi-head attention.
    assert CausalSelfAttention(C, H, H).k_proj.weight.shape == CausalSelfAttention(C, H).k_proj.weight.shape == (C, C)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_cached_decoding_equals_recomputation(heads, kv_heads):
    attn = CausalSelfAttention(32, heads, kv_heads).eval()
    x = torch.randn(3, 12, 32)  # a batch of three sequences
    full = attn(x)
    cache = attn.new_cache(batch_size=3, max_len=12)
    outs = [attn(x[:, :4], cache)]          # the prompt, all at once
    outs.append(attn(x[:, 4:7], cache))     # a block of three after a non-empty cache
    for t in range(7, 12):                  # then one token at a time
        outs.append(attn(x[:, t : t + 1], cache))
    torch.testing.assert_close(torch.cat(outs, dim=1), full, atol=1e-5, rtol=1e-5)
    assert cache.pos == 12
    # The explicit path agrees with a cache too.
    cache.reset()
    y0, _ = attn(x[:, :5], cache, need_weights=True)
    y1, w1 = attn(x[:, 5:6], cache, need_weights=True)
    torch.testing.assert_close(torch.cat([y0, y1], 1), full[:, :6], atol=1e-5, rtol=1e-5)
    assert w1.shape == (3, heads, 1, 6)


def test_cache_past_capacity_is_an_error_not_corruption():
    attn = CausalSelfAttention(16, 2).eval()
    cache = attn.new_cache(1, max_len=4)
    attn(torch.randn(1, 3, 16), cache)
    before = cache.k.clone()
    with pytest.raises(AttentionError, match=r"KVCache is full: it holds 3 of 4 positions and cannot take 2 more"):
        attn(torch.randn(1, 2, 16), cache)
    assert cache.pos == 3 and torch.equal(cache.k, before)
    with pytest.raises(AttentionError, match=r"KVCache holds \(batch, kv_heads, head_dim\)"):
        attn(torch.randn(2, 1, 16), cache)


def test_position_hook_sees_the_offset():
    starts = []

    def hook(q, k, start):
        starts.append((start, q.shape[2]))
        return q * 1.0, k * 1.0

    attn = CausalSelfAttention(16, 2, position_hook=hook).eval()
    cache = attn.new_cache(1, 8)
    attn(torch.randn(1, 5, 16), cache)
    attn(torch.randn(1, 1, 16), cache)
    attn(torch.randn(1, 2, 16), cache)
    assert starts == [(0, 5), (5, 1), (6, 2)]


def test_dropout_only_in_training():
    attn = CausalSelfAttention(16, 2, dropout=0.5)
    x = torch.randn(2, 6, 16)
    attn.eval()
    torch.testing.assert_close(attn(x), attn(x))
    attn.train()
    torch.manual_seed(1)
    a = attn(x)
    torch.manual_seed(2)
    assert not torch.allclose(a, attn(x))


def test_gradients_flow():
    attn = CausalSelfAttention(8, 2, 1).double()
    x = torch.randn(1, 4, 8, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: attn(inp), (x,))
    assert torch.autograd.gradcheck(lambda inp: attn(inp, need_weights=True)[0], (x,))
    attn(x).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in attn.parameters())


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=30, n_heads=4), "d_model=30 is not divisible by n_heads=4"),
        (dict(d_model=32, n_heads=4, n_kv_heads=3), "n_heads=4 is not divisible by n_kv_heads=3"),
        (dict(d_model=32, n_heads=0), "must be positive"),
        (dict(d_model=32, n_heads=4, dropout=1.0), r"dropout must be in \[0, 1\)"),
    ],
)
def test_bad_configuration(kwargs, match):
    with pytest.raises(AttentionError, match=match):
        CausalSelfAttention(**kwargs)


def test_bad_input_shape_and_cache_sizes():
    attn = CausalSelfAttention(16, 2)
    with pytest.raises(AttentionError, match=r"expected input of shape \(batch, time, 16\), got \(2, 5, 8\)"):
        attn(torch.randn(2, 5, 8))
    with pytest.raises(AttentionError, match="must be positive"):
        KVCache(1, 2, 0, 8)


def test_cache_dtype_follows_autocast_then_the_weights():
    attn = CausalSelfAttention(16, 2).eval()
    assert attn.new_cache(1, 4).k.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = attn.new_cache(1, 4)
        assert cache.k.dtype == torch.bfloat16
        y = attn(torch.randn(1, 3, 16), cache)
    assert y.dtype == torch.bfloat16 and cache.pos == 3
    assert attn.new_cache(1, 4, dtype=torch.float16).v.dtype == torch.float16
    assert attn.double().new_cache(1, 4).k.dtype == torch.float64


# -- rows that differ: padding masks, block masks and per-token positions ------------------------------


def test_attention_mask_for_a_padding_mask_is_causal_and_lets_pad_queries_see_themselves():
    pad = torch.tensor([[False, False, True, True], [True, True, True, True]])  # row 0: two pads on the left
    m = attention_mask_for(pad, 4, 4)
    assert m.shape == (2, 1, 4, 4)
    assert m[0, 0].int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]
    assert torch.equal(m[1, 0], causal_mask(4, 4))
    # 0/1 integers (Hugging Face's convention) mean the same; two new queries after two cached keys:
    assert torch.equal(attention_mask_for(pad.long(), 4, 4), m)
    assert attention_mask_for(pad, 2, 4)[0, 0].int().tolist() == [[0, 0, 1, 0], [0, 0, 1, 1]]


def test_attention_mask_for_a_block_mask_keeps_documents_apart_and_stays_causal():
    doc = torch.tensor([0, 0, 1, 1, 1])
    same = (doc[:, None] == doc[None, :])[None]  # (1, T, S): not causal by itself
    m = attention_mask_for(same, 5, 5)
    assert m[0, 0].int().tolist() == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 1, 1, 0], [0, 0, 1, 1, 1]]
    assert torch.equal(attention_mask_for(same[:, None], 5, 5), m)  # (B, 1, T, S) too


@pytest.mark.parametrize("mask, match", [
    (torch.ones(2, 5), r"padding mask \(bool or 0/1"),  # float
    (torch.ones(2, 4, dtype=torch.bool), r"\(batch, 5\) padding mask"),  # wrong S
    (torch.ones(2, 3, 4, dtype=torch.bool), r"boolean \(batch, 3, 5\)"),
    (torch.ones(2, 2, 3, 5, dtype=torch.bool), r"\(batch, 1, 3, 5\) mask, got torch.bool of shape \(2, 2, 3, 5\)"),
    ([[1, 1]], "attention_mask must be a tensor, got list"),
])
def test_attention_mask_for_refuses_what_it_cannot_read(mask, match):
    with pytest.raises(AttentionError, match=match):
        attention_mask_for(mask, 3, 5)


@pytest.mark.parametrize("heads, kv_heads", [(4, 4), (4, 2), (4, 1)])
def test_a_padding_mask_hides_the_pad_keys_on_both_paths(heads, kv_heads):
    attn = CausalSelfAttention(32, heads, kv_heads).eval()
    x = torch.randn(2, 7, 32)
    real = torch.ones(2, 7, dtype=torch.bool)
    real[0, :3] = False
    y = attn(x, attention_mask=real)
    y_explicit, w = attn(x, need_weights=True, attention_mask=real)
    assert torch.isfinite(y).all()
    torch.testing.assert_close(y, y_explicit, atol=1e-6, rtol=1e-5)
    assert (w[0, :, 3:, :3] == 0).all()  # real queries give pads no weight
    # The real tokens of row 0 compute what they compute without the padding.
    torch.testing.assert_close(y[0, 3:], attn(x[:1, 3:])[0], atol=1e-6, rtol=1e-5)
    # An all-true mask is plain causal attention.
    torch.testing.assert_close(attn(x, attention_mask=torch.ones(2, 7, dtype=torch.bool)), attn(x), atol=1e-6, rtol=1e-5)
    with pytest.raises(AttentionError, match="attention_mask is for a batch of 3 rows, but the input has 2"):
        attn(x, attention_mask=torch.ones(3, 7, dtype=torch.bool))


def test_positions_go_to_the_hook_instead_of_the_offset():
    seen = []

    def hook(q, k, start):
        seen.append(start)
        return q, k

    attn = CausalSelfAttention(16, 2, position_hook=hook).eval()
    positions = torch.tensor([[0, 0, 1], [0, 1, 2]])
    attn(torch.randn(2, 3, 16), positions=positions)
    assert seen[0] is positions
    with pytest.raises(AttentionError, match=r"positions must be a tensor of shape \(batch, time\) = \(2, 3\), got \(3,\)"):
        attn(torch.randn(2, 3, 16), positions=torch.arange(3))
