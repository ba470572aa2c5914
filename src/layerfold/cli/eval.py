"""``layerfold eval``: fixed-length token perplexity and zero-shot accuracy, protocol recorded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from layerfold.cli.options import Device, Dtype, ModelArg, split_list


def register(app: typer.Typer) -> None:
    app.command("eval")(eval_cmd)


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
    bos: Annotated[bool | None, typer.Option(
        "--bos/--no-bos", help="Put BOS first in every perplexity window (default: where the tokenizer puts BOS in "
        "front of every text, as Gemma's and Llama's do; not for SmolLM2).")] = None,
    batch_size: Annotated[int, typer.Option(
        help="Perplexity windows, or harness requests, per forward pass.")] = 8,
    max_windows: Annotated[int | None, typer.Option(help="Score only the first N windows.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the results (with their protocol) as JSON here.")] = None,
    dtype: Dtype = "float32",
    device: Device = "auto",
) -> None:
    """Evaluate a model: fixed-length token perplexity and zero-shot accuracy (protocol recorded)."""
    from rich.console import Console
    from rich.table import Table

    from layerfold import api

    if tasks:
        from layerfold.evaluate.zeroshot import resolve_tasks

        resolve_tasks(tasks)
    sources = None if ppl is None else split_list(ppl)
    api.preflight(model, ppl=sources or ())
    loaded = api.load_model(model, dtype=dtype, device=device)
    results = api.evaluate(loaded, ppl=sources, seq_len=seq_len, bos=bos,
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
