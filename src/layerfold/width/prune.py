"""The one path from a width request to a saved folder: ``layerfold shrink``, ``layerfold prune
--width/--split/--width-plan`` and ``api.prune(width=...)`` all come here."""

from __future__ import annotations

import time
from pathlib import Path

from layerfold.data.tokens import CalibrationConfig
from layerfold.errors import LayerfoldError
from layerfold.evaluate.perplexity import bos_by_default, perplexities
from layerfold.methods.planning import make_plan
from layerfold.models.arch import parameter_count
from layerfold.models.load import LoadedModel, as_loaded
from layerfold.output import PruneReport, check_out, command_line
from layerfold.plan import PlanResult, load_plan
from layerfold.surgery import apply_plan
from layerfold.width.apply import apply_width
from layerfold.width.plan import WidthPlan
from layerfold.width.planning import shrink
from layerfold.width.request import WidthRequest, check_width_support
from layerfold.width.save import save_shrunk
from layerfold.width.split import depth_width_prune


def prune_with_width(loaded: LoadedModel | str | None, out: str | Path | None, request: WidthRequest, *,
                     method: str | None = "slm", target=None, calibration: CalibrationConfig | None = None,
                     options: dict | None = None, plan=None, overwrite: bool = False, ppl: tuple[str, ...] = (),
                     ppl_windows: int | None = 40, progress: bool = True, command: str | None = None) -> PruneReport:
    """Depth then width on ``loaded`` (a LoadedModel, hub id or folder) in place, saved as ONE
    plain Hugging Face folder (with ``plan.json`` when depth removed layers, ``width_plan.json``,
    ``shrink.json`` and a model card); returns a :class:`layerfold.output.PruneReport`.

    The depth step is ``plan`` (a saved plan or a :class:`PlanResult`) or ``method`` planned
    for ``target``; ``method=None`` without ``plan`` means width alone (``layerfold shrink
    --width`` or ``--plan``).  With ``request.split`` depth and width share
    ``target.param_ratio`` (:func:`depth_width_prune`)."""
    if request.split is not None and method is None:
        raise LayerfoldError("--split shares --param-ratio between a depth method and width: give the method")
    request.check_depth(target, plan, options)
    check_out(out, overwrite)
    loaded = as_loaded(loaded)
    check_width_support(loaded)
    calibration = calibration or CalibrationConfig()
    start = time.perf_counter()
    layers_before, params_before = len(loaded.arch.layer_list(loaded.model)), parameter_count(loaded.model)
    before = perplexities(loaded, ppl, ppl_windows, progress, remember=True)
    summary = None
    if request.split is not None:
        result = depth_width_prune(loaded, target.param_ratio, request.split, method, calibration, options,
                                   held_out=request.held_out, progress=progress, **request.width_options())
        depth, wplan, summary = result.depth, result.width, result.summary()
    else:
        depth = _depth_step(loaded, method, target, calibration, options, plan, progress)
        wplan = _width_step(loaded, request, calibration, progress)
    after = perplexities(loaded, ppl, ppl_windows, progress)
    report = PruneReport(plan=depth.plan if depth is not None else None, out=None, layers_before=layers_before,
                         layers_after=len(loaded.arch.layer_list(loaded.model)), params_before=params_before,
                         params_after=parameter_count(loaded.model), perplexity_before=before,
                         perplexity_after=after, seconds=time.perf_counter() - start, ppl_windows=ppl_windows,
                         ppl_bos=bos_by_default(loaded.tokenizer), width=wplan, depth_width=summary)
    if out is not None:
        report.out = save_shrunk(loaded, out, report, depth, command=command or command_line(), overwrite=overwrite)
    return report


def _depth_step(loaded, method: str | None, target, calibration: CalibrationConfig, options: dict | None, plan,
                progress: bool) -> PlanResult | None:
    """The depth plan (saved, given, or made by ``method``), applied; None for width alone."""
    if plan is None and method is None:
        return None
    depth = (plan if isinstance(plan, PlanResult) else load_plan(plan) if plan is not None
             else make_plan(loaded, method, target, calibration, options, progress))
    apply_plan(loaded.model, depth.plan, depth.overrides)
    return depth


def _width_step(loaded, request: WidthRequest, calibration: CalibrationConfig, progress: bool) -> WidthPlan:
    """A saved width plan applied, or one made for ``request.ratio`` and applied."""
    if request.plan is not None:
        wplan = WidthPlan.load(request.plan)
        apply_width(loaded.model, wplan)
        wplan.params_after = parameter_count(loaded.model)
        return wplan
    return shrink(loaded, request.ratio, calibration=calibration, held_out=request.held_out,
                  batch_size=calibration.batch_size, progress=progress, **request.width_options())
