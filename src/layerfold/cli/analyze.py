"""``layerfold analyze``: layer x layer similarity matrices and heatmaps of a model's layers."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from layerfold.cli.options import Calibration, ModelArg, Placement, with_groups
from layerfold.output import check_out

DEFAULT_MEASURES = "cka-linear,cka-rbf,cosine,angular"


@with_groups(calibration=Calibration, placement=Placement)
def analyze_cmd(
    model: ModelArg = None,
    out: Annotated[Path, typer.Option(help="Output folder for analysis.json, <measure>.csv and .png.")] = ...,
    plan: Annotated[Path | None, typer.Option(help="A plan.json whose windows are outlined on the heatmaps.")] = None,
    measures: Annotated[str, typer.Option(help="Comma-separated: cka-linear, cka-rbf, cosine, "
                                               "angular.")] = DEFAULT_MEASURES,
    *,
    calibration: Calibration,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    placement: Placement,
) -> None:
    """Similarity between every pair of layer outputs on calibration text, per measure: JSON, CSV and
    heatmaps (bright squares on the diagonal are runs of similar layers, candidates for folding)."""
    from layerfold import api
    from layerfold.report.analysis import resolve_measures

    kinds = resolve_measures(measures)  # fail before loading anything
    check_out(out, overwrite)
    calib = calibration.config()
    load_kw, stream_kw = placement.resolve()
    api.preflight(model, plan=plan, calibration=calib)
    loaded = api.load_model(model, **load_kw)
    result = api.analyze(loaded, out, measures=kinds, calibration=calib, plan=plan, overwrite=overwrite, **stream_kw)
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
