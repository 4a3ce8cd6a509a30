"""Direct preference optimization (DPO): learn from pairs of a better and a worse answer.

A preference pair is a prompt with two responses, `chosen` preferred to `rejected`. DPO (Rafailov
et al., 2023) trains the policy directly on such pairs, with no reward model: the policy's implicit
reward for a response is β times how much more likely the policy makes it than a frozen reference
(the SFT model), r = β (log π(y|x) - log π_ref(y|x)), and the loss is a logistic loss on the
difference of the two rewards:

    loss = -log σ( β [(log π(y_c|x) - log π_ref(y_c|x)) - (log π(y_r|x) - log π_ref(y_r|x))] )

    pairs = load_pairs("pairs.jsonl")                   every bad line: a DPOError naming FILE:LINE
    enc = encode_pairs(template, pairs, seq_len)        (chosen, rejected) Examples; drops counted
    batch = pair_batch(enc.chosen, enc.rejected, pad)   chosen rows, then rejected rows: one forward
    logps = sequence_logprobs(model, batch)             (2B,) summed over the responses' tokens only
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)            loss, rewards, margins, accuracy

The log-probabilities count the response's tokens and its closing <|end|>, as SFT's loss does; the
prompt and the padding count nothing.

Pairs a program verifies, with no human labels (`minillm dpo-pairs`):

    report = generate_pairs(model, template, requests, samples=4)   sample, run in the sandbox, grade
    save_pairs("pairs.jsonl", report.pairs); print(report.table())  best-graded vs worst, ties refused

An answer's grade is a total order, GRADES: passes its doctests > defines the requested function >
parses > ended with <|end|> > nothing. Training runs through the fine-tuning loop of chapter 08
(`sft.run_steps`: the schedule, checkpoints, exact resume, LoRA), with the reference's log-probs
computed once, before the first step (`minillm dpo`):

    result = preference_tune(load_dpo_config("configs/dpo-tiny.toml"))  accuracy, margins, KL drift
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.codeeval import answer_ids, answer_requests, code_of, score_answers
from minillm.files import atomic_write, check_output
from minillm.instructions import ROLES, Conversation, DataError, Message, Meta, _unit
from minillm.model import LLM
from minillm.sandbox import Score
from minillm.sft import (
    IGNORE,
    Batch,
    ChatTemplate,
    Example,
    ExampleBatches,
    SFTError,
    _base_folder,
    _plain_copy,
    _prepare_model,
    check_lora_settings,
    pad_batch,
    run_steps,
    save_run_checkpoint,
)
from minillm.tokenizer import Tokenizer
from minillm.train import (
    RunConfig,
    RunLog,
    SingleDevice,
    TrainError,
    _open_run,
    _read_state,
    autocast,
    build_optimizer,
    check_config,
    config_to_toml,
    load_checkpoint,
    load_config,
    load_for_inference,
    resolve_device,
    resolve_dtype,
)

__all__ = [
    "DPOError", "PairMeta", "PreferencePair", "load_pairs", "save_pairs", "EncodedPairs", "encode_pairs",
    "pair_batch", "sequence_logprobs", "DPOOutput", "dpo_loss", "GRADES", "grade_of", "sample_answers", "PairReport",
    "make_pairs", "generate_pairs", "PairBatch", "PairBatches", "DPOLoss", "pair_logprobs", "pair_metrics", "kl_drift",
    "DPOConfig", "load_dpo_config", "DPOResult", "preference_tune",
]


class DPOError(SFTError, DataError):
    """Preference data or settings that cannot work; the message says what to change.

    Both an `SFTError` (so a TrainError: what `minillm sft`-style commands already catch for bad
    settings) and an instructions `DataError` (what code reading instruction files catches): a pair
    file is instruction data and a DPO run is a fine-tuning run, so either `except` must see it.
    """


MetaValue = str | int | float | bool


class PairMeta(Meta):
    """A read-only, hashable mapping of strings to strings or numbers: a pair's scores and provenance.

    `instructions.Meta` with numbers allowed (a score is a number). Non-finite floats are refused:
    JSON has no NaN, and NaN != NaN would break the save/load round trip.
    """

    __slots__ = ()

    @classmethod
    def _check(cls, d: dict) -> None:
        for k, v in d.items():
            if not isinstance(k, str):
                raise DPOError(f"meta keys must be strings, got {k!r}; convert the key with str()")
            if not isinstance(v, (str, int, float)):  # bool is an int
                raise DPOError(f"meta[{k!r}] is {type(v).__name__}; a meta value must be a string or a number")
            if isinstance(v, float) and not math.isfinite(v):
                raise DPOError(f"meta[{k!r}] is {v}; a meta number must be finite (JSON has no NaN or infinity)")


@dataclass(frozen=True)
class PreferencePair:
    """A prompt (messages ending with the user's request) and two responses, `chosen` preferred.

    `prompt` may be given as a string (one user message). Checked on construction: the prompt has a
    user turn and ends with one, a system message comes only first, both responses are non-blank
    strings, and they differ (after stripping whitespace: a pair of equal answers teaches nothing,
    and its loss would be a constant ln 2).
    """

    prompt: tuple[Message, ...]
    chosen: str
    rejected: str
    source: str = ""
    meta: Mapping[str, MetaValue] = field(default_factory=PairMeta)

    def __post_init__(self) -> None:
        where = f"{self.source}: " if isinstance(self.source, str) and self.source else ""
        if not isinstance(self.source, str):
            raise DPOError(f"source must be a string, got {type(self.source).__name__}")
        prompt = self.prompt
        if isinstance(prompt, str):
            prompt = (Message("user", prompt),)
        if isinstance(prompt, bytes) or not isinstance(prompt, Iterable):
            raise DPOError(f"{where}the prompt must be a string or a sequence of Message, got {type(prompt).__name__}")
        prompt = tuple(prompt)
        for i, m in enumerate(prompt):
            if not isinstance(m, Message):
                raise DPOError(f"{where}prompt message {i} is {type(m).__name__}, not a Message; "
                               "build it with Message(role, content)")
        if not any(m.role == "user" for m in prompt):
            raise DPOError(f"{where}the prompt has no user turn; give the user's request that the responses answer")
        for i, m in enumerate(prompt):
            if m.role == "system" and i != 0:
                raise DPOError(f"{where}prompt message {i} is a system message; a system message may only come first")
        if prompt[-1].role != "user":
            raise DPOError(f"{where}the prompt ends with the {prompt[-1].role}'s turn; it must end with the user's "
                           "request, which the chosen and rejected responses answer")
        for name in ("chosen", "rejected"):
            value = getattr(self, name)
            if not isinstance(value, str):
                raise DPOError(f"{where}the {name} response is {type(value).__name__}; it must be a string")
            if not value.strip():
                raise DPOError(f"{where}the {name} response is empty; give a response, or drop the pair")
        if self.chosen.strip() == self.rejected.strip():
            raise DPOError(f"{where}the chosen and rejected responses are identical (after stripping whitespace); "
                           "a pair must prefer one response to a different one: drop the pair")
        object.__setattr__(self, "prompt", prompt)
        object.__setattr__(self, "meta", self.meta if isinstance(self.meta, PairMeta) else PairMeta(self.meta))


# --------------------------------------------------------------------------------------------
# JSON Lines


def _parse_pair(record: object, where: str, default_source: str) -> PreferencePair:
    if not isinstance(record, dict):
        raise DPOError(f"{where}: a line must be a JSON object, got {type(record).__name__}; write "
                       '{"prompt": ..., "chosen": ..., "rejected": ...} on each line')
    missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
    if missing:
        raise DPOError(f"{where}: missing {', '.join(repr(k) for k in missing)}; every line needs \"prompt\", "
                       f"\"chosen\" and \"rejected\" (found keys {sorted(record)})")
    prompt = record["prompt"]
    if isinstance(prompt, str):
        messages: tuple[Message, ...] | str = prompt
    elif isinstance(prompt, list) and prompt:
        turns = []
        for i, m in enumerate(prompt):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise DPOError(f"{where}: prompt message {i} must be an object with a string \"role\" and a string "
                               "\"content\"")
            if m["role"] not in ROLES:
                raise DPOError(f"{where}: prompt message {i} has the unknown role {m['role']!r}; use one of "
                               f"{', '.join(ROLES)}")
            turns.append(Message(m["role"], m["content"]))
        messages = tuple(turns)
    else:
        raise DPOError(f"{where}: \"prompt\" is {type(prompt).__name__ if prompt != [] else 'an empty list'}; give a "
                       "string (the user's request) or a non-empty list of {\"role\", \"content\"} objects")
    for key in ("chosen", "rejected"):
        if not isinstance(record[key], str):
            raise DPOError(f"{where}: {key!r} is {type(record[key]).__name__}, expected a string (the response's text)")
    source = record.get("source", default_source)
    if not isinstance(source, str):
        raise DPOError(f"{where}: \"source\" is {type(source).__name__}, expected a string")
    meta = record.get("meta", {})
    if not isinstance(meta, dict):
        raise DPOError(f"{where}: \"meta\" is {type(meta).__name__}, expected an object of strings and numbers")
    try:
        return PreferencePair(messages, record["chosen"], record["rejected"], source, PairMeta(meta))
    except DataError as e:  # the pair's own checks (DPOError is a DataError): reported at the line
        msg = str(e).removeprefix(f"{source}: ")
        raise DPOError(f"{where}: {msg}") from None


def load_pairs(path: str | os.PathLike[str]) -> list[PreferencePair]:
    """Read preference pairs from a JSON Lines file, one per line, blank lines skipped.

    Each line is ``{"prompt": str or [{"role", "content"}, ...], "chosen": str, "rejected": str}``
    with an optional "meta" (an object of strings and numbers) and "source" (a string; by default
    ``FILE:LINE``). Other keys are ignored. Any bad line raises `DPOError` naming FILE:LINE.
    """
    path = Path(path)
    if not path.is_file():
        raise DPOError(f"{path}: no such file" + ("; it is a folder, give a .jsonl file" if path.is_dir() else ""))
    out = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DPOError(f"{where}: not valid UTF-8 (byte {e.start}: {raw[e.start:e.start + 4]!r}); "
                               "convert the file to UTF-8") from None
            if lineno == 1:
                line = line.removeprefix("\ufeff")  # a byte-order mark, as some editors write
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise DPOError(f"{where}: invalid JSON ({e.msg} at column {e.colno}); each line must be one JSON "
                               "object (JSON Lines)") from None
            out.append(_parse_pair(record, where, f"{path.name}:{lineno}"))
    if not out:
        raise DPOError(f"{path}: no pairs in the file (it is empty or only blank lines)")
    return out


def save_pairs(path: str | os.PathLike[str], pairs: Iterable[PreferencePair], *, overwrite: bool = False) -> Path:
    """Write pairs as JSON Lines (prompt as a list of messages, with source and meta), atomically.

    `load_pairs` reads the file back into equal pairs. An existing file is kept unless `overwrite`.
    """
    out = check_output(path, overwrite=overwrite, what="pairs file")
    lines = []
    for i, p in enumerate(pairs):
        if not isinstance(p, PreferencePair):
            raise DPOError(f"item {i} is {type(p).__name__}, not a PreferencePair")
        record = {"prompt": [{"role": m.role, "content": m.content} for m in p.prompt], "chosen": p.chosen,
                  "rejected": p.rejected, "source": p.source, "meta": dict(p.meta)}
        line = json.dumps(record, ensure_ascii=False)
        try:
            line.encode("utf-8")
        except UnicodeEncodeError as e:
            raise DPOError(f"pair {i} ({p.source}) holds a lone surrogate {line[e.start:e.end]!r}, which UTF-8 "
                           "cannot encode; remove it") from None
        lines.append(line + "\n")
    return atomic_write(out, "".join(lines), overwrite=overwrite)


# --------------------------------------------------------------------------------------------
# Encoding into the context


@dataclass
class EncodedPairs:
    """The pairs that fit the context, as parallel lists, and how many did not (and why)."""

    pairs: list[PreferencePair] = field(default_factory=list)
    chosen: list[Example] = field(default_factory=list)
    rejected: list[Example] = field(default_factory=list)
    prompt_too_long: int = 0  # the prompt alone fills the context
    response_too_long: int = 0  # the prompt fits, but the chosen or the rejected response does not

    def __len__(self) -> int:
        return len(self.pairs)

    def report(self) -> str:
        return (f"{len(self.pairs)} pairs kept, {self.prompt_too_long} dropped with a prompt that fills the context, "
                f"{self.response_too_long} dropped with a response that does not fit")


def _response_example(template: ChatTemplate, prompt_ids: list[int], pair: PreferencePair, text: str) -> Example:
    ex = template.encode(pair.prompt + (Message("assistant", text),), source=pair.source)
    n = len(prompt_ids)
    assert list(ex.ids[:n]) == prompt_ids, "the template renders a prompt as the start of its conversation"
    # Only the final response counts: an earlier assistant turn of the prompt is context here, not
    # something this pair prefers (encode marks every assistant turn, as SFT learns them all).
    mask = [False] * n + list(ex.mask[n:])
    # The newline after <|end|> is never a target, and a position that predicts nothing changes no
    # log-prob (causal attention): leave it out, so a response needs one position less.
    end = max(i for i, m in enumerate(mask) if m) + 1
    return Example(ex.ids[:end], tuple(mask[:end]), pair.source)


def encode_pairs(template: ChatTemplate, pairs: Iterable[PreferencePair], seq_len: int,
                 too_long: Literal["drop", "error"] = "drop") -> EncodedPairs:
    """Each pair as (chosen, rejected) Examples of at most seq_len inputs; masks on the response only.

    A response is never truncated (a cut response is a different response, and the preference was
    about the whole one): a pair that does not fit is dropped and counted with `drop`, or raises a
    DPOError naming its source and sizes with `error`.
    """
    if too_long not in ("drop", "error"):
        raise DPOError(f"unknown policy too_long={too_long!r} for pairs longer than the context; use 'drop' or 'error'")
    if seq_len < 2:
        raise DPOError(f"seq_len={seq_len} is too short for a pair; use at least a few dozen tokens")
    out = EncodedPairs()
    for pair in pairs:
        if not isinstance(pair, PreferencePair):
            raise DPOError(f"expected a PreferencePair, got {type(pair).__name__}; read pairs with load_pairs")
        where = pair.source or "a pair"
        try:
            prompt_ids = template.prompt(pair.prompt)
            if len(prompt_ids) >= seq_len:  # not even the response's first token has a position left
                if too_long == "error":
                    raise DPOError(f"{where}: the prompt has {len(prompt_ids)} tokens and the context holds seq_len="
                                   f"{seq_len}, which leaves no room for a response; shorten the prompt, raise seq_len "
                                   "or use too_long='drop'")
                out.prompt_too_long += 1
                continue
            chosen = _response_example(template, prompt_ids, pair, pair.chosen)
            rejected = _response_example(template, prompt_ids, pair, pair.rejected)
        except DPOError:
            raise
        except SFTError as e:  # a chat token inside a message: the template's message names the source
            raise DPOError(str(e)) from None
        longest = max(len(chosen), len(rejected)) - 1  # inputs: the last id is a target only
        if longest > seq_len:
            if too_long == "error":
                which = "chosen" if len(chosen) >= len(rejected) else "rejected"
                raise DPOError(f"{where}: the prompt ({len(prompt_ids)} tokens) and the {which} response need "
                               f"{longest} positions, more than the context (seq_len={seq_len}); responses are never "
                               "truncated: raise seq_len, or use too_long='drop'")
            out.response_too_long += 1
            continue
        out.pairs.append(pair)
        out.chosen.append(chosen)
        out.rejected.append(rejected)
    return out


def pair_batch(chosen: Sequence[Example], rejected: Sequence[Example], pad_id: int = 0) -> Batch:
    """One right-padded Batch: the B chosen rows, then the B rejected rows (one forward scores both).

    Split the scores with ``logps[:B], logps[B:]`` (or ``logps.chunk(2)``).
    """
    if len(chosen) != len(rejected):
        raise DPOError(f"{len(chosen)} chosen examples but {len(rejected)} rejected ones; give them in pairs")
    if not chosen:
        raise DPOError("pair_batch needs at least one pair")
    return pad_batch([*chosen, *rejected], pad_id)


# --------------------------------------------------------------------------------------------
# The loss


def sequence_logprobs(model: nn.Module, batch: Batch) -> Tensor:
    """(B,): for each row, the sum of log p(target) over its counted targets (y != IGNORE), in float32.

    The prompt's and the padding's targets are IGNORE and add exactly 0. The log-softmax runs in
    float32 whatever the logits' dtype: a sum of a few hundred bf16 log-probs loses the small
    differences between policy and reference that DPO is made of.
    """
    if batch.x.shape != batch.y.shape:
        raise ValueError(f"inputs {tuple(batch.x.shape)} and targets {tuple(batch.y.shape)} differ in shape")
    logits = model(batch.x, positions=batch.positions, attention_mask=batch.attention_mask)[0]
    B, T, V = logits.shape
    # cross_entropy with ignore_index returns exactly 0 at IGNORE targets (no 0 * -inf = NaN).
    nll = F.cross_entropy(logits.float().reshape(B * T, V), batch.y.reshape(B * T).to(logits.device),
                          ignore_index=IGNORE, reduction="none")
    return -nll.view(B, T).sum(1)


@dataclass(frozen=True)
class DPOOutput:
    """The loss (with its graph) and, detached, what to log: per-pair rewards, margins, and accuracy."""

    loss: Tensor  # 0-dim
    chosen_rewards: Tensor  # (B,) β (log π(y_c|x) - log π_ref(y_c|x))
    rejected_rewards: Tensor  # (B,) β (log π(y_r|x) - log π_ref(y_r|x))
    margins: Tensor  # (B,) chosen_rewards - rejected_rewards
    accuracy: Tensor  # 0-dim: the share of pairs whose chosen reward is above the rejected one

    def summary(self) -> dict[str, float]:
        """Floats for a log line (means over the pairs)."""
        return {"loss": float(self.loss.detach()), "reward_chosen": float(self.chosen_rewards.mean()),
                "reward_rejected": float(self.rejected_rewards.mean()), "margin": float(self.margins.mean()),
                "accuracy": float(self.accuracy)}


def dpo_loss(policy_chosen: Tensor, policy_rejected: Tensor, ref_chosen: Tensor, ref_rejected: Tensor,
             beta: float) -> DPOOutput:
    """mean(-log σ(β [(pc - rc) - (pr - rr)])) over the pairs, from sequence log-probs of shape (B,).

    At policy = reference the loss is ln 2 and its gradient is -β/(2B) on each chosen log-prob and
    +β/(2B) on each rejected one: the first step pushes chosen up and rejected down.
    """
    if not (isinstance(beta, (int, float)) and not isinstance(beta, bool) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta={beta!r}: it must be a positive number (0.1 is usual; larger stays closer to the "
                         "reference)")
    named = {"policy_chosen": policy_chosen, "policy_rejected": policy_rejected, "ref_chosen": ref_chosen,
             "ref_rejected": ref_rejected}
    shapes = {k: tuple(v.shape) for k, v in named.items()}
    if len(set(shapes.values())) != 1:
        raise ValueError(f"the four log-prob tensors must have one shape (one entry per pair), got {shapes}")
    if policy_chosen.numel() == 0:
        raise ValueError("dpo_loss needs at least one pair (the mean over no pairs is undefined)")
    dtype = torch.promote_types(policy_chosen.dtype, torch.float32)  # at least float32; float64 stays float64
    pc, pr = policy_chosen.to(dtype), policy_rejected.to(dtype)
    # The reference is a fixed anchor: no gradient may reach it, even if the caller kept its graph.
    rc, rr = ref_chosen.detach().to(dtype), ref_rejected.detach().to(dtype)
    logits = beta * ((pc - rc) - (pr - rr))
    loss = -F.logsigmoid(logits).mean()  # logsigmoid, not log(sigmoid): stable for large |logits|
    chosen_rewards = (beta * (pc - rc)).detach()
    rejected_rewards = (beta * (pr - rr)).detach()
    margins = chosen_rewards - rejected_rewards
    return DPOOutput(loss, chosen_rewards, rejected_rewards, margins, (margins > 0).to(dtype).mean())


# --------------------------------------------------------------------------------------------
# Pairs that a program verifies

GRADES = ("nothing", "finished", "parses", "compiles", "passes")  # worst to best; a grade is an index


def grade_of(score: Score, finished: bool) -> int:
    """An answer's grade, a total order: passes its doctests (4) > the definition runs and defines the
    requested name (3) > parses (2) > ended with <|end|> (1) > nothing (0). Each level implies the
    ones below it but "finished": a cut-off answer can still parse."""
    if score.passes:
        return 4
    if score.compiles:
        return 3
    if score.parses:
        return 2
    return 1 if finished else 0


def sample_answers(model: LLM, template: ChatTemplate, requests: Sequence[Conversation], *, samples: int = 4,
                   temperature: float = 0.7, max_new_tokens: int = 128, batch_size: int = 16, seed: int = 0,
                   progress: Callable[[int], None] | None = None) -> list[list[tuple[str, bool]]]:
    """`samples` sampled answers (text, finished) to each request; [] where the prompt leaves no room.

    The copies of a request are asked side by side in the batches that `codeeval.answer_ids` forms
    (by prompt length, KV cache), from one generator seeded with `seed`: a call repeats.
    """
    if not (isinstance(samples, int) and not isinstance(samples, bool) and samples >= 2):
        raise DPOError(f"samples={samples!r}: a pair needs at least 2 answers to a request; use 2 or more (4 is usual)")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise DPOError(f"temperature={temperature!r}: sampling needs a temperature above 0 (at 0 every answer to a "
                       "request is the same greedy one); 0.7 is a good start")
    repeated = [c for c in requests for _ in range(samples)]
    answers = answer_requests(model, template, repeated, max_new_tokens=max_new_tokens, temperature=temperature,
                              batch_size=batch_size, seed=seed, progress=progress)
    return [[a for a in answers[i * samples:(i + 1) * samples] if a is not None] for i in range(len(requests))]


@dataclass
class PairReport:
    """The pairs made from graded answers, and what became of every request and answer."""

    pairs: list[PreferencePair]
    requests: int = 0  # asked
    answers: int = 0  # drawn
    distinct: int = 0  # after dropping repeats of a request's answers (the same code, stripped) and blank ones
    grades: dict[str, int] = field(default_factory=dict)  # distinct answers per grade, in GRADES order
    ties: int = 0  # requests whose distinct answers all share one grade: nothing to prefer
    skipped: int = 0  # requests whose prompt leaves no room for an answer
    blank: int = 0  # answers with no text at all (never paired: a pair needs two responses)

    def table(self) -> str:
        """What the pairs were made of, in a few lines (at most 88 columns)."""
        def share(n: int, of: int) -> str:
            return f"{n:>6} ({100 * n / of:5.1f}%)" if of else f"{n:>6}"

        lines = [f"requests {self.requests}: {len(self.pairs)} paired, {self.ties} tied, {self.skipped} skipped",
                 f"answers {self.answers}: {self.distinct} distinct, {self.blank} blank", "distinct answers by grade:"]
        lines += [f"  {g:10}{share(self.grades.get(g, 0), self.distinct)}" for g in reversed(GRADES)]
        kinds = Counter((p.meta["chosen_grade"], p.meta["rejected_grade"]) for p in self.pairs)
        lines.append("pairs by (chosen, rejected) grade:")
        lines += [f"  {c:>8} > {r:<9}{share(n, len(self.pairs))}" for (c, r), n in kinds.most_common()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, object]:
        return {"pairs": len(self.pairs), "requests": self.requests, "answers": self.answers,
                "distinct": self.distinct, "grades": dict(self.grades), "ties": self.ties, "skipped": self.skipped,
                "blank": self.blank}


def make_pairs(requests: Sequence[Conversation], answers: Sequence[Sequence[tuple[str, bool]]], *, workers: int = 2,
               timeout: float = 5.0, reference_cache: dict[str, bool | None] | None = None) -> PairReport:
    """Grade every distinct answer of each request (in sandboxed children) and pair the best with the worst.

    Repeats of an answer (the same code once stripped) count once: a request answered four times the
    same way has nothing to compare. The chosen response is the first drawn of the best grade, the
    rejected one the first drawn of the worst; when every distinct answer has the same grade, the
    request is a tie and gives no pair (equal grades are not a preference a program verified).
    """
    if len(requests) != len(answers):
        raise ValueError(f"{len(requests)} requests but {len(answers)} lists of answers")
    report = PairReport([], requests=len(requests), answers=sum(map(len, answers)))
    flat_requests: list[Conversation] = []
    flat_answers: list[tuple[str, bool]] = []
    owner: list[int] = []
    for i, (c, drawn) in enumerate(zip(requests, answers)):
        if not drawn:
            report.skipped += 1
            continue
        seen: set[str] = set()
        for text, finished in drawn:
            if not text.strip():
                report.blank += 1
                continue
            key = code_of(text).strip()
            if key in seen:
                continue
            seen.add(key)
            flat_requests.append(c)
            flat_answers.append((text, finished))
            owner.append(i)
    report.distinct = len(flat_answers)
    scored = score_answers(flat_requests, flat_answers, workers=workers, timeout=timeout,
                           reference_cache=reference_cache).attempts
    graded: dict[int, list[tuple[int, str]]] = {}
    for i, attempt in zip(owner, scored):
        graded.setdefault(i, []).append((grade_of(attempt.score, attempt.finished), attempt.answer))
    counts = Counter(g for answers_of in graded.values() for g, _ in answers_of)
    report.grades = {name: counts.get(g, 0) for g, name in enumerate(GRADES)}
    for i, answers_of in graded.items():
        best = max(g for g, _ in answers_of)
        worst = min(g for g, _ in answers_of)
        if best == worst:
            report.ties += 1
            continue
        chosen = next(text for g, text in answers_of if g == best)
        rejected = next(text for g, text in answers_of if g == worst)
        c = requests[i]
        meta = {"chosen_grade": GRADES[best], "rejected_grade": GRADES[worst], "distinct": len(answers_of)}
        report.pairs.append(PreferencePair(c.prompt, chosen, rejected, c.source, PairMeta(meta)))
    # Requests whose every answer was blank give neither a pair nor a tie: they count as ties.
    report.ties += sum(1 for i, drawn in enumerate(answers) if drawn and i not in graded)
    return report


def generate_pairs(model: LLM, template: ChatTemplate, requests: Sequence[Conversation], *, samples: int = 4,
                   temperature: float = 0.7, max_new_tokens: int = 128, batch_size: int = 16, seed: int = 0,
                   workers: int = 2, timeout: float = 5.0,
                   progress: Callable[[int], None] | None = None) -> PairReport:
    """`sample_answers`, then `make_pairs`: preference pairs from the model's own answers, graded by running them.

    `progress` is called with the number of answers drawn so far, after each batch."""
    answers = sample_answers(model, template, requests, samples=samples, temperature=temperature,
                             max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed, progress=progress)
    return make_pairs(requests, answers, workers=workers, timeout=timeout)


# --------------------------------------------------------------------------------------------
# Batches of pairs, with their reference log-probs


@dataclass
class PairBatch:
    """B pairs in one Batch of 2B rows (chosen, then rejected) and the reference's log-probs of the rows."""

    batch: Batch
    ref: Tensor  # (2B,) float32, in the rows' order

    def to(self, device: torch.device | str) -> PairBatch:
        return PairBatch(self.batch.to(device), self.ref.to(device))

    @property
    def x(self) -> Tensor:
        return self.batch.x

    @property
    def targets(self) -> int:
        return self.batch.targets

    def __len__(self) -> int:
        return self.ref.numel() // 2


class PairBatches(ExampleBatches):
    """Batches of pairs, epoch after epoch: `ExampleBatches`'s order and resumable state, over pairs.

    `ref` holds each pair's reference log-probs, (N, 2): chosen, rejected."""

    def __init__(self, pairs: EncodedPairs, ref: Tensor, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 pad_id: int = 0, device: torch.device | str = "cpu") -> None:
        if ref.shape != (len(pairs), 2):
            raise ValueError(f"ref has shape {tuple(ref.shape)}; expected ({len(pairs)}, 2): chosen and rejected per pair")
        rows = list(range(len(pairs)))  # a row is a pair's index; batch() builds its tensors
        super().__init__(rows, batch_size, 0, packing=False, seed=seed, shuffle=shuffle, pad_id=pad_id,  # type: ignore[arg-type]
                         device=device)
        self.pairs, self.ref = pairs, ref

    def batch(self, rows: Sequence[int]) -> PairBatch:  # type: ignore[override]
        index = torch.tensor(list(rows))
        b = pair_batch([self.pairs.chosen[i] for i in rows], [self.pairs.rejected[i] for i in rows], self.pad_id)
        return PairBatch(b, torch.cat([self.ref[index, 0], self.ref[index, 1]])).to(self.device)


class DPOLoss:
    """`train_step`'s loss function for pair batches; keeps the last `DPOOutput` for the log."""

    def __init__(self, beta: float) -> None:
        self.beta = beta
        self.last: DPOOutput | None = None

    def __call__(self, model: nn.Module, pb: PairBatch) -> Tensor:
        pc, pr = sequence_logprobs(model, pb.batch).chunk(2)
        rc, rr = pb.ref.chunk(2)
        self.last = dpo_loss(pc, pr, rc, rr, self.beta)
        return self.last.loss


@torch.no_grad()
def pair_logprobs(model: nn.Module, pairs: EncodedPairs, *, batch_size: int = 16, device: torch.device | str = "cpu",
                  amp: contextlib.AbstractContextManager | None = None, pad_id: int = 0) -> Tensor:
    """(N, 2) float32: the model's sequence log-probs of each pair's chosen and rejected response, in
    eval mode (no dropout). DPO computes the reference's once, before training, and keeps only these."""
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(pairs), batch_size):
            stop = min(start + batch_size, len(pairs))
            b = pair_batch(pairs.chosen[start:stop], pairs.rejected[start:stop], pad_id).to(device)
            with amp or contextlib.nullcontext():
                logps = sequence_logprobs(model, b).float().cpu()
            out.append(torch.stack(logps.chunk(2), dim=1))
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, 2)


def pair_metrics(model: nn.Module, batches: Iterable[PairBatch], beta: float, *,
                 amp: contextlib.AbstractContextManager | None = None) -> dict[str, float]:
    """`DPOOutput.summary()` over every pair of `batches` at once (eval mode, no gradient)."""
    was_training = model.training
    model.eval()
    policy, ref = [], []
    try:
        with torch.no_grad():
            for pb in batches:
                with amp or contextlib.nullcontext():
                    policy.append(sequence_logprobs(model, pb.batch).float())
                ref.append(pb.ref.float())
    finally:
        model.train(was_training)
    if not policy:
        raise DPOError("no pairs to measure")
    # Each batch holds B chosen rows then B rejected rows: split each before joining the batches.
    pc = torch.cat([p.chunk(2)[0] for p in policy])
    pr = torch.cat([p.chunk(2)[1] for p in policy])
    rc = torch.cat([r.chunk(2)[0] for r in ref])
    rr = torch.cat([r.chunk(2)[1] for r in ref])
    return dpo_loss(pc, pr, rc, rr, beta).summary()


@torch.no_grad()
def kl_drift(policy: LLM, reference: LLM, template: ChatTemplate, requests: Sequence[Conversation], *,
             samples: int = 1, max_new_tokens: int = 128, batch_size: int = 16, seed: int = 0,
             amp: contextlib.AbstractContextManager | None = None) -> tuple[float, float]:
    """How far the policy has moved from the reference: KL(π || π_ref) on the requests, estimated.

    The policy answers each request `samples` times at temperature 1 (its own distribution, the one
    the KL is an expectation over); for each answer y, log π(y|x) - log π_ref(y|x) summed over its
    tokens is an unbiased estimate of the KL of the answers' distributions. Returns the mean over the
    answers (nats per answer) and the total over the total number of answer tokens (nats per token).
    The log-probs are those of the ids sampled, not of a re-encoding of their text.
    """
    if samples < 1:
        raise DPOError(f"samples={samples}: estimating the KL needs at least one answer per request")
    repeated = [c for c in requests for _ in range(samples)]
    with amp or contextlib.nullcontext():
        drawn = answer_ids(policy, template, repeated, max_new_tokens=max_new_tokens, temperature=1.0,
                           batch_size=batch_size, seed=seed)
    examples = [Example(tuple(p + new), (False,) * len(p) + (True,) * len(new)) for p, new in
                (d for d in drawn if d is not None and d[1])]
    if not examples:
        raise DPOError("no request left room for an answer, so the KL cannot be estimated; use shorter requests")
    device = policy.token_embedding.weight.device
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        b = pad_batch(chunk, template.end_id).to(device)
        with amp or contextlib.nullcontext():
            diff = sequence_logprobs(policy.eval(), b) - sequence_logprobs(reference.eval(), b)
        total += float(diff.sum())
        tokens += sum(e.targets for e in chunk)
    return total / len(examples), total / tokens


# --------------------------------------------------------------------------------------------
# The config of a DPO run


@dataclass
class DPOConfig(RunConfig):
    """Everything a DPO run depends on. Saved as the run folder's config.toml.

    The optimizer and schedule fields are TrainConfig's (and SFTConfig's), with the same names and
    meanings. The defaults suit DPO: a learning rate lower than SFT's (the policy starts where it
    should stay close to), no weight decay, β = 0.1 as Rafailov et al. (2023) use.
    """

    error = DPOError

    base: str = ""  # the SFT run or checkpoint the policy starts from (it must have the chat tokens)
    reference: str = ""  # the frozen reference; "" = base. Same architecture and tokenizer as base
    pairs: str = ""  # a JSONL file of preference pairs (load_pairs)
    val_fraction: float = 0.1  # pairs held out, by a hash of their prompt, for the validation accuracy
    out: str = "runs/dpo-tiny"
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    seq_len: int = 0  # 0: the model's context
    batch_size: int = 8  # pairs per step: 2 x batch_size rows in one forward
    beta: float = 0.1  # the strength of the KL anchor: larger stays closer to the reference
    too_long: str = "drop"  # or "error": a pair that does not fit is never truncated
    epochs: int = 1
    max_steps: int = 0  # 0: epochs * batches per epoch
    # The optimizer and its schedule (as in TrainConfig).
    optimizer: str = "adamw"  # or "muon" (full training only)
    lr: float = 1e-4
    min_lr: float = 1e-5
    warmup_steps: int = 10
    decay_end: int = 0
    schedule: str = "cosine"
    wsd_decay_fraction: float = 0.2
    wsd_decay_shape: str = "sqrt"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0
    muon_lr: float = 0.0
    # LoRA (minillm.lora): 0 trains every weight.
    lora_rank: int = 0
    lora_alpha: float = 0.0
    # What to watch (in steps; 0 turns a periodic action off).
    log_every: int = 5
    eval_every: int = 50  # the held-out pairs' loss, accuracy and margin
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    kl_requests: int = 32  # held-out prompts the policy answers (T=1) at the end for the KL estimate; 0: none
    kl_tokens: int = 128
    logger: str = "none"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> DPOConfig:
        """Check every field's type, then the values; raises a DPOError naming the field."""
        try:
            check_config(self, positive=("batch_size",),
                         non_negative=("seq_len", "epochs", "max_steps", "eval_every", "checkpoint_every",
                                       "keep_checkpoints", "lora_rank", "lora_alpha", "kl_requests", "kl_tokens"),
                         choices={"too_long": ("drop", "error")})
        except DPOError:
            raise
        except TrainError as e:
            raise DPOError(str(e)) from None

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise DPOError(msg)

        need(math.isfinite(self.beta) and self.beta > 0,
             f"beta must be a positive number, got {self.beta}; 0.1 is usual (larger keeps the policy closer to the "
             "reference)")
        need(0 <= self.val_fraction < 1, f"val_fraction must be in [0, 1), got {self.val_fraction}")
        need(self.epochs > 0 or self.max_steps > 0, "epochs and max_steps are both 0: set epochs (e.g. 1) or max_steps")
        need(self.seq_len != 1, "seq_len=1 leaves no room for a response; use 0 (the model's context) or more")
        check_lora_settings(self)
        return self



def load_dpo_config(path: str | os.PathLike[str] | None = None, overrides: dict[str, str] | Iterable[str] = ()) -> DPOConfig:
    """The config of a TOML file (or the defaults), with `--set`-style overrides ("beta=0.2") applied."""
    return load_config(path, overrides, cls=DPOConfig)


# What a resumed run must keep: they decide which pairs, batches, reference and parameters the
# checkpoint's numbers belong to.
_FIXED_ON_RESUME = ("base", "reference", "pairs", "val_fraction", "seed", "seq_len", "batch_size", "beta", "too_long",
                    "optimizer", "lora_rank", "lora_alpha")


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class DPOResult:
    """What a DPO run ends with (also in metrics.jsonl)."""

    run: Path
    step: int
    max_steps: int = 0
    epochs: float = 0.0
    loss: float | None = None  # the last logged training loss
    train: dict[str, float] = field(default_factory=dict)  # DPOOutput.summary() over every training pair, at the end
    val: dict[str, float] | None = None  # the same over the held-out pairs (None: none held out)
    pairs: dict[str, int] = field(default_factory=dict)  # kept, prompt_too_long, response_too_long, train, val
    kl: float | None = None  # KL(policy || reference) estimate on held-out prompts, nats per answer
    kl_per_token: float | None = None
    trainable: int = 0
    total: int = 0
    tokens_per_s: float = 0.0
    seconds: float = 0.0


def _chat_checkpoint(path: str, what: str) -> Path:
    """The checkpoint folder of an SFT-style run or checkpoint, which must have the chat tokens."""
    folder = _base_folder(path)
    tok = Tokenizer.load(folder / "tokenizer.bpe")
    try:
        ChatTemplate(tok)
    except SFTError:
        raise DPOError(f"the {what} {path} has no chat tokens: it is a pretrained model, not a fine-tuned one. DPO "
                       f"starts from an SFT model; run `minillm sft --from {path}` first and give its run") from None
    return folder


def _check_reference(policy: Path, reference: Path) -> None:
    """The reference must score the same token ids with the same architecture as the policy's start."""
    a, b = _read_state(policy), _read_state(reference)
    if a["model_config"] != b["model_config"]:
        diff = sorted(k for k in set(a["model_config"]) | set(b["model_config"])
                      if a["model_config"].get(k) != b["model_config"].get(k))
        ca, cb = a["model_config"], b["model_config"]
        differences = ", ".join(f"{k} ({ca.get(k)!r} vs {cb.get(k)!r})" for k in diff)
        raise DPOError(f"the reference {reference} does not match the policy {policy}: their model configs differ in "
                       f"{differences}; "
                       "give the SFT checkpoint the policy starts from (or leave reference empty to use it)")
    if a["files"].get("tokenizer.bpe") != b["files"].get("tokenizer.bpe"):
        raise DPOError(f"the reference {reference} has another tokenizer than the policy {policy} (tokenizer.bpe "
                       "differs), so their log-probs are of different token ids; give a reference fine-tuned from the "
                       "same base (or leave reference empty to use the policy's start)")


def _split_pairs(pairs: Sequence[PreferencePair], val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the training and held-out pairs: a pair is held out by a hash of its prompt, so
    that pairs with one prompt stay together and the split does not depend on the file's order."""
    train, val = [], []
    for i, p in enumerate(pairs):
        key = json.dumps([[m.role, m.content] for m in p.prompt], ensure_ascii=False)
        u = _unit(hashlib.sha256(f"minillm-dpo:{seed}:{key}".encode()).digest()[:8])  # as split_of_module
        (val if u < val_fraction else train).append(i)
    return train, val


def _subset(enc: EncodedPairs, idx: Sequence[int]) -> EncodedPairs:
    return EncodedPairs([enc.pairs[i] for i in idx], [enc.chosen[i] for i in idx], [enc.rejected[i] for i in idx])


def _digest(t: Tensor) -> str:
    return hashlib.sha256(t.detach().cpu().float().numpy().tobytes()).hexdigest()


def _check_resume(saved: dict[str, Any], cfg: DPOConfig) -> None:
    if saved.get("kind") != "dpo":
        raise DPOError(f"{cfg.out} holds a checkpoint of another kind of run (not minillm dpo); choose another out=")
    old = DPOConfig.from_dict(saved["config"])
    changed = [k for k in _FIXED_ON_RESUME if getattr(old, k) != getattr(cfg, k)]
    if changed:
        raise DPOError(f"cannot resume with a different {', '.join(changed)} (the checkpoint has "
                       f"{', '.join(f'{k}={getattr(old, k)!r}' for k in changed)}); keep them, or start a new run")


def preference_tune(cfg: DPOConfig, *, resume: bool = False, force: bool = False,
                    progress: bool | None = None) -> DPOResult:
    """Train the SFT model `cfg.base` with DPO on the pairs of `cfg.pairs`; with `resume`, continue the
    run in cfg.out from its latest checkpoint.

    The reference (cfg.reference, or the base) scores every pair once, before training, in eval mode;
    then it is freed, and the loop (`train.train_step`, `DPOLoss`) needs only the policy. Each
    checkpoint is a `train.save_checkpoint` folder that `load_for_inference` reads (LoRA merged in,
    the adapter beside it). A resume scores the pairs with the reference again and checks the
    numbers against the checkpoint's digest: a reference that changed would change every loss.
    The run ends with the loss, accuracy and margin over the training and held-out pairs and, with
    kl_requests, the KL drift on held-out prompts (the SFT split's validation requests).
    """
    progress = sys.stderr.isatty() if progress is None else progress
    start_time = time.perf_counter()
    strategy = SingleDevice()
    saved: dict[str, Any] | None = None
    ckpt: Path | None = None
    if not cfg.pairs:
        raise DPOError("no pairs: give a JSONL file of preference pairs, pairs=FILE (minillm dpo --pairs FILE; make one "
                       "with minillm dpo-pairs)")
    if resume:
        run, ckpt = _open_run(cfg, True, False, strategy)
        saved = load_checkpoint(ckpt, None, restore_rng=False)
        _check_resume(saved, cfg)
    base = _chat_checkpoint(cfg.base, "base")
    ref_folder = _chat_checkpoint(cfg.reference, "reference") if cfg.reference else base
    if ref_folder != base:
        _check_reference(base, ref_folder)
    pairs = load_pairs(cfg.pairs)  # every bad line: a DPOError naming FILE:LINE
    if not resume:
        out = Path(cfg.out).resolve()
        for folder in {base, ref_folder}:
            if out == folder.resolve() or out in folder.resolve().parents:
                raise DPOError(f"the checkpoint {folder} is inside out={cfg.out}, which a new run replaces; choose another out=")
        if not force and out.exists() and any(out.iterdir()):
            _open_run(cfg, False, False, strategy)  # raises the error that names --resume and --force

    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    amp = autocast(device, resolve_dtype(cfg.dtype, device))

    # The reference's log-probs, once. The reference is loaded alone, used, and freed before the policy.
    reference, ref_tok = load_for_inference(ref_folder, device)
    template = ChatTemplate(ref_tok)
    seq_len = cfg.seq_len or reference.cfg.max_seq_len
    if seq_len > reference.cfg.max_seq_len:
        raise DPOError(f"seq_len ({seq_len}) exceeds the model's context (max_seq_len={reference.cfg.max_seq_len}); "
                       f"lower it to {reference.cfg.max_seq_len} or less, or 0 for the context")
    enc = encode_pairs(template, pairs, seq_len, cfg.too_long)  # type: ignore[arg-type]
    train_idx, val_idx = _split_pairs(enc.pairs, cfg.val_fraction, cfg.seed)
    if not train_idx:
        raise DPOError(f"no training pair left ({enc.report()}; {len(val_idx)} held out); give more pairs, lower "
                       "val_fraction, or raise seq_len")
    ref = pair_logprobs(reference, enc, batch_size=cfg.batch_size, device=device, amp=amp, pad_id=template.end_id)
    del reference

    m = _prepare_model(cfg, base, ckpt, device)  # type: ignore[arg-type]
    model = m.model
    train_set, val_set = _subset(enc, train_idx), _subset(enc, val_idx)
    train_batches = PairBatches(train_set, ref[train_idx], cfg.batch_size, seed=cfg.seed, pad_id=template.end_id,
                                device=device)
    val_batches = (PairBatches(val_set, ref[val_idx], cfg.batch_size, shuffle=False, pad_id=template.end_id,
                               device=device) if val_idx else None)
    steps = cfg.max_steps or cfg.epochs * len(train_batches)
    schedule = dataclasses.replace(cfg, max_steps=steps)
    optimizer = build_optimizer(model, cfg, device, no_decay=m.no_decay)  # type: ignore[arg-type]
    digest = _digest(ref)
    step = 0
    if saved is not None:
        if saved["reference_digest"] != digest:
            raise DPOError(f"the reference's log-probs of the pairs differ from the checkpoint's (the reference "
                           f"{ref_folder}, the pairs file or the device changed); resume with the same ones, or start "
                           "a new run")
        load_checkpoint(ckpt, None, optimizer)
        train_batches.load_state_dict(saved["sampler"])
        step = saved["step"]
    else:
        run, _ = _open_run(cfg, False, force, strategy)
        atomic_write(run / "config.toml", config_to_toml(cfg))

    counts = {"kept": len(enc), "prompt_too_long": enc.prompt_too_long, "response_too_long": enc.response_too_long,
              "train": len(train_idx), "val": len(val_idx)}
    log = RunLog(run, cfg, True, step if saved is not None else None)  # type: ignore[arg-type]
    result = DPOResult(run, step, steps, pairs=counts, trainable=m.trainable, total=m.total)
    loss_fn = DPOLoss(cfg.beta)
    try:
        def eval_row(kind: str, at: int) -> dict[str, Any] | None:
            if val_batches is None:
                return None
            summary = pair_metrics(model, val_batches, cfg.beta, amp=amp)
            row = {"step": at, "kind": kind, **{f"val_{k}": v for k, v in summary.items()}}
            log.log(row)
            return row

        def checkpoint(at: int) -> None:
            state = {"step": at, "kind": "dpo", "sampler": train_batches.state_dict(), "config": cfg.to_dict(),
                     "base": str(base), "reference": str(ref_folder), "reference_digest": digest, "pairs": counts}
            save_run_checkpoint(run, at, model, optimizer, template.tokenizer, cfg, state, m.adapter_base)

        for tmp in (run / "checkpoints").glob(".step_*.tmp"):  # a checkpoint cut short by a crash
            shutil.rmtree(tmp, ignore_errors=True)
        if saved is None:
            log.log({"step": 0, "kind": "data", **counts, "max_steps": steps, "trainable": m.trainable,
                     "total": m.total, "batches_per_epoch": len(train_batches)})
            if cfg.eval_every:
                eval_row("eval", 0)

        loop = run_steps(model, optimizer, train_batches, cfg, schedule, step=step, steps=steps, loss_fn=loss_fn,
                         amp=amp, log=log, desc="dpo", progress=progress, row=lambda: loss_fn.last.summary(),
                         every=[(cfg.eval_every, lambda at: eval_row("eval", at)), (cfg.checkpoint_every, checkpoint)])
        step, result.loss = loop.step, loop.loss
        if not (saved is not None and saved["step"] == step):
            checkpoint(step)
        final: dict[str, Any] = {"step": step, "kind": "final", "final": True}
        result.train = pair_metrics(model, PairBatches(train_set, ref[train_idx], cfg.batch_size, shuffle=False,
                                                       pad_id=template.end_id, device=device), cfg.beta, amp=amp)
        final.update({f"train_{k}": v for k, v in result.train.items()})
        if val_batches is not None:
            result.val = pair_metrics(model, val_batches, cfg.beta, amp=amp)
            final.update({f"val_{k}": v for k, v in result.val.items()})
        if cfg.kl_requests:
            result.kl, result.kl_per_token = _kl_on_held_out(cfg, model, ref_folder, template, device, amp)
            final.update({"kl": result.kl, "kl_per_token": result.kl_per_token})
        log.log(final)
        result.step, result.epochs = step, train_batches.progress
        result.tokens_per_s = loop.tokens_per_s
    finally:
        log.close()
    result.seconds = time.perf_counter() - start_time
    return result


def _kl_on_held_out(cfg: DPOConfig, model: LLM, ref_folder: Path, template: ChatTemplate, device: torch.device,
                    amp: contextlib.AbstractContextManager) -> tuple[float, float] | tuple[None, None]:
    """kl_drift on the first kl_requests validation requests of the SFT run's data (None without any)."""
    from minillm.codeeval import held_out, sft_settings

    settings = sft_settings(ref_folder)
    try:
        requests = held_out(str(settings.get("data", "stdlib")), "val", float(settings.get("val_fraction", 0.05)),
                            float(settings.get("test_fraction", 0.05)))[: cfg.kl_requests]
    except (DataError, OSError) as e:
        warnings.warn(f"no KL estimate: the reference's held-out requests cannot be read ({e})", stacklevel=3)
        return None, None
    if not requests:
        return None, None
    reference, _ = load_for_inference(ref_folder, device)
    model.eval()
    try:
        return kl_drift(_plain_copy(model), reference, template, requests, max_new_tokens=cfg.kl_tokens,
                        batch_size=cfg.batch_size * 2, seed=cfg.seed, amp=amp)
    finally:
        model.train()
