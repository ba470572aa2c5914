"""The Python entry points: load, plan, apply, prune, evaluate."""

from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from layerfold.data.tokens import CalibrationConfig
from layerfold.errors import LayerfoldError
from layerfold.methods.base import PlanContext, PlanResult, Target, make_method
from layerfold.models.arch import parameter_count
from layerfold.models.load import LoadedModel, load_model, wrap_model
from layerfold.plan import Plan
from layerfold.surgery import SHARD_SIZE, save_model
from layerfold.surgery import apply_plan as _apply_plan

__all__ = ["LoadedModel", "PruneReport", "analyze", "apply_plan", "evaluate", "heal", "load_model", "make_plan",
           "prune"]


def heal(*args, **kwargs):
    """LoRA healing or distillation of a pruned model; see :func:`layerfold.recover.heal`."""
    from layerfold.recover import heal as _heal

    return _heal(*args, **kwargs)


def analyze(*args, **kwargs):
    """Layer x layer similarity matrices and heatmaps; see :func:`layerfold.report.analysis.analyze`."""
    from layerfold.report.analysis import analyze as _analyze

    return _analyze(*args, **kwargs)

TENSORS_FILE = "plan.tensors.safetensors"


def _as_loaded(model, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, torch.nn.Module):
        return wrap_model(model)
    return load_model(model, dtype=dtype, device=device)


def make_plan(model: LoadedModel | str | None = None, method: str = "slm", target: Target | None = None,
              calibration: CalibrationConfig | None = None, options: dict | None = None,
              progress: bool = True, tokens: torch.Tensor | None = None, max_gpu_memory: str | int | None = None,
              compute_device: str | torch.device | None = None) -> PlanResult:
    """Decide what to cut without changing the model (a dry run).

    ``max_gpu_memory`` (``"8GiB"``, ``"8GB"``, ``"8000MiB"`` or bytes) streams the model: its
    weights stay in CPU memory and each decoder layer visits ``compute_device`` (default: the
    current CUDA device) only while it runs (:mod:`layerfold.streaming`); the plan is the same."""
    loaded = _as_loaded(model)
    planner = make_method(method, options)
    calibration = calibration or CalibrationConfig()
    with streaming_for(loaded, max_gpu_memory, compute_device, calibration, tokens) as streamer:
        ctx = PlanContext(loaded=loaded, calibration=calibration, target=target or Target(),
                          progress=progress, tokens_override=tokens, streamer=streamer)
        start = time.perf_counter()
        result = planner.plan(ctx)
        result.plan.provenance["planning_seconds"] = round(time.perf_counter() - start, 3)
    result.plan.provenance["options"] = planner.model_dump()
    if streamer is not None:
        result.plan.provenance["streaming"] = streamer.describe()
    return result


def streaming_for(loaded: LoadedModel, max_gpu_memory: str | int | None, compute_device=None,
                  calibration: CalibrationConfig | None = None, tokens: torch.Tensor | None = None):
    """Layer streaming for one run over ``loaded`` (a null context without a cap); the budget is
    checked against the calibration batches (``tokens`` if given)."""
    from layerfold.streaming import layer_streaming

    calibration = calibration or CalibrationConfig()
    samples, seq_len = tokens.shape if tokens is not None else (calibration.samples, calibration.seq_len)
    return layer_streaming(loaded.model, loaded.arch, max_gpu_memory, compute_device,
                           batch_size=calibration.batch_size, seq_len=int(seq_len), samples=int(samples))


def apply_plan(model: LoadedModel | torch.nn.Module, plan: Plan | PlanResult,
               overrides: dict | None = None) -> torch.nn.Module:
    """Prune the model in place following the plan."""
    if isinstance(plan, PlanResult):
        plan, overrides = plan.plan, plan.overrides
    module = model.model if isinstance(model, LoadedModel) else model
    return _apply_plan(module, plan, overrides)


def save_plan(result: PlanResult, path: str | Path) -> Path:
    """Write ``plan.json`` (and the fitted fused-layer weights, if any, beside it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    result.plan.save(path)
    if result.overrides:
        from safetensors.torch import save_file

        flat = {f"{lo}/{name}": t.contiguous() for lo, state in result.overrides.items() for name, t in state.items()}
        save_file(flat, str(path.with_name(path.stem + ".tensors.safetensors")))
    return path


def load_plan(path: str | Path) -> PlanResult:
    path = Path(path)
    plan = Plan.load(path)
    tensors = path.with_name(path.stem + ".tensors.safetensors")
    overrides: dict[int, dict[str, torch.Tensor]] = {}
    if tensors.is_file():
        from safetensors.torch import load_file

        for key, t in load_file(str(tensors)).items():
            lo, name = key.split("/", 1)
            overrides.setdefault(int(lo), {})[name] = t
    return PlanResult(plan, overrides)


@dataclass
class PruneReport:
    plan: Plan | None  # the depth plan; None when width alone removed everything (--split picked 0)
    out: Path | None
    layers_before: int
    layers_after: int
    params_before: int
    params_after: int
    perplexity_before: dict[str, float] = field(default_factory=dict)
    perplexity_after: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    ppl_windows: int | None = None
    width: object | None = None  # the WidthPlan, when width pruning took part
    depth_width: dict | None = None  # with --split: the split chosen and every candidate tried


def prune(model: LoadedModel | str | None = None, out: str | Path | None = None, method: str = "slm",
          target: Target | None = None, calibration: CalibrationConfig | None = None,
          options: dict | None = None, plan: str | Path | PlanResult | None = None, overwrite: bool = False,
          ppl: tuple[str, ...] = (), ppl_windows: int | None = 40, progress: bool = True,
          command: str | None = None, width=None, max_gpu_memory: str | int | None = None,
          compute_device: str | torch.device | None = None, max_shard_size: str | int = SHARD_SIZE) -> PruneReport:
    """Plan (or read a saved plan), apply it, and save the pruned model with its plan and card.

    ``max_gpu_memory`` streams the model's layers through the GPU for planning and perplexity
    (see :func:`make_plan`); the surgery runs on the CPU weights, and the model is written in
    safetensors shards of at most ``max_shard_size``.

    ``width`` (a :class:`layerfold.width.WidthRequest`) adds width pruning after the depth step,
    or shares ``target.param_ratio`` between depth and width; see
    :func:`layerfold.width.prune_with_width`."""
    loaded = _as_loaded(model)
    if max_gpu_memory is not None:  # a bad size or a missing GPU fails before any work
        from layerfold.streaming import parse_memory, resolve_compute_device

        check_width_with_cap(width, max_gpu_memory)
        parse_memory(max_gpu_memory)
        compute_device = resolve_compute_device(compute_device)
    if width is not None:
        from layerfold.width import prune_with_width

        return prune_with_width(loaded, out, width, method=method, target=target, calibration=calibration,
                                options=options, plan=plan, overwrite=overwrite, ppl=ppl, ppl_windows=ppl_windows,
                                progress=progress, command=command)
    if out is not None and Path(out).exists() and not overwrite:
        raise LayerfoldError(f"output folder {out} exists: choose another --out or pass --overwrite")
    start = time.perf_counter()
    layers_before = len(loaded.arch.layer_list(loaded.model))
    params_before = parameter_count(loaded.model)
    before = _ppl(loaded, ppl, ppl_windows, progress, max_gpu_memory, compute_device)
    if plan is None:
        result = make_plan(loaded, method, target, calibration, options, progress, max_gpu_memory=max_gpu_memory,
                           compute_device=compute_device)
    elif isinstance(plan, PlanResult):
        result = plan
    else:
        result = load_plan(plan)
    apply_plan(loaded, result)
    after = _ppl(loaded, ppl, ppl_windows, progress, max_gpu_memory, compute_device)
    report = PruneReport(plan=result.plan, out=None, layers_before=layers_before,
                         layers_after=len(loaded.arch.layer_list(loaded.model)), params_before=params_before,
                         params_after=parameter_count(loaded.model), perplexity_before=before,
                         perplexity_after=after, seconds=time.perf_counter() - start, ppl_windows=ppl_windows)
    if out is not None:
        extra = {"plan.json": result.plan.to_json() + "\n",
                 "README.md": model_card(report, loaded, command or _command_line())}
        report.out = save_model(loaded.model, loaded.tokenizer, out, overwrite=overwrite, extra_files=extra,
                                write_extra=lambda folder: save_plan(result, folder / "plan.json"),
                                max_shard_size=max_shard_size)
    return report


def check_width_with_cap(width, max_gpu_memory) -> None:
    """Width pruning does not stream yet: refuse the two together, before any work."""
    if width is not None and max_gpu_memory is not None:
        raise LayerfoldError("--width cannot be combined with --max-gpu-memory yet: prune the depth with the cap, "
                             "then shrink the result")


def _ppl(loaded: LoadedModel, sources: tuple[str, ...], windows: int | None, progress: bool,
         max_gpu_memory: str | int | None = None, compute_device=None) -> dict[str, float]:
    from layerfold.evaluate.perplexity import perplexity

    if not sources:
        return {}
    with streaming_for(loaded, max_gpu_memory, compute_device, CalibrationConfig(samples=8)):
        return {s: perplexity(loaded.model, loaded.tokenizer, s, max_windows=windows, progress=progress).perplexity
                for s in sources}


def _command_line() -> str:
    return "layerfold " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def model_card(report: PruneReport, loaded: LoadedModel, command: str) -> str:
    plan = report.plan
    rows = "\n".join(f"| {s} | {before:.2f} | {report.perplexity_after.get(s, float('nan')):.2f} |"
                     for s, before in report.perplexity_before.items())
    windows = "all" if report.ppl_windows is None else f"first {report.ppl_windows}"
    ppl = (f"\n## Perplexity (128-token windows, {windows}, no BOS)\n\n| text | before | after |\n|---|---|---|\n"
           f"{rows}\n") if rows else ""
    return f"""---
library_name: transformers
tags: [layerfold, depth-pruning]
---
# {Path(str(loaded.source)).name} pruned by layerfold ({plan.method})

Made with [layerfold](https://github.com/) from `{loaded.source}`: {report.layers_before} -> {report.layers_after}
decoder layers, {report.params_before:,} -> {report.params_after:,} parameters. Load it with plain transformers:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained("<this folder>")
```

## How it was made

    {command}

{plan.summary()}

Criterion: {plan.criterion or '-'}; threshold: {plan.threshold if plan.threshold is not None else '-'};
merge: {json.dumps(plan.merge) if plan.merge else '-'}; calibration: {json.dumps(plan.calibration)}.
The full plan is in `plan.json`; `layerfold prune {loaded.source} --plan plan.json` applies it again.
{ppl}"""


def evaluate(model: LoadedModel | str | None = None, ppl: tuple[str, ...] | None = None, seq_len: int = 128,
             bos: bool = False, batch_size: int = 8, max_windows: int | None = None, progress: bool = True,
             tasks: str | tuple[str, ...] | list[str] | None = None, limit: int | None = None,
             hub: bool = False) -> dict:
    """Perplexity on each source and zero-shot accuracy on ``tasks``; a JSON-ready dict with the protocols.

    ``ppl`` defaults to PTB when no zero-shot task is asked for, else to none.  ``tasks`` takes
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
    loaded = _as_loaded(model)
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
