"""Pretraining: one loop for the CPU, CUDA and MPS, with checkpoints that resume to the bit.

    config (TOML + overrides) -> tokenizer -> token shards -> model + optimizer -> the loop:
        for each step:  lr = lr_at(step)                          (a pure function of the step)
                        loss = mean over `accum` micro-batches    (gradient accumulation)
                        clip the gradient norm, stop on NaN/inf, optimizer.step()
                        log; every k steps: evaluate, sample, checkpoint

The pieces are separate so that later chapters reuse them: `train_step` takes any loss function
and any batch source (supervised fine-tuning in chapter 08, DPO in chapter 09 pass their own), and
a `Strategy` decides how the model is wrapped and whether this process logs (DDP and FSDP replace
`SingleDevice` in chapter 07). Everything this module writes goes through `minillm.files`.

A run folder holds ``config.toml`` (the resolved config), ``metrics.jsonl`` (one JSON object per
logged step or evaluation), ``samples.jsonl``/``samples.txt``, ``tokenizer.bpe``, ``data/`` (the
token shards, unless ``data_dir`` names another folder) and ``checkpoints/step_NNNNNNN/``.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from minillm.files import OutputError, atomic_dir, atomic_write
from minillm.model import LLM, ConfigError, ModelConfig
from minillm.tokenizer import Tokenizer

__all__ = [
    "TrainError", "CheckpointError", "NonFiniteError", "TrainConfig", "check_config", "load_config", "apply_overrides",
    "config_to_toml", "lr_at", "build_optimizer", "MultiOptimizer", "Strategy", "SingleDevice",
    "checkpoint_blocks", "STRATEGIES", "lm_loss",
    "train_step", "evaluate", "peak_flops", "cpu_matmul_peak", "save_checkpoint", "load_checkpoint",
    "latest_checkpoint", "load_for_inference", "train", "TrainResult", "plot_run",
]


# The values of TrainConfig.strategy: one process, or torch's engines under torchrun (minillm.distributed.make_strategy).
STRATEGIES = ("single", "ddp", "zero1", "zero2", "fsdp")


class TrainError(ValueError):
    """A training input that cannot work (config, override, data, run folder); says how to fix it."""


class CheckpointError(TrainError):
    """A checkpoint that cannot be read: missing, truncated, foreign or unsafe files."""


class NonFiniteError(TrainError):
    """The loss or the gradient norm became NaN or infinite; the run stopped before the update."""


# --------------------------------------------------------------------------------------------
# The config


class RunConfig:
    """What every run config shares (TrainConfig, and later chapters' sft.SFTConfig, dpo.DPOConfig):
    the end of the learning-rate decay, a dict form for TOML (betas as a list), and a constructor from
    a dict that names unknown fields. `error` is the exception a subclass raises for its bad inputs."""

    error: type[TrainError] = TrainError

    @property
    def end_of_decay(self) -> int:
        return self.decay_end or self.max_steps  # type: ignore[attr-defined]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)  # type: ignore[call-overload]
        d["betas"] = list(self.betas)  # type: ignore[attr-defined]
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]):  # noqa: ANN206
        known = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise cls.error(f"unknown config field(s) {unknown}; known fields: {', '.join(known)}")
        return cls(**d)


@dataclass
class TrainConfig(RunConfig):
    """Everything a run depends on. Saved as the run folder's config.toml; see configs/README.md."""

    # What to train, on what.
    model: str = "tiny"  # a ModelConfig preset
    model_overrides: dict[str, Any] = field(default_factory=dict)  # [model_overrides] in TOML, model.X=... on the CLI
    data: str = "stdlib"  # 'stdlib', a file, folder or glob, or hf:NAME (minillm.corpus.load_corpus)
    data_dir: str = ""  # where the token shards live; "" = OUT/data. Prepared there if missing
    val_fraction: float = 0.05
    tokenizer: str = ""  # a tokenizer file; "" = train a BPE of the model's vocab_size on the train split
    out: str = "runs/tiny"  # the run folder
    seed: int = 1337
    # Where and how to compute.
    device: str = "auto"  # auto: cuda, else mps, else cpu
    dtype: str = "auto"  # auto: bfloat16 autocast on CUDA with bf16 support, else float32
    compile: bool = False
    strategy: str = "single"  # or "ddp", "zero1", "zero2", "fsdp" under torchrun (minillm.distributed, chapter 07)
    activation_checkpointing: bool = False  # recompute each block's activations in backward: less memory, ~1/3 more compute
    # How much data per step, and for how long.
    batch_size: int = 16  # sequences per micro-batch (per process)
    seq_len: int = 256
    tokens_per_step: int = 0  # 0: one micro-batch; else accumulate batch_size*seq_len chunks up to this
    max_steps: int = 1000
    # The optimizer and its schedule.
    optimizer: str = "adamw"  # or "muon" (hidden matrices; AdamW for embeddings, head and norms)
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 100
    decay_end: int = 0  # 0: max_steps
    schedule: str = "cosine"  # or "wsd" (warmup, stable, decay)
    wsd_decay_fraction: float = 0.2  # the last fraction of decay_end spent decaying
    wsd_decay_shape: str = "sqrt"  # "linear", or "sqrt" (1 - sqrt)
    weight_decay: float = 0.1
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0: no clipping (the norm is still logged)
    muon_lr: float = 0.0  # 0: lr (Muon's update is scaled to AdamW's size, "match_rms_adamw")
    # What to watch, and how often (in steps; 0 turns a periodic action off).
    log_every: int = 10
    eval_every: int = 250
    eval_batches: int = 20
    final_eval_batches: int = 0  # 0: the whole validation shard
    sample_every: int = 0
    sample_prompt: str = "    def __init__(self"
    sample_tokens: int = 64
    checkpoint_every: int = 500
    keep_checkpoints: int = 2
    logger: str = "none"  # or "tensorboard", "wandb" (optional packages)
    peak_flops: float = 0.0  # per device; 0: look the device up (GPU table, or a measured CPU matmul peak)

    def __post_init__(self) -> None:
        self.validate()

    # -- checking --------------------------------------------------------------------------------

    def validate(self) -> TrainConfig:
        """Check every field's type, then the values; raises TrainError naming the field."""
        check_config(self, positive=("batch_size", "seq_len"),
                     non_negative=("max_steps", "tokens_per_step", "eval_every", "eval_batches", "final_eval_batches",
                                   "sample_every", "sample_tokens", "checkpoint_every", "keep_checkpoints", "peak_flops"),
                     choices={"strategy": STRATEGIES})

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise TrainError(msg)

        need(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        need(not (self.optimizer == "muon" and self.strategy in ("zero1", "zero2", "fsdp")),
             f"optimizer='muon' cannot run with strategy={self.strategy!r}: Muon orthogonalizes whole matrices, and this "
             "strategy shards them (or their optimizer state, by torch's own partition); use strategy=ddp, or optimizer=adamw")
        micro = self.batch_size * self.seq_len
        need(self.tokens_per_step % micro == 0,
             f"tokens_per_step ({self.tokens_per_step}) must be a multiple of batch_size * seq_len = {micro} "
             f"(gradient accumulation runs whole micro-batches); e.g. tokens_per_step={max(1, round(self.tokens_per_step / micro)) * micro}")
        self.model_config()  # the model preset and overrides must make a valid model
        return self

    def model_config(self) -> ModelConfig:
        """The model's config: the preset with the overrides applied (and the context fitting seq_len)."""
        try:
            cfg = ModelConfig.preset(self.model, **self.model_overrides)
        except TypeError as e:  # an unknown keyword
            raise TrainError(f"model_overrides: {e}; known fields: {sorted(_MODEL_HINTS)}") from None
        except ConfigError as e:
            raise TrainError(f"model: {e}") from None
        if self.seq_len > cfg.max_seq_len:
            raise TrainError(f"seq_len ({self.seq_len}) exceeds the model's context (max_seq_len={cfg.max_seq_len}); "
                             f"lower seq_len or set model.max_seq_len={self.seq_len}")
        return cfg

    def accum_steps(self, world_size: int = 1) -> int:
        """Micro-batches per optimizer step on each of `world_size` processes."""
        micro = self.batch_size * self.seq_len * world_size
        if self.tokens_per_step == 0:
            return 1
        if self.tokens_per_step % micro:
            raise TrainError(f"tokens_per_step ({self.tokens_per_step}) must be a multiple of batch_size * seq_len * "
                             f"world_size = {micro}")
        return self.tokens_per_step // micro



_HINTS = typing.get_type_hints(TrainConfig)
_MODEL_HINTS = typing.get_type_hints(ModelConfig)


@functools.cache
def _hints_of(cls: type) -> dict[str, object]:
    """The field types of a config dataclass (TrainConfig, or another chapter's, such as sft.SFTConfig)."""
    return {f.name: typing.get_type_hints(cls)[f.name] for f in dataclasses.fields(cls)}


def check_config(cfg: Any, *, positive: Iterable[str] = (), non_negative: Iterable[str] = (),
                 choices: dict[str, tuple[str, ...]] | None = None) -> None:
    """Coerce every field of a config dataclass to its declared type, in place; then check the fields
    that every training config shares (the optimizer and its schedule, which `lr_at` and
    `build_optimizer` read; the device, dtype, logger and run folder), then the fields named:
    `positive` ones at least 1, `non_negative` ones at least 0, `choices` among their values.
    Raises TrainError naming the field. TrainConfig uses it, and so does sft.SFTConfig."""
    for name, hint in _hints_of(type(cfg)).items():
        setattr(cfg, name, _coerce(name, getattr(cfg, name), hint))

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise TrainError(msg)

    for name in positive:
        need(getattr(cfg, name) >= 1, f"{name} must be at least 1, got {getattr(cfg, name)}")
    for name in ("warmup_steps", "decay_end", "log_every", "lr", "min_lr", "weight_decay", "grad_clip", "muon_lr",
                 *non_negative):
        need(getattr(cfg, name) >= 0, f"{name} must be >= 0, got {getattr(cfg, name)}")
    need(cfg.min_lr <= cfg.lr, f"min_lr ({cfg.min_lr}) must not exceed lr ({cfg.lr})")
    need(cfg.eps > 0, f"eps must be positive, got {cfg.eps}")
    need(all(0 <= b < 1 for b in cfg.betas), f"betas must be in [0, 1), got {list(cfg.betas)}")
    need(0 < cfg.wsd_decay_fraction <= 1, f"wsd_decay_fraction must be in (0, 1], got {cfg.wsd_decay_fraction}")
    for name, values in {"schedule": ("cosine", "wsd"), "wsd_decay_shape": ("linear", "sqrt"),
                         "optimizer": ("adamw", "muon"), "dtype": ("auto", "float32", "bfloat16"),
                         "logger": ("none", "tensorboard", "wandb"), **(choices or {})}.items():
        need(getattr(cfg, name) in values, f"{name} must be {' or '.join(map(repr, values))}, got {getattr(cfg, name)!r}")
    need(cfg.device == "auto" or cfg.device.split(":")[0] in ("cpu", "cuda", "mps"),
         f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps', got {cfg.device!r}")
    need(cfg.out != "", "out (the run folder) is empty; give a folder, e.g. out=runs/tiny")
    need(cfg.decay_end == 0 or cfg.decay_end > cfg.warmup_steps,
         f"decay_end ({cfg.decay_end}) must come after warmup_steps ({cfg.warmup_steps}), or be 0 for max_steps")


class Config(Protocol):
    """What the run-folder helpers need of a config: TrainConfig, or a later chapter's (sft.SFTConfig)."""

    out: str

    def to_dict(self) -> dict[str, Any]: ...


C = typing.TypeVar("C", bound=Config)




def _type_name(hint: object) -> str:
    if hint is type(None):
        return "none"
    if isinstance(hint, type):
        return hint.__name__
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple:
        return f"{len(args)} numbers, e.g. 0.9,0.95"
    if typing.get_origin(hint) is dict:
        return "a table of model fields"
    return " or ".join(_type_name(a) for a in args)


def _coerce(name: str, value: object, hint: object) -> object:
    """`value` as the type `hint` names (an int is a fine float), or a TrainError naming the field."""
    bad = TrainError(f"{name} must be of type {_type_name(hint)}, got {value!r} ({type(value).__name__})")
    if hint is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise bad
        return int(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)) or not math.isfinite(value):
            raise bad
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise bad
        return value
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise bad
        return tuple(_coerce(name, v, a) for v, a in zip(value, args))
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        return {k: _coerce(f"model.{k}", v, _model_hint(k)) for k, v in value.items()}
    if origin in (typing.Union, types.UnionType):  # X | None (model fields)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                with contextlib.suppress(TrainError):
                    return _coerce(name, value, a)
        raise bad
    raise TypeError(f"no rule for the type {hint!r} of {name}")  # a field added without a rule: a bug


def _model_hint(key: str) -> object:
    if key not in _MODEL_HINTS:
        raise TrainError(f"unknown model field {key!r}; known fields: {', '.join(_MODEL_HINTS)}")
    return _MODEL_HINTS[key]


def _parse(name: str, text: str, hint: object) -> object:
    """Command-line text as the type `hint` names ('none' for an optional model field)."""
    bad = TrainError(f"{name} must be of type {_type_name(hint)}, got {text!r}")
    text = text.strip()
    if hint is bool:
        lowered = text.lower()
        if lowered not in ("true", "false", "1", "0", "yes", "no"):
            raise bad
        return lowered in ("true", "1", "yes")
    if hint is int:
        try:
            return int(text)
        except ValueError:
            raise bad from None
    if hint is float:
        try:
            value = float(text)
        except ValueError:
            raise bad from None
        if not math.isfinite(value):
            raise bad
        return value
    if hint is str:
        return text
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is tuple:
        parts = text.strip("()[] ").split(",")
        if len(parts) != len(args):
            raise bad
        return tuple(_parse(name, p, a) for p, a in zip(parts, args))
    if origin in (typing.Union, types.UnionType):
        if text.lower() == "none" and type(None) in args:
            return None
        for a in args:
            if a is not type(None):
                with contextlib.suppress(TrainError):
                    return _parse(name, text, a)
        raise bad
    raise bad


def apply_overrides(cfg: C, overrides: dict[str, str] | Iterable[str]) -> C:
    """A new config with command-line overrides applied: {"lr": "1e-3", "model.d_model": "128"}
    or ["lr=1e-3", ...]. Unknown keys and values of the wrong type raise TrainError.

    `cfg` is a TrainConfig or any config dataclass with to_dict/from_dict (sft.SFTConfig): the field
    types come from the class, and model.FIELD applies where the class has `model_overrides`."""
    if not isinstance(overrides, dict):
        pairs = {}
        for item in overrides:
            key, sep, value = item.partition("=")
            if not sep:
                raise TrainError(f"an override is KEY=VALUE, got {item!r}; e.g. --set lr=1e-3 or --set model.d_model=128")
            pairs[key.strip()] = value
        overrides = pairs
    hints = _hints_of(type(cfg))
    has_model = "model_overrides" in hints
    d = cfg.to_dict()
    if has_model:
        d["model_overrides"] = dict(d["model_overrides"])
    for key, text in overrides.items():
        key = key.replace("-", "_")
        if has_model and key.startswith(("model.", "model_overrides.")):
            sub = key.split(".", 1)[1]
            d["model_overrides"][sub] = _parse(key, text, _model_hint(sub))
        elif key in hints and key != "model_overrides":
            d[key] = _parse(key, text, hints[key])
        else:
            raise TrainError(f"unknown config field {key!r}; known fields: {', '.join(k for k in hints if k != 'model_overrides')}"
                             + (", and model.FIELD for the model" if has_model else ""))
    return type(cfg).from_dict(d)


def _read_toml(path: Path) -> dict[str, Any]:
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # Python 3.10 has no tomllib; tomli is the same parser, published separately
        try:
            import tomli as tomllib
        except ImportError:
            raise TrainError(f"reading {path} on Python 3.10 needs the tomli package: pip install tomli") from None
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise TrainError(f"{path}: no such config file; check the path (the presets are in configs/)") from None
    except IsADirectoryError:
        raise TrainError(f"{path}: is a folder; give a .toml config file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise TrainError(f"{path}: not valid TOML ({e})") from None


def load_config(path: str | os.PathLike[str] | None = None, overrides: dict[str, str] | Iterable[str] = (),
                cls: type[C] = TrainConfig) -> C:  # type: ignore[assignment]
    """The config of a TOML file (or the defaults), with command-line overrides applied.
    `cls` is TrainConfig, or another config dataclass with to_dict/from_dict (sft.SFTConfig)."""
    cfg = cls()
    if path is not None:
        d = _read_toml(Path(path))
        if "model_overrides" in _hints_of(cls):
            d.setdefault("model_overrides", {})
        try:
            cfg = cls.from_dict({**cfg.to_dict(), **d})
        except TrainError as e:
            raise TrainError(f"{path}: {e}") from None
    return apply_overrides(cfg, overrides)


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # round-trips exactly; 'inf' and 'nan' never get here (validated)
    if isinstance(value, str):
        # A TOML basic string: JSON's escapes, plus DEL and the other controls as \uXXXX.
        return '"' + "".join(c if c.isprintable() and c not in '"\\' else
                             {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\t": "\\t"}.get(c, f"\\u{ord(c):04x}")
                             if ord(c) < 0x10000 else c for c in value) + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {value!r} as TOML")


def config_to_toml(cfg: Config) -> str:
    """The config as TOML: one line per field, then the [model_overrides] table (None = the preset's)
    if the config has one. Works for TrainConfig and any other config dataclass with to_dict."""
    d = cfg.to_dict()
    lines = [f"# minillm config: {type(cfg).__module__}.{type(cfg).__name__} (written by minillm; --config reads it back)"]
    lines += [f"{k} = {_toml_value(v)}" for k, v in d.items() if k != "model_overrides"]
    if "model_overrides" in d:
        lines += ["", "[model_overrides]"]
        lines += [f"{k} = {_toml_value(v)}" for k, v in d["model_overrides"].items() if v is not None]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------
# The learning-rate schedule: a pure function of the step, so resuming needs no scheduler state


def lr_at(step: int, cfg: TrainConfig) -> float:
    """The learning rate of optimizer step `step` (0-based).

    Warmup: lr * step / warmup_steps for step < warmup_steps (the first step has lr 0).
    cosine: from lr down to min_lr along half a cosine, reaching min_lr at decay_end.
    wsd: flat at lr, then down to min_lr over the last wsd_decay_fraction of decay_end, linearly or
    as 1 - sqrt(progress) (which decays fast at first, then gently).
    After decay_end: min_lr.
    """
    warmup, end, top, bottom = cfg.warmup_steps, cfg.end_of_decay, cfg.lr, cfg.min_lr
    if step < warmup:
        return top * step / warmup
    if step >= end:
        return bottom
    if cfg.schedule == "cosine":
        progress = (step - warmup) / (end - warmup)
        return bottom + 0.5 * (1.0 + math.cos(math.pi * progress)) * (top - bottom)
    decay_steps = max(1, round(cfg.wsd_decay_fraction * end))
    start = max(warmup, end - decay_steps)
    if step < start:
        return top
    progress = (step - start) / (end - start)
    shape = progress if cfg.wsd_decay_shape == "linear" else math.sqrt(progress)
    return bottom + (1.0 - shape) * (top - bottom)


# --------------------------------------------------------------------------------------------
# Optimizers


class MultiOptimizer:
    """Several optimizers stepped as one (Muon for the hidden matrices, AdamW for the rest).

    Only what the loop uses: step, zero_grad, param_groups (each group's lr is set by the loop)
    and a state dict holding each optimizer's own.
    """

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer]) -> None:
        self.optimizers = optimizers
        self.param_groups = [g for opt in optimizers.values() for g in opt.param_groups]

    def step(self) -> None:
        for opt in self.optimizers.values():
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers.values():
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {name: opt.state_dict() for name, opt in self.optimizers.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state) != set(self.optimizers):
            raise CheckpointError(f"the optimizer state holds {sorted(state)}, expected {sorted(self.optimizers)}; "
                                  "was the checkpoint written with another optimizer setting?")
        for name, opt in self.optimizers.items():
            opt.load_state_dict(state[name])


Optimizer = torch.optim.Optimizer | MultiOptimizer


def adamw_param_groups(model: torch.nn.Module, cfg: TrainConfig, no_decay: Iterable[Tensor] = ()) -> list[dict[str, Any]]:
    """AdamW's two groups: the matrices (p.dim() >= 2) with weight decay, the rest without. Under
    FSDP2 the parameters are DTensors that keep their global shape, so dim() sorts them the same.
    `no_decay` names matrices to keep out of weight decay (sft: an embedding whose old rows must not move)."""
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight comes once
    plain = {id(p) for p in no_decay}
    decayed = {id(p) for p in params if p.dim() >= 2 and id(p) not in plain}
    return [{"params": [p for p in params if id(p) in decayed], "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
            {"params": [p for p in params if id(p) not in decayed], "weight_decay": 0.0, "lr_scale": 1.0}]


def build_optimizer(model: LLM, cfg: TrainConfig, device: torch.device, no_decay: Iterable[Tensor] = ()) -> Optimizer:
    """AdamW (or Muon + AdamW) with weight decay on the matrices only.

    Decayed: every parameter with two or more dimensions, the embedding included (as nanoGPT and
    GPT-2 do: the embedding is a matrix that grows like the others). Not decayed: norm weights and
    biases, which set scales and offsets, where pulling toward zero only hurts. Each group's
    "lr_scale" multiplies the schedule's lr (Muon may want its own). `no_decay`: see adamw_param_groups
    (AdamW only).
    """
    params = [p for p in model.parameters() if p.requires_grad]  # a tied weight comes once
    matrices = [p for p in params if p.dim() >= 2]
    vectors = [p for p in params if p.dim() < 2]
    # fused=True is the fastest AdamW on CUDA; foreach (one kernel per group of tensors) elsewhere.
    impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
    adamw_kw = dict(lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **impl)
    if no_decay and cfg.optimizer != "adamw":
        raise TrainError(f"no_decay is for optimizer='adamw', got {cfg.optimizer!r}")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(adamw_param_groups(model, cfg, no_decay), **adamw_kw)
    # Muon orthogonalizes the update of a hidden matrix; the embedding, the output layer and the
    # vectors keep AdamW (Muon's authors' recommendation: the ends of the network are not "hidden").
    ends = {id(p) for m in (model.token_embedding, model.lm_head, model.pos_embedding) if m is not None
            for p in m.parameters()}
    hidden = [p for p in matrices if id(p) not in ends]
    others = [p for p in matrices if id(p) in ends]
    scale = (cfg.muon_lr / cfg.lr) if (cfg.muon_lr and cfg.lr) else 1.0
    muon = torch.optim.Muon([{"params": hidden, "lr_scale": scale}], lr=cfg.lr * scale, weight_decay=cfg.weight_decay,
                            adjust_lr_fn="match_rms_adamw")
    adamw = torch.optim.AdamW([{"params": others, "weight_decay": cfg.weight_decay, "lr_scale": 1.0},
                               {"params": vectors, "weight_decay": 0.0, "lr_scale": 1.0}], **adamw_kw)
    return MultiOptimizer({"muon": muon, "adamw": adamw})


# --------------------------------------------------------------------------------------------
# Devices, precision and throughput


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda, else mps, else cpu; a named device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainError(f"device={name!r} but CUDA is not available here; use device=auto or device=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise TrainError(f"device={name!r} but MPS is not available here; use device=auto or device=cpu")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """The autocast dtype: 'auto' is bfloat16 on a CUDA GPU that supports it, float32 elsewhere."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16}[name]


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """bf16 autocast (matmuls in bf16, reductions and the loss in fp32), or nothing for fp32.

    The weights and the optimizer stay in fp32 either way, so no loss scaling is needed (fp16 would
    need a GradScaler, which is why it is not offered)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# Dense bf16 peak FLOP/s by GPU name (the vendors' data sheets, without sparsity).
GPU_PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 70e12, "L4": 121e12,
                  "RTX 4090": 165e12, "RTX 3090": 71e12}


@functools.cache
def cpu_matmul_peak(seconds: float = 1.0, n: int = 2048) -> float:
    """The fp32 FLOP/s of a large matmul on this CPU (best of about `seconds` of trials), once per process."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up: thread pool, caches
    best, start = float("inf"), time.perf_counter()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def peak_flops(device: torch.device, dtype: torch.dtype, override: float = 0.0) -> float:
    """Peak FLOP/s for MFU: the override, the GPU table (bf16 dense; fp32 without tensor cores is
    far lower, so an fp32 GPU run's MFU reads against the bf16 peak), or the measured CPU matmul."""
    if override:
        return override
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return next((v for k, v in GPU_PEAK_FLOPS.items() if k in name), 0.0)
    if device.type == "cpu":
        return cpu_matmul_peak()
    return 0.0  # unknown (mps): MFU is left out


# --------------------------------------------------------------------------------------------
# The step


class BatchSource(Protocol):
    """Where training batches come from: `minillm.data.RandomSampler`, or a chapter's own."""

    def next_batch(self) -> Any: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


LossFn = Callable[[torch.nn.Module, Any], Tensor]


def lm_loss(model: torch.nn.Module, batch: tuple[Tensor, Tensor]) -> Tensor:
    """The pretraining loss: mean next-token cross-entropy of a batch (x, y)."""
    x, y = batch
    return model(x, y)[1]


def checkpoint_blocks(model: LLM) -> LLM:
    """Activation checkpointing: each transformer block keeps only its input in training, and
    backward recomputes the rest (torch.utils.checkpoint, non-reentrant). Memory for activations
    falls from all of every block's tensors to one (B, T, d_model) input per block, for about one
    more forward pass of compute. The recomputation replays the same operations (and the RNG state,
    for dropout), so the loss and the gradients are those without it, to the bit.

    The blocks' own `forward` is replaced on the instances, so parameter names, state dicts and
    FSDP2's per-block sharding (applied after this) are unchanged. Inference (no grad, eval mode or
    a KV cache) runs the plain forward. Returns the model.
    """
    for block in model.blocks:
        # A bound method on the instance (not a closure): a deep copy of the model rebinds it to the copy.
        block.forward = types.MethodType(_checkpointed_forward, block)
    return model


def _checkpointed_forward(block: torch.nn.Module, x: Tensor, cache: Any = None, **kwargs: Any) -> Tensor:
    from torch.utils.checkpoint import checkpoint

    plain = functools.partial(type(block).forward, block)  # the class's forward (FSDP2's subclass keeps it)
    if cache is None and block.training and torch.is_grad_enabled():
        return checkpoint(plain, x, None, use_reentrant=False, **kwargs)
    return plain(x, cache, **kwargs)


class Strategy:
    """How the step is spread over devices. This one: a single process on one device.

    minillm.distributed subclasses it for torch's DDP, ZeRO-1 and FSDP2 (chapter 07). The loop calls,
    in order: `setup` (the run's config, device and dtype), `wrap` (before the optimizer is built:
    FSDP2 must shard the parameters first), `build_optimizer`; each step `no_sync` around all but
    the last micro-batch, `clip_grad_norm_`, `reduce_mean` for the logged numbers; and for
    checkpoints `full_state_dict`, `save_optimizer` / `load_optimizer`, with `gather_object` and
    `barrier` to line the ranks up. Only the main process writes files.
    """

    rank: int = 0
    world_size: int = 1
    name: str = "single"
    # How the optimizer state is stored in a checkpoint: "full" (optimizer.pt, one file for the whole
    # model), "zero1" (one file per rank) or "dcp" (a torch.distributed.checkpoint folder, reshardable).
    optimizer_format: str = "full"
    device: torch.device | None = None  # the device this rank must use (a GPU per rank); None: cfg.device decides

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self, cfg: TrainConfig, device: torch.device, dtype: torch.dtype) -> None:
        """Called once before `wrap`, with the run's config, device and autocast dtype."""

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def build_optimizer(self, model: LLM, cfg: TrainConfig, device: torch.device) -> Optimizer:
        """The optimizer over `model` (the unwrapped LLM, sharded in place if the strategy shards)."""
        return build_optimizer(model, cfg, device)

    def no_sync(self, model: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def clip_grad_norm_(self, model: torch.nn.Module, max_norm: float) -> Tensor:
        """Clip the gradients to a total norm of `max_norm` (inf: only measure); the norm before clipping."""
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)

    def reduce_mean(self, t: Tensor) -> Tensor:
        return t

    def reduce_sum(self, t: Tensor) -> Tensor:
        return t

    def gather_object(self, obj: Any) -> list[Any]:
        """Every rank's `obj` (JSON-like), in rank order, on every rank."""
        return [obj]

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj`, on every rank."""
        return obj

    def barrier(self) -> None:
        pass

    def full_state_dict(self, model: LLM) -> dict[str, Tensor] | None:
        """The whole model's weights on the main process (None elsewhere). A collective under FSDP."""
        return model.state_dict() if self.is_main else None

    def inference_model(self, model: LLM) -> LLM | None:
        """A plain LLM with the current weights on the main process, for sampling (None elsewhere)."""
        return model if self.is_main else None

    def save_optimizer(self, folder: Path, model: LLM, optimizer: Optimizer) -> None:
        """Write the optimizer state into the checkpoint folder being built (every rank calls it)."""
        if self.is_main:
            torch.save(optimizer.state_dict(), folder / "optimizer.pt")

    def load_optimizer(self, folder: Path, model: LLM, optimizer: Optimizer) -> None:
        """Restore what `save_optimizer` wrote (every rank calls it)."""
        _load_optimizer_file(optimizer, folder / "optimizer.pt")


class SingleDevice(Strategy):
    pass


@dataclass
class StepResult:
    loss: float
    grad_norm: float


def train_step(model: torch.nn.Module, optimizer: Optimizer, next_batch: Callable[[], Any], *,
               step: int, accum: int = 1, loss_fn: LossFn = lm_loss, grad_clip: float = 0.0,
               amp: contextlib.AbstractContextManager | None = None, strategy: Strategy | None = None) -> StepResult:
    """One optimizer step over `accum` micro-batches; the learning rate is already set.

    Each micro-batch's loss is divided by `accum` before backward, so the summed gradients equal
    those of one batch `accum` times larger (when every micro-batch counts as many tokens). A NaN
    or infinite loss or gradient norm raises NonFiniteError *before* the update, so the weights
    stay as they were.
    """
    strategy = strategy or SingleDevice()
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=next(iter(model.parameters())).device)
    for micro in range(accum):
        batch = next_batch()
        with strategy.no_sync(model, last=micro == accum - 1), (amp or contextlib.nullcontext()):
            loss = loss_fn(model, batch)
        (loss / accum).backward()
        total += loss.detach()
    # clip_grad_norm_ returns the norm before clipping; with max_norm=inf it only measures.
    norm = strategy.clip_grad_norm_(model, grad_clip if grad_clip > 0 else float("inf"))
    loss_value, norm_value = strategy.reduce_mean(torch.stack([total / accum, norm.float()])).tolist()
    if not (math.isfinite(loss_value) and math.isfinite(norm_value)):
        raise NonFiniteError(f"step {step}: the loss is {loss_value} and the gradient norm {norm_value}; the update was "
                             "not applied. Lower lr, raise warmup_steps or check the data, then resume from the last checkpoint")
    optimizer.step()
    return StepResult(loss_value, norm_value)


@torch.no_grad()
def _all_targets(batch: Any) -> int:
    return batch[1].numel()


def evaluate(model: torch.nn.Module, batches: Iterable[Any], *, loss_fn: LossFn = lm_loss,
             amp: contextlib.AbstractContextManager | None = None, strategy: Strategy | None = None,
             count_targets: Callable[[Any], int] = _all_targets) -> tuple[float, int]:
    """The mean loss over `batches` (each weighted by its number of targets) and that number; under a
    distributed strategy, over every rank's batches (a collective: every rank must call it).

    `count_targets(batch)` is how many targets a batch's mean loss averages: every entry of y by default
    (pretraining); a masked loss passes the number that counts (sft: `lambda b: b.targets`), or the
    mean would give a batch of short answers as much weight as its padding."""
    strategy = strategy or SingleDevice()
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in batches:
            with amp or contextlib.nullcontext():
                loss = loss_fn(model, batch)
            n = count_targets(batch)
            total += loss.float().item() * n
            count += n
    finally:
        model.train(was_training)
    if strategy.world_size > 1:  # each rank scored its own windows: the mean over all of them
        total, count = strategy.reduce_sum(torch.tensor([total, count], dtype=torch.float64)).tolist()
        count = int(count)
    return (total / count if count else float("nan")), count


# --------------------------------------------------------------------------------------------
# Checkpoints


_STATE_FORMAT = "minillm-checkpoint-v1"
_CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "tokenizer.bpe", "config.toml")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _safetensors():
    try:
        import safetensors.torch
    except ImportError:
        raise TrainError("checkpoints are written with safetensors: pip install safetensors (or 'minillm[hf]')") from None
    return safetensors.torch


def _model_tensors(model: LLM, state: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The weights to save (`state`, default the model's): one copy of a tied matrix (safetensors
    refuses shared storage)."""
    state = {k: v.detach().contiguous() for k, v in (model.state_dict() if state is None else state).items()}
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    return state


def rng_state() -> dict[str, Any]:
    """Every random-number generator the loop may touch, as JSON: torch (CPU and CUDA), random, numpy."""
    def b64(t: Tensor) -> str:
        return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")

    np_state = np.random.get_state()
    version, internal, gauss = random.getstate()
    return {
        "torch": b64(torch.get_rng_state()),
        "cuda": [b64(s) for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    def unb64(s: str) -> Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(unb64(state["torch"]))
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([unb64(s) for s in state["cuda"]])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))


def save_checkpoint(folder: str | os.PathLike[str], model: LLM, optimizer: Optimizer, tokenizer: Tokenizer,
                    cfg: Config, state: dict[str, Any], extra: Callable[[Path], Iterable[str]] | None = None) -> Path:
    """Write a checkpoint folder as one step (minillm.files.atomic_dir): the weights (safetensors),
    the optimizer (torch.save of plain tensors), the tokenizer, the config, and state.json last,
    with `state` (step, sampler, ...), every RNG and the SHA-256 of each other file.

    `extra(tmp)` may write more files into the folder being built and return their names (a LoRA
    adapter, chapter 08); they are checksummed like the others, so loading checks them too."""
    folder = Path(folder)
    with atomic_dir(folder, overwrite=True) as tmp:
        _safetensors().save_file(_model_tensors(model), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        tokenizer.save(tmp / "tokenizer.bpe")
        (tmp / "config.toml").write_text(config_to_toml(cfg), encoding="utf-8")
        names = [*_CHECKPOINT_FILES, *(extra(tmp) if extra is not None else ())]
        full = {"format": _STATE_FORMAT, **state, "rng": rng_state(), "model_config": model.cfg.to_dict(),
                "files": {name: _sha256(tmp / name) for name in names}}
        (tmp / "state.json").write_text(json.dumps(full), encoding="utf-8")
    return folder


def _save_distributed_checkpoint(folder: Path, model: LLM, optimizer: Optimizer, tokenizer: Tokenizer, cfg: TrainConfig,
                                state: dict[str, Any], sampler: BatchSource, strategy: Strategy) -> None:
    """A checkpoint written by every rank of a distributed run, as one step. A collective.

    Rank 0 opens the temporary folder (minillm.files.atomic_dir, beside the target: the same
    filesystem, which every rank must see) and broadcasts its name. Rank 0 writes the full weights
    (model.safetensors, gathered from the shards under FSDP), the tokenizer and the config; the
    strategy writes the optimizer state (optimizer.pt from rank 0, one optimizer.rank{R}.pt per rank
    under zero1, or a DCP folder optimizer/ under fsdp and zero2, each rank its shards). After a
    barrier every rank hashes its share of the files; rank 0 writes state.json last (the step, the
    world size, every rank's sampler and RNG state, and the SHA-256 of every other file, the DCP
    folder's included), and moves the folder into place. A crash before that leaves a hidden
    .step_*.tmp folder, which the next run removes.
    """
    is_main = strategy.is_main
    with atomic_dir(folder, overwrite=True) if is_main else contextlib.nullcontext(None) as tmp:
        tmp = Path(strategy.broadcast_object(str(tmp) if is_main else None))
        full = strategy.full_state_dict(model)  # a collective under FSDP; the tensors on rank 0 only
        if is_main:
            _safetensors().save_file(_model_tensors(model, full), str(tmp / "model.safetensors"), metadata={"format": "pt"})
            tokenizer.save(tmp / "tokenizer.bpe")
            (tmp / "config.toml").write_text(config_to_toml(cfg), encoding="utf-8")
        del full
        strategy.save_optimizer(tmp, model, optimizer)
        ranks = strategy.gather_object({"sampler": sampler.state_dict(), "rng": rng_state()})
        strategy.barrier()  # every file is written: list them (the same list on every rank) and share the hashing
        names = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        mine = {name: _sha256(tmp / name) for i, name in enumerate(names) if i % strategy.world_size == strategy.rank}
        files = {k: v for part in strategy.gather_object(mine) for k, v in part.items()}
        if is_main:
            for path in tmp.rglob("*"):  # atomic_dir syncs the top level; the DCP folder's files are synced here
                if path.is_file() and path.parent != tmp:
                    with open(path, "rb+") as f:
                        os.fsync(f.fileno())
            full_state = {"format": _STATE_FORMAT, **state, "sampler": ranks[0]["sampler"], "rng": ranks[0]["rng"],
                          "model_config": model.cfg.to_dict(), "strategy": strategy.name, "world_size": strategy.world_size,
                          "optimizer_format": strategy.optimizer_format, "ranks": ranks,
                          "files": {name: files[name] for name in names}}
            (tmp / "state.json").write_text(json.dumps(full_state), encoding="utf-8")
    strategy.barrier()  # the folder is in place before any rank goes on


def _checkpoints(run: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first (a half-written one is still a hidden .tmp folder)."""
    folder = run / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_") and p.name[5:].isdigit())


def latest_checkpoint(run: str | os.PathLike[str]) -> Path | None:
    """The newest complete checkpoint folder of a run folder, or None."""
    found = _checkpoints(Path(run))
    return found[-1] if found else None


def _read_state(folder: Path, part: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """state.json, after checking that the checkpoint's files are there and match their checksums.

    Every file that state.json lists is checked (a distributed checkpoint lists its per-rank and DCP
    files too). With `part` = (rank, world_size), this process hashes only every world_size-th file
    from the rank-th on, so that the ranks of a resumed run share the work (the caller gathers errors).
    """
    previous = [p.name for p in _checkpoints(folder.parent.parent) if p != folder] if folder.parent.name == "checkpoints" else []
    fix = (f"delete {folder} to resume from the previous checkpoint ({previous[-1]})" if previous
           else "this run has no other checkpoint; start it again")
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"{folder}: no state.json; not a checkpoint folder of minillm.train ({fix})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{folder}/state.json is unreadable ({type(e).__name__}); the file is truncated or foreign: {fix}") from None
    if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT or not isinstance(state.get("files", {}), dict):
        raise CheckpointError(f"{folder}/state.json is not a minillm checkpoint state ({_STATE_FORMAT}): {fix}")
    recorded = state.get("files", {})
    required = _CHECKPOINT_FILES if state.get("optimizer_format", "full") == "full" else _CHECKPOINT_FILES[:1] + _CHECKPOINT_FILES[2:]
    names = list(required) + sorted(set(recorded) - set(required))
    for i, name in enumerate(names):
        if not isinstance(name, str) or name.startswith("/") or ".." in Path(name).parts:
            raise CheckpointError(f"{folder}/state.json lists a file outside the checkpoint ({name!r}): {fix}")
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path} is missing: {fix}")
        if i % part[1] == part[0] and _sha256(path) != recorded.get(name):
            raise CheckpointError(f"{path} does not match the checksum that state.json recorded (truncated or replaced): {fix}")
    return state


def _load_model_file(model: LLM, path: Path) -> None:
    try:
        tensors = _safetensors().load_file(str(path), device=str(model.token_embedding.weight.device))
    except Exception as e:  # safetensors has its own error types for a damaged file
        raise CheckpointError(f"{path}: not a readable safetensors file ({' '.join(str(e).split())})") from None
    if model.cfg.tie_embeddings and "token_embedding.weight" in tensors:
        tensors["lm_head.weight"] = tensors["token_embedding.weight"]
    try:
        model.load_state_dict(tensors)
    except (RuntimeError, ConfigError) as e:
        raise CheckpointError(f"{path}: the weights do not fit the model ({' '.join(str(e).split())[:300]})") from None


def _load_torch_file(path: Path) -> Any:
    """torch.load with weights_only=True: tensors and plain containers only. A pickle that would run
    code (a __reduce__ that calls a function) is refused, and its code never runs."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # UnpicklingError for unsafe content, RuntimeError/EOFError for damage
        raise CheckpointError(f"{path}: refused or unreadable ({type(e).__name__}: {' '.join(str(e).split())[:200]}); "
                              "optimizer.pt must be plain tensors written by minillm.train") from None


def _load_optimizer_file(optimizer: Optimizer, path: Path) -> None:
    opt_state = _load_torch_file(path)
    try:
        optimizer.load_state_dict(opt_state)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise CheckpointError(f"{path} does not fit the optimizer ({e})") from None


def load_checkpoint(folder: str | os.PathLike[str], model: LLM | None, optimizer: Optimizer | None = None,
                    *, restore_rng: bool = True) -> dict[str, Any]:
    """Load a checkpoint into `model` (and `optimizer`); returns its state (step, sampler, config...).
    Every file is checked against the checksum in state.json first: a truncated or swapped file is a
    CheckpointError, and nothing is loaded. `model` None loads no weights (only the state, the optimizer
    and the RNGs: a LoRA run rebuilds its model from the base and the adapter file, chapter 08)."""
    folder = Path(folder)
    state = _read_state(folder)
    if model is not None:
        _load_model_file(model, folder / "model.safetensors")
    if optimizer is not None:
        if state.get("optimizer_format", "full") != "full":
            raise CheckpointError(f"{folder} holds {state['optimizer_format']} optimizer state (strategy="
                                  f"{state.get('strategy')!r}); resume it with `minillm train --resume` under that strategy")
        _load_optimizer_file(optimizer, folder / "optimizer.pt")
    if restore_rng:
        set_rng_state(state["rng"])
    return state


def load_for_inference(path: str | os.PathLike[str], device: str | torch.device = "cpu") -> tuple[LLM, Tokenizer]:
    """The model (in eval mode) and tokenizer of a checkpoint folder, or of a run folder's latest checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such run or checkpoint folder; check the path (train one with 'minillm train')")
    folder = path if (path / "state.json").exists() else latest_checkpoint(path)
    if folder is None:
        raise CheckpointError(f"{path}: no checkpoint in this folder (expected {path}/checkpoints/step_*/); "
                              "train longer than checkpoint_every steps, or give a checkpoint folder")
    state = _read_state(folder)
    try:
        model = LLM(ModelConfig.from_dict(state["model_config"])).to(device)
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{folder}/state.json: the model config is unusable ({e})") from None
    _load_model_file(model, folder / "model.safetensors")
    return model.eval(), Tokenizer.load(folder / "tokenizer.bpe")


# --------------------------------------------------------------------------------------------
# The run folder: logs and samples


class RunLog:
    """metrics.jsonl and samples, written by the main process only; optional TensorBoard or W&B."""

    def __init__(self, run: Path, cfg: TrainConfig, enabled: bool, resume_step: int | None) -> None:
        self.run, self.enabled = run, enabled
        self.backend = None
        if not enabled:
            return
        if resume_step is not None:  # drop what the killed run logged after its last checkpoint
            for name in ("metrics.jsonl", "samples.jsonl"):
                self._truncate(run / name, resume_step)
            atomic_write(run / "samples.txt", "".join(self._sample_text(r) for r in self.read(run / "samples.jsonl")))
        self.metrics = open(run / "metrics.jsonl", "a", encoding="utf-8")
        self.samples = open(run / "samples.jsonl", "a", encoding="utf-8")
        self.samples_txt = open(run / "samples.txt", "a", encoding="utf-8")
        if cfg.logger == "tensorboard":
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise TrainError("logger=tensorboard needs the tensorboard package: pip install tensorboard") from None
            self.backend = SummaryWriter(str(run / "tensorboard"))
        elif cfg.logger == "wandb":
            try:
                import wandb
            except ImportError:
                raise TrainError("logger=wandb needs the wandb package: pip install wandb") from None
            self.backend = wandb.init(project="minillm", name=run.name, config=cfg.to_dict(), resume="allow")

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        """The complete JSON lines of a log (a line cut by a crash is skipped)."""
        rows = []
        if path.exists():
            for line in path.read_text(encoding="utf-8").splitlines():
                with contextlib.suppress(json.JSONDecodeError):
                    rows.append(json.loads(line))
        return rows

    def _truncate(self, path: Path, step: int) -> None:
        # The rows of the steps the checkpoint covers; a "final" row comes again when the run ends.
        rows = [r for r in self.read(path) if r.get("step", 0) <= step and not r.get("final")]
        atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))

    @staticmethod
    def _sample_text(row: dict[str, Any]) -> str:
        return f"--- step {row['step']} ---\n{row['text']}\n\n"

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()
        if self.backend is not None:
            numbers = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
            if hasattr(self.backend, "add_scalar"):
                for k, v in numbers.items():
                    self.backend.add_scalar(f"{row.get('kind', 'train')}/{k}", v, row["step"])
            else:
                self.backend.log({f"{row.get('kind', 'train')}/{k}": v for k, v in numbers.items()}, step=row["step"])

    def sample(self, step: int, prompt: str, text: str, final: bool = False) -> None:
        if not self.enabled:
            return
        row = {"step": step, "prompt": prompt, "text": text} | ({"final": True} if final else {})
        self.samples.write(json.dumps(row) + "\n")
        self.samples.flush()
        self.samples_txt.write(self._sample_text(row))
        self.samples_txt.flush()

    def close(self) -> None:
        if self.enabled:
            for f in (self.metrics, self.samples, self.samples_txt):
                f.close()
            if self.backend is not None:
                (self.backend.close if hasattr(self.backend, "close") else self.backend.finish)()


# --------------------------------------------------------------------------------------------
# Data: the tokenizer and the token shards of a run


def _prepare_tokenizer(cfg: TrainConfig, run: Path, model_cfg: ModelConfig, progress: bool) -> Tokenizer:
    """The run's tokenizer: RUN/tokenizer.bpe if there, else cfg.tokenizer, else one trained on the
    train split; saved as RUN/tokenizer.bpe. Called by the main process only."""
    from minillm.corpus import load_corpus
    from minillm.tokenizer import train_bpe

    saved = run / "tokenizer.bpe"
    if saved.exists():
        tok = Tokenizer.load(saved)
    elif cfg.tokenizer:
        tok = Tokenizer.load(cfg.tokenizer)
    else:
        corpus = load_corpus(cfg.data, val_fraction=cfg.val_fraction, progress=progress)
        tok = train_bpe([d.text for d in corpus.split("train")], model_cfg.vocab_size, progress=progress)
    if tok.vocab_size > model_cfg.vocab_size:
        raise TrainError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocab_size is {model_cfg.vocab_size}; "
                         f"set model.vocab_size={tok.vocab_size} (or more)")
    if not saved.exists():
        tok.save(saved)
    return tok


def _shard_paths(cfg: TrainConfig, run: Path) -> dict[str, Path]:
    folder = Path(cfg.data_dir) if cfg.data_dir else run / "data"
    return {s: folder / f"{s}.bin" for s in ("train", "val")}


def _prepare_shards(cfg: TrainConfig, run: Path, tok: Tokenizer, progress: bool) -> None:
    """Encode the corpus into train.bin and val.bin, unless both are there. Main process only."""
    from minillm import data

    paths = _shard_paths(cfg, run)
    if not all(p.exists() for p in paths.values()):
        paths["train"].parent.mkdir(parents=True, exist_ok=True)
        data.prepare(cfg.data, tok, paths["train"].parent, val_fraction=cfg.val_fraction, progress=progress)


# --------------------------------------------------------------------------------------------
# The loop


@dataclass
class TrainResult:
    """What a run ends with (also in metrics.jsonl)."""

    run: Path
    step: int
    val_loss: float | None = None
    val_bpb: float | None = None
    compressors: dict[str, float] = field(default_factory=dict)
    samples: list[str] = field(default_factory=list)
    tokens_per_s: float = 0.0  # over the logged training steps after the first window (warm-up, compilation)
    mfu: float | None = None
    seconds: float = 0.0


def _open_run(cfg: TrainConfig, resume: bool, force: bool, strategy: Strategy) -> tuple[Path, Path | None]:
    """The run folder, checked: a new run needs an empty or missing folder (or force), a resumed one a checkpoint.
    Every rank checks before the main process changes anything (else a late rank sees the new run's files)."""
    is_main = strategy.is_main
    run = Path(cfg.out)
    if resume:
        ckpt = latest_checkpoint(run)
        if ckpt is None:
            raise TrainError(f"{run}: nothing to resume (no checkpoints/step_*/ folder); drop --resume to start a new run")
        return run, ckpt
    if run.exists() and any(run.iterdir()):
        if not force:
            raise OutputError(f"{run} exists; pass --resume to continue that run, --force to replace it, or choose another out=")
        if not (run / "config.toml").exists():
            raise OutputError(f"{run} is not a run folder (no config.toml), so --force will not delete it; choose another out=")
        strategy.barrier()
        if is_main:
            shutil.rmtree(run)
    else:
        strategy.barrier()
    if is_main:
        run.mkdir(parents=True, exist_ok=True)
    return run, None


# Fields that a resumed run must keep: they decide what the checkpoint's numbers mean. `strategy` is
# not one of them: what a resume needs is the checkpoint's *format*, which strategies share (single
# and ddp write optimizer.pt; fsdp and zero2 a DCP folder of the same FSDP2 state), and the world
# size; _check_resume_layout checks both and names the strategies that can read the checkpoint.
_FIXED_ON_RESUME = ("model", "model_overrides", "data", "tokenizer", "seed", "batch_size", "seq_len", "tokens_per_step",
                    "optimizer", "val_fraction")
_READERS = {"full": "single or ddp", "zero1": "zero1", "dcp": "fsdp or zero2"}  # who reads each optimizer format


def _check_resume_layout(saved: dict[str, Any], strategy: Strategy) -> bool:
    """Can this strategy resume the checkpoint whose state.json is `saved`? True if on the same world
    size (exact), False if on another (fsdp/zero2 only: DCP reshards); raises TrainError otherwise."""
    fmt, world, name = saved.get("optimizer_format", "full"), saved.get("world_size", 1), saved.get("strategy", "single")
    if fmt != strategy.optimizer_format:
        raise TrainError(f"the checkpoint was written with strategy={name} (optimizer state: {fmt}), which strategy="
                         f"{strategy.name} cannot read; resume with strategy={_READERS[fmt]}")
    if world == strategy.world_size:
        return True
    if fmt != "dcp":
        raise TrainError(f"the checkpoint was written by {world} process(es) and this run has {strategy.world_size}: "
                         f"strategy={name} cannot reshard its state; resume with `torchrun --nproc_per_node={world}` "
                         "(or one process for a single-device run), or train with strategy=fsdp, whose DCP checkpoints reshard")
    return False


def _sample(model: LLM, tok: Tokenizer, cfg: TrainConfig, draw: int, device: torch.device) -> str:
    """A continuation of sample_prompt, drawn with its own generator (seeded with seed + draw), so
    that the training RNG is untouched and a resumed run draws the same samples."""
    ids = tok.encode(cfg.sample_prompt, allowed_special="all")[-model.cfg.max_seq_len // 2:] or [tok.eot_id]
    n = min(cfg.sample_tokens, model.cfg.max_seq_len - len(ids) + 1)
    gen = torch.Generator(device="cpu").manual_seed(cfg.seed + draw)
    out = model.generate(torch.tensor([ids], device=device), n, temperature=0.8, top_k=50, eos_id=tok.eot_id, generator=gen)
    return tok.decode(out[0].tolist())


def train(cfg: TrainConfig, *, resume: bool = False, force: bool = False, progress: bool | None = None,
          loss_fn: LossFn = lm_loss, strategy: Strategy | None = None) -> TrainResult:
    """Train as `cfg` says; with `resume`, continue the run in cfg.out from its latest checkpoint.

    On the CPU a resumed run's metrics equal an uninterrupted run's exactly: the weights, the
    optimizer state, the data sampler's position and every RNG are in each checkpoint, and the
    learning rate is a function of the step. `loss_fn` and `strategy` are the seams that later
    chapters use (a masked loss, DDP/FSDP). Without a `strategy`, cfg.strategy picks one: "single",
    or one of torch's engines under torchrun (minillm.distributed.make_strategy), where every rank
    calls train() alike, each on its own data, and rank 0 alone logs and writes.
    """
    from minillm import data

    if strategy is None:
        if cfg.strategy == "single":
            strategy = SingleDevice()
        else:
            from minillm.distributed import make_strategy

            strategy = make_strategy(cfg.strategy, device=cfg.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and strategy.world_size == 1:
        raise TrainError("this process was started by torchrun with WORLD_SIZE > 1, but the strategy is a single device: "
                         "every copy would write the same run folder; pass --strategy ddp, zero1, zero2 or fsdp, or run one process")
    is_main = strategy.is_main
    progress = (sys.stderr.isatty() if progress is None else progress) and is_main
    start_time = time.perf_counter()

    run, ckpt = _open_run(cfg, resume, force, strategy)
    saved_state: dict[str, Any] | None = None
    same_world = True
    if ckpt is not None:
        if strategy.world_size == 1:
            saved_state = _read_state(ckpt)
        else:  # the ranks share the hashing; an error on any rank stops all of them
            error = None
            try:
                saved_state = _read_state(ckpt, part=(strategy.rank, strategy.world_size))
            except CheckpointError as e:
                error = str(e)
            errors = [e for e in strategy.gather_object(error) if e]
            if errors:
                raise CheckpointError(errors[0])
        old = TrainConfig.from_dict(saved_state["config"])
        changed = [k for k in _FIXED_ON_RESUME if getattr(old, k) != getattr(cfg, k)]
        if changed:
            raise TrainError(f"cannot resume with a different {', '.join(changed)} (the checkpoint has "
                             f"{', '.join(f'{k}={getattr(old, k)!r}' for k in changed)}); keep them, or start a new run")
        same_world = _check_resume_layout(saved_state, strategy)
        if not same_world and is_main:
            import warnings

            warnings.warn(f"resuming a checkpoint of {saved_state['world_size']} processes on {strategy.world_size}: the "
                          "weights and optimizer state are resharded exactly, but each rank's data stream continues as a "
                          f"run of {strategy.world_size} would have it, so the batches differ from the saved run's",
                          stacklevel=2)

    # Seed everything before anything random is made; a resumed run restores the RNGs later.
    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    device = strategy.device or resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 matmuls on Ampere and newer: fp32 range, 10-bit mantissa
        torch.backends.cudnn.allow_tf32 = True
    amp = autocast(device, dtype)
    if device.type == "cuda" and dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
        raise TrainError("dtype=bfloat16 but this GPU does not support it; use dtype=float32")

    # Data: the tokenizer and the shards, made by the main process, then opened by every process
    # (TokenShard.open checks that the shards were encoded with this tokenizer).
    model_cfg = cfg.model_config()
    if is_main:
        _prepare_tokenizer(cfg, run, model_cfg, progress)
        _prepare_shards(cfg, run, Tokenizer.load(run / "tokenizer.bpe"), progress)
        atomic_write(run / "config.toml", config_to_toml(cfg))
    strategy.barrier()
    tok = Tokenizer.load(run / "tokenizer.bpe")
    paths = _shard_paths(cfg, run)
    train_shard, val_shard = (data.TokenShard.open(paths[s], tokenizer=tok) for s in ("train", "val"))
    accum = cfg.accum_steps(strategy.world_size)
    sampler = data.RandomSampler(train_shard, cfg.batch_size, cfg.seq_len, cfg.seed, rank=strategy.rank,
                                 world_size=strategy.world_size, device=device)

    def val_batches(max_batches: int, rank: int = strategy.rank, world_size: int = strategy.world_size) -> Any:
        return data.SequentialSampler(val_shard, cfg.batch_size, cfg.seq_len, rank=rank, world_size=world_size,
                                      max_batches=max_batches or None, device=device)

    # The model: built whole (and its FLOPs and size counted) on every rank, the checkpoint's weights
    # loaded, then wrapped, which under FSDP shards it in place; the optimizer is built after that,
    # on the parameters the strategy left (FSDP2's DTensor shards), and its state loaded last.
    # torch.compile goes around the wrapped model (DDP and FSDP2 both document that order).
    raw_model = LLM(model_cfg).to(device)
    flops_per_token = raw_model.flops_per_token(cfg.seq_len)
    if cfg.activation_checkpointing:
        checkpoint_blocks(raw_model)
    step = 0
    if saved_state is not None:
        _load_model_file(raw_model, ckpt / "model.safetensors")
        step = saved_state["step"]
        if not same_world:  # this rank's own stream, where a run of this world size would be at this step
            sampler.load_state_dict({**saved_state["sampler"], "world_size": strategy.world_size, "rank": -1,
                                     "batches": step * accum})
        else:
            sampler.load_state_dict(saved_state["ranks"][strategy.rank]["sampler"] if "ranks" in saved_state
                                    else saved_state["sampler"])
    strategy.setup(cfg, device, dtype)
    wrapped = strategy.wrap(raw_model)
    optimizer = strategy.build_optimizer(raw_model, cfg, device)
    if saved_state is not None:
        strategy.load_optimizer(ckpt, raw_model, optimizer)
    model = torch.compile(wrapped) if cfg.compile else wrapped
    model.train()

    # The throughput logged is the whole run's (every rank's tokens), so MFU is against every device's peak.
    peak = peak_flops(device, dtype, cfg.peak_flops) * strategy.world_size
    log = RunLog(run, cfg, is_main, step if saved_state is not None else None)
    tokens_per_step = cfg.batch_size * cfg.seq_len * accum * strategy.world_size

    try:  # the logs are closed however the run ends (NaN, Ctrl-C)
        # Bits per byte: the exact UTF-8 bytes of the targets each evaluation scores (decoded once and
        # cached: the windows are the same every time), and the compressors on the final evaluation's
        # text. As in the shard headers, the end-of-text separators count no bytes (the model still
        # pays for predicting them), so the compressors see the documents' text alone.
        byte_counts: dict[int, int] = {}

        def target_bytes(batches: Iterable[Any]) -> bytes:
            ids = torch.cat([y.flatten().cpu() for _, y in batches])
            return tok.decode_bytes(ids[ids != tok.eot_id].tolist())

        def eval_row(max_batches: int, kind: str) -> dict[str, Any]:
            loss, n_tokens = evaluate(model, val_batches(max_batches), loss_fn=loss_fn, amp=amp, strategy=strategy)
            if max_batches not in byte_counts:  # each rank decodes its own windows; the sum is the whole text's
                own = len(target_bytes(val_batches(max_batches)))
                byte_counts[max_batches] = int(strategy.reduce_sum(torch.tensor([own], dtype=torch.float64)).item())
            n_bytes = byte_counts[max_batches]
            row = {"step": step, "kind": kind, "val_loss": loss, "val_tokens": n_tokens, "val_bytes": n_bytes,
                   "val_bpb": data.bits_per_byte(loss, n_tokens, n_bytes)}
            if kind == "final":
                row["final"] = True  # written again when a resumed run ends
            log.log(row)
            return row

        compressors: dict[str, float] = {}
        if saved_state is None and is_main:
            # The windows the final evaluation scores on all ranks together, read by this process alone.
            whole = len(val_batches(cfg.final_eval_batches)) * strategy.world_size
            text = target_bytes(val_batches(whole, 0, 1))
            compressors = data.compressor_bits_per_byte(text)
            log.log({"step": 0, "kind": "compressors", "bytes": len(text), **compressors})
        else:
            compressors = next((r for r in RunLog.read(run / "metrics.jsonl") if r.get("kind") == "compressors"), {})
            compressors = {k: v for k, v in compressors.items() if k not in ("step", "kind", "bytes")}

        def checkpoint() -> None:
            folder = run / "checkpoints" / f"step_{step:07d}"
            if is_main:
                folder.parent.mkdir(exist_ok=True)
            if isinstance(strategy, SingleDevice):
                save_checkpoint(folder, raw_model, optimizer, tok, cfg, {"step": step, "sampler": sampler.state_dict(),
                                                                         "config": cfg.to_dict()})
            else:
                _save_distributed_checkpoint(folder, raw_model, optimizer, tok, cfg, {"step": step, "config": cfg.to_dict()},
                                             sampler, strategy)
            if is_main:
                for old in _checkpoints(run)[:-cfg.keep_checkpoints or None]:
                    shutil.rmtree(old)
            strategy.barrier()

        def samples(draws: Iterable[int]) -> list[str]:
            """Continuations drawn on the main process from a plain model (a collective under FSDP)."""
            plain = strategy.inference_model(raw_model)
            return [_sample(plain, tok, cfg, draw, device) for draw in draws] if is_main else []

        if is_main:  # a checkpoint cut short by a crash stays behind as a hidden temporary folder
            for tmp in (run / "checkpoints").glob(".step_*.tmp"):
                shutil.rmtree(tmp, ignore_errors=True)
        if saved_state is None and cfg.eval_every:
            eval_row(cfg.eval_batches, "eval")

        from tqdm import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc="training", unit="step", disable=not progress, dynamic_ncols=True)
        window_start, window_tokens, last = time.perf_counter(), 0, None
        tokens_per_s, mfu = 0.0, None
        # The run's average throughput leaves out the first logged window, which holds the warm-up
        # (torch.compile's compilation, allocator growth): on a GPU it can take longer than the rest.
        windows: list[tuple[int, float]] = []
        try:
            while step < cfg.max_steps:
                lr = lr_at(step, cfg)
                for group in optimizer.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                last = train_step(model, optimizer, sampler.next_batch, step=step + 1, accum=accum, loss_fn=loss_fn,
                                  grad_clip=cfg.grad_clip, amp=amp, strategy=strategy)
                step += 1
                window_tokens += tokens_per_step
                if cfg.log_every and (step % cfg.log_every == 0 or step == cfg.max_steps):
                    elapsed = time.perf_counter() - window_start
                    tokens_per_s = window_tokens / elapsed
                    windows.append((window_tokens, elapsed))
                    mfu = flops_per_token * tokens_per_s / peak if peak else None
                    log.log({"step": step, "loss": last.loss, "lr": lr, "grad_norm": last.grad_norm, "tokens": step * tokens_per_step,
                             "tokens_per_s": tokens_per_s, "mfu": mfu})
                    bar.set_postfix(loss=f"{last.loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
                bar.update(1)
                paused = time.perf_counter()  # evaluation, samples and checkpoints do not count as training time
                if cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.max_steps:
                    row = eval_row(cfg.eval_batches, "eval")
                    bar.set_postfix(loss=f"{last.loss:.3f}", val=f"{row['val_loss']:.3f}", refresh=False)
                if cfg.sample_every and step % cfg.sample_every == 0 and step < cfg.max_steps:
                    for text in samples([step]):
                        log.sample(step, cfg.sample_prompt, text)
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
                    checkpoint()
                if cfg.log_every and step % cfg.log_every == 0:
                    window_start, window_tokens = time.perf_counter(), 0
                else:
                    window_start += time.perf_counter() - paused
        finally:
            bar.close()

        # The end: a final checkpoint, the final evaluation, and samples.
        steady = windows[1:] or windows
        average = sum(t for t, _ in steady) / sum(s for _, s in steady) if steady else tokens_per_s
        result = TrainResult(run, step, compressors=compressors, tokens_per_s=average,
                             mfu=flops_per_token * average / peak if peak else None)
        if not (saved_state is not None and saved_state["step"] == step):
            checkpoint()
        final = eval_row(cfg.final_eval_batches, "final")
        result.val_loss, result.val_bpb = final["val_loss"], final["val_bpb"]
        if cfg.sample_tokens:
            result.samples = samples(range(step, step + 3))  # three draws: a reader sees more than one continuation
            for text in result.samples:
                log.sample(step, cfg.sample_prompt, text, final=True)
    finally:
        log.close()
    result.seconds = time.perf_counter() - start_time
    return result


# --------------------------------------------------------------------------------------------
# Curves


def plot_run(run: str | os.PathLike[str], out: str | os.PathLike[str] | None = None) -> Path:
    """Draw the loss (train and validation), learning rate, gradient norm and throughput of a run
    into RUN/curves.png (or `out`); returns the path. Uses matplotlib's Agg canvas directly, so
    it changes no backend (safe in notebooks and on machines without a display)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run = Path(run)
    rows = RunLog.read(run / "metrics.jsonl")
    if not rows:
        raise TrainError(f"{run}: no metrics.jsonl rows to plot; give a run folder written by 'minillm train'")
    train_rows = [r for r in rows if "loss" in r]
    evals = [r for r in rows if r.get("kind") in ("eval", "final")]
    fig = Figure(figsize=(10, 7), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    steps = [r["step"] for r in train_rows]
    ax = axes[0, 0]
    ax.plot(steps, [r["loss"] for r in train_rows], label="train", lw=1)
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation", ms=3)
    ax.set(title="loss (nats per token)", xlabel="step")
    ax.legend()
    for ax, key, title in ((axes[0, 1], "lr", "learning rate"), (axes[1, 0], "grad_norm", "gradient norm (before clipping)"),
                           (axes[1, 1], "tokens_per_s", "throughput (tokens/s)")):
        ax.plot(steps, [r[key] for r in train_rows], lw=1)
        ax.set(title=title, xlabel="step")
    fig.suptitle(f"{run.name}: {steps[-1] if steps else 0} steps")
    target = Path(out) if out is not None else run / "curves.png"
    atomic_write(target, lambda p: fig.savefig(p, format="png", dpi=200))
    return target
