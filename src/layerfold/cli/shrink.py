"""``layerfold shrink``: structured width pruning, alone or with depth pruning under one budget."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

from layerfold.cli.options import CalibSamples, CalibSeqLen, CalibSource, Sampling, Seed, print_split
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
    ppl_windows: Annotated[int, Opt(help="128-token windows per perplexity source.")] = 40,
    overwrite: Annotated[bool, Opt(help="Replace an existing output folder.")] = False,
    dtype: Annotated[str, Opt(help="float32, bfloat16, float16 or auto.")] = "float32",
    device: Annotated[str, Opt(help="cpu, cuda, cuda:N or auto.")] = "cpu",
) -> None:
    """Remove MLP channels and attention heads (the same number in every layer), optionally after
    depth pruning, and save a plain Hugging Face folder (with width_plan.json and a model card)."""
    from layerfold import api
    from layerfold import width as W
    from layerfold.cli.options import method_options, split_list
    from layerfold.data.tokens import CalibrationConfig
    from layerfold.evaluate.perplexity import perplexity
    from layerfold.models.arch import parameter_count

    if sum(v is not None for v in (width, param_ratio, plan)) != 1:
        raise LayerfoldError("give exactly one of --width, --param-ratio and --plan")
    calib = CalibrationConfig(source=calib_source, samples=calib_samples, seq_len=calib_seq_len, seed=seed,
                              sampling=calib_sampling)
    loaded = api.load_model(model, dtype=dtype, device=device)
    out = out or Path("layerfold-out") / f"{Path(loaded.source).name}-shrink"
    if out.exists() and not overwrite:
        raise LayerfoldError(f"output folder {out} exists: choose another --out or pass --overwrite")
    sources = split_list(ppl)

    def measure() -> dict[str, float]:
        return {s: perplexity(loaded.model, loaded.tokenizer, s, max_windows=ppl_windows).perplexity
                for s in sources}

    before, layers_before, params_before = measure(), len(loaded.arch.layer_list(loaded.model)), \
        parameter_count(loaded.model)
    depth, summary = None, None
    width_opts = {"importance": importance, "attention": attention, "heads": heads, "multiple_of": multiple_of}
    if plan is not None:
        wplan = W.WidthPlan.load(plan)
        W.apply_width(loaded.model, wplan)
    elif width is not None:
        wplan = W.shrink(loaded, width, calibration=calib, batch_size=calib.batch_size, **width_opts)
    else:
        result = W.depth_width_prune(loaded, param_ratio, split, method, calib, method_options(set_),
                                     held_out=held_out, **width_opts)
        wplan, depth, summary = result.width, result.depth, result.summary()
    after = measure()
    record = W.ShrinkRecord(layers=(layers_before, len(loaded.arch.layer_list(loaded.model))),
                            params=(params_before, parameter_count(loaded.model)), perplexity_before=before,
                            perplexity_after=after, depth_width=summary)
    command = "layerfold " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    saved = W.save_shrunk(loaded, out, wplan, depth, record, command=command, overwrite=overwrite)
    _print(wplan, depth, record, saved)


def _print(wplan, depth, record, saved: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if depth is not None:
        console.print(depth.plan.summary())
    if wplan is not None:
        console.print(wplan.summary())
    if record.depth_width:
        print_split(console, record.depth_width)
    table = Table("", "before", "after")
    table.add_row("decoder layers", str(record.layers[0]), str(record.layers[1]))
    table.add_row("parameters", f"{record.params[0]:,}", f"{record.params[1]:,}")
    for source, value in record.perplexity_before.items():
        table.add_row(f"{source} perplexity (128 tok)", f"{value:.2f}", f"{record.perplexity_after[source]:.2f}")
    console.print(table)
    console.print(f"saved to {saved}")
