"""Pretraining data: a corpus encoded once into token shards, and batches drawn from them.

`prepare` encodes every document of a corpus with `Tokenizer.encode_ordinary` and appends the
end-of-text id after it, so the model learns where documents end, and a literal ``<|endoftext|>``
inside a document stays text: only the id we append is a separator. The ids of each split go to
one file, ``train.bin`` and ``val.bin``, which training memory-maps: a shard of any size costs no
RAM, and a batch is a handful of windows copied out of the page cache.

The shard format (version 1), one file per split, ``NAME.bin``::

    offset 0   8 bytes   magic b"MLLMTOK1"
    offset 8   4 bytes   H, the header length, a little-endian uint32
    offset 12  H bytes   the header: UTF-8 JSON, padded with spaces so that 12 + H is a multiple of 64
    12 + H     ...       the tokens, little-endian uint16 if vocab_size <= 65536, else uint32

The header is one JSON object with these fields (a writer may add more; readers ignore them):

* ``format``: 1; ``dtype``: "uint16" or "uint32"; ``tokens``: how many tokens follow;
* ``documents``: how many documents were encoded (one end-of-text id follows each);
* ``bytes``: the UTF-8 bytes of the documents' text, separators not counted: the denominator of
  bits per byte, which compares models with different tokenizers (and with gzip);
* ``vocab_size``, ``eot_id``: of the tokenizer, which ``tokenizer`` identifies by its fingerprint;
* ``source``: the corpus fingerprint and the split, as ``FINGERPRINT:SPLIT``; ``split``: the split.

The file size is therefore exactly 12 + H + tokens * itemsize, which `TokenShard.open` checks, so a
truncated copy is caught at once rather than as garbage batches. Shards are written through
`minillm.files` (a temporary file renamed into place), so a crash never leaves half a shard, and
`prepare` writes the same bytes for the same corpus and tokenizer, whatever the number of processes.

Sampling: `random_batch` and `RandomSampler` draw training windows at uniformly random offsets from
a CPU generator, so a run is reproducible and can resume exactly; `SequentialSampler` walks the
validation shard in non-overlapping windows for a deterministic evaluation.
"""

from __future__ import annotations

import base64
import bz2
import hashlib
import json
import lzma
import math
import multiprocessing
import numbers
import os
import struct
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from minillm.corpus import Corpus, check_output_path, input_paths, load_corpus
from minillm.files import atomic_write
from minillm.tokenizer import Tokenizer, TokenizerError, _ignore_sigint, _is_int, _worker_count

__all__ = [
    "DataError",
    "tokenizer_fingerprint",
    "write_shard",
    "TokenShard",
    "prepare",
    "random_batch",
    "RandomSampler",
    "SequentialSampler",
    "bits_per_byte",
    "compressor_bits_per_byte",
    "shard_text",
]

MAGIC = b"MLLMTOK1"
FORMAT = 1
SPLITS = ("train", "val")
_ALIGN = 64  # token data starts on a 64-byte boundary: aligned for any dtype and for vector loads
_PREFIX = len(MAGIC) + 4  # magic + header length
_FIELDS = ("documents", "bytes", "vocab_size", "eot_id", "tokenizer", "source", "split")  # the caller's
_PARALLEL_MIN_CHARS = 1_000_000  # below this, starting worker processes costs more than it saves
_CHUNK_CHARS = 1 << 20  # text per task sent to a worker: large enough that pickling is cheap


class DataError(ValueError):
    """Bad pretraining data or arguments: a damaged shard, a mismatched tokenizer, a bad size.

    The message names the problem and the fix."""


def _check_int(name: str, value: object, low: int = 1) -> int:
    if not _is_int(value) or value < low:
        raise DataError(f"{name} must be a whole number >= {low}, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------------------------
# Tokenizer identity


def tokenizer_fingerprint(tok: Tokenizer) -> str:
    """SHA-256 (hex) of what defines a tokenizer's ids: the file `Tokenizer.save` writes for it.

    That file holds the pattern, the byte order, the merges and the special tokens with their ids,
    so two tokenizers that give different ids have different fingerprints, and the fingerprint of
    a tokenizer loaded from a file saved by minillm is the SHA-256 of that file (``sha256sum``).
    A tokenizer the format cannot store (ids that do not follow its merges, as some imported
    vocabularies) is hashed from a JSON of its pattern, every token's bytes and its special tokens.
    """
    with tempfile.TemporaryDirectory(prefix="minillm-fp-") as folder:
        path = Path(folder) / "tokenizer.bpe"
        try:
            tok.save(path)
        except TokenizerError:
            canonical = {
                "pattern": tok.pattern,
                "vocab": [tok.vocab[i].hex() for i in sorted(tok.vocab)],
                "special": sorted(tok.special_tokens.items(), key=lambda kv: kv[1]),
            }
            return hashlib.sha256(json.dumps(canonical).encode("utf-8")).hexdigest()
        return hashlib.sha256(path.read_bytes()).hexdigest()


def _eot_id(tok: Tokenizer) -> int:
    try:
        return tok.eot_id
    except TokenizerError:
        raise DataError(
            "the tokenizer has no '<|endoftext|>' special token, which marks where each document ends; train one "
            "with special_tokens=['<|endoftext|>'] (the default of 'minillm tokenizer train')"
        ) from None


# --------------------------------------------------------------------------------------------
# Writing shards


def _dtype_for(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def _header_bytes(fields: dict, size: int | None = None) -> bytes:
    """Magic, length and JSON of a header, padded with spaces to `size` bytes of JSON (default: the
    least that puts the tokens on a multiple of `_ALIGN`)."""
    text = json.dumps(fields, ensure_ascii=True).encode("ascii")
    if size is None:
        size = -(-(_PREFIX + len(text)) // _ALIGN) * _ALIGN - _PREFIX
    if len(text) > size:
        raise AssertionError("the header outgrew the room reserved for it")  # cannot happen: see _write_into
    return MAGIC + struct.pack("<I", size) + text + b" " * (size - len(text))


def _shard_fields(header_fields: dict) -> dict:
    """The header of a new shard: `format`, `dtype` and `tokens` first, then the caller's fields."""
    if not isinstance(header_fields, dict):
        raise DataError(f"header_fields must be a dict, got {type(header_fields).__name__}")
    missing = [k for k in _FIELDS if k not in header_fields]
    if missing:
        raise DataError(f"header_fields lacks {missing}; a shard's header needs {list(_FIELDS)}")
    vocab_size = _check_int("header_fields['vocab_size']", header_fields["vocab_size"])
    fields = {"format": FORMAT, "dtype": _dtype_for(vocab_size), "tokens": 0}
    fields.update((k, v) for k, v in header_fields.items() if k not in fields)
    try:
        json.dumps(fields)
    except (TypeError, ValueError) as e:
        raise DataError(f"header_fields must be JSON values (numbers, strings, lists, dicts): {e}") from None
    return fields


def _write_into(path: Path, token_arrays: Iterable[np.ndarray], fields: dict) -> int:
    """Write a whole shard to `path` (a temporary file); returns the number of tokens.

    The header's token count is known only at the end, so room is reserved for the largest count
    that could ever be written (20 digits), and the header is written last, over that room.
    """
    room = len(_header_bytes({**fields, "tokens": 2**64})) - _PREFIX
    vocab_size, dtype = fields["vocab_size"], np.dtype(fields["dtype"]).newbyteorder("<")
    n = 0
    with open(path, "wb") as f:
        f.write(b"\0" * (_PREFIX + room))
        for i, arr in enumerate(token_arrays):
            arr = np.asarray(arr)
            if arr.ndim != 1 or not (np.issubdtype(arr.dtype, np.integer) or arr.size == 0):
                raise DataError(f"token array {i} must be 1-D integers, got shape {arr.shape} of {arr.dtype}")
            if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= vocab_size):
                raise DataError(f"token array {i} holds ids outside 0..{vocab_size - 1} (from {int(arr.min())} to "
                                f"{int(arr.max())}); was it encoded with another tokenizer?")
            f.write(arr.astype(dtype, copy=False).tobytes())
            n += arr.size
        f.seek(0)
        f.write(_header_bytes({**fields, "tokens": n}, room))
    return n


def write_shard(
    path: str | os.PathLike[str], token_arrays: Iterable[np.ndarray], header_fields: dict, *, overwrite: bool = False
) -> Path:
    """Stream `token_arrays` (1-D integer arrays, in order) into the shard file `path`.

    `header_fields` gives the header's fields except those this fills in (``format``, ``dtype``
    from ``vocab_size``, ``tokens``): ``documents``, ``bytes``, ``vocab_size``, ``eot_id``,
    ``tokenizer``, ``source``, ``split``, and any extra fields. Ids outside 0..vocab_size-1 are
    refused. Written atomically: on any error nothing is left, and an existing file is kept unless
    `overwrite`. Returns the path.
    """
    fields = _shard_fields(header_fields)
    return atomic_write(path, lambda tmp: _write_into(tmp, token_arrays, fields), overwrite=overwrite)


# --------------------------------------------------------------------------------------------
# Reading shards


class TokenShard:
    """A shard opened by `TokenShard.open`: its `header` (dict) and its `tokens`, memory-mapped read-only."""

    def __init__(self, path: Path, header: dict, tokens: np.ndarray) -> None:
        self.path = path
        self.header = header
        self.tokens = tokens

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def eot_id(self) -> int:
        return self.header["eot_id"]

    @property
    def num_bytes(self) -> int:
        """UTF-8 bytes of the text the tokens encode (separators not counted)."""
        return self.header["bytes"]

    @property
    def vocab_size(self) -> int:
        return self.header["vocab_size"]

    def __repr__(self) -> str:
        h = self.header
        return f"TokenShard({self.path.name!r}, split={h['split']!r}, tokens={len(self):,}, documents={h['documents']:,}, bytes={h['bytes']:,})"

    @classmethod
    def open(cls, path: str | os.PathLike[str], tokenizer: Tokenizer | None = None) -> TokenShard:
        """Open and check a shard; with `tokenizer`, also check that the shard was made with it."""
        path = Path(path)
        try:
            size = path.stat().st_size
            with open(path, "rb") as f:
                prefix = f.read(_PREFIX)
                if prefix[:8] != MAGIC:
                    raise DataError(f"{path}: not a minillm token shard (it starts with {prefix[:8]!r}, not {MAGIC!r}); "
                                    "make shards with 'minillm prepare'")
                if len(prefix) < _PREFIX:
                    raise DataError(f"{path}: the file is {size} bytes, too short to hold a header: it is truncated; "
                                    "run minillm prepare again")
                (hlen,) = struct.unpack("<I", prefix[8:])
                if _PREFIX + hlen > size:
                    raise DataError(f"{path}: the header needs {_PREFIX + hlen:,} bytes but the file has {size:,}: it is "
                                    "truncated; run minillm prepare again")
                raw = f.read(hlen)
        except FileNotFoundError:
            raise DataError(f"{path}: no such shard; check the path, or make it with 'minillm prepare'") from None
        except IsADirectoryError:
            raise DataError(f"{path}: is a folder; give a shard file in it (train.bin or val.bin)") from None
        header = _parse_header(path, raw)
        offset = _PREFIX + hlen
        if offset % _ALIGN:
            raise DataError(f"{path}: the tokens start at byte {offset}, not a multiple of {_ALIGN}: the header is damaged; "
                            "run minillm prepare again")
        dtype = np.dtype(header["dtype"]).newbyteorder("<")
        n = header["tokens"]
        expected = offset + n * dtype.itemsize
        if size != expected:
            what = "truncated" if size < expected else "longer than its header says"
            raise DataError(f"{path}: the header announces {n:,} {header['dtype']} tokens, {expected:,} bytes in all, "
                            f"but the file has {size:,} bytes: it is {what}; run minillm prepare again")
        # numpy cannot map zero bytes; an empty shard gets an empty array.
        tokens = np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=(n,)) if n else np.zeros(0, dtype)
        shard = cls(path, header, tokens)
        if tokenizer is not None:
            _check_tokenizer(shard, tokenizer)
        return shard


def _parse_header(path: Path, raw: bytes) -> dict:
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: the header is not valid JSON ({e}): the file is damaged; run minillm prepare again") from None
    if not isinstance(header, dict):
        raise DataError(f"{path}: the header is not a JSON object: the file is damaged; run minillm prepare again")
    if header.get("format") != FORMAT:
        raise DataError(f"{path}: shard format {header.get('format')!r}, but this minillm reads format {FORMAT}; "
                        "run minillm prepare again with this version")
    missing = [k for k in ("dtype", "tokens", *_FIELDS) if k not in header]
    if missing:
        raise DataError(f"{path}: the header lacks {missing}: the file is damaged; run minillm prepare again")
    for key in ("tokens", "documents", "bytes", "vocab_size"):
        if not _is_int(header[key]) or header[key] < (1 if key == "vocab_size" else 0):
            raise DataError(f"{path}: header field {key!r} is {header[key]!r}, not a count: the file is damaged; "
                            "run minillm prepare again")
    if header["dtype"] != _dtype_for(header["vocab_size"]):
        raise DataError(f"{path}: dtype {header['dtype']!r} does not fit vocab_size {header['vocab_size']} (expected "
                        f"{_dtype_for(header['vocab_size'])!r}): the file is damaged; run minillm prepare again")
    eot = header["eot_id"]
    if eot is not None and not (_is_int(eot) and 0 <= eot < header["vocab_size"]):
        raise DataError(f"{path}: eot_id {eot!r} is not an id below vocab_size: the file is damaged; run minillm prepare again")
    return header


def _check_tokenizer(shard: TokenShard, tokenizer: Tokenizer) -> None:
    if tokenizer_fingerprint(tokenizer) != shard.header["tokenizer"]:
        raise DataError(f"{shard.path}: shard was made with a different tokenizer; run minillm prepare again with this "
                        "tokenizer (or load the tokenizer it was made with)")


# --------------------------------------------------------------------------------------------
# Encoding a corpus


def _encode_texts(tok: Tokenizer, eot: int, dtype: str, texts: Sequence[str]) -> np.ndarray:
    """The ids of `texts`, each followed by `eot`; special-token strings in them are plain text."""
    ids: list[int] = []
    for text in texts:
        ids.extend(tok.encode_ordinary(text))
        ids.append(eot)
    return np.array(ids, dtype=dtype)


_worker: tuple[Tokenizer, int, str] | None = None  # each worker process's tokenizer, eot id and dtype


def _init_worker(vocab: dict, merges: list, special: dict, pattern: str, eot: int, dtype: str) -> None:
    # The tokenizer travels as its parts: a Tokenizer may hold a compiled tiktoken encoder.
    global _worker
    _ignore_sigint()
    _worker = (Tokenizer(vocab, merges, special, pattern), eot, dtype)


def _encode_chunk(texts: list[str]) -> np.ndarray:
    tok, eot, dtype = _worker  # type: ignore[misc]
    return _encode_texts(tok, eot, dtype, texts)


def _chunks(docs: list[tuple[str, int]], target: int) -> list[list[tuple[str, int]]]:
    """Consecutive runs of whole documents (text, bytes) of about `target` characters each, in order."""
    out: list[list[tuple[str, int]]] = [[]]
    size = 0
    for doc in docs:
        if size >= target:
            out.append([])
            size = 0
        out[-1].append(doc)
        size += len(doc[0])
    return out


def _check_outputs(out_dir: str | os.PathLike[str], inputs: Sequence[str], overwrite: bool) -> tuple[dict[str, Path], bool]:
    """The two shard paths, checked before any work; creates `out_dir` if needed (returns whether it did)."""
    if out_dir is None or str(out_dir) == "":
        raise DataError("the output folder is empty; give a folder for train.bin and val.bin")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{str(out)!r} is a file; give a folder for train.bin and val.bin")
    created = not out.exists()
    if created:
        check_output_path(out, inputs, what="output folder")  # not an input, not inside one; its parent exists
        out.mkdir()
    try:
        return {s: check_output_path(out / f"{s}.bin", inputs, overwrite=overwrite, what=f"{s} shard") for s in SPLITS}, created
    except BaseException:
        if created:
            out.rmdir()
        raise


def prepare(
    source: str | os.PathLike[str] | Corpus,
    tokenizer: Tokenizer,
    out_dir: str | os.PathLike[str],
    *,
    val_fraction: float | None = None,
    num_proc: int | None = None,
    progress: bool | None = True,
    overwrite: bool = False,
    text_field: str = "text",
    errors: str = "strict",
) -> dict[str, Path]:
    """Encode a corpus into ``out_dir/train.bin`` and ``out_dir/val.bin``; returns their paths.

    `source` is anything `load_corpus` reads ("stdlib", a file, folder or glob, ``hf:NAME``; with
    `text_field` and `errors` passed on) or a loaded `Corpus`. `val_fraction` defaults to 0.05 for
    a source and to the corpus's own split for a `Corpus` (a value given re-splits it). Each
    document is encoded as ordinary text, then the end-of-text id. Documents are shared among
    `num_proc` processes (default: every available core) in ordered chunks, so the files are the
    same bytes whatever the number. Outputs are checked first (never an input, never an existing
    file unless `overwrite`) and both files are replaced together at the end, or not at all.
    """
    eot = _eot_id(tokenizer)
    if val_fraction is not None and (isinstance(val_fraction, bool) or not isinstance(val_fraction, numbers.Real)
                                     or not 0 <= val_fraction < 1):
        raise DataError(f"val_fraction must be a number in [0, 1), got {val_fraction!r} (CLI: --val-fraction)")
    try:
        procs = _worker_count(num_proc)
    except TokenizerError as e:
        raise DataError(str(e)) from None
    inputs = source.inputs if isinstance(source, Corpus) else input_paths(source)
    paths, created = _check_outputs(out_dir, inputs, overwrite)
    try:
        if isinstance(source, Corpus):
            corpus = source
            if val_fraction is not None and val_fraction != corpus.val_fraction:
                corpus = Corpus(corpus.name, corpus.documents, val_fraction, corpus.inputs)
        else:
            corpus = load_corpus(source, val_fraction=0.05 if val_fraction is None else val_fraction,
                                 text_field=text_field, errors=errors, progress=progress)
        _encode_corpus(corpus, tokenizer, eot, paths, procs, progress, overwrite)
    except BaseException:
        if created and not any(Path(out_dir).iterdir()):
            Path(out_dir).rmdir()  # leave no empty folder behind a failure
        raise
    return paths


def _encode_corpus(
    corpus: Corpus, tok: Tokenizer, eot: int, paths: dict[str, Path], procs: int, progress: bool | None, overwrite: bool
) -> None:
    splits = {s: [(d.text, m.size) for d, m in zip(corpus.documents, corpus.manifest) if m.split == s] for s in SPLITS}
    for s, docs in splits.items():
        if not docs:
            raise DataError(
                f"the {s} split of corpus {corpus.name!r} has no documents: the split is by whole document "
                f"(val_fraction={corpus.val_fraction}); give more documents (split a large file into several) or "
                "change val_fraction (--val-fraction)"
            )
    dtype = _dtype_for(tok.vocab_size)
    fingerprint, source = tokenizer_fingerprint(tok), corpus.fingerprint()
    total = sum(len(t) for docs in splits.values() for t, _ in docs)
    parallel = procs > 1 and total >= _PARALLEL_MIN_CHARS
    # Several chunks per process, so that one long document does not leave the others idle.
    target = max(1, min(_CHUNK_CHARS, total // (procs * 4)))
    pool = None
    if parallel:
        pool = multiprocessing.Pool(procs, _init_worker, (tok.vocab, tok.merges, tok.special_tokens, tok.pattern, eot, dtype))

    def arrays(split: str) -> Iterator[np.ndarray]:
        docs = splits[split]
        chunks = _chunks(docs, target)
        texts = ([t for t, _ in c] for c in chunks)
        encoded = pool.imap(_encode_chunk, texts) if pool else (_encode_texts(tok, eot, dtype, t) for t in texts)
        disable = None if progress is None else not progress  # None: a bar only on a terminal
        with tqdm(total=sum(size for _, size in docs), desc=f"encoding {split}", unit="B", unit_scale=True,
                  disable=disable) as bar:
            for chunk, ids in zip(chunks, encoded):
                bar.update(sum(size for _, size in chunk))
                yield ids

    def header(split: str) -> dict:
        docs = splits[split]
        return {"documents": len(docs), "bytes": sum(size for _, size in docs), "vocab_size": tok.vocab_size,
                "eot_id": eot, "tokenizer": fingerprint, "source": f"{source}:{split}", "split": split}

    def write_both(val_tmp: Path) -> None:
        # The train file is renamed into place inside the val file's write, so an error in either
        # leaves both old files (or none) as they were.
        def write_train(train_tmp: Path) -> None:
            _write_into(train_tmp, arrays("train"), _shard_fields(header("train")))
            _write_into(val_tmp, arrays("val"), _shard_fields(header("val")))

        atomic_write(paths["train"], write_train, overwrite=overwrite)

    try:
        atomic_write(paths["val"], write_both, overwrite=overwrite)
    finally:
        if pool is not None:
            pool.terminate()  # the work is done (or failed): nothing left to wait for
            pool.join()


# --------------------------------------------------------------------------------------------
# Batches


def _check_window(shard: TokenShard, batch_size: int, seq_len: int) -> tuple[int, int]:
    batch_size, seq_len = _check_int("batch_size", batch_size), _check_int("seq_len", seq_len)
    if seq_len >= len(shard):
        raise DataError(f"seq_len={seq_len} needs a shard of more than {seq_len} tokens (a window plus the token after "
                        f"it), but {shard.path.name} has {len(shard):,}; lower seq_len or prepare more data")
    return batch_size, seq_len


def _random_starts(n_tokens: int, batch_size: int, seq_len: int, generator: torch.Generator) -> torch.Tensor:
    # Uniform in [0, n - seq_len - 1]: the window and the token after it fit in the shard.
    return torch.randint(0, n_tokens - seq_len, (batch_size,), generator=generator)


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Windows of seq_len + 1 tokens at `starts`, as int64 inputs x and targets y = x shifted by one."""
    block = np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)], dtype=np.int64)
    x = torch.from_numpy(np.ascontiguousarray(block[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(block[:, 1:]))
    if torch.device(device).type == "cuda":
        # Page-locked memory lets the copy run asynchronously, overlapping the previous step's compute.
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def random_batch(
    shard: TokenShard, batch_size: int, seq_len: int, generator: torch.Generator, device: str | torch.device = "cpu"
) -> tuple[torch.Tensor, torch.Tensor]:
    """`batch_size` windows at uniformly random offsets: x (B, T) and y, x shifted by one (int64).

    A pure function of its arguments (the generator's state included), which it advances by one
    draw of `batch_size` offsets. The generator must be a CPU one, so that the batches are the same
    on every device.
    """
    if not isinstance(generator, torch.Generator) or generator.device.type != "cpu":
        raise DataError(f"generator must be a CPU torch.Generator (got {generator!r}); the offsets are drawn on the CPU "
                        "so that every device sees the same batches")
    batch_size, seq_len = _check_window(shard, batch_size, seq_len)
    starts = _random_starts(len(shard), batch_size, seq_len, generator)
    return _gather(shard.tokens, starts.numpy(), seq_len, device)


def _sampler_seed(seed: int, rank: int) -> int:
    # A hash, not seed + rank: runs with seeds 1 and 2 must not share a stream between ranks.
    digest = hashlib.sha256(f"minillm-sampler:{seed}:{rank}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # 63 bits: any torch accepts it


def _check_rank(rank: int, world_size: int) -> tuple[int, int]:
    world_size = _check_int("world_size", world_size)
    rank = _check_int("rank", rank, low=0)
    if rank >= world_size:
        raise DataError(f"rank {rank} is not below world_size {world_size}; ranks run from 0 to world_size - 1")
    return rank, world_size


class RandomSampler:
    """Training batches from random windows, reproducible and resumable.

    Each rank draws from its own CPU generator seeded from (seed, rank), so ranks see different
    windows. `state_dict` and `load_state_dict` carry the generator's state and the number of
    batches drawn: a resumed run draws exactly the batches the interrupted one would have. A state
    saved by another rank of the same run also works: this rank then replays its own stream up
    to the same number of batches (only offsets are drawn, no tokens are read), so a checkpoint
    written by rank 0 alone resumes every rank.
    """

    def __init__(
        self, shard: TokenShard, batch_size: int, seq_len: int, seed: int, rank: int = 0, world_size: int = 1,
        device: str | torch.device = "cpu",
    ) -> None:
        self.batch_size, self.seq_len = _check_window(shard, batch_size, seq_len)
        self.rank, self.world_size = _check_rank(rank, world_size)
        self.seed = _check_int("seed", seed, low=0)
        self.shard, self.device = shard, device
        self.generator = torch.Generator().manual_seed(_sampler_seed(self.seed, self.rank))
        self.batches = 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next (x, y), each (batch_size, seq_len) int64 on `device`."""
        starts = _random_starts(len(self.shard), self.batch_size, self.seq_len, self.generator)
        self.batches += 1
        return _gather(self.shard.tokens, starts.numpy(), self.seq_len, self.device)

    def _identity(self) -> dict:
        return {"seed": self.seed, "world_size": self.world_size, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "shard_tokens": len(self.shard)}

    def state_dict(self) -> dict:
        """A JSON-serializable state: the arguments that fix the stream, the generator, the batches drawn."""
        state = base64.b64encode(self.generator.get_state().numpy().tobytes()).decode("ascii")
        return {**self._identity(), "rank": self.rank, "batches": self.batches, "generator": state}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from `state_dict`): the next batch is the one the saved run drew next."""
        if not isinstance(state, dict) or not {"rank", "batches", "generator", *self._identity()} <= set(state):
            raise DataError("not a RandomSampler state (expected the dict that state_dict() returns)")
        for key, mine in self._identity().items():
            if state[key] != mine:
                raise DataError(f"the saved sampler had {key}={state[key]!r}, this one has {mine!r}: build the sampler "
                                "with the saved run's arguments and data, or start it fresh without load_state_dict")
        batches = _check_int("the saved 'batches'", state["batches"], low=0)
        if state["rank"] == self.rank:
            try:
                raw = base64.b64decode(state["generator"], validate=True)
                self.generator.set_state(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
            except (ValueError, TypeError, RuntimeError) as e:
                raise DataError(f"the saved generator state is damaged ({e}); start the sampler fresh") from None
        else:  # another rank's state: replay this rank's own draws
            self.generator.manual_seed(_sampler_seed(self.seed, self.rank))
            for _ in range(batches):
                _random_starts(len(self.shard), self.batch_size, self.seq_len, self.generator)
        self.batches = batches


class SequentialSampler:
    """Evaluation batches: non-overlapping windows from the start of the shard, the same every time.

    Window i holds tokens [i*T, (i+1)*T) as inputs and the same shifted by one as targets, so each
    token is predicted at most once. Window i goes to rank i % world_size. Every rank gets the same
    number of full batches (so that collective operations line up): the windows left over at the
    end (fewer than world_size * batch_size) are dropped, as is all beyond `max_batches` batches.
    """

    def __init__(
        self, shard: TokenShard, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
        max_batches: int | None = None, device: str | torch.device = "cpu",
    ) -> None:
        self.batch_size, self.seq_len = _check_window(shard, batch_size, seq_len)
        self.rank, self.world_size = _check_rank(rank, world_size)
        self.shard, self.device = shard, device
        windows = (len(shard) - 1) // self.seq_len
        self.num_batches = windows // self.world_size // self.batch_size
        if max_batches is not None:
            self.num_batches = min(self.num_batches, _check_int("max_batches", max_batches))
        if self.num_batches == 0:
            raise DataError(f"{shard.path.name} ({len(shard):,} tokens) holds {windows} window(s) of {self.seq_len} tokens, "
                            f"fewer than one batch of {self.batch_size} for each of {self.world_size} rank(s); lower "
                            "batch_size or seq_len, or give the split more data")

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        step = self.batch_size * self.world_size
        for b in range(self.num_batches):
            windows = np.arange(b * step + self.rank, (b + 1) * step, self.world_size)
            yield _gather(self.shard.tokens, windows * self.seq_len, self.seq_len, self.device)


# --------------------------------------------------------------------------------------------
# Bits per byte


def bits_per_byte(loss_nats_per_token: float, tokens: int, num_bytes: int) -> float:
    """Cross-entropy in bits per byte of text: loss * tokens / (num_bytes * ln 2).

    A loss per token depends on the tokenizer (bigger tokens, bigger loss); the bits needed per byte
    of the same text do not, so they compare any two models, and a model with a compressor.
    """
    if not _is_int(tokens) or tokens < 0 or not _is_int(num_bytes) or num_bytes <= 0:
        raise DataError(f"tokens must be a count >= 0 and num_bytes a count > 0, got {tokens!r} and {num_bytes!r}")
    return float(loss_nats_per_token) * tokens / (num_bytes * math.log(2))


def compressor_bits_per_byte(data: bytes | str) -> dict[str, float]:
    """Bits per byte of `data` compressed by zlib -9, bz2 -9 and xz -9e: the baselines a model must beat."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    if not data:
        raise DataError("no data to compress; give a non-empty text")
    sizes = {
        "zlib": len(zlib.compress(data, 9)),
        "bz2": len(bz2.compress(data, 9)),
        "lzma": len(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME)),
    }
    return {k: 8 * v / len(data) for k, v in sizes.items()}


def shard_text(shard: TokenShard, tokenizer: Tokenizer, max_tokens: int | None = None, *, eot: str | None = None) -> str:
    """The text of a shard's first `max_tokens` tokens (all by default), to give a compressor the same text.

    Each end-of-text id becomes `eot` (default: the tokenizer's own '<|endoftext|>'). With
    ``eot=""`` the whole shard decodes to exactly its documents' text, `shard.num_bytes` bytes of it.
    """
    _check_tokenizer(shard, tokenizer)
    ids = np.asarray(shard.tokens[: None if max_tokens is None else _check_int("max_tokens", max_tokens, low=0)])
    if eot is None:
        return tokenizer.decode(ids)
    cuts = np.flatnonzero(ids == shard.eot_id)
    pieces = np.split(ids, cuts)
    return eot.join(tokenizer.decode(p[1:] if i else p) for i, p in enumerate(pieces))
