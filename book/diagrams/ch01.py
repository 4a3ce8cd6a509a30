"""Chapter 01's diagrams: the UTF-8 bytes of characters from five scripts, with the marker bits
that say how many bytes a character takes, and the merges that BPE applies, one after another, to
encode ` return` with the chapter's 512-token tokenizer."""

from __future__ import annotations

import sys
import textwrap
import unicodedata
from functools import cache
from pathlib import Path

import matplotlib.pyplot as plt
from matplotlib import font_manager
from matplotlib.patches import Rectangle

from .style import GREY, INK, MONO, box, canvas, color, light, note

# ASCII, accented Latin, Greek, a CJK ideograph and an emoji: 1, 2, 2, 3 and 4 bytes.
UTF8_TEXT = "Aéπ日😀"
# The word the merge figure follows, and the tokenizer of the chapter's sections "Special tokens"
# and "Encoding and decoding": vocabulary 512, trained on the first 200,000 characters of the
# training documents joined by the end-of-text separator.
WORD = " return"
SAMPLE_CHARS, VOCAB = 200_000, 512


@cache
def _cjk_font() -> font_manager.FontProperties | None:
    """Noto Sans CJK, which the book's environment ships as a pip package; None if it is missing."""
    for path in sorted(Path(sys.prefix).glob("lib/python*/site-packages/*fonts_cjk*/*.tt[cf]")):
        return font_manager.FontProperties(fname=str(path))
    return None


@cache
def _glyphs(family: str) -> frozenset[int]:
    """The code points that the font matplotlib picks for `family` can draw."""
    from fontTools.ttLib import TTFont

    path = font_manager.findfont(font_manager.FontProperties(family=family), fallback_to_default=True)
    return frozenset(TTFont(path, fontNumber=0).getBestCmap())


def renders(ch: str, family: str = "DejaVu Sans") -> bool:
    """True if the figure's font has a glyph for `ch` (DejaVu has no CJK and only a few emoji)."""
    return ord(ch) in _glyphs(family)


def utf8_parts(ch: str) -> list[tuple[str, str]]:
    """The UTF-8 bytes of `ch`, from str.encode, each split into (marker bits, payload bits)."""
    out = []
    for byte in ch.encode("utf-8"):
        bits = f"{byte:08b}"
        n_marker = bits.index("0") + 1  # 0, 10, 110, 1110, 11110: the ones and the zero after them
        out.append((bits[:n_marker], bits[n_marker:]))
    return out


def _bit_row(ax: plt.Axes, x: float, y: float, marker: str, payload: str, cell: float) -> None:
    """One byte as eight bit cells: the marker bits red, the payload bits teal."""
    for k, b in enumerate(marker + payload):
        role = "accent" if k < len(marker) else "token"
        ax.add_patch(Rectangle((x + k * cell, y), cell, cell, fc=light(role, 0.7 if role == "accent" else 0.75),
                               ec=color(role), lw=0.6))
        ax.text(x + (k + 0.5) * cell, y + cell / 2, b, ha="center", va="center", fontsize=7, color=INK,
                family=MONO)


def draw_utf8_bytes() -> plt.Figure:
    """For each character: its glyph (or name), code point, payload bits, and its bytes, stacked."""
    fig, ax = canvas(7.2, 2.72)
    col_w, cell, x_first = 1.4, 0.125, 0.07
    top = 2.55
    for i, ch in enumerate(UTF8_TEXT):
        x = x_first + i * col_w  # left edge of the column
        cx = x + col_w / 2
        name = unicodedata.name(ch).lower()
        if renders(ch):
            note(ax, cx, top, ch, ha="center", fontsize=14, role=INK)
        elif name.startswith("cjk") and _cjk_font() is not None:
            ax.text(cx, top, ch, ha="center", va="center", fontsize=14, color=INK, fontproperties=_cjk_font())
        else:  # no glyph in DejaVu: say what the character is instead of printing a box
            short = "CJK ideograph" if name.startswith("cjk") else name
            box(ax, cx - 0.5, top - 0.14, 1.0, 0.28, short, None, fontsize=7, dashed=True)
        cp = ord(ch)
        note(ax, cx, top - 0.3, f"U+{cp:04X} = {cp:,}", ha="center", fontsize=7.5, role=INK, va="top")
        wrapped = "\n".join(textwrap.wrap(name, 22))
        note(ax, cx, top - 0.5, wrapped, ha="center", va="top", fontsize=6.5)
        parts = utf8_parts(ch)
        payload_groups = " ".join(p for _, p in parts)
        note(ax, cx, top - 0.82, "code-point bits", ha="center", va="top", fontsize=6.5)
        note(ax, cx, top - 0.96, payload_groups, ha="center", va="top", fontsize=6.5, mono=True, role=INK)
        # The bytes, one row each, with the byte's value in hex beside it.
        bx = x + 0.06
        for k, (marker, payload) in enumerate(parts):
            y = top - 1.35 - k * (cell + 0.07)
            _bit_row(ax, bx, y, marker, payload, cell)
            value = int(marker + payload, 2)
            note(ax, bx + 8 * cell + 0.05, y + cell / 2, f"{value:02X}", fontsize=7, mono=True, role=INK)
        n = len(parts)
        note(ax, cx, top - 1.35 - 3 * (cell + 0.07) - 0.08, f"{n} byte" + ("s" if n > 1 else ""),
             ha="center", va="top", fontsize=7.5, role=INK)
    # The legend: what the two colors mean.
    ly = 0.2
    legend = [
        (0.15, "accent", ("marker bits: a lead byte 0…, 110…, 1110… or 11110… starts a character of 1, 2, 3 "
                          "or 4 bytes;\nevery continuation byte starts with 10")),
        (5.05, "token", "code-point bits: the code point,\nhigh bits first; beside each byte,\nits value in hex"),
    ]
    for lx, role, text in legend:
        ax.add_patch(Rectangle((lx, ly - 0.06), 0.12, 0.12, fc=light(role, 0.7), ec=color(role), lw=0.6))
        note(ax, lx + 0.18, ly, text, fontsize=6.8)
    return fig


@cache
def merge_steps() -> tuple[tuple[tuple[bytes, ...], tuple[tuple[bytes, bytes, int], ...]], ...]:
    """How the chapter's 512-token tokenizer encodes WORD, step by step.

    Each step is (pieces, candidates): the candidates are the adjacent pairs of pieces whose
    concatenation is a token, with that token's id. The rule is the one the chapter adopts
    (tiktoken's): merge the candidate with the lowest id, until there is none."""
    import minillm
    from minillm.corpus import EOT
    from minillm.tokenizer import train_bpe

    corpus = minillm.stdlib_corpus()
    sample = EOT.join(d.text for d in corpus.split("train"))[:SAMPLE_CHARS]
    ranks = {token: i for i, token in train_bpe([sample], VOCAB).vocab.items()}
    data = WORD.encode("utf-8")
    parts = [data[i : i + 1] for i in range(len(data))]
    steps = []
    while True:
        found = [(parts[i], parts[i + 1], ranks[parts[i] + parts[i + 1]]) for i in range(len(parts) - 1)
                 if parts[i] + parts[i + 1] in ranks]
        steps.append((tuple(parts), tuple(found)))
        if not found:
            return tuple(steps)
        a, b, _ = min(found, key=lambda c: c[2])
        i = next(i for i in range(len(parts) - 1) if (parts[i], parts[i + 1]) == (a, b))
        parts[i : i + 2] = [a + b]


def _show(token: bytes) -> str:
    """A token's text with its spaces made visible as ␣."""
    return token.decode("utf-8", errors="replace").replace(" ", "␣")


def draw_bpe_merges() -> plt.Figure:
    """` return` as seven bytes, then one row per merge until it is a single token."""
    steps = merge_steps()
    ids = {bytes([b]): b for b in range(256)}
    for _, found in steps:
        ids.update({a + b: i for a, b, i in found})
    row_h, box_h, byte_w = 0.4, 0.3, 0.37
    height = 0.45 + len(steps) * row_h
    fig, ax = canvas(7.2, height)
    x0, top, xc = 0.95, height - 0.3, 3.65
    note(ax, x0 + len(WORD) * byte_w / 2, top + 0.08, "pieces (token id below)", ha="center", fontsize=7)
    note(ax, xc, top + 0.08, "adjacent pairs that form a token (its id); the lowest id is merged",
         fontsize=7)
    newest = None
    for r, (parts, found) in enumerate(steps):
        y = top - (r + 1) * row_h + (row_h - box_h) / 2
        note(ax, x0 - 0.12, y + box_h / 2, "start" if r == 0 else f"after merge {r}", ha="right", fontsize=7.5,
             role=INK)
        pos = 0
        for token in parts:
            w = len(token) * byte_w
            box(ax, x0 + pos * byte_w + 0.02, y, w - 0.04, box_h, "", "accent" if token == newest else "token")
            cx = x0 + pos * byte_w + w / 2
            note(ax, cx, y + box_h * 0.66, _show(token), ha="center", fontsize=7.5, mono=True, role=INK)
            note(ax, cx, y + box_h * 0.27, str(ids[token]), ha="center", fontsize=6.5, mono=True)
            pos += len(token)
        if found:
            best = min(found, key=lambda c: c[2])
            x = xc
            for a, b, i in sorted(found, key=lambda c: c[2]):
                text = f"({_show(a)}, {_show(b)}) {i}"
                note(ax, x, y + box_h / 2, text, fontsize=7.5, mono=True,
                     role="accent" if (a, b, i) == best else GREY)
                x += 0.062 * len(text) + 0.22
            newest = best[0] + best[1]
        else:
            note(ax, xc, y + box_h / 2, "none: the word is encoded", fontsize=7.5, role=INK)
        n = len(parts)
        note(ax, 7.1, y + box_h / 2, f"{n} piece" + ("s" if n > 1 else ""), fontsize=7, ha="right")
    return fig


# The line of Python that the section "Pre-tokenization" splits with both patterns.
PRE_LINE = "    def __init__(self, size=1024):\n        self.size = size  # bytes\n"


def _shown(piece: str) -> str:
    """A pre-token as printed in the figure: ␣ for a space, ↵ for a newline."""
    return piece.replace(" ", "␣").replace("\n", "↵")


def draw_pretokens() -> plt.Figure:
    """The same two lines of Python cut into pre-tokens by GPT-2's and GPT-4's patterns."""
    import regex

    from minillm.tokenizer import GPT2_PATTERN, GPT4_PATTERN

    splits = {name: regex.findall(pattern, PRE_LINE) for name, pattern in
              [("GPT-2", GPT2_PATTERN), ("GPT-4", GPT4_PATTERN)]}
    char_w, pad, h = 0.072, 0.05, 0.3
    fig, ax = canvas(7.2, 2.0)
    y = 1.9
    for name, pieces in splits.items():
        other = set(splits["GPT-4" if name == "GPT-2" else "GPT-2"])
        ax.text(0.05, y - h - 0.06, name, fontsize=9, color=INK, va="center", weight="bold")
        x, row_y = 0.75, y
        for k, piece in enumerate(pieces):
            w = len(piece) * char_w + pad
            differs = piece not in other
            box(ax, x, row_y - h, w, h, _shown(piece), "token", fontsize=7.5, mono=True,
                fill=None if k % 2 == 0 else "#ffffff")
            if differs:
                ax.add_patch(Rectangle((x - 0.02, row_y - h - 0.02), w + 0.04, h + 0.04, fill=False,
                                       ec=color("accent"), lw=1.3))
            x += w + 0.04
            if "\n" in piece and k < len(pieces) - 1:
                x, row_y = 0.75, row_y - h - 0.12  # the second line of source starts a new row
        y = row_y - h - 0.22
    note(ax, 0.75, 0.1, "boxes: pre-tokens, alternately shaded; red outline: a pre-token the other pattern "
         "does not make; ␣ a space, ↵ a newline", fontsize=7)
    return fig


FIGURES = {
    "01_utf8_bytes.png": draw_utf8_bytes,
    "01_pretokens.png": draw_pretokens,
    "01_bpe_merges.png": draw_bpe_merges,
}
