"""Wall time of BPE training: our fast trainer, Hugging Face `tokenizers`, and the naive trainer.

(a) 1 MB of the built-in corpus at vocab 1024, all three; (b) the whole corpus at vocab 8192,
fast and HF. All use the GPT-2 pre-tokenization pattern, the one HF's ByteLevel pre-tokenizer
applies, and both parallel trainers use every core. Needs `pip install -e ".[bench]"`.

    .venv/bin/python benchmarks/bpe_train.py [--skip-naive]
"""

from __future__ import annotations

import argparse

from _common import best_of, machine

from minillm.corpus import EOT, stdlib_corpus
from minillm.tokenizer import GPT2_PATTERN, train_bpe, train_bpe_naive


def train_hf(docs: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOT], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(docs, trainer=trainer)
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--skip-naive", action="store_true", help="leave out the (slow) naive trainer")
    args = ap.parse_args()
    corpus = stdlib_corpus()
    docs = [d.text for d in corpus.documents]
    print(f"machine: {machine()}")

    one_mb, size = [], 0
    for d in docs:
        if size >= 1_000_000:
            break
        one_mb.append(d[: 1_000_000 - size])
        size += len(one_mb[-1])
    print(f"\n(a) {size / 1e6:.1f} MB at vocab 1024")
    t_fast, fast = best_of(lambda: train_bpe(one_mb, 1024, pattern=GPT2_PATTERN))
    t_hf, _ = best_of(lambda: train_hf(one_mb, 1024))
    print(f"  minillm fast  {t_fast:7.2f} s")
    print(f"  HF tokenizers {t_hf:7.2f} s   (fast / HF = {t_fast / t_hf:.2f}x)")
    if not args.skip_naive:
        t_naive, naive = best_of(lambda: train_bpe_naive(one_mb, 1024, pattern=GPT2_PATTERN), repeat=1)
        assert naive.merges == fast.merges, "the trainers disagree"
        print(f"  minillm naive {t_naive:7.2f} s   (naive / fast = {t_naive / t_fast:.0f}x faster; same merges)")

    print(f"\n(b) the whole corpus, {sum(map(len, docs)) / 1e6:.1f} M characters, at vocab 8192")
    t_fast, _ = best_of(lambda: train_bpe(docs, 8192, pattern=GPT2_PATTERN), repeat=2)
    t_hf, _ = best_of(lambda: train_hf(docs, 8192), repeat=2)
    print(f"  minillm fast  {t_fast:7.2f} s")
    print(f"  HF tokenizers {t_hf:7.2f} s   (fast / HF = {t_fast / t_hf:.2f}x; target <= 2x)")


if __name__ == "__main__":
    main()
