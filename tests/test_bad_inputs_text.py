"""Every bad input on the text side (corpus, tokenizer, CLI), one row each, and what it must do.

A row is an API call (it must raise the given exception, with the fragment in its message) or a
command line run in-process (it must exit with the given status; for status 2, ONE line on stderr
holding the fragment, nothing on stdout, no traceback). Every row runs in a fresh working folder,
hashed before and after: a row that fails must leave it exactly as it was, and a row that succeeds
may only add the files it names.
"""

from __future__ import annotations

import hashlib
import io
import sys
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from minillm import cli
from minillm.corpus import EOT, CorpusError, load_corpus
from minillm.files import OutputError
from minillm.tokenizer import Tokenizer, TokenizerError, train_bpe

pytestmark = pytest.mark.filterwarnings("ignore:the training text ran out of pairs")

TEXT = "def f(self):\n    return self.x\n" * 20 + "hello world, hello there\n" * 10


@dataclass
class Row:
    id: str
    call: Callable[[], object] | list[str]  # an API call, or a command line
    expect: type[BaseException] | int  # the exception, or the exit status
    message: str  # a fragment of the error message (or of stderr)
    stdin: bytes | None = None
    patch: Callable[[pytest.MonkeyPatch], None] | None = None
    creates: tuple[str, ...] = ()  # what a successful row may write


def tok() -> Tokenizer:
    return Tokenizer.load("tok.bpe")


def load(name: str) -> Tokenizer:
    return Tokenizer.load(name)


def strict_flush() -> str:
    dec = tok().decoder(errors="strict")
    dec.decode(list("é".encode()[:1]))  # the first of its two bytes (byte b has id b)
    return dec.flush()


def raise_(exc: BaseException) -> Callable[..., None]:
    def f(*args: object, **kwargs: object) -> None:
        raise exc

    return f


def train(*extra: str) -> list[str]:
    return ["tokenizer", "train", "--data", "corp", "--vocab-size", "280", "--out", "new.bpe", *extra]


def encode(*extra: str) -> list[str]:
    return ["tokenizer", "encode", "--tokenizer", "tok.bpe", *extra]


ROWS = [
    # -- train_bpe arguments -------------------------------------------------------------------------
    Row("vocab-nan", lambda: train_bpe(TEXT, float("nan")), TokenizerError, "vocab_size must be a whole number (an int), got float nan"),
    Row("vocab-inf", lambda: train_bpe(TEXT, float("inf")), TokenizerError, "got float inf"),
    Row("vocab-fraction", lambda: train_bpe(TEXT, 300.5), TokenizerError, "got float 300.5"),
    Row("vocab-bool", lambda: train_bpe(TEXT, True), TokenizerError, "got bool True"),
    Row("vocab-str", lambda: train_bpe(TEXT, "300"), TokenizerError, "got str '300'"),
    Row("vocab-huge", lambda: train_bpe(TEXT, 10**12), TokenizerError, "is too large"),
    Row("vocab-small", lambda: train_bpe(TEXT, 200), TokenizerError, "vocab_size=200 is too small"),
    Row("num-proc-0", lambda: train_bpe(TEXT, 300, num_proc=0), TokenizerError, "num_proc must be a whole number of processes, at least 1; got 0"),
    Row("num-proc-bool", lambda: train_bpe(TEXT, 300, num_proc=True), TokenizerError, "got True"),
    Row("num-proc-float", lambda: train_bpe(TEXT, 300, num_proc=1.5), TokenizerError, "got 1.5"),
    Row("pattern-int", lambda: train_bpe(TEXT, 300, pattern=12), TokenizerError, "must be a string (a regex), got int 12"),
    Row("pattern-empty", lambda: train_bpe(TEXT, 300, pattern=""), TokenizerError, "can match the empty string"),
    Row("pattern-skips", lambda: train_bpe(TEXT, 300, pattern=r"\p{L}+|\s"), TokenizerError, "does not match every character"),
    Row("pattern-reverse", lambda: train_bpe(TEXT, 300, pattern=r"(?r)\S+|\s"), TokenizerError, "searches backwards"),
    Row("pattern-bad-regex", lambda: train_bpe(TEXT, 300, pattern="("), TokenizerError, "does not compile"),
    Row("specials-str", lambda: train_bpe(TEXT, 300, special_tokens="<|x|>"), TokenizerError, "must be a list of strings"),
    Row("special-surrogate", lambda: train_bpe(TEXT, 300, special_tokens=["\ud800"]), TokenizerError, "lone surrogate"),
    Row("special-empty", lambda: train_bpe(TEXT, 300, special_tokens=[""]), TokenizerError, "non-empty string"),
    # -- tokenizer files ------------------------------------------------------------------------------
    Row("file-special-negative", lambda: load("neg.bpe"), TokenizerError, "neg.bpe:3: a special token's id must be a whole number written with the digits 0-9, found '-1'"),
    Row("file-special-huge", lambda: load("huge.bpe"), TokenizerError, "huge.bpe:3: the special token '<|endoftext|>' has id 1000000000000000000000000000000"),
    Row("file-special-gap", lambda: load("gap.bpe"), TokenizerError, "(no gaps); renumber it"),
    Row("file-special-same-id", lambda: load("dupid.bpe"), TokenizerError, "dupid.bpe:4: the id"),
    Row("file-special-twice", lambda: load("duptoken.bpe"), TokenizerError, "duptoken.bpe:4: the special token '<|endoftext|>' is listed twice"),
    Row("file-special-not-string", lambda: load("specialjson.bpe"), TokenizerError, "specialjson.bpe:3: malformed #special line: the token must be a non-empty JSON string"),
    Row("file-pattern-12", lambda: load("p12.bpe"), TokenizerError, "p12.bpe:2: malformed #pattern line: expected a JSON string"),
    Row("file-pattern-twice", lambda: load("twopattern.bpe"), TokenizerError, "twopattern.bpe:3: a second #pattern line"),
    Row("file-bytes", lambda: load("bytes.bpe"), TokenizerError, "bytes.bpe:3: malformed #bytes line: need the ids of the 256 bytes, a permutation of 0..255"),
    Row("file-merge-order", lambda: load("order.bpe"), TokenizerError, "joins a token that no earlier line makes"),
    Row("file-extra-merge", lambda: load("extra.bpe"), TokenizerError, "found: fix the count or remove the extra lines"),
    Row("file-truncated", lambda: load("truncated.bpe"), TokenizerError, "the file is truncated"),
    Row("file-merges-negative", lambda: load("nomerges.bpe"), TokenizerError, "the number of merges must be a whole number"),
    Row("file-folder", lambda: load("corp"), TokenizerError, "corp: is a folder"),
    Row("file-missing", lambda: load("missing.bpe"), TokenizerError, "no such tokenizer file"),
    Row("file-not-text", lambda: load("bad.txt"), TokenizerError, "bad.txt: not a text file (expected UTF-8)"),
    Row("ids-with-gap", lambda: Tokenizer({i: bytes([i]) for i in range(256)}, [], {"<|x|>": 300}), TokenizerError, "special token id 300 is outside 0..256"),
    # -- writing tokenizers and manifests -------------------------------------------------------------
    Row("save-existing", lambda: tok().save("tok.bpe"), OutputError, "'tok.bpe' exists"),
    Row("save-folder", lambda: tok().save("corp", overwrite=True), OutputError, "is a folder"),
    Row("save-empty-path", lambda: tok().save(""), OutputError, "path is empty"),
    Row("save-no-folder", lambda: tok().save("nofolder/t.bpe"), OutputError, "does not exist"),
    Row("manifest-over-input", lambda: load_corpus("corp").write_manifest("corp/a.txt", overwrite=True), OutputError, "also an input"),
    Row("manifest-existing", lambda: load_corpus("corp").write_manifest("existing.tsv"), OutputError, "'existing.tsv' exists"),
    Row("manifest-in-glob", lambda: load_corpus("corp/*.txt").write_manifest("corp/m.txt"), OutputError, "matches the input pattern"),
    # -- corpus sources -------------------------------------------------------------------------------
    Row("source-empty", lambda: load_corpus(""), CorpusError, "the data source is empty"),
    Row("source-hf-bare", lambda: load_corpus("hf:"), CorpusError, "needs a dataset name"),
    Row("source-hf-text", lambda: load_corpus("hf:text"), CorpusError, "hf:text is the datasets loader for local text files"),
    Row("source-hf-json", lambda: load_corpus("hf:json"), CorpusError, "hf:json is the datasets loader"),
    Row("source-errors-policy", lambda: load_corpus("corp", errors="bogus"), CorpusError, "errors must be 'strict', 'replace' or 'ignore'"),
    Row("source-missing", lambda: load_corpus("nope"), CorpusError, "nope: no such file or directory"),
    Row("source-glob-empty", lambda: load_corpus("corp/*.nothing"), CorpusError, "matches no files"),
    Row("source-val-fraction", lambda: load_corpus("corp", val_fraction=1.5), CorpusError, "val_fraction must be in [0, 1)"),
    # -- encoding and decoding ------------------------------------------------------------------------
    Row("encode-special", lambda: tok().encode(f"a{EOT}"), TokenizerError, "special token '<|endoftext|>' at character 1;"),
    Row("stream-special-offset", lambda: list(tok().encode_iterable(["ab\ncd\n"] * 30 + [f"x{EOT}"], block_chars=8)),
        TokenizerError, "at character 181;"),
    Row("stream-bytes", lambda: list(tok().encode_iterable([b"bytes"])), TokenizerError, "needs text, got a bytes chunk"),
    Row("allowed-unknown", lambda: tok().encode("x", allowed_special={"<|nope|>"}), TokenizerError, "unknown special token"),
    Row("decode-unknown-id", lambda: tok().decode([10**6]), TokenizerError, "id 1000000 is not in the vocabulary"),
    Row("decoder-strict-flush", strict_flush, TokenizerError, "not valid UTF-8"),
    # -- the command line: corpus ---------------------------------------------------------------------
    Row("cli-hf-bare", ["corpus", "--data", "hf:"], 2, "needs a dataset name"),
    Row("cli-hf-text", ["corpus", "--data", "hf:text"], 2, "hf:text is the datasets loader"),
    Row("cli-hf-json", ["corpus", "--data", "hf:json"], 2, "hf:json is the datasets loader"),
    Row("cli-hf-csv", ["corpus", "--data", "hf:csv"], 2, "hf:csv is the datasets loader"),
    Row("cli-data-empty", ["corpus", "--data", ""], 2, "the data source is empty"),
    Row("cli-manifest-in-input-folder", ["corpus", "--data", "corp", "--manifest", "corp/a.txt"], 2, "also an input"),
    Row("cli-manifest-is-input", ["corpus", "--data", "corp/a.txt", "--manifest", "corp/a.txt", "--force"], 2, "also an input"),
    Row("cli-manifest-in-glob", ["corpus", "--data", "corp/*.txt", "--manifest", "corp/new.txt"], 2, "matches the input pattern"),
    Row("cli-manifest-existing", ["corpus", "--data", "corp", "--manifest", "existing.tsv"], 2, "exists; choose another manifest path"),
    Row("cli-manifest-no-folder", ["corpus", "--data", "corp", "--manifest", "nofolder/m.tsv"], 2, "does not exist; create it first"),
    Row("cli-manifest-empty", ["corpus", "--data", "corp", "--manifest", ""], 2, "the manifest path is empty"),
    Row("cli-data-missing", ["corpus", "--data", "nope"], 2, "nope: no such file or directory"),
    Row("cli-val-fraction", ["corpus", "--data", "corp", "--val-fraction", "1.5"], 2, "val_fraction must be in [0, 1)"),
    Row("cli-errors-choice", ["corpus", "--data", "corp", "--errors", "bogus"], 2, "invalid choice: 'bogus'"),
    Row("cli-data-not-utf8", ["corpus", "--data", "bad.txt"], 2, "bad.txt: not valid UTF-8 (byte 3"),
    Row("cli-no-command", [], 2, "the following arguments are required"),
    # -- the command line: tokenizer train ------------------------------------------------------------
    Row("cli-out-empty", train()[:-1] + [""], 2, "the tokenizer file path is empty"),
    Row("cli-out-in-input-folder", train()[:-1] + ["corp/a.txt", "--force"], 2, "also an input"),
    Row("cli-out-is-input", ["tokenizer", "train", "--data", "corp/a.txt", "--vocab-size", "280", "--out", "corp/a.txt", "--force"], 2, "also an input"),
    Row("cli-out-existing", train()[:-1] + ["tok.bpe"], 2, "'tok.bpe' exists; choose another tokenizer file path, or pass overwrite=True (--force)"),
    Row("cli-out-folder", train()[:-1] + ["somedir", "--force"], 2, "'somedir' is a folder"),
    Row("cli-out-no-folder", train()[:-1] + ["nofolder/t.bpe"], 2, "does not exist; create it first"),
    Row("cli-num-proc-0", train("--num-proc", "0"), 2, "num_proc must be a whole number of processes, at least 1"),
    Row("cli-num-proc-negative", train("--num-proc", "-3"), 2, "got -3"),
    Row("cli-vocab-fraction", ["tokenizer", "train", "--data", "corp", "--vocab-size", "300.5", "--out", "new.bpe"], 2, "invalid int value: '300.5'"),
    Row("cli-vocab-small", ["tokenizer", "train", "--data", "corp", "--vocab-size", "100", "--out", "new.bpe"], 2, "too small"),
    Row("cli-pattern-bad", train("--pattern", "("), 2, "does not compile"),
    Row("cli-pattern-empty", train("--pattern", ""), 2, "can match the empty string"),
    Row("cli-special-empty", train("--special", ""), 2, "non-empty string"),
    Row("cli-train-hf-bare", ["tokenizer", "train", "--data", "hf:", "--vocab-size", "280", "--out", "new.bpe"], 2, "needs a dataset name"),
    # -- the command line: tokenizer encode -----------------------------------------------------------
    Row("cli-text-and-file", encode("--text", "x", "--file", "corp/a.txt"), 2, "argument --file: not allowed with argument --text"),
    Row("cli-file-not-utf8", encode("--file", "bad.txt"), 2, "bad.txt is not valid UTF-8 (byte 3: b'\\xe9')"),
    Row("cli-stdin-not-utf8", encode(), 2, "standard input is not valid UTF-8 (byte 3", stdin=b"caf\xe9 ok"),
    Row("cli-argv-not-utf8", encode("--text", "caf\udce9"), 2, "argument 6 (b'caf\\xe9') is not valid UTF-8"),
    Row("cli-argv-path-not-utf8", ["corpus", "--data", "d\udcff"], 2, "argument 3 (b'd\\xff') is not valid UTF-8"),
    Row("cli-tokenizer-pattern-12", ["tokenizer", "encode", "--tokenizer", "p12.bpe", "--text", "x"], 2, "p12.bpe:2: malformed #pattern line"),
    Row("cli-tokenizer-negative-id", ["tokenizer", "encode", "--tokenizer", "neg.bpe", "--text", "x"], 2, "neg.bpe:3:"),
    Row("cli-tokenizer-missing", ["tokenizer", "encode", "--tokenizer", "missing.bpe", "--text", "x"], 2, "missing.bpe: no such tokenizer file"),
    Row("cli-tokenizer-folder", ["tokenizer", "encode", "--tokenizer", "corp", "--text", "x"], 2, "corp: is a folder"),
    Row("cli-file-missing", encode("--file", "missing.txt"), 2, "missing.txt: no such file or directory; check the path"),
    Row("cli-file-folder", encode("--file", "corp"), 2, "corp: is a directory; give a file, not a folder"),
    Row("cli-special-not-allowed", encode("--text", f"a{EOT}"), 2, "at character 1; pass allowed_special"),
    # -- the command line: notes, Ctrl-C and bugs ------------------------------------------------------
    Row("cli-num-proc-capped", train("--num-proc", "100000"), 0, "note: num_proc=100000 is more than the", creates=("new.bpe",)),
    Row("cli-ctrl-c", train(), 130, "", patch=lambda mp: mp.setattr(cli, "train_bpe", raise_(KeyboardInterrupt()))),
    Row("cli-bug", ["corpus", "--data", "corp"], 1, "internal error: RuntimeError: boom. This is a bug: rerun with --debug",
        patch=lambda mp: mp.setattr(cli, "load_corpus", raise_(RuntimeError("boom")))),
]


@pytest.fixture(scope="module")
def saved_tokenizer(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("tok") / "tok.bpe"
    train_bpe(TEXT, 256 + 24 + 2, special_tokens=(EOT, "<|pad|>")).save(path)
    return path.read_text(encoding="utf-8")


def damaged_files(text: str) -> dict[str, str]:
    """Tokenizer files with one thing wrong each, made from a good one."""
    lines = text.rstrip("\n").split("\n")
    assert lines[2].startswith("#special ") and lines[3].startswith("#special ") and lines[4].startswith("#merges ")
    first_id = int(lines[2].split()[1])
    merges = lines[5:]
    later = next(i for i, m in enumerate(merges) if any(len(t) > 1 for t in m.split(" ")))  # uses an earlier merge
    files = {
        "neg": lines[:2] + [lines[2].replace(f" {first_id} ", " -1 ")] + lines[3:],
        "huge": lines[:2] + [lines[2].replace(f" {first_id} ", f" {10**30} ")] + lines[3:],
        "gap": lines[:2] + [lines[2].replace(f" {first_id} ", f" {first_id + 5} ")] + lines[3:],
        "dupid": lines[:3] + [lines[3].replace(f" {first_id + 1} ", f" {first_id} ")] + lines[4:],
        "duptoken": lines[:3] + [lines[3].replace('"<|pad|>"', f'"{EOT}"')] + lines[4:],
        "specialjson": lines[:2] + [f"#special {first_id} 5"] + lines[3:],
        "p12": lines[:1] + ["#pattern 12"] + lines[2:],
        "twopattern": lines[:2] + [lines[1]] + lines[2:],
        "bytes": lines[:2] + ["#bytes " + " ".join(map(str, [*range(255), 254]))] + lines[2:],
        "order": lines[:5] + [merges[later]] + merges[:later] + merges[later + 1 :],
        "extra": lines + ["q z"],
        "truncated": lines[:-3],
        "nomerges": lines[:4] + ["#merges -3"] + lines[5:],
    }
    return {f"{name}.bpe": "\n".join(ls) + "\n" for name, ls in files.items()}


@pytest.fixture
def work(tmp_path, monkeypatch, saved_tokenizer) -> Path:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "corp").mkdir()
    (tmp_path / "corp" / "a.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "corp" / "b.txt").write_text("naïve café 日本\n" * 10, encoding="utf-8")
    (tmp_path / "somedir").mkdir()
    (tmp_path / "bad.txt").write_bytes("café".encode("latin-1"))
    (tmp_path / "existing.tsv").write_text("keep me\n", encoding="utf-8")
    (tmp_path / "tok.bpe").write_text(saved_tokenizer, encoding="utf-8")
    for name, text in damaged_files(saved_tokenizer).items():
        (tmp_path / name).write_text(text, encoding="utf-8")
    return tmp_path


def snapshot(folder: Path) -> dict[str, str]:
    """Every file and folder under `folder`, with a hash of each file's bytes."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_bad_input(row: Row, work: Path, capsys, monkeypatch):
    if row.patch:
        row.patch(monkeypatch)
    if row.stdin is not None:
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(row.stdin)))
    before = snapshot(work)
    if isinstance(row.call, list):
        code = cli.main(row.call)
        out, err = capsys.readouterr()
        assert code == row.expect, err
        assert "Traceback" not in err
        if code in (1, 2):
            assert len(err.splitlines()) == 1, err
            assert row.message in err, err
        if code == 2:
            assert out == "", out
        if code == 130:
            assert (out, err) == ("", "")
        if code == 0:
            assert row.message in err
    else:
        with pytest.raises(row.expect) as info:
            row.call()
        assert row.message in str(info.value)
    after = snapshot(work)
    assert {k: v for k, v in after.items() if k not in row.creates} == before, "the working folder changed"
    assert all(name in after for name in row.creates)


def outcome(row: Row) -> str:
    return f"exit {row.expect}" if isinstance(row.expect, int) else row.expect.__name__


def test_the_table_covers_enough():
    counts = Counter(outcome(r) for r in ROWS)
    assert len(ROWS) >= 40 and len({r.id for r in ROWS}) == len(ROWS)
    assert {"TokenizerError", "CorpusError", "OutputError", "exit 2", "exit 0", "exit 1", "exit 130"} <= set(counts)
