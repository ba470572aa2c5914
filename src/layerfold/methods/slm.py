"""Sliding Layer Merging (SLM; arXiv 2502.19159).

From the top of the network down, a window of consecutive layers grows downwards while the
similarity criterion stays at or above the threshold; the window is then fused into one
layer and the next window starts just below it.

The engine is incremental: layer inputs are captured once (:mod:`layerfold.calibrate`); a
candidate window is scored by building one fused layer and running only the layers from
the window upwards; candidate scores are memoised, so a target-size search over thresholds
re-runs almost nothing.  It takes exactly the decisions of the naive loop (deep copy, full
forward, compare), which the tests check.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

import torch
from tqdm.auto import tqdm

from layerfold.calibrate import LayerCache
from layerfold.errors import LayerfoldError
from layerfold.merge import build_fused_layer
from layerfold.methods.base import Method, PlanContext, PlanResult, register
from layerfold.plan import Operation
from layerfold.similarity import sample_cosine, similarity_matrix

CRITERIA = ("output-cosine", "cka-linear", "cka-rbf", "angular")
Window = tuple[int, int]


@dataclass
class SlmRun:
    windows: list[Window]
    scores: dict[Window, float]
    rejected: dict[Window, float] = field(default_factory=dict)

    @property
    def removed(self) -> int:
        return sum(hi - lo for lo, hi in self.windows)


class SlmEngine:
    """Scores candidate windows; memoises by (committed windows, candidate)."""

    def __init__(self, cache: LayerCache, criterion: str, merge: str, norms: str, scale: float = 1.0) -> None:
        if criterion not in CRITERIA:
            from layerfold.errors import did_you_mean

            raise did_you_mean(criterion, CRITERIA, "criterion")
        self.cache = cache
        self.criterion = criterion
        self.merge, self.norms, self.scale = merge, norms, scale
        self.memo: dict[tuple, float] = {}
        self._fused: dict[Window, torch.nn.Module] = {}
        self._reference: torch.Tensor | None = None
        self._matrix: torch.Tensor | None = None
        self.evaluated = 0

    @property
    def num_layers(self) -> int:
        return self.cache.num_layers

    def fused(self, window: Window) -> torch.nn.Module:
        if window not in self._fused:
            layers = self.cache.layers
            self._fused[window] = build_fused_layer([layers[i] for i in range(window[0], window[1] + 1)],
                                                    operator=self.merge, norms=self.norms, scale=self.scale)
        return self._fused[window]

    def reference_output(self) -> torch.Tensor:
        if self._reference is None:
            norm = self.cache.arch.final_norm_module(self.cache.model)
            with torch.no_grad():
                outs = [norm(h.to(self.cache.device)) for h in self.cache.inputs[self.num_layers]]
            self._reference = self.cache.final(outs)
        return self._reference

    def stack_above(self, committed: tuple[Window, ...], start: int) -> list[tuple[torch.nn.Module, int]]:
        """Modules of the committed model from original index ``start`` upwards."""
        at = {lo: (lo, hi) for lo, hi in committed}
        layers = self.cache.layers
        modules, i = [], start
        while i < self.num_layers:
            if i in at:
                modules.append((self.fused(at[i]), i))
                i = at[i][1] + 1
            else:
                modules.append((layers[i], i))
                i += 1
        return modules

    def similarity(self, committed: tuple[Window, ...], lo: int, hi: int) -> float:
        if self.criterion != "output-cosine":
            return float(self.matrix()[hi, lo])
        key = (committed, lo, hi)
        if key not in self.memo:
            modules = [(self.fused((lo, hi)), lo)] + self.stack_above(committed, hi + 1)
            out = self.cache.final(self.cache.run(lo, modules, final_norm=True))
            self.memo[key] = sample_cosine(out, self.reference_output())
            self.evaluated += 1
        return self.memo[key]

    def matrix(self) -> torch.Tensor:
        """Similarity between layer outputs (output of layer i = input of layer i + 1)."""
        if self._matrix is None:
            kind = self.criterion
            outputs = [self.cache.output(i) for i in range(self.num_layers)]
            self._matrix = similarity_matrix(outputs, kind)
        return self._matrix

    def run(self, threshold: float, budget: int | None = None) -> SlmRun:
        """The sliding loop at one threshold; with ``budget``, stop once that many layers are gone."""
        windows: list[Window] = []
        scores: dict[Window, float] = {}
        rejected: dict[Window, float] = {}
        last_ok: float | None = None
        high = self.num_layers - 1
        low = high - 1

        def removed() -> int:
            return sum(h - lo_ for lo_, h in windows)

        def commit(lo_: int, hi_: int) -> None:
            if hi_ > lo_:
                windows.append((lo_, hi_))
                scores[(lo_, hi_)] = last_ok if last_ok is not None else float("nan")

        while low >= 0:
            if budget is not None and removed() + (high - low) > budget:
                break
            sim = self.similarity(tuple(windows), low, high)
            if sim >= threshold:
                last_ok = sim
                low -= 1
            else:
                rejected[(low, high)] = sim
                commit(low + 1, high)
                last_ok = None
                high = low
                low = high - 1
            if budget is not None and removed() >= budget:
                break
        commit(low + 1, high)
        return SlmRun(windows=windows, scores=scores, rejected=rejected)

    def search(self, budget: int, iterations: int = 40, progress: bool = True) -> tuple[float, SlmRun]:
        """Highest threshold at which the budgeted loop removes exactly ``budget`` layers."""
        lo_t, hi_t = -1.0, 1.0 + 1e-9
        best = self.run(lo_t, budget)
        if best.removed != budget:
            raise LayerfoldError(f"slm cannot remove {budget} layers from {self.num_layers}")
        best_t = lo_t
        for _ in tqdm(range(iterations), desc="threshold search", disable=not progress, leave=False):
            mid = (lo_t + hi_t) / 2
            run = self.run(mid, budget)
            if run.removed == budget:
                lo_t, best_t, best = mid, mid, run
            else:
                hi_t = mid
            if hi_t - lo_t < 1e-7:
                break
        return best_t, best


@register
class SlidingLayerMerging(Method):
    """Sliding Layer Merging (Zhu et al. 2025, arXiv 2502.19159)."""

    name: ClassVar[str] = "slm"
    needs_target: ClassVar[bool] = False
    criterion: Literal["output-cosine", "cka-linear", "cka-rbf", "angular"] = "output-cosine"
    merge: str = "diff"
    norms: Literal["base", "merge"] = "base"
    scale: float = 1.0
    threshold: float | None = None

    def plan(self, ctx: PlanContext) -> PlanResult:
        from layerfold.merge import MERGES

        MERGES.get(self.merge)  # validate early, with "did you mean"
        budget = ctx.layers_to_remove()
        if budget is None and self.threshold is None:
            raise LayerfoldError("slm needs --threshold or a size (--target-layers, --ratio, --param-ratio)")
        if budget is not None and self.threshold is not None:
            raise LayerfoldError("give either --threshold or a target size, not both")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise LayerfoldError(f"--threshold must be a similarity between -1 and 1, got {self.threshold}")
        engine = SlmEngine(ctx.cache, self.criterion, self.merge, self.norms, self.scale)
        if budget is None:
            threshold, run = self.threshold, engine.run(self.threshold)
        else:
            threshold, run = engine.search(budget, progress=ctx.progress)
        ops = [Operation("fuse", lo, hi, score=run.scores.get((lo, hi)),
                         detail={"rejected_next": run.rejected.get((lo - 1, hi))})
               for lo, hi in sorted(run.windows)]
        plan = ctx.new_plan(self.name, ops, merge={"operator": self.merge, "norms": self.norms, "scale": self.scale},
                            criterion=self.criterion, threshold=threshold,
                            scores={"candidates_evaluated": engine.evaluated})
        return PlanResult(plan)
