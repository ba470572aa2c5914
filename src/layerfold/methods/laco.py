"""LaCo (Yang et al. 2024, "LaCo: Large Language Model Pruning via Layer Collapse", arXiv
2402.11187), as in the authors' released loop.

From the top down, the window of ``merge_layers`` (C) consecutive layers of the *current*
model starting at position l is collapsed into layer l by Reserving-Differences-while-Seeking-
Common, theta_l + sum_k (theta_k - theta_l) (merge operator ``diff``, norms kept from layer l).
The merge is accepted when the mean over calibration samples of the cosine between the
flattened final hidden states (after the final norm) of the merged and the original model is
above ``threshold`` (T); then l moves down by ``interval`` (I), else by one.  The loop starts
at l = ``highest_lay`` - C and stops below ``lowest_lay``.  Defaults are those of the authors'
released notebook (Llama-2-13B): C = 7, I = 1, T = 0.45, layers 0 .. L-1.

Because l moves down by I < C, a later window usually takes in the layer an earlier merge
made: merges nest.  Each fused layer is then one ``fuse lo..hi`` operation over the original
layers it covers; where nesting gives weights that one merge of those layers would not (with
``diff``), the fused weights travel with the plan (``PlanResult.overrides``) and the nesting
is recorded in the operation's ``detail["members"]``.  ``merge="reference"`` reproduces the
authors' in-place loop, whose fused layer is the window's top layer with the base's norms.

With a target size the loop stops once that many layers are gone (the last window is cut
short if needed), and the threshold is searched: the highest T found by bisection at which
the loop reaches the size (the layer count is not monotone in T, so this is a search for one
such T, not a guarantee of the best).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from layerfold.calibrate import LayerCache
from layerfold.errors import LayerfoldError
from layerfold.merge import MERGES, build_fused_layer
from layerfold.methods.base import Method, PlanContext, PlanResult, register
from layerfold.plan import Operation
from layerfold.similarity import sample_cosine

Recipe = int | tuple["Recipe", ...]  # an original layer, or a merge of recipes (base first)
State = tuple[Recipe, ...]


def lowest_layer(r: Recipe) -> int:
    return r if isinstance(r, int) else lowest_layer(r[0])


def highest_layer(r: Recipe) -> int:
    return r if isinstance(r, int) else highest_layer(r[-1])


def is_nested(r: Recipe) -> bool:
    return not isinstance(r, int) and any(not isinstance(m, int) for m in r)


def as_lists(r: Recipe):
    return r if isinstance(r, int) else [as_lists(m) for m in r]


@dataclass
class LacoRun:
    state: State
    threshold: float
    accepted: dict[Recipe, float] = field(default_factory=dict)
    trials: list[dict] = field(default_factory=list)

    @property
    def removed(self) -> int:
        return sum(highest_layer(r) - lowest_layer(r) for r in self.state if not isinstance(r, int))


class LacoEngine:
    """Runs the authors' loop on the layer cache; similarities are memoised by model state."""

    def __init__(self, cache: LayerCache, merge: str, merge_layers: int, interval: int, lowest: int,
                 highest: int) -> None:
        self.cache = cache
        self.merge = merge
        self.c, self.interval, self.lowest, self.highest = merge_layers, interval, lowest, highest
        self.memo: dict[State, float] = {}
        self._modules: dict[Recipe, torch.nn.Module] = {}
        norm = cache.arch.final_norm_module(cache.model)
        with torch.no_grad():
            self.reference = cache.final([norm(h.to(cache.device)) for h in cache.inputs[cache.num_layers]])

    def module(self, r: Recipe) -> torch.nn.Module:
        if isinstance(r, int):
            return self.cache.layers[r]
        if r not in self._modules:
            self._modules[r] = build_fused_layer([self.module(m) for m in r], operator=self.merge, norms="base")
        return self._modules[r]

    def similarity(self, state: State) -> float:
        if state not in self.memo:
            start = next((p for p, r in enumerate(state) if r != p), len(state))
            modules = [(self.module(r), lowest_layer(r)) for r in state[start:]]
            out = self.cache.final(self.cache.run(start, modules, final_norm=True))
            self.memo[state] = sample_cosine(out, self.reference)
            self._forget_unused(state)
        return self.memo[state]

    def _forget_unused(self, keep: State) -> None:
        """Fused modules are rebuilt on demand; keep only those of ``keep`` to bound memory."""
        wanted: set[Recipe] = set()

        def walk(r: Recipe) -> None:
            if not isinstance(r, int):
                wanted.add(r)
                for m in r:
                    walk(m)

        for r in keep:
            walk(r)
        for r in [r for r in self._modules if r not in wanted]:
            del self._modules[r]

    def run(self, threshold: float, budget: int | None = None) -> LacoRun:
        state: State = tuple(range(self.cache.num_layers))
        result = LacoRun(state=state, threshold=threshold)
        lay = self.highest - self.c
        while lay >= self.lowest:
            if budget is not None and result.removed >= budget:
                break
            take = min(self.c - 1, len(state) - lay - 1)
            if budget is not None:
                take = min(take, budget - result.removed)
            if take >= 1:
                merged = tuple(state[lay:lay + take + 1])
                candidate = state[:lay] + (merged,) + state[lay + take + 1:]
                sim = self.similarity(candidate)
                ok = sim > threshold
                result.trials.append({"window": as_lists(merged), "similarity": sim, "accepted": ok})
            else:  # nothing above l to merge: the authors' loop compares identical models and accepts
                ok, candidate = True, state
            if ok:
                if candidate is not state:
                    result.accepted[merged] = sim
                state = result.state = candidate
                lay -= self.interval
                if lay >= len(state):
                    lay = len(state) - 1 - self.c
            else:
                lay -= 1
        return result

    def search(self, budget: int, iterations: int = 30, progress: bool = True) -> LacoRun:
        """The highest threshold (by bisection) at which the budgeted loop removes ``budget`` layers."""
        lo_t, hi_t = -1.0, 1.0
        best = self.run(lo_t, budget)
        if best.removed != budget:
            raise LayerfoldError(
                f"laco cannot remove {budget} layers with merge_layers={self.c}, interval={self.interval} between "
                f"layers {self.lowest} and {self.highest} (it reaches {best.removed} accepting every merge): "
                "raise merge_layers, lower interval or widen lowest_lay..highest_lay")
        for _ in tqdm(range(iterations), desc="laco threshold search", disable=not progress, leave=False):
            mid = (lo_t + hi_t) / 2
            run = self.run(mid, budget)
            if run.removed == budget:
                lo_t, best = mid, run
            else:
                hi_t = mid
        return best

    def fused_state(self, r: Recipe) -> dict[str, torch.Tensor] | None:
        """Weights of a nested merge when one merge of its original layers would differ, else None."""
        if not is_nested(r):
            return None
        nested = self.module(r)
        flat = build_fused_layer([self.cache.layers[i] for i in range(lowest_layer(r), highest_layer(r) + 1)],
                                 operator=self.merge, norms="base")
        flat_params = dict(flat.named_parameters())
        if all(torch.equal(p, flat_params[n]) for n, p in nested.named_parameters()):
            return None
        return {n: p.detach().clone() for n, p in nested.named_parameters()}


@register
class LayerCollapse(Method):
    """LaCo (Yang et al. 2024): collapse C layers into one by RDSC from the top down while final states stay similar."""

    name: ClassVar[str] = "laco"
    needs_target: ClassVar[bool] = False
    merge_layers: int = 7
    interval: int = 1
    threshold: float | None = None
    lowest_lay: int = 0
    highest_lay: int | None = None
    merge: str = "diff"

    DEFAULT_THRESHOLD: ClassVar[float] = 0.45

    def validate_for(self, num_layers: int) -> int:
        MERGES.get(self.merge)
        if self.merge_layers < 2:
            raise LayerfoldError(f"laco: merge_layers (layers per merge, C) must be at least 2, "
                                 f"got {self.merge_layers}")
        if self.interval < 1:
            raise LayerfoldError(f"laco: interval must be at least 1, got {self.interval}")
        highest = num_layers - 1 if self.highest_lay is None else self.highest_lay
        if not 0 <= self.lowest_lay <= highest <= num_layers:
            raise LayerfoldError(f"laco: need 0 <= lowest_lay <= highest_lay <= {num_layers}, got "
                                 f"{self.lowest_lay} and {highest}")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise LayerfoldError(f"laco: threshold must be a cosine between -1 and 1, got {self.threshold}")
        return highest

    def plan(self, ctx: PlanContext) -> PlanResult:
        highest = self.validate_for(ctx.num_layers)
        budget = ctx.layers_to_remove()
        if budget is not None and self.threshold is not None:
            raise LayerfoldError("laco: give either --threshold or a target size, not both")
        engine = LacoEngine(ctx.cache, self.merge, self.merge_layers, self.interval, self.lowest_lay, highest)
        if budget is None:
            run = engine.run(self.DEFAULT_THRESHOLD if self.threshold is None else self.threshold)
        else:
            run = engine.search(budget, progress=ctx.progress)
        ops, overrides = [], {}
        for r in run.state:
            if isinstance(r, int):
                continue
            lo, hi = lowest_layer(r), highest_layer(r)
            ops.append(Operation("fuse", lo, hi, score=run.accepted.get(r),
                                 detail={"members": as_lists(r), "nested": is_nested(r)}))
            state = engine.fused_state(r)
            if state is not None:
                overrides[lo] = state
        plan = ctx.new_plan(self.name, ops, merge={"operator": self.merge, "norms": "base", "scale": 1.0},
                            criterion="output-cosine", threshold=run.threshold,
                            scores={"trials": run.trials, "candidates_evaluated": len(engine.memo)})
        return PlanResult(plan, overrides)

