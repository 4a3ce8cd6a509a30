"""Sampling and generation: how a trained model writes text (chapter 06).

    logits -> repetition penalty -> temperature -> top-k -> top-p -> min-p -> draw one token

`sample_token` turns one row of logits per sequence into one token each; `generate` runs the model
on a batch of prompts of different lengths, left-padded into one tensor, with the KV cache; and
`stream_text` yields the text of one prompt's continuation as it is written.

Left padding, because every row must end at the same place: the next token of every row is read
from the last column. The pad slots are masked out of attention (and stay in the cache, masked),
and each row's positions start at 0 at its first real token, so a row computes what it would alone
(up to float rounding: see tests/test_generate.py).
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from minillm.model import LLM, _is_int, _is_real, check_sampling, draw, filter_logits
from minillm.tokenizer import Tokenizer

__all__ = ["check_sampling_args", "process_logits", "sample_token", "generate", "stream_text"]


def check_sampling_args(temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                        min_p: float | None = None, repetition_penalty: float = 1.0) -> None:
    """Raise ValueError, naming the argument and its range, for a setting that cannot work."""
    check_sampling(temperature, top_k, top_p)
    if min_p is not None and not (_is_real(min_p) and 0.0 <= min_p <= 1.0):
        raise ValueError(f"min_p must be in [0, 1], or None, got {min_p!r}")
    if not (_is_real(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"repetition_penalty must be a finite number > 0 (1.0 is none; above 1 discourages repeats), "
                         f"got {repetition_penalty!r}")


def process_logits(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                   min_p: float | None = None, repetition_penalty: float = 1.0, previous: Tensor | None = None) -> Tensor:
    """The logits (B, V) that `sample_token` draws from: penalized, scaled, and -inf where filtered out.

    The repetition penalty (Keskar et al., 2019, "CTRL") makes every token already in `previous`
    (B, N) less likely: a positive logit is divided by the penalty, a negative one multiplied, so a
    penalty above 1 always lowers it. Ids below 0 in `previous` are ignored (padding). Then, unless
    the temperature is 0 (greedy: nothing else matters), temperature, top-k and top-p
    (`minillm.model.filter_logits`), and min-p (Nguyen et al., 2024): keep the tokens whose
    probability is at least min_p times the largest one's, a cut that follows the model's confidence.
    """
    check_sampling_args(temperature, top_k, top_p, min_p, repetition_penalty)
    if not isinstance(logits, Tensor) or logits.dim() != 2 or not logits.is_floating_point() or logits.size(1) == 0:
        raise ValueError(f"logits must be a floating-point tensor of shape (batch, vocab), got "
                         f"{tuple(logits.shape) if isinstance(logits, Tensor) else type(logits).__name__}"
                         f"{'' if not isinstance(logits, Tensor) else f' ({logits.dtype})'}; take logits[:, -1] of the model's output")
    if repetition_penalty != 1.0 and previous is not None:
        logits = _penalize(logits, previous, repetition_penalty)
    if temperature == 0:
        return logits
    logits = filter_logits(logits, temperature, top_k, top_p)
    if min_p:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def _penalize(logits: Tensor, previous: Tensor, penalty: float) -> Tensor:
    B, V = logits.shape
    if not isinstance(previous, Tensor) or previous.dim() != 2 or previous.size(0) != B or previous.is_floating_point():
        raise ValueError(f"previous must be an integer tensor of token ids of shape ({B}, N), one row per row of the logits, "
                         f"got {tuple(previous.shape) if isinstance(previous, Tensor) else type(previous).__name__}")
    if previous.numel() and int(previous.max()) >= V:
        raise ValueError(f"previous holds the id {int(previous.max())}, outside the vocabulary of {V} tokens")
    # A token seen several times is penalized once. scatter_add, not scatter: the pad entries (ids < 0,
    # sent to column 0 with weight 0) must not overwrite a real 0 written by another entry.
    counts = torch.zeros(B, V, device=logits.device).scatter_add_(
        1, previous.clamp(min=0).to(logits.device), (previous >= 0).float().to(logits.device))
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(counts > 0, penalized, logits)


def sample_token(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                 min_p: float | None = None, repetition_penalty: float = 1.0, previous: Tensor | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
    """One token per row of `logits` (B, V) -> (B,): greedy at temperature 0, else drawn after
    `process_logits`. Without min_p and the penalty it draws exactly what `sample_next` draws."""
    logits = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=repetition_penalty, previous=previous)
    return logits.argmax(-1) if temperature == 0 else draw(logits, generator)


# -- generation -----------------------------------------------------------------------------------


def _prompt_ids(prompts: Sequence[Sequence[int]] | Sequence[str], tokenizer: Tokenizer | None, vocab_size: int) -> list[list[int]]:
    """The prompts as lists of ids, checked: at least one prompt, each non-empty and in the vocabulary."""
    if isinstance(prompts, (str, Tensor)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of prompts, each a string or a list of token ids; "
                         "for one prompt, pass [prompt]")
    rows = []
    for n, p in enumerate(prompts):
        if isinstance(p, str):
            if tokenizer is None:
                raise ValueError("the prompts are text: pass tokenizer= to encode them, or pass lists of token ids")
            p = tokenizer.encode(p, allowed_special="all")  # '<|endoftext|>' in a prompt starts a new document
        elif isinstance(p, Tensor) and p.dim() == 1:
            p = p.tolist()
        if _is_int(p) or not isinstance(p, Sequence) or not all(_is_int(i) for i in p):
            raise ValueError(f"prompt {n} must be a string or a list of token ids, got {type(p).__name__}; "
                             "a single prompt's ids go in a list of their own: [ids]")
        if not p:
            raise ValueError(f"prompt {n} is empty; give at least one token (to start from nothing, "
                             "use the tokenizer's '<|endoftext|>', which begins every document)")
        if not all(0 <= i < vocab_size for i in p):
            raise ValueError(f"prompt {n} holds ids outside the model's vocabulary of {vocab_size} tokens "
                             f"(from {min(p)} to {max(p)}); is this the tokenizer the model was trained with?")
        rows.append([int(i) for i in p])
    return rows


@contextlib.contextmanager
def _evaluating(model: LLM) -> Iterator[None]:
    """Eval mode and inference mode around one step, the training flag restored even after an error.

    Per step, not around the whole loop: with stream=True the caller's code runs between the steps,
    and must find the model and torch's grad mode as it left them.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield
    finally:
        model.train(was_training)


def generate(model: LLM, prompts: Sequence[Sequence[int]] | Sequence[str], *, tokenizer: Tokenizer | None = None,
             max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
             min_p: float | None = None, repetition_penalty: float = 1.0, eos_id: int | None = None,
             pad_id: int | None = None, generator: torch.Generator | None = None,
             stream: bool = False) -> list[list[int]] | Iterator[tuple[int, int]]:
    """Continue each prompt by up to `max_new_tokens` tokens; returns one list of new ids per prompt.

    `prompts` are lists of token ids, or strings with `tokenizer`. They are left-padded into one batch
    (with `pad_id`, default eos_id or 0; pad slots are masked, so any id works), read in one forward
    pass, then extended one token per step with the KV cache, which takes the autocast dtype when
    autocast is on. A row that produces `eos_id` stops (its list ends with it); the loop ends when
    every row has. The sampling arguments are those of `sample_token`; the penalty counts the
    prompt's tokens and the new ones. Every argument is checked before anything runs.

    With stream=True, returns an iterator of (row, token id) events instead, in the order the tokens
    are made (the model runs as it is consumed, so autocast must be on while iterating).
    """
    if not isinstance(model, LLM):
        raise ValueError(f"model must be a minillm LLM, got {type(model).__name__}")
    check_sampling_args(temperature, top_k, top_p, min_p, repetition_penalty)
    V, context = model.cfg.vocab_size, model.cfg.max_seq_len
    rows = _prompt_ids(prompts, tokenizer, V)
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    for name, value in (("eos_id", eos_id), ("pad_id", pad_id)):
        if value is not None and not (_is_int(value) and 0 <= value < V):
            raise ValueError(f"{name} must be a token id in [0, {V}) for the model's vocabulary of {V} tokens, or None; got {value!r}")
    # As in LLM.generate: the last new token is never fed back, so T + n - 1 positions.
    longest = max(map(len, rows))
    needed = longest + max(max_new_tokens - 1, 0)
    if needed > context:
        raise ValueError(f"the {'longest ' if len(rows) > 1 else ''}prompt ({longest} tokens) + max_new_tokens ({max_new_tokens}) "
                         f"feeds {needed} positions through the model, which exceeds the context of {context} tokens; "
                         "ask for fewer tokens or shorten the prompt")
    sampling = dict(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty)
    pad = pad_id if pad_id is not None else eos_id if eos_id is not None else 0
    events = _decode(model, rows, max_new_tokens, eos_id, pad, generator, sampling)
    if stream:
        return events
    out: list[list[int]] = [[] for _ in rows]
    for row, token in events:
        out[row].append(token)
    return out


def _decode(model: LLM, rows: list[list[int]], max_new_tokens: int, eos_id: int | None, pad_id: int,
            generator: torch.Generator | None, sampling: dict) -> Iterator[tuple[int, int]]:
    """The loop of `generate`, on checked arguments: yields (row, token) as tokens are made."""
    if max_new_tokens == 0:
        return
    device = model.token_embedding.weight.device
    B, longest = len(rows), max(map(len, rows))
    lengths = torch.tensor([len(r) for r in rows], device=device)
    ids = torch.tensor([[pad_id] * (longest - len(r)) + r for r in rows], device=device)
    padded = bool((lengths < longest).any())
    size = longest + max_new_tokens - 1  # cache slots: the prompt columns and every new token but the last
    if padded:
        # Over all cache slots: False at the left padding; the new tokens are real in every row (after
        # eos a row is fed pad_id, but nothing reads what it computes).
        mask = torch.ones(B, size, dtype=torch.bool, device=device)
        mask[:, :longest] = torch.arange(longest, device=device) >= (longest - lengths)[:, None]
        positions = (mask[:, :longest].long().cumsum(-1) - 1).clamp(min=0)  # 0 at each row's first real token
    # What the repetition penalty counts: the prompt (-1 at padding: no token) and the new tokens.
    penalize = sampling["repetition_penalty"] != 1.0
    previous = ids.masked_fill(~mask[:, :longest], -1) if padded else ids
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_input = ids
    with _evaluating(model):
        caches = model.new_caches(B, size)  # made in inference mode, like every update to them
    for step in range(max_new_tokens):
        with _evaluating(model):
            extra = {}
            if padded:
                S = caches[0].pos + step_input.size(1)
                extra = dict(positions=positions if step == 0 else (lengths + step - 1)[:, None], attention_mask=mask[:, :S])
            logits, _ = model(step_input, caches=caches, last_only=True, **extra)
            nxt = sample_token(logits[:, -1].float(), **sampling, previous=previous if penalize else None, generator=generator)
        if eos_id is not None:
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
        tokens, finished = nxt.tolist(), done.tolist()
        for row in range(B):
            if not finished[row]:
                yield row, tokens[row]
        if eos_id is not None:
            done |= nxt == eos_id
            if bool(done.all()):
                return
        step_input = nxt[:, None]
        if penalize:
            previous = torch.cat([previous, step_input], dim=1)


def stream_text(model: LLM, tokenizer: Tokenizer, prompt: str, **sampling: object) -> Iterator[str]:
    """The continuation of `prompt` as text, in pieces as the tokens come (the arguments of `generate`).

    A piece holds the characters that the new tokens complete: a token that ends inside a multi-byte
    character (one byte of '日', say) waits for the next. The pieces join to
    ``tokenizer.decode(ids)``, where ids are the new tokens before `eos_id` (its text is not shown).
    The arguments are checked now; the model runs as the pieces are consumed.
    """
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a string, got {type(prompt).__name__}; for token ids, use generate(..., stream=True)")
    events = generate(model, [prompt], tokenizer=tokenizer, stream=True, **sampling)
    eos_id = sampling.get("eos_id")
    return tokenizer.decode_stream(itertools.takewhile(lambda t: t != eos_id, (token for _, token in events)))
