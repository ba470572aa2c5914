"""``layerfold shrink``: structured width pruning, alone or with depth pruning under one budget."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from layerfold.cli.options import CalibSamples, CalibSeqLen, CalibSource, Sampling, Seed, print_report
from layerfold.errors import LayerfoldError

Opt = typer.Option


def register(app: typer.Typer) -> None:
    app.command("shrink")(shrink)


def shrink(
    model: Annotated[str | None, typer.Argument(help="Hub id or local folder; default: the embedded "
                                                     "SmolLM2-135M.")] = None,
    out: Annotated[Path | None, Opt(help="Output folder (default: layerfold-out/<model>-shrink).")] = None,
    width: Annotated[float | None, Opt(help="Width only: share of every decoder layer's attention and MLP "
                                            "projection parameters to remove.")] = None,
    param_ratio: Annotated[float | None, Opt("--param-ratio", help="Depth plus width: share of ALL parameters "
                                                                   "to remove.")] = None,
    split: Annotated[str, Opt(help="With --param-ratio: share of the removed parameters taken by depth "
                                   "(0..1), or auto (tries 0, 0.25, 0.5, 0.75, 1 on held-out calibration "
                                   "loss).")] = "auto",
    method: Annotated[str, Opt(help="Depth planner for --param-ratio (see `layerfold methods`).")] = "slm",
    set_: Annotated[list[str] | None, Opt("--set", help="Depth method option, key=value (repeatable).")] = None,
    importance: Annotated[str, Opt(help="wanda-sp (activation-weighted magnitude), flap (fluctuation) or "
                                        "taylor (|w * grad|, LLM-Pruner).")] = "wanda-sp",
    attention: Annotated[str, Opt(help="auto (the share between attention and MLP with the lowest held-out "
                                       "calibration loss), groups (remove whole KV groups), query-heads (the "
                                       "same number of query heads in every group) or off (MLP only).")] = "auto",
    heads: Annotated[int | None, Opt(help="Attention units removed per layer (KV groups, or query heads per "
                                          "group); default: the width share, rounded.")] = None,
    multiple_of: Annotated[int, Opt(help="Round the kept MLP width to a multiple of this.")] = 8,
    plan: Annotated[Path | None, Opt(help="Apply a saved width_plan.json instead of planning.")] = None,
    calib_source: CalibSource = "books",
    calib_samples: CalibSamples = 10,
    calib_seq_len: CalibSeqLen = 128,
    seed: Seed = 1234,
    calib_sampling: Sampling = "random",
    held_out: Annotated[int, Opt(help="Held-out calibration windows that pick --split auto and --attention "
                                      "auto.")] = 16,
    ppl: Annotated[str, Opt(help="Perplexity before and after, comma-separated sources ('' for none).")] = "ptb",
    ppl_windows: Annotated[int, Opt(
        help="128-token windows per perplexity source (the check before and after; layerfold eval: full texts).")] = 16,
    overwrite: Annotated[bool, Opt(help="Replace an existing output folder.")] = False,
    dtype: Annotated[str, Opt(help="float32, bfloat16, float16 or auto.")] = "float32",
    device: Annotated[str, Opt(help="cpu, cuda, cuda:N or auto.")] = "cpu",
) -> None:
    """Remove MLP channels and attention heads (the same number in every layer), optionally after
    depth pruning, and save a plain Hugging Face folder (with width_plan.json and a model card)."""
    from layerfold import api
    from layerfold.cli.options import method_options, split_list
    from layerfold.data.tokens import CalibrationConfig
    from layerfold.methods.base import Target, make_method
    from layerfold.output import check_out
    from layerfold.width import WidthRequest, prune_with_width

    if sum(v is not None for v in (width, param_ratio, plan)) != 1:
        raise LayerfoldError("give exactly one of --width, --param-ratio and --plan")
    request = WidthRequest(ratio=width, split=split if param_ratio is not None else None, plan=plan,
                           importance=importance, attention=attention, heads=heads, multiple_of=multiple_of,
                           held_out=held_out)
    options = method_options(set_)
    if param_ratio is not None:
        make_method(method, options)  # unknown method or option: fail before loading the model
    calib = CalibrationConfig(source=calib_source, samples=calib_samples, seq_len=calib_seq_len, seed=seed,
                              sampling=calib_sampling)
    check_out(out, overwrite)
    loaded = api.load_model(model, dtype=dtype, device=device)
    out = out or Path("layerfold-out") / f"{Path(loaded.source).name}-shrink"
    depth = param_ratio is not None  # a depth step only when depth and width share --param-ratio
    report = prune_with_width(loaded, out, request, method=method if depth else None,
                              target=Target(param_ratio=param_ratio) if depth else None, calibration=calib,
                              options=options, overwrite=overwrite, ppl=split_list(ppl), ppl_windows=ppl_windows)
    print_report(report)
