"""``layerfold bench``: inference speed of a model, and of a pruned one against it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from layerfold.errors import LayerfoldError


def _batch_sizes(value: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError as exc:
        raise LayerfoldError(f"--batch-sizes expects integers separated by commas, got '{value}'") from exc
    return sizes


def _modes(eager: bool, static: bool, graph: bool, compile: bool) -> tuple[str, ...]:
    """The measured modes: ``--graph`` is mode graph-compiled with --compile, graph without."""
    graph_mode = "graph-compiled" if compile else "graph"
    return tuple(m for m, on in (("eager", eager), ("static", static), (graph_mode, graph)) if on)


def _labels(first: str, second: str | None) -> tuple[str, str | None]:
    """Short names for the table: folder names, told apart if they are equal."""
    first = Path(first).name or first
    second = None if second is None else Path(second).name or second
    if second is None or second != first:
        return first, second
    return f"{first} (model)", f"{second} (--vs)"


def bench(
    model: Annotated[str | None, typer.Argument(help="Hub id or local folder; default: the embedded SmolLM2-135M.")]
    = None,
    vs: Annotated[str | None, typer.Option(help="A second model (e.g. the pruned one), measured against MODEL.")]
    = None,
    batch_sizes: Annotated[str, typer.Option(help="Batch sizes, comma-separated (1 = latency).")] = "1,16,64",
    new_tokens: Annotated[int, typer.Option(help="Tokens generated per call.")] = 128,
    prompt_len: Annotated[int, typer.Option(help="Prompt tokens (random ids).")] = 128,
    repeats: Annotated[int, typer.Option(help="Timed calls per model and setting; the median is reported.")] = 3,
    warmup_tokens: Annotated[int, typer.Option(help="Length of the untimed call before each model's timed calls "
                                                    "(compiles; use --new-tokens for eager, whose allocator "
                                                    "otherwise grows in the first timed call).")] = 8,
    compile: Annotated[bool, typer.Option("--compile/--no-compile",
                                          help="torch.compile the decode: the static-cache generate (mode "
                                               "reduce-overhead: inductor kernels in CUDA graphs) and, with --graph, "
                                               "the decode step (inductor, no CUDA graphs of its own) before graph "
                                               "mode captures it (mode graph-compiled). --no-compile: the static "
                                               "cache runs eagerly and --graph captures the eager step (mode graph).")]
    = True,
    static: Annotated[bool, typer.Option("--static/--no-static", help="Measure the static-cache mode.")] = True,
    eager: Annotated[bool, typer.Option("--eager/--no-eager", help="Measure plain eager generate.")] = True,
    graph: Annotated[bool, typer.Option("--graph/--no-graph",
                                        help="Measure graph mode: no generate, one decode step over a static cache "
                                             "captured as a CUDA graph and replayed; compiled first unless "
                                             "--no-compile; called in a Python loop on the CPU (no capture).")]
    = False,
    bandwidth: Annotated[float, typer.Option(help="Memory bandwidth in TB/s for the decode floor (H200: 4.8).")]
    = 4.8,
    device: Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")] = "auto",
    dtype: Annotated[str, typer.Option(help="bfloat16, float16, float32 or auto (the checkpoint's).")]
    = "bfloat16",
    out: Annotated[Path | None, typer.Option(help="Write the results as JSON here.")] = None,
) -> None:
    """Latency, throughput (prefill and decode apart), peak memory; pruned vs dense and vs ideal L/L'."""
    from rich.console import Console

    from layerfold.bench.speed import SpeedConfig, floor_note, load_for_bench, measure_models, results_table

    modes = _modes(eager, static, graph, compile)
    config = SpeedConfig(batch_sizes=_batch_sizes(batch_sizes), new_tokens=new_tokens, prompt_len=prompt_len,
                         repeats=repeats, compile=compile, modes=modes, warmup_tokens=warmup_tokens,
                         bandwidth=bandwidth * 1e12)
    console = Console()
    label, first = load_for_bench(model, dtype=dtype, device=device)
    models = {_labels(label, None)[0]: first}
    if vs is not None:
        other_label, other = load_for_bench(vs, dtype=dtype, device=device)
        label, other_label = _labels(label, other_label)
        models = {label: first, other_label: other}
    results = measure_models(models, config, log=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    console.print(results_table(results))
    console.print(floor_note(results))
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"results written to {out}")


def register(app: typer.Typer) -> None:
    app.command("bench")(bench)
