"""minillm.codeeval: answers generated in batches, scored in the sandbox, counted honestly."""

from __future__ import annotations

import statistics

import pytest
import torch

from minillm.codeeval import EvalReport, Rates, answer_requests, code_of, score_answers
from minillm.instructions import Conversation, Message
from minillm.model import LLM, ModelConfig
from minillm.sandbox import Score
from minillm.sft import ChatTemplate, SFTError
from minillm.tokenizer import train_bpe

pytestmark = pytest.mark.filterwarnings("ignore:the training text ran out of pairs")

RIGHT = "def median_high(data):\n    data = sorted(data)\n    return data[len(data) // 2]\n"
WRONG = "def median_high(data):\n    data = sorted(data)\n    return data[(len(data) - 1) // 2]\n"


def request(name: str, answer: str, *, doc: str | None = None, cls: str = "", module: str = "statistics",
            tag: str = "") -> Conversation:
    meta = {"module": module, "qualname": f"{cls}.{name}" if cls else name, "class": cls,
            "docstring": doc or "Do it.", "has_doctest": "1" if doc and ">>>" in doc else "0"}
    return Conversation((Message("user", f"Write {name}."), Message("assistant", answer)), f"{module}:{name}{tag}", meta)


def test_the_three_rates_count_what_each_can_judge() -> None:
    doc = statistics.median_high.__doc__
    assert ">>>" in doc
    requests = [
        request("median_high", RIGHT, doc=doc),   # reference passes: the doctest rate counts it
        request("median_high", RIGHT, doc=doc, tag="#2"),
        request("median_high", RIGHT, doc=doc, tag="#3"),
        request("median_high", WRONG, doc=doc, tag="#4"),   # a reference that fails its own doctests: counted apart
        request("qsize", "def qsize(self):\n    return 1\n", cls="Queue", module="queue"),
        request("skipped", "def skipped():\n    pass\n"),
    ]
    answers = [(RIGHT, True), (WRONG, True), ("def median_high(data)\n    return 0", False), (RIGHT, True),
               ("def qsize(self):\n    return len(self.queue)", True), None]
    report = score_answers(requests, answers, workers=2, timeout=10.0)
    f, m = report.functions, report.methods
    assert (f.n, f.parses, f.compiles, f.passable, f.passes, f.never_passable) == (4, 3, 3, 3, 1, 1)
    assert (m.n, m.parses, m.compiles, m.passable) == (1, 1, 1, 0)
    assert report.skipped == 1
    assert f.rate("passes") == pytest.approx(1 / 3) and m.rate("passes") is None
    first = report.attempts[0]
    assert first.score.passes and first.reference_passes and not first.method
    table = report.table()
    assert "1 function(s) whose reference fails" in table and "1 request(s) skipped" in table
    assert "1 answer(s) cut off" in table and max(map(len, table.splitlines())) <= 88
    d = report.to_dict()
    assert d["functions"]["passes_rate"] == pytest.approx(1 / 3) and d["skipped"] == 1


def test_references_are_scored_once_with_a_cache() -> None:
    doc = statistics.median_high.__doc__
    requests = [request("median_high", RIGHT, doc=doc)]
    cache: dict[str, bool | None] = {}
    score_answers(requests, [(RIGHT, True)], reference_cache=cache)
    assert cache == {"statistics:median_high": True}
    cache["statistics:median_high"] = False  # a cached verdict is used, not recomputed
    report = score_answers(requests, [(RIGHT, True)], reference_cache=cache)
    assert report.functions.passable == 0 and report.functions.never_passable == 1


def test_rates_of_nothing_are_none_and_mismatched_lengths_are_refused() -> None:
    r = Rates.of([])
    assert r.rate("parses") is None and r.rate("passes") is None
    assert "-" in EvalReport([]).table()
    with pytest.raises(ValueError, match="2 requests but 1 answers"):
        score_answers([request("a", "def a(): pass"), request("b", "def b(): pass")], [("x", True)])


def test_code_of_takes_a_fenced_block_or_the_whole_answer() -> None:
    assert code_of("def f():\n    return 1") == "def f():\n    return 1"
    assert code_of("Here:\n```python\ndef f():\n    return 1\n```\nDone.") == "def f():\n    return 1\n"
    assert code_of("```\nx = 1\n```") == "x = 1\n"


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    text = "def add(a, b):\n    return a + b\nWrite a Python function that adds two numbers.\n" * 30
    return ChatTemplate.for_tokenizer(train_bpe([text], 300))


def model_for(template: ChatTemplate, context: int = 64, vocab: int | None = None) -> LLM:
    torch.manual_seed(0)
    return LLM(ModelConfig(vocab_size=vocab or template.tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2,
                           max_seq_len=context))


def test_answers_are_batched_greedy_and_fit_the_context(template: ChatTemplate) -> None:
    model = model_for(template)
    requests = [request("add", "def add(a, b): return a + b"),
                Conversation((Message("user", "add " * 3), Message("assistant", "x")), "short"),
                Conversation((Message("user", "add " * 60), Message("assistant", "x")), "too long")]
    done: list[int] = []
    out = answer_requests(model, template, requests, max_new_tokens=12, batch_size=2, progress=done.append)
    assert out[2] is None and all(isinstance(a, tuple) and isinstance(a[0], str) for a in out[:2])
    assert done == [2]
    again = answer_requests(model, template, requests, max_new_tokens=12, batch_size=1)
    assert again == out  # greedy: the batch and its padding change nothing
    # Each answer is what generating the request alone gives.
    from minillm.generate import generate

    alone = generate(model, [template.prompt(requests[0].prompt)], max_new_tokens=12, temperature=0.0,
                     eos_id=template.end_id)[0]
    assert out[0] == (template.reply(alone), template.end_id in alone)


def test_a_model_without_the_chat_rows_is_refused(template: ChatTemplate) -> None:
    small = model_for(template, vocab=template.tokenizer.vocab_size - 4)
    with pytest.raises(SFTError, match="resize_vocab"):
        answer_requests(small, template, [request("add", "def add(): pass")])


def test_an_attempt_keeps_the_request_and_its_score() -> None:
    report = score_answers([request("f", "def f():\n    return 1\n")], [("def f():\n    return 2", True)])
    a = report.attempts[0]
    assert a.request == "Write f." and a.answer == "def f():\n    return 2" and a.finished
    assert isinstance(a.score, Score) and a.score.compiles and a.reference_passes is None
