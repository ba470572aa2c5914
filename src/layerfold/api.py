"""The Python entry points: load, plan, apply, prune, evaluate."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from layerfold.data.tokens import CalibrationConfig
from layerfold.errors import LayerfoldError
from layerfold.evaluate.perplexity import bos_by_default, perplexities
from layerfold.methods.base import Target
from layerfold.methods.planning import make_plan
from layerfold.models.arch import parameter_count
from layerfold.models.load import LoadedModel, as_loaded, load_model
from layerfold.output import SHARD_SIZE, PruneReport, check_out, command_line, model_card, save_model
from layerfold.plan import Plan, PlanResult, load_plan, save_plan
from layerfold.surgery import apply_plan as _apply_plan

__all__ = ["LoadedModel", "PlanResult", "PruneReport", "analyze", "apply_plan", "evaluate", "heal", "load_model",
           "load_plan", "make_plan", "preflight", "prune", "save_plan"]


def heal(*args, **kwargs):
    """LoRA healing or distillation of a pruned model; see :func:`layerfold.recover.heal`."""
    from layerfold.recover import heal as _heal

    return _heal(*args, **kwargs)


def analyze(*args, **kwargs):
    """Layer x layer similarity matrices and heatmaps; see :func:`layerfold.report.analysis.analyze`."""
    from layerfold.report.analysis import analyze as _analyze

    return _analyze(*args, **kwargs)


def preflight(model: LoadedModel | torch.nn.Module | str | None = None, *, target: Target | None = None,
              plan: str | Path | Plan | PlanResult | None = None, calibration: CalibrationConfig | None = None,
              ppl: tuple[str, ...] = (), force: bool = False) -> Plan | None:
    """Check what needs no weights, before any model is loaded, so that a mistake costs no loading
    time: the texts (calibration, perplexity), a saved plan file (against the model's config.json:
    layer count and, unless ``force``, shape) and the target against the layer count in config.json.
    Returns the saved plan, if one is given."""
    from layerfold.data.sources import load_text
    from layerfold.data.tokens import check_calibration_source
    from layerfold.plan import check_plan_file

    if calibration is not None:
        check_calibration_source(calibration)
    for source in ppl:
        load_text(source)  # cached: perplexity reads the text from the cache
    named = not isinstance(model, LoadedModel | torch.nn.Module)
    if isinstance(plan, PlanResult):
        plan = plan.plan
    elif plan is not None:  # a loaded model is checked against the plan when the plan is applied
        plan = check_plan_file(plan, model, force) if named else Plan.load(plan)
    if target is not None and target.param_ratio is None:  # a share of the parameters needs the weights
        layers = _layers_in_config(model)
        if layers is not None:
            target.layers_to_remove(None, layers, layer_params=0)
    return plan


def _layers_in_config(model: LoadedModel | torch.nn.Module | str | None) -> int | None:
    """The decoder layer count, from the model's config.json when it is not loaded yet (None for
    an unusable config, which :func:`load_model` then reports in its own words)."""
    from transformers import AutoConfig

    from layerfold.models.arch import architecture_for
    from layerfold.models.load import resolve_source

    if isinstance(model, LoadedModel):
        return len(model.arch.layer_list(model.model))
    if isinstance(model, torch.nn.Module):
        return architecture_for(model.config).num_layers(model.config)
    _, path = resolve_source(model)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError):
        return None
    return architecture_for(config).num_layers(config)


def apply_plan(model: LoadedModel | torch.nn.Module, plan: Plan | PlanResult,
               overrides: dict | None = None, force: bool = False) -> torch.nn.Module:
    """Prune the model in place following the plan; a plan made for another model is refused
    unless ``force``."""
    if isinstance(plan, PlanResult):
        plan, overrides = plan.plan, plan.overrides
    module = model.model if isinstance(model, LoadedModel) else model
    return _apply_plan(module, plan, overrides, force=force)


def prune(model: LoadedModel | str | None = None, out: str | Path | None = None, method: str = "slm",
          target: Target | None = None, calibration: CalibrationConfig | None = None,
          options: dict | None = None, plan: str | Path | PlanResult | None = None, overwrite: bool = False,
          ppl: tuple[str, ...] = (), ppl_windows: int | None = 16, progress: bool = True,
          command: str | None = None, width=None, max_gpu_memory: str | int | None = None,
          compute_device: str | torch.device | None = None, max_shard_size: str | int = SHARD_SIZE,
          force: bool = False) -> PruneReport:
    """Plan (or read a saved plan), apply it, and save the pruned model with its plan and card.

    ``max_gpu_memory`` streams the model's layers through the GPU for planning and perplexity
    (see :func:`make_plan`); the surgery runs on the CPU weights, and the model is written in
    safetensors shards of at most ``max_shard_size``.

    ``width`` (a :class:`layerfold.width.WidthRequest`) adds width pruning after the depth step,
    or shares ``target.param_ratio`` between depth and width; see
    :func:`layerfold.width.prune_with_width`.

    A saved ``plan`` made for another model (its recorded fingerprint differs) is refused unless
    ``force``."""
    check_width_request(width, max_gpu_memory, force)
    check_out(out, overwrite)
    if not isinstance(model, LoadedModel | torch.nn.Module):
        preflight(model, target=None if plan is not None else target, plan=plan,
                  calibration=calibration if plan is None or width is not None else None, ppl=ppl, force=force)
    if max_gpu_memory is not None:  # a bad size or a missing GPU fails before any work
        from layerfold.streaming import parse_memory, resolve_compute_device

        parse_memory(max_gpu_memory)
        compute_device = resolve_compute_device(compute_device)
    loaded = as_loaded(model)
    if width is not None:
        from layerfold.width import prune_with_width

        return prune_with_width(loaded, out, width, method=method, target=target, calibration=calibration,
                                options=options, plan=plan, overwrite=overwrite, ppl=ppl, ppl_windows=ppl_windows,
                                progress=progress, command=command)
    start = time.perf_counter()
    layers_before = len(loaded.arch.layer_list(loaded.model))
    params_before = parameter_count(loaded.model)
    before = perplexities(loaded, ppl, ppl_windows, progress, max_gpu_memory, compute_device, remember=True)
    if plan is None:
        result = make_plan(loaded, method, target, calibration, options, progress, max_gpu_memory=max_gpu_memory,
                           compute_device=compute_device)
    elif isinstance(plan, PlanResult):
        result = plan
    else:
        result = load_plan(plan)
    apply_plan(loaded, result, force=force)
    after = perplexities(loaded, ppl, ppl_windows, progress, max_gpu_memory, compute_device)
    report = PruneReport(plan=result.plan, out=None, layers_before=layers_before,
                         layers_after=len(loaded.arch.layer_list(loaded.model)), params_before=params_before,
                         params_after=parameter_count(loaded.model), perplexity_before=before,
                         perplexity_after=after, seconds=time.perf_counter() - start, ppl_windows=ppl_windows,
                         ppl_bos=bos_by_default(loaded.tokenizer))
    if out is not None:
        extra = {"plan.json": result.plan.to_json() + "\n",
                 "README.md": model_card(report, loaded, command or command_line())}
        report.out = save_model(loaded.model, loaded.tokenizer, out, overwrite=overwrite, extra_files=extra,
                                write_extra=lambda folder: save_plan(result, folder / "plan.json"),
                                max_shard_size=max_shard_size, layers=loaded.arch.layer_list(loaded.model))
    return report


def check_width_request(width, max_gpu_memory, force: bool = False) -> None:
    """Width pruning does not stream yet, nor apply a plan made for another model: refuse those
    together, before any work."""
    if width is not None and max_gpu_memory is not None:
        raise LayerfoldError("--width cannot be combined with --max-gpu-memory yet: prune the depth with the cap, "
                             "then shrink the result")
    if width is not None and force:
        raise LayerfoldError("--force cannot be combined with width pruning yet: prune the depth with --plan "
                             "--force, then shrink the result")


def evaluate(model: LoadedModel | str | None = None, ppl: tuple[str, ...] | None = None, seq_len: int = 128,
             bos: bool | None = None, batch_size: int = 8, max_windows: int | None = None, progress: bool = True,
             tasks: str | tuple[str, ...] | list[str] | None = None, limit: int | None = None,
             hub: bool = False) -> dict:
    """Perplexity on each source and zero-shot accuracy on ``tasks``; a JSON-ready dict with the protocols.

    ``ppl`` defaults to PTB when no zero-shot task is asked for, else to none.  ``bos=None`` puts BOS
    first in each perplexity window where the tokenizer puts BOS in front of every text.  ``tasks`` takes
    task or group names (``"zeroshot7"``, ``"boolq,piqa"``), scored through
    lm-evaluation-harness (offline unless ``hub``); ``limit`` keeps the first N documents of
    each task; ``batch_size`` serves both perplexity windows and harness requests.
    """
    from layerfold.evaluate.perplexity import perplexity

    if tasks:
        from layerfold.evaluate.zeroshot import resolve_tasks

        resolve_tasks(tasks)  # fail on a bad name before any work
    if ppl is None:
        ppl = () if tasks else ("ptb",)
    loaded = as_loaded(model)
    results = {}
    for source in ppl:
        results[source] = perplexity(loaded.model, loaded.tokenizer, source, seq_len=seq_len, bos=bos,
                                     batch_size=batch_size, max_windows=max_windows, progress=progress).to_dict()
    layers = len(loaded.arch.layer_list(loaded.model))
    report = {"model": loaded.source, "layers": layers, "parameters": parameter_count(loaded.model),
              "perplexity": results}
    if tasks:
        from layerfold.evaluate.zeroshot import evaluate_zeroshot

        describe = {"model": loaded.source, "layers": layers, "parameters": report["parameters"]}
        report["zeroshot"] = evaluate_zeroshot(loaded.model, loaded.tokenizer, tasks, limit=limit,
                                               batch_size=batch_size, hub=hub, describe=describe,
                                               progress=progress)
    return report
