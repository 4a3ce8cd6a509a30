"""Properties of the tokenizer file format.

* What `save` writes, `load` reads back equal: the same merges, special tokens and pattern, and the
  same ids and text on sample strings.
* Any single-byte corruption of a saved file either loads a tokenizer that keeps its own invariants
  (ids in 0..vocab_size-1, decode(encode(s)) == s, the two encoders agree) or raises TokenizerError;
  never another exception, and never a tokenizer that silently loses text. (A damaged pattern can
  pass every check at load time yet skip some character in some text; encoding that text then
  raises a TokenizerError that says so, which is not silent, and counts as keeping the invariants.)
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from minillm.corpus import EOT
from minillm.tokenizer import GPT2_PATTERN, GPT4_PATTERN, Tokenizer, TokenizerError, train_bpe

pytestmark = pytest.mark.filterwarnings("ignore:the training text ran out of pairs", "ignore:encoding with the pure-Python path")

SAMPLES = [
    "", "hello world", "def f(self):\n    return self.x  # ok\r\n", "naïve café, e\u0301", "日本語 😀👩‍👧",
    "  \t\n\n   x", "12345 + 678", "don't STOP", "a\x00b\x7f\u2028", f"a{EOT}b", "<|pad|><|pad|>x",
]
TRAIN = "hello world, hello there! def f(self): return self.x\n" * 8 + "naïve café 日本 12345 don't\n" * 4


def check_invariants(tok: Tokenizer) -> None:
    """What every tokenizer must keep, whatever file it came from."""
    for s in SAMPLES:
        try:
            encodings = (tok.encode_ordinary(s), tok.encode(s, allowed_special="all"))
            python = tok.encode_python(s, allowed_special="all")
        except TokenizerError as e:
            assert "pre-tokenization pattern does not match every character" in str(e)
            continue
        for ids in encodings:
            assert all(0 <= i < tok.vocab_size for i in ids), (s, ids)
            assert tok.decode(ids) == s, s
        assert encodings[1] == python, s


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> bytes:
    tok = train_bpe(TRAIN, 256 + 40 + 3, special_tokens=(EOT, "<|pad|>", "<|pad|><|pad|>"), pattern=GPT4_PATTERN)
    path = tmp_path_factory.mktemp("tok") / "tok.bpe"
    tok.save(path)
    return path.read_bytes()


@settings(max_examples=40, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab c\n日😀'1é")), min_size=1, max_size=200),
       extra=st.integers(0, 60), pattern=st.sampled_from([GPT2_PATTERN, GPT4_PATTERN, r"\S+|\s+"]),
       specials=st.lists(st.sampled_from([EOT, "<|pad|>", "<|pad|><|pad|>", "<|a\nb|>", "é"]), unique=True, max_size=3))
def test_save_then_load_is_the_same_tokenizer(tmp_path_factory, text, extra, pattern, specials):
    try:
        tok = train_bpe(text, 256 + len(specials) + extra, special_tokens=specials, pattern=pattern)
    except TokenizerError:  # the text was all special tokens
        return
    path = tmp_path_factory.mktemp("rt") / "tok.bpe"
    tok.save(path)
    again = Tokenizer.load(path)
    assert (again.vocab, again.merges, again.special_tokens, again.pattern) == (tok.vocab, tok.merges, tok.special_tokens, tok.pattern)
    for s in SAMPLES + [text]:
        assert again.encode(s, allowed_special="all") == tok.encode(s, allowed_special="all")
        assert again.decode(tok.encode_ordinary(s)) == s
    check_invariants(again)


def load_corrupted(tmp_path: Path, data: bytes) -> Tokenizer | None:
    path = tmp_path / "bad.bpe"
    path.write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a damaged pattern may send encoding to the pure-Python path
        try:
            tok = Tokenizer.load(path)
        except TokenizerError:
            return None
        check_invariants(tok)
        return tok


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_single_byte_corruption_loads_a_sound_tokenizer_or_raises_tokenizer_error(tmp_path, saved, data):
    at = data.draw(st.integers(0, len(saved) - 1), label="position")
    byte = data.draw(st.integers(0, 255).filter(lambda b: b != saved[at]), label="new byte")
    load_corrupted(tmp_path, saved[:at] + bytes([byte]) + saved[at + 1 :])


@pytest.mark.parametrize("new", [b"0", b"9", b" ", b"\n", b"-", b"\\", b"\x80"])
def test_every_position_with_typical_bytes(tmp_path, saved, new):
    # A sweep of the whole file with the bytes most likely to slip through: digits (ids, counts),
    # separators, a JSON escape and a UTF-8 continuation byte.
    outcomes = {"loaded": 0, "refused": 0}
    for at in range(len(saved)):
        if saved[at : at + 1] != new:
            tok = load_corrupted(tmp_path, saved[:at] + new + saved[at + 1 :])
            outcomes["loaded" if tok is not None else "refused"] += 1
    assert outcomes["refused"] > 0
