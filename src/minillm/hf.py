"""Hugging Face interop: a minillm model as a `LlamaForCausalLM` checkpoint, and back.

The Llama-design `LLM` (RMSNorm, SwiGLU, rotary positions in the split-halves layout, no biases)
has the same weights as Hugging Face's Llama, under other names. `save_hf` writes a folder that
`transformers.AutoModelForCausalLM.from_pretrained` loads (config.json and model.safetensors);
`load_hf` reads such a folder (one written by `save_pretrained`, say) into an `LLM`. Weights are
read with safetensors, never with pickle, so a downloaded checkpoint cannot run code.

A checkpoint is untrusted input: a config key that would change the computation (biases, a
sliding window, norms on queries and keys, another activation or rope scaling) is refused rather
than ignored, every weight is checked for name, shape, dtype and finite values, shard paths must stay
inside the folder, and no size read from config.json is allocated before the weights confirm it.
The special token ids (bos, eos, pad) travel both ways: pass ``special_ids`` when exporting, and
read ``model.special_ids`` after loading.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

from minillm.files import OutputError, atomic_dir
from minillm.model import LLM, ConfigError, ModelConfig

__all__ = ["to_hf", "from_hf", "save_hf", "load_hf", "hf_config", "SPECIAL_KEYS"]

SPECIAL_KEYS = ("bos_token_id", "eos_token_id", "pad_token_id")

# Llama config keys that change what the weights compute, with the only value minillm's model computes.
_SAME_MATH = {
    "attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "attention_dropout": 0.0,
    "sliding_window": None, "use_sliding_window": False, "qk_norm": False, "use_qk_norm": False, "qk_layernorm": False,
    "attn_logit_softcapping": None, "final_logit_softcapping": None, "partial_rotary_factor": 1.0,
}
# The files of an export; replacing a folder that holds anything else would lose it.
_EXPORT_FILES = re.compile(r"config\.json|generation_config\.json|model(-\d+-of-\d+)?\.safetensors|model\.safetensors\.index\.json")

# (minillm name, Hugging Face name); {i} is the layer index.
_LAYER_NAMES = [
    ("blocks.{i}.input_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    ("blocks.{i}.attn.q_proj.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    ("blocks.{i}.attn.k_proj.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    ("blocks.{i}.attn.v_proj.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    ("blocks.{i}.attn.o_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    ("blocks.{i}.post_attn_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    ("blocks.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    ("blocks.{i}.mlp.up_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    ("blocks.{i}.mlp.down_proj.weight", "model.layers.{i}.mlp.down_proj.weight"),
]
_GLOBAL_NAMES = [("token_embedding.weight", "model.embed_tokens.weight"), ("norm.weight", "model.norm.weight"),
                 ("lm_head.weight", "lm_head.weight")]


def _check_llama_design(cfg: ModelConfig) -> None:
    odd = {k: v for k, v in (("norm", cfg.norm), ("mlp", cfg.mlp), ("position", cfg.position), ("bias", cfg.bias))
           if v != {"norm": "rmsnorm", "mlp": "swiglu", "position": "rope", "bias": False}[k]}
    if odd:
        raise ConfigError(f"only the Llama design converts to Hugging Face's Llama; this model has {odd}")
    if cfg.rope_scaling == "ntk":
        raise ConfigError("Hugging Face's Llama has no static NTK rope scaling; convert a model with rope_scaling None or 'linear'")


def _special_ids(ids: dict | None, vocab_size: int, where: str) -> dict:
    """{bos,eos,pad}_token_id, each None or a token id in [0, vocab_size); eos may be a list (Llama 3)."""
    ids = {} if ids is None else ids
    if not isinstance(ids, dict) or set(ids) - set(SPECIAL_KEYS):
        raise ConfigError(f"{where}: special ids are a dict with keys among {list(SPECIAL_KEYS)}, got {ids!r}")
    for key, value in ids.items():
        values = value if key == "eos_token_id" and isinstance(value, list) and value else [value]
        if value is not None and not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < vocab_size for v in values):
            raise ConfigError(f"{where}: {key} must be a token id in [0, {vocab_size}) or None, got {value!r}")
    return {key: ids.get(key) for key in SPECIAL_KEYS}


def hf_config(cfg: ModelConfig, special_ids: dict | None = None) -> dict:
    """The config.json of a `LlamaForCausalLM` with this shape.

    The special ids are always written, as null when unknown: without them transformers assumes
    bos=1 and eos=2, which are ordinary byte tokens in minillm's tokenizers.
    """
    _check_llama_design(cfg)
    scaling = {"rope_type": "linear", "factor": cfg.rope_factor} if cfg.rope_scaling == "linear" else None
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim, "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": scaling, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": cfg.tie_embeddings,
        "attention_dropout": 0.0, "initializer_range": 0.02,
        **_special_ids(special_ids, cfg.vocab_size, "special_ids"),
    }


def _config_from_hf(hf: dict) -> ModelConfig:
    if not isinstance(hf, dict):
        raise ConfigError(f"config.json must hold a JSON object, got {type(hf).__name__}")
    if hf.get("model_type", "llama") != "llama":
        raise ConfigError(f"expected a Llama checkpoint (model_type 'llama'), got {hf.get('model_type')!r}")
    for key, same in _SAME_MATH.items():
        value = hf.get(key, same)
        if value != same:
            raise ConfigError(f"config.json sets {key}={value!r}, which minillm's model does not compute (it computes "
                              f"{key}={same!r}); loading would ignore it and give other outputs than the original model")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads") if k not in hf]
    if missing:
        raise ConfigError(f"config.json lacks {missing}, which a Llama config must have")
    # transformers 5 keeps the rotary settings in rope_parameters; earlier versions in rope_theta/rope_scaling.
    rope, scaling = hf.get("rope_parameters") or {}, hf.get("rope_scaling") or {}
    if not isinstance(rope, dict) or not isinstance(scaling, dict):
        raise ConfigError(f"config.json: rope_parameters and rope_scaling must be objects, got {rope!r} and {scaling!r}")
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = rope if rope.get("rope_type", "default") != "default" else scaling
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in (None, "default", "linear"):
        raise ConfigError(f"rope scaling {kind!r} is not supported; minillm converts 'default' and 'linear'")
    if kind == "linear" and "factor" not in scaling:
        raise ConfigError("config.json: linear rope scaling without a 'factor'")
    n_heads = hf["num_attention_heads"]
    try:
        cfg = ModelConfig(
            vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=hf.get("num_key_value_heads") or n_heads, d_ff=hf["intermediate_size"],
            max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=theta,
            rope_scaling="linear" if kind == "linear" else None, rope_factor=scaling["factor"] if kind == "linear" else 1.0,
            norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=hf.get("tie_word_embeddings", False),
        )
    except ConfigError as e:  # name the problem in minillm's terms, and say where it came from
        raise ConfigError(f"config.json does not describe a model minillm can build: {e}") from None
    if hf.get("head_dim") not in (None, cfg.head_dim):
        raise ConfigError("head_dim * num_attention_heads must equal hidden_size for minillm's attention")
    return cfg


def _name_pairs(n_layers: int) -> list[tuple[str, str]]:
    pairs = list(_GLOBAL_NAMES)
    for i in range(n_layers):
        pairs += [(a.format(i=i), b.format(i=i)) for a, b in _LAYER_NAMES]
    return pairs


def to_hf(model: LLM, special_ids: dict | None = None) -> tuple[dict, dict[str, Tensor]]:
    """(config.json contents, state dict under Hugging Face's names). A tied output layer is left out.

    `special_ids` ({"bos_token_id": ..., "eos_token_id": ..., "pad_token_id": ...}) default to the
    ones `load_hf` found (``model.special_ids``), else none.
    """
    cfg = hf_config(model.cfg, getattr(model, "special_ids", None) if special_ids is None else special_ids)
    ours = model.state_dict()
    state = {hf: ours[name].detach().contiguous() for name, hf in _name_pairs(model.cfg.n_layers)}
    if model.cfg.tie_embeddings:
        del state["lm_head.weight"]  # HF re-ties it from tie_word_embeddings
    return cfg, state


def _checked_weights(cfg: ModelConfig, state: dict, dtype: torch.dtype | None) -> dict[str, Tensor]:
    """The checkpoint's tensors under minillm's names, checked and cast to one dtype."""
    if not isinstance(state, dict):
        raise ConfigError(f"the state dict must be a dict of tensors, got {type(state).__name__}")
    # Count the layers before building anything: num_hidden_layers comes from an untrusted file.
    layers = {int(m.group(1)) for name in state if (m := re.match(r"model\.layers\.(\d+)\.", str(name)))}
    if len(layers) != cfg.n_layers or layers != set(range(len(layers))):
        raise ConfigError(f"config.json says num_hidden_layers={cfg.n_layers} but the checkpoint holds {len(layers)} layers "
                          f"(indices {sorted(layers)[:3]}...{sorted(layers)[-1:]}); the config does not belong to these weights")
    pairs = _name_pairs(cfg.n_layers)
    known = {hf for _, hf in pairs} | {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(cfg.n_layers)}
    unexpected = sorted(set(state) - known)
    if unexpected:
        raise ConfigError(f"the checkpoint has weights minillm's model does not: {unexpected[:5]}")
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in LLM(cfg).state_dict().items()}  # no memory, whatever the config says
    ours = {}
    for name, hf in pairs:
        if hf not in state:
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            raise ConfigError(f"the checkpoint lacks {hf!r}; is it a complete LlamaForCausalLM?")
        t = state[hf]
        if not isinstance(t, Tensor) or not t.is_floating_point():
            raise ConfigError(f"{hf} holds {getattr(t, 'dtype', type(t).__name__)} values; weights must be floating point")
        if t.shape != shapes[name]:
            raise ConfigError(f"{hf} has shape {tuple(t.shape)} but config.json implies {tuple(shapes[name])}; "
                              "the config does not belong to these weights")
        ours[name] = t
    if cfg.tie_embeddings and "lm_head.weight" in ours and not torch.equal(ours["lm_head.weight"], ours["token_embedding.weight"]):
        raise ConfigError("config.json sets tie_word_embeddings=true but the checkpoint's lm_head.weight differs from "
                          "model.embed_tokens.weight; tying would drop it. Set tie_word_embeddings to false to load both")
    if dtype is None:
        # The dtype that holds most of the numbers: bf16 matrices with fp32 norms load as bf16.
        counts = Counter()
        for t in ours.values():
            counts[t.dtype] += t.numel()
        dtype = counts.most_common(1)[0][0]
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ConfigError(f"dtype must be a floating-point torch.dtype such as torch.float32, got {dtype!r}")
    for name, t in ours.items():
        ours[name] = t = t.to(dtype)
        if not torch.isfinite(t).all():
            raise ConfigError(f"{dict(pairs)[name]} holds NaN or infinite values (in {dtype}); the checkpoint is damaged, "
                              "comes from a diverged run, or does not fit this dtype")
    if cfg.tie_embeddings:
        ours["lm_head.weight"] = ours["token_embedding.weight"]
    return ours


def from_hf(config: dict, state: dict[str, Tensor], dtype: torch.dtype | None = None) -> LLM:
    """An `LLM` from a Llama config dict and its state dict (Hugging Face names).

    Every weight is cast to `dtype`; by default, to the dtype that holds most of the checkpoint's
    numbers (mixed checkpoints, bf16 matrices with fp32 norms, would otherwise fail in the first
    matrix product). The config's bos/eos/pad ids are returned as ``model.special_ids``.
    """
    cfg = _config_from_hf(config)
    special = _special_ids({k: config[k] for k in SPECIAL_KEYS if k in config}, cfg.vocab_size, "config.json")
    ours = _checked_weights(cfg, state, dtype)
    with torch.device("meta"):
        model = LLM(cfg)
    # assign=True adopts the checkpoint's tensors in place of the meta placeholders; the model's load
    # hook re-ties a tied output layer and builds the rotary tables, which checkpoints do not hold.
    model.load_state_dict(ours, assign=True)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ConfigError(f"the checkpoint left {leftover[:3]} unset")
    model.special_ids = special
    return model


def save_hf(model: LLM, folder: str | os.PathLike[str], *, overwrite: bool = False, special_ids: dict | None = None) -> Path:
    """Write `folder`: config.json and model.safetensors, and nothing else, as one step.

    The folder is built under a temporary name and renamed into place (`minillm.files.atomic_dir`),
    so a crash leaves the old folder or the new one, and never an older export's shards or index
    beside the new weights. An existing folder is refused unless `overwrite`, which replaces it whole;
    an empty one counts as absent, and one that holds anything but a model export (a tokenizer, notes)
    is refused even then, since replacing it would delete those files. `special_ids`: see `to_hf`.
    """
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ConfigError("saving in Hugging Face's format needs safetensors: pip install 'minillm[hf]'") from None
    config, state = to_hf(model, special_ids)
    folder = Path(folder)
    if folder.is_dir():
        entries = sorted(folder.iterdir())
        others = [e.name for e in entries if not (e.is_file() and _EXPORT_FILES.fullmatch(e.name))]
        if entries and overwrite and others:
            raise OutputError(f"{str(folder)!r} holds files that are not part of a model export ({others[:3]}); "
                              "overwriting would delete them. Save into a new folder, or move them out first")
        overwrite = overwrite or not entries
    with atomic_dir(folder, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return folder


def _read_json(path: Path) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


def _weight_files(folder: Path) -> tuple[list[Path], dict[str, str] | None]:
    """model.safetensors, or the shards an index lists (each inside `folder`), and the index's map from
    tensor names to shard names. Other files in the folder (an adapter, a second export) are not read."""
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        return ([folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []), None
    weight_map = _read_json(index)
    weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise ConfigError(f"{index}: expected a 'weight_map' object from tensor names to shard file names")
    root = folder.resolve()
    for name in sorted(set(weight_map.values())):
        # A shard name such as ../x.safetensors or /etc/x would read a file the folder does not hold.
        if Path(name).is_absolute() or ".." in Path(name).parts or not (folder / name).resolve().is_relative_to(root):
            raise ConfigError(f"{index}: the shard {name!r} lies outside the folder; a checkpoint's index may only name its own files")
    files = [folder / name for name in sorted(set(weight_map.values()))]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"{folder}: the index lists shards that are missing: {missing[:3]}")
    return files, weight_map


def load_hf(folder: str | os.PathLike[str], dtype: torch.dtype | None = None) -> LLM:
    """Read a Llama checkpoint folder (config.json plus model.safetensors or sharded safetensors).

    `dtype`: see `from_hf`. ``model.special_ids`` holds the config's bos/eos/pad token ids.
    """
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ConfigError("reading Hugging Face checkpoints needs safetensors: pip install 'minillm[hf]'") from None
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{folder}: no config.json; expected a folder written by save_pretrained or save_hf")
    config = _read_json(config_path)
    _config_from_hf(config)  # refuse a config minillm cannot compute before reading gigabytes of weights
    files, weight_map = _weight_files(folder)
    if not files:
        bins = sorted(folder.glob("*.bin"))
        hint = " (it holds pickle .bin files, which minillm does not load: they can run code; convert them to safetensors)" if bins else ""
        raise ConfigError(f"{folder}: no model.safetensors (or model.safetensors.index.json) weights{hint}")
    state: dict[str, Tensor] = {}
    for f in files:
        try:
            tensors = load_file(str(f))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ConfigError(f"{f}: not a readable safetensors file ({e}); the download may be truncated") from None
        for name in tensors:  # one tensor in two shards would keep whichever was read last
            if name in state or (weight_map is not None and name in weight_map and folder / weight_map[name] != f):
                raise ConfigError(f"{f}: holds {name!r}, which the index or another shard also provides; the shards do not agree")
        state.update(tensors)
    return from_hf(config, state, dtype)
