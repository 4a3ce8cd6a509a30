"""Text corpora: the built-in standard-library corpus and loaders for user data.

A corpus is a list of named documents. Every loader here yields the same `Document` records, so
the rest of the package (tokenizer training, pretraining data) never cares where text came from:

* the built-in corpus: the non-test modules of the running interpreter's standard library, plus
  the English prose of ``pydoc_data.topics`` (one document per help topic);
* text files (a file, a directory, or a glob), JSONL with a text field, Parquet with a text
  column, and, with the optional ``datasets`` extra, a Hugging Face dataset (``hf:NAME``).

Documents are joined with `EOT` when a single stream of text is needed; the tokenizer turns it
into a special token. The train/validation split is by document, decided by a hash of the
document's name, so adding or removing a file never moves any other file between splits. Files are
named by their path relative to the folder a source names: the folder itself, or the fixed part of a
glob (``corp`` for ``corp/**/*.txt``), so a folder and a glob over the same files agree, and adding a
file renames nothing.

Every file written here (the manifest) goes through `minillm.files`: atomically, never over an input,
never over an existing file unless asked.
"""

from __future__ import annotations

import ast
import fnmatch
import glob as globlib
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tqdm import tqdm

from minillm.files import OutputError, atomic_write, check_output

__all__ = [
    "EOT",
    "CorpusError",
    "Document",
    "ManifestEntry",
    "Corpus",
    "hash_position",
    "split_of",
    "stdlib_root",
    "stdlib_files",
    "stdlib_corpus",
    "load_corpus",
    "input_paths",
    "check_output_path",
    "read_text_file",
    "iter_jsonl",
    "iter_parquet",
    "iter_hf_dataset",
]

EOT = "<|endoftext|>"
"""Separator placed between documents; chapter 01 makes it a special token."""

Split = Literal["train", "val"]

# Directories of the standard library that hold its own test suites, or third-party code.
_EXCLUDED_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__"})
# pydoc_data/topics.py is one big dict literal of help texts: we read it as prose documents instead.
_TOPICS_FILE = "pydoc_data/topics.py"
_TEXT_SUFFIXES = frozenset({".txt", ".md", ".rst", ".py", ".text", ".csv", ".tsv", ".html", ".tex"})


class CorpusError(ValueError):
    """A corpus could not be loaded; the message names the path and the fix."""


@dataclass(frozen=True)
class Document:
    """One document: `name` identifies it (a relative path, or path:line) and decides its split."""

    name: str
    text: str


@dataclass(frozen=True)
class ManifestEntry:
    """A row of the manifest: what was read, how big it is, its checksum and its split."""

    name: str
    size: int  # bytes of UTF-8 text
    sha256: str
    split: Split


def hash_position(name: str) -> float:
    """The first 8 bytes of SHA-256(name), read as a number in [0, 1): where `split_of` places a name."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64


def split_of(name: str, val_fraction: float = 0.05) -> Split:
    """The split of a document, a pure function of its name.

    Its `hash_position` below `val_fraction` means validation. The same name always lands in the
    same split, on any machine and any run.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise CorpusError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    return "val" if hash_position(name) < val_fraction else "train"


@dataclass
class Corpus:
    """Documents with their manifest. Built by `stdlib_corpus` or `load_corpus`.

    `inputs` are the files, folders or globs it was read from (see `input_paths`); outputs written
    with the corpus (its manifest, a tokenizer trained on it) are checked against them.
    """

    name: str
    documents: list[Document]
    val_fraction: float = 0.05
    inputs: tuple[str, ...] = field(default=(), repr=False, compare=False)
    manifest: list[ManifestEntry] = field(init=False)

    def __post_init__(self) -> None:
        if not self.documents:
            raise CorpusError(f"corpus {self.name!r} is empty: no documents with any text were found")
        self.manifest = [
            ManifestEntry(
                d.name,
                len(d.text.encode("utf-8")),
                hashlib.sha256(d.text.encode("utf-8")).hexdigest(),
                split_of(d.name, self.val_fraction),
            )
            for d in self.documents
        ]

    def __len__(self) -> int:
        return len(self.documents)

    def split(self, split: Split) -> list[Document]:
        """The documents of one split, in corpus order."""
        if split not in ("train", "val"):
            raise CorpusError(f"split must be 'train' or 'val', got {split!r}")
        return [d for d, m in zip(self.documents, self.manifest) if m.split == split]

    def text(self, split: Split | None = None, sep: str = EOT) -> str:
        """All documents (or one split) as one string, joined by `sep`."""
        docs = self.documents if split is None else self.split(split)
        return sep.join(d.text for d in docs)

    def summary(self) -> dict[str, int | str]:
        """Counts for a quick look: documents, bytes and the size of each split."""
        out: dict[str, int | str] = {"name": self.name, "documents": len(self.documents)}
        out["bytes"] = sum(m.size for m in self.manifest)
        for s in ("train", "val"):
            rows = [m for m in self.manifest if m.split == s]
            out[f"{s}_documents"] = len(rows)
            out[f"{s}_bytes"] = sum(m.size for m in rows)
        return out

    def fingerprint(self) -> str:
        """SHA-256 over the manifest: equal fingerprints mean the same text in the same splits."""
        h = hashlib.sha256()
        for m in self.manifest:
            h.update(f"{m.name}\t{m.size}\t{m.sha256}\t{m.split}\n".encode())
        return h.hexdigest()

    def write_manifest(self, path: str | os.PathLike[str], overwrite: bool = False) -> None:
        """Write the manifest as tab-separated text: name, size, sha256, split.

        Written atomically; refused if `path` is one of the corpus's inputs (or would be read by it),
        and kept if it exists unless `overwrite`.
        """
        check_output_path(path, self.inputs, overwrite=overwrite, what="manifest")
        lines = ["name\tsize\tsha256\tsplit"]
        lines += [f"{m.name}\t{m.size}\t{m.sha256}\t{m.split}" for m in self.manifest]
        atomic_write(path, "\n".join(lines) + "\n", overwrite=overwrite)


# --------------------------------------------------------------------------------------------
# Reading files


def read_text_file(path: Path, errors: str = "strict") -> str:
    """Read a UTF-8 file. With errors='strict', bad bytes raise a CorpusError naming the file."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"{path}: not valid UTF-8 (byte {e.start}: {data[e.start:e.start + 4]!r}). Convert the "
            "file to UTF-8, or pass errors='replace' (CLI: --errors replace) to substitute U+FFFD "
            "for the bad bytes, or errors='ignore' to drop them."
        ) from None


def iter_jsonl(path: Path, text_field: str = "text", name: str | None = None) -> Iterator[Document]:
    """Yield one document per line of a JSONL file, taken from `text_field`, named `name:line`."""
    name = name or path.name
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                # Without its line ending: an unclosed string then reads as unterminated, not as
                # an "invalid control character" (the newline).
                record = json.loads(raw.rstrip(b"\r\n"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                # json's own message ends "... at: line 1 column 27 (char 26)"; the line is ours.
                why = f"{e.msg.removesuffix(' at')} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else e
                raise CorpusError(f"{path}:{lineno}: not a JSON object ({why}); each line must be one JSON object") from None
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise CorpusError(
                    f"{path}:{lineno}: no {text_field!r} field (found {keys}); pass text_field=... "
                    "(CLI: --text-field) to name the field that holds the text"
                )
            text = record[text_field]
            if not isinstance(text, str):
                raise CorpusError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, expected a string")
            yield Document(f"{name}:{lineno}", text)


def iter_parquet(path: Path, text_field: str = "text", name: str | None = None) -> Iterator[Document]:
    """Yield one document per row of a Parquet file's `text_field` column (needs pyarrow)."""
    name = name or path.name
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"{path}: reading Parquet needs pyarrow: pip install 'minillm[parquet]'") from None
    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise CorpusError(f"{path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise CorpusError(f"{path}: no column {text_field!r} (columns: {names}); pass text_field=... to pick one")
    row = 0
    for batch in pf.iter_batches(columns=[text_field]):
        for text in batch.column(0).to_pylist():
            row += 1
            if text is None:
                continue
            if not isinstance(text, str):
                raise CorpusError(f"{path}: row {row} of column {text_field!r} is {type(text).__name__}, expected a string")
            yield Document(f"{name}:{row}", text)


def iter_hf_dataset(
    name: str, split: str = "train", text_field: str = "text", config: str | None = None, **kwargs: object
) -> Iterator[Document]:
    """Yield documents from a Hugging Face dataset (the optional ``datasets`` extra), streamed.

    `name` is anything `datasets.load_dataset` takes, including the local builders ("json",
    "parquet", "text") with ``data_files=...`` in `kwargs`, which is how the tests exercise it.
    """
    if not name.strip():
        raise CorpusError("'hf:' needs a dataset name after it, as in hf:wikitext or hf:user/dataset")
    if name in _HF_FILE_BUILDERS and not (kwargs.get("data_files") or kwargs.get("data_dir")):
        # Without data files these builders read the current folder: never what was meant.
        raise CorpusError(
            f"hf:{name} is the datasets loader for local {name} files, not a dataset: give the files "
            f"themselves (--data path/to/files), or from Python load_corpus('hf:{name}', data_files=...)"
        )
    try:
        import datasets
    except ImportError:
        raise CorpusError(f"loading hf:{name} needs the datasets package: pip install 'minillm[datasets]'") from None
    try:
        ds = datasets.load_dataset(name, config, split=split, streaming=True, **kwargs)
    except (OSError, ValueError) as e:  # not found, offline, a bad config or split name...
        raise CorpusError(f"hf:{name}: the dataset cannot be loaded ({_one_line(e)}); check its name, and the network") from None
    for i, record in enumerate(ds, start=1):
        if text_field not in record:
            raise CorpusError(f"hf:{name} record {i}: no {text_field!r} field (found {sorted(record)})")
        text = record[text_field]
        if text is None:
            continue
        if not isinstance(text, str):
            raise CorpusError(f"hf:{name} record {i}: field {text_field!r} is {type(text).__name__}, expected a string")
        yield Document(f"{name}:{i}", text)


# The `datasets` builders that read local files (data_files=...) rather than name a dataset.
_HF_FILE_BUILDERS = frozenset({
    "arrow", "audiofolder", "conll", "csv", "eval", "fasta", "fastq", "genbank", "hdf5", "imagefolder", "json",
    "lance", "meshfolder", "niftifolder", "pandas", "parquet", "pdffolder", "sql", "text", "videofolder",
    "webdataset", "xml",
})


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split())


def _documents_from_file(path: Path, root: Path, text_field: str, errors: str) -> Iterator[Document]:
    name = path.relative_to(root).as_posix()
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        yield from iter_jsonl(path, text_field, name)
    elif suffix == ".parquet":
        yield from iter_parquet(path, text_field, name)
    else:
        yield Document(name, read_text_file(path, errors))


# --------------------------------------------------------------------------------------------
# The built-in corpus


def stdlib_root() -> Path:
    """The directory of the running interpreter's standard library."""
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: str | os.PathLike[str] | None = None) -> list[Path]:
    """The non-test ``.py`` files of the standard library, sorted by relative path."""
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise CorpusError(f"{root}: standard-library directory not found")
    files = []
    for p in root.rglob("*.py"):
        rel = p.relative_to(root)
        if _EXCLUDED_DIRS.intersection(rel.parts[:-1]) or rel.name.startswith("test_"):
            continue
        if rel.as_posix() == _TOPICS_FILE:
            continue
        files.append(p)
    # Sort by the POSIX relative path, so the order is the same on every file system.
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _pydoc_topics(root: Path) -> dict[str, str]:
    """The help topics of pydoc_data/topics.py, read with ast (no import, no code executed)."""
    path = root / _TOPICS_FILE
    if not path.is_file():
        return {}
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            return {k: topics[k] for k in sorted(topics)}
    return {}


def stdlib_corpus(
    root: str | os.PathLike[str] | None = None,
    val_fraction: float = 0.05,
    include_topics: bool = True,
    progress: bool | None = None,
) -> Corpus:
    """The built-in corpus: every non-test standard-library module, then the pydoc help topics.

    Code documents are named by their path relative to `root` (``json/decoder.py``); topics by
    ``pydoc_data/topics.py:<topic>``. Empty files are left out, as by every loader.
    """
    root = Path(root) if root is not None else stdlib_root()
    files = stdlib_files(root)
    docs = [
        Document(p.relative_to(root).as_posix(), read_text_file(p))
        for p in tqdm(files, desc="reading stdlib", unit="file", disable=_no_progress(progress))
    ]
    if include_topics:
        docs += [Document(f"{_TOPICS_FILE}:{k}", v) for k, v in _pydoc_topics(root).items()]
    docs = [d for d in docs if d.text]  # empty files (a few __init__.py) are not documents
    return Corpus(f"stdlib-{sys.version_info.major}.{sys.version_info.minor}", docs, val_fraction, (str(root),))


def _no_progress(progress: bool | None) -> bool:
    # Auto: show bars only on a terminal, so notebooks and logs stay clean.
    return not (progress if progress is not None else sys.stderr.isatty())


# --------------------------------------------------------------------------------------------
# One entry point for every kind of source


def _is_glob(source: str) -> bool:
    return any(c in source for c in "*?[")


def _glob_root(pattern: str) -> Path:
    """The fixed folder a glob starts from: its leading components without a wildcard (``corp`` for
    ``corp/**/*.txt``). Documents are named relative to it, as a directory load names them relative
    to the directory, whatever the glob happens to match today."""
    fixed = []
    for part in Path(pattern).parent.parts:
        if _is_glob(part):
            break
        fixed.append(part)
    return Path(*fixed) if fixed else Path(".")


def _glob_matches(pattern: str, path: str | os.PathLike[str]) -> bool:
    """Whether `glob.glob(pattern, recursive=True)` would list `path`, were it a file (without touching the disk)."""
    pat = Path(os.path.abspath(pattern)).parts
    target = Path(os.path.abspath(path)).parts

    def match(i: int, j: int) -> bool:
        if i == len(pat):
            return j == len(target)
        if pat[i] == "**":  # any number of folders, none of them hidden
            return match(i + 1, j) or (j < len(target) and not target[j].startswith(".") and match(i, j + 1))
        if j == len(target):
            return False
        name = target[j]
        if name.startswith(".") and _is_glob(pat[i]) and not pat[i].startswith("."):
            return False  # a wildcard does not match a hidden name
        return fnmatch.fnmatchcase(name, pat[i]) and match(i + 1, j + 1)

    return match(0, 0)


def _expand(source: str) -> tuple[list[Path], Path]:
    """Files named by `source` (a file, a directory, or a glob) and the root that names them."""
    if _is_glob(source):
        root = _glob_root(source)
        matches = [Path(p) for p in globlib.glob(source, recursive=True) if Path(p).is_file()]
        if not matches:
            raise CorpusError(f"{source}: the pattern matches no files; check it (quote it, so that the shell leaves it alone)")
        # Sorted as a directory load sorts: by the POSIX name relative to the root.
        return sorted(matches, key=lambda p: p.relative_to(root).as_posix()), root
    path = Path(source)
    if path.is_file():
        return [path], path.parent
    if path.is_dir():
        files = sorted(
            (p for p in path.rglob("*") if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        files = [p for p in files if p.suffix.lower() in _TEXT_SUFFIXES | {".jsonl", ".ndjson", ".parquet"}]
        if not files:
            raise CorpusError(
                f"{source}: directory holds no text files (looked for {', '.join(sorted(_TEXT_SUFFIXES))}, .jsonl, .parquet)"
            )
        return files, path
    raise CorpusError(f"{source}: no such file or directory; give a file, a directory, a glob, 'stdlib' or 'hf:NAME'")


def input_paths(source: str | os.PathLike[str] | Iterable[str] | None) -> tuple[str, ...]:
    """What `load_corpus(source)` reads, as outputs must be checked against it: the file, the folder or
    the glob itself (for 'stdlib', the standard library's folder); nothing for hf: or in-memory text."""
    if source is None or source == "stdlib":
        return (str(stdlib_root()),)
    if isinstance(source, (str, os.PathLike)):
        source = os.fspath(source)
        return (source,) if source and not source.startswith("hf:") else ()
    return ()


def check_output_path(
    path: str | os.PathLike[str], inputs: Iterable[str] = (), *, overwrite: bool = False, what: str = "output"
) -> Path:
    """Validate an output file before any work is done (see `minillm.files.check_output`).

    Refuses an empty path, a folder, a path that is one of `inputs` or lies inside an input folder,
    a path that an input glob would match (the next load would read it as a document), and an
    existing file unless `overwrite`.
    """
    if path is not None and str(path) != "":
        for pattern in (str(i) for i in inputs if _is_glob(str(i))):
            if _glob_matches(pattern, path):
                raise OutputError(f"the {what} {str(path)!r} matches the input pattern {pattern!r}, so it would be read "
                                  "as a document next time; write it somewhere else")
        if Path(path).is_dir():
            raise OutputError(f"the {what} {str(path)!r} is a folder; give a file name")
    return check_output(path, inputs=[i for i in inputs if not _is_glob(str(i))], overwrite=overwrite, what=what)


def load_corpus(
    source: str | os.PathLike[str] | Iterable[str] | None = None,
    *,
    text_field: str = "text",
    errors: str = "strict",
    val_fraction: float = 0.05,
    progress: bool | None = None,
    **hf_kwargs: object,
) -> Corpus:
    """Load a corpus from any supported source.

    - ``None`` or ``"stdlib"``: the built-in standard-library corpus;
    - a path to a file, a directory (read recursively, hidden files skipped), or a glob: text
      files are one document each, ``.jsonl`` gives one document per line and ``.parquet`` one
      per row, both from `text_field`. In a directory, only files with a known suffix are read
      (.txt .md .rst .py .text .csv .tsv .html .tex .jsonl .ndjson .parquet); name other files
      with a glob;
    - ``"hf:NAME"``: a Hugging Face dataset through ``datasets.load_dataset`` (streamed);
    - an iterable of strings: one document each, named by index.
    """
    if errors not in ("strict", "replace", "ignore"):
        raise CorpusError(f"errors must be 'strict', 'replace' or 'ignore', got {errors!r}")
    if source is None or source == "stdlib":
        return stdlib_corpus(val_fraction=val_fraction, progress=progress)
    if isinstance(source, (str, os.PathLike)):
        source = os.fspath(source)
        if not source.strip():
            raise CorpusError("the data source is empty; give a file, a directory, a glob, 'stdlib' or 'hf:NAME'")
        if source.startswith("hf:"):
            docs = list(iter_hf_dataset(source[3:], text_field=text_field, **hf_kwargs))  # type: ignore[arg-type]
            return Corpus(source, [d for d in docs if d.text], val_fraction)
        files, root = _expand(source)
        docs = []
        for path in tqdm(files, desc="reading", unit="file", disable=_no_progress(progress)):
            docs.extend(_documents_from_file(path, root, text_field, errors))
        return Corpus(source, [d for d in docs if d.text], val_fraction, input_paths(source))
    docs = []
    for i, text in enumerate(source):
        if not isinstance(text, str):
            raise CorpusError(f"document {i} is {type(text).__name__}, expected a string")
        docs.append(Document(f"doc{i}", text))
    return Corpus("<memory>", [d for d in docs if d.text], val_fraction)
