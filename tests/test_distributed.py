"""minillm.distributed: the from-scratch DDP, ZeRO-1 and FSDP against single-process training.

The 2-rank tests share one launch: tests/distributed_workers/engines.py runs every scenario on 2
gloo ranks (starting them costs seconds, mostly importing torch), saves the parameters, and rank 0
adds two single-process references per scenario, both trained on the same global batches:

* "same_order": the global batch's gradient summed in the order the ranks sum it (each rank's
  half, then (rank 0 + rank 1) / 2). Float addition is not associative, so this is the reference
  that bit equality can be asked of; and with 2 ranks, a + b = b + a, and / 2 is exact.
* "one_pass": one forward and backward over the whole batch, the textbook reference. It sums the
  same numbers in another order, so it agrees only to a tolerance, stated where it is used.

The tests without subprocesses check the bad inputs, and run each engine on a process group of
one rank inside this process (it must then be the plain model, to the bit).
"""

from __future__ import annotations

import copy
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import nn

from minillm.distributed import (
    DataParallel,
    DistributedError,
    FullyShardedDataParallel,
    ShardedEmbedding,
    ShardedLinear,
    ShardedOptimizer,
    init_distributed,
    run_torchrun,
    torchrun_env,
)
from minillm.model import LLM, ModelConfig

WORKER = Path(__file__).parent / "distributed_workers" / "engines.py"
FROZEN = ("blocks.0.post_attn_norm.weight", "blocks.1.attn.k_proj.weight")  # as in the worker
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def tensors_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], what: str) -> None:
    """Same names, shapes and bits; otherwise name the first tensor that differs, and by how much."""
    assert list(got) == list(want), f"{what}: other parameter names {list(got)} != {list(want)}"
    for name in want:
        assert got[name].shape == want[name].shape, f"{what}: {name} has shape {tuple(got[name].shape)}"
        if not torch.equal(got[name], want[name]):
            diff = (got[name].double() - want[name].double()).abs().max().item()
            raise AssertionError(f"{what}: {name} differs by up to {diff:.3g}")


def max_diff(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    assert list(got) == list(want)
    return max((got[n].double() - want[n].double()).abs().max().item() for n in want)


# --------------------------------------------------------------------------------------------
# The environment and the arguments (no process group needed)


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def full_env(**changes: str) -> dict[str, str]:
    env = {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    env.update(changes)
    return {k: v for k, v in env.items() if v != ""}


def test_torchrun_env_reads_all_or_nothing() -> None:
    assert torchrun_env({}) is None
    assert torchrun_env({"PATH": "/bin"}) is None
    assert torchrun_env(full_env()) == (1, 2, 1)
    assert torchrun_env(full_env(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")) == (0, 1, 0)


@pytest.mark.parametrize("env, message", [
    ({"RANK": "0"}, "half set: RANK set, but WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT missing"),
    (full_env(MASTER_PORT=""), "MASTER_PORT missing"),
    (full_env(LOCAL_RANK=""), "RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT set, but LOCAL_RANK missing"),
    (full_env(RANK="one"), "RANK must be a whole number, got 'one'"),
    (full_env(WORLD_SIZE="0", RANK="0", LOCAL_RANK="0"), "WORLD_SIZE must be at least 1"),
    (full_env(RANK="2"), "RANK must be in [0, WORLD_SIZE) = [0, 2), got 2"),
    (full_env(LOCAL_RANK="-1"), "LOCAL_RANK must be in [0, WORLD_SIZE)"),
])
def test_torchrun_env_refuses_a_half_set_or_wrong_environment(env: dict[str, str], message: str) -> None:
    with pytest.raises(DistributedError) as e:
        torchrun_env(env)
    assert message in str(e.value)


def test_init_distributed_outside_torchrun_says_how_to_launch(no_torchrun: pytest.MonkeyPatch) -> None:
    with pytest.raises(DistributedError, match=r"not started by torchrun .* `torchrun --nproc_per_node=N"):
        init_distributed()
    no_torchrun.setenv("RANK", "0")
    no_torchrun.setenv("WORLD_SIZE", "2")
    with pytest.raises(DistributedError, match="half set: RANK, WORLD_SIZE set, but LOCAL_RANK, MASTER_ADDR, MASTER_PORT m"):
        init_distributed()
    assert not dist.is_initialized()


def test_init_distributed_checks_the_backend_before_connecting(no_torchrun: pytest.MonkeyPatch) -> None:
    for name, value in full_env().items():
        no_torchrun.setenv(name, value)
    with pytest.raises(DistributedError, match="backend must be 'nccl' .* or 'gloo'"):
        init_distributed(backend="mpi")
    if not torch.cuda.is_available():
        with pytest.raises(DistributedError, match="needs CUDA"):
            init_distributed(backend="nccl")
    assert not dist.is_initialized()


@pytest.mark.parametrize("bucket_mb", [0, -1, float("nan"), float("inf"), True, "25"])
def test_data_parallel_refuses_a_bad_bucket_size(bucket_mb: Any) -> None:
    with pytest.raises(DistributedError, match="bucket_mb must be a positive number of megabytes, or None"):
        DataParallel(nn.Linear(2, 2), bucket_mb=bucket_mb)


@pytest.mark.parametrize("optimizer_cls, hint", [
    ("adamw", "e.g. ShardedOptimizer"),
    (torch.optim.AdamW([nn.Parameter(torch.ones(1))]), "pass the class, not an instance"),
    (nn.Linear, "e.g. ShardedOptimizer"),
    (torch.optim.AdamW.step, "e.g. ShardedOptimizer"),
])
def test_sharded_optimizer_needs_an_optimizer_class(optimizer_cls: Any, hint: str) -> None:
    with pytest.raises(TypeError, match="optimizer_cls must be a torch.optim.Optimizer class") as e:
        ShardedOptimizer(nn.Linear(2, 2).parameters(), optimizer_cls, lr=0.1)
    assert hint in str(e.value)
    with pytest.raises(TypeError, match="itself a ShardedOptimizer"):
        ShardedOptimizer(nn.Linear(2, 2).parameters(), ShardedOptimizer)


@pytest.mark.parametrize("kwargs, message", [
    ({"compute_dtype": torch.int8}, "compute_dtype must be torch.bfloat16, torch.float16, torch.float32 or None"),
    ({"compute_dtype": "bf16"}, "compute_dtype must be"),
    ({"compute_dtype": torch.float64}, "compute_dtype must be"),
    ({"reduce_dtype": None}, "reduce_dtype must be torch.float32, torch.bfloat16 or torch.float16"),
])
def test_fsdp_refuses_a_bad_dtype(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(DistributedError, match=message):
        FullyShardedDataParallel(nn.Linear(2, 2), **kwargs)


def test_engines_need_a_module_and_a_process_group() -> None:
    assert not dist.is_initialized()
    for make in (DataParallel, FullyShardedDataParallel):
        with pytest.raises(TypeError, match="wraps an nn.Module, got dict"):
            make({"weight": torch.ones(2)})
        with pytest.raises(DistributedError, match=r"no process group: call minillm.distributed.init_distributed\(\) first"):
            make(nn.Linear(2, 2))
    with pytest.raises(DistributedError, match="no process group"):
        ShardedOptimizer(nn.Linear(2, 2).parameters(), torch.optim.SGD, lr=0.1)


# --------------------------------------------------------------------------------------------
# A process group of one rank, in this process


@pytest.fixture
def one_rank() -> Any:
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def tiny_llm(seed: int = 0) -> LLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16,
                      tie_embeddings=True, multiple_of=16)
    model = LLM(cfg)
    params = dict(model.named_parameters())
    for name in FROZEN:
        params[name].requires_grad_(False)
    return model


@pytest.mark.parametrize("engine", ["ddp", "ddp_bucket", "zero1", "fsdp"])
def test_one_rank_is_the_plain_model(one_rank: None, engine: str) -> None:
    plain = tiny_llm()
    model = copy.deepcopy(plain)
    wrapped = {"ddp": lambda: DataParallel(model), "ddp_bucket": lambda: DataParallel(model, bucket_mb=0.01),
               "zero1": lambda: DataParallel(model), "fsdp": lambda: FullyShardedDataParallel(model)}[engine]()
    opt_a = torch.optim.SGD(plain.parameters(), lr=0.5, momentum=0.9)
    opt_b = (ShardedOptimizer(wrapped.parameters(), torch.optim.SGD, lr=0.5, momentum=0.9) if engine == "zero1"
             else torch.optim.SGD(wrapped.parameters(), lr=0.5, momentum=0.9))
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        ids, targets = torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g)
        for m, opt in ((plain, opt_a), (wrapped, opt_b)):
            opt.zero_grad()
            m(ids, targets)[1].backward()
            if m is wrapped:
                wrapped.finish_gradient_synchronization()
            opt.step()
    got = wrapped.full_parameters() if engine == "fsdp" else dict(wrapped.module.named_parameters())
    tensors_equal({n: p.detach() for n, p in got.items()}, {n: p.detach() for n, p in plain.named_parameters()}, engine)


def test_fsdp_under_autocast_computes_as_the_plain_layers(one_rank: None) -> None:
    plain = tiny_llm()
    model = FullyShardedDataParallel(copy.deepcopy(plain))
    ids, targets = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    for m in (plain, model):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            m(ids, targets)[1].backward()
    model.finish_gradient_synchronization()
    want = {n: p.grad for n, p in plain.named_parameters() if p.requires_grad}
    got = {n: p.grad.view(model.full_shapes[n]) for n, p in model.module.named_parameters() if p.requires_grad}
    tensors_equal(got, want, "gradients under autocast")


def test_data_parallel_catches_a_missing_finish_and_an_unused_parameter(one_rank: None) -> None:
    model = DataParallel(nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1)))
    x = torch.randn(4, 3)
    model(x).sum().backward()
    with pytest.raises(DistributedError, match=r"call finish_gradient_synchronization\(\) after each backward"):
        model(x)
    model.finish_gradient_synchronization()
    model.finish_gradient_synchronization()  # nothing left to do: a no-op
    with model.no_sync():
        model(x).sum().backward()
    model(x)  # nothing was launched inside no_sync: no complaint

    unused = DataParallel(nn.ModuleDict({"used": nn.Linear(3, 1), "spare": nn.Linear(3, 1)}))
    unused.module["used"](x).sum().backward()
    with pytest.raises(DistributedError, match=r"no gradient reached \['spare.weight', 'spare.bias'\]"):
        unused.finish_gradient_synchronization()


def test_fsdp_replaces_linear_and_embedding_layers_only(one_rank: None) -> None:
    plain = tiny_llm()
    shapes = {n: p.shape for n, p in plain.named_parameters()}
    model = FullyShardedDataParallel(plain)
    inner = model.module
    assert isinstance(inner.token_embedding, ShardedEmbedding) and isinstance(inner.lm_head, ShardedLinear)
    assert inner.lm_head.weight is inner.token_embedding.weight  # still tied: one shard
    assert model.full_shapes == shapes
    assert {n: tuple(p.shape) for n, p in model.full_parameters().items()} == {n: tuple(s) for n, s in shapes.items()}
    assert not inner.blocks[1].attn.k_proj.weight.requires_grad  # frozen stays frozen, though sharded
    with pytest.raises(DistributedError, match="max_norm or sparse=True"):
        FullyShardedDataParallel(nn.Sequential(nn.Embedding(5, 2, max_norm=1.0)))
    with pytest.raises(DistributedError, match="max_norm must be a positive number"):
        model.clip_grad_norm_(0.0)
    # A wrapped bare layer is replaced too.
    assert isinstance(FullyShardedDataParallel(nn.Linear(3, 2)).module, ShardedLinear)


def test_sharded_optimizer_passes_options_through_param_groups(one_rank: None) -> None:
    a, b = nn.Linear(3, 2), nn.Linear(3, 1)
    opt = ShardedOptimizer([{"params": a.parameters(), "weight_decay": 0.1}], torch.optim.SGD, lr=0.5)
    assert opt.param_groups[0]["momentum"] == 0  # the local optimizer's defaults are shown
    opt.add_param_group({"params": b.parameters(), "lr": 0.01})
    assert len(opt.local_optimizer.param_groups) == 2 and opt.owners == [0, 0, 0, 0]
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    (a(torch.ones(1, 3)).sum() + b(torch.ones(1, 3)).sum()).backward()
    opt.step()
    scheduler.step()
    opt.step()  # copies lr into the local optimizer before stepping
    assert [g["lr"] for g in opt.local_optimizer.param_groups] == [0.25, 0.005]
    with pytest.raises(DistributedError, match="not a ShardedOptimizer state dict"):
        opt.load_state_dict(torch.optim.SGD(a.parameters(), lr=0.1).state_dict())


# --------------------------------------------------------------------------------------------
# Two ranks


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(script: Path, out: Path, world_size: int = 2, timeout: float = 120.0) -> None:
    """Start `world_size` ranks of `script` with the environment torchrun would give them (a fresh
    port each time), wait for all, and fail with their logs if any fails or the group hangs."""
    port = free_port()
    procs, logs = [], []
    for rank in range(world_size):
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}
        log = open(out / f"rank{rank}.log", "wb")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, str(script), str(out)], env=env, stdout=log,
                                      stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        while any(p.poll() is None for p in procs):
            # One rank that failed leaves the others waiting in a collective: stop them now.
            if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
                break
            time.sleep(0.05)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for log in logs:
            log.close()
    codes = [p.returncode for p in procs]
    if codes != [0] * world_size:
        text = "\n".join(f"--- rank {r} (exit status {c}) ---\n"
                         f"{(out / f'rank{r}.log').read_text(errors='replace')[-4000:]}" for r, c in enumerate(codes))
        raise AssertionError(f"the {world_size}-rank run failed or timed out after {timeout:.0f} s:\n{text}")


# run_torchrun, with workers that do not import torch (torchrun itself takes about 1.5 s to start them).


def test_run_torchrun_refuses_no_processes() -> None:
    for nproc in (0, -1):
        with pytest.raises(DistributedError, match=rf"nproc={nproc}: a run needs at least one process"):
            run_torchrun(["never_run.py"], nproc=nproc)


@pytest.mark.slow
def test_run_torchrun_raises_with_the_workers_error_output(tmp_path: Path) -> None:
    script = tmp_path / "fail.py"
    script.write_text("import os, sys\n"
                      "print(f'rank {os.environ[\"RANK\"]} of {os.environ[\"WORLD_SIZE\"]} gives up: '\n"
                      "      f'{os.environ[\"MINILLM_WORD\"]}, {os.environ[\"OMP_NUM_THREADS\"]} thread', file=sys.stderr)\n"
                      "sys.exit(3)\n")
    with pytest.raises(DistributedError) as e:
        run_torchrun([script], nproc=2, timeout=120, env={"MINILLM_WORD": "xyzzy"})
    message = str(e.value)
    assert "failed with exit status 1" in message  # torchrun's status when a worker fails
    assert "rank 0 of 2 gives up: xyzzy, 1 thread" in message or "rank 1 of 2 gives up: xyzzy, 1 thread" in message


def _running(pid: int, script: Path) -> bool:
    """Is `pid` a live (not zombie) process running `script`? (A reused pid runs something else.)"""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z" and str(script).encode() in cmdline


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc to find the workers")
def test_run_torchrun_kills_every_worker_past_the_timeout(tmp_path: Path) -> None:
    # torchrun starts each worker in a session of its own: killing torchrun's process group alone would
    # leave them running, and holding torchrun's output pipes, on which the launcher would wait for them.
    # (They sleep 120 s, not forever, so that such a launcher fails this test instead of hanging it.)
    script = tmp_path / "sleep.py"
    script.write_text("import os, sys, time\n"
                      "path = os.path.join(sys.argv[1], 'pid.' + os.environ['RANK'])\n"
                      "with open(path + '.tmp', 'w') as f:\n"
                      "    f.write(str(os.getpid()))\n"
                      "os.replace(path + '.tmp', path)\n"
                      "time.sleep(120)\n")
    start = time.monotonic()
    with pytest.raises(DistributedError, match=r"ran past 6 s and was killed"):
        run_torchrun([script, tmp_path], nproc=2, timeout=6)
    assert time.monotonic() - start < 40, "run_torchrun waited for the workers instead of killing them"
    pids = {f.name: int(f.read_text()) for f in tmp_path.glob("pid.?")}
    assert sorted(pids) == ["pid.0", "pid.1"], "the workers had not started in 6 s"
    assert not [pid for pid in pids.values() if _running(pid, script)], "workers left running"


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    out = tmp_path_factory.mktemp("ranks")
    launch(WORKER, out)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


ALL = ["ddp", "ddp_bucket", "ddp_accum", "zero1", "zero1_adamw", "fsdp", "fsdp_adamw", "fsdp_accum", "fsdp_clip",
       "fsdp_bf16", "fsdp_fp16", "plain_ddp", "plain_zero1", "plain_fsdp"]


@pytest.mark.slow
def test_every_rank_starts_from_rank0_and_ends_equal(ranks: list[dict[str, Any]]) -> None:
    assert [r["env"] for r in ranks] == [(0, 2, 0, "cpu", "gloo"), (1, 2, 1, "cpu", "gloo")]  # from init_distributed
    assert sorted(ranks[0]["reference"]) == sorted(ALL)
    for name in ALL:
        initial = ranks[0]["reference"][name]["initial"]  # rank 1 built its model from another seed
        for r in (0, 1):
            tensors_equal(ranks[r][name]["start"], initial, f"{name}, rank {r} after wrapping")
        tensors_equal(ranks[1][name]["params"], ranks[0][name]["params"], f"{name}, rank 1 against rank 0")
        for frozen in FROZEN if not name.startswith("plain_") else ():
            assert torch.equal(ranks[0][name]["params"][frozen], initial[frozen]), f"{name}: frozen {frozen} moved"


# SGD with momentum and weight decay on the matrices, 3 steps at learning rates 0.5, 0.3, 0.2.
# Against the same-order reference: equal to the bit. Against the one-pass reference: within 1e-6,
# the rounding of sums taken in another order (measured: 1.5e-8 for the LLM, 6e-8 with accumulation
# and for the plain module).
EXACT_SGD = ["ddp", "ddp_bucket", "ddp_accum", "plain_ddp", "zero1", "plain_zero1", "fsdp", "plain_fsdp"]


@pytest.mark.slow
@pytest.mark.parametrize("name", EXACT_SGD)
def test_sgd_matches_single_process_training(ranks: list[dict[str, Any]], name: str) -> None:
    ref = ranks[0]["reference"][name]
    tensors_equal(ranks[0][name]["params"], ref["same_order"]["params"], name)
    assert max_diff(ranks[0][name]["params"], ref["one_pass"]["params"]) <= 1e-6
    assert max_diff(ranks[0][name]["params"], ref["initial"]) > 1e-2  # the steps did move the weights


@pytest.mark.slow
def test_data_parallel_buckets_group_several_tensors(ranks: list[dict[str, Any]]) -> None:
    assert set(ranks[0]["ddp"]["buckets"]) == {1}  # bucket_mb=None: one all-reduce per parameter
    buckets = ranks[0]["ddp_bucket"]["buckets"]  # 10 KB buckets over 18 trainable tensors
    assert sum(buckets) == 18 and len(buckets) > 2 and max(buckets) > 1
    assert ranks[0]["plain_ddp"]["buckets"] == [2, 3]  # out (no bias), norm bias and weight | inp bias and weight


@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero1", "zero1_adamw"])
def test_sharded_optimizer_keeps_state_for_its_share_only(ranks: list[dict[str, Any]], name: str) -> None:
    owners = ranks[0][name]["owners"]
    assert ranks[1][name]["owners"] == owners  # every rank partitions alike, without talking
    sizes = {n: p.numel() for n, p in ranks[0]["reference"][name]["initial"].items()}
    loads = [sum(sizes[n] for n, r in owners.items() if r == rank) for rank in (0, 1)]
    assert abs(loads[0] - loads[1]) <= 2048  # balanced to within the largest tensor (the 64 x 32 embedding)
    trainable = {n for n in owners if n not in FROZEN}
    state = [set(ranks[r][name]["state_names"]) for r in (0, 1)]
    assert state[0] | state[1] == trainable and not state[0] & state[1]
    for r in (0, 1):
        assert all(owners[n] == r for n in state[r])
        # The schedule's last lr, set on the sharded optimizer's groups, reached the local optimizer's.
        assert ranks[r][name]["lr_seen"] == {"zero1": [0.2, 0.2], "zero1_adamw": [5e-3]}[name]
        assert ranks[r][name]["reload_equal"]  # per-rank checkpoint: state_dict, torch.save, load_state_dict
        assert f"saved by rank {1 - r} of 2, but this is rank {r} of 2" in ranks[r][name]["wrong_rank_error"]


# Adam divides each update by the root of its running mean of squared gradients, so an element whose
# gradient is near zero turns its tiny rounding differences into a sizeable change of direction:
# float noise is amplified rather than damped. With sums in the same order it is still equal to the
# bit; against the one-pass reference, allow 1e-4, 1% of the learning rate (measured: 2.5e-6, about
# 170 times SGD's gap on the same data).
@pytest.mark.slow
@pytest.mark.parametrize("name", ["zero1_adamw", "fsdp_adamw"])
def test_adamw_matches_single_process_more_loosely(ranks: list[dict[str, Any]], name: str) -> None:
    ref = ranks[0]["reference"][name]
    tensors_equal(ranks[0][name]["params"], ref["same_order"]["params"], name)
    gap = max_diff(ranks[0][name]["params"], ref["one_pass"]["params"])
    assert gap <= 1e-4
    sgd_gap = max_diff(ranks[0]["zero1"]["params"], ranks[0]["reference"]["zero1"]["one_pass"]["params"])
    assert gap > 10 * sgd_gap


@pytest.mark.slow
def test_fsdp_keeps_a_shard_of_each_matrix_and_its_optimizer_state(ranks: list[dict[str, Any]]) -> None:
    initial = ranks[0]["reference"]["fsdp"]["initial"]
    for r in (0, 1):
        local = ranks[r]["fsdp"]["local"]
        assert list(local) == list(initial)  # the original names
        for n, shape in local.items():
            if initial[n].dim() == 2:  # a matrix: half of it, flattened
                assert shape == (math.ceil(initial[n].numel() / 2),)
            else:  # a norm weight: replicated
                assert shape == tuple(initial[n].shape)
        trainable = sum(p.numel() for n, p in initial.items() if n not in FROZEN)
        assert ranks[r]["fsdp"]["state_numel"] < 0.55 * trainable  # SGD's momentum for the local shards only
    # 35 weights of Linear(5, 7) over 2 ranks: 18 each, the last one padding.
    assert ranks[0]["plain_fsdp"]["local"]["inp.weight"] == (18,)
    assert ranks[0]["plain_fsdp"]["local"]["inp.bias"] == (7,)


# Two cases where FSDP sums in another order than the same-order reference, so not to the bit:
# with accumulation, FSDP reduce-scatters (averages over ranks) after each micro-batch, then adds
# the micro-batches, where the reference adds the micro-batches first (measured: 1.2e-7 after 3 steps);
# clip_grad_norm_ sums the squares shard by shard and then over ranks, torch's clip_grad_norm_ tensor
# by tensor (measured: norms 2.3e-7 apart relative, parameters 4e-9). Both within 1e-6.
@pytest.mark.slow
def test_fsdp_accumulation_and_clipping(ranks: list[dict[str, Any]]) -> None:
    for name in ("fsdp_accum", "fsdp_clip"):
        ref = ranks[0]["reference"][name]
        assert max_diff(ranks[0][name]["params"], ref["same_order"]["params"]) <= 1e-6, name
        assert max_diff(ranks[0][name]["params"], ref["one_pass"]["params"]) <= 1e-6, name
    norms, want = ranks[0]["fsdp_clip"]["norms"], ranks[0]["reference"]["fsdp_clip"]["same_order"]["norms"]
    assert all(n > 0.05 for n in want)  # every step was clipped (max_norm 0.05)
    assert norms == pytest.approx(want, rel=1e-6)
    assert ranks[1]["fsdp_clip"]["norms"] == norms


# Mixed precision: the layers compute in bf16 or fp16 from fp32 master shards. The issue asks for
# 1e-4 from a single-process run with the same casts; the same-order reference casts the same way
# (every Linear and Embedding casts its input, weight and bias) and FSDP meets it to the bit.
# A one-pass run with the same casts differs more: the weight gradient of the whole batch is rounded
# to 8 (bf16) or 11 (fp16) bits once, where two half-batch gradients are rounded each; that alone
# moves the weights by about as much as the precision itself does (bf16: 3.3e-4 against 7.3e-4
# between bf16 and fp32 training; fp16: 5.9e-5 against 6.8e-5), so allow 2e-3 and 3e-4 there.
@pytest.mark.slow
@pytest.mark.parametrize("name, one_pass_tol", [("fsdp_bf16", 2e-3), ("fsdp_fp16", 3e-4)])
def test_fsdp_mixed_precision_matches_the_same_casts(ranks: list[dict[str, Any]], name: str,
                                                     one_pass_tol: float) -> None:
    ref = ranks[0]["reference"][name]
    got = ranks[0][name]["params"]
    assert all(p.dtype == torch.float32 for p in got.values())  # master weights stay fp32
    assert max_diff(got, ref["same_order"]["params"]) <= 1e-4
    tensors_equal(got, ref["same_order"]["params"], name)
    assert max_diff(got, ref["one_pass"]["params"]) <= one_pass_tol
    assert max_diff(got, ranks[0]["fsdp"]["params"]) > 1e-5  # the casts did happen
