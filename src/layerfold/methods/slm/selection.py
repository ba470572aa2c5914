"""Plans of removed layers from several selectors: the portfolio's candidates."""

from __future__ import annotations

from layerfold.calibrate import LayerCache
from layerfold.methods._common import lowest
from layerfold.methods.angular import block_distances
from layerfold.methods.shortgpt import block_influence
from layerfold.methods.slm.engine import SlmEngine, removed_layers
from layerfold.methods.slm.greedy import PairChooser, greedy_fold


def influence_removal(cache: LayerCache, budget: int) -> set[int]:
    """The ``budget`` layers of lowest block influence (ShortGPT's choice), layer 0 kept: each run of
    them is then folded into the kept layer below it."""
    return set(lowest({i: v for i, v in block_influence(cache).items() if i > 0}, budget))


def angular_removal(cache: LayerCache, budget: int) -> set[int]:
    """The contiguous block of ``budget`` layers whose input and output are closest in angle
    (Angular's choice), layer 0 kept: it is then folded into the kept layer below it."""
    distance = {lo: v for lo, v in block_distances(cache, budget).items() if lo > 0}
    block = min(distance, key=lambda lo: (distance[lo], lo))
    return set(range(block, block + budget))


def portfolio_candidates(engine: SlmEngine, cache: LayerCache, budget: int, max_window: int = 8,
                         progress: bool = True, pairs: PairChooser | None = None) -> dict[str, set[int]]:
    """Plans of removed layers (layer 0 always kept) from four selectors: the greedy fold (scoring
    the pairs ``pairs`` chooses, None: every pair), the optimal windows, the lowest block influence
    and the closest contiguous block in angle."""
    candidates = {
        "greedy": removed_layers(greedy_fold(engine, budget, progress=progress, pairs=pairs).windows),
        "optimal": removed_layers(engine.optimal(budget, max_window, progress=progress).windows),
        "block-influence": influence_removal(cache, budget),
        "angular-block": angular_removal(cache, budget),
    }
    return {name: r for name, r in candidates.items() if 0 not in r}
