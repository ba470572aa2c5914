"""Angular-distance block pruning (Gromov et al. 2024, "The Unreasonable Ineffectiveness of
the Deeper Layers", arXiv 2403.17887).

For a block of n consecutive layers starting at l, the distance is
d(l, n) = mean over samples of arccos(cos(x_l, x_{l+n})) / pi, with x_l the hidden state of
each sample's last token entering layer l (x_L: the last layer's output, before the final
norm).  The block of smallest distance is removed.
"""

from __future__ import annotations

from typing import ClassVar

from layerfold.methods._common import drop_ops
from layerfold.methods.base import Method, PlanContext, PlanResult, register
from layerfold.similarity import angular_similarity


def block_distances(cache, n: int) -> dict[int, float]:
    """Angular distance d(l, n) of every block of ``n`` consecutive layers, by its first layer l."""
    last_tokens = [cache.input_of(i)[:, -1:, :] for i in range(cache.num_layers + 1)]
    return {lo: 1.0 - angular_similarity(last_tokens[lo], last_tokens[lo + n])
            for lo in range(cache.num_layers - n + 1)}


@register
class AngularDistance(Method):
    """Gromov et al. 2024: drop the contiguous block whose input and output are closest in angle."""

    name: ClassVar[str] = "angular"

    def plan(self, ctx: PlanContext) -> PlanResult:
        n = self.required_removal(ctx)
        cache = ctx.cache
        distance = block_distances(cache, n)
        start = min(distance, key=lambda lo: (distance[lo], lo))
        block = list(range(start, start + n))
        plan = ctx.new_plan(self.name, drop_ops(block, dict.fromkeys(block, distance[start])),
                            criterion="angular-distance",
                            scores={"block_size": n, "angular_distance": {str(lo): d for lo, d in distance.items()},
                                    "removed": block})
        return PlanResult(plan)
