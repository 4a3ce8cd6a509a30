"""Chapter 02's diagrams: the data flow of one attention head."""

from __future__ import annotations

import matplotlib.pyplot as plt

from .style import arrow, box, canvas, note, op, tensor


def draw_qkv_flow() -> plt.Figure:
    """x goes through three projections; Q and K make the scores, the weights average V."""
    fig, ax = canvas(7.2, 3.0)
    x_c = tensor(ax, 0.15, 1.2, 0.75, 0.5, "x", "(T, C)", "token")
    rows = {"query": 2.25, "key": 1.2, "value": 0.15}
    names = {"query": ("W_Q", "Q", "(T, d_k)"), "key": ("W_K", "K", "(T, d_k)"), "value": ("W_V", "V", "(T, d_v)")}
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
    note(ax, 3.75, 1.68, "Q Kᵀ", ha="center")
    tensor(ax, 4.2, 1.73, 1.15, 0.5, "÷ $\\sqrt{d_k}$, mask,\nsoftmax", None, "accent", fontsize=7.5)
    arrow(ax, (s[0] + 0.13, s[1]), (4.2, s[1]))
    a = tensor(ax, 5.75, 1.73, 0.55, 0.5, "A", "(T, T)", "accent")
    arrow(ax, (5.35, s[1]), (5.75, s[1]))
    # The weights average the values.
    o = op(ax, 6.03, 0.85, "@")
    arrow(ax, (a[0], 1.73 - 0.28), (o[0], o[1] + 0.13))
    arrow(ax, (3.3, ends["value"][1]), (o[0] - 0.13, o[1] - 0.05), role="value", rad=0.15)
    y = tensor(ax, 6.45, 0.6, 0.6, 0.5, "y", "(T, d_v)", "token")
    arrow(ax, (o[0] + 0.13, o[1]), (6.45, y[1]))
    note(ax, 4.6, 0.3, "A V: each output row is an\naverage of the rows of V", ha="center")
    return fig


FIGURES = {"02_qkv_flow.png": draw_qkv_flow}
