"""Chapter 02's diagrams: the geometry of a dot product, the data flow of one attention head,
attention as a soft dictionary lookup, the causal mask on the worked example's scores, and the
tiles of a fused kernel."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
from matplotlib.patches import Polygon, Rectangle

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

# The chapter's worked example (section "A worked example by hand"): four tokens, C = d_k = 2.
TOKENS = ["def", "f", "(", "x"]
X = [[1, 0], [0, 1], [1, 1], [0, 2]]
W_Q = [[2, 0], [0, 1]]
W_K = [[0, 1], [1, 0]]
W_V = [[1, 1], [0, 1]]


def _matmul(a: list[list[float]], b: list[list[float]]) -> list[list[float]]:
    return [[sum(a[i][k] * b[k][j] for k in range(len(b))) for j in range(len(b[0]))] for i in range(len(a))]


def worked_example() -> dict[str, list[list[float]]]:
    """Q, K, V, the scaled scores, the causal weights and the output, in plain Python."""
    q, k, v = _matmul(X, W_Q), _matmul(X, W_K), _matmul(X, W_V)
    t, d = len(X), len(W_Q[0])
    scaled = [[sum(a * b for a, b in zip(q[i], k[j])) / math.sqrt(d) for j in range(t)] for i in range(t)]
    weights = []
    for i in range(t):
        e = [math.exp(scaled[i][j]) if j <= i else 0.0 for j in range(t)]
        weights.append([x / sum(e) for x in e])
    return {"Q": q, "K": k, "V": v, "scaled": scaled, "weights": weights, "out": _matmul(weights, v)}


def draw_dot_geometry() -> plt.Figure:
    """The query (2, 1) and the worked example's four keys: direction and length both count."""
    fig, ax = canvas(7.2, 2.2)
    ox, oy, u = 0.45, 0.4, 0.9  # the origin and one unit, in inches
    q = (2, 1)
    keys = [(0, 1), (1, 0), (1, 1), (2, 0)]

    def at(v: tuple[float, float]) -> tuple[float, float]:
        return ox + u * v[0], oy + u * v[1]

    ax.plot([ox - 0.15, ox + 2.35 * u], [oy, oy], color=GREY, lw=0.5)
    ax.plot([ox, ox], [oy - 0.15, oy + 1.35 * u], color=GREY, lw=0.5)
    for k in sorted(keys, key=lambda k: -math.hypot(*k)):  # the long (2, 0) under the short (1, 0)
        arrow(ax, at((0, 0)), at(k), role="key", lw=1.6 if k == (2, 0) else 1.0)
    arrow(ax, at((0, 0)), at(q), role="query", lw=1.6)
    note(ax, at(q)[0] + 0.08, at(q)[1], "$q = (2, 1)$", role="query", fontsize=8)
    spots = {(0, 1): (-0.08, 0.0, "right"), (1, 1): (0.0, 0.12, "center"), (1, 0): (0.0, -0.14, "center"),
             (2, 0): (0.0, -0.14, "center")}
    for k, (dx, dy, ha) in spots.items():
        x, y = at(k)
        note(ax, x + dx, y + dy, f"({k[0]}, {k[1]})", ha=ha, role="key", fontsize=7.5)
    # The table: angle, length and score of each key, best score first.
    cols = [3.35, 4.1, 4.9, 5.55]
    heads = ["key $k$", "angle to $q$", "length $\\Vert k \\Vert$", "$q \\cdot k$"]
    top = 1.85
    for x, h in zip(cols, heads):
        note(ax, x, top, h, ha="center", fontsize=7.5, role=INK)
    ax.plot([cols[0] - 0.4, cols[3] + 0.35], [top - 0.14, top - 0.14], color=GREY, lw=0.5)
    qn = math.hypot(*q)
    rows = sorted(keys, key=lambda k: -(q[0] * k[0] + q[1] * k[1]))
    for i, k in enumerate(rows):
        y = top - 0.36 - i * 0.3
        dot = q[0] * k[0] + q[1] * k[1]
        length = math.hypot(*k)
        angle = math.degrees(math.acos(dot / (qn * length)))
        role = "accent" if i == 0 else INK
        note(ax, cols[0], y, f"({k[0]}, {k[1]})", ha="center", fontsize=7.5, role="key")
        note(ax, cols[1], y, f"{angle:.0f}°", ha="center", fontsize=7.5, role=INK)
        note(ax, cols[2], y, f"{length:.3f}", ha="center", fontsize=7.5, role=INK)
        note(ax, cols[3], y, f"{dot}", ha="center", fontsize=7.5, role=role)
        if k == (2, 0):
            note(ax, cols[3] + 0.3, y, "largest: the longest key", fontsize=7, role="accent")
        if k == (1, 1):
            note(ax, cols[3] + 0.3, y, "closest direction", fontsize=7)
    note(ax, cols[0] - 0.4, 0.22, "$q \\cdot k = \\Vert q \\Vert\\,\\Vert k \\Vert \\cos\\theta$: "
         "(1, 0) and (2, 0) point the same way;\ntwice the length, twice the score", fontsize=7)
    return fig


def draw_qkv_flow() -> plt.Figure:
    """x goes through three projections; Q and K make the scores, the weights average V."""
    fig, ax = canvas(7.2, 3.0)
    x_c = tensor(ax, 0.15, 1.2, 0.75, 0.5, "x", "(T, C)", "token")
    rows = {"query": 2.25, "key": 1.2, "value": 0.15}
    names = {"query": ("W_Q", "Q", "(T, $d_k$)"), "key": ("W_K", "K", "(T, $d_k$)"), "value": ("W_V", "V", "(T, $d_v$)")}
    ends = {}
    for role, y in rows.items():
        w, name, shape = names[role]
        wc = box(ax, 1.45, y, 0.7, 0.5, f"${w}$", role, fontsize=10)
        arrow(ax, (x_c[0] + 0.38, x_c[1]), (1.45, wc[1]), rad=0.0)
        ends[role] = tensor(ax, 2.6, y, 0.7, 0.5, name, shape, role)
        arrow(ax, (2.15, wc[1]), (2.6, wc[1]))
    note(ax, 1.8, 2.88, "x W (row vectors)", ha="center")
    # Scores from queries and keys.
    s = op(ax, 3.75, 1.98, "@")
    arrow(ax, (3.3, rows["query"] + 0.25), (s[0] - 0.13, s[1] + 0.04), role="query")
    arrow(ax, (3.3, rows["key"] + 0.25), (s[0] - 0.13, s[1] - 0.04), role="key")
    note(ax, 3.75, 1.72, "$QK^\\top$", ha="center")
    note(ax, 3.75, 1.55, "(T, T)", ha="center", mono=True, fontsize=6.5)
    tensor(ax, 4.2, 1.73, 1.15, 0.5, "÷ $\\sqrt{d_k}$, mask,\nsoftmax", None, "accent", fontsize=7.5)
    arrow(ax, (s[0] + 0.13, s[1]), (4.2, s[1]))
    a = tensor(ax, 5.75, 1.73, 0.55, 0.5, "A", "(T, T)", "accent")
    arrow(ax, (5.35, s[1]), (5.75, s[1]))
    note(ax, a[0], 2.36, "weights", ha="center")
    # The weights average the values.
    o = op(ax, 6.03, 0.85, "@")
    arrow(ax, (a[0], 1.73 - 0.3), (o[0], o[1] + 0.13))
    arrow(ax, (3.3, ends["value"][1]), (o[0] - 0.13, o[1] - 0.05), role="value", rad=0.15)
    y = tensor(ax, 6.45, 0.6, 0.6, 0.5, "y", "(T, $d_v$)", "token")
    arrow(ax, (o[0] + 0.13, o[1]), (6.45, y[1]))
    note(ax, 4.75, 1.02, "y = A V: each output row is an\naverage of the rows of V", ha="center")
    return fig


def _row_box(ax: plt.Axes, x: float, y: float, w: float, h: float, text: str, role: str, *,
             mono: bool = True) -> tuple[float, float]:
    return box(ax, x, y, w, h, text, role, fontsize=7.5, mono=mono)


def draw_soft_lookup() -> plt.Figure:
    """A dict returns the value of the one equal key; attention averages all values by match."""
    ex = worked_example()
    fig, ax = canvas(7.2, 3.1)
    h, gap = 0.27, 0.32
    cols = {"query": 0.15, "keys": 1.3, "score": 2.4, "weight": 3.3, "values": 4.75, "out": 5.95}
    widths = {"query": 0.85, "keys": 0.8, "score": 0.6, "weight": 0.75, "values": 0.8, "out": 1.1}

    def panel(top: float, label: str, query: str, keys: list[str], scores: list[str], weights: list[float],
              values: list[str], result: str, weight_text: list[str], headers: dict[str, str]) -> None:
        note(ax, 0.05, top + 0.28, label, fontsize=8.5, role=INK)
        for name, x in cols.items():
            note(ax, x + widths[name] / 2, top, headers[name], fontsize=7, va="bottom", ha="center")
        ys = [top - 0.12 - (i + 1) * gap for i in range(len(keys))]
        mid = (ys[0] + ys[-1]) / 2 + h / 2
        qc = _row_box(ax, cols["query"], mid - h / 2, 0.85, h, query, "query")
        for i, y in enumerate(ys):
            kc = _row_box(ax, cols["keys"], y, 0.8, h, keys[i], "key")
            arrow(ax, (qc[0] + 0.43, qc[1]), (cols["keys"], kc[1]), lw=0.7)
            note(ax, cols["score"] + 0.3, kc[1], scores[i], ha="center", fontsize=7.5, role=INK)
            # The weight as a bar, its value beside it.
            bw = 0.75 * weights[i]
            ax.add_patch(Rectangle((cols["weight"], y + 0.04), max(bw, 0.01), h - 0.08,
                                   fc=light("accent", 0.45), ec=color("accent"), lw=0.6))
            note(ax, cols["weight"] + 0.8, kc[1], weight_text[i], fontsize=7, role=INK)
            vc = _row_box(ax, cols["values"], y, 0.8, h, values[i], "value")
            arrow(ax, (cols["values"] + 0.8, vc[1]), (cols["out"], mid), lw=0.7)
        _row_box(ax, cols["out"], mid - h / 2, widths["out"], h, result, "token")

    head = {"query": "query", "keys": "keys", "score": "match", "weight": "weight", "values": "values",
            "out": "result"}
    panel(2.72, "(a) a Python dict: d[\"b\"] finds the one equal key", '"b"', ['"a"', '"b"', '"c"'],
          ["≠", "=", "≠"], [0.0, 1.0, 0.0], ["10", "20", "30"], "20", ["0", "1", "0"], head)
    w = ex["weights"][2][:3]
    k = [f"({a:g}, {b:g})" for a, b in ex["K"][:3]]
    v = [f"({a:g}, {b:g})" for a, b in ex["V"][:3]]
    qx, qy = ex["Q"][2]
    sc = [f"{s * math.sqrt(2):.0f} → {s:.3f}" for s in ex["scaled"][2][:3]]
    ox, oy = ex["out"][2]
    panel(1.2, "(b) attention: every key matches a little; the result averages the values",
          f"({qx:g}, {qy:g})", k, sc, w, v, f"({ox:.3f}, {oy:.3f})", [f"{x:.3f}" for x in w],
          {**head, "score": "q·k → ÷ √2", "weight": "softmax", "out": "Σ weight × value"})
    return fig


def draw_causal_mask() -> plt.Figure:
    """The worked example's scaled scores, the same with the future set to -inf, and the weights."""
    ex = worked_example()
    t = len(TOKENS)
    future = [[j > i for j in range(t)] for i in range(t)]
    row3 = [[i == 2 and j <= 2 for j in range(t)] for i in range(t)]
    fig, ax = canvas(7.2, 2.45)
    cell, top = 0.4, 1.95
    xs = [0.5, 2.75, 5.0]
    titles = ["scaled scores $QK^\\top / \\sqrt{d_k}$", "masked: the future set to $-\\infty$",
              "weights: softmax of each row"]
    kw = {"cell": cell, "fmt": "{:.3f}", "fontsize": 7.5, "col_labels": TOKENS}
    # 1: every score, the future outlined; 2: the future replaced by -inf; 3: the weights.
    grid(ax, xs[0], top, ex["scaled"], "query", row_labels=TOKENS, **kw)
    for i in range(t):
        for j in range(i + 1, t):
            ax.add_patch(Rectangle((xs[0] + j * cell, top - (i + 1) * cell), cell, cell, fill=False,
                                   ec=GREY, lw=0.6, hatch="////", alpha=0.35))
    grid(ax, xs[1], top, ex["scaled"], "query", masked=future, masked_text="−∞", highlight=row3, **kw)
    weights = [[w if j <= i else 0.0 for j, w in enumerate(row)] for i, row in enumerate(ex["weights"])]
    grid(ax, xs[2], top, weights, "accent", masked=future, masked_text="0", highlight=row3, **kw)
    for x, title in zip(xs, titles):
        note(ax, x + 2 * cell, top + 0.38, title, ha="center", fontsize=7.5, role=INK)
    # Row sums of the weights.
    note(ax, xs[2] + t * cell + 0.2, top + 0.13, "sum", ha="center", fontsize=6.5)
    for i in range(t):
        note(ax, xs[2] + t * cell + 0.2, top - (i + 0.5) * cell, f"{sum(weights[i]):.0f}",
             ha="center", fontsize=7, role=INK)
    mid = top - 2 * cell
    arrow(ax, (xs[0] + t * cell + 0.1, mid), (xs[1] - 0.1, mid), role=GREY)
    note(ax, (xs[0] + t * cell + xs[1]) / 2, mid + 0.14, "mask", ha="center")
    arrow(ax, (xs[1] + t * cell + 0.1, mid), (xs[2] - 0.1, mid), role=GREY)
    note(ax, (xs[1] + t * cell + xs[2]) / 2, mid + 0.14, "softmax", ha="center")
    note(ax, xs[0] - 0.22, top + 0.13, "query", ha="center", fontsize=6.5)
    note(ax, xs[0] + 2 * cell, top - t * cell - 0.14, "hatched: keys after the query", ha="center", fontsize=6.5)
    note(ax, xs[1] + 2 * cell, top - t * cell - 0.14, "query t sees keys s ≤ t", ha="center", fontsize=6.5)
    note(ax, xs[2] + 2 * cell, top - t * cell - 0.14, "$e^{-\\infty} = 0$: no weight on the future",
         ha="center", fontsize=6.5)
    return fig


def draw_flash_tiles() -> plt.Figure:
    """The (T, T) scores cut into tiles: one block of queries meets the blocks of keys in turn."""
    fig, ax = canvas(7.2, 2.8)
    n, tile, x0, top = 4, 0.52, 0.75, 2.4
    for i in range(n):
        for j in range(n):
            x, y = x0 + j * tile, top - (i + 1) * tile
            if j > i:  # above the diagonal: every score is masked, the tile is skipped
                ax.add_patch(Rectangle((x, y), tile, tile, fc=light("mask", 0.55), ec=GREY, lw=0.6))
                ax.text(x + tile / 2, y + tile / 2, "skip", ha="center", va="center", fontsize=6.5, color=GREY)
                continue
            ax.add_patch(Rectangle((x, y), tile, tile, fc=light("accent", 0.85), ec=GREY, lw=0.6))
            if i == j:  # on the diagonal: the mask cuts the tile in two
                ax.add_patch(Polygon([(x, y + tile), (x + tile, y + tile), (x + tile, y)], closed=True,
                                     fc=light("mask", 0.55), ec="none"))
                ax.add_patch(Rectangle((x, y), tile, tile, fill=False, ec=GREY, lw=0.6))
    for i in range(n):
        note(ax, x0 - 0.08, top - (i + 0.5) * tile, f"$Q_{i}$", ha="right", role="query", fontsize=8)
        note(ax, x0 + (i + 0.5) * tile, top + 0.1, f"$K_{i}, V_{i}$", ha="center", role="key", fontsize=7)
    # Block 2 of the queries meets the key blocks 0, 1, 2 one after the other (steps 1, 2, 3).
    r = 2
    for j in range(r + 1):
        x, y = x0 + j * tile, top - (r + 1) * tile
        ax.add_patch(Rectangle((x, y), tile, tile, fill=False, ec=COLORS["accent"], lw=1.5))
        cx, cy = (x + 0.3 * tile, y + 0.3 * tile) if j == r else (x + tile / 2, y + tile / 2)
        ax.text(cx, cy, str(j + 1), ha="center", va="center", fontsize=7.5, color=INK)
    note(ax, x0 + n * tile / 2, top - n * tile - 0.15, "the scores $S$ (T, T), in tiles", ha="center",
         fontsize=7)
    # The two memories.
    bx, bw = 3.45, 3.6
    box(ax, bx, 1.55, bw, 1.05, "", None, fill=light("accent", 0.9))
    note(ax, bx + 0.1, 2.45, "fast on-chip memory (small): one tile at a time", fontsize=7.5, role=INK)
    tensor(ax, bx + 0.15, 1.85, 0.75, 0.38, "$Q_2$", None, "query", fontsize=8)
    tensor(ax, bx + 1.05, 1.85, 0.95, 0.38, "$K_j, V_j$", None, "key", fontsize=8)
    box(ax, bx + 2.15, 1.85, 1.3, 0.38, "$m$, $\\ell$, $O$:\none row per query", None, fontsize=7)
    note(ax, bx + 0.1, 1.68, "scores of one tile → update $m$, $\\ell$, $O$ → discard the tile", fontsize=6.5)
    box(ax, bx, 0.15, bw, 1.0, "", None, fill="#ffffff")
    note(ax, bx + 0.1, 1.0, "GPU main memory (large, slow to reach)", fontsize=7.5, role=INK)
    tensor(ax, bx + 0.15, 0.45, 0.55, 0.38, "Q", "(T, $d_k$)", "query", fontsize=8)
    tensor(ax, bx + 0.8, 0.45, 0.55, 0.38, "K", "(T, $d_k$)", "key", fontsize=8)
    tensor(ax, bx + 1.45, 0.45, 0.55, 0.38, "V", "(T, $d_v$)", "value", fontsize=8)
    tensor(ax, bx + 2.1, 0.45, 0.55, 0.38, "O", "(T, $d_v$)", "token", fontsize=8)
    note(ax, bx + 2.8, 0.62, "never\nS or A\n(T, T)", fontsize=6.5, role="accent")
    arrow(ax, (bx + 0.6, 1.16), (bx + 0.6, 1.54), role=GREY)
    note(ax, bx + 0.67, 1.35, "load blocks", fontsize=6.5)
    arrow(ax, (bx + 2.8, 1.54), (bx + 2.8, 1.16), role=GREY)
    note(ax, bx + 2.87, 1.35, "write O once", fontsize=6.5)
    return fig


FIGURES = {
    "02_dot_geometry.png": draw_dot_geometry,
    "02_qkv_flow.png": draw_qkv_flow,
    "02_soft_lookup.png": draw_soft_lookup,
    "02_causal_mask.png": draw_causal_mask,
    "02_flash_tiles.png": draw_flash_tiles,
}
