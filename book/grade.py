"""Grade exercise notebooks: run each in a fresh kernel and record which exercises pass.

Usage: python book/grade.py SUBMISSIONS [--timeout 60] [--notebook-timeout 600]
                            [--out build/grades] [--reference chapters/solutions]

SUBMISSIONS holds one folder per student, each with one or more notebooks named
NN_exercises.ipynb (or NN_solutions.ipynb), as book/student.py writes them. Each
notebook runs top to bottom in a fresh kernel, in a temporary copy of its student's
folder, with errors allowed and a time limit per cell: an endless loop is interrupted
and fails its own exercise, and the later cells still run. A limit on the whole notebook
stops a kernel that ignores the interrupts. An exercise passes when every one of its
cells, its checks included, ran without an error; an error in the setup (the code before
exercise 1) fails every exercise. When the reference solutions notebook exists
(chapters/solutions/NN_solutions.ipynb), its exercises are the ones graded, and the
checks it holds must still be in the submission.

Writes OUT/grades.csv (student,notebook,exercise,passed), OUT/feedback/<student>.md, and
OUT/executed/<student>/<notebook> (each notebook as it ran, to read the tracebacks).
Exit status: 0 when grading finished, whatever the grades; 2 when an input is missing or
unreadable (named on stderr; the others are still graded).

The students' code runs with your permissions: grade untrusted code in a container.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import os
import re
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

BOOK = Path(__file__).resolve().parent
sys.path.insert(0, str(BOOK))
import student  # noqa: E402  (book/student.py: the exercise structure of a notebook)

ROOT = BOOK.parent
SRC = ROOT / "src"
REFERENCE = ROOT / "chapters" / "solutions"
DEFAULT_OUT = ROOT / "build" / "grades"

# "02_exercises.ipynb", "02_solutions.ipynb", and the copies browsers make of them
# ("02_exercises (1).ipynb").
SUBMISSION_NAME = re.compile(r"^(\d\d|[A-Z])_(exercises|solutions)\b.*\.ipynb$")  # chapters, appendices
TIMEOUT_ENAME = (
    "minillm.grade.Timeout"  # the error nbclient reports for a timed-out cell
)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_ARROW = re.compile(r"^-+>\s*\d+\s(.*)$")  # IPython's "----> 3 assert x == 2"


class InputError(Exception):
    """A submission that cannot be graded as it is: missing, misnamed or unreadable."""


@dataclass
class Result:
    exercise: int
    title: str
    passed: bool
    reason: str = ""  # why it failed: the first line of the error


@dataclass
class Graded:
    student: str
    notebook: str  # the file's name
    chapter: str  # "02", or "A" for an appendix
    results: list[Result] = field(default_factory=list)
    problem: str = ""  # why the notebook could not be graded at all

    @property
    def passed(self) -> int:
        return sum(r.passed for r in self.results)


# --- running a notebook -------------------------------------------------------------


def check_kernel() -> None:
    """Make sure the kernel "python3" runs this interpreter, which imports minillm.

    jupyter_client replaces a kernelspec's plain `python` with sys.executable, but a
    kernelspec in the user's folder may name another interpreter, and wins over ours.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec("python3")
    except NoSuchKernel:
        raise SystemExit(
            "error: no Jupyter kernel named python3; install ipykernel into this "
            "interpreter (make install)"
        ) from None
    exe = spec.argv[0] if spec.argv else ""
    plain = {"python", "python3", "python{}.{}".format(*sys.version_info[:2])}
    if exe not in plain and os.path.abspath(exe) != os.path.abspath(sys.executable):
        raise SystemExit(
            f"error: the python3 kernel ({spec.resource_dir}) runs {exe}, not "
            f"{sys.executable}, so the students' code would not see this minillm; "
            "remove that kernelspec (jupyter kernelspec remove python3) or run the "
            "grader with its interpreter"
        )


def kernel_env() -> dict[str, str]:
    """The kernel's environment: this checkout's src/ first on the path, no GUI."""
    env = dict(os.environ)
    # minillm is installed in editable mode, but possibly from another checkout.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
    env["MPLBACKEND"] = "Agg"
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"  # quiets a debugger warning on stderr
    return env


def describe_error(content: dict) -> str:
    """The first line of an error: "ValueError: bad shape", "timed out after 60s"."""
    ename = content.get("ename") or "Error"
    evalue = str(content.get("evalue") or "")
    if ename == TIMEOUT_ENAME:
        return evalue
    message = next((line.strip() for line in evalue.splitlines() if line.strip()), "")
    text = f"{ename}: {message}" if message else ename
    if not message:
        # A bare `assert` says nothing: name the line that failed.
        for chunk in content.get("traceback", []):
            for line in _ANSI.sub("", chunk).splitlines():
                if m := _ARROW.match(line.strip()):
                    return f"{text} in `{m.group(1).strip()}`"
    return text


def run_notebook(
    nb, workdir: Path, timeout: int, notebook_timeout: float
) -> dict[int, str | None]:
    """Execute `nb` (an nbformat notebook, in place) in a fresh kernel in `workdir`.

    Returns, for each code cell that has code, None if it ran without an error, or why
    not: the error's first line, "timed out after Ns", or why it never ran.
    """
    from nbclient import NotebookClient
    from nbclient.exceptions import DeadKernelError

    started: list[int] = []
    finished: set[int] = set()
    errors: dict[int, str] = {}

    def on_error(cell, cell_index: int, execute_reply: dict) -> None:
        errors[cell_index] = describe_error(execute_reply.get("content", {}))

    for cell in nb.cells:  # what a student ran before handing in is not the grade
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    client = NotebookClient(
        nb,
        kernel_name="python3",
        timeout=timeout,
        allow_errors=True,
        interrupt_on_timeout=True,
        # Reported for a timed-out cell instead of waiting for the interrupted kernel,
        # which an `except KeyboardInterrupt` in a loop could keep busy.
        error_on_timeout={
            "ename": TIMEOUT_ENAME,
            "evalue": f"timed out after {timeout}s",
            "traceback": [],
        },
        shutdown_kernel="immediate",
        record_timing=False,
        on_cell_execute=lambda cell, cell_index: started.append(cell_index),
        on_cell_executed=lambda cell, cell_index, execute_reply: finished.add(
            cell_index
        ),
        on_cell_error=on_error,
        resources={"metadata": {"path": str(workdir)}},
    )

    capped = False

    async def execute() -> None:
        # Not asyncio.wait_for: nbclient turns the cancellation into DeadKernelError,
        # and the cap must not read as a crash.
        nonlocal capped
        task = asyncio.ensure_future(client.async_execute(env=kernel_env()))
        await asyncio.wait({task}, timeout=notebook_timeout)
        if not task.done():
            capped = True
            task.cancel()  # nbclient then shuts the kernel down
        await task

    stopped = ""
    try:
        asyncio.run(execute())
    except (asyncio.CancelledError, DeadKernelError) as e:
        if capped:
            stopped = f"the notebook ran past its limit of {notebook_timeout:g}s"
        elif isinstance(e, DeadKernelError):
            stopped = "the kernel died (out of memory, or the code ended the process)"
        else:
            raise
    except Exception as e:  # the kernel did not start, or nbclient failed: say so
        stopped = f"the notebook could not run: {type(e).__name__}: {e}"

    outcome: dict[int, str | None] = {}
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        if index in errors:
            outcome[index] = errors[index]
        elif index in finished:
            outcome[index] = None
        elif stopped and started and index == started[-1]:
            outcome[index] = f"stopped: {stopped}"
        else:
            outcome[index] = f"not run: {stopped or 'the run stopped early'}"
    return outcome


# --- grading ------------------------------------------------------------------------


def _normalized(line: str) -> str:
    return re.sub(r"\s+", "", line)


def exercise_checks(nb, solutions: bool = False) -> dict[int, dict[str, str]]:
    """Exercise -> {assert line without whitespace: the line} of its code cells; with
    `solutions`, those inside solution blocks do not count (they are not checks)."""
    checks: dict[int, dict[str, str]] = {}
    for cell, exercise in zip(nb["cells"], student.cell_exercises(nb), strict=True):
        if exercise is None:
            continue
        found = checks.setdefault(exercise, {})
        if cell.get("cell_type") != "code":
            continue
        text = student.source(cell)
        if solutions:
            text, _ = student.strip_solutions(text, [])
        found.update(
            (_normalized(line), line.strip())
            for line in text.splitlines()
            if line.strip().startswith("assert ")
        )
    return checks


def grade_cells(
    nb, outcome: dict[int, str | None], reference: dict | None = None
) -> list[Result]:
    """The result of each exercise of an executed notebook.

    `outcome` maps code cells to None (ran cleanly) or why not, as run_notebook returns.
    With the `reference` solutions notebook, its exercises are the ones graded (one the
    submission lacks fails) and its checks must all be in the submission, unchanged but
    for whitespace, since deleting a failing check would otherwise pass.
    """
    labels = student.cell_exercises(nb)
    titles = student.exercise_titles(nb)
    numbers = sorted({n for n in labels if n is not None})
    first = next((i for i, n in enumerate(labels) if n is not None), len(labels))
    setup_error = next((outcome[i] for i in range(first) if outcome.get(i)), None)
    required: dict[int, dict[str, str]] = {}
    if reference is not None:
        required = exercise_checks(reference, solutions=True)
        numbers = sorted(set(numbers) | set(required))
        titles = {**titles, **student.exercise_titles(reference)}
    present = exercise_checks(nb)
    results = []
    for number in numbers:
        cells = [i for i, n in enumerate(labels) if n == number]
        code = [i for i in cells if i in outcome]
        checks = required.get(number, {})
        missing = [
            line for key, line in checks.items() if key not in present.get(number, {})
        ]
        reason = ""
        if setup_error:
            reason = f"the setup failed: {setup_error}"
        elif not cells:
            reason = "missing from the notebook; restore it from the exercise notebook"
        elif missing:
            reason = (
                f"a check was changed or removed (`{missing[0]}`); "
                "restore the checks from the exercise notebook"
            )
        elif not code:
            reason = "no code to run"
        else:
            reason = next((outcome[i] for i in code if outcome[i]), "") or ""
        title = titles.get(number, "")
        results.append(Result(number, title, passed=not reason, reason=reason))
    return results


def read_notebook(path: Path):
    """The notebook at `path` (nbformat 4), or InputError naming the problem."""
    import nbformat

    try:
        nb = nbformat.reads(path.read_text(encoding="utf-8"), as_version=4)
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot be read ({e})") from None
    except Exception as e:  # nbformat's errors for JSON that is not a notebook
        raise InputError(f"{path}: not a notebook ({type(e).__name__}: {e})") from None
    if not isinstance(nb.get("cells"), list):
        raise InputError(f"{path}: not a notebook (it has no cells)")
    return nb


def load_reference(folder: Path | None, chapter: str) -> dict | None:
    """The solutions notebook of `chapter` under `folder`, or None if there is none."""
    if folder is None:
        return None
    path = folder / f"{chapter}_solutions.ipynb"
    if not path.is_file():
        return None
    try:
        reference = read_notebook(path)
        exercise_checks(reference, solutions=True)  # its markers must balance
    except (InputError, student.MarkerError) as e:
        print(
            f"warning: reference {path} unusable, graded without it: {e}",
            file=sys.stderr,
        )
        return None
    return reference


def grade_notebook(
    path: Path,
    student_dir: Path,
    reference: dict | None,
    timeout: int,
    notebook_timeout: float,
    executed: Path,
) -> Graded:
    """Run and grade one submitted notebook; writes the run to `executed`."""
    import nbformat

    chapter = SUBMISSION_NAME.match(path.name).group(1)  # type: ignore[union-attr]
    graded = Graded(student_dir.name, path.name, chapter)
    try:
        nb = read_notebook(path)
    except InputError as e:
        graded.problem = str(e)
        graded.results = [
            Result(n, title, False, "the notebook could not be read")
            for n, title in sorted(student.exercise_titles(reference or {}).items())
        ]
        return graded
    with tempfile.TemporaryDirectory(prefix="minillm-grade-") as tmp:
        # A copy of the student's folder, so that the files the notebook writes or
        # deletes touch neither the submission nor anyone else's.
        workdir = Path(tmp) / "work"
        shutil.copytree(
            student_dir,
            workdir,
            symlinks=True,
            ignore=shutil.ignore_patterns(".ipynb_checkpoints", "__pycache__"),
        )
        outcome = run_notebook(nb, workdir, timeout, notebook_timeout)
    graded.results = grade_cells(nb, outcome, reference)
    executed.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, executed / path.name)
    return graded


# --- reports ------------------------------------------------------------------------


def exercise_id(chapter: str, number: int) -> str:
    return f"{chapter}.{number}"


def grades_csv(graded: list[Graded]) -> str:
    rows = sorted(
        (g.student, g.notebook, g.chapter, r.exercise, r.passed)
        for g in graded
        for r in g.results
    )
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["student", "notebook", "exercise", "passed"])
    for name, notebook, chapter, number, passed in rows:
        writer.writerow([name, notebook, exercise_id(chapter, number), int(passed)])
    return buf.getvalue()


def feedback(name: str, graded: list[Graded], note: str = "") -> str:
    """The Markdown feedback for one student."""
    lines = [f"# Feedback for {name}", ""]
    if note:
        lines += [note, ""]
    for g in sorted(graded, key=lambda g: g.notebook):
        lines += [f"## {g.notebook}: {g.passed} of {len(g.results)} passed", ""]
        if g.problem:
            lines += [f"This notebook could not be graded: {g.problem}", ""]
        for r in g.results:
            title = f" ({r.title})" if r.title else ""
            verdict = "PASS" if r.passed else f"FAIL: {r.reason}"
            lines.append(
                f"- Exercise {exercise_id(g.chapter, r.exercise)}{title}: {verdict}"
            )
        lines.append("")
    total = sum(len(g.results) for g in graded)
    lines.append(f"Total: {sum(g.passed for g in graded)} of {total} exercises passed.")
    return "\n".join(lines) + "\n"


def summary(graded: list[Graded]) -> str:
    rows = [("student", "notebook", "passed")] + [
        (
            g.student,
            g.notebook,
            f"{g.passed}/{len(g.results)}" + (" (!)" if g.problem else ""),
        )
        for g in sorted(graded, key=lambda g: (g.student, g.notebook))
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


# --- command line -------------------------------------------------------------------


def find_submissions(folder: Path) -> tuple[dict[str, list[Path]], list[str]]:
    """Student name -> the notebooks to grade, and the problems with the layout."""
    problems = []
    students: dict[str, list[Path]] = {}
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_file() and entry.suffix == ".ipynb":
            problems.append(
                f"{entry}: not in a student's folder, not graded; put each student's "
                f"notebooks in {folder}/<student>/"
            )
        elif entry.is_dir():
            notebooks = []
            for path in sorted(entry.glob("*.ipynb")):
                if SUBMISSION_NAME.match(path.name):
                    notebooks.append(path)
                else:
                    print(
                        f"note: {path} ignored: graded notebooks are named "
                        "NN_exercises.ipynb",
                        file=sys.stderr,
                    )
            students[entry.name] = notebooks
            if not notebooks:
                problems.append(
                    f"{entry}: no notebook named NN_exercises.ipynb "
                    "(or NN_solutions.ipynb) to grade"
                )
    return students, problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="Layout: SUBMISSIONS/<student>/NN_exercises.ipynb",
    )
    ap.add_argument("submissions", type=Path, help="folder of student folders")
    ap.add_argument(
        "--timeout", type=int, default=60, help="seconds per cell (default 60)"
    )
    ap.add_argument(
        "--notebook-timeout",
        type=float,
        default=600,
        help="seconds per notebook, all cells together (default 600)",
    )
    ap.add_argument(
        "--out",
        type=Path,
        default=DEFAULT_OUT,
        help="output folder (default build/grades)",
    )
    ap.add_argument(
        "--reference",
        default=str(REFERENCE),
        help="folder of the NN_solutions.ipynb whose exercises and checks a submission "
        "must keep (default chapters/solutions; '' for none)",
    )
    args = ap.parse_args(argv)
    if args.timeout <= 0 or args.notebook_timeout <= 0:
        ap.error("--timeout and --notebook-timeout must be positive")

    subs: Path = args.submissions
    if not subs.is_dir():
        print(
            f"error: {subs} is not a folder; give the folder that holds one folder per "
            "student (SUBMISSIONS=...)",
            file=sys.stderr,
        )
        return 2
    students, problems = find_submissions(subs)
    if not any(students.values()):
        for problem in problems:
            print(f"error: {problem}", file=sys.stderr)
        print(
            f"error: nothing to grade in {subs}; expected "
            f"{subs}/<student>/NN_exercises.ipynb",
            file=sys.stderr,
        )
        return 2
    for problem in problems:
        print(f"error: {problem}", file=sys.stderr)
    reference_dir = Path(args.reference) if args.reference else None
    if reference_dir is not None and not reference_dir.is_dir():
        print(
            f"warning: no reference folder {reference_dir}; every exercise found is "
            "graded, and removed checks go unnoticed",
            file=sys.stderr,
        )
        reference_dir = None
    inputs = [subs] + ([reference_dir] if reference_dir else [])
    try:
        out = student.check_out_dir(args.out, inputs, "grades.csv", "book/grade.py")
    except SystemExit as e:  # an --out that would lose files is bad input too
        print(e.code, file=sys.stderr)
        return 2
    check_kernel()

    from minillm.files import atomic_dir

    references: dict[str, dict | None] = {}
    graded: list[Graded] = []
    with atomic_dir(out, overwrite=True, inputs=inputs) as tmp:
        (tmp / "feedback").mkdir()
        for name, notebooks in students.items():
            mine = []
            for path in notebooks:
                chapter = SUBMISSION_NAME.match(path.name).group(1)  # type: ignore[union-attr]
                if chapter not in references:
                    references[chapter] = load_reference(reference_dir, chapter)
                start = time.perf_counter()
                g = grade_notebook(
                    path,
                    subs / name,
                    references[chapter],
                    args.timeout,
                    args.notebook_timeout,
                    tmp / "executed" / name,
                )
                if g.problem:
                    problems.append(g.problem)
                    print(f"error: {g.problem}", file=sys.stderr)
                print(
                    f"{name}/{path.name}: {g.passed} of {len(g.results)} passed "
                    f"({time.perf_counter() - start:.0f} s)",
                    flush=True,
                )
                mine.append(g)
            note = (
                "" if notebooks else "No notebook named NN_exercises.ipynb was found."
            )
            (tmp / "feedback" / f"{name}.md").write_text(
                feedback(name, mine, note), encoding="utf-8"
            )
            graded.extend(mine)
        (tmp / "grades.csv").write_text(grades_csv(graded), encoding="utf-8")
    print()
    print(summary(graded))
    shown = (
        out.resolve().relative_to(ROOT) if out.resolve().is_relative_to(ROOT) else out
    )
    print(f"\nwrote {shown}/grades.csv and {shown}/feedback/")
    if problems:
        print(
            f"{len(problems)} problem(s) with the input; see the errors above",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
