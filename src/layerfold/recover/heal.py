"""Heal a pruned model: LoRA fine-tuning (optionally distilling from the original), merged back.

The loop is written over :class:`accelerate.Accelerator`, so the same call runs on one
device or, under ``accelerate launch``, data-parallel on several GPUs.  Each optimizer step
consumes ``batch_size * grad_accum * processes`` blocks; block ``g`` of the seeded order goes
to process ``g % processes``, so the data a step sees does not depend on when a run was
interrupted and resumed.
"""

from __future__ import annotations

import contextlib
import math
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from layerfold.errors import LayerfoldError
from layerfold.models.load import LoadedModel, load_model
from layerfold.recover.checkpoint import checkpoint_dir_for, latest_checkpoint, load_checkpoint, save_checkpoint
from layerfold.recover.config import HealConfig
from layerfold.recover.data import block_order, data_parts, describe_data, token_blocks
from layerfold.recover.distill import LossWeights, heal_loss, teacher_outputs
from layerfold.recover.lora import attach_lora, merge_lora, projection_names, trainable_parameters

StepCallback = Callable[[int, dict], None]


@dataclass
class HealReport:
    model: nn.Module  # the merged, plain transformers model
    out: Path | None
    record: dict  # what heal.json holds
    losses: list[dict] = field(default_factory=list)

    @property
    def perplexity_before(self) -> dict[str, float]:
        return {s: r["perplexity"] for s, r in self.record["perplexity"]["before"].items()}

    @property
    def perplexity_after(self) -> dict[str, float]:
        return {s: r["perplexity"] for s, r in self.record["perplexity"]["after"].items()}


def make_accelerator(device: str = "auto"):
    from accelerate import Accelerator

    if device not in ("auto", "cpu", "cuda"):
        raise LayerfoldError(f"--device {device}: use auto, cpu or cuda (accelerate places each process; pick GPUs "
                             "with CUDA_VISIBLE_DEVICES)")
    if device == "cuda" and not torch.cuda.is_available():
        raise LayerfoldError("--device cuda asked for, but no CUDA device is available")
    return Accelerator(cpu=device == "cpu")


def planned_steps(config: HealConfig, num_blocks: int, processes: int) -> int:
    """Optimizer steps: ``max_steps``, else the ``max_tokens`` budget, else ``epochs`` over the data."""
    per_step = config.batch_size * config.grad_accum * processes
    if config.max_steps is not None:
        return config.max_steps
    if config.max_tokens is not None:
        return max(1, config.max_tokens // (per_step * config.cutoff))
    steps = int(config.epochs * num_blocks) // per_step
    if steps < 1:
        raise LayerfoldError(f"the data has {num_blocks} blocks of {config.cutoff} tokens, fewer than one step needs "
                             f"({per_step}): lower --batch-size or --grad-accum, or give more data")
    return steps


def _evaluate(model: nn.Module, tokenizer, config: HealConfig, progress: bool) -> dict[str, dict]:
    from layerfold.evaluate.perplexity import perplexity

    was_training = model.training
    model.eval()
    results = {s: perplexity(model, tokenizer, s, seq_len=config.eval_seq_len, batch_size=config.eval_batch_size,
                             max_windows=config.eval_windows, progress=progress).to_dict()
               for s in config.eval_sources}
    model.train(was_training)
    return results


def _loaded(model: LoadedModel | str | None, dtype: str, device: torch.device) -> LoadedModel:
    if isinstance(model, LoadedModel):
        model.model.to(device)
        return model
    return load_model(model, dtype=dtype, device=str(device))


def _teacher(config: HealConfig, teacher: LoadedModel | None, student: LoadedModel, dtype: str,
             device: torch.device) -> LoadedModel | None:
    if teacher is not None and config.distill is None:
        raise LayerfoldError("a teacher was given but config.distill is unset: name the teacher there")
    if config.distill is None:
        return None
    teacher = _loaded(teacher if teacher is not None else config.distill, dtype, device)
    if teacher.model.get_output_embeddings().weight.shape[0] != student.model.get_output_embeddings().weight.shape[0]:
        raise LayerfoldError("the teacher's vocabulary differs from the pruned model's: distil from the model "
                             "that was pruned")
    teacher.model.eval()  # outputs are taken under no_grad; the caller's flags stay as they are
    return teacher


def _prepare_folders(out: Path | None, checkpoints: Path | None, resume: bool, overwrite: bool) -> None:
    if out is not None and out.exists() and not overwrite:
        raise LayerfoldError(f"output folder {out} exists: choose another --out or pass --overwrite")
    if resume and checkpoints is None:
        raise LayerfoldError("--resume needs the --out of the interrupted run (its checkpoints sit beside it)")
    if checkpoints is not None and latest_checkpoint(checkpoints) is not None and not resume:
        if not overwrite:
            raise LayerfoldError(f"checkpoints of an interrupted heal are in {checkpoints}: pass --resume to "
                                 "continue it, or --overwrite to start again")
        shutil.rmtree(checkpoints)


def heal(pruned: LoadedModel | str, out: str | Path | None = None, config: HealConfig | None = None, *,
         teacher: LoadedModel | None = None, resume: bool = False, overwrite: bool = False, dtype: str = "float32",
         device: str = "auto", progress: bool = True, on_step: StepCallback | None = None,
         command: str | None = None, keep_checkpoints: bool = False) -> HealReport:
    """Heal ``pruned`` (a model folder, or a loaded model, which is changed in place) and save it to ``out``.

    With ``out=None`` nothing is written and no checkpoints are kept; the merged model is in
    the report.  ``on_step(step, log)`` is called on the main process after every optimizer step.
    """
    config = config or HealConfig()
    start = time.perf_counter()
    data_parts(config.data)  # refuse evaluation sets before loading anything
    out = Path(out).expanduser().resolve() if out is not None else None
    checkpoints = checkpoint_dir_for(out) if out is not None else None
    _prepare_folders(out, checkpoints, resume, overwrite)

    accelerator = make_accelerator(device)
    loaded = _loaded(pruned, dtype, accelerator.device)
    if loaded.tokenizer is None:
        raise LayerfoldError("healing needs the model's tokenizer")
    teach = _teacher(config, teacher, loaded, dtype, accelerator.device)
    blocks = token_blocks(loaded.tokenizer, config.data, config.cutoff)
    before = _evaluate(loaded.model, loaded.tokenizer, config, progress) if accelerator.is_main_process else {}

    trainer = _Trainer(accelerator, loaded, config, blocks, teach)
    if resume:
        trainer.resume(checkpoints)
    trainer.train(checkpoints, on_step, progress)

    merged = trainer.merged()
    loaded.model = merged
    after = _evaluate(merged, loaded.tokenizer, config, progress) if accelerator.is_main_process else {}
    record = {**trainer.facts(), "perplexity": {"before": before, "after": after},
              "seconds": round(time.perf_counter() - start, 2), "peak_gpu_memory_gib": _peak_memory(),
              "command": command or _command_line(), "versions": _versions(), "losses": trainer.losses}
    saved = None
    if out is not None:
        if accelerator.is_main_process:
            saved = _save(merged, loaded, out, record, overwrite)
            if not keep_checkpoints:
                shutil.rmtree(checkpoints, ignore_errors=True)
        accelerator.wait_for_everyone()
    return HealReport(model=merged, out=saved, record=record, losses=trainer.losses)


class _Trainer:
    """The LoRA model, its optimizer and schedule, the block order, and the step loop."""

    def __init__(self, accelerator, loaded: LoadedModel, config: HealConfig, blocks: torch.Tensor,
                 teacher: LoadedModel | None) -> None:
        from accelerate.utils import set_seed
        from transformers import get_linear_schedule_with_warmup

        self.acc, self.loaded, self.config, self.blocks, self.teacher = accelerator, loaded, config, blocks, teacher
        self.weights = LossWeights(distill=teacher is not None, temperature=config.temperature,
                                   kl=config.kl_weight, ce=config.ce_weight, hidden=config.hidden_weight)
        self.per_step = config.batch_size * config.grad_accum * accelerator.num_processes
        self.total = planned_steps(config, len(blocks), accelerator.num_processes)
        self.order = block_order(len(blocks), self.total * self.per_step, config.seed)
        set_seed(config.seed)
        self.targets = projection_names(loaded.model)
        peft_model = attach_lora(loaded.model, config)
        self.adapters = trainable_parameters(peft_model)
        optimizer = torch.optim.AdamW(list(self.adapters.values()), lr=config.lr, weight_decay=config.weight_decay)
        self.warmup = min(config.warmup_steps, self.total // 10)
        # not passed through accelerator.prepare: its scheduler wrapper steps once per process
        self.scheduler = get_linear_schedule_with_warmup(optimizer, self.warmup, self.total)
        self.model, self.optimizer = accelerator.prepare(peft_model, optimizer)
        self.recipe = {**config.training_fingerprint(), "processes": accelerator.num_processes,
                       "model": _identity(loaded)}
        self.losses: list[dict] = []
        self.first_step = 0
        self.resumed_from: int | None = None
        self.train_seconds = 0.0

    def resume(self, checkpoints: Path | None) -> None:
        found = latest_checkpoint(checkpoints) if checkpoints is not None else None
        if found is None:
            if self.acc.is_main_process:
                tqdm.write(f"no checkpoint in {checkpoints}: starting from step 0")
            return
        restored = load_checkpoint(found, self.acc, self.adapters, self.optimizer, self.scheduler, self.recipe)
        self.first_step = self.resumed_from = restored.step
        self.losses = restored.state["losses"]

    def train(self, checkpoints: Path | None, on_step: StepCallback | None, progress: bool) -> None:
        every = self.config.checkpoint_every
        bar = tqdm(total=self.total, initial=self.first_step, desc=f"heal ({self.config.mode})", unit="step",
                   disable=not progress or not self.acc.is_main_process)
        start = time.perf_counter()
        for step in range(self.first_step, self.total):
            log = self.step(step)
            self.losses.append(log)
            bar.update(1)
            bar.set_postfix(loss=f"{log['loss']:.4f}")
            if on_step is not None and self.acc.is_main_process:
                on_step(step + 1, log)
            if checkpoints is not None and every and (step + 1) % every == 0 and step + 1 < self.total:
                save_checkpoint(checkpoints, self.acc, step + 1, self.adapters, self.optimizer, self.scheduler,
                                {"recipe": self.recipe, "losses": self.losses})
        bar.close()
        self.train_seconds = time.perf_counter() - start

    def micro_batch(self, step: int, micro: int) -> torch.Tensor:
        c, acc = self.config, self.acc
        g = (step * c.grad_accum + micro) * acc.num_processes + acc.process_index
        return self.blocks[self.order[g * c.batch_size:(g + 1) * c.batch_size]].to(acc.device)

    def step(self, step: int) -> dict:
        """One optimizer step: ``grad_accum`` micro-batches on each process, then clip, step, log."""
        c, teacher = self.config, self.teacher.model if self.teacher is not None else None
        self.model.train()
        totals: dict[str, float] = {}
        for micro in range(c.grad_accum):
            ids = self.micro_batch(step, micro)
            last = micro == c.grad_accum - 1
            with contextlib.nullcontext() if last else self.acc.no_sync(self.model):
                out = self.model(input_ids=ids, use_cache=False, output_hidden_states=self.weights.needs_hidden)
                teacher_out = teacher_outputs(teacher, ids, self.weights) if teacher is not None else None
                loss, parts = heal_loss(out, ids, self.weights, teacher_out)
                self.acc.backward(loss / c.grad_accum)
            for k, v in {"loss": float(loss.detach()), **parts}.items():
                totals[k] = totals.get(k, 0.0) + v / c.grad_accum
        grad_norm = None
        if c.max_grad_norm is not None:
            grad_norm = float(self.acc.clip_grad_norm_(list(self.adapters.values()), c.max_grad_norm))
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        keys = sorted(totals)
        mean = self.acc.reduce(torch.tensor([totals[k] for k in keys], device=self.acc.device), "mean")
        log = {"step": step + 1, **{k: float(v) for k, v in zip(keys, mean.tolist(), strict=True)}, "lr": lr}
        if grad_norm is not None:
            log["grad_norm"] = grad_norm if math.isfinite(grad_norm) else None
        return log

    def merged(self) -> nn.Module:
        self.acc.wait_for_everyone()
        return merge_lora(self.acc.unwrap_model(self.model)).eval()

    def facts(self) -> dict:
        c, n = self.config, len(self.blocks)
        return {
            "mode": c.mode, "model": self.loaded.source, "teacher": self.teacher.source if self.teacher else None,
            "recipe": c.model_dump(mode="json"),
            "data": {"spec": c.data, "description": describe_data(c.data), "blocks": n, "block_tokens": c.cutoff,
                     "tokens": n * c.cutoff},
            "lora": {"targets": len(self.targets),
                     "target_kinds": sorted({t.rsplit(".", 1)[-1] for t in self.targets}),
                     "trainable_parameters": sum(p.numel() for p in self.adapters.values())},
            "steps": self.total, "warmup_steps": self.warmup, "processes": self.acc.num_processes,
            "blocks_per_step": self.per_step, "tokens_trained": self.total * self.per_step * c.cutoff,
            "epochs_over_data": self.total * self.per_step / n, "resumed_from_step": self.resumed_from,
            "train_seconds_this_run": round(self.train_seconds, 2),
            "loss_first": self.losses[0]["loss"] if self.losses else None,
            "loss_last": self.losses[-1]["loss"] if self.losses else None,
        }


def _save(model: nn.Module, loaded: LoadedModel, out: Path, record: dict, overwrite: bool) -> Path:
    import json

    from layerfold.surgery import save_model

    extra = {"heal.json": json.dumps(record, indent=1) + "\n", "README.md": _card(loaded, record)}
    source = Path(loaded.path)
    if (source / "plan.json").is_file():
        extra["plan.json"] = (source / "plan.json").read_text()
    return save_model(model, loaded.tokenizer, out, overwrite=overwrite, extra_files=extra)


def _card(loaded: LoadedModel, record: dict) -> str:
    source = Path(loaded.path)
    card = (source / "README.md").read_text() if (source / "README.md").is_file() else \
        f"# {source.name} healed by layerfold\n"
    rows = "\n".join(f"| {s} | {r['perplexity']:.2f} | {record['perplexity']['after'][s]['perplexity']:.2f} |"
                     for s, r in record["perplexity"]["before"].items())
    recipe = record["recipe"]
    what = f"distilled from `{record['teacher']}`" if record["mode"] == "distill" else "next-token loss"
    table = f"\n| text | before | after |\n|---|---|---|\n{rows}\n" if rows else ""
    return card.rstrip() + f"""

## Healing

LoRA (rank {recipe['rank']}, alpha {recipe['alpha']}, dropout {recipe['dropout']}) on {record['lora']['targets']}
projections of the decoder layers, {what}, merged back into the weights: {record['steps']} steps,
{record['tokens_trained']:,} tokens of {record['data']['description']}. The recipe, the data and the
loss of every step are in `heal.json`.

    {record['command']}
{table}"""


def _identity(loaded: LoadedModel) -> str:
    path = Path(loaded.path)
    return str(path.resolve()) if path.exists() else loaded.path


def _peak_memory() -> float | None:
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


def _versions() -> dict[str, str]:
    import accelerate
    import peft

    from layerfold.plan import library_versions

    return {**library_versions(), "peft": peft.__version__, "accelerate": accelerate.__version__}


def _command_line() -> str:
    return "python " + shlex.join(sys.argv)
