"""The shortlist of candidate pairs the default's greedy fold scores at each step (``pairs=shortlist``).

It scores a few pairs per step instead of all of them (each exactly): about a quarter to a third of
the layer runs.  Its sizes (3 pairs by their last score, 1 by block influence, 12 at the first step)
are the cheapest of a grid that follow the full fold's every step on both traced models,
SmolLM2-135M (ten steps) and Gemma-3-270M (six), so the default's plans are the full fold's in all
four cells of the quality benchmark (``benchmarks/prune_time/check_plans.py sizes``).  It remains a
shortcut: on another model it may leave the full fold's path, and ``pairs=all`` scores every pair.
"""

from __future__ import annotations

from dataclasses import dataclass

from layerfold.methods.shortgpt import influence_between
from layerfold.methods.slm.engine import Window
from layerfold.methods.slm.greedy import Hidden


def segment_influence(entering: list[Hidden]) -> list[float]:
    """Block influence of the segment each pair removes (pair ``k`` removes segment ``k + 1``): 1 -
    mean token cosine between the state entering that segment and the state leaving it."""
    return influence_between(entering[1:])


@dataclass(frozen=True)
class Shortlist:
    """Which candidate pairs a step of the fold scores (merge=base): the pairs never scored
    before that hold the window the last step formed (at most two), the ``by_score`` best by the
    score each had at the last step that scored it, and the ``by_influence`` whose removed segment
    has the lowest block influence in the current folded model (``first_step`` of them at the first
    step, when no pair has a score yet).  The pair chosen is the best of those scored, by the
    criterion itself; the full fold (``pairs=None``) scores every pair."""

    by_score: int = 3
    by_influence: int = 1
    first_step: int = 12

    def __call__(self, segments: list[Window], entering: list[Hidden], last: dict[tuple[Window, Window], float],
                 formed: Window | None) -> list[int]:
        """The pairs to score, in increasing order (so that ties go to the lowest, as in the full
        fold); ``formed`` is the window the last step formed."""
        return self.choose(segments, segment_influence(entering), last, formed)

    def choose(self, segments: list[Window], influence: list[float], last: dict[tuple[Window, Window], float],
               formed: Window | None) -> list[int]:
        """:meth:`__call__` from each pair's block ``influence`` (:func:`segment_influence`)."""
        pairs = [(segments[k], segments[k + 1]) for k in range(len(segments) - 1)]
        count = self.by_influence if last else self.first_step
        chosen = set(sorted(range(len(pairs)), key=lambda k: (influence[k], k))[:count])
        known = [k for k, pair in enumerate(pairs) if pair in last]
        chosen |= set(sorted(known, key=lambda k: (-last[pairs[k]], k))[: self.by_score])
        chosen |= {k for k, pair in enumerate(pairs) if formed in pair}  # the only pairs new to this step
        return sorted(chosen)
