"""Planning one model with one method: the calibration run, streaming and provenance around
:meth:`Method.plan`."""

from __future__ import annotations

import time

import torch

from layerfold.data.tokens import CalibrationConfig
from layerfold.methods.base import PlanContext, Target, make_method
from layerfold.models.fingerprint import model_fingerprint
from layerfold.models.load import LoadedModel, as_loaded
from layerfold.plan import PlanResult
from layerfold.streaming import streaming_for


def make_plan(model: LoadedModel | str | None = None, method: str = "slm", target: Target | None = None,
              calibration: CalibrationConfig | None = None, options: dict | None = None,
              progress: bool = True, tokens: torch.Tensor | None = None, max_gpu_memory: str | int | None = None,
              compute_device: str | torch.device | None = None) -> PlanResult:
    """Decide what to cut without changing the model (a dry run).

    ``max_gpu_memory`` (``"8GiB"``, ``"8GB"``, ``"8000MiB"`` or bytes) streams the model: its
    weights stay in CPU memory and each decoder layer visits ``compute_device`` (default: the
    current CUDA device) only while it runs (:mod:`layerfold.streaming`); the plan is the same."""
    loaded = as_loaded(model)
    planner = make_method(method, options)
    calibration = calibration or CalibrationConfig()
    with streaming_for(loaded, max_gpu_memory, compute_device, calibration, tokens) as streamer:
        ctx = PlanContext(loaded=loaded, calibration=calibration, target=target or Target(),
                          progress=progress, tokens_override=tokens, streamer=streamer)
        start = time.perf_counter()
        result = planner.plan(ctx)
        result.plan.provenance["planning_seconds"] = round(time.perf_counter() - start, 3)
    result.plan.provenance["options"] = planner.model_dump()
    result.plan.fingerprint = model_fingerprint(loaded.model)  # apply_plan checks the plan meets this model
    if streamer is not None:
        result.plan.provenance["streaming"] = streamer.describe()
    return result
