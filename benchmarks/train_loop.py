"""What the training loop costs: minillm.train's whole loop against a bare forward/backward/step.

Both train the `tiny` preset (configs/tiny.toml, its optimizer included) on the same shards, in the same process, in
alternating rounds (the best round of each counts, the least disturbed by other work on the
machine). The loop does everything it does in a real run (learning-rate schedule, gradient
clipping, the NaN check, the sampler, logging to metrics.jsonl, the progress bar) except the
periodic evaluations, samples and checkpoints, which it times separately and leaves out of its
tokens/s. Target: the loop adds at most 5%. Also prints tiny's CPU MFU against the measured fp32
matmul peak (target >= 40%).

    .venv/bin/python benchmarks/train_loop.py [--steps 20] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from _common import machine

from minillm.data import RandomSampler, TokenShard
from minillm.model import LLM
from minillm.train import apply_overrides, build_optimizer, cpu_matmul_peak, load_config, train

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "tiny.toml"


def loop_tokens_per_s(cfg, steps: int) -> float:
    """tokens/s of minillm.train's loop, from its own log (one row every 5 steps, the first window skipped)."""
    cfg = apply_overrides(cfg, [f"max_steps={steps}", "log_every=5"])
    train(cfg, force=True, progress=True)
    rows = [json.loads(line) for line in (Path(cfg.out) / "metrics.jsonl").read_text().splitlines()]
    return statistics.median(r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > 5)


def bare_tokens_per_s(cfg, steps: int) -> float:
    """tokens/s of the textbook loop: batch, forward, backward, optimizer step, nothing else (the
    same optimizer as the loop's, from the same config: Muon + AdamW for tiny)."""
    torch.manual_seed(cfg.seed)
    model = LLM(cfg.model_config())
    opt = build_optimizer(model, cfg, torch.device("cpu"))
    shard = TokenShard.open(Path(cfg.data_dir) / "train.bin")
    sampler = RandomSampler(shard, cfg.batch_size, cfg.seq_len, cfg.seed)
    accum = cfg.accum_steps()

    def step() -> None:
        for _ in range(accum):
            x, y = sampler.next_batch()
            (model(x, y)[1] / accum).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(5):  # the same warm-up the loop's first log window absorbs
        step()
    start = time.perf_counter()
    for _ in range(steps - 5):
        step()
    return (steps - 5) * accum * cfg.batch_size * cfg.seq_len / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        # One run to train the tokenizer and write the shards, which every round then reuses.
        cfg = load_config(CONFIG, [f"out={tmp}/prep", "max_steps=1", "eval_every=0", "sample_every=0",
                                   "checkpoint_every=0", "final_eval_batches=1", "sample_tokens=0"])
        train(cfg, progress=False)
        cfg = apply_overrides(cfg, [f"out={tmp}/run", f"tokenizer={tmp}/prep/tokenizer.bpe", f"data_dir={tmp}/prep/data"])
        model = LLM(cfg.model_config())
        print(f"machine: {machine()}, {torch.get_num_threads()} threads")
        print(f"tiny: {model.num_parameters() / 1e6:.2f}M parameters, {cfg.batch_size} x {cfg.seq_len} tokens a micro-batch, "
              f"{cfg.accum_steps()} per step; {args.steps} steps per round, best of {args.rounds} rounds")
        loop, bare = [], []
        for _ in range(args.rounds):
            bare.append(bare_tokens_per_s(cfg, args.steps))
            loop.append(loop_tokens_per_s(cfg, args.steps))
        peak = cpu_matmul_peak()
    best_loop, best_bare = max(loop), max(bare)
    overhead = best_bare / best_loop - 1
    mfu = model.flops_per_token(cfg.seq_len) * best_loop / peak
    print(f"  bare forward/backward/step  {best_bare:8.0f} tokens/s   (rounds: {', '.join(f'{v:.0f}' for v in bare)})")
    print(f"  minillm.train loop          {best_loop:8.0f} tokens/s   (rounds: {', '.join(f'{v:.0f}' for v in loop)})")
    print(f"  loop overhead               {overhead:8.1%}  (target <= 5%)")
    print(f"  CPU MFU of tiny             {mfu:8.1%}  of the measured fp32 matmul peak, {peak / 1e9:.0f} GFLOP/s "
          f"({model.flops_per_token(cfg.seq_len) / 1e6:.1f} MFLOP per token; target >= 40%)")


if __name__ == "__main__":
    main()
