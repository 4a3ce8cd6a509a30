"""Chapter 09's measurements: DPO of `make llm`'s fine-tuned model at several β, and what it changed.

Uses the runs of `make llm` (runs/sft-tiny, runs/dpo-pairs.jsonl; run it first). For each β, trains
the configs/dpo-tiny.toml recipe (same pairs, same steps, same learning rate) into runs/dpo-sweep/,
then answers the held-out test split's function requests greedily and scores them in the sandbox.
Prints the pairs' make-up (grades, mean lengths of chosen and rejected responses: the length bias
that DPO can learn), then one row per model: the DPO accuracy and margin on training and held-out
pairs, the KL drift from the SFT model on held-out requests, the parse, compile and doctest rates,
the answers cut off by the 192-token budget and the mean answer length in characters.

    .venv/bin/python benchmarks/dpo_sweep.py [--sft runs/sft-tiny] [--pairs runs/dpo-pairs.jsonl]
                                             [--betas 0.03,0.1,0.3,1] [--out runs/dpo-sweep]
"""

from __future__ import annotations

import argparse
import statistics
from collections import Counter
from pathlib import Path

from _common import machine

from minillm.codeeval import answer_requests, held_out, load_for_eval, score_answers
from minillm.dpo import load_dpo_config, load_pairs, preference_tune

ROOT = Path(__file__).resolve().parent.parent


def rates(checkpoint: Path, requests: list) -> dict:
    model, template, _ = load_for_eval(str(checkpoint))
    answers = answer_requests(model, template, requests, max_new_tokens=192)
    report = score_answers(requests, answers)
    f = report.functions
    texts = [a.answer for a in report.attempts]
    return {"parses": f.rate("parses"), "compiles": f.rate("compiles"), "passes": f.passes, "passable": f.passable,
            "cut": sum(not a.finished for a in report.attempts), "chars": statistics.mean(map(len, texts))}


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sft", default="runs/sft-tiny")
    ap.add_argument("--pairs", default="runs/dpo-pairs.jsonl")
    ap.add_argument("--betas", default="0.03,0.1,0.3,1")
    ap.add_argument("--out", default="runs/dpo-sweep")
    args = ap.parse_args()
    pairs = load_pairs(args.pairs)
    requests = [c for c in held_out("stdlib", "test") if not c.meta.get("class")]
    print(machine())
    kinds = Counter(f"{p.meta.get('chosen_grade')} > {p.meta.get('rejected_grade')}" for p in pairs)
    print(f"{len(pairs)} pairs: " + ", ".join(f"{k} {n}" for k, n in kinds.most_common()))
    print(f"mean length in characters: chosen {statistics.mean(len(p.chosen) for p in pairs):.0f}, "
          f"rejected {statistics.mean(len(p.rejected) for p in pairs):.0f}; the chosen is the shorter in "
          f"{sum(len(p.chosen) < len(p.rejected) for p in pairs) / len(pairs):.0%} of the pairs")
    rows = [("SFT (the reference)", None, rates(Path(args.sft), requests))]
    for beta in (float(b) for b in args.betas.split(",")):
        cfg = load_dpo_config(ROOT / "configs" / "dpo-tiny.toml", [f"base={args.sft}", f"pairs={args.pairs}",
                                                                   f"out={Path(args.out) / f'beta{beta:g}'}",
                                                                   f"beta={beta}"])
        result = preference_tune(cfg, force=True, progress=False)
        rows.append((f"DPO, beta {beta:g}", result, rates(result.run, requests)))
    print(f"\n{len(requests)} held-out function requests (test split), greedy, at most 192 tokens")
    print("| model | train acc | held-out acc | margin | KL (nats/answer) | parses | compiles | doctests | cut off "
          "| mean chars |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, r, e in rows:
        dpo = (f"{r.train['accuracy']:.1%} | {r.val['accuracy']:.1%} | {r.train['margin']:+.2f} | {r.kl:.2f}"
               if r is not None else "- | - | - | 0")
        print(f"| {name} | {dpo} | {pct(e['parses'])} | {pct(e['compiles'])} | {e['passes']} of {e['passable']} "
              f"| {e['cut']} | {e['chars']:.0f} |")


if __name__ == "__main__":
    main()
