"""One row per bad input to the model, its config, generation and the Hugging Face boundary.

Each row names the input, the exception it must raise (or None for a defined result, checked by the
row) and a fragment of the message. Rows that read or write a checkpoint folder start from a valid
export, may damage it first, and then must leave every byte under tmp_path as it was: a refusal
changes nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from minillm.files import OutputError
from minillm.model import LLM, ConfigError, ModelConfig, sample_next

safetensors_torch = pytest.importorskip("safetensors.torch")

from minillm.hf import from_hf, load_hf, save_hf, to_hf  # noqa: E402

BASE = dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=24)
torch.manual_seed(0)
MODEL = LLM(ModelConfig(**BASE)).eval()
IDS = torch.randint(0, 97, (2, 6))


@dataclass
class Row:
    name: str
    act: Callable[[Path], object]  # gets the folder of a valid export (for rows with files)
    error: type[BaseException] | None  # None: a defined result, which `act` checks itself
    fragment: str = ""
    prepare: Callable[[Path], None] | None = None  # damages the export before the folder is hashed
    files: bool = False


def cfg(**kw: object) -> Callable[[Path], object]:
    return lambda folder: ModelConfig(**{**BASE, **kw})


def fwd(ids: object, targets: object = None, **kw: object) -> Callable[[Path], object]:
    return lambda folder: MODEL(ids, targets, **kw)


def gen(ids: object = IDS, n: object = 3, **kw: object) -> Callable[[Path], object]:
    return lambda folder: MODEL.generate(ids, n, **kw)


def expect(check: Callable[[], bool]) -> Callable[[Path], object]:
    def act(folder: Path) -> None:
        assert check()
    return act


# -- damaging an export ------------------------------------------------------------------------


def edit_config(**changes: object) -> Callable[[Path], None]:
    def prepare(folder: Path) -> None:
        path = folder / "export" / "config.json"
        config = json.loads(path.read_text())
        for key, value in changes.items():
            if value is DELETE:
                del config[key]
            else:
                config[key] = value
        path.write_text(json.dumps(config))
    return prepare


DELETE = object()


def edit_weights(change: Callable[[dict], None]) -> Callable[[Path], None]:
    def prepare(folder: Path) -> None:
        path = folder / "export" / "model.safetensors"
        state = safetensors_torch.load_file(str(path))
        change(state)
        safetensors_torch.save_file(state, str(path))
    return prepare


def write(name: str, data: str | bytes) -> Callable[[Path], None]:
    def prepare(folder: Path) -> None:
        path = folder / "export" / name
        path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return prepare


def shard_index(weight_map_value: str) -> Callable[[Path], None]:
    """An index mapping every tensor to one shard name (which may point anywhere)."""
    def prepare(folder: Path) -> None:
        names = safetensors_torch.load_file(str(folder / "export" / "model.safetensors")).keys()
        (folder / "export" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: weight_map_value for k in names}}))
        (folder / "outside.safetensors").write_bytes((folder / "export" / "model.safetensors").read_bytes())
    return prepare


def duplicate_shards(folder: Path) -> None:
    export = folder / "export"
    state = safetensors_torch.load_file(str(export / "model.safetensors"))
    names = sorted(state)
    safetensors_torch.save_file({k: state[k] for k in names[:5]}, str(export / "a.safetensors"))
    safetensors_torch.save_file({k: state[k] * 2 for k in names[:8]}, str(export / "b.safetensors"))  # 3 more, and 5 twice
    (export / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {**{k: "a.safetensors" for k in names[:5]},
                                                                                   **{k: "b.safetensors" for k in names[5:8]}}}))


def load(**kw: object) -> Callable[[Path], object]:
    return lambda folder: load_hf(folder / "export", **kw)


def first_key(state: dict, part: str) -> str:
    return next(k for k in sorted(state) if part in k)


def set_tensor(part: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Path], None]:
    def change(state: dict) -> None:
        key = first_key(state, part)
        state[key] = make(state[key])
    return edit_weights(change)


def with_nan(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[3] = math.nan
    return t


def with_inf(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = math.inf
    return t


def distinct_lm_head(state: dict) -> None:
    state["lm_head.weight"] = state["model.embed_tokens.weight"] + 1.0


def _loads_with_small_tables(folder: Path) -> None:
    model = load_hf(folder / "export")
    assert model.cfg.max_seq_len == 10**9 and model.rope.cos.shape[0] <= 4096
    assert torch.isfinite(model(IDS)[0]).all()


def _all_ignored_loss_is_zero(folder: Path) -> None:
    _, loss = LLM(ModelConfig(**BASE))(IDS, torch.full_like(IDS, -100))
    assert loss.item() == 0.0 and loss.requires_grad


def _save_with(**kw: object) -> Callable[[Path], object]:
    return lambda folder: save_hf(MODEL, folder / "export", **kw)


ROWS = [
    # -- ModelConfig: types, values, combinations --------------------------------------------
    Row("config vocab_size=True", cfg(vocab_size=True), ConfigError, "vocab_size must be a positive integer, got True (bool)"),
    Row("config d_ff=10.5", cfg(d_ff=10.5), ConfigError, "d_ff must be a positive integer, got 10.5 (float)"),
    Row("config n_kv_heads='2'", cfg(n_kv_heads="2"), ConfigError, "n_kv_heads must be a positive integer, got '2' (str)"),
    Row("config vocab_size=0", cfg(vocab_size=0), ConfigError, "vocab_size must be a positive integer"),
    Row("config max_seq_len=1024.0", cfg(max_seq_len=1024.0), ConfigError, "max_seq_len must be a positive integer"),
    Row("config d_model not divisible", cfg(d_model=30), ConfigError, "d_model=30 must be divisible by n_heads=4"),
    Row("config n_kv_heads=3", cfg(n_kv_heads=3), ConfigError, "n_heads=4 must be divisible by n_kv_heads=3"),
    Row("config norm='batchnorm'", cfg(norm="batchnorm"), ConfigError, "norm must be 'rmsnorm' or 'layernorm'"),
    Row("config norm=['rmsnorm']", cfg(norm=["rmsnorm"]), ConfigError, "norm must be a string"),
    Row("config rope_scaling='yarn'", cfg(rope_scaling="yarn"), ConfigError, "rope_scaling must be None or 'linear' or 'ntk'"),
    Row("config rope_factor without scaling", cfg(rope_factor=2.0), ConfigError, "has no effect without rope_scaling"),
    Row("config rope_theta=inf", cfg(rope_theta=math.inf), ConfigError, "rope_theta must be a finite real number"),
    Row("config rope_theta=1", cfg(rope_theta=1.0), ConfigError, "rope_theta must be greater than 1"),
    Row("config norm_eps=nan", cfg(norm_eps=math.nan), ConfigError, "norm_eps must be a finite real number"),
    Row("config norm_eps=0", cfg(norm_eps=0.0), ConfigError, "norm_eps must be positive"),
    Row("config dropout=1.0", cfg(dropout=1.0), ConfigError, "dropout must be in [0, 1)"),
    Row("config tie_embeddings='yes'", cfg(tie_embeddings="yes"), ConfigError, "tie_embeddings must be True or False"),
    Row("config bias=1", cfg(bias=1), ConfigError, "bias must be True or False"),
    Row("config from_dict(list)", lambda f: ModelConfig.from_dict(["vocab_size"]), ConfigError, "a model config is a dict"),
    Row("config unknown field", lambda f: ModelConfig.from_dict({**BASE, "n_layer": 2}), ConfigError, "unknown config field(s) ['n_layer']"),
    # -- LLM.forward ------------------------------------------------------------------------------
    Row("forward id == vocab_size", fwd(torch.tensor([[1, 97]])), ValueError, "must be in [0, 97) for the model's vocabulary of 97 tokens, got values from 1 to 97"),
    Row("forward negative id", fwd(torch.tensor([[-1, 5]])), ValueError, "got values from -1 to 5"),
    Row("forward float ids", fwd(IDS.float()), ValueError, "must be int64 (or int32) indices into the vocabulary of 97 tokens, got torch.float32"),
    Row("forward bool ids", fwd(IDS > 3), ValueError, "got torch.bool"),
    Row("forward 1-D ids", fwd(IDS[0]), ValueError, "of shape (batch, time), got (6,)"),
    Row("forward empty ids", fwd(torch.zeros(1, 0, dtype=torch.long)), ValueError, "are empty (shape (1, 0))"),
    Row("forward list of ids", fwd([[1, 2]]), ValueError, "must be a tensor of shape (batch, time), got list"),
    Row("forward target == vocab_size", fwd(IDS, torch.full_like(IDS, 97)), ValueError, "targets must be in [0, 97)"),
    Row("forward target -1 (ignore_index is -100)", fwd(IDS, torch.full_like(IDS, -1)), ValueError, "or equal ignore_index (-100), got values from -1"),
    Row("forward float targets", fwd(IDS, IDS.float()), ValueError, "targets must be an int64 tensor"),
    Row("forward targets of another shape", fwd(IDS, IDS[:, :-1]), ValueError, "targets must have the shape of the ids, (2, 6)"),
    Row("forward past the context", fwd(torch.zeros(1, 25, dtype=torch.long)), ValueError, "the model's context is 24"),
    Row("forward last_only with targets", fwd(IDS, IDS, last_only=True), ValueError, "a loss needs all of them"),
    Row("forward caches for 1 of 2 layers", fwd(IDS, caches=MODEL.new_caches(2, 8)[:1]), ValueError, "one KV cache per layer (2), got 1"),
    Row("forward every target ignored: loss 0", _all_ignored_loss_is_zero, None),
    # -- LLM.generate and sample_next -------------------------------------------------------------
    Row("generate empty prompt", gen(torch.zeros(1, 0, dtype=torch.long)), ValueError, "prompt ids are empty"),
    Row("generate prompt id out of range", gen(torch.tensor([[200]])), ValueError, "prompt ids must be in [0, 97)"),
    Row("generate temperature=nan", gen(temperature=math.nan), ValueError, "temperature must be a finite number >= 0"),
    Row("generate temperature=inf", gen(temperature=math.inf), ValueError, "temperature must be a finite number >= 0"),
    Row("generate temperature=-1", gen(temperature=-1.0), ValueError, "temperature must be a finite number >= 0"),
    Row("generate temperature=True", gen(temperature=True), ValueError, "got True"),
    Row("generate max_new_tokens=-1", gen(n=-1), ValueError, "max_new_tokens must be an int >= 0, got -1"),
    Row("generate max_new_tokens=2.0", gen(n=2.0), ValueError, "max_new_tokens must be an int >= 0, got 2.0"),
    Row("generate eos_id == vocab_size", gen(eos_id=97), ValueError, "eos_id must be a token id in [0, 97)"),
    Row("generate eos_id=-1", gen(eos_id=-1), ValueError, "eos_id must be a token id in [0, 97)"),
    Row("generate top_k=0", gen(top_k=0), ValueError, "top_k must be an int of at least 1"),
    Row("generate top_p=0", gen(top_p=0.0), ValueError, "top_p must be in (0, 1]"),
    Row("generate top_p=nan", gen(top_p=math.nan), ValueError, "top_p must be in (0, 1]"),
    Row("generate past the context", gen(n=20), ValueError, "feeds 25 positions through the model, which exceeds the context of 24"),
    Row("sample_next temperature=nan", lambda f: sample_next(torch.zeros(1, 5), math.nan), ValueError, "temperature must be"),
    Row("generate max_new_tokens=0: the prompt", expect(lambda: torch.equal(MODEL.generate(IDS, 0), IDS)), None),
    Row("generate prompt fills the context, 1 token",
        expect(lambda: MODEL.generate(torch.zeros(1, 24, dtype=torch.long), 1).shape == (1, 25)), None),
    # -- load_hf / from_hf: the config --------------------------------------------------------------
    Row("hf config.json not JSON", load(), ConfigError, "not valid JSON", write("config.json", "{llama"), True),
    Row("hf config.json not UTF-8", load(), ConfigError, "not valid JSON", write("config.json", b"\xff\xfe{"), True),
    Row("hf config.json a list", load(), ConfigError, "must hold a JSON object, got list", write("config.json", "[1, 2]"), True),
    Row("hf config lacks hidden_size", load(), ConfigError, "config.json lacks ['hidden_size']", edit_config(hidden_size=DELETE), True),
    Row("hf config vocab_size '101'", load(), ConfigError, "vocab_size must be a positive integer, got '97' (str)", edit_config(vocab_size="97"), True),
    Row("hf model_type mistral", load(), ConfigError, "expected a Llama checkpoint", edit_config(model_type="mistral"), True),
    Row("hf sliding_window", load(), ConfigError, "config.json sets sliding_window=4096", edit_config(sliding_window=4096), True),
    Row("hf qk_norm", load(), ConfigError, "config.json sets qk_norm=True", edit_config(qk_norm=True), True),
    Row("hf use_qk_norm", load(), ConfigError, "config.json sets use_qk_norm=True", edit_config(use_qk_norm=True), True),
    Row("hf attention_bias", load(), ConfigError, "config.json sets attention_bias=True", edit_config(attention_bias=True), True),
    Row("hf mlp_bias", load(), ConfigError, "config.json sets mlp_bias=True", edit_config(mlp_bias=True), True),
    Row("hf hidden_act gelu", load(), ConfigError, "config.json sets hidden_act='gelu'", edit_config(hidden_act="gelu"), True),
    Row("hf partial_rotary_factor", load(), ConfigError, "partial_rotary_factor=0.5", edit_config(partial_rotary_factor=0.5), True),
    Row("hf logit softcapping", load(), ConfigError, "final_logit_softcapping=30.0", edit_config(final_logit_softcapping=30.0), True),
    Row("hf rope_scaling llama3", load(), ConfigError, "rope scaling 'llama3' is not supported",
        edit_config(rope_scaling={"rope_type": "llama3", "factor": 8.0}), True),
    Row("hf linear rope without factor", load(), ConfigError, "linear rope scaling without a 'factor'",
        edit_config(rope_scaling={"rope_type": "linear"}), True),
    Row("hf rope_scaling a string", load(), ConfigError, "must be objects", edit_config(rope_scaling="linear"), True),
    Row("hf head_dim mismatch", load(), ConfigError, "head_dim * num_attention_heads must equal hidden_size", edit_config(head_dim=16), True),
    Row("hf bos_token_id out of range", load(), ConfigError, "bos_token_id must be a token id in [0, 97)", edit_config(bos_token_id=97), True),
    Row("hf num_hidden_layers 1e9", load(), ConfigError, "num_hidden_layers=1000000000 but the checkpoint holds 2 layers",
        edit_config(num_hidden_layers=10**9), True),
    Row("hf max_position_embeddings 1e9: lazy tables", _loads_with_small_tables, None, "",
        edit_config(max_position_embeddings=10**9), True),
    # -- load_hf / from_hf: the weights -------------------------------------------------------------
    Row("hf vocab_size does not fit the weights", load(), ConfigError, "model.embed_tokens.weight has shape (97, 32) but config.json implies (200, 32)",
        edit_config(vocab_size=200), True),
    Row("hf intermediate_size does not fit", load(), ConfigError, "but config.json implies", edit_config(intermediate_size=10**6), True),
    Row("hf integer weights", load(), ConfigError, "holds torch.int32 values; weights must be floating point",
        set_tensor("q_proj", lambda t: t.to(torch.int32)), True),
    Row("hf NaN weight", load(), ConfigError, "holds NaN or infinite values", set_tensor("down_proj", with_nan), True),
    Row("hf inf weight", load(), ConfigError, "holds NaN or infinite values", set_tensor("norm", with_inf), True),
    Row("hf fp32 too large for fp16", load(dtype=torch.float16), ConfigError, "(in torch.float16)",
        set_tensor("up_proj", lambda t: t * 1e6), True),
    Row("hf missing weight", load(), ConfigError, "lacks 'model.layers.1.mlp.up_proj.weight'",
        edit_weights(lambda s: s.pop("model.layers.1.mlp.up_proj.weight")), True),
    Row("hf unexpected weight", load(), ConfigError, "weights minillm's model does not: ['model.layers.0.self_attn.q_norm.weight']",
        edit_weights(lambda s: s.update({"model.layers.0.self_attn.q_norm.weight": torch.ones(8)})), True),
    Row("hf tied config, distinct lm_head", load(), ConfigError, "tie_word_embeddings=true but the checkpoint's lm_head.weight differs",
        lambda f: (edit_config(tie_word_embeddings=True)(f), edit_weights(distinct_lm_head)(f)), True),
    Row("hf dtype=torch.int64", load(dtype=torch.int64), ConfigError, "dtype must be a floating-point torch.dtype", None, True),
    Row("hf truncated safetensors", load(), ConfigError, "not a readable safetensors file",
        lambda f: (f / "export/model.safetensors").write_bytes((f / "export/model.safetensors").read_bytes()[:500]), True),
    Row("hf only pickle weights", load(), ConfigError, "pickle .bin files",
        lambda f: ((f / "export/model.safetensors").unlink(), write("pytorch_model.bin", b"pickle")(f)), True),
    Row("hf no config.json", load(), ConfigError, "no config.json", lambda f: (f / "export/config.json").unlink(), True),
    Row("hf index points to ../", load(), ConfigError, "the shard '../outside.safetensors' lies outside the folder",
        shard_index("../outside.safetensors"), True),
    Row("hf index absolute path", load(), ConfigError, "lies outside the folder", lambda f: shard_index(str(f / "outside.safetensors"))(f), True),
    Row("hf index weight_map a list", load(), ConfigError, "expected a 'weight_map' object",
        write("model.safetensors.index.json", '{"weight_map": ["a"]}'), True),
    Row("hf index missing shard", load(), ConfigError, "the index lists shards that are missing",
        write("model.safetensors.index.json", '{"weight_map": {"x": "gone.safetensors"}}'), True),
    Row("hf a tensor in two shards", load(), ConfigError, "which the index or another shard also provides", duplicate_shards, True),
    Row("from_hf state not a dict", lambda f: from_hf(to_hf(MODEL)[0], [1, 2]), ConfigError, "the state dict must be a dict of tensors"),
    # -- save_hf / to_hf ------------------------------------------------------------------------------
    Row("save over an existing export", _save_with(), OutputError, "exists; choose another output path, or pass overwrite=True", None, True),
    Row("save overwrite a folder with a tokenizer", _save_with(overwrite=True), OutputError, "not part of a model export (['tokenizer.json'])",
        write("tokenizer.json", "{}"), True),
    Row("save into a missing parent", lambda f: save_hf(MODEL, f / "no" / "such"), OutputError, "does not exist; create it first", None, True),
    Row("save eos_token_id out of range", lambda f: save_hf(MODEL, f / "new", special_ids={"eos_token_id": 97}), ConfigError,
        "eos_token_id must be a token id in [0, 97)", None, True),
    Row("save unknown special id", lambda f: save_hf(MODEL, f / "new", special_ids={"unk_token_id": 0}), ConfigError,
        "special ids are a dict with keys among", None, True),
    Row("to_hf of a GPT-2-style model", lambda f: to_hf(LLM(ModelConfig(**BASE, norm="layernorm"))), ConfigError, "only the Llama design"),
]


def tree_hash(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        digest.update(str(path.relative_to(root)).encode())
        if path.is_file():
            digest.update(path.read_bytes())
    return digest.hexdigest()


def test_the_rows_have_unique_names():
    names = [row.name for row in ROWS]
    assert len(names) == len(set(names))


@pytest.mark.parametrize("row", ROWS, ids=[row.name for row in ROWS])
def test_bad_input(row, tmp_path):
    if row.files:
        save_hf(MODEL, tmp_path / "export")
        if row.prepare is not None:
            row.prepare(tmp_path)
    before = tree_hash(tmp_path)
    if row.error is None:
        row.act(tmp_path)
    else:
        with pytest.raises(row.error) as info:
            row.act(tmp_path)
        assert row.fragment in str(info.value), f"{row.name}: {info.value}"
    assert tree_hash(tmp_path) == before, f"{row.name} changed the files under {tmp_path}"
