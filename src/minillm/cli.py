"""The `minillm` command. Each chapter that finishes a tool adds a subcommand here.

The rules, for every subcommand:

* A mistake in the input (a bad argument, a missing or malformed file, text that is not UTF-8, an
  output that would overwrite an input or an existing file) exits with status 2 and ONE line on
  stderr that names the problem and the fix.
* Anything else is a bug: status 1, one line, and the traceback only with ``--debug``.
* Ctrl-C exits with status 130, quietly, and leaves no partial output behind: every file is written
  through `minillm.files`, and outputs are checked before any long work starts.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import errno
import sys
import time
import traceback
import warnings
from collections.abc import Iterator, Sequence

from minillm.corpus import CorpusError, check_output_path, input_paths, load_corpus
from minillm.files import OutputError
from minillm.tokenizer import PATTERNS, Tokenizer, TokenizerError, train_bpe


class CommandError(Exception):
    """A user error found by the command itself (bad bytes on the command line or in a file)."""


# Errors that are the user's to fix: exit 2 with one line. Every other exception is a bug.
USER_ERRORS = (CommandError, CorpusError, TokenizerError, OutputError, OSError)

# What to do about the common operating-system errors.
_OS_FIXES = {
    errno.ENOENT: "check the path",
    errno.ENOTDIR: "check the path",
    errno.EISDIR: "give a file, not a folder",
    errno.EACCES: "check the permissions",
    errno.EPERM: "check the permissions",
    errno.ENOSPC: "free some disk space and run again",
    errno.EROFS: "write somewhere else",
}


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (argparse prints the usage block, then the error)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}; see '{self.prog} --help'\n")


def _describe(e: BaseException) -> str:
    """The message of a user error, on one line."""
    if isinstance(e, OSError) and e.strerror:
        where = f"{e.filename}: " if e.filename else ""
        fix = _OS_FIXES.get(e.errno or 0)
        return f"{where}{e.strerror.lower()}" + (f"; {fix}" if fix else "")
    return " ".join(str(e).split())


def _not_utf8(where: str, data: bytes, at: int) -> CommandError:
    return CommandError(f"{where} is not valid UTF-8 (byte {at}: {data[:4]!r}); convert it to UTF-8 "
                        "(iconv -t UTF-8, or save it as UTF-8 in your editor)")


def _read_stdin() -> str:
    """Standard input as text, decoded strictly: bad bytes are an error, not silent U+FFFD."""
    stream = getattr(sys.stdin, "buffer", sys.stdin)
    data = stream.read()
    if isinstance(data, str):  # a text stream without bytes underneath (as in some test harnesses)
        return data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8("standard input", data[e.start:], e.start) from None


def _read_utf8(path: str, block: int = 1 << 16) -> Iterator[str]:
    """A file's text in pieces, decoded strictly; an error names the byte offset in the whole file.

    Read as bytes, so that line endings stay as they are (\\r\\n is encoded as it is in the file).
    """
    utf8 = codecs.getincrementaldecoder("utf-8")("strict")
    done = 0  # bytes of the file handed to the decoder so far
    with open(path, "rb") as f:
        while True:
            data = f.read(block)
            held = utf8.getstate()[0]  # bytes of an unfinished character from the last block
            try:
                yield utf8.decode(data, final=not data)
            except UnicodeDecodeError as e:
                raise _not_utf8(path, (held + data)[e.start:], done - len(held) + e.start) from None
            if not data:
                return
            done += len(data)


def _non_utf8_argument(argv: Sequence[str]) -> str | None:
    """The error for the first argument that holds bytes that are not UTF-8, or None.

    Python decodes such bytes as lone surrogates (surrogateescape) instead of failing; text or a
    file name read that way would be encoded as U+FFFD, or name another file.
    """
    for n, arg in enumerate(argv, start=1):
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            try:
                raw = arg.encode("utf-8", "surrogateescape")  # the bytes as they were given
            except UnicodeEncodeError:
                raw = arg.encode("utf-8", "backslashreplace")  # a surrogate that did not come from bytes
            return (f"minillm: error: argument {n} ({raw!r}) is not valid UTF-8; give text and file names in UTF-8 "
                    "(set a UTF-8 locale, or rename the file)")
    return None


# --------------------------------------------------------------------------------------------
# Subcommands


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", default="stdlib", help="'stdlib' (default), a file, directory or glob, or hf:NAME")
    p.add_argument("--text-field", default="text", help="field/column holding the text in JSONL, Parquet or HF data")
    p.add_argument("--errors", default="strict", choices=["strict", "replace", "ignore"], help="how to treat bytes that are not UTF-8")
    p.add_argument("--val-fraction", type=float, default=0.05, help="fraction of documents held out for validation")


def _cmd_corpus(args: argparse.Namespace) -> int:
    inputs = input_paths(args.data)
    if args.manifest is not None:  # checked before the corpus is read: fail fast
        check_output_path(args.manifest, inputs, overwrite=args.force, what="manifest")
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
    if args.manifest is not None:
        corpus.write_manifest(args.manifest, overwrite=args.force)
        print(f"manifest    {args.manifest}")
    return 0


def _cmd_tokenizer_train(args: argparse.Namespace) -> int:
    # The output is checked before the corpus is read and the tokenizer trained, not minutes later.
    check_output_path(args.out, input_paths(args.data), overwrite=args.force, what="tokenizer file")
    corpus = load_corpus(args.data, text_field=args.text_field, errors=args.errors, val_fraction=args.val_fraction)
    pattern = PATTERNS.get(args.pattern, args.pattern)
    start = time.perf_counter()
    tok = train_bpe(corpus.split("train"), args.vocab_size, special_tokens=args.special or ["<|endoftext|>"],
                    pattern=pattern, num_proc=args.num_proc, progress=True)
    tok.save(args.out, overwrite=args.force)
    print(f"trained {tok!r} on {corpus.name} (train split) in {time.perf_counter() - start:.1f} s; wrote {args.out}")
    return 0


def _cmd_tokenizer_encode(args: argparse.Namespace) -> int:
    tok = Tokenizer.load(args.tokenizer)
    allowed = "all" if args.allow_special else ()
    if args.file is not None:
        ids = tok.encode_iterable(_read_utf8(args.file), allowed_special=allowed)
    else:
        ids = iter(tok.encode(args.text if args.text is not None else _read_stdin(), allowed_special=allowed))
    if args.count:
        print(sum(1 for _ in ids))
    else:
        # All ids first: an error half-way through (bad bytes in the file) must not leave half an output.
        print(" ".join(map(str, list(ids))))
    return 0


def _cmd_prepare(args: argparse.Namespace) -> int:
    from minillm.data import DataError, TokenShard, prepare  # imported here: it brings torch, which other commands skip

    tok = Tokenizer.load(args.tokenizer)
    try:
        paths = prepare(args.data, tok, args.out, val_fraction=args.val_fraction, num_proc=args.num_proc, progress=None,
                        overwrite=args.force, text_field=args.text_field, errors=args.errors)
        for split, path in paths.items():
            shard = TokenShard.open(path)
            n, size = len(shard), shard.num_bytes
            print(f"{split:<5} {n:>12,} tokens {size:>12,} bytes  {size / n:.2f} bytes/token  "
                  f"{shard.header['documents']:,} documents  -> {path}")
    except DataError as e:  # a user error, like the others this command reports with exit status 2
        raise CommandError(str(e)) from None
    return 0


def _cmd_chat(args: argparse.Namespace) -> int:
    from minillm.chat import ChatSession, load_chat, repl

    # The checkpoint and the settings are checked before the first question: a ValueError here
    # (a checkpoint that is not fine-tuned, a bad temperature) is the user's to fix.
    try:
        model, template = load_chat(args.checkpoint)
        session = ChatSession(model, template, system=args.system, temperature=args.temperature, top_p=args.top_p,
                              max_new_tokens=args.max_new_tokens, seed=args.seed)
    except ValueError as e:
        raise CommandError(_describe(e)) from None
    return repl(session)


def _cmd_eval(args: argparse.Namespace) -> int:
    import json

    from minillm.codeeval import answer_requests, held_out, load_for_eval, score_answers
    from minillm.files import atomic_write
    from minillm.instructions import DataError

    reports = {}
    cache: dict[str, bool | None] = {}  # the references' doctest results, shared by the checkpoints
    for checkpoint in args.checkpoint:
        try:
            model, template, settings = load_for_eval(checkpoint)
            data = args.data or str(settings.get("data", "stdlib"))
            requests = held_out(data, args.split, float(settings.get("val_fraction", 0.05)),
                                float(settings.get("test_fraction", 0.05)))
            if args.functions_only:
                requests = [c for c in requests if not c.meta.get("class")]
            if args.limit:
                requests = requests[: args.limit]
            if len(args.checkpoint) > 1:
                print(f"=== {checkpoint}")
            if settings["pretrained"]:
                print("a pretrained checkpoint: the chat tokens are new to it (their rows start at the mean of the others)")
            print(f"answering {len(requests):,} held-out requests ({args.split} split of {data}), greedy, "
                  f"at most {args.max_new_tokens} tokens each")
            answers = answer_requests(model, template, requests, max_new_tokens=args.max_new_tokens,
                                      batch_size=args.batch_size)
            report = score_answers(requests, answers, workers=args.workers, timeout=args.timeout, reference_cache=cache)
        except (ValueError, DataError, OSError) as e:
            raise CommandError(_describe(e)) from None
        shown = [a for a in report.attempts if not a.method][: args.show]
        for a in shown:
            verdict = ("parses" if a.score.parses else "does not parse") + (", compiles" if a.score.compiles else "")
            if a.reference_passes:
                verdict += f", {a.score.doctests_passed}/{a.score.doctests} doctests"
            print(f"--- {a.source}: {a.request.splitlines()[0][:80]}\n{a.answer.rstrip()}\n    [{verdict}]")
        print(report.table())
        reports[checkpoint] = report
    if len(reports) > 1:  # the stages side by side: what each step of the pipeline changed
        width = max(len(c) for c in reports) + 2
        print(f"\nheld-out function requests, {args.split} split")
        print(f"{'checkpoint':{width}}{'asked':>7}{'parses':>9}{'compiles':>10}{'doctests pass':>15}")
        for checkpoint, report in reports.items():
            f = report.functions

            def pct(what: str, f=f) -> str:  # noqa: ANN001
                v = f.rate(what)
                return "-" if v is None else f"{100 * v:.1f}%"

            print(f"{checkpoint:{width}}{f.n:>7}{pct('parses'):>9}{pct('compiles'):>10}{pct('passes'):>8} of {f.passable}")
    if args.json:
        out = (next(iter(reports.values())).to_dict() if len(reports) == 1
               else {c: r.to_dict() for c, r in reports.items()})
        atomic_write(args.json, (json.dumps(out, indent=2) + "\n").encode())
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch  # imported here, as the model code: the text commands start without torch

    from minillm.generate import stream_text

    if (args.hf is None) != (args.tokenizer is None):
        raise CommandError("--hf FOLDER needs --tokenizer FILE (and --tokenizer goes with --hf: a checkpoint holds its own)")
    # Everything is loaded and checked before the first token: a ValueError up to there is a bad
    # checkpoint or a bad setting, the user's to fix (the library's messages name the fix).
    try:
        if args.hf is not None:
            from minillm.hf import load_hf

            model, tok = load_hf(args.hf), Tokenizer.load(args.tokenizer)
        else:
            from minillm.train import load_for_inference

            model, tok = load_for_inference(args.checkpoint)
        if tok.vocab_size > model.cfg.vocab_size:
            raise CommandError(f"the tokenizer has {tok.vocab_size} tokens but the model's vocabulary has {model.cfg.vocab_size}; "
                               "give the tokenizer the model was trained with")
        generator = None if args.seed is None else torch.Generator().manual_seed(args.seed)
        n = args.max_new_tokens
        if n is None:  # 200, or fewer if the context ends sooner (a prompt of T tokens and n new ones take T + n - 1)
            n = max(1, min(200, model.cfg.max_seq_len - len(tok.encode(args.prompt, allowed_special="all")) + 1))
        pieces = stream_text(model, tok, args.prompt, max_new_tokens=n, temperature=args.temperature,
                             top_k=args.top_k, top_p=args.top_p, min_p=args.min_p, repetition_penalty=args.repetition_penalty,
                             eos_id=tok.special_tokens.get("<|endoftext|>"), generator=generator)
    except ValueError as e:
        raise CommandError(_describe(e)) from None
    if args.prompt.endswith((" ", "\t")):
        # Tokens carry a word's leading space (" name"), so a prompt that ends in a lone space
        # gives the model a token it rarely saw before a word, and the continuation suffers.
        print("note: the prompt ends with a space; the model usually continues better without it", file=sys.stderr)
    sys.stdout.write(args.prompt)
    for piece in pieces:  # as they come: a reader sees the model write
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _run_config(load, config: str | None, overrides: list[str], resume: bool):  # noqa: ANN001, ANN202
    """The config of a training command: `config` with `overrides`, or, with --resume, the run's own
    config.toml (in the folder that `out` names) with the same overrides on top."""
    from pathlib import Path

    cfg = load(config, overrides)
    if resume:
        saved = Path(cfg.out) / "config.toml"
        if not saved.is_file():
            raise CommandError(f"{cfg.out}: nothing to resume (no config.toml); start the run without --resume, "
                               "or give the run's folder with --set out=RUN")
        cfg = load(saved, overrides)
    return cfg


def _train_errors():
    """The training errors that are the user's to fix (imported late: they bring torch)."""
    from minillm.data import DataError
    from minillm.model import ConfigError
    from minillm.train import TrainError

    return (TrainError, DataError, ConfigError)


def _cmd_train(args: argparse.Namespace) -> int:
    from minillm.train import load_config, train

    # --strategy NAME is --set strategy=NAME, applied after the --set overrides (it is the more specific).
    overrides = [*(args.set or ()), *([f"strategy={args.strategy}"] if args.strategy else [])]
    try:
        cfg = _run_config(load_config, args.config, overrides, args.resume)
        result = train(cfg, resume=args.resume, force=args.force)
    except _train_errors() as e:
        raise CommandError(_describe(e)) from None
    if not _is_main_process():  # under torchrun, rank 0 alone reports
        return 0
    minutes, seconds = divmod(round(result.seconds), 60)
    mfu = f", MFU {result.mfu:.0%}" if result.mfu is not None else ""
    print(f"trained {result.run}: {result.step} steps in {minutes}m{seconds:02d}s ({result.tokens_per_s:,.0f} tokens/s{mfu})")
    print(f"validation  loss {result.val_loss:.4f} nats/token = {result.val_bpb:.3f} bits per byte")
    names = {"lzma": "xz"}  # the compressor behind Python's lzma module is xz
    print("same text   " + "  ".join(f"{names.get(k, k)} {v:.3f}" for k, v in result.compressors.items()) + " bits per byte")
    for i, text in enumerate(result.samples, start=1):
        print(f"--- sample {i} of {len(result.samples)} (temperature 0.8, top-k 50) ---\n{text}")
    print(f"run folder  {result.run} (minillm plot {result.run}; minillm sample --checkpoint {result.run} --prompt ...)")
    return 0


def _cmd_sft(args: argparse.Namespace) -> int:
    from minillm.lora import LoRAError
    from minillm.sft import finetune, load_sft_config

    # The options are --set base=..., data=..., lora_rank=..., applied after --set (they are the more specific).
    flags = {"base": args.base, "data": args.data, "lora_rank": args.lora_rank}
    overrides = [*(args.set or ()), *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    try:
        cfg = _run_config(load_sft_config, args.config, overrides, args.resume)
        result = finetune(cfg, resume=args.resume, force=args.force)
    except (*_train_errors(), LoRAError) as e:
        raise CommandError(_describe(e)) from None
    minutes, seconds = divmod(round(result.seconds), 60)
    what = f"LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "every weight"
    print(f"fine-tuned {result.run}: {result.step} steps ({result.epochs:.2f} epochs) in {minutes}m{seconds:02d}s, "
          f"{what}: {result.trainable:,} of {result.total:,} parameters trained ({result.tokens_per_s:,.0f} tokens/s)")
    for split, c in result.fit.items():
        print(f"{split:<5} {c['kept']:,} examples kept, {c['truncated']:,} with the prompt truncated, "
              f"{c['dropped_too_long']:,} dropped as too long (too_long={cfg.too_long}), {c['no_target']:,} with no answer")
    if result.val_loss is not None:
        print(f"validation  loss {result.val_loss:.4f} nats per answer token (the prompt is masked out)")
    for request, reply in result.samples:
        print(f"--- {request.splitlines()[0][:100]}\n{reply}")
    print(f"run folder  {result.run} (minillm sample --checkpoint {result.run} --prompt ...)")
    return 0


def _cmd_dpo_pairs(args: argparse.Namespace) -> int:
    import random
    from pathlib import Path

    from tqdm import tqdm

    from minillm.codeeval import load_for_eval, sft_settings
    from minillm.dpo import DPOError, generate_pairs, save_pairs
    from minillm.files import check_output
    from minillm.instructions import DataError, load_jsonl, split_pairs, stdlib_pairs

    try:
        check_output(args.out, overwrite=args.force, what="pairs file")  # before minutes of sampling
        model, template, settings = load_for_eval(args.base)
        if settings["pretrained"]:
            raise CommandError(f"{args.base} is a pretrained model: preference pairs are answers of a fine-tuned one; "
                               f"run minillm sft --from {args.base} first and give its run")
        settings = sft_settings(Path(args.base))
        data = args.data or str(settings.get("data", "stdlib"))
        pairs = stdlib_pairs() if data == "stdlib" else load_jsonl(data)
        requests = split_pairs(pairs, float(settings.get("val_fraction", 0.05)),
                               float(settings.get("test_fraction", 0.05)))["train"]
        random.Random(args.seed).shuffle(requests)  # a limit then takes a spread of modules
        if args.limit:
            requests = requests[: args.limit]
        print(f"sampling {args.samples} answers to each of {len(requests):,} training requests of {data} "
              f"(temperature {args.temperature}, at most {args.max_new_tokens} tokens)")
        with tqdm(total=len(requests) * args.samples, desc="answers", unit="answer", disable=not sys.stderr.isatty(),
                  dynamic_ncols=True) as bar:
            report = generate_pairs(model, template, requests, samples=args.samples, temperature=args.temperature,
                                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, seed=args.seed,
                                    workers=args.workers, timeout=args.timeout,
                                    progress=lambda done: bar.update(done - bar.n))
        if not report.pairs:
            raise CommandError("no pair: every request's answers share one grade (or none fits the context); sample "
                               "more answers (--samples) or raise --temperature")
        save_pairs(args.out, report.pairs, overwrite=args.force)
    except (DPOError, DataError, ValueError, OSError) as e:
        raise CommandError(_describe(e)) from None
    print(report.table())
    print(f"wrote {len(report.pairs):,} pairs to {args.out} (minillm dpo --from {args.base} --pairs {args.out})")
    return 0


def _cmd_dpo(args: argparse.Namespace) -> int:
    from minillm.dpo import load_dpo_config, preference_tune
    from minillm.lora import LoRAError

    flags = {"base": args.base, "pairs": args.pairs, "reference": args.reference, "lora_rank": args.lora_rank,
             "beta": args.beta}
    overrides = [*(args.set or ()), *(f"{k}={v}" for k, v in flags.items() if v is not None)]
    try:
        cfg = _run_config(load_dpo_config, args.config, overrides, args.resume)
        result = preference_tune(cfg, resume=args.resume, force=args.force)
    except (*_train_errors(), LoRAError) as e:
        raise CommandError(_describe(e)) from None
    minutes, seconds = divmod(round(result.seconds), 60)
    what = f"LoRA rank {cfg.lora_rank}" if cfg.lora_rank else "every weight"
    n = result.pairs
    print(f"preference-tuned {result.run}: {result.step} steps ({result.epochs:.2f} epochs) in {minutes}m{seconds:02d}s, "
          f"{what}, beta {cfg.beta:g}")
    print(f"pairs  {n['kept']:,} kept ({n['train']:,} train, {n['val']:,} held out), {n['prompt_too_long']:,} with a "
          f"prompt too long, {n['response_too_long']:,} with a response too long")
    for name, m in (("train", result.train), ("held out", result.val)):
        if m:
            print(f"{name:<9} loss {m['loss']:.3f}  accuracy {m['accuracy']:.1%}  reward margin {m['margin']:+.3f} "
                  f"(chosen {m['reward_chosen']:+.3f}, rejected {m['reward_rejected']:+.3f})")
    if result.kl is not None:
        print(f"KL from the reference  {result.kl:.3f} nats per answer ({result.kl_per_token:.4f} per token), "
              "on held-out requests")
    print(f"run folder  {result.run} (minillm eval --checkpoint {result.run})")
    return 0


def _is_main_process() -> bool:
    dist = sys.modules.get("torch.distributed")
    return not (dist is not None and dist.is_available() and dist.is_initialized() and dist.get_rank() != 0)


def _exit_distributed(status: int) -> None:
    """Under torchrun, end a training process that joined a process group with `status` now: leave
    the group and os._exit (minillm.distributed.exit_worker), because gloo can abort at interpreter
    exit after all the work is done, which torchrun would report as a failed run. No-op otherwise."""
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        from minillm.distributed import exit_worker

        exit_worker(status)


def _cmd_plot(args: argparse.Namespace) -> int:
    from minillm.train import TrainError, plot_run

    try:
        path = plot_run(args.run, args.out)
    except TrainError as e:
        raise CommandError(_describe(e)) from None
    print(f"wrote {path}")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from minillm.plan import PlanError, format_plan, plan, plan_from_config  # brings torch (meta device only)

    options = dict(gpu_memory=args.gpu_memory, peak_flops=args.peak_flops, layout=args.layout, dtype=args.dtype,
                   mfu=args.mfu, tokens_per_param=args.tokens_per_param)
    try:
        if args.config is not None:
            p = plan_from_config(args.config, args.gpus, seq_len=args.seq_len, batch_size=args.batch, **options)
        else:
            p = plan(args.model, args.gpus, seq_len=args.seq_len,
                     batch_size=1 if args.batch is None else args.batch, **options)
    except PlanError as e:
        raise CommandError(_describe(e)) from None
    print(format_plan(p))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="minillm", description="Build, train and use a small LLM.")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an unexpected error")
    # Also accepted after the subcommand; SUPPRESS keeps a subcommand from resetting the global value.
    common = _Parser(add_help=False)
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("corpus", parents=[common], help="summarize a corpus: files, bytes, documents, split sizes")
    _add_data_args(p)
    p.add_argument("--manifest", help="also write the manifest (name, size, sha256, split) to this TSV file")
    p.add_argument("--force", action="store_true", help="replace an existing manifest")
    p.set_defaults(func=_cmd_corpus)

    tp = sub.add_parser("tokenizer", parents=[common], help="train or apply a byte-level BPE tokenizer")
    tsub = tp.add_subparsers(dest="action", required=True)
    p = tsub.add_parser("train", parents=[common], help="train a tokenizer on the train split of a corpus")
    _add_data_args(p)
    p.add_argument("--vocab-size", type=int, required=True, help="bytes + merges + special tokens")
    p.add_argument("--pattern", default="gpt4", help="'gpt4' (default), 'gpt2', or a regex")
    p.add_argument("--special", action="append", help="a special token (repeat); default <|endoftext|>")
    p.add_argument("--num-proc", type=int, default=None, help="processes for pre-tokenization (default and most: all cores)")
    p.add_argument("--out", required=True, help="file to write (minillm's text format)")
    p.add_argument("--force", action="store_true", help="replace an existing output file")
    p.set_defaults(func=_cmd_tokenizer_train)
    p = tsub.add_parser("encode", parents=[common], help="print the token ids of a text, a file, or standard input")
    p.add_argument("--tokenizer", required=True, help="a file written by 'minillm tokenizer train'")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--text", help="the text to encode (default: standard input)")
    source.add_argument("--file", help="a UTF-8 file to encode, streamed")
    p.add_argument("--allow-special", action="store_true", help="encode special-token strings as special tokens")
    p.add_argument("--count", action="store_true", help="print only the number of tokens")
    p.set_defaults(func=_cmd_tokenizer_encode)

    p = sub.add_parser("prepare", parents=[common], help="encode a corpus into token shards (train.bin, val.bin) for pretraining")
    p.add_argument("--tokenizer", required=True, help="a file written by 'minillm tokenizer train'")
    _add_data_args(p)
    p.add_argument("--out", required=True, help="folder for train.bin and val.bin (created if missing)")
    p.add_argument("--num-proc", type=int, default=None, help="processes that encode (default and most: all cores)")
    p.add_argument("--force", action="store_true", help="replace existing shards")
    p.set_defaults(func=_cmd_prepare)
    p = sub.add_parser("sample", parents=[common], help="continue a prompt with a trained model, streaming the text")
    model_source = p.add_mutually_exclusive_group(required=True)
    model_source.add_argument("--checkpoint", help="a run folder (its latest checkpoint) or a checkpoint folder of 'minillm train'")
    model_source.add_argument("--hf", help="a Hugging Face Llama folder (config.json, model.safetensors); needs --tokenizer")
    p.add_argument("--tokenizer", help="with --hf: a file written by 'minillm tokenizer train'")
    p.add_argument("--prompt", required=True, help="the text to continue ('<|endoftext|>' starts a fresh document)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="most tokens to add (default 200, or as many as the context holds); stops early at <|endoftext|>")
    p.add_argument("--temperature", type=float, default=1.0, help="0 is greedy; below 1 sharper, above 1 flatter (default 1)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=None, help="sample among the most likely tokens whose probability reaches p")
    p.add_argument("--min-p", type=float, default=None, help="drop tokens less likely than min-p times the most likely one")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="above 1 discourages tokens already seen (default 1: off)")
    p.add_argument("--seed", type=int, default=None, help="seed for the sampler, for the same text every run")
    p.set_defaults(func=_cmd_sample)
    p = sub.add_parser("train", parents=[common], help="pretrain a model (tokenizer and data included), with checkpoints")
    p.add_argument("--config", help="a TOML preset, e.g. configs/tiny.toml (default: TrainConfig's defaults)")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field (repeat): --set max_steps=200 --set model.d_model=128")
    p.add_argument("--resume", action="store_true", help="continue the run in its out folder from its latest checkpoint")
    p.add_argument("--force", action="store_true", help="replace an existing run folder")
    p.add_argument("--strategy", choices=("single", "ddp", "zero1", "zero2", "fsdp"),
                   help="same as --set strategy=NAME; all but single run under torchrun --nproc_per_node=N")
    p.set_defaults(func=_cmd_train)
    p = sub.add_parser("sft", parents=[common], help="fine-tune a pretrained model on instruction data (masked loss, "
                       "optional LoRA), with checkpoints")
    p.add_argument("--from", dest="base", metavar="PATH",
                   help="the run folder (its latest checkpoint) or checkpoint folder of 'minillm train' to start from")
    p.add_argument("--config", help="a TOML preset, e.g. configs/sft-tiny.toml (default: SFTConfig's defaults)")
    p.add_argument("--data", help="'stdlib' (the built-in docstring -> function pairs, the default) or a JSONL file")
    p.add_argument("--lora-rank", type=int, metavar="R", help="train rank-R LoRA adapters instead of every weight")
    p.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="override a config field (repeat): --set epochs=2 --set too_long=truncate")
    p.add_argument("--resume", action="store_true", help="continue the run in its out folder from its latest checkpoint")
    p.add_argument("--force", action="store_true", help="replace an existing run folder")
    p.set_defaults(func=_cmd_sft)
    p = sub.add_parser("dpo-pairs", parents=[common], help="preference pairs from a fine-tuned model's own answers, "
                       "graded by running them (parses, compiles, passes doctests)")
    p.add_argument("--from", dest="base", required=True, metavar="RUN",
                   help="the run folder or checkpoint of 'minillm sft' that answers (its training requests are asked)")
    p.add_argument("--out", required=True, help="the JSONL file of pairs to write")
    p.add_argument("--data", default=None, help="'stdlib' or a JSONL file (default: the SFT run's data)")
    p.add_argument("--samples", type=int, default=4, help="answers per request (default 4)")
    p.add_argument("--temperature", type=float, default=0.7, help="sampling temperature (default 0.7)")
    p.add_argument("--limit", type=int, default=0, help="ask only N requests, a seeded random spread (default: all)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="most tokens in an answer (default 128)")
    p.add_argument("--batch-size", type=int, default=64, help="answers generated together (default 64)")
    p.add_argument("--seed", type=int, default=0, help="seed of the request order and the sampler (default 0)")
    p.add_argument("--workers", type=int, default=2, help="sandboxed children at a time (default 2)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds for each answer's run (default 5)")
    p.add_argument("--force", action="store_true", help="replace an existing pairs file")
    p.set_defaults(func=_cmd_dpo_pairs)
    p = sub.add_parser("dpo", parents=[common], help="preference-tune a fine-tuned model on pairs (DPO, optional "
                       "LoRA), with checkpoints")
    p.add_argument("--from", dest="base", metavar="RUN", help="the run folder or checkpoint of 'minillm sft' to start from")
    p.add_argument("--pairs", metavar="FILE", help="a JSONL file of pairs (prompt, chosen, rejected)")
    p.add_argument("--config", help="a TOML preset, e.g. configs/dpo-tiny.toml (default: DPOConfig's defaults)")
    p.add_argument("--reference", metavar="RUN", help="the frozen reference (default: the --from checkpoint)")
    p.add_argument("--beta", type=float, help="the KL anchor's strength (default 0.1)")
    p.add_argument("--lora-rank", type=int, metavar="R", help="train rank-R LoRA adapters instead of every weight")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config field (repeat): --set epochs=2")
    p.add_argument("--resume", action="store_true", help="continue the run in its out folder from its latest checkpoint")
    p.add_argument("--force", action="store_true", help="replace an existing run folder")
    p.set_defaults(func=_cmd_dpo)
    p = sub.add_parser("chat", parents=[common], help="talk to a fine-tuned model (a checkpoint of 'minillm sft'); "
                       "with piped input, one answer per line")
    p.add_argument("--checkpoint", required=True, help="a run folder (its latest checkpoint) or a checkpoint folder of 'minillm sft'")
    p.add_argument("--system", default=None, help="a system prompt for every conversation")
    p.add_argument("--temperature", type=float, default=0.7, help="0 is greedy; below 1 sharper, above 1 flatter (default 0.7)")
    p.add_argument("--top-p", type=float, default=0.9, help="sample among the most likely tokens whose probability reaches p (default 0.9)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="most tokens in an answer (default: half the context)")
    p.add_argument("--seed", type=int, default=None, help="seed for the sampler, for the same answers every run")
    p.set_defaults(func=_cmd_chat)
    p = sub.add_parser("eval", parents=[common], help="held-out requests answered and run: the share of answers "
                       "that parse, compile and pass their doctests (in a sandbox)")
    p.add_argument("--checkpoint", required=True, action="append",
                   help="a run folder or checkpoint of 'minillm sft' or 'minillm dpo' (or of 'minillm train', for the "
                   "rates before fine-tuning); repeat it to compare stages side by side")
    p.add_argument("--functions-only", action="store_true", help="ask only the function requests (methods are "
                   "scored for parsing and compiling only; this halves the time)")
    p.add_argument("--data", default=None, help="'stdlib' or a JSONL file (default: the SFT run's data, else stdlib)")
    p.add_argument("--split", choices=("test", "val"), default="test", help="which held-out split (default test)")
    p.add_argument("--limit", type=int, default=0, help="answer only the first N requests (default: all)")
    p.add_argument("--show", type=int, default=3, help="print this many answers to function requests (default 3)")
    p.add_argument("--max-new-tokens", type=int, default=192, help="most tokens in an answer (default 192)")
    p.add_argument("--batch-size", type=int, default=16, help="requests generated together (default 16)")
    p.add_argument("--workers", type=int, default=2, help="sandboxed children at a time (default 2)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds for each answer's run (default 5)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the counts and rates to FILE")
    p.set_defaults(func=_cmd_eval)
    p = sub.add_parser("plot", parents=[common], help="draw a run's loss, learning rate, gradient norm and throughput")
    p.add_argument("run", help="a run folder written by 'minillm train'")
    p.add_argument("--out", help="the image to write (default: RUN/curves.png)")
    p.set_defaults(func=_cmd_plot)
    p = sub.add_parser("plan", parents=[common], help="memory per GPU under DDP, ZeRO and FSDP, the strategy that fits, "
                       "and the time of a compute-optimal run")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--model", help="a preset (tiny, gpt2-small, llama-350m, llama-1b, llama-3b, llama-7b) "
                      "or a parameter count: 125M, 3B, 7e9")
    what.add_argument("--config", help="a training config (TOML): its model, seq_len and batch_size")
    p.add_argument("--gpus", default="1xH100", help="COUNTxNAME (default 1xH100; A100, H100 and H200 are known), "
                   "or a COUNT with --gpu-memory and --peak-flops")
    p.add_argument("--gpu-memory", type=float, metavar="GB", help="memory per GPU in GB (overrides the table)")
    p.add_argument("--peak-flops", type=float, metavar="FLOPS", help="dense bf16 peak FLOP/s per GPU, e.g. 989e12")
    p.add_argument("--seq-len", type=int, help="tokens per sequence (default: the model's context, or the config's)")
    p.add_argument("--batch", type=int, help="sequences per micro-batch per GPU (default 1, or the config's batch_size)")
    p.add_argument("--layout", choices=("minillm", "mixed"), default="minillm",
                   help="bytes per parameter: minillm's fp32 4+4+8 (default), or the ZeRO paper's mixed precision 2+2+12")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16", help="the activations' (autocast) dtype")
    p.add_argument("--mfu", type=float, default=0.4, help="model FLOPs utilization for the time estimate (default 0.4)")
    p.add_argument("--tokens-per-param", type=float, default=20.0,
                   help="training tokens per parameter (default 20: compute-optimal, Hoffmann et al. 2022)")
    p.set_defaults(func=_cmd_plan)
    return parser


@contextlib.contextmanager
def _warnings_as_notes(prog: str) -> Iterator[None]:
    # A library warning (too many processes, a short vocabulary) is a note for the user: one line,
    # without the file name and source line that Python's default format adds.
    def show(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
        print(f"{prog}: note: {' '.join(str(message).split())}", file=sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line `argv` (default: sys.argv[1:]); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    bad = _non_utf8_argument(argv)
    if bad:
        print(bad, file=sys.stderr)
        return 2
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else 2
    prog = " ".join(["minillm", args.command] + ([args.action] if getattr(args, "action", None) else []))
    status = _run(args, prog)
    if args.command == "train":
        _exit_distributed(status)  # under torchrun: does not return
    return status


def _run(args: argparse.Namespace, prog: str) -> int:
    try:
        with _warnings_as_notes(prog):
            return args.func(args)
    except KeyboardInterrupt:
        return 130  # the shell shows ^C; outputs are written atomically, so nothing is left half-done
    except USER_ERRORS as e:
        print(f"{prog}: error: {_describe(e)}", file=sys.stderr)
        return 2
    except Exception as e:
        if args.debug:
            traceback.print_exc()
        else:
            print(f"{prog}: internal error: {type(e).__name__}: {_describe(e)}. This is a bug: rerun with --debug "
                  "to see the traceback, and report it", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
