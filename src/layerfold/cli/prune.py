"""``layerfold prune``: plan (or read a plan), apply it, save a plain Hugging Face folder."""

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
    check_out,
    placement,
    planning,
    print_split,
    split_list,
)
from layerfold.errors import LayerfoldError


def register(app: typer.Typer) -> None:
    app.command()(prune)


def prune(
    model: ModelArg = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: layerfold-out/<model>-<method>).")] = None,
    method: Method = "slm",
    threshold: Threshold = None,
    target_layers: TargetLayers = None,
    ratio: Ratio = None,
    param_ratio: ParamRatio = None,
    criterion: Criterion = None,
    merge: Merge = None,
    norms: Norms = None,
    set_: SetOpt = None,
    plan: Annotated[Path | None, typer.Option(help="Apply a saved plan.json instead of planning.")] = None,
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
    calib_source: CalibSource = "books",
    calib_samples: CalibSamples = 10,
    calib_seq_len: CalibSeqLen = 128,
    seed: Seed = 1234,
    calib_sampling: Sampling = "random",
    ppl: Annotated[str, typer.Option(
        help="Perplexity before and after, comma-separated sources ('' for none).")] = "ptb",
    ppl_windows: Annotated[int, typer.Option(help="128-token windows per perplexity source.")] = 40,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output folder.")] = False,
    dtype: Dtype = "float32",
    device: Device = "cpu",
    max_gpu_memory: MaxGpuMemory = None,
    device_map: DeviceMap = None,
) -> None:
    """Prune a model and save it as a plain Hugging Face folder (with plan.json and a model card);
    with --width or --split, width pruning too, in the same folder."""
    from layerfold import api

    target, options, calib = planning(method, threshold, target_layers, ratio, param_ratio, criterion, merge,
                                       norms, set_, calib_source, calib_samples, calib_seq_len, seed, calib_sampling)
    if plan is not None and not plan.is_file():
        raise LayerfoldError(f"plan file {plan} does not exist")
    from layerfold.width import WidthRequest, check_width_support

    widths = WidthRequest.from_options(width, split, width_plan, importance=importance, attention=attention,
                                       heads=heads, multiple_of=multiple_of, held_out=held_out)
    if widths is not None:
        widths.check_depth(target, plan, options)
    check_out(out, overwrite)
    load_kw, stream_kw = placement(device, max_gpu_memory, device_map)
    api.check_width_with_cap(widths, max_gpu_memory)
    loaded = api.load_model(model, dtype=dtype, **load_kw)
    if widths is not None:
        check_width_support(loaded)
    if out is None:
        out = Path("layerfold-out") / f"{Path(loaded.source).name}-{method}{'-width' if widths else ''}"
        check_out(out, overwrite)
    report = api.prune(loaded, out, method=method, target=target, calibration=calib, options=options,
                       plan=plan, overwrite=overwrite, ppl=split_list(ppl), ppl_windows=ppl_windows, width=widths,
                       **stream_kw)
    _print_report(report)



def _print_report(report) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if report.plan is not None:
        console.print(report.plan.summary())
    if getattr(report, "width", None) is not None:
        console.print(report.width.summary())
    if getattr(report, "depth_width", None):
        print_split(console, report.depth_width)
    table = Table(show_header=True)
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("decoder layers", str(report.layers_before), str(report.layers_after))
    table.add_row("parameters", f"{report.params_before:,}", f"{report.params_after:,}")
    for source, value in report.perplexity_before.items():
        table.add_row(f"{source} perplexity (128 tok)", f"{value:.2f}", f"{report.perplexity_after[source]:.2f}")
    console.print(table)
    if report.out is not None:
        console.print(f"saved to {report.out}  ({report.seconds:.1f} s)")
