"""Heatmaps of layer x layer similarity matrices: the "patch" figure of SLM (arXiv 2502.19159),
where runs of consecutive, mutually similar layers show as bright squares on the diagonal.

Figures are drawn on matplotlib's Agg canvas without pyplot, so no global backend or figure
registry is touched (safe inside notebooks and threads).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from layerfold.plan import Plan

FUSE_COLOUR = "red"
DROP_COLOUR = "red"
INSET = 0.06  # of a cell


def heatmap_figure(matrix: Sequence[Sequence[float]] | np.ndarray, title: str, plan: Plan | None = None,
                   colorbar_label: str = "similarity", cmap: str = "viridis"):
    """A matplotlib ``Figure`` (Agg canvas) of ``matrix`` with layers on both axes; the plan's
    fuse windows outlined as squares and its dropped layers crossed on the diagonal."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    values = np.asarray(matrix, dtype=float)
    n = values.shape[0]
    side = float(np.clip(3.0 + 0.2 * n, 5.0, 14.0))
    fig = Figure(figsize=(side + 1.3, side), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    low = float(np.nanmin(values)) if values.size else 0.0
    image = ax.imshow(values, cmap=cmap, vmin=min(low, 1.0 - 1e-6), vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=colorbar_label)
    ticks = list(range(0, n, max(1, -(-n // 32))))
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.tick_params(labelsize=7 if n > 16 else 9)
    ax.set_xlabel("layer (output of)")
    ax.set_ylabel("layer (output of)")
    ax.set_title(title, fontsize=10)
    if plan is not None:
        outline_plan(ax, plan)
    fig.tight_layout()
    return fig


def outline_plan(ax, plan: Plan) -> None:
    """Outline each ``fuse lo..hi`` as the square lo..hi; cross each dropped layer's diagonal cell."""
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    handles = []
    for op in plan.operations:
        if op.kind == "fuse":  # inset a little, so that adjacent windows stay apart
            side = op.hi - op.lo + 1 - 2 * INSET
            ax.add_patch(Rectangle((op.lo - 0.5 + INSET, op.lo - 0.5 + INSET), side, side, fill=False,
                                   edgecolor=FUSE_COLOUR, linewidth=2.0, label=f"fuse {op.lo}-{op.hi}"))
        else:
            ax.plot(op.layers, op.layers, linestyle="none", marker="x", markersize=8, markeredgewidth=2,
                    color=DROP_COLOUR)
    if plan.windows():
        handles.append(Rectangle((0, 0), 1, 1, fill=False, edgecolor=FUSE_COLOUR, linewidth=2.0,
                                 label="fuse window"))
    if any(op.kind == "drop" for op in plan.operations):
        handles.append(Line2D([], [], linestyle="none", marker="x", markersize=8, markeredgewidth=2,
                              color=DROP_COLOUR, label="dropped layer"))
    if handles:
        ax.legend(handles=handles, loc="lower left", fontsize=8, framealpha=0.85,
                  title=f"plan: {plan.method}", title_fontsize=8)


def save_heatmap(matrix: Sequence[Sequence[float]] | np.ndarray, path: str | Path, title: str,
                 plan: Plan | None = None, colorbar_label: str = "similarity") -> Path:
    """Draw :func:`heatmap_figure` and write it as a PNG."""
    path = Path(path)
    fig = heatmap_figure(matrix, title, plan=plan, colorbar_label=colorbar_label)
    fig.savefig(path, format="png")
    return path
