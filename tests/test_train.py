"""The training loop: schedules, accumulation, checkpoints and exact resume, bad inputs."""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minillm.cli import main as cli_main
from minillm.data import DataError
from minillm.model import LLM, ModelConfig
from minillm.train import (
    CheckpointError,
    NonFiniteError,
    TrainConfig,
    TrainError,
    apply_overrides,
    build_optimizer,
    config_to_toml,
    latest_checkpoint,
    lm_loss,
    load_checkpoint,
    load_config,
    load_for_inference,
    lr_at,
    plot_run,
    train,
    train_step,
)

WORDS = ("def return import class self None True False for in if else while try except with as lambda yield "
         "the a of to is and value list dict print len range").split()

# A model small enough that a step takes milliseconds.
TINY = ["model.vocab_size=300", "model.d_model=32", "model.n_layers=1", "model.n_heads=2", "model.n_kv_heads=2",
        "model.max_seq_len=32", "seq_len=32", "batch_size=4", "tokens_per_step=256", "warmup_steps=3", "log_every=1",
        "eval_every=4", "eval_batches=2", "final_eval_batches=4", "sample_every=6", "sample_tokens=6",
        "checkpoint_every=4", "keep_checkpoints=2", "val_fraction=0.3", "peak_flops=1e12", "lr=3e-3"]
TIMING = ("tokens_per_s", "mfu")  # the only logged numbers that may differ between two identical runs


@pytest.fixture(scope="module")
def docs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("docs")
    rng = random.Random(0)
    for i in range(30):
        (folder / f"doc{i:02d}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(300)) + "\n")
    return folder


def tiny_config(docs: Path, out: Path, *extra: str) -> TrainConfig:
    return load_config(None, [f"data={docs}", f"out={out}", *TINY, "max_steps=12", *extra])


def rows(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / name).read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# Schedules


def test_cosine_schedule_boundaries() -> None:
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, schedule="cosine")
    assert lr_at(0, cfg) == 0.0  # warmup starts from zero
    assert lr_at(5, cfg) == 0.5
    assert lr_at(9, cfg) == pytest.approx(0.9)
    assert lr_at(10, cfg) == 1.0  # the peak, exactly at the end of warmup
    assert lr_at(60, cfg) == pytest.approx(0.55)  # half way down the cosine: the mean of lr and min_lr
    assert lr_at(109, cfg) > 0.1
    assert lr_at(110, cfg) == 0.1 and lr_at(10_000, cfg) == 0.1  # min_lr at decay_end, then flat
    values = [lr_at(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    early = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=0, max_steps=100, decay_end=50)
    assert lr_at(0, early) == 1.0 and lr_at(50, early) == 0.0 and lr_at(99, early) == 0.0


@pytest.mark.parametrize("shape", ["linear", "sqrt"])
def test_wsd_schedule_boundaries(shape: str) -> None:
    cfg = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=10, max_steps=100, schedule="wsd", wsd_decay_fraction=0.2,
                      wsd_decay_shape=shape)
    assert lr_at(0, cfg) == 0.0 and lr_at(10, cfg) == 1.0
    assert lr_at(79, cfg) == 1.0 and lr_at(80, cfg) == 1.0  # stable until the last 20 steps begin
    mid = lr_at(90, cfg)
    assert mid == pytest.approx(0.5 if shape == "linear" else 1 - math.sqrt(0.5))
    assert 0.0 < lr_at(99, cfg) < mid
    assert lr_at(100, cfg) == 0.0 and lr_at(500, cfg) == 0.0


# --------------------------------------------------------------------------------------------
# The step


def test_accumulation_equals_the_large_batch() -> None:
    torch.manual_seed(0)
    x, y = torch.randint(0, 64, (8, 16)), torch.randint(0, 64, (8, 16))
    results = []
    for accum in (1, 2, 4):
        torch.manual_seed(1)
        model = LLM(ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=16))
        opt = torch.optim.SGD(model.parameters(), lr=1.0)  # SGD: the update is the gradient itself
        chunks = iter(zip(x.chunk(accum), y.chunk(accum)))
        out = train_step(model, opt, lambda: next(chunks), step=1, accum=accum, grad_clip=0.0)
        results.append((out, [p.detach().clone() for p in model.parameters()]))
    (big, big_params), *others = results
    for out, params in others:
        assert out.loss == pytest.approx(big.loss, rel=1e-6)
        assert out.grad_norm == pytest.approx(big.grad_norm, rel=1e-5)
        for a, b in zip(params, big_params):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_non_finite_gradient_norm_stops_before_the_update() -> None:
    model = LLM(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16))
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    batch = (torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)))
    with pytest.raises(NonFiniteError, match="step 7"):
        train_step(model, opt, lambda: batch, step=7, loss_fn=lambda m, b: lm_loss(m, b) * float("inf"))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_muon_optimizer_takes_the_hidden_matrices() -> None:
    model = LLM(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, max_seq_len=16, tie_embeddings=True))
    opt = build_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    muon = {id(p) for g in opt.optimizers["muon"].param_groups for p in g["params"]}
    assert id(model.token_embedding.weight) not in muon and id(model.blocks[0].attn.q_proj.weight) in muon
    batch = (torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16)))
    first = train_step(model, opt, lambda: batch, step=1).loss
    for step in range(2, 6):
        last = train_step(model, opt, lambda: batch, step=step).loss
    assert last < first
    assert set(opt.state_dict()) == {"muon", "adamw"}


# --------------------------------------------------------------------------------------------
# Config


def test_config_round_trips_through_toml(tmp_path: Path) -> None:
    cfg = apply_overrides(TrainConfig(), ["lr=1e-3", "betas=0.8,0.99", "compile=true", "model.d_model=128",
                                          "model.n_kv_heads=4", "sample_prompt=x = \"é\\\"\n\t\x7f😀"])
    path = tmp_path / "c.toml"
    path.write_text(config_to_toml(cfg))
    back = load_config(path)
    assert back == cfg and back.betas == (0.8, 0.99) and back.model_config().d_model == 128


@pytest.mark.parametrize("override, message", [
    ("nope=1", "unknown config field 'nope'"),
    ("model.nope=1", "unknown model field 'nope'"),
    ("lr=fast", "lr must be of type float"),
    ("max_steps=1.5", "max_steps must be of type int"),
    ("compile=maybe", "compile must be of type bool"),
    ("betas=0.9", "betas must be of type 2 numbers"),
    ("model.d_model=big", "model.d_model must be of type int"),
    ("schedule=linear", "schedule must be 'cosine' or 'wsd'"),
    ("tokens_per_step=1000", "multiple of batch_size \\* seq_len"),
    ("lr", "an override is KEY=VALUE"),
])
def test_bad_overrides_name_the_field(override: str, message: str) -> None:
    with pytest.raises(TrainError, match=message):
        apply_overrides(TrainConfig(), [override])


def test_bad_toml_values_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('lr = "high"\n')
    with pytest.raises(TrainError, match="lr must be of type float"):
        load_config(path)
    path.write_text("[model_overrides]\nd_model = true\n")
    with pytest.raises(TrainError, match="model.d_model must be of type int"):
        load_config(path)


def test_presets_load() -> None:
    root = Path(__file__).resolve().parent.parent / "configs"
    tiny, big = load_config(root / "tiny.toml"), load_config(root / "gpt2-124m.toml")
    assert tiny.device == "auto" and tiny.out == "runs/tiny"
    assert big.model_config().d_model == 768 and big.tokens_per_step % (big.batch_size * big.seq_len) == 0


# --------------------------------------------------------------------------------------------
# Runs, checkpoints and resume (in-process)


def test_run_folder_checkpoints_and_inference(docs: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    result = train(tiny_config(docs, run, "model.tie_embeddings=true"), progress=False)
    assert result.step == 12 and math.isfinite(result.val_bpb) and set(result.compressors) >= {"zlib", "bz2"}
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names == ["step_0000008", "step_0000012"]  # keep_checkpoints=2
    assert sorted(os.listdir(run / "checkpoints" / names[-1])) == [
        "config.toml", "model.safetensors", "optimizer.pt", "state.json", "tokenizer.bpe"]
    metrics = rows(run)
    assert [r["step"] for r in metrics if "loss" in r] == list(range(1, 13))
    assert {r["kind"] for r in metrics if "kind" in r} == {"compressors", "eval", "final"}
    assert (run / "samples.txt").read_text().count("--- step") == 1 + 3  # step 6, and three at the end
    model, tok = load_for_inference(run)
    assert model.lm_head.weight is model.token_embedding.weight and not model.training
    assert tok.vocab_size == 300
    assert plot_run(run).stat().st_size > 10_000


def test_nan_stops_the_run_and_the_last_checkpoint_survives(docs: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    calls = []

    def poisoned(model, batch):  # training micro-batch 15 is step 8's first: after the checkpoint at step 4
        calls.extend([1] if model.training else [])
        loss = lm_loss(model, batch)
        return loss * float("nan") if len(calls) == 15 else loss

    with pytest.raises(NonFiniteError, match="step 8"):
        train(tiny_config(docs, run), progress=False, loss_fn=poisoned)
    assert latest_checkpoint(run).name == "step_0000004"
    model = LLM(tiny_config(docs, run).model_config())
    assert load_checkpoint(latest_checkpoint(run), model)["step"] == 4


def test_truncated_or_foreign_file_is_a_clear_error(docs: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny_config(docs, run)
    train(cfg, progress=False)
    last, previous = sorted((run / "checkpoints").iterdir())[-2:][::-1]
    weights = last / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match=r"model.safetensors does not match.*delete .*step_0000012.*step_0000008"):
        train(cfg, resume=True, progress=False)
    with pytest.raises(CheckpointError):
        load_for_inference(last)
    (last / "state.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="state.json is unreadable"):
        load_for_inference(last)
    model, _ = load_for_inference(previous)  # the previous checkpoint is untouched
    assert model.cfg.d_model == 32


def test_crafted_pickle_is_refused_and_never_runs(docs: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    cfg = tiny_config(docs, run, "max_steps=4")
    train(cfg, progress=False)
    ckpt = latest_checkpoint(run)
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (ckpt / "optimizer.pt").write_bytes(pickle.dumps({"state": Exploit()}, protocol=2))
    # An attacker who can replace the file can also fix its checksum: weights_only must hold alone.
    state = json.loads((ckpt / "state.json").read_text())
    from minillm.train import _sha256

    state["files"]["optimizer.pt"] = _sha256(ckpt / "optimizer.pt")
    (ckpt / "state.json").write_text(json.dumps(state))
    model = LLM(cfg.model_config())
    with pytest.raises(CheckpointError, match="optimizer.pt: refused or unreadable"):
        load_checkpoint(ckpt, model, build_optimizer(model, cfg, torch.device("cpu")))
    assert not marker.exists()


# --------------------------------------------------------------------------------------------
# Bad inputs, through the command line: exit status 2 and one line that names the fix


def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str]:
    code = cli_main(["train", *argv])
    return code, capsys.readouterr().err


def test_cli_bad_inputs(docs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    base = [f"--set={s}" for s in TINY] + ["--set", "max_steps=2"]
    cases = [
        ([f"--set=data={tmp_path / 'missing'}", f"--set=out={tmp_path / 'a'}"], "no such file or directory"),
        ([f"--set=data={docs}", f"--set=out={tmp_path / 'b'}", "--set=lr=x"], "lr must be of type float"),
        ([f"--set=data={docs}", f"--set=out={tmp_path / 'c'}", "--set=colour=red"], "unknown config field 'colour'"),
        ([f"--set=data={docs}", f"--set=out={tmp_path / 'd'}", "--set=tokens_per_step=200"], "multiple of batch_size"),
        ([f"--set=data={docs}", f"--set=out={tmp_path / 'e'}", "--resume"], "nothing to resume"),
        (["--config", str(tmp_path / "none.toml")], "no such config file"),
    ]
    for argv, message in cases:
        code, err = _cli(capsys, *base, *argv)
        assert code == 2 and message in err and err.count("\n") == 1, (argv, err)


def test_tokenizer_and_shards_must_match(docs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    # Shards prepared with one tokenizer, a run given another: data.py's check names the mismatch.
    first = tiny_config(docs, tmp_path / "first", "max_steps=1", "checkpoint_every=0")
    train(first, progress=False)
    other = tmp_path / "other.bpe"
    from minillm.tokenizer import train_bpe

    train_bpe([(docs / "doc00.txt").read_text()], 280).save(other)
    cfg = tiny_config(docs, tmp_path / "second", f"data_dir={tmp_path / 'first' / 'data'}", f"tokenizer={other}")
    with pytest.raises(DataError):
        train(cfg, progress=False)
    code, err = _cli(capsys, *[f"--set={s}" for s in TINY], f"--set=data={docs}", f"--set=out={tmp_path / 'third'}",
                     f"--set=data_dir={tmp_path / 'first' / 'data'}", f"--set=tokenizer={other}")
    assert code == 2 and "tokenizer" in err and err.count("\n") == 1


def test_existing_run_needs_resume_or_force(docs: Path, tmp_path: Path) -> None:
    cfg = tiny_config(docs, tmp_path / "run", "max_steps=2", "checkpoint_every=0")
    train(cfg, progress=False)
    with pytest.raises(ValueError, match="--resume .* --force"):
        train(cfg, progress=False)
    changed = apply_overrides(cfg, ["batch_size=2", "tokens_per_step=256"])
    with pytest.raises(TrainError, match="different batch_size"):
        train(changed, resume=True, progress=False)
    assert train(cfg, force=True, progress=False).step == 2


# --------------------------------------------------------------------------------------------
# Exact resume after SIGKILL (subprocesses)


# Runs the command line in a subprocess that stops dead, signals the test (a marker file) and
# waits to be killed: in the middle of step K, or half-way through writing checkpoint K (after
# optimizer.pt, before the rest and before the folder is renamed into place).
KILLABLE = r"""
import sys, time, torch
import minillm.train as T
mode, k, marker = sys.argv[1], int(sys.argv[2]), sys.argv[3]

def stop():
    open(marker, "w").close()
    time.sleep(600)

if mode == "step":
    real_step = T.train_step
    def train_step(*args, **kwargs):
        if kwargs["step"] == k:
            stop()
        return real_step(*args, **kwargs)
    T.train_step = train_step
elif mode == "checkpoint":
    real_save = torch.save
    def save(obj, path, *args, **kwargs):
        real_save(obj, path, *args, **kwargs)
        if f"step_{k:07d}" in str(path):
            stop()
    T.torch.save = save
from minillm.cli import main
sys.exit(main(["train", *sys.argv[4:]]))
"""


def _run_until_killed(tmp_path: Path, mode: str, k: int, argv: list[str]) -> None:
    marker = tmp_path / f"marker-{mode}-{k}"
    script = tmp_path / "killable.py"
    script.write_text(KILLABLE)
    proc = subprocess.Popen([sys.executable, str(script), mode, str(k), str(marker), *argv],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"the run ended before it was killed: {proc.stderr.read().decode()}")
        assert time.monotonic() < deadline, "the run never reached the kill point"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()


def _cli_run(argv: list[str]) -> None:
    out = subprocess.run([sys.executable, "-m", "minillm", "train", *argv], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr


@pytest.mark.slow
def test_resume_after_sigkill_is_bit_exact(docs: Path, tmp_path: Path) -> None:
    args = [f"--set={s}" for s in TINY] + [f"--set=data={docs}", "--set=max_steps=20"]
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    _cli_run([*args, f"--set=out={whole}"])

    rng = random.Random()
    step_kill = rng.choice([5, 6, 7, 9, 10, 11])  # between checkpoints (every 4 steps)
    _run_until_killed(tmp_path, "step", step_kill, [*args, f"--set=out={broken}"])
    assert not (broken / "checkpoints" / "step_0000012").exists()
    # Resume, and kill it again half-way through writing the checkpoint of step 12 (or 16).
    ckpt_kill = 12 if step_kill < 12 else 16
    _run_until_killed(tmp_path, "checkpoint", ckpt_kill, [f"--set=out={broken}", "--resume"])
    assert not (broken / "checkpoints" / f"step_{ckpt_kill:07d}").exists()
    assert list((broken / "checkpoints").glob(".step_*.tmp"))  # the half-written folder, never renamed
    _cli_run([f"--set=out={broken}", "--resume"])

    assert rows(broken) == rows(whole)
    assert rows(broken, "samples.jsonl") == rows(whole, "samples.jsonl")
    assert not list((broken / "checkpoints").glob(".step_*.tmp"))
    a, b = (latest_checkpoint(r) / "model.safetensors" for r in (whole, broken))
    assert a.read_bytes() == b.read_bytes()
