"""minillm.hf: a minillm model and Hugging Face's LlamaForCausalLM compute the same logits, both ways."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")  # in the dev extra, so this always runs under `make test`

from minillm.hf import from_hf, load_hf, save_hf, to_hf  # noqa: E402
from minillm.model import LLM, ConfigError, ModelConfig  # noqa: E402

torch.manual_seed(0)


def small(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=101, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=48,
                                 rope_theta=500.0, norm_eps=1e-6), **kw})


def random_weights(model: LLM) -> LLM:
    # Initialization leaves norms at 1; perturb everything so that a swapped weight would show.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("kw", [{}, dict(tie_embeddings=True), dict(rope_scaling="linear", rope_factor=2.0)])
def test_minillm_to_transformers(tmp_path, kw):
    model = random_weights(LLM(small(**kw)))
    save_hf(model, tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    ids = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(ids).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)
    # Greedy generations agree too.
    out = model.generate(ids[:, :5], 12, temperature=0)
    prompt = ids[:, :5]
    hf_out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False, pad_token_id=100)
    assert torch.equal(out, hf_out)


def test_transformers_to_minillm(tmp_path):
    cfg = transformers.LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=100, num_hidden_layers=3,
                                   num_attention_heads=6, num_key_value_heads=3, max_position_embeddings=32,
                                   rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=False)
    torch.manual_seed(1)
    hf = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf.save_pretrained(tmp_path)  # safetensors, written locally: nothing is downloaded
    model = load_hf(tmp_path)
    assert model.cfg.d_ff == 100 and model.cfg.n_kv_heads == 3
    ids = torch.randint(0, 97, (3, 16))
    with torch.no_grad():
        torch.testing.assert_close(model(ids)[0], hf(ids).logits, atol=1e-5, rtol=0)


def test_sharded_checkpoints_and_stray_files(tmp_path):
    from safetensors.torch import save_file

    model = random_weights(LLM(small()))
    config, state = to_hf(model)
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(tmp_path / fname))
    (tmp_path / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}), encoding="utf-8")
    (tmp_path / "config.json").write_text(json.dumps({**config, "head_dim": None}), encoding="utf-8")
    save_file({"adapter.weight": torch.zeros(2)}, str(tmp_path / "adapter.safetensors"))  # must be ignored
    again = load_hf(tmp_path)
    ids = torch.randint(0, 101, (1, 8))
    torch.testing.assert_close(again(ids)[0], model(ids)[0])


def test_round_trip_in_memory():
    model = random_weights(LLM(small()))
    config, state = to_hf(model)
    again = from_hf(config, state)
    ids = torch.randint(0, 101, (1, 10))
    torch.testing.assert_close(again(ids)[0], model(ids)[0])


def test_conversion_errors(tmp_path):
    with pytest.raises(ConfigError, match="only the Llama design"):
        to_hf(LLM(small(norm="layernorm", mlp="gelu", position="learned", bias=True)))
    with pytest.raises(ConfigError, match="no config.json"):
        load_hf(tmp_path)
    model = random_weights(LLM(small()))
    save_hf(model, tmp_path)
    (tmp_path / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes()[:1000])
    with pytest.raises(ConfigError, match="not a readable safetensors file"):
        load_hf(tmp_path)
    config, state = to_hf(model)
    del state["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ConfigError, match="lacks 'model.layers.1.mlp.up_proj.weight'"):
        from_hf(config, state)
    bad = {**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}
    with pytest.raises(ConfigError, match="rope scaling 'yarn' is not supported"):
        from_hf(bad, to_hf(model)[1])
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match="pickle .bin files"):
        load_hf(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "llama"
