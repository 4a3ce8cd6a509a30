"""The `minillm` command, run in-process: what it prints, what it writes, and how it fails.

Every bad input has a row in tests/test_bad_inputs_text.py; here are the successful runs, the
rule for bugs (exit 1, traceback only with --debug) and Ctrl-C (exit 130, nothing left behind).
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minillm import cli
from minillm.corpus import EOT
from minillm.tokenizer import Tokenizer

pytestmark = pytest.mark.filterwarnings("ignore:the training text ran out of pairs")

CODE = "def f(self):\n    return self.x\n"


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working folder with a small corpus in data/, as the current directory."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "a.txt").write_text(CODE * 50, encoding="utf-8")
    (tmp_path / "data" / "b.txt").write_text("naïve 日本 café\n" * 20, encoding="utf-8")
    return tmp_path


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*"))


def test_train_and_encode(work, capsys, monkeypatch):
    code, out, err = run(capsys, "tokenizer", "train", "--data", "data", "--val-fraction", "0", "--vocab-size", "300", "--out", "tok.bpe")
    assert code == 0, err
    assert "wrote tok.bpe" in out
    tok = Tokenizer.load("tok.bpe")
    assert tok.vocab_size <= 300 and b" self" in tok.vocab.values()

    code, out, _ = run(capsys, "tokenizer", "encode", "--tokenizer", "tok.bpe", "--text", "    return self.x")
    assert code == 0 and [int(x) for x in out.split()] == tok.encode("    return self.x")

    text = "return self\r\n日本\n" * 5000  # longer than one read block, \r\n kept as it is
    Path("in.txt").write_bytes(text.encode("utf-8"))
    code, out, _ = run(capsys, "tokenizer", "encode", "--tokenizer", "tok.bpe", "--file", "in.txt", "--count")
    assert code == 0 and int(out) == len(tok.encode(text))
    code, out, _ = run(capsys, "tokenizer", "encode", "--tokenizer", "tok.bpe", "--file", "in.txt")
    assert [int(x) for x in out.split()] == tok.encode(text)

    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO("x 日本".encode())))
    code, out, _ = run(capsys, "tokenizer", "encode", "--tokenizer", "tok.bpe")
    assert code == 0 and [int(x) for x in out.split()] == tok.encode("x 日本")

    code, out, _ = run(capsys, "tokenizer", "encode", "--tokenizer", "tok.bpe", "--text", f"x{EOT}", "--allow-special")
    assert code == 0 and [int(x) for x in out.split()] == [ord("x"), tok.eot_id]


def test_outputs_are_replaced_only_with_force(work, capsys):
    assert run(capsys, "tokenizer", "train", "--data", "data", "--vocab-size", "280", "--out", "tok.bpe")[0] == 0
    first = Path("tok.bpe").read_bytes()
    code, _, err = run(capsys, "tokenizer", "train", "--data", "data", "--vocab-size", "290", "--out", "tok.bpe")
    assert code == 2 and "--force" in err and Path("tok.bpe").read_bytes() == first
    assert run(capsys, "tokenizer", "train", "--data", "data", "--vocab-size", "290", "--out", "tok.bpe", "--force")[0] == 0
    assert Path("tok.bpe").read_bytes() != first
    assert listing(work) == ["data", "data/a.txt", "data/b.txt", "tok.bpe"]  # no temporary file anywhere


def test_corpus_summary_and_manifest(work, capsys):
    Path("one").mkdir()
    Path("one/a.txt").write_text("hello", encoding="utf-8")
    code, out, _ = run(capsys, "corpus", "--data", "one", "--manifest", "m.tsv")
    assert code == 0
    assert "documents   1" in out and "bytes       5" in out
    assert "note: the val split is empty" in out  # one document cannot be split
    assert Path("m.tsv").read_text(encoding="utf-8").count("\n") == 2
    code, _, err = run(capsys, "corpus", "--data", "data", "--manifest", "m.tsv")
    assert code == 2 and "exists" in err and Path("m.tsv").read_text(encoding="utf-8").count("\n") == 2
    assert run(capsys, "corpus", "--data", "data", "--manifest", "m.tsv", "--force")[0] == 0
    assert Path("m.tsv").read_text(encoding="utf-8").count("\n") == 3


def test_help_exits_0(capsys):
    code, out, _ = run(capsys, "tokenizer", "train", "--help")
    assert code == 0 and "--force" in out


def test_bad_bytes_late_in_a_file_name_their_offset(work, capsys):
    # A multi-byte character across the 64 KiB read boundary, then a bad byte further on.
    data = b"a" * 65535 + "日".encode() + b"b" * 10 + b"\xff" + b"c"
    Path("t.txt").write_bytes(data)
    run(capsys, "tokenizer", "train", "--data", "data", "--vocab-size", "270", "--out", "tok.bpe")
    code, out, err = run(capsys, "tokenizer", "encode", "--tokenizer", "tok.bpe", "--file", "t.txt")
    assert code == 2 and out == ""
    at = data.index(b"\xff")
    assert err == (f"minillm tokenizer encode: error: t.txt is not valid UTF-8 (byte {at}: b'\\xffc'); "
                   "convert it to UTF-8 (iconv -t UTF-8, or save it as UTF-8 in your editor)\n")
    Path("cut.txt").write_bytes("ok 日".encode()[:-1])  # a character cut off at the end
    code, _, err = run(capsys, "tokenizer", "encode", "--tokenizer", "tok.bpe", "--file", "cut.txt")
    assert code == 2 and "cut.txt is not valid UTF-8 (byte 3:" in err


def test_a_bug_is_exit_1_with_the_traceback_only_under_debug(work, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("something the code did not expect")

    monkeypatch.setattr(cli, "load_corpus", broken)
    code, _, err = run(capsys, "corpus", "--data", "data")
    assert code == 1 and "Traceback" not in err and len(err.splitlines()) == 1
    assert "internal error: RuntimeError: something the code did not expect" in err and "--debug" in err
    for argv in (["--debug", "corpus", "--data", "data"], ["corpus", "--data", "data", "--debug"]):
        code, _, err = run(capsys, *argv)
        assert code == 1 and "Traceback" in err and "RuntimeError: something the code did not expect" in err


def test_keyboard_interrupt_exits_130_quietly(work, capsys, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "train_bpe", interrupted)
    before = listing(work)
    code, out, err = run(capsys, "tokenizer", "train", "--data", "data", "--vocab-size", "300", "--out", "tok.bpe")
    assert (code, out, err) == (130, "", "")
    assert listing(work) == before


def test_ctrl_c_during_training_leaves_nothing_behind(tmp_path):
    # The real thing: SIGINT to `python -m minillm` while it merges, as a terminal's Ctrl-C would send.
    import random

    rng = random.Random(0)
    words = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(3, 12))) for _ in range(40_000)]
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "words.txt").write_text(" ".join(words), encoding="utf-8")
    proc = subprocess.Popen(
        [sys.executable, "-m", "minillm", "tokenizer", "train", "--data", "data", "--vocab-size", "60000",
         "--num-proc", "1", "--out", "tok.bpe"],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        # A process started in the background by a shell without job control inherits SIGINT ignored, and
        # Python then never raises KeyboardInterrupt: give the child the terminal's default, as Ctrl-C meets it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen = b""
    deadline = time.monotonic() + 60
    while b"merges" not in seen and time.monotonic() < deadline:  # the progress bar: training has started
        chunk = os.read(proc.stderr.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
    assert b"merges" in seen, seen
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, (seen + err).decode()
    assert b"Traceback" not in seen + err and b"error" not in seen + err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]
