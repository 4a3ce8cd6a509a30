"""The student edition (book/student.py) and the grader (book/grade.py).

The exercise notebooks must give nothing away: no line of a solution, no output, no
discussion of the answer, while keeping every check. The grader is run end to end on a
tiny fabricated chapter, so that it stays fast: one student solves everything, another
has a right answer, a wrong one and an endless loop.
"""

from __future__ import annotations

import copy
import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CHAPTERS = ROOT / "chapters"
SOLUTIONS = sorted((CHAPTERS / "solutions").glob("[0-9][0-9]_*.ipynb")) + sorted((CHAPTERS / "solutions").glob("[A-Z]_*.ipynb"))
sys.path.insert(0, str(ROOT / "book"))

import grade  # noqa: E402
import student  # noqa: E402
from student import MARKER, exercise_notebook  # noqa: E402


def _load(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def _lines(nb: dict) -> set[str]:
    return {
        line.strip()
        for cell in nb["cells"]
        for line in student.source(cell).splitlines()
        if line.strip()
    }


def _split_solution_lines(nb: dict) -> tuple[set[str], set[str]]:
    """(stripped lines inside solution blocks, stripped lines outside them)."""
    inside, outside = set(), set()
    for cell in nb["cells"]:
        lines = student.source(cell).splitlines()
        blocks = student.solution_blocks(student.source(cell))
        for number, line in enumerate(lines, 1):
            if not line.strip() or MARKER.match(line):
                continue
            within = any(begin < number < end for begin, end in blocks)
            (inside if within else outside).add(line.strip())
    return inside, outside


def _asserts(text: str) -> list[str]:
    return [
        line.strip() for line in text.splitlines() if line.strip().startswith("assert")
    ]


# --- the real solutions notebooks ---------------------------------------------------


def test_there_are_solutions():
    assert SOLUTIONS, "no solutions notebooks under chapters/solutions/"


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_exercise_notebook_gives_no_solution_away(path):
    nb = _load(path)
    original = copy.deepcopy(nb)
    ex = exercise_notebook(nb)
    assert nb == original, "exercise_notebook must not change its argument"

    inside, outside = _split_solution_lines(nb)
    leaked = sorted((inside - outside) & _lines(ex))
    assert not leaked, (
        f"{path.name}: solution lines left in the exercises: {leaked[:5]}"
    )
    for cell in ex["cells"]:
        text = student.source(cell)
        assert not any(MARKER.match(line) for line in text.splitlines()), text
        assert "BEGIN SOLUTION" not in text and "END SOLUTION" not in text
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None
            assert "execution" not in cell["metadata"]

    blocks = sum(len(student.solution_blocks(student.source(c))) for c in nb["cells"])
    raises = sum(
        student.source(c).count("raise NotImplementedError")
        for c in ex["cells"]
        if c["cell_type"] == "code"
    )
    assert blocks > 0 and raises == blocks, (
        f"{path.name}: {blocks} solutions, {raises} raises"
    )

    # Every check survives: the assert lines outside the solution blocks.
    kept = _lines(ex)
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            text, _ = student.strip_solutions(student.source(cell), [])
            for line in _asserts(text):
                assert line in kept, f"{path.name}: check lost: {line}"

    title = student.source(ex["cells"][0]).splitlines()[0]
    assert title.startswith(("# Exercises for chapter ", "# Exercises for appendix ")), title


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_exercise_notebook_drops_only_the_discussion(path):
    nb = _load(path)
    ex = exercise_notebook(nb)
    labels = student.cell_exercises(nb)
    kept_ids = {c["id"] for c in ex["cells"]}
    solved: set[int] = set()
    answers = False
    for cell, number in zip(nb["cells"], labels, strict=True):
        heading = student._boundary(cell)
        if heading is not None:
            answers = bool(student.ANSWERS_HEADING.match(heading[1]))
        if answers:  # the answers to "Check your understanding" are the teacher's
            assert cell["id"] not in kept_ids, student.source(cell)[:80]
            continue
        if number is None:
            assert cell["id"] in kept_ids, "title, setup and other sections stay"
            continue
        is_solution = cell["cell_type"] == "code" and student.solution_blocks(
            student.source(cell)
        )
        discussion = cell["cell_type"] == "markdown" and number in solved
        assert (cell["id"] in kept_ids) != discussion, student.source(cell)[:80]
        if is_solution:
            solved.add(number)
    for cell, number in zip(ex["cells"], student.cell_exercises(ex), strict=True):
        if number is not None:
            assert cell["metadata"]["minillm"] == {"exercise": number}
        else:
            assert "minillm" not in cell["metadata"]
        heading = student._boundary(cell)
        if heading is not None and number is not None:  # no discussion before its heading
            assert student.source(cell).lstrip().startswith(heading[1]), heading


def test_a_discussion_in_the_cell_of_the_next_heading_and_the_answers_are_dropped():
    def md(text: str, id_: str) -> dict:
        return {"cell_type": "markdown", "id": id_, "metadata": {}, "source": text}

    def code(text: str, id_: str) -> dict:
        return {"cell_type": "code", "id": id_, "metadata": {}, "source": text,
                "outputs": [], "execution_count": None}

    nb = {"cells": [
        md("# Solutions to chapter 1: x", "t"),
        md("## Exercise 1: one\n\nDo it.", "e1"),
        code("### BEGIN SOLUTION\nx = 1\n### END SOLUTION\nassert x == 1", "s1"),
        md("The answer is one, because.\n\n## Exercise 2: two\n\nDo that.", "e2"),
        code("### BEGIN SOLUTION\ny = 2\n### END SOLUTION\nassert y == 2", "s2"),
        md("## Answers to \"Check your understanding\"\n\n1. Because.", "a"),
        md("More answers.", "a2"),
    ], "metadata": {}, "nbformat": 4, "nbformat_minor": 5}
    ex = exercise_notebook(nb)
    text = "\n".join(student.source(c) for c in ex["cells"])
    assert [c["id"] for c in ex["cells"]] == ["t", "e1", "s1", "e2", "s2"]
    assert "because" not in text and "Because" not in text and "More answers" not in text
    assert student.source(ex["cells"][3]).startswith("## Exercise 2: two")


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_every_solution_is_checked(path):
    """Each solution block is followed by an assert: in its own cell after END, or in a
    later cell of the same exercise (nbval runs them; this checks that they exist)."""
    nb = _load(path)
    labels = student.cell_exercises(nb)
    unchecked = []
    for index, (cell, number) in enumerate(zip(nb["cells"], labels, strict=True)):
        text = student.source(cell)
        if cell["cell_type"] != "code" or not student.solution_blocks(text):
            continue
        after_end = text.splitlines()[student.solution_blocks(text)[-1][1] :]
        later = [
            student.source(c)
            for c, n in zip(nb["cells"][index + 1 :], labels[index + 1 :], strict=True)
            if c["cell_type"] == "code" and n == number
        ]
        if number is None or not any(
            _asserts(t) for t in ["\n".join(after_end), *later]
        ):
            unchecked.append(f"cell {index} (exercise {number})")
    assert not unchecked, f"{path.name}: solutions without a check: {unchecked}"


@pytest.mark.parametrize("path", SOLUTIONS, ids=lambda p: p.name)
def test_every_exercise_has_a_marked_solution(path):
    nb = _load(path)
    labels = student.cell_exercises(nb)
    numbers = sorted({n for n in labels if n is not None})
    assert numbers == list(range(1, len(numbers) + 1)), f"{path.name}: {numbers}"
    for number in numbers:
        assert any(
            student.solution_blocks(student.source(c))
            for c, n in zip(nb["cells"], labels, strict=True)
            if n == number and c["cell_type"] == "code"
        ), f"{path.name}: exercise {number} has no ### BEGIN SOLUTION block"


def test_write_student(tmp_path):
    out = tmp_path / "student"
    written = student.write_student(out)
    names = {p.relative_to(out).as_posix() for p in written}
    chapters = sorted(CHAPTERS.glob("[0-9][0-9]_*.ipynb")) + sorted(CHAPTERS.glob("[A-Z]_*.ipynb"))
    assert {p.name for p in chapters} <= names
    assert {f"exercises/{p.name.split('_')[0]}_exercises.ipynb" for p in SOLUTIONS} <= names
    assert "README.md" in names and all(p.is_file() for p in written)
    assert not list(out.rglob("*solutions*")), "no solutions in the student folder"
    for path in chapters:
        copied = (out / path.name).read_text(encoding="utf-8")
        # Unchanged but for image links, which point at the folder's own figures/.
        restored = json.loads(copied.replace("](figures/", "](../figures/"))
        assert restored == _load(path), path.name
        for link in re.findall(r"!\[[^\]]*\]\(([^)\s]+)\)", copied):
            if "://" not in link:
                assert (out / link).is_file(), f"{path.name}: broken image {link}"
    # A second run replaces the folder whole: nothing stale is kept.
    (out / "stale.txt").write_text("old", encoding="utf-8")
    student.write_student(out)
    assert not (out / "stale.txt").exists()


def test_write_student_refuses_unsafe_outputs(tmp_path):
    for out in [CHAPTERS, CHAPTERS / "solutions" / "x", ROOT]:
        with pytest.raises(SystemExit, match="overlaps the input"):
            student.write_student(out)
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me", encoding="utf-8")
    with pytest.raises(SystemExit, match="was not written by"):
        student.write_student(foreign)
    assert (foreign / "notes.txt").read_text(encoding="utf-8") == "keep me"


# --- exercise_notebook on small notebooks -------------------------------------------


def _md(text: str) -> dict:
    return {"cell_type": "markdown", "metadata": {}, "source": text}


def _code(text: str) -> dict:
    return {
        "cell_type": "code",
        "execution_count": 1,
        "metadata": {},
        "outputs": [{"output_type": "stream", "name": "stdout", "text": "out\n"}],
        "source": text,
    }


def _nb(*cells: dict) -> dict:
    return {
        "cells": list(cells),
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    }


@pytest.mark.parametrize(
    "code, message",
    [
        ("### BEGIN SOLUTION\nx = 1", "never closed"),
        ("### BEGIN SOLUTION\n### BEGIN SOLUTION\nx = 1\n### END SOLUTION", "nest"),
        ("x = 1\n### END SOLUTION", "has no '### BEGIN SOLUTION'"),
    ],
)
def test_unbalanced_markers_are_refused(code, message):
    nb = _nb(_md("# Solutions to chapter 9: t"), _md("## Exercise 1: a"), _code(code))
    with pytest.raises(student.MarkerError, match=message) as err:
        exercise_notebook(nb)
    assert "cell 2" in str(err.value) and "exercise 1" in str(err.value)


def test_repeated_exercise_numbers_are_refused():
    nb = _nb(_md("## Exercise 1: a"), _code("x = 1"), _md("## Exercise 1: b"))
    with pytest.raises(student.MarkerError, match="Exercise 1"):
        exercise_notebook(nb)


def test_appendix_solutions_are_retitled_as_exercises():
    nb = _nb(_md("# Solutions to appendix A: tools\n\nSolved between `### BEGIN SOLUTION` and "
                 "`### END SOLUTION`. We first load things."), _code("x = 1"))
    title = student.source(exercise_notebook(nb)["cells"][0])
    assert title.startswith("# Exercises for appendix A: tools") and "We first load things." in title
    assert "BEGIN SOLUTION" not in title


def test_exercise_notebook_structure():
    nb = _nb(
        _md(
            "# Solutions to chapter 9: tests\n\nSolved between `### BEGIN SOLUTION` "
            "and "
            "`### END SOLUTION`. We first load things."
        ),
        _code("x = 2"),
        _md("## Exercise 1: inside a function\n\nWrite f."),
        _code(
            "def f(y):\n    ### BEGIN SOLUTION\n    return x * y\n"
            "    ### END SOLUTION\n"
        ),
        _code("assert f(2) == 4"),
        _md("Because x is 2."),
        _md("## Check your understanding\n\nWhy?"),
        _md("Think about it."),
        _code("### BEGIN SOLUTION\nanswer = 42\n### END SOLUTION\nprint(answer)"),
    )
    nb["cells"][4]["source"] = ["assert f(2) == 4\n", "assert f(0) == 0"]
    ex = exercise_notebook(nb)
    texts = [student.source(c) for c in ex["cells"]]
    assert texts[0].startswith("# Exercises for chapter 9: tests\n\n")
    assert "We first load things." in texts[0] and "SOLUTION" not in texts[0]
    assert texts[3] == (
        "def f(y):\n    # YOUR CODE HERE\n"
        '    raise NotImplementedError("Exercise 1: write your solution here")\n'
    )
    assert ex["cells"][4]["source"] == ["assert f(2) == 4\n", "assert f(0) == 0"]
    assert "Because x is 2." not in texts, "the discussion gives the answer away"
    # Another section ends the exercise: its cells stay and belong to no exercise.
    assert texts[5:7] == ["## Check your understanding\n\nWhy?", "Think about it."]
    assert texts[7] == (
        '# YOUR CODE HERE\nraise NotImplementedError("Write your solution here")\n'
        "print(answer)"
    )
    assert [c["metadata"].get("minillm") for c in ex["cells"]] == [
        None, None, {"exercise": 1}, {"exercise": 1}, {"exercise": 1}, None, None, None
    ]  # fmt: skip
    assert all(not c.get("outputs") for c in ex["cells"])


# --- grading ------------------------------------------------------------------------


def _fixture_solutions() -> dict:
    """A chapter 42 with three tiny exercises. Its setup checks that the kernel runs
    this interpreter and imports minillm from this checkout."""
    probe = (
        "import importlib.util\nimport sys\n\n"
        f"assert sys.prefix == {sys.prefix!r}, sys.executable\n"
        'spec = importlib.util.find_spec("minillm")\n'
        f"assert spec.origin.startswith({str(ROOT / 'src')!r}), spec.origin\n"
        "FACTOR = 2"
    )
    return _nb(
        _md("# Solutions to chapter 42: tiny\n\nEach exercise is restated, solved "
            "between `### BEGIN SOLUTION` and `### END SOLUTION`, and checked."),
        _code(probe),
        _md("## Exercise 1: double\n\nWrite `double(x)`."),
        _code("### BEGIN SOLUTION\ndef double(x):\n    return FACTOR * x\n"
              "### END SOLUTION"),
        _code("assert double(3) == 6"),
        _md("Multiply by `FACTOR`."),
        _md("## Exercise 2: squares\n\nList the squares below 5."),
        _code("### BEGIN SOLUTION\nsquares = [i * i for i in range(5)]\n"
              "### END SOLUTION\nprint(squares)"),
        _code("assert squares == [0, 1, 4, 9, 16]"),
        _md("## Exercise 3: a total\n\nWrite `total(n)`, the sum of 0 to n - 1."),
        _code("def total(n):\n    ### BEGIN SOLUTION\n    return sum(range(n))\n"
              "    ### END SOLUTION"),
        _code("assert total(4) == 6"),
    )  # fmt: skip


def _fill(nb: dict, answers: dict[int, str]) -> dict:
    """The student's notebook: each exercise's placeholder replaced by its answer."""
    nb = copy.deepcopy(nb)
    placeholder = re.compile(
        r"^([ \t]*)# YOUR CODE HERE\n[ \t]*raise NotImplementedError.*$", re.M
    )
    for cell in nb["cells"]:
        number = cell["metadata"].get("minillm", {}).get("exercise")
        if number in answers and placeholder.search(student.source(cell)):
            indent = placeholder.search(student.source(cell)).group(1)
            answer = "\n".join(indent + line for line in answers[number].splitlines())
            cell["source"] = placeholder.sub(
                lambda _, a=answer: a, student.source(cell)
            )
    return nb


RIGHT = {
    1: "def double(x):\n    return FACTOR * x",
    2: "squares = [i * i for i in range(5)]",
    3: "return sum(range(n))",
}


def _write(path: Path, nb: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(nb, indent=1), encoding="utf-8")


def test_appendix_exercises_are_named_and_graded_by_letter():
    """A_solutions.ipynb gives A_exercises.ipynb, graded as exercises A.1, A.2, ..."""
    for name in ("A_exercises.ipynb", "A_exercises (1).ipynb", "B_solutions.ipynb", "02_exercises.ipynb"):
        assert grade.SUBMISSION_NAME.match(name), name
    for name in ("AB_exercises.ipynb", "a_exercises.ipynb", "2_exercises.ipynb"):
        assert not grade.SUBMISSION_NAME.match(name), name
    assert grade.SUBMISSION_NAME.match("A_exercises.ipynb").group(1) == "A"
    assert (grade.exercise_id("A", 2), grade.exercise_id("02", 3)) == ("A.2", "02.3")


@pytest.mark.slow
def test_grade_end_to_end(tmp_path):
    solutions = _fixture_solutions()
    _write(tmp_path / "reference" / "42_solutions.ipynb", solutions)
    exercises = exercise_notebook(solutions)
    subs = tmp_path / "submissions"
    _write(subs / "alice" / "42_exercises.ipynb", _fill(exercises, RIGHT))
    bob = {1: RIGHT[1], 2: "squares = []\nwhile True:\n    pass", 3: "return n"}
    _write(subs / "bob" / "42_exercises.ipynb", _fill(exercises, bob))
    out = tmp_path / "grades"
    run = subprocess.run(
        [sys.executable, str(ROOT / "book" / "grade.py"), str(subs), "--timeout", "5",
         "--out", str(out), "--reference", str(tmp_path / "reference")],
        capture_output=True, text=True, timeout=120, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout + run.stderr
    with open(out / "grades.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    assert rows == [
        ["student", "notebook", "exercise", "passed"],
        ["alice", "42_exercises.ipynb", "42.1", "1"],
        ["alice", "42_exercises.ipynb", "42.2", "1"],
        ["alice", "42_exercises.ipynb", "42.3", "1"],
        ["bob", "42_exercises.ipynb", "42.1", "1"],
        ["bob", "42_exercises.ipynb", "42.2", "0"],
        ["bob", "42_exercises.ipynb", "42.3", "0"],
    ], run.stdout + run.stderr
    alice = (out / "feedback" / "alice.md").read_text(encoding="utf-8")
    assert "Total: 3 of 3" in alice and "FAIL" not in alice
    bob_md = (out / "feedback" / "bob.md").read_text(encoding="utf-8")
    assert "Exercise 42.1 (double): PASS" in bob_md
    assert "Exercise 42.2 (squares): FAIL: timed out after 5s" in bob_md
    # The cells after the endless loop still ran: exercise 3 failed on its own check.
    assert (
        "Exercise 42.3 (a total): FAIL: AssertionError in `assert total(4) == 6`"
        in bob_md
    )
    assert "Total: 1 of 3" in bob_md
    assert (out / "executed" / "bob" / "42_exercises.ipynb").is_file()
    assert "bob" in run.stdout and "1/3" in run.stdout


@pytest.mark.slow
def test_grade_bad_input(tmp_path):
    cmd = [
        sys.executable,
        str(ROOT / "book" / "grade.py"),
        "--out",
        str(tmp_path / "o"),
    ]
    run = subprocess.run(
        [*cmd, str(tmp_path / "nowhere")], capture_output=True, text=True
    )
    assert run.returncode == 2 and "is not a folder" in run.stderr
    (tmp_path / "subs" / "dave").mkdir(parents=True)
    (tmp_path / "subs" / "dave" / "notes.txt").write_text(
        "no notebook", encoding="utf-8"
    )
    run = subprocess.run([*cmd, str(tmp_path / "subs")], capture_output=True, text=True)
    assert run.returncode == 2 and "nothing to grade" in run.stderr
    assert "dave" in run.stderr


def _outcome(nb: dict, errors: dict[int, str]) -> dict[int, str | None]:
    return {
        i: errors.get(i)
        for i, c in enumerate(nb["cells"])
        if c["cell_type"] == "code" and student.source(c).strip()
    }


def test_grade_cells():
    solutions = _fixture_solutions()
    nb = _fill(exercise_notebook(solutions), RIGHT)
    # Its cells: 0 title, 1 setup, 2-4 exercise 1, 5-7 exercise 2, 8-10 exercise 3.

    def verdicts(errors, notebook=nb, reference=None):
        results = grade.grade_cells(notebook, _outcome(notebook, errors), reference)
        return {r.exercise: (r.passed, r.reason) for r in results}

    assert verdicts({}) == {1: (True, ""), 2: (True, ""), 3: (True, "")}
    assert verdicts({6: "timed out after 5s"})[2] == (False, "timed out after 5s")
    setup = verdicts({1: "ModuleNotFoundError: No module named 'minillm'"})
    assert all(
        reason == "the setup failed: ModuleNotFoundError: No module named 'minillm'"
        for _, reason in setup.values()
    )
    # Deleting a failing check does not pass, once the reference is known.
    tampered = copy.deepcopy(nb)
    tampered["cells"][10]["source"] = "pass"
    assert verdicts({}, tampered)[3] == (True, "")
    passed, reason = verdicts({}, tampered, solutions)[3]
    assert not passed and "assert total(4) == 6" in reason
    # An exercise the student deleted still counts, and fails.
    del tampered["cells"][8:11]
    passed, reason = verdicts({}, tampered, solutions)[3]
    assert not passed and "missing" in reason


def test_describe_error():
    tb = ["\x1b[0;31mAssertionError\x1b[0m", "Cell In[3], line 2\n      1 x = 1\n"
          "\x1b[0;32m----> 2\x1b[0m assert x == 2\n"]  # fmt: skip
    assert (
        grade.describe_error({"ename": "AssertionError", "evalue": "", "traceback": tb})
        == "AssertionError in `assert x == 2`"
    )
    content = {"ename": "ValueError", "evalue": "bad\nmore", "traceback": []}
    assert grade.describe_error(content) == "ValueError: bad"
