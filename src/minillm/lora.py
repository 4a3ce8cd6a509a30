"""Low-rank adapters (LoRA), from scratch (chapter 08).

Fine-tuning changes every weight W (out, in) of a pretrained model by some dW. LoRA (Hu et al., 2022)
bets that the change a new task needs has a low rank, and learns it as a product of two thin matrices:

    y = x W^T + (alpha / r) * x A^T B^T        A: (r, in), B: (out, r), r << min(in, out)

W stays frozen; only A and B train, r (in + out) numbers per adapted layer instead of in * out.
B starts at zero, so the adapted model starts as the pretrained model exactly; A starts random,
so that B's first gradient is not zero (a product of two zero matrices would never move). After
training, B A * alpha / r folds into W (`merge_lora`): the merged model is a plain `LLM` again,
with no extra cost per token.

    layer = LoRALinear(nn.Linear(64, 64), rank=8)        # one layer
    names = apply_lora(model, rank=8)                      # the attention and MLP projections
    save_adapter("adapter.safetensors", model, base_fingerprint=fingerprint(model))
    load_adapter("adapter.safetensors", fresh_model)       # rank, alpha and targets from the file
    merge_lora(model)                                      # back to plain nn.Linear layers

Two choices, and why:

* **alpha defaults to the rank** (a scale of 1). Hu et al. multiply the update by alpha / r "where
  alpha is a constant in r" and "simply set alpha to the first r we try and do not tune it": with
  Adam, alpha acts like a learning-rate multiplier, and holding alpha fixed while r varies keeps the
  size of the update comparable across ranks. Our default is that recipe for the first rank you
  try. To compare ranks, pass the same alpha to each (the common alpha = 2 r is a learning rate twice
  as large, nothing more).
* **The targets are every projection of attention and of the MLP** (`DEFAULT_TARGETS`), never the
  embedding nor the output layer. Hu et al. adapted only the attention's query and value matrices to
  save parameters; later work (Dettmers et al., 2023, QLoRA) found that adapting every linear layer
  of the block is what brings LoRA close to full fine-tuning. At our sizes the adapters are cheap
  either way; ``targets=("q_proj", "v_proj")`` gives the paper's choice.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from collections.abc import Iterable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.files import atomic_write

__all__ = ["LoRAError", "LoRALinear", "ATTENTION_TARGETS", "SWIGLU_TARGETS", "GELU_TARGETS", "DEFAULT_TARGETS",
           "targets_for", "apply_lora", "merge_lora", "lora_layers", "lora_state_dict", "fingerprint",
           "save_adapter", "load_adapter", "trainable_parameters", "count_parameters"]

# The attribute names of the projections in minillm's blocks (minillm.attention.CausalSelfAttention,
# minillm.model.SwiGLU and GeluMLP). GPT-2's MLP has no gate, so its targets are a subset.
ATTENTION_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")
SWIGLU_TARGETS = ("gate_proj", "up_proj", "down_proj")
GELU_TARGETS = ("up_proj", "down_proj")
DEFAULT_TARGETS = ATTENTION_TARGETS + SWIGLU_TARGETS  # the names a model lacks are skipped (see apply_lora)

FORMAT = "minillm-lora-v1"  # the adapter file's format, in its metadata
_NEVER = ("lm_head",)  # the output layer: tied to the embedding, and a vocabulary-wide adapter is not "low-cost"


class LoRAError(ValueError):
    """Adapters that cannot be applied, saved or loaded as asked; the message names the problem and the fix."""


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _check_settings(rank: object, alpha: object, dropout: object) -> tuple[int, float, float]:
    """(rank, alpha, dropout) as int, float, float; alpha None becomes the rank."""
    if not _is_int(rank) or rank < 1:
        raise LoRAError(f"rank must be a positive integer, got {rank!r}; e.g. rank=8")
    alpha = rank if alpha is None else alpha
    if not _is_real(alpha) or alpha <= 0:
        raise LoRAError(f"alpha must be a positive finite number (or None for alpha = rank), got {alpha!r}")
    if not _is_real(dropout) or not 0.0 <= dropout < 1.0:
        raise LoRAError(f"dropout must be in [0, 1), got {dropout!r}")
    return int(rank), float(alpha), float(dropout)


# --------------------------------------------------------------------------------------------
# One adapted layer


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a trainable low-rank update: base(x) + (alpha / r) x A^T B^T.

    `base` is the wrapped layer itself (its weight and bias are frozen, not copied), `lora_A` is
    (rank, in_features) and `lora_B` (out_features, rank), in the base weight's dtype and on its
    device. `dropout` applies to the adapter's input only, in training mode (the base sees x as is).
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise LoRAError(f"LoRALinear wraps an nn.Linear, got {type(base).__name__}")
        rank, alpha, dropout = _check_settings(rank, alpha, dropout)
        self.rank, self.alpha, self.scale = rank, alpha, alpha / rank
        self.base = base
        base.requires_grad_(False)
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.empty(base.out_features, rank, device=w.device, dtype=w.dtype))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.train(base.training)  # a layer put into a model in eval mode must not start dropping out
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """A as nn.Linear initializes a weight (uniform, bound 1 / sqrt(in_features)), B zero.

        Hu et al. draw A from a Gaussian; any random A of variance about 1 / in_features does the same
        job: x A^T then has entries of the size of x's, whatever the width. B = 0 makes the update zero.
        """
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:
        """The base weight: code that reads `.weight.dtype` or `.weight.device` keeps working."""
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        # Two thin products, (.., in) -> (.., r) -> (.., out): never the (out, in) matrix B A.
        return self.base(x) + self.scale * F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)

    @torch.no_grad()
    def merged_weight(self) -> Tensor:
        """W + (alpha / r) B A, computed in float32 (at least) and returned in the base weight's dtype."""
        w = self.base.weight
        dtype = torch.promote_types(w.dtype, torch.float32)
        return (w.to(dtype) + self.scale * (self.lora_B.to(dtype) @ self.lora_A.to(dtype))).to(w.dtype)

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, scale={self.scale:g}"


# --------------------------------------------------------------------------------------------
# A whole model


def targets_for(cfg: object) -> tuple[str, ...]:
    """The projections of a minillm block with this ModelConfig: attention's four, and the MLP's
    three (SwiGLU) or two (GPT-2's GELU MLP)."""
    mlp = getattr(cfg, "mlp", "swiglu")
    return ATTENTION_TARGETS + (GELU_TARGETS if mlp == "gelu" else SWIGLU_TARGETS)


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every LoRALinear of `model`, by qualified name, in the model's order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _linear_children(model: nn.Module) -> list[tuple[nn.Module, str, str, nn.Linear]]:
    """(parent, attribute, qualified name, layer) for every nn.Linear child, in the model's order."""
    out = []
    for parent_name, parent in model.named_modules():
        if isinstance(parent, LoRALinear):
            continue  # its `base` is not a layer of the model's own
        for attr, child in parent.named_children():
            if isinstance(child, nn.Linear):
                out.append((parent, attr, f"{parent_name}.{attr}" if parent_name else attr, child))
    return out


def _resolve_targets(model: nn.Module, targets: Iterable[str] | str | None) -> tuple[tuple[str, ...], list]:
    """The target names to use, and the (parent, attribute, name, layer) they select."""
    linears = _linear_children(model)
    present = list(dict.fromkeys(attr for _, attr, _, _ in linears))
    if targets is None:
        names = tuple(t for t in DEFAULT_TARGETS if t in present)
        if not names:
            raise LoRAError(f"the model has none of the default targets {list(DEFAULT_TARGETS)}; its linear layers are "
                            f"named {present}: pass targets=[...] with some of these names")
    else:
        if isinstance(targets, str):
            targets = [targets]
        try:
            names = tuple(dict.fromkeys(targets))  # duplicates dropped, the order kept
        except TypeError:
            raise LoRAError(f"targets must be a list of layer names, got {type(targets).__name__}") from None
        if not names:
            raise LoRAError(f"targets is empty; pass layer names such as {list(DEFAULT_TARGETS)}, or None for those")
        bad = [t for t in names if not isinstance(t, str)]
        if bad:
            raise LoRAError(f"targets must be layer names (strings), got {bad!r}")
        never = [t for t in names if t in _NEVER]
        if never:
            raise LoRAError(f"{never} is the output layer, which LoRA leaves alone (it is tied to the embedding, and a "
                            f"vocabulary-wide adapter is not low-cost); adapt the block's projections {list(DEFAULT_TARGETS)}")
        missing = [t for t in names if t not in present]
        if missing:
            raise LoRAError(f"target(s) {missing} match no nn.Linear of the model; its linear layers are named "
                            f"{present} (lm_head is never adapted). GPT-2-style blocks (mlp='gelu') have no gate_proj: "
                            f"use targets_for(model.cfg)")
    chosen = [item for item in linears if item[1] in names]
    return names, chosen


def apply_lora(model: nn.Module, rank: int, alpha: float | None = None, targets: Iterable[str] | str | None = None,
               dropout: float = 0.0) -> list[str]:
    """Wrap the named projections of `model` in LoRALinear layers and freeze everything else, in place.

    `targets` are attribute names: every nn.Linear child of that name anywhere in the model is
    adapted. None (the default) takes the names of `DEFAULT_TARGETS` that the model has: all four
    attention projections and the MLP's (three in SwiGLU, two in GPT-2's GELU MLP). A name given
    explicitly must match at least one layer. `alpha` defaults to `rank` (see the module's notes).
    Returns the qualified names of the replaced layers, e.g. ``blocks.0.attn.q_proj``.

    Afterwards only the adapters' A and B matrices have requires_grad (`trainable_parameters`).
    """
    rank, alpha, dropout = _check_settings(rank, alpha, dropout)
    existing = lora_layers(model)
    if existing:
        first = next(iter(existing.values()))
        raise LoRAError(f"the model already has LoRA adapters ({len(existing)} layers, rank {first.rank}); "
                        "call merge_lora(model) first to fold them in and add new ones, or start from a fresh model")
    _, chosen = _resolve_targets(model, targets)
    model.requires_grad_(False)
    for parent, attr, _, layer in chosen:
        setattr(parent, attr, LoRALinear(layer, rank, alpha, dropout))
    return [name for _, _, name, _ in chosen]


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every LoRALinear by a plain nn.Linear whose weight is W + (alpha / r) B A, in place.

    The bias is kept, and so are the requires_grad flags of the base (frozen). The model's
    state_dict then has the keys of a model that never had adapters, so it saves, exports and
    loads as any other. The new weights are new tensors: tensors taken from the base model
    earlier (a state_dict, say) are not modified.
    """
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("the model has no LoRA adapters to merge; apply_lora or load_adapter first")
    if "" in layers:
        raise LoRAError("merge_lora works on a model that contains LoRALinear layers; for a lone layer, "
                        "use nn.Linear with layer.merged_weight()")
    modules = dict(model.named_modules())
    for name, layer in layers.items():
        parent_name, _, attr = name.rpartition(".")
        base = layer.base
        merged = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device="meta")
        merged.weight = nn.Parameter(layer.merged_weight(), requires_grad=base.weight.requires_grad)
        if base.bias is not None:
            merged.bias = nn.Parameter(base.bias.detach().clone(), requires_grad=base.bias.requires_grad)
        merged.train(base.training)
        setattr(modules[parent_name] if parent_name else model, attr, merged)
    return model


def lora_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' tensors only, under their qualified names (``blocks.0.attn.q_proj.lora_A``)."""
    out = {}
    for name, layer in lora_layers(model).items():
        out[f"{name}.lora_A"] = layer.lora_A.detach()
        out[f"{name}.lora_B"] = layer.lora_B.detach()
    return out


def fingerprint(model: nn.Module) -> str:
    """A SHA-256 of the base model: every tensor of its state_dict but the adapters' (names, dtypes,
    shapes and bytes), under the names it has without adapters, so that it is the same before and
    after `apply_lora`. Pass it to `save_adapter`, and `load_adapter` checks it."""
    layers = lora_layers(model)
    wrapped = {f"{name}.base." for name in layers}
    h = hashlib.sha256()
    for key, t in model.state_dict().items():
        if key.endswith((".lora_A", ".lora_B")) and key.rsplit(".", 1)[0] in layers:
            continue
        for prefix in wrapped:
            if key.startswith(prefix):
                key = prefix[: -len("base.")] + key[len(prefix):]
                break
        t = t.detach().cpu().contiguous()
        h.update(f"{key}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def trainable_parameters(model: nn.Module) -> int:
    """How many numbers an optimizer would train: parameters with requires_grad (a tied one once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, a shared Parameter counted once."""
    return trainable_parameters(model), sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------------------------
# Adapter files


def _safetensors():
    try:
        import safetensors
        import safetensors.torch
    except ImportError:
        raise LoRAError("adapters are saved with safetensors: pip install safetensors (or 'minillm[hf]')") from None
    return safetensors


def save_adapter(path: str | os.PathLike[str], model: nn.Module, *, base_fingerprint: str | None = None,
                 overwrite: bool = True) -> Path:
    """Write the adapters of `model` to one safetensors file, atomically (minillm.files.atomic_write).

    The metadata holds the format, rank, alpha, dropout, targets and the replaced layers' names, so
    that `load_adapter` can rebuild the adapters on a fresh model; and `base_fingerprint` if given
    (`fingerprint(model)` is the natural one), so that loading onto another base fails loudly.
    """
    layers = lora_layers(model)
    if not layers:
        raise LoRAError("the model has no LoRA adapters to save; apply_lora(model, rank) first")
    settings = {(m.rank, m.alpha, m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0) for m in layers.values()}
    if len(settings) != 1:
        raise LoRAError(f"the adapters differ in (rank, alpha, dropout): {sorted(settings)}; one file holds one setting")
    if base_fingerprint is not None and (not isinstance(base_fingerprint, str) or not base_fingerprint):
        raise LoRAError(f"base_fingerprint must be a non-empty string (e.g. fingerprint(model)), got {base_fingerprint!r}")
    rank, alpha, dropout = settings.pop()
    targets = list(dict.fromkeys(name.rpartition(".")[2] for name in layers))
    metadata = {"format": "pt", "minillm_format": FORMAT, "rank": str(rank), "alpha": repr(alpha), "dropout": repr(dropout),
                "targets": json.dumps(targets), "modules": json.dumps(list(layers))}
    if base_fingerprint is not None:
        metadata["base_fingerprint"] = base_fingerprint
    tensors = {k: v.cpu().contiguous() for k, v in lora_state_dict(model).items()}
    st = _safetensors()
    return atomic_write(path, lambda tmp: st.torch.save_file(tensors, str(tmp), metadata=metadata), overwrite=overwrite)


def _read_adapter(path: Path) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The metadata and tensors of an adapter file; LoRAError for anything that is not one."""
    if not path.is_file():
        raise LoRAError(f"no adapter file at {str(path)!r}; check the path (save_adapter writes one)")
    st = _safetensors()
    try:
        with st.safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except Exception as e:  # safetensors raises its own error type (and OSError) for a damaged file
        raise LoRAError(f"{str(path)!r} is not a readable safetensors file (truncated or corrupt?): {e}; "
                        "save the adapter again with save_adapter") from None
    if metadata.get("minillm_format") != FORMAT:
        raise LoRAError(f"{str(path)!r} is not a minillm adapter (its metadata says format "
                        f"{metadata.get('minillm_format')!r}, expected {FORMAT!r}); save it with save_adapter")
    return metadata, tensors


def _parse_metadata(path: Path, metadata: dict[str, str]) -> tuple[int, float, float, list[str], list[str]]:
    try:
        rank, alpha = int(metadata["rank"]), float(metadata["alpha"])
        dropout = float(metadata.get("dropout", "0.0"))
        targets, modules = json.loads(metadata["targets"]), json.loads(metadata["modules"])
        if not all(isinstance(x, list) and x and all(isinstance(s, str) for s in x) for x in (targets, modules)):
            raise ValueError("targets and modules must be non-empty lists of names")
        _check_settings(rank, alpha, dropout)
    except (KeyError, ValueError, TypeError) as e:
        raise LoRAError(f"the metadata of {str(path)!r} is damaged ({type(e).__name__}: {e}); save the adapter again") from None
    return rank, alpha, dropout, targets, modules


def load_adapter(path: str | os.PathLike[str], model: nn.Module, *, base_fingerprint: str | None = None) -> None:
    """Load an adapter file into `model`, in place.

    A model without adapters gets them first (`apply_lora` with the file's rank, alpha, dropout and
    targets); a model with adapters must have the same ones. If the file records a base fingerprint,
    it must equal `base_fingerprint`, or by default `fingerprint(model)`. Everything is checked
    before the model is touched: on any error (a damaged file, a missing or misshapen tensor, another
    base) the model is left as it was, and LoRAError names the problem and the fix.
    """
    path = Path(path)
    metadata, tensors = _read_adapter(path)
    rank, alpha, dropout, targets, modules = _parse_metadata(path, metadata)

    recorded = metadata.get("base_fingerprint")
    if recorded is not None:
        actual = base_fingerprint if base_fingerprint is not None else fingerprint(model)
        if actual != recorded:
            how = "the base_fingerprint you passed" if base_fingerprint is not None else "this model's fingerprint(model)"
            raise LoRAError(f"{str(path)!r} was trained on another base model: it records base fingerprint "
                            f"{recorded[:16]}..., but {how} is {actual[:16]}...; load the base weights it was trained on "
                            "(an adapter on the wrong base computes nonsense without any error)")
    elif base_fingerprint is not None:
        raise LoRAError(f"{str(path)!r} records no base fingerprint, so it cannot be checked against the one you passed; "
                        "save it with save_adapter(..., base_fingerprint=...) or load without base_fingerprint")

    existing = lora_layers(model)
    if existing:
        have = {(m.rank, m.alpha) for m in existing.values()}
        if have != {(rank, alpha)} or list(existing) != modules:
            raise LoRAError(f"the model's adapters (rank, alpha) = {sorted(have)} on {len(existing)} layers differ from the "
                            f"file's ({rank}, {alpha:g}) on {len(modules)} layers; load into a fresh model (without "
                            "adapters), which gets the file's, or merge_lora(model) first")
        shapes = {name: (m.in_features, m.out_features) for name, m in existing.items()}
    else:
        try:
            _, chosen = _resolve_targets(model, targets)
        except LoRAError as e:
            raise LoRAError(f"the adapter in {str(path)!r} does not fit this model: {e}") from None
        names = [name for _, _, name, _ in chosen]
        if names != modules:
            raise LoRAError(f"the adapter in {str(path)!r} adapts {len(modules)} layers ({modules[:3]}...), but its targets "
                            f"{targets} select {len(names)} in this model ({names[:3]}...); was it made for a model "
                            "with another number of layers or another block design?")
        shapes = {name: (layer.in_features, layer.out_features) for _, _, name, layer in chosen}

    expected = {}
    for name, (fan_in, fan_out) in shapes.items():
        expected[f"{name}.lora_A"] = (rank, fan_in)
        expected[f"{name}.lora_B"] = (fan_out, rank)
    missing = [k for k in expected if k not in tensors]
    if missing:
        raise LoRAError(f"{str(path)!r} lacks the tensor(s) {missing[:4]}{'...' if len(missing) > 4 else ''}; "
                        "the file is incomplete: save the adapter again with save_adapter")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise LoRAError(f"{str(path)!r} holds tensor(s) this model has no place for: {extra[:4]}; "
                        "was it made for another model?")
    for key, shape in expected.items():
        if tuple(tensors[key].shape) != shape:
            raise LoRAError(f"{key} in {str(path)!r} has shape {tuple(tensors[key].shape)}, but this model needs {shape}; "
                            "the adapter was made for a model with other dimensions (d_model, heads or d_ff): load it "
                            "onto the base it was trained on")
        if not tensors[key].is_floating_point():
            raise LoRAError(f"{key} in {str(path)!r} is {tensors[key].dtype}, not floating point; save the adapter again")

    if not existing:
        apply_lora(model, rank, alpha, targets, dropout)
    with torch.no_grad():
        for name, layer in lora_layers(model).items():
            layer.lora_A.copy_(tensors[f"{name}.lora_A"])
            layer.lora_B.copy_(tensors[f"{name}.lora_B"])
