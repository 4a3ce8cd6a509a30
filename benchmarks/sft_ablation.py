"""Chapter 08's measurements: one fine-tuning recipe against its variants, on the same base and data.

Each variant runs `minillm sft` (configs/sft-tiny.toml) from the same pretrained run, in its own
process (so that its peak memory is its own), then `minillm eval` on the held-out test split. The
base model is evaluated too, for the rates before fine-tuning. Prints one table: steps, seconds,
tokens/s, trainable parameters, peak resident memory, the masked validation loss, and the parse,
compile and doctest rates of the answers to held-out function requests.

    .venv/bin/python benchmarks/sft_ablation.py [--base runs/tiny] [--out runs/ablation] [--only masked,lora16]

Variants: masked (the preset: loss on answers, packing), unmasked (loss on every token), padding
(one example per row, right-padded), lora16 (rank-16 adapters, base frozen).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import machine

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "sft-tiny.toml"
VARIANTS = {
    "masked": [],
    "unmasked": ["--set", "mask_prompt=false"],
    "padding": ["--set", "packing=false", "--set", "batch_size=16"],
    "lora16": ["--lora-rank", "16"],
}
# Run the CLI, then report the process's peak resident set (KiB on Linux) on the last line.
PEAK = ("import resource, runpy, sys\nsys.argv = ['minillm', *sys.argv[1:]]\ntry:\n"
        "    runpy.run_module('minillm', run_name='__main__')\nfinally:\n"
        "    print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, flush=True)\n")


def run(args: list[str]) -> tuple[str, int, float]:
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", PEAK, *args], cwd=ROOT, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"minillm {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    peak = int(proc.stdout.rsplit("PEAK_KIB", 1)[1].split()[0])
    return proc.stdout, peak, seconds


def evaluate(checkpoint: Path) -> dict:
    out = checkpoint / "eval-test.json"
    run(["eval", "--checkpoint", str(checkpoint), "--show", "0", "--json", str(out)])
    return json.loads(out.read_text())


def pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default="runs/tiny")
    ap.add_argument("--out", default="runs/ablation")
    ap.add_argument("--only", default="", help="comma-separated variants (default: all)")
    a = ap.parse_args()
    names = a.only.split(",") if a.only else list(VARIANTS)
    rows = []
    before = evaluate(ROOT / a.base)
    rows.append(("base (before SFT)", "", "", "", "", "", "", before["functions"]))
    for name in names:
        folder = Path(a.out) / name
        stdout, peak, seconds = run(["sft", "--from", a.base, "--config", str(CONFIG), "--set", f"out={folder}",
                                     "--force", *VARIANTS[name]])
        metrics = [json.loads(line) for line in (ROOT / folder / "metrics.jsonl").read_text().splitlines()]
        final = next(m for m in reversed(metrics) if m.get("kind") == "final")
        steps = final["step"]
        tps = [m["tokens_per_s"] for m in metrics if "tokens_per_s" in m]
        trained = stdout.split("parameters trained")[0].rsplit(":", 1)[1].split(" of ")[0].strip()
        rates = evaluate(ROOT / folder)["functions"]
        rows.append((name, str(steps), f"{seconds:.0f}", f"{sum(tps) / len(tps):,.0f}", trained,
                     f"{peak / 1024:,.0f}", f"{final['val_loss']:.3f}", rates))
        print(f"{name}: done in {seconds:.0f} s", file=sys.stderr, flush=True)
    print(f"# {machine()}")
    head = f"{'variant':<18}{'steps':>6}{'s':>6}{'tok/s':>7}{'trained':>11}{'peak MiB':>9}{'val':>7}"
    print(head + f"{'parse':>8}{'compile':>9}{'pass':>7}")
    for name, steps, s, tps, trained, peak, val, r in rows:
        print(f"{name:<18}{steps:>6}{s:>6}{tps:>7}{trained:>11}{peak:>9}{val:>7}"
              f"{pct(r['parses_rate']):>8}{pct(r['compiles_rate']):>9}{pct(r['passes_rate']):>7}")
    f = rows[0][-1]
    print(f"(functions asked: {f['n']}; with doctests their reference passes here: {f['passable']})")


if __name__ == "__main__":
    main()
