"""Supervised fine-tuning: a chat template, a loss on the answers only, padding and packing.

    template = ChatTemplate.for_tokenizer(tok)         adds <|system|> <|user|> <|assistant|> <|end|>
    resize_vocab(model, template.tokenizer.vocab_size) rows for the new ids: the mean of the old ones
    ex = template.encode(conversation)                 ids, and a mask: True where the loss counts
    batch = pad_batch([ex, ...]) or pack([...], T)     (x, y) with y = IGNORE where the loss must not look
    loss = sft_loss(model, batch)                      the mean cross-entropy over the answers' tokens

A conversation renders as

    <|system|>{system}<|end|>\\n<|user|>{request}<|end|>\\n<|assistant|>{answer}<|end|>\\n

The loss counts the tokens of every assistant answer and the <|end|> that closes it, the token the
model must learn to stop with; the system and user turns, the role tokens and the newlines are
context, never targets. A prompt for generation ends right after <|assistant|>, so training and
chat render the same way.

Packing puts several examples in one row and keeps them apart: each example's positions start at 0
and a block-diagonal attention mask lets a token see only earlier tokens of its own example, so
that a packed row computes, example by example, what the examples compute alone (tested).

Fine-tuning runs through chapter 06's loop (`minillm.train`: the step, the schedule, the
checkpoints and their exact resume), with its own config and batches:

    cfg = load_sft_config("configs/sft-tiny.toml", ["base=runs/tiny", "lora_rank=8"])
    result = finetune(cfg)                             # minillm sft --from runs/tiny --lora-rank 8
    model, tok = load_for_inference(result.run)        # a plain LLM: LoRA is merged into the weights
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import itertools
import math
import os
import random
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from minillm import lora
from minillm.files import atomic_write
from minillm.instructions import (
    Conversation,
    Message,
    load_jsonl,
    split_pairs,
    stdlib_pairs,
)
from minillm.model import LLM
from minillm.tokenizer import Tokenizer, TokenizerError
from minillm.train import (
    RunConfig,
    RunLog,
    SingleDevice,
    TrainError,
    _checkpoints,
    _open_run,
    autocast,
    build_optimizer,
    check_config,
    config_to_toml,
    evaluate,
    latest_checkpoint,
    load_checkpoint,
    load_config,
    load_for_inference,
    lr_at,
    resolve_device,
    resolve_dtype,
    save_checkpoint,
    train_step,
)

__all__ = [
    "SFTError", "SYSTEM", "USER", "ASSISTANT", "END", "CHAT_TOKENS", "IGNORE", "ChatTemplate", "Example", "Fitted",
    "fit", "Batch", "pad_batch", "pack", "pack_groups", "packed_row", "stack", "sft_loss", "resize_vocab",
    "SFTConfig", "load_sft_config", "check_lora_settings", "ExampleBatches", "SFTResult", "finetune", "ADAPTER_FILE",
    "LoopResult", "run_steps", "save_run_checkpoint",
]

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END)
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
IGNORE = -100  # the targets that F.cross_entropy (and LLM.forward) leave out


class SFTError(TrainError):
    """Fine-tuning data or settings that cannot work; the message says what to change. A kind of
    `minillm.train.TrainError` (a ValueError): one `except` catches bad settings of either stage."""


@dataclass(frozen=True)
class Example:
    """One conversation as token ids, with `mask[i]` True where token i is a target the loss counts."""

    ids: tuple[int, ...]
    mask: tuple[bool, ...]
    source: str = ""

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.mask):
            raise SFTError(f"{self.source or 'an example'}: {len(self.ids)} ids but {len(self.mask)} mask entries")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def targets(self) -> int:
        """How many tokens the loss counts (the first token is never a target: nothing predicts it)."""
        return sum(self.mask[1:])


@dataclass(frozen=True)
class ChatTemplate:
    """Renders conversations for training and for chat, with a tokenizer that knows the chat tokens."""

    tokenizer: Tokenizer

    def __post_init__(self) -> None:
        missing = [t for t in CHAT_TOKENS if t not in self.tokenizer.special_tokens]
        if missing:
            raise SFTError(f"the tokenizer lacks the chat tokens {missing}; build the template with "
                           "ChatTemplate.for_tokenizer(tokenizer), which adds them after the existing ids")

    @classmethod
    def for_tokenizer(cls, tokenizer: Tokenizer) -> ChatTemplate:
        """The template for `tokenizer`, with the four chat tokens appended (existing ids unchanged)."""
        return cls(tokenizer.with_special_tokens(CHAT_TOKENS))

    def id(self, token: str) -> int:
        return self.tokenizer.special_tokens[token]

    @property
    def end_id(self) -> int:
        return self.id(END)

    def render(self, messages: Conversation | Sequence[Message], *, generation_prompt: bool = False) -> str:
        """The conversation as text, exactly as `encode` tokenizes it (for reading and for tests)."""
        turns = _messages(messages, need_answer=not generation_prompt)
        text = "".join(f"{ROLE_TOKENS[m.role]}{m.content}{END}\n" for m in turns)
        return text + (ASSISTANT if generation_prompt else "")

    def _content(self, message: Message, source: str) -> list[int]:
        try:  # a chat token inside a message would forge a turn: refused by the tokenizer's policy
            return self.tokenizer.encode(message.content)
        except TokenizerError as e:
            raise SFTError(f"{source or 'a conversation'}: a {message.role} message contains a special token "
                           f"({e}); remove it from the data") from None

    def encode(self, conversation: Conversation | Sequence[Message], source: str = "") -> Example:
        """Token ids and the loss mask of a whole conversation (ending with the assistant's answer)."""
        messages = _messages(conversation)
        source = source or getattr(conversation, "source", "")
        newline = self.tokenizer.encode("\n")
        ids: list[int] = []
        mask: list[bool] = []
        for m in messages:
            content = self._content(m, source)
            answer = m.role == "assistant"
            ids += [self.id(ROLE_TOKENS[m.role]), *content, self.end_id, *newline]
            mask += [False, *[answer] * len(content), answer, *[False] * len(newline)]
        return Example(tuple(ids), tuple(mask), source)

    def prompt(self, messages: Conversation | Sequence[Message]) -> list[int]:
        """Ids for generation: the conversation so far, then <|assistant|> (the model writes the answer)."""
        ids: list[int] = []
        newline = self.tokenizer.encode("\n")
        for m in _messages(messages, need_answer=False):
            ids += [self.id(ROLE_TOKENS[m.role]), *self._content(m, ""), self.end_id, *newline]
        return ids + [self.id(ASSISTANT)]

    def reply(self, ids: Iterable[int]) -> str:
        """The text of generated ids, up to (without) the first <|end|>."""
        out = []
        for i in ids:
            if i == self.end_id:
                break
            out.append(i)
        return self.tokenizer.decode(out)


def _messages(conversation: Conversation | Sequence[Message], need_answer: bool = True) -> Sequence[Message]:
    messages = conversation.messages if isinstance(conversation, Conversation) else tuple(conversation)
    for m in messages:
        if not isinstance(m, Message) or m.role not in ROLE_TOKENS:
            raise SFTError(f"expected Message(role, content) with a role in {sorted(ROLE_TOKENS)}, got {m!r}")
    if need_answer and (not messages or messages[-1].role != "assistant"):
        raise SFTError("a training conversation must end with the assistant's answer")
    return messages


# --------------------------------------------------------------------------------------------
# Fitting examples into the context


@dataclass
class Fitted:
    """What `fit` kept, and what it could not keep (and why), so that nothing is dropped silently."""

    examples: list[Example] = field(default_factory=list)
    dropped_too_long: int = 0  # the policy was "drop", or even the answer alone was too long
    truncated: int = 0  # the prompt lost its oldest tokens
    no_target: int = 0  # nothing for the loss to count

    def report(self) -> str:
        return (f"{len(self.examples)} examples kept, {self.truncated} with their prompt truncated, "
                f"{self.dropped_too_long} dropped as too long, {self.no_target} dropped with no answer tokens")


def fit(examples: Iterable[Example], seq_len: int, policy: Literal["drop", "truncate"] = "drop") -> Fitted:
    """Keep the examples that fit a context of `seq_len` (seq_len + 1 ids: inputs and the shifted targets).

    `drop` leaves out an example that is too long; `truncate` cuts the oldest tokens of its prompt.
    The answer is never cut: an example whose last answer does not fit alone is dropped either way.
    Every drop and truncation is counted in the result.
    """
    if policy not in ("drop", "truncate"):
        raise SFTError(f"unknown policy {policy!r} for examples longer than the context; use 'drop' or 'truncate'")
    if seq_len < 2:
        raise SFTError(f"seq_len={seq_len} is too short for an example; use at least a few dozen tokens")
    out = Fitted()
    limit = seq_len + 1
    for ex in examples:
        if ex.targets == 0:
            out.no_target += 1
            continue
        if len(ex) <= limit:
            out.examples.append(ex)
            continue
        first_target = ex.mask.index(True)
        # Keep the token before the answer (the <|assistant|> that predicts its first token) and after.
        keep_from = len(ex) - limit
        if policy == "drop" or keep_from > first_target - 1:
            out.dropped_too_long += 1
            continue
        out.examples.append(Example(ex.ids[keep_from:], ex.mask[keep_from:], ex.source))
        out.truncated += 1
    return out


# --------------------------------------------------------------------------------------------
# Batches


@dataclass(frozen=True)
class Batch:
    """Inputs (B, T), targets (B, T) with IGNORE where nothing counts, and for packed rows the
    positions (B, T) and the block-diagonal attention mask (B, T, T)."""

    x: Tensor
    y: Tensor
    positions: Tensor | None = None
    attention_mask: Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        move = (lambda t: None if t is None else t.to(device))  # noqa: E731
        return Batch(move(self.x), move(self.y), move(self.positions), move(self.attention_mask))

    def __getitem__(self, i: int) -> Tensor:  # (x, y) unpacking, as minillm.train.evaluate reads batch[1]
        return (self.x, self.y)[i]

    @property
    def targets(self) -> int:
        return int((self.y != IGNORE).sum())


def _inputs_targets(ex: Example) -> tuple[list[int], list[int]]:
    ids = list(ex.ids)
    y = [t if m else IGNORE for t, m in zip(ids[1:], ex.mask[1:])]  # token i+1 counts if it is an answer's
    return ids[:-1], y


def pad_batch(examples: Sequence[Example], pad_id: int = 0, length: int | None = None) -> Batch:
    """Right-pad the examples to the longest (or `length`); padding is never a target.

    Padding after the real tokens needs no attention mask: causal attention never lets a real token
    see a later one, so the pads change nothing before them (tested against single examples).
    """
    if not examples:
        raise SFTError("pad_batch needs at least one example")
    pairs = [_inputs_targets(ex) for ex in examples]
    T = length or max(len(x) for x, _ in pairs)
    if any(len(x) > T for x, _ in pairs):
        raise SFTError(f"an example has {max(len(x) for x, _ in pairs)} inputs, more than length={T}; fit() them first")
    x = torch.full((len(pairs), T), pad_id, dtype=torch.long)
    y = torch.full((len(pairs), T), IGNORE, dtype=torch.long)
    for i, (xi, yi) in enumerate(pairs):
        x[i, : len(xi)] = torch.tensor(xi)
        y[i, : len(yi)] = torch.tensor(yi)
    return Batch(x, y)


def pack(examples: Sequence[Example], seq_len: int, pad_id: int = 0) -> list[Batch]:
    """Pack examples into rows of `seq_len` inputs, in order, a new row when the next does not fit.

    Returns one Batch of a single row per packed row (stack them with `stack`). Within a row each
    example's positions restart at 0 and the attention mask is block-diagonal: what a token sees is
    what it would see if its example were alone. The rest of the row is padding, which no target
    counts and which attends only to itself.
    """
    return [packed_row(group, seq_len, pad_id) for group in pack_groups(examples, seq_len)]


def pack_groups(examples: Sequence[Example], seq_len: int) -> list[list[Example]]:
    """Which examples `pack` puts in each row. A run keeps the groups and builds each row's (T, T)
    mask only when its batch is drawn (`packed_row`): the masks of a whole data set would not fit."""
    groups: list[list[Example]] = [[]]
    used = 0
    for ex in examples:
        n = len(ex) - 1  # inputs
        if n > seq_len:
            raise SFTError(f"{ex.source or 'an example'} has {n} inputs, more than seq_len={seq_len}; fit() them first")
        if used + n > seq_len:
            groups.append([])
            used = 0
        groups[-1].append(ex)
        used += n
    return [g for g in groups if g]


def packed_row(group: Sequence[Example], seq_len: int, pad_id: int = 0) -> Batch:
    """One packed row of `seq_len` inputs holding `group` (which must fit), as a Batch of one row."""
    x = torch.full((seq_len,), pad_id, dtype=torch.long)
    y = torch.full((seq_len,), IGNORE, dtype=torch.long)
    positions = torch.zeros(seq_len, dtype=torch.long)
    doc = torch.full((seq_len,), -1, dtype=torch.long)  # -1: padding
    at = 0
    for k, ex in enumerate(group):
        xi, yi = _inputs_targets(ex)
        n = len(xi)
        x[at: at + n], y[at: at + n] = torch.tensor(xi), torch.tensor(yi)
        positions[at: at + n] = torch.arange(n)
        doc[at: at + n] = k
        at += n
    positions[at:] = torch.arange(seq_len - at)  # padding: any valid positions
    same = (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0)  # (T, T): the same example
    return Batch(x[None], y[None], positions[None], same[None])


def stack(batches: Sequence[Batch]) -> Batch:
    """One batch of B rows from B single-row batches of the same length (packed or padded)."""
    packed = batches[0].positions is not None
    return Batch(torch.cat([b.x for b in batches]), torch.cat([b.y for b in batches]),
                 torch.cat([b.positions for b in batches]) if packed else None,
                 torch.cat([b.attention_mask for b in batches]) if packed else None)


def sft_loss(model: nn.Module, batch: Batch) -> Tensor:
    """The mean cross-entropy over the batch's counted targets (a `minillm.train` loss_fn)."""
    return model(batch.x, batch.y, ignore_index=IGNORE, positions=batch.positions,
                 attention_mask=batch.attention_mask)[1]


# --------------------------------------------------------------------------------------------
# The model's vocabulary


@torch.no_grad()
def resize_vocab(model: LLM, vocab_size: int) -> LLM:
    """Grow the model's embedding and output layer to `vocab_size` rows, in place; returns the model.

    The old rows are kept, so the model computes exactly what it did on every old id. A new row
    starts at the mean of the old rows: a token the model has never seen looks like an average token,
    and its logit starts at the average logit, not at an arbitrary value that could dominate the
    softmax (Hewitt, 2021, makes this argument for the output layer).
    """
    old = model.cfg.vocab_size
    if vocab_size < old:
        raise SFTError(f"vocab_size={vocab_size} would remove ids (the model has {old}); resizing only grows it")
    if vocab_size == old:
        return model
    emb = model.token_embedding.weight
    new_emb = torch.cat([emb, emb.mean(0, keepdim=True).expand(vocab_size - old, -1)])
    model.token_embedding = nn.Embedding(vocab_size, emb.size(1), device=emb.device, dtype=emb.dtype)
    model.token_embedding.weight.copy_(new_emb)
    if model.cfg.tie_embeddings:
        model.lm_head = nn.Linear(emb.size(1), vocab_size, bias=False, device=emb.device, dtype=emb.dtype)
        model.cfg.vocab_size = vocab_size
        model.tie_weights()
    else:
        head = model.lm_head.weight
        new_head = torch.cat([head, head.mean(0, keepdim=True).expand(vocab_size - old, -1)])
        model.lm_head = nn.Linear(head.size(1), vocab_size, bias=False, device=head.device, dtype=head.dtype)
        model.lm_head.weight.copy_(new_head)
        model.cfg.vocab_size = vocab_size
    return model


# --------------------------------------------------------------------------------------------
# The config of a fine-tuning run


@dataclass
class SFTConfig(RunConfig):
    """Everything a fine-tuning run depends on. Saved as the run folder's config.toml.

    The optimizer and schedule fields are TrainConfig's, with the same names and meanings, so that
    `minillm.train.lr_at` and `build_optimizer` read this config as they read a pretraining one.
    The defaults suit fine-tuning rather than pretraining: a learning rate ten times lower, no
    weight decay (it would pull the pretrained weights toward zero, not toward where they started),
    a short warmup, and a budget in epochs over the examples rather than in steps.
    """

    error = SFTError

    # What to start from, and on what.
    base: str = ""  # a run folder of `minillm train` (its latest checkpoint) or a checkpoint folder
    data: str = "stdlib"  # 'stdlib' (instructions.stdlib_pairs) or a JSONL file (instructions.load_jsonl)
    val_fraction: float = 0.05  # held out by instructions.split_pairs: of modules (stdlib) or of lines (JSONL)
    test_fraction: float = 0.05  # held out for evaluation by execution; never trained or evaluated on here
    out: str = "runs/sft-tiny"
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"
    # The examples and the batches.
    seq_len: int = 0  # 0: the base model's context (it cannot be longer: those positions were never trained)
    batch_size: int = 8  # rows per step: examples (padding) or packed rows of seq_len (packing)
    packing: bool = True
    too_long: str = "drop"  # or "truncate": the prompt loses its oldest tokens; the answer is never cut
    mask_prompt: bool = True  # False: the loss counts every token (chapter 08's ablation; validation stays masked)
    epochs: int = 1
    max_steps: int = 0  # 0: epochs * batches per epoch; else this many steps, whatever the epochs
    # The optimizer and its schedule (as in TrainConfig).
    optimizer: str = "adamw"  # or "muon" (full fine-tuning only)
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 20
    decay_end: int = 0  # 0: max_steps
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
    lora_alpha: float = 0.0  # 0: lora.py's default, alpha = rank
    # What to watch, and how often (in steps; 0 turns a periodic action off).
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 0  # 0: the whole validation split
    sample_every: int = 0  # greedy answers to the first `samples` validation requests
    samples: int = 3
    sample_tokens: int = 96
    checkpoint_every: int = 100
    keep_checkpoints: int = 2
    logger: str = "none"  # or "tensorboard", "wandb"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> SFTConfig:
        """Check every field's type, then the values; raises TrainError (or SFTError) naming the field."""
        check_config(self, positive=("batch_size",),
                     non_negative=("seq_len", "epochs", "max_steps", "eval_every", "eval_batches", "sample_every", "samples",
                                   "sample_tokens", "checkpoint_every", "keep_checkpoints", "lora_rank", "lora_alpha"),
                     choices={"too_long": ("drop", "truncate")})

        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise SFTError(msg)

        need(self.data != "", "data is empty; give 'stdlib' (the built-in pairs) or a JSONL file")
        need(self.seq_len != 1, "seq_len=1 leaves no room for an example; use 0 (the base model's context) or more")
        need(self.epochs > 0 or self.max_steps > 0, "epochs and max_steps are both 0: set epochs (e.g. 1) or max_steps")
        for name in ("val_fraction", "test_fraction"):
            need(0 <= getattr(self, name) < 1, f"{name} must be in [0, 1), got {getattr(self, name)}")
        need(self.val_fraction + self.test_fraction < 1,
             f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction} leaves nothing to train on; "
             "lower them")
        check_lora_settings(self)
        return self


def check_lora_settings(cfg: Any) -> None:
    """The LoRA fields of a fine-tuning config (SFTConfig, dpo.DPOConfig); raises cfg.error naming the fix."""
    if cfg.lora_alpha != 0 and cfg.lora_rank == 0:
        raise cfg.error(f"lora_alpha={cfg.lora_alpha:g} needs lora_rank > 0 (alpha scales the LoRA update); set "
                        "lora_rank, or lora_alpha=0 to train every weight")
    if cfg.lora_rank and cfg.optimizer == "muon":
        raise cfg.error("optimizer='muon' with lora_rank > 0: Muon orthogonalizes whole matrices, which a rank-r "
                        "adapter is not; use optimizer=adamw")



def load_sft_config(path: str | os.PathLike[str] | None = None, overrides: dict[str, str] | Iterable[str] = ()) -> SFTConfig:
    """The config of a TOML file (or the defaults), with `--set`-style overrides ("lr=1e-4") applied."""
    return load_config(path, overrides, cls=SFTConfig)


# What a resumed run must keep: they decide which examples, batches and parameters the checkpoint's
# numbers belong to. max_steps, epochs, the schedule and the watching may change (as in train).
_FIXED_ON_RESUME = ("base", "data", "val_fraction", "test_fraction", "seed", "seq_len", "batch_size", "packing", "too_long",
                    "optimizer", "lora_rank", "lora_alpha")
ADAPTER_FILE = "adapter.safetensors"  # in each checkpoint of a LoRA run, beside the merged model.safetensors


# --------------------------------------------------------------------------------------------
# Batches, epoch after epoch


class ExampleBatches:
    """Batches of fitted examples, epoch after epoch: the batch source that `train.train_step` draws from.

    The rows are the examples themselves (padding: each batch is right-padded to its longest) or, with
    `packing`, rows of `seq_len` inputs packed once (`pack_groups`), from the examples in a seeded
    shuffled order (so that a row mixes modules); a row's tensors are built when its batch is drawn.
    Epoch e visits the rows in a permutation drawn from (seed, e) alone, so the state is two numbers,
    the epoch and the batches already taken in it: a resumed run draws exactly the batches an
    uninterrupted run would. Without `shuffle`, one pass in order (validation). The last batch of an
    epoch may be smaller.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, seq_len: int, *, packing: bool, seed: int = 0,
                 shuffle: bool = True, pad_id: int = 0, device: torch.device | str = "cpu") -> None:
        if not examples:
            raise SFTError("there are no examples to batch")
        self.batch_size, self.packing, self.seed, self.shuffle = batch_size, packing, seed, shuffle
        self.pad_id, self.device = pad_id, device
        self.seq_len = seq_len
        examples = list(examples)
        if packing:
            if shuffle:
                random.Random(f"minillm-sft:{seed}:pack").shuffle(examples)
            self.rows: list[Example] | list[list[Example]] = pack_groups(examples, seq_len)
        else:
            self.rows = examples
        self.epoch, self.index = 0, 0
        self.last: Batch | None = None  # the batch next_batch returned last (the loop counts its tokens)
        self._order: tuple[int, list[int]] | None = None  # (epoch, its permutation), computed once per epoch

    def __len__(self) -> int:
        """Batches per epoch."""
        return math.ceil(len(self.rows) / self.batch_size)

    def order(self, epoch: int) -> list[int]:
        """The rows of `epoch`, in the order they are visited."""
        if self._order is None or self._order[0] != epoch:
            order = list(range(len(self.rows)))
            if self.shuffle:
                random.Random(f"minillm-sft:{self.seed}:{epoch}").shuffle(order)
            self._order = (epoch, order)
        return self._order[1]

    def batch(self, rows: Sequence[int]) -> Batch:
        chosen = [self.rows[i] for i in rows]
        if self.packing:
            return stack([packed_row(group, self.seq_len, self.pad_id) for group in chosen]).to(self.device)
        return pad_batch(chosen, self.pad_id).to(self.device)

    def next_batch(self) -> Batch:
        if self.index == len(self):
            self.epoch, self.index = self.epoch + 1, 0
        start = self.index * self.batch_size
        self.index += 1
        self.last = self.batch(self.order(self.epoch)[start: start + self.batch_size])
        return self.last

    def __iter__(self) -> Iterator[Batch]:
        """One epoch in the order of epoch 0, without moving the state (for evaluation)."""
        order = self.order(0)
        for start in range(0, len(order), self.batch_size):
            yield self.batch(order[start: start + self.batch_size])

    @property
    def progress(self) -> float:
        """Epochs done, as a fraction (1.5: half way through the second)."""
        return self.epoch + self.index / len(self)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def _examples_digest(examples: Sequence[Example]) -> str:
    """A SHA-256 of the examples' ids and masks: a resumed run checks that its data did not change."""
    h = hashlib.sha256()
    for ex in examples:
        h.update(np.asarray(ex.ids, dtype=np.int64).tobytes())
        h.update(np.asarray(ex.mask, dtype=np.bool_).tobytes())
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# LoRA and the chat tokens' rows


def _train_new_rows(model: LLM, first_new: int) -> list[nn.Parameter]:
    """Under LoRA, let the embedding and output rows of the new ids (>= first_new) train; returns the
    matrices that hold them.

    apply_lora freezes the embedding, but the chat tokens' rows start at the mean of the old rows:
    frozen, the four would stay identical, and the model could never tell <|user|> from <|end|>, nor
    give <|end|> a higher logit than the others (greedy decoding would then never stop). The rows are
    new parameters with nothing pretrained in them, so they train; the old rows get a zero gradient
    (a hook), and with no weight decay on these matrices (see finetune) AdamW leaves them exactly as
    they were. The rows that train are few (4 * d_model per matrix) next to the adapters; the price of
    this simple way is AdamW's moments for the whole matrices (an optimizer.pt of about the model's size).
    """
    mats = list({id(p): p for p in (model.token_embedding.weight, model.lm_head.weight)}.values())  # tied: once
    if first_new >= model.cfg.vocab_size:
        return []
    for p in mats:
        p.requires_grad_(True)
        p.register_hook(lambda g: torch.cat([torch.zeros_like(g[:first_new]), g[first_new:]]))
    return mats


def _plain_copy(model: LLM) -> LLM:
    """The model with its adapters folded into the weights (a copy; the training model keeps its adapters)."""
    if not lora.lora_layers(model):
        return model
    # A deep copy costs one more model in memory for the time of a checkpoint, which is the price of
    # keeping the training model's adapters and optimizer state untouched.
    return lora.merge_lora(copy.deepcopy(model))


# --------------------------------------------------------------------------------------------
# The run


@dataclass
class SFTResult:
    """What a fine-tuning run ends with (also in metrics.jsonl)."""

    run: Path
    step: int
    max_steps: int = 0
    epochs: float = 0.0  # epochs done, as a fraction
    loss: float | None = None  # the last logged training loss
    val_loss: float | None = None  # the masked loss over the validation split (None if it is empty)
    fit: dict[str, dict[str, int]] = field(default_factory=dict)  # per split: kept, truncated, dropped, no_target
    trainable: int = 0
    total: int = 0
    samples: list[tuple[str, str]] = field(default_factory=list)  # (request, greedy answer) at the end
    tokens_per_s: float = 0.0  # input positions (padding included) per second of training
    seconds: float = 0.0


def _fit_counts(fitted: Fitted) -> dict[str, int]:
    return {"kept": len(fitted.examples), "truncated": fitted.truncated, "dropped_too_long": fitted.dropped_too_long,
            "no_target": fitted.no_target}


def _base_folder(base: str) -> Path:
    """The checkpoint folder a base path names (a checkpoint, or a run's latest); errors name the fix."""
    if not base:
        raise SFTError("no base model: give the pretrained run or checkpoint to start from, base=runs/tiny "
                       "(minillm sft --from runs/tiny)")
    path = Path(base)
    folder = path if (path / "state.json").exists() else latest_checkpoint(path) if path.is_dir() else None
    if folder is None:
        load_for_inference(path)  # raises the CheckpointError that names what is missing and the fix
        raise SFTError(f"{path}: not a checkpoint or run folder")  # not reached: load_for_inference raised
    return folder


@dataclass
class _Model:
    """The model a run trains, and what its checkpoints need to know about it."""

    model: LLM
    template: ChatTemplate
    no_decay: list[nn.Parameter]  # under LoRA: the matrices whose new rows train (kept out of weight decay)
    adapter_base: str  # under LoRA: the fingerprint of the resized base, which the adapter file records
    trainable: int
    total: int


def _prepare_model(cfg: SFTConfig, base: Path | None, ckpt: Path | None, device: torch.device) -> _Model:
    """The model to train, with the chat tokens (and LoRA), restored from `ckpt` when resuming.

    A full fine-tuning run resumes from its own checkpoint (the weights, the vocabulary resized, the
    tokenizer with the chat tokens). A LoRA run always starts from the base: its checkpoints hold the
    merged weights, from which the frozen base cannot be recovered exactly, so it reloads the base,
    resizes it as before, and takes the adapter and the chat tokens' rows from the checkpoint.
    """
    lora_run = cfg.lora_rank > 0
    model, tok = load_for_inference(ckpt if ckpt is not None and not lora_run else base, device)
    base_vocab = model.cfg.vocab_size
    template = ChatTemplate.for_tokenizer(tok)
    resize_vocab(model, max(base_vocab, template.tokenizer.vocab_size))
    model.train()
    if not lora_run:
        return _Model(model, template, [], "", *lora.count_parameters(model))
    adapter_base = lora.fingerprint(model)  # of the resized base: the adapter belongs to it
    try:
        if ckpt is not None:  # rank, alpha and targets from the file, whose base fingerprint must match
            lora.load_adapter(ckpt / ADAPTER_FILE, model, base_fingerprint=adapter_base)
        else:
            lora.apply_lora(model, cfg.lora_rank, cfg.lora_alpha or None)
    except lora.LoRAError as e:
        raise SFTError(str(e)) from None
    smallest = min(min(m.in_features, m.out_features) for m in lora.lora_layers(model).values())
    if cfg.lora_rank > smallest:
        raise SFTError(f"lora_rank={cfg.lora_rank} is larger than the smallest adapted layer ({smallest} wide): a "
                       f"rank-{cfg.lora_rank} update is no cheaper than the matrix itself; use lora_rank <= {smallest} "
                       "(4 to 64 is usual), or lora_rank=0 for full fine-tuning")
    if ckpt is not None:  # the chat tokens' rows as trained (the old rows in the file are the base's, bit for bit)
        from safetensors import safe_open

        with safe_open(str(ckpt / "model.safetensors"), framework="pt", device=str(device)) as f, torch.no_grad():
            for name in {"token_embedding.weight", "lm_head.weight"} & set(f.keys()):
                model.get_parameter(name).copy_(f.get_tensor(name))
    # The rows past the base tokenizer's ids train: the chat tokens' (and any unused rows of a padded vocabulary).
    first_new = min(base_vocab, tok.vocab_size)
    no_decay = _train_new_rows(model, first_new)
    trainable, total = lora.count_parameters(model)
    trainable -= sum(p[:first_new].numel() for p in no_decay)  # of those matrices, only the new rows train
    return _Model(model, template, no_decay, adapter_base, trainable, total)


@dataclass
class _Data:
    fitted: dict[str, Fitted]  # "train" and "val"
    train: ExampleBatches
    val: ExampleBatches | None  # None: nothing held out fits
    requests: list[Conversation]  # held-out requests answered at each sampling
    digest: str  # of the training examples: a resumed run checks that they did not change


def _prepare_data(cfg: SFTConfig, template: ChatTemplate, seq_len: int, device: torch.device) -> _Data:
    """The examples, encoded and fitted into seq_len (counted, never dropped silently), and batched."""
    pairs = stdlib_pairs() if cfg.data == "stdlib" else load_jsonl(cfg.data)  # a DataError names FILE:LINE
    splits = split_pairs(pairs, cfg.val_fraction, cfg.test_fraction)
    fitted = {name: fit((template.encode(c) for c in splits[name]), seq_len, cfg.too_long) for name in ("train", "val")}
    if not fitted["train"].examples:
        raise SFTError(f"no training example fits seq_len={seq_len} ({fitted['train'].report()}); raise seq_len, "
                       "or set too_long=truncate to keep examples whose prompt is too long")
    if not cfg.mask_prompt:  # every token a target, the first of each example aside (nothing predicts it)
        unmasked = [Example(e.ids, (False,) + (True,) * (len(e) - 1), e.source) for e in fitted["train"].examples]
        fitted["train"] = dataclasses.replace(fitted["train"], examples=unmasked)
    train = ExampleBatches(fitted["train"].examples, cfg.batch_size, seq_len, packing=cfg.packing, seed=cfg.seed,
                           device=device)
    val = None
    if fitted["val"].examples:
        val = ExampleBatches(fitted["val"].examples, cfg.batch_size, seq_len, packing=cfg.packing, shuffle=False,
                             device=device)
    else:
        warnings.warn(f"the validation split of {cfg.data} is empty after fitting ({fitted['val'].report()}), so the run "
                      "reports no validation loss; give more data or raise val_fraction", stacklevel=3)
    room = seq_len - cfg.sample_tokens  # a request is answered only if its answer fits the context
    requests = [c for c in splits["val"] if len(template.prompt(c.prompt)) <= room][: cfg.samples] if val else []
    return _Data(fitted, train, val, requests, _examples_digest(fitted["train"].examples))


def _check_resume(saved: dict[str, Any], cfg: SFTConfig) -> None:
    if saved.get("kind") != "sft":
        raise SFTError(f"{cfg.out} holds a checkpoint of another kind of run (not minillm sft); choose another out=")
    old = SFTConfig.from_dict(saved["config"])
    changed = [k for k in _FIXED_ON_RESUME if getattr(old, k) != getattr(cfg, k)]
    if changed:
        raise SFTError(f"cannot resume with a different {', '.join(changed)} (the checkpoint has "
                       f"{', '.join(f'{k}={getattr(old, k)!r}' for k in changed)}); keep them, or start a new run")


@dataclass
class LoopResult:
    step: int  # where the loop stopped: max_steps
    loss: float | None  # the last training loss
    tokens_per_s: float  # input positions (padding included) per second of training, pauses left out


def run_steps(model: nn.Module, optimizer: torch.optim.Optimizer, batches: ExampleBatches, cfg: Any, schedule: Any, *,
              step: int, steps: int, loss_fn: Callable[[nn.Module, Any], Tensor], amp: Any, log: RunLog, desc: str,
              progress: bool, row: Callable[[], dict[str, float]] | None = None,
              every: Sequence[tuple[int, Callable[[int], object]]] = ()) -> LoopResult:
    """The fine-tuning loop (of `finetune` and `dpo.preference_tune`): from `step` to `steps`, one
    `train.train_step` each, with the schedule's learning rate, a log row every cfg.log_every steps
    (loss, `row()`'s values, lr, gradient norm, epochs, tokens/s) and, for each (n, action) of
    `every`, action(step) every n steps before the last (n = 0: never). Time spent in the actions is
    not training time: the throughput leaves it out."""
    from tqdm import tqdm

    strategy = SingleDevice()
    bar = tqdm(total=steps, initial=step, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    window_start, window_tokens, train_seconds, train_tokens = time.perf_counter(), 0, 0.0, 0
    loss = None
    try:
        while step < steps:
            lr = lr_at(step, schedule)
            for group in optimizer.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            last = train_step(model, optimizer, batches.next_batch, step=step + 1, loss_fn=loss_fn,
                              grad_clip=cfg.grad_clip, amp=amp, strategy=strategy)
            step += 1
            window_tokens += batches.last.x.numel()
            loss = last.loss
            if cfg.log_every and (step % cfg.log_every == 0 or step == steps):
                elapsed = time.perf_counter() - window_start
                train_seconds, train_tokens = train_seconds + elapsed, train_tokens + window_tokens
                log.log({"step": step, "loss": last.loss, **(row() if row else {}), "lr": lr, "grad_norm": last.grad_norm,
                         "epoch": batches.progress, "tokens_per_s": window_tokens / elapsed})
                bar.set_postfix(loss=f"{last.loss:.3f}", refresh=False)
            bar.update(1)
            paused = time.perf_counter()  # evaluation, samples and checkpoints do not count as training time
            for n, action in every:
                if n and step % n == 0 and step < steps:
                    action(step)
            if cfg.log_every and step % cfg.log_every == 0:
                window_start, window_tokens = time.perf_counter(), 0
            else:
                window_start += time.perf_counter() - paused
    finally:
        bar.close()
    return LoopResult(step, loss, train_tokens / train_seconds if train_seconds else 0.0)


def save_run_checkpoint(run: Path, step: int, model: LLM, optimizer: torch.optim.Optimizer, tokenizer: Tokenizer,
                        cfg: Any, state: dict[str, Any], adapter_base: str) -> None:
    """checkpoints/step_N of a fine-tuning run: the merged weights (and the adapter file under LoRA),
    then the oldest checkpoints beyond cfg.keep_checkpoints removed."""
    folder = run / "checkpoints" / f"step_{step:07d}"
    folder.parent.mkdir(exist_ok=True)

    def adapter(tmp: Path) -> list[str]:
        lora.save_adapter(tmp / ADAPTER_FILE, model, base_fingerprint=adapter_base)
        return [ADAPTER_FILE]

    save_checkpoint(folder, _plain_copy(model), optimizer, tokenizer, cfg, state, adapter if cfg.lora_rank else None)
    for old in _checkpoints(run)[:-cfg.keep_checkpoints or None]:
        shutil.rmtree(old)


def finetune(cfg: SFTConfig, *, resume: bool = False, force: bool = False, progress: bool | None = None) -> SFTResult:
    """Fine-tune the base model `cfg.base` on instruction data, as `cfg` says; with `resume`, continue
    the run in cfg.out from its latest checkpoint.

    The base's weights and tokenizer are loaded, the chat tokens added (ChatTemplate, resize_vocab),
    LoRA applied if lora_rank > 0, the examples encoded and fitted into seq_len (fit's counts go to
    metrics.jsonl), batched (ExampleBatches) and trained with `train.train_step` and `sft_loss`. The
    validation loss is the mean over the answers' tokens. Each checkpoint is a `train.save_checkpoint`
    folder that `load_for_inference` reads: the full weights (LoRA merged in), the tokenizer with the
    chat tokens, the optimizer, the batches' position and every RNG, plus the adapter file under LoRA.
    On the CPU a resumed run equals an uninterrupted one to the bit: the weights, the optimizer state,
    the batches' position and the RNGs are in each checkpoint, the learning rate is a function of the
    step, and samples are greedy.
    """
    progress = sys.stderr.isatty() if progress is None else progress
    start_time = time.perf_counter()
    strategy = SingleDevice()

    # Everything that can be checked is checked before the run folder is touched.
    saved: dict[str, Any] | None = None
    ckpt: Path | None = None
    if resume:
        run, ckpt = _open_run(cfg, True, False, strategy)
        saved = load_checkpoint(ckpt, None, restore_rng=False)  # checksums first, then the fixed settings
        _check_resume(saved, cfg)
    base = _base_folder(cfg.base) if not resume or cfg.lora_rank else None  # full fine-tuning resumes without it
    if base is not None and not resume:
        out = Path(cfg.out).resolve()
        if out == base.resolve() or out in base.resolve().parents:
            raise SFTError(f"the base {base} is inside out={cfg.out}, which a new run replaces; choose another out=")
        if not force and out.exists() and any(out.iterdir()):
            _open_run(cfg, False, False, strategy)  # raises the error that names --resume and --force, before any work

    random.seed(cfg.seed)
    np.random.seed(cfg.seed % 2**32)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    amp = autocast(device, resolve_dtype(cfg.dtype, device))

    m = _prepare_model(cfg, base, ckpt, device)
    model, template = m.model, m.template
    seq_len = cfg.seq_len or model.cfg.max_seq_len
    if seq_len > model.cfg.max_seq_len:
        raise SFTError(f"seq_len ({seq_len}) exceeds the base model's context (max_seq_len={model.cfg.max_seq_len}); "
                       f"lower seq_len to {model.cfg.max_seq_len} or less, or 0 for the context (positions beyond it "
                       "were never trained)")
    data = _prepare_data(cfg, template, seq_len, device)
    steps = cfg.max_steps or cfg.epochs * len(data.train)
    schedule = dataclasses.replace(cfg, max_steps=steps)  # what lr_at reads: max_steps resolved from the epochs
    optimizer = build_optimizer(model, cfg, device, no_decay=m.no_decay)
    step = 0
    if saved is not None:
        if saved["data_digest"] != data.digest:
            raise SFTError(f"the training examples of data={cfg.data} changed since the checkpoint (they hash "
                           "differently); resume with the same data, or start a new run")
        load_checkpoint(ckpt, None, optimizer)  # the optimizer state and every RNG
        data.train.load_state_dict(saved["sampler"])
        step = saved["step"]
    else:
        run, _ = _open_run(cfg, False, force, strategy)
        atomic_write(run / "config.toml", config_to_toml(cfg))

    log = RunLog(run, cfg, True, step if saved is not None else None)
    result = SFTResult(run, step, steps, fit={k: _fit_counts(v) for k, v in data.fitted.items()}, trainable=m.trainable,
                       total=m.total)
    try:
        def eval_row(kind: str, at: int) -> dict[str, Any] | None:
            if data.val is None:
                return None
            batches = itertools.islice(data.val, cfg.eval_batches or None)
            loss, n = evaluate(model, batches, loss_fn=sft_loss, amp=amp, count_targets=lambda b: b.targets)
            row = {"step": at, "kind": kind, "val_loss": loss, "val_targets": n}
            if kind == "final":
                row["final"] = True  # written again when a resumed run ends
            log.log(row)
            return row

        def answers(at: int, final: bool = False) -> list[tuple[str, str]]:
            """Greedy answers to the held-out requests (no RNG is drawn: a resumed run writes the same)."""
            if not data.requests:
                return []
            from minillm.generate import generate

            with amp:
                out = generate(model, [template.prompt(c.prompt) for c in data.requests], max_new_tokens=cfg.sample_tokens,
                               temperature=0.0, eos_id=template.end_id)
            pairs = [(c.user, template.reply(ids)) for c, ids in zip(data.requests, out)]
            for request, reply in pairs:
                log.sample(at, request, reply, final=final)
            return pairs

        def checkpoint(at: int) -> None:
            state = {"step": at, "kind": "sft", "sampler": data.train.state_dict(), "config": cfg.to_dict(),
                     "base": str(base if base is not None else saved["base"]), "data_digest": data.digest,
                     "fit": result.fit}
            save_run_checkpoint(run, at, model, optimizer, template.tokenizer, cfg, state, m.adapter_base)

        for tmp in (run / "checkpoints").glob(".step_*.tmp"):  # a checkpoint cut short by a crash
            shutil.rmtree(tmp, ignore_errors=True)
        if saved is None:
            log.log({"step": 0, "kind": "data", "seq_len": seq_len, "rows": len(data.train.rows),
                     "batches_per_epoch": len(data.train), "max_steps": steps, "trainable": m.trainable, "total": m.total,
                     **{f"{split}_{k}": v for split, counts in result.fit.items() for k, v in counts.items()}})
            if cfg.eval_every:
                eval_row("eval", 0)  # the base model's masked loss: where fine-tuning starts from
            if cfg.sample_every:
                answers(0)

        loop = run_steps(model, optimizer, data.train, cfg, schedule, step=step, steps=steps, loss_fn=sft_loss, amp=amp,
                         log=log, desc="fine-tuning", progress=progress,
                         every=[(cfg.eval_every, lambda at: eval_row("eval", at)), (cfg.sample_every, answers),
                                (cfg.checkpoint_every, checkpoint)])
        step = loop.step
        if not (saved is not None and saved["step"] == step):
            checkpoint(step)
        final = eval_row("final", step)
        result.step, result.epochs, result.loss = step, data.train.progress, loop.loss
        result.val_loss = final["val_loss"] if final else None
        result.tokens_per_s = loop.tokens_per_s
        result.samples = answers(step, final=True)
    finally:
        log.close()
    result.seconds = time.perf_counter() - start_time
    return result
