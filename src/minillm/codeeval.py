"""Evaluation by execution: ask a model for held-out functions, run what it writes, count.

    requests = split_pairs(stdlib_pairs())["test"]          docstring -> function pairs never trained on
    report = evaluate_model(model, template, requests)      generate (batched, greedy), then score
    print(report.table())                                   parse, compile and doctest rates

Each answer is scored by `minillm.sandbox.score_function` in a sandboxed child process (a timeout,
resource limits, no network, a temporary folder): never in this process. Three rates, each a share
of what can be asked of it:

- **parses**: `ast.parse` accepts the answer;
- **compiles**: the definition runs and defines the function the request named;
- **passes**: every doctest example of the reference docstring passes, run against the generated
  function in the context of its module (its imports and helpers, as doctest would).

Only the requests whose reference passes its own doctests, here, count for the third rate: a
function whose examples need a network, a subprocess or another platform can never pass, and
counting it would lower the rate for a reason that is not the model's. Those requests are
reported apart. Methods are scored for parsing and compiling only (their examples need an instance
of their class) and reported apart from functions too.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from minillm.generate import generate
from minillm.instructions import Conversation
from minillm.model import LLM
from minillm.sandbox import Score, score_many
from minillm.sft import ChatTemplate, SFTError

__all__ = ["Attempt", "Rates", "EvalReport", "answer_ids", "answer_requests", "code_of", "score_answers", "evaluate_model", "held_out", "load_for_eval", "sft_settings"]


def _name(c: Conversation) -> str:
    return c.meta.get("qualname", "").rsplit(".", 1)[-1]


def _is_method(c: Conversation) -> bool:
    return bool(c.meta.get("class"))


@dataclass(frozen=True)
class Attempt:
    """One request, the model's answer, and its score. `reference_passes` is None without doctests."""

    source: str
    request: str
    answer: str
    finished: bool  # the answer ended with <|end|> before the token budget ran out
    score: Score
    method: bool
    reference_passes: bool | None


@dataclass(frozen=True)
class Rates:
    """Counts for one group of attempts; the rates are shares of `n` (parses, compiles) and of
    `passable` (doctests), None where the denominator is 0."""

    n: int
    parses: int
    compiles: int
    passable: int  # reference has doctests and passes them here
    passes: int
    never_passable: int  # reference has doctests but fails them here

    def rate(self, what: str) -> float | None:
        num, den = {"parses": (self.parses, self.n), "compiles": (self.compiles, self.n),
                    "passes": (self.passes, self.passable)}[what]
        return num / den if den else None

    @classmethod
    def of(cls, attempts: Sequence[Attempt]) -> Rates:
        passable = [a for a in attempts if a.reference_passes]
        return cls(
            n=len(attempts),
            parses=sum(a.score.parses for a in attempts),
            compiles=sum(a.score.compiles for a in attempts),
            passable=len(passable),
            passes=sum(bool(a.score.passes) for a in passable),
            never_passable=sum(a.reference_passes is False for a in attempts),
        )


@dataclass
class EvalReport:
    """The attempts of one evaluation and their rates, functions and methods apart."""

    attempts: list[Attempt]
    skipped: int = 0  # requests whose prompt leaves too little of the context for an answer
    functions: Rates = field(init=False)
    methods: Rates = field(init=False)

    def __post_init__(self) -> None:
        self.functions = Rates.of([a for a in self.attempts if not a.method])
        self.methods = Rates.of([a for a in self.attempts if a.method])

    def table(self) -> str:
        """The rates as a small text table (at most 88 columns)."""
        def pct(r: Rates, what: str) -> str:
            v = r.rate(what)
            return "-" if v is None else f"{100 * v:.1f}%"

        f, m = self.functions, self.methods
        lines = [
            f"{'':10}{'asked':>7}{'parse':>9}{'compile':>9}{'doctests pass':>15}",
            f"{'functions':10}{f.n:>7}{pct(f, 'parses'):>9}{pct(f, 'compiles'):>9}"
            f"{pct(f, 'passes'):>8} of {f.passable:<3}",
            f"{'methods':10}{m.n:>7}{pct(m, 'parses'):>9}{pct(m, 'compiles'):>9}{'-':>8}",
        ]
        notes = []
        if f.never_passable:
            notes.append(f"{f.never_passable} function(s) whose reference fails its own doctests here, not counted")
        if self.skipped:
            notes.append(f"{self.skipped} request(s) skipped: the prompt leaves too little of the context")
        unfinished = sum(not a.finished for a in self.attempts)
        if unfinished:
            notes.append(f"{unfinished} answer(s) cut off by the token budget")
        return "\n".join(lines + notes)

    def to_dict(self) -> dict[str, object]:
        """The counts and rates, for a JSON log."""
        out: dict[str, object] = {"skipped": self.skipped}
        for group, r in (("functions", self.functions), ("methods", self.methods)):
            out[group] = {**r.__dict__, **{f"{w}_rate": r.rate(w) for w in ("parses", "compiles", "passes")}}
        return out


def code_of(answer: str) -> str:
    """The code in an answer: the text itself, or the inside of its first Markdown code fence."""
    if "```" in answer:
        inside = answer.split("```", 2)[1]
        first, _, rest = inside.partition("\n")
        return rest if first.strip().isidentifier() or not first.strip() else inside
    return answer


def answer_ids(model: LLM, template: ChatTemplate, requests: Sequence[Conversation], *,
               max_new_tokens: int = 192, temperature: float = 0.0, batch_size: int = 16, seed: int = 0,
               min_answer_tokens: int = 32, progress: Callable[[int], None] | None = None,
               ) -> list[tuple[list[int], list[int]] | None]:
    """The model's answer to each request as token ids: (prompt ids, new ids), None where skipped.

    Requests are batched by prompt length (left padding, the KV cache); each batch gets as many new
    tokens as its longest prompt leaves of the context, at most `max_new_tokens`. A request whose
    prompt leaves fewer than `min_answer_tokens` gets None. Sampling draws from one generator seeded
    with `seed`, so a call repeats. `progress` is called with the number of requests done after each
    batch. The new ids end with <|end|> when the answer finished.
    """
    if model.cfg.vocab_size < template.tokenizer.vocab_size:
        raise SFTError(f"the model has {model.cfg.vocab_size} token rows but the chat template needs "
                       f"{template.tokenizer.vocab_size}; resize it with minillm.sft.resize_vocab first")
    context = model.cfg.max_seq_len
    prompts: list[list[int] | None] = []
    for c in requests:
        ids = template.prompt(c.prompt)
        prompts.append(ids if context - len(ids) + 1 >= min_answer_tokens else None)
    order = sorted((i for i, p in enumerate(prompts) if p is not None), key=lambda i: len(prompts[i]))
    out: list[tuple[list[int], list[int]] | None] = [None] * len(requests)
    generator = torch.Generator(device=model.token_embedding.weight.device).manual_seed(seed)
    done = 0
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        longest = max(len(prompts[i]) for i in rows)
        budget = min(max_new_tokens, context - longest + 1)
        new = generate(model, [prompts[i] for i in rows], max_new_tokens=budget, temperature=temperature,
                       eos_id=template.end_id, generator=generator)
        for i, ids in zip(rows, new):
            out[i] = (prompts[i], ids)
        done += len(rows)
        if progress is not None:
            progress(done)
    return out


def answer_requests(model: LLM, template: ChatTemplate, requests: Sequence[Conversation], *,
                    max_new_tokens: int = 192, temperature: float = 0.0, batch_size: int = 16,
                    seed: int = 0, min_answer_tokens: int = 32,
                    progress: Callable[[int], None] | None = None) -> list[tuple[str, bool] | None]:
    """The model's answer to each request (its messages up to the last user turn): (text, finished).

    Greedy by default, so an evaluation is repeatable; batched as `answer_ids` says, which also says
    when a request is skipped (None).
    """
    answers = answer_ids(model, template, requests, max_new_tokens=max_new_tokens, temperature=temperature,
                         batch_size=batch_size, seed=seed, min_answer_tokens=min_answer_tokens, progress=progress)
    return [None if a is None else (template.reply(a[1]), template.end_id in a[1]) for a in answers]


def score_answers(requests: Sequence[Conversation], answers: Sequence[tuple[str, bool] | None], *,
                  workers: int = 2, timeout: float = 5.0,
                  reference_cache: dict[str, bool | None] | None = None) -> EvalReport:
    """Score each answer against its request's reference docstring (in sandboxed children).

    A request is a built-in pair (its meta names the module, the function and the docstring); a
    request without that meta (a user's JSONL line) is scored for parsing and compiling only. The
    references with doctests are scored too, once (`reference_cache`, keyed by source, saves that
    work between evaluations of the same requests).
    """
    if len(requests) != len(answers):
        raise ValueError(f"{len(requests)} requests but {len(answers)} answers")
    cache = reference_cache if reference_cache is not None else {}
    kept = [(c, a) for c, a in zip(requests, answers) if a is not None]
    # References: only functions whose docstring has examples can pass or fail doctests.
    todo = [c for c, _ in kept if c.source not in cache and not _is_method(c)
            and c.meta.get("has_doctest") == "1"]
    refs = score_many([(c.messages[-1].content, c.meta["docstring"], _name(c), c.meta.get("module") or None)
                       for c in todo], workers=workers, timeout=timeout)
    for c, s in zip(todo, refs):
        cache[c.source] = s.passes
    jobs = []
    for c, (text, _) in kept:
        code = code_of(text)
        name = _name(c) or None
        if _is_method(c) or not name:
            jobs.append((code, None, name, None))
        else:
            jobs.append((code, c.meta.get("docstring"), name, c.meta.get("module") or None))
    with warnings.catch_warnings():  # parsing the answers: their SyntaxWarnings are the model's, not the user's
        warnings.simplefilter("ignore", SyntaxWarning)
        scores = score_many(jobs, workers=workers, timeout=timeout)
    attempts = []
    for (c, (text, finished)), s in zip(kept, scores):
        user = next(m.content for m in reversed(c.messages) if m.role == "user")
        ref = None if _is_method(c) else cache.get(c.source)
        attempts.append(Attempt(c.source, user, text, finished, s, _is_method(c), ref))
    return EvalReport(attempts, skipped=len(requests) - len(kept))


def evaluate_model(model: LLM, template: ChatTemplate, requests: Sequence[Conversation], *,
                   max_new_tokens: int = 192, temperature: float = 0.0, batch_size: int = 16, seed: int = 0,
                   workers: int = 2, timeout: float = 5.0,
                   reference_cache: dict[str, bool | None] | None = None) -> EvalReport:
    """`answer_requests`, then `score_answers`: the held-out rates of one model."""
    answers = answer_requests(model, template, requests, max_new_tokens=max_new_tokens,
                              temperature=temperature, batch_size=batch_size, seed=seed)
    return score_answers(requests, answers, workers=workers, timeout=timeout, reference_cache=reference_cache)



def held_out(data: str = "stdlib", split: str = "test", val_fraction: float = 0.05,
             test_fraction: float = 0.05) -> list[Conversation]:
    """The requests of one split of the SFT data, as `minillm sft` splits it (same fractions, same rule)."""
    from minillm.instructions import load_jsonl, split_pairs, stdlib_pairs

    if split not in ("val", "test"):
        raise ValueError(f"split must be 'val' or 'test' (train is what the model learned from), got {split!r}")
    pairs = stdlib_pairs() if data == "stdlib" else load_jsonl(data)
    return split_pairs(pairs, val_fraction, test_fraction)[split]


def load_for_eval(path: str, device: str = "cpu") -> tuple[LLM, ChatTemplate, dict[str, object]]:
    """A checkpoint ready to answer requests: a fine-tuned one as it is; a pretrained one with the chat
    tokens added and its embedding resized (new rows at the mean: what fine-tuning starts from).
    The third value holds the run's SFT data settings where the run has them (data, fractions)."""
    from minillm.sft import resize_vocab
    from minillm.train import load_for_inference

    model, tokenizer = load_for_inference(path, device)
    settings: dict[str, object] = {"pretrained": False}
    try:
        template = ChatTemplate(tokenizer)
    except SFTError:
        template = ChatTemplate.for_tokenizer(tokenizer)
        model = resize_vocab(model, template.tokenizer.vocab_size)
        settings["pretrained"] = True
    settings.update(sft_settings(Path(path)))
    return model, template, settings


def sft_settings(folder: Path, hops: int = 3) -> dict[str, object]:
    """The SFT data settings (data, fractions) of the run that `folder` (a run or checkpoint) belongs
    to; a DPO run's are its base's, since its held-out requests are the SFT split's."""
    from minillm.train import _read_toml

    for candidate in (folder / "config.toml", folder.parent.parent / "config.toml"):
        if candidate.is_file():
            saved = _read_toml(candidate)  # the loop's reader: tomli on Python 3.10, errors that name the file
            if "pairs" in saved and saved.get("base") and hops:  # a DPO run
                return sft_settings(Path(str(saved["base"])), hops - 1)
            if "base" in saved:  # an SFT run's config
                return {k: saved[k] for k in ("data", "val_fraction", "test_fraction") if k in saved}
            return {}
    return {}
