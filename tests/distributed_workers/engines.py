"""Worker for tests/test_distributed.py: every from-scratch engine on 2 ranks, and the references.

Start WORLD_SIZE copies with the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR, MASTER_PORT) and an output folder as the only argument. Each rank runs every scenario
and saves OUT/rank{R}.pt: per scenario, the parameters right after wrapping ("start") and after the
last step ("params"), whole, plus a few facts. Rank 0 then adds the single-process references.
It computes them itself, in a process configured like the engines' (one thread), so that the same
matrix products take the same code paths: the bitwise comparisons compare arithmetic, not set-ups.
"""

from __future__ import annotations

import contextlib
import io
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from minillm.distributed import (
    DataParallel,
    DistributedError,
    FullyShardedDataParallel,
    ShardedOptimizer,
    exit_worker,
    init_distributed,
)
from minillm.model import LLM, ModelConfig

STEPS = 3
WORLD = 2
# A tiny LLM with tied embeddings (the output layer uses the embedding's matrix) and grouped-query attention.
CFG = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16,
                  tie_embeddings=True, multiple_of=16)
FROZEN = ("blocks.0.post_attn_norm.weight", "blocks.1.attn.k_proj.weight")  # a replicated and a sharded one


def tiny_llm(seed: int) -> LLM:
    torch.manual_seed(seed)
    model = LLM(CFG)
    params = dict(model.named_parameters())
    for name in FROZEN:
        params[name].requires_grad_(False)
    return model


class Plain(nn.Module):
    """Not an LLM: a linear layer whose 35 weights do not split evenly over 2 ranks (so the last
    shard is padded), a LayerNorm with a bias, a bias-free output layer and a buffer."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(5, 7)
        self.norm = nn.LayerNorm(7)
        self.out = nn.Linear(7, 3, bias=False)
        self.register_buffer("scale", torch.rand(3) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.gelu(self.norm(self.inp(x)))) * self.scale


def plain(seed: int) -> Plain:
    torch.manual_seed(seed)
    return Plain()


def llm_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return model(*batch)[1]


def mse_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return F.mse_loss(model(batch[0]), batch[1])


def llm_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, CFG.vocab_size, (STEPS, 2, 4, 16), generator=g)  # (step, ids or targets, batch, time)
    return [(x, y) for x, y in ids]


def plain_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 5, generator=g), torch.randn(8, 3, generator=g)) for _ in range(STEPS)]


def sgd_groups(model: nn.Module, matrices: set[str]) -> list[dict[str, Any]]:
    """Weight decay on the matrices only, as train.build_optimizer does (frozen tensors included:
    harmless). Chosen by name, because FSDP's shards are 1-D: p.dim() no longer tells."""
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if n in matrices], "weight_decay": 0.1},
            {"params": [p for n, p in named if n not in matrices], "weight_decay": 0.0}]


def matrix_names(model: nn.Module) -> set[str]:
    return {n for n, p in model.named_parameters() if p.dim() >= 2}


@dataclass
class Scenario:
    engine: str  # ddp, zero1 (DataParallel + ShardedOptimizer) or fsdp
    make_model: Callable[[int], nn.Module] = tiny_llm
    loss: Callable = llm_loss
    batches: Callable = llm_batches
    optimizer: str = "sgd"  # sgd (momentum, weight decay on matrices) or adamw
    lrs: tuple[float, ...] = (0.5, 0.3, 0.2)  # a schedule, set through param_groups each step
    bucket_mb: float | None = None
    accum: int = 1  # micro-batches per step on each rank
    compute_dtype: torch.dtype | None = None
    clip: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


SCENARIOS = {
    "ddp": Scenario("ddp"),
    "ddp_bucket": Scenario("ddp", bucket_mb=0.01),  # 10 KB: several buckets, most of several tensors
    "ddp_accum": Scenario("ddp", accum=2),
    "zero1": Scenario("zero1"),
    "zero1_adamw": Scenario("zero1", optimizer="adamw", lrs=(1e-2, 1e-2, 5e-3)),
    "fsdp": Scenario("fsdp"),
    "fsdp_adamw": Scenario("fsdp", optimizer="adamw", lrs=(1e-2, 1e-2, 5e-3)),
    "fsdp_accum": Scenario("fsdp", accum=2),
    "fsdp_clip": Scenario("fsdp", clip=0.05),
    "fsdp_bf16": Scenario("fsdp", compute_dtype=torch.bfloat16),
    "fsdp_fp16": Scenario("fsdp", compute_dtype=torch.float16),
    "plain_ddp": Scenario("ddp", make_model=plain, loss=mse_loss, batches=plain_batches, bucket_mb=1e-4),
    "plain_zero1": Scenario("zero1", make_model=plain, loss=mse_loss, batches=plain_batches),
    "plain_fsdp": Scenario("fsdp", make_model=plain, loss=mse_loss, batches=plain_batches),
}


def make_optimizer(sc: Scenario, params: Any, sharded: bool) -> torch.optim.Optimizer:
    cls, kwargs = (torch.optim.SGD, dict(lr=sc.lrs[0], momentum=0.9)) if sc.optimizer == "sgd" else \
        (torch.optim.AdamW, dict(lr=sc.lrs[0], betas=(0.9, 0.95)))
    return ShardedOptimizer(params, cls, **kwargs) if sharded else cls(params, **kwargs)


def micro_batches(batch: tuple[torch.Tensor, ...], rank: int, accum: int) -> list[tuple[torch.Tensor, ...]]:
    """Rank `rank`'s rows of the global batch, cut into `accum` micro-batches."""
    rows = batch[0].shape[0] // WORLD
    local = [t[rank * rows:(rank + 1) * rows] for t in batch]
    return list(zip(*(t.chunk(accum) for t in local)))


def whole(model: nn.Module) -> dict[str, torch.Tensor]:
    if isinstance(model, FullyShardedDataParallel):
        return model.full_parameters()
    return {name: p.detach().clone() for name, p in model.module.named_parameters()}


def run_engine(name: str, sc: Scenario, rank: int) -> dict[str, Any]:
    model = sc.make_model(100 + rank)  # every rank its own initialization: the wrapper must broadcast rank 0's
    matrices = matrix_names(model)
    if sc.engine == "fsdp":
        wrapped = FullyShardedDataParallel(model, compute_dtype=sc.compute_dtype)
    else:
        wrapped = DataParallel(model, bucket_mb=sc.bucket_mb)
    inner = wrapped.module
    params = sgd_groups(inner, matrices) if sc.optimizer == "sgd" else wrapped.parameters()
    opt = make_optimizer(sc, params, sharded=sc.engine == "zero1")
    out: dict[str, Any] = {"start": whole(wrapped)}
    batches = sc.batches()
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = sc.lrs[step]
        opt.zero_grad(set_to_none=True)
        micro = micro_batches(batches[step], rank, sc.accum)
        for m, mb in enumerate(micro):
            # As train.train_step does it: the forward inside no_sync, the backward outside.
            last = m == len(micro) - 1
            with contextlib.nullcontext() if last or sc.engine == "fsdp" else wrapped.no_sync():
                loss = sc.loss(wrapped, mb)
            (loss / sc.accum).backward()
        wrapped.finish_gradient_synchronization()
        if sc.clip:
            out.setdefault("norms", []).append(wrapped.clip_grad_norm_(sc.clip).item())
        opt.step()
    out["params"] = whole(wrapped)
    if isinstance(wrapped, DataParallel):
        out["buckets"] = [len(b) for b in wrapped.buckets]
    if isinstance(wrapped, FullyShardedDataParallel):
        out["local"] = {n: tuple(p.shape) for n, p in wrapped.module.named_parameters()}
        out["state_numel"] = sum(t.numel() for s in opt.state.values() for t in s.values() if t.dim())  # not "step"
    if isinstance(opt, ShardedOptimizer):
        out.update(sharded_optimizer_facts(wrapped, opt, sc, rank, matrices))
    return out


def sharded_optimizer_facts(wrapped: DataParallel, opt: ShardedOptimizer, sc: Scenario, rank: int,
                            matrices: set[str]) -> dict[str, Any]:
    names = {id(p): n for n, p in wrapped.module.named_parameters()}
    facts: dict[str, Any] = {
        "owners": {names[id(p)]: r for p, r in zip(opt._params, opt.owners)},
        "state_names": sorted(names[id(p)] for p in opt.state),
        "lr_seen": [g["lr"] for g in opt.local_optimizer.param_groups],
    }
    # A per-rank checkpoint: a fresh optimizer over the same parameters loads this rank's shard back.
    saved = opt.state_dict()
    params = sgd_groups(wrapped.module, matrices) if sc.optimizer == "sgd" else wrapped.parameters()
    fresh = make_optimizer(sc, params, sharded=True)
    file = io.BytesIO()
    torch.save(saved, file)
    file.seek(0)
    fresh.load_state_dict(torch.load(file))
    facts["reload_equal"] = (
        set(map(id, opt.state)) == set(map(id, fresh.state))
        and all(torch.equal(t, fresh.state[p][k]) for p, s in opt.state.items() for k, t in s.items())
        and fresh.param_groups[0]["lr"] == opt.param_groups[0]["lr"])
    wrong = dict(saved, rank=1 - rank)
    try:
        fresh.load_state_dict(wrong)
        facts["wrong_rank_error"] = ""
    except DistributedError as e:
        facts["wrong_rank_error"] = str(e)
    return facts


# --------------------------------------------------------------------------------------------
# Single-process references (rank 0)


def cast_layers(model: nn.Module, dtype: torch.dtype) -> None:
    """Make every Linear and Embedding compute in `dtype` from its float32 weight, as the sharded
    layers do under compute_dtype: cast the input, the weight and the bias, each under autograd."""
    for m in model.modules():
        if type(m) is nn.Linear:
            m.forward = lambda x, m=m: F.linear(x.to(dtype), m.weight.to(dtype),
                                                None if m.bias is None else m.bias.to(dtype))
        elif type(m) is nn.Embedding:
            m.forward = lambda ids, m=m: F.embedding(ids, m.weight.to(dtype), m.padding_idx)


def reference(sc: Scenario, one_pass: bool) -> dict[str, Any]:
    """Single-process training on the global batch of each step.

    one_pass: one forward and backward over the whole batch (the textbook reference).
    Otherwise the same global-batch gradient, summed in the order the ranks sum it: each rank's
    share (its micro-batches accumulated, each loss divided by accum), then (rank 0 + rank 1) / 2.
    """
    model = sc.make_model(100)  # rank 0's initialization
    if sc.compute_dtype is not None:
        cast_layers(model, sc.compute_dtype)
    params = sgd_groups(model, matrix_names(model)) if sc.optimizer == "sgd" else model.parameters()
    opt = make_optimizer(sc, params, sharded=False)
    trainable = [p for p in model.parameters() if p.requires_grad]
    batches, norms = sc.batches(), []
    for step in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = sc.lrs[step]
        opt.zero_grad(set_to_none=True)
        if one_pass:
            sc.loss(model, batches[step]).backward()
        else:
            shares = []
            for rank in range(WORLD):
                opt.zero_grad(set_to_none=True)
                for mb in micro_batches(batches[step], rank, sc.accum):
                    (sc.loss(model, mb) / sc.accum).backward()
                shares.append([p.grad.clone() for p in trainable])
            for p, *grads in zip(trainable, *shares):
                total = grads[0]
                for g in grads[1:]:
                    total = total + g
                p.grad = total / WORLD
        if sc.clip:
            norms.append(torch.nn.utils.clip_grad_norm_(trainable, sc.clip).item())
        opt.step()
    return {"params": {name: p.detach().clone() for name, p in model.named_parameters()}, "norms": norms}


def main() -> None:
    out = Path(sys.argv[1])
    torch.set_num_threads(1)  # two ranks on two cores; and the references below run with the same setting
    env = init_distributed(backend="gloo", timeout=60)
    assert env.world_size == WORLD, env
    results: dict[str, Any] = {"env": (env.rank, env.world_size, env.local_rank, str(env.device), env.backend)}
    for name, sc in SCENARIOS.items():
        results[name] = run_engine(name, sc, env.rank)
    if env.rank == 0:
        results["reference"] = {
            name: {"same_order": reference(sc, one_pass=False), "one_pass": reference(sc, one_pass=True),
                   "initial": {n: p.detach().clone() for n, p in sc.make_model(100).named_parameters()}}
            for name, sc in SCENARIOS.items()}
    torch.save(results, out / f"rank{env.rank}.pt")


if __name__ == "__main__":
    try:
        main()
    except BaseException:
        traceback.print_exc()
        exit_worker(1)
    exit_worker(0)
