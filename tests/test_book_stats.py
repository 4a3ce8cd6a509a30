"""book/stats.py counts what it says it counts, on a notebook built by hand."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("book_stats", ROOT / "book" / "stats.py")
stats = importlib.util.module_from_spec(spec)
sys.modules["book_stats"] = stats  # dataclasses look their module up there
spec.loader.exec_module(stats)


def cell(kind: str, source: str) -> dict:
    return {"cell_type": kind, "source": source, "metadata": {}, **({"outputs": []} if kind == "code" else {})}


def test_counts_on_a_small_notebook(tmp_path: Path) -> None:
    cells = [
        cell("markdown", "# Title\n\nOne two three, it's four.\n\n```python\nnot = prose\n```\n\n$$x = y + z$$"),
        cell("code", "fig, ax = plt.subplots()\nax.plot([1, 2])\nplt.show()"),
        cell("markdown", "**Figure 1.1.** A plot of two numbers."),
        cell("code", "# NBVAL_IGNORE_OUTPUT\nfig, ax = plt.subplots()\nax.axis('off')\nplt.show()"),
        cell("markdown", "**Figure 1.2.** A diagram."),
        cell("markdown", "Look:\n\n![a picture](../figures/01_x.png)"),
        cell("markdown", "**Figure 1.3.** A diagram from figures/."),
        cell("markdown", "![a photo](photo.png)"),
        cell("markdown", "**Figure 1.4.** Not from figures/, so not a diagram."),
        cell("markdown", "Text.\n\n![m](../figures/m.png)\n\n**Figure 1.5.** In the same cell.\n\nMore."),
        cell("markdown", "## Check your understanding\n\n1. Why?\n2. How?\n\n## Exercises\n\n1. **A.** Do it.\n"
                         "   2. not an item: indented\n2. **B.** And this.\n3. **C.** And that."),
    ]
    path = tmp_path / "01_x.ipynb"
    path.write_text(json.dumps({"cells": cells}))
    c = stats.count(path)
    assert (c.figures, c.diagrams, c.exercises, c.questions, c.code_cells, c.ignored) == (5, 3, 3, 2, 2, 1)
    words = "Title One two three it's four Figure 1 1 A plot of two numbers Figure 1 2 A diagram Look " \
            "Figure 1 3 A diagram from figures Figure 1 4 Not from figures so not a diagram Text " \
            "Figure 1 5 In the same cell More " \
            "Check your " \
            "understanding 1 Why 2 How Exercises 1 A Do it 2 not an item indented 2 B And this 3 C And that"
    assert c.words == len(words.split())


def test_an_appendix_figure_is_counted(tmp_path: Path) -> None:
    cells = [cell("markdown", "# A\n\n![x](../figures/A_x.png)\n\n**Figure A.1.** A diagram.")]
    path = tmp_path / "A_tools.ipynb"
    path.write_text(json.dumps({"cells": cells}))
    assert (stats.count(path).figures, stats.count(path).diagrams) == (1, 1)


def test_every_chapter_is_counted() -> None:
    names = {p.stem for p in (ROOT / "chapters").glob("[0-9A-Z]*.ipynb")}
    counted = {stats.count(p).name for p in (ROOT / "chapters").glob("[0-9A-Z]*.ipynb")}
    assert names == counted and all(stats.count(ROOT / "chapters" / f"{n}.ipynb").words > 1000 for n in names)
