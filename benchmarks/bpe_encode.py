"""Encoding throughput (MB/s) on the whole built-in corpus: our `encode` (tiktoken fast path), raw
tiktoken with the same ranks, Hugging Face `tokenizers` with the same vocabulary and merges, and
our pure-Python path. Needs `pip install -e ".[bench]"`.

    .venv/bin/python benchmarks/bpe_encode.py
"""

from __future__ import annotations

from _common import best_of, machine

from minillm.corpus import stdlib_corpus
from minillm.tokenizer import GPT2_PATTERN, bytes_to_unicode, train_bpe


def hf_from(tok):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    table = bytes_to_unicode()
    text = lambda b: "".join(table[x] for x in b)  # noqa: E731
    vocab = {text(b): i for i, b in tok.vocab.items()}
    merges = [(text(a), text(b)) for a, b in tok.merges]
    hf = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    return hf


def main() -> None:
    corpus = stdlib_corpus()
    docs = [d.text for d in corpus.documents]
    text = "\n".join(docs)
    mb = len(text.encode("utf-8")) / 1e6
    print(f"machine: {machine()}")
    tok = train_bpe(docs, 8192, special_tokens=(), pattern=GPT2_PATTERN)  # GPT-2's pattern, as HF's ByteLevel
    enc, hf = tok.to_tiktoken(), hf_from(tok)
    tok.encode("warm up")  # build the fast path outside the timing

    t_ours, ours = best_of(lambda: tok.encode(text))
    t_tik, raw = best_of(lambda: enc.encode_ordinary(text))
    t_hf, hf_ids = best_of(lambda: hf.encode(text).ids)
    t_py, py = best_of(lambda: tok.encode_python(text), repeat=1)
    assert ours == raw == py, "the encoders disagree"
    agree = sum(a == b for a, b in zip(hf_ids, ours)) / max(len(ours), 1)
    print(f"{mb:.1f} MB, {len(ours):,} tokens ({mb * 1e6 / len(ours):.2f} bytes per token), vocab 8192")
    print(f"  minillm encode   {mb / t_ours:7.1f} MB/s   ({t_tik / t_ours:.2f}x raw tiktoken; target >= 0.9x)")
    print(f"  raw tiktoken     {mb / t_tik:7.1f} MB/s")
    print(f"  HF tokenizers    {mb / t_hf:7.1f} MB/s   (ids agree with ours at {agree:.1%} of positions)")
    print(f"  minillm Python   {mb / t_py:7.1f} MB/s   (same ids as tiktoken)")


if __name__ == "__main__":
    main()
