"""Chapter 00's diagram: what a language model is, in one page. A context becomes token ids, the
model gives a probability to every possible next token, one is sampled and appended, and the loop
runs again; the same probabilities, read at the true next token, give the loss."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from .style import GREY, INK, arrow, box, canvas, color, grid, light, note, op

CONTEXT = "return sel"
# An invented next-character distribution after "...sel", shaped like the counting model's of
# Figure 0.7: a few likely characters drawn, the rest of the vocabulary lumped together.
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


FIGURES = {"00_lm_loop.png": draw_lm_loop}
