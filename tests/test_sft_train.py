"""minillm.sft's fine-tuning run: the masked loss falls, checkpoints load for inference, resume is
bit-exact, LoRA trains only its adapters (and the chat tokens' rows), bad inputs name the fix, and
`minillm sft` runs end to end.

A tiny base is pretrained once per module with `minillm.train` (test_train's corpus and settings,
with a 64-token context), and ~40 made-up conversations over the same words make the JSONL data.
"""

from __future__ import annotations

import io
import json
import math
import random
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_train import TINY, WORDS, docs  # noqa: F401  (docs is a fixture)

from minillm import sft
from minillm.cli import main as cli_main
from minillm.instructions import DataError, load_jsonl, split_pairs
from minillm.lora import load_adapter, merge_lora
from minillm.sft import (
    ADAPTER_FILE,
    CHAT_TOKENS,
    ChatTemplate,
    ExampleBatches,
    SFTConfig,
    SFTError,
    finetune,
    fit,
    load_sft_config,
    resize_vocab,
    sft_loss,
)
from minillm.train import (
    CheckpointError,
    TrainError,
    apply_overrides,
    config_to_toml,
    evaluate,
    latest_checkpoint,
    load_config,
    load_for_inference,
    train,
)

TIMING = ("tokens_per_s",)  # the only logged numbers that may differ between two identical runs
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def base(docs: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A pretrained run folder: 1 layer, d_model 32, a vocabulary of 300, a context of 64 tokens."""
    run = tmp_path_factory.mktemp("base") / "run"
    cfg = load_config(None, [f"data={docs}", f"out={run}", *TINY, "model.max_seq_len=64", "seq_len=64",
                             "max_steps=6", "eval_every=0", "sample_every=0", "checkpoint_every=0"])
    train(cfg, progress=False)
    return run


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """40 short requests (reverse three words), and two whose prompt is far too long for the context."""
    rng = random.Random(0)
    lines = []
    for i in range(40):
        words = [rng.choice(WORDS) for _ in range(3)]
        lines.append({"instruction": f"Reverse: {' '.join(words)}", "output": " ".join(reversed(words))})
    for _ in range(2):
        lines.append({"messages": [{"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(80))},
                                   {"role": "assistant", "content": "None"}]})
    path = tmp_path_factory.mktemp("data") / "data.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def config(base: Path, data: Path, out: Path, *extra: str) -> SFTConfig:
    return load_sft_config(None, [f"base={base}", f"data={data}", f"out={out}", "val_fraction=0.2", "batch_size=4",
                                  "max_steps=8", "lr=3e-3", "min_lr=3e-4", "warmup_steps=2", "log_every=1",
                                  "eval_every=4", "sample_every=4", "samples=2", "sample_tokens=8", "checkpoint_every=4",
                                  *extra])


def rows(run: Path, name: str = "metrics.jsonl") -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / name).read_text().splitlines()]


def train_examples(cfg: SFTConfig, template: ChatTemplate) -> list[sft.Example]:
    train = split_pairs(load_jsonl(cfg.data), cfg.val_fraction, cfg.test_fraction)["train"]
    return fit((template.encode(c) for c in train), 64, "drop").examples


def _adapter(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as f:
        names = f.keys()  # a safe_open handle is not a dict: it has keys(), not iteration
        return {k: f.get_tensor(k) for k in names}, f.metadata()


def masked_loss(model: torch.nn.Module, examples: list[sft.Example]) -> float:
    batches = ExampleBatches(examples, 8, 64, packing=False, shuffle=False)
    return evaluate(model, batches, loss_fn=sft_loss, count_targets=lambda b: b.targets)[0]


# --------------------------------------------------------------------------------------------
# The config


def test_config_round_trips_and_the_preset_loads(tmp_path: Path) -> None:
    cfg = load_sft_config(None, ["base=runs/tiny", "lora_rank=8", "lora_alpha=16", "betas=0.8,0.99", "packing=false"])
    (tmp_path / "c.toml").write_text(config_to_toml(cfg))
    assert load_sft_config(tmp_path / "c.toml") == cfg
    preset = load_sft_config(ROOT / "configs" / "sft-tiny.toml")
    assert preset.out == "runs/sft-tiny" and preset.lora_rank == 0 and preset.lr < load_config(ROOT / "configs" / "tiny.toml").lr


@pytest.mark.parametrize("override, message", [
    ("too_long=cut", "too_long must be 'drop' or 'truncate'"),
    ("lora_rank=-1", "lora_rank must be >= 0"),
    ("lora_alpha=16", "lora_alpha=16 needs lora_rank > 0"),
    ("epochs=0", "epochs and max_steps are both 0"),
    ("lr=fast", "lr must be of type float"),
    ("model.d_model=8", "unknown config field 'model.d_model'"),
    ("optimizer=muon", "optimizer='muon' with lora_rank"),
])
def test_bad_settings_name_the_field(override: str, message: str) -> None:
    extra = ["lora_rank=4"] if override == "optimizer=muon" else []
    with pytest.raises(TrainError, match=message):
        load_sft_config(None, [*extra, override])


# --------------------------------------------------------------------------------------------
# Batches


@pytest.mark.parametrize("packing", [False, True])
def test_batches_cover_each_epoch_once_and_resume_from_their_state(packing: bool) -> None:
    examples = [sft.Example((1, 2, 3, 4)[: 2 + i % 3], (False, True, True, True)[: 2 + i % 3], f"ex{i}") for i in range(23)]
    a = ExampleBatches(examples, 4, 8, packing=packing, seed=3)
    n = len(a)
    per_epoch = [[a.next_batch() for _ in range(n)] for _ in range(2)]
    for epoch in per_epoch:
        assert sum(b.targets for b in epoch) == sum(ex.targets for ex in examples)  # every example once
    assert not all(torch.equal(x.x, y.x) for x, y in zip(*per_epoch)) or packing  # a new order each epoch
    b = ExampleBatches(examples, 4, 8, packing=packing, seed=3)
    for _ in range(n + 2):
        b.next_batch()
    c = ExampleBatches(examples, 4, 8, packing=packing, seed=3)
    c.load_state_dict(b.state_dict())
    assert c.progress == pytest.approx(1 + 2 / n)
    for _ in range(n):
        x, y = b.next_batch(), c.next_batch()
        assert torch.equal(x.x, y.x) and torch.equal(x.y, y.y)


# --------------------------------------------------------------------------------------------
# Runs


def test_finetune_lowers_the_masked_loss_and_saves_a_chat_checkpoint(base: Path, data: Path, tmp_path: Path) -> None:
    cfg = config(base, data, tmp_path / "sft")
    before, base_tok = load_for_inference(base)
    template = ChatTemplate.for_tokenizer(base_tok)
    resize_vocab(before, template.tokenizer.vocab_size)
    examples = train_examples(cfg, template)

    result = finetune(cfg, progress=False)
    assert result.step == 8 and math.isfinite(result.val_loss)
    assert result.fit["train"]["dropped_too_long"] + result.fit["val"]["dropped_too_long"] == 2  # the two long ones
    after, tok = load_for_inference(result.run)  # a plain LLM that `minillm sample` and `chat` can read
    assert all(t in tok.special_tokens for t in CHAT_TOKENS)
    assert after.cfg.vocab_size == tok.vocab_size == base_tok.vocab_size + 4
    assert masked_loss(after, examples) < masked_loss(before, examples) - 0.3

    assert sorted(p.name for p in (result.run / "checkpoints").iterdir()) == ["step_0000004", "step_0000008"]
    metrics = rows(result.run)
    data_row = next(r for r in metrics if r.get("kind") == "data")
    assert data_row["train_kept"] == result.fit["train"]["kept"] and data_row["max_steps"] == 8
    assert [r["step"] for r in metrics if r.get("kind") in ("eval", "final")] == [0, 4, 8]
    assert [r["step"] for r in metrics if "loss" in r] == list(range(1, 9))
    samples = rows(result.run, "samples.jsonl")
    assert len(samples) == 2 * 3 and all(s["prompt"].startswith("Reverse:") for s in samples)
    assert len(result.samples) == 2


@pytest.mark.parametrize("lora_rank, packing, epochs", [(0, True, 3), (4, False, 2)])
def test_resume_is_bit_exact(base: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             lora_rank: int, packing: bool, epochs: int) -> None:
    extra = (f"lora_rank={lora_rank}", f"packing={packing}", f"epochs={epochs}", "max_steps=0", "eval_every=3",
             "sample_every=3", "checkpoint_every=3")
    whole = finetune(config(base, data, tmp_path / "whole", *extra), progress=False)
    per_epoch = next(r for r in rows(whole.run) if r.get("kind") == "data")["batches_per_epoch"]
    assert whole.max_steps == epochs * per_epoch > 8  # the resumed part (steps 7 on) crosses an epoch

    cfg = config(base, data, tmp_path / "broken", *extra)
    real_step = sft.train_step

    def crash_at_step_8(*args, **kwargs):
        if kwargs["step"] == 8:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(sft, "train_step", crash_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        finetune(cfg, progress=False)
    monkeypatch.setattr(sft, "train_step", real_step)
    assert latest_checkpoint(cfg.out).name == "step_0000006"
    resumed = finetune(cfg, resume=True, progress=False)

    assert resumed.step == whole.step and resumed.val_loss == whole.val_loss
    assert rows(Path(cfg.out)) == rows(whole.run)
    assert rows(Path(cfg.out), "samples.jsonl") == rows(whole.run, "samples.jsonl")
    a, b = (latest_checkpoint(r) for r in (whole.run, cfg.out))
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    if lora_rank:  # the same tensors and metadata (safetensors writes the metadata in a hash map's order)
        (ta, ma), (tb, mb) = (_adapter(c / ADAPTER_FILE) for c in (a, b))
        assert ma == mb and ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)

    changed = config(base, data, tmp_path / "broken", *extra, "batch_size=2")
    with pytest.raises(SFTError, match="cannot resume with a different batch_size"):
        finetune(changed, resume=True, progress=False)


def test_mask_prompt_false_trains_on_every_token_and_keeps_validation_masked(base: Path, data: Path,
                                                                              tmp_path: Path) -> None:
    masked = sft._prepare_data(config(base, data, tmp_path / "a"), template_of(base), 64, torch.device("cpu"))
    unmasked = sft._prepare_data(config(base, data, tmp_path / "b", "mask_prompt=false"), template_of(base), 64,
                                 torch.device("cpu"))
    for a, b in zip(masked.fitted["train"].examples, unmasked.fitted["train"].examples):
        assert a.ids == b.ids and b.targets == len(b) - 1 > a.targets
    assert unmasked.fitted["val"].examples == masked.fitted["val"].examples  # comparable validation losses
    assert masked.digest != unmasked.digest  # a resume with the other setting is refused


def template_of(base: Path) -> ChatTemplate:
    return ChatTemplate.for_tokenizer(load_for_inference(base)[1])


def test_lora_trains_only_the_adapters_and_the_chat_rows(base: Path, data: Path, tmp_path: Path) -> None:
    result = finetune(config(base, data, tmp_path / "lora", "lora_rank=4", "weight_decay=0.1"), progress=False)
    assert result.trainable < result.total / 5
    ckpt = latest_checkpoint(result.run)
    adapter, weights = ckpt / ADAPTER_FILE, ckpt / "model.safetensors"
    assert adapter.stat().st_size < weights.stat().st_size / 5

    # The base, resized as the run resized it: every weight the adapters do not touch is unchanged,
    # and the adapted ones are exactly W + (alpha / r) B A, so merging the file onto the base gives
    # the checkpoint's weights; the chat tokens' rows are the only other change.
    model, tok = load_for_inference(base)
    old_vocab = tok.vocab_size
    resize_vocab(model, old_vocab + len(CHAT_TOKENS))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    saved = load_file(str(weights))
    load_adapter(adapter, model)
    merge_lora(model)
    adapted = {k for k in start if any(f".{t}." in k for t in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                                  "up_proj", "down_proj"))}
    assert adapted
    for key, value in model.state_dict().items():
        if key in ("token_embedding.weight", "lm_head.weight"):
            assert torch.equal(saved[key][:old_vocab], start[key][:old_vocab])  # the old rows: bit for bit
            assert not torch.equal(saved[key][old_vocab:], start[key][old_vocab:])  # the chat rows trained
        elif key in adapted:
            torch.testing.assert_close(saved[key], value, atol=0, rtol=0)
            assert not torch.equal(saved[key], start[key])
        else:
            assert torch.equal(saved[key], start[key]), key


def test_truncate_keeps_long_prompts_and_resume_refuses_changed_data(base: Path, data: Path, tmp_path: Path) -> None:
    mine = tmp_path / "data.jsonl"
    mine.write_text(data.read_text())
    cfg = config(base, mine, tmp_path / "run", "too_long=truncate", "max_steps=2", "eval_every=0", "samples=0")
    result = finetune(cfg, progress=False)
    assert sum(c["truncated"] for c in result.fit.values()) == 2  # the two long prompts, cut from the left
    assert sum(c["dropped_too_long"] for c in result.fit.values()) == 0
    lines = mine.read_text().splitlines()
    mine.write_text("\n".join([lines[1], lines[0], *lines[2:]]) + "\n")  # the same pairs, in another order
    with pytest.raises(SFTError, match="changed since the checkpoint"):
        finetune(apply_overrides(cfg, ["max_steps=4"]), resume=True, progress=False)


# --------------------------------------------------------------------------------------------
# Bad inputs


def test_bad_inputs_name_the_problem_and_the_fix(base: Path, data: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no such run or checkpoint folder"):
        finetune(config(tmp_path / "missing", data, tmp_path / "a"), progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(data.read_text().splitlines()[0] + "\n" + data.read_text().splitlines()[1] + "\n{\"instruction\": \n")
    with pytest.raises(DataError, match=r"bad.jsonl:3: invalid JSON"):
        finetune(config(base, bad, tmp_path / "b"), progress=False)
    with pytest.raises(SFTError, match=r"seq_len \(128\) exceeds the base model's context \(max_seq_len=64\)"):
        finetune(config(base, data, tmp_path / "c", "seq_len=128"), progress=False)
    with pytest.raises(SFTError, match="lora_rank=64 is larger than the smallest adapted layer"):
        finetune(config(base, data, tmp_path / "d", "lora_rank=64"), progress=False)
    with pytest.raises(SFTError, match="no training example fits seq_len=8"):
        finetune(config(base, data, tmp_path / "e", "seq_len=8"), progress=False)
    with pytest.raises(SFTError, match="inside out="):
        finetune(config(base, data, base.parent), progress=False)
    assert not any(p.exists() for p in (tmp_path / n for n in "abcde"))  # nothing was written
    with pytest.raises(TrainError, match="nothing to resume"):
        finetune(config(base, data, tmp_path / "f"), resume=True, progress=False)


def test_the_command_line_runs_and_reports_bad_arguments(base: Path, data: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "cli"
    argv = ["sft", "--from", str(base), "--data", str(data), "--lora-rank", "2", "--set", f"out={out}",
            "--set", "max_steps=3", "--set", "val_fraction=0.2", "--set", "batch_size=4", "--set", "eval_every=0"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "fine-tuned" in printed and "LoRA rank 2" in printed and "dropped as too long" in printed
    assert (latest_checkpoint(out) / ADAPTER_FILE).is_file()
    assert cli_main(["sample", "--checkpoint", str(out), "--prompt", "def", "--max-new-tokens", "3", "--seed", "0"]) == 0
    capsys.readouterr()
    for bad, message in [(["--lora-rank", "x"], "invalid int value"),
                         (["--set", "too_long=cut"], "too_long must be"),
                         (["--force", "--set", "seq_len=999"], "exceeds the base model's context"),
                         ([], "exists; pass --resume to continue that run, --force to replace it"),
                         (["--resume", "--set", "batch_size=2"], "cannot resume with a different batch_size")]:
        code = cli_main([*argv, *bad])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (bad, err)
    assert (latest_checkpoint(out) / ADAPTER_FILE).is_file()  # --force replaced nothing: the run failed its checks first

    # minillm chat on the fine-tuned checkpoint, driven through a pipe: one answer (and a blank line) per request.
    monkeypatch.setattr("sys.stdin", io.StringIO("Reverse: a b c\n/reset\nReverse: d e f\n/quit\n"))
    assert cli_main(["chat", "--checkpoint", str(out), "--temperature", "0", "--max-new-tokens", "6"]) == 0
    printed = capsys.readouterr().out
    assert printed.endswith("\n\n") and printed.count("\n\n") >= 2  # two answers, each followed by a blank line
    assert cli_main(["chat", "--checkpoint", str(base)]) == 2  # a pretrained model has no chat tokens
    assert "not a fine-tuned model" in capsys.readouterr().err
    assert cli_main(["chat", "--checkpoint", str(out), "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err

    # minillm eval: the held-out requests answered and run; a pretrained checkpoint is evaluated as SFT starts.
    report = tmp_path / "eval.json"
    assert cli_main(["eval", "--checkpoint", str(out), "--split", "val", "--max-new-tokens", "6",
                     "--json", str(report)]) == 0
    printed = capsys.readouterr().out
    assert "held-out requests (val split of" in printed and "functions" in printed and "doctests pass" in printed
    counts = json.loads(report.read_text())
    val = split_pairs(load_jsonl(data), 0.2, 0.05)["val"]  # the run's own fractions, read from its config
    assert counts["functions"]["n"] + counts["skipped"] == len(val) > 0
    assert cli_main(["eval", "--checkpoint", str(base), "--data", str(data), "--limit", "3",
                     "--max-new-tokens", "4"]) == 0
    assert "a pretrained checkpoint" in capsys.readouterr().out
    assert cli_main(["eval", "--checkpoint", str(out), "--data", str(tmp_path / "missing.jsonl")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err
