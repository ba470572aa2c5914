"""ShortGPT (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant
Than You Expect", arXiv 2403.03853).

Block Influence of layer i: BI_i = 1 - mean over calibration tokens of cos(x_i, x_{i+1}), with
x_i the hidden state entering layer i and x_{i+1} the one leaving it (the last layer's output
is taken before the final norm).  The n layers of lowest BI are removed, all at once.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from layerfold.methods._common import drop_ops, lowest
from layerfold.methods.base import Method, PlanContext, PlanResult, register
from layerfold.similarity import cosine


def block_influence(cache) -> dict[int, float]:
    """Block Influence of every layer: 1 - mean token cosine between its input and its output."""
    return dict(enumerate(influence_between(cache.inputs[: cache.num_layers + 1])))


def influence_between(states: list[list[torch.Tensor]]) -> list[float]:
    """1 - mean token cosine between each state and the next (each given per calibration batch): the
    block influence of what runs between them.  Computed where the states are kept: on a GPU, moving
    them to the CPU cost more than the rest of a 7B plan."""
    influence, entering = [], torch.cat(states[0])
    for batches in states[1:]:
        leaving = torch.cat(batches)
        influence.append(1.0 - cosine(entering, leaving))
        entering = leaving
    return influence


@register
class ShortGPT(Method):
    """ShortGPT (Men et al. 2024): drop the layers of lowest Block Influence, 1 - cos(input, output)."""

    name: ClassVar[str] = "shortgpt"

    def plan(self, ctx: PlanContext) -> PlanResult:
        remove = self.required_removal(ctx)
        cache = ctx.cache
        influence = block_influence(cache)
        chosen = lowest(influence, remove)
        plan = ctx.new_plan(self.name, drop_ops(chosen, influence), criterion="block-influence",
                            scores={"block_influence": [influence[i] for i in range(cache.num_layers)],
                                    "removed": chosen})
        return PlanResult(plan)
