"""minillm.data: token shards (format, checks, atomic writing), prepare, samplers and bits per byte."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from minillm import cli, data
from minillm.corpus import EOT, Corpus, Document, load_corpus, stdlib_corpus
from minillm.data import (
    DataError,
    RandomSampler,
    SequentialSampler,
    TokenShard,
    bits_per_byte,
    compressor_bits_per_byte,
    prepare,
    random_batch,
    shard_text,
    tokenizer_fingerprint,
    write_shard,
)
from minillm.files import OutputError
from minillm.tokenizer import Tokenizer, train_bpe

pytestmark = pytest.mark.filterwarnings("ignore:the training text ran out of pairs")

CODE = "def f(self, x):\n    return self.x + x  # naïve 日本\n"


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(CODE * 20 + "class A:\n    pass\n" * 10, 300)


def fields(vocab_size: int = 300, eot_id: int | None = 299, **extra) -> dict:
    return {"documents": 1, "bytes": 10, "vocab_size": vocab_size, "eot_id": eot_id, "tokenizer": "x" * 64,
            "source": "y:train", "split": "train", **extra}


def shard_of(tmp_path: Path, tokens: np.ndarray, vocab_size: int = 2**16, name: str = "s.bin") -> TokenShard:
    return TokenShard.open(write_shard(tmp_path / name, [tokens], fields(vocab_size, eot_id=None)))


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    """Twelve small text files; with val_fraction=0.3, four of them (02 03 04 07) are validation."""
    folder = tmp_path / "corp"
    folder.mkdir()
    for i in range(12):
        (folder / f"doc{i:02d}.txt").write_text(f"# file {i}\n" + CODE * (i + 1), encoding="utf-8")
    return folder


# -- the shard format ----------------------------------------------------------------------------


@pytest.mark.parametrize("vocab_size, dtype", [(300, "uint16"), (2**16, "uint16"), (2**16 + 1, "uint32"), (70_000, "uint32")])
def test_round_trip_both_dtypes(tmp_path, vocab_size, dtype):
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, vocab_size, n) for n in (0, 1, 1000, 37)]
    arrays[2][:2] = [0, vocab_size - 1]  # the extremes survive
    path = write_shard(tmp_path / "s.bin", iter(arrays), fields(vocab_size))
    shard = TokenShard.open(path)
    assert shard.header["dtype"] == dtype and shard.tokens.dtype == np.dtype(dtype).newbyteorder("<")
    np.testing.assert_array_equal(shard.tokens, np.concatenate(arrays))
    assert len(shard) == shard.header["tokens"] == 1038 and shard.num_bytes == 10 and shard.eot_id == 299
    # The layout is the documented one: magic, length, JSON padded to a multiple of 64, tokens.
    raw = path.read_bytes()
    (hlen,) = struct.unpack("<I", raw[8:12])
    assert raw[:8] == b"MLLMTOK1" and (12 + hlen) % 64 == 0
    assert json.loads(raw[12 : 12 + hlen])["tokens"] == 1038
    assert len(raw) == 12 + hlen + 1038 * np.dtype(dtype).itemsize
    assert isinstance(shard.tokens, np.memmap) and not shard.tokens.flags.writeable


def test_empty_shard_round_trips(tmp_path):
    shard = TokenShard.open(write_shard(tmp_path / "e.bin", [], fields()))
    assert len(shard) == 0


def test_write_shard_refuses_bad_ids_and_leaves_nothing(tmp_path):
    def arrays():
        yield np.arange(10)
        yield np.array([5, 300])  # 300 is not an id of a 300-token vocabulary

    with pytest.raises(DataError, match=r"outside 0\.\.299"):
        write_shard(tmp_path / "s.bin", arrays(), fields())
    with pytest.raises(DataError, match="1-D integers"):
        write_shard(tmp_path / "s.bin", [np.zeros(3)], fields())
    with pytest.raises(DataError, match="lacks"):
        write_shard(tmp_path / "s.bin", [], {"vocab_size": 300})
    assert list(tmp_path.iterdir()) == []  # no shard, no temporary file


def test_write_shard_keeps_existing_files(tmp_path):
    path = write_shard(tmp_path / "s.bin", [np.arange(5)], fields())
    before = path.read_bytes()
    with pytest.raises(OutputError, match="exists"):
        write_shard(path, [np.arange(7)], fields())
    assert path.read_bytes() == before
    write_shard(path, [np.arange(7)], fields(), overwrite=True)
    assert len(TokenShard.open(path)) == 7


def test_truncated_shard_names_both_sizes(tmp_path):
    path = write_shard(tmp_path / "s.bin", [np.arange(100)], fields())
    size = path.stat().st_size
    path.write_bytes(path.read_bytes()[:-3])
    with pytest.raises(DataError, match=rf"{size:,} bytes in all, but the file has {size - 3:,} bytes: it is truncated"):
        TokenShard.open(path)
    path.write_bytes(path.read_bytes()[:20])  # cut inside the header
    with pytest.raises(DataError, match="truncated"):
        TokenShard.open(path)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda raw: b"NOTASHRD" + raw[8:], "not a minillm token shard"),
        (lambda raw: raw[:12] + b"x" + raw[13:], "not valid JSON"),
        (lambda raw: raw.replace(b'"format": 1', b'"format": 9'), "format 9"),
        (lambda raw: raw.replace(b'"dtype": "uint16"', b'"dtype": "uint32"'), "does not fit vocab_size"),
    ],
)
def test_damaged_shards_are_refused(tmp_path, damage, match):
    path = write_shard(tmp_path / "s.bin", [np.arange(100)], fields())
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(DataError, match=match):
        TokenShard.open(path)


def test_missing_shard(tmp_path):
    with pytest.raises(DataError, match="no such shard.*minillm prepare"):
        TokenShard.open(tmp_path / "nope.bin")


# -- the tokenizer's fingerprint ---------------------------------------------------------------------


def test_fingerprint_is_the_hash_of_the_saved_file(tok, tmp_path):
    import hashlib

    tok.save(tmp_path / "tok.bpe")
    assert tokenizer_fingerprint(tok) == hashlib.sha256((tmp_path / "tok.bpe").read_bytes()).hexdigest()
    assert tokenizer_fingerprint(Tokenizer.load(tmp_path / "tok.bpe")) == tokenizer_fingerprint(tok)
    other = train_bpe(CODE * 20, 290)
    same_merges_other_special = Tokenizer(tok.vocab, tok.merges, {"<|other|>": tok.eot_id}, tok.pattern)
    assert len({tokenizer_fingerprint(t) for t in (tok, other, same_merges_other_special)}) == 3


# -- prepare -----------------------------------------------------------------------------------------


def test_eot_follows_each_document_and_a_literal_eot_is_text(tok, tmp_path):
    # With val_fraction=0.3 these names are train, train, train and val (the split hashes the name).
    docs = [Document("doc00.txt", "x = 1\n"), Document("doc01.txt", f"print('{EOT}')\n"), Document("doc05.txt", "y")]
    corpus = Corpus("mem", docs + [Document("doc02.txt", "z = 2\n")], val_fraction=0.3)
    paths = prepare(corpus, tok, tmp_path / "out", progress=False)
    train = TokenShard.open(paths["train"], tok)
    expected = []
    for d in docs:
        expected += tok.encode_ordinary(d.text) + [tok.eot_id]
    assert train.tokens.tolist() == expected
    assert train.tokens.tolist().count(tok.eot_id) == 3 == train.header["documents"]  # one each, never from the text
    assert train.num_bytes == sum(len(d.text.encode()) for d in docs)
    assert shard_text(train, tok) == "".join(d.text + EOT for d in docs)
    assert shard_text(train, tok, eot="") == "".join(d.text for d in docs)


def test_prepare_files_determinism_and_processes(tok, corpus_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_PARALLEL_MIN_CHARS", 0)  # use the pool even on this small corpus
    runs = [prepare(str(corpus_dir), tok, tmp_path / f"out{i}", val_fraction=0.3, num_proc=n, progress=False)
            for i, n in enumerate((1, 2, 2))]
    for split in ("train", "val"):
        assert runs[0][split] == tmp_path / "out0" / f"{split}.bin"
        contents = {r[split].read_bytes() for r in runs}
        assert len(contents) == 1, f"{split}.bin differs between runs or numbers of processes"
    corpus = load_corpus(str(corpus_dir), val_fraction=0.3)
    for split, n_docs in (("train", 8), ("val", 4)):
        shard = TokenShard.open(runs[0][split], tok)
        docs = corpus.split(split)
        assert shard.header["documents"] == len(docs) == n_docs and shard.header["split"] == split
        assert shard.header["source"] == f"{corpus.fingerprint()}:{split}"
        assert shard.header["tokenizer"] == tokenizer_fingerprint(tok)
        assert len(shard) == sum(len(tok.encode_ordinary(d.text)) + 1 for d in docs)
        assert shard_text(shard, tok, eot="") == "".join(d.text for d in docs)


def test_prepare_on_a_slice_of_the_stdlib(tok, tmp_path):
    full = stdlib_corpus()
    docs, size = [], 0
    for d in full.documents:  # about 1.2 MB: enough to go through the worker pool
        docs.append(d)
        size += len(d.text)
        if size > 1_200_000:
            break
    corpus = Corpus("stdlib-slice", docs, 0.2, full.inputs)
    paths = prepare(corpus, tok, tmp_path / "out", progress=False)
    for split in ("train", "val"):
        shard = TokenShard.open(paths[split], tok)
        assert shard.num_bytes == sum(len(d.text.encode()) for d in corpus.split(split))
        assert int((shard.tokens == tok.eot_id).sum()) == len(corpus.split(split))
        assert shard.tokens[-1] == tok.eot_id
    assert len(shard_text(shard, tok, eot="").encode()) == shard.num_bytes


def test_prepare_refusals(tok, corpus_dir, tmp_path):
    no_eot = train_bpe(CODE * 5, 280, special_tokens=[])
    with pytest.raises(DataError, match="no '<\\|endoftext\\|>' special token"):
        prepare(str(corpus_dir), no_eot, tmp_path / "out")
    with pytest.raises(OutputError, match="also an input"):
        prepare(str(corpus_dir), tok, corpus_dir / "shards", val_fraction=0.3)
    with pytest.raises(DataError, match="val split .* has no documents.*--val-fraction"):
        prepare(str(corpus_dir), tok, tmp_path / "out", val_fraction=0.0, progress=False)
    with pytest.raises(DataError, match="val_fraction must be"):
        prepare(str(corpus_dir), tok, tmp_path / "out", val_fraction=1.5)
    with pytest.raises(DataError, match="num_proc"):
        prepare(str(corpus_dir), tok, tmp_path / "out", num_proc=0)
    assert not (tmp_path / "out").exists() and not (corpus_dir / "shards").exists()  # no folder left behind


def test_prepare_replaces_both_files_or_neither(tok, corpus_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    paths = prepare(str(corpus_dir), tok, out, val_fraction=0.3, progress=False)
    before = {s: p.read_bytes() for s, p in paths.items()}
    with pytest.raises(OutputError, match="exists"):
        prepare(str(corpus_dir), tok, out, val_fraction=0.3, progress=False)
    real = data._encode_texts

    def fail_on_val(tok_, eot, dtype, texts):  # the train split encodes, then the val split fails
        if any("# file 2\n" in t for t in texts):
            raise RuntimeError("disk on fire")
        return real(tok_, eot, dtype, texts)

    monkeypatch.setattr(data, "_encode_texts", fail_on_val)  # 0.5 below: a new train.bin would differ
    with pytest.raises(RuntimeError, match="disk on fire"):
        prepare(str(corpus_dir), tok, out, val_fraction=0.5, num_proc=1, progress=False, overwrite=True)
    assert {s: p.read_bytes() for s, p in paths.items()} == before
    assert sorted(p.name for p in out.iterdir()) == ["train.bin", "val.bin"]  # no temporary files


def test_foreign_tokenizer_is_refused(tok, corpus_dir, tmp_path):
    paths = prepare(str(corpus_dir), tok, tmp_path / "out", val_fraction=0.3, progress=False)
    other = train_bpe(CODE * 20, 290)
    with pytest.raises(DataError, match="shard was made with a different tokenizer; run minillm prepare again"):
        TokenShard.open(paths["val"], other)
    with pytest.raises(DataError, match="different tokenizer"):
        shard_text(TokenShard.open(paths["val"]), other)


# -- batches -----------------------------------------------------------------------------------------


def test_random_batch_shifts_targets_and_stays_inside(tmp_path):
    shard = shard_of(tmp_path, np.arange(1000) * 7 % 65536)
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        x, y = random_batch(shard, 8, 32, g)
        assert x.shape == y.shape == (8, 32) and x.dtype == y.dtype == torch.int64
        starts = (x[:, 0] // 7).numpy()
        assert (starts >= 0).all() and (starts + 32 < 1000).all()  # the last target is inside the shard
        for row, s in zip(x.numpy(), starts):
            np.testing.assert_array_equal(row, shard.tokens[s : s + 32])
        assert torch.equal(x[:, 1:], y[:, :-1])
        np.testing.assert_array_equal(y.numpy(), shard.tokens[(starts + 1)[:, None] + np.arange(32)])
    # The same generator state gives the same batch: a pure function of the arguments.
    a = random_batch(shard, 4, 16, torch.Generator().manual_seed(5))
    b = random_batch(shard, 4, 16, torch.Generator().manual_seed(5))
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_random_batch_reaches_both_ends_and_every_region(tmp_path):
    tiny = shard_of(tmp_path, np.arange(10), name="tiny.bin")
    g = torch.Generator().manual_seed(1)
    starts = {int(random_batch(tiny, 4, 8, g)[0][i, 0]) for _ in range(30) for i in range(4)}
    assert starts == {0, 1}  # [0, len - seq_len - 1]: the first and the last possible window
    shard = shard_of(tmp_path, np.arange(5000))
    seen = np.zeros(5000, bool)
    for _ in range(100):
        x, y = random_batch(shard, 8, 64, g)
        seen[x.numpy().ravel()] = True
        seen[y.numpy().ravel()] = True
    assert seen.reshape(50, 100).any(axis=1).all()  # every region of 100 tokens was drawn


def test_random_batch_bad_arguments(tmp_path):
    shard = shard_of(tmp_path, np.arange(100))
    g = torch.Generator()
    with pytest.raises(DataError, match="has 100"):
        random_batch(shard, 2, 100, g)
    with pytest.raises(DataError, match="batch_size"):
        random_batch(shard, 0, 10, g)
    with pytest.raises(DataError, match="CPU torch.Generator"):
        random_batch(shard, 2, 10, None)


def test_random_sampler_resumes_exactly(tmp_path):
    shard = shard_of(tmp_path, np.arange(3000))
    a = RandomSampler(shard, 4, 16, seed=7)
    for _ in range(3):
        a.next_batch()
    state = json.loads(json.dumps(a.state_dict()))  # it survives JSON, as in a checkpoint
    first = [a.next_batch() for _ in range(2)]
    b = RandomSampler(shard, 4, 16, seed=7)
    b.load_state_dict(state)
    again = [b.next_batch() for _ in range(2)]
    assert all(torch.equal(u, v) for p, q in zip(first, again) for u, v in zip(p, q))
    assert b.state_dict()["batches"] == 5
    with pytest.raises(DataError, match="seq_len=16, this one has 32"):
        RandomSampler(shard, 4, 32, seed=7).load_state_dict(state)


def test_ranks_draw_different_windows_and_resume_from_rank_0(tmp_path):
    shard = shard_of(tmp_path, np.arange(3000))
    r0, r1 = (RandomSampler(shard, 4, 16, seed=7, rank=r, world_size=2) for r in (0, 1))
    b0, b1 = [r0.next_batch()[0] for _ in range(3)], [r1.next_batch()[0] for _ in range(3)]
    assert all(not torch.equal(u, v) for u, v in zip(b0, b1))
    assert not torch.equal(RandomSampler(shard, 4, 16, seed=8).next_batch()[0], RandomSampler(shard, 4, 16, seed=7).next_batch()[0])
    # A checkpoint written by rank 0 alone resumes rank 1 where rank 1 was.
    fresh = RandomSampler(shard, 4, 16, seed=7, rank=1, world_size=2)
    fresh.load_state_dict(r0.state_dict())
    assert torch.equal(fresh.next_batch()[0], r1.next_batch()[0])
    with pytest.raises(DataError, match="rank 2 is not below world_size 2"):
        RandomSampler(shard, 4, 16, seed=7, rank=2, world_size=2)


@pytest.mark.parametrize("n_tokens, expected_batches", [(2 * 3 * 8 * 5 + 1, 5), (2 * 3 * 8 * 5 + 40, 5)])
def test_sequential_sampler_covers_each_window_once_across_ranks(tmp_path, n_tokens, expected_batches):
    shard = shard_of(tmp_path, np.arange(n_tokens))
    B, T, W = 3, 8, 2
    seen = []
    for rank in range(W):
        sampler = SequentialSampler(shard, B, T, rank=rank, world_size=W)
        assert len(sampler) == expected_batches  # the same on every rank; a partial batch is dropped
        batches = list(sampler)
        assert len(batches) == expected_batches
        for x, y in batches:
            assert x.shape == (B, T) and torch.equal(x + 1, y)  # tokens are positions here
            assert ((x[:, 0] // T) % W == rank).all()  # window i goes to rank i % W
            seen += x[:, 0].tolist()
    assert sorted(seen) == list(range(0, expected_batches * B * W * T, T))  # each window once, no overlap
    assert len(SequentialSampler(shard, B, T, max_batches=2)) == 2
    assert [x.tolist() for x, _ in SequentialSampler(shard, B, T)] == [x.tolist() for x, _ in SequentialSampler(shard, B, T)]


def test_sequential_sampler_needs_one_batch(tmp_path):
    shard = shard_of(tmp_path, np.arange(50))
    with pytest.raises(DataError, match="fewer than one batch"):
        SequentialSampler(shard, 4, 16, world_size=2)


# -- bits per byte -----------------------------------------------------------------------------------


def test_bits_per_byte_by_hand():
    # ln 2 nats per token is 1 bit per token; 100 tokens over 50 bytes is 2 bits per byte.
    assert bits_per_byte(math.log(2), 100, 50) == pytest.approx(2.0)
    assert bits_per_byte(2.0, 1000, 4000) == pytest.approx(2.0 * 1000 / 4000 / math.log(2))
    with pytest.raises(DataError):
        bits_per_byte(1.0, 10, 0)


def test_compressors_on_repetitive_and_random_bytes():
    rep = compressor_bits_per_byte(b"def f(self):\n    return self.x\n" * 2000)
    assert set(rep) == {"zlib", "bz2", "lzma"} and all(0 < v < 0.1 for v in rep.values())
    noise = compressor_bits_per_byte(np.random.default_rng(0).bytes(20_000))
    assert all(7.9 < v < 8.3 for v in noise.values())
    assert compressor_bits_per_byte("日本" * 10) == compressor_bits_per_byte(("日本" * 10).encode())
    with pytest.raises(DataError):
        compressor_bits_per_byte(b"")


# -- the command line --------------------------------------------------------------------------------


def test_cli_prepare(tok, corpus_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tok.save("tok.bpe")
    argv = ["prepare", "--tokenizer", "tok.bpe", "--data", "corp", "--out", "shards", "--val-fraction", "0.3", "--num-proc", "1"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "train" in out and "val" in out and "tokens" in out and "bytes" in out
    shard = TokenShard.open("shards/val.bin", Tokenizer.load("tok.bpe"))
    assert f"{len(shard):,} tokens" in out

    before = Path("shards/val.bin").read_bytes()
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "exists" in err and "--force" in err
    assert Path("shards/val.bin").read_bytes() == before
    assert cli.main(argv + ["--force"]) == 0
    capsys.readouterr()

    assert cli.main(["prepare", "--tokenizer", "missing.bpe", "--data", "corp", "--out", "other"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "missing.bpe" in err and not Path("other").exists()
    assert cli.main(["prepare", "--tokenizer", "tok.bpe", "--data", "corp", "--out", "other", "--val-fraction", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--val-fraction" in err and not Path("other").exists()
