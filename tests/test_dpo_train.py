"""minillm.dpo's pipeline: answers graded by running them, pairs of the best and the worst, DPO
through the training loop (exact resume, LoRA, the reference checked), the commands, and a short end
to end run that raises the preference accuracy without lowering the held-out parse rate.

A tiny base is pretrained once per module (test_train's corpus and settings, a 64-token context)
and fine-tuned on made-up requests whose answers are one Python call, `print(w1, w2)`: short enough
for a model of a few thousand parameters to learn a little of, and checkable by `ast.parse`.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
import time
from pathlib import Path

import pytest
import torch
from test_train import TINY, docs  # noqa: F401  (docs is a fixture)

from minillm import dpo, sft
from minillm.cli import main as cli_main
from minillm.codeeval import evaluate_model, load_for_eval
from minillm.dpo import (
    GRADES,
    DPOConfig,
    DPOError,
    PairBatches,
    PreferencePair,
    encode_pairs,
    generate_pairs,
    grade_of,
    kl_drift,
    load_dpo_config,
    load_pairs,
    make_pairs,
    pair_logprobs,
    preference_tune,
    sample_answers,
    save_pairs,
)
from minillm.instructions import Conversation, Message, load_jsonl, split_pairs
from minillm.sandbox import Score
from minillm.sft import ChatTemplate, finetune, load_sft_config
from minillm.train import TrainError, config_to_toml, latest_checkpoint, load_config, load_for_inference, train

pytestmark = pytest.mark.filterwarnings("ignore:the training text ran out of pairs")
ROOT = Path(__file__).resolve().parent.parent
NAMES = "value list dict print len range self the a of to".split()  # words that are Python names
TIMING = ("tokens_per_s",)


def ask(words: list[str]) -> dict:
    return {"instruction": f"Show: {' '.join(words)}", "output": f"print({', '.join(words)})"}


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("data") / "show.jsonl"
    path.write_text("".join(json.dumps(ask([rng.choice(NAMES) for _ in range(2)])) + "\n" for _ in range(80)))
    return path


@pytest.fixture(scope="module")
def sft_run(docs: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:  # noqa: F811
    """A pretrained tiny base, then fine-tuned on the `Show:` requests: the SFT model DPO starts from."""
    root = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, [f"data={docs}", f"out={root / 'base'}", *TINY, "model.max_seq_len=64", "seq_len=64",
                             "max_steps=20", "eval_every=0", "sample_every=0", "checkpoint_every=0"])
    train(cfg, progress=False)
    sft_cfg = load_sft_config(None, [f"base={root / 'base'}", f"data={data}", f"out={root / 'sft'}",
                                     "val_fraction=0.2", "test_fraction=0.2", "batch_size=8", "max_steps=60",
                                     "lr=1e-2", "min_lr=1e-3", "warmup_steps=5", "eval_every=0", "sample_every=0",
                                     "checkpoint_every=0"])
    finetune(sft_cfg, progress=False)
    return root / "sft"


def requests_of(data: Path, split: str) -> list[Conversation]:
    return split_pairs(load_jsonl(data), 0.2, 0.2)[split]


@pytest.fixture(scope="module")
def pairs_file(sft_run: Path, data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    model, template, _ = load_for_eval(str(sft_run))
    report = generate_pairs(model, template, requests_of(data, "train"), samples=4, temperature=1.0,
                            max_new_tokens=12, seed=0)
    assert len(report.pairs) >= 16, report.table()
    return save_pairs(tmp_path_factory.mktemp("pairs") / "pairs.jsonl", report.pairs)


def config(sft_run: Path, pairs: Path, out: Path, *extra: str) -> DPOConfig:
    return load_dpo_config(None, [f"base={sft_run}", f"pairs={pairs}", f"out={out}", "batch_size=4", "max_steps=8",
                                  "lr=1e-3", "min_lr=1e-4", "warmup_steps=2", "log_every=1", "eval_every=4",
                                  "checkpoint_every=4", "val_fraction=0.25", "kl_requests=4", "kl_tokens=8",
                                  "seq_len=64", *extra])


def rows(run: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (run / "metrics.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------------------------
# Grades and pairs


def score(parses: bool, compiles: bool = False, doctests: int = 0, passed: int = 0) -> Score:
    return Score(parses, compiles, doctests, passed, "ok", "")


def test_grades_are_a_total_order_with_doctests_on_top() -> None:
    assert GRADES == ("nothing", "finished", "parses", "compiles", "passes")
    ladder = [(score(False), False), (score(False), True), (score(True), False), (score(True, True), True),
              (score(True, True, 2, 1), True), (score(True, True, 2, 2), False)]
    assert [grade_of(s, f) for s, f in ladder] == [0, 1, 2, 2 + 1, 3, 4]  # 1 of 2 doctests: still only "compiles"


RIGHT = "def median_high(data):\n    data = sorted(data)\n    return data[len(data) // 2]\n"
WRONG = "def median_high(data):\n    data = sorted(data)\n    return data[0]\n"
OTHER = "def other(data):\n    return 1\n"


def request(name: str, *, doc: str | None = None, tag: str = "") -> Conversation:
    meta = {"module": "statistics", "qualname": name, "class": "", "docstring": doc or "Do it.",
            "has_doctest": "1" if doc and ">>>" in doc else "0"}
    return Conversation((Message("user", f"Write {name}."), Message("assistant", RIGHT)), f"statistics:{name}{tag}", meta)


def test_make_pairs_pairs_the_best_with_the_worst_and_refuses_ties() -> None:
    doc = statistics.median_high.__doc__
    requests = [request("median_high", doc=doc), request("median_high", doc=doc, tag="#2"),
                request("median_high", doc=doc, tag="#3"), request("median_high", doc=doc, tag="#4")]
    answers = [
        [(WRONG, True), ("def median_high(", True), (RIGHT, True), ("  " + RIGHT, True), (OTHER, True)],
        [(OTHER, True), ("(((", False), ("x y", True)],  # parses > nothing; the finished non-parse is in between
        [(WRONG, True), (WRONG + "\n", True), ("   ", True)],  # one distinct answer (and a blank one): a tie
        [],  # the prompt did not fit
    ]
    report = make_pairs(requests, answers, workers=2, timeout=10.0)
    assert (report.requests, report.answers, report.distinct, report.blank) == (4, 11, 8, 1)
    assert (report.ties, report.skipped, len(report.pairs)) == (1, 1, 2)
    assert report.grades == {"nothing": 1, "finished": 2, "parses": 2, "compiles": 2, "passes": 1}
    first, second = report.pairs
    assert (first.chosen, first.rejected) == (RIGHT, "def median_high(")  # the first drawn of the worst grade
    assert dict(first.meta) == {"chosen_grade": "passes", "rejected_grade": "finished", "distinct": 4}
    assert (second.chosen, second.rejected, second.meta["rejected_grade"]) == (OTHER, "(((", "nothing")
    assert first.source == "statistics:median_high" and first.prompt == requests[0].prompt
    table = report.table()
    assert "passes > finished" in table and max(map(len, table.splitlines())) <= 88
    assert report.to_dict()["pairs"] == 2


def test_a_sample_that_hangs_or_writes_files_is_contained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    hangs = "def median_high(data):\n    return 1\nwhile True:\n    pass\n"
    writes = f"open({str(victim)!r}, 'w').write('gone')\nopen('dropped.txt', 'w').write('x')\ndef median_high(d):\n    return 1\n"
    start = time.perf_counter()
    report = make_pairs([request("median_high")], [[(hangs, True), (writes, True), (OTHER, True)]],
                        workers=2, timeout=2.0)
    assert time.perf_counter() - start < 20
    assert report.grades["compiles"] == 0 and report.grades["parses"] == 3  # neither definition ran to its end
    assert report.ties == 1 and not report.pairs
    assert victim.read_text() == "keep me" and sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


def test_sampling_draws_k_answers_per_request_and_repeats_with_its_seed(sft_run: Path, data: Path) -> None:
    model, template, _ = load_for_eval(str(sft_run))
    requests = requests_of(data, "train")[:5]
    a = sample_answers(model, template, requests, samples=3, temperature=1.0, max_new_tokens=12, seed=7)
    b = sample_answers(model, template, requests, samples=3, temperature=1.0, max_new_tokens=12, seed=7)
    c = sample_answers(model, template, requests, samples=3, temperature=1.0, max_new_tokens=12, seed=8)
    assert a == b != c and [len(x) for x in a] == [3] * 5
    assert len({text for x in a for text, _ in x}) > 5  # sampled, not greedy
    with pytest.raises(DPOError, match="at least 2 answers"):
        sample_answers(model, template, requests, samples=1)
    with pytest.raises(DPOError, match="temperature above 0"):
        sample_answers(model, template, requests, temperature=0.0)


# --------------------------------------------------------------------------------------------
# Training


def test_config_round_trips_and_the_preset_loads(tmp_path: Path) -> None:
    cfg = load_dpo_config(None, ["base=runs/sft-tiny", "pairs=p.jsonl", "beta=0.3", "lora_rank=4"])
    (tmp_path / "c.toml").write_text(config_to_toml(cfg))
    assert load_dpo_config(tmp_path / "c.toml") == cfg
    preset = load_dpo_config(ROOT / "configs" / "dpo-tiny.toml")
    assert preset.base == "runs/sft-tiny" and preset.out == "runs/dpo-tiny" and preset.beta == 0.1


@pytest.mark.parametrize("override, message", [
    ("beta=0", "beta must be a positive number"), ("beta=nan", "beta must be of type float"),
    ("val_fraction=1", r"val_fraction must be in \[0, 1\)"), ("too_long=cut", "too_long must be"),
    ("batch_size=0", "batch_size must be at least 1"), ("lora_alpha=8", "lora_alpha=8 needs lora_rank"),
    ("epochs=0", "epochs and max_steps are both 0"),
])
def test_bad_settings_name_the_field(override: str, message: str) -> None:
    with pytest.raises(TrainError, match=message):  # DPOError is one; --set parsing errors are TrainErrors
        load_dpo_config(None, [override])


def test_dpo_raises_the_accuracy_logs_margins_and_saves_a_chat_checkpoint(sft_run: Path, pairs_file: Path,
                                                                           data: Path, tmp_path: Path) -> None:
    result = preference_tune(config(sft_run, pairs_file, tmp_path / "dpo"), progress=False)
    assert result.step == 8 and result.pairs["train"] + result.pairs["val"] == result.pairs["kept"] > 0
    assert result.train["accuracy"] >= 0.75 and result.train["margin"] > 0 and result.train["loss"] < math.log(2)
    assert result.kl is not None and math.isfinite(result.kl) and result.kl_per_token is not None
    metrics = rows(result.run)
    first = next(r for r in metrics if r.get("kind") == "eval")
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(math.log(2), abs=1e-5)  # policy = reference
    assert [r["step"] for r in metrics if "accuracy" in r] == list(range(1, 9))
    final = metrics[-1]
    assert final["kind"] == "final" and final["train_accuracy"] == result.train["accuracy"] and "kl" in final
    # A checkpoint that `minillm eval` and `chat` read, with the SFT run's held-out requests.
    model, template, settings = load_for_eval(str(result.run))
    assert settings["data"] == str(data) and settings["test_fraction"] == 0.2  # the SFT run's, through its base
    assert model.cfg.vocab_size == template.tokenizer.vocab_size
    assert sorted(p.name for p in (result.run / "checkpoints").iterdir()) == ["step_0000004", "step_0000008"]


def test_reference_logprobs_are_computed_once_and_the_policy_starts_at_the_reference(sft_run: Path,
                                                                                    pairs_file: Path) -> None:
    model, tok = load_for_inference(sft_run)
    template = ChatTemplate(tok)
    enc = encode_pairs(template, load_pairs(pairs_file), 64)
    ref = pair_logprobs(model, enc, batch_size=3)
    assert ref.shape == (len(enc), 2) and ref.dtype == torch.float32 and (ref < 0).all()
    alone = pair_logprobs(model, encode_pairs(template, enc.pairs[:1], 64))
    torch.testing.assert_close(ref[:1], alone, atol=1e-5, rtol=0)  # batching and padding change nothing
    batches = PairBatches(enc, ref, 4, shuffle=False)
    pb = next(iter(batches))
    assert pb.batch.x.shape[0] == 8 and torch.equal(pb.ref, torch.cat([ref[:4, 0], ref[:4, 1]]))
    summary = dpo.pair_metrics(model, batches, 0.1)
    # Equal up to float rounding: other batches pad to other lengths, which reorders some sums.
    assert summary["loss"] == pytest.approx(math.log(2), abs=1e-6) and abs(summary["margin"]) < 1e-6


def test_kl_drift_is_zero_against_itself_and_positive_after_a_change(sft_run: Path, data: Path) -> None:
    model, tok = load_for_inference(sft_run)
    template = ChatTemplate(tok)
    requests = requests_of(data, "val")[:6]
    same, per_token = kl_drift(model, model, template, requests, max_new_tokens=8)
    assert same == 0 and per_token == 0
    moved, _ = load_for_inference(sft_run)
    with torch.no_grad():
        moved.lm_head.weight.add_(0.05 * torch.randn_like(moved.lm_head.weight))
    kl, kl_tok = kl_drift(moved, model, template, requests, samples=8, max_new_tokens=8)
    assert kl > 0 and 0 < kl_tok < kl


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_resume_is_bit_exact(sft_run: Path, pairs_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             lora_rank: int) -> None:
    extra = (f"lora_rank={lora_rank}", "epochs=3", "max_steps=0", "batch_size=8", "checkpoint_every=3", "eval_every=3",
             "kl_requests=0")
    whole = preference_tune(config(sft_run, pairs_file, tmp_path / "whole", *extra), progress=False)
    assert whole.max_steps > 8
    cfg = config(sft_run, pairs_file, tmp_path / "broken", *extra)
    real_step = sft.train_step  # the fine-tuning loop (sft.run_steps) takes its steps from there

    def crash_at_step_8(*args, **kwargs):
        if kwargs["step"] == 8:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(sft, "train_step", crash_at_step_8)
    with pytest.raises(KeyboardInterrupt):
        preference_tune(cfg, progress=False)
    monkeypatch.setattr(sft, "train_step", real_step)
    assert latest_checkpoint(cfg.out).name == "step_0000006"
    resumed = preference_tune(cfg, resume=True, progress=False)
    assert resumed.step == whole.step and resumed.train == whole.train and resumed.val == whole.val
    assert rows(Path(cfg.out)) == rows(whole.run)
    a, b = (latest_checkpoint(r) for r in (whole.run, cfg.out))
    assert (a / "model.safetensors").read_bytes() == (b / "model.safetensors").read_bytes()
    if lora_rank:
        assert whole.trainable < whole.total / 5 and (a / "adapter.safetensors").is_file()
    with pytest.raises(DPOError, match="cannot resume with a different beta"):
        preference_tune(config(sft_run, pairs_file, tmp_path / "broken", *extra, "beta=0.5"), resume=True,
                        progress=False)


def test_bad_inputs_name_the_problem_and_the_fix(sft_run: Path, pairs_file: Path, tmp_path: Path) -> None:
    base = sft_run.parent / "base"
    with pytest.raises(DPOError, match="no chat tokens: it is a pretrained model"):
        preference_tune(config(base, pairs_file, tmp_path / "a"), progress=False)
    with pytest.raises(DPOError, match="no pairs: give a JSONL file"):
        preference_tune(DPOConfig(base=str(sft_run), out=str(tmp_path / "b")), progress=False)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(pairs_file.read_text().splitlines()[0] + '\n{"prompt": "x", "chosen": "a"}\n')
    with pytest.raises(DPOError, match=r"bad.jsonl:2: missing 'rejected'"):
        preference_tune(config(sft_run, bad, tmp_path / "c"), progress=False)
    same = tmp_path / "same.jsonl"
    same.write_text(json.dumps({"prompt": "Show: a b", "chosen": "print(a, b)", "rejected": " print(a, b) "}) + "\n")
    with pytest.raises(DPOError, match=r"same.jsonl:1: .*differ"):
        preference_tune(config(sft_run, same, tmp_path / "d"), progress=False)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"prompt": "Show: " + "value " * 200, "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(DPOError, match="no training pair left"):
        preference_tune(config(sft_run, long, tmp_path / "e"), progress=False)
    with pytest.raises(DPOError, match="leaves no room for a response"):
        preference_tune(config(sft_run, long, tmp_path / "e", "too_long=error"), progress=False)
    with pytest.raises(DPOError, match="inside out="):
        preference_tune(config(sft_run, pairs_file, sft_run.parent), progress=False)
    assert not any((tmp_path / n).exists() for n in "abcde")  # nothing was written


@pytest.mark.parametrize("change, message", [
    ("d_model", r"does not match the policy .*: their model configs differ in d_model \(32 vs 48\)"),
    ("tokenizer", "has another tokenizer than the policy"),
])
def test_a_reference_of_another_architecture_or_tokenizer_is_refused(sft_run: Path, pairs_file: Path, data: Path,
                                                                     docs: Path, tmp_path: Path,  # noqa: F811
                                                                     change: str, message: str) -> None:
    if change == "d_model":  # the base's own tokenizer, a wider model
        extra = ["model.d_model=48", f"tokenizer={latest_checkpoint(sft_run.parent / 'base') / 'tokenizer.bpe'}"]
    else:  # the same architecture, a tokenizer trained on other text (same size, other merges)
        docs = tmp_path / "docs"
        docs.mkdir()
        rng = random.Random(1)
        for i in range(30):
            (docs / f"doc{i:02d}.txt").write_text(" ".join(f"{rng.choice(NAMES)}({rng.choice(NAMES)})" for _ in range(200)))
        extra = []
    cfg = load_config(None, [f"data={docs}", f"out={tmp_path / 'base'}", *TINY, "model.max_seq_len=64", "seq_len=64",
                             "max_steps=2", "eval_every=0", "sample_every=0", "checkpoint_every=0", *extra])
    train(cfg, progress=False)
    finetune(load_sft_config(None, [f"base={tmp_path / 'base'}", f"data={data}", f"out={tmp_path / 'sft'}",
                                    "max_steps=1", "eval_every=0", "sample_every=0", "checkpoint_every=0"]),
             progress=False)
    with pytest.raises(DPOError, match=message):
        preference_tune(config(sft_run, pairs_file, tmp_path / "dpo", f"reference={tmp_path / 'sft'}"), progress=False)
    assert not (tmp_path / "dpo").exists()


# --------------------------------------------------------------------------------------------
# End to end, and the commands


def test_end_to_end_dpo_raises_preference_accuracy_and_keeps_the_parse_rate(sft_run: Path, data: Path,
                                                                             pairs_file: Path, tmp_path: Path) -> None:
    """The issue's test: on its own training pairs the policy comes to prefer the chosen answers, and
    the held-out parse rate does not fall by more than 10 points (a stated margin: 14 held-out
    requests, so one answer is 7 points).

    The preference accuracy is DPO's: the share of pairs whose implicit reward margin is positive,
    which starts with no preference at all (the policy is the reference: every margin 0, the loss ln 2).
    The raw ranking (log π(chosen) > log π(rejected)) is high from the start here, because the chosen
    answers are the short ones (length bias, chapter 09): it must not fall."""
    held_out = requests_of(data, "test")
    model, template, _ = load_for_eval(str(sft_run))
    before = evaluate_model(model, template, held_out, max_new_tokens=12).functions.rate("parses")
    enc = encode_pairs(template, load_pairs(pairs_file), 64)
    raw_before = pair_logprobs(model, enc)
    result = preference_tune(config(sft_run, pairs_file, tmp_path / "e2e", "max_steps=0", "epochs=4", "lr=1e-4",
                                    "min_lr=1e-5"), progress=False)
    start = next(r for r in rows(result.run) if r.get("kind") == "eval")
    assert start["val_loss"] == pytest.approx(math.log(2), abs=1e-5)
    assert result.train["accuracy"] >= 0.9 and result.train["margin"] > 0.05
    tuned, _, _ = load_for_eval(str(result.run))
    raw_after = pair_logprobs(tuned, enc)
    gap_before = (raw_before[:, 0] - raw_before[:, 1]).mean().item()
    gap_after = (raw_after[:, 0] - raw_after[:, 1]).mean().item()
    assert gap_after > gap_before  # chosen pulled up against rejected, in the model's own log-probs
    acc_before = (raw_before[:, 0] > raw_before[:, 1]).float().mean().item()
    acc_after = (raw_after[:, 0] > raw_after[:, 1]).float().mean().item()
    assert acc_after >= acc_before
    after = evaluate_model(tuned, template, held_out, max_new_tokens=12).functions.rate("parses")
    print(f"DPO accuracy {result.train['accuracy']:.2f}, raw ranking {acc_before:.2f} -> {acc_after:.2f}, "
          f"held-out parse rate {before:.2f} -> {after:.2f}")
    assert after >= before - 0.10


def test_the_commands_run_and_report_bad_arguments(sft_run: Path, data: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    pairs = tmp_path / "pairs.jsonl"
    assert cli_main(["dpo-pairs", "--from", str(sft_run), "--out", str(pairs), "--limit", "12", "--samples", "3",
                     "--temperature", "1.0", "--max-new-tokens", "8"]) == 0
    printed = capsys.readouterr().out
    assert "sampling 3 answers to each of 12 training requests" in printed and f"pairs to {pairs}" in printed
    assert len(load_pairs(pairs)) > 0
    assert cli_main(["dpo-pairs", "--from", str(sft_run), "--out", str(pairs)]) == 2
    err = capsys.readouterr().err
    assert "exists" in err and err.count("\n") == 1
    base = sft_run.parent / "base"
    assert cli_main(["dpo-pairs", "--from", str(base), "--out", str(tmp_path / "x.jsonl")]) == 2
    assert "pretrained model" in capsys.readouterr().err
    assert not (tmp_path / "x.jsonl").exists()

    out = tmp_path / "dpo"
    argv = ["dpo", "--from", str(sft_run), "--pairs", str(pairs), "--beta", "0.2", "--set", f"out={out}",
            "--set", "max_steps=2", "--set", "batch_size=2", "--set", "kl_requests=2", "--set", "kl_tokens=4"]
    assert cli_main(argv) == 0
    printed = capsys.readouterr().out
    assert "preference-tuned" in printed and "beta 0.2" in printed and "KL from the reference" in printed
    assert cli_main(["eval", "--checkpoint", str(sft_run), "--checkpoint", str(out), "--max-new-tokens", "8",
                     "--show", "0", "--json", str(tmp_path / "rates.json")]) == 0
    printed = capsys.readouterr().out
    assert printed.count("held-out function requests") == 1 and str(out) in printed.splitlines()[-1]
    assert set(json.loads((tmp_path / "rates.json").read_text())) == {str(sft_run), str(out)}
    for bad, message in [(["--beta", "-1"], "beta must be a positive number"),
                         ([], "exists; pass --resume to continue that run, --force to replace it"),
                         (["--resume", "--set", "batch_size=3"], "cannot resume with a different batch_size")]:
        code = cli_main([*argv, *bad])
        err = capsys.readouterr().err
        assert code == 2 and message in err and err.count("\n") == 1, (bad, err)
    assert os.path.isdir(out)
