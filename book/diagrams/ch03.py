"""Chapter 03's diagrams: the head split and merge, the two heads of the worked example, the KV cache
filling up during generation, and grouped-query attention between its two extremes."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
from matplotlib.patches import Rectangle

from .style import COLORS, GREY, INK, arrow, box, canvas, color, grid, light, note, op

# The chapter's worked example (section "A worked example by hand"): three tokens, C = 4, H = 2, D = 2.
TOKENS = ["self", ".", "x"]
QUOTED = [f"'{t}'" for t in TOKENS]  # quoted, so that the "." is visible
X = [[1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 1]]
W_Q = [[1, 0, 0, 1], [0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 1, 0]]
W_K = [[1, 0, 1, 0], [0, 1, 0, 0], [0, 0, 0, 1], [1, 0, 0, 1]]
W_V = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
W_O = [[1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 1, 0], [0, 0, 0, 1]]
HEADS, HEAD_DIM = 2, 2

# Two shades of the query color tell the heads apart wherever channels are drawn.
HEAD_FILL = [light("query", 0.85), light("query", 0.5)]


def _matmul(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    return [[sum(a[i][k] * b[k][j] for k in range(len(b))) for j in range(len(b[0]))] for i in range(len(a))]


def _cols(m: list[list[float]], h: int) -> list[list[float]]:
    return [row[h * HEAD_DIM : (h + 1) * HEAD_DIM] for row in m]


def worked_example() -> dict[str, object]:
    """The per-head weights and outputs, their concatenation and the output, in plain Python."""
    q, k, v = _matmul(X, W_Q), _matmul(X, W_K), _matmul(X, W_V)
    t = len(X)
    weights, outs = [], []
    for h in range(HEADS):
        qh, kh, vh = _cols(q, h), _cols(k, h), _cols(v, h)
        a = []
        for i in range(t):
            e = [math.exp(sum(x * y for x, y in zip(qh[i], kh[j])) / math.sqrt(HEAD_DIM)) if j <= i else 0.0
                 for j in range(t)]
            a.append([x / sum(e) for x in e])
        weights.append(a)
        outs.append(_matmul(a, vh))
    concat = [outs[0][i] + outs[1][i] for i in range(t)]
    return {"weights": weights, "heads": outs, "concat": concat, "y": _matmul(concat, W_O)}


def _cells(ax: plt.Axes, x: float, y: float, values: list[list[object]], fills: list[list[str]], *,
           cell: float = 0.3, edge: str | None = None, fontsize: float = 7, fmt: str = "{:d}") -> None:
    """A matrix whose cells each have their own fill; top-left corner at (x, y)."""
    for i, row in enumerate(values):
        for j, v in enumerate(row):
            cx, cy = x + j * cell, y - (i + 1) * cell
            ax.add_patch(Rectangle((cx, cy), cell, cell, fc=fills[i][j], ec=edge or color("query"), lw=0.6))
            s = fmt.format(v) if isinstance(v, (int, float)) else str(v)
            ax.text(cx + cell / 2, cy + cell / 2, s, ha="center", va="center", fontsize=fontsize, color=INK)


def _bracket(ax: plt.Axes, x0: float, x1: float, y: float, text: str, *, fontsize: float = 6.5) -> None:
    """A thin bracket over [x0, x1] at height y, labelled above."""
    ax.plot([x0 + 0.02, x0 + 0.02, x1 - 0.02, x1 - 0.02], [y - 0.04, y, y, y - 0.04], color=GREY, lw=0.7)
    note(ax, (x0 + x1) / 2, y + 0.1, text, ha="center", fontsize=fontsize)


def draw_head_split() -> plt.Figure:
    """(B, T, C) -> view (B, T, H, D) -> transpose (B, H, T, D), on a tiny tensor; and the way back."""
    fig, ax = canvas(7.2, 3.55)
    cell, top = 0.3, 2.95
    T, H, D = 3, 2, 2
    vals = [[t * H * D + c for c in range(H * D)] for t in range(T)]

    # (a) the projection's output: one row per token, the heads side by side in the channels.
    xa = 0.55
    _cells(ax, xa, top, vals, [[HEAD_FILL[c // D] for c in range(H * D)] for _ in range(T)], cell=cell)
    for t in range(T):
        note(ax, xa - 0.06, top - (t + 0.5) * cell, f"t={t}", ha="right", fontsize=6.5)
    for h in range(H):
        _bracket(ax, xa + h * D * cell, xa + (h + 1) * D * cell, top + 0.06, f"head {h}")
    note(ax, xa + 2 * cell, top + 0.42, "q = x W_Q", ha="center", fontsize=7.5, mono=True, role=INK)
    bottom = top - T * cell
    note(ax, xa + 2 * cell, bottom - 0.13, "(B, T, C)", ha="center", fontsize=7, mono=True)
    note(ax, xa + 2 * cell, bottom - 0.3, "= (1, 3, 4)", ha="center", fontsize=7, mono=True)

    # (b) view: each token's C channels read as H rows of D.
    xb, gap = 2.35, 0.14
    for t in range(T):
        x0 = xb + t * (D * cell + gap)
        block = [vals[t][h * D : (h + 1) * D] for h in range(H)]
        _cells(ax, x0, top - 0.5 * cell, block, [[HEAD_FILL[h]] * D for h in range(H)], cell=cell)
        note(ax, x0 + cell, top - 0.5 * cell + 0.1, f"t={t}", ha="center", fontsize=6.5)
    for h in range(H):
        note(ax, xb - 0.06, top - (h + 1) * cell, f"h={h}", ha="right", fontsize=6.5)
    mid_b = xb + (T * D * cell + (T - 1) * gap) / 2
    note(ax, mid_b, top + 0.42, ".view(B, T, H, D)", ha="center", fontsize=7.5, mono=True, role=INK)
    note(ax, mid_b, bottom - 0.13, "(B, T, H, D)", ha="center", fontsize=7, mono=True)
    note(ax, mid_b, bottom - 0.3, "= (1, 3, 2, 2)", ha="center", fontsize=7, mono=True)
    note(ax, mid_b, top - 2.5 * cell - 0.08, "same memory, read in rows of D", ha="center", fontsize=6.5)

    # (c) transpose: the heads move next to the batch; each head is a (T, D) matrix.
    xc, gap_c = 5.0, 0.3
    for h in range(H):
        x0 = xc + h * (D * cell + gap_c)
        block = [vals[t][h * D : (h + 1) * D] for t in range(T)]
        _cells(ax, x0, top, block, [[HEAD_FILL[h]] * D for _ in range(T)], cell=cell)
        note(ax, x0 + cell, top + 0.1, f"head {h}", ha="center", fontsize=6.5)
    for t in range(T):
        note(ax, xc - 0.06, top - (t + 0.5) * cell, f"t={t}", ha="right", fontsize=6.5)
    mid_c = xc + (H * D * cell + gap_c) / 2
    note(ax, mid_c, top + 0.42, ".transpose(1, 2)", ha="center", fontsize=7.5, mono=True, role=INK)
    note(ax, mid_c, bottom - 0.13, "(B, H, T, D)", ha="center", fontsize=7, mono=True)
    note(ax, mid_c, bottom - 0.3, "= (1, 2, 3, 2)", ha="center", fontsize=7, mono=True)

    ya = top - 1.5 * cell
    arrow(ax, (xa + 4 * cell + 0.12, ya), (xb - 0.3, ya))
    arrow(ax, (xb + T * D * cell + (T - 1) * gap + 0.1, ya), (xc - 0.3, ya))
    note(ax, 3.6, bottom - 0.55, "neither step moves a number: both change only how memory is read "
         "(the strides)", ha="center", fontsize=6.8)
    note(ax, 3.6, bottom - 0.74, "head h owns channels hD … (h+1)D − 1 of every token; after the "
         "transpose it is a batch of its own", ha="center", fontsize=6.8)

    # The way back: merge the heads' outputs, then mix them with W_O.
    yb, h_box, w_box = 0.22, 0.42, 0.85
    xs = [0.25, 2.2, 4.15, 6.1]
    specs = [("head outputs", "(B, H, T, D)", "token"), ("per token", "(B, T, H, D)", "token"),
             ("concatenated", "(B, T, C)", "token"), ("to the residual", "(B, T, C)", "residual")]
    for x0, (name, shape, role) in zip(xs, specs):
        box(ax, x0, yb + 0.12, w_box, h_box, name, role, fontsize=7)
        note(ax, x0 + w_box / 2, yb + 0.02, shape, ha="center", fontsize=6.8, mono=True)
    labels = [".transpose(1, 2)", ".reshape(B, T, C)", "@ W_O  (o_proj)"]
    for x0, x1, lab in zip(xs, xs[1:], labels):
        arrow(ax, (x0 + w_box + 0.04, yb + 0.33), (x1 - 0.04, yb + 0.33))
        note(ax, (x0 + w_box + x1) / 2, yb + 0.47, lab, ha="center", fontsize=6.8, mono=True, role=INK)
    note(ax, (xs[1] + w_box + xs[2]) / 2, yb + 0.14, "a copy: the memory\nis not in this order", ha="center",
         fontsize=6.3, role="accent")
    note(ax, 0.25, yb + 0.8, "the way back, after attention:", fontsize=7.5, role=INK)
    return fig


def draw_two_heads() -> plt.Figure:
    """The worked example: each head's weights average its own values; concatenate; mix with W_O."""
    ex = worked_example()
    fig, ax = canvas(7.2, 3.75)
    c = 0.36
    tops = [3.2, 1.7]
    future = [[j > i for j in range(3)] for i in range(3)]
    v = _matmul(X, W_V)
    out_fill = [light("token", 0.85), light("token", 0.5)]
    xa, xv, xh = 0.95, 2.5, 3.6
    for h, top in enumerate(tops):
        mid = top - 1.5 * c
        below = top - 3 * c - 0.12
        note(ax, 0.08, mid, f"head {h}", fontsize=8.5, role=INK)
        grid(ax, xa, top, ex["weights"][h], "accent", cell=c, fmt="{:.3f}", masked=future, masked_text="0",
             row_labels=QUOTED, col_labels=QUOTED, fontsize=7.5)
        note(ax, xa + 1.5 * c, below, f"weights $A^{{({h})}}$", ha="center", fontsize=7)
        op(ax, (xa + 3 * c + xv) / 2, mid, "@", r=0.11, fontsize=8)
        grid(ax, xv, top, _cols(v, h), "value", cell=c, fmt="{:g}", fontsize=8)
        note(ax, xv + c, below, f"$V^{{({h})}}$", ha="center", fontsize=7)
        op(ax, (xv + 2 * c + xh) / 2, mid, "=", r=0.11, fontsize=8)
        _cells(ax, xh, top, ex["heads"][h], [[out_fill[h]] * 2 for _ in range(3)], cell=c, fmt="{:.3f}",
               edge=color("token"), fontsize=7.5)
        note(ax, xh + c, below, f"$\\mathrm{{head}}_{h}$", ha="center", fontsize=7)
    # The two outputs side by side, then mixed by W_O.
    xc, top_c, top_y = 5.2, tops[0], 1.45
    _cells(ax, xc, top_c, ex["concat"], [[out_fill[j // 2] for j in range(4)] for _ in range(3)], cell=c,
           fmt="{:.3f}", edge=color("token"), fontsize=7.5)
    for h in range(2):
        _bracket(ax, xc + 2 * h * c, xc + 2 * (h + 1) * c, top_c + 0.06, f"head {h}")
    note(ax, xc + 2 * c, top_c + 0.4, "concatenated  (T, C)", ha="center", fontsize=7.5, role=INK)
    arrow(ax, (xh + 2 * c + 0.08, tops[0] - 1.5 * c), (xc - 0.08, tops[0] - 1.5 * c))
    arrow(ax, (xh + 2 * c + 0.08, tops[1] - 1.5 * c), (xc - 0.08, top_c - 2.5 * c), rad=0.15)
    yb = top_c - 3 * c
    arrow(ax, (xc + 2 * c, yb - 0.04), (xc + 2 * c, top_y + 0.2))
    note(ax, xc + 2 * c + 0.1, (yb + top_y + 0.16) / 2, "$@\\, W_O$  (C, C)", fontsize=7)
    # W_O itself, small, beside the output it produces.
    cw = 0.17
    grid(ax, xc - 4 * cw - 0.11, top_y - 0.47, W_O, "residual", cell=cw, fmt="{:g}", fontsize=6.8)
    note(ax, xc - 2 * cw - 0.11, top_y - 0.47 - 4 * cw - 0.12, "$W_O$  (C, C)", ha="center", fontsize=7)
    grid(ax, xc, top_y, ex["y"], "residual", cell=c, fmt="{:.3f}", fontsize=7.5,
         col_labels=["c0", "c1", "c2", "c3"])
    note(ax, xc + 2 * c, top_y - 3 * c - 0.12, "output y  (T, C)", ha="center", fontsize=7)
    note(ax, xc + 2 * c, top_y - 3 * c - 0.29, "columns c2, c3: head 0 plus head 1", ha="center", fontsize=6.8,
         role="accent")
    return fig


def _slot(ax: plt.Axes, x: float, y: float, w: float, h: float, text: str, role: str | None, *,
          new: bool = False) -> None:
    """One position of a cache buffer: filled (the role's color), new (red outline), or empty (dashed)."""
    if role is None:
        ax.add_patch(Rectangle((x, y), w, h, fc="#ffffff", ec=GREY, lw=0.6, ls=(0, (2, 2))))
        return
    ax.add_patch(Rectangle((x, y), w, h, fc=light(role, 0.72 if new else 0.85), ec=color(role), lw=0.6))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=6.8, color=INK)
    if new:
        ax.add_patch(Rectangle((x, y), w, h, fill=False, ec=COLORS["accent"], lw=1.4))


def draw_kv_cache() -> plt.Figure:
    """Prefill writes the prompt's keys and values; each decode step adds one column and one query."""
    fig, ax = canvas(7.2, 3.85)
    cap, prompt, steps = 8, 4, 3
    w, h = 0.38, 0.26
    xk = 2.45
    rows = [3.15 - i * 0.8 for i in range(steps + 1)]
    for j in range(cap):
        note(ax, xk + (j + 0.5) * w, 3.6, str(j), ha="center", fontsize=6.5)
    note(ax, xk - 0.08, 3.6, "position", ha="right", fontsize=6.5)
    note(ax, xk + cap * w / 2, 3.76, "the cache's buffers: max_len = 8 positions, allocated once", ha="center",
         fontsize=7, role=INK)
    for i, y in enumerate(rows):
        filled = prompt + i
        new = range(prompt) if i == 0 else range(filled - 1, filled)
        # The keys (upper strip) and values (lower strip) of one layer, for one head.
        for j in range(cap):
            if j < filled:
                _slot(ax, xk + j * w, y, w, h, f"$k_{j}$", "key", new=j in new)
                _slot(ax, xk + j * w, y - h, w, h, f"$v_{j}$", "value", new=j in new)
            else:
                _slot(ax, xk + j * w, y, w, h, "", None)
                _slot(ax, xk + j * w, y - h, w, h, "", None)
        note(ax, xk - 0.08, y + h / 2, "K", ha="right", fontsize=7, role="key")
        note(ax, xk - 0.08, y - h / 2, "V", ha="right", fontsize=7, role="value")
        # The queries of this step, and what they attend to.
        if i == 0:
            label, sub = "prefill: the prompt", "pos 0 → 4"
            qtext = "$q_0 … q_3$"
            work = "4 queries × 4 keys,\ncausal mask inside the block"
        else:
            label, sub = f"decode step {i}", f"pos {filled - 1} → {filled}"
            qtext = f"$q_{filled - 1}$"
            work = f"1 query × {filled} keys,\nno mask needed"
        note(ax, 0.08, y + 0.08, label, fontsize=7.5, role=INK)
        note(ax, 0.08, y - 0.12, sub, fontsize=6.8)
        qc = box(ax, 1.35, y - h / 2 + 0.02, 0.62, 0.36, qtext, "query", fontsize=7)
        arrow(ax, (1.97, qc[1]), (xk - 0.3, qc[1]), role="query")
        # A bracket over the keys the new queries read.
        x0, x1 = xk, xk + filled * w
        ax.plot([x0 + 0.02, x0 + 0.02, x1 - 0.02, x1 - 0.02], [y + h + 0.03, y + h + 0.07, y + h + 0.07,
                y + h + 0.03], color=color("query"), lw=0.8)
        note(ax, xk + cap * w + 0.15, y, work, fontsize=6.8)
    note(ax, 3.6, 0.2, "red outline: written in this step; dashed: allocated, not yet used", ha="center",
         fontsize=6.8, role="accent")
    return fig


def draw_gqa_groups() -> plt.Figure:
    """Eight query heads on eight, two or one key/value heads, and the cache each keeps per token."""
    fig, ax = canvas(7.2, 2.95)
    n_q, w, gap = 8, 0.21, 0.045
    panels = [("multi-head (MHA)", 8), ("grouped-query (GQA)", 2), ("multi-query (MQA)", 1)]
    yq, ykv, kv_h = 2.05, 1.2, 0.36
    for p, (name, g) in enumerate(panels):
        x0 = 0.2 + p * 2.4
        width = n_q * w + (n_q - 1) * gap
        note(ax, x0 + width / 2, 2.78, name, ha="center", fontsize=8, role=INK)
        note(ax, x0 + width / 2, 2.6, f"H = 8 query heads, G = {g}", ha="center", fontsize=6.8)
        per = n_q // g
        for i in range(n_q):
            xi = x0 + i * (w + gap)
            group = i // per
            box(ax, xi, yq, w, 0.3, f"$q_{i}$", "query", fontsize=6.8,
                fill=HEAD_FILL[group % 2] if 1 < g < n_q else HEAD_FILL[0])
            # Each query head reads the key/value head of its group, h // (H / G).
            kx = x0 + group * per * (w + gap) + (per * (w + gap) - gap) / 2
            ax.plot([xi + w / 2, kx], [yq, ykv + kv_h + 0.01], color=GREY, lw=0.7)
        for j in range(g):
            kx0 = x0 + j * per * (w + gap)
            kw = per * (w + gap) - gap
            ax.add_patch(Rectangle((kx0, ykv + kv_h / 2), kw, kv_h / 2, fc=light("key", 0.75), ec=color("key"),
                                   lw=0.8))
            ax.add_patch(Rectangle((kx0, ykv), kw, kv_h / 2, fc=light("value", 0.75), ec=color("value"), lw=0.8))
            small = kw < 0.3
            shared = " (shared)" if per > 1 and not small else ""
            ax.text(kx0 + kw / 2, ykv + 0.75 * kv_h, f"$k_{j}${shared}", ha="center", va="center", fontsize=6.5,
                    color=INK)
            ax.text(kx0 + kw / 2, ykv + 0.25 * kv_h, f"$v_{j}$", ha="center", va="center", fontsize=6.5, color=INK)
        if g < n_q:
            note(ax, x0 + width / 2, ykv - 0.14, f"each K, V serves {per} query heads", ha="center", fontsize=6.5)
        else:
            note(ax, x0 + width / 2, ykv - 0.14, "one K, V per query head", ha="center", fontsize=6.5)
        # The cache per token and layer, as a bar: 2 G D numbers.
        full = width
        bw = full * g / n_q
        yb = 0.45
        ax.add_patch(Rectangle((x0, yb), full, 0.2, fill=False, ec=GREY, lw=0.5, ls=(0, (2, 2))))
        ax.add_patch(Rectangle((x0, yb + 0.1), bw, 0.1, fc=light("key", 0.5), ec=color("key"), lw=0.6))
        ax.add_patch(Rectangle((x0, yb), bw, 0.1, fc=light("value", 0.5), ec=color("value"), lw=0.6))
        note(ax, x0 + width / 2, 0.8, f"cache per token and layer: 2 × {g} × D", ha="center", fontsize=6.8,
             role=INK)
        note(ax, x0 + width / 2, 0.3, f"1/{n_q // g} of MHA's" if g < n_q else "the full cache", ha="center",
             fontsize=6.8, role="accent" if g < n_q else None)
    return fig


FIGURES = {
    "03_head_split.png": draw_head_split,
    "03_two_heads.png": draw_two_heads,
    "03_kv_cache.png": draw_kv_cache,
    "03_gqa_groups.png": draw_gqa_groups,
}
