"""``layerfold analyze``: layer x layer similarity matrices and heatmaps of a model's layers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from layerfold.cli.options import (
    CalibSamples,
    CalibSeqLen,
    CalibSource,
    Device,
    DeviceMap,
    Dtype,
    MaxGpuMemory,
    ModelArg,
    Sampling,
    Seed,
    placement,
)

DEFAULT_MEASURES = "cka-linear,cka-rbf,cosine,angular"


def analyze_cmd(
    model: ModelArg = None,
    out: Annotated[Path, typer.Option(help="Output folder for analysis.json, <measure>.csv and .png.")] = ...,
    plan: Annotated[Path | None, typer.Option(help="A plan.json whose windows are outlined on the heatmaps.")] = None,
    measures: Annotated[str, typer.Option(help="Comma-separated: cka-linear, cka-rbf, cosine, "
                                               "angular.")] = DEFAULT_MEASURES,
    calib_source: CalibSource = "books",
    calib_samples: CalibSamples = 10,
    calib_seq_len: CalibSeqLen = 128,
    seed: Seed = 1234,
    calib_sampling: Sampling = "random",
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    max_gpu_memory: MaxGpuMemory = None,
    device_map: DeviceMap = None,
) -> None:
    """Similarity between every pair of layer outputs on calibration text, per measure: JSON, CSV and
    heatmaps (bright squares on the diagonal are runs of similar layers, candidates for folding)."""
    from layerfold.data.tokens import CalibrationConfig
    from layerfold.errors import LayerfoldError
    from layerfold.models.load import load_model
    from layerfold.report.analysis import analyze, resolve_measures

    kinds = resolve_measures(measures)  # fail before loading anything
    if out.exists() and not overwrite:
        raise LayerfoldError(f"output folder {out} exists: choose another --out or pass --overwrite")
    calib = CalibrationConfig(source=calib_source, samples=calib_samples, seq_len=calib_seq_len, seed=seed,
                              sampling=calib_sampling)
    load_kw, stream_kw = placement(device, max_gpu_memory, device_map)
    loaded = load_model(model, dtype=dtype, **load_kw)
    result = analyze(loaded, out, measures=kinds, calibration=calib, plan=plan, overwrite=overwrite, **stream_kw)
    _print_summary(result)


def _print_summary(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("measure", "most similar adjacent layers", "least similar adjacent", "seconds")
    for kind, entry in result["measures"].items():
        adjacent = entry["adjacent"]
        order = sorted(range(len(adjacent)), key=lambda i: adjacent[i], reverse=True)
        best = ", ".join(f"{i}-{i + 1} {adjacent[i]:.3f}" for i in order[:3])
        worst = ", ".join(f"{i}-{i + 1} {adjacent[i]:.3f}" for i in order[-2:][::-1])
        table.add_row(kind, best, worst, f"{result['seconds'].get(kind, 0.0):.1f}")
    console = Console()
    console.print(f"{result['model']}: {result['num_layers']} layers, {result['tokens']} calibration tokens")
    console.print(table)
    console.print(f"written to {result['out']}: {', '.join(result['files'])}  ({result['seconds']['total']:.1f} s)")


def register(app: typer.Typer) -> None:
    app.command("analyze")(analyze_cmd)
