"""Causal self-attention: multi-head, grouped-query and multi-query, with a KV cache.

Shapes, throughout: B batch, T new positions, S positions attended to (cached + new), C = d_model,
H query heads, G key/value heads (H % G == 0), D = C // H per head.

One module covers the three variants of chapter 03: G == H is multi-head attention, 1 < G < H
grouped-query attention, G == 1 multi-query attention. The fused kernel
(`torch.nn.functional.scaled_dot_product_attention`) is the default; `need_weights=True` takes the
explicit path, which materializes the (T, S) weights for teaching and plots, and computes the same.
Position information enters only through `position_hook(q, k, start)`, which chapter 04's rotary
embeddings plug into without changes here.

Batches whose rows differ (left-padded prompts in generation, several documents packed into one
row for fine-tuning) pass two optional arguments: `positions`, each token's own position, which
goes to the hook in place of `start`; and `attention_mask`, which removes keys a query may not see
(see `attention_mask_for`). Without them, the computation is exactly the plain causal one.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["AttentionError", "KVCache", "CausalSelfAttention", "attention_mask_for", "causal_mask", "scaled_dot_product"]

# hook(q, k, start): `start` is the first position of every row (an int), or a (B, T) tensor holding
# each token's own position when rows differ.
PositionHook = Callable[[Tensor, Tensor, int | Tensor], tuple[Tensor, Tensor]]


class AttentionError(ValueError):
    """An attention module was configured or called with shapes that cannot work."""


def causal_mask(t: int, s: int, device: torch.device | None = None) -> Tensor:
    """A (t, s) boolean mask, True where query i may attend to key j.

    The t queries are the *last* t of the s positions (the earlier ones are in the cache), so query i
    sits at position s - t + i and sees keys 0 .. s - t + i.
    """
    return torch.ones(t, s, dtype=torch.bool, device=device).tril(diagonal=s - t)


def scaled_dot_product(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None, dropout: float = 0.0) -> tuple[Tensor, Tensor]:
    """The explicit computation: softmax(q k^T / sqrt(D)) v, returning (output, weights).

    q: (..., T, D), k and v: (..., S, D), mask: boolean, True = may attend, of shape (T, S) or any
    shape that broadcasts to the scores, such as (B, 1, T, S).
    """
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1)
    if dropout > 0.0:
        weights = F.dropout(weights, p=dropout)
    return weights @ v, weights


def attention_mask_for(attention_mask: Tensor, t: int, s: int) -> Tensor:
    """The (B, 1, T, S) boolean mask, True = may attend, for T new queries over S keys (cached + new).

    `attention_mask` is either
      * (B, S), a key padding mask: True (or 1) where the key is a real token, False (0) at padding;
      * (B, T, S) or (B, 1, T, S), boolean: which keys each query may see, e.g. a block-diagonal
        mask that keeps packed documents apart.
    Either way it can only remove keys: the result is also causal. And every query may see its own
    key, so that no row of the softmax is empty (that would be 0/0 = NaN): a real token's own key is
    real anyway, and a pad query gets an output that nothing reads.
    """
    if not isinstance(attention_mask, Tensor):
        raise AttentionError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    m = attention_mask
    if m.dim() == 2 and m.size(1) == s and (m.dtype == torch.bool or not m.is_floating_point()):
        m = m.bool()[:, None, None, :]  # (B, 1, 1, S): the same keys for every query
    elif m.dim() in (3, 4) and m.dtype == torch.bool and m.shape[-2:] == (t, s) and (m.dim() == 3 or m.size(1) == 1):
        m = m if m.dim() == 4 else m[:, None]
    else:
        raise AttentionError(
            f"attention_mask must be a (batch, {s}) padding mask (bool or 0/1, over the cached and new positions) or a "
            f"boolean (batch, {t}, {s}) or (batch, 1, {t}, {s}) mask, got {m.dtype} of shape {tuple(m.shape)}"
        )
    own = torch.arange(s, device=m.device) == torch.arange(s - t, s, device=m.device)[:, None]  # (T, S): query i's own key
    return (m & causal_mask(t, s, m.device)) | own


class KVCache:
    """Preallocated keys and values of one attention layer, for generation.

    Buffers have shape (B, G, max_len, D). `update` writes the new positions after the ones already
    held and returns views of everything held so far; it never reallocates, and it refuses to run
    past `max_len` rather than overwrite or grow silently.
    """

    def __init__(self, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        if min(batch_size, n_kv_heads, max_len, head_dim) < 1:
            raise AttentionError(f"KVCache sizes must be positive, got batch_size={batch_size}, "
                                 f"n_kv_heads={n_kv_heads}, max_len={max_len}, head_dim={head_dim}")
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0  # positions filled so far

    def update(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append k, v of shape (B, G, T, D); return the cached (B, G, pos + T, D) keys and values."""
        b, g, t, d = k.shape
        if (b, g, d) != (self.k.size(0), self.k.size(1), self.k.size(3)):
            raise AttentionError(f"KVCache holds (batch, kv_heads, head_dim) = {(self.k.size(0), self.k.size(1), self.k.size(3))}, "
                                 f"got {(b, g, d)}")
        if self.pos + t > self.max_len:
            raise AttentionError(f"KVCache is full: it holds {self.pos} of {self.max_len} positions and cannot take "
                                 f"{t} more; create it with a larger max_len (at least {self.pos + t}) or reset() it")
        self.k[:, :, self.pos : self.pos + t] = k
        self.v[:, :, self.pos : self.pos + t] = v
        self.pos += t
        return self.k[:, :, : self.pos], self.v[:, :, : self.pos]

    def reset(self) -> None:
        """Forget every cached position (the buffers are reused)."""
        self.pos = 0

    def nbytes(self) -> int:
        """Memory held by the two buffers."""
        return self.k.numel() * self.k.element_size() * 2


class CausalSelfAttention(nn.Module):
    """Causal self-attention with H query heads sharing G key/value heads.

    Args:
        d_model: width of the residual stream, C.
        n_heads: query heads H; C must be divisible by H.
        n_kv_heads: key/value heads G (default H); H must be divisible by G.
        dropout: dropout on the attention weights, in training mode only.
        bias: whether the projections have biases (GPT-2 yes, Llama no).
        position_hook: optional `hook(q, k, start) -> (q, k)` applied to (B, heads, T, D) queries
            and keys whose first position is `start`, before the cache; RoPE plugs in here.
    """

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int | None = None, dropout: float = 0.0,
                 bias: bool = False, position_hook: PositionHook | None = None) -> None:
        super().__init__()
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if d_model < 1 or n_heads < 1 or n_kv_heads < 1:
            raise AttentionError(f"d_model, n_heads and n_kv_heads must be positive, got {d_model}, {n_heads}, {n_kv_heads}")
        if d_model % n_heads:
            raise AttentionError(f"d_model={d_model} is not divisible by n_heads={n_heads}: each head gets d_model / n_heads dimensions")
        if n_heads % n_kv_heads:
            raise AttentionError(f"n_heads={n_heads} is not divisible by n_kv_heads={n_kv_heads}: each key/value head serves n_heads / n_kv_heads query heads")
        if not 0.0 <= dropout < 1.0:
            raise AttentionError(f"dropout must be in [0, 1), got {dropout}")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.dropout = dropout
        self.position_hook = position_hook
        self.q_proj = nn.Linear(d_model, n_heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(d_model, n_kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=bias)

    def new_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """An empty cache shaped for this layer, on its device.

        Its dtype is `dtype`, else the one the keys and values will have: the autocast dtype when
        autocast is on for the weights' device and the weights are float32 (under bf16 autocast the
        projections return bf16, and a float32 cache would convert them at every step), else the
        weights' dtype.
        """
        w = self.k_proj.weight
        if dtype is None:
            kind = w.device.type
            autocast = w.dtype == torch.float32 and torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind)
            dtype = torch.get_autocast_dtype(kind) if autocast else w.dtype
        return KVCache(batch_size, self.n_kv_heads, max_len, self.head_dim, device=w.device, dtype=dtype)

    def forward(self, x: Tensor, cache: KVCache | None = None, need_weights: bool = False, *,
                positions: Tensor | None = None, attention_mask: Tensor | None = None) -> Tensor | tuple[Tensor, Tensor]:
        """x: (B, T, C) -> (B, T, C); with need_weights, also the (B, H, T, S) attention weights.

        positions: optional (B, T) position of each new token, given to the position hook instead of
        the cache offset (rows of a left-padded batch start at different places).
        attention_mask: optional mask over the S = cached + new keys; see `attention_mask_for`.
        """
        if x.dim() != 3 or x.size(-1) != self.d_model:
            raise AttentionError(f"expected input of shape (batch, time, {self.d_model}), got {tuple(x.shape)}")
        B, T, _ = x.shape
        H, G, D = self.n_heads, self.n_kv_heads, self.head_dim
        if positions is not None and (not isinstance(positions, Tensor) or positions.shape != (B, T)):
            raise AttentionError(f"positions must be a tensor of shape (batch, time) = {(B, T)}, "
                                 f"got {tuple(positions.shape) if isinstance(positions, Tensor) else type(positions).__name__}")
        # Project, then split the channels into heads: (B, T, H*D) -> (B, H, T, D).
        q = self.q_proj(x).view(B, T, H, D).transpose(1, 2)
        k = self.k_proj(x).view(B, T, G, D).transpose(1, 2)
        v = self.v_proj(x).view(B, T, G, D).transpose(1, 2)
        start = cache.pos if cache is not None else 0
        if self.position_hook is not None:
            q, k = self.position_hook(q, k, start if positions is None else positions)
        if cache is not None:
            k, v = cache.update(k, v)
        S = k.size(2)
        dropout = self.dropout if self.training else 0.0
        # With an attention mask the rows of the batch differ: one (B, 1, T, S) mask, causal included.
        mask = None if attention_mask is None else attention_mask_for(attention_mask, T, S)
        if mask is not None and mask.size(0) not in (1, B):
            raise AttentionError(f"attention_mask is for a batch of {mask.size(0)} rows, but the input has {B}")

        if need_weights:
            # Explicit path: share each key/value head with its H/G query heads, then the textbook formula.
            k, v = k.repeat_interleave(H // G, dim=1), v.repeat_interleave(H // G, dim=1)
            y, weights = scaled_dot_product(q, k, v, causal_mask(T, S, x.device) if mask is None else mask, dropout)
        else:
            # Fused path. A lone new query may see every cached key, so it needs no mask; a block of
            # T queries after a non-empty cache needs the offset mask that is_causal cannot express.
            if mask is not None:
                causal = False
            elif T == S:
                causal = True
            elif T == 1:
                causal = False
            else:
                mask, causal = causal_mask(T, S, x.device), False
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=causal, enable_gqa=G != H)
        # Merge the heads back into channels and mix them: (B, H, T, D) -> (B, T, C).
        y = self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))
        return (y, weights) if need_weights else y

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, n_heads={self.n_heads}, n_kv_heads={self.n_kv_heads}, dropout={self.dropout}"
