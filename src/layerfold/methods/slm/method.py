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

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator

from layerfold.errors import LayerfoldError
from layerfold.methods.base import Method, PlanContext, PlanResult, register
from layerfold.methods.slm.engine import CHANNEL_RIDGE, Rescale, SlmEngine, SlmRun, Window, removed_layers, windows_of
from layerfold.methods.slm.greedy import greedy_fold
from layerfold.methods.slm.selection import angular_removal, influence_removal, portfolio_candidates
from layerfold.plan import Operation


@register
class SlidingLayerMerging(Method):
    """Sliding Layer Merging (Zhu et al. 2025, arXiv 2502.19159), with layerfold's measured defaults.

    Defaults (chosen on PTB-valid perplexity over SmolLM2-135M and Gemma-3-270M at 20% and 35%,
    benchmarks/results/quality.md; a tie there broken on zero-shot validation tasks): each window
    keeps its base layer (``merge="base"``), rescaled channel by channel (``rescale="channels"``,
    below), and the windows are those of the best of several candidate plans
    (``selection="portfolio"``): the
    greedy fold (adjacent segments folded one pair at a time, each time the pair that keeps the
    final output closest in cosine to the original's), the optimal windows (dynamic programming on
    a local cost), the lowest block influence and the closest contiguous block in angle.  The
    candidates are compared by the criterion, the whole model's output cosine on the calibration
    tokens (``pick="criterion"``); ``pick="kl"`` compares them by the KL divergence of the pruned
    model's next-token distributions from the original's instead (better on validation text with
    the paper's 10 calibration samples, but on Gemma-3-270M it flips to a 4x worse plan with 32).
    After the selection, what each window's kept layer adds to the residual stream is rescaled:
    ``"channels"`` fits one factor per output channel of each residual branch (attention, MLP) in
    closed form on the calibration activations, so that the kept layer's output approaches the
    original residual stream after the window (:meth:`SlmEngine.fit_channels`, ridge
    ``channel_ridge`` towards 1; the default); ``"kl"`` scales the whole layer by one factor per
    window, chosen from a grid by that KL on the calibration tokens; ``"channels+kl"`` does both,
    in that order; ``"criterion"`` chooses the one factor by the criterion; ``"none"`` keeps the
    layer as it is.  The factors are stored in the plan's operations (``channel_scale``,
    ``branch_scale``) and baked into the weights by surgery, so the pruned model is a plain
    checkpoint.
    ``selection="greedy"`` and ``"optimal"`` run one selector; ``refine=N`` adds a swap search.
    ``selection="influence"`` takes the layers of lowest block influence (ShortGPT's choice), each run
    folded into the kept layer below and rescaled as above: on multiple-choice validation tasks it
    beats the default (43.45 against 42.41 over both models and ratios) at a validation perplexity 43%
    higher, but on SmolLM2's seven reported tasks it is only level without BoolQ (quality.md).
    ``selection="angular"`` likewise takes the contiguous block closest in angle (Angular's choice).
    ``pick="choice"`` compares the portfolio's candidates by a continuation-choice probe shaped like
    the multiple-choice tasks (:mod:`layerfold.choice`): ``choice_items`` items of the calibration
    source, each a 96-token context, its true 32 tokens and three 32-token spans from further on;
    the candidate that picks the true continuation most often wins (ties: the graded score).  Measured
    (quality.md, session 9): no better on the zero-shot validation tasks than the cosine pick (42.46
    against 42.41) and worse on perplexity than a baseline in two of four cells, so not the default.
    The paper's procedure is ``slm-paper``; the authors' code, ``slm-reference``.
    """

    name: ClassVar[str] = "slm"
    needs_target: ClassVar[bool] = False
    selection: Literal["sliding", "greedy", "optimal", "portfolio", "influence", "angular"] = "portfolio"
    criterion: Literal["output-cosine", "cka-linear", "cka-rbf", "angular", "loss"] = "output-cosine"
    merge: str = "base"
    norms: Literal["base", "merge"] = "base"
    scale: float = 1.0
    fit: Literal["none", "ridge"] = "none"
    ridge: float = Field(default=1e-2, gt=0)
    max_window: int = Field(default=8, ge=2)
    threshold: float | None = Field(default=None, ge=-1.0, le=1.0)
    refine: int = Field(default=0, ge=0)
    refine_radius: int = Field(default=0, ge=0)
    pick: Literal["criterion", "kl", "choice"] = "criterion"
    choice_items: int = Field(default=400, ge=1)
    rescale: Rescale = "channels"
    channel_ridge: float = Field(default=CHANNEL_RIDGE, ge=0)

    @model_validator(mode="after")
    def _threshold_means_sliding(self):
        """A threshold is the paper's stopping rule: with one and no explicit selection, slide.
        A fitted fused layer (fit=ridge) is not rescaled unless rescale is asked for."""
        if self.fit != "none" and "rescale" not in self.model_fields_set:
            self.rescale = "none"
        if self.threshold is not None and "selection" not in self.model_fields_set:
            self.selection = "sliding"
        elif (self.selection == "portfolio" and "selection" not in self.model_fields_set
              and (self.merge != "base" or self.fit != "none" or self.norms != "base")):
            # the portfolio compares plans of removed layers; another fused layer means the greedy fold
            self.selection = "greedy"
        return self

    def plan(self, ctx: PlanContext) -> PlanResult:
        from layerfold.merge import MERGES

        MERGES.get(self.merge)  # validate early, with "did you mean"
        budget = self._budget(ctx)
        engine = SlmEngine(ctx.cache, self.criterion, self.merge, self.norms, self.scale, self.fit, self.ridge)
        threshold = self.threshold
        extra: dict = {}
        if self.selection == "portfolio":
            run, extra = self._portfolio(engine, ctx, budget)
        elif self.selection == "greedy":
            run = greedy_fold(engine, budget, progress=ctx.progress)
        elif self.selection == "optimal":
            run = engine.optimal(budget, self.max_window, progress=ctx.progress)
        elif self.selection in ("influence", "angular"):
            chooser = influence_removal if self.selection == "influence" else angular_removal
            removed = chooser(ctx.cache, budget)
            windows = windows_of(removed)
            run = SlmRun(windows=windows, scores=dict.fromkeys(windows, engine.score_removal(removed)))
        elif budget is None:
            run = engine.run(self.threshold)
        else:
            threshold, run = engine.search(budget, progress=ctx.progress)
        if self.refine:
            removed, history = engine.refine(removed_layers(run.windows), self.refine, self.refine_radius,
                                             progress=ctx.progress)
            windows = windows_of(removed)
            run = SlmRun(windows=windows, scores=dict.fromkeys(windows, engine.score_removal(removed)))
            extra["refine_swaps"] = [{"kept_again": r, "removed": k, "score": v} for r, k, v in history]
        factors: dict[Window, float] = {}
        channels: dict[Window, dict[str, torch.Tensor]] = {}
        modules = None
        if self.rescale.startswith("channels"):
            unfitted = engine.kl_of(run.windows)
            channels, modules = engine.fit_channels(run.windows, self.channel_ridge, progress=ctx.progress)
            extra["channels"] = {"ridge": self.channel_ridge, "kl_before": unfitted}
            if self.rescale == "channels":
                extra["channels"]["kl_after"] = engine.kl_of(run.windows, modules)
        if self.rescale in ("kl", "criterion", "channels+kl"):
            objective = "criterion" if self.rescale == "criterion" else "kl"
            factors, before, after = engine.rescale(run.windows, objective=objective, progress=ctx.progress,
                                                    modules=modules)
            extra["rescale"] = {"objective": "kl" if objective == "kl" else f"-{self.criterion}",
                                "before": before, "after": after,
                                "factors": {f"{lo}-{hi}": f for (lo, hi), f in sorted(factors.items())}}
            if "channels" in extra:  # the grid starts from the channel-fitted model: its KL is "before"
                extra["channels"]["kl_after"] = before
        scaled = {w: f for w, f in factors.items() if f != 1.0}
        # six decimals, as fitted: they give back exactly the float32 factors the engine used
        per_channel = {w: {p: [round(v, 6) for v in t.tolist()] for p, t in c.items()} for w, c in channels.items()}
        ops = [Operation("fuse", lo, hi, score=run.scores.get((lo, hi)),
                         detail={k: v for k, v in (("rejected_next", run.rejected.get((lo - 1, hi))),
                                                   ("fit", self.fit if self.fit != "none" else None),
                                                   ("channel_scale", per_channel.get((lo, hi))),
                                                   ("branch_scale", scaled.get((lo, hi)))) if v is not None})
               for lo, hi in sorted(run.windows)]
        plan = ctx.new_plan(self.name, ops, merge={"operator": self.merge, "norms": self.norms, "scale": self.scale},
                            criterion="window-cosine" if self.selection == "optimal" else self.criterion,
                            threshold=threshold,
                            scores={"candidates_evaluated": engine.evaluated, "selection": self.selection,
                                    **extra})
        overrides = {}
        if self.fit != "none":
            overrides = {lo: {k: v.detach().cpu().clone() for k, v in engine.fused((lo, hi)).named_parameters()}
                         for lo, hi in run.windows}
        return PlanResult(plan, overrides)

    def _portfolio(self, engine: SlmEngine, ctx: PlanContext, budget: int) -> tuple[SlmRun, dict]:
        """Plans of removed layers from several selectors (see :func:`portfolio_candidates`), scored
        alike by the criterion on the whole model's output; the best is kept (by ``pick``)."""
        candidates = portfolio_candidates(engine, ctx.cache, budget, self.max_window, ctx.progress)
        scores = {name: engine.score_removal(r) for name, r in candidates.items()}
        extra: dict = {"portfolio": scores, "portfolio_removed": {name: sorted(r) for name, r in candidates.items()}}
        if self.pick == "choice":
            choice = self._choice_scores(ctx, candidates)
            pick = max(choice, key=lambda name: (*choice[name].key(), scores[name]))
            extra["portfolio_choice"] = {name: {"accuracy": c.accuracy, "nll": c.nll} for name, c in choice.items()}
            extra["choice_items"] = self.choice_items
        elif self.pick == "kl":
            kl = {name: engine.kl_removal(r) for name, r in candidates.items()}
            pick = min(kl, key=lambda name: (kl[name], -scores[name]))
            extra["portfolio_kl"] = kl
        else:
            pick = max(scores, key=lambda name: scores[name])
        windows = windows_of(candidates[pick])
        return SlmRun(windows=windows, scores=dict.fromkeys(windows, scores[pick])), {**extra, "portfolio_pick": pick}

    def _choice_scores(self, ctx: PlanContext, candidates: dict[str, set[int]]) -> dict:
        """The continuation-choice probe of each candidate on ``choice_items`` items of the
        calibration source (the source's whole text, not only the sampled windows)."""
        from layerfold.choice import choice_items, default_bos, plan_choice_scores
        from layerfold.data.sources import load_text
        from layerfold.data.tokens import token_stream

        tokenizer = ctx.loaded.tokenizer
        if tokenizer is None:
            raise LayerfoldError("pick=choice needs a tokenizer")
        stream = token_stream(tokenizer, load_text(ctx.calibration.source))
        try:
            items = choice_items(stream, self.choice_items, default_bos(tokenizer))
        except LayerfoldError as exc:
            raise LayerfoldError(f"pick=choice on {ctx.calibration.source}: {exc}; give fewer with --set "
                                 "choice_items=N or a longer calibration source") from exc
        return plan_choice_scores(ctx.loaded, candidates, items, batch_size=ctx.calibration.batch_size,
                                  streamer=ctx.streamer, progress=ctx.progress)

    def _budget(self, ctx: PlanContext) -> int | None:
        budget = ctx.layers_to_remove()
        if budget is None and self.threshold is None:
            raise LayerfoldError("slm needs --threshold or a size (--target-layers, --ratio, --param-ratio)")
        if budget is not None and self.threshold is not None:
            raise LayerfoldError("give either --threshold or a target size, not both")
        if (self.refine or self.selection in ("portfolio", "influence", "angular")) and (
                self.merge != "base" or self.fit != "none" or self.norms != "base"):
            raise LayerfoldError("refine and selection=portfolio, influence or angular choose plans of removed "
                                 "layers: they need merge=base, norms=base and fit=none")
        if self.pick == "choice" and self.selection != "portfolio":
            raise LayerfoldError(f"pick=choice compares the portfolio's candidates; selection={self.selection} has "
                                 "none: use selection=portfolio")
        if (self.refine or self.selection in ("portfolio", "influence", "angular")) and budget is None:
            raise LayerfoldError(f"{'refine' if self.refine else 'selection=' + self.selection} aims at a size: give "
                                 "--target-layers, --ratio or --param-ratio")
        if self.selection == "portfolio" and self.criterion not in ("output-cosine", "loss"):
            raise LayerfoldError("selection=portfolio scores the model's output: use criterion output-cosine or loss")
        if self.rescale == "criterion" and self.criterion not in ("output-cosine", "loss"):
            raise LayerfoldError("rescale=criterion scores the model's output: use criterion output-cosine or loss")
        if self.rescale != "none" and self.fit != "none":
            raise LayerfoldError("rescale scales a window's merged layer; a fitted layer (fit=ridge) is not rescaled: "
                                 "use one or the other")
        if self.threshold is not None:
            if self.selection != "sliding":
                raise LayerfoldError(f"{self.selection} selection aims at a size; --threshold works with "
                                     "selection=sliding")
            if not -1.0 <= self.threshold <= 1.0:
                raise LayerfoldError(f"--threshold must be a similarity between -1 and 1, got {self.threshold}")
            if self.criterion == "loss":
                raise LayerfoldError("criterion 'loss' has no threshold scale; use it with a target size")
        return budget


@register
class SlmPaper(SlidingLayerMerging):
    """SLM exactly as the paper describes it: sliding windows, output cosine, difference merge."""

    name: ClassVar[str] = "slm-paper"
    selection: Literal["sliding", "greedy", "optimal", "portfolio"] = "sliding"
    merge: str = "diff"
    rescale: Rescale = "none"


@register
class SlmReference(SlidingLayerMerging):
    """SLM as the authors' released code behaves: the fused layer is the window's top layer."""

    name: ClassVar[str] = "slm-reference"
    selection: Literal["sliding", "greedy", "optimal", "portfolio"] = "sliding"
    merge: str = "reference"
    rescale: Rescale = "none"
