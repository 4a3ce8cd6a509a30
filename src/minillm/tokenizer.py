"""Byte-level BPE: training, encoding and decoding, saving, and export to tiktoken.

Conventions (chapter 01 explains each):

* The vocabulary starts with the 256 single bytes. Training adds one token per merge, and the
  special tokens come last. ``vocab_size`` counts all three.
* Text is first cut at special-token strings, so no merge ever spans one, then split into
  pre-tokens by a regex (`GPT2_PATTERN`, `GPT4_PATTERN`, or your own). Merges never cross a
  pre-token boundary.
* Each training step merges the most frequent adjacent pair; ties go to the lexicographically
  greater pair, comparing (left bytes, right bytes). The merges are therefore a pure function of
  the pre-token counts, whatever the number of processes that counted them.
* Encoding follows tiktoken's rule: a pre-token that is itself a token is that token; otherwise
  repeatedly merge the adjacent pair whose concatenation is the token with the lowest id (the
  leftmost such pair on a tie). With this rule a tokenizer and its `to_tiktoken()` export give
  identical ids on ordinary text, and `encode` uses tiktoken as its fast path.
* Special tokens are found leftmost first and, where several start at the same place (one may be a
  prefix of another), longest first; `encode`, `encode_python` and `encode_iterable` all cut the
  text this way themselves and hand only the ordinary text in between to the BPE.
* The ids of a tokenizer run from 0 to ``vocab_size - 1`` without gaps.
"""

from __future__ import annotations

import codecs
import heapq
import json
import numbers
import os
import signal
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Literal

import regex

__all__ = [
    "GPT2_PATTERN",
    "GPT4_PATTERN",
    "PATTERNS",
    "TokenizerError",
    "Tokenizer",
    "train_bpe",
    "train_bpe_naive",
    "pretoken_counts",
    "bytes_to_unicode",
    "StreamDecoder",
]

# The pre-tokenization patterns, as tiktoken spells them (r50k_base for GPT-2, cl100k_base for GPT-4).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
GPT4_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s"""
)
PATTERNS = {"gpt2": GPT2_PATTERN, "gpt4": GPT4_PATTERN}

FORMAT_HEADER = "#minillm-bpe v1"
# Text that exercises every class of a pre-tokenization pattern: contractions, letters, digits,
# punctuation, underscores, non-ASCII, runs of spaces, newlines and a final newline, then one
# character of each Unicode general category (a combining mark, a letter number, an no-break space,
# a line separator, a control, a format and a private-use character, an unassigned code point...),
# so that a custom pattern that would silently drop some kind of character is caught.
_PROBE = (
    "Don't panic: x_1 = f(42, 'é') + 12345 \t\n\n    def g(self):\r\n        return None  # ok\n"
    "e\u0301 \u0903\u20dd Ⅻ½ a-b «c» $^©± x\u00a0y\u3000z\u2028\u2029 \x00\x7f\u200d\ue000\u0378 1 2 ,3\f\v\x1c\x85 \n"
    "日本 😀 end\n"  # letters right before a final newline: where `$` differs between regex engines
)
_PARALLEL_MIN_CHARS = 2_000_000  # below this, starting worker processes costs more than it saves


class TokenizerError(ValueError):
    """Bad tokenizer input: a config, a file, an id or a text; the message says how to fix it."""


def _compile(pattern: str) -> regex.Pattern:
    if not isinstance(pattern, str):
        raise TokenizerError(f"the pre-tokenization pattern must be a string (a regex), got {type(pattern).__name__} {pattern!r}")
    try:
        return regex.compile(pattern)
    except (regex.error, ValueError, OverflowError, RecursionError) as e:  # `regex` raises more than regex.error
        raise TokenizerError(f"pre-tokenization pattern does not compile: {e} (pattern: {pattern!r})") from None


def _pretokens(pat: regex.Pattern, text: str, check: bool = False) -> list[str]:
    """The pre-tokens of `text`: the whole matches, as tiktoken takes them (`findall` would return
    the groups of a pattern that has capturing groups).

    With `check` (for custom patterns), they must cover `text` from start to end, in order; else a
    TokenizerError names the first character the pattern leaves out, which would be lost.
    """
    if not check:
        return pat.findall(text) if pat.groups == 0 else [m.group(0) for m in pat.finditer(text)]
    out, pos = [], 0
    for m in pat.finditer(text):
        if m.start() != pos:
            break
        out.append(m.group(0))
        pos = m.end()
    if pos == len(text):
        return out
    raise TokenizerError(
        f"the pre-tokenization pattern does not match every character: it skips {text[pos:pos + 1]!r} at {pos} "
        f"of {text[:60]!r}{'...' if len(text) > 60 else ''} (pattern: {pat.pattern!r}), and text it skips would "
        "be lost. Add a catch-all alternative such as '|\\s|.'"
    )


def _checked_pattern(pattern: str) -> regex.Pattern:
    """Compile `pattern` and, unless it is a built-in one, check it on a probe text that holds every
    kind of character: its matches must not be empty, and must cover the probe in order."""
    pat = _compile(pattern)
    if pattern not in PATTERNS.values():
        if pat.flags & regex.REVERSE:
            raise TokenizerError(f"the pre-tokenization pattern searches backwards ((?r), pattern: {pattern!r}); "
                                 "remove the flag: pre-tokens must come in reading order")
        if pat.search("") is not None or any(not m.group(0) for m in pat.finditer(_PROBE)):
            # An empty pre-token is meaningless, and tiktoken's engine crashes on one.
            raise TokenizerError(f"the pre-tokenization pattern can match the empty string (pattern: {pattern!r}); "
                                 "make every alternative consume at least one character (+ rather than *)")
        _pretokens(pat, _PROBE, check=True)
    return pat


def _special_splitter(specials: Iterable[str]) -> regex.Pattern | None:
    # An alternation tries its branches in order: longest first, so that where a special token and a
    # longer one that it is a prefix of both fit, the longer one wins.
    specials = sorted(specials, key=len, reverse=True)
    return regex.compile("(" + "|".join(regex.escape(s) for s in specials) + ")") if specials else None


# --------------------------------------------------------------------------------------------
# Pre-tokenization and counting


def _count_chunk(args: tuple[list[str], str, list[str]]) -> Counter[bytes]:
    texts, pattern, specials = args
    pat, splitter = regex.compile(pattern), _special_splitter(specials)
    counts: Counter[bytes] = Counter()
    for text in texts:
        parts = splitter.split(text)[::2] if splitter else [text]  # even slots are the text between specials
        for part in parts:
            counts.update(m.encode("utf-8") for m in _pretokens(pat, part))
    return counts


def pretoken_counts(
    texts: Iterable[str], pattern: str = GPT4_PATTERN, special_tokens: Sequence[str] = (), num_proc: int | None = None
) -> Counter[bytes]:
    """How often each pre-token (as UTF-8 bytes) occurs in `texts`, with special tokens removed.

    Large inputs are counted by `num_proc` worker processes (default: all cores), each taking a
    contiguous run of whole documents; the sum of counts does not depend on how they were cut.
    """
    _compile(pattern)
    procs = _worker_count(num_proc)
    texts = list(texts)
    total = sum(len(t) for t in texts)
    if procs <= 1 or total < _PARALLEL_MIN_CHARS:
        return _count_chunk((texts, pattern, list(special_tokens)))
    # Cut long single texts at special tokens first, so that the work can be shared.
    splitter = _special_splitter(special_tokens)
    docs = [p for t in texts for p in (splitter.split(t)[::2] if splitter else [t])]
    chunks: list[list[str]] = [[] for _ in range(procs * 4)]
    target, i, size = total / len(chunks), 0, 0
    for d in docs:
        chunks[i].append(d)
        size += len(d)
        if size >= target and i < len(chunks) - 1:
            i, size = i + 1, 0
    counts: Counter[bytes] = Counter()
    pool = ProcessPoolExecutor(procs, initializer=_ignore_sigint)
    try:
        for c in pool.map(_count_chunk, [(ch, pattern, []) for ch in chunks if ch]):
            counts.update(c)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # on Ctrl-C: drop the queued chunks, end the workers
    return counts


def _ignore_sigint() -> None:
    # Ctrl-C reaches every process of the terminal's group. The parent stops the pool; the workers
    # must not each print a KeyboardInterrupt traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# --------------------------------------------------------------------------------------------
# Training


def _available_cores() -> int:
    # The cores this process may run on (a container may allow fewer than the machine has).
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _is_int(x: object) -> bool:
    # True and False are ints to Python, never counts to us; numpy's integers are fine.
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _worker_count(num_proc: int | None) -> int:
    """The processes to count with: all cores by default, and never more than there are (more would only wait)."""
    cores = _available_cores()
    if num_proc is None:
        return cores
    if not _is_int(num_proc) or num_proc < 1:
        raise TokenizerError(f"num_proc must be a whole number of processes, at least 1; got {num_proc!r} (CLI: --num-proc)")
    if num_proc > cores:
        warnings.warn(f"num_proc={num_proc} is more than the {cores} available core(s); using {cores}", stacklevel=3)
        return cores
    return int(num_proc)


def _check_special_tokens(special_tokens: Sequence[str]) -> None:
    if isinstance(special_tokens, str):
        raise TokenizerError(f"special_tokens must be a list of strings, got the string {special_tokens!r}; write [{special_tokens!r}]")
    for s in special_tokens:
        if not isinstance(s, str) or not s:
            raise TokenizerError(f"a special token must be a non-empty string, got {s!r}")
        try:
            s.encode("utf-8")
        except UnicodeEncodeError:
            raise TokenizerError(f"the special token {s!r} holds a lone surrogate, which has no UTF-8 bytes; use real characters") from None
    if len(set(special_tokens)) != len(special_tokens):
        dup = sorted(s for s, n in Counter(special_tokens).items() if n > 1)
        raise TokenizerError(f"duplicate special token(s) {dup}: list each special token once")


# Token ids must fit tiktoken's 32-bit ranks (and any embedding table we could ever allocate).
_MAX_VOCAB = 2**31 - 1


def _check_training_args(vocab_size: int, special_tokens: Sequence[str], pattern: str) -> int:
    if not _is_int(vocab_size):
        raise TokenizerError(f"vocab_size must be a whole number (an int), got {type(vocab_size).__name__} {vocab_size!r}; "
                             "pass the number of tokens, e.g. vocab_size=4096")
    _check_special_tokens(special_tokens)
    _checked_pattern(pattern)  # before any counting: a bad pattern should not cost a pass over the corpus
    vocab_size = int(vocab_size)
    if vocab_size > _MAX_VOCAB:
        raise TokenizerError(f"vocab_size={vocab_size} is too large: token ids must fit in 31 bits; ask for at most {_MAX_VOCAB}")
    need = 256 + len(special_tokens)
    if vocab_size < need:
        raise TokenizerError(
            f"vocab_size={vocab_size} is too small: the 256 byte tokens and {len(special_tokens)} special "
            f"token(s) need at least {need}; the merges come on top of that"
        )
    return vocab_size - need


def _texts_of(source: str | os.PathLike[str] | Iterable[str]) -> list[str]:
    """Training text from a string (the text itself), a path (anything `load_corpus` reads: its
    training split), a `Corpus` (its training split), or an iterable of documents (strings or
    `Document`s, all of them)."""
    from minillm.corpus import Corpus, Document, load_corpus

    if isinstance(source, os.PathLike):
        source = load_corpus(source)
    if isinstance(source, Corpus):
        return [d.text for d in source.split("train")]
    if isinstance(source, str):
        if source == "stdlib" or (0 < len(source) < 4096 and "\n" not in source and Path(source).exists()):
            raise TokenizerError(
                f"train_bpe got the string {source!r}, which looks like a corpus name or a path; a string is "
                "trained on as text. Pass Path(...) or load_corpus(...) to train on files"
            )
        return [source]
    texts = [t.text if isinstance(t, Document) else t for t in source]
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TokenizerError(f"document {i} is {type(t).__name__}, expected a string")
    return texts


def _merge_word(word: list[int], a: int, b: int, new: int) -> list[int]:
    out, i, n = [], 0, len(word)
    while i < n:
        if i < n - 1 and word[i] == a and word[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def _merge_in_place(
    w: list[int], a: int, b: int, new: int, f: int, wi: int,
    pair_count: dict[tuple[int, int], int], where: dict[tuple[int, int], set[int]], changed: set[tuple[int, int]],
) -> list[int] | None:
    """Merge (a, b) in word `w` (which occurs `f` times), updating only the pairs next to each merge.

    At a merge site w[i:i+2] == [a, b], the pair on the left, (w[i-1], a), becomes (out[-1], new)
    and the pair on the right, (b, w[i+2]), becomes (new, w[i+2]); when the next site follows at once,
    its own left step handles the pair between the two. The pair (a, b) itself is dropped by the caller.
    Returns None if `w` no longer holds the pair (the index of words is never pruned).
    """
    out: list[int] = []
    i, n, hit = 0, len(w), False
    while i < n:
        if i < n - 1 and w[i] == a and w[i + 1] == b:
            hit = True
            if i > 0:
                old = (w[i - 1], a)
                if old != (a, b):
                    pair_count[old] -= f
                    changed.add(old)
                p = (out[-1], new)
                pair_count[p] += f
                changed.add(p)
                where[p].add(wi)
            if i + 2 < n and not (i + 3 < n and w[i + 2] == a and w[i + 3] == b):
                old = (b, w[i + 2])
                if old != (a, b):
                    pair_count[old] -= f
                    changed.add(old)
                p = (new, w[i + 2])
                pair_count[p] += f
                changed.add(p)
                where[p].add(wi)
            out.append(new)
            i += 2
        else:
            out.append(w[i])
            i += 1
    return out if hit else None


def _descending(token: bytes) -> tuple[int, ...]:
    # A key under which the min-heap pops lexicographically *greater* bytes first: each byte is
    # inverted, and an end marker above every inverted byte makes a prefix sort after its extensions.
    return tuple(255 - x for x in token) + (256,)


def _finish(merges: list[tuple[bytes, bytes]], special_tokens: Sequence[str], pattern: str) -> Tokenizer:
    vocab = {i: bytes([i]) for i in range(256)}
    for i, (left, right) in enumerate(merges):
        vocab[256 + i] = left + right
    specials = {s: 256 + len(merges) + i for i, s in enumerate(special_tokens)}
    return Tokenizer(vocab, merges, specials, pattern)


def train_bpe(
    source: str | os.PathLike[str] | Iterable[str],
    vocab_size: int,
    special_tokens: Sequence[str] = ("<|endoftext|>",),
    pattern: str = GPT4_PATTERN,
    *,
    num_proc: int | None = None,
    progress: bool = False,
) -> Tokenizer:
    """Train a byte-level BPE tokenizer with `vocab_size` tokens (bytes + merges + specials).

    The fast trainer: pre-token counts are deduplicated once; an index maps each pair to the
    words that contain it, so a merge only touches those words; and a heap of (count, pair)
    entries, refreshed lazily, yields the next merge. If the text runs out of pairs first, the
    vocabulary comes out smaller than asked.
    """
    n_merges = _check_training_args(vocab_size, special_tokens, pattern)
    texts = _texts_of(source)
    counts = pretoken_counts(texts, pattern, special_tokens, num_proc)
    if not counts:
        raise TokenizerError("the training corpus is empty: no text to learn merges from")

    keys = sorted(counts)  # a fixed order, so that nothing depends on hashing or process order
    words = [list(k) for k in keys]
    freqs = [counts[k] for k in keys]
    token_bytes: list[bytes] = [bytes([i]) for i in range(256)]
    order: list[tuple[int, ...]] = [_descending(t) for t in token_bytes]

    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for p in zip(w, w[1:]):
            pair_count[p] += f
            where[p].add(wi)
    heap = [(-c, order[a], order[b], a, b) for (a, b), c in pair_count.items()]
    heapq.heapify(heap)

    merges: list[tuple[bytes, bytes]] = []
    bar = _progress_bar(n_merges, progress)
    while len(merges) < n_merges and heap:
        neg, _, _, a, b = heapq.heappop(heap)
        if pair_count.get((a, b), 0) != -neg:
            continue  # a stale entry: this pair's count changed after it was pushed
        new = len(token_bytes)
        token_bytes.append(token_bytes[a] + token_bytes[b])
        order.append(_descending(token_bytes[new]))
        merges.append((token_bytes[a], token_bytes[b]))
        changed: set[tuple[int, int]] = set()
        for wi in where.pop((a, b)):
            w, f = words[wi], freqs[wi]
            merged = _merge_in_place(w, a, b, new, f, wi, pair_count, where, changed)
            if merged is not None:
                words[wi] = merged
        del pair_count[(a, b)]  # every occurrence is merged now
        changed.discard((a, b))
        for p in changed:
            c = pair_count[p]
            if c > 0:
                heapq.heappush(heap, (-c, order[p[0]], order[p[1]], p[0], p[1]))
            else:
                del pair_count[p]
        bar.update(1)
    bar.close()
    _warn_if_short(len(merges), n_merges)
    return _finish(merges, special_tokens, pattern)


def train_bpe_naive(
    source: str | Iterable[str], vocab_size: int, special_tokens: Sequence[str] = ("<|endoftext|>",), pattern: str = GPT4_PATTERN
) -> Tokenizer:
    """The specification of `train_bpe`, written the obvious way: recount every pair at every step.

    Quadratic and slow; it exists to be read, and to check the fast trainer against.
    """
    n_merges = _check_training_args(vocab_size, special_tokens, pattern)
    counts = pretoken_counts(_texts_of(source), pattern, special_tokens, num_proc=1)
    if not counts:
        raise TokenizerError("the training corpus is empty: no text to learn merges from")
    words = {tuple(k): c for k, c in counts.items()}
    token_bytes = [bytes([i]) for i in range(256)]
    merges: list[tuple[bytes, bytes]] = []
    for _ in range(n_merges):
        pairs: Counter[tuple[int, int]] = Counter()
        for w, c in words.items():
            for p in zip(w, w[1:]):
                pairs[p] += c
        if not pairs:
            break
        a, b = max(pairs, key=lambda p: (pairs[p], token_bytes[p[0]], token_bytes[p[1]]))
        new = len(token_bytes)
        token_bytes.append(token_bytes[a] + token_bytes[b])
        merges.append((token_bytes[a], token_bytes[b]))
        words = {tuple(_merge_word(list(w), a, b, new)): c for w, c in words.items()}
    _warn_if_short(len(merges), n_merges)
    return _finish(merges, special_tokens, pattern)


def _warn_if_short(got: int, wanted: int) -> None:
    if got < wanted:
        warnings.warn(f"the training text ran out of pairs after {got} of {wanted} merges: the vocabulary is "
                      f"{wanted - got} tokens smaller than asked", stacklevel=3)


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc="merges", unit="merge", disable=not enabled)


# --------------------------------------------------------------------------------------------
# The tokenizer


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from each byte to a printable character, used in its files (and ours).

    Printable Latin-1 bytes map to themselves; the rest (space, control bytes...) to the
    characters from U+0100 up, so that space becomes 'Ġ' and newline 'Ċ'.
    """
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def _to_text(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def _from_text(text: str, where: str) -> bytes:
    table = {c: b for b, c in bytes_to_unicode().items()}
    try:
        return bytes(table[c] for c in text)
    except KeyError as e:
        raise TokenizerError(f"{where}: character {e.args[0]!r} is not in GPT-2's byte alphabet") from None


SpecialPolicy = Literal["all"] | set[str] | frozenset[str] | tuple[str, ...]


class Tokenizer:
    """A byte-level BPE tokenizer: `vocab` (id -> bytes), `merges`, special tokens and a pattern."""

    def __init__(
        self,
        vocab: dict[int, bytes],
        merges: list[tuple[bytes, bytes]],
        special_tokens: dict[str, int] | None = None,
        pattern: str = GPT4_PATTERN,
    ) -> None:
        self.vocab = dict(vocab)
        self.merges = list(merges)
        self.special_tokens = dict(special_tokens or {})
        self.pattern = pattern
        self._pat = _checked_pattern(pattern)
        self.ranks = {t: i for i, t in self.vocab.items()}
        if len(self.ranks) != len(self.vocab):
            dup = Counter(self.vocab.values()).most_common(1)[0][0]
            raise TokenizerError(f"the vocabulary holds the token {dup!r} twice; each byte string needs one id")
        missing = [b for b in range(256) if bytes([b]) not in self.ranks]
        if missing:
            raise TokenizerError(f"the vocabulary lacks {len(missing)} single bytes (e.g. {bytes([missing[0]])!r}); a byte-level BPE needs all 256")
        for i, (left, right) in enumerate(self.merges):
            if left + right not in self.ranks:
                raise TokenizerError(f"merge {i} ({left!r}, {right!r}) makes a token that is not in the vocabulary")
        _check_special_tokens(list(self.special_tokens))
        clash = set(self.special_tokens.values()) & set(self.vocab)
        if clash:
            raise TokenizerError(f"special token id(s) {sorted(clash)} are also ordinary token ids")
        if len(set(self.special_tokens.values())) != len(self.special_tokens):
            raise TokenizerError("two special tokens share an id")
        self._check_ids_are_dense()
        self.id_to_special = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        self._splitter = _special_splitter(self.special_tokens)
        # Special tokens that hold a newline are the ones a streaming block boundary could cut in two.
        self._newline_special_len = max((len(t) for t in self.special_tokens if "\n" in t), default=0)
        self._tiktoken = None  # built on first use by encode's fast path
        self._tiktoken_failed = False
        # A custom pattern passed the probe, which cannot prove that it matches every character of
        # every text; each encoding then checks that no byte went missing (see `_pretokens`, `_kept`).
        self._custom_pattern = pattern not in PATTERNS.values()
        self._token_lens = [len(self.vocab.get(i) or self.id_to_special[i]) for i in range(self.vocab_size)] \
            if self._custom_pattern else []

    def _check_ids_are_dense(self) -> None:
        # Every consumer (embedding tables, tiktoken, the file format) assumes ids 0..vocab_size-1.
        n = self.vocab_size
        for kind, ids in (("ordinary", self.vocab), ("special", self.special_tokens.values())):
            for i in ids:
                if not _is_int(i) or not 0 <= i < n:
                    raise TokenizerError(
                        f"{kind} token id {i!r} is outside 0..{n - 1}: the ids of a tokenizer with {n} tokens must run "
                        f"from 0 to {n - 1} without gaps; renumber the tokens"
                    )

    def with_special_tokens(self, names: Sequence[str]) -> Tokenizer:
        """A copy with `names` added as special tokens after the last id; every existing id is kept.

        Fine-tuning adds tokens (a chat template's role markers) to a tokenizer that a model was
        trained with: appending them keeps every id the model's embedding rows were trained for, so
        old text encodes exactly as before, while the model grows rows for the new ids. Names that
        are already special tokens are kept where they are (so calling it twice is harmless); a name
        whose text the ordinary vocabulary could also produce is fine, since special tokens are only
        recognized where `encode`'s `allowed_special` allows them.
        """
        _check_special_tokens(names if isinstance(names, str) else list(names))  # a bare string is refused
        specials = dict(self.special_tokens)
        for name in names:
            if name not in specials:
                specials[name] = self.vocab_size + len(specials) - len(self.special_tokens)
        return Tokenizer(self.vocab, self.merges, specials, self.pattern)

    # -- sizes and lookups --------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of ids: ordinary tokens plus special tokens."""
        return len(self.vocab) + len(self.special_tokens)

    @property
    def eot_id(self) -> int:
        """The id of '<|endoftext|>'."""
        if "<|endoftext|>" not in self.special_tokens:
            raise TokenizerError("this tokenizer has no '<|endoftext|>' special token")
        return self.special_tokens["<|endoftext|>"]

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, special_tokens={list(self.special_tokens)})"

    # -- encoding -----------------------------------------------------------------------------

    def _allowed(self, allowed_special: SpecialPolicy) -> frozenset[str]:
        """The special tokens that `allowed_special` lets through, checked against this tokenizer's."""
        if isinstance(allowed_special, str) and allowed_special != "all":
            allowed_special = {allowed_special}  # one special token named on its own
        allowed = frozenset(self.special_tokens) if allowed_special == "all" else frozenset(allowed_special)
        unknown = allowed - set(self.special_tokens)
        if unknown:
            raise TokenizerError(f"allowed_special names unknown special token(s) {sorted(unknown)}; known: {sorted(self.special_tokens)}")
        return allowed

    def _cut(self, text: str, allowed: frozenset[str], offset: int = 0) -> list[str | int]:
        """`text` cut at its special tokens: the ordinary text between them (str) and their ids (int).

        Matching is leftmost, then longest. A special token that is not in `allowed` raises, naming its
        character offset in the whole input (`offset` is where `text` starts in it).
        """
        if self._splitter is None:
            return [text]
        out: list[str | int] = []
        pos = 0
        for m in self._splitter.finditer(text):
            token = m.group(0)
            if token not in allowed:
                raise TokenizerError(
                    f"the text contains the special token {token!r} at character {offset + m.start()}; pass "
                    f"allowed_special={{{token!r}}} (or 'all') to encode it as one special token, or "
                    "encode_ordinary(text) to encode it as plain text"
                )
            out += [text[pos : m.start()], self.special_tokens[token]]
            pos = m.end()
        out.append(text[pos:])
        return out

    def _encode(self, text: str, allowed_special: SpecialPolicy, ordinary, offset: int = 0) -> list[int]:
        # The one place where special tokens are honoured; `ordinary` encodes the text in between.
        parts = self._cut(text, self._allowed(allowed_special), offset)
        if len(parts) == 1:
            return ordinary(text)
        out: list[int] = []
        for part in parts:
            if isinstance(part, int):
                out.append(part)
            elif part:
                out.extend(ordinary(part))
        return out

    def _bpe(self, piece: bytes) -> list[int]:
        """tiktoken's rule: merge the adjacent pair that makes the lowest-id token (the leftmost on a
        tie), until no adjacent pair makes a token.

        In O(n log n) for a piece of n bytes, however long: the parts form a linked list over byte
        offsets (the part that starts at i ends at nxt[i]), and a heap holds (rank, start, end) for each
        adjacent pair that makes a token. A merge only adds the two pairs beside it. An entry whose
        span no longer consists of two current parts is stale, and is skipped when it comes up.
        """
        ranks = self.ranks
        n = len(piece)
        nxt = list(range(1, n + 1))
        prv = list(range(-1, n - 1))
        heap = [(r, i, i + 2) for i in range(n - 1) if (r := ranks.get(piece[i : i + 2])) is not None]
        heapq.heapify(heap)
        pop, push = heapq.heappop, heapq.heappush
        while heap:
            _, i, end = pop(heap)
            j = nxt[i]
            if j <= i or j >= n or nxt[j] != end:
                continue  # stale: part i was merged away (nxt = 0 marks that), or a neighbour has grown
            nxt[i], nxt[j] = end, 0
            if end < n:
                prv[end] = i
                r = ranks.get(piece[i : nxt[end]])
                if r is not None:
                    push(heap, (r, i, nxt[end]))
            left = prv[i]
            if left >= 0:
                r = ranks.get(piece[left:end])
                if r is not None:
                    push(heap, (r, left, end))
        out, i = [], 0
        while i < n:
            out.append(ranks[piece[i : nxt[i]]])
            i = nxt[i]
        return out

    def _encode_ordinary_python(self, text: str) -> list[int]:
        out: list[int] = []
        cache: dict[str, list[int]] = {}
        ranks = self.ranks
        for m in _pretokens(self._pat, _without_surrogates(text), check=self._custom_pattern):
            ids = cache.get(m)
            if ids is None:
                piece = m.encode("utf-8")
                whole = ranks.get(piece)  # as tiktoken: a pre-token that is a token is that token
                ids = cache[m] = [whole] if whole is not None else self._bpe(piece)
            out.extend(ids)
        return out

    def _kept(self, text: str, ids: list[int]) -> list[int]:
        """tiktoken's `ids` for `text`, after checking (for custom patterns only) that they stand for
        every byte of it: its engine matches in order, but silently skips what the pattern misses."""
        if not self._custom_pattern or sum(map(self._token_lens.__getitem__, ids)) == len(text.encode("utf-8", "surrogatepass")):
            return ids
        _pretokens(self._pat, _without_surrogates(text), check=True)  # names the character, as `regex` sees it
        raise TokenizerError(f"the pre-tokenization pattern does not match every character of {text[:60]!r} "
                             f"(pattern: {self.pattern!r}), and text it skips would be lost. Add a catch-all alternative such as '|\\s|.'")

    def encode_python(self, text: str, allowed_special: SpecialPolicy = ()) -> list[int]:
        """The pure-Python encoder: the reference that the tiktoken fast path must equal."""
        return self._encode(text, allowed_special, self._encode_ordinary_python)

    def _fast(self):
        if self._tiktoken is None and not self._tiktoken_failed:
            try:
                enc = self.to_tiktoken()
                # tiktoken's regex engine differs from `regex` in corners ($ before a final newline,
                # say); a custom pattern must give the same ids on the probe text to be trusted.
                if enc.encode_ordinary(_PROBE) != self._encode_ordinary_python(_PROBE):
                    raise TokenizerError("tiktoken splits the probe text differently")
                self._tiktoken = enc
            except (KeyboardInterrupt, SystemExit):
                raise
            except BaseException as e:  # noqa: BLE001 -- tiktoken's Rust code panics (a BaseException) on some patterns
                warnings.warn(f"encoding with the pure-Python path: tiktoken cannot serve this pattern ({e})", stacklevel=3)
                self._tiktoken_failed = True
        return self._tiktoken

    def encode(self, text: str, allowed_special: SpecialPolicy = ()) -> list[int]:
        """Token ids of `text`. Special-token strings raise unless listed in `allowed_special`."""
        return self._encode(text, allowed_special, self.encode_ordinary)

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of `text`, reading special-token strings as plain text."""
        enc = self._fast()
        return self._kept(text, enc.encode_ordinary(text)) if enc is not None else self._encode_ordinary_python(text)

    def encode_batch(self, texts: Sequence[str], allowed_special: SpecialPolicy = (), num_threads: int = 8) -> list[list[int]]:
        """`encode` over many texts; tiktoken spreads the ordinary text over threads."""
        allowed = self._allowed(allowed_special)
        cuts = []
        for n, t in enumerate(texts):
            try:
                cuts.append(self._cut(t, allowed))
            except TokenizerError as e:
                raise TokenizerError(f"text {n}: {e}") from None
        pieces = [p for cut in cuts for p in cut if isinstance(p, str)]
        enc = self._fast()
        encoded = iter(map(self._kept, pieces, enc.encode_ordinary_batch(pieces, num_threads=num_threads)) if enc is not None
                       else [self._encode_ordinary_python(p) for p in pieces])
        out = []
        for cut in cuts:
            ids: list[int] = []
            for p in cut:
                ids.append(p) if isinstance(p, int) else ids.extend(next(encoded))
            out.append(ids)
        return out

    def encode_iterable(self, chunks: Iterable[str], allowed_special: SpecialPolicy = (), block_chars: int = 1 << 16) -> Iterator[int]:
        """Stream the ids of a text given in pieces (a file's lines, say), in constant memory.

        The text is encoded a block at a time, each block cut right after a lone newline, one with a
        non-space character on each side: with both built-in patterns no pre-token spans such a
        place, so the ids equal those of `encode` on the whole text. (A custom pattern must keep that property.)
        Memory is bounded by the longest stretch without such a place (a long indented class body,
        say), never by the length of the stream. A block never ends inside a special token (one that
        holds a newline could straddle such a place), and the error for a special token that is not
        allowed names its offset in the whole stream, as `encode` would.
        """
        allowed = self._allowed(allowed_special)
        pieces: list[str] = []
        size = done = 0  # `done`: characters already encoded, for error offsets
        for chunk in chunks:
            if not isinstance(chunk, str):
                raise TokenizerError(f"encode_iterable needs text, got a {type(chunk).__name__} chunk; open files in "
                                     "text mode (open(path, encoding='utf-8', newline=''))")
            pieces.append(chunk)
            size += len(chunk)
            if size < block_chars:
                continue
            buf = "".join(pieces)
            cut = self._block_cut(buf)
            if cut > 0:
                yield from self._encode(buf[:cut], allowed, self.encode_ordinary, done)
                buf, done = buf[cut:], done + cut
            pieces, size = [buf], len(buf)
            block_chars = max(block_chars, 2 * size)  # a long line without a cut: wait for more text
        if pieces:
            yield from self._encode("".join(pieces), allowed, self.encode_ordinary, done)

    def _block_cut(self, buf: str) -> int:
        """The last place where `encode_iterable` may end a block of `buf`, or 0 for none yet.

        A lone newline (see `_stream_cuts`) that no special token spans. Only a special token holding a
        newline can span one; it starts before the cut and is at most `_newline_special_len` long,
        so it lies wholly in `buf` when the cut is far enough from its end, and scanning `buf` from
        its start (itself a cut) finds it exactly as scanning the whole stream would.
        """
        if not self._newline_special_len:
            return next(_stream_cuts(buf), 0)
        limit = len(buf) - self._newline_special_len + 1
        spans = [m.span() for m in self._splitter.finditer(buf) if "\n" in m.group(0)]
        return next((c for c in _stream_cuts(buf) if c <= limit and not any(a < c < b for a, b in spans)), 0)

    # -- decoding -----------------------------------------------------------------------------

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes that `ids` stand for (a list, or a 1-D tensor or array of ids)."""
        if hasattr(ids, "tolist"):  # torch tensors and numpy arrays: plain ints hash and compare as ids
            ids = ids.tolist()
        vocab, special = self.vocab, self.id_to_special
        out = []
        for i in ids:
            b = vocab.get(i)
            if b is None:
                b = special.get(i)
                if b is None:
                    raise TokenizerError(f"id {i} is not in the vocabulary (ids run from 0 to {self.vocab_size - 1})")
            out.append(b)
        return b"".join(out)

    def decode(self, ids: Iterable[int], errors: str = "replace") -> str:
        """The text of `ids`. Bytes that are not valid UTF-8 become U+FFFD, or raise with errors='strict'."""
        data = self.decode_bytes(ids)
        try:
            return data.decode("utf-8", errors=errors)
        except UnicodeDecodeError as e:
            raise _not_utf8(e) from None

    def decoder(self, errors: str = "replace") -> StreamDecoder:
        """An incremental decoder, for printing tokens as they come: see `StreamDecoder`."""
        return StreamDecoder(self, errors)

    def decode_stream(self, ids: Iterable[int], errors: str = "replace") -> Iterator[str]:
        """The text of `ids` in pieces, one per id that completes some characters; the pieces join to `decode(ids)`."""
        dec = self.decoder(errors)
        for i in ids:
            piece = dec.decode(i)
            if piece:
                yield piece
        tail = dec.flush()
        if tail:
            yield tail

    # -- tiktoken -----------------------------------------------------------------------------

    def to_tiktoken(self, name: str = "minillm"):
        """A `tiktoken.Encoding` with the same ids (ranks are our ids).

        Its `encode_ordinary` gives our ids. Its own special-token matching is not specified when one
        special token is a prefix of another; `Tokenizer.encode` cuts at special tokens itself.
        """
        import tiktoken

        return tiktoken.Encoding(name, pat_str=self.pattern, mergeable_ranks=self.ranks, special_tokens=self.special_tokens)

    # -- files --------------------------------------------------------------------------------

    def save(self, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        """Write the documented text format (see `load`).

        The file is written atomically (`minillm.files.atomic_write`): a crash or a full disk leaves
        the old file or the new one, never part of either. An existing file is kept unless `overwrite`.
        """
        from minillm.files import atomic_write

        # The format stores merges, not ids: merge i must make token 256 + i, and nothing else may exist.
        if len(self.vocab) != 256 + len(self.merges) or any(
            self.vocab.get(256 + i) != a + b for i, (a, b) in enumerate(self.merges)
        ):
            raise TokenizerError("this tokenizer's ids do not follow its merges (merge i must make id 256 + i, and "
                                 "every token above 255 must come from a merge), so the minillm format cannot store it")
        lines = [FORMAT_HEADER, "#pattern " + json.dumps(self.pattern)]
        byte_ids = [self.ranks[bytes([b])] for b in range(256)]
        if byte_ids != list(range(256)):
            lines.append("#bytes " + " ".join(map(str, byte_ids)))
        for s, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1]):
            lines.append(f"#special {i} {json.dumps(s)}")
        lines.append(f"#merges {len(self.merges)}")
        lines += [f"{_to_text(a)} {_to_text(b)}" for a, b in self.merges]
        atomic_write(path, "\n".join(lines) + "\n", overwrite=overwrite)

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """Read a file written by `save`; anything malformed raises a TokenizerError naming the line.

        The format is UTF-8 text. Line 1 is ``#minillm-bpe v1``; then ``#pattern <JSON string>``;
        optionally ``#bytes <256 ids>`` (the ids of bytes 0..255, a permutation of 0..255, when they
        are not 0..255); one ``#special <id> <JSON string>`` line per special token; ``#merges
        <count>``; and one merge per line, ``left right``, each token written with GPT-2's printable
        byte alphabet (a space is 'Ġ', a newline 'Ċ'). Merge i makes the token with id 256 + i from
        two tokens that exist before it. The special tokens take the ids after the merges, without gaps.
        """
        path = Path(path)
        try:
            lines = [line.removesuffix("\r") for line in path.read_bytes().decode("utf-8").split("\n")]  # CRLF too
        except FileNotFoundError:
            raise TokenizerError(f"{path}: no such tokenizer file; check the path, or train one with 'minillm tokenizer train'") from None
        except IsADirectoryError:
            raise TokenizerError(f"{path}: is a folder; give the tokenizer file itself") from None
        except OSError as e:
            raise TokenizerError(f"{path}: cannot read the tokenizer file ({e.strerror}); check its permissions") from None
        except UnicodeDecodeError:
            raise TokenizerError(f"{path}: not a text file (expected UTF-8); is it a tokenizer saved by minillm?") from None

        def bad(n: int, what: str) -> TokenizerError:
            return TokenizerError(f"{path}:{n}: {what}")

        def number(text: str, n: int, what: str) -> int:
            # Only plain ASCII digits: int() would also take '-3', ' 3', '3_000' and other scripts' digits.
            if not (text.isascii() and text.isdigit()):
                raise bad(n, f"{what} must be a whole number written with the digits 0-9, found {text[:40]!r}")
            return int(text)

        if lines[0].strip() != FORMAT_HEADER:
            raise bad(1, f"expected the header {FORMAT_HEADER!r}, found {lines[0][:40]!r}; is it a tokenizer saved by minillm?")
        header: dict[str, int] = {}  # key -> line, to refuse a repeated line
        pattern, byte_ids, n_merges = None, list(range(256)), None
        specials: dict[str, tuple[int, int]] = {}  # token -> (id, line)
        n = 1
        for n, line in enumerate(lines[1:], start=2):
            key, _, rest = line.partition(" ")
            if key in header and key != "#special":
                raise bad(n, f"a second {key} line (the first is line {header[key]}); keep one")
            header.setdefault(key, n)
            if key == "#pattern":
                try:
                    pattern = json.loads(rest)
                except json.JSONDecodeError as e:
                    raise bad(n, f"malformed #pattern line ({e}); expected a JSON string") from None
                if not isinstance(pattern, str):
                    raise bad(n, f"malformed #pattern line: expected a JSON string (a regex in quotes), found {rest[:40]!r}")
            elif key == "#bytes":
                byte_ids = [number(x, n, "a byte id") for x in rest.split(" ")]
                if sorted(byte_ids) != list(range(256)):
                    raise bad(n, "malformed #bytes line: need the ids of the 256 bytes, a permutation of 0..255")
            elif key == "#special":
                i, _, token_json = rest.partition(" ")
                i = number(i, n, "a special token's id")
                try:
                    token = json.loads(token_json)
                except json.JSONDecodeError as e:
                    raise bad(n, f"malformed #special line ({e}); expected '#special <id> <JSON string>'") from None
                if not isinstance(token, str) or not token:
                    raise bad(n, f"malformed #special line: the token must be a non-empty JSON string, found {token_json[:40]!r}")
                if token in specials:
                    raise bad(n, f"the special token {token!r} is listed twice (also on line {specials[token][1]}); keep one")
                specials[token] = (i, n)
            elif key == "#merges":
                n_merges = number(rest, n, "the number of merges")
                break
            else:
                raise bad(n, f"malformed {key or 'empty'} line: unknown line {line[:40]!r}; expected #pattern, #bytes, #special or #merges")
        if n_merges is None:
            raise bad(n, "the file ended before its '#merges' line: it is truncated")
        if pattern is None:
            raise bad(n, "no '#pattern' line before '#merges'; add '#pattern <JSON string>' after the header")

        vocab = {i: bytes([b]) for b, i in enumerate(byte_ids)}
        known = set(vocab.values())
        merges: list[tuple[bytes, bytes]] = []
        for n, line in enumerate(lines[n:], start=n + 1):
            if not line:
                continue
            parts = line.split(" ")
            if len(parts) != 2 or not all(parts):
                raise bad(n, f"expected a merge 'left right', found {line[:60]!r}")
            left, right = (_from_text(x, f"{path}:{n}") for x in parts)
            if left not in known or right not in known:
                raise bad(n, f"the merge {line[:60]!r} joins a token that no earlier line makes; the merges are out of order or damaged")
            if left + right in known:
                raise bad(n, f"the merge {line[:60]!r} makes a token that already exists; each merge must make a new token")
            known.add(left + right)
            vocab[256 + len(merges)] = left + right
            merges.append((left, right))
        if len(merges) != n_merges:
            fix = "the file is truncated" if len(merges) < n_merges else "fix the count or remove the extra lines"
            raise bad(len(lines), f"'#merges {n_merges}' announced, {len(merges)} found: {fix}")

        first, end = len(vocab), len(vocab) + len(specials)
        taken: dict[int, int] = {}
        for token, (i, n) in specials.items():
            if not first <= i < end:
                raise bad(n, f"the special token {token!r} has id {i}, but with {first} ordinary tokens the "
                             f"{len(specials)} special token(s) take the ids {first}..{end - 1} (no gaps); renumber it")
            if i in taken:
                raise bad(n, f"the id {i} is given to two special tokens (also on line {taken[i]}); renumber one")
            taken[i] = n
        try:
            return cls(vocab, merges, {t: i for t, (i, _) in specials.items()}, pattern)
        except TokenizerError as e:
            raise TokenizerError(f"{path}: {e}") from None

    @classmethod
    def from_gpt2_files(
        cls, encoder_json: str | os.PathLike[str], vocab_bpe: str | os.PathLike[str], pattern: str = GPT2_PATTERN
    ) -> Tokenizer:
        """Load GPT-2's format: ``encoder.json`` (token text -> id) and ``vocab.bpe`` (merges).

        Entries of encoder.json whose text is not a merge product or a single byte, like
        ``<|endoftext|>``, become special tokens.
        """
        try:
            encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise TokenizerError(f"{encoder_json}: not a readable encoder.json ({e})") from None
        if not isinstance(encoder, dict):
            raise TokenizerError(f"{encoder_json}: expected a JSON object mapping token text to id")
        lines = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")
        merges = []
        for n, line in enumerate(lines, start=1):
            if not line or (n == 1 and line.startswith("#version")):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise TokenizerError(f"{vocab_bpe}:{n}: expected a merge 'left right', found {line[:60]!r}")
            merges.append((_from_text(parts[0], f"{vocab_bpe}:{n}"), _from_text(parts[1], f"{vocab_bpe}:{n}")))
        products = {a + b for a, b in merges}
        vocab, specials = {}, {}
        for text, i in encoder.items():
            token = _from_text(text, str(encoder_json)) if all(c in _alphabet() for c in text) else None
            if token is not None and (len(token) == 1 or token in products):
                vocab[i] = token
            else:
                specials[text] = i
        return cls(vocab, merges, specials, pattern)


class StreamDecoder:
    """Decodes ids as they come, holding back the bytes of a character that is not complete yet.

    A token can end inside a multi-byte character (one byte of '日', say), so decoding tokens one by
    one garbles non-ASCII text; the pieces this returns join to exactly ``tokenizer.decode(ids)``::

        dec = tok.decoder()
        for i in ids:
            print(dec.decode(i), end="", flush=True)
        print(dec.flush())
    """

    def __init__(self, tokenizer: Tokenizer, errors: str = "replace") -> None:
        self.tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=errors)

    def decode(self, ids: int | Iterable[int]) -> str:
        """The text that `ids` (one id, or several) complete; bytes of an unfinished character wait."""
        if hasattr(ids, "tolist"):  # a tensor or array, possibly of one id
            ids = ids.tolist()
        data = self.tokenizer.decode_bytes([ids] if isinstance(ids, numbers.Integral) else ids)
        try:
            return self._utf8.decode(data)
        except UnicodeDecodeError as e:
            raise _not_utf8(e) from None

    def flush(self) -> str:
        """The end of the stream: bytes still held back become U+FFFD (or raise, with errors='strict')."""
        try:
            return self._utf8.decode(b"", final=True)
        except UnicodeDecodeError as e:
            raise _not_utf8(e) from None


def _not_utf8(e: UnicodeDecodeError) -> TokenizerError:
    return TokenizerError(f"the ids decode to bytes that are not valid UTF-8 ({e.reason} at byte {e.start}); use errors='replace'")


@lru_cache(maxsize=1)
def _without_surrogates(text: str) -> str:
    """Lone surrogates (not encodable as UTF-8) become U+FFFD, exactly as tiktoken treats them."""
    try:
        text.encode("utf-8")
        return text
    except UnicodeEncodeError:
        return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def _alphabet() -> frozenset[str]:
    return frozenset(bytes_to_unicode().values())


def _stream_cuts(buf: str) -> Iterator[int]:
    """The positions in `buf` just after a lone newline (a non-space character on each side), last first.

    No pre-token of either built-in pattern spans such a place, and the newline is a pre-token of its
    own (or ends one) whether or not text follows: a whitespace run at the end of a block would
    otherwise match GPT-2's end-of-text rule differently.
    """
    i = len(buf) - 1
    while True:
        i = buf.rfind("\n", 0, i)
        if i <= 0:
            return
        if i + 1 < len(buf) and not buf[i + 1].isspace() and not buf[i - 1].isspace():
            yield i + 1
