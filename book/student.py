"""Write the student edition: the chapters, and the exercises without their solutions.

A solutions notebook (chapters/solutions/NN_solutions.ipynb) marks each solution with
lines `### BEGIN SOLUTION` and `### END SOLUTION` (nbgrader's convention). The exercise
notebook keeps the title, the setup, each exercise's statement and its checks, and
replaces every marked block with a `raise NotImplementedError(...)`; the discussion
after a solution is dropped, since it gives the answer away, and so is a section of
answers (`## Answers ...`, to the chapter's "Check your understanding"); no cell keeps
an output.

Usage: python book/student.py [--out build/student]

`exercise_notebook` is pure (a notebook dict in, a new one out), and this module imports
only copy, json, re and pathlib at the top, so book/build.py can import it cheaply.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ROOT / "chapters"
DEFAULT_OUT = ROOT / "build" / "student"

# `### BEGIN SOLUTION` / `### END SOLUTION`, however many `#`. Trailing words are
# allowed, so that a marker like `### BEGIN SOLUTION (part a)` never reaches a student.
MARKER = re.compile(r"^(?P<indent>[ \t]*)#+[ \t]*(?P<kind>BEGIN|END)[ \t]+SOLUTION\b")
EXERCISE_HEADING = re.compile(r"^##[ \t]+Exercise[ \t]+(\d+)\b")
# A section of answers (to a chapter's "Check your understanding"): for the teacher only.
ANSWERS_HEADING = re.compile(r"^##[ \t]+Answers\b")
_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+\S")
_FENCE = re.compile(r"^ {0,3}(```|~~~)")
_TITLE = re.compile(r"^(#[ \t]+)Solutions to (chapter|appendix)\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")
_NB_NAME = re.compile(r"^(\d\d|[A-Z])_.*\.ipynb$")  # chapters 00_..., appendices A_...
# Lines that steer nbval, not the reader (book/build.py drops them from the PDF too).
_HARNESS_LINE = re.compile(r"^[ \t]*#[ \t]*NBVAL_\w+.*\n?", re.MULTILINE)
_MD_IMAGE = re.compile(r"(!\[[^\]]*\]\()([^)\s]+)(\))")

# Wrapped like the notebooks' own markdown.
STUDENT_INTRO = (
    "Each exercise is stated, then a cell marks where your solution goes with\n"
    "`# YOUR CODE HERE` and `raise NotImplementedError(...)`: replace those two lines "
    "with your\ncode, then run the cells after it, whose `assert` statements check "
    "your answer. Leave the\nchecks as they are: the grader runs them."
)
README_TITLE = "# minillm: the chapters and their exercises"


class MarkerError(ValueError):
    """Unbalanced `### BEGIN/END SOLUTION` lines, or a repeated exercise number."""


# --- notebook structure (shared with book/grade.py) ---------------------------------


def source(cell: dict) -> str:
    """A cell's source as one string (notebooks store a string or a list of lines)."""
    src = cell.get("source", "")
    return src if isinstance(src, str) else "".join(src)


def _set_source(cell: dict, text: str) -> None:
    # Keep the representation the file used, so a rewritten notebook diffs cleanly.
    if isinstance(cell.get("source"), list):
        cell["source"] = text.splitlines(keepends=True)
    else:
        cell["source"] = text


def first_heading(text: str) -> tuple[int, str] | None:
    """(level, line) of the first ATX heading of markdown `text`, outside fences."""
    fenced = False
    for line in text.splitlines():
        if _FENCE.match(line):
            fenced = not fenced
        elif not fenced and (m := _HEADING.match(line)):
            return len(m.group(1)), line.strip()
    return None


def _boundary(cell: dict) -> tuple[int, str] | None:
    """The heading (level 1 or 2) that opens a section, if `cell` is markdown."""
    if cell.get("cell_type") != "markdown":
        return None
    heading = first_heading(source(cell))
    return heading if heading and heading[0] <= 2 else None


def _metadata_exercise(cell: dict) -> int | None:
    value = cell.get("metadata", {}).get("minillm", {}).get("exercise")
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def cell_exercises(nb: dict) -> list[int | None]:
    """The exercise number of each cell, or None for cells outside every exercise.

    A markdown cell whose first heading is `## Exercise N` opens exercise N, and any
    other heading of level 1 or 2 (say `## Check your understanding`) closes it. A cell
    whose metadata is {"minillm": {"exercise": N}} (exercise_notebook writes it) belongs
    to N whatever the headings say, since students may edit a heading; a cell with
    neither follows the cell before it, so the cells a student inserts join the exercise
    they sit in.
    """
    labels: list[int | None] = []
    current: int | None = None
    for cell in nb.get("cells", []):
        marked = _metadata_exercise(cell)
        heading = _boundary(cell)
        if marked is not None:
            current = marked
        elif heading is not None:
            m = EXERCISE_HEADING.match(heading[1])
            current = int(m.group(1)) if m else None
        labels.append(current)
    return labels


def exercise_titles(nb: dict) -> dict[int, str]:
    """Exercise number -> its heading's title ("the variance of a dot product")."""
    titles: dict[int, str] = {}
    for cell in nb.get("cells", []):
        heading = _boundary(cell)
        if heading and (m := EXERCISE_HEADING.match(heading[1])):
            title = heading[1][m.end() :].lstrip(" \t:.-")
            titles.setdefault(int(m.group(1)), title)
    return titles


def solution_blocks(text: str) -> list[tuple[int, int]]:
    """(begin, end) line numbers (1-based, markers included) of each marked block.

    Raises MarkerError on a BEGIN inside a block, an END outside one, or a BEGIN that
    is never closed.
    """
    blocks = []
    begin = None
    for number, line in enumerate(text.splitlines(), 1):
        m = MARKER.match(line)
        if not m:
            continue
        if m.group("kind") == "BEGIN":
            if begin is not None:
                raise MarkerError(
                    f"'### BEGIN SOLUTION' on line {number} is inside the block opened "
                    f"on line {begin}; add '### END SOLUTION' before it (blocks do not "
                    "nest)"
                )
            begin = number
        else:
            if begin is None:
                raise MarkerError(
                    f"'### END SOLUTION' on line {number} has no '### BEGIN SOLUTION' "
                    "before it; add one where the solution starts, or remove this line"
                )
            blocks.append((begin, number))
            begin = None
    if begin is not None:
        raise MarkerError(
            f"'### BEGIN SOLUTION' on line {begin} is never closed; add "
            "'### END SOLUTION' after the last line of the solution"
        )
    return blocks


def strip_solutions(text: str, placeholder: list[str]) -> tuple[str, int]:
    """Replace each marked block of `text` by the `placeholder` lines, indented like its
    BEGIN line; returns the new text and the number of blocks replaced."""
    blocks = solution_blocks(text)
    if not blocks:
        return text, 0
    lines = text.splitlines(keepends=True)
    out: list[str] = []
    position = 0
    for begin, end in blocks:
        out.extend(lines[position : begin - 1])
        indent = MARKER.match(lines[begin - 1]).group("indent")  # type: ignore[union-attr]
        out.extend(f"{indent}{line}\n" for line in placeholder)
        position = end
    out.extend(lines[position:])
    new = "".join(out)
    if not text.endswith("\n"):
        new = new.removesuffix("\n")  # notebooks store cells without a final newline
    return new, len(blocks)


def _code_placeholder(exercise: int | None) -> list[str]:
    what = f"Exercise {exercise}: write" if exercise is not None else "Write"
    return [
        "# YOUR CODE HERE",
        f'raise NotImplementedError("{what} your solution here")',
    ]


# --- the exercise notebook ----------------------------------------------------------


def exercise_notebook(nb: dict) -> dict:
    """The student version of a solutions notebook, as a new notebook dict.

    Every marked solution becomes `# YOUR CODE HERE` and
    `raise NotImplementedError(...)`; the checks stay; the markdown after an exercise's
    first solution cell (the discussion) is dropped; every output and execution count is
    cleared; the cells of exercise N get the metadata {"minillm": {"exercise": N}};
    "Solutions to chapter N" becomes "Exercises for chapter N". Raises MarkerError on
    unbalanced markers or a repeated exercise number.
    """
    student = copy.deepcopy(nb)
    labels = cell_exercises(student)
    _check_unique_exercises(student)
    cells = []
    # Once an exercise has shown its solution, its markdown discusses the answer.
    answered = False
    answers = False  # inside a section of answers to the chapter's questions
    for index, (cell, exercise) in enumerate(
        zip(student.get("cells", []), labels, strict=True)
    ):
        kind = cell.get("cell_type")
        heading = _boundary(cell)
        if heading is not None:
            answers = bool(ANSWERS_HEADING.match(heading[1]))
            if answered:  # a discussion may end in the cell that opens the next section
                _drop_before_heading(cell, heading[1])
            answered = False
        if answers:
            continue
        if kind == "markdown" and answered and exercise is not None and heading is None:
            continue
        if kind in ("code", "markdown"):
            try:
                blocks = _strip_cell(cell, exercise)
            except MarkerError as e:
                where = (
                    f"exercise {exercise}" if exercise is not None else "no exercise"
                )
                if "id" in cell:
                    where = f"id {cell['id']}, {where}"
                raise MarkerError(f"cell {index} ({where}): {e}") from None
            answered = answered or (
                blocks > 0 and kind == "code" and exercise is not None
            )
        if kind == "code":
            cell["outputs"] = []
            cell["execution_count"] = None
        metadata = cell.setdefault("metadata", {})
        metadata.pop("execution", None)  # timings of the instructor's run
        if exercise is not None:
            metadata["minillm"] = {**metadata.get("minillm", {}), "exercise": exercise}
        cells.append(cell)
    student["cells"] = cells
    _retitle(student)
    return student


def _drop_before_heading(cell: dict, heading: str) -> None:
    """Keep a markdown cell from the line `heading` on (the text before it discusses
    the previous exercise's answer)."""
    lines = source(cell).splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.strip() == heading)
    if any(line.strip() for line in lines[:start]):
        _set_source(cell, "".join(lines[start:]))


def _strip_cell(cell: dict, exercise: int | None) -> int:
    """Strip the solutions (and nbval's harness lines) from one cell, in place; returns
    the number of solution blocks it held."""
    original = source(cell)
    if cell["cell_type"] == "code":
        text, blocks = strip_solutions(original, _code_placeholder(exercise))
        text = _HARNESS_LINE.sub("", text)
        if not original.endswith("\n"):
            text = text.rstrip("\n")
    else:  # nbgrader also marks written answers in markdown
        text, blocks = strip_solutions(original, ["YOUR ANSWER HERE"])
    if text != original:
        _set_source(cell, text)
    return blocks


def _check_unique_exercises(nb: dict) -> None:
    seen: dict[int, int] = {}
    for index, cell in enumerate(nb.get("cells", [])):
        heading = _boundary(cell)
        if heading and (m := EXERCISE_HEADING.match(heading[1])):
            number = int(m.group(1))
            if number in seen:
                raise MarkerError(
                    f"'## Exercise {number}' heads cells {seen[number]} and {index}; "
                    "number the exercises of a notebook uniquely"
                )
            seen[number] = index


def _retitle(nb: dict) -> None:
    """ "Solutions to chapter N: ..." -> "Exercises for chapter N: ..." (or appendix A), and the intro's
    sentences about the markers -> how to fill in the exercises."""
    for cell in nb.get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        text = source(cell)
        title, _, rest = text.partition("\n")
        if not _TITLE.match(title):
            return  # only the notebook's first markdown cell can be its title
        title = _TITLE.sub(
            lambda m: m.group(1) + "Exercises for " + m.group(2), title, count=1
        )
        paragraphs = [p for p in re.split(r"\n[ \t]*\n", rest.strip("\n")) if p.strip()]
        replaced = False
        for i, paragraph in enumerate(paragraphs):
            if "SOLUTION" not in paragraph:
                continue
            # Keep the sentences about something else ("We first rebuild ...").
            kept = [s for s in _SENTENCE_END.split(paragraph) if "SOLUTION" not in s]
            paragraphs[i] = " ".join(([] if replaced else [STUDENT_INTRO]) + kept)
            replaced = True
        if not replaced:
            paragraphs.insert(0, STUDENT_INTRO)
        paragraphs = [p for p in paragraphs if p.strip()]
        _set_source(cell, "\n\n".join([title, *paragraphs]))
        return


# --- the student folder -------------------------------------------------------------


def _dumps(nb: dict) -> str:
    # nbformat's own layout, so the files diff cleanly against the repository's.
    return json.dumps(nb, indent=1, sort_keys=True, ensure_ascii=False) + "\n"


def check_out_dir(out: Path, inputs: list[Path], marker: str, writer: str) -> Path:
    """Refuse an output folder that would swallow an input or someone else's files.

    The folder is replaced whole, so it must not be, or contain, an input; and if it
    exists and is not empty, it must hold `marker` (a file that an earlier run of
    `writer` wrote). Creates its parent; returns `out`.
    """
    resolved = out.resolve()
    for item in inputs:
        src = item.resolve()
        if resolved == src or resolved in src.parents or src in resolved.parents:
            raise SystemExit(
                f"error: the output folder {out} overlaps the input {item}; "
                "choose another --out, such as build/..."
            )
    if out.exists():
        if not out.is_dir():
            raise SystemExit(f"error: {out} is a file; choose a folder for --out")
        if any(out.iterdir()) and not (out / marker).is_file():
            raise SystemExit(
                f"error: {out} exists and was not written by {writer} (no {marker} in "
                "it); choose another --out, or remove that folder yourself"
            )
    out.parent.mkdir(parents=True, exist_ok=True)
    return out


def _bundle_images(
    nb: dict, nb_dir: Path, depth: int, figures: dict[str, Path]
) -> bool:
    """Point the notebook's local markdown images at figures/ in the student folder and
    note in `figures` what to copy there; `depth`: how deep the notebook sits in it."""
    changed = False

    def rebase(m: re.Match[str]) -> str:
        nonlocal changed
        target = m.group(2)
        if "://" in target or target.startswith(("/", "#", "attachment:", "data:")):
            return m.group(0)
        found = (nb_dir / target).resolve()
        if not found.is_file():
            return m.group(
                0
            )  # a broken link is the book's problem; its tests report it
        if figures.setdefault(found.name, found) != found:
            raise SystemExit(
                f"error: two different images are both named {found.name} "
                f"({figures[found.name]} and {found}); rename one"
            )
        changed = True
        return m.group(1) + "../" * depth + f"figures/{found.name}" + m.group(3)

    for cell in nb.get("cells", []):
        if cell.get("cell_type") == "markdown":
            text = source(cell)
            new = _MD_IMAGE.sub(rebase, text)
            if new != text:
                _set_source(cell, new)
    return changed


def _readme(chapters: list[str], exercises: list[str]) -> str:
    listing = "\n".join(f"- `{name}`" for name in chapters + exercises)
    return f"""{README_TITLE}

This folder holds what you need to work through the book: read and run each chapter,
then do its exercises. `make student` wrote it; do not edit the copy under `build/`,
which the next build replaces.

- `NN_slug.ipynb`: the chapters, stored with their outputs, to read and to run again.
- `exercises/NN_exercises.ipynb`: the exercises of chapter NN. Each exercise is stated,
  then a cell says `# YOUR CODE HERE` and `raise NotImplementedError(...)`: replace
  those two lines with your solution. The cells after it check your answer with
  `assert` statements; leave them as they are, since the grader runs them.
- `figures/`: the images the notebooks show.

The notebooks need the `minillm` package (`make install` in the repository sets up
`.venv`; then `.venv/bin/jupyter lab` in this folder).

To hand in, keep the file names (`NN_exercises.ipynb`) and check that *Restart Kernel
and Run All Cells* works: each notebook is graded top to bottom in a fresh kernel, with
a time limit on every cell, and an exercise passes when all of its cells, checks
included, run without an error.

{listing}
"""


def write_student(out_dir: Path, chapters_dir: Path | None = None) -> list[Path]:
    """Write out_dir/NN_slug.ipynb for each chapter, exercises/NN_exercises.ipynb for
    each solutions notebook, README.md, and the images they show (figures/).

    The chapters are copied as they are, except that local image links are pointed at
    figures/. The folder is built aside and then swapped in whole, so no file of an
    older build lingers. Returns the paths written.
    """
    from minillm.files import (
        atomic_dir,
    )  # imports torch: not for exercise_notebook's users

    chapters_dir = Path(chapters_dir) if chapters_dir is not None else CHAPTERS
    chapters = sorted(p for p in chapters_dir.glob("*.ipynb") if _NB_NAME.match(p.name))
    solutions_dir = chapters_dir / "solutions"
    solutions = sorted(
        p for p in solutions_dir.glob("*.ipynb") if _NB_NAME.match(p.name)
    )
    if not chapters and not solutions:
        raise SystemExit(f"error: no NN_*.ipynb notebooks in {chapters_dir}")
    out_dir = check_out_dir(
        Path(out_dir), [chapters_dir], "README.md", "book/student.py"
    )
    if (out_dir / "README.md").is_file():
        first = (out_dir / "README.md").read_text(encoding="utf-8").partition("\n")[0]
        if first != README_TITLE:
            raise SystemExit(
                f"error: {out_dir} holds a README.md that book/student.py did not "
                "write; choose another --out"
            )

    files: dict[str, str | bytes] = {}  # relative path -> content
    figures: dict[str, Path] = {}
    for path in chapters:
        nb = json.loads(path.read_text(encoding="utf-8"))
        rebased = _bundle_images(nb, path.parent, 0, figures)
        files[path.name] = _dumps(nb) if rebased else path.read_bytes()
    for path in solutions:
        nb = json.loads(path.read_text(encoding="utf-8"))
        try:
            student = exercise_notebook(nb)
        except MarkerError as e:
            raise SystemExit(f"error: {path}: {e}") from None
        _bundle_images(student, path.parent, 1, figures)
        files[f"exercises/{path.name.split('_')[0]}_exercises.ipynb"] = _dumps(student)
    for name, found in figures.items():
        files[f"figures/{name}"] = found.read_bytes()
    files["README.md"] = _readme(
        [p.name for p in chapters],
        [name for name in files if name.startswith("exercises/")],
    )

    with atomic_dir(out_dir, overwrite=True, inputs=[chapters_dir]) as tmp:
        for name, content in files.items():
            target = tmp / name
            target.parent.mkdir(parents=True, exist_ok=True)
            if isinstance(content, bytes):
                target.write_bytes(content)
            else:
                target.write_text(content, encoding="utf-8")
    return [out_dir / name for name in files]


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--out", default=str(DEFAULT_OUT), help="output folder (default build/student)"
    )
    ap.add_argument(
        "--chapters",
        default=str(CHAPTERS),
        help="the chapters folder (default chapters/)",
    )
    args = ap.parse_args(argv)
    written = write_student(Path(args.out), Path(args.chapters))
    out = Path(args.out)
    exercises = sum(p.parent.name == "exercises" for p in written)
    shown = (
        out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
    )
    print(f"wrote {shown}/: {len(written)} files, {exercises} exercise notebooks")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
