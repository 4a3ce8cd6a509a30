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
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from minillm.files import atomic_write, check_output
from minillm.instructions import ROLES, DataError, Message, Meta
from minillm.sft import IGNORE, Batch, ChatTemplate, Example, SFTError, pad_batch

__all__ = [
    "DPOError", "PairMeta", "PreferencePair", "load_pairs", "save_pairs", "EncodedPairs", "encode_pairs",
    "pair_batch", "sequence_logprobs", "DPOOutput", "dpo_loss",
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
        return {"loss": float(self.loss), "reward_chosen": float(self.chosen_rewards.mean()),
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
