"""Chapter 04's diagrams: which dimensions RoPE pairs, why only the distance counts, where it acts."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
from matplotlib.patches import Arc, Circle, FancyArrowPatch, Rectangle

from .style import COLORS, GREY, INK, arrow, box, canvas, color, light, note, op, tensor

# One color per rotary pair, ordered from the fastest pair (0) to the slowest (3): a sequential
# ramp, since the pairs are ordered by frequency, kept apart from the roles' colors.
PAIR_COLORS = ["#2c115f", "#842681", "#c83e73", "#f4955f"]


def _cell(ax: plt.Axes, x: float, y: float, w: float, h: float, text: str, pair: int) -> None:
    """One dimension of a head vector, filled with its pair's light color."""
    ax.add_patch(Rectangle((x, y), w, h, fc=light(PAIR_COLORS[pair], 0.7), ec=PAIR_COLORS[pair], lw=1.1))
    ax.text(x + w / 2, y + h / 2, text, ha="center", va="center", fontsize=9, color=INK)


def draw_pair_layouts() -> plt.Figure:
    """A head of D = 8 dimensions paired two ways: interleaved (2i, 2i+1) and split halves (i, i+4)."""
    fig, ax = canvas(7.2, 2.75)
    w, h, x0 = 0.46, 0.42, 1.72
    omegas = ["1", "0.1", "0.01", "0.001"]
    rows = [
        (1.75, "interleaved", "RoPE paper, Meta's Llama code", "pair $i$ = $(x_{2i},\\ x_{2i+1})$", [0, 0, 1, 1, 2, 2, 3, 3]),
        (0.55, "split halves", "GPT-NeoX, Hugging Face Llama", "pair $i$ = $(x_{i},\\ x_{i+4})$", [0, 1, 2, 3, 0, 1, 2, 3]),
    ]
    for y, name, who, rule, pairs in rows:
        note(ax, 0.1, y + h / 2 + 0.1, name, fontsize=9, role=INK)
        note(ax, 0.1, y + h / 2 - 0.12, who, fontsize=7)
        for c, p in enumerate(pairs):
            _cell(ax, x0 + c * w, y, w, h, f"$x_{c}$", p)
            ax.text(x0 + (c + 0.5) * w, y - 0.05, f"$\\omega_{p}$", ha="center", va="top", fontsize=7.5,
                    color=PAIR_COLORS[p])
        note(ax, x0 + 8 * w + 0.15, y + h / 2, rule, fontsize=8)
    # Interleaved: each pair is two neighbours, so a short bracket joins them without crossing.
    y_top = rows[0][0] + h
    for p in range(4):
        a, b = x0 + (2 * p + 0.5) * w, x0 + (2 * p + 1.5) * w
        ax.plot([a, a, b, b], [y_top + 0.03, y_top + 0.13, y_top + 0.13, y_top + 0.03], color=PAIR_COLORS[p], lw=1.2)
    note(ax, x0 + 4 * w, y_top + 0.3, "one head of D = 8 dimensions;  $\\omega_i = \\theta^{-2i/D}$ with θ = 10,000",
         ha="center", fontsize=7.5)
    # Split halves: the first half holds the first coordinate of every pair, the second half the other.
    y_sp = rows[1][0] + h
    for k, label in enumerate(["first coordinates", "second coordinates"]):
        a, b = x0 + (4 * k + 0.1) * w, x0 + (4 * k + 3.9) * w
        ax.plot([a, a, b, b], [y_sp + 0.03, y_sp + 0.1, y_sp + 0.1, y_sp + 0.03], color=GREY, lw=0.9)
        note(ax, (a + b) / 2, y_sp + 0.2, label, ha="center", fontsize=7)
    # The frequencies, one swatch per pair.
    for p in range(4):
        x = 0.95 + p * 1.5
        ax.add_patch(Rectangle((x, 0.07), 0.16, 0.13, fc=light(PAIR_COLORS[p], 0.7), ec=PAIR_COLORS[p], lw=1))
        note(ax, x + 0.22, 0.135, f"pair {p}: $\\omega_{p} = {omegas[p]}$", fontsize=7.5, role=INK)
    return fig


def _vector(ax: plt.Axes, c: tuple[float, float], r: float, angle: float, role: str, label: str, *,
            faint: bool = False, gap: float = 0.08) -> None:
    """An arrow of length r from the center c at `angle` radians, named just beyond its tip."""
    dx, dy = math.cos(angle), math.sin(angle)
    tip = (c[0] + r * dx, c[1] + r * dy)
    ax.add_patch(FancyArrowPatch(c, tip, arrowstyle="-|>", mutation_scale=11, color=color(role),
                                 lw=0.9 if faint else 1.8, alpha=0.45 if faint else 1.0,
                                 ls=(0, (3, 2)) if faint else "-", shrinkA=0, shrinkB=0))
    ha = "left" if dx > 0.35 else "right" if dx < -0.35 else "center"
    va = "bottom" if dy > 0.35 else "top" if dy < -0.35 else "center"
    ax.text(tip[0] + gap * dx, tip[1] + gap * dy, label, ha=ha, va=va, fontsize=7.5 if faint else 8.5,
            color=color(role), alpha=0.6 if faint else 1.0)


def draw_relative_angle() -> plt.Figure:
    """q and k rotated at positions (2, 5) and at (6, 9): the angle between them is the same."""
    fig, ax = canvas(7.2, 3.05)
    q, k, omega = (1.0, 0.3), (0.8, -0.4), 1.0
    aq, ak = math.atan2(q[1], q[0]), math.atan2(k[1], k[0])
    rq, rk = 0.95 * math.hypot(*q) / math.hypot(*q), 0.95 * math.hypot(*k) / math.hypot(*q)
    between = math.degrees((ak - aq + 3 * omega) % (2 * math.pi))
    dot = math.hypot(*q) * math.hypot(*k) * math.cos(ak - aq + 3 * omega)
    for cx, (m, n) in [(1.55, (2, 5)), (5.45, (6, 9))]:
        c = (cx, 1.72)
        ax.add_patch(Circle(c, rq, fill=False, ls=":", ec=GREY, lw=0.7))
        ax.plot([cx - 1.2, cx + 1.2], [c[1], c[1]], color="#dddddd", lw=0.6, zorder=0)
        ax.plot([cx, cx], [c[1] - 1.2, c[1] + 1.2], color="#dddddd", lw=0.6, zorder=0)
        _vector(ax, c, rq, aq, "query", "$q$", faint=True)
        _vector(ax, c, rk, ak, "key", "$k$", faint=True, gap=rq - rk + 0.06)
        a1, a2 = aq + m * omega, ak + n * omega
        # The angle from the rotated query to the rotated key, counter-clockwise, in red.
        start = math.degrees(a1) % 360
        ax.add_patch(Arc(c, 0.7, 0.7, theta1=start, theta2=start + between, color=COLORS["accent"], lw=1.3))
        mid = math.radians(start + between / 2)
        note(ax, c[0] + 0.58 * math.cos(mid), c[1] + 0.58 * math.sin(mid), f"{between:.1f}°", ha="center",
             fontsize=8, role="accent")
        _vector(ax, c, rq, a1, "query", f"$q$ at m = {m}")
        _vector(ax, c, rk, a2, "key", f"$k$ at n = {n}", gap=rq - rk + 0.08)
        note(ax, cx, 0.22, f"rotate $q$ by {m}ω, $k$ by {n}ω:  n − m = {n - m}", ha="center", fontsize=8, role=INK)
        note(ax, cx, 0.03, f"score = {dot:.4f}", ha="center", fontsize=8, role="accent")
    arrow(ax, (3.05, 2.55), (3.95, 2.55), role=GREY, rad=-0.25)
    note(ax, 3.5, 2.88, "both 4 positions later:", ha="center", fontsize=7.5)
    note(ax, 3.5, 2.38, "each turns by 4ω more;\nthe angle between them\nstays the same", ha="center",
         fontsize=7.5, va="top")
    note(ax, 3.5, 0.95, "ω = 1 radian per position\n$q$ = (1, 0.3),  $k$ = (0.8, −0.4)", ha="center",
         fontsize=7.5)
    return fig


def draw_where_rope() -> plt.Figure:
    """One attention layer: q and k are rotated after the projections, v is not; the stream is untouched."""
    fig, ax = canvas(7.2, 4.15)
    ys = 3.45  # the residual stream
    tensor(ax, 0.1, ys - 0.22, 0.95, 0.44, "token\nembedding", None, "token", fontsize=7.5)
    ax.add_patch(FancyArrowPatch((1.05, ys), (7.1, ys), arrowstyle="-|>", mutation_scale=12,
                                 color=COLORS["residual"], lw=2.4, shrinkA=0, shrinkB=0))
    note(ax, 4.0, ys + 0.17, "residual stream  (B, T, C): no position vector is ever added", ha="center",
         fontsize=7.5, role="residual")
    # Where GPT-2 adds its position vectors (between the embedding and the layer), and RoPE adds nothing.
    px = 1.27
    box(ax, px - 0.5, ys + 0.38, 1.0, 0.28, "+ $p_t$ (GPT-2)", "mask", dashed=True, fontsize=7)
    arrow(ax, (px, ys + 0.38), (px, ys + 0.05), dashed=True)
    note(ax, px + 0.6, ys + 0.52, "✗  not in a RoPE model", fontsize=7, role="accent")
    # The branch into the layer, after the point where GPT-2 would add p_t.
    bx = 1.5
    ax.plot([bx, bx], [ys, 0.62], color=GREY, lw=1.0)
    ax.add_patch(Circle((bx, ys), 0.035, color=GREY))
    note(ax, bx - 0.07, 2.0, "x", ha="right", fontsize=8.5, role=INK)
    rows = {"query": 2.55, "key": 1.5, "value": 0.42}
    names = {"query": ("W_Q", "Q"), "key": ("W_K", "K"), "value": ("W_V", "V")}
    h = 0.4
    for role, y in rows.items():
        w_name, t_name = names[role]
        arrow(ax, (bx, y + h / 2), (1.7, y + h / 2))
        box(ax, 1.7, y, 0.55, h, f"${w_name}$", role, fontsize=9.5)
        arrow(ax, (2.25, y + h / 2), (2.5, y + h / 2))
        tensor(ax, 2.5, y, 0.6, h, t_name, "(B, H, T, D)", role)
    note(ax, 2.3, 3.08, "x W, then split into heads", ha="center", fontsize=7)
    # The rotation of queries and keys by their positions, from one pair of tables.
    rx = 3.62
    rq = op(ax, rx, rows["query"] + h / 2, "R", r=0.16, role="accent")
    rk = op(ax, rx, rows["key"] + h / 2, "R", r=0.16, role="accent")
    arrow(ax, (3.1, rq[1]), (rx - 0.16, rq[1]), role="query")
    arrow(ax, (3.1, rk[1]), (rx - 0.16, rk[1]), role="key")
    box(ax, 3.1, 2.03, 1.14, 0.36, "cos, sin of $t\\,\\omega_i$\nt = start … start+T−1", "accent", fontsize=6.5)
    arrow(ax, (rx, 2.39), (rx, rq[1] - 0.16), role="accent")
    arrow(ax, (rx, 2.03), (rx, rk[1] + 0.16), role="accent")
    note(ax, rx, rows["query"] + h + 0.12, "rotate", ha="center", fontsize=7, role="accent")
    # Scores from the rotated queries and keys.
    s = op(ax, 5.35, 2.2, "@")
    arrow(ax, (rx + 0.16, rq[1]), (s[0] - 0.09, s[1] + 0.1), role="query")
    arrow(ax, (rx + 0.16, rk[1]), (s[0] - 0.09, s[1] - 0.1), role="key")
    note(ax, 5.35, 2.02, "$\\tilde{Q}\\,\\tilde{K}^\\top$", ha="center", va="top", fontsize=8,
         role=INK)
    sm = box(ax, 5.62, 1.97, 0.78, 0.46, "÷ $\\sqrt{D}$, mask,\nsoftmax", "accent", fontsize=7)
    arrow(ax, (s[0] + 0.13, s[1]), (5.62, sm[1]))
    # The weights average the values, which were never rotated.
    o = op(ax, 6.01, 0.62, "@")
    arrow(ax, (sm[0], 1.97), (o[0], o[1] + 0.13))
    arrow(ax, (3.1, rows["value"] + h / 2), (o[0] - 0.13, o[1]), role="value")
    note(ax, 4.45, 0.78, "values are not rotated", ha="center", fontsize=7.5, role="value")
    wo = box(ax, 6.4, 0.42, 0.55, h, "$W_O$", None, fontsize=9)
    arrow(ax, (o[0] + 0.13, o[1]), (6.4, wo[1]))
    op(ax, 6.68, ys, "+", role="residual")
    arrow(ax, (6.68, 0.82), (6.68, ys - 0.13))
    return fig


FIGURES = {
    "04_pair_layouts.png": draw_pair_layouts,
    "04_relative_angle.png": draw_relative_angle,
    "04_where_rope.png": draw_where_rope,
}
