"""Per-chapter counts of the book: prose words, figures, diagrams, exercises, questions, code cells.

    .venv/bin/python book/stats.py            one row per chapter (and appendix), then the totals

- **words**: the words of the markdown cells, without fenced code blocks and display math (what a
  reader reads as prose; images count by their captions; inline math and code spans count as the words they are).
- **figures**: the captions, markdown cells that start with ``**Figure N.k.**``.
- **diagrams**: the figures drawn without data axes (the drawing cell turns the axes off with
  ``axis("off")`` or ``set_axis_off()``), and the images from ``figures/``, which hold only
  diagrams drawn by ``book/figures.py``: pictures of a mechanism rather than plots of numbers.
- **exercises** and **questions**: the numbered items of the sections ``## Exercises`` and
  ``## Check your understanding``.
- **code cells**, and how many of them carry ``# NBVAL_IGNORE_OUTPUT``.
"""

from __future__ import annotations

import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CAPTION = re.compile(r"^\*\*Figure (?:\d+|[A-Z])\.\d+\.\*\*", re.MULTILINE)
IMAGE = re.compile(r"!\[[^\]]*\]\([^)]+\)")
FROM_FIGURES = re.compile(r"!\[[^\]]*\]\((\.\./)+figures/[^)]+\)")
AXES_OFF = re.compile(r"""axis\(\s*["']off["']\s*\)|set_axis_off\(\)""")
WORD = re.compile(r"[\w'’-]+")


@dataclass
class Counts:
    name: str
    words: int
    figures: int
    diagrams: int
    exercises: int
    questions: int
    code_cells: int
    ignored: int


def _prose(markdown: str) -> str:
    markdown = re.sub(r"```.*?```", " ", markdown, flags=re.DOTALL)
    markdown = re.sub(r"!\[[^\]]*\]\([^)]*\)", " ", markdown)  # images: the caption is what is read
    return re.sub(r"\$\$.*?\$\$", " ", markdown, flags=re.DOTALL)


def _items(markdown: str, heading: str) -> int:
    """The numbered items ("1. ", "2. ", ...) at the start of lines in the section `heading`."""
    match = re.search(rf"^{re.escape(heading)}\s*$(.*?)(?=^## |\Z)", markdown, flags=re.MULTILINE | re.DOTALL)
    return len(re.findall(r"^\d+\.\s", match.group(1), flags=re.MULTILINE)) if match else 0


def count(path: Path) -> Counts:
    cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
    sources = ["".join(c["source"]) for c in cells]
    markdown = "\n\n".join(s for c, s in zip(cells, sources) if c["cell_type"] == "markdown")
    figures = diagrams = 0
    for i, (c, s) in enumerate(zip(cells, sources)):
        if c["cell_type"] != "markdown":
            continue
        for caption in CAPTION.finditer(s):
            figures += 1
            before = s[: caption.start()]  # an image in the same cell, above its caption
            if not before.strip() and i > 0 and cells[i - 1]["cell_type"] == "markdown":
                before = sources[i - 1]  # or in the markdown cell just above
            if FROM_FIGURES.search(before.split("**Figure ")[-1]):
                diagrams += 1
            elif not before.strip() or not IMAGE.search(before):
                drawing = next((sources[j] for j in range(i - 1, -1, -1) if cells[j]["cell_type"] == "code"), "")
                diagrams += bool(AXES_OFF.search(drawing))
    code = [s for c, s in zip(cells, sources) if c["cell_type"] == "code"]
    return Counts(path.stem, len(WORD.findall(_prose(markdown))), figures, diagrams,
                  _items(markdown, "## Exercises"), _items(markdown, "## Check your understanding"), len(code),
                  sum(s.lstrip().startswith("# NBVAL_IGNORE_OUTPUT") for s in code))


def main() -> int:
    rows = [count(p) for p in sorted((ROOT / "chapters").glob("[0-9A-Z]*.ipynb"))]
    header = f"{'chapter':28}{'words':>7}{'figures':>9}{'diagrams':>10}{'exercises':>11}{'questions':>11}{'code':>6}"
    print(header + f"{'ignored':>9}")
    for r in rows:
        print(f"{r.name:28}{r.words:>7,}{r.figures:>9}{r.diagrams:>10}{r.exercises:>11}{r.questions:>11}"
              f"{r.code_cells:>6}{r.ignored:>9}")
    total = Counts("total", *(sum(getattr(r, f) for r in rows) for f in
                              ("words", "figures", "diagrams", "exercises", "questions", "code_cells", "ignored")))
    print(f"{total.name:28}{total.words:>7,}{total.figures:>9}{total.diagrams:>10}{total.exercises:>11}"
          f"{total.questions:>11}{total.code_cells:>6}{total.ignored:>9}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
