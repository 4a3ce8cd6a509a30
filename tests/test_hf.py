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


def write_sharded(folder, model, config_extra=None):
    """An export in two shards with an index, as save_pretrained writes large models."""
    from safetensors.torch import save_file

    folder.mkdir()
    config, state = to_hf(model)
    names = sorted(state)
    shards = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for fname, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / fname))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {k: f for f, ks in shards.items() for k in ks}}), encoding="utf-8")
    (folder / "config.json").write_text(json.dumps({**config, **(config_extra or {})}), encoding="utf-8")
    return folder


def test_saving_over_an_older_sharded_export(tmp_path):
    from minillm.files import OutputError

    old = random_weights(LLM(small()))
    new = random_weights(LLM(small()))
    folder = write_sharded(tmp_path / "export", old)
    with pytest.raises(OutputError, match="exists"):
        save_hf(new, folder)
    assert (folder / "model.safetensors.index.json").is_file()  # refused: nothing touched
    save_hf(new, folder, overwrite=True)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no temporary folder left behind
    ids = torch.randint(0, 101, (1, 8))
    with torch.no_grad():
        assert torch.equal(load_hf(folder)(ids)[0], new(ids)[0])


def test_overwrite_refuses_a_folder_with_other_files(tmp_path):
    from minillm.files import OutputError

    folder = tmp_path / "mixed"
    save_hf(random_weights(LLM(small())), folder)
    (folder / "tokenizer.json").write_text("{}", encoding="utf-8")
    with pytest.raises(OutputError, match=r"not part of a model export \(\['tokenizer.json'\]\)"):
        save_hf(random_weights(LLM(small())), folder, overwrite=True)
    assert (folder / "tokenizer.json").is_file()


def test_a_crash_while_saving_leaves_the_old_export(tmp_path, monkeypatch):
    import safetensors.torch

    model = random_weights(LLM(small()))
    folder = tmp_path / "export"
    save_hf(model, folder)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        save_hf(random_weights(LLM(small())), folder, overwrite=True)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_special_ids_travel_both_ways_and_hf_generate_stops_at_eos(tmp_path):
    model = random_weights(LLM(small()))
    prompt = torch.randint(0, 101, (1, 5))
    greedy = model.generate(prompt, 12, temperature=0)
    eos = int(greedy[0, 8])  # a token greedy decoding produces after a few steps
    stop = int((greedy[0, 5:] == eos).nonzero()[0]) + 5
    special = {"bos_token_id": 0, "eos_token_id": eos, "pad_token_id": 100}
    save_hf(model, tmp_path / "export", special_ids=special)
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert {k: config[k] for k in special} == special
    assert load_hf(tmp_path / "export").special_ids == special
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export", torch_dtype=torch.float32).eval()
    out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    assert out.shape[1] == stop + 1 and int(out[0, -1]) == eos
    # Without special ids, the config says so (null), instead of letting transformers assume 1 and 2.
    save_hf(model, tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["bos_token_id"] is None and config["eos_token_id"] is None
    # A loaded model carries its ids into the next export.
    again = load_hf(tmp_path / "export")
    assert to_hf(again)[0]["eos_token_id"] == eos


@pytest.mark.parametrize("tied", [False, True])
def test_loading_builds_the_model_a_normal_build_gives(tmp_path, tied):
    model = random_weights(LLM(small(tie_embeddings=tied)))
    save_hf(model, tmp_path / "export")
    again = load_hf(tmp_path / "export")
    assert (again.lm_head.weight is again.token_embedding.weight) == tied
    assert len(list(again.parameters())) == len(list(model.parameters()))
    assert torch.equal(again.rope.cos, model.rope.cos)


def test_float64_round_trip_is_bit_identical(tmp_path):
    model = random_weights(LLM(small())).double()
    save_hf(model, tmp_path / "export")
    again = load_hf(tmp_path / "export")
    assert again.token_embedding.weight.dtype == torch.float64
    ids = torch.randint(0, 101, (2, 12))
    with torch.no_grad():
        assert torch.equal(again(ids)[0], model(ids)[0])


def test_mixed_dtypes_load_as_one(tmp_path):
    model = random_weights(LLM(small()))
    config, state = to_hf(model)
    mixed = {k: v if "norm" in k else v.bfloat16() for k, v in state.items()}  # bf16 matrices, fp32 norms
    loaded = from_hf(config, mixed)
    assert {p.dtype for p in loaded.parameters()} == {torch.bfloat16}
    ids = torch.randint(0, 101, (1, 6))
    with torch.no_grad():
        assert loaded(ids)[0].dtype == torch.bfloat16
        as32 = from_hf(config, mixed, dtype=torch.float32)
        assert as32(ids)[0].dtype == torch.float32


def test_a_huge_max_position_embeddings_allocates_nothing_of_that_size(tmp_path):
    model = random_weights(LLM(small()))
    folder = write_sharded(tmp_path / "export", model, {"max_position_embeddings": 1_000_000_000})
    again = load_hf(folder)
    assert again.cfg.max_seq_len == 1_000_000_000 and again.rope.cos.shape[0] <= 4096
    ids = torch.randint(0, 101, (1, 8))
    with torch.no_grad():
        torch.testing.assert_close(again(ids)[0], model(ids)[0])
