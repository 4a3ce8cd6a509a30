"""Figures that the book shows from figures/, drawn by code so that `make figures` rebuilds them.

Each `draw_*` function returns a matplotlib Figure; `main` saves them all as PNG with fixed
metadata, so regenerating a figure that did not change gives the same bytes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch

FIGURES = Path(__file__).resolve().parent.parent / "figures"

# (number, title, what it finishes in the package, part)
CHAPTERS = [
    ("00", "Introduction and the corpus", "corpus.py", "Text"),
    ("01", "Tokenization: byte-level BPE", "tokenizer.py", "Text"),
    ("02", "Attention", "attention.py", "The model"),
    ("03", "Multi-head attention, GQA, KV cache", "attention.py", "The model"),
    ("04", "Rotary position embeddings", "rope.py", "The model"),
    ("05", "Transformer blocks, the full model", "model.py", "The model"),
    ("06", "Pretraining", "data.py  train.py  generate.py", "Training"),
    ("07", "Scaling out: DDP, FSDP, memory", "distributed.py  plan.py", "Training"),
    ("08", "Supervised fine-tuning", "sft.py", "Training"),
    ("09", "Preference optimization (DPO)", "dpo.py", "Training"),
]
PART_COLORS = {"Text": "#dbe9f6", "The model": "#e3f1dc", "Training": "#fbe5d0"}
APPENDIX = ("A", "Appendix: PyTorch for this book", "read it whenever a chapter needs it")


def draw_chapter_map() -> plt.Figure:
    """The chapters top to bottom, each with the module it finishes, grouped into three parts."""
    fig, ax = plt.subplots(figsize=(7.2, 8.6))
    ax.set_xlim(0, 10.4)
    ax.set_ylim(-1.6, len(CHAPTERS) * 1.0 + 0.2)
    ax.axis("off")
    y_of = {}
    for i, (num, title, module, part) in enumerate(CHAPTERS):
        y = len(CHAPTERS) - 1 - i
        y_of[num] = y
        ax.add_patch(FancyBboxPatch((1.4, y + 0.12), 5.25, 0.66, boxstyle="round,pad=0.02,rounding_size=0.12",
                                    fc=PART_COLORS[part], ec="#555555", lw=1))
        ax.text(1.6, y + 0.45, num, fontsize=12, weight="bold", va="center", color="#333333")
        ax.text(2.15, y + 0.45, title, fontsize=10.5, va="center")
        ax.text(6.95, y + 0.45, module, fontsize=9.5, va="center", family="monospace", color="#1a4f8b")
    for a, b in zip(CHAPTERS, CHAPTERS[1:]):
        if (a[0], b[0]) == ("07", "08"):
            continue
        ax.add_patch(FancyArrowPatch((3.9, y_of[a[0]] + 0.12), (3.9, y_of[b[0]] + 0.78), arrowstyle="-|>",
                                     mutation_scale=10, color="#555555", lw=1))
    # Fine-tuning builds on pretraining; scaling out is a side road it does not need.
    ax.add_patch(FancyArrowPatch((1.4, y_of["06"] + 0.45), (1.4, y_of["08"] + 0.45), arrowstyle="-|>",
                                 connectionstyle="arc3,rad=0.5", mutation_scale=10, color="#555555", lw=1))
    for part, color in PART_COLORS.items():
        ys = [y_of[c[0]] for c in CHAPTERS if c[3] == part]
        ax.plot([0.55, 0.55], [min(ys) + 0.15, max(ys) + 0.75], color="#777777", lw=2)
        ax.text(0.35, (min(ys) + max(ys)) / 2 + 0.45, part, rotation=90, ha="center", va="center", fontsize=11)
    ax.text(6.95, len(CHAPTERS) - 0.05, "finishes in src/minillm/", fontsize=9, color="#555555")
    # The appendix stands beside the road: a dashed box under the chapters.
    letter, title, note = APPENDIX
    ax.add_patch(FancyBboxPatch((1.4, -1.33), 5.25, 0.66, boxstyle="round,pad=0.02,rounding_size=0.12",
                                fc="#f2f2f2", ec="#555555", lw=1, ls=(0, (4, 2))))
    ax.text(1.6, -1.0, letter, fontsize=12, weight="bold", va="center", color="#333333")
    ax.text(2.15, -1.0, title, fontsize=10.5, va="center")
    ax.text(6.95, -1.0, note, fontsize=9, va="center", color="#555555", style="italic")
    fig.tight_layout()
    return fig


def figure_functions() -> dict[str, object]:
    """Every figure the book shows from figures/: file name -> drawing function."""
    import importlib
    import pkgutil

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import diagrams

    found: dict[str, object] = {"chapter_map.png": draw_chapter_map}
    for info in sorted(pkgutil.iter_modules(diagrams.__path__), key=lambda m: m.name):
        if info.name != "style":
            found.update(importlib.import_module(f"diagrams.{info.name}").FIGURES)
    return found


def main() -> int:
    FIGURES.mkdir(exist_ok=True)
    only = sys.argv[1:]  # `python book/figures.py 02_qkv_flow.png` redraws just that one
    for name, draw in figure_functions().items():
        if only and name not in only:
            continue
        fig = draw()
        fig.savefig(FIGURES / name, dpi=200, metadata={"Software": None})
        plt.close(fig)
        print(f"wrote figures/{name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
