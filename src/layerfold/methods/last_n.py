"""Naive truncation: drop the n layers just below the last one.

The baseline users try first; it keeps the final layer, whose output the final norm and lm
head were trained on, and needs no calibration data.
"""

from __future__ import annotations

from typing import ClassVar

from layerfold.methods._common import drop_ops
from layerfold.methods.base import Method, PlanContext, PlanResult, register


@register
class LastN(Method):
    """Naive truncation: drop the n layers just below the last one (no data; a lower bound)."""

    name: ClassVar[str] = "last-n"

    def plan(self, ctx: PlanContext) -> PlanResult:
        n = self.required_removal(ctx)
        last = ctx.num_layers - 1  # the target always leaves at least one layer, so n <= last
        block = list(range(last - n, last))
        return PlanResult(ctx.new_plan(self.name, drop_ops(block), criterion="position", scores={"removed": block}))
