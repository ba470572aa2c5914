"""SLEB (Song et al. 2024, "SLEB: Streamlining LLMs through Redundancy Verification and
Elimination of Transformer Blocks", arXiv 2402.09025).

Iterative: at each step, every remaining layer is tried out of the current (already pruned)
model, and the one whose removal gives the lowest calibration loss (mean next-token NLL, i.e.
log perplexity, through the model's final norm and lm head) goes.

Incremental: the hidden states entering each kept layer of the current model are kept, so
trying layer j runs only the layers above it; after a removal they are recomputed from the
removed layer's position upwards.  The decisions are those of full forward passes.
"""

from __future__ import annotations

import math
from typing import ClassVar

from tqdm.auto import tqdm

from layerfold.methods._common import drop_ops, loss_without, rerun_inputs
from layerfold.methods.base import Method, PlanContext, PlanResult, register


@register
class Sleb(Method):
    """SLEB (Song et al. 2024): remove, one at a time, the layer whose removal raises calibration perplexity least."""

    name: ClassVar[str] = "sleb"

    def plan(self, ctx: PlanContext) -> PlanResult:
        remove = self.required_removal(ctx)
        cache = ctx.cache
        kept = list(range(cache.num_layers))
        hidden = [list(h) for h in cache.inputs]  # hidden[p]: input of kept[p]; hidden[-1]: the output
        steps, removed, step_of, score_of = [], [], {}, {}
        for step in tqdm(range(remove), desc="sleb", disable=not ctx.progress, leave=False):
            losses = {kept[p]: loss_without(cache, hidden[p], kept[p + 1:]) for p in range(len(kept))}
            victim = min(losses, key=lambda i: (losses[i], i))
            p = kept.index(victim)
            kept.pop(p)
            hidden = hidden[:p] + rerun_inputs(cache, kept, p, hidden[p])
            removed.append(victim)
            step_of[victim] = {"step": step}
            score_of[victim] = math.exp(losses[victim])
            steps.append({"removed": victim, "perplexity": {str(i): math.exp(v) for i, v in losses.items()}})
        plan = ctx.new_plan(self.name, drop_ops(removed, score_of, step_of), criterion="calibration-perplexity",
                            scores={"removal_order": removed, "steps": steps})
        return PlanResult(plan)
