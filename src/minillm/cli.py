"""The `minillm` command. Each chapter that finishes a tool adds a subcommand here."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from minillm.corpus import CorpusError, load_corpus


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
    if args.manifest:
        corpus.write_manifest(args.manifest)
        print(f"manifest    {args.manifest}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minillm", description="Build, train and use a small LLM.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("corpus", help="summarize a corpus: files, bytes, documents, split sizes")
    _add_data_args(p)
    p.add_argument("--manifest", help="also write the manifest (name, size, sha256, split) to this TSV file")
    p.set_defaults(func=_cmd_corpus)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except CorpusError as e:
        print(f"minillm {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
