"""Rotary position embeddings (RoPE).

Each pair of dimensions of a query or key is rotated by an angle proportional to its position,
`pos * theta^(-2i/D)` for pair i, so that the dot product of a query at position m and a key at
position n depends on m - n only. Two layouts pair the dimensions differently:

* ``interleaved=False`` (default, as in Hugging Face's Llama): pair i is (x[i], x[i + D/2]);
* ``interleaved=True`` (as in the RoPE paper and Meta's release): pair i is (x[2i], x[2i + 1]).

They are the same rotation under a fixed permutation of the dimensions (chapter 04 shows it).
`RotaryEmbedding` plugs into `minillm.attention.CausalSelfAttention` as its ``position_hook``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

__all__ = ["RopeError", "RotaryEmbedding", "rope_frequencies", "apply_rotary"]


class RopeError(ValueError):
    """Rotary embeddings asked for something they cannot do; the message says what to change."""


def rope_frequencies(head_dim: int, theta: float = 10000.0, scaling: str | None = None, factor: float = 1.0) -> Tensor:
    """The D/2 angular frequencies theta^(-2i/D), optionally scaled to stretch the context.

    ``scaling="linear"`` is position interpolation (Chen et al., 2023): every frequency is divided by
    `factor`, so positions up to `factor` times the trained length map onto trained angles.
    ``scaling="ntk"`` raises the base to theta * factor^(D / (D - 2)) ("NTK-aware" scaling): high
    frequencies barely change and the lowest is divided by `factor`.
    """
    if head_dim < 2 or head_dim % 2:
        raise RopeError(f"head_dim must be even and at least 2 to form pairs, got {head_dim}")
    if theta <= 1.0:
        raise RopeError(f"theta must be greater than 1, got {theta}")
    if scaling not in (None, "linear", "ntk"):
        raise RopeError(f"scaling must be None, 'linear' or 'ntk', got {scaling!r}")
    if factor < 1.0:
        raise RopeError(f"the scaling factor must be at least 1, got {factor}")
    if scaling == "ntk":
        theta = theta * factor ** (head_dim / (head_dim - 2))
    # On the CPU whatever the default device (meta included): the D/2 numbers define every table.
    freqs = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
    if scaling == "linear":
        freqs = freqs / factor
    return freqs.float()


def _rotate(x: Tensor, cos: Tensor, sin: Tensor, interleaved: bool) -> Tensor:
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


def apply_rotary(x: Tensor, positions: Tensor, freqs: Tensor, interleaved: bool = False) -> Tensor:
    """Rotate x (..., T, D) at the given T positions; the reference the cached module is tested against."""
    dtype = torch.promote_types(x.dtype, torch.float32)  # at least float32; float64 stays float64
    angles = positions.to(dtype)[:, None] * freqs.to(dtype)[None, :]  # (T, D/2)
    return _rotate(x.to(dtype), angles.cos(), angles.sin(), interleaved).to(x.dtype)


# Tables are built up to this many positions when the module is made and grown on demand beyond it:
# a config that claims a context of a billion tokens must not allocate a billion rows up front.
EAGER_POSITIONS = 4096


class RotaryEmbedding(nn.Module):
    """Cached cos/sin tables for positions 0 .. max_seq_len - 1, applied to queries and keys.

    Call it as the attention's position hook: ``rope(q, k, start)`` rotates (B, H, T, D) queries and
    keys whose first position is `start` (the number of positions already in the KV cache).

    The tables are float32 buffers, not saved in checkpoints (they are a pure function of the
    configuration). They hold the first min(max_seq_len, EAGER_POSITIONS) positions and grow when a
    call reaches further. Whatever `.to()`, `.half()` or `to_empty()` does to the module, they are
    recomputed in float32 on the new device: a bf16 model does not get bf16-rounded angles, and a model
    built on the meta device does not get uninitialized ones. The rotation runs in float32 for 16-bit
    inputs and in float64 for float64 inputs.
    """

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0, scaling: str | None = None,
                 factor: float = 1.0, interleaved: bool = False) -> None:
        super().__init__()
        if max_seq_len < 1:
            raise RopeError(f"max_seq_len must be positive, got {max_seq_len}")
        self.head_dim, self.max_seq_len, self.interleaved = head_dim, max_seq_len, interleaved
        self.theta, self.scaling, self.factor = theta, scaling, factor
        self.freqs = rope_frequencies(head_dim, theta, scaling, factor)  # a plain attribute: .to() leaves it alone
        self.register_buffer("cos", None, persistent=False)
        self.register_buffer("sin", None, persistent=False)
        self.reset_tables(torch.get_default_device(), min(max_seq_len, EAGER_POSITIONS))

    def reset_tables(self, device: torch.device | str | None = None, length: int | None = None) -> None:
        """(Re)compute the tables for positions 0 .. length - 1 (default: as many as now) on `device`.

        They are always computed on the CPU in float32 and then moved, so that every device and every
        length gives the same values for the same positions.
        """
        device = self.cos.device if device is None else device
        length = self.cos.shape[0] if length is None else length
        angles = torch.arange(length, dtype=torch.float32, device="cpu")[:, None] * self.freqs[None, :]  # (T, D/2)
        self.cos, self.sin = angles.cos().to(device), angles.sin().to(device)

    def _apply(self, fn, recurse=True):  # noqa: ANN001, ANN202 (torch's private hook behind .to() and to_empty())
        super()._apply(fn, recurse)
        self.reset_tables()  # on the device the move chose, in float32, never rounded or left uninitialized
        return self

    def forward(self, q: Tensor, k: Tensor, start: int | Tensor = 0) -> tuple[Tensor, Tensor]:
        """Rotate (B, H, T, D) queries and keys.

        `start` is the first position of the block (an int, the number of cached positions), or a
        (B, T) tensor holding each token's own position: the rows of a left-padded batch start at
        different places, and packed documents restart at 0.
        """
        T = q.shape[-2]
        if isinstance(start, Tensor):
            # The caller (LLM.forward) has checked every position against max_seq_len; only a context
            # longer than the eager tables needs the largest position (a device sync) to grow them.
            end = int(start.max()) + 1 if self.cos.shape[0] < self.max_seq_len else 0
        else:
            end = start + T
            if end > self.max_seq_len:
                raise RopeError(
                    f"positions {start}..{end - 1} are past the rotary tables, which end at {self.max_seq_len - 1}; "
                    f"use a shorter context or build the model with a larger max_seq_len"
                )
        have = self.cos.shape[0]
        if have < end or self.cos.device != q.device:
            # Grow by doubling (so that decoding token by token rebuilds rarely), never past max_seq_len.
            self.reset_tables(q.device, have if have >= end else min(self.max_seq_len, max(end, 2 * have)))
        if isinstance(start, Tensor):
            cos, sin = self.cos[start][:, None], self.sin[start][:, None]  # (B, 1, T, D/2), shared by heads
        else:
            cos, sin = self.cos[start:end], self.sin[start:end]
        # Rotate in at least float32 even for bf16 activations: angles at large positions need the
        # precision. Float64 inputs rotate in float64 (with the same float32 tables).
        dtype = torch.promote_types(q.dtype, torch.float32)
        cos, sin = cos.to(dtype), sin.to(dtype)
        rq = _rotate(q.to(dtype), cos, sin, self.interleaved).to(q.dtype)
        rk = _rotate(k.to(dtype), cos, sin, self.interleaved).to(k.dtype)
        return rq, rk

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, max_seq_len={self.max_seq_len}, theta={self.theta}, scaling={self.scaling}, interleaved={self.interleaved}"
