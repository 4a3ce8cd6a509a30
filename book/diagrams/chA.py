"""Appendix A's diagrams: strides and views, broadcasting, a batch of rows times a matrix, a tiny
computation graph forward and backward, and one step of the training loop."""
# ruff: noqa: N999 (the appendix's letter is part of the module's name, as ch02 has its number)

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch, Rectangle

from .style import (
    COLORS,
    GREY,
    INK,
    arrow,
    box,
    canvas,
    color,
    grid,
    light,
    note,
    op,
    tensor,
)


def _ghost(ax: plt.Axes, x: float, y: float, values, *, cell: float = 0.32, role: str | None = None,
           fmt: str = "{:d}", fontsize: float = 6.5) -> None:
    """A matrix of stretched copies: dashed cells, grey numbers (what broadcasting pretends is there)."""
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            if v is None:
                continue
            cx, cy = x + j * cell, y - (i + 1) * cell
            ax.add_patch(Rectangle((cx, cy), cell, cell, fc=light(role, 0.93), ec=color(role), lw=0.6,
                                   ls=(0, (2, 2))))
            ax.text(cx + cell / 2, cy + cell / 2, fmt.format(v), ha="center", va="center",
                    fontsize=fontsize, color=GREY)


def draw_strides() -> plt.Figure:
    """One storage, three tensors that read it with different strides, and a copy that does not."""
    fig, ax = canvas(7.2, 3.25)
    cell = 0.34
    # The storage: six numbers in a row, with their offsets above.
    sx, sy = 2.58, 2.85
    note(ax, sx - 0.12, sy - cell / 2 + 0.07, "storage", ha="right", fontsize=7.5, role=INK)
    note(ax, sx - 0.12, sy - cell / 2 - 0.1, "one block of memory", ha="right", fontsize=6.8)
    grid(ax, sx, sy, [list(range(6))], "token", cell=cell, fmt="{:d}", fontsize=7.5,
         highlight=[[j in (0, 3) for j in range(6)]])
    for j in range(6):
        note(ax, sx + (j + 0.5) * cell, sy + 0.09, f"{j}", ha="center", fontsize=6.5)

    panels = [
        ("x = torch.arange(6).view(2, 3)", [[0, 1, 2], [3, 4, 5]], "(2, 3)", "stride (3, 1)", None),
        ("x.view(3, 2)", [[0, 1], [2, 3], [4, 5]], "(3, 2)", "stride (2, 1)", None),
        ("x.t()  (transpose)", [[0, 3], [1, 4], [2, 5]], "(3, 2)", "stride (1, 3)", [[True, True], [False] * 2,
                                                                                       [False] * 2]),
        ("x.t().contiguous()", [[0, 3], [1, 4], [2, 5]], "(3, 2)", "stride (2, 1)", None),
    ]
    centers = [0.95, 2.75, 4.5, 6.25]
    top = 1.75
    for k, ((code, values, shape, stride, hl), cx) in enumerate(zip(panels, centers)):
        cols = len(values[0])
        gx = cx - cols * cell / 2
        role = "key" if k == 3 else "token"
        grid(ax, gx, top, values, role, cell=cell, fmt="{:d}", fontsize=7.5, highlight=hl)
        note(ax, cx, top + 0.2, code, ha="center", fontsize=6.8, mono=True, role=INK)
        bottom = top - len(values) * cell
        note(ax, cx, bottom - 0.13, f"shape {shape}", ha="center", fontsize=6.8, mono=True)
        note(ax, cx, bottom - 0.3, stride, ha="center", fontsize=6.8, mono=True,
             role="accent" if k == 2 else None)
    # The three views share the storage; the copy has a storage of its own.
    for cx in centers[:3]:
        arrow(ax, (cx, 2.22), (cx, top + 0.3), dashed=True)
    ax.plot([centers[0], centers[2]], [2.22, 2.22], color=GREY, lw=0.8, ls=(0, (3, 2)))
    ax.plot([sx + 3 * cell, sx + 3 * cell], [sy - cell, 2.22], color=GREY, lw=0.8, ls=(0, (3, 2)))
    note(ax, 1.85, 2.36, "views: same storage, no copy", ha="center", fontsize=7)
    grid(ax, 5.55, 2.46, [[0, 3, 1, 4, 2, 5]], "key", cell=0.23, fmt="{:d}", fontsize=6.5)
    note(ax, 5.55 + 3 * 0.23, 2.58, "a new storage, in row order", ha="center", fontsize=6.8)
    arrow(ax, (centers[3], 2.46 - 0.23), (centers[3], top + 0.3), role="key")
    note(ax, 4.5, 0.16, "row 0 of x.t() is storage[0], storage[3]: a step of 3 along a row", ha="center",
         fontsize=7, role="accent")
    return fig


def draw_broadcast() -> plt.Figure:
    """(T, 1) + (1, C) -> (T, C): size-1 dimensions are stretched, then added elementwise."""
    fig, ax = canvas(7.2, 3.05)
    cell = 0.28
    top = 2.6
    col = [[0], [10], [20]]
    row = [[1, 2, 3, 4]]
    mid = top - 1.5 * cell
    below = top - 3 * cell - 0.1
    # The operands as stored.
    grid(ax, 0.25, top, col, "token", cell=cell, fmt="{:d}")
    note(ax, 0.25 + cell / 2, below, "a\n(3, 1)", ha="center", va="top", mono=True)
    op(ax, 0.8, mid, "+")
    grid(ax, 1.0, top - cell, row, "residual", cell=cell, fmt="{:d}")
    note(ax, 1.0 + 2 * cell, below, "b\n(1, 4)", ha="center", va="top", mono=True)
    arrow(ax, (2.22, mid), (2.6, mid), "stretch", offset=(-0.2, 0.12))
    # The stretched copies: column 0 and row 0 are real, the rest only pretended.
    x1 = 2.7
    grid(ax, x1, top, col, "token", cell=cell, fmt="{:d}")
    _ghost(ax, x1 + cell, top, [[v[0]] * 3 for v in col], cell=cell, role="token")
    op(ax, x1 + 4 * cell + 0.2, mid, "+")
    x2 = x1 + 4 * cell + 0.4
    grid(ax, x2, top, row, "residual", cell=cell, fmt="{:d}")
    _ghost(ax, x2, top - cell, [row[0], row[0]], cell=cell, role="residual")
    note(ax, x1 + 2 * cell, below, "(3, 4)", ha="center", va="top", mono=True)
    note(ax, x2 + 2 * cell, below, "(3, 4)", ha="center", va="top", mono=True)
    op(ax, x2 + 4 * cell + 0.2, mid, "=")
    x3 = x2 + 4 * cell + 0.4
    grid(ax, x3, top, [[c + r for r in row[0]] for [c] in col], None, cell=cell, fmt="{:d}")
    note(ax, x3 + 2 * cell, below, "a + b\n(3, 4)", ha="center", va="top", mono=True)
    note(ax, (x1 + x3 + 4 * cell) / 2, top + 0.17, "dashed cells are never stored: a size-1 "
         "dimension is read again and again (stride 0)", ha="center", fontsize=7)
    # The rule: align the shapes on the right, compare dimension by dimension.
    y0 = 0.98
    rows = [("x     ", "(B, T, C)", "(2, 3, 4)"), ("bias  ", "     (C,)", "      (4,)"),
            ("x+bias", "(B, T, C)", "(2, 3, 4)")]
    note(ax, 0.25, y0 + 0.24, "shapes align on the right:", fontsize=7.5, role=INK)
    for i, (name, sym, num) in enumerate(rows):
        y = y0 - i * 0.2 - (0.04 if i == 2 else 0)
        note(ax, 0.25, y, f"{name}  {sym}  {num}", fontsize=7.5, mono=True, role=INK, weight="normal" if i < 2 else "bold")
    ax.plot([0.25, 2.75], [y0 - 0.3, y0 - 0.3], color=GREY, lw=0.6)
    note(ax, 0.25, y0 - 0.66, "a missing dimension counts as size 1", fontsize=7)
    rows = [("x", "(T, C)", "(3, 4)"), ("p", "  (T,)", "  (3,)")]
    note(ax, 3.9, y0 + 0.24, "and fail where the sizes differ and neither is 1:", fontsize=7.5, role=INK)
    for i, (name, sym, num) in enumerate(rows):
        note(ax, 3.9, y0 - i * 0.2, f"{name}  {sym}  {num}", fontsize=7.5, mono=True, role=INK)
    ax.plot([3.9, 6.9], [y0 - 0.3, y0 - 0.3], color=GREY, lw=0.6)
    note(ax, 3.9, y0 - 0.44, "4 against 3 in the last place: an error", fontsize=7.5, role="accent")
    note(ax, 3.9, y0 - 0.66, "meant per position? p[:, None] is (T, 1) = (3, 1)", fontsize=7)
    return fig


def draw_rows() -> plt.Figure:
    """A batch of rows times one matrix, and the transposed weight that nn.Linear stores."""
    fig, ax = canvas(7.2, 3.05)
    cell = 0.3
    xv = [[1, 0, 2, 1], [0, 1, 1, 0], [2, 1, 0, 1]]
    W = [[1, 0], [0, 1], [1, 1], [-1, 2]]
    y = [[sum(a * b for a, b in zip(r, c)) for c in zip(*W)] for r in xv]
    top = 2.85
    hl_row = [[i == 1] * 4 for i in range(3)]
    grid(ax, 0.55, top, xv, "token", cell=cell, fmt="{:d}", highlight=hl_row,
         row_labels=["row 0", "row 1", "row 2"])
    note(ax, 0.55 + 2 * cell, top - 3 * cell - 0.1, "x  (N, C_in) = (3, 4)", ha="center", va="top", mono=True)
    op(ax, 1.98, top - 2 * cell, "@")
    grid(ax, 2.25, top, W, "residual", cell=cell, fmt="{:d}")
    note(ax, 2.25 + cell, top - 4 * cell - 0.1, "W  (C_in, C_out)\n= (4, 2)", ha="center", va="top", mono=True)
    op(ax, 3.1, top - 2 * cell, "=")
    grid(ax, 3.35, top, y, "value", cell=cell, fmt="{:d}", highlight=[[i == 1] * 2 for i in range(3)])
    note(ax, 3.35 + cell, top - 3 * cell - 0.1, "y = x @ W\n(N, C_out) = (3, 2)", ha="center", va="top",
         mono=True)
    note(ax, 4.25, top - 0.2, "row n of y = row n of x times W:", fontsize=7.5, role=INK)
    note(ax, 4.25, top - 0.42, "(0, 1, 1, 0) @ W = (0+0+1+0, 0+1+1+0) = (1, 2)", fontsize=7, mono=True,
         role="accent")
    note(ax, 4.25, top - 0.66, "every row meets the same W; N can be anything,", fontsize=7.5)
    note(ax, 4.25, top - 0.86, "and (B, T, C_in) @ W gives (B, T, C_out)", fontsize=7.5)
    # nn.Linear stores the transpose.
    yb = 0.72
    box(ax, 0.55, yb - 0.25, 1.55, 0.5, "nn.Linear(4, 2)", None, mono=True, fontsize=7.5)
    arrow(ax, (2.1, yb), (2.5, yb))
    grid(ax, 2.55, yb + cell, [list(r) for r in zip(*W)], "residual", cell=cell, fmt="{:d}")
    note(ax, 2.55 + 2 * cell, yb - cell - 0.1, ".weight  (C_out, C_in) = (2, 4)", ha="center", va="top",
         mono=True)
    note(ax, 4.0, yb + 0.2, "stores Wᵀ, one row per output feature,", fontsize=7.5, role=INK)
    note(ax, 4.0, yb, "and computes  y = x @ weight.T + bias", fontsize=7.5, mono=True, role=INK)
    note(ax, 4.0, yb - 0.2, "the same x W, with W = weight.T", fontsize=7.5)
    return fig


def draw_graph() -> plt.Figure:
    """L = (w x + b − y)² forward (values, left to right) and backward (gradients, right to left)."""
    fig, ax = canvas(7.2, 2.75)
    ym = 1.55  # the line of the forward pass
    bw, bh = 0.62, 0.4

    def leaf(x, y, name, value, param):
        return box(ax, x, y - bh / 2, bw, bh, f"{name} = {value}", "token" if param else None, fontsize=8)

    x = leaf(0.15, ym + 0.45, "x", 2, False)
    w = leaf(0.15, ym - 0.45, "w", 3, True)
    m = op(ax, 1.2, ym, "×")
    arrow(ax, (x[0] + bw / 2, x[1]), (m[0] - 0.09, m[1] + 0.1))
    arrow(ax, (w[0] + bw / 2, w[1]), (m[0] - 0.09, m[1] - 0.1))
    tensor(ax, 1.6, ym - bh / 2, 0.55, bh, "u = 6", None)
    arrow(ax, (m[0] + 0.13, ym), (1.6, ym))
    b = leaf(2.1, ym + 0.75, "b", 1, True)
    a = op(ax, 2.6, ym, "+")
    arrow(ax, (2.15, ym), (a[0] - 0.13, ym))
    arrow(ax, (b[0], b[1] - bh / 2), (a[0], a[1] + 0.13))
    tensor(ax, 3.0, ym - bh / 2, 0.55, bh, "z = 7", None)
    arrow(ax, (a[0] + 0.13, ym), (3.0, ym))
    t = leaf(3.5, ym + 0.75, "y", 5, False)
    s = op(ax, 4.0, ym, "−")
    arrow(ax, (3.55, ym), (s[0] - 0.13, ym))
    arrow(ax, (t[0], t[1] - bh / 2), (s[0], s[1] + 0.13))
    tensor(ax, 4.4, ym - bh / 2, 0.55, bh, "r = 2", None)
    arrow(ax, (s[0] + 0.13, ym), (4.4, ym))
    q = op(ax, 5.4, ym, "(·)²", r=0.17, fontsize=7.5)
    arrow(ax, (4.95, ym), (q[0] - 0.17, ym))
    box(ax, 5.95, ym - bh / 2, 0.75, bh, "L = 4", "accent", fontsize=8.5, weight="bold")
    arrow(ax, (q[0] + 0.17, ym), (5.95, ym))
    note(ax, 0.15, 2.62, "forward: compute the values, record each operation", fontsize=7.5, role=INK)
    note(ax, 7.05, 2.62, "teal: a leaf with requires_grad=True", ha="right", fontsize=7, role="token")
    # Backward: from L back to the leaves, each step multiplies by a local derivative.
    red = COLORS["accent"]
    yb = 0.62

    def back(x0, x1, text, xt=None):
        ax.add_patch(FancyArrowPatch((x0, yb), (x1, yb), arrowstyle="-|>", mutation_scale=9, color=red,
                                     lw=1.0, ls=(0, (3, 2)), shrinkA=1, shrinkB=1))
        ax.text(xt if xt is not None else (x0 + x1) / 2, yb + 0.1, text, ha="center", va="bottom",
                fontsize=7, color=red)

    back(6.3, 4.7, "∂L/∂r = 2r = 4")
    back(4.65, 3.3, "∂L/∂z = ∂L/∂r · 1 = 4")
    back(3.25, 1.9, "∂L/∂u = 4,  ∂L/∂b = 4")
    back(1.85, 0.45, "∂L/∂w = ∂L/∂u · x = 8")
    for xx in (6.3, 4.67, 3.27, 1.87):
        ax.plot([xx, xx], [ym - bh / 2 - 0.03, yb], color=red, lw=0.6, ls=":")
    ax.plot([0.46, 0.46], [yb, w[1] - bh / 2 - 0.03], color=red, lw=0.6, ls=":")
    note(ax, 3.6, 0.2, "backward (loss.backward()): multiply the local derivatives from L back to the "
         "leaves; w.grad = 8, b.grad = 4", ha="center", fontsize=7.5, role=INK)
    return fig


def draw_train_step() -> plt.Figure:
    """One step of the loop in the order of its lines: forward to a loss, zero_grad, backward, step."""
    fig, ax = canvas(7.2, 3.3)
    h = 0.5
    yf, yb = 2.24, 0.72
    ids = tensor(ax, 0.1, yf - h / 2, 0.95, h, "batch[:, :-1]", "(B, T)", "token", fontsize=7.5)
    model = box(ax, 1.45, yf - h / 2, 0.95, h, "model(...)", None, mono=True, fontsize=7.5)
    arrow(ax, (ids[0] + 0.475, yf), (1.45, yf))
    logits = tensor(ax, 2.8, yf - h / 2, 0.85, h, "logits", "(B, T, V)", "query", fontsize=8)
    arrow(ax, (2.4, yf), (2.8, yf))
    tensor(ax, 4.05, yf - h / 2, 0.95, h, "reshape", "(B·T, V)", "query", fontsize=8)
    arrow(ax, (logits[0] + 0.425, yf), (4.05, yf))
    ce = box(ax, 5.4, yf - h / 2, 0.95, h, "F.cross_entropy", None, mono=True, fontsize=6.8)
    arrow(ax, (5.0, yf), (5.4, yf))
    tg = box(ax, 4.55, yf + 0.5, 1.8, 0.36, "batch[:, 1:].reshape(-1)", "token", mono=True, fontsize=6.8)
    note(ax, 4.47, tg[1], "targets (B·T,)", ha="right", fontsize=6.8, mono=True)
    arrow(ax, (ce[0], yf + 0.5), (ce[0], yf + h / 2))
    loss = tensor(ax, 6.55, yf - 0.2, 0.55, 0.4, "loss", "(): a scalar", "accent", fontsize=8)
    arrow(ax, (6.35, yf), (6.55, yf))
    note(ax, 0.1, 3.12, "1  forward", fontsize=8, role=INK, weight="bold")
    # zero_grad, then backward and the update, right to left.
    zero = box(ax, 4.2, 1.27, 1.15, 0.32, "opt.zero_grad()", "mask", mono=True, fontsize=6.8)
    note(ax, 4.1, zero[1] + 0.09, "2  zero_grad", ha="right", fontsize=8, role=INK, weight="bold")
    note(ax, 4.1, zero[1] - 0.1, "empty every .grad", ha="right", fontsize=6.8)
    box(ax, 5.9, yb - h / 2, 1.2, h, "loss.backward()", "accent", mono=True, fontsize=7)
    arrow(ax, (loss[0], yf - 0.2 - 0.3), (loss[0], yb + h / 2), role="accent")
    grads = box(ax, 4.2, yb - h / 2, 1.15, h, "p.grad for\nevery p", "accent", fontsize=7.5)
    ax.plot([grads[0], grads[0]], [1.27, yb + h / 2 + 0.02], color=GREY, lw=0.9, ls=(0, (3, 2)))
    arrow(ax, (5.9, yb), (5.35, yb), role="accent")
    box(ax, 2.35, yb - h / 2, 1.3, h, "opt.step()", "value", mono=True, fontsize=7.5)
    arrow(ax, (4.2, yb), (3.65, yb), role="value")
    params = box(ax, 0.3, yb - h / 2, 1.45, h, "model.parameters()", "residual", fontsize=7)
    note(ax, params[0], yb - h / 2 - 0.13, "p ← p − update(grad, m, v)", ha="center", fontsize=6.8, mono=True)
    arrow(ax, (2.35, yb), (1.75, yb), role="value")
    arrow(ax, (params[0] + 0.3, yb + h / 2), (model[0] - 0.15, yf - h / 2), role="residual", rad=-0.1)
    note(ax, 1.6, 1.45, "next step's\nforward uses\nthe new p", fontsize=6.8, va="center")
    note(ax, 5.9, 1.12, "3  backward", fontsize=8, role=INK, weight="bold")
    note(ax, 2.35, 1.12, "4  update", fontsize=8, role=INK, weight="bold")
    return fig


FIGURES = {
    "A_strides.png": draw_strides,
    "A_broadcast.png": draw_broadcast,
    "A_rows.png": draw_rows,
    "A_graph.png": draw_graph,
    "A_train_step.png": draw_train_step,
}
