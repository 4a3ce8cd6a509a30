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
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor, nn

from minillm.instructions import Conversation, Message
from minillm.model import LLM
from minillm.tokenizer import Tokenizer, TokenizerError

__all__ = [
    "SFTError", "SYSTEM", "USER", "ASSISTANT", "END", "CHAT_TOKENS", "IGNORE", "ChatTemplate", "Example", "Fitted",
    "fit", "Batch", "pad_batch", "pack", "stack", "sft_loss", "resize_vocab",
]

SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
CHAT_TOKENS = (SYSTEM, USER, ASSISTANT, END)
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
IGNORE = -100  # the targets that F.cross_entropy (and LLM.forward) leave out


class SFTError(ValueError):
    """Fine-tuning data or settings that cannot work; the message says what to change."""


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
    rows: list[list[tuple[list[int], list[int]]]] = [[]]
    used = 0
    for ex in examples:
        x, y = _inputs_targets(ex)
        if len(x) > seq_len:
            raise SFTError(f"{ex.source or 'an example'} has {len(x)} inputs, more than seq_len={seq_len}; fit() them first")
        if used + len(x) > seq_len:
            rows.append([])
            used = 0
        rows[-1].append((x, y))
        used += len(x)
    out = []
    for row in rows:
        if not row:
            continue
        x = torch.full((seq_len,), pad_id, dtype=torch.long)
        y = torch.full((seq_len,), IGNORE, dtype=torch.long)
        positions = torch.zeros(seq_len, dtype=torch.long)
        doc = torch.full((seq_len,), -1, dtype=torch.long)  # -1: padding
        at = 0
        for k, (xi, yi) in enumerate(row):
            n = len(xi)
            x[at: at + n], y[at: at + n] = torch.tensor(xi), torch.tensor(yi)
            positions[at: at + n] = torch.arange(n)
            doc[at: at + n] = k
            at += n
        positions[at:] = torch.arange(seq_len - at)  # padding: any valid positions
        same = (doc[:, None] == doc[None, :]) & (doc[:, None] >= 0)  # (T, T): the same example
        out.append(Batch(x[None], y[None], positions[None], same[None]))
    return out


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
