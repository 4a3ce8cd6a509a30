"""GPU training throughput of the 124M preset: minillm against transformers' LlamaForCausalLM.

Both models have GPT-2 small's shape (ModelConfig.preset("gpt2-small"), tied embeddings) and train
with bf16 autocast, torch.compile and fused AdamW on random tokens (throughput does not depend on
the data). minillm runs its real step (minillm.train.train_step: accumulation, clipping, the NaN
check); transformers runs the textbook step. Each model runs in its own subprocess. Prints
tokens/s and MFU against the GPU's bf16 dense peak (minillm.train.GPU_PEAK_FLOPS, or --peak-flops).

Without a CUDA GPU it says so and exits 0.

    .venv/bin/python benchmarks/gpu_train.py [--batch 16] [--seq 1024] [--steps 20] [--no-compile]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch


def worker(which: str, batch: int, seq: int, steps: int, compile: bool, peak_override: float, device_name: str) -> None:
    from minillm.model import LLM, ModelConfig
    from minillm.train import autocast, lm_loss, peak_flops, train_step

    device, dtype = torch.device(device_name), torch.bfloat16
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.set_float32_matmul_precision("high")
    cfg = ModelConfig.preset("gpt2-small", max_seq_len=seq)
    torch.manual_seed(0)
    ours = LLM(cfg).to(device)
    flops_per_token = ours.flops_per_token(seq)
    if which == "minillm":
        model, loss_fn = ours, lm_loss
    else:
        import transformers

        from minillm.hf import hf_config

        hf_cfg = transformers.LlamaConfig(**{k: v for k, v in hf_config(cfg).items() if k != "architectures"})
        model = transformers.LlamaForCausalLM._from_config(hf_cfg, attn_implementation="sdpa").to(device)
        del ours

        def loss_fn(m, b):  # transformers shifts the labels itself
            return m(input_ids=b[0], labels=b[0]).loss
    step_model = torch.compile(model) if compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=6e-4, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
    g = torch.Generator(device=device).manual_seed(0)

    def batch_fn():
        ids = torch.randint(0, cfg.vocab_size, (batch, seq + 1), device=device, generator=g)
        return ids[:, :-1], ids[:, 1:]

    amp = autocast(device, dtype)
    for i in range(3):  # warm-up, compilation included
        train_step(step_model, opt, batch_fn, step=i + 1, loss_fn=loss_fn, grad_clip=1.0, amp=amp)
    sync()
    start = time.perf_counter()
    for i in range(steps):
        train_step(step_model, opt, batch_fn, step=i + 4, loss_fn=loss_fn, grad_clip=1.0, amp=amp)
    sync()
    tokens_per_s = steps * batch * seq / (time.perf_counter() - start)
    peak = peak_flops(device, dtype, peak_override)
    print(json.dumps({"tokens_per_s": tokens_per_s, "mfu": flops_per_token * tokens_per_s / peak if peak else None,
                      "peak_gb": torch.cuda.max_memory_allocated() / 2**30 if sync is torch.cuda.synchronize else 0.0,
                      "params": sum(p.numel() for p in model.parameters())}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--peak-flops", type=float, default=0.0, help="override the bf16 peak FLOP/s of the GPU")
    ap.add_argument("--worker", choices=["minillm", "hf"], help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a smoke test of the workers
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.batch, args.seq, args.steps, not args.no_compile, args.peak_flops, args.device)
        return
    if not torch.cuda.is_available():
        print("gpu_train: no CUDA GPU here, so nothing to measure; run it on a GPU box (skipped)")
        return
    from _common import machine

    print(f"machine: {machine()}, {torch.cuda.get_device_name()}")
    print(f"gpt2-small shape, batch {args.batch} x {args.seq} tokens, bf16 autocast, "
          f"{'no compile' if args.no_compile else 'torch.compile'}, fused AdamW, {args.steps} timed steps")
    results = {}
    for which in ("minillm", "hf"):
        cmd = [sys.executable, __file__, "--worker", which, "--batch", str(args.batch), "--seq", str(args.seq), "--steps",
               str(args.steps), "--peak-flops", str(args.peak_flops)] + (["--no-compile"] if args.no_compile else [])
        out = subprocess.run(cmd, capture_output=True, text=True)
        if out.returncode != 0:
            print(f"  {which:8s} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
            continue
        results[which] = r = json.loads(out.stdout.strip().splitlines()[-1])
        mfu = f"MFU {r['mfu']:.1%}" if r["mfu"] is not None else "MFU n/a (unknown GPU: pass --peak-flops)"
        print(f"  {which:8s} {r['params'] / 1e6:6.1f}M params {r['tokens_per_s']:10,.0f} tokens/s  {mfu}  "
              f"peak memory {r['peak_gb']:.1f} GiB")
    if len(results) == 2:
        print(f"  minillm / transformers = {results['minillm']['tokens_per_s'] / results['hf']['tokens_per_s']:.2f}x")


if __name__ == "__main__":
    main()
