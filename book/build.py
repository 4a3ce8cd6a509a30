"""Build the book (build/book.pdf) and the solutions (build/solutions.pdf) from stored notebooks.

The notebooks are not executed: what the reader sees is what is stored. Steps:
1. merge the chapter notebooks into one notebook (pandoc reads one notebook at a time), giving
   each chapter its number and dropping lines that only matter to the test harness;
2. pandoc (from pypandoc-binary) turns it into typst, with book/filter.lua and book/template.typ;
3. typst (the Python package) compiles the PDF.

Usage: python book/build.py [--chapter 04] [--out build]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pypandoc
import typst

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
CHAPTERS = ROOT / "chapters"
TITLE = "minillm"
SUBTITLE = "Build a small large-language model from scratch, one runnable chapter at a time"

_NB_NAME = re.compile(r"^(\d\d)_.*\.ipynb$")
_MD_IMAGE = re.compile(r"(!\[[^\]]*\]\()([^)\s]+)(\))")
# Lines that steer the tests, not the reader.
_TYPST_RENAMES = {"dot.circle": "dot.o"}  # LaTeX \odot
_HARNESS_LINE = re.compile(r"^\s*#\s*NBVAL_\w+.*\n?", re.MULTILINE)


def chapter_notebooks(folder: Path, chapter: str | None = None) -> list[tuple[int, Path]]:
    """(number, path) of the notebooks NN_*.ipynb in `folder`, sorted, optionally just one."""
    found = []
    for p in sorted(folder.glob("*.ipynb")):
        m = _NB_NAME.match(p.name)
        if m and (chapter is None or int(m.group(1)) == int(chapter)):
            found.append((int(m.group(1)), p))
    return found


def merge(notebooks: list[tuple[int, Path]], out_dir: Path) -> dict:
    """One notebook holding every chapter, with image paths made relative to `out_dir`."""
    merged = None
    for number, path in notebooks:
        nb = json.loads(path.read_text(encoding="utf-8"))
        if merged is None:
            merged = copy.deepcopy(nb)
            merged["cells"] = []
        # The chapter number, for the template's heading numbering (see template.typ).
        # (pandoc's ipynb reader has no raw typst blocks; filter.lua turns this comment into one.)
        merged["cells"].append({"cell_type": "markdown", "metadata": {}, "source": f"<!-- minillm-chapter: {number} -->"})
        for cell in nb["cells"]:
            cell = copy.deepcopy(cell)
            cell.pop("id", None)  # ids repeat across notebooks; pandoc does not need them
            src = "".join(cell.get("source", ""))
            if cell["cell_type"] == "code":
                src = _HARNESS_LINE.sub("", src)
                for out in cell.get("outputs", []):
                    # A figure's text twin ("<Figure size 700x480 with 1 Axes>") says nothing on paper.
                    if "image/png" in out.get("data", {}):
                        out["data"].pop("text/plain", None)
            elif cell["cell_type"] == "markdown":
                src = _MD_IMAGE.sub(lambda m: m.group(1) + _rebase(m.group(2), path.parent, out_dir) + m.group(3), src)
            cell["source"] = src
            merged["cells"].append(cell)
    assert merged is not None
    merged["nbformat_minor"] = 4  # no cell ids needed
    return merged


def _rebase(target: str, nb_dir: Path, out_dir: Path) -> str:
    """Copy an image a markdown cell shows into out_dir/assets, so the build is self-contained."""
    if "://" in target or target.startswith(("/", "attachment:", "data:")):
        return target
    source = (nb_dir / target).resolve()
    if not source.is_file():
        raise SystemExit(f"{nb_dir.name}: markdown image {target!r} not found (run make figures?)")
    assets = out_dir / "assets"
    assets.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, assets / source.name)
    return f"assets/{source.name}"


def build(notebooks: list[tuple[int, Path]], out_dir: Path, stem: str, subtitle: str) -> Path:
    """Merge, convert and compile `notebooks` into out_dir/stem.pdf; returns the PDF's path."""
    if not notebooks:
        raise SystemExit("no notebooks to build")
    out_dir.mkdir(parents=True, exist_ok=True)
    nb_path = out_dir / f"{stem}.ipynb"
    nb_path.write_text(json.dumps(merge(notebooks, out_dir), indent=1), encoding="utf-8")
    typ_path = out_dir / f"{stem}.typ"
    media = f"media-{stem}"
    # pandoc runs inside out_dir, so extracted figures are referenced as media-*/..., relative to
    # the .typ file, which is how typst resolves them.
    subprocess.run(
        [
            pypandoc.get_pandoc_path(), nb_path.name, "--from", "ipynb", "--to", "typst", "--standalone",
            "--template", str(BOOK / "template.typ"), "--lua-filter", str(BOOK / "filter.lua"),
            f"--extract-media={media}", "--metadata", f"title={TITLE}", "--metadata", f"subtitle={subtitle}",
            "--output", typ_path.name,
        ],
        cwd=out_dir, check=True,
    )
    # pandoc's math writer still emits a few symbol names that newer typst releases renamed.
    text = typ_path.read_text(encoding="utf-8")
    for old, new in _TYPST_RENAMES.items():
        text = text.replace(old, new)
    typ_path.write_text(text, encoding="utf-8")
    pdf_path = out_dir / f"{stem}.pdf"
    # A fixed timestamp makes the PDF a pure function of the notebooks (no creation date inside).
    typst.compile(str(typ_path), output=str(pdf_path), root=str(out_dir), timestamp=0)
    return pdf_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chapter", help="build only this chapter number (e.g. 04)")
    ap.add_argument("--out", default=str(ROOT / "build"), help="output folder (default build/)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    suffix = f"-{int(args.chapter):02d}" if args.chapter else ""
    chapters = chapter_notebooks(CHAPTERS, args.chapter)
    if not chapters:
        raise SystemExit(f"no chapter notebook matches {args.chapter!r} in chapters/")
    for stem, nbs, sub in [
        (f"book{suffix}", chapters, SUBTITLE),
        (f"solutions{suffix}", chapter_notebooks(CHAPTERS / "solutions", args.chapter), "Solutions to the exercises"),
    ]:
        if nbs:
            pdf = build(nbs, out, stem, sub)
            print(f"wrote {pdf.relative_to(ROOT) if pdf.is_relative_to(ROOT) else pdf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
