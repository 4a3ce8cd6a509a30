"""Build the book, the solutions and the student handout from the stored notebooks.

    build/book.pdf        the chapters, with a preface, lists of contents and figures, and a bibliography
    build/solutions.pdf   the worked solutions
    build/exercises.pdf   the student handout: the solutions notebooks with the solutions stripped

The notebooks are not executed: what the reader sees is what is stored. Steps:
1. Each notebook becomes pandoc markdown (`render_notebook`): code cells become fenced code blocks
   (dropped for cells tagged `hide-input`), outputs become plain blocks (long lines wrapped with a
   continuation mark), images become numbered figures with the caption written under them in the
   notebook, "Figure 2.3" in the prose becomes a link, and author-year citations become citations
   of `book/references.bib`.
2. pandoc (from pypandoc-binary) turns the markdown into typst, with book/filter.lua and
   book/template.typ; `lint_typst` rejects constructs that are known to print badly.
3. typst (the Python package) compiles the PDF with the fonts of the `book` extra and no system
   fonts, so the PDF is the same on every machine. Any typst warning (a missing glyph or font
   included) fails the build.

Usage: python book/build.py [--chapter 04] [--out build]
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pypandoc
import typst

ROOT = Path(__file__).resolve().parent.parent
BOOK = ROOT / "book"
CHAPTERS = ROOT / "chapters"
BIBLIOGRAPHY = BOOK / "references.bib"
PREFACE = BOOK / "preface.md"
TITLE = "minillm"
SUBTITLE = "Build a small large-language model from scratch, one runnable chapter at a time"
AUTHORS = "The minillm authors"

# Columns that fit the text width in the 8 pt mono font: code is formatted to 88 (ruff), and
# outputs wider than OUTPUT_COLUMNS are wrapped with a continuation mark.
CODE_COLUMNS = 88
OUTPUT_COLUMNS = 90
CONTINUATION = "\u21aa "  # ↪ at the start of a wrapped output line
MIN_DPI = 200
TEXT_INCHES = 6.4  # the text width of an A4 page with the template's margins
MAX_FIGURE_INCHES = 7.5  # wider figures would be shrunk below 85%: their text would be too small

_NB_NAME = re.compile(r"^(\d\d|[A-Z])_.*\.ipynb$")  # chapters 00_..., appendices A_...
_HARNESS_LINE = re.compile(r"^\s*#\s*NBVAL_\w+.*\n?", re.MULTILINE)  # steers the tests, not the reader
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
_CAPTION = re.compile(r"^\*\*Figure (\d+|[A-Z])\.(\d+)[.:]\*\*\s*", re.MULTILINE)
_MD_IMAGE = re.compile(r"^!\[([^\]]*)\]\(([^)\s]+)\)\s*$")
_FIGURE_REF = re.compile(r"(?<![\w\[*])Figure (\d+|[A-Z])\.(\d+)\b")

Number = int | str  # a chapter's number (0, 1, ...) or an appendix's letter ("A", ...)


def chapter_key(label: str) -> Number:
    """The number of a chapter from its file name or a figure label: "04" -> 4, "A" -> "A"."""
    return int(label) if label.isdigit() else label


def chapter_tag(number: Number) -> str:
    """How a chapter is named in file names: 4 -> "04", "A" -> "A"."""
    return f"{number:02d}" if isinstance(number, int) else number


def _start(number: Number) -> str:
    """The typst call that opens a chapter (heading "Chapter 4") or an appendix ("Appendix A")."""
    return f"#chapter-start({number})" if isinstance(number, int) else f"#appendix-start({ord(number) - ord('A')})"

_TYPST_RENAMES = {"dot.circle": "dot.o"}  # pandoc's writer still emits names typst renamed


class BuildError(SystemExit):
    """A problem in the stored notebooks that would print badly; the message names the cell."""

    def __init__(self, message: str):
        super().__init__(f"book build: {message}")


# -- project facts for the title page -------------------------------------------------------------


def project_version() -> str:
    m = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    return m.group(1) if m else "unknown"


def project_license() -> str:
    m = re.search(r'^license\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(), re.MULTILINE)
    return m.group(1) if m else "see the repository"


def source_date_epoch() -> int:
    """The build's date: SOURCE_DATE_EPOCH if set, else the last commit's, else the newest notebook's.

    Using the commit date (not the clock) keeps the PDF byte-for-byte reproducible.
    """
    if os.environ.get("SOURCE_DATE_EPOCH", "").strip().isdigit():
        return int(os.environ["SOURCE_DATE_EPOCH"])
    try:
        out = subprocess.run(["git", "log", "-1", "--format=%ct"], cwd=ROOT, capture_output=True, text=True, check=True)
        return int(out.stdout.strip())
    except (OSError, subprocess.CalledProcessError, ValueError):
        return int(max(p.stat().st_mtime for p in CHAPTERS.rglob("*.ipynb")))


# -- bibliography ---------------------------------------------------------------------------------


@dataclass
class Bibliography:
    """The entries of references.bib, looked up by (first author's surname, year)."""

    keys: dict[tuple[str, str], str] = field(default_factory=dict)
    cited: set[str] = field(default_factory=set)

    @classmethod
    def load(cls, path: Path = BIBLIOGRAPHY) -> Bibliography:
        bib = cls()
        text = path.read_text(encoding="utf-8") if path.is_file() else ""
        for m in re.finditer(r"@\w+\s*\{\s*([^,\s]+)\s*,(.*?)\n\}", text, re.DOTALL):
            key, body = m.group(1), m.group(2)
            author = re.search(r"\bauthor\s*=\s*[{\"](.+?)[}\"]\s*,\s*\n", body, re.DOTALL)
            year = re.search(r"\byear\s*=\s*[{\"]?(\d{4})", body)
            if not (author and year):
                raise BuildError(f"references.bib: entry {key} needs an author and a year")
            first = author.group(1).split(" and ")[0].strip().strip("{}")
            surname = first.split(",")[0].strip() if "," in first else first.split()[-1]
            pair = (surname.strip("{}"), year.group(1))
            if pair in bib.keys:
                raise BuildError(f"references.bib: {key} and {bib.keys[pair]} are both {pair[0]} {pair[1]}; add a letter to the year in the text")
            bib.keys[pair] = key
        return bib

    def key(self, surname: str, year: str, where: str) -> str:
        key = self.keys.get((surname, year))
        if key is None:
            raise BuildError(f"{where}: the citation {surname} ({year}) has no entry in book/references.bib")
        self.cited.add(key)
        return key


# Author-year citations as the prose writes them: "Vaswani et al. (2017)", "Zhang and Sennrich
# (2019)", "Sennrich, Haddow and Birch (2016)", and "(Shazeer, 2019)" or "(Ba et al., 2016)".
# Any run of white space may separate the words: a citation can break across lines of the source.
_NAMES = r"(?P<first>[A-Z][\w'\u00c0-\u017f-]+)(?:\s+et\s+al\.|(?:,\s+[A-Z][\w'-]+)*,?\s+and\s+[A-Z][\w'-]+)?"
_PROSE_CITE = re.compile(_NAMES + r"\s+\((?P<year>\d{4})\)")
_PAREN_CITE = re.compile(r"\((?P<prefix>[^()]*?[,;]\s)??" + _NAMES + r",\s+(?P<year>\d{4})\)")


def _cite(text: str, bib: Bibliography, where: str) -> str:
    """Link author-year citations to the bibliography (typst prints them in its own style)."""

    def known(m: re.Match) -> bool:
        # "Python 3.11 (2022)" is not a citation; "Someone et al. (2022)" always is.
        return (m.group("first"), m.group("year")) in bib.keys or re.search(r"\set\s+al\.", m.group(0)) is not None

    def paren(m: re.Match) -> str:
        if not known(m):
            return m.group(0)
        key = bib.key(m.group("first"), m.group("year"), where)
        cite = f'#cite(<{key}>, form: "author"), #cite(<{key}>, form: "year")'
        return "(" + (m.group("prefix") or "") + f"`{cite}`{{=typst}})"

    def prose(m: re.Match) -> str:
        if not known(m):
            return m.group(0)
        key = bib.key(m.group("first"), m.group("year"), where)
        return f'`#cite(<{key}>, form: "prose")`{{=typst}}'

    return _PROSE_CITE.sub(prose, _PAREN_CITE.sub(paren, text))


# -- markdown -------------------------------------------------------------------------------------

# Code spans, display and inline math, and links are left alone by the text rewrites.
_MATH = re.compile(r"\$\$[\s\S]*?\$\$|(?<!\\)\$[^$\n]+?(?<!\\)\$")
_PROTECTED = re.compile(rf"(`+)[\s\S]*?\1|{_MATH.pattern}|\]\([^)]*\)")


_CODE_SPAN = re.compile(r"(?<!`)(`+)(?!`)([\s\S]+?)(?<!`)\1(?!`)")


def _visible_edge_spaces(text: str) -> str:
    """Show the spaces at the edges of inline code as ␣: pandoc drops them, and a token such as
    `` ` low` `` (a space, then "low") is not the token `low`. A span padded on both sides by one
    space around a backtick is CommonMark's way of quoting backticks, and stays as it is."""

    def one(m: re.Match) -> str:
        ticks, body = m.group(1), m.group(2)
        if not body.strip(" "):  # a token of spaces
            return f"{ticks}{'␣' * len(body)}{ticks}"
        if body.startswith(" ") and body.endswith(" ") and "`" in body:
            return m.group(0)
        lead = len(body) - len(body.lstrip(" "))
        trail = len(body) - len(body.rstrip(" "))
        if not lead and not trail:
            return m.group(0)
        return f"{ticks}{'␣' * lead}{body.strip(' ')}{'␣' * trail}{ticks}"

    return _CODE_SPAN.sub(one, text)


# A fenced block, also one indented inside a list item; it ends at a fence of the same kind.
_FENCE = re.compile(r"^[ \t]*(?P<fence>`{3,}|~{3,})[^\n]*\n[\s\S]*?^[ \t]*(?P=fence)[ \t]*$", re.MULTILINE)


def split_fenced(markdown: str) -> list[str]:
    """The markdown cut into prose (even indices) and fenced code blocks (odd indices)."""
    parts, last = [], 0
    for m in _FENCE.finditer(markdown):
        parts += [markdown[last : m.start()], m.group(0)]
        last = m.end()
    return parts + [markdown[last:]]


def mark_math_thousands(text: str) -> str:
    """Write a thousands separator in math, `$1{,}024$`, as `\\text{,}`: pandoc would turn `{,}`
    into the same `\\,` as the comma of a tuple `$(64, 128)$`, and the two must print differently."""
    return _MATH.sub(lambda m: m.group(0).replace("{,}", "\\text{,}"), text)


def _rewrite_prose(text: str, fn) -> str:
    out, last = [], 0
    for m in _PROTECTED.finditer(text):
        out.append(fn(text[last : m.start()]))
        out.append(m.group(0))
        last = m.end()
    out.append(fn(text[last:]))
    return "".join(out)


def _fence(text: str, lang: str = "") -> str:
    """A fenced block that survives any backticks inside `text`."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{lang}\n{text}\n{ticks}"


def wrap_output(text: str, width: int = OUTPUT_COLUMNS) -> str:
    """Wrap lines wider than `width`: each continuation starts with ↪ under the line's indent.

    Breaks after a space or comma in the last third of the line where there is one, else at the
    width, so numbers and words are rarely cut.
    """
    lines = []
    for line in text.split("\n"):
        indent = " " * (len(line) - len(line.lstrip(" ")))
        if len(indent) > width // 2:
            indent = ""
        first = True
        while len(line) > width:
            room = width if first else width - len(indent) - len(CONTINUATION)
            head = line[:room]
            cut = max(head.rfind(" "), head.rfind(","))
            cut = cut + 1 if cut >= room * 2 // 3 else room
            lines.append(line[:cut].rstrip() if first else indent + CONTINUATION + line[:cut].rstrip())
            line = line[cut:].lstrip(" ")
            first = False
        lines.append(line if first else indent + CONTINUATION + line)
    return "\n".join(lines)


def _clean_stream(text: str) -> str:
    """What a terminal would show: no colour codes, and a progress bar's last state only."""
    text = _ANSI.sub("", text)
    return "\n".join(line.rsplit("\r", 1)[-1] for line in text.split("\n"))


def _png_inches(data: bytes, metadata: dict) -> tuple[float, float]:
    """(width in inches, dots per inch) of a PNG, from its pHYs chunk or Jupyter's width hint."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError("not a PNG")
    width_px = struct.unpack(">I", data[16:20])[0]
    dpi = None
    i = 8
    while i < len(data):
        n = struct.unpack(">I", data[i : i + 4])[0]
        if data[i + 4 : i + 8] == b"pHYs":
            ppm, _, unit = struct.unpack(">IIB", data[i + 8 : i + 17])
            if unit == 1 and ppm:
                dpi = ppm * 0.0254
            break
        if data[i + 4 : i + 8] == b"IDAT":
            break
        i += 12 + n
    if dpi is None:
        # Jupyter's "retina" outputs give the displayed width (at matplotlib's 100 dpi) as a hint.
        shown = metadata.get("width")
        dpi = 100.0 * width_px / shown if shown else 100.0
    return width_px / dpi, dpi


@dataclass
class Chapter:
    """What one notebook contributes to a document."""

    number: Number
    path: Path
    markdown: str
    figures: list[str]  # labels, in order


class Renderer:
    """Turns notebooks into one pandoc-markdown document, numbering figures per chapter."""

    def __init__(self, out_dir: Path, media: str, bib: Bibliography):
        self.out_dir, self.media, self.bib = out_dir, media, bib
        (out_dir / media).mkdir(parents=True, exist_ok=True)

    def figure(self, number: Number, k: int, caption: str, src: str, width_in: float, where: str) -> str:
        if not caption.strip():
            raise BuildError(f"{where}: figure {number}.{k} has no caption")
        if width_in > MAX_FIGURE_INCHES:
            raise BuildError(f"{where}: figure {number}.{k} is {width_in:.1f} in wide; the page takes {MAX_FIGURE_INCHES} "
                             "(set a smaller figsize, so that its text stays readable)")
        width = f"{min(width_in, TEXT_INCHES):.2f}in"  # a little wider than the text is scaled down
        caption = " ".join(caption.split())
        return f"![{caption}]({src}){{#fig-{number}-{k} width={width}}}"

    def notebook(self, number: Number, path: Path) -> Chapter:
        nb = json.loads(path.read_text(encoding="utf-8"))
        cells = nb["cells"]
        blocks: list[str] = [f"```{{=typst}}\n{_start(number)}\n```"]
        figures: list[str] = []
        pending: tuple[str, float, str] | None = None  # an image waiting for its caption

        def take_caption(md: str, where: str) -> tuple[str | None, str]:
            """The caption paragraph at the start of `md`, checked against the next number."""
            m = _CAPTION.match(md)
            if not m:
                return None, md
            expected = (number, len(figures) + 1)
            if (chapter_key(m.group(1)), int(m.group(2))) != expected:
                raise BuildError(f"{where}: the caption says Figure {m.group(1)}.{m.group(2)}, but this is figure {expected[0]}.{expected[1]}")
            end = md.find("\n\n", m.end())
            end = len(md) if end < 0 else end
            return md[m.end() : end], md[end:].lstrip("\n")

        for index, cell in enumerate(cells):
            where = f"{path.relative_to(ROOT) if path.is_relative_to(ROOT) else path.name}, cell {index}"
            src = "".join(cell.get("source", ""))
            if cell["cell_type"] == "markdown":
                if pending is not None:
                    caption, src = take_caption(src, where)
                    if caption is None:
                        raise BuildError(f"{pending[2]}: the figure needs a caption: start the next markdown cell with **Figure {number}.{len(figures) + 1}.** and what to see in it")
                    figures.append(f"fig-{number}-{len(figures) + 1}")
                    blocks.append(self.figure(number, len(figures), caption, pending[0], pending[1], where))
                    pending = None
                blocks.extend(self.markdown(src, number, path, figures, where, take_caption))
                continue
            if pending is not None:
                raise BuildError(f"{pending[2]}: the figure needs a caption in the markdown cell right after it")
            if cell["cell_type"] != "code":
                continue
            code = _HARNESS_LINE.sub("", src).strip("\n")
            tags = cell.get("metadata", {}).get("tags", [])
            if code and "hide-input" not in tags:
                long = [line for line in code.splitlines() if len(line) > CODE_COLUMNS]
                if long:
                    raise BuildError(f"{where}: {len(long)} code lines are wider than {CODE_COLUMNS} columns (ruff format), e.g. {long[0][:60]!r}")
                blocks.append(_fence(code, "python"))
            texts: list[str] = []

            def flush() -> None:
                if texts:
                    text = "".join(texts).strip("\n")
                    if text.strip():
                        blocks.append(_fence(wrap_output(text)))
                    texts.clear()

            for out in cell.get("outputs", []):
                if out["output_type"] == "stream":
                    texts.append(_clean_stream("".join(out["text"])))
                    continue
                data = out.get("data", {})
                if "image/png" in data:
                    flush()
                    if pending is not None:
                        raise BuildError(f"{where}: one figure per cell, so that each has its caption below it")
                    png = base64.b64decode("".join(data["image/png"]))
                    width_in, dpi = _png_inches(png, out.get("metadata", {}).get("image/png", {}))
                    if dpi < MIN_DPI - 1:
                        raise BuildError(f"{where}: the figure is {dpi:.0f} dpi; print needs {MIN_DPI} (call minillm.figures.book_style() first)")
                    name = f"{self.media}/fig-{chapter_tag(number)}-{len(figures) + 1}.png"
                    (self.out_dir / name).write_bytes(png)
                    pending = (name, width_in, where)
                elif "text/plain" in data:
                    text = "".join(data["text/plain"])
                    if re.fullmatch(r"<[\w.]+ (object )?at 0x[0-9a-fA-F]+>", text.strip()):
                        raise BuildError(f"{where}: the cell prints {text.strip()!r}; end the line with ';' or assign it to _")
                    texts.append(text + "\n")
            flush()
        if pending is not None:
            raise BuildError(f"{pending[2]}: the figure needs a caption in the markdown cell right after it")
        return Chapter(number, path, "\n\n".join(blocks), figures)

    def markdown(self, src: str, number: Number, path: Path, figures: list[str], where: str, take_caption) -> list[str]:
        """A markdown cell: images become figures with the caption paragraph below them."""
        out: list[str] = []
        paragraphs = re.split(r"\n\s*\n", src)
        i = 0
        while i < len(paragraphs):
            para = paragraphs[i].strip("\n")
            m = _MD_IMAGE.match(para.strip())
            if m:
                rest = "\n\n".join(paragraphs[i + 1 :])
                caption, rest = take_caption(rest, where)
                if caption is None:
                    raise BuildError(f"{where}: the image {m.group(2)} needs a caption paragraph right below it, starting **Figure {number}.{len(figures) + 1}.**")
                source = (path.parent / m.group(2)).resolve()
                if not source.is_file():
                    raise BuildError(f"{where}: image {m.group(2)!r} not found (run make figures?)")
                target = f"{self.media}/{source.name}"
                shutil.copyfile(source, self.out_dir / target)
                data = source.read_bytes()
                width_in, dpi = _png_inches(data, {}) if source.suffix == ".png" else (5.0, 1e9)
                if dpi < MIN_DPI - 1:
                    raise BuildError(f"{where}: {m.group(2)} is {dpi:.0f} dpi; print needs {MIN_DPI}")
                figures.append(f"fig-{number}-{len(figures) + 1}")
                out.append(self.figure(number, len(figures), caption, target, width_in, where))
                paragraphs = [p for p in re.split(r"\n\s*\n", rest)] if rest else []
                i = 0
                continue
            out.append(para)
            i += 1
        text = "\n\n".join(p for p in out if p.strip())
        return [text] if text else []

    def link_prose(self, chapters: list[Chapter]) -> None:
        """Turn "Figure 2.3" into a link where that figure is in this document, and cite papers."""
        labels = {lab for ch in chapters for lab in ch.figures}
        numbers = {ch.number for ch in chapters}

        def refs(text: str) -> str:
            def one(m: re.Match) -> str:
                label = f"fig-{m.group(1)}-{m.group(2)}"
                if label in labels:
                    return f"[{m.group(0)}](#{label})"
                if chapter_key(m.group(1)) in numbers:
                    raise BuildError(f"the text refers to {m.group(0)}, which does not exist")
                return m.group(0)

            return _FIGURE_REF.sub(one, text)

        for ch in chapters:
            where = str(ch.path.relative_to(ROOT) if ch.path.is_relative_to(ROOT) else ch.path.name)
            parts = split_fenced(ch.markdown)
            for j in range(0, len(parts), 2):  # even parts are prose, odd parts are fenced blocks
                # Figure captions are prose too; their own "Figure N.M" prefix was removed.
                prose = mark_math_thousands(_visible_edge_spaces(parts[j]))
                parts[j] = _rewrite_prose(prose, lambda t: _cite(refs(t), self.bib, where))
            ch.markdown = "".join(parts)


# -- typst ----------------------------------------------------------------------------------------

# A thousands separator in math, `$1{,}024$`, is marked by `mark_math_thousands` and reaches typst
# as `1 upright(",") 024`, which typst sets with spaces around the comma; a quoted comma between the
# digits is set as in text ("1,024").
_MATH_THOUSANDS = re.compile(r'(\d) upright\(","\) (?=\d{3}(?!\d))')


def fix_typst(text: str) -> str:
    """Rename the symbols that pandoc's typst writer still emits under their old names, and set
    thousands separators in math without the space typst puts after a comma."""
    for old, new in _TYPST_RENAMES.items():
        text = text.replace(old, new)
    return _MATH_THOUSANDS.sub(r'\1","', text)


# Constructs that print badly; each was seen in an earlier build (filter.lua repairs them).
_BAD_TYPST = {
    r"#h\(-": "a negative space in math (from \\!): it prints over its neighbours",
    r'(?<![\w.(])"[A-Za-z]\w*" \\\(': "an operator name set as text before a parenthesis: a stray gap",
    r"dot\.circle": "a symbol name typst no longer knows",
    r"\\big|\\Big": "a LaTeX size command that reached typst",
}
_RAW = re.compile(r"(`{3,})[\s\S]*?\1|`[^`\n]*`")


def lint_typst(text: str) -> list[str]:
    """Known-bad constructs in generated typst, outside code; empty when the document is clean."""
    text = _RAW.sub("", text)
    problems = []
    for pattern, why in _BAD_TYPST.items():
        for m in re.finditer(pattern, text):
            problems.append(f"{why}: ...{text[max(0, m.start() - 30) : m.end() + 30]}...")
    return problems


def build_document(
    chapters: list[tuple[Number, Path]],
    out_dir: Path,
    stem: str,
    subtitle: str,
    *,
    preface: bool = False,
    transform=None,
    compact_contents: bool = False,
) -> Path:
    """Render, convert and compile notebooks into out_dir/stem.pdf; returns the PDF's path.

    `transform`, if given, maps each notebook (a dict) before rendering (the student edition).
    `compact_contents` sets the contents in two columns (a list of every exercise is long).
    """
    if not chapters:
        raise BuildError("no notebooks to build")
    out_dir.mkdir(parents=True, exist_ok=True)
    bib = Bibliography.load()
    media = f"media-{stem}"
    shutil.rmtree(out_dir / media, ignore_errors=True)
    renderer = Renderer(out_dir, media, bib)
    rendered = []
    for number, path in chapters:
        if transform is not None:
            tmp = out_dir / f".{stem}-{path.name}"
            tmp.write_text(json.dumps(transform(json.loads(path.read_text(encoding="utf-8")))), encoding="utf-8")
            chapter = renderer.notebook(number, tmp)
            chapter.path = path
            tmp.unlink()
        else:
            chapter = renderer.notebook(number, path)
        rendered.append(chapter)
    renderer.link_prose(rendered)
    parts = []
    if preface and PREFACE.is_file():
        parts.append(_rewrite_prose(PREFACE.read_text(encoding="utf-8"), lambda t: _cite(t, bib, "book/preface.md")))
    parts += [ch.markdown for ch in rendered]
    shutil.copyfile(BOOK / "fonts.typ", out_dir / "fonts.typ")
    if bib.cited:
        shutil.copyfile(BIBLIOGRAPHY, out_dir / BIBLIOGRAPHY.name)
        parts.append(f'```{{=typst}}\n#book-bibliography("{BIBLIOGRAPHY.name}")\n```')
    md_path = out_dir / f"{stem}.md"
    md_path.write_text("\n\n".join(parts) + "\n", encoding="utf-8")
    missing = missing_glyphs(md_path.read_text(encoding="utf-8"), out_dir)
    if missing:
        raise BuildError(f"{md_path.name}: no font of the book draws {', '.join(missing[:10])}; they would "
                         "print as boxes (use another character, or add a font to book/fonts.typ and the book extra)")

    epoch = source_date_epoch()
    date = dt.datetime.fromtimestamp(epoch, dt.timezone.utc)
    typ_path = out_dir / f"{stem}.typ"
    meta = {
        "title": TITLE, "subtitle": subtitle, "author": AUTHORS, "version": project_version(),
        "license": project_license(), "date": f"{date.day} {date:%B %Y}",
        "figures": "true" if any(ch.figures for ch in rendered) else "",
        "compact-contents": "true" if compact_contents else "",
    }
    args = [pypandoc.get_pandoc_path(), md_path.name, "--from", "markdown-citations", "--to", "typst",
            "--standalone", "--template", str(BOOK / "template.typ"), "--lua-filter", str(BOOK / "filter.lua"),
            "--output", typ_path.name]
    for k, v in meta.items():
        args += ["--metadata", f"{k}={v}"] if v else []
    subprocess.run(args, cwd=out_dir, check=True)
    text = fix_typst(typ_path.read_text(encoding="utf-8"))
    problems = lint_typst(text)
    if problems:
        raise BuildError(f"{typ_path.name}: " + "; ".join(problems[:5]))
    typ_path.write_text(text, encoding="utf-8")
    pdf_path = out_dir / f"{stem}.pdf"
    pdf, warnings = typst.compile_with_warnings(
        str(typ_path), root=str(out_dir), font_paths=font_paths(), ignore_system_fonts=True,
        timestamp=epoch,
    )
    if warnings:
        raise BuildError(f"typst warned while compiling {typ_path.name} (a missing glyph prints as a box):\n"
                         + "\n".join(f"  {w}" for w in warnings))
    tmp = pdf_path.with_name(pdf_path.name + ".partial")
    tmp.write_bytes(pdf)
    os.replace(tmp, pdf_path)
    return pdf_path


def missing_glyphs(text: str, out_dir: Path) -> list[str]:
    """The characters of `text` that no font of the book can draw (typst would print a box).

    typst warns about an unknown font family but draws a missing glyph silently, so each
    character outside ASCII is set alone on a tiny page, in the prose fonts and in the code
    fonts, and compared with the box typst draws for a character no font has.
    """
    chars = sorted({c for c in text if ord(c) > 126 and c.isprintable() and not c.isspace()})
    shutil.copyfile(BOOK / "fonts.typ", out_dir / "fonts.typ")
    probe = out_dir / ".glyph-probe.typ"
    nowhere = "\U0010fffd"  # a private-use code point that no font here draws
    pages = [nowhere] + chars
    body = "\n#pagebreak()\n".join(
        f'#text(font: text-fonts)[{_typst_char(c)}]\n#pagebreak()\n#text(font: mono-fonts)[{_typst_char(c)}]' for c in pages
    )
    probe.write_text('#import "fonts.typ": text-fonts, mono-fonts\n#set page(width: 16pt, height: 16pt, margin: 2pt)\n'
                     + body + "\n", encoding="utf-8")
    try:
        images = typst.compile(str(probe), root=str(out_dir), font_paths=font_paths(), ignore_system_fonts=True,
                               format="png", ppi=72)
    finally:
        probe.unlink()
    box_text, box_mono = images[0], images[1]
    missing = []
    for i, c in enumerate(chars):
        if images[2 + 2 * i] == box_text or images[3 + 2 * i] == box_mono:
            missing.append(f"{c!r} (U+{ord(c):04X})")
    return missing


def _typst_char(c: str) -> str:
    return f'#str.from-unicode({ord(c)})'


def font_paths() -> list[str]:
    """The folders of the fonts the book needs beyond typst's own (Noto CJK, Emoji, Symbols)."""
    try:
        import manimgx_fonts
        import manimgx_fonts_cjk
    except ImportError:
        raise BuildError("the book's fonts are missing: pip install -e '.[book]' (make pdf does it)") from None
    return [str(Path(manimgx_fonts.__file__).parent), str(Path(manimgx_fonts_cjk.__file__).parent)]


def chapter_notebooks(folder: Path, chapter: str | None = None) -> list[tuple[Number, Path]]:
    """(number, path) of the notebooks NN_*.ipynb, then the appendices A_*.ipynb, in `folder`,
    sorted, optionally just one (`chapter` "04", "4" or "A")."""
    found = []
    for p in sorted(folder.glob("*.ipynb")):
        m = _NB_NAME.match(p.name)
        if m and (chapter is None or chapter_key(m.group(1)) == chapter_key(chapter.upper())):
            found.append((chapter_key(m.group(1)), p))
    return found


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--chapter", help="build only this chapter number (e.g. 04) or appendix (A)")
    ap.add_argument("--out", default=str(ROOT / "build"), help="output folder (default build/)")
    args = ap.parse_args(argv)
    out = Path(args.out)
    suffix = f"-{chapter_tag(chapter_key(args.chapter.upper()))}" if args.chapter else ""
    chapters = chapter_notebooks(CHAPTERS, args.chapter)
    if not chapters:
        raise BuildError(f"no chapter notebook matches {args.chapter!r} in chapters/")
    solutions = chapter_notebooks(CHAPTERS / "solutions", args.chapter)
    sys.path.insert(0, str(BOOK))
    from student import exercise_notebook

    jobs = [
        (f"book{suffix}", chapters, SUBTITLE, {"preface": not args.chapter}),
        (f"solutions{suffix}", solutions, "Solutions to the exercises", {"compact_contents": True}),
        (f"exercises{suffix}", solutions, "Exercises", {"transform": exercise_notebook, "compact_contents": True}),
    ]
    for stem, nbs, sub, extra in jobs:
        if nbs:
            pdf = build_document(nbs, out, stem, sub, **extra)
            print(f"wrote {pdf.relative_to(ROOT) if pdf.is_relative_to(ROOT) else pdf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
