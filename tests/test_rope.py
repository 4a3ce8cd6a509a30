"""minillm.rope: the relative-position property, the two layouts, offsets for the cache, scaling."""

from __future__ import annotations

import pytest
import torch

from minillm.attention import CausalSelfAttention
from minillm.rope import RopeError, RotaryEmbedding, apply_rotary, rope_frequencies

torch.manual_seed(0)


@pytest.mark.parametrize("interleaved", [False, True])
def test_dot_product_depends_only_on_distance(interleaved):
    D = 16
    freqs = rope_frequencies(D)
    q, k = torch.randn(D, dtype=torch.float64), torch.randn(D, dtype=torch.float64)

    def score(m, n):
        qm = apply_rotary(q[None], torch.tensor([m]), freqs.double(), interleaved)[0]
        kn = apply_rotary(k[None], torch.tensor([n]), freqs.double(), interleaved)[0]
        return (qm @ kn).item()

    for distance in (0, 1, 7, 50):
        values = [score(m + distance, m) for m in (0, 3, 100, 1000)]
        assert max(values) - min(values) < 1e-9
    assert abs(score(5, 5) - (q @ k).item()) < 1e-9  # no rotation at distance 0


def test_rotation_preserves_norms_and_position_zero_is_identity():
    rope = RotaryEmbedding(8, 32)
    x = torch.randn(2, 3, 32, 8)
    rq, rk = rope(x, x, 0)
    torch.testing.assert_close(rq.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(rq[:, :, 0], x[:, :, 0])


def test_layouts_are_the_same_rotation_under_a_permutation():
    D, T = 12, 20
    x = torch.randn(2, T, D)
    positions = torch.arange(T)
    freqs = rope_frequencies(D)
    # Interleaved pairs (0,1), (2,3), ... become split-half pairs (0, D/2), (1, D/2+1), ... under perm.
    perm = torch.cat([torch.arange(0, D, 2), torch.arange(1, D, 2)])
    halves = apply_rotary(x[..., perm], positions, freqs, interleaved=False)
    inter = apply_rotary(x, positions, freqs, interleaved=True)
    torch.testing.assert_close(halves, inter[..., perm])


def test_cached_tables_match_the_reference_and_offsets():
    rope = RotaryEmbedding(16, 64, theta=500.0)
    q, k = torch.randn(1, 2, 10, 16), torch.randn(1, 2, 10, 16)
    rq, rk = rope(q, k, start=5)
    torch.testing.assert_close(rq, apply_rotary(q, torch.arange(5, 15), rope_frequencies(16, 500.0)))
    # Rotating a suffix with the right offset equals rotating the whole and slicing.
    whole_q, _ = rope(torch.cat([torch.randn(1, 2, 5, 16), q], 2), torch.cat([torch.randn(1, 2, 5, 16), k], 2), 0)
    torch.testing.assert_close(whole_q[:, :, 5:], rq)


def test_rope_with_the_kv_cache():
    rope = RotaryEmbedding(8, 32)
    attn = CausalSelfAttention(32, 4, 2, position_hook=rope).eval()
    x = torch.randn(2, 12, 32)
    full = attn(x)
    cache = attn.new_cache(2, 12)
    steps = [attn(x[:, :5], cache)] + [attn(x[:, t : t + 1], cache) for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)


def test_attention_with_rope_sees_order():
    rope = RotaryEmbedding(8, 16)
    with_rope = CausalSelfAttention(16, 2, position_hook=rope).eval()
    x = torch.randn(1, 4, 16)
    swapped = x[:, [1, 0, 2, 3]]
    assert not torch.allclose(with_rope(x)[0, -1], with_rope(swapped)[0, -1], atol=1e-5)
    plain = CausalSelfAttention(16, 2).eval()
    plain.load_state_dict(with_rope.state_dict())
    torch.testing.assert_close(plain(x)[0, -1], plain(swapped)[0, -1])


def test_scaling():
    base = rope_frequencies(64, 10000.0)
    torch.testing.assert_close(rope_frequencies(64, 10000.0, "linear", 4.0), base / 4)
    ntk = rope_frequencies(64, 10000.0, "ntk", 4.0)
    assert abs(ntk[0].item() - 1.0) < 1e-6  # the highest frequency is untouched
    assert abs((base[-1] / ntk[-1]).item() - 4.0) < 1e-3  # the lowest is divided by the factor


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: rope_frequencies(7), "head_dim must be even"),
        (lambda: rope_frequencies(8, 1.0), "theta must be greater than 1"),
        (lambda: rope_frequencies(8, scaling="yarn"), "scaling must be"),
        (lambda: rope_frequencies(8, scaling="linear", factor=0.5), "at least 1"),
        (lambda: RotaryEmbedding(8, 0), "max_seq_len must be positive"),
    ],
)
def test_bad_configuration(make, match):
    with pytest.raises(RopeError, match=match):
        make()


def test_positions_past_the_table():
    rope = RotaryEmbedding(8, 10)
    with pytest.raises(RopeError, match=r"positions 8..11 are past the rotary tables, which end at 9"):
        rope(torch.randn(1, 1, 4, 8), torch.randn(1, 1, 4, 8), start=8)


def test_tables_stay_float32_whatever_to_does():
    fresh = RotaryEmbedding(8, 32)
    for convert in (lambda r: r.to(torch.bfloat16), lambda r: r.half(), lambda r: r.double(), lambda r: r.to("cpu")):
        rope = convert(RotaryEmbedding(8, 32))
        assert rope.cos.dtype == rope.sin.dtype == torch.float32
        assert torch.equal(rope.cos, fresh.cos) and torch.equal(rope.sin, fresh.sin)
    assert "cos" not in fresh.state_dict()


def test_rotation_runs_in_the_promoted_dtype():
    rope = RotaryEmbedding(8, 32)
    q = torch.randn(1, 2, 5, 8, dtype=torch.float64)
    rq, rk = rope(q, q, start=3)
    assert rq.dtype == rk.dtype == torch.float64
    r32, _ = rope(q.float(), q.float(), start=3)
    assert not torch.equal(rq, r32.double())  # float64 inputs are not rounded through float32
    torch.testing.assert_close(rq.float(), r32)
    rb, _ = rope(q.bfloat16(), q.bfloat16(), start=3)
    assert rb.dtype == torch.bfloat16


def test_tables_grow_on_demand_and_never_from_an_untrusted_length():
    rope = RotaryEmbedding(8, 10**9)  # a config could claim any context: nothing that size is built
    assert rope.cos.shape == (4096, 4)
    q = torch.randn(1, 1, 3, 8)
    rq, _ = rope(q, q, start=10_000)
    assert 10_003 <= rope.cos.shape[0] <= 2 * 10_003
    torch.testing.assert_close(rq, apply_rotary(q, torch.arange(10_000, 10_003), rope_frequencies(8)), atol=2e-3, rtol=0)
    # Growing changes no existing row: every length gives the same values for the same positions.
    assert torch.equal(rope.cos[:4096], RotaryEmbedding(8, 10**9).cos)
    small = RotaryEmbedding(8, 20)
    assert small.cos.shape[0] == 20
    with pytest.raises(RopeError, match="past the rotary tables"):
        rope(q, q, start=10**9 - 2)


def test_meta_construction_then_to_empty_gives_real_tables():
    with torch.device("meta"):
        rope = RotaryEmbedding(8, 32)
    assert rope.cos.is_meta
    rope.to_empty(device="cpu")
    fresh = RotaryEmbedding(8, 32)
    assert torch.equal(rope.cos, fresh.cos) and torch.equal(rope.sin, fresh.sin)
    # A module left on meta builds its tables where the first call happens.
    with torch.device("meta"):
        lazy = RotaryEmbedding(8, 32)
    q = torch.randn(1, 1, 4, 8)
    assert torch.equal(lazy(q, q)[0], fresh(q, q)[0])
