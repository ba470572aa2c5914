"""Depth plus width under one budget: ``param_ratio`` of all parameters removed, a share by a depth
method and the rest by width; ``split="auto"`` keeps the split with the lowest held-out loss."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch

from layerfold.data.tokens import CalibrationConfig
from layerfold.errors import LayerfoldError
from layerfold.evaluate.perplexity import perplexity_of_windows
from layerfold.methods.base import Target
from layerfold.methods.planning import make_plan
from layerfold.models.arch import parameter_count
from layerfold.models.load import as_loaded
from layerfold.surgery import apply_plan
from layerfold.width.calibration import calibration_tokens, held_out_windows
from layerfold.width.layout import Layout
from layerfold.width.plan import WidthPlan
from layerfold.width.planning import shrink

AUTO_SPLITS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class SplitCandidate:
    split: float
    layers: int | None = None
    params: int | None = None
    heldout_nll: float | None = None
    width: dict | None = None  # widths after, when width pruning took part
    attention: str | None = None  # how width pruning treated attention (auto picks one)
    attention_search: list | None = None
    depth_plan: str | None = None  # summary of the depth step's plan
    depth_options: dict | None = None  # the depth method's options, as validated
    error: str | None = None


@dataclass
class DepthWidthResult:
    """``loaded.model`` is the pruned model (with ``split="auto"``: the winning candidate's copy)."""

    loaded: object
    param_ratio: float
    split: float
    depth: object | None  # PlanResult of the depth step, None when no layer was removed
    width: WidthPlan | None
    layers_before: int
    layers_after: int
    params_before: int
    params_after: int
    candidates: list[SplitCandidate] = field(default_factory=list)

    @property
    def achieved_ratio(self) -> float:
        return 1 - self.params_after / self.params_before

    def summary(self) -> dict:
        return {"param_ratio": self.param_ratio, "split": self.split, "achieved_ratio": round(self.achieved_ratio, 4),
                "layers": [self.layers_before, self.layers_after], "params": [self.params_before, self.params_after],
                "width": self.width.after if self.width else None,
                "candidates": [asdict(c) for c in self.candidates]}


def parse_split(split: float | str) -> float | None:
    if split == "auto":
        return None
    try:
        value = float(split)
    except (TypeError, ValueError) as exc:
        raise LayerfoldError(f"--split must be 'auto' or a number in [0, 1], got '{split}'") from exc
    if not 0 <= value <= 1:
        raise LayerfoldError(f"--split must be 'auto' or a number in [0, 1], got {value}")
    return value


def _prune_at_split(loaded, param_ratio: float, split: float, method: str, calibration, tokens: torch.Tensor,
                    heldout: torch.Tensor | None, options: dict | None, width_options: dict, progress: bool):
    """Depth then width on ``loaded`` in place; returns (depth PlanResult or None, WidthPlan or None)."""
    total = parameter_count(loaded.model)
    depth = None
    if split > 0:
        depth = make_plan(loaded, method, Target(param_ratio=split * param_ratio), calibration, options, progress,
                          tokens=tokens)
        apply_plan(loaded.model, depth.plan, depth.overrides)
    remaining = round(param_ratio * total) - (total - parameter_count(loaded.model))
    width = None
    if split < 1 and remaining > 0:
        width = shrink(loaded, params=remaining, tokens=tokens, heldout_tokens=heldout, progress=progress,
                       **width_options)
        if calibration is not None:
            width.calibration = {**calibration.describe(), **width.calibration}
    return depth, width


def depth_width_prune(loaded, param_ratio: float, split: float | str = "auto", method: str = "slm",
                      calibration=None, options: dict | None = None, *, importance: str = "wanda-sp",
                      attention: str = "auto", heads: int | None = None, multiple_of: int = 8,
                      splits: Sequence[float] = AUTO_SPLITS, held_out: int = 16, tokens: torch.Tensor | None = None,
                      heldout_tokens: torch.Tensor | None = None, progress: bool = True,
                      on_candidate: Callable | None = None) -> DepthWidthResult:
    """Remove ``param_ratio`` of all parameters: the share ``split`` of them by depth (planned by
    ``method`` with ``Target(param_ratio=split * param_ratio)`` and applied), the rest by width.

    Depth removes whole layers (rounded up by the target), so width takes what is left;
    ``split="auto"`` prunes a copy of the model at each of ``splits`` and keeps the one with
    the lowest loss on held-out calibration windows (never on an evaluation set).
    ``on_candidate(candidate, loaded_copy)`` is called for each pruned candidate before it is
    compared (benchmarks use it to evaluate every split).
    """
    loaded = as_loaded(loaded)
    if not 0 < param_ratio < 1:
        raise LayerfoldError(f"--param-ratio must be between 0 and 1 (exclusive), got {param_ratio}")
    fixed = parse_split(split)
    Layout.of(loaded.arch)  # fail early on an unsupported architecture
    calibration = calibration or CalibrationConfig()
    tokens = calibration_tokens(loaded.tokenizer, calibration, tokens)
    width_options = {"importance": importance, "attention": attention, "heads": heads, "multiple_of": multiple_of,
                     "batch_size": calibration.batch_size}
    layers_before = len(loaded.arch.layer_list(loaded.model))
    params_before = parameter_count(loaded.model)
    candidates: list[SplitCandidate] = []
    if heldout_tokens is None and loaded.tokenizer is not None and (fixed is None or attention == "auto"):
        heldout_tokens = held_out_windows(loaded.tokenizer, calibration, held_out)
    if fixed is not None:
        depth, width = _prune_at_split(loaded, param_ratio, fixed, method, calibration, tokens, heldout_tokens,
                                       options, width_options, progress)
        chosen = fixed
    else:
        if heldout_tokens is None:
            raise LayerfoldError("split='auto' needs held-out tokens: pass heldout_tokens= or a tokenizer")
        best = None
        for s in (parse_split(v) for v in splits):
            trial = replace(loaded, model=copy.deepcopy(loaded.model))
            cand = SplitCandidate(split=s)
            candidates.append(cand)
            try:
                depth, width = _prune_at_split(trial, param_ratio, s, method, calibration, tokens, heldout_tokens,
                                               options, width_options, progress)
            except LayerfoldError as exc:
                cand.error = str(exc)
                continue
            cand.layers = len(trial.arch.layer_list(trial.model))
            cand.params = parameter_count(trial.model)
            if depth is not None:
                cand.depth_plan = depth.plan.summary()
                cand.depth_options = depth.plan.provenance.get("options")
            if width is not None:
                cand.width, cand.attention = width.after, width.attention
                cand.attention_search = width.target.get("attention_search")
            cand.heldout_nll = perplexity_of_windows(trial.model, heldout_tokens, bos=False,
                                                     batch_size=calibration.batch_size, progress=False)[0]
            if on_candidate is not None:
                on_candidate(cand, trial)
            if best is None or cand.heldout_nll < best[0]:
                best = (cand.heldout_nll, s, trial, depth, width)
            del trial
        if best is None:
            raise LayerfoldError(f"no split could reach --param-ratio {param_ratio}: {candidates[-1].error}")
        _, chosen, trial, depth, width = best
        loaded.model = trial.model
    return DepthWidthResult(loaded=loaded, param_ratio=param_ratio, split=chosen, depth=depth, width=width,
                            layers_before=layers_before, layers_after=len(loaded.arch.layer_list(loaded.model)),
                            params_before=params_before, params_after=parameter_count(loaded.model),
                            candidates=candidates)
