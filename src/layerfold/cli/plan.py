"""``layerfold plan``: decide what to cut and write the plan as JSON (a dry run)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from layerfold.cli.options import (
    CalibSamples,
    CalibSeqLen,
    CalibSource,
    Criterion,
    Device,
    DeviceMap,
    Dtype,
    MaxGpuMemory,
    Merge,
    Method,
    ModelArg,
    Norms,
    ParamRatio,
    Ratio,
    Sampling,
    Seed,
    SetOpt,
    TargetLayers,
    Threshold,
    placement,
    planning,
)
from layerfold.errors import LayerfoldError


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_cmd)


def plan_cmd(
    model: ModelArg = None,
    out: Annotated[Path, typer.Option(help="Where to write the plan JSON.")] = Path("plan.json"),
    method: Method = "slm",
    threshold: Threshold = None,
    target_layers: TargetLayers = None,
    ratio: Ratio = None,
    param_ratio: ParamRatio = None,
    criterion: Criterion = None,
    merge: Merge = None,
    norms: Norms = None,
    set_: SetOpt = None,
    calib_source: CalibSource = "books",
    calib_samples: CalibSamples = 10,
    calib_seq_len: CalibSeqLen = 128,
    seed: Seed = 1234,
    calib_sampling: Sampling = "random",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing plan file.")] = False,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    max_gpu_memory: MaxGpuMemory = None,
    device_map: DeviceMap = None,
) -> None:
    """Decide what to cut and write the plan as JSON, without changing the model (a dry run)."""
    from layerfold import api

    if out.exists() and not overwrite:
        raise LayerfoldError(f"{out} exists: choose another --out or pass --overwrite")
    target, options, calib = planning(method, threshold, target_layers, ratio, param_ratio, criterion, merge,
                                       norms, set_, calib_source, calib_samples, calib_seq_len, seed, calib_sampling)
    load_kw, stream_kw = placement(device, max_gpu_memory, device_map)
    loaded = api.load_model(model, dtype=dtype, **load_kw)
    result = api.make_plan(loaded, method=method, target=target, calibration=calib, options=options, **stream_kw)
    api.save_plan(result, out)
    typer.echo(result.plan.summary())
    typer.echo(f"plan written to {out}")
