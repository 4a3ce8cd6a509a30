"""minillm.model: the parts against their formulas, parameter counts, causality, generation, config errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from minillm.rope import RotaryEmbedding
from minillm.model import LLM, PRESETS, ConfigError, ModelConfig, RMSNorm, SwiGLU, sample_next

torch.manual_seed(0)


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=24), **kw})


def test_rmsnorm_formula():
    norm = RMSNorm(6, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.arange(1.0, 7.0))
    x = torch.randn(3, 6)
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * torch.arange(1.0, 7.0)
    torch.testing.assert_close(norm(x), expected)
    # Unlike LayerNorm, it does not remove the mean: a constant vector keeps its sign.
    torch.testing.assert_close(RMSNorm(4)(torch.full((1, 4), 3.0)), torch.ones(1, 4), atol=1e-5, rtol=0)


def test_swiglu_formula():
    mlp = SwiGLU(8, 16)
    x = torch.randn(5, 8)
    gate, up, down = mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight
    silu = lambda z: z / (1 + torch.exp(-z))  # noqa: E731
    expected = (silu(x @ gate.T) * (x @ up.T)) @ down.T
    torch.testing.assert_close(mlp(x), expected, atol=1e-6, rtol=1e-5)


def closed_form_parameters(cfg: ModelConfig) -> int:
    C, V, L, F_, D, G = cfg.d_model, cfg.vocab_size, cfg.n_layers, cfg.ffn_dim, cfg.head_dim, cfg.n_kv_heads
    attn = 2 * C * C + 2 * C * G * D + (2 * C + 2 * G * D if cfg.bias else 0)
    if cfg.mlp == "swiglu":
        mlp = 3 * C * F_ + (2 * F_ + C if cfg.bias else 0)
    else:
        mlp = 2 * C * F_ + (F_ + C if cfg.bias else 0)
    norm = C + (C if cfg.norm == "layernorm" and cfg.bias else 0)
    n = V * C + L * (attn + mlp + 2 * norm) + norm
    n += 0 if cfg.tie_embeddings else V * C
    n += cfg.max_seq_len * C if cfg.position == "learned" else 0
    return n


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_parameter_counts_of_every_preset(name):
    cfg = ModelConfig.preset(name)
    with torch.device("meta"):  # a 7B model, inspected without allocating its memory
        model = LLM(cfg)
    assert model.num_parameters() == closed_form_parameters(cfg)
    assert all(p.is_meta for p in model.parameters())


def test_preset_sizes_are_what_their_names_say():
    counts = {}
    for name in PRESETS:
        with torch.device("meta"):
            counts[name] = LLM(ModelConfig.preset(name)).num_parameters()
    assert 120e6 < counts["gpt2-small"] < 130e6
    assert 300e6 < counts["llama-350m"] < 420e6
    assert 1.0e9 < counts["llama-1b"] < 1.2e9
    assert 3.0e9 < counts["llama-3b"] < 3.6e9
    assert 6.6e9 < counts["llama-7b"] < 6.9e9  # Llama 2 7B has 6.74B
    assert counts["tiny"] < 10e6


@pytest.mark.parametrize("variant", [{}, dict(norm="layernorm", mlp="gelu", position="learned", bias=True), dict(tie_embeddings=True)])
def test_counts_of_variants_and_flops(variant):
    cfg = tiny(**variant)
    model = LLM(cfg)
    assert model.num_parameters() == closed_form_parameters(cfg)
    n = model.num_parameters(exclude_embeddings=True) + (cfg.vocab_size * cfg.d_model if cfg.tie_embeddings else 0)
    assert model.flops_per_token(16) == 6 * n + 12 * cfg.n_layers * cfg.d_model * 16


def test_swiglu_width_rule():
    assert ModelConfig(d_model=768).ffn_dim == 2048  # 8/3 * 768, already a multiple of 64
    assert ModelConfig(d_model=1040, n_heads=8).ffn_dim == 2816  # 2773 rounded up to a multiple of 64
    assert ModelConfig(d_model=64, n_heads=4, mlp="gelu").ffn_dim == 256


@pytest.mark.parametrize("variant", [{}, dict(norm="layernorm", mlp="gelu", position="learned", bias=True)])
def test_the_whole_model_is_causal(variant):
    model = LLM(tiny(**variant)).eval()
    ids = torch.randint(0, 97, (2, 16))
    logits, _ = model(ids)
    for t in (0, 7, 14):
        changed = ids.clone()
        changed[:, t + 1 :] = torch.randint(0, 97, changed[:, t + 1 :].shape)
        torch.testing.assert_close(model(changed)[0][:, : t + 1], logits[:, : t + 1], atol=1e-5, rtol=1e-5)


def test_loss_and_initialization():
    cfg = tiny()
    model = LLM(cfg)
    ids = torch.randint(0, 97, (4, 16))
    logits, loss = model(ids[:, :-1], ids[:, 1:])
    assert logits.shape == (4, 15, 97)
    # At initialization the model is nearly uniform: loss close to ln(V).
    assert abs(loss.item() - math.log(97)) < 0.1
    torch.testing.assert_close(loss, F.cross_entropy(logits.reshape(-1, 97), ids[:, 1:].reshape(-1)))
    std = model.blocks[0].attn.o_proj.weight.std().item()
    assert abs(std - 0.02 / math.sqrt(2 * cfg.n_layers)) < 0.003
    assert abs(model.blocks[0].attn.q_proj.weight.std().item() - 0.02) < 0.003
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_tied_embeddings_share_storage():
    model = LLM(tiny(tie_embeddings=True))
    assert model.lm_head.weight.data_ptr() == model.token_embedding.weight.data_ptr()
    assert model.num_parameters() == LLM(tiny()).num_parameters() - 97 * 32


@pytest.mark.parametrize("variant", [{}, dict(position="learned", norm="layernorm", mlp="gelu", bias=True)])
def test_cached_generation_equals_recomputation(variant):
    model = LLM(tiny(**variant)).eval()
    prompt = torch.randint(0, 97, (3, 5))
    out = model.generate(prompt, 10, temperature=0)
    ids = prompt
    for _ in range(10):  # greedy decoding without a cache, the slow way
        logits, _ = model(ids)
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, ids)


def test_sampling_filters():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_next(logits, 1.0, top_k=2, generator=g) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}
    draws = torch.stack([sample_next(logits, 1.0, top_p=0.5, generator=g) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0}  # token 0 alone has probability 0.64 >= 0.5
    draws = torch.stack([sample_next(logits, 1.0, top_p=0.8, generator=g) for _ in range(300)])
    assert set(draws.flatten().tolist()) == {0, 1}  # 0.64 < 0.8 <= 0.64 + 0.24
    assert sample_next(logits, 0.0).item() == 0
    hot = torch.stack([sample_next(logits, 100.0, generator=g) for _ in range(500)])
    assert len(set(hot.flatten().tolist())) == 5  # a high temperature flattens the distribution


def test_generation_stops_at_eos_and_checks_its_arguments():
    model = LLM(tiny()).eval()
    prompt = torch.randint(0, 97, (2, 3))
    first = model.generate(prompt, 1, temperature=0)[:, -1]
    out = model.generate(prompt, 10, temperature=0, eos_id=int(first[0]))
    assert out[0, 3].item() == first[0].item() and (out[0, 3:] == first[0]).all()
    with pytest.raises(ValueError, match="feeds 32 positions through the model, which exceeds the context of 24 tokens"):
        model.generate(prompt, 30)
    with pytest.raises(ValueError, match="top_p must be in"):
        model.generate(prompt, 2, top_p=0.0)
    with pytest.raises(ValueError, match="context is 24"):
        model(torch.randint(0, 97, (1, 25)))


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(d_model=30, n_heads=4), "d_model=30 must be divisible by n_heads=4"),
        (dict(n_heads=4, n_kv_heads=3), "n_heads=4 must be divisible by n_kv_heads=3"),
        (dict(vocab_size=0), "vocab_size must be a positive integer"),
        (dict(norm="batchnorm"), "norm must be 'rmsnorm' or 'layernorm'"),
        (dict(mlp="relu"), "mlp must be"),
        (dict(position="alibi"), "position must be"),
        (dict(d_model=24, n_heads=8), "even head dimension"),
        (dict(dropout=1.5), "dropout must be in"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**kwargs)


def test_config_round_trip_and_unknown_fields():
    cfg = ModelConfig.preset("tiny", n_layers=2)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg and cfg.n_layers == 2
    with pytest.raises(ConfigError, match=r"unknown config field\(s\) \['n_layer'\]"):
        ModelConfig.from_dict({**cfg.to_dict(), "n_layer": 3})
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        ModelConfig.preset("huge")


def test_generation_fills_the_context_exactly():
    # A prompt of T tokens and n new ones feed T + n - 1 positions: the last token is never fed back.
    model = LLM(tiny()).eval()
    full = torch.randint(0, 97, (1, 24))
    assert model.generate(full, 1, temperature=0).shape == (1, 25)
    assert model.generate(full[:, :20], 5, temperature=0).shape == (1, 25)
    with pytest.raises(ValueError, match="feeds 25 positions"):
        model.generate(full[:, :20], 6)
    assert torch.equal(model.generate(full, 0), full)
    sizes = []
    real = model.new_caches
    model.new_caches = lambda b, n, dtype=None: sizes.append(n) or real(b, n, dtype)
    model.generate(full[:, :10], 7, temperature=0)
    assert sizes == [16]


def test_generate_restores_the_training_flag_even_after_an_error():
    model = LLM(tiny()).train()

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    model._logits = boom
    with pytest.raises(RuntimeError, match="interrupted"):
        model.generate(torch.zeros(1, 3, dtype=torch.long), 4)
    assert model.training
    del model._logits
    model.eval().generate(torch.zeros(1, 3, dtype=torch.long), 2)
    assert not model.training


def test_last_only_logits_equal_the_last_row():
    model = LLM(tiny()).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        full, _ = model(ids)
        last, _ = model(ids, last_only=True)
    assert last.shape == (2, 1, 97)
    torch.testing.assert_close(last[:, 0], full[:, -1], atol=1e-6, rtol=1e-6)


def test_a_loss_with_every_target_ignored_is_zero_not_nan():
    model = LLM(tiny())
    ids = torch.randint(0, 97, (2, 6))
    _, loss = model(ids, torch.full_like(ids, -100))
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is not None and not p.grad.any() for p in model.parameters())
    # Partly ignored: the mean over the targets that count.
    targets = ids.clone()
    targets[:, :3] = -100
    logits, loss = model(ids, targets)
    torch.testing.assert_close(loss, F.cross_entropy(logits[:, 3:].reshape(-1, 97), ids[:, 3:].reshape(-1)))


@pytest.mark.parametrize("tied", [False, True])
def test_meta_construction_then_to_empty_and_reset_parameters(tied):
    torch.manual_seed(5)
    normal = LLM(tiny(tie_embeddings=tied)).eval()
    with torch.device("meta"):
        model = LLM(tiny(tie_embeddings=tied))
    model.to_empty(device="cpu")
    model.reset_parameters()
    model.eval()
    assert len(list(model.parameters())) == len(list(normal.parameters()))
    assert (model.lm_head.weight is model.token_embedding.weight) == tied
    assert torch.equal(model.rope.cos, normal.rope.cos)
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        assert torch.isfinite(model(ids)[0]).all()
        model.load_state_dict(normal.state_dict())
        assert torch.equal(model(ids)[0], normal(ids)[0])
    assert (model.lm_head.weight is model.token_embedding.weight) == tied


@pytest.mark.parametrize("tied", [False, True])
def test_meta_construction_then_load_state_dict_assign(tied):
    normal = LLM(tiny(tie_embeddings=tied)).eval()
    with torch.device("meta"):
        model = LLM(tiny(tie_embeddings=tied))
    model.load_state_dict({k: v.clone() for k, v in normal.state_dict().items()}, assign=True)
    model.eval()
    assert (model.lm_head.weight is model.token_embedding.weight) == tied
    assert len(list(model.parameters())) == len(list(normal.parameters()))
    assert not any(t.is_meta for t in [*model.parameters(), *model.buffers()])
    ids = torch.randint(0, 97, (2, 10))
    with torch.no_grad():
        assert torch.equal(model(ids)[0], normal(ids)[0])


def test_a_tied_model_refuses_two_different_matrices():
    untied = LLM(tiny())
    tied = LLM(tiny(tie_embeddings=True))
    with pytest.raises(ConfigError, match="differs from token_embedding.weight, but the model ties them"):
        tied.load_state_dict(untied.state_dict())


def test_float64_models_compute_in_float64():
    torch.manual_seed(2)
    model = LLM(tiny()).double().eval()
    assert model.rope.cos.dtype == torch.float32  # one defined dtype for the tables
    x = torch.randn(2, 5, 32, dtype=torch.float64)
    norm = model.blocks[0].input_norm
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + norm.eps)
    torch.testing.assert_close(norm(x), expected, atol=1e-14, rtol=1e-14)  # not rounded through float32
    ids = torch.randint(0, 97, (2, 10))
    logits = model(ids)[0]
    assert logits.dtype == torch.float64
    ref = LLM(tiny()).eval()
    ref.load_state_dict(model.state_dict())
    torch.testing.assert_close(ref(ids)[0].double(), logits, atol=1e-5, rtol=0)
    # bf16 does not round the rotary tables.
    assert LLM(tiny()).to(torch.bfloat16).rope.cos.dtype == torch.float32


def test_kv_cache_takes_the_autocast_dtype():
    model = LLM(tiny()).eval()
    assert model.new_caches(1, 8)[0].k.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        caches = model.new_caches(1, 8)
        assert caches[0].k.dtype == torch.bfloat16
        out = model.generate(torch.randint(0, 97, (1, 4)), 3, temperature=0)
    assert out.shape == (1, 7)
    assert model.new_caches(1, 8, dtype=torch.float16)[0].k.dtype == torch.float16


def test_sampling_with_a_generator_matches_its_device():
    logits = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])
    g1, g2 = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    a = [sample_next(logits, 1.0, generator=g1).item() for _ in range(20)]
    b = [sample_next(logits, 1.0, generator=g2).item() for _ in range(20)]
    assert a == b


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(vocab_size=True), r"vocab_size must be a positive integer, got True \(bool\)"),
        (dict(d_ff=10.5), r"d_ff must be a positive integer, got 10.5 \(float\)"),
        (dict(n_kv_heads="2"), r"n_kv_heads must be a positive integer, got '2' \(str\)"),
        (dict(norm_eps=float("nan")), "norm_eps must be a finite real number"),
        (dict(tie_embeddings=1), "tie_embeddings must be True or False"),
        (dict(rope_factor=2.0), "rope_factor=2.0 has no effect without rope_scaling"),
        (dict(rope_theta=1.0), "rope_theta must be greater than 1"),
    ],
)
def test_config_types(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**kwargs)


def test_numpy_scalars_are_accepted_as_numbers():
    np = pytest.importorskip("numpy")
    cfg = tiny(d_model=np.int64(32), dropout=np.float32(0.0))
    assert type(cfg.d_model) is int and type(cfg.dropout) is float


# -- positions per token (left-padded batches, packed documents) ----------------------------------


def test_per_token_rotary_positions_rotate_exactly_as_the_offset_does():
    rope = RotaryEmbedding(8, 32)
    q, k = torch.randn(2, 3, 5, 8), torch.randn(2, 1, 5, 8)
    # The same positions as an offset of 4, given token by token: the same bits.
    at = rope(q, k, torch.arange(4, 9).expand(2, 5))
    assert all(torch.equal(a, b) for a, b in zip(at, rope(q, k, 4)))
    # Rows at different places: each row as if it were alone.
    rq, rk = rope(q, k, torch.stack([torch.arange(0, 5), torch.arange(7, 12)]))
    for row, start in ((0, 0), (1, 7)):
        aq, ak = rope(q[row : row + 1], k[row : row + 1], start)
        assert torch.equal(rq[row : row + 1], aq) and torch.equal(rk[row : row + 1], ak)


def test_per_token_positions_grow_the_tables_of_a_long_context():
    rope = RotaryEmbedding(8, 10_000)
    assert rope.cos.shape[0] == 4096  # built eagerly up to here
    q = torch.randn(1, 1, 2, 8)
    got = rope(q, q, torch.tensor([[5000, 5001]]))
    assert rope.cos.shape[0] >= 5002
    assert torch.equal(got[0], RotaryEmbedding(8, 10_000)(q, q, 5000)[0])


@pytest.mark.parametrize("variant", [{}, dict(position="learned")])
def test_default_positions_given_explicitly_change_nothing(variant):
    model = LLM(tiny(**variant)).eval()
    ids = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        assert torch.equal(model(ids, positions=torch.arange(9).expand(2, 9))[0], model(ids)[0])


@pytest.mark.parametrize("positions, match", [
    (torch.arange(5.0).expand(2, 5), "positions must be an int64 tensor of shape"),
    (torch.arange(4).expand(2, 4), r"positions must have the shape of the ids, \(2, 5\), got \(2, 4\)"),
    (torch.tensor([[0, 1, 2, 3, 24]] * 2), r"positions must be in \[0, 24\) for the model's context of 24 tokens, got values from 0 to 24"),
    (torch.tensor([[-1, 0, 1, 2, 3]] * 2), "got values from -1 to 3"),
])
def test_bad_positions(positions, match):
    with pytest.raises(ValueError, match=match):
        LLM(tiny())(torch.zeros(2, 5, dtype=torch.long), positions=positions)
