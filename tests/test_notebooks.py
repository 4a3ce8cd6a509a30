"""Notebook hygiene: every chapter is stored executed, in order, portable and small.

nbval (run by `make test` over chapters/) proves that the stored outputs are what the code prints;
these tests check what nbval does not: that there is something to compare, in the right shape.
"""

from __future__ import annotations

import getpass
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ROOT / "chapters"
# Chapters 00_..., then appendices A_..., B_..., each with its solutions notebook.
CHAPTER_GLOBS = ("[0-9][0-9]_*.ipynb", "[A-Z]_*.ipynb")


def _notebooks(folder: Path) -> list[Path]:
    return [p for pattern in CHAPTER_GLOBS for p in sorted(folder.glob(pattern))]


NOTEBOOKS = _notebooks(CHAPTERS) + _notebooks(CHAPTERS / "solutions")
MAX_BYTES = 2 * 1024 * 1024

# Absolute paths of this checkout and of the usual home and temporary folders, and the user name.
_PATH_RE = re.compile(r"(/home/|/Users/|/root/|/tmp/|[A-Za-z]:\\\\Users\\\\|" + re.escape(str(ROOT)) + ")")


def _code_cells(nb: dict) -> list[dict]:
    return [c for c in nb["cells"] if c["cell_type"] == "code" and "".join(c["source"]).strip()]


def _output_text(cell: dict) -> str:
    parts = []
    for out in cell.get("outputs", []):
        parts.append("".join(out.get("text", "")))
        for mime, value in out.get("data", {}).items():
            if mime.startswith("text/"):
                parts.append("".join(value))
        parts.extend(out.get("traceback", []))
    return "\n".join(parts)


def test_there_are_chapters():
    assert NOTEBOOKS, "no notebooks found under chapters/"


def test_chapter_numbering_has_no_gaps():
    numbers = [int(p.name[:2]) for p in sorted(CHAPTERS.glob("[0-9][0-9]_*.ipynb"))]
    assert numbers == list(range(len(numbers))), f"chapter numbers {numbers} should be 0..{len(numbers) - 1}"
    solutions = [int(p.name[:2]) for p in sorted((CHAPTERS / "solutions").glob("[0-9][0-9]_*.ipynb"))]
    assert solutions == numbers, "every chapter needs chapters/solutions/NN_solutions.ipynb and no other"
    letters = [p.name.split("_")[0] for p in sorted(CHAPTERS.glob("[A-Z]_*.ipynb"))]
    assert letters == [chr(ord("A") + i) for i in range(len(letters))], f"appendices {letters} should be A, B, ..."
    answers = [p.name.split("_")[0] for p in sorted((CHAPTERS / "solutions").glob("[A-Z]_*.ipynb"))]
    assert answers == letters, "every appendix needs chapters/solutions/X_solutions.ipynb and no other"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(CHAPTERS).as_posix())
def test_notebook_is_executed_in_order(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    counts = [c.get("execution_count") for c in _code_cells(nb)]
    assert counts, f"{path.name} has no code"
    assert counts == list(range(1, len(counts) + 1)), f"{path.name}: run it top to bottom (make notebooks), got {counts}"
    errors = [c for c in _code_cells(nb) if any(o["output_type"] == "error" for o in c.get("outputs", []))]
    assert not errors, f"{path.name} stores an error output"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(CHAPTERS).as_posix())
def test_notebook_outputs_are_portable(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    user = getpass.getuser()
    for i, cell in enumerate(_code_cells(nb)):
        text = _output_text(cell)
        m = _PATH_RE.search(text)
        assert not m, f"{path.name}, code cell {i + 1}: output holds an absolute path ({m.group(0)}...)"
        if len(user) > 3 and user != "root":  # short or generic names match ordinary words
            assert user not in text, f"{path.name}, code cell {i + 1}: output holds the user name"
        assert "Traceback" not in text, f"{path.name}, code cell {i + 1}: output holds a traceback"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.relative_to(CHAPTERS).as_posix())
def test_notebook_size(path):
    assert path.stat().st_size <= MAX_BYTES, f"{path.name} is {path.stat().st_size / 1e6:.1f} MB; the limit is 2 MB"


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.parent == CHAPTERS], ids=lambda p: p.name)
def test_chapter_has_exercises_and_into_the_package(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    headings = [line for c in nb["cells"] if c["cell_type"] == "markdown" for line in "".join(c["source"]).splitlines() if line.startswith("## ")]
    assert "## Summary" in headings and "## Exercises" in headings
    if path.name[:2].isdigit():  # a chapter finishes a module; an appendix (A_...) teaches a tool
        assert "## Into the package" in headings
        assert headings.index("## Into the package") < headings.index("## Exercises")
    exercises = "".join("".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "markdown" and "## Exercises" in "".join(c["source"]))
    assert len(re.findall(r"^\d+\. ", exercises, re.MULTILINE)) >= 3, f"{path.name}: at least three exercises"


@pytest.mark.parametrize("path", _notebooks(CHAPTERS / "solutions"), ids=lambda p: p.name)
def test_solutions_are_marked_and_checked(path):
    nb = json.loads(path.read_text(encoding="utf-8"))
    sources = ["".join(c["source"]) for c in _code_cells(nb)]
    marked = [s for s in sources if "### BEGIN SOLUTION" in s]
    assert marked and all("### END SOLUTION" in s for s in marked)
    assert sum("assert " in s for s in sources) >= len(marked), f"{path.name}: every solution needs an assert-based check"
