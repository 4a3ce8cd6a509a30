"""`minillm train` under torchrun: torch's DDP, ZeRO-1, ZeRO-2 and FSDP2 on 2 gloo ranks, exact resume,
DCP checkpoints that reshard, activation checkpointing, and the --strategy option.

The 2-rank tests launch `python -m torch.distributed.run --nproc_per_node=2 -m minillm train ...`
as a subprocess (minillm.distributed.run_torchrun: a standalone rendezvous on a free port, one
process group per launch, never retried), as a user would. Each launch costs about 4 s, mostly
importing torch in every process, so the runs are shared: each is launched once per module, when a
test first asks for it.

What can be asked to the bit, and why: a resumed run (same world size) repeats the uninterrupted
run's arithmetic exactly (the weights, the optimizer state and every rank's data stream are in the
checkpoint; the learning rate is a function of the step), so metrics.jsonl matches row for row.
Activation checkpointing recomputes the same operations, so it changes no bit either. Between
strategies only the order of some sums differs (FSDP2's gradient norm adds per-shard partial sums),
so they are compared to a stated tolerance.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest
import torch

from minillm.cli import main as cli_main
from minillm.distributed import run_torchrun
from minillm.model import LLM, ModelConfig
from minillm.train import (
    SingleDevice,
    TrainConfig,
    TrainError,
    _check_resume_layout,
    _read_state,
    checkpoint_blocks,
    latest_checkpoint,
    load_config,
    load_for_inference,
)
from test_train import TINY as SINGLE_TINY
from test_train import docs, rows  # noqa: F401 (docs is a fixture)

# Tiny, and 2 blocks (FSDP2 shards each block, then the root): test_train's settings with four of them
# changed (a later --set wins). decay_end fixes the schedule, so a run stopped at max_steps=4 and
# resumed to 8 has the learning rates of a run of 8; evaluations at 3 and 6 (not at 4, where the
# stopped run's final evaluation takes the place of the periodic one).
TINY = [*SINGLE_TINY, "model.n_layers=2", "eval_every=3", "decay_end=8", "device=cpu"]
STEPS = 8
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE", "GROUP_RANK")


def torchrun(nproc: int, args: list[str], timeout: float = 120.0, expect: int = 0) -> subprocess.CompletedProcess:
    """run_torchrun, failing with the end of its output if the exit status is not `expect`. Past
    `timeout` it raises DistributedError, torchrun and every rank killed (a hung rank must not outlive
    the test)."""
    result = run_torchrun(args, nproc=nproc, timeout=timeout, check=False)
    assert result.returncode == expect, (f"exit status {result.returncode}, expected {expect}:\n"
                                         f"--- stdout ---\n{result.stdout[-2000:]}\n--- stderr ---\n{result.stderr[-6000:]}")
    return result


class Runs:
    """The module's runs, each launched once, on first use."""

    def __init__(self, root: Path, docs: Path) -> None:
        self.root, self.docs, self.done = root, docs, {}

    def train(self, nproc: int, out: Path, *extra: str, expect: int = 0,
              entry: tuple[str, ...] = ("-m", "minillm")) -> subprocess.CompletedProcess:
        """`minillm train` (or `entry`: a script that takes the same arguments) with TINY and `extra`."""
        args = [*entry, "train", *(f"--set={s}" for s in TINY), f"--set=data={self.docs}", f"--set=out={out}", *extra]
        return torchrun(nproc, args, expect=expect)

    def whole(self, strategy: str, *extra: str) -> Path:
        """An uninterrupted run of STEPS steps on 2 ranks."""
        key = ("whole", strategy, extra)
        if key not in self.done:
            out = self.root / f"whole-{strategy}-{len(self.done)}"
            self.train(2, out, "--strategy", strategy, f"--set=max_steps={STEPS}", *extra)
            self.done[key] = out
        return self.done[key]

    def stopped(self, strategy: str) -> Path:
        """A run of STEPS / 2 steps on 2 ranks (a copy of it: the tests resume copies)."""
        key = ("stopped", strategy)
        if key not in self.done:
            out = self.root / f"stopped-{strategy}"
            self.train(2, out, "--strategy", strategy, f"--set=max_steps={STEPS // 2}")
            self.done[key] = out
        return self.done[key]

    def resumed(self, strategy: str) -> Path:
        """The stopped run resumed to STEPS on 2 ranks (with --resume, as a user would)."""
        key = ("resumed", strategy)
        if key not in self.done:
            out = self.root / f"resumed-{strategy}"
            shutil.copytree(self.stopped(strategy), out)
            self.train(2, out, "--resume", f"--set=max_steps={STEPS}")
            self.done[key] = out
        return self.done[key]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, docs: Path) -> Runs:
    return Runs(tmp_path_factory.mktemp("runs"), docs)


# --------------------------------------------------------------------------------------------
# 2 ranks: resume, checkpoint formats, strategies against each other


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "zero1", "zero2", "fsdp"])
def test_resume_on_the_same_world_size_is_bit_exact(runs: Runs, strategy: str) -> None:
    whole, resumed = runs.whole(strategy), runs.resumed(strategy)
    assert [r["step"] for r in rows(whole) if "loss" in r] == list(range(1, STEPS + 1))
    assert rows(resumed) == rows(whole)
    assert rows(resumed, "samples.jsonl") == rows(whole, "samples.jsonl")
    a, b = (latest_checkpoint(r) / "model.safetensors" for r in (whole, resumed))
    assert a.read_bytes() == b.read_bytes()


# Runs the command line (after K, the step whose checkpoint is cut short) with every strategy's
# save_optimizer wrapped: while checkpoint K is being written, once every rank has written its
# optimizer state into the temporary folder (after the weights, before the hashes, state.json and
# the rename into place), the ranks meet, and rank 0 SIGKILLs torchrun, the other ranks and itself,
# each with its process group: all at one point of the write, decided by the program, not by a clock.
KILL_IN_CHECKPOINT = r'''
import os, signal, sys, time
import torch.distributed as dist
from minillm import distributed as D
from minillm.cli import main

step = int(sys.argv[1])
launcher = os.getppid()
if os.path.exists(f"/proc/{launcher}/cmdline"):  # what rank 0 kills must be torchrun (checked on Linux)
    with open(f"/proc/{launcher}/cmdline", "rb") as f:
        assert b"torch.distributed.run" in f.read(), "start this script with torchrun"


def kill(pid):  # the process and, if it leads one (torchrun and its workers do), its process group
    if os.getpgid(pid) == pid:
        os.killpg(pid, signal.SIGKILL)
    else:
        os.kill(pid, signal.SIGKILL)


def wrap(cls):
    real = cls.save_optimizer

    def save_optimizer(self, folder, model, optimizer):
        real(self, folder, model, optimizer)
        if f"step_{step:07d}" in folder.name:  # the temporary folder (or, written in place, the final one)
            pids = [None] * self.world_size
            dist.all_gather_object(pids, os.getpid())  # every rank has written its share
            if self.rank == 0:
                for pid in [launcher, *pids[1:], pids[0]]:  # torchrun first: it must not see a rank end
                    kill(pid)
            time.sleep(600)

    cls.save_optimizer = save_optimizer


for cls in (D.TorchDDP, D.TorchZero1, D.TorchFSDP):
    wrap(cls)
sys.exit(main(sys.argv[2:]))
'''


@pytest.mark.slow
@pytest.mark.parametrize("strategy, optimizer_files", [
    ("zero1", ["optimizer.rank0.pt", "optimizer.rank1.pt"]),
    ("fsdp", ["optimizer/.metadata", "optimizer/__0_0.distcp", "optimizer/__1_0.distcp"]),
])
def test_sigkill_while_writing_a_checkpoint_then_resume_is_bit_exact(runs: Runs, tmp_path: Path, strategy: str,
                                                                     optimizer_files: list[str]) -> None:
    script = tmp_path / "kill_in_checkpoint.py"
    script.write_text(KILL_IN_CHECKPOINT)
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    # Killed while writing the final checkpoint (STEPS); the one of STEPS / 2 is complete.
    runs.train(2, run, "--strategy", strategy, f"--set=max_steps={STEPS}", entry=(str(script), str(STEPS)),
               expect=-signal.SIGKILL)
    previous = latest_checkpoint(run)
    assert previous == ckpts / f"step_{STEPS // 2:07d}"
    assert sorted(p.name for p in ckpts.iterdir() if not p.name.startswith(".")) == [previous.name]
    assert _read_state(previous)["step"] == STEPS // 2  # every file it lists matches its checksum
    [half] = ckpts.glob(f".step_{STEPS:07d}.*.tmp")  # the half-written checkpoint, still under its temporary name
    written = {str(p.relative_to(half)) for p in half.rglob("*") if p.is_file()}
    assert {"model.safetensors", "tokenizer.bpe", "config.toml", *optimizer_files} <= written
    assert "state.json" not in written

    runs.train(2, run, "--resume", f"--set=max_steps={STEPS}")
    whole = runs.whole(strategy)
    assert rows(run) == rows(whole)
    assert rows(run, "samples.jsonl") == rows(whole, "samples.jsonl")
    assert not list(ckpts.glob(".step_*"))  # the half-written folder was removed
    a, b = (latest_checkpoint(r) / "model.safetensors" for r in (whole, run))
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.slow
@pytest.mark.parametrize("strategy, optimizer_files", [
    ("ddp", ["optimizer.pt"]),
    ("zero1", ["optimizer.rank0.pt", "optimizer.rank1.pt"]),
    ("zero2", ["optimizer/.metadata"]),
    ("fsdp", ["optimizer/.metadata"]),
])
def test_checkpoint_format(runs: Runs, strategy: str, optimizer_files: list[str]) -> None:
    ckpt = latest_checkpoint(runs.whole(strategy))
    state = json.loads((ckpt / "state.json").read_text())
    assert (state["strategy"], state["world_size"], len(state["ranks"])) == (strategy, 2, 2)
    assert [r["sampler"]["rank"] for r in state["ranks"]] == [0, 1]  # every rank's own data stream
    files = set(state["files"])
    assert {"model.safetensors", "tokenizer.bpe", "config.toml", *optimizer_files} <= files
    if strategy in ("zero2", "fsdp"):  # each rank's DCP shard file is listed and hashed too
        assert len([f for f in files if f.startswith("optimizer/") and f.endswith(".distcp")]) == 2
    assert not list(ckpt.parent.glob(".step_*"))  # no temporary folder left behind
    model, _ = load_for_inference(runs.whole(strategy))  # the full weights, whatever the strategy
    assert sum(p.numel() for p in model.parameters()) == LLM(model.cfg).num_parameters()


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["zero1", "zero2", "fsdp"])
def test_strategies_agree_with_ddp(runs: Runs, strategy: str) -> None:
    want = [r for r in rows(runs.whole("ddp")) if "loss" in r or "val_loss" in r]
    got = [r for r in rows(runs.whole(strategy)) if "loss" in r or "val_loss" in r]
    assert [r["step"] for r in got] == [r["step"] for r in want]
    # The same data and arithmetic, but FSDP2 adds the gradient norm per shard then across ranks:
    # measured up to 1.2e-7 relative, and through clipping a last-bit change of the update.
    for a, b in zip(got, want):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in b:
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (strategy, b["step"], key)


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_activation_checkpointing_changes_no_bit(runs: Runs, strategy: str) -> None:
    checkpointed = runs.whole(strategy, "--set=activation_checkpointing=true")
    assert rows(checkpointed) == rows(runs.whole(strategy))


@pytest.mark.slow
def test_fsdp_resumes_on_another_world_size_and_ddp_refuses(runs: Runs, tmp_path: Path) -> None:
    one = tmp_path / "fsdp-on-1"
    shutil.copytree(runs.stopped("fsdp"), one)
    done = runs.train(1, one, "--resume", f"--set=max_steps={STEPS}")
    assert "resuming a checkpoint of 2 processes on 1" in done.stderr
    assert [r["step"] for r in rows(one) if "loss" in r] == list(range(1, STEPS + 1))
    assert json.loads((latest_checkpoint(one) / "state.json").read_text())["world_size"] == 1

    ddp = tmp_path / "ddp-on-1"
    shutil.copytree(runs.stopped("ddp"), ddp)
    refused = runs.train(1, ddp, "--resume", f"--set=max_steps={STEPS}", expect=1)
    assert "written by 2 process(es) and this run has 1: strategy=ddp cannot reshard" in refused.stderr


# A DCP checkpoint saved on 2 ranks, resumed on 2 and on 1, at the level of the model and optimizer
# state: a run-level comparison cannot have the same batches on 1 and 2 ranks (each rank draws its
# own stream). Each global batch of 4 sequences is split in halves: on 2 ranks each takes one; on
# 1 rank the two halves are 2 micro-batches of gradient accumulation, whose gradient (g0/2 + g1/2) is
# bit for bit FSDP2's average over 2 ranks ((g0 + g1) / 2: halving is exact). So the next step's
# loss must be identical to the bit, and differ from a run that resumes without the optimizer state.
DCP_WORKER = r'''
import json, sys
from pathlib import Path
import torch
from minillm import train as T
from minillm.distributed import exit_worker, make_strategy
from minillm.model import LLM

out, phase = Path(sys.argv[1]), sys.argv[2]
cfg = T.TrainConfig(model_overrides=dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16,
                                         tie_embeddings=True, multiple_of=16), seq_len=16, lr=1e-2, strategy="fsdp",
                    device="cpu")
g = torch.Generator().manual_seed(1)
batches = [(torch.randint(0, 64, (4, 16), generator=g), torch.randint(0, 64, (4, 16), generator=g)) for _ in range(4)]


def mine(strategy, i):
    x, y = batches[i]
    halves = [(x[:2], y[:2]), (x[2:], y[2:])]
    return [halves[strategy.rank]] if strategy.world_size == 2 else halves


def build(seed, load):
    strategy = make_strategy("fsdp", "cpu")
    torch.manual_seed(seed)
    raw = LLM(cfg.model_config())
    if load:
        T._load_model_file(raw, out / "ckpt" / "model.safetensors")
    strategy.setup(cfg, torch.device("cpu"), torch.float32)
    strategy.wrap(raw)
    return strategy, raw, strategy.build_optimizer(raw, cfg, torch.device("cpu"))


def step(strategy, model, opt, i, clip=0.0):
    it = iter(mine(strategy, i))
    return T.train_step(model, opt, lambda: next(it), step=i + 1, accum=len(mine(strategy, i)), grad_clip=clip,
                        strategy=strategy)


@torch.no_grad()
def loss(strategy, model, i):
    total = sum(T.lm_loss(model, b) for b in mine(strategy, i))
    return (strategy.reduce_sum(total) / 2).item()


try:
    result = {}
    if phase == "save":
        strategy, model, opt = build(0, load=False)
        result["norms"] = [step(strategy, model, opt, i, clip=1.0).grad_norm for i in range(2)]
        (out / "ckpt").mkdir(exist_ok=True)
        full = strategy.full_state_dict(model)
        if strategy.is_main:
            T._safetensors().save_file(T._model_tensors(model, full), str(out / "ckpt" / "model.safetensors"))
        strategy.save_optimizer(out / "ckpt", model, opt)
        strategy.barrier()
        step(strategy, model, opt, 2)
        result["uninterrupted"] = loss(strategy, model, 3)
        strategy, model, opt = build(5, load=True)  # fresh modules and optimizer, from another seed
        strategy.load_optimizer(out / "ckpt", model, opt)
        step(strategy, model, opt, 2)
        result["resumed"] = loss(strategy, model, 3)
        if strategy.is_main:  # the reference norms: one plain process, the same global batches, clipped alike
            torch.manual_seed(0)
            plain = LLM(cfg.model_config())
            popt = T.build_optimizer(plain, cfg, torch.device("cpu"))
            result["reference_norms"] = [step(T.SingleDevice(), plain, popt, i, clip=1.0).grad_norm for i in range(2)]
    else:
        strategy, model, opt = build(5, load=True)
        if phase == "resume":
            strategy.load_optimizer(out / "ckpt", model, opt)
        step(strategy, model, opt, 2)
        result["resumed"] = loss(strategy, model, 3)
    if strategy.is_main:
        (out / f"{phase}.json").write_text(json.dumps(result))
    exit_worker(0)
except BaseException:
    import traceback
    traceback.print_exc()
    exit_worker(1)
'''


@pytest.fixture(scope="module")
def dcp_results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("dcp")
    script = out / "dcp_worker.py"
    script.write_text(DCP_WORKER)
    torchrun(2, [str(script), str(out), "save"])
    for phase in ("resume", "no_state"):
        torchrun(1, [str(script), str(out), phase])
    return {phase: json.loads((out / f"{phase}.json").read_text()) for phase in ("save", "resume", "no_state")}


@pytest.mark.slow
def test_dcp_checkpoint_saved_on_2_ranks_resumes_on_1_and_on_2(dcp_results: dict[str, Any]) -> None:
    saved = dcp_results["save"]
    assert saved["resumed"] == saved["uninterrupted"]  # on 2 ranks, in fresh modules
    assert dcp_results["resume"]["resumed"] == saved["uninterrupted"]  # on 1 rank: DCP resharded the state
    # Without the optimizer state the next step is another one (the test would notice a state not loaded).
    assert abs(dcp_results["no_state"]["resumed"] - saved["uninterrupted"]) > 1e-3


@pytest.mark.slow
def test_fsdp2_clips_with_the_global_norm(dcp_results: dict[str, Any]) -> None:
    # clip_grad_norm_ on FSDP2's DTensor gradients reduces the squares across ranks: the whole model's
    # norm (a per-shard norm would be about 1/sqrt(2) of it). Partial sums in another order: 1e-6.
    saved = dcp_results["save"]
    assert saved["norms"] == pytest.approx(saved["reference_norms"], rel=1e-6)
    assert min(saved["norms"]) > 1.0  # above grad_clip=1.0: the steps were clipped, with that norm


# --------------------------------------------------------------------------------------------
# One process: the config, the command line, the resume checks, activation checkpointing


@pytest.fixture
def no_torchrun(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in TORCHRUN_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_strategy_and_checkpointing_fields() -> None:
    assert (TrainConfig().strategy, TrainConfig().activation_checkpointing) == ("single", False)
    cfg = load_config(None, ["strategy=fsdp", "activation_checkpointing=true"])
    assert (cfg.strategy, cfg.activation_checkpointing) == ("fsdp", True)
    with pytest.raises(TrainError, match="strategy must be 'single' or 'ddp' or 'zero1' or 'zero2' or 'fsdp', got 'zero3'"):
        load_config(None, ["strategy=zero3"])
    with pytest.raises(TrainError, match="optimizer='muon' cannot run with strategy='fsdp'.* use strategy=ddp"):
        TrainConfig(optimizer="muon", strategy="fsdp")
    assert TrainConfig(optimizer="muon", strategy="ddp").strategy == "ddp"


def test_distributed_strategies_need_torchrun(no_torchrun: pytest.MonkeyPatch, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    from minillm.distributed import make_strategy

    assert isinstance(make_strategy("single"), SingleDevice)
    for name in ("ddp", "zero1", "zero2", "fsdp"):
        with pytest.raises(TrainError, match=rf"`torchrun --nproc_per_node=N -m minillm train --strategy {name} "):
            make_strategy(name)
    # The command line: --strategy is --set strategy=..., and refused outside torchrun with the command to run.
    assert cli_main(["train", "--strategy", "fsdp", f"--set=out={tmp_path / 'run'}"]) == 2
    assert "torchrun --nproc_per_node=N -m minillm train --strategy fsdp" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    assert cli_main(["train", "--strategy", "zero3"]) == 2
    assert "argument --strategy: invalid choice: 'zero3'" in capsys.readouterr().err


def test_cli_strategy_option_sets_the_field(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import minillm.train

    seen = []

    def fake_train(cfg: TrainConfig, **kwargs: Any) -> Any:
        seen.append(cfg)
        raise TrainError("stop here")

    monkeypatch.setattr(minillm.train, "train", fake_train)
    assert cli_main(["train", "--set", "strategy=ddp", "--strategy", "zero2", f"--set=out={tmp_path}"]) == 2
    assert cli_main(["train", "--set", "strategy=ddp", f"--set=out={tmp_path}"]) == 2
    assert [c.strategy for c in seen] == ["zero2", "ddp"]  # the option wins over --set


def test_resume_checks_the_checkpoint_format_and_world_size() -> None:
    class Fake(SingleDevice):
        def __init__(self, name: str, fmt: str, world_size: int) -> None:
            self.name, self.optimizer_format, self.world_size = name, fmt, world_size

    assert _check_resume_layout({}, SingleDevice())  # a single-device checkpoint of before this field
    assert _check_resume_layout({"optimizer_format": "full", "world_size": 1, "strategy": "single"}, Fake("ddp", "full", 1))
    with pytest.raises(TrainError, match="strategy=zero1 .* which strategy=ddp cannot read; resume with strategy=zero1"):
        _check_resume_layout({"optimizer_format": "zero1", "world_size": 2, "strategy": "zero1"}, Fake("ddp", "full", 2))
    with pytest.raises(TrainError, match="written by 2 process.* this run has 4: strategy=zero1 cannot reshard"):
        _check_resume_layout({"optimizer_format": "zero1", "world_size": 2, "strategy": "zero1"}, Fake("zero1", "zero1", 4))
    assert not _check_resume_layout({"optimizer_format": "dcp", "world_size": 2, "strategy": "fsdp"}, Fake("zero2", "dcp", 4))


@pytest.mark.parametrize("dropout", [0.0, 0.1])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(dropout: float) -> None:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, max_seq_len=16, dropout=dropout)
    torch.manual_seed(0)
    plain = LLM(cfg)
    checkpointed = checkpoint_blocks(LLM(cfg))
    checkpointed.load_state_dict(plain.state_dict())
    ids, targets = torch.randint(0, 64, (3, 16)), torch.randint(0, 64, (3, 16))
    results = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # the same dropout masks: checkpoint() replays the RNG state in its recomputation
        loss = model(ids, targets)[1]
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.equal(loss_a, loss_b)
    for name in grads_a:
        assert torch.equal(grads_a[name], grads_b[name]), name
    # Inference runs the plain forward (no recomputation without a backward), and generation works.
    checkpointed.eval()
    with torch.no_grad():
        assert torch.equal(checkpointed(ids)[0], plain.eval()(ids)[0])
    assert checkpointed.generate(ids[:1, :4], 3).shape == (1, 7)
