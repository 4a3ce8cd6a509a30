"""The `minillm` command. Each chapter that finishes a tool adds a subcommand here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from minillm.corpus import CorpusError, load_corpus
from minillm.tokenizer import PATTERNS, Tokenizer, TokenizerError, train_bpe


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="stdlib", help="'stdlib' (default), a file, directory or glob, or hf:NAME")
    p.add_argument("--text-field", default="text", help="field/column holding the text in JSONL, Parquet or HF data")
    p.add_argument("--errors", default="strict", choices=["strict", "replace", "ignore"], help="how to treat bytes that are not UTF-8")
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents held out for validation")


def _cmd_corpus(args: argparse.Namespace) -> int:
    corpus = load_corpus(args.data, text_field=args.text_field, errors=args.errors, val_fraction=args.val_fraction, progress=None)
    s = corpus.summary()
    print(f"corpus      {s['name']}")
    print(f"documents   {s['documents']:,}")
    print(f"bytes       {s['bytes']:,}")
    print(f"train       {s['train_documents']:,} documents, {s['train_bytes']:,} bytes")
    print(f"val         {s['val_documents']:,} documents, {s['val_bytes']:,} bytes")
    print(f"fingerprint {corpus.fingerprint()[:16]}")
    for split in ("train", "val"):
        if not s[f"{split}_documents"]:
            print(f"note: the {split} split is empty; the split is by whole document, so give more than one "
                  "document (split a single large file into several) or change --val-fraction")
    if args.manifest:
        corpus.write_manifest(args.manifest)
        print(f"manifest    {args.manifest}")
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    import time

    corpus = load_corpus(args.data, text_field=args.text_field, errors=args.errors, val_fraction=args.val_fraction)
    pattern = PATTERNS.get(args.pattern, args.pattern)
    start = time.perf_counter()
    tok = train_bpe(corpus.split("train"), args.vocab_size, special_tokens=args.special or ["<|endoftext|>"],
                    pattern=pattern, num_proc=args.num_proc, progress=True)
    tok.save(args.out)
    print(f"trained {tok!r} on {corpus.name} (train split) in {time.perf_counter() - start:.1f} s; wrote {args.out}")
    return 0


def _cmd_tokenizer_encode(args: argparse.Namespace) -> int:
    tok = Tokenizer.load(args.tokenizer)
    if args.file:
        with open(args.file, encoding="utf-8", newline="") as f:  # keep \r\n as it is in the file
            ids = list(tok.encode_iterable(f, allowed_special="all" if args.allow_special else ()))
    else:
        ids = tok.encode(args.text if args.text is not None else sys.stdin.read(), allowed_special="all" if args.allow_special else ())
    if args.count:
        print(len(ids))
    else:
        print(" ".join(map(str, ids)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillm", description="Build, train and use a small LLM.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("corpus", help="summarize a corpus: files, bytes, documents, split sizes")
    _add_data_args(p)
    p.add_argument("--manifest", help="also write the manifest (name, size, sha256, split) to this TSV file")
    p.set_defaults(func=_cmd_corpus)

    tp = sub.add_parser("tokenizer", help="train or apply a byte-level BPE tokenizer")
    tsub = tp.add_subparsers(dest="action", required=True)
    p = tsub.add_parser("train", help="train a tokenizer on the train split of a corpus")
    _add_data_args(p)
    p.add_argument("--vocab-size", type=int, required=True, help="bytes + merges + special tokens")
    p.add_argument("--pattern", default="gpt4", help="'gpt4' (default), 'gpt2', or a regex")
    p.add_argument("--special", action="append", help="a special token (repeat); default <|endoftext|>")
    p.add_argument("--num-proc", type=int, default=None, help="processes for pre-tokenization (default: all cores)")
    p.add_argument("--out", required=True, help="file to write (minillm's text format)")
    p.set_defaults(func=_cmd_tokenizer_train)
    p = tsub.add_parser("encode", help="print the token ids of a text, a file, or standard input")
    p.add_argument("--tokenizer", required=True, help="a file written by 'minillm tokenizer train'")
    p.add_argument("--text", help="the text to encode (default: standard input)")
    p.add_argument("--file", help="a UTF-8 file to encode, streamed")
    p.add_argument("--allow-special", action="store_true", help="encode special-token strings as special tokens")
    p.add_argument("--count", action="store_true", help="print only the number of tokens")
    p.set_defaults(func=_cmd_tokenizer_encode)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (CorpusError, TokenizerError, OSError) as e:
        print(f"minillm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
