"""Sliding Layer Merging (SLM; arXiv 2502.19159): the method (``method``), its engine
(``engine``), the greedy fold (``greedy``) and the portfolio's other selectors (``selection``)."""

from layerfold.methods.slm.engine import (
    AUTHORS_LOOP,
    CHANNEL_RIDGE,
    CRITERIA,
    PAPER_LOOP,
    SlidingLoop,
    SlmEngine,
    SlmRun,
    Window,
    removed_layers,
    windows_of,
)
from layerfold.methods.slm.greedy import greedy_fold
from layerfold.methods.slm.method import SlidingLayerMerging, SlmPaper, SlmReference
from layerfold.methods.slm.selection import angular_removal, influence_removal, portfolio_candidates

__all__ = ["AUTHORS_LOOP", "CHANNEL_RIDGE", "CRITERIA", "PAPER_LOOP", "SlidingLayerMerging", "SlidingLoop",
           "SlmEngine", "SlmPaper", "SlmReference", "SlmRun", "Window", "angular_removal", "greedy_fold",
           "influence_removal", "portfolio_candidates", "removed_layers", "windows_of"]
