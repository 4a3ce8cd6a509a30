"""The PDF build: it runs from the stored notebooks and yields a book a reader can use."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pypdf = pytest.importorskip("pypdf")  # in the dev extra, so this always runs under `make test`

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ROOT / "chapters"


def _figures_in(notebooks: list[Path]) -> int:
    n = 0
    for p in notebooks:
        nb = json.loads(p.read_text(encoding="utf-8"))
        for c in nb["cells"]:
            if c["cell_type"] == "markdown":
                n += len(re.findall(r"!\[[^\]]*\]\(", "".join(c["source"])))
            for o in c.get("outputs", []):
                n += "image/png" in o.get("data", {})
    return n


def _images_in(reader) -> int:
    return sum(len(page.images) for page in reader.pages)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("book")
    subprocess.run([sys.executable, str(ROOT / "book" / "build.py"), "--out", str(out)], check=True, cwd=ROOT)
    return out


@pytest.mark.slow
def test_book_pdf(built):
    chapters = sorted(CHAPTERS.glob("[0-9][0-9]_*.ipynb"))
    reader = pypdf.PdfReader(built / "book.pdf")
    # One top-level outline entry per chapter (plus the table of contents itself, if listed).
    top = [item for item in reader.outline if not isinstance(item, list)]
    titles = [item.title for item in top]
    chapter_titles = [t for t in titles if t != "Contents"]
    assert len(chapter_titles) == len(chapters), titles
    first_headings = []
    for p in chapters:
        nb = json.loads(p.read_text(encoding="utf-8"))
        first = next(line for c in nb["cells"] if c["cell_type"] == "markdown" for line in "".join(c["source"]).splitlines() if line.startswith("# "))
        first_headings.append(first[2:].strip())
    assert [t.split(" ", 2)[-1] if t.startswith("Chapter") else t for t in chapter_titles] == first_headings
    # Every figure of every chapter is embedded.
    assert _images_in(reader) >= _figures_in(chapters)
    # A plausible length: title page, contents, and several pages per chapter.
    assert 8 * len(chapters) <= len(reader.pages) <= 80 * len(chapters)
    text = reader.pages[2].extract_text() + reader.pages[3].extract_text()
    assert "minillm" in text  # running header


@pytest.mark.slow
def test_solutions_pdf(built):
    solutions = sorted((CHAPTERS / "solutions").glob("[0-9][0-9]_*.ipynb"))
    reader = pypdf.PdfReader(built / "solutions.pdf")
    assert len([i for i in reader.outline if not isinstance(i, list) and i.title != "Contents"]) == len(solutions)
    body = "".join(page.extract_text() for page in reader.pages)
    assert "BEGIN SOLUTION" in body and "Exercise 1" in body


@pytest.mark.slow
def test_build_is_deterministic(built, tmp_path):
    subprocess.run([sys.executable, str(ROOT / "book" / "build.py"), "--out", str(tmp_path)], check=True, cwd=ROOT)
    assert (tmp_path / "book.pdf").read_bytes() == (built / "book.pdf").read_bytes()


@pytest.mark.slow
def test_single_chapter_build(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "book" / "build.py"), "--chapter", "0", "--out", str(tmp_path)], check=True, cwd=ROOT)
    reader = pypdf.PdfReader(tmp_path / "book-00.pdf")
    assert len([i for i in reader.outline if not isinstance(i, list) and i.title != "Contents"]) == 1


def test_merge_rebases_images_and_strips_harness_lines(tmp_path):
    sys.path.insert(0, str(ROOT / "book"))
    import build

    nb = {
        "nbformat": 4, "nbformat_minor": 5, "metadata": {},
        "cells": [
            {"cell_type": "markdown", "id": "a", "metadata": {}, "source": "# T\n\n![map](../figures/x.png)"},
            {"cell_type": "code", "id": "b", "metadata": {}, "execution_count": 1, "outputs": [], "source": "# NBVAL_IGNORE_OUTPUT\nprint(1)"},
        ],
    }
    chapters = tmp_path / "chapters"
    chapters.mkdir()
    p = chapters / "03_x.ipynb"
    p.write_text(json.dumps(nb), encoding="utf-8")
    (tmp_path / "figures").mkdir()
    (tmp_path / "figures" / "x.png").write_bytes(b"png")
    merged = build.merge([(3, p)], tmp_path / "out")
    sources = [c["source"] for c in merged["cells"]]
    assert sources[0] == "<!-- minillm-chapter: 3 -->"
    assert "](assets/x.png)" in sources[1] and (tmp_path / "out" / "assets" / "x.png").read_bytes() == b"png"
    assert sources[2] == "print(1)"
    assert all("id" not in c for c in merged["cells"])
