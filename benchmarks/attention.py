"""Generation speed with and without the KV cache, on this machine's CPU.

A stack of causal self-attention layers (minillm.attention, with residual connections, an embedding
and an output layer; width 256, 8 heads, 4 layers, random weights) generates greedily from a 16-token
prompt. Without the cache every step reruns the whole sequence; with it, each step feeds one token.
The script checks that both produce the same tokens and prints tokens per second and their ratio at
128, 512 and 1,024 new tokens. Target: at least 5x at 512.

    .venv/bin/python benchmarks/attention.py
"""

from __future__ import annotations

import time

import torch
from _common import machine
from torch import nn

from minillm.attention import CausalSelfAttention


class AttentionStack(nn.Module):
    def __init__(self, vocab: int = 4096, d_model: int = 256, n_heads: int = 8, n_layers: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, d_model)
        self.layers = nn.ModuleList(CausalSelfAttention(d_model, n_heads) for _ in range(n_layers))
        self.out = nn.Linear(d_model, vocab, bias=False)

    def forward(self, ids: torch.Tensor, caches=None) -> torch.Tensor:
        x = self.emb(ids)
        for i, layer in enumerate(self.layers):
            x = x + layer(x, caches[i] if caches is not None else None)
        return self.out(x[:, -1:])  # only the last position's logits are needed


@torch.inference_mode()
def generate(model: AttentionStack, prompt: torch.Tensor, n_new: int, use_cache: bool) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    caches = [layer.new_cache(prompt.size(0), prompt.size(1) + n_new) for layer in model.layers] if use_cache else None
    ids, step = prompt, prompt
    for _ in range(n_new):
        nxt = model(step if use_cache else ids, caches)[:, -1].argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
        step = nxt
    return ids, time.perf_counter() - start


def main() -> None:
    torch.manual_seed(0)
    model = AttentionStack().eval()
    prompt = torch.randint(0, 4096, (1, 16))
    print(f"machine: {machine()}, {torch.get_num_threads()} torch threads")
    generate(model, prompt, 8, True)  # warm up
    for n in (128, 512, 1024):
        ids_c, t_c = generate(model, prompt, n, use_cache=True)
        ids_u, t_u = generate(model, prompt, n, use_cache=False)
        assert torch.equal(ids_c, ids_u), "cached and uncached generation disagree"
        print(f"{n:5d} new tokens: cached {n / t_c:8.1f} tok/s, uncached {n / t_u:8.1f} tok/s, ratio {t_u / t_c:5.1f}x")


if __name__ == "__main__":
    main()
