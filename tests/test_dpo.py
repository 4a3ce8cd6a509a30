"""minillm.dpo: the loss against its formula, its gradient at policy = reference, the masking of the
sequence log-probs, the pair batches, the pair files and every bad input."""

from __future__ import annotations

import copy
import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from minillm.dpo import (
    DPOError,
    EncodedPairs,
    PreferencePair,
    dpo_loss,
    encode_pairs,
    load_pairs,
    pair_batch,
    save_pairs,
    sequence_logprobs,
)
from minillm.instructions import DataError, Message
from minillm.model import LLM, ModelConfig
from minillm.sft import IGNORE, ChatTemplate, SFTError, pad_batch
from minillm.tokenizer import train_bpe

pytestmark = pytest.mark.filterwarnings("ignore:the training text ran out of pairs")

ADD = "def add(a, b):\n    return a + b"
SUB = "def add(a, b):\n    return a - b"
REQUEST = "Write a Python function that adds two numbers."


@pytest.fixture(scope="module")
def template() -> ChatTemplate:
    text = f"{ADD}\n{SUB}\n{REQUEST}\n" * 30
    return ChatTemplate.for_tokenizer(train_bpe([text], 300))


def model_for(template: ChatTemplate, context: int = 64) -> LLM:
    torch.manual_seed(0)
    return LLM(ModelConfig(vocab_size=template.tokenizer.vocab_size, d_model=32, n_layers=1, n_heads=2,
                           max_seq_len=context))


def pairs_for_tests() -> list[PreferencePair]:
    return [
        PreferencePair(REQUEST, ADD, SUB, "p0", {"chosen_passed": 1, "rejected_passed": 0}),
        PreferencePair((Message("system", "Be brief."), Message("user", "Add two numbers.")), ADD + "\n", "return a",
                       "p1"),
        PreferencePair((Message("user", "Add."), Message("assistant", "def add"), Message("user", "The body?")),
                       "    return a + b", "    pass", "p2"),
    ]


# --------------------------------------------------------------------------------------------
# The loss


def slow_dpo(pc: list[float], pr: list[float], rc: list[float], rr: list[float], beta: float) -> float:
    """The formula, term by term, in plain Python floats."""
    terms = []
    for a, b, c, d in zip(pc, pr, rc, rr):
        z = beta * ((a - c) - (b - d))
        terms.append(-math.log(1.0 / (1.0 + math.exp(-z))))
    return sum(terms) / len(terms)


@pytest.mark.parametrize("beta", [0.1, 0.5, 2.0])
def test_the_loss_matches_the_formula_computed_slowly(beta: float) -> None:
    rng = random.Random(int(beta * 10))
    B = 7
    pc, pr, rc, rr = ([rng.uniform(-60.0, -5.0) for _ in range(B)] for _ in range(4))
    out = dpo_loss(*(torch.tensor(v, dtype=torch.float64) for v in (pc, pr, rc, rr)), beta=beta)
    assert out.loss.item() == pytest.approx(slow_dpo(pc, pr, rc, rr, beta), rel=1e-12)
    rewards_c = [beta * (a - c) for a, c in zip(pc, rc)]
    rewards_r = [beta * (b - d) for b, d in zip(pr, rr)]
    assert out.chosen_rewards.tolist() == pytest.approx(rewards_c, rel=1e-12)
    assert out.rejected_rewards.tolist() == pytest.approx(rewards_r, rel=1e-12)
    assert out.margins.tolist() == pytest.approx([a - b for a, b in zip(rewards_c, rewards_r)], rel=1e-9, abs=1e-12)
    assert out.accuracy.item() == pytest.approx(sum(a > b for a, b in zip(rewards_c, rewards_r)) / B)
    # float32 inputs give the same to float32 precision.
    out32 = dpo_loss(*(torch.tensor(v) for v in (pc, pr, rc, rr)), beta=beta)
    assert out32.loss.dtype == torch.float32
    assert out32.loss.item() == pytest.approx(out.loss.item(), rel=1e-4)


def test_the_loss_is_stable_for_large_margins() -> None:
    big = torch.tensor([1e4, -1e4])
    out = dpo_loss(big, -big, torch.zeros(2), torch.zeros(2), beta=1.0)
    assert torch.isfinite(out.loss) and out.loss.item() == pytest.approx(1e4, rel=1e-6)  # (0 + 2e4) / 2


@pytest.mark.parametrize("B", [1, 4])
def test_at_policy_equal_reference_the_loss_is_ln2_and_pushes_chosen_up(B: int) -> None:
    beta = 0.3
    torch.manual_seed(B)
    chosen = (-torch.rand(B, dtype=torch.float64) * 50).requires_grad_()
    rejected = (-torch.rand(B, dtype=torch.float64) * 50).requires_grad_()
    out = dpo_loss(chosen, rejected, chosen.detach().clone(), rejected.detach().clone(), beta=beta)
    assert abs(out.loss.item() - math.log(2)) < 1e-6
    assert out.chosen_rewards.abs().max() == 0 and out.rejected_rewards.abs().max() == 0
    assert out.accuracy.item() == 0.0  # no pair is preferred yet: a tie is not a win
    out.loss.backward()
    assert torch.allclose(chosen.grad, torch.full((B,), -beta / 2 / B, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(rejected.grad, torch.full((B,), beta / 2 / B, dtype=torch.float64), atol=1e-12)


def test_no_gradient_reaches_the_reference() -> None:
    pc, pr = torch.tensor([-3.0], requires_grad=True), torch.tensor([-4.0], requires_grad=True)
    rc, rr = torch.tensor([-3.5], requires_grad=True), torch.tensor([-3.0], requires_grad=True)
    out = dpo_loss(pc, pr, rc, rr, beta=0.1)
    out.loss.backward()
    assert pc.grad is not None and rc.grad is None and rr.grad is None
    assert not out.chosen_rewards.requires_grad and not out.margins.requires_grad


def test_the_loss_refuses_bad_arguments() -> None:
    x = torch.zeros(3)
    for beta in (0, -0.1, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(ValueError, match="beta"):
            dpo_loss(x, x, x, x, beta=beta)
    with pytest.raises(ValueError, match="one shape"):
        dpo_loss(x, x, torch.zeros(2), x, beta=0.1)
    with pytest.raises(ValueError, match="at least one pair"):
        dpo_loss(*(torch.zeros(0),) * 4, beta=0.1)


def test_one_step_at_policy_equal_reference_raises_chosen_and_lowers_rejected(template: ChatTemplate) -> None:
    policy = model_for(template)
    reference = copy.deepcopy(policy).requires_grad_(False).eval()
    enc = encode_pairs(template, pairs_for_tests()[:1], 64)
    batch = pair_batch(enc.chosen, enc.rejected, pad_id=0)
    with torch.no_grad():
        ref_c, ref_r = sequence_logprobs(reference, batch).chunk(2)
    before_c, before_r = sequence_logprobs(policy, batch).chunk(2)
    out = dpo_loss(before_c, before_r, ref_c, ref_r, beta=0.1)
    assert abs(out.loss.item() - math.log(2)) < 1e-6  # the same weights: the same log-probs, bit for bit
    optimizer = torch.optim.SGD(policy.parameters(), lr=0.5)
    out.loss.backward()
    optimizer.step()
    with torch.no_grad():
        after_c, after_r = sequence_logprobs(policy, batch).chunk(2)
        out_after = dpo_loss(after_c, after_r, ref_c, ref_r, beta=0.1)
    assert after_c.item() > before_c.item() and after_r.item() < before_r.item()
    assert out_after.loss.item() < math.log(2) and out_after.accuracy.item() == 1.0
    assert torch.equal(sequence_logprobs(reference, batch).detach().chunk(2)[0], ref_c)  # the reference did not move


# --------------------------------------------------------------------------------------------
# Sequence log-probabilities: masking and padding


def slow_logprobs(model: LLM, x: torch.Tensor, y: torch.Tensor) -> list[float]:
    """Row by row, token by token, from log_softmax of the logits."""
    with torch.no_grad():
        logp = F.log_softmax(model(x)[0].double(), dim=-1)
    out = []
    for b in range(x.size(0)):
        total = 0.0
        for t in range(x.size(1)):
            if y[b, t].item() != IGNORE:
                total += logp[b, t, y[b, t]].item()
        out.append(total)
    return out


class NoisyWhereIgnored(torch.nn.Module):
    """The model, with random logits at every position whose target is IGNORE."""

    def __init__(self, model: LLM, y: torch.Tensor) -> None:
        super().__init__()
        self.model, self.y = model, y

    def forward(self, x: torch.Tensor, **kwargs: object) -> tuple[torch.Tensor, None]:
        logits = self.model(x, **kwargs)[0]
        noise = torch.randn_like(logits) * 100
        return torch.where((self.y == IGNORE)[..., None], noise, logits), None


def test_sequence_logprobs_count_the_responses_only(template: ChatTemplate) -> None:
    model = model_for(template).eval()
    enc = encode_pairs(template, pairs_for_tests(), 64)
    batch = pair_batch(enc.chosen, enc.rejected, pad_id=0)
    with torch.no_grad():
        got = sequence_logprobs(model, batch)
    assert got.shape == (6,) and got.dtype == torch.float32 and bool((got < 0).all())
    assert got.tolist() == pytest.approx(slow_logprobs(model, batch.x, batch.y), rel=1e-5)
    # Whatever the model predicts where the target is IGNORE (prompt, padding) changes nothing...
    with torch.no_grad():
        noisy = sequence_logprobs(NoisyWhereIgnored(model, batch.y), batch)
    assert torch.equal(noisy, got)
    # ...nor do the ids of the padding.
    pads = batch.x.clone()
    counted_or_before = torch.zeros_like(batch.x, dtype=torch.bool)
    for i, ex in enumerate([*enc.chosen, *enc.rejected]):
        counted_or_before[i, : len(ex) - 1] = True
    assert not counted_or_before.all()  # the batch does have padding
    pads[~counted_or_before] = 7
    with torch.no_grad():
        repadded = sequence_logprobs(model, type(batch)(pads, batch.y))
    assert torch.allclose(repadded, got, rtol=1e-6, atol=1e-5)
    # The mask matters: counting the prompt's tokens too gives a lower log-prob.
    everything = pad_batch([type(ex)(ex.ids, (False,) + (True,) * (len(ex) - 1)) for ex in enc.chosen])
    with torch.no_grad():
        assert bool((sequence_logprobs(model, everything) < got[:3] - 1e-3).all())


def test_the_responses_mask_is_the_final_answer_and_its_end(template: ChatTemplate) -> None:
    enc = encode_pairs(template, pairs_for_tests(), 64)
    tok = template.tokenizer
    for pair, ex, text in [(p, e, p.chosen) for p, e in zip(enc.pairs, enc.chosen)] + \
                          [(p, e, p.rejected) for p, e in zip(enc.pairs, enc.rejected)]:
        counted = [i for i, m in zip(ex.ids, ex.mask) if m]
        assert counted == tok.encode(text) + [template.end_id]  # p2's earlier assistant turn is not counted
        assert list(ex.ids[: len(ex) - len(counted)]) == template.prompt(pair.prompt)
        assert ex.source == pair.source


def test_a_padded_pair_batch_scores_each_example_as_alone(template: ChatTemplate) -> None:
    model = model_for(template).eval()
    enc = encode_pairs(template, pairs_for_tests(), 64)
    lengths = {len(ex) for ex in enc.chosen + enc.rejected}
    assert len(lengths) > 1  # the rows differ, so the batch is padded
    batch = pair_batch(enc.chosen, enc.rejected, pad_id=3)
    assert batch.x.shape[0] == 6
    with torch.no_grad():
        both = sequence_logprobs(model, batch)
        alone = torch.cat([sequence_logprobs(model, pad_batch([ex])) for ex in enc.chosen + enc.rejected])
        # The newline after <|end|>, left out by encode_pairs, would change nothing either.
        full = template.encode(enc.pairs[0].prompt + (Message("assistant", enc.pairs[0].chosen),))
        prompt_len = len(template.prompt(enc.pairs[0].prompt))
        with_newline = type(full)(full.ids, (False,) * prompt_len + full.mask[prompt_len:])
        assert len(with_newline) > len(enc.chosen[0])
        assert torch.allclose(sequence_logprobs(model, pad_batch([with_newline])), alone[:1], atol=1e-5)
    assert torch.allclose(both, alone, rtol=1e-6, atol=1e-5)
    # Rows [0, B) are the chosen responses, [B, 2B) the rejected ones.
    assert batch.y[0].tolist() == pad_batch([enc.chosen[0]], length=batch.x.shape[1]).y[0].tolist()
    assert batch.y[3].tolist() == pad_batch([enc.rejected[0]], length=batch.x.shape[1]).y[0].tolist()


def test_pair_batch_refuses_unpaired_lists(template: ChatTemplate) -> None:
    enc = encode_pairs(template, pairs_for_tests(), 64)
    with pytest.raises(DPOError, match="3 chosen examples but 2 rejected"):
        pair_batch(enc.chosen, enc.rejected[:2])
    with pytest.raises(DPOError, match="at least one pair"):
        pair_batch([], [])


# --------------------------------------------------------------------------------------------
# Fitting pairs into the context


def test_too_long_pairs_are_dropped_and_counted(template: ChatTemplate) -> None:
    pairs = pairs_for_tests()
    prompt_len = len(template.prompt(pairs[0].prompt))
    longer = max(len(template.tokenizer.encode(p.chosen)) for p in pairs[:1])
    long_prompt = PreferencePair(REQUEST * 20, ADD, SUB, "long-prompt")
    long_answer = PreferencePair(REQUEST, ADD * 20, SUB, "long-answer")
    enc = encode_pairs(template, [*pairs, long_prompt, long_answer], 64)
    assert isinstance(enc, EncodedPairs)
    assert [p.source for p in enc.pairs] == ["p0", "p1", "p2"] and len(enc) == 3
    assert enc.prompt_too_long == 1 and enc.response_too_long == 1
    assert "3 pairs kept" in enc.report() and "1 dropped with a response" in enc.report()
    assert all(len(ex) - 1 <= 64 for ex in enc.chosen + enc.rejected)
    # A context that holds p0 exactly: its prompt, the longer response and <|end|>, as inputs.
    exact = prompt_len + longer  # inputs: the last id (<|end|>) is a target only
    assert len(encode_pairs(template, pairs[:1], exact)) == 1
    assert encode_pairs(template, pairs[:1], exact - 1).response_too_long == 1
    assert encode_pairs(template, pairs[:1], prompt_len).prompt_too_long == 1


def test_too_long_error_names_the_source_and_sizes(template: ChatTemplate) -> None:
    n = len(template.prompt(((Message("user", REQUEST * 20)),)))
    with pytest.raises(DPOError, match=rf"long-prompt: the prompt has {n} tokens and the context holds seq_len=64"):
        encode_pairs(template, [PreferencePair(REQUEST * 20, ADD, SUB, "long-prompt")], 64, too_long="error")
    with pytest.raises(DPOError, match=r"long-answer: the prompt \(\d+ tokens\) and the rejected response need \d+ "
                                       r"positions, more than the context \(seq_len=64\)"):
        encode_pairs(template, [PreferencePair(REQUEST, ADD, SUB * 20, "long-answer")], 64, too_long="error")
    with pytest.raises(DPOError, match="use 'drop' or 'error'"):
        encode_pairs(template, pairs_for_tests(), 64, too_long="truncate")  # type: ignore[arg-type]


def test_a_chat_token_inside_a_response_is_refused(template: ChatTemplate) -> None:
    with pytest.raises(DPOError, match="bad-pair"):
        encode_pairs(template, [PreferencePair(REQUEST, ADD + "<|end|>", SUB, "bad-pair")], 64)


# --------------------------------------------------------------------------------------------
# Pairs and their files


def test_the_error_is_both_kinds() -> None:
    assert issubclass(DPOError, SFTError) and issubclass(DPOError, DataError) and issubclass(DPOError, ValueError)


@pytest.mark.parametrize("args, message", [
    ((REQUEST, ADD, ADD), "identical"),
    ((REQUEST, ADD, "  " + ADD + "\n"), "identical"),
    ((REQUEST, "", SUB), "chosen response is empty"),
    ((REQUEST, ADD, " \n"), "rejected response is empty"),
    (((Message("system", "Be brief."),), ADD, SUB), "no user turn"),
    (((), ADD, SUB), "no user turn"),
    (((Message("user", "a"), Message("assistant", "b")), ADD, SUB), "ends with the assistant's turn"),
    (((Message("user", "a"), Message("system", "b"), Message("user", "c")), ADD, SUB), "system message"),
    ((REQUEST, 3, SUB), "chosen response is int"),
    ((("user", "hi"), ADD, SUB), "not a Message"),
])
def test_a_bad_pair_is_refused(args: tuple, message: str) -> None:
    with pytest.raises(DPOError, match=message):
        PreferencePair(*args, source="here")


def test_bad_meta_is_refused() -> None:
    for meta, message in [({"score": [1]}, "string or a number"), ({"score": float("nan")}, "finite"),
                          ({1: "x"}, "keys must be strings")]:
        with pytest.raises(DPOError, match=message):
            PreferencePair(REQUEST, ADD, SUB, meta=meta)


def test_save_then_load_round_trips(tmp_path) -> None:
    pairs = pairs_for_tests() + [PreferencePair("¿Suma? ✓", "é", "e", "x", {"score": 0.25, "passed": True, "n": 3})]
    path = save_pairs(tmp_path / "pairs.jsonl", pairs)
    loaded = load_pairs(path)
    assert loaded == pairs
    assert loaded[0].meta == {"chosen_passed": 1, "rejected_passed": 0}
    assert type(loaded[3].meta["score"]) is float and type(loaded[3].meta["passed"]) is bool
    assert hash(loaded[0]) == hash(pairs[0])
    with pytest.raises(Exception, match="exists"):
        save_pairs(path, pairs)
    save_pairs(path, pairs[:1], overwrite=True)
    assert load_pairs(path) == pairs[:1]
    assert not [p for p in tmp_path.iterdir() if p.name != "pairs.jsonl"]  # no temporary file left


def test_load_reads_the_simple_style(tmp_path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text("\ufeff" + json.dumps({"prompt": REQUEST, "chosen": ADD, "rejected": SUB, "extra": 1}) + "\n\n"
                    + json.dumps({"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
                                  "chosen": "a", "rejected": "b", "meta": {"k": "v"}}) + "\n", encoding="utf-8")
    first, second = load_pairs(path)
    assert first == PreferencePair((Message("user", REQUEST),), ADD, SUB, "mine.jsonl:1")
    assert second.prompt == (Message("system", "s"), Message("user", "u")) and second.source == "mine.jsonl:3"
    assert second.meta == {"k": "v"}


GOOD = {"prompt": "Add.", "chosen": "a + b", "rejected": "a - b"}


@pytest.mark.parametrize("line, message", [
    (b"{not json", "invalid JSON"),
    (b"[1, 2]", "must be a JSON object, got list"),
    (json.dumps({"prompt": "Add.", "chosen": "a"}).encode(), "missing 'rejected'"),
    (json.dumps({"chosen": "a", "rejected": "b"}).encode(), "missing 'prompt'"),
    (json.dumps({**GOOD, "chosen": 1}).encode(), "'chosen' is int, expected a string"),
    (json.dumps({**GOOD, "rejected": None}).encode(), "'rejected' is NoneType"),
    (json.dumps({**GOOD, "prompt": 5}).encode(), '"prompt" is int'),
    (json.dumps({**GOOD, "prompt": []}).encode(), '"prompt" is an empty list'),
    (json.dumps({**GOOD, "prompt": [{"role": "user"}]}).encode(), "prompt message 0 must be an object"),
    (json.dumps({**GOOD, "prompt": [{"role": "bot", "content": "x"}]}).encode(), "unknown role 'bot'"),
    (json.dumps({**GOOD, "prompt": [{"role": "assistant", "content": "x"}]}).encode(), "no user turn"),
    (json.dumps({**GOOD, "rejected": " a + b "}).encode(), "identical"),
    (json.dumps({**GOOD, "chosen": ""}).encode(), "chosen response is empty"),
    (json.dumps({**GOOD, "meta": [1]}).encode(), '"meta" is list'),
    (json.dumps({**GOOD, "meta": {"s": {"x": 1}}}).encode(), "string or a number"),
    (json.dumps({**GOOD, "source": 3}).encode(), '"source" is int'),
    (b'{"prompt": "Add.", "chosen": "caf\xe9", "rejected": "b"}', "not valid UTF-8"),
])
def test_every_bad_line_names_file_and_line(tmp_path, line: bytes, message: str) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(json.dumps(GOOD).encode() + b"\n\n" + line + b"\n")
    with pytest.raises(DPOError, match=rf"pairs\.jsonl:3: .*{message}") as e:
        load_pairs(path)
    assert str(e.value).count("pairs.jsonl:3") == 1  # named once, not again by a nested message


def test_a_missing_or_empty_file_is_refused(tmp_path) -> None:
    with pytest.raises(DPOError, match="no such file"):
        load_pairs(tmp_path / "nope.jsonl")
    with pytest.raises(DPOError, match="it is a folder"):
        load_pairs(tmp_path)
    (tmp_path / "empty.jsonl").write_text("\n \n")
    with pytest.raises(DPOError, match="no pairs in the file"):
        load_pairs(tmp_path / "empty.jsonl")
