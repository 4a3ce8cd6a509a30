"""Re-execute the chapter and solutions notebooks in place, top to bottom, in a fresh kernel each.

This is how the stored outputs are made: `make notebooks` (or `make notebooks CHAPTER=03`). Each
notebook runs with its own folder as the working directory, as it does under nbval and in
JupyterLab, and the wall time of each is printed so the three-minute budget stays visible.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build import CHAPTERS, chapter_notebooks  # noqa: E402


def execute(path: Path, timeout: int = 600) -> float:
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    elapsed = time.perf_counter() - start
    nbformat.write(nb, path)
    return elapsed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chapter", help="only this chapter number (and its solutions)")
    args = ap.parse_args(argv)
    paths = [p for _, p in chapter_notebooks(CHAPTERS, args.chapter)]
    paths += [p for _, p in chapter_notebooks(CHAPTERS / "solutions", args.chapter)]
    for p in paths:
        print(f"{p.relative_to(CHAPTERS.parent)}: {execute(p):.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
