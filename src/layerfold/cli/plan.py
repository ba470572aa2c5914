"""``layerfold plan``: decide what to cut and write the plan as JSON (a dry run)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from layerfold.cli.options import Calibration, ModelArg, Placement, Planning, with_groups
from layerfold.output import check_out


def register(app: typer.Typer) -> None:
    app.command("plan")(plan_cmd)


@with_groups(planning=Planning, calibration=Calibration, placement=Placement)
def plan_cmd(
    model: ModelArg = None,
    out: Annotated[Path, typer.Option(help="Where to write the plan JSON.")] = Path("plan.json"),
    *,
    planning: Planning,
    calibration: Calibration,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing plan file.")] = False,
    placement: Placement,
) -> None:
    """Decide what to cut and write the plan as JSON, without changing the model (a dry run)."""
    from layerfold import api

    if not overwrite:  # replacing one file needs none of the rules for replacing a folder
        check_out(out, overwrite, what="plan file")
    method, target, options = planning.resolve()
    calib = calibration.config()
    load_kw, stream_kw = placement.resolve()
    api.preflight(model, target=target, calibration=calib)
    loaded = api.load_model(model, **load_kw)
    result = api.make_plan(loaded, method=method, target=target, calibration=calib, options=options, **stream_kw)
    api.save_plan(result, out)
    typer.echo(result.plan.summary())
    typer.echo(f"plan written to {out}")
