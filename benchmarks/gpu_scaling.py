"""Scaling out on GPUs: tokens/s, MFU and peak memory per GPU of the 124M preset under single-GPU
training, torch's DDP, the from-scratch FullyShardedDataParallel (minillm.distributed) and FSDP2.

The model is ModelConfig.preset("gpt2-small") (GPT-2 small's shape, tied embeddings), trained with
bf16 autocast and AdamW on random tokens (throughput does not depend on the data), eager by
default (--compile compiles the single, DDP and FSDP2 models; the from-scratch FSDP's collectives
inside autograd Functions would only break the graph). Single, DDP and FSDP2 run minillm's own
step (minillm.train.train_step with the strategies of `minillm train --strategy`); the
from-scratch FSDP runs the same step by hand (its finish_gradient_synchronization and global-norm
clipping). Each mode runs in its own `torchrun --nproc_per_node=N` (single: one process), N = all
visible GPUs unless --gpus says otherwise. Per mode it prints the whole run's tokens/s, MFU
(against N times one GPU's bf16 dense peak: minillm.train.GPU_PEAK_FLOPS, or --peak-flops) and
the largest peak of allocated memory over the GPUs.

Without a CUDA GPU it says so and exits 0.

    .venv/bin/python benchmarks/gpu_scaling.py [--gpus N] [--batch 16] [--seq 1024] [--steps 20] [--compile]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

MODES = ("single", "ddp", "fsdp_scratch", "fsdp2")
LABELS = {"single": "single GPU", "ddp": "DDP (torch)", "fsdp_scratch": "FSDP (from scratch)", "fsdp2": "FSDP2 (torch)"}


def worker(mode: str, model_name: str, batch: int, seq: int, steps: int, compile: bool, peak_override: float,
           device_name: str) -> None:
    import torch.distributed as dist

    from minillm.distributed import FullyShardedDataParallel, exit_worker, make_strategy
    from minillm.model import LLM, ModelConfig
    from minillm.train import SingleDevice, TrainConfig, autocast, lm_loss, peak_flops, train_step

    cpu = device_name == "cpu"  # a smoke test of the workers on gloo
    if mode == "single":
        strategy = SingleDevice()
        device = torch.device(device_name)
    else:
        strategy = make_strategy("fsdp" if mode == "fsdp2" else "ddp", device="cpu" if cpu else "auto")
        device = strategy.device
    dtype = torch.bfloat16
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    torch.set_float32_matmul_precision("high")
    cfg = TrainConfig(model=model_name, model_overrides={"max_seq_len": seq}, seq_len=seq, batch_size=batch, lr=6e-4,
                      weight_decay=0.1, grad_clip=1.0, device="cpu" if cpu else "auto", dtype="bfloat16")
    torch.manual_seed(0)
    raw = LLM(cfg.model_config()).to(device)
    flops_per_token, params = raw.flops_per_token(seq), raw.num_parameters()  # before any sharding
    amp = autocast(device, dtype)
    if mode == "fsdp_scratch":
        model = FullyShardedDataParallel(raw, compute_dtype=dtype)
        impl = {"fused": True} if device.type == "cuda" else {"foreach": True}
        # Weight decay by name (the shards are 1-D): the matrices are the sharded weights.
        groups = [{"params": [p for n, p in model.named_parameters() if len(model.full_shapes[n.removeprefix("module.")]) >= 2],
                   "weight_decay": cfg.weight_decay},
                  {"params": [p for n, p in model.named_parameters() if len(model.full_shapes[n.removeprefix("module.")]) < 2],
                   "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **impl)
    else:
        strategy.setup(cfg, device, dtype)
        model = strategy.wrap(raw)
        opt = strategy.build_optimizer(raw, cfg, device)
        if compile:
            model = torch.compile(model)
    g = torch.Generator(device=device).manual_seed(1 + strategy.rank)  # each rank its own batch

    def batch_fn() -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.randint(0, raw.cfg.vocab_size, (batch, seq + 1), device=device, generator=g)
        return ids[:, :-1], ids[:, 1:]

    def one_step(i: int) -> None:
        if mode != "fsdp_scratch":
            train_step(model, opt, batch_fn, step=i, loss_fn=lm_loss, grad_clip=cfg.grad_clip, amp=amp, strategy=strategy)
            return
        opt.zero_grad(set_to_none=True)
        with amp:
            loss = lm_loss(model, batch_fn())
        loss.backward()
        model.finish_gradient_synchronization()
        model.clip_grad_norm_(cfg.grad_clip)
        opt.step()

    for i in range(3):  # warm-up: allocator growth, NCCL set-up, compilation
        one_step(i + 1)
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    strategy.barrier()
    start = time.perf_counter()
    for i in range(steps):
        one_step(i + 4)
    sync()
    strategy.barrier()
    seconds = time.perf_counter() - start
    world = strategy.world_size
    tokens_per_s = steps * batch * seq * world / seconds
    peak = peak_flops(device, dtype, peak_override) * world
    memory = torch.tensor([torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else 0.0], device=device)
    if world > 1:
        dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    if strategy.is_main:
        print(json.dumps({"tokens_per_s": tokens_per_s, "mfu": flops_per_token * tokens_per_s / peak if peak else None,
                          "peak_gb": memory.item(), "params": params, "world_size": world}), flush=True)
    if dist.is_initialized():
        exit_worker(0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gpus", type=int, default=0, help="processes (GPUs) for DDP and FSDP (default: all visible)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per GPU per step")
    ap.add_argument("--seq", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--compile", action="store_true", help="torch.compile the single, DDP and FSDP2 models")
    ap.add_argument("--peak-flops", type=float, default=0.0, help="override one GPU's bf16 peak FLOP/s")
    ap.add_argument("--modes", default=",".join(MODES), help=f"a comma-separated subset of {','.join(MODES)}")
    ap.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    ap.add_argument("--model", default="gpt2-small", help=argparse.SUPPRESS)  # tiny: a smoke test
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a smoke test of the workers on gloo
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.model, args.batch, args.seq, args.steps, args.compile, args.peak_flops, args.device)
        return
    if args.device == "cuda" and not torch.cuda.is_available():
        print("gpu_scaling: no CUDA GPU here, so nothing to measure; run it on a GPU box (skipped)")
        return
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from _common import machine

    gpus = args.gpus or (torch.cuda.device_count() if args.device == "cuda" else 2)
    gpu_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU (smoke test)"
    print(f"machine: {machine()}, {gpus} x {gpu_name}")
    print(f"{args.model}, batch {args.batch} x {args.seq} tokens per GPU, bf16 autocast, "
          f"{'torch.compile (not the from-scratch FSDP)' if args.compile else 'eager'}, AdamW, {args.steps} timed steps")
    for mode in args.modes.split(","):
        if mode not in MODES:
            raise SystemExit(f"gpu_scaling: unknown mode {mode!r}; choose from {', '.join(MODES)}")
        common = [__file__, "--worker", mode, "--model", args.model, "--batch", str(args.batch), "--seq", str(args.seq),
                  "--steps", str(args.steps), "--peak-flops", str(args.peak_flops), "--device", args.device]
        common += ["--compile"] if args.compile else []
        n = 1 if mode == "single" else gpus
        cmd = ([sys.executable, *common] if mode == "single" else
               [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", *common])
        out = subprocess.run(cmd, capture_output=True, text=True)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        if out.returncode != 0 or not lines:
            err = out.stderr.strip().splitlines()
            print(f"  {LABELS[mode]:20s} failed: {err[-1] if err else out.returncode}")
            continue
        r = json.loads(lines[-1])
        mfu = f"MFU {r['mfu']:.1%}" if r["mfu"] is not None else "MFU n/a (unknown GPU: pass --peak-flops)"
        print(f"  {LABELS[mode]:20s} x{r['world_size']}  {r['params'] / 1e6:6.1f}M params  {r['tokens_per_s']:10,.0f} tokens/s  "
              f"{mfu}  peak memory per GPU {r['peak_gb']:.2f} GiB")


if __name__ == "__main__":
    main()
