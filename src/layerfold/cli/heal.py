"""``layerfold heal``: recover a pruned model with LoRA or by training its layers, on text or by distillation.

``layerfold heal small/ --data self`` needs no dataset: the original model (named by the pruned
folder's plan.json) writes the healing text and is the teacher."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from layerfold.output import command_line

Opt = typer.Option


def register(app: typer.Typer) -> None:
    app.command("heal")(heal)


def heal(
    pruned: Annotated[str, typer.Argument(help="The pruned model folder (or hub id).")],
    out: Annotated[Path | None, Opt(help="Output folder (default: <PRUNED>-healed).")] = None,
    data: Annotated[str, Opt(help="Training text: self (written by the original model, distilled from it; no "
                                  "dataset needed), books (default; LAMBADA calibration half), ptb-train, a .txt "
                                  "or .jsonl file, hf:NAME[:CONFIG]:SPLIT; comma-separated to join. "
                                  "Evaluation sets are refused.")] = "books",
    train: Annotated[str | None, Opt(help="What trains: lora (adapters, merged back) or layers (every weight of "
                                          "the decoder layers the plan kept or fused). Default: layers with "
                                          "--data self, lora otherwise.")] = None,
    distill: Annotated[str | None, Opt(help="Distil from this teacher (the original model; 'default' = the "
                                            "embedded SmolLM2) instead of the plain next-token loss. With --data "
                                            "self: the model named by plan.json unless given.")] = None,
    temperature: Annotated[float, Opt(help="Distillation temperature T (loss scaled by T^2).")] = 1.0,
    kl_weight: Annotated[float, Opt(help="Weight of the KL term on the logits.")] = 1.0,
    ce_weight: Annotated[float, Opt(help="Weight of the next-token loss beside distillation.")] = 0.0,
    hidden_weight: Annotated[float, Opt(help="Weight of final-hidden-state matching (relative squared "
                                             "error).")] = 0.0,
    rank: Annotated[int, Opt(help="LoRA rank.")] = 8,
    alpha: Annotated[float, Opt(help="LoRA alpha.")] = 16.0,
    dropout: Annotated[float, Opt(help="LoRA dropout.")] = 0.05,
    lr: Annotated[float | None, Opt(help="Peak learning rate (AdamW, warm-up then linear decay). Default: 1e-4 "
                                         "for lora, 2e-4 for layers.")] = None,
    epochs: Annotated[float, Opt(help="Passes over the data (ignored when a step or token budget is given).")] = 2.0,
    cutoff: Annotated[int, Opt(help="Tokens per training block.")] = 256,
    batch_size: Annotated[int, Opt(help="Blocks per micro-batch, per process.")] = 4,
    grad_accum: Annotated[int, Opt(help="Micro-batches accumulated per optimizer step.")] = 16,
    max_steps: Annotated[int | None, Opt(help="Train exactly this many optimizer steps.")] = None,
    max_tokens: Annotated[int | None, Opt(help="Token budget: steps = budget // tokens per step (--data self: "
                                               "default 2,000,000).")] = None,
    self_tokens: Annotated[int | None, Opt(help="--data self: tokens of text to write (default: the token "
                                                "budget, each token seen once).")] = None,
    gen_seeds: Annotated[str, Opt(help="--data self: seeds, books (openings of the calibration passages) or "
                                       "bos.")] = "books",
    gen_seed_tokens: Annotated[int, Opt(help="--data self: tokens of each passage opening.")] = 8,
    gen_temperature: Annotated[float, Opt(help="--data self: sampling temperature.")] = 1.0,
    gen_top_p: Annotated[float, Opt(help="--data self: nucleus sampling top-p.")] = 0.95,
    gen_length: Annotated[int, Opt(help="--data self: new tokens per sample.")] = 256,
    gen_batch: Annotated[int, Opt(help="--data self: samples generated together (part of the recipe: a "
                                       "cached batch is reused only under the same value).")] = 512,
    gen_seed: Annotated[int, Opt(help="--data self: seed of the sampling.")] = 1234,
    warmup_steps: Annotated[int, Opt(help="Warm-up steps (capped at a tenth of the run).")] = 100,
    seed: Annotated[int, Opt(help="Seed for block order, LoRA init and dropout.")] = 1234,
    checkpoint_every: Annotated[int, Opt(help="Save a resumable checkpoint every N steps (0: never).")] = 50,
    resume: Annotated[bool, Opt(help="Continue an interrupted heal from its latest checkpoint.")] = False,
    eval_: Annotated[str, Opt("--eval", help="Perplexity before and after: comma-separated sources ('' for "
                                             "none).")] = "ptb",
    eval_windows: Annotated[int, Opt(help="128-token windows per perplexity source.")] = 40,
    overwrite: Annotated[bool, Opt(help="Replace an existing output folder (and stale checkpoints).")] = False,
    dtype: Annotated[str, Opt(help="float32, bfloat16, float16 or auto.")] = "float32",
    mixed_precision: Annotated[bool, Opt(help="bfloat16 autocast for the forward passes on CUDA.")] = True,
    compile_: Annotated[bool, Opt("--compile", help="torch.compile the student's and teacher's forward "
                                                    "passes.")] = False,
    device: Annotated[str, Opt(help="auto (accelerate places each process), cpu or cuda.")] = "auto",
) -> None:
    """Heal a pruned model: LoRA fine-tuning (or distillation from the original), merged back into the weights."""
    from layerfold.recover import heal as run_heal
    from layerfold.recover import make_config

    self_text = dict(seeds=gen_seeds, seed_tokens=gen_seed_tokens, temperature=gen_temperature, top_p=gen_top_p,
                     length=gen_length, batch=gen_batch, seed=gen_seed)
    config = make_config(data=data, train=train, self_text=self_text, self_tokens=self_tokens,
                         mixed_precision=mixed_precision, compile=compile_, distill=distill,
                         temperature=temperature, kl_weight=kl_weight,
                         ce_weight=ce_weight, hidden_weight=hidden_weight, rank=rank, alpha=alpha, dropout=dropout,
                         lr=lr, epochs=epochs, cutoff=cutoff, batch_size=batch_size, grad_accum=grad_accum,
                         max_steps=max_steps, max_tokens=max_tokens, warmup_steps=warmup_steps, seed=seed,
                         checkpoint_every=checkpoint_every, eval_windows=eval_windows,
                         eval_sources=tuple(s.strip() for s in eval_.split(",") if s.strip()))
    if out is None:
        out = Path(f"{pruned.rstrip('/')}-healed")
    command = command_line()
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
                  f"{record['trainable_parameters']:,} trained parameters, "
                  f"{record['train_tokens_per_second_this_run'] or 0:,} tokens/s")
    console.print(table)
    console.print(f"saved to {report.out}  ({record['seconds']:.1f} s)")
