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
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.attention import CausalSelfAttention, KVCache
from minillm.rope import RotaryEmbedding

__all__ = ["ConfigError", "ModelConfig", "PRESETS", "RMSNorm", "SwiGLU", "GeluMLP", "TransformerBlock", "LLM", "sample_next"]


class ConfigError(ValueError):
    """A model configuration that cannot work; the message names the field and the fix."""


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

        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "multiple_of"):
            value = getattr(self, name)
            need(isinstance(value, int) and value > 0, f"{name} must be a positive integer, got {value!r}")
        if self.n_kv_heads is None:
            self.n_kv_heads = self.n_heads
        need(self.n_kv_heads > 0, f"n_kv_heads must be positive, got {self.n_kv_heads}")
        need(self.d_model % self.n_heads == 0, f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        need(self.n_heads % self.n_kv_heads == 0, f"n_heads={self.n_heads} must be divisible by n_kv_heads={self.n_kv_heads}")
        need(self.norm in ("rmsnorm", "layernorm"), f"norm must be 'rmsnorm' or 'layernorm', got {self.norm!r}")
        need(self.mlp in ("swiglu", "gelu"), f"mlp must be 'swiglu' or 'gelu', got {self.mlp!r}")
        need(self.position in ("rope", "learned"), f"position must be 'rope' or 'learned', got {self.position!r}")
        if self.position == "rope":
            need((self.d_model // self.n_heads) % 2 == 0, f"rotary embeddings need an even head dimension, got {self.d_model // self.n_heads}")
        need(self.d_ff is None or self.d_ff > 0, f"d_ff must be positive, got {self.d_ff}")
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
        # Normalize in float32 whatever the activations' dtype: a mean of squares overflows bf16 easily.
        xf = x.float()
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

    def forward(self, x: Tensor, cache: KVCache | None = None) -> Tensor:
        x = x + self.dropout(self.attn(self.input_norm(x), cache))
        return x + self.dropout(self.mlp(self.post_attn_norm(x)))


def rope_for(cfg: ModelConfig) -> RotaryEmbedding | None:
    """The rotary tables a model with this config uses (None with learned positions)."""
    if cfg.position != "rope":
        return None
    return RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor)


class LLM(nn.Module):
    """A decoder-only transformer language model."""

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
        if cfg.tie_embeddings:
            self.lm_head.weight = self.token_embedding.weight
        self.drop = nn.Dropout(cfg.dropout)
        self.reset_parameters()

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

    def new_caches(self, batch_size: int, max_len: int | None = None) -> list[KVCache]:
        """One empty KV cache per layer, for `generate` or hand-written decoding loops."""
        max_len = max_len or self.cfg.max_seq_len
        return [block.attn.new_cache(batch_size, max_len) for block in self.blocks]

    def forward(self, ids: Tensor, targets: Tensor | None = None, caches: list[KVCache] | None = None,
                ignore_index: int = -100) -> tuple[Tensor, Tensor | None]:
        """ids (B, T) -> logits (B, T, V), and the mean cross-entropy against `targets` if given."""
        if ids.dim() != 2:
            raise ValueError(f"expected token ids of shape (batch, time), got {tuple(ids.shape)}")
        B, T = ids.shape
        start = caches[0].pos if caches else 0
        if start + T > self.cfg.max_seq_len:
            raise ValueError(f"the sequence reaches {start + T} tokens but the model's context is {self.cfg.max_seq_len}; "
                             "truncate the input (keep the last max_seq_len tokens) or use a model with a longer context")
        x = self.token_embedding(ids)
        if self.pos_embedding is not None:
            x = x + self.pos_embedding(torch.arange(start, start + T, device=ids.device))
        x = self.drop(x)
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches else None)
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=ignore_index)
        return logits, loss

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
        """
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be at least 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        B, T = ids.shape
        total = T + max_new_tokens
        if total > self.cfg.max_seq_len:
            raise ValueError(f"prompt ({T}) + max_new_tokens ({max_new_tokens}) = {total} exceeds the context of "
                             f"{self.cfg.max_seq_len} tokens; ask for fewer tokens or shorten the prompt")
        was_training = self.training
        self.eval()
        caches = self.new_caches(B, total)
        done = torch.zeros(B, dtype=torch.bool, device=ids.device)
        step_input, out = ids, ids
        for _ in range(max_new_tokens):
            logits, _ = self(step_input, caches=caches)
            nxt = sample_next(logits[:, -1].float(), temperature, top_k, top_p, generator)
            if eos_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_id), nxt)
                done |= nxt == eos_id
            out = torch.cat([out, nxt[:, None]], dim=1)
            step_input = nxt[:, None]
            if eos_id is not None and bool(done.all()):
                break
        self.train(was_training)
        return out


def sample_next(logits: Tensor, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                generator: torch.Generator | None = None) -> Tensor:
    """One token per row of `logits` (B, V), after temperature, top-k and top-p filtering."""
    if temperature == 0:
        return logits.argmax(-1)
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
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
