"""Chapter 05's diagrams: the whole model with its shapes, the SwiGLU MLP against GPT-2's, a pre-norm
block against a post-norm one, and the paths that residual connections open through a stack."""

from __future__ import annotations

import matplotlib.pyplot as plt
from matplotlib.patches import FancyArrowPatch

from .style import COLORS, GREY, INK, arrow, box, canvas, note, op, tensor


def _stream(ax: plt.Axes, x0: float, x1: float, y: float, *, head: bool = True) -> None:
    """The residual stream: one thick purple line from x0 to x1 at height y."""
    ax.add_patch(FancyArrowPatch((x0, y), (x1, y), arrowstyle="-|>" if head else "-", mutation_scale=12,
                                 color=COLORS["residual"], lw=2.4, shrinkA=0, shrinkB=0, zorder=1))


def _tap(ax: plt.Axes, x: float, y0: float, y1: float, x_end: float) -> None:
    """A branch that leaves the stream at (x, y0), rises to y1 and turns right to x_end."""
    ax.plot([x, x], [y0, y1], color=GREY, lw=1.0, zorder=2)
    ax.add_patch(plt.Circle((x, y0), 0.035, color=GREY, zorder=3))
    arrow(ax, (x, y1), (x_end, y1))


def _write(ax: plt.Axes, x_from: float, y: float, x_plus: float, y_stream: float) -> None:
    """A sublayer's output going right, then down into a + on the stream."""
    ax.plot([x_from, x_plus], [y, y], color=GREY, lw=1.0, zorder=2)
    arrow(ax, (x_plus, y), (x_plus, y_stream + 0.13))
    op(ax, x_plus, y_stream, "+", role="residual")


def draw_model() -> plt.Figure:
    """ids -> embedding -> L blocks on the residual stream -> final norm -> output layer -> logits."""
    fig, ax = canvas(7.2, 2.45)
    ys = 1.22  # the residual stream
    h = 0.46
    tensor(ax, 0.08, ys - h / 2, 0.52, h, "ids", "(B, T)", "token")
    arrow(ax, (0.6, ys), (0.78, ys))
    box(ax, 0.78, ys - h / 2, 0.78, h, "token\nembedding", "token", fontsize=7.5)
    note(ax, 1.17, ys - h / 2 - 0.06, "E: (V, C)", ha="center", va="top", fontsize=6.5, mono=True)
    _stream(ax, 1.56, 5.12, ys, head=False)
    # The blocks sit above the stream: each reads it and adds its result back.
    blocks = [(1.86, "block 1"), (2.86, "block 2"), (4.06, "block L")]
    for x, name in blocks:
        _tap(ax, x, ys, ys + 0.55, x + 0.14)
        box(ax, x + 0.14, ys + 0.34, 0.56, 0.42, name, None, fontsize=7.5)
        _write(ax, x + 0.7, ys + 0.55, x + 0.84, ys)
    note(ax, 3.8, ys + 0.55, "· · ·", ha="center", fontsize=9, role=INK)
    note(ax, 3.8, ys - 0.2, "· · ·", ha="center", fontsize=9, role="residual")
    ax.plot([1.8, 1.8, 4.96, 4.96], [ys + 0.86, ys + 0.93, ys + 0.93, ys + 0.86], color=GREY, lw=0.9)
    note(ax, 3.38, ys + 1.06, "L blocks (n_layers), each: x + attention(norm(x)), then x + MLP(norm(x))",
         ha="center", fontsize=7)
    for x in (1.71, 2.71):  # the shape of the stream between blocks
        note(ax, x + 0.12, ys - 0.17, "(B, T, C)", ha="left", fontsize=6.5, mono=True, role="residual")
    note(ax, 3.38, ys - 0.4, "the residual stream: one (B, T, C) tensor that every block reads and adds to",
         ha="center", fontsize=7, role="residual")
    # The top of the model: the final norm and the output layer read the stream once.
    box(ax, 5.12, ys - h / 2, 0.58, h, "RMSNorm", None, fontsize=7)
    note(ax, 5.41, ys + h / 2 + 0.06, "final norm", ha="center", va="bottom", fontsize=6.5)
    arrow(ax, (5.7, ys), (5.84, ys))
    box(ax, 5.84, ys - h / 2, 0.6, h, "output\nlayer", None, fontsize=7)
    note(ax, 6.14, ys + h / 2 + 0.06, "$W_{out}$: (C, V)", ha="center", va="bottom", fontsize=6.5)
    arrow(ax, (6.44, ys), (6.58, ys))
    tensor(ax, 6.58, ys - h / 2, 0.56, h, "logits", "(B, T, V)", "accent", fontsize=7.5)
    # Weight tying: the output layer can reuse the embedding table.
    ax.add_patch(FancyArrowPatch((1.17, ys - h / 2 - 0.26), (6.14, ys - h / 2 - 0.02), arrowstyle="<|-|>",
                                 mutation_scale=8, color=COLORS["accent"], lw=0.9, ls=(0, (3, 2)),
                                 connectionstyle="arc3,rad=0.2", shrinkA=1, shrinkB=1))
    note(ax, 3.65, 0.14, "optional weight tying (tie_embeddings=True, as in the gpt2-small preset): "
         "$W_{out} = E^\\top$, one (V, C) Parameter", ha="center", fontsize=7, role="accent")
    return fig


def draw_swiglu() -> plt.Figure:
    """SwiGLU: gate and up projections, SiLU on the gate, a product, the down projection; GPT-2's MLP."""
    fig, ax = canvas(7.2, 3.05)
    h = 0.4
    # (a) SwiGLU.
    note(ax, 0.05, 2.9, "(a) SwiGLU (Llama, this book): three matrices, hidden width F", fontsize=8, role=INK)
    yg, yu = 2.2, 1.45  # the gate row and the up row
    ymid = (yg + yu) / 2 + h / 2
    tensor(ax, 0.1, ymid - h / 2, 0.55, h, "x", "(B, T, C)", "residual")
    for y, w, name in ((yg, "$W_{gate}$", "g"), (yu, "$W_{up}$", "u")):
        arrow(ax, (0.65, ymid), (1.0, y + h / 2))
        box(ax, 1.0, y, 0.68, h, w, None, fontsize=9)
        note(ax, 1.34, y - 0.05, "(C, F)", ha="center", va="top", fontsize=6.5, mono=True)
        arrow(ax, (1.68, y + h / 2), (2.0, y + h / 2))
        tensor(ax, 2.0, y, 0.5, h, name, "(B, T, F)", None)
    # The gate goes through SiLU; the product mixes the two rows elementwise.
    arrow(ax, (2.5, yg + h / 2), (2.8, yg + h / 2))
    box(ax, 2.8, yg, 0.62, h, "SiLU", "accent", fontsize=8)
    note(ax, 3.11, yg + h + 0.05, "$z\\,\\sigma(z)$", ha="center", va="bottom", fontsize=7.5, role="accent")
    prod = op(ax, 3.85, ymid, "⊙", role="accent")
    arrow(ax, (3.42, yg + h / 2), (prod[0] - 0.1, prod[1] + 0.09), role="accent")
    arrow(ax, (2.5, yu + h / 2), (prod[0] - 0.1, prod[1] - 0.09))
    note(ax, 3.85, ymid - 0.2, "elementwise", ha="center", va="top", fontsize=6.5)
    arrow(ax, (prod[0] + 0.13, prod[1]), (4.3, ymid))
    tensor(ax, 4.3, ymid - h / 2, 0.5, h, "h", "(B, T, F)", None)
    arrow(ax, (4.8, ymid), (5.1, ymid))
    box(ax, 5.1, ymid - h / 2, 0.72, h, "$W_{down}$", None, fontsize=9)
    note(ax, 5.46, ymid - h / 2 - 0.05, "(F, C)", ha="center", va="top", fontsize=6.5, mono=True)
    arrow(ax, (5.82, ymid), (6.12, ymid))
    tensor(ax, 6.12, ymid - h / 2, 0.55, h, "y", "(B, T, C)", "residual")
    note(ax, 4.2, 2.6, "the gate decides, unit by unit,\nhow much of u passes", ha="left", fontsize=7,
         role="accent")
    note(ax, 7.15, 2.9, "y = (SiLU(x $W_{gate}$) ⊙ x $W_{up}$) $W_{down}$", ha="right", fontsize=7.5, role=INK)
    note(ax, 7.15, 1.28, "parameters $3CF$;  $F = 8C/3$ gives $8C^2$", ha="right", fontsize=7, role=INK)
    # (b) GPT-2's MLP, for comparison.
    ax.plot([0.05, 7.15], [1.02, 1.02], color="#dddddd", lw=0.8)
    note(ax, 0.05, 0.85, "(b) GPT-2's MLP: two matrices, hidden width 4C", fontsize=8, role=INK)
    y = 0.2
    tensor(ax, 0.1, y, 0.55, h, "x", "(B, T, C)", "residual")
    arrow(ax, (0.65, y + h / 2), (1.0, y + h / 2))
    box(ax, 1.0, y, 0.68, h, "$W_1$", None, fontsize=9)
    note(ax, 1.34, y - 0.05, "(C, 4C)", ha="center", va="top", fontsize=6.5, mono=True)
    arrow(ax, (1.68, y + h / 2), (2.0, y + h / 2))
    box(ax, 2.0, y, 0.62, h, "GELU", None, fontsize=8)
    arrow(ax, (2.62, y + h / 2), (2.95, y + h / 2))
    box(ax, 2.95, y, 0.68, h, "$W_2$", None, fontsize=9)
    note(ax, 3.29, y - 0.05, "(4C, C)", ha="center", va="top", fontsize=6.5, mono=True)
    arrow(ax, (3.63, y + h / 2), (3.95, y + h / 2))
    tensor(ax, 3.95, y, 0.55, h, "y", "(B, T, C)", "residual")
    note(ax, 7.15, y + h / 2, "parameters $2 \\cdot C \\cdot 4C = 8C^2$", ha="right", fontsize=7, role=INK)
    return fig


def _block_panel(ax: plt.Axes, top: float, post: bool) -> None:
    """One block on a stream at height top - 1.0: pre-norm (norms on the branches) or post-norm."""
    ys = top - 1.05
    h = 0.38
    yb = ys + 0.42  # the branches' boxes
    note(ax, 0.3, ys, "x", ha="right", fontsize=9, role=INK)
    _stream(ax, 0.38, 6.82, ys)
    note(ax, 6.88, ys, "out", ha="left", fontsize=8, role=INK, va="center")
    if not post:
        for x0, sub, name in ((0.65, "attention\n(RoPE on q, k)", "h"), (3.7, "SwiGLU MLP", "out")):
            _tap(ax, x0, ys, yb + h / 2, x0 + 0.22)
            box(ax, x0 + 0.22, yb, 0.72, h, "RMSNorm", None, fontsize=7)
            arrow(ax, (x0 + 0.94, yb + h / 2), (x0 + 1.14, yb + h / 2))
            box(ax, x0 + 1.14, yb, 1.12, h, sub, None, fontsize=7)
            _write(ax, x0 + 2.26, yb + h / 2, x0 + 2.55, ys)
        note(ax, 3.4, ys - 0.2, "h  (B, T, C)", ha="center", va="top", fontsize=6.5, mono=True, role="residual")
        note(ax, 3.66, top - 0.02, "(a) pre-norm (as in GPT-2 and Llama; this book's parts):   h = x + Attn(Norm(x)),   "
             "out = h + MLP(Norm(h))", ha="center", fontsize=7.5, role=INK)
        note(ax, 3.66, ys - 0.42, "from out back to x the stream holds only additions: a path with gradient "
             "exactly the identity", ha="center", fontsize=7, role="residual")
        return
    for x0, sub, nx in ((0.65, "attention", 2.75), (3.7, "MLP", 5.8)):
        _tap(ax, x0, ys, yb + h / 2, x0 + 0.22)
        box(ax, x0 + 0.22, yb, 1.12, h, sub, None, fontsize=7)
        _write(ax, x0 + 1.34, yb + h / 2, x0 + 1.7, ys)
        box(ax, nx, ys - 0.17, 0.62, 0.34, "Norm", "accent", fontsize=7)
    note(ax, 4.6, ys - 0.2, "(B, T, C)", ha="center", va="top", fontsize=6.5, mono=True, role="residual")
    note(ax, 3.66, top - 0.02, "(b) post-norm (the original Transformer, BERT):   h = Norm(x + Attn(x)),   "
         "out = Norm(h + MLP(h))", ha="center", fontsize=7.5, role=INK)
    note(ax, 3.66, ys - 0.42, "every gradient on its way down passes through the norms on the stream: "
         "two per block", ha="center", fontsize=7, role="accent")


def draw_block() -> plt.Figure:
    """A pre-norm block (norms on the branches) above a post-norm block (norms on the stream)."""
    fig, ax = canvas(7.2, 3.5)
    _block_panel(ax, 3.4, post=False)
    ax.plot([0.05, 7.15], [1.8, 1.8], color="#dddddd", lw=0.8)
    _block_panel(ax, 1.66, post=True)
    return fig


def draw_paths() -> plt.Figure:
    """Two residual blocks unrolled: the gradient from out to x has four paths, one per subset of blocks."""
    fig, ax = canvas(7.2, 2.9)
    # Left: the two blocks as they are built.
    ys = 2.1
    note(ax, 0.05, 2.75, "(a) two residual blocks, as built", fontsize=8, role=INK)
    note(ax, 0.22, ys, "x", ha="right", fontsize=9, role=INK)
    _stream(ax, 0.3, 3.3, ys)
    note(ax, 3.36, ys, "out", ha="left", fontsize=8, role=INK)
    for x0, name in ((0.5, "$f_1$"), (1.85, "$f_2$")):
        _tap(ax, x0, ys, ys + 0.38, x0 + 0.2)
        box(ax, x0 + 0.2, ys + 0.2, 0.5, 0.36, name, None, fontsize=9)
        _write(ax, x0 + 0.7, ys + 0.38, x0 + 0.95, ys)
    note(ax, 1.75, 1.62, "out = $h + f_2(h)$,   h = $x + f_1(x)$", ha="center", fontsize=8, role=INK)
    note(ax, 1.75, 1.22, "$\\partial\\,$out / $\\partial x$ = $(I + J_2)(I + J_1)$"
         " = $I + J_1 + J_2 + J_2 J_1$", ha="center", fontsize=8, role=INK)
    note(ax, 1.75, 0.8, "$J_k$: the Jacobian of branch $f_k$ (how its output moves with its input)",
         ha="center", fontsize=7)
    note(ax, 1.75, 0.35, "the gradient that reaches x is a sum of four terms;\nthe first, $I$, "
         "goes through no block at all", ha="center", fontsize=7, role="residual")
    # Right: the same, unrolled into its paths.
    note(ax, 3.95, 2.75, "(b) unrolled: one path per subset of the blocks", fontsize=8, role=INK)
    rows = [(2.35, [], "$I$: skips both", "residual"), (1.8, ["$f_1$"], "$J_1$", None),
            (1.25, ["$f_2$"], "$J_2$", None), (0.7, ["$f_1$", "$f_2$"], "$J_2 J_1$: through both", None)]
    xs, xe = 4.1, 5.85
    plus = op(ax, 6.25, 1.52, "+", role="residual")
    for y, funcs, label, role in rows:
        note(ax, xs - 0.06, y, "x", ha="right", fontsize=8, role=INK)
        if not funcs:
            _stream(ax, xs, xe, y, head=False)
        else:
            ax.plot([xs, xe], [y, y], color=GREY, lw=1.0, zorder=1)
            for i, f in enumerate(funcs):
                bx = xs + 0.35 + i * 0.75 if len(funcs) == 2 else xs + 0.7
                box(ax, bx, y - 0.15, 0.42, 0.3, f, None, fontsize=8.5)
        note(ax, xs + 0.87, y + 0.23 if not funcs else y - 0.27, label, ha="center", fontsize=7,
             role="residual" if not funcs else None)
        arrow(ax, (xe, y), (plus[0] - 0.1, plus[1] + (y - plus[1]) * 0.35 / 1.2), role=role)
    arrow(ax, (plus[0] + 0.13, plus[1]), (6.7, plus[1]), role="residual")
    note(ax, 6.76, plus[1], "out", ha="left", fontsize=8, role=INK)
    note(ax, 5.05, 0.2,
         "L residual branches (sublayers): $2^L$ paths; $\\binom{L}{k}$ of them pass through k branches",
         ha="center", fontsize=7.5, role=INK)
    return fig


FIGURES = {
    "05_model.png": draw_model,
    "05_swiglu.png": draw_swiglu,
    "05_block.png": draw_block,
    "05_paths.png": draw_paths,
}
