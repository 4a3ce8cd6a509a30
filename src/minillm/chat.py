"""Talking to a fine-tuned model: a conversation that fits the context, and the `minillm chat` REPL.

    session = ChatSession(model, template, temperature=0.7, top_p=0.9)
    for piece in session.stream("Write a Python function that reverses a list."):
        print(piece, end="")                     # the answer, as it is written
    session.reset()                              # a new conversation (the system prompt stays)

Each turn renders the whole conversation with the chat template of `minillm.sft` and asks the model
for the assistant's next answer, which ends at <|end|>. When the conversation no longer leaves room
for an answer within the model's context, the oldest turns are dropped (a user question together
with its answer; the system prompt stays), and the session says how many it dropped.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import TextIO

import torch

from minillm.generate import check_sampling_args, generate
from minillm.instructions import Message
from minillm.model import LLM
from minillm.sft import ChatTemplate, SFTError

__all__ = ["ChatSession", "load_chat", "repl"]


class ChatSession:
    """A conversation with a model fine-tuned on the chat template (see the module's docstring)."""

    def __init__(self, model: LLM, template: ChatTemplate, *, system: str | None = None, temperature: float = 0.7,
                 top_p: float | None = 0.9, max_new_tokens: int | None = None, seed: int | None = None) -> None:
        check_sampling_args(temperature, None, top_p)
        if model.cfg.vocab_size < template.tokenizer.vocab_size:
            raise SFTError(f"the model has {model.cfg.vocab_size} token ids but the chat template needs "
                           f"{template.tokenizer.vocab_size}; load a checkpoint written by `minillm sft`")
        if max_new_tokens is None:  # an answer may take up to half the context
            max_new_tokens = max(1, model.cfg.max_seq_len // 2)
        if max_new_tokens < 1 or max_new_tokens >= model.cfg.max_seq_len:
            raise SFTError(f"max_new_tokens={max_new_tokens} must be between 1 and the context less one "
                           f"({model.cfg.max_seq_len - 1})")
        self.model, self.template = model, template
        self.system = system
        self.sampling = dict(temperature=temperature, top_p=top_p)
        self.max_new_tokens = max_new_tokens
        self.generator = None if seed is None else torch.Generator(device="cpu").manual_seed(seed)
        self.turns: list[Message] = []
        self.dropped = 0  # turns dropped from the start of the conversation so far

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.turns, self.dropped = [], 0

    def _messages(self) -> list[Message]:
        return ([Message("system", self.system)] if self.system else []) + self.turns

    def _fit(self) -> int:
        """Drop the oldest question-and-answer pairs until the prompt leaves room for an answer; returns
        how many messages went, after checking that the newest question fits on its own."""
        budget = self.model.cfg.max_seq_len - self.max_new_tokens + 1  # generate feeds prompt + n - 1 positions
        gone = 0
        while len(self.template.prompt(self._messages())) > budget:
            if len(self.turns) <= 1:
                self.turns.clear()
                raise SFTError(f"the question alone is longer than the room the context leaves ({budget} tokens "
                               f"with max_new_tokens={self.max_new_tokens}); ask a shorter one or lower max_new_tokens")
            del self.turns[:2]
            gone += 2
        self.dropped += gone
        return gone

    def stream(self, text: str) -> Iterator[str]:
        """Ask `text`; yields the answer in pieces as it is written, and keeps it in the conversation."""
        self.turns.append(Message("user", text))
        try:
            self._fit()
            prompt = self.template.prompt(self._messages())  # a special token in `text` is refused here
        except SFTError:
            if self.turns and self.turns[-1].content == text:
                self.turns.pop()
            raise
        end = self.template.end_id
        events = generate(self.model, [prompt], max_new_tokens=self.max_new_tokens, eos_id=end,
                          generator=self.generator, stream=True, **self.sampling)
        ids: list[int] = []

        def answer() -> Iterator[int]:  # the new tokens up to <|end|>, kept for the conversation
            for _, token in events:
                if token == end:
                    return
                ids.append(token)
                yield token

        yield from self.template.tokenizer.decode_stream(answer())
        self.turns.append(Message("assistant", self.template.tokenizer.decode(ids)))

    def ask(self, text: str) -> str:
        """Ask `text` and return the whole answer."""
        return "".join(self.stream(text))


def load_chat(path: str, device: str = "cpu") -> tuple[LLM, ChatTemplate]:
    """The model and chat template of a checkpoint written by `minillm sft` (a run folder or a checkpoint)."""
    from minillm.train import load_for_inference

    model, tokenizer = load_for_inference(path, device)
    try:
        template = ChatTemplate(tokenizer)
    except SFTError:
        raise SFTError(f"{path}: its tokenizer has no chat tokens, so it is not a fine-tuned model; fine-tune it "
                       "first with `minillm sft --from PATH`, or use `minillm sample` for plain continuation") from None
    return model, template


HELP = "Type a request. /reset starts a new conversation, /quit (or Ctrl-D) leaves."


def repl(session: ChatSession, stdin: TextIO | None = None, stdout: TextIO | None = None,
         interactive: bool | None = None) -> int:
    """Read requests line by line and print the answers as they are written; returns an exit status.

    Interactive (a terminal): a prompt, streaming, and notes about dropped turns on stderr. Piped:
    one answer per input line, in order, each followed by a blank line (an answer may hold newlines
    of its own), so that a program can feed requests and read the answers.
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty() if interactive is None else interactive
    if interactive:
        print(HELP, file=stdout)
    while True:
        if interactive:
            print("> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:  # end of input
            break
        text = line.rstrip("\n")
        command = text.strip()
        if command == "/quit":
            break
        if command == "/reset":
            session.reset()
            if interactive:
                print("(a new conversation)", file=stdout)
            continue
        if not command:
            continue
        before = session.dropped
        try:
            for piece in session.stream(text):
                print(piece, end="", file=stdout, flush=True)
        except SFTError as e:
            print(f"(error: {e})", file=sys.stderr)
            if not interactive:
                print(file=stdout)
            continue
        print(file=stdout, flush=True)
        if not interactive:
            print(file=stdout, flush=True)
        if session.dropped > before:
            print(f"(dropped the {session.dropped - before} oldest messages to fit the context)", file=sys.stderr)
    return 0
