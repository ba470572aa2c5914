"""The shortlist of candidate pairs the default's greedy fold scores at each step (``pairs=shortlist``).

It scores a few pairs per step instead of all of them (each exactly): about a quarter of the layer
runs.  It keeps the full fold's plans for Gemma-3-270M at 20% and 35% and SmolLM2-135M at 20%; at
SmolLM2 35% it folds other layers from the fourth step on, and that plan measured better on
WikiText-2, PTB and PTB-valid and worse on LAMBADA (docs/measured-options.md).  ``pairs=all`` scores
every pair, as the fold did before.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerfold.methods.slm.engine import Window
from layerfold.methods.slm.greedy import Hidden
from layerfold.similarity import cosine


@dataclass(frozen=True)
class Shortlist:
    """Which candidate pairs a step of the fold scores (merge=base): the pairs never scored
    before that hold the window the last step formed (at most two), the ``by_score`` best by the
    score each had at the last step that scored it, and the ``by_influence`` whose removed segment
    has the lowest block influence in the current folded model (1 - mean token cosine between the
    state entering it and the state leaving it; ``first_step`` of them at the first step, when no
    pair has a score yet).  The pair chosen is the best of those scored, by the criterion itself;
    the full fold (``pairs=None``, the default) scores every pair."""

    by_score: int = 3
    by_influence: int = 3
    first_step: int = 6

    def __call__(self, segments: list[Window], entering: list[Hidden], last: dict[tuple[Window, Window], float],
              formed: Window | None) -> list[int]:
        """The pairs to score, in increasing order (so that ties go to the lowest, as in the full
        fold); ``formed`` is the window the last step formed."""
        pairs = [(segments[k], segments[k + 1]) for k in range(len(segments) - 1)]
        influence = [1.0 - cosine(torch.cat(entering[k + 1]), torch.cat(entering[k + 2])) for k in range(len(pairs))]
        count = self.by_influence if last else self.first_step
        chosen = set(sorted(range(len(pairs)), key=lambda k: (influence[k], k))[:count])
        known = [k for k, pair in enumerate(pairs) if pair in last]
        chosen |= set(sorted(known, key=lambda k: (-last[pairs[k]], k))[: self.by_score])
        chosen |= {k for k, pair in enumerate(pairs) if formed in pair}  # the only pairs new to this step
        return sorted(chosen)
