"""Method ``slm-lab``: ``slm`` with the options that were measured and not adopted.

It accepts every option of ``slm`` and these, and gives the plans ``slm`` gave with them before
they left the package (their measured outcomes: docs/measured-options.md); its greedy fold scores
every pair (``pairs=all``) unless told otherwise, as ``slm``'s did then:

- ``fit=ridge`` (``ridge``): each fused layer's MLP output projection refitted in closed form on
  the calibration activations (:mod:`correction`); the fitted weights travel beside the plan.
  With ``fit`` and no ``rescale`` given, nothing is rescaled.
- ``refine=N`` (``refine_radius``): after the selection, up to N passes of a swap search (one
  removed layer for one kept layer, the best swap by the criterion if it improves).
- ``pick=kl`` or ``pick=choice`` (``choice_items``): the portfolio's candidates compared by the
  next-token KL of the pruned model from the original's on the calibration tokens, or by a
  continuation-choice probe on the calibration source (:mod:`choice`), instead of the criterion.
- ``rescale=kl``, ``criterion`` or ``channels+kl``: one factor per window for the whole fused
  layer, chosen from a grid by that KL or by the criterion (after the channel factors for
  ``channels+kl``).
- ``shortlist`` (with ``pairs=shortlist``): the greedy fold's shortlist sizes (by last score, by
  block influence, at the first step); ``[3, 3, 6]`` was the default's from commit 203d4c6 on, until
  its SmolLM2-135M plan at 35% left the full fold's and the sizes became 3, 1, 12.
- ``scale``: the difference merge's scale, theta_base + scale * sum_k (theta_k - theta_base).  The
  engine scores windows with it, but surgery builds the fused layers with scale 1 (the plan
  records it only in its ``merge``), as before.
"""

from __future__ import annotations

import copy
from typing import ClassVar, Literal

import torch
from pydantic import Field
from tqdm.auto import tqdm

from layerfold.errors import LayerfoldError
from layerfold.merge import build_fused_layer, scale_branches
from layerfold.methods._common import output_kl
from layerfold.methods.base import METHODS, PlanContext, register
from layerfold.methods.slm import SlidingLayerMerging, SlmEngine, SlmRun, Window, removed_layers, windows_of
from layerfold.methods.slm.method import REMOVAL_SELECTIONS, channel_lists
from layerfold.methods.slm.shortlist import Shortlist

from .correction import fit_output_projection

RESCALE_GRID = (0.6, 0.8, 0.9, 1.0, 1.1, 1.2, 1.4, 1.6, 2.0)  # factors tried for each window's kept layer
LabRescale = Literal["none", "kl", "criterion", "channels", "channels+kl"]


class LabEngine(SlmEngine):
    """The SLM engine with the fitted fused layer, the merge scale, the KL of a removal, the swap
    search and the grid rescaling."""

    def __init__(self, cache, criterion: str, merge: str, norms: str, scale: float = 1.0, fit: str = "none",
                 ridge: float = 1e-2) -> None:
        super().__init__(cache, criterion, merge, norms)
        self.scale, self.fit, self.ridge = scale, fit, ridge

    def build(self, window: Window) -> torch.nn.Module:
        if self.fit == "none" and (self.scale == 1.0 or self.merge == "base"):
            return super().build(window)
        lo, hi = window
        fused = build_fused_layer([self.cache.layers[i] for i in range(lo, hi + 1)], operator=self.merge,
                                  norms=self.norms, scale=self.scale)
        if self.fit == "ridge":
            fit_output_projection(fused, self.cache.arch, self.cache.inputs[lo], self.cache.inputs[hi + 1],
                                  self.cache.extras[lo], ridge=self.ridge)
        return fused

    def output_is_cached(self) -> bool:
        return super().output_is_cached() and self.fit == "none"

    def kl_removal(self, removed: set[int] | frozenset[int]) -> float:
        """Mean KL(original || pruned) of next-token distributions on the calibration tokens for
        the model without the layers in ``removed`` (lower is better)."""
        key = ("removal-kl", frozenset(removed))
        if key not in self.memo:
            self.memo[key] = output_kl(self.cache, self._run_without(removed))
            self.evaluated += 1
        return self.memo[key]

    def score_removal_from(self, removed: set[int], start: int, hidden: list[torch.Tensor]) -> float:
        """:meth:`score_removal`, run from position ``start`` of the model without ``removed`` given
        the hidden states ``hidden`` entering it (the layers below being the same); same memo."""
        key = ("removal", frozenset(removed))
        if key not in self.memo:
            outs = self._run_without(removed, start, hidden, final_norm=self.criterion == "output-cosine")
            self.memo[key] = self.score_output(outs)
            self.evaluated += 1
        return self.memo[key]

    def _kept_inputs(self, kept: list[int]) -> dict[int, list[torch.Tensor]]:
        """Input of every kept layer in the model that keeps only ``kept`` (key L: its output)."""
        states, hidden = {}, self.cache.inputs[kept[0]]
        for i, nxt in zip(kept, [*kept[1:], self.num_layers], strict=True):
            states[i] = hidden
            hidden = [h.to(self.cache.store_device) for h in self.cache.run(i, [(self.cache.layers[i], i)],
                                                                              hidden=hidden)]
            states[nxt] = hidden
        return states

    def refine(self, removed: set[int], passes: int, radius: int = 0, progress: bool = True) -> tuple[set[int], list]:
        """Local search over plans of removed layers: each pass tries every swap of one removed
        layer for one kept layer (layer 0 always stays; within ``radius`` layers when > 0),
        scored by the criterion on the whole model's output, and takes the best if it improves.
        Returns the final set and the accepted swaps ``(removed_back, newly_removed, score)``."""
        n = self.num_layers
        removed = set(removed)
        score = self.score_removal(removed)
        history = []
        for _ in tqdm(range(passes), desc="refining", disable=not progress, leave=False):
            kept = [i for i in range(n) if i not in removed]
            states = self._kept_inputs(kept)
            best: tuple[float, int, int] | None = None
            for r in sorted(removed):
                for k in kept:
                    if k == 0 or (radius and abs(k - r) > radius):
                        continue
                    new = (removed - {r}) | {k}
                    start = min(r, k)
                    first = min([i for i in kept if i >= start], default=n)  # its input is the hidden at start
                    value = self.score_removal_from(new, start, states[first])
                    if best is None or value > best[0]:
                        best = (value, r, k)
            if best is None or best[0] <= score:
                break
            score, r, k = best
            removed = (removed - {r}) | {k}
            history.append((r, k, score))
        return removed, history

    def rescale(self, windows: list[Window], grid: tuple[float, ...] = RESCALE_GRID, objective: str = "kl",
                progress: bool = True, modules: dict[int, torch.nn.Module] | None = None
                ) -> tuple[dict[Window, float], float, float]:
        """A factor for each window's fused layer, scaling what it adds to the residual stream
        (:func:`layerfold.merge.scale_branches`), chosen from ``grid`` on the calibration tokens by
        ``objective``: ``"kl"``, the KL divergence of the whole pruned model's next-token
        distributions from the original's, or ``"criterion"``, the engine's criterion on the
        model's output (negated, so that lower is better in both).  Windows are taken bottom-up,
        each with the factors already chosen below it; a factor other than 1 is kept only if it
        lowers the objective, so it never rises.  ``modules`` (window base -> layer) replaces the
        fused layers (e.g. channel-fitted ones) that the factors then scale.  Returns the factors,
        and the objective before and after."""
        branches = self._branches("rescale")
        windows = sorted(windows)
        if not windows:
            return {}, 0.0, 0.0
        modules = {w[0]: self.module_of(w) for w in windows} | (modules or {})  # trials replace entries

        def stack(from_index: int) -> list[tuple[torch.nn.Module, int]]:
            return [(m, j) for m, j in self._folded(windows, modules) if j >= from_index]

        def measure(from_index: int, hidden) -> float:
            if objective == "kl":
                return output_kl(self.cache, self.cache.run(from_index, stack(from_index), hidden=hidden))
            outs = self.cache.run(from_index, stack(from_index), hidden=hidden,
                                  final_norm=self.criterion == "output-cosine")
            return -self.score_output(outs)

        start = windows[0][0]
        before = current = measure(start, None)
        factors: dict[Window, float] = {}
        bar = tqdm(total=len(windows) * (len(grid) - (1.0 in grid)), desc="rescaling", disable=not progress,
                   leave=False)
        for lo, hi in windows:
            below = [(m, j) for m, j in stack(start) if j < lo]
            hidden = self.cache.run(start, below) if below else None
            original, best = modules[lo], (1.0, None)
            for factor in grid:
                if factor == 1.0:
                    continue
                trial = copy.deepcopy(original)
                scale_branches(trial, branches, factor)
                modules[lo] = trial
                value = measure(lo, hidden)
                self.evaluated += 1
                bar.update(1)
                if value < current:
                    current, best = value, (factor, trial)
            factors[(lo, hi)] = best[0]
            modules[lo] = best[1] if best[1] is not None else original
        bar.close()
        return factors, before, current


class SlmLab(SlidingLayerMerging):
    """``slm`` with the options measured and not adopted (see the module docstring)."""

    name: ClassVar[str] = "slm-lab"
    scale: float = 1.0
    fit: Literal["none", "ridge"] = "none"
    ridge: float = Field(default=1e-2, gt=0)
    refine: int = Field(default=0, ge=0)
    refine_radius: int = Field(default=0, ge=0)
    pick: Literal["criterion", "kl", "choice"] = "criterion"
    choice_items: int = Field(default=400, ge=1)
    rescale: LabRescale | None = None  # unset: channels, or none with fit=ridge
    pairs: Literal["shortlist", "all"] = "all"  # every pair, as when these options were measured
    # with pairs=shortlist: by_score, by_influence, first_step (a list: the plan records it as JSON reads it back)
    shortlist: list[int] = Field(default_factory=lambda: [3, 1, 12], min_length=3, max_length=3)

    def pair_chooser(self) -> Shortlist | None:
        """``pairs=shortlist`` with the ``shortlist`` sizes (3, 3, 6: the default's from 203d4c6 until
        they became 3, 1, 12)."""
        return Shortlist(*self.shortlist) if self.pairs == "shortlist" else None

    @property
    def chosen_rescale(self) -> str:
        if self.rescale is not None:
            return self.rescale
        return "none" if self.fit != "none" else "channels"

    @property
    def chosen_selection(self) -> str:
        if self.selection is None and self.threshold is None and self.fit != "none":
            return "greedy"  # the portfolio compares plans of removed layers; a fitted layer means the greedy fold
        return super().chosen_selection

    def conflict(self) -> str | None:
        selection = self.chosen_selection
        if (self.refine or selection in REMOVAL_SELECTIONS) and (
                self.merge != "base" or self.fit != "none" or self.norms != "base"):
            return ("refine and selection=portfolio, influence or angular choose plans of removed layers: they "
                    "need merge=base, norms=base and fit=none")
        if self.refine and self.threshold is not None:
            return "refine aims at a size: give --target-layers, --ratio or --param-ratio instead of --threshold"
        if self.pick == "choice" and selection != "portfolio":
            return f"pick=choice compares the portfolio's candidates; selection={selection} has none: use " \
                   "selection=portfolio"
        if self.chosen_rescale == "criterion" and self.criterion not in ("output-cosine", "loss"):
            return "rescale=criterion scores the model's output: use criterion output-cosine or loss"
        if self.chosen_rescale != "none" and self.fit != "none":
            return "rescale scales a window's merged layer; a fitted layer (fit=ridge) is not rescaled: use one " \
                   "or the other"
        return super().conflict()

    def make_engine(self, ctx: PlanContext) -> LabEngine:
        return LabEngine(ctx.cache, self.criterion, self.merge, self.norms, self.scale, self.fit, self.ridge)

    def merge_record(self) -> dict:
        return {"operator": self.merge, "norms": self.norms, "scale": self.scale}

    def select(self, engine: LabEngine, ctx: PlanContext, budget: int | None) -> tuple[SlmRun, float | None, dict]:
        run, threshold, extra = super().select(engine, ctx, budget)
        if self.refine:
            removed, history = engine.refine(removed_layers(run.windows), self.refine, self.refine_radius,
                                             progress=ctx.progress)
            windows = windows_of(removed)
            run = SlmRun(windows=windows, scores=dict.fromkeys(windows, engine.score_removal(removed)))
            extra["refine_swaps"] = [{"kept_again": r, "removed": k, "score": v} for r, k, v in history]
        return run, threshold, extra

    def pick_candidate(self, engine: LabEngine, ctx: PlanContext, candidates: dict[str, set[int]],
             scores: dict[str, float]) -> tuple[str, dict]:
        if self.pick == "choice":
            choice = self._choice_scores(ctx, candidates)
            best = max(choice, key=lambda name: (*choice[name].key(), scores[name]))
            return best, {"portfolio_choice": {name: {"accuracy": c.accuracy, "nll": c.nll}
                                               for name, c in choice.items()},
                          "choice_items": self.choice_items}
        if self.pick == "kl":
            kl = {name: engine.kl_removal(r) for name, r in candidates.items()}
            return min(kl, key=lambda name: (kl[name], -scores[name])), {"portfolio_kl": kl}
        return super().pick_candidate(engine, ctx, candidates, scores)

    def _choice_scores(self, ctx: PlanContext, candidates: dict[str, set[int]]) -> dict:
        """The continuation-choice probe of each candidate on ``choice_items`` items of the
        calibration source (the source's whole text, not only the sampled windows)."""
        from layerfold.data.sources import load_text
        from layerfold.data.tokens import leading_bos, token_stream

        from .choice import choice_items, plan_choice_scores

        tokenizer = ctx.loaded.tokenizer
        if tokenizer is None:
            raise LayerfoldError("pick=choice needs a tokenizer")
        stream = token_stream(tokenizer, load_text(ctx.calibration.source))
        try:
            items = choice_items(stream, self.choice_items, leading_bos(tokenizer))
        except LayerfoldError as exc:
            raise LayerfoldError(f"pick=choice on {ctx.calibration.source}: {exc}; give fewer with --set "
                                 "choice_items=N or a longer calibration source") from exc
        return plan_choice_scores(ctx.loaded, candidates, items, batch_size=ctx.calibration.batch_size,
                                  streamer=ctx.streamer, progress=ctx.progress)

    def rescale_windows(self, engine: LabEngine, run: SlmRun, ctx: PlanContext) -> tuple[dict[Window, dict], dict]:
        rescale = self.chosen_rescale
        extra: dict = {}
        channels: dict[Window, dict[str, torch.Tensor]] = {}
        factors: dict[Window, float] = {}
        modules = None
        if rescale.startswith("channels"):
            unfitted = engine.kl_of(run.windows)
            channels, modules = engine.fit_channels(run.windows, self.channel_ridge, progress=ctx.progress)
            extra["channels"] = {"ridge": self.channel_ridge, "kl_before": unfitted}
            if rescale == "channels":
                extra["channels"]["kl_after"] = engine.kl_of(run.windows, modules)
        if rescale in ("kl", "criterion", "channels+kl"):
            objective = "criterion" if rescale == "criterion" else "kl"
            factors, before, after = engine.rescale(run.windows, objective=objective, progress=ctx.progress,
                                                    modules=modules)
            extra["rescale"] = {"objective": "kl" if objective == "kl" else f"-{self.criterion}",
                                "before": before, "after": after,
                                "factors": {f"{lo}-{hi}": f for (lo, hi), f in sorted(factors.items())}}
            if "channels" in extra:  # the grid starts from the channel-fitted model: its KL is "before"
                extra["channels"]["kl_after"] = before
        detail = {}
        for window in run.windows:
            entry = {"fit": self.fit} if self.fit != "none" else {}
            if window in channels:
                entry["channel_scale"] = channel_lists(channels[window])
            if factors.get(window, 1.0) != 1.0:
                entry["branch_scale"] = factors[window]
            detail[window] = entry
        return detail, extra

    def fused_overrides(self, engine: LabEngine, run: SlmRun) -> dict[int, dict[str, torch.Tensor]]:
        if self.fit == "none":
            return {}
        return {lo: {k: v.detach().cpu().clone() for k, v in engine.fused((lo, hi)).named_parameters()}
                for lo, hi in run.windows}


if SlmLab.name not in METHODS:  # imported twice under two module names, it registers once
    register(SlmLab)
