"""The transformer language model: a config, RMSNorm, SwiGLU, a pre-norm block, and the LLM.

    ids -> token_embedding -> [block] x n_layers -> final norm -> lm_head -> logits
    block(x) = x + attention(norm(x));  x = x + mlp(norm(x))

The default is the Llama design (RMSNorm, SwiGLU, rotary positions, no biases), and it matches
Hugging Face's `LlamaForCausalLM` weight for weight (see `minillm.hf`). Three flags turn it into a
GPT-2-style model for chapter 05's ablation: ``norm="layernorm"``, ``mlp="gelu"`` and
``position="learned"`` (and usually ``bias=True``); it is the same class either way.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.attention import CausalSelfAttention, KVCache
from minillm.rope import RotaryEmbedding

__all__ = ["ConfigError", "ModelConfig", "PRESETS", "RMSNorm", "SwiGLU", "GeluMLP", "TransformerBlock", "LLM",
           "sample_next", "check_sampling", "filter_logits", "draw"]


class ConfigError(ValueError):
    """A model configuration that cannot work; the message names the field and the fix."""


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # True is an int to Python


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


@dataclass
class ModelConfig:
    """Every shape and choice of the model. Validated when constructed."""

    vocab_size: int = 4096
    d_model: int = 256
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int | None = None  # None: as many as n_heads (plain multi-head attention)
    d_ff: int | None = None  # None: about 8/3 d_model for SwiGLU, 4 d_model for GELU (see ffn_dim)
    multiple_of: int = 64  # the default d_ff is rounded up to a multiple of this
    max_seq_len: int = 512
    rope_theta: float = 10000.0
    rope_scaling: str | None = None  # None, "linear" or "ntk" (see minillm.rope)
    rope_factor: float = 1.0
    norm_eps: float = 1e-5
    dropout: float = 0.0
    tie_embeddings: bool = False
    norm: str = "rmsnorm"  # or "layernorm"
    mlp: str = "swiglu"  # or "gelu"
    position: str = "rope"  # or "learned"
    bias: bool = False

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(msg)

        def default(name: str) -> object:
            return next(f.default for f in fields(self) if f.name == name)

        # Types first, so that a bool, a float or a string is named here rather than failing later.
        # Integers are stored as int and reals as float (numpy scalars are accepted and converted).
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "multiple_of", "n_kv_heads", "d_ff"):
            value = getattr(self, name)
            if value is None and default(name) is None:
                continue
            hint = f"e.g. {name}={default(name)}" if default(name) is not None else "pass an int, or None for the default"
            need(_is_int(value) and value > 0, f"{name} must be a positive integer, got {value!r} ({type(value).__name__}); {hint}")
            setattr(self, name, int(value))
        for name in ("rope_theta", "rope_factor", "norm_eps", "dropout"):
            value = getattr(self, name)
            need(_is_real(value), f"{name} must be a finite real number, got {value!r} ({type(value).__name__}); e.g. {name}={default(name)}")
            setattr(self, name, float(value))
        for name in ("tie_embeddings", "bias"):
            value = getattr(self, name)
            need(isinstance(value, bool), f"{name} must be True or False, got {value!r} ({type(value).__name__})")
        for name, choices in (("norm", ("rmsnorm", "layernorm")), ("mlp", ("swiglu", "gelu")),
                              ("position", ("rope", "learned")), ("rope_scaling", (None, "linear", "ntk"))):
            value = getattr(self, name)
            need(value is None or isinstance(value, str), f"{name} must be a string, got {value!r} ({type(value).__name__})")
            need(value in choices, f"{name} must be {' or '.join(map(repr, choices))}, got {value!r}")
        # Then the values and how they fit together.
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        need(self.d_model % self.n_heads == 0, f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        need(self.n_heads % self.n_kv_heads == 0, f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        if self.position == "rope":
            need((self.d_model // self.n_heads) % 2 == 0, f"rotary embeddings need an even head dimension, got {self.d_model // self.n_heads}")
        need(self.rope_theta > 1.0, f"rope_theta must be greater than 1, got {self.rope_theta}")
        need(self.rope_factor >= 1.0, f"rope_factor must be at least 1, got {self.rope_factor}")
        need(self.rope_scaling is not None or self.rope_factor == 1.0,
             f"rope_factor={self.rope_factor} has no effect without rope_scaling; set rope_scaling='linear' or 'ntk', or rope_factor=1.0")
        need(0.0 <= self.dropout < 1.0, f"dropout must be in [0, 1), got {self.dropout}")
        need(self.norm_eps > 0, f"norm_eps must be positive, got {self.norm_eps}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """The hidden width of the MLP. SwiGLU's default keeps the GELU MLP's parameter count:
        three matrices of width 8/3 C instead of two of 4 C, rounded up to `multiple_of`."""
        if self.d_ff is not None:
            return self.d_ff
        if self.mlp == "gelu":
            return 4 * self.d_model
        hidden = int(8 * self.d_model / 3)
        return self.multiple_of * math.ceil(hidden / self.multiple_of)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        if not isinstance(d, dict):
            raise ConfigError(f"a model config is a dict of fields, got {type(d).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s) {unknown}; known fields: {sorted(known)}")
        return cls(**d)

    @classmethod
    def preset(cls, name: str, **overrides: object) -> ModelConfig:
        """A named configuration (see PRESETS), with any field overridden."""
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


PRESETS: dict[str, dict] = {
    # Trains in minutes on a laptop CPU (chapter 06).
    "tiny": dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=256),
    # GPT-2 small's shape with the Llama design: 124M parameters with tied embeddings and GPT-2's vocabulary.
    "gpt2-small": dict(vocab_size=50304, d_model=768, n_layers=12, n_heads=12, max_seq_len=1024, tie_embeddings=True),
    # Llama-shaped models for the memory planner of chapter 07 (not instantiated in tests).
    "llama-350m": dict(vocab_size=32000, d_model=1024, n_layers=24, n_heads=16, n_kv_heads=8, max_seq_len=2048),
    "llama-1b": dict(vocab_size=32000, d_model=2048, n_layers=22, n_heads=32, n_kv_heads=4, d_ff=5632, max_seq_len=2048),
    "llama-3b": dict(vocab_size=32000, d_model=3200, n_layers=26, n_heads=32, d_ff=8640, max_seq_len=2048),
    "llama-7b": dict(vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, d_ff=11008, max_seq_len=4096),
}


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * weight: LayerNorm without centring and without a bias."""

    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        # Normalize in at least float32: a mean of squares overflows bf16 easily (float64 stays float64).
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)): a gated MLP (Shazeer, 2020)."""

    def __init__(self, d_model: int, hidden: int, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(d_model, hidden, bias=bias)
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class GeluMLP(nn.Module):
    """down(gelu(up(x))): GPT-2's MLP, for the ablation."""

    def __init__(self, d_model: int, hidden: int, bias: bool = True) -> None:
        super().__init__()
        self.up_proj = nn.Linear(d_model, hidden, bias=bias)
        self.down_proj = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.gelu(self.up_proj(x), approximate="tanh"))


def _norm(cfg: ModelConfig) -> nn.Module:
    return RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.norm == "rmsnorm" else nn.LayerNorm(cfg.d_model, cfg.norm_eps, bias=cfg.bias)


class TransformerBlock(nn.Module):
    """Pre-norm residual block: each sublayer reads a normalized copy and adds to the stream."""

    def __init__(self, cfg: ModelConfig, rope: RotaryEmbedding | None) -> None:
        super().__init__()
        self.input_norm = _norm(cfg)
        self.attn = CausalSelfAttention(cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.dropout, cfg.bias, position_hook=rope)
        self.post_attn_norm = _norm(cfg)
        mlp = SwiGLU if cfg.mlp == "swiglu" else GeluMLP
        self.mlp = mlp(cfg.d_model, cfg.ffn_dim, cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, cache: KVCache | None = None, *, positions: Tensor | None = None,
                attention_mask: Tensor | None = None) -> Tensor:
        x = x + self.dropout(self.attn(self.input_norm(x), cache, positions=positions, attention_mask=attention_mask))
        return x + self.dropout(self.mlp(self.post_attn_norm(x)))


def rope_for(cfg: ModelConfig) -> RotaryEmbedding | None:
    """The rotary tables a model with this config uses (None with learned positions)."""
    if cfg.position != "rope":
        return None
    return RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor)


class LLM(nn.Module):
    """A decoder-only transformer language model.

    Built on the meta device (no memory: to inspect a 7B model, or to shard it with FSDP first), a
    model becomes real in one of the two usual PyTorch ways, and both give the model a normal build
    gives: ``model.to_empty(device=d)`` then ``model.reset_parameters()`` to initialize it, or
    ``model.load_state_dict(state, assign=True)`` to adopt a checkpoint's tensors (`minillm.hf` does
    this). Neither copies nor loses anything behind the user's back: the rotary tables, which no
    checkpoint holds, are recomputed (see `RotaryEmbedding`), and a tied output layer stays the very
    Parameter of the embedding, so an optimizer sees it once.
    """

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embedding = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.position == "learned" else None
        # One rotary table shared by every layer: it holds no parameters, only cos and sin.
        self.rope = rope_for(cfg)
        self.blocks = nn.ModuleList(TransformerBlock(cfg, self.rope) for _ in range(cfg.n_layers))
        self.norm = _norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.tie_weights()
        self.drop = nn.Dropout(cfg.dropout)
        self.register_load_state_dict_pre_hook(_check_tied_state)
        self.register_load_state_dict_post_hook(_after_load)
        self.reset_parameters()

    def tie_weights(self) -> None:
        """Make the output layer use the embedding's Parameter (with tie_embeddings). Idempotent."""
        if self.cfg.tie_embeddings and self.lm_head.weight is not self.token_embedding.weight:
            self.lm_head.weight = self.token_embedding.weight

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (torch's private hook behind .to() and to_empty())
        # to_empty() and moves off the meta device give each module its own copy of a shared weight.
        super()._apply(fn, recurse)
        self.tie_weights()
        return self

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """GPT-2's initialization: N(0, 0.02) everywhere, and the projections that write into the
        residual stream scaled by 1/sqrt(2 n_layers), so that the stream's variance does not grow
        with depth (each block adds two such terms)."""
        if self.token_embedding.weight.is_meta:
            return
        residual_std = 0.02 / math.sqrt(2 * self.cfg.n_layers)
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                std = residual_std if name.endswith(("o_proj", "down_proj")) else 0.02
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=0.02)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                if module.weight is not None:
                    nn.init.ones_(module.weight)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)

    def new_caches(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> list[KVCache]:
        """One empty KV cache per layer, for `generate` or hand-written decoding loops.

        `dtype` defaults to the autocast dtype when autocast is on for the model's device (the keys
        and values come out of the projections in it), else to the weights' dtype.
        """
        max_len = max_len or self.cfg.max_seq_len
        return [block.attn.new_cache(batch_size, max_len, dtype) for block in self.blocks]

    # -- the forward pass ------------------------------------------------------------------------

    def forward(self, ids: Tensor, targets: Tensor | None = None, caches: list[KVCache] | None = None,
                ignore_index: int = -100, last_only: bool = False, *, positions: Tensor | None = None,
                attention_mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
        """ids (B, T) -> logits (B, T, V), and the mean cross-entropy against `targets` (B, T) if given.

        Targets equal to `ignore_index` do not count; if none counts, the loss is 0 (a sum over no
        terms, still attached to the graph, with zero gradients) rather than 0/0 = NaN. With
        `last_only`, the output layer runs on the last position only and the logits are (B, 1, V):
        what generation needs, without the full-vocabulary product at every prompt position.

        For batches whose rows differ (left-padded prompts, packed documents): `positions` (B, T) gives
        each token's position (default: the cache offset onwards, the same for every row), and
        `attention_mask` removes keys, as a (B, S) padding mask over the S cached + new positions or
        a boolean (B, T, S) mask (see `minillm.attention.attention_mask_for`).
        """
        B, T = self._check_ids(ids, "token ids")
        if positions is not None:
            self._check_positions(positions, (B, T))
            positions = positions.to(ids.device)
        if attention_mask is not None and isinstance(attention_mask, Tensor):
            attention_mask = attention_mask.to(ids.device)  # its shape is checked where S is known, in attention
        if caches is not None and len(caches) != self.cfg.n_layers:
            raise ValueError(f"expected one KV cache per layer ({self.cfg.n_layers}), got {len(caches)}; use model.new_caches()")
        start = caches[0].pos if caches else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"the sequence reaches {start + T} tokens but the model's context is {self.cfg.max_seq_len}; "
                             "truncate the input (keep the last max_seq_len tokens) or use a model with a longer context")
        if targets is not None and last_only:
            raise ValueError("last_only computes the logits of the last position only; a loss needs all of them")
        counted = None if targets is None else self._check_targets(targets, ids.shape, ignore_index)
        logits = self._logits(ids, caches, last_only, positions, attention_mask)
        loss = None
        if targets is not None:
            # In float32 whatever the logits' dtype: a bf16 log-sum-exp over the vocabulary loses digits.
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index,
                                   reduction="mean" if counted else "sum")
        return logits, loss

    def _logits(self, ids: Tensor, caches: list[KVCache] | None, last_only: bool,
                positions: Tensor | None = None, attention_mask: Tensor | None = None) -> Tensor:
        """The computation itself, on ids that `forward` or `generate` has checked."""
        start = caches[0].pos if caches else 0
        x = self.token_embedding(ids)
        if self.pos_embedding is not None:
            where = torch.arange(start, start + ids.size(1), device=ids.device) if positions is None else positions
            x = x + self.pos_embedding(where)
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches else None, positions=positions, attention_mask=attention_mask)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.norm(x))

    def _check_ids(self, ids: Tensor, what: str) -> tuple[int, int]:
        """(B, T) of a batch of token ids, after checking them: an out-of-range id would otherwise reach
        the embedding as a bare IndexError (or, on a GPU, a device-side assert). One min/max reduction."""
        V = self.cfg.vocab_size
        if not isinstance(ids, Tensor):
            raise ValueError(f"{what} must be a tensor of shape (batch, time), got {type(ids).__name__}; wrap them with torch.tensor([...])")
        if ids.dim() != 2:
            raise ValueError(f"expected {what} of shape (batch, time), got {tuple(ids.shape)}; add a batch dimension with ids[None]")
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{what} must be int64 (or int32) indices into the vocabulary of {V} tokens, got {ids.dtype}; "
                             "convert whole numbers with .long()")
        if ids.numel() == 0:
            raise ValueError(f"{what} are empty (shape {tuple(ids.shape)}); give at least one token per sequence")
        lo, hi = torch.stack(ids.aminmax()).tolist()
        if lo < 0 or hi >= V:
            raise ValueError(f"{what} must be in [0, {V}) for the model's vocabulary of {V} tokens, got values from {lo} to {hi}; "
                             "does the tokenizer have more tokens than the model's vocab_size?")
        return ids.shape

    def _check_positions(self, positions: Tensor, shape: tuple[int, int]) -> None:
        """Positions index the rotary tables or the position embedding: one shape and range check."""
        if not isinstance(positions, Tensor) or positions.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"positions must be an int64 tensor of shape (batch, time), got {getattr(positions, 'dtype', type(positions).__name__)}")
        if positions.shape != shape:
            raise ValueError(f"positions must have the shape of the ids, {tuple(shape)}, got {tuple(positions.shape)}")
        lo, hi = torch.stack(positions.aminmax()).tolist()
        if lo < 0 or hi >= self.cfg.max_seq_len:
            raise ValueError(f"positions must be in [0, {self.cfg.max_seq_len}) for the model's context of {self.cfg.max_seq_len} "
                             f"tokens, got values from {lo} to {hi}")

    def _check_targets(self, targets: Tensor, shape: torch.Size, ignore_index: int) -> int:
        """How many targets count (are not ignore_index), after checking shape, dtype and range."""
        V = self.cfg.vocab_size
        if not isinstance(targets, Tensor) or targets.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"targets must be an int64 tensor of token ids, got {getattr(targets, 'dtype', type(targets).__name__)}")
        if targets.shape != shape:
            raise ValueError(f"targets must have the shape of the ids, {tuple(shape)}, got {tuple(targets.shape)}")
        counts = targets != ignore_index
        lo, hi = torch.where(counts, targets, 0).aminmax()
        lo, hi, n = torch.stack([lo.long(), hi.long(), counts.sum()]).tolist()
        if lo < 0 or hi >= V:
            raise ValueError(f"targets must be in [0, {V}) for the model's vocabulary of {V} tokens, or equal ignore_index "
                             f"({ignore_index}), got values from {lo} to {hi}")
        return n

    # -- counting --------------------------------------------------------------------------------

    def num_parameters(self, exclude_embeddings: bool = False) -> int:
        """Parameters, each shared tensor counted once; optionally without the embedding tables."""
        n = sum(p.numel() for p in self.parameters())  # parameters() already yields a tied weight once
        if exclude_embeddings:
            n -= self.token_embedding.weight.numel()
            if self.pos_embedding is not None:
                n -= self.pos_embedding.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> int:
        """Training FLOPs per token: 6 N for the weights (forward and backward through every matrix but
        the embedding lookup, the output layer included; Kaplan et al., 2020), plus 12 L C T for the
        attention scores and weighted sums at context T, as the PaLM paper counts them (ignoring the
        causal mask, which halves the true figure)."""
        cfg = self.cfg
        T = seq_len or cfg.max_seq_len
        n = self.num_parameters(exclude_embeddings=True)
        if cfg.tie_embeddings:
            n += self.lm_head.weight.numel()  # the tied matrix still does the output layer's work
        return 6 * n + 12 * cfg.n_layers * cfg.d_model * T

    # -- generation ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, ids: Tensor, max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, eos_id: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Extend `ids` (B, T) by up to `max_new_tokens`, with the KV cache.

        temperature 0 is greedy; top_k keeps the k most likely tokens; top_p keeps the smallest set whose
        probability reaches p. A sequence that produced `eos_id` stops (the batch stops when all have).
        The last new token is returned but never fed back, so the model sees T + max_new_tokens - 1
        positions, which may equal its context. max_new_tokens=0 returns a copy of the prompt. The
        model's training flag is restored afterwards, even after an error.
        """
        B, T = self._check_ids(ids, "prompt ids")
        check_sampling(temperature, top_k, top_p)
        if not _is_int(max_new_tokens) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        V = self.cfg.vocab_size
        if eos_id is not None and not (_is_int(eos_id) and 0 <= eos_id < V):
            raise ValueError(f"eos_id must be a token id in [0, {V}) for the model's vocabulary of {V} tokens, or None; got {eos_id!r}")
        positions = T + max(max_new_tokens - 1, 0)
        if positions > self.cfg.max_seq_len:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) feeds {positions} positions through the model, "
                             f"which exceeds the context of {self.cfg.max_seq_len} tokens; ask for fewer tokens or shorten the prompt")
        if max_new_tokens == 0:
            return ids.clone()
        was_training = self.training
        self.eval()
        try:
            caches = self.new_caches(B, positions)
            done = torch.zeros(B, dtype=torch.bool, device=ids.device)
            step_input, out = ids, ids
            for _ in range(max_new_tokens):
                logits = self._logits(step_input, caches, last_only=True)
                nxt = sample_next(logits[:, -1].float(), temperature, top_k, top_p, generator)
                if eos_id is not None:
                    nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                    done |= nxt == eos_id
                out = torch.cat([out, nxt[:, None]], dim=1)
                step_input = nxt[:, None]
                if eos_id is not None and bool(done.all()):
                    break
        finally:
            self.train(was_training)
        return out


def _check_tied_state(module: LLM, state: dict, prefix: str, *args: object) -> None:
    # A load_state_dict pre-hook: loading two different matrices into one tied Parameter would keep
    # whichever comes last and drop the other without a word.
    emb, head = state.get(prefix + "token_embedding.weight"), state.get(prefix + "lm_head.weight")
    if module.cfg.tie_embeddings and isinstance(emb, Tensor) and isinstance(head, Tensor) and not emb.is_meta:
        same = emb.shape == head.shape and (emb.data_ptr() == head.data_ptr() or torch.equal(emb, head))
        if not same:
            raise ConfigError("the state dict has an lm_head.weight that differs from token_embedding.weight, but the model "
                              "ties them (tie_embeddings=True); build the model with tie_embeddings=False to keep both")


def _after_load(module: LLM, incompatible_keys: object) -> None:
    # A load_state_dict post-hook: assign=True puts a new Parameter in each module, untying a shared
    # weight; and the rotary tables of a model built on the meta device are still meta.
    module.tie_weights()
    if module.rope is not None and module.rope.cos.device != module.token_embedding.weight.device:
        module.rope.reset_tables(module.token_embedding.weight.device)


def check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ValueError, naming the argument and its range, for a setting `sample_next` cannot use."""
    if not _is_real(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and not (_is_int(top_k) and top_k >= 1):
        raise ValueError(f"top_k must be an int of at least 1, or None, got {top_k!r}")
    if top_p is not None and not (_is_real(top_p) and 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1], or None, got {top_p!r}")


def filter_logits(logits: Tensor, temperature: float, top_k: int | None = None, top_p: float | None = None) -> Tensor:
    """logits / temperature (> 0), with -inf for the tokens that top-k and top-p leave out."""
    logits = logits / temperature
    if top_k is not None and top_k < logits.size(-1):
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token if the tokens before it already reach top_p (the most likely one always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return logits


def draw(logits: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """One token per row of `logits` (B, V), drawn from their softmax.

    The draw happens on the generator's device: a CPU generator with a CUDA model samples from probabilities
    copied to the CPU (B x V numbers), so that one seeded generator serves wherever the model runs.
    """
    probs = torch.softmax(logits, dim=-1)
    if generator is not None and generator.device != probs.device:
        return torch.multinomial(probs.to(generator.device), 1, generator=generator).squeeze(-1).to(logits.device)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """One token per row of `logits` (B, V), after temperature, top-k and top-p filtering (see `draw`)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0:
        return logits.argmax(-1)
    return draw(filter_logits(logits, temperature, top_k, top_p), generator)
