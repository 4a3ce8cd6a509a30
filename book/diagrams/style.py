"""The drawing kit of the book's diagrams: one visual language for every picture of an idea.

A diagram is drawn on a canvas measured in inches (`canvas(7.2, 3)` is a 7.2 x 3 inch picture
whose axes run from 0 to 7.2 and 0 to 3), so a box placed at x=1 sits one inch from the left
edge of the printed figure. The colors are the package's palette (`minillm.figures.COLORS`):
queries blue, keys orange, values green, the residual stream purple, tokens teal, what is
masked or ignored grey, what to look at red. A tensor is a rounded box with its name inside
and its shape under it, in monospace, written `(B, T, C)` as in the text.
"""

from __future__ import annotations

from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.colors import to_hex, to_rgb
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle

from minillm.figures import COLORS

__all__ = ["COLORS", "GREY", "INK", "MONO", "arrow", "box", "canvas", "grid", "light", "note", "op", "tensor", "title"]

INK = "#333333"  # text and outlines
GREY = "#777777"  # shapes, notes, secondary arrows
MONO = "DejaVu Sans Mono"


def color(role: str | None) -> str:
    """The palette color of a role ("query", "key", ...), or a literal color, or INK."""
    if role is None:
        return INK
    return COLORS.get(role, role)


def light(role: str | None, amount: float = 0.78) -> str:
    """The role's color mixed with `amount` of white: the fill of its boxes and cells."""
    if role is None:
        return "#ffffff"
    r, g, b = to_rgb(color(role))
    return to_hex((r + (1 - r) * amount, g + (1 - g) * amount, b + (1 - b) * amount))


def canvas(width: float, height: float) -> tuple[plt.Figure, plt.Axes]:
    """A figure of `width` x `height` inches whose data coordinates are inches, axes off."""
    fig = plt.figure(figsize=(width, height))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(0, height)
    ax.set_aspect("equal")
    ax.axis("off")
    return fig, ax


def box(ax: plt.Axes, x: float, y: float, w: float, h: float, text: str = "", role: str | None = None, *,
        fontsize: float = 8, mono: bool = False, dashed: bool = False, fill: str | None = None,
        weight: str = "normal") -> tuple[float, float]:
    """A rounded box with its lower-left corner at (x, y), filled with the role's light color.

    Returns its center, handy for arrows."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0,rounding_size=0.06",
                                fc=fill or light(role), ec=color(role), lw=1.0,
                                ls=(0, (3, 2)) if dashed else "-"))
    if text:
        ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=fontsize, color=INK,
                family=MONO if mono else None, weight=weight)
    return x + w / 2, y + h / 2


def tensor(ax: plt.Axes, x: float, y: float, w: float, h: float, name: str, shape: str | None = None,
           role: str | None = None, *, fontsize: float = 8.5) -> tuple[float, float]:
    """A tensor: a box named `name` with its `shape` ("(B, T, C)") in grey monospace under it."""
    center = box(ax, x, y, w, h, name, role, fontsize=fontsize)
    if shape:
        ax.text(x + w / 2, y - 0.05, shape, ha="center", va="top", fontsize=fontsize - 1.5, color=GREY, family=MONO)
    return center


def grid(ax: plt.Axes, x: float, y: float, values: Sequence[Sequence[object]], role: str | None = None, *,
         cell: float = 0.32, fmt: str = "{:.2f}", masked: Sequence[Sequence[bool]] | None = None,
         highlight: Sequence[Sequence[bool]] | None = None, fontsize: float = 6.5,
         row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
         masked_text: str = "") -> tuple[float, float, float, float]:
    """A matrix drawn cell by cell, its top-left corner at (x, y); row i is drawn i cells down.

    `values` holds numbers (printed with `fmt`), strings, or None (an empty cell). Cells where
    `masked` is true are grey and show `masked_text` (for instance "−∞"); cells where
    `highlight` is true get a red outline. Returns (left, bottom, right, top)."""
    rows, cols = len(values), len(values[0])
    for i in range(rows):
        for j in range(cols):
            cx, cy = x + j * cell, y - (i + 1) * cell
            hidden = bool(masked and masked[i][j])
            ax.add_patch(Rectangle((cx, cy), cell, cell, fc=light("mask", 0.55) if hidden else light(role, 0.82),
                                   ec=color(role) if role else GREY, lw=0.6))
            v = masked_text if hidden else values[i][j]
            if v is not None and v != "":
                s = fmt.format(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v)
                ax.text(cx + cell / 2, cy + cell / 2, s, ha="center", va="center", fontsize=fontsize,
                        color=GREY if hidden else INK)
            if highlight and highlight[i][j]:
                ax.add_patch(Rectangle((cx, cy), cell, cell, fill=False, ec=COLORS["accent"], lw=1.4))
    for i, lab in enumerate(row_labels or []):
        ax.text(x - 0.06, y - (i + 0.5) * cell, lab, ha="right", va="center", fontsize=fontsize + 0.5, color=GREY)
    for j, lab in enumerate(col_labels or []):
        ax.text(x + (j + 0.5) * cell, y + 0.06, lab, ha="center", va="bottom", fontsize=fontsize + 0.5, color=GREY)
    return x, y - rows * cell, x + cols * cell, y


def arrow(ax: plt.Axes, start: tuple[float, float], end: tuple[float, float], text: str | None = None, *,
          role: str | None = None, rad: float = 0.0, lw: float = 1.0, dashed: bool = False,
          fontsize: float = 7, offset: tuple[float, float] = (0.05, 0.0)) -> None:
    """An arrow from `start` to `end` (optionally curved by `rad`), labelled at its middle."""
    c = color(role) if role else GREY
    ax.add_patch(FancyArrowPatch(start, end, arrowstyle="-|>", mutation_scale=9, color=c, lw=lw,
                                 connectionstyle=f"arc3,rad={rad}", ls=(0, (3, 2)) if dashed else "-",
                                 shrinkA=1, shrinkB=1))
    if text:
        mx, my = (start[0] + end[0]) / 2 + offset[0], (start[1] + end[1]) / 2 + offset[1]
        ax.text(mx, my, text, fontsize=fontsize, color=GREY, ha="left", va="center")


def op(ax: plt.Axes, x: float, y: float, symbol: str, *, r: float = 0.13, role: str | None = None,
       fontsize: float = 9) -> tuple[float, float]:
    """An operation drawn as a small circle centered at (x, y) with `symbol` inside ("+", "×", "@")."""
    ax.add_patch(Circle((x, y), r, fc="#ffffff", ec=color(role) if role else INK, lw=1.0))
    ax.text(x, y, symbol, ha="center", va="center", fontsize=fontsize, color=INK)
    return x, y


def note(ax: plt.Axes, x: float, y: float, text: str, *, fontsize: float = 7, ha: str = "left",
         va: str = "center", role: str | None = None, mono: bool = False, **kw) -> None:
    """A small annotation, grey unless a role colors it."""
    ax.text(x, y, text, fontsize=fontsize, ha=ha, va=va, color=color(role) if role else GREY,
            family=MONO if mono else None, **kw)


def title(ax: plt.Axes, width: float, y: float, text: str) -> None:
    """A one-line heading centered across the canvas (most diagrams leave this to the caption)."""
    ax.text(width / 2, y, text, ha="center", va="center", fontsize=9.5, color=INK)
