"""minillm.lora: adapters start as the base, train alone, merge to the same logits, count as r (in + out),
save and load to the bit, and refuse what does not fit (wrong rank, shape, tensors, file, base)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minillm.generate import generate
from minillm.lora import (
    ATTENTION_TARGETS,
    DEFAULT_TARGETS,
    GELU_TARGETS,
    LoRAError,
    LoRALinear,
    apply_lora,
    count_parameters,
    fingerprint,
    load_adapter,
    lora_layers,
    lora_state_dict,
    merge_lora,
    save_adapter,
    targets_for,
    trainable_parameters,
)
from minillm.model import LLM, ModelConfig

GPT2_STYLE = dict(norm="layernorm", mlp="gelu", position="learned", bias=True)


def tiny(**kw) -> ModelConfig:
    # n_kv_heads=2 < n_heads=4: grouped-query attention, so k_proj and v_proj are narrower than q_proj.
    return ModelConfig(**{**dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=24), **kw})


def base_model(seed: int = 0, **kw) -> LLM:
    torch.manual_seed(seed)
    model = LLM(tiny(**kw))
    with torch.no_grad():  # larger weights than the initialization: logits that differ visibly between models
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def batch(seed: int = 1, B: int = 3, T: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (B, T + 1), generator=g)
    return ids[:, :-1], ids[:, 1:]


def randomize_adapters(model: nn.Module, seed: int = 2, std: float = 0.2) -> None:
    """B = 0 makes every adapter a no-op; give A and B values so that the adapters matter."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_A.copy_(torch.randn(layer.lora_A.shape, generator=g) * std)
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * std)


def lora_model(rank: int = 4, seed: int = 0, **kw) -> LLM:
    model = base_model(seed, **kw)
    apply_lora(model, rank)
    randomize_adapters(model)
    return model


# --------------------------------------------------------------------------------------------
# One layer


def test_layer_formula_and_properties():
    torch.manual_seed(0)
    base = nn.Linear(12, 7)
    layer = LoRALinear(base, rank=3, alpha=6.0)
    assert layer.base is base and layer.scale == 2.0
    assert (layer.in_features, layer.out_features) == (12, 7)
    assert layer.weight is base.weight and layer.bias is base.bias
    assert layer.lora_A.shape == (3, 12) and layer.lora_B.shape == (7, 3)
    assert not base.weight.requires_grad and not base.bias.requires_grad
    # A as nn.Linear initializes a weight: uniform in +-1/sqrt(in_features).
    assert layer.lora_A.abs().max() <= 12**-0.5 and layer.lora_A.std() > 0.1
    assert torch.count_nonzero(layer.lora_B) == 0
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 12)
    expected = x @ base.weight.T + base.bias + 2.0 * (x @ layer.lora_A.T) @ layer.lora_B.T
    torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(layer.merged_weight(), base.weight + 2.0 * layer.lora_B @ layer.lora_A)
    assert "rank=3" in repr(layer) and "scale=2" in repr(layer)


def test_layer_merged_weight_in_bf16_is_computed_in_float32():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16, bias=False).to(torch.bfloat16), rank=2)
    assert layer.lora_A.dtype == torch.bfloat16
    with torch.no_grad():
        layer.lora_B.normal_()
    merged = layer.merged_weight()
    exact = layer.base.weight.float() + layer.lora_B.float() @ layer.lora_A.float()
    assert merged.dtype == torch.bfloat16
    assert torch.equal(merged, exact.to(torch.bfloat16))  # one rounding, at the end


def test_dropout_touches_the_adapter_input_only():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(32, 32), rank=4, dropout=0.5)
    x = torch.randn(8, 32)
    layer.train()
    # B = 0: the adapter adds nothing, so dropout on its input cannot change the output.
    assert torch.equal(layer(x), layer.base(x))
    with torch.no_grad():
        layer.lora_B.normal_()
    assert not torch.equal(layer(x), layer(x))  # two dropout masks
    layer.eval()
    assert torch.equal(layer(x), layer(x))


# --------------------------------------------------------------------------------------------
# A model


def test_starts_bit_equal_to_the_base():
    model = base_model()
    ids, _ = batch()
    before, _ = model(ids)
    names = apply_lora(model, rank=4)
    after, _ = model(ids)
    # B = 0, so the adapter adds exactly +0.0 to every output: equal to the bit, not just close.
    assert torch.equal(before, after)
    assert not any(m.training for m in lora_layers(model).values())  # in eval mode, like the model
    assert names[:7] == [f"blocks.0.attn.{n}" for n in ATTENTION_TARGETS] + [f"blocks.0.mlp.{n}" for n in
                                                                              ("gate_proj", "up_proj", "down_proj")]
    assert len(names) == 2 * 7 and set(lora_layers(model)) == set(names)
    assert not any("lm_head" in n or "embedding" in n for n in names)


def test_only_adapters_train_and_base_stays_bit_identical():
    model = base_model()
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    apply_lora(model, rank=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith((".lora_A", ".lora_B")) for n in trainable)
    assert len(trainable) == 2 * 2 * 7
    # Every parameter goes to the optimizer: freezing (no gradient) is what keeps the base still.
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    ids, targets = batch()
    model.train()
    losses = []
    for _ in range(5):
        _, loss = model(ids, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05, losses
    for key, value in model.state_dict().items():
        if not key.endswith((".lora_A", ".lora_B")):
            assert torch.equal(value, base_state[key.replace(".base.", ".")]), key
    assert all(p.grad is None for n, p in model.named_parameters() if not n.endswith((".lora_A", ".lora_B")))


def test_gradient_of_A_is_zero_at_init_and_of_B_is_not():
    model = base_model()
    apply_lora(model, rank=4)
    ids, targets = batch()
    _, loss = model(ids, targets)
    loss.backward()
    for name, layer in lora_layers(model).items():
        # The update is s * x A^T B^T. Its gradient with respect to A passes through B: dL/dA =
        # s * B^T G^T X (G = dL/dy, X the inputs), which is 0 while B = 0. Its gradient with respect
        # to B is s * G^T (X A^T): A is random, so it is not zero, and B moves first; A follows from
        # the second step. (Had both started at zero, neither would ever move.)
        assert torch.count_nonzero(layer.lora_A.grad) == 0, name
        assert layer.lora_B.grad.abs().max() > 0, name
        assert layer.base.weight.grad is None


def adapter_parameters_by_hand(cfg: ModelConfig, rank: int) -> int:
    C, F_, L = cfg.d_model, cfg.ffn_dim, cfg.n_layers
    q_out = cfg.n_heads * cfg.head_dim
    kv_out = cfg.n_kv_heads * cfg.head_dim  # grouped-query attention: narrower k and v
    shapes = [(C, q_out), (C, kv_out), (C, kv_out), (q_out, C)]  # (in, out) of q, k, v, o
    shapes += [(C, F_), (F_, C)] if cfg.mlp == "gelu" else [(C, F_), (C, F_), (F_, C)]
    return L * sum(rank * (fan_in + fan_out) for fan_in, fan_out in shapes)


@pytest.mark.parametrize("variant", [{}, GPT2_STYLE, dict(tie_embeddings=True), dict(n_kv_heads=1)])
@pytest.mark.parametrize("rank", [1, 4])
def test_parameter_count_is_rank_times_in_plus_out(variant, rank):
    model = base_model(**variant)
    total = model.num_parameters()
    assert count_parameters(model) == (total, total)
    apply_lora(model, rank)
    expected = adapter_parameters_by_hand(model.cfg, rank)
    assert trainable_parameters(model) == expected
    assert count_parameters(model) == (expected, total + expected)
    assert sum(t.numel() for t in lora_state_dict(model).values()) == expected
    if model.cfg.tie_embeddings:
        assert model.lm_head.weight is model.token_embedding.weight


def test_merge_gives_the_logits_of_the_unmerged_model():
    model = lora_model()
    ids, _ = batch()
    plain, _ = base_model()(ids)
    unmerged, _ = model(ids)
    assert (unmerged - plain).abs().max() > 0.1  # the adapters matter, so the comparison means something
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert merge_lora(model) is model
    merged, _ = model(ids)
    assert not lora_layers(model) and all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    # Merging computes x (W + s B A)^T instead of x W^T + s (x A^T) B^T: the same numbers, rounded in
    # another order, so the difference is float32 rounding, of the size of the model's own rounding
    # error. Measured against the same model in float64: the float32 logits (up to ~2) are off by
    # 1.4e-6, merged and unmerged differ by 1.9e-6 (8 ulp at 2). Hence: within 4x the model's own
    # error, and atol 1e-5, which is still 1e4 times smaller than what the adapters change (> 0.1).
    reference, _ = lora_model().double()(ids)
    own_error = (unmerged.double() - reference).abs().max().item()
    assert (merged - unmerged).abs().max().item() <= 4 * own_error
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    # A plain model again: the keys of a model that never had adapters, and the base tensors untouched.
    assert model.state_dict().keys() == LLM(tiny()).state_dict().keys()
    assert torch.equal(state["blocks.0.attn.q_proj.base.weight"], base_model().state_dict()["blocks.0.attn.q_proj.weight"])
    assert not any(p.requires_grad for p in model.parameters())  # frozen as the base was


def test_merge_with_biases_and_gelu_mlp():
    model = lora_model(**GPT2_STYLE)
    ids, _ = batch()
    unmerged, _ = model(ids)
    bias = model.blocks[1].mlp.down_proj.bias.clone()
    merge_lora(model)
    assert torch.equal(model.blocks[1].mlp.down_proj.bias, bias)
    torch.testing.assert_close(model(ids)[0], unmerged, atol=1e-5, rtol=1e-5)


def test_generation_with_adapters_uses_the_kv_cache():
    model = lora_model()
    prompt = [[5, 6, 7, 8], [1, 2]]
    out = generate(model, prompt, max_new_tokens=6, temperature=0)
    assert [len(r) for r in out] == [6, 6]
    # Greedy decoding with the cache equals greedy decoding by recomputing the whole sequence.
    for row, new in zip(prompt, out):
        seq = list(row)
        for _ in range(6):
            logits, _ = model(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
        assert seq[len(row):] == new
    ids = torch.tensor([prompt[0]])
    assert model.generate(ids, 6, temperature=0)[0, 4:].tolist() == out[0]
    # The adapters change what is generated (else this test would not be about them).
    assert generate(base_model(), prompt, max_new_tokens=6, temperature=0) != out


def test_gpt2_style_model_with_explicit_targets():
    model = base_model(**GPT2_STYLE)
    with pytest.raises(LoRAError, match=r"\['gate_proj'\] match no nn.Linear.*up_proj.*targets_for"):
        apply_lora(model, 2, targets=DEFAULT_TARGETS)
    assert not lora_layers(model)  # nothing changed
    names = apply_lora(model, 2, targets=ATTENTION_TARGETS + GELU_TARGETS)
    assert targets_for(model.cfg) == ATTENTION_TARGETS + GELU_TARGETS
    assert len(names) == 2 * 6 and lora_layers(model)["blocks.0.attn.q_proj"].bias is not None
    # The default picks the same ones: the names of DEFAULT_TARGETS this model has.
    other = base_model(**GPT2_STYLE)
    assert apply_lora(other, 2) == names


def test_paper_choice_query_and_value_only():
    model = base_model()
    names = apply_lora(model, 8, alpha=16, targets=("q_proj", "v_proj"))
    assert names == ["blocks.0.attn.q_proj", "blocks.0.attn.v_proj", "blocks.1.attn.q_proj", "blocks.1.attn.v_proj"]
    assert lora_layers(model)["blocks.1.attn.v_proj"].scale == 2.0


@pytest.mark.parametrize("kwargs, match", [
    (dict(rank=0), "rank must be a positive integer"),
    (dict(rank=-2), "rank must be a positive integer"),
    (dict(rank=2.0), "rank must be a positive integer"),
    (dict(rank=True), "rank must be a positive integer"),
    (dict(rank=4, alpha=0), "alpha must be a positive"),
    (dict(rank=4, alpha=-1.0), "alpha must be a positive"),
    (dict(rank=4, alpha=float("nan")), "alpha must be a positive"),
    (dict(rank=4, dropout=1.0), r"dropout must be in \[0, 1\)"),
    (dict(rank=4, targets=["qproj"]), r"\['qproj'\] match no nn.Linear.*'q_proj', 'k_proj'"),
    (dict(rank=4, targets=[]), "targets is empty"),
    (dict(rank=4, targets=["lm_head"]), "output layer"),
    (dict(rank=4, targets=[3]), "must be layer names"),
])
def test_apply_lora_errors(kwargs, match):
    model = base_model()
    with pytest.raises(LoRAError, match=match):
        apply_lora(model, **kwargs)
    assert not lora_layers(model) and all(p.requires_grad for p in model.parameters())


def test_apply_twice_and_merge_nothing_are_refused():
    model = base_model()
    apply_lora(model, 4)
    with pytest.raises(LoRAError, match=r"already has LoRA adapters \(14 layers, rank 4\).*merge_lora"):
        apply_lora(model, 2)
    merge_lora(model)
    apply_lora(model, 2)  # after merging, new adapters may go on top
    with pytest.raises(LoRAError, match="no LoRA adapters to merge"):
        merge_lora(base_model())


# --------------------------------------------------------------------------------------------
# Adapter files


def test_save_load_round_trip_is_bit_equal(tmp_path):
    model = lora_model(rank=4)
    ids, _ = batch()
    expected, _ = model(ids)
    path = save_adapter(tmp_path / "adapter.safetensors", model, base_fingerprint=fingerprint(model))
    assert path.stat().st_size < 60_000  # the adapters only, not the model
    assert [p.name for p in tmp_path.iterdir()] == ["adapter.safetensors"]  # no temporary file left
    fresh = base_model()
    load_adapter(path, fresh)
    got, _ = fresh(ids)
    assert torch.equal(got, expected)
    assert trainable_parameters(fresh) == trainable_parameters(model)
    # The file says how it was made, and holds nothing but the adapters.
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta, keys = f.metadata(), set(f.keys())
    assert meta["rank"] == "4" and float(meta["alpha"]) == 4.0
    assert json.loads(meta["targets"]) == list(DEFAULT_TARGETS)
    assert json.loads(meta["modules"]) == list(lora_layers(model))
    assert keys == set(lora_state_dict(model))
    # Loading into a model that has the same adapters replaces their values.
    again = base_model()
    apply_lora(again, 4)
    load_adapter(path, again)
    assert torch.equal(again(ids)[0], expected)


def test_round_trip_gpt2_style_with_alpha_and_dropout(tmp_path):
    model = base_model(**GPT2_STYLE)
    apply_lora(model, 3, alpha=12, dropout=0.1, targets=["q_proj", "v_proj", "down_proj"])
    randomize_adapters(model)
    save_adapter(tmp_path / "a.safetensors", model)
    fresh = base_model(**GPT2_STYLE)
    load_adapter(tmp_path / "a.safetensors", fresh)
    layer = lora_layers(fresh)["blocks.1.mlp.down_proj"]
    assert (layer.rank, layer.alpha, layer.dropout.p) == (3, 12.0, 0.1)
    ids, _ = batch()
    assert torch.equal(fresh(ids)[0], model(ids)[0])


def test_fingerprint_is_the_same_with_and_without_adapters():
    model = base_model()
    before = fingerprint(model)
    apply_lora(model, 4)
    randomize_adapters(model)
    assert fingerprint(model) == before  # the adapters are not the base
    assert fingerprint(base_model(seed=1)) != before
    merge_lora(model)
    assert fingerprint(model) != before  # merged: another base


def saved(tmp_path, model=None, **kw):
    model = model if model is not None else lora_model(rank=4)
    return save_adapter(tmp_path / "adapter.safetensors", model, **kw)


def check_refused(path, model, match):
    """The load fails with LoRAError, and leaves the model without adapters, as it was."""
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoRAError, match=match):
        load_adapter(path, model)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_load_rejects_a_wrong_fingerprint(tmp_path):
    model = lora_model()
    path = saved(tmp_path, model, base_fingerprint=fingerprint(model))
    check_refused(path, base_model(seed=1), "trained on another base model.*fingerprint")
    with pytest.raises(LoRAError, match="the base_fingerprint you passed"):
        load_adapter(path, base_model(), base_fingerprint="not-the-one")
    # A file without a fingerprint cannot be checked against one the caller gives.
    bare = save_adapter(tmp_path / "bare.safetensors", model)
    with pytest.raises(LoRAError, match="records no base fingerprint"):
        load_adapter(bare, base_model(), base_fingerprint=fingerprint(model))


def test_load_rejects_another_d_model(tmp_path):
    path = saved(tmp_path)
    check_refused(path, base_model(d_model=48, n_heads=4), r"has shape \(4, 32\), but this model needs \(4, 48\).*d_model")


def test_load_rejects_another_rank(tmp_path):
    path = saved(tmp_path)  # rank 4
    model = base_model()
    apply_lora(model, 2)
    with pytest.raises(LoRAError, match=r"\(rank, alpha\) = \[\(2, 2.0\)\].*file's \(4, 4\)"):
        load_adapter(path, model)


def test_load_rejects_another_depth(tmp_path):
    path = saved(tmp_path)  # 2 layers
    check_refused(path, base_model(n_layers=3), "adapts 14 layers.*select 21")


def test_load_rejects_a_missing_tensor(tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = saved(tmp_path)
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys() if k != "blocks.1.mlp.up_proj.lora_B"}
    save_file(tensors, str(path), metadata=meta)
    check_refused(path, base_model(), r"lacks the tensor\(s\) \['blocks.1.mlp.up_proj.lora_B'\]")


@pytest.mark.parametrize("keep", [4, 100, -64])
def test_load_rejects_a_truncated_file(tmp_path, keep):
    path = saved(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[:keep])  # the header cut, the tensors cut, the last tensor cut
    check_refused(path, base_model(), "not a readable safetensors file.*save the adapter again")


def test_load_rejects_files_that_are_not_adapters(tmp_path):
    from safetensors.torch import save_file

    pickled = tmp_path / "adapter.pt"
    torch.save({"x": torch.zeros(2)}, pickled)  # never unpickled: safetensors only
    check_refused(pickled, base_model(), "not a readable safetensors file")
    weights = tmp_path / "model.safetensors"
    save_file({"x": torch.zeros(2)}, str(weights), metadata={"format": "pt"})
    check_refused(weights, base_model(), "not a minillm adapter")
    check_refused(tmp_path / "missing.safetensors", base_model(), "no adapter file")


def test_save_refuses_a_model_without_adapters_and_keeps_an_existing_file(tmp_path):
    with pytest.raises(LoRAError, match="no LoRA adapters to save"):
        save_adapter(tmp_path / "a.safetensors", base_model())
    path = saved(tmp_path)
    from minillm.files import OutputError

    with pytest.raises(OutputError, match="exists"):
        save_adapter(path, lora_model(seed=3), overwrite=False)


def test_adapters_follow_the_model_to_another_dtype():
    model = lora_model()
    ids, _ = batch()
    model.to(torch.float64)
    layer = lora_layers(model)["blocks.0.attn.k_proj"]
    assert layer.lora_A.dtype == layer.lora_B.dtype == torch.float64
    logits, _ = model(ids)
    assert logits.dtype == torch.float64
    assert F.softmax(logits, -1).sum(-1).sub(1).abs().max() < 1e-12
