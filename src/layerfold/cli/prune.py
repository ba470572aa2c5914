"""``layerfold prune``: plan (or read a plan), apply it, save a plain Hugging Face folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from layerfold.cli.options import (
    Calibration,
    ModelArg,
    Placement,
    Planning,
    print_report,
    refuse_beside_plan,
    split_list,
    with_groups,
)
from layerfold.errors import LayerfoldError
from layerfold.output import check_out


def register(app: typer.Typer) -> None:
    app.command()(prune)


@with_groups(planning=Planning, calibration=Calibration, placement=Placement)
def prune(
    model: ModelArg = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: layerfold-out/<model>-<method>).")] = None,
    *,
    planning: Planning,
    plan: Annotated[Path | None, typer.Option(help="Apply a saved plan.json instead of planning.")] = None,
    force: Annotated[bool, typer.Option(
        help="Apply a --plan made for another model (its recorded fingerprint differs) all the same.")] = False,
    width: Annotated[float | None, typer.Option(
        help="Then width-prune: share of every remaining decoder layer's attention and MLP projection "
             "parameters to remove (as `layerfold shrink --width`).")] = None,
    split: Annotated[str | None, typer.Option(
        help="Depth plus width under one --param-ratio: share of the removed parameters taken by depth "
             "(0..1), or auto (tries 0, 0.25, 0.5, 0.75, 1 on held-out calibration loss).")] = None,
    width_plan: Annotated[Path | None, typer.Option(
        "--width-plan", help="Apply a saved width_plan.json after the depth step.")] = None,
    importance: Annotated[str | None, typer.Option(
        help="Width: wanda-sp (default), flap or taylor, as `layerfold shrink`.")] = None,
    attention: Annotated[str | None, typer.Option(
        help="Width: auto (default), groups, query-heads or off, as `layerfold shrink`.")] = None,
    heads: Annotated[int | None, typer.Option(
        help="Width: attention units removed per layer (with --attention groups or query-heads).")] = None,
    multiple_of: Annotated[int | None, typer.Option(
        help="Width: round the kept MLP width to a multiple of this (default 8).")] = None,
    held_out: Annotated[int | None, typer.Option(
        help="Width: held-out calibration windows that pick --split auto and --attention auto (default 16).")] = None,
    calibration: Calibration,
    ppl: Annotated[str, typer.Option(
        help="Perplexity before and after, comma-separated sources ('' for none); the unpruned model's figure is "
             "remembered in layerfold's cache for its weights.")] = "ptb",
    ppl_windows: Annotated[int, typer.Option(
        help="128-token windows per perplexity source (the check before and after; layerfold eval: full texts).")] = 16,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    placement: Placement,
) -> None:
    """Prune a model and save it as a plain Hugging Face folder (with plan.json and a model card);
    with --width or --split, width pruning too, in the same folder."""
    from layerfold import api
    from layerfold.width import WidthRequest, check_width_support

    widths = WidthRequest.from_options(width, split, width_plan, importance=importance, attention=attention,
                                       heads=heads, multiple_of=multiple_of, held_out=held_out)
    if plan is not None:  # calibration still serves width pruning after the saved depth plan
        refuse_beside_plan(planning, *(() if widths is not None else (calibration,)))
    elif force:
        raise LayerfoldError("--force applies a --plan made for another model: it needs --plan")
    method, target, options = planning.resolve()
    calib = calibration.config()
    if widths is not None:
        widths.check_depth(target, plan, options)
    check_out(out, overwrite)
    load_kw, stream_kw = placement.resolve()
    api.check_width_request(widths, placement.max_gpu_memory, force)
    saved = api.preflight(model, target=None if plan is not None else target, plan=plan,
                          calibration=calib if plan is None or widths is not None else None, ppl=split_list(ppl),
                          force=force)
    loaded = api.load_model(model, **load_kw)
    if widths is not None:
        check_width_support(loaded)
    if out is None:
        named = saved.method if saved is not None else method
        out = Path("layerfold-out") / f"{Path(loaded.source).name}-{named}{'-width' if widths else ''}"
        check_out(out, overwrite)
    report = api.prune(loaded, out, method=method, target=target, calibration=calib, options=options,
                       plan=plan, overwrite=overwrite, ppl=split_list(ppl), ppl_windows=ppl_windows, width=widths,
                       force=force, **stream_kw)
    print_report(report)
