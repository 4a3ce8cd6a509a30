"""The book's visual language: one style and one palette for every figure, in Jupyter and in print.

Every chapter calls `book_style()` once, before its first figure. It makes inline figures 200 dpi
(Jupyter's "retina" format: sharp on paper, normal size on screen) and sets sizes that read well
at the width of a printed page. The palette gives each idea of the book one color everywhere:
queries, keys and values, the residual stream, tokens, and the two halves of a comparison.
"""

from __future__ import annotations

import matplotlib as mpl

__all__ = ["COLORS", "book_style"]

# One color per concept, used by every chapter's plots and diagrams.
COLORS = {
    "query": "#4c78a8",  # blue
    "key": "#f58518",  # orange
    "value": "#54a24b",  # green
    "residual": "#b279a2",  # purple
    "token": "#72b7b2",  # teal
    "mask": "#bab0ac",  # grey: what is hidden or ignored
    "accent": "#e45756",  # red: what to look at
    "ours": "#4c78a8",  # the book's version in a comparison
    "reference": "#f58518",  # the version it is compared with
}


def book_style(dpi: int = 200) -> None:
    """Set matplotlib up for the book: sizes, palette, and `dpi`-dot inline figures."""
    mpl.rcParams.update(
        {
            "figure.dpi": 100,  # the on-screen size; inline images are rendered at `dpi`
            "savefig.dpi": dpi,
            "font.size": 9,
            "axes.titlesize": 10,
            "axes.labelsize": 9,
            "legend.fontsize": 8,
            "xtick.labelsize": 8,
            "ytick.labelsize": 8,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "axes.prop_cycle": mpl.cycler(color=[COLORS[k] for k in ("query", "key", "value", "accent", "residual", "token")]),
        }
    )
    try:  # inside Jupyter: render inline figures at twice the screen resolution
        from IPython import get_ipython

        if get_ipython() is not None:
            from matplotlib_inline.backend_inline import set_matplotlib_formats

            set_matplotlib_formats("retina")
    except ImportError:
        pass
