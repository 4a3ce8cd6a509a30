"""The PDF build: it runs from the stored notebooks and yields books a reader can use.

The slow tests build the three PDFs once (book, solutions, exercises) and read them back; the fast
ones check the pieces of the build (output wrapping, citations, figure captions, the typst lint).
"""

from __future__ import annotations

import datetime as dt
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pypdf = pytest.importorskip("pypdf")  # in the dev extra, so this always runs under `make test`

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ROOT / "chapters"
NOTEBOOKS = sorted(CHAPTERS.glob("[0-9][0-9]_*.ipynb")) + sorted(CHAPTERS.glob("[A-Z]_*.ipynb"))
SOLUTIONS = sorted((CHAPTERS / "solutions").glob("[0-9][0-9]_*.ipynb")) + sorted((CHAPTERS / "solutions").glob("[A-Z]_*.ipynb"))
sys.path.insert(0, str(ROOT / "book"))
import build  # noqa: E402


def _code_lines(path: Path) -> list[str]:
    nb = json.loads(path.read_text(encoding="utf-8"))
    return [line for c in nb["cells"] if c["cell_type"] == "code" for line in "".join(c["source"]).splitlines()]


def _figure_outputs(path: Path) -> int:
    nb = json.loads(path.read_text(encoding="utf-8"))
    n = 0
    for c in nb["cells"]:
        if c["cell_type"] == "markdown":
            n += len(re.findall(r"^!\[[^\]]*\]\(", "".join(c["source"]), re.MULTILINE))
        for o in c.get("outputs", []):
            n += "image/png" in o.get("data", {})
    return n


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("book")
    subprocess.run([sys.executable, str(ROOT / "book" / "build.py"), "--out", str(out)], check=True, cwd=ROOT)
    return out


def _text(reader) -> str:
    return "\n".join(page.extract_text() for page in reader.pages)


# -- the built books ------------------------------------------------------------------------------


@pytest.mark.slow
def test_book_pdf_structure(built):
    reader = pypdf.PdfReader(built / "book.pdf")
    titles = [item.title for item in reader.outline if not isinstance(item, list)]
    front_back = {"Preface", "Bibliography"}
    assert front_back <= set(titles), titles
    chapter_titles = [t for t in titles if t not in front_back]
    first_headings = []
    for p in NOTEBOOKS:
        nb = json.loads(p.read_text(encoding="utf-8"))
        first = next(line for c in nb["cells"] if c["cell_type"] == "markdown"
                     for line in "".join(c["source"]).splitlines() if line.startswith("# "))
        first_headings.append(first[2:].strip())
    assert [t.split(" ", 2)[-1] for t in chapter_titles] == first_headings
    chapters = [p for p in NOTEBOOKS if p.name[:2].isdigit()]
    names = [f"Chapter {i} " for i in range(len(chapters))] + [f"Appendix {p.name[0]} " for p in NOTEBOOKS[len(chapters):]]
    assert [t[: len(n)] for t, n in zip(chapter_titles, names)] == names
    assert 8 * len(NOTEBOOKS) <= len(reader.pages) <= 80 * len(NOTEBOOKS)
    text = _text(reader)
    assert "Contents" in reader.pages[1].extract_text() and "List of figures" in text
    # The title page: authors, version, licence, and the date of the last commit (not 1970).
    first_page = reader.pages[0].extract_text()
    assert build.AUTHORS in first_page and f"Version {build.project_version()}" in first_page
    assert "licence" in first_page
    epoch = build.source_date_epoch()
    date = dt.datetime.fromtimestamp(epoch, dt.timezone.utc)
    assert f"{date.day} {date:%B %Y}" in first_page
    assert reader.metadata.creation_date.year == date.year >= 2025
    assert "minillm" in reader.pages[4].extract_text()  # running header
    # The learning-goals box opens every chapter.
    assert text.count("You will build") >= len(NOTEBOOKS)


@pytest.mark.slow
def test_every_figure_is_embedded_numbered_and_captioned(built):
    reader = pypdf.PdfReader(built / "book.pdf")
    expected = sum(_figure_outputs(p) for p in NOTEBOOKS)
    assert sum(len(page.images) for page in reader.pages) >= expected
    typ = (built / "book.typ").read_text(encoding="utf-8")
    figures = re.findall(r"#figure\(image\(\"[^\"]+\".*?caption: \[\s*(.*?)\s*\]\s*\)\s*<(fig-(?:\d+|[A-Z])-\d+)>", typ, re.DOTALL)
    assert len(figures) == expected
    assert all(caption.strip() for caption, _ in figures)
    text = re.sub(r"\s+", " ", _text(reader))
    for _, label in figures:
        chapter, k = label.split("-")[1:]
        # Each number appears twice at least: in the list of figures and under the figure.
        assert text.count(f"Figure {chapter}.{k}") >= 2, label


@pytest.mark.slow
def test_bibliography_resolves_every_citation(built):
    typ = (built / "book.typ").read_text(encoding="utf-8")
    cited = set(re.findall(r"#cite\(<([\w-]+)>", typ))
    bib = build.Bibliography.load()
    assert cited and cited <= set(bib.keys.values())
    text = re.sub(r"\s+", " ", _text(pypdf.PdfReader(built / "book.pdf")))
    assert "Attention Is All You Need" in text and "Bibliography" in text
    # No author-year citation was left unlinked in the prose.
    md = (built / "book.md").read_text(encoding="utf-8")
    prose = re.sub(r"(`+)[\s\S]*?\1", "", md)
    assert not re.findall(r"[A-Z]\w+ et al\.,? \(?\d{4}", prose)


@pytest.mark.slow
def test_solutions_and_exercises_pdfs(built):
    solutions = _text(pypdf.PdfReader(built / "solutions.pdf"))
    assert "BEGIN SOLUTION" in solutions and "Exercise 1" in solutions
    exercises = _text(pypdf.PdfReader(built / "exercises.pdf"))
    assert "NotImplementedError" in exercises and "Exercise 1" in exercises
    assert "BEGIN SOLUTION" not in exercises and "END SOLUTION" not in exercises
    for stem in ("solutions", "exercises"):
        reader = pypdf.PdfReader(built / f"{stem}.pdf")
        assert len([i for i in reader.outline if not isinstance(i, list) and i.title.startswith(("Chapter", "Appendix"))]) == len(SOLUTIONS)


@pytest.mark.slow
def test_build_is_deterministic(built, tmp_path):
    subprocess.run([sys.executable, str(ROOT / "book" / "build.py"), "--out", str(tmp_path)], check=True, cwd=ROOT)
    for stem in ("book", "solutions", "exercises"):
        assert (tmp_path / f"{stem}.pdf").read_bytes() == (built / f"{stem}.pdf").read_bytes(), stem


@pytest.mark.slow
def test_single_chapter_build(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "book" / "build.py"), "--chapter", "0", "--out", str(tmp_path)], check=True, cwd=ROOT)
    reader = pypdf.PdfReader(tmp_path / "book-00.pdf")
    assert len([i for i in reader.outline if not isinstance(i, list) and i.title.startswith("Chapter")]) == 1
    assert (tmp_path / "exercises-00.pdf").is_file() and (tmp_path / "solutions-00.pdf").is_file()


@pytest.mark.slow
def test_generated_typst_is_clean(built):
    for stem in ("book", "solutions", "exercises"):
        assert build.lint_typst((built / f"{stem}.typ").read_text(encoding="utf-8")) == []


# -- the notebooks fit the page -------------------------------------------------------------------


@pytest.mark.parametrize("path", NOTEBOOKS + SOLUTIONS, ids=lambda p: p.relative_to(CHAPTERS).as_posix())
def test_code_fits_the_page(path):
    long = [line for line in _code_lines(path) if len(line) > build.CODE_COLUMNS]
    assert not long, f"{path.name}: {len(long)} code lines over {build.CODE_COLUMNS} columns, e.g. {long[0]!r}"


@pytest.mark.parametrize("path", NOTEBOOKS + SOLUTIONS, ids=lambda p: p.relative_to(CHAPTERS).as_posix())
def test_nbval_markers_are_exact(path):
    # nbval acts on a comment that is exactly its marker: "# NBVAL_IGNORE_OUTPUT (why)" is silently
    # ignored, and the cell is compared after all (found when chapter 08 failed under another Python).
    from nbval.plugin import comment_markers

    nb = json.loads(path.read_text(encoding="utf-8"))
    bad = [line.strip() for c in nb["cells"] if c["cell_type"] == "code"
           for line in "".join(c["source"]).splitlines()
           if "NBVAL_" in line and line.strip().lstrip("#").strip() not in comment_markers]
    assert not bad, f"{path.name}: {bad[:3]}; put the marker alone on its line and the reason on the next"


def test_notebook_code_is_ruff_formatted():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is in the dev extra; install it to check the formatting")
    result = subprocess.run([ruff, "format", "--check", "chapters"], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, "run `ruff format chapters`:\n" + result.stdout + result.stderr


# -- pieces of the build --------------------------------------------------------------------------


def test_wrap_output_marks_continuations_and_keeps_the_text():
    line = "    " + ", ".join(f"item{i}" for i in range(40))
    wrapped = build.wrap_output(line, width=60)
    rows = wrapped.split("\n")
    assert len(rows) > 1 and all(len(r) <= 60 for r in rows)
    assert all(r.startswith("    " + build.CONTINUATION) for r in rows[1:])  # hanging indent
    rebuilt = rows[0] + "".join(" " + r.strip()[len(build.CONTINUATION.strip()):].strip() for r in rows[1:])
    assert rebuilt.split() == line.split()
    assert build.wrap_output("short\nlines", width=60) == "short\nlines"
    assert all(len(r) <= 30 for r in build.wrap_output("x" * 100, width=30).split("\n"))


def test_citations_link_to_the_bibliography_and_unknown_ones_fail():
    bib = build.Bibliography.load()
    text = "as Vaswani et al. (2017) showed, and later (MQA, Shazeer, 2019); Python 3.11 (2022) too"
    out = build._cite(text, bib, "test")
    assert '#cite(<vaswani2017>, form: "prose")' in out
    assert '(MQA, `#cite(<shazeer2019>, form: "author"), #cite(<shazeer2019>, form: "year")`{=typst})' in out
    assert "Python 3.11 (2022)" in out
    with pytest.raises(SystemExit, match=r"Nobody \(2031\) has no entry"):
        build._cite("as Nobody et al. (2031) claim", bib, "test")
    # A citation that the source wraps across lines is still one citation (it once printed as text).
    wrapped = build._cite("as Vaswani et\nal. (2017) and (Ba et al.,\n2016) showed", bib, "test")
    assert '#cite(<vaswani2017>, form: "prose")' in wrapped and "#cite(<ba2016>" in wrapped
    with pytest.raises(SystemExit, match=r"Nobody \(2031\) has no entry"):
        build._cite("as Nobody et\nal. (2031) claim", bib, "test")


def _tiny_notebook(tmp_path: Path, cells: list[dict], name: str = "07_tiny.ipynb") -> Path:
    nb = {"nbformat": 4, "nbformat_minor": 5, "metadata": {}, "cells": cells}
    path = tmp_path / name
    path.write_text(json.dumps(nb), encoding="utf-8")
    return path


def _png(width_px: int, dpi: int) -> str:
    import base64
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width_px / dpi, 1))
    ax.plot([0, 1])
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode()


def _code(src: str, outputs=(), tags=()) -> dict:
    return {"cell_type": "code", "metadata": {"tags": list(tags)}, "execution_count": 1, "outputs": list(outputs), "source": src}


def _md(src: str) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": src}


def test_figures_need_numbered_captions_and_hidden_code_is_dropped(tmp_path):
    image = {"output_type": "display_data", "data": {"image/png": _png(600, 200), "text/plain": "<Figure>"}, "metadata": {}}
    renderer = build.Renderer(tmp_path, "media", build.Bibliography.load())
    good = _tiny_notebook(tmp_path, [
        _md("# Tiny\n\nFigure 7.1 shows a line."),
        _code("# NBVAL_IGNORE_OUTPUT\nplot_the_line()", [image], tags=["hide-input"]),
        _md("**Figure 7.1.** A line, rising.\n\nMore prose."),
        _code("print(1)", [{"output_type": "stream", "name": "stdout", "text": "a\n"},
                           {"output_type": "stream", "name": "stdout", "text": "b\n"}]),
    ])
    chapter = renderer.notebook(7, good)
    renderer.link_prose([chapter])
    assert "plot_the_line" not in chapter.markdown and "NBVAL" not in chapter.markdown
    assert "{#fig-7-1 width=3.00in}" in chapter.markdown and "![A line, rising.]" in chapter.markdown
    assert "[Figure 7.1](#fig-7-1)" in chapter.markdown
    assert "```\na\nb\n```" in chapter.markdown  # consecutive prints in one box
    no_caption = _tiny_notebook(tmp_path, [_code("plot()", [image]), _md("Just prose.")], "07_a.ipynb")
    with pytest.raises(SystemExit, match="needs a caption"):
        renderer.notebook(7, no_caption)
    wrong_number = _tiny_notebook(tmp_path, [_code("plot()", [image]), _md("**Figure 7.2.** Off by one.")], "07_b.ipynb")
    with pytest.raises(SystemExit, match="says Figure 7.2"):
        renderer.notebook(7, wrong_number)
    low = {"output_type": "display_data", "data": {"image/png": _png(600, 100)}, "metadata": {}}
    blurry = _tiny_notebook(tmp_path, [_code("plot()", [low]), _md("**Figure 7.1.** Blurry.")], "07_c.ipynb")
    with pytest.raises(SystemExit, match="100 dpi"):
        renderer.notebook(7, blurry)
    noisy = _tiny_notebook(tmp_path, [_code("torch.manual_seed(0)", [{"output_type": "execute_result", "data": {"text/plain": "<torch._C.Generator at 0x7f00aa>"}, "metadata": {}}])], "07_d.ipynb")
    with pytest.raises(SystemExit, match="Generator"):
        renderer.notebook(7, noisy)
    dangling = _tiny_notebook(tmp_path, [_md("# T\n\nAs Figure 7.4 shows.")], "07_e.ipynb")
    chapter = renderer.notebook(7, dangling)
    with pytest.raises(SystemExit, match="Figure 7.4, which does not exist"):
        renderer.link_prose([chapter])


@pytest.mark.slow
def test_an_appendix_is_lettered(tmp_path):
    """A_*.ipynb follows the chapters as "Appendix A", its figures "Figure A.1", its sections A.1."""
    image = {"output_type": "display_data", "data": {"image/png": _png(600, 200)}, "metadata": {}}
    chapter = _tiny_notebook(tmp_path, [_md("# Two\n\nSee Figure A.1.\n\n## A section\n\nText.")], "02_two.ipynb")
    appendix = _tiny_notebook(tmp_path, [
        _md("# Tools\n\n## Tensors\n\nFigure A.1 and Figure 5.9 (not in this document)."),
        _code("plot()", [image]), _md("**Figure A.1.** A picture. It shows, e.g., nothing much."),
    ], "A_tools.ipynb")
    assert [n for n, _ in build.chapter_notebooks(tmp_path)] == [2, "A"]
    assert build.chapter_notebooks(tmp_path, "a") == [("A", appendix)]
    pdf = build.build_document([(2, chapter), ("A", appendix)], tmp_path / "out", "t", "x")
    text = _text(pypdf.PdfReader(pdf))
    assert "Appendix A" in text and "A.1 Tensors" in text and "2.1 A section" in text
    assert text.count("Figure A.1") >= 3  # the list of figures, the caption and two references
    # the list of figures shows the caption's first sentence, the figure all of it
    assert text.count("A picture.") == 2 and text.count("nothing much") == 1, text
    typ = (tmp_path / "out" / "t.typ").read_text(encoding="utf-8")
    assert "#appendix-start(0)" in typ and "<fig-A-1>" in typ and "#link(<fig-A-1>)" in typ


def test_spaces_at_the_edges_of_inline_code_are_shown():
    """Pandoc drops them, and ` low` is another token than `low`."""
    text = "in ` low` and `re` and (` `,`l`) and `    ` and `a ` and `` `x` `` here"
    assert build._visible_edge_spaces(text) == "in `␣low` and `re` and (`␣`,`l`) and `␣␣␣␣` and `a␣` and `` `x` `` here"


def test_thousands_separators_in_math_have_no_space():
    import pypandoc

    md = build.mark_math_thousands("$d = 1{,}024$ and $10{,}000{,}000 x$ and $a \\, b$ and $(64, 128)$")
    typ = build.fix_typst(pypandoc.convert_text(md, "typst", format="markdown"))
    assert '1","024' in typ and '10","000","000' in typ and "a thin b" in typ, typ  # a thin space elsewhere stays
    assert "64 \\, 128" in typ, typ  # the comma of a tuple is not a thousands separator


def test_fenced_blocks_are_found_also_inside_list_items():
    """Text rewrites skip code blocks; a block indented under an exercise must not be read as prose."""
    md = "1. Run this:\n\n   ```python\n   x = ` a `\n   ```\n\n2. and `  b`\n```\ny\n```\n"
    parts = build.split_fenced(md)
    assert parts[1] == "   ```python\n   x = ` a `\n   ```" and parts[3] == "```\ny\n```", parts
    assert "".join(parts) == md


def test_lint_catches_what_printed_badly():
    bad = [
        '$ "Attention" \\( Q \\) = "softmax" #h(-1em) (frac(a, b)) $',
        '$ "LayerNorm" \\( x \\) $',
        "$ a dot.circle b $",
    ]
    for text in bad:
        assert build.lint_typst(text), text
    assert build.lint_typst('$ op("softmax") \\( z \\) $ and ```python\nprint("x" \\( 1)\n```') == []
    assert build.fix_typst("$ a dot.circle b $") == "$ a dot.o b $"


@pytest.mark.slow
def test_a_missing_glyph_fails_the_build(tmp_path, monkeypatch):
    nb = _tiny_notebook(tmp_path, [_md("# A chapter\n\nA character no font here has: \U00012000.")], "00_x.ipynb")
    with pytest.raises(SystemExit, match="U\\+12000"):
        build.build_document([(0, nb)], tmp_path / "out", "x", "test")
    ok = _tiny_notebook(tmp_path, [_md("# A chapter\n\n日本語, an emoji 😀, arrows → ↪ and Greek αβγ.")], "00_y.ipynb")
    pdf = build.build_document([(0, ok)], tmp_path / "out", "y", "test")
    assert "日本語" in pypdf.PdfReader(pdf).pages[-1].extract_text()


@pytest.mark.slow
def test_no_page_is_a_runt(built):
    # A page holding a line or two of a chapter's end reads as a mistake (the title page is short
    # by design). Each page's first line is its running header.
    for stem in ("book", "solutions", "exercises"):
        reader = pypdf.PdfReader(built / f"{stem}.pdf")
        for number, page in enumerate(reader.pages[1:], start=2):
            lines = [line for line in page.extract_text().splitlines() if line.strip()]
            assert len(lines) >= 4, f"{stem}.pdf page {number} holds only {lines}"


@pytest.mark.parametrize("path", NOTEBOOKS + SOLUTIONS, ids=lambda p: p.relative_to(CHAPTERS).as_posix())
def test_headings_have_no_math(path):
    # PDF bookmarks are plain text: "$1/\sqrt{d_k}$" in a heading becomes "1 / dk" there.
    # Write such headings with Unicode (1/√dₖ) instead.
    nb = json.loads(path.read_text(encoding="utf-8"))
    headings = [line for c in nb["cells"] if c["cell_type"] == "markdown"
                for line in "".join(c["source"]).splitlines() if line.startswith("#")]
    assert not [h for h in headings if "$" in h]
