"""Sliding Layer Merging (SLM; arXiv 2502.19159): ``slm`` (layerfold's default), ``slm-paper``
(the paper's procedure) and ``slm-reference`` (the authors' released code)."""

from __future__ import annotations

import sys
from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from tqdm.auto import tqdm

from layerfold.errors import LayerfoldError
from layerfold.merge import MERGES
from layerfold.methods.base import Method, PlanContext, PlanResult, register
from layerfold.methods.slm.engine import (
    AUTHORS_LOOP,
    CHANNEL_RIDGE,
    PAPER_LOOP,
    Rescale,
    SlidingLoop,
    SlmEngine,
    SlmRun,
    Window,
    windows_of,
)
from layerfold.methods.slm.estimate import planning_seconds
from layerfold.methods.slm.greedy import greedy_fold
from layerfold.methods.slm.selection import angular_removal, influence_removal, portfolio_candidates
from layerfold.methods.slm.shortlist import Shortlist
from layerfold.plan import Operation


def channel_lists(factors: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Per-channel factors as the plan stores them: six decimals, which give back the float32 values."""
    return {path: [round(v, 6) for v in t.tolist()] for path, t in factors.items()}


Selection = Literal["portfolio", "greedy", "optimal", "sliding", "influence", "angular"]
Criterion = Literal["output-cosine", "cka-linear", "cka-rbf", "angular", "loss"]
REMOVAL_SELECTIONS = ("portfolio", "influence", "angular")  # they choose layers to remove: the base layer stays
OUTPUT_CRITERIA = ("output-cosine", "loss")  # scores of the whole model's output


@register
class SlidingLayerMerging(Method):
    """Sliding Layer Merging (Zhu et al. 2025, arXiv 2502.19159) with layerfold's defaults.

    Consecutive layers are folded into one: each chosen window of layers keeps one layer, its
    lowest (the base), and the layers above it in the window go.  Options:

    - ``selection``: how the windows are chosen.  ``portfolio`` (the default with a target size)
      builds the plans of four selectors (``greedy``, ``optimal``, the layers of lowest block
      influence, the contiguous block closest in angle), scores each by ``criterion`` on the whole
      pruned model's output and keeps the best.  ``greedy`` folds adjacent segments one pair at a
      time, each time the pair that keeps the output closest to the original's; ``optimal`` finds
      the windows of least summed local cost by dynamic programming (windows of at most
      ``max_window`` layers); ``influence`` and ``angular`` take ShortGPT's and Angular's layers,
      each run folded into the kept layer below it; ``sliding`` is the paper's loop: from the top
      down a window grows while the similarity stays at or above ``threshold``.  Unset, the
      selection is ``sliding`` when a ``threshold`` is given, ``greedy`` when ``merge`` or
      ``norms`` is not ``base``, else ``portfolio``.
    - ``pairs``: which pairs each step of the greedy fold scores (with ``merge=base``; a fold that
      builds fused layers scores every pair): ``shortlist`` (the default) a few, each exactly
      (:mod:`layerfold.methods.slm.shortlist`), about a quarter to a third of the work, with the plans
      of scoring every pair on the models it was checked on; ``all`` every pair (the exact fold).
    - ``criterion``: the similarity that scores a candidate: the cosine of the pruned model's final
      hidden states with the original's (``output-cosine``), linear or RBF CKA or the angular
      distance between layer outputs, or the calibration loss (``loss``, with a target size only).
    - ``merge``, ``norms``: the fused layer.  ``base`` keeps the base layer; ``diff`` is the paper's
      theta_base + sum_k (theta_k - theta_base); ``mean``; ``reference`` the authors' code
      (:mod:`layerfold.merge`).  ``norms``: the base layer's norm weights, or merged like the rest.
    - ``rescale``: ``channels`` (the default) scales what each fused layer adds to the residual
      stream, one factor per output channel of its attention and MLP out-projections, fitted in
      closed form on the calibration activations so that its output approaches the original
      model's after the window (:meth:`SlmEngine.fit_channels`; ``channel_ridge`` pulls the factors
      towards 1); ``none`` keeps the fused layer as it is.  The factors travel in the plan and are
      baked into the weights by surgery.
    - ``threshold``: the sliding loop's stopping similarity, instead of a target size.  With a
      target size, the sliding loop's threshold is searched so that the size is met exactly.

    Why these defaults, and the options measured and not adopted: docs/measured-options.md.
    """

    name: ClassVar[str] = "slm"
    needs_target: ClassVar[bool] = False
    loop: ClassVar[SlidingLoop] = PAPER_LOOP  # the sliding loop's details (see SlidingLoop)
    selection: Selection | None = None
    criterion: Criterion = "output-cosine"
    merge: str = "base"
    norms: Literal["base", "merge"] = "base"
    rescale: Rescale = "channels"
    channel_ridge: float = Field(default=CHANNEL_RIDGE, ge=0)
    max_window: int = Field(default=8, ge=2)
    pairs: Literal["shortlist", "all"] = "shortlist"
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0)

    @property
    def chosen_selection(self) -> str:
        """The selection asked for, or the one the rule above gives when it is unset."""
        if self.selection is not None:
            return self.selection
        if self.threshold is not None:
            return "sliding"
        return "greedy" if self.merge != "base" or self.norms != "base" else "portfolio"

    @model_validator(mode="after")
    def _refuse_conflicts(self):
        """Every check that needs no model or target, run when the options are built."""
        MERGES.get(self.merge)  # an unknown operator, with "did you mean"
        problem = self.conflict()
        if problem:
            raise LayerfoldError(f"{self.name}: {problem}")
        return self

    def conflict(self) -> str | None:
        """What is wrong with this combination of options, or None."""
        selection = self.chosen_selection
        if self.threshold is not None and selection != "sliding":
            return f"selection={selection} aims at a size; --threshold works with selection=sliding"
        if self.threshold is not None and self.criterion == "loss":
            return "criterion 'loss' has no threshold scale: give a target size instead of --threshold"
        if selection in REMOVAL_SELECTIONS and (self.merge != "base" or self.norms != "base"):
            return f"selection={selection} chooses layers to remove: it needs merge=base and norms=base"
        if selection in ("portfolio", "greedy") and self.criterion not in OUTPUT_CRITERIA:
            return f"selection={selection} scores the whole model's output: use criterion output-cosine or loss"
        return None

    def plan(self, ctx: PlanContext) -> PlanResult:
        budget = self._budget(ctx)
        engine = self.make_engine(ctx)
        self._announce_estimate(ctx, budget)
        run, threshold, extra = self.select(engine, ctx, budget)
        fused, rescaled = self.rescale_windows(engine, run, ctx)
        extra.update(rescaled)
        ops = [Operation("fuse", lo, hi, score=run.scores.get((lo, hi)),
                         detail={**self.stop_detail((lo, hi), run), **fused.get((lo, hi), {})})
               for lo, hi in sorted(run.windows)]
        plan = ctx.new_plan(self.name, ops, merge=self.merge_record(),
                            criterion="window-cosine" if self.chosen_selection == "optimal" else self.criterion,
                            threshold=threshold,
                            scores={"candidates_evaluated": engine.evaluated, "selection": self.chosen_selection,
                                    **extra})
        return PlanResult(plan, self.fused_overrides(engine, run))

    def _announce_estimate(self, ctx: PlanContext, budget: int | None) -> None:
        """Say up front how long the default plan will take here, from the layer time the capture
        measured (:mod:`layerfold.methods.slm.estimate`); recorded in the plan's provenance."""
        if self.chosen_selection != "portfolio" or budget is None or not ctx.cache.layer_seconds:
            return
        seconds = planning_seconds(ctx.cache, budget, self.pair_chooser())
        ctx.info["planning_estimate_seconds"] = round(seconds, 1)
        if ctx.progress:
            tqdm.write(f"planning: about {seconds:.0f} s on this machine ({ctx.cache.layer_seconds * 1e3:.0f} ms "
                       "per decoder layer over the calibration tokens)", file=sys.stderr)

    def make_engine(self, ctx: PlanContext) -> SlmEngine:
        return SlmEngine(ctx.cache, self.criterion, self.merge, self.norms)

    def select(self, engine: SlmEngine, ctx: PlanContext, budget: int | None) -> tuple[SlmRun, float | None, dict]:
        """The windows, the threshold the sliding loop used (None for the other selections) and
        what the plan records about the choice."""
        selection = self.chosen_selection
        if selection == "portfolio":
            run, extra = self._portfolio(engine, ctx, budget)
            return run, None, extra
        if selection == "greedy":
            return greedy_fold(engine, budget, progress=ctx.progress, pairs=self.pair_chooser()), None, {}
        if selection == "optimal":
            return engine.optimal(budget, self.max_window, progress=ctx.progress), None, {}
        if selection in ("influence", "angular"):
            chooser = influence_removal if selection == "influence" else angular_removal
            removed = chooser(ctx.cache, budget)
            windows = windows_of(removed)
            return SlmRun(windows=windows, scores=dict.fromkeys(windows, engine.score_removal(removed))), None, {}
        if budget is None:
            return engine.run(self.threshold, loop=self.loop), self.threshold, {}
        threshold, run = engine.search(budget, progress=ctx.progress, loop=self.loop)
        return run, threshold, {}

    def _portfolio(self, engine: SlmEngine, ctx: PlanContext, budget: int) -> tuple[SlmRun, dict]:
        """Plans of removed layers from several selectors (see :func:`portfolio_candidates`), scored
        alike by the criterion on the whole model's output; the best is kept (:meth:`pick_candidate`)."""
        candidates = portfolio_candidates(engine, ctx.cache, budget, self.max_window, ctx.progress,
                                          self.pair_chooser())
        scores = {name: engine.score_removal(r) for name, r in candidates.items()}
        extra: dict = {"portfolio": scores, "portfolio_removed": {name: sorted(r) for name, r in candidates.items()}}
        pick, picked = self.pick_candidate(engine, ctx, candidates, scores)
        windows = windows_of(candidates[pick])
        return SlmRun(windows=windows, scores=dict.fromkeys(windows, scores[pick])), {**extra, **picked,
                                                                                      "portfolio_pick": pick}

    def pair_chooser(self) -> Shortlist | None:
        """Which pairs each step of the greedy fold scores (None: every pair)."""
        return Shortlist() if self.pairs == "shortlist" else None

    def pick_candidate(self, engine: SlmEngine, ctx: PlanContext, candidates: dict[str, set[int]],
             scores: dict[str, float]) -> tuple[str, dict]:
        """The portfolio's candidate kept: the best by the criterion."""
        return max(scores, key=lambda name: scores[name]), {}

    def rescale_windows(self, engine: SlmEngine, run: SlmRun, ctx: PlanContext) -> tuple[dict[Window, dict], dict]:
        """Per-channel factors of each window's fused layer (``rescale=channels``): what each fuse
        operation records (its ``channel_scale``, six decimals, as fitted: they give back exactly the
        float32 factors) and what the plan records (the calibration KL before and after)."""
        if self.rescale != "channels":
            return {}, {}
        channels, modules = engine.fit_channels(run.windows, self.channel_ridge, progress=ctx.progress)
        detail = {w: {"channel_scale": channel_lists(c)} for w, c in channels.items()}
        before, after = engine.kls_of(run.windows, [None, modules])
        return detail, {"channels": {"ridge": self.channel_ridge, "kl_before": before, "kl_after": after}}

    @staticmethod
    def stop_detail(window: Window, run: SlmRun) -> dict:
        """The similarity that stopped the window from growing (sliding loop), if one did."""
        below = (window[0] - 1, window[1])
        return {"rejected_next": run.rejected[below]} if below in run.rejected else {}

    def merge_record(self) -> dict:
        """How surgery builds each fused layer (the plan's ``merge``)."""
        return {"operator": self.merge, "norms": self.norms, "scale": 1.0}

    def fused_overrides(self, engine: SlmEngine, run: SlmRun) -> dict[int, dict[str, torch.Tensor]]:
        """Weights of fused layers that surgery cannot rebuild from the plan (none here)."""
        return {}

    def _budget(self, ctx: PlanContext) -> int | None:
        """Layers to remove, or None with a threshold; the checks that need the target."""
        budget = ctx.layers_to_remove()
        if budget is None and self.threshold is None:
            raise LayerfoldError(f"{self.name} needs --threshold or a size (--target-layers, --ratio, --param-ratio)")
        if budget is not None and self.threshold is not None:
            raise LayerfoldError("give either --threshold or a target size, not both")
        return budget


@register
class SlmPaper(SlidingLayerMerging):
    """SLM as the paper describes it: the sliding loop on the output cosine, windows fused by the
    paper's difference merge (theta_base + sum_k (theta_k - theta_base)), no rescaling.

    The paper's text does not say which pair the loop starts from, whether a similarity equal to
    the threshold passes, or what becomes of the window still growing when the loop reaches layer
    0; ``slm-paper`` starts at the last pair (so the last layer may be merged), lets a similarity
    equal to the threshold pass and fuses that last window.  ``slm-reference`` settles them as
    the authors' code does."""

    name: ClassVar[str] = "slm-paper"
    selection: Literal["sliding", "greedy", "optimal", "portfolio"] = "sliding"
    merge: str = "diff"
    rescale: Rescale = "none"


@register
class SlmReference(SlidingLayerMerging):
    """SLM as the authors' released code decides, so that results can be compared with theirs.

    The loop starts at the pair just below the top (on 30 layers (27, 28): the last layer is
    never merged); a window grows while the output cosine is strictly greater than the threshold;
    a window still growing when the loop reaches layer 0 is dropped, not fused; the fused layer is
    the window's top layer with the base's norms and biases (merge ``reference``).  Differences
    from ``slm-paper``: those three loop details and the fused layer, which there is the paper's
    difference merge.  One step of the authors' loop is left out because it cannot change a
    decision: after fusing a window, their code scores the model once more as it stands (a
    similarity that already passed)."""

    name: ClassVar[str] = "slm-reference"
    loop: ClassVar[SlidingLoop] = AUTHORS_LOOP
    selection: Literal["sliding", "greedy", "optimal", "portfolio"] = "sliding"
    merge: str = "reference"
    rescale: Rescale = "none"
