"""minillm.tokenizer: a hand-worked example, naive == fast, round trips, tiktoken parity, files, errors.

Bad inputs that must raise are rows of tests/test_bad_inputs_text.py; the file format's properties are
in tests/test_tokenizer_properties.py.
"""

from __future__ import annotations

import functools
import json
import random
import time
import tracemalloc

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.corpus import EOT, stdlib_corpus
from minillm.files import OutputError
from minillm.tokenizer import (
    GPT2_PATTERN,
    GPT4_PATTERN,
    Tokenizer,
    TokenizerError,
    bytes_to_unicode,
    pretoken_counts,
    train_bpe,
    train_bpe_naive,
)

# Tiny training texts run out of pairs on purpose; the warning is tested where it matters.
pytestmark = pytest.mark.filterwarnings("ignore:the training text ran out of pairs")


@pytest.fixture(scope="module")
def stdlib_tok():
    corpus = stdlib_corpus()
    return corpus, train_bpe(corpus, 2048)


# -- a worked example you can check by hand ---------------------------------------------------------

def test_hand_worked_example():
    # Pre-tokens (GPT-2 pattern): "low" x1, " low" x2, " lower" x1, " newest" x1 ... counted below.
    text = "low low low lower newest newest"
    counts = pretoken_counts([text], GPT2_PATTERN)
    assert counts == {b"low": 1, b" low": 2, b" lower": 1, b" newest": 2}
    # Pair counts: (l,o): 1+2+1 = 4, (o,w): 4, (" ",l): 3, (" ",n): 2, (n,e),(e,w),(w,e),(e,s),(s,t): 2 ...
    # (l,o) and (o,w) tie at 4; the greater pair by bytes is (o, w), so it is merged first.
    tok = train_bpe(text, 256 + 3, special_tokens=(), pattern=GPT2_PATTERN)
    assert tok.merges == [(b"o", b"w"), (b"l", b"ow"), (b" ", b"low")]
    assert tok.vocab[256] == b"ow" and tok.vocab[257] == b"low" and tok.vocab[258] == b" low"
    assert tok.encode(" lower") == [258, ord("e"), ord("r")]


def test_ties_go_to_the_greater_pair():
    # Every pair occurs once; the greatest by (left, right) bytes is (c, d).
    tok = train_bpe("abcd", 257, special_tokens=())
    assert tok.merges == [(b"c", b"d")]


# -- the two trainers ---------------------------------------------------------------------------------

corpus_text = st.lists(
    st.text(alphabet=st.sampled_from(list("ab cé\n日本😀'1")), max_size=40)
    | st.just(EOT) | st.just("<|pad|>"),
    min_size=1, max_size=12,
).map("".join)


@settings(max_examples=150, deadline=None)
@given(text=corpus_text, extra=st.integers(0, 40), pattern=st.sampled_from([GPT2_PATTERN, GPT4_PATTERN]))
def test_naive_and_fast_trainers_agree(text, extra, pattern):
    specials = (EOT, "<|pad|>")
    try:
        naive = train_bpe_naive(text, 256 + len(specials) + extra, specials, pattern)
    except TokenizerError:  # text made of special tokens only: both must refuse
        with pytest.raises(TokenizerError, match="empty"):
            train_bpe(text, 256 + len(specials) + extra, specials, pattern)
        return
    fast = train_bpe(text, 256 + len(specials) + extra, specials, pattern)
    assert fast.merges == naive.merges
    assert fast.vocab == naive.vocab and fast.special_tokens == naive.special_tokens
    # No merge spans a special token.
    assert not any(s.encode() in t for t in fast.vocab.values() for s in specials if len(t) >= len(s))


def test_trainers_agree_on_real_text():
    text = stdlib_corpus().text()[:150_000]
    assert train_bpe(text, 600).merges == train_bpe_naive(text, 600).merges


def test_parallel_counting_gives_the_same_merges(stdlib_tok):
    corpus, tok = stdlib_tok
    docs = [d.text for d in corpus.documents]
    assert pretoken_counts(docs, num_proc=2, special_tokens=[EOT]) == pretoken_counts(docs, num_proc=1, special_tokens=[EOT])
    assert train_bpe(docs[:200], 1000, num_proc=1).merges == train_bpe(docs[:200], 1000, num_proc=2).merges


def test_learns_python(stdlib_tok):
    _, tok = stdlib_tok
    tokens = set(tok.vocab.values())
    assert {b"    ", b"self", b" self", b"def", b" return"} <= tokens
    assert tok.vocab_size == 2048 and tok.special_tokens == {EOT: 2047}


# -- encoding and decoding ----------------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(s=st.text())
def test_round_trip_any_unicode(stdlib_tok, s):
    _, tok = stdlib_tok
    assert tok.decode(tok.encode_ordinary(s)) == s
    assert tok.encode_python(s.replace(EOT, "")) == tok.encode(s.replace(EOT, ""))


@pytest.mark.parametrize("s", ["naïve café", "日本語のテキスト", "emoji 😀👩‍👩‍👧 done", "e\u0301 combining\u0308", "\x00\x7f\r\n\t", ""])
def test_round_trip_examples(stdlib_tok, s):
    _, tok = stdlib_tok
    ids = tok.encode(s)
    assert tok.decode(ids) == s and tok.encode_python(s) == ids


def test_tiktoken_parity_on_the_whole_corpus(stdlib_tok):
    corpus, tok = stdlib_tok
    text = corpus.text()
    enc = tok.to_tiktoken()
    ids = enc.encode(text, allowed_special="all")
    assert ids == tok.encode_python(text, allowed_special="all")
    assert ids == tok.encode(text, allowed_special="all")
    assert ids.count(tok.eot_id) == len(corpus) - 1


def test_encode_batch(stdlib_tok):
    _, tok = stdlib_tok
    texts = ["def f(x):\n    return x", "", "日本"]
    assert tok.encode_batch(texts) == [tok.encode(t) for t in texts]


def test_special_token_policy(stdlib_tok):
    _, tok = stdlib_tok
    text = f"a{EOT}b"
    with pytest.raises(TokenizerError, match=r"contains the special token '<\|endoftext\|>' at character 1"):
        tok.encode(text)
    with pytest.raises(TokenizerError, match="contains the special token"):
        tok.encode_python(text)
    ids = tok.encode(text, allowed_special={EOT})
    assert ids == tok.encode(text, allowed_special="all") == [ord("a"), tok.eot_id, ord("b")]
    assert EOT.encode() != b"" and tok.eot_id not in tok.encode_ordinary(text)
    assert tok.decode(tok.encode_ordinary(text)) == text
    with pytest.raises(TokenizerError, match="unknown special token"):
        tok.encode("x", allowed_special={"<|nope|>"})


def test_special_tokens_are_never_split():
    tok = train_bpe(["<|user|>hi<|endoftext|>"] * 5, 270, special_tokens=("<|endoftext|>", "<|user|>"))
    ids = tok.encode("<|user|>hi<|endoftext|>", allowed_special="all")
    assert ids[0] == tok.special_tokens["<|user|>"] and ids[-1] == tok.special_tokens["<|endoftext|>"]


def test_added_special_tokens_keep_every_old_id(stdlib_tok, tmp_path):
    corpus, tok = stdlib_tok
    chat = tok.with_special_tokens(["<|user|>", "<|assistant|>", "<|end|>"])
    assert chat.vocab_size == tok.vocab_size + 3
    assert {s: chat.special_tokens[s] for s in tok.special_tokens} == tok.special_tokens
    assert [chat.special_tokens[s] for s in ("<|user|>", "<|assistant|>", "<|end|>")] == [tok.vocab_size + i for i in range(3)]
    text = corpus.split("val")[0].text[:20_000]
    assert chat.encode(text) == tok.encode(text)  # old text, old ids
    ids = chat.encode("<|user|>def f():<|end|>", allowed_special="all")
    assert ids[0] == chat.special_tokens["<|user|>"] and ids[-1] == chat.special_tokens["<|end|>"]
    assert chat.decode(ids) == "<|user|>def f():<|end|>"
    chat.save(tmp_path / "chat.bpe")
    again = Tokenizer.load(tmp_path / "chat.bpe")
    assert again.special_tokens == chat.special_tokens and again.encode(text) == tok.encode(text)
    assert chat.with_special_tokens(["<|end|>", "<|system|>"]).special_tokens == {**chat.special_tokens,
                                                                                  "<|system|>": chat.vocab_size}
    for bad, message in [(["<|a|>", "<|a|>"], "duplicate special token"), ([""], "non-empty"),
                         ("<|a|>", "must be a list")]:
        with pytest.raises(TokenizerError, match=message):
            tok.with_special_tokens(bad)


def test_invalid_utf8_decodes_with_replacement_or_raises(stdlib_tok):
    _, tok = stdlib_tok
    ids = tok.encode("é")  # two bytes; keep only the first
    first = [i for i in range(256) if tok.vocab[i] == "é".encode()[:1]]
    assert tok.decode(first) == "\ufffd"
    with pytest.raises(TokenizerError, match="not valid UTF-8"):
        tok.decode(first, errors="strict")
    assert tok.decode(ids, errors="strict") == "é"


def test_unknown_id(stdlib_tok):
    _, tok = stdlib_tok
    with pytest.raises(TokenizerError, match="id 99999 is not in the vocabulary"):
        tok.decode([1, 99999])


@pytest.fixture(scope="module")
def gpt2_tok(stdlib_tok):
    corpus, _ = stdlib_tok
    return train_bpe(corpus.text()[:300_000], 1024, pattern=GPT2_PATTERN)


@settings(max_examples=80, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab \n\t.(日")), max_size=400), cuts=st.lists(st.integers(0, 400), max_size=12))
def test_encode_iterable_equals_encode(stdlib_tok, gpt2_tok, text, cuts):
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    for tok in (stdlib_tok[1], gpt2_tok):
        assert list(tok.encode_iterable(pieces, block_chars=8)) == tok.encode(text)


def test_encode_iterable_on_real_modules(stdlib_tok, gpt2_tok):
    # Whole modules fed line by line in small blocks: the case where GPT-2's end-of-text rule bit.
    corpus, _ = stdlib_tok
    for doc in corpus.documents[:60]:
        lines = doc.text.splitlines(keepends=True)
        for tok in (stdlib_tok[1], gpt2_tok):
            assert list(tok.encode_iterable(lines, block_chars=256)) == tok.encode_ordinary(doc.text), doc.name


def test_encode_iterable_memory_is_bounded(stdlib_tok):
    corpus, tok = stdlib_tok
    sample = max((d.text for d in corpus.documents), key=len)
    lines = sample.splitlines(keepends=True)

    def peak_for(copies: int) -> tuple[int, int]:
        def stream():  # copies of the largest module, generated lazily, one line at a time
            for _ in range(copies):
                yield from lines
                yield "\n"

        tracemalloc.start()
        count = sum(1 for _ in tok.encode_iterable(stream(), block_chars=1 << 14))
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        return count, peak

    tok.encode("warm up")  # builds the tiktoken fast path once, outside the measurement
    count5, peak5 = peak_for(5)
    count40, peak40 = peak_for(40)
    assert count40 > 7 * count5
    # Memory does not grow with the length of the stream, and stays far below the text's size
    # (40 copies are over 9 MB of text and over 2 M ids).
    assert peak40 < 1.25 * peak5 + 100_000, (peak5, peak40)
    assert peak40 < 40 * len(sample) / 2


# -- files ----------------------------------------------------------------------------------------------

def test_save_load_round_trip(stdlib_tok, tmp_path):
    _, tok = stdlib_tok
    path = tmp_path / "tok.bpe"
    tok.save(path)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#minillm-bpe v1\n#pattern ")
    assert "\nĠ self\n" in text or "\nĠs elf\n" in text or "Ġ" in text  # GPT-2's printable alphabet
    again = Tokenizer.load(path)
    assert again.vocab == tok.vocab and again.merges == tok.merges
    assert again.special_tokens == tok.special_tokens and again.pattern == tok.pattern
    assert not list(tmp_path.glob("*.tmp"))


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda ls: ["#not-a-tokenizer"] + ls[1:], r":1: expected the header"),
        (lambda ls: ls[:1] + ["#pattern [unclosed"] + ls[2:], r":2: malformed #pattern line"),
        (lambda ls: ls[:5] + ["onlyonetoken"] + ls[6:], r":6: expected a merge 'left right'"),
        (lambda ls: ls[:-3], r"announced, \d+ found: the file is truncated"),
        (lambda ls: ls[:4] + ["x y z"] + ls[5:], r":5: expected a merge"),
    ],
)
def test_malformed_file_names_the_line(tmp_path, mutate, match):
    tok = train_bpe("hello world " * 20 + "abc def ghi jkl", 300)
    path = tmp_path / "tok.bpe"
    tok.save(path)
    lines = path.read_text(encoding="utf-8").rstrip("\n").split("\n")
    path.write_text("\n".join(mutate(lines)) + "\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=match):
        Tokenizer.load(path)


def test_load_missing_and_binary_files(tmp_path):
    with pytest.raises(TokenizerError, match="no such tokenizer file"):
        Tokenizer.load(tmp_path / "nope.bpe")
    (tmp_path / "bin.bpe").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(TokenizerError, match="not a text file"):
        Tokenizer.load(tmp_path / "bin.bpe")


def _write_gpt2_files(tok: Tokenizer, folder):
    """Write `tok` the way GPT-2 ships its tokenizer: encoder.json and vocab.bpe, bytes in GPT-2 order."""
    table = bytes_to_unicode()
    as_text = lambda b: "".join(table[x] for x in b)  # noqa: E731
    # GPT-2 numbers the single bytes in the order of its printable table, not 0..255.
    order = sorted(range(256), key=lambda b: (table[b] != chr(b), ord(table[b])))
    encoder = {as_text(bytes([b])): i for i, b in enumerate(order)}
    for i, (a, b) in enumerate(tok.merges):
        encoder[as_text(a + b)] = 256 + i
    encoder["<|endoftext|>"] = len(encoder)
    (folder / "encoder.json").write_text(json.dumps(encoder), encoding="utf-8")
    merges = "\n".join(f"{as_text(a)} {as_text(b)}" for a, b in tok.merges)
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + merges + "\n", encoding="utf-8")
    return encoder


def test_gpt2_format(tmp_path):
    base = train_bpe(stdlib_corpus().text()[:200_000], 700, pattern=GPT2_PATTERN)
    encoder = _write_gpt2_files(base, tmp_path)
    tok = Tokenizer.from_gpt2_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")
    assert tok.special_tokens == {"<|endoftext|>": encoder["<|endoftext|>"]}
    assert tok.ranks[b"!"] == 0 and tok.ranks[b" "] != 32  # GPT-2's byte order survived
    text = "def f(self):\n    return 'naïve' + str(42)\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text and ids == tok.encode_python(text)
    # Same segmentation as the tokenizer it was written from, through a different id mapping.
    assert [tok.vocab[i] for i in ids] == [base.vocab[i] for i in base.encode(text)]
    tok.save(tmp_path / "again.bpe")
    assert Tokenizer.load(tmp_path / "again.bpe").encode(text) == ids
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"vocab.bpe:2: expected a merge"):
        Tokenizer.from_gpt2_files(tmp_path / "encoder.json", tmp_path / "vocab.bpe")


# -- bad input ----------------------------------------------------------------------------------------

def test_bad_training_input():
    with pytest.raises(TokenizerError, match=r"vocab_size=200 is too small: .* need at least 257"):
        train_bpe("abc", 200)
    with pytest.raises(TokenizerError, match="the training corpus is empty"):
        train_bpe("", 300)
    with pytest.raises(TokenizerError, match="the training corpus is empty"):
        train_bpe([EOT, EOT], 300)
    with pytest.raises(TokenizerError, match=r"duplicate special token\(s\) \['<\|a\|>'\]"):
        train_bpe("abc", 300, special_tokens=("<|a|>", "<|a|>"))
    with pytest.raises(TokenizerError, match="pattern does not compile"):
        train_bpe("abc", 300, pattern=r"(unclosed")
    with pytest.raises(TokenizerError, match="document 1 is int"):
        train_bpe(["ok", 5], 300)  # type: ignore[list-item]


def test_ids_as_tensors_and_special_names(stdlib_tok):
    import numpy as np
    import torch

    _, tok = stdlib_tok
    ids = tok.encode("def f(): pass")
    assert tok.decode(torch.tensor(ids)) == tok.decode(np.array(ids)) == "def f(): pass"
    assert tok.encode(f"a{EOT}", allowed_special=EOT) == tok.encode(f"a{EOT}", allowed_special={EOT})


def test_lone_surrogates_are_replaced_on_both_paths(stdlib_tok):
    _, tok = stdlib_tok
    text = "ab\udc80c"
    assert tok.encode(text) == tok.encode_python(text) == tok.encode("ab\ufffdc")


def test_custom_patterns_are_checked(stdlib_tok):
    _, tok = stdlib_tok
    with pytest.raises(TokenizerError, match="does not match every character"):
        Tokenizer(tok.vocab, tok.merges, tok.special_tokens, pattern=r"\p{L}+|\s")
    # A pattern tiktoken's engine reads differently ($ before a final newline) falls back, with a warning.
    odd = Tokenizer(tok.vocab, tok.merges, tok.special_tokens, pattern=r"[a-z]+$|[a-z]|\s|[^a-z\s]")
    with pytest.warns(UserWarning, match="pure-Python path"):
        ids = odd.encode("ab\n")
    assert ids == odd.encode_python("ab\n")


def test_string_sources_that_look_like_paths(tmp_path):
    with pytest.raises(TokenizerError, match="looks like a corpus name or a path"):
        train_bpe("stdlib", 300)
    (tmp_path / "a.txt").write_text("hello hello", encoding="utf-8")
    with pytest.raises(TokenizerError, match="Pass Path"):
        train_bpe(str(tmp_path / "a.txt"), 300)
    with pytest.warns(UserWarning, match="ran out of pairs"):
        small = train_bpe("abab", 300, special_tokens=())
    assert small.vocab_size < 300


def test_paths_and_corpora_train_on_the_training_split(tmp_path):
    from minillm.corpus import load_corpus

    for i in range(60):
        (tmp_path / f"doc{i:02d}.txt").write_text(f"unique{i:02d}word " * 5, encoding="utf-8")
    corpus = load_corpus(tmp_path)
    assert corpus.split("val")  # some documents are held out
    tok = train_bpe(corpus, 2000)
    held_out = {d.text.split()[0].encode() for d in corpus.split("val")}
    learned = set(tok.vocab.values())
    assert not any(b" " + w in learned or w in learned for w in held_out)


def test_save_refuses_ids_it_cannot_store(tmp_path):
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"ab", 257: b"xy", 258: b"abc"}
    tok = Tokenizer(vocab, [(b"a", b"b"), (b"ab", b"c"), (b"x", b"y")])  # merge 1 makes id 258
    with pytest.raises(TokenizerError, match="ids do not follow its merges"):
        tok.save(tmp_path / "t.bpe")


def test_bad_tokenizer_construction():
    vocab = {i: bytes([i]) for i in range(256)}
    with pytest.raises(TokenizerError, match="non-empty string"):
        Tokenizer(vocab, [], {"": 300})
    with pytest.raises(TokenizerError, match=r"special token id 300 is outside 0\.\.257: .* without gaps"):
        Tokenizer(vocab, [], {"<|a|>": 300, "<|a|>x": 301})
    with pytest.raises(TokenizerError, match="lacks 1 single bytes"):
        Tokenizer({i: bytes([i]) for i in range(255)}, [])
    with pytest.raises(TokenizerError, match="merge 0 .* not in the vocabulary"):
        Tokenizer(vocab, [(b"a", b"b")])
    with pytest.raises(TokenizerError, match="holds the token b'a' twice"):
        Tokenizer({**vocab, 256: b"a"}, [])
    with pytest.raises(TokenizerError, match="also ordinary token ids"):
        Tokenizer(vocab, [], {"<|x|>": 5})


# -- special tokens: overlapping ones, and ones that hold a newline --------------------------------------

def _tok_with_specials(specials):
    text = ("def f(self):\n    return self.x\n" * 20 + "ab\ncd e\n") * 3
    return train_bpe(text, 256 + 40 + len(specials), special_tokens=specials)


def test_overlapping_special_tokens_longest_match_wins():
    double = EOT + EOT
    tok = _tok_with_specials((EOT, double, "<|x|>"))
    single, both = tok.special_tokens[EOT], tok.special_tokens[double]
    text = f"a{EOT}{EOT}{EOT}b{EOT}"
    expected = [ord("a"), both, single, ord("b"), single]
    assert tok.encode(text, allowed_special="all") == tok.encode_python(text, allowed_special="all") == expected
    assert list(tok.encode_iterable(list(text), allowed_special="all", block_chars=1)) == expected
    assert tok.encode_batch([text, "x"], allowed_special="all") == [expected, [ord("x")]]
    assert tok.decode(expected) == text
    # Allowing the short one only is not enough: the longest match is the double one, and it is not allowed.
    with pytest.raises(TokenizerError, match=r"special token '<\|endoftext\|><\|endoftext\|>' at character 1"):
        tok.encode(text, allowed_special={EOT})
    # Either order of definition gives the same cut.
    other = Tokenizer(tok.vocab, tok.merges, {double: single, EOT: both, "<|x|>": tok.special_tokens["<|x|>"]})
    assert other.encode(text, allowed_special="all") == [ord("a"), single, both, ord("b"), both]


def test_special_token_holding_a_newline_is_the_same_on_every_path():
    special = "<|x\ny|>"
    tok = _tok_with_specials((EOT, special))
    text = "aa\nbb\n" * 40 + f"x{special}z\nq\n" + "cc\ndd\n" * 40
    whole = tok.encode(text, allowed_special="all")
    assert tok.special_tokens[special] in whole
    assert whole == tok.encode_python(text, allowed_special="all")
    for block in (1, 3, 8, 64):
        assert list(tok.encode_iterable(text.splitlines(keepends=True), allowed_special="all", block_chars=block)) == whole
    # Not allowed: every path refuses it, at the same offset in the whole input.
    at = text.index(special)
    for run in (lambda: tok.encode(text), lambda: tok.encode_python(text),
                lambda: list(tok.encode_iterable(text.splitlines(keepends=True), block_chars=8))):
        with pytest.raises(TokenizerError, match=f"at character {at};"):
            run()


@settings(max_examples=120, deadline=None)
@given(parts=st.lists(st.sampled_from(["a", "b", "\n", " ", "<|x\ny|>", "<|x\n", EOT, EOT + EOT, "\ny|>"]), max_size=40),
       cuts=st.lists(st.integers(0, 200), max_size=8), block=st.sampled_from([1, 2, 5, 16]))
def test_streaming_equals_whole_text_with_awkward_special_tokens(parts, cuts, block):
    tok = _awkward_tok()
    text = "".join(parts)
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    assert list(tok.encode_iterable(pieces, allowed_special="all", block_chars=block)) == tok.encode(text, allowed_special="all")
    try:
        expected = tok.encode(text)
    except TokenizerError as e:  # the same error, naming the same offset in the whole text
        with pytest.raises(TokenizerError) as streamed:
            list(tok.encode_iterable(pieces, block_chars=block))
        assert str(streamed.value) == str(e)
    else:
        assert list(tok.encode_iterable(pieces, block_chars=block)) == expected


@functools.cache
def _awkward_tok():
    return _tok_with_specials((EOT, EOT + EOT, "<|x\ny|>"))


# -- the encoder: tiktoken's rule, in n log n --------------------------------------------------------------

def _bpe_reference(ranks: dict[bytes, int], piece: bytes) -> list[int]:
    """The rule written the obvious, quadratic way (the package's encoder before it used a heap)."""
    parts = [piece[i : i + 1] for i in range(len(piece))]
    while len(parts) > 1:
        best, at = None, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and (best is None or r < best):
                best, at = r, i
        if best is None:
            break
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return [ranks[p] for p in parts]


@pytest.fixture(scope="module")
def ab_tok():
    rng = random.Random(0)
    text = "".join(rng.choice("aab") for _ in range(30_000)) + " " + "a" * 3000
    return train_bpe(text, 700, special_tokens=(), pattern=r"\S+|\s")


@settings(max_examples=200, deadline=None)
@given(piece=st.binary(max_size=200) | st.text(alphabet="ab", max_size=300).map(str.encode)
       | st.integers(1, 600).map(lambda n: b"a" * n))
def test_heap_bpe_equals_the_reference_rule(stdlib_tok, ab_tok, piece):
    for tok in (stdlib_tok[1], ab_tok):
        assert tok._bpe(piece) == _bpe_reference(tok.ranks, piece)


def test_encoder_is_subquadratic_on_one_huge_pre_token(ab_tok):
    # 1 MB without a space is a single pre-token of the pattern \S+ (tiktoken would take it too, but
    # this is the pure-Python path that custom patterns fall back to).
    rng = random.Random(1)
    big = "".join(rng.choices("aab", k=1_000_000))
    timings = {}
    for n in (100_000, 1_000_000):
        start = time.perf_counter()
        ids = ab_tok.encode_python(big[:n])
        timings[n] = time.perf_counter() - start
        assert ab_tok.decode(ids) == big[:n]
    assert timings[1_000_000] < 30, timings  # the quadratic encoder took hours
    assert timings[1_000_000] / timings[100_000] < 25, timings  # quadratic would be 100


def test_a_pre_token_that_is_a_token_is_that_token():
    # tiktoken's rule starts by looking the whole pre-token up. Here BPE alone would stop at
    # [ab, c, d] ("abc" and "cd" are not tokens), yet "abcd" is one; both paths give the token.
    vocab = {i: bytes([i]) for i in range(256)} | {256: b"ab", 257: b"bc", 258: b"bcd", 259: b"abcd"}
    tok = Tokenizer(vocab, [(b"a", b"b"), (b"b", b"c"), (b"bc", b"d"), (b"a", b"bcd")], pattern=r"\S+|\s")
    assert tok._bpe(b"abcd") == [256, ord("c"), ord("d")]
    assert tok.encode("abcd") == tok.encode_python("abcd") == tok.to_tiktoken().encode_ordinary("abcd") == [259]


# -- streaming decode -------------------------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_stream_decoder_pieces_join_to_decode(stdlib_tok, data):
    _, tok = stdlib_tok
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=30)
                    | st.text(alphabet=st.sampled_from(list("aé日本語😀👩‍👧 \n")), max_size=30).map(tok.encode))
    dec = tok.decoder()
    pieces = [dec.decode(i) for i in ids] + [dec.flush()]
    assert "".join(pieces) == tok.decode(ids)
    assert "".join(tok.decode_stream(ids)) == tok.decode(ids)


def test_stream_decoder_never_garbles_non_ascii(stdlib_tok):
    import torch

    _, tok = stdlib_tok
    for text in ["日本語のテキスト", "emoji 😀👩‍👩‍👧 done", "naïve café", "\u0915\u094d\u0937"]:
        ids = tok.encode(text)
        one_by_one = "".join(tok.decode([i]) for i in ids)
        pieces = list(tok.decode_stream(ids))
        assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
        assert len(pieces) <= len(ids)
        if "日" in text:
            assert "\ufffd" in one_by_one  # why the streaming decoder exists
        dec = tok.decoder()
        assert dec.decode(torch.tensor(ids[:2])) + dec.decode(torch.tensor(ids[2:])) + dec.flush() == text
    dec = tok.decoder(errors="strict")
    dec.decode(tok.encode("日")[:1])
    with pytest.raises(TokenizerError, match="not valid UTF-8"):
        dec.flush()


# -- files: atomic, never over an existing file unless asked ------------------------------------------------

def test_save_is_atomic_and_keeps_existing_files(tmp_path, monkeypatch):
    import os

    tok = train_bpe("hello world " * 20, 270)
    path = tmp_path / "tok.bpe"
    (tmp_path / "tok.bpe.tmp").write_text("the user's own file", encoding="utf-8")
    tok.save(path)
    before = path.read_bytes()
    assert (tmp_path / "tok.bpe.tmp").read_text(encoding="utf-8") == "the user's own file"
    bigger = train_bpe("hello world " * 20 + "abc abd", 275)
    with pytest.raises(OutputError, match="exists"):
        bigger.save(path)
    assert path.read_bytes() == before

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space left"):
        bigger.save(path, overwrite=True)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tok.bpe", "tok.bpe.tmp"]
    bigger.save(path, overwrite=True)
    assert Tokenizer.load(path).merges == bigger.merges


def test_load_accepts_crlf_line_endings(tmp_path):
    tok = train_bpe("hello world " * 20, 270)
    tok.save(tmp_path / "tok.bpe")
    crlf = tmp_path / "crlf.bpe"
    crlf.write_bytes((tmp_path / "tok.bpe").read_bytes().replace(b"\n", b"\r\n"))
    again = Tokenizer.load(crlf)
    assert again.merges == tok.merges and again.special_tokens == tok.special_tokens


def test_num_proc_beyond_the_cores_is_capped_with_a_note():
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    with pytest.warns(UserWarning, match=f"num_proc={cores + 22} is more than the {cores} available"):
        counts = pretoken_counts(["a b c"], num_proc=cores + 22)
    assert counts == pretoken_counts(["a b c"], num_proc=1)
