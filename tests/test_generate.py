"""minillm.generate: sampling filters by hand, left-padded batches against one prompt at a time,
eos, streaming text, argument checks, and the `minillm sample` command."""

from __future__ import annotations

import functools
import itertools
import math
import re
import sys
import types

import pytest
import torch

from minillm import cli
from minillm.generate import generate, process_logits, sample_token, stream_text
from minillm.hf import save_hf
from minillm.model import LLM, ModelConfig, sample_next
from minillm.tokenizer import Tokenizer, train_bpe

pytestmark = pytest.mark.filterwarnings("ignore:the training text ran out of pairs")

INF = float("-inf")
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [1, 2], [40, 41, 42, 43]]  # three lengths: two rows get left padding


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**dict(vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=40), **kw})


def random_model(**kw) -> LLM:
    torch.manual_seed(0)
    model = LLM(tiny(**kw))
    with torch.no_grad():  # larger weights than the initialization: sharper, more varied predictions
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def chain_model(chain: list[int], vocab_size: int) -> LLM:
    """A model that continues chain[i] with chain[i + 1], whatever came before: greedy decoding
    follows the chain. The blocks add nothing to the residual stream (their output layers are zero),
    so the logits depend on the last token's embedding alone, a bigram table: token chain[i] has
    the unit vector e_i as its embedding, and the output row of chain[i + 1] is 10 e_i."""
    assert len(set(chain[:-1])) == len(chain) - 1, "each token of the chain needs a single successor"
    torch.manual_seed(0)
    C = 64
    model = LLM(ModelConfig(vocab_size=vocab_size, d_model=C, n_layers=1, n_heads=2, max_seq_len=64))
    basis = torch.linalg.qr(torch.randn(C, C))[0]  # orthonormal columns
    with torch.no_grad():
        for block in model.blocks:
            block.attn.o_proj.weight.zero_()
            block.mlp.down_proj.weight.zero_()
        model.lm_head.weight.zero_()
        for i, (token, successor) in enumerate(itertools.pairwise(chain)):
            model.token_embedding.weight[token] = basis[:, i]
            model.lm_head.weight[successor] += 10 * basis[:, i]
    return model.eval()


@functools.cache
def tokenizer() -> Tokenizer:
    """A small byte-level BPE trained on text with 'é' and '日本' (which it learns as tokens)."""
    text = "naïve café, 日本 and 日本語; x = 'é'\n" * 20
    return train_bpe([text], 256 + 12 + 1)


def text_chain() -> tuple[Tokenizer, list[int], str]:
    """A tokenizer, the chain 'x' -> the tokens of '日本é€' -> <|endoftext|>, and the text after 'x'.

    The tokenizer never saw '€' (three bytes), so it stays three one-byte tokens, none of them text."""
    tok = tokenizer()
    continuation = "日本é€"
    chain = tok.encode("x") + tok.encode(continuation) + [tok.eot_id]
    return tok, chain, continuation


# -- the sampling filters, on logits written by hand ----------------------------------------------


LOGITS = torch.tensor([[3.0, 2.0, 1.0, 0.0, -1.0]])  # probabilities 0.64, 0.24, 0.09, 0.03, 0.01


def kept(logits: torch.Tensor) -> list[int]:
    return torch.isfinite(logits[0]).nonzero().flatten().tolist()


def test_temperature_zero_is_argmax():
    logits = torch.randn(6, 50)
    assert torch.equal(sample_token(logits, temperature=0), logits.argmax(-1))
    # The filters keep the most likely token, so greedy ignores them.
    assert torch.equal(sample_token(logits, temperature=0, top_k=3, top_p=0.1, min_p=0.9), logits.argmax(-1))


def test_top_k_keeps_k_tokens():
    for k in range(1, 6):
        assert kept(process_logits(LOGITS, top_k=k)) == list(range(k))
    assert kept(process_logits(LOGITS, top_k=50)) == list(range(5))  # more than the vocabulary: all


def test_top_p_keeps_the_smallest_set_that_reaches_p():
    p = torch.softmax(LOGITS[0], -1).tolist()
    assert kept(process_logits(LOGITS, top_p=p[0] - 1e-6)) == [0]  # the first token alone reaches p
    assert kept(process_logits(LOGITS, top_p=p[0] + 1e-3)) == [0, 1]
    assert kept(process_logits(LOGITS, top_p=p[0] + p[1] + 1e-3)) == [0, 1, 2]
    assert kept(process_logits(LOGITS, top_p=1.0)) == [0, 1, 2, 3, 4]


def test_min_p_keeps_tokens_with_at_least_min_p_times_the_top_probability():
    p = torch.softmax(LOGITS[0], -1)
    ratios = (p / p[0]).tolist()  # 1, e^-1 = 0.37, e^-2 = 0.14, 0.05, 0.02
    assert kept(process_logits(LOGITS, min_p=0.3)) == [0, 1]
    assert kept(process_logits(LOGITS, min_p=ratios[2] - 1e-4)) == [0, 1, 2]
    assert kept(process_logits(LOGITS, min_p=ratios[2] + 1e-4)) == [0, 1]
    assert kept(process_logits(LOGITS, min_p=1.0)) == [0]
    assert kept(process_logits(LOGITS, min_p=0.0)) == [0, 1, 2, 3, 4]
    # After the temperature: at T = 2 the ratios are square roots, so more tokens pass the same cut.
    assert kept(process_logits(LOGITS, temperature=2.0, min_p=0.3)) == [0, 1, 2]


def test_repetition_penalty_changes_exactly_the_seen_tokens():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0, 0.5], [2.0, -2.0, 1.0, -1.0, 0.5]])
    previous = torch.tensor([[0, 1, 1, -1], [4, -1, -1, -1]])  # -1: padding, no token; 1 twice is penalized once
    out = process_logits(logits, temperature=0, repetition_penalty=2.0, previous=previous)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0, 0.5], [2.0, -2.0, 1.0, -1.0, 0.25]]
    # Greedy then picks another token in row 0 (a tie of 1.0 and 1.0: the first).
    assert sample_token(logits, temperature=0, repetition_penalty=2.0, previous=previous).tolist() == [0, 0]
    assert sample_token(logits, temperature=0, repetition_penalty=4.0, previous=previous).tolist() == [2, 0]
    # A penalty of 1 changes nothing.
    assert torch.equal(process_logits(logits, temperature=0, repetition_penalty=1.0, previous=previous), logits)


def test_sample_token_draws_what_sample_next_draws():
    logits = torch.randn(4, 50)
    for kw in (dict(temperature=1.0), dict(temperature=0.7, top_k=5), dict(temperature=1.3, top_p=0.8)):
        g1, g2 = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
        a = [sample_next(logits, kw["temperature"], kw.get("top_k"), kw.get("top_p"), g1) for _ in range(5)]
        b = [sample_token(logits, **kw, generator=g2) for _ in range(5)]
        assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_draws_stay_inside_the_filtered_set():
    g = torch.Generator().manual_seed(0)
    draws = {int(t) for _ in range(200) for t in sample_token(LOGITS, min_p=0.3, generator=g)}
    assert draws == {0, 1}


# -- batches of prompts of different lengths -------------------------------------------------------


@pytest.mark.parametrize("variant", [{}, dict(position="learned", norm="layernorm", mlp="gelu", bias=True)])
def test_left_padded_batch_equals_one_prompt_at_a_time(variant):
    model = random_model(**variant)
    batch = generate(model, PROMPTS, max_new_tokens=12, temperature=0)
    alone = [generate(model, [p], max_new_tokens=12, temperature=0)[0] for p in PROMPTS]
    assert batch == alone
    assert [len(row) for row in batch] == [12, 12, 12]
    # And one prompt alone is what LLM.generate makes.
    for p, row in zip(PROMPTS, alone):
        assert model.generate(torch.tensor([p]), 12, temperature=0)[0, len(p):].tolist() == row


@pytest.mark.parametrize("kw", [dict(), dict(top_k=5), dict(temperature=0.8, top_p=0.7)])
def test_a_batch_of_one_samples_what_llm_generate_samples(kw):
    model = random_model()
    prompt = PROMPTS[0]
    ours = generate(model, [prompt], max_new_tokens=10, generator=torch.Generator().manual_seed(3), **kw)[0]
    ref = model.generate(torch.tensor([prompt]), 10, generator=torch.Generator().manual_seed(3), **kw)
    assert ours == ref[0, len(prompt):].tolist()


def test_same_length_prompts_take_the_unpadded_path_and_repeat_with_a_seed():
    model = random_model()
    prompts = [[1, 2, 3], [4, 5, 6]]
    ref = model.generate(torch.tensor(prompts), 8, generator=torch.Generator().manual_seed(0), top_k=20)
    ours = generate(model, prompts, max_new_tokens=8, generator=torch.Generator().manual_seed(0), top_k=20)
    assert ours == ref[:, 3:].tolist()


@pytest.mark.parametrize("variant", [{}, dict(position="learned"), dict(n_kv_heads=1)])
def test_logits_of_a_left_padded_row_equal_the_unpadded_row(variant):
    # Not bit for bit: the padded row runs through SDPA with an explicit mask over more keys (softmax
    # sums and matrix products of other lengths, hence other rounding), so about 1e-7 apart.
    model = random_model(**variant)
    pad = 4
    row = torch.tensor([PROMPTS[0]])
    T = row.size(1)
    ids = torch.cat([torch.full((1, pad), 3), row], 1)
    real = torch.arange(pad + T) >= pad
    positions = (real.long().cumsum(0) - 1).clamp(min=0)[None]
    with torch.no_grad():
        ref, _ = model(row)
        padded, _ = model(ids, positions=positions, attention_mask=real[None])
        assert torch.isfinite(padded).all()  # the pad queries see only themselves: no 0/0
        torch.testing.assert_close(padded[:, pad:], ref, atol=1e-5, rtol=0)
        # The same through the cache: the prompt in two blocks, then one token.
        caches = model.new_caches(1, pad + T)
        steps = [model(ids[:, :6], caches=caches, positions=positions[:, :6], attention_mask=real[None, :6])[0],
                 model(ids[:, 6:-1], caches=caches, positions=positions[:, 6:-1], attention_mask=real[None, :-1])[0],
                 model(ids[:, -1:], caches=caches, positions=positions[:, -1:], attention_mask=real[None])[0]]
        torch.testing.assert_close(torch.cat(steps, 1)[:, pad:], ref, atol=1e-5, rtol=0)


def test_packed_documents_with_a_block_mask_compute_each_document_alone():
    # Chapter 08's packing: two documents in one row, positions restarting at 0, and a (B, T, S) mask
    # that keeps each token inside its own document.
    model = random_model()
    a, b = torch.tensor([[4, 8, 15, 16]]), torch.tensor([[23, 42, 7]])
    doc = torch.tensor([0] * 4 + [1] * 3)
    same_doc = (doc[:, None] == doc[None, :])[None]
    positions = torch.tensor([[0, 1, 2, 3, 0, 1, 2]])
    with torch.no_grad():
        packed, _ = model(torch.cat([a, b], 1), positions=positions, attention_mask=same_doc)
        torch.testing.assert_close(packed[:, :4], model(a)[0], atol=1e-5, rtol=0)
        torch.testing.assert_close(packed[:, 4:], model(b)[0], atol=1e-5, rtol=0)


def test_left_padded_batches_agree_with_transformers(tmp_path):
    # Hugging Face's convention for a left-padded batch: attention_mask 0 at the pads, and positions
    # counted from each row's first real token. Ours must mean the same, to the generated token.
    transformers = pytest.importorskip("transformers")
    model = random_model(vocab_size=101, d_model=64, n_heads=4, max_seq_len=48)
    save_hf(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    torch.manual_seed(1)
    prompts = [torch.randint(0, 100, (n,)).tolist() for n in (7, 3, 5)]
    T = max(map(len, prompts))
    ids = torch.tensor([[100] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours, _ = model(ids, positions=positions, attention_mask=mask)
        theirs = hf(ids, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(ours[mask.bool()], theirs[mask.bool()], atol=1e-5, rtol=0)
    hf_out = hf.generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False, pad_token_id=100)
    assert generate(model, prompts, max_new_tokens=10, temperature=0) == hf_out[:, T:].tolist()


def test_eos_stops_a_row_while_the_others_continue():
    eos = 3
    model = chain_model([10, 11, 12, 13, 14, 15, eos], 97)
    prompts = [[10], [13], [7, 8, 14]]
    assert generate(model, prompts, max_new_tokens=10, temperature=0, eos_id=eos) == [
        [11, 12, 13, 14, 15, eos], [14, 15, eos], [15, eos]]
    assert generate(model, prompts, max_new_tokens=4, temperature=0, eos_id=eos) == [
        [11, 12, 13, 14], [14, 15, eos], [15, eos]]
    events = list(generate(model, prompts, max_new_tokens=10, temperature=0, eos_id=eos, stream=True))
    assert events[:3] == [(0, 11), (1, 14), (2, 15)]
    assert [row for row, _ in events] == [0, 1, 2, 0, 1, 2, 0, 1, 0, 0, 0]  # a finished row says nothing more
    # Without eos_id every row runs to max_new_tokens.
    assert [len(r) for r in generate(model, prompts, max_new_tokens=8, temperature=0)] == [8, 8, 8]


def test_streamed_text_joins_to_the_decoded_tokens_across_a_split_character():
    tok, chain, continuation = text_chain()
    pieces_of = [tok.decode_bytes([i]) for i in chain[1:-1]]
    assert any(_not_utf8(b) for b in pieces_of), "the test needs a token that ends inside a character"
    model = chain_model(chain, tok.vocab_size)
    ids = generate(model, ["x"], tokenizer=tok, max_new_tokens=20, temperature=0, eos_id=tok.eot_id)[0]
    assert ids == chain[1:]
    pieces = list(stream_text(model, tok, "x", max_new_tokens=20, temperature=0, eos_id=tok.eot_id))
    assert "".join(pieces) == tok.decode(ids[:-1]) == continuation
    assert "\ufffd" not in "".join(pieces) and len(pieces) < len(ids) - 1  # the bytes of '€' waited for each other
    # Without eos_id, the pieces join to the decode of every new token.
    pieces = list(stream_text(model, tok, "x", max_new_tokens=4, temperature=0))
    assert "".join(pieces) == tok.decode(generate(model, ["x"], tokenizer=tok, max_new_tokens=4, temperature=0)[0])


def _not_utf8(b: bytes) -> bool:
    try:
        b.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def test_generate_leaves_the_model_and_grad_mode_as_it_found_them():
    model = random_model().train()
    generate(model, PROMPTS, max_new_tokens=3)
    assert model.training
    # While a stream is consumed, the caller's code runs in its own modes, between the steps.
    for _ in generate(model, PROMPTS, max_new_tokens=3, stream=True):
        assert model.training and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()

    def boom(*args, **kwargs):
        raise RuntimeError("interrupted")

    model.forward = boom
    with pytest.raises(RuntimeError, match="interrupted"):
        generate(model, PROMPTS, max_new_tokens=3)
    assert model.training


def test_the_cache_takes_the_autocast_dtype_and_fills_the_context_exactly():
    model = random_model()
    made = []
    real = model.new_caches
    model.new_caches = lambda b, n, dtype=None: made.append(n) or real(b, n, dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = generate(model, PROMPTS, max_new_tokens=5, temperature=0)
    assert [len(r) for r in out] == [5, 5, 5] and made == [7 + 5 - 1]
    # The longest prompt (38) and 3 new tokens feed 40 positions: exactly the context.
    assert len(generate(model, [[1] * 38, [2]], max_new_tokens=3, temperature=0)[0]) == 3
    assert generate(model, [[1, 2]], max_new_tokens=0) == [[]]


# -- bad arguments ---------------------------------------------------------------------------------


BAD = [
    (dict(temperature=-1.0), "temperature must be a finite number >= 0"),
    (dict(temperature=math.nan), "temperature must be a finite number >= 0"),
    (dict(top_k=0), "top_k must be an int of at least 1"),
    (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
    (dict(min_p=1.5), r"min_p must be in \[0, 1\]"),
    (dict(min_p=math.nan), r"min_p must be in \[0, 1\]"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be a finite number > 0"),
    (dict(repetition_penalty=True), "repetition_penalty must be a finite number > 0"),
    (dict(max_new_tokens=-1), "max_new_tokens must be an int >= 0, got -1"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an int >= 0, got 2.5"),
    (dict(eos_id=97), r"eos_id must be a token id in \[0, 97\)"),
    (dict(pad_id=-1), r"pad_id must be a token id in \[0, 97\)"),
    (dict(prompts="def f"), r"for one prompt, pass \[prompt\]"),
    (dict(prompts=[]), "prompts must be a non-empty list"),
    (dict(prompts=[[]]), "prompt 0 is empty; give at least one token"),
    (dict(prompts=[[1], [2, 200]]), "prompt 1 holds ids outside the model's vocabulary of 97 tokens"),
    (dict(prompts=[1, 2, 3]), r"a single prompt's ids go in a list of their own: \[ids\]"),
    (dict(prompts=[[1.5]]), "prompt 0 must be a string or a list of token ids"),
    (dict(prompts=["def f"]), "the prompts are text: pass tokenizer="),
    (dict(prompts=[[1] * 38, [1]], max_new_tokens=4),
     r"the longest prompt \(38 tokens\) \+ max_new_tokens \(4\) feeds 41 positions through the model, which exceeds the context of 40"),
]


@pytest.mark.parametrize("kw, match", BAD, ids=[str(kw) for kw, _ in BAD])
def test_bad_arguments_are_value_errors_that_say_what_to_do(kw, match):
    model = random_model().train()
    kw = {"prompts": [[1, 2]], "max_new_tokens": 3, **kw}
    prompts = kw.pop("prompts")
    with pytest.raises(ValueError, match=match):
        generate(model, prompts, **kw)
    with pytest.raises(ValueError, match=match):  # checked when called, not when the stream is first read
        generate(model, prompts, stream=True, **kw)
    assert model.training


def test_bad_logits_and_history():
    with pytest.raises(ValueError, match=r"logits must be a floating-point tensor of shape \(batch, vocab\), got \(5,\)"):
        sample_token(torch.randn(5))
    with pytest.raises(ValueError, match=r"logits must be a floating-point tensor .* got \(1, 5\) \(torch.int64\)"):
        sample_token(torch.ones(1, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"previous must be an integer tensor of token ids of shape \(2, N\)"):
        sample_token(torch.randn(2, 5), repetition_penalty=1.2, previous=torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="previous holds the id 9, outside the vocabulary of 5 tokens"):
        sample_token(torch.randn(1, 5), repetition_penalty=1.2, previous=torch.tensor([[1, 9]]))
    with pytest.raises(ValueError, match="prompt must be a string"):
        stream_text(random_model(), tokenizer(), [1, 2], max_new_tokens=2)
    with pytest.raises(ValueError, match="model must be a minillm LLM"):
        generate(torch.nn.Linear(2, 2), [[1]], max_new_tokens=2)


# -- the command: minillm sample ------------------------------------------------------------------


@pytest.fixture
def hf_folder(tmp_path):
    tok, chain, _ = text_chain()
    save_hf(chain_model(chain, tok.vocab_size), tmp_path / "model")
    tok.save(tmp_path / "tok.bpe")
    return tmp_path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_sample_command_streams_the_continuation(hf_folder, capsys):
    code, out, err = run(capsys, "sample", "--hf", str(hf_folder / "model"), "--tokenizer", str(hf_folder / "tok.bpe"),
                         "--prompt", "x", "--temperature", "0", "--max-new-tokens", "20")
    assert (code, out, err) == (0, "x日本é€\n", "")  # stops at <|endoftext|>, which it does not print
    code, out, _ = run(capsys, "sample", "--hf", str(hf_folder / "model"), "--tokenizer", str(hf_folder / "tok.bpe"),
                       "--prompt", "x", "--seed", "1", "--top-k", "1", "--min-p", "0.5", "--repetition-penalty", "1.0",
                       "--max-new-tokens", "1")
    assert code == 0 and out == "x" + tokenizer().decode(text_chain()[1][1:2]) + "\n"


def test_sample_command_warns_of_a_prompt_that_ends_in_a_space(hf_folder, capsys):
    argv = ["sample", "--hf", str(hf_folder / "model"), "--tokenizer", str(hf_folder / "tok.bpe"), "--temperature", "0",
            "--max-new-tokens", "2"]
    code, out, err = run(capsys, *argv, "--prompt", "x ")
    assert code == 0 and out.startswith("x ") and "ends with a space" in err
    code, _, err = run(capsys, *argv, "--prompt", "x\n")  # a newline is an ordinary end
    assert code == 0 and err == ""


def test_sample_command_reads_a_checkpoint_through_train(hf_folder, capsys, monkeypatch):
    tok, chain, _ = text_chain()
    seen = []
    fake = types.ModuleType("minillm.train")
    fake.load_for_inference = lambda path: seen.append(path) or (chain_model(chain, tok.vocab_size), tok)
    monkeypatch.setitem(sys.modules, "minillm.train", fake)
    code, out, err = run(capsys, "sample", "--checkpoint", "runs/a", "--prompt", "x", "--temperature", "0")
    assert (code, out, err, seen) == (0, "x日本é€\n", "", ["runs/a"])


@pytest.mark.parametrize("extra, match", [
    (["--temperature", "-1"], "temperature must be a finite number >= 0"),
    (["--top-p", "0"], r"top_p must be in \(0, 1\]"),
    (["--max-new-tokens", "100"], "exceeds the context of 64 tokens; ask for fewer tokens or shorten the prompt"),
    (["--prompt", ""], "prompt 0 is empty"),
    (["--no-tokenizer"], "--hf FOLDER needs --tokenizer FILE"),
    (["--hf-missing"], "no config.json"),
])
def test_sample_command_user_errors_exit_2_with_one_line(hf_folder, capsys, extra, match):
    model, tok = str(hf_folder / "model"), str(hf_folder / "tok.bpe")
    argv = ["sample", "--hf", model, "--tokenizer", tok, "--prompt", "x"]
    if extra == ["--no-tokenizer"]:
        argv = ["sample", "--hf", model, "--prompt", "x"]
    elif extra == ["--hf-missing"]:
        argv = ["sample", "--hf", str(hf_folder / "nothing"), "--tokenizer", tok, "--prompt", "x"]
    else:
        argv += extra
    code, out, err = run(capsys, *argv)
    assert code == 2 and out == "" and err.count("\n") == 1 and err.startswith("minillm sample: error: ")
    assert re.search(match, err), err


def test_sample_command_needs_a_model(capsys):
    code, _, err = run(capsys, "sample", "--prompt", "x")
    assert code == 2 and "one of the arguments --checkpoint --hf is required" in err
