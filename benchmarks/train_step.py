"""Training throughput: minillm.LLM against transformers' LlamaForCausalLM, same config and weights.

Each model runs in its own subprocess (so that peak memory is its own): forward, backward and an
AdamW step on batches of random tokens, timed after warm-up. The script prints training tokens per
second, the ratio (target >= 1.0) and each process's peak resident memory.

    .venv/bin/python benchmarks/train_step.py [--steps 10] [--batch 8] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time

import torch

CONFIG = dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=8, n_kv_heads=4, max_seq_len=512, norm_eps=1e-6)


def build(which: str):
    from minillm.hf import hf_config, to_hf
    from minillm.model import LLM, ModelConfig

    torch.manual_seed(0)
    ours = LLM(ModelConfig(**CONFIG))
    if which == "minillm":
        return ours, lambda m, x, y: m(x, y)[1]
    import transformers

    cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config(ours.cfg).items() if k not in ("architectures",)})
    hf = transformers.LlamaForCausalLM(cfg)
    hf.load_state_dict(to_hf(ours)[1], strict=False)
    return hf, lambda m, x, y: m(input_ids=x, labels=y).loss


def worker(which: str, steps: int, batch: int, seq: int) -> None:
    model, loss_fn = build(which)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, CONFIG["vocab_size"], (steps + 3, batch, seq + 1), generator=g)

    def step(i: int) -> float:
        x = data[i, :, :-1]
        # HF shifts labels inside the model; ours takes already-shifted targets.
        y = data[i, :, :-1] if which == "hf" else data[i, :, 1:]
        loss = loss_fn(model, x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    for i in range(3):
        first = step(i)
    start = time.perf_counter()
    for i in range(3, steps + 3):
        step(i)
    elapsed = time.perf_counter() - start
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"tokens_per_s": steps * batch * seq / elapsed, "peak_mb": peak_mb, "first_loss": first}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--worker", choices=["minillm", "hf"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.batch, args.seq)
        return
    from _common import machine

    print(f"machine: {machine()}; config {CONFIG}, batch {args.batch} x {args.seq} tokens, {args.steps} timed steps")
    results = {}
    for which in ("minillm", "hf"):
        out = subprocess.run([sys.executable, __file__, "--worker", which, "--steps", str(args.steps), "--batch", str(args.batch),
                              "--seq", str(args.seq)], capture_output=True, text=True, check=True).stdout
        results[which] = json.loads(out.strip().splitlines()[-1])
    for which, r in results.items():
        print(f"  {which:8s} {r['tokens_per_s']:8.0f} tokens/s, peak memory {r['peak_mb']:6.0f} MB, first loss {r['first_loss']:.4f}")
    print(f"  minillm / transformers = {results['minillm']['tokens_per_s'] / results['hf']['tokens_per_s']:.2f}x (target >= 1.0)")


if __name__ == "__main__":
    main()
