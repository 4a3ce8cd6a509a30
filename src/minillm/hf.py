"""Hugging Face interop: a minillm model as a `LlamaForCausalLM` checkpoint, and back.

The Llama-design `LLM` (RMSNorm, SwiGLU, rotary positions in the split-halves layout, no biases)
has the same weights as Hugging Face's Llama, under other names. `save_hf` writes a folder that
`transformers.AutoModelForCausalLM.from_pretrained` loads (config.json and model.safetensors);
`load_hf` reads such a folder (one written by `save_pretrained`, say) into an `LLM`. Weights are
read with safetensors, never with pickle, so a downloaded checkpoint cannot run code.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import Tensor

from minillm.model import LLM, ConfigError, ModelConfig, rope_for

__all__ = ["to_hf", "from_hf", "save_hf", "load_hf", "hf_config"]

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


def hf_config(cfg: ModelConfig) -> dict:
    """The config.json of a `LlamaForCausalLM` with this shape."""
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
    }


def _config_from_hf(hf: dict) -> ModelConfig:
    if hf.get("model_type", "llama") != "llama":
        raise ConfigError(f"expected a Llama checkpoint (model_type 'llama'), got {hf.get('model_type')!r}")
    if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("hidden_act", "silu") != "silu":
        raise ConfigError("this Llama variant has biases or a non-SiLU activation, which minillm's model lacks")
    # transformers 5 keeps the rotary settings in rope_parameters; earlier versions in rope_theta/rope_scaling.
    rope = hf.get("rope_parameters") or {}
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = rope if rope.get("rope_type", "default") != "default" else (hf.get("rope_scaling") or {})
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in (None, "default", "linear"):
        raise ConfigError(f"rope scaling {kind!r} is not supported; minillm converts 'default' and 'linear'")
    n_heads = hf["num_attention_heads"]
    if (hf.get("head_dim") or hf["hidden_size"] // n_heads) * n_heads != hf["hidden_size"]:
        raise ConfigError("head_dim * num_attention_heads must equal hidden_size for minillm's attention")
    return ModelConfig(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=hf["num_hidden_layers"], n_heads=n_heads,
        n_kv_heads=hf.get("num_key_value_heads", n_heads), d_ff=hf["intermediate_size"],
        max_seq_len=hf.get("max_position_embeddings", 2048), rope_theta=float(theta),
        rope_scaling="linear" if kind == "linear" else None, rope_factor=float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0,
        norm_eps=hf.get("rms_norm_eps", 1e-6), tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def _name_pairs(n_layers: int) -> list[tuple[str, str]]:
    pairs = list(_GLOBAL_NAMES)
    for i in range(n_layers):
        pairs += [(a.format(i=i), b.format(i=i)) for a, b in _LAYER_NAMES]
    return pairs


def to_hf(model: LLM) -> tuple[dict, dict[str, Tensor]]:
    """(config.json contents, state dict under Hugging Face's names). A tied output layer is left out."""
    cfg = hf_config(model.cfg)
    ours = model.state_dict()
    state = {hf: ours[name].detach().contiguous() for name, hf in _name_pairs(model.cfg.n_layers)}
    if model.cfg.tie_embeddings:
        del state["lm_head.weight"]  # HF re-ties it from tie_word_embeddings
    return cfg, state


def from_hf(config: dict, state: dict[str, Tensor]) -> LLM:
    """An `LLM` from a Llama config dict and its state dict (Hugging Face names)."""
    cfg = _config_from_hf(config)
    with torch.device("meta"):
        model = LLM(cfg)
    ours = {}
    for name, hf in _name_pairs(cfg.n_layers):
        if hf not in state:
            if name == "lm_head.weight" and cfg.tie_embeddings:
                continue
            raise ConfigError(f"the checkpoint lacks {hf!r}; is it a complete LlamaForCausalLM?")
        ours[name] = state[hf]
    unexpected = set(state) - {hf for _, hf in _name_pairs(cfg.n_layers)} - {f"model.layers.{i}.self_attn.rotary_emb.inv_freq" for i in range(cfg.n_layers)}
    if unexpected:
        raise ConfigError(f"the checkpoint has weights minillm's model does not: {sorted(unexpected)[:5]}")
    # assign=True adopts the checkpoint's tensors (and dtype) in place of the meta placeholders.
    model.load_state_dict(ours, strict=not cfg.tie_embeddings, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.token_embedding.weight
    # The rotary tables are not in checkpoints (a pure function of the config); the blocks hold this
    # same module as their position hook, so its meta buffers are replaced in place.
    tables = rope_for(cfg)
    model.rope.register_buffer("cos", tables.cos, persistent=False)
    model.rope.register_buffer("sin", tables.sin, persistent=False)
    leftover = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if leftover:
        raise ConfigError(f"the checkpoint left {leftover[:3]} unset")
    return model


def save_hf(model: LLM, folder: str | os.PathLike[str]) -> Path:
    """Write config.json and model.safetensors into `folder`, each atomically (temporary file, then rename)."""
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ConfigError("saving in Hugging Face's format needs safetensors: pip install 'minillm[hf]'") from None
    config, state = to_hf(model)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.safetensors.tmp"
    save_file(state, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")
    tmp = folder / "config.json.tmp"
    tmp.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, folder / "config.json")
    return folder


def load_hf(folder: str | os.PathLike[str]) -> LLM:
    """Read a Llama checkpoint folder (config.json plus model.safetensors or sharded safetensors)."""
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise ConfigError("reading Hugging Face checkpoints needs safetensors: pip install 'minillm[hf]'") from None
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{folder}: no config.json; expected a folder written by save_pretrained or save_hf")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    # The weights are model.safetensors, or the shards an index lists; other files in the folder
    # (an adapter, a second export) must not be mixed in.
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map", {})
        files = [folder / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise ConfigError(f"{folder}: the index lists shards that are missing: {missing[:3]}")
    else:
        files = [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []
    if not files:
        bins = sorted(folder.glob("*.bin"))
        hint = " (it holds pickle .bin files, which minillm does not load: they can run code; convert them to safetensors)" if bins else ""
        raise ConfigError(f"{folder}: no model.safetensors (or model.safetensors.index.json) weights{hint}")
    state: dict[str, Tensor] = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:  # safetensors raises its own error types for damaged files
            raise ConfigError(f"{f}: not a readable safetensors file ({e}); the download may be truncated") from None
    return from_hf(config, state)
