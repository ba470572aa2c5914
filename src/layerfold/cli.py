"""The ``layerfold`` command: thin, parses options into typed configs and calls the API."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from layerfold.errors import LayerfoldError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Fold redundant consecutive transformer layers of a causal LM into one.")

ModelArg = Annotated[str | None, typer.Argument(help="Hub id or local folder; default: the embedded SmolLM2-135M.")]
Dtype = Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
MaxGpuMemory = Annotated[str | None, typer.Option(
    "--max-gpu-memory", help="Larger than the GPU: keep the weights in CPU memory and bring one decoder layer at "
                             "a time to the GPU (--device, default cuda), within this much GPU memory: 8GiB, 8GB, "
                             "8000MiB. Activations stay on the CPU; the plan is the same as without the cap.")]
DeviceMap = Annotated[str | None, typer.Option(
    "--device-map", help="Several GPUs: spread the model over them with accelerate (auto, balanced, "
                         "balanced_low_0, sequential); each layer runs on its own GPU. Replaces --device.")]


def _placement(device: str, max_gpu_memory: str | None, device_map: str | None) -> tuple[dict, dict]:
    """(load_model keywords, streaming keywords for the API), checked before anything is loaded."""
    if max_gpu_memory is not None and device_map is not None:
        raise LayerfoldError("give either --max-gpu-memory (stream from the CPU through one GPU) or --device-map "
                             "(spread over GPUs), not both")
    if max_gpu_memory is not None:
        from layerfold.streaming import parse_memory, resolve_compute_device

        parse_memory(max_gpu_memory)
        compute = resolve_compute_device(None if device in ("cpu", "auto") else device)
        return {"device": "cpu"}, {"max_gpu_memory": max_gpu_memory, "compute_device": compute}
    if device_map is not None:
        from layerfold.models.load import resolve_device_map

        return {"device_map": resolve_device_map(device_map)}, {}
    return {"device": device}, {}


def _split(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


def _options(pairs: list[str] | None, **given) -> dict:
    opts = {k: v for k, v in given.items() if v is not None}
    for pair in pairs or []:
        if "=" not in pair:
            raise LayerfoldError(f"--set expects key=value, got '{pair}'")
        key, value = pair.split("=", 1)
        try:
            opts[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            opts[key.replace("-", "_")] = value
    return opts


def _planning(method, threshold, target_layers, ratio, param_ratio, criterion, merge, norms, set_,
              calib_source, calib_samples, calib_seq_len, seed, calib_sampling):
    from layerfold.data.tokens import CalibrationConfig
    from layerfold.methods.base import Target, make_method

    if target_layers is not None and target_layers < 1:
        raise LayerfoldError(f"--target-layers must be at least 1, got {target_layers}")
    target = Target(layers=target_layers, ratio=ratio, param_ratio=param_ratio)
    if not target.given and threshold is None and method == "slm":
        target = Target(ratio=0.2)
    options = _options(set_, threshold=threshold, criterion=criterion, merge=merge, norms=norms)
    make_method(method, options)  # unknown method or option: fail before loading the model
    calib = CalibrationConfig(source=calib_source, samples=calib_samples, seq_len=calib_seq_len, seed=seed,
                              sampling=calib_sampling)
    return target, options, calib


Method = Annotated[str, typer.Option(help="Planner: slm (default), shortgpt, angular, laco, sleb, "
                                          "shortened-ppl, shortened-taylor, last-n. See `layerfold methods`.")]
Threshold = Annotated[float | None, typer.Option(help="slm, laco: similarity threshold, as in the papers.")]
TargetLayers = Annotated[int | None, typer.Option("--target-layers", help="Layers to keep.")]
Ratio = Annotated[float | None, typer.Option(help="Share of decoder layers to remove (default 0.2 for slm).")]
ParamRatio = Annotated[float | None, typer.Option("--param-ratio", help="Share of all parameters to remove.")]
Criterion = Annotated[str | None, typer.Option(help="slm: output-cosine, cka-linear, cka-rbf or angular.")]
Merge = Annotated[str | None, typer.Option(help="slm, laco: merge operator (diff, mean, reference, base).")]
Norms = Annotated[str | None, typer.Option(help="slm: norm parameters: base (keep the base layer's) or merge.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Other method option, key=value (repeatable).")]
CalibSource = Annotated[str, typer.Option(help="Calibration text: books, ptb-train, wikitext2, or a file.")]
CalibSamples = Annotated[int, typer.Option(help="Calibration samples.")]
CalibSeqLen = Annotated[int, typer.Option(help="Tokens per calibration sample.")]
Seed = Annotated[int, typer.Option(help="Seed for calibration sampling.")]
Sampling = Annotated[str, typer.Option(help="random (seeded) or strided.")]


@app.command()
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

    target, options, calib = _planning(method, threshold, target_layers, ratio, param_ratio, criterion, merge,
                                       norms, set_, calib_source, calib_samples, calib_seq_len, seed, calib_sampling)
    if plan is not None and not plan.is_file():
        raise LayerfoldError(f"plan file {plan} does not exist")
    from layerfold.width import WidthRequest, check_width_support

    widths = WidthRequest.from_options(width, split, width_plan, importance=importance, attention=attention,
                                       heads=heads, multiple_of=multiple_of, held_out=held_out)
    if widths is not None:
        widths.check_depth(target, plan, options)
    _check_out(out, overwrite)
    load_kw, stream_kw = _placement(device, max_gpu_memory, device_map)
    api.check_width_with_cap(widths, max_gpu_memory)
    loaded = api.load_model(model, dtype=dtype, **load_kw)
    if widths is not None:
        check_width_support(loaded)
    if out is None:
        out = Path("layerfold-out") / f"{Path(loaded.source).name}-{method}{'-width' if widths else ''}"
        _check_out(out, overwrite)
    report = api.prune(loaded, out, method=method, target=target, calibration=calib, options=options,
                       plan=plan, overwrite=overwrite, ppl=_split(ppl), ppl_windows=ppl_windows, width=widths,
                       **stream_kw)
    _print_report(report)


def _check_out(out: Path | None, overwrite: bool) -> None:
    """Refuse an existing output folder before any work is done."""
    if out is not None and out.exists() and not overwrite:
        raise LayerfoldError(f"output folder {out} exists: choose another --out or pass --overwrite")


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


@app.command("plan")
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
    target, options, calib = _planning(method, threshold, target_layers, ratio, param_ratio, criterion, merge,
                                       norms, set_, calib_source, calib_samples, calib_seq_len, seed, calib_sampling)
    load_kw, stream_kw = _placement(device, max_gpu_memory, device_map)
    loaded = api.load_model(model, dtype=dtype, **load_kw)
    result = api.make_plan(loaded, method=method, target=target, calibration=calib, options=options, **stream_kw)
    api.save_plan(result, out)
    typer.echo(result.plan.summary())
    typer.echo(f"plan written to {out}")


@app.command("eval")
def eval_cmd(
    model: ModelArg = None,
    ppl: Annotated[str | None, typer.Option(
        help="Perplexity sources: wikitext2, ptb, lambada, or files ('' for none; default: ptb, "
             "or none when --tasks is given).")] = None,
    tasks: Annotated[str | None, typer.Option(
        help="Zero-shot tasks through lm-evaluation-harness, offline: zeroshot7 (boolq, piqa, hellaswag, "
             "winogrande, arc_easy, arc_challenge, openbookqa), zeroshot7_val, extra (sciq, social_iqa, copa, "
             "commonsense_qa), heldout (validation: sciq, social_iqa, copa and the ARC/OpenBookQA validation "
             "splits), or a comma list.")] = None,
    limit: Annotated[int | None, typer.Option(
        help="Zero-shot: score only the first N documents of each task (a smoke test).")] = None,
    hub: Annotated[bool, typer.Option(
        help="Zero-shot: use lm-eval's built-in tasks and the hub's data instead of the offline copies.")] = False,
    seq_len: Annotated[int, typer.Option(help="Tokens per perplexity window (128 as the paper, or 2048).")] = 128,
    bos: Annotated[bool, typer.Option(help="Put BOS first in every window.")] = False,
    batch_size: Annotated[int, typer.Option(
        help="Perplexity windows, or harness requests, per forward pass.")] = 8,
    max_windows: Annotated[int | None, typer.Option(help="Score only the first N windows.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the results (with their protocol) as JSON here.")] = None,
    dtype: Dtype = "float32",
    device: Device = "cpu",
) -> None:
    """Evaluate a model: fixed-length token perplexity and zero-shot accuracy (protocol recorded)."""
    from rich.console import Console
    from rich.table import Table

    from layerfold import api

    if tasks:
        from layerfold.evaluate.zeroshot import resolve_tasks

        resolve_tasks(tasks)
    loaded = api.load_model(model, dtype=dtype, device=device)
    results = api.evaluate(loaded, ppl=None if ppl is None else _split(ppl), seq_len=seq_len, bos=bos,
                           batch_size=batch_size, max_windows=max_windows, tasks=tasks, limit=limit, hub=hub)
    console = Console()
    console.print(f"{results['model']}: {results['layers']} layers, {results['parameters']:,} parameters")
    if results["perplexity"]:
        table = Table("text", "perplexity", "protocol")
        for source, r in results["perplexity"].items():
            table.add_row(source, f"{r['perplexity']:.3f}", r["protocol"])
        console.print(table)
    if "zeroshot" in results:
        from layerfold.evaluate.zeroshot import zeroshot_table

        console.print(zeroshot_table(results["zeroshot"]))
        console.print(f"zero-shot took {results['zeroshot']['seconds']:.0f} s")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")


@app.command()
def methods() -> None:
    """List the registered methods and merge operators."""
    import layerfold.methods  # noqa: F401
    from layerfold.merge import MERGES
    from layerfold.methods.base import METHODS

    for name in METHODS.names():
        doc = (METHODS.get(name).__doc__ or "").strip().splitlines()[0]
        typer.echo(f"{name:18s} {doc}")
    typer.echo("merge operators: " + ", ".join(MERGES.names()))


_commands_registered = False


def main() -> None:
    global _commands_registered
    from layerfold.commands import register_all

    if not _commands_registered:  # main() may run more than once in a process (tests, notebooks)
        register_all(app)
        _commands_registered = True
    try:
        app()
    except LayerfoldError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(2)
    except SystemExit as exc:
        if exc.code == 130:  # typer turns Ctrl-C into exit code 130; saves are atomic
            typer.echo("interrupted; nothing was written", err=True)
        raise


def print_split(console, dw: dict) -> None:
    """The depth/width split a combined prune took, and every candidate split's held-out loss."""
    console.print(f"split {dw['split']} (share of removed parameters taken by depth): removed "
                  f"{dw['achieved_ratio']:.1%} of parameters")
    for cand in dw["candidates"]:
        loss = f"{cand['heldout_nll']:.4f}" if cand["heldout_nll"] is not None else cand["error"]
        console.print(f"  split {cand['split']}: layers {cand['layers']}, held-out calibration NLL {loss}")


if __name__ == "__main__":
    main()
