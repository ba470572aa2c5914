"""``layerfold heal``: recover a pruned model with LoRA fine-tuning or distillation."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Annotated

import typer

Opt = typer.Option


def register(app: typer.Typer) -> None:
    app.command("heal")(heal)


def heal(
    pruned: Annotated[str, typer.Argument(help="The pruned model folder (or hub id).")],
    out: Annotated[Path | None, Opt(help="Output folder (default: <PRUNED>-healed).")] = None,
    data: Annotated[str, Opt(help="Training text: books (default; LAMBADA calibration half), ptb-train, a .txt "
                                  "or .jsonl file, hf:NAME[:CONFIG]:SPLIT; comma-separated to join. "
                                  "Evaluation sets are refused.")] = "books",
    distill: Annotated[str | None, Opt(help="Distil from this teacher (the original model; 'default' = the "
                                            "embedded SmolLM2) instead of the plain next-token loss.")] = None,
    temperature: Annotated[float, Opt(help="Distillation temperature T (loss scaled by T^2).")] = 1.0,
    kl_weight: Annotated[float, Opt(help="Weight of the KL term on the logits.")] = 1.0,
    ce_weight: Annotated[float, Opt(help="Weight of the next-token loss beside distillation.")] = 0.0,
    hidden_weight: Annotated[float, Opt(help="Weight of final-hidden-state matching (relative squared "
                                             "error).")] = 0.0,
    rank: Annotated[int, Opt(help="LoRA rank.")] = 8,
    alpha: Annotated[float, Opt(help="LoRA alpha.")] = 16.0,
    dropout: Annotated[float, Opt(help="LoRA dropout.")] = 0.05,
    lr: Annotated[float, Opt(help="Peak learning rate (AdamW, warm-up then linear decay).")] = 1e-4,
    epochs: Annotated[float, Opt(help="Passes over the data (ignored when a step or token budget is given).")] = 2.0,
    cutoff: Annotated[int, Opt(help="Tokens per training block.")] = 256,
    batch_size: Annotated[int, Opt(help="Blocks per micro-batch, per process.")] = 4,
    grad_accum: Annotated[int, Opt(help="Micro-batches accumulated per optimizer step.")] = 16,
    max_steps: Annotated[int | None, Opt(help="Train exactly this many optimizer steps.")] = None,
    max_tokens: Annotated[int | None, Opt(help="Token budget: steps = budget // tokens per step.")] = None,
    warmup_steps: Annotated[int, Opt(help="Warm-up steps (capped at a tenth of the run).")] = 100,
    seed: Annotated[int, Opt(help="Seed for block order, LoRA init and dropout.")] = 1234,
    checkpoint_every: Annotated[int, Opt(help="Save a resumable checkpoint every N steps (0: never).")] = 50,
    resume: Annotated[bool, Opt(help="Continue an interrupted heal from its latest checkpoint.")] = False,
    eval_: Annotated[str, Opt("--eval", help="Perplexity before and after: comma-separated sources ('' for "
                                             "none).")] = "ptb",
    eval_windows: Annotated[int, Opt(help="128-token windows per perplexity source.")] = 40,
    overwrite: Annotated[bool, Opt(help="Replace an existing output folder (and stale checkpoints).")] = False,
    dtype: Annotated[str, Opt(help="float32, bfloat16, float16 or auto.")] = "float32",
    device: Annotated[str, Opt(help="auto (accelerate places each process), cpu or cuda.")] = "auto",
) -> None:
    """Heal a pruned model: LoRA fine-tuning (or distillation from the original), merged back into the weights."""
    from layerfold.recover import heal as run_heal
    from layerfold.recover import make_config

    config = make_config(data=data, distill=distill, temperature=temperature, kl_weight=kl_weight,
                         ce_weight=ce_weight, hidden_weight=hidden_weight, rank=rank, alpha=alpha, dropout=dropout,
                         lr=lr, epochs=epochs, cutoff=cutoff, batch_size=batch_size, grad_accum=grad_accum,
                         max_steps=max_steps, max_tokens=max_tokens, warmup_steps=warmup_steps, seed=seed,
                         checkpoint_every=checkpoint_every, eval_windows=eval_windows,
                         eval_sources=tuple(s.strip() for s in eval_.split(",") if s.strip()))
    if out is None:
        out = Path(f"{pruned.rstrip('/')}-healed")
    command = "layerfold " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    report = run_heal(pruned, out, config, resume=resume, overwrite=overwrite, dtype=dtype, device=device,
                      command=command)
    if report.out is not None:  # main process only
        _print(report)


def _print(report) -> None:
    from rich.console import Console
    from rich.table import Table

    record = report.record
    console = Console()
    table = Table("", "before", "after")
    for source, value in report.perplexity_before.items():
        table.add_row(f"{source} perplexity ({record['recipe']['eval_seq_len']} tok)", f"{value:.2f}",
                      f"{report.perplexity_after[source]:.2f}")
    table.add_row("training loss (first / last step)", f"{record['loss_first']:.4f}", f"{record['loss_last']:.4f}")
    console.print(f"{record['mode']}: {record['steps']} steps, {record['tokens_trained']:,} tokens, "
                  f"{record['lora']['trainable_parameters']:,} adapter parameters")
    console.print(table)
    console.print(f"saved to {report.out}  ({record['seconds']:.1f} s)")
