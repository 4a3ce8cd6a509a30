"""Chapter 00's diagrams.

What a language model is, in one page: a context becomes token ids, the model gives a probability
to every possible next token, one is sampled and appended, and the loop runs again; the same
probabilities, read at the true next token, give the loss. And how the corpus becomes training
and validation text: each document's split is decided by a hash of its name alone, and the
documents of each split are joined into one stream with a separator between them."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from minillm.corpus import hash_position, split_of

from .style import GREY, INK, arrow, box, canvas, color, grid, light, note, op

CONTEXT = "return sel"
# An invented next-character distribution after "...sel", shaped like the counting model's of
# Figure 0.8: a few likely characters drawn, the rest of the vocabulary lumped together.
NEXT = [("f", 0.90), ("e", 0.04), ("l", 0.02), ("d", 0.01), ("s", 0.01)]


def _show(c: str) -> str:
    return "␣" if c == " " else c


def draw_lm_loop() -> plt.Figure:
    """context -> ids -> model -> p(next) over the vocabulary -> sample -> append -> again."""
    fig, ax = canvas(7.2, 2.95)
    chars = list(CONTEXT)
    cell, gx, gy = 0.2, 0.75, 2.5
    # 1. The context as characters (tokens, for now) and their ids.
    note(ax, 0.08, gy + 0.22, "1. the context, cut into tokens (here: characters)", fontsize=7.5, role=INK)
    grid(ax, gx, gy, [[_show(c) for c in chars]], "token", cell=cell, fontsize=7.5)
    grid(ax, gx, gy - cell - 0.03, [[ord(c) for c in chars]], "token", cell=cell, fmt="{:d}", fontsize=6.5)
    note(ax, gx - 0.07, gy - cell / 2, "tokens", ha="right", fontsize=6.5)
    note(ax, gx - 0.07, gy - 1.5 * cell - 0.03, "ids", ha="right", fontsize=6.5)
    # 2. The model.
    mx, my, mw, mh = 0.3, 0.8, 1.55, 0.6
    mc = box(ax, mx, my, mw, mh, "", "residual")
    note(ax, mc[0], mc[1] + 0.1, "language model", ha="center", fontsize=8, role=INK)
    note(ax, mc[0], mc[1] - 0.13, "(counts, or a transformer)", ha="center", fontsize=6.5)
    arrow(ax, (mc[0], gy - 2 * cell - 0.07), (mc[0], my + mh), text="2. the ids go in", offset=(0.06, 0.0))
    # 3. One probability for every token of the vocabulary.
    bx, by, bw, bh, step = 2.45, 0.55, 0.2, 0.95, 0.28
    note(ax, bx - 0.1, 1.9, "3. a probability for every possible next token,", fontsize=7.5, role=INK)
    note(ax, bx - 0.1, 1.73, "$p(x_t \\mid x_1, \\ldots, x_{t-1})$, summing to 1", fontsize=7)
    bars = NEXT + [("…", 1 - sum(p for _, p in NEXT))]
    for k, (c, p) in enumerate(bars):
        x = bx + k * step
        role = "accent" if k == 0 else ("mask" if c == "…" else "query")
        ax.add_patch(Rectangle((x, by), bw, max(bh * p, 0.012), fc=light(role, 0.35), ec=color(role), lw=0.6))
        note(ax, x + bw / 2, by - 0.1, _show(c), ha="center", fontsize=7.5, mono=True, role=INK)
        note(ax, x + bw / 2, by + bh * p + 0.07, f"{p:.2f}", ha="center", fontsize=6.5)
    right = bx + len(bars) * step - (step - bw)
    note(ax, bx + (len(bars) - 1) * step + bw / 2, by - 0.3, "all the other tokens", ha="center", fontsize=6.5)
    arrow(ax, (mx + mw, mc[1]), (bx - 0.12, mc[1]))
    # 4. Sample one, 5. append it, and go round again.
    sx, sy = 4.65, mc[1]
    op(ax, sx, sy, "~", r=0.15, fontsize=10)
    arrow(ax, (right + 0.08, sy), (sx - 0.15, sy))
    note(ax, sx, sy - 0.27, "4. sample", ha="center", fontsize=7.5, role=INK)
    nx, ny = 5.2, sy - 0.16
    box(ax, nx, ny, 0.32, 0.32, "f", "accent", fontsize=9, mono=True)
    arrow(ax, (sx + 0.15, sy), (nx, sy))
    new = (CONTEXT + "f")[3:]
    tx, ty = 5.05, gy
    note(ax, tx - 0.25, ty + 0.22, "5. append it: the new context", fontsize=7.5, role=INK)
    grid(ax, tx, ty, [[_show(c) for c in new]], "token", cell=cell, fontsize=7.5,
         highlight=[[k == len(new) - 1 for k in range(len(new))]])
    note(ax, tx - 0.06, ty - cell / 2, "…", ha="right", fontsize=8, role=INK)
    fx = tx + (len(new) - 0.5) * cell
    arrow(ax, (nx + 0.32, ny + 0.16), (fx, ty - cell - 0.03), rad=0.35)
    arrow(ax, (tx - 0.25, ty - cell / 2), (gx + len(chars) * cell + 0.15, ty - cell / 2),
          text="6. repeat", offset=(-0.3, 0.1))
    # Training reads the same probabilities at the true next token.
    surprise = -math.log2(NEXT[0][1])
    note(ax, 5.0, 0.36, "training: if the text goes on with f, the\nloss at this position is its surprise\n"
                        f"$-\\log_2 p(\\mathtt{{f}}) = -\\log_2 {NEXT[0][1]:.2f} = {surprise:.2f}$ bits",
         fontsize=6.8, va="center")
    ax.plot([4.9, 4.9], [0.12, 0.6], color=GREY, lw=0.8)
    note(ax, 0.3, 0.3, "generation: steps 1 to 6, round after\nround, one new token each time",
         fontsize=6.8, va="center", role=INK)
    return fig


# Five real names of the built-in corpus, in its order (modules sorted by path, then help topics);
# two of them hash below 0.05. Only the names are drawn, so the figure needs no corpus.
SPLIT_NAMES = ["copyreg.py", "json/decoder.py", "sched.py", "typing.py", "pydoc_data/topics.py:for"]
VAL_FRACTION = 0.05


def draw_split_stream() -> plt.Figure:
    """Documents -> u = hash(name) -> train or validation -> one stream per split, separators between."""
    fig, ax = canvas(7.2, 3.3)
    top, row, bh = 2.86, 0.34, 0.25
    note(ax, 0.1, top + 0.24, "1. documents, in corpus order", fontsize=7.5, role=INK)
    note(ax, 2.55, top + 0.24, "2. $u$ = first 8 bytes of SHA-256(name) as a number in [0, 1)",
         fontsize=7.5, role=INK)
    lx, lw = 3.95, 1.9  # the number line [0, 1) drawn on every row
    note(ax, lx, top + 0.04, "0", ha="center", fontsize=6)
    note(ax, lx + lw, top + 0.04, "1", ha="center", fontsize=6)
    note(ax, lx + VAL_FRACTION * lw, top + 0.04, "0.05", ha="left", fontsize=6, role="accent")
    streams: dict[str, list[str]] = {"train": [], "val": []}
    for i, name in enumerate(SPLIT_NAMES):
        u, split = hash_position(name), split_of(name, VAL_FRACTION)
        streams[split].append(name)
        y = top - 0.12 - i * row
        role = "accent" if split == "val" else "token"
        box(ax, 0.1, y - bh / 2, 2.05, bh, name, "token", fontsize=6.8, mono=True)
        arrow(ax, (2.2, y), (2.6, y))
        note(ax, 2.65, y, f"u = {u:.3f}", fontsize=7, mono=True, role=INK)
        ax.add_patch(Rectangle((lx, y - 0.05), VAL_FRACTION * lw, 0.1, fc=light("accent", 0.45), ec="none"))
        ax.plot([lx, lx + lw], [y, y], color=GREY, lw=0.8)
        ax.plot([lx + lw] * 2, [y - 0.04, y + 0.04], color=GREY, lw=0.8)
        ax.plot([lx + u * lw], [y], "o", ms=4.5, color=color(role), zorder=3)
        note(ax, lx + lw + 0.15, y, "validation" if split == "val" else "training", fontsize=7, role=role)
    note(ax, lx, top - 0.12 - (len(SPLIT_NAMES) - 0.45) * row,
         "shaded: $u$ < 0.05, validation (about 5% of all names)", fontsize=6.3, va="center", role="accent")
    # 3. Each split becomes one stream.
    y0 = top - 0.12 - len(SPLIT_NAMES) * row - 0.17
    note(ax, 0.1, y0, "3. the documents of each split joined into one stream, a separator between two documents",
         fontsize=7.5, role=INK)
    sep = "<|endoftext|>"
    for k, (split, names) in enumerate([("train", streams["train"]), ("val", streams["val"])]):
        y = y0 - 0.3 - k * 0.38
        note(ax, 0.95, y, "training" if split == "train" else "validation", ha="right", fontsize=7,
             role="token" if split == "train" else "accent")
        x = 1.05
        for j, name in enumerate(names):
            if j:
                w = 0.95
                box(ax, x, y - bh / 2, w, bh, sep, "mask", fontsize=6.3, mono=True)
                x += w + 0.04
            w = 0.12 + 0.072 * len(name)
            box(ax, x, y - bh / 2, w, bh, name, "token", fontsize=6.3, mono=True)
            x += w + 0.04
        note(ax, x + 0.02, y, "…", fontsize=8, role=INK)
    return fig


FIGURES = {"00_lm_loop.png": draw_lm_loop, "00_split_stream.png": draw_split_stream}
