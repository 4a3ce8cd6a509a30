"""How much memory a training run needs per GPU, which strategy fits, and how long the run takes.

    plan(model, gpus, seq_len, batch_size) -> Plan, and format_plan(plan) -> the table `minillm plan` prints:

    per GPU  =  weights + gradients + optimizer state     sharded by ZeRO stage: 1 optimizer, 2 + gradients,
                                                          3 (FSDP) + weights
             +  buffers                                   copies of the weights in the compute dtype, FSDP's
                                                          gathered units, the loss's gradient over the vocabulary
             +  activations                               kept for backward; with activation checkpointing,
                                                          only each block's input (and one block at a time)

Two precision layouts, in bytes per parameter (weights + gradients + optimizer state):

    layout    weights        gradients   optimizer                        DDP   ZeRO-1          ZeRO-2          ZeRO-3
    minillm   4 (fp32)       4 (fp32)    8 (Adam's two fp32 moments)      16Ψ   8Ψ + 8Ψ/N       4Ψ + 12Ψ/N      16Ψ/N
    mixed     2 (bf16)       2 (bf16)    12 (fp32 master copy, moments)   16Ψ   4Ψ + 12Ψ/N      2Ψ + 14Ψ/N      16Ψ/N

`minillm` is what `minillm train` does: the weights stay fp32 and bf16 autocast runs the matrix
products, so there is no separate master copy. `mixed` is the layout of the ZeRO paper
(Rajbhandari et al., 2020, whose formulas are the second row). Either way ZeRO-1 shards the
optimizer state over the N GPUs, ZeRO-2 the gradients too and ZeRO-3 the weights too.

Communication per GPU and step, in values sent (the ZeRO paper's count): DDP, ZeRO-1 and ZeRO-2
move 2Ψ (a reduce-scatter of the gradients and an all-gather of the weights, which is what an
all-reduce costs), ZeRO-3 3Ψ (the weights are gathered twice, for forward and for backward). A
ring sends (N-1)/N of that; one GPU sends nothing. With gradient accumulation DDP communicates
once per step (`no_sync`), while FSDP gathers the weights again for every micro-batch.

What the figures assume, so that a reader can check them:

* GB is 10^9 bytes, and a GPU's memory is its data sheet's: A100 and H100 80 GB, H200 141 GB.
  The cards hold a little more (torch sees 85.5e9 bytes on an H100 and 150.1e9 on an H200),
  which is extra slack. Of the data sheet's figure, `RESERVED_FRACTION` (10%) is left to the
  allocator's fragmentation and to temporaries not counted here, and `RESERVED_GB` (1 GB) to the
  CUDA context and NCCL's and cuBLAS's buffers.
* Every term is added as if all were alive at once. In fact the gradients fill up while the
  activations drain, and the loss's gradients are gone before a checkpointed block is
  recomputed, so the total errs on the safe side.
* Buffers: with weights wider than the compute dtype, autocast keeps a copy of every matrix in the
  compute dtype from forward to backward (DDP, ZeRO-1). FSDP instead gathers its units in
  the compute dtype: the root (embedding, final norm, output layer), which stays gathered, the
  current block and the next one it prefetches, plus one unit's unsharded gradient before its
  reduce-scatter. The loss adds two fp32 (tokens, vocabulary) gradients at the start of backward.
  torch's DDP is assumed to run with `gradient_as_bucket_view=True`; its default keeps a second
  copy of the gradients in its buckets.
* Activations are counted tensor by tensor from what minillm's eager forward saves for backward
  (see `activation_memory`), and they equal to the byte what `torch.autograd.graph.saved_tensors_hooks`
  sees, on the CPU (tests/test_plan.py) and on an H200 (gpt2-small and llama-350m).
  `torch.compile` fuses the loss and the norms and needs less: 42-45 GB against about 77 GB eager
  (and 77 GB planned) for gpt2-small at 64 x 1024 on an H200.
* Measured on an H200 (torch 2.11, eager, bf16 autocast, fused AdamW, one GPU), the planned total
  was 1-4% above the peak that torch.cuda.max_memory_allocated reported for gpt2-small at 8 and
  32 x 1024 tokens and llama-350m at 8 x 2048, and 8-23% above it with activation checkpointing.
* A bare parameter count ("3B") is turned into a model: the preset within 10% of it if there is
  one, else a Llama-style shape (`shape_for`), and every figure is for that model.
* `minillm train --strategy zero2` is FSDP2 with reshard_after_forward=False: the fp32 weights,
  the gradients and the optimizer state stay sharded, and each unit is gathered once, in the
  compute dtype, for forward and kept until its backward. Its row (`engine_state`) counts that
  gathered copy (2Ψ in bf16) and the fp32 shard as its weights, where the paper's ZeRO-2
  (`state_bytes`) keeps the stored weights replicated: with fp32 weights, 4Ψ and autocast's copies.

Compute: a compute-optimal run trains on about 20 tokens per parameter (Hoffmann et al., 2022),
and takes tokens * flops_per_token / (N * peak FLOP/s * MFU) seconds, with `LLM.flops_per_token`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
import textwrap
from dataclasses import dataclass

import torch

from minillm.model import LLM, PRESETS, ModelConfig
from minillm.train import GPU_PEAK_FLOPS

__all__ = [
    "PlanError", "GPUSpec", "GPUS", "Layout", "LAYOUTS", "STRATEGIES", "ModelState", "Activations", "StrategyPlan",
    "Recommendation", "Plan", "parse_gpus", "parse_count", "resolve_model", "shape_for", "state_bytes", "engine_state",
    "communication", "activation_memory", "usable_bytes", "compute_optimal_tokens", "training_seconds", "plan",
    "plan_from_config", "format_plan",
]

GB = 1e9


class PlanError(ValueError):
    """A planning input that makes no sense (unknown GPU, zero GPUs, a count that is not a number); names the fix."""


# --------------------------------------------------------------------------------------------
# GPUs


@dataclass(frozen=True)
class GPUSpec:
    """One GPU: its name, memory in GB (10^9 bytes) and dense bf16 peak FLOP/s."""

    name: str
    memory_gb: float
    peak_flops: float


# Memory from the data sheets; the peak FLOP/s are minillm.train's table, so they are written once.
GPU_MEMORY_GB = {"A100": 80.0, "H100": 80.0, "H200": 141.0}
GPUS = {name: GPUSpec(name, memory, GPU_PEAK_FLOPS[name]) for name, memory in GPU_MEMORY_GB.items()}

RESERVED_GB = 1.0  # the CUDA context, NCCL's and cuBLAS's workspaces
RESERVED_FRACTION = 0.10  # the caching allocator's fragmentation, and temporaries this plan does not count
GPUS_PER_NODE = 8  # above this, the command line is a multi-node torchrun


def usable_bytes(memory_gb: float) -> float:
    """What a plan may fill of a GPU of `memory_gb` GB: 90% of it, less 1 GB."""
    return max(0.0, memory_gb * GB * (1 - RESERVED_FRACTION) - RESERVED_GB * GB)


def _key(name: str) -> str:
    return re.sub(r"[\s_-]", "", name).upper()


def _positive(value: float | None, what: str, example: str) -> float | None:
    if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise PlanError(f"{what} must be a positive number, got {value!r}; e.g. {example}")
    return None if value is None else float(value)


def parse_gpus(text: str, memory_gb: float | None = None, peak_flops: float | None = None) -> tuple[int, GPUSpec]:
    """'8xH100' -> (8, H100). Also 'H100' (one), or a bare count '8' with `memory_gb` and `peak_flops`.

    A100, H100 and H200 are known by name; other names of minillm.train's FLOP/s table (L40S, L4,
    ...) need `memory_gb`. `memory_gb` and `peak_flops` override the table's values.
    """
    memory_gb = _positive(memory_gb, "--gpu-memory (GB per GPU)", "--gpu-memory 80")
    peak_flops = _positive(peak_flops, "--peak-flops (dense bf16 FLOP/s per GPU)", "--peak-flops 989e12")
    if not isinstance(text, str) or not text.strip():
        raise PlanError(f"--gpus must be COUNTxNAME, e.g. 8xH100, got {text!r}")
    s = text.strip()
    m = re.fullmatch(r"(\d+)\s*[xX*×]\s*(\S.*)|(\d+)|([A-Za-z]\S*(?: \d+)?)", s)
    if m is None:
        raise PlanError(f"--gpus must be COUNTxNAME (e.g. 8xH100) or a COUNT with --gpu-memory and --peak-flops, got {text!r}")
    count = int(m.group(1) or m.group(3) or 1)
    name = (m.group(2) or m.group(4) or "").strip()
    if count < 1:
        raise PlanError(f"--gpus {text!r}: at least one GPU is needed; e.g. --gpus 1xH100")
    if not name:
        if memory_gb is None or peak_flops is None:
            raise PlanError(f"--gpus {text} names no GPU; name one ({', '.join(GPUS)}: e.g. --gpus {count}xH100) "
                            "or give --gpu-memory GB and --peak-flops FLOP/s")
        return count, GPUSpec("GPU", memory_gb, peak_flops)
    known = {_key(k): k for k in GPU_PEAK_FLOPS}
    canonical = known.get(_key(name))
    if canonical is None:
        others = ", ".join(k for k in GPU_PEAK_FLOPS if k not in GPUS)
        raise PlanError(f"unknown GPU {name!r}; known: {', '.join(GPUS)} (and {others} with --gpu-memory); "
                        f"or give --gpus {count} --gpu-memory GB --peak-flops FLOP/s")
    memory = memory_gb if memory_gb is not None else GPU_MEMORY_GB.get(canonical)
    if memory is None:
        raise PlanError(f"the memory of a {canonical} is not in the table; give it with --gpu-memory GB (e.g. 48 for an L40S)")
    return count, GPUSpec(canonical, memory, peak_flops if peak_flops is not None else GPU_PEAK_FLOPS[canonical])


# --------------------------------------------------------------------------------------------
# The model


MIN_PARAMS, MAX_PARAMS = 1e6, 1e13
_SUFFIXES = {"": 1, "K": 1e3, "M": 1e6, "B": 1e9, "G": 1e9, "T": 1e12}


def parse_count(text: str) -> int:
    """A parameter count: '125M', '3B', '1.5b', '7e9', '350_000_000' -> an int."""
    m = re.fullmatch(r"\s*((?:\d[\d_,]*)?\.?\d+(?:[eE][+-]?\d+)?)\s*([kKmMbBgGtT]?)\s*", text) if isinstance(text, str) else None
    if m is None:
        raise PlanError(f"{text!r} is not a parameter count; write e.g. 125M, 3B, 1.5B or 7e9")
    value = float(m.group(1).replace("_", "").replace(",", "")) * _SUFFIXES[m.group(2).upper()]
    if value == 0:
        raise PlanError(f"{text!r} parameters: a model needs some; write e.g. 125M, 3B or 7e9")
    if value < MIN_PARAMS:
        raise PlanError(f"{text!r} is only {value:,.0f} parameters, and the planner starts at 1M; "
                        f"did you leave out the unit (e.g. {m.group(1)}B)?")
    if value > MAX_PARAMS:
        raise PlanError(f"{text!r} is {value:.3g} parameters, and the planner stops at 10T (1e13)")
    return round(value)


def _count(cfg: ModelConfig) -> int:
    """Parameters of the model `cfg` builds, counted on the meta device (no memory, milliseconds)."""
    with torch.device("meta"):
        return LLM(cfg).num_parameters()


@functools.cache
def _preset_count(name: str) -> int:
    return _count(ModelConfig.preset(name))


def shape_for(num_params: int, vocab_size: int = 32000, max_seq_len: int = 2048) -> ModelConfig:
    """A Llama-style shape (RMSNorm, SwiGLU, RoPE, untied embeddings, plain multi-head attention)
    of about `num_params` parameters.

    d_model is a multiple of 128 below 2048, of 512 below 8192 and of 1024 above; heads have 64
    dimensions below d_model 2048 and 128 from there. Among the shapes within 3% of the count, the
    one whose d_model / n_layers is nearest 64 below 1B parameters and 128 above (GPT-2 small has
    64, Llama 7B and 13B have 128).
    """
    aspect = 64 if num_params < 1e9 else 128
    widths = [*range(128, 2048, 128), *range(2048, 8192, 512), *range(8192, 65536 + 1, 1024)]
    best: tuple[float, int, int] | None = None
    for d in widths:
        f = ModelConfig(d_model=d, n_heads=d // 64).ffn_dim  # SwiGLU's default width for d
        per_layer = 4 * d * d + 3 * d * f + 2 * d
        outside = 2 * vocab_size * d + d
        layers = round((num_params - outside) / per_layer)
        if layers < 1:
            break
        error = abs(outside + layers * per_layer - num_params) / num_params
        score = abs(math.log(d / layers / aspect))
        if error <= 0.03 and (best is None or score < best[0]):
            best = (score, d, layers)
    if best is None:
        raise PlanError(f"no Llama-style shape has about {num_params:,} parameters with a {vocab_size}-token vocabulary; "
                        "give a preset, or a larger count")
    _, d, layers = best
    head_dim = 64 if d < 2048 else 128
    return ModelConfig(vocab_size=vocab_size, d_model=d, n_layers=layers, n_heads=d // head_dim, max_seq_len=max_seq_len)


def resolve_model(model: str | int | ModelConfig, seq_len: int | None = None) -> tuple[str, ModelConfig, str]:
    """(name, config, note) for a preset name, a parameter count ('3B' or an int) or a ModelConfig.

    The note says how a count became a model ('' for a preset or a config)."""
    if isinstance(model, ModelConfig):
        return "custom", model, ""
    if isinstance(model, str) and model in PRESETS:
        return model, ModelConfig.preset(model), ""
    if isinstance(model, bool) or not isinstance(model, (str, int)):
        raise PlanError(f"a model is a preset name, a parameter count or a ModelConfig, got {type(model).__name__}")
    if isinstance(model, str):
        try:
            n = parse_count(model)
        except PlanError as e:
            if re.match(r"\s*[-+\d.]", model):  # a number after all, badly written: say why
                raise
            raise PlanError(f"unknown model {model!r}; give a preset ({', '.join(PRESETS)}) or a parameter count "
                            "such as 125M, 3B or 7e9") from e
    else:
        n = model
        if not MIN_PARAMS <= n <= MAX_PARAMS:
            raise PlanError(f"{n:,} parameters: the planner covers 1M to 10T")
    # The nearest preset, if one is within 10%: its real shape (vocabulary, GQA) beats a made-up one.
    counts = {name: _preset_count(name) for name in PRESETS}
    near = min(counts, key=lambda name: abs(counts[name] - n))
    if abs(counts[near] - n) <= 0.1 * n:
        return near, ModelConfig.preset(near), f"{_human(n)} parameters -> the {near} preset ({_human(counts[near])})"
    cfg = shape_for(n, max_seq_len=max(2048, seq_len or 0))
    return (f"{_human(n)} (derived shape)", cfg,
            f"{_human(n)} parameters -> a Llama-style shape: d_model {cfg.d_model}, {cfg.n_layers} layers, "
            f"{cfg.n_heads} heads, d_ff {cfg.ffn_dim}, vocabulary {cfg.vocab_size} ({_human(_count(cfg))})")


# --------------------------------------------------------------------------------------------
# Weights, gradients and optimizer state


@dataclass(frozen=True)
class Layout:
    """Bytes per parameter of the weights (the copy forward reads), the gradients and the optimizer state."""

    name: str
    weight_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    description: str


LAYOUTS = {
    "minillm": Layout("minillm", 4, 4, 8, "fp32 weights, gradients and Adam moments, bf16 autocast; what minillm train does"),
    "mixed": Layout("mixed", 2, 2, 12, "bf16 weights and gradients, fp32 master weights and Adam moments; the ZeRO paper's"),
}

STRATEGIES = ("ddp", "zero1", "zero2", "zero3")
STRATEGY_NAMES = {"single": "single GPU", "ddp": "DDP", "zero1": "ZeRO-1", "zero2": "ZeRO-2", "zero3": "FSDP/ZeRO-3"}
# What each strategy shards over the GPUs (everything else is replicated on every GPU).
_SHARDED = {"single": (), "ddp": (), "zero1": ("optimizer",), "zero2": ("optimizer", "grads"),
            "zero3": ("optimizer", "grads", "weights")}
# The strategy= value of `minillm train` that runs each (zero2 and fsdp are FSDP2 without and with
# resharding the weights after forward).
TRAIN_STRATEGY = {"single": None, "ddp": "ddp", "zero1": "zero1", "zero2": "zero2", "zero3": "fsdp"}
CHECKPOINTING_OVERRIDE = "activation_checkpointing=true"


@dataclass(frozen=True)
class ModelState:
    """Bytes one GPU holds of the weights, the gradients and the optimizer state."""

    weights: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer


def _layout(layout: str | Layout) -> Layout:
    if isinstance(layout, Layout):
        return layout
    if layout not in LAYOUTS:
        raise PlanError(f"unknown layout {layout!r}; choose {' or '.join(LAYOUTS)}")
    return LAYOUTS[layout]


def _check_strategy(strategy: str) -> None:
    if strategy not in _SHARDED:
        raise PlanError(f"unknown strategy {strategy!r}; choose one of {', '.join(_SHARDED)}")


def state_bytes(num_params: int, num_gpus: int, strategy: str, layout: str | Layout = "minillm") -> ModelState:
    """Per-GPU bytes of weights, gradients and optimizer state; a sharded tensor holds ceil(Ψ/N) values per GPU."""
    _check_strategy(strategy)
    lay = _layout(layout)
    shard = -(-num_params // num_gpus)
    sharded = _SHARDED[strategy]
    count = {part: shard if part in sharded else num_params for part in ("weights", "grads", "optimizer")}
    return ModelState(count["weights"] * lay.weight_bytes, count["grads"] * lay.grad_bytes,
                      count["optimizer"] * lay.optimizer_bytes)


def engine_state(num_params: int, num_gpus: int, strategy: str, layout: str | Layout = "minillm",
                 dtype: str = "bfloat16") -> ModelState:
    """What minillm's engine for `strategy` holds at the peak of a step, computing in `dtype`.

    The same as `state_bytes` (the ZeRO paper's stages), except ZeRO-2 with weights wider than the
    compute dtype: `minillm train --strategy zero2` is FSDP2 with reshard_after_forward=False and,
    on GPUs, a bf16 MixedPrecisionPolicy. It keeps the fp32 weights sharded, gathers each unit in
    the compute dtype for forward and holds it until that unit's backward; at the end of forward it
    holds the whole model in bf16 (2 bytes per parameter) besides its fp32 shard, and autocast makes
    no copies of its own. The paper's ZeRO-2 instead keeps the weights that forward reads
    replicated at all times.
    """
    lay = _layout(layout)
    state = state_bytes(num_params, num_gpus, strategy, lay)
    if dtype not in _DTYPE_BYTES:
        raise PlanError(f"unknown activation dtype {dtype!r}; choose one of {', '.join(_DTYPE_BYTES)}")
    a = _DTYPE_BYTES[dtype]
    if strategy == "zero2" and num_gpus > 1 and a < lay.weight_bytes:
        shard = -(-num_params // num_gpus)
        state = dataclasses.replace(state, weights=a * num_params + lay.weight_bytes * shard)
    return state


def communication(strategy: str, num_params: int, num_gpus: int) -> int:
    """Values each GPU sends per step: 2Ψ for DDP, ZeRO-1 and ZeRO-2, 3Ψ for ZeRO-3, none on one GPU."""
    _check_strategy(strategy)
    if num_gpus == 1 or strategy == "single":
        return 0
    return (3 if strategy == "zero3" else 2) * num_params


# --------------------------------------------------------------------------------------------
# Activations


_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


@dataclass(frozen=True)
class Activations:
    """What one micro-batch of `tokens` tokens keeps for backward, in bytes per token.

    `per_layer` is one block's saved tensors, `layer_input` the part of it that is the block's
    input (all that activation checkpointing keeps of a block), `outside` the rest of the model:
    the token ids, the final norm, the output layer's input, the loss's log-probabilities.
    """

    tokens: int
    n_layers: int
    per_layer: int
    layer_input: int
    outside: int

    @property
    def full(self) -> int:
        return self.tokens * (self.n_layers * self.per_layer + self.outside)

    @property
    def checkpointed(self) -> int:
        """Each block's input, plus one block recomputed at a time in backward, plus the rest."""
        return self.tokens * (self.n_layers * self.layer_input + self.per_layer - self.layer_input + self.outside)


def activation_memory(cfg: ModelConfig, batch_size: int, seq_len: int, *, dtype: str = "bfloat16", weight_bytes: int = 4,
                      device: str = "cuda") -> Activations:
    """Bytes minillm's forward saves for backward, counted tensor by tensor (per token; C = d_model,
    F = the MLP's width, H and G the query and key/value heads, D = C/H, V the vocabulary).

    The residual stream has the weights' dtype (r = `weight_bytes`: fp32 in minillm) and the
    matrix products give `dtype` (a bytes: bf16 under autocast). Per block:

    * each RMSNorm: its input in fp32 (4C; x itself when x is fp32), 1/rms (4) and the normalized x
      in the input's dtype (rC). A LayerNorm: its input (rC), mean and 1/std (8; 4 on the CPU for
      a bf16 input).
    * each linear layer its input: under autocast every layer casts it afresh, so q, k and v keep
      three copies (3aC) and SwiGLU's gate and up projections two (2aC); without autocast they
      share one.
    * attention through scaled_dot_product_attention, flash-style (no T x T matrix): q (aC), the
      rotated k and v (2aGD), the output (aC) and the log-sum-exp (4H). RoPE keeps only its tables.
      The output takes the queries' layout, which RoPE's rotation makes (B, H, T, D), so merging
      the heads for o_proj copies it (aC more; measured on the CPU and on an H200). Without RoPE
      the queries stay a (B, T, H, D) view of q_proj's output, and on the CPU o_proj reads the
      output as it is (not measured on a GPU).
    * SwiGLU: the gate's output, its SiLU, the up projection and their product (4aF); a GELU MLP
      its input to the GELU and to the down projection (2aF).

    Outside the blocks: the token ids (8) and targets (8), the final norm, the output layer's input
    and the fp32 log-probabilities of the loss (4V). Dropout (0 in every preset) is not counted.
    `device` changes one term only, a LayerNorm's statistics for bf16 input.
    """
    if dtype not in _DTYPE_BYTES:
        raise PlanError(f"unknown activation dtype {dtype!r}; choose one of {', '.join(_DTYPE_BYTES)}")
    if device not in ("cuda", "cpu"):
        raise PlanError(f"device must be 'cuda' or 'cpu', got {device!r}")
    a, r = _DTYPE_BYTES[dtype], weight_bytes
    C, F, H, G, D, V = cfg.d_model, cfg.ffn_dim, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.vocab_size
    autocast = a != r  # products in another dtype than the weights: each linear layer casts its input

    if cfg.norm == "rmsnorm":
        norm = 4 * C + 4 + r * C
    else:  # the CPU keeps a bf16 input's statistics in bf16, CUDA in fp32
        norm = r * C + (4 if device == "cpu" and r == 2 else 8)
    attention = norm + (3 if autocast else 1) * a * C + a * C + 2 * a * G * D + a * C + 4 * H
    if cfg.position == "rope":
        attention += a * C  # the output, copied to merge the heads for o_proj (see above)
    mlp_inner = 4 * a * F if cfg.mlp == "swiglu" else 2 * a * F
    mlp = norm + (2 if autocast and cfg.mlp == "swiglu" else 1) * a * C + mlp_inner
    outside = 8 + 8 + norm + a * C + 4 * V
    return Activations(batch_size * seq_len, cfg.n_layers, attention + mlp, r * C, outside)


# --------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class StrategyPlan:
    """One strategy's memory on one GPU, with or without activation checkpointing (bytes)."""

    strategy: str
    checkpointing: bool
    state: ModelState
    buffers: int
    activations: int
    usable: float
    max_batch: int  # the largest micro-batch (sequences per GPU) that fits; 0 if none does
    communication: int  # values sent per GPU and step

    @property
    def total(self) -> int:
        return self.state.total + self.buffers + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.usable

    @property
    def name(self) -> str:
        return STRATEGY_NAMES[self.strategy] + (" + checkpointing" if self.checkpointing else "")


@dataclass(frozen=True)
class Recommendation:
    """The simplest strategy that fits (None if none does), its command line, and why."""

    strategy: str | None
    checkpointing: bool
    command: str | None
    reason: str
    gpus_needed: int | None = None  # when nothing fits: GPUs of this kind FSDP with checkpointing needs


@dataclass(frozen=True)
class Plan:
    """Everything `minillm plan` prints; every field is a plain number or name, ready to plot."""

    model_name: str
    model: ModelConfig
    note: str
    num_params: int
    num_gpus: int
    gpu: GPUSpec
    seq_len: int
    batch_size: int
    layout: Layout
    dtype: str
    activations: Activations
    rows: tuple[StrategyPlan, ...]
    flops_per_token: int
    tokens_per_param: float
    tokens: int
    mfu: float
    recommendation: Recommendation

    @property
    def usable(self) -> float:
        return usable_bytes(self.gpu.memory_gb)

    @property
    def train_flops(self) -> float:
        return float(self.tokens) * self.flops_per_token

    @property
    def seconds(self) -> float:
        return training_seconds(self.tokens, self.flops_per_token, self.num_gpus, self.gpu.peak_flops, self.mfu)

    def row(self, strategy: str, checkpointing: bool = False) -> StrategyPlan:
        return next(r for r in self.rows if r.strategy == strategy and r.checkpointing == checkpointing)


def compute_optimal_tokens(num_params: int, tokens_per_param: float = 20.0) -> int:
    """Training tokens of a compute-optimal run: about 20 per parameter (Hoffmann et al., 2022)."""
    return round(tokens_per_param * num_params)


def training_seconds(tokens: float, flops_per_token: float, num_gpus: int, peak_flops: float, mfu: float) -> float:
    """tokens * FLOPs per token / (GPUs * peak FLOP/s * MFU)."""
    return tokens * flops_per_token / (num_gpus * peak_flops * mfu)


def _sizes(cfg: ModelConfig, seq_len: int) -> tuple[int, int, int, int, int]:
    """(parameters, parameters of the matrices, of one block, outside the blocks, FLOPs per token), on the meta device."""
    with torch.device("meta"):
        model = LLM(cfg)
    total = model.num_parameters()
    matrices = {id(m.weight): m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear)}
    block = sum(p.numel() for p in model.blocks[0].parameters())
    return total, sum(matrices.values()), block, total - cfg.n_layers * block, model.flops_per_token(seq_len)


def _buffers(strategy: str, lay: Layout, a: int, matrices: int, block: int, root: int) -> int:
    """Bytes of weight copies and gathered units (see the module's docstring); the loss's are added apart."""
    if strategy == "zero3":
        # FSDP gathers in the compute dtype: the root (kept), this block and the next; one unit's full gradient.
        return a * (root + 2 * block) + lay.grad_bytes * max(root, block)
    unit_grad = lay.grad_bytes * max(root, block)  # ZeRO-2: one unit's gradient before its reduce-scatter
    if strategy == "zero2" and a < lay.weight_bytes:
        return unit_grad  # the weights are gathered in the compute dtype (engine_state): nothing to cast
    copies = a * matrices if a != lay.weight_bytes else 0  # autocast's copies of the matrices
    return copies + (unit_grad if strategy == "zero2" else 0)


def _check_int(value: object, what: str, example: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise PlanError(f"{what} must be a positive integer, got {value!r}; e.g. {example}")
    return value


def plan(model: str | int | ModelConfig, gpus: str = "1xH100", *, seq_len: int | None = None, batch_size: int = 1,
         gpu_memory: float | None = None, peak_flops: float | None = None, layout: str | Layout = "minillm",
         dtype: str = "bfloat16", mfu: float = 0.4, tokens_per_param: float = 20.0,
         _train_args: tuple[str, ...] | None = None) -> Plan:
    """Plan a training run of `model` (a preset, a parameter count such as '3B', or a ModelConfig)
    on `gpus` ('8xH100'; or a count with `gpu_memory` GB and `peak_flops`), `batch_size` sequences
    of `seq_len` tokens per GPU (default: the model's context). See the module's docstring."""
    num_gpus, gpu = parse_gpus(gpus, gpu_memory, peak_flops)
    if seq_len is not None:
        _check_int(seq_len, "the sequence length (--seq-len)", "--seq-len 2048")
    _check_int(batch_size, "the micro-batch (sequences per GPU)", "--batch 8")
    if isinstance(mfu, bool) or not isinstance(mfu, (int, float)) or not 0 < mfu <= 1:
        raise PlanError(f"--mfu must be a fraction in (0, 1], got {mfu!r}; e.g. --mfu 0.4 (40% of the peak)")
    _positive(tokens_per_param, "--tokens-per-param", "--tokens-per-param 20")
    lay = _layout(layout)
    if dtype not in _DTYPE_BYTES:
        raise PlanError(f"unknown activation dtype {dtype!r}; choose one of {', '.join(_DTYPE_BYTES)}")
    a = _DTYPE_BYTES[dtype]
    if a > lay.weight_bytes:
        raise PlanError(f"the {lay.name} layout keeps {lay.weight_bytes}-byte weights, so it computes in bf16; "
                        f"use --dtype bfloat16 (or --layout minillm for fp32)")
    name, cfg, note = resolve_model(model, seq_len)
    T = seq_len or cfg.max_seq_len
    num_params, matrices, block, root, flops = _sizes(cfg, T)
    usable = usable_bytes(gpu.memory_gb)
    act = activation_memory(cfg, batch_size, T, dtype=dtype, weight_bytes=lay.weight_bytes)
    per_seq = activation_memory(cfg, 1, T, dtype=dtype, weight_bytes=lay.weight_bytes)
    loss_grad = 2 * 4 * cfg.vocab_size * T  # bytes per sequence: two fp32 (T, V) gradients at the start of backward

    rows = []
    for strategy in ("single",) if num_gpus == 1 else STRATEGIES:
        state = engine_state(num_params, num_gpus, strategy, lay, dtype)
        fixed = _buffers(strategy, lay, a, matrices, block, root)
        for ckpt in (False, True):
            act_bytes, act_seq = (act.checkpointed, per_seq.checkpointed) if ckpt else (act.full, per_seq.full)
            room = usable - state.total - fixed
            max_batch = max(0, math.floor(room / (act_seq + loss_grad))) if room > 0 else 0
            rows.append(StrategyPlan(strategy, ckpt, state, fixed + batch_size * loss_grad, act_bytes, usable,
                                     max_batch, communication(strategy, num_params, num_gpus)))

    tokens = compute_optimal_tokens(num_params, tokens_per_param)
    if _train_args is None:
        _train_args = _model_args(name, cfg, T) + ("--set", f"seq_len={T}", "--set", f"batch_size={batch_size}")
    # Room for the sharded state under FSDP with checkpointing, on any number of GPUs (for the GPUs needed).
    fsdp_room = usable - _buffers("zero3", lay, a, matrices, block, root) - batch_size * loss_grad - act.checkpointed
    state_per_param = lay.weight_bytes + lay.grad_bytes + lay.optimizer_bytes
    rec = _recommend(rows, num_gpus, num_params, _train_args, T, batch_size, state_per_param, fsdp_room)
    return Plan(name, cfg, note, num_params, num_gpus, gpu, T, batch_size, lay, dtype, act, tuple(rows), flops,
                float(tokens_per_param), tokens, float(mfu), rec)


def plan_from_config(path: str, gpus: str = "1xH100", *, seq_len: int | None = None, batch_size: int | None = None,
                     **kwargs: object) -> Plan:
    """`plan` for a training config (TOML): its model, seq_len and batch_size unless given here."""
    from minillm.train import TrainError, load_config

    try:
        cfg = load_config(path)
        model_cfg = cfg.model_config()
    except TrainError as e:
        raise PlanError(str(e)) from None
    args = ("--config", str(path))
    p = plan(model_cfg, gpus, seq_len=cfg.seq_len if seq_len is None else seq_len,
             batch_size=cfg.batch_size if batch_size is None else batch_size,
             _train_args=args + _seq_args(seq_len, batch_size, model_cfg), **kwargs)
    return dataclasses.replace(p, model_name=cfg.model + (" with overrides" if cfg.model_overrides else ""))


def _seq_args(seq_len: int | None, batch_size: int | None, cfg: ModelConfig) -> tuple[str, ...]:
    args = ()
    if seq_len is not None:
        args += ("--set", f"seq_len={seq_len}")
        if seq_len > cfg.max_seq_len:
            args += ("--set", f"model.max_seq_len={seq_len}")
    if batch_size is not None:
        args += ("--set", f"batch_size={batch_size}")
    return args


def _model_args(name: str, cfg: ModelConfig, seq_len: int) -> tuple[str, ...]:
    """`--set` overrides that make `minillm train` build `cfg`: a preset, plus the fields that differ from it."""
    wanted = {**cfg.to_dict(), "max_seq_len": max(cfg.max_seq_len, seq_len)}

    def diff(preset: str) -> dict:
        base = ModelConfig.preset(preset).to_dict()
        return {k: v for k, v in wanted.items() if base[k] != v}

    base = name if name in PRESETS else min(PRESETS, key=lambda p: len(diff(p)))
    args = ("--set", f"model={base}")
    for k, v in diff(base).items():
        args += ("--set", f"model.{k}={'none' if v is None else str(v).lower() if isinstance(v, bool) else v}")
    return args


def _command(strategy: str, checkpointing: bool, num_gpus: int, train_args: tuple[str, ...]) -> str:
    """The command line that runs `strategy` on `num_gpus` GPUs (one node, or several of GPUS_PER_NODE)."""
    args = list(train_args)
    if TRAIN_STRATEGY[strategy]:
        args += ["--set", f"strategy={TRAIN_STRATEGY[strategy]}"]
    if checkpointing:
        args += ["--set", CHECKPOINTING_OVERRIDE]
    tail = " ".join(args)
    if num_gpus == 1:
        return f"minillm train {tail}"
    if num_gpus > GPUS_PER_NODE and num_gpus % GPUS_PER_NODE == 0:
        return (f"torchrun --nnodes {num_gpus // GPUS_PER_NODE} --nproc_per_node {GPUS_PER_NODE} --rdzv_backend c10d "
                f"--rdzv_endpoint HEAD:29500 -m minillm train {tail}   # on every node; HEAD: the first node's address")
    return f"torchrun --standalone --nproc_per_node {num_gpus} -m minillm train {tail}"


def _recommend(rows: list[StrategyPlan], num_gpus: int, num_params: int, train_args: tuple[str, ...], seq_len: int,
               batch_size: int, state_per_param: int, fsdp_room: float) -> Recommendation:
    """The first that fits of: each strategy in order of simplicity, then each again with checkpointing.

    `fsdp_room` is what a GPU has left for the sharded state under FSDP with checkpointing (from
    which the GPUs needed follow when nothing fits).

    Sharding costs communication and checkpointing costs a second forward (about a third more
    compute), so checkpointing comes last; among the strategies, fewer sharded parts is simpler.
    """
    for ckpt in (False, True):
        for row in rows:
            if row.checkpointing == ckpt and row.fits:
                cmd = _command(row.strategy, ckpt, num_gpus, train_args)
                what = {"single": "the whole model and its optimizer on one GPU",
                        "ddp": f"a full replica on each of the {num_gpus} GPUs",
                        "zero1": f"the optimizer state sharded over {num_gpus} GPUs",
                        "zero2": f"gradients and optimizer state sharded over {num_gpus} GPUs, the weights "
                                 "gathered from forward to backward",
                        "zero3": f"weights, gradients and optimizer state sharded over {num_gpus} GPUs"}[row.strategy]
                if ckpt:
                    what += ", activations recomputed in backward (about a third more compute)"
                return Recommendation(row.strategy, ckpt, cmd, f"{row.name}: {what}")
    # Nothing fits at this micro-batch. The ways out: a smaller micro-batch (gradient accumulation
    # keeps the batch), more GPUs of this kind for FSDP with checkpointing, or other parallelism.
    options = []
    best = max(rows, key=lambda r: r.max_batch)
    if best.max_batch >= 1:
        options.append(f"{best.name} fits --batch {best.max_batch} (accumulate gradients for a larger batch)")
    needed = None
    if fsdp_room > 0:
        needed = max(num_gpus + 1, math.ceil(state_per_param * num_params / fsdp_room))
        options.append(f"FSDP with checkpointing fits on {needed} of these GPUs")
    else:
        options.append("a shorter --seq-len or context parallelism (the sequence split over GPUs)")
    options.append("tensor or pipeline parallelism")
    return Recommendation(None, True, None, f"does not fit on these GPUs at {batch_size} x {seq_len} tokens per GPU; "
                          + "; or ".join(options), needed)


# --------------------------------------------------------------------------------------------
# The report


def _human(n: float) -> str:
    for value, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= value:
            return f"{n / value:.3g}{suffix}" if n / value < 100 else f"{n / value:.0f}{suffix}"
    return f"{n:.0f}"


def _duration(seconds: float) -> str:
    for unit, size in (("years", 365.25 * 86400), ("days", 86400), ("hours", 3600), ("minutes", 60)):
        if seconds >= 2 * size:
            return f"{seconds / size:.1f} {unit}"
    return f"{seconds:.0f} seconds"


WIDTH = 88  # format_plan's lines fit a terminal of 88 columns and the book's printed page


def _wrap(line: str, indent: int = 11) -> list[str]:
    """One report line, wrapped at WIDTH under its label (the first `indent` columns)."""
    return textwrap.wrap(line, WIDTH, subsequent_indent=" " * indent, break_on_hyphens=False) or [""]


def _wrap_command(command: str, indent: int = 2) -> list[str]:
    """A shell command, broken between options with a trailing backslash, so that it still pastes."""
    units: list[str] = []  # an option with its values, or the program and its first arguments
    for word in command.split(" "):
        if word.startswith("-") or not units:
            units.append(word)
        else:
            units[-1] += " " + word
    lines, line = [], " " * indent + units[0]
    for unit in units[1:]:
        if len(line) + 1 + len(unit) + 2 > WIDTH:
            lines.append(line + " \\")
            line = " " * (indent + 4) + unit
        else:
            line += " " + unit
    return [*lines, line]


def format_plan(p: Plan) -> str:
    """The report `minillm plan` prints: a header, a table of memory per GPU, compute and the recommendation.

    Every line fits in WIDTH columns: long text wraps under its label, the command breaks before an
    option with a trailing backslash.
    """
    cfg, lay = p.model, p.layout
    gpus = f"{p.num_gpus} x {p.gpu.name}"
    lines = _wrap(f"model      {p.model_name}: {_human(p.num_params)} parameters ({cfg.n_layers} layers, "
                  f"d_model {cfg.d_model}, {cfg.n_heads} heads / {cfg.n_kv_heads} kv, vocabulary {cfg.vocab_size})")
    if p.note:
        lines += _wrap(f"           {p.note}")
    for line in (
        f"GPUs       {gpus}: {p.gpu.memory_gb:g} GB each, {p.usable / GB:.1f} GB usable (less {RESERVED_FRACTION:.0%} and "
        f"{RESERVED_GB:g} GB), {p.gpu.peak_flops / 1e12:g} TFLOP/s",
        f"batch      {p.batch_size} x {p.seq_len} tokens per GPU, activations in {p.dtype} (eager; torch.compile needs less)",
        f"layout     {lay.name}, {lay.weight_bytes} + {lay.grad_bytes} + {lay.optimizer_bytes} bytes per parameter: "
        f"{lay.description}",
    ):
        lines += _wrap(line)
    # 27 + 8 + 7 + 7 + 8 + 7 + 7 + 6 + 11 = 88 columns
    lines += ["", f"{'per GPU, GB':<27}{'weights':>8}{'grads':>7}{'optim':>7}{'buffers':>8}{'activ.':>7}{'total':>7}"
                  "  fits  max batch"]
    for r in p.rows:
        s = r.state
        values = "".join(f"{v / GB:>{w}.1f}" for v, w in zip((s.weights, s.grads, s.optimizer, r.buffers, r.activations,
                                                              r.total), (8, 7, 7, 8, 7, 7)))
        lines.append(f"{r.name:<27}{values}  {'yes' if r.fits else 'no':<4}  {r.max_batch:>9}")
    if p.num_gpus > 1:
        lines += _wrap(f"traffic    {_human(2 * p.num_params)} values per GPU and step under DDP, ZeRO-1 and ZeRO-2 "
                       f"(2Ψ), {_human(3 * p.num_params)} under ZeRO-3 (3Ψ)")
    lines.append("")
    lines += _wrap(f"compute    {_human(p.tokens)} tokens for a compute-optimal run ({p.tokens_per_param:g} per parameter), "
                   f"{p.flops_per_token / 1e9:.3g} GFLOP per token at {p.seq_len}: {p.train_flops:.2e} FLOPs")
    lines += _wrap(f"time       {_duration(p.seconds)} on {gpus} at {p.mfu:.0%} MFU")
    lines.append("")
    lines += _wrap(f"recommended  {p.recommendation.reason}", indent=13)
    if p.recommendation.command:
        lines += _wrap_command(p.recommendation.command)
    return "\n".join(lines)
