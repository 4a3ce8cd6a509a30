"""figures/ holds what book/figures.py draws, and every image a chapter shows from it is there."""

from __future__ import annotations

import importlib.util
import io
import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("book_figures", ROOT / "book" / "figures.py")
book_figures = importlib.util.module_from_spec(spec)
sys.modules["book_figures"] = book_figures
spec.loader.exec_module(book_figures)
FUNCTIONS = book_figures.figure_functions()
IMAGE = re.compile(r"!\[[^\]]*\]\((?:\.\./)+figures/([^)]+)\)")


def _shown() -> dict[str, str]:
    shown = {}
    for path in sorted((ROOT / "chapters").rglob("*.ipynb")):
        for c in json.loads(path.read_text(encoding="utf-8"))["cells"]:
            if c["cell_type"] == "markdown":
                for name in IMAGE.findall("".join(c["source"])):
                    shown[name] = path.name
    return shown


def test_every_image_a_chapter_shows_is_drawn_by_code_and_stored() -> None:
    for name, chapter in _shown().items():
        assert name in FUNCTIONS, f"{chapter} shows figures/{name}, which no function in book/diagrams draws"
        assert (ROOT / "figures" / name).is_file(), f"{chapter} shows figures/{name}: run make figures"


def test_figures_holds_only_what_code_draws() -> None:
    stored = {p.name for p in (ROOT / "figures").glob("*.png")}
    assert stored == set(FUNCTIONS), f"stored but not drawn: {stored - set(FUNCTIONS)}; drawn but not stored: " \
                                     f"{set(FUNCTIONS) - stored} (make figures)"


@pytest.mark.parametrize("name", sorted(FUNCTIONS))
def test_stored_figure_is_what_the_code_draws_now(name: str) -> None:
    """Same pixel size and nearly the same pixels: a change to a drawing needs `make figures`."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig = FUNCTIONS[name]()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=200)
    plt.close(fig)
    drawn = plt.imread(io.BytesIO(buffer.getvalue()))
    stored = plt.imread(ROOT / "figures" / name)
    assert drawn.shape == stored.shape, f"figures/{name} is {stored.shape[:2]}, the code draws {drawn.shape[:2]}: make figures"
    # Font rasterizing may differ by a shade between FreeType builds; a redrawn diagram differs everywhere.
    differ = float(np.mean(np.abs(drawn[..., :3] - stored[..., :3]).max(axis=-1) > 0.25))
    assert differ < 0.01, f"figures/{name}: {differ:.1%} of the pixels differ from what the code draws: make figures"
