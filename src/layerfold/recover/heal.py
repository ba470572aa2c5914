"""Heal a pruned model: LoRA or the decoder layers themselves, trained on text or distilled from the original.

``--data self`` heals without any dataset: the original model writes the text
(:mod:`layerfold.recover.selftext`) and the pruned model learns to match its next-token
distributions on it.

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

from layerfold.data.tokens import leading_bos
from layerfold.errors import LayerfoldError
from layerfold.models.load import LoadedModel, load_model
from layerfold.recover.checkpoint import checkpoint_dir_for, latest_checkpoint, load_checkpoint, save_checkpoint
from layerfold.recover.config import HealConfig
from layerfold.recover.data import block_order, blocks_from_stream, data_parts, describe_data, token_blocks
from layerfold.recover.distill import LossWeights, heal_loss, teacher_outputs
from layerfold.recover.lora import attach_lora, merge_lora, projection_names, train_decoder_layers, trainable_parameters

DEFAULT_SELF_TOKENS = 2_000_000  # --data self without a budget

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


def make_accelerator(device: str = "auto", mixed_precision: bool = False):
    """An accelerator on ``device``; ``mixed_precision`` runs the prepared model's forward under
    bfloat16 autocast on CUDA (the weights and optimizer state keep their dtype)."""
    from accelerate import Accelerator

    if device not in ("auto", "cpu", "cuda"):
        raise LayerfoldError(f"--device {device}: use auto, cpu or cuda (accelerate places each process; pick GPUs "
                             "with CUDA_VISIBLE_DEVICES)")
    if device == "cuda" and not torch.cuda.is_available():
        raise LayerfoldError("--device cuda asked for, but no CUDA device is available")
    on_cuda = device != "cpu" and torch.cuda.is_available()
    return Accelerator(cpu=device == "cpu", mixed_precision="bf16" if mixed_precision and on_cuda else "no")


def planned_steps(config: HealConfig, num_blocks: int, processes: int) -> int:
    """Optimizer steps: ``max_steps``, else the ``max_tokens`` budget, else ``epochs`` over the data
    (for self-written text without a budget, :data:`DEFAULT_SELF_TOKENS`)."""
    per_step = config.batch_size * config.grad_accum * processes
    if config.max_steps is not None:
        return config.max_steps
    if config.max_tokens is not None or config.self_written:
        budget = config.max_tokens if config.max_tokens is not None else DEFAULT_SELF_TOKENS
        return max(1, budget // (per_step * config.cutoff))
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


def original_model(pruned: LoadedModel | str) -> str:
    """The model a pruned folder was made from, as its ``plan.json`` records it: a folder, a hub id,
    or ``default`` for the embedded model."""
    from layerfold.models.default import DEFAULT_MODEL_NAME
    from layerfold.plan import Plan

    folder = Path(pruned.path if isinstance(pruned, LoadedModel) else pruned).expanduser()
    plan_file = folder / "plan.json"
    if not plan_file.is_file():
        raise LayerfoldError(f"--data self needs the original model as teacher, and {folder} has no plan.json "
                             "naming it: pass --distill ORIGINAL (a folder, a hub id, or default)")
    source = Plan.load(plan_file).model
    if not source:
        raise LayerfoldError(f"{plan_file} does not name the model it was made from: pass --distill ORIGINAL")
    if source in (DEFAULT_MODEL_NAME, "default"):
        return "default"
    if Path(source).expanduser().exists() or source.count("/") == 1:
        return source  # a folder that is still there, or a hub id
    raise LayerfoldError(f"the original model {source} (from {plan_file}) is not found: pass --distill ORIGINAL")


def with_teacher(config: HealConfig, pruned: LoadedModel | str, teacher: LoadedModel | None) -> HealConfig:
    """Self-written text distils from the original model: name it in the config when the user did not."""
    if not config.self_written or config.distill is not None:
        return config
    name = teacher.source if teacher is not None else original_model(pruned)
    return config.model_copy(update={"distill": name})


def _teacher(config: HealConfig, teacher: LoadedModel | None, student: LoadedModel, dtype: str,
             device: torch.device) -> LoadedModel | None:
    if teacher is not None and config.distill is None:
        raise LayerfoldError("a teacher was given but config.distill is unset: name the teacher there")
    if config.distill is None:
        return None
    if device.type == "cuda" and config.mixed_precision and teacher is None:
        dtype = "bfloat16"  # a frozen teacher under bf16 autocast loses nothing by being stored in bf16
    teacher = _loaded(teacher if teacher is not None else config.distill, dtype, device)
    if teacher.model.get_output_embeddings().weight.shape[0] != student.model.get_output_embeddings().weight.shape[0]:
        raise LayerfoldError("the teacher's vocabulary differs from the pruned model's: distil from the model "
                             "that was pruned")
    teacher.model.eval()  # outputs are taken under no_grad; the caller's flags stay as they are
    return teacher


def _blocks(config: HealConfig, loaded: LoadedModel, teacher: LoadedModel | None, accelerator,
            progress: bool) -> tuple[torch.Tensor, dict | None]:
    """The training blocks, and for self-written text the record of how it was written.

    The main process writes the text (or reads it from the cache) first; the other processes then
    read the cache, so it is written once."""
    if not config.self_written:
        return token_blocks(loaded.tokenizer, config.data, config.cutoff), None
    from layerfold.recover.selftext import self_text

    per_step = config.batch_size * config.grad_accum * accelerator.num_processes * config.cutoff
    tokens = config.self_tokens or planned_steps(config, 1, accelerator.num_processes) * per_step
    written = None
    if accelerator.is_main_process:
        written = self_text(teacher.model, loaded.tokenizer, config.self_text, tokens, progress=progress)
    accelerator.wait_for_everyone()
    if written is None:
        written = self_text(teacher.model, loaded.tokenizer, config.self_text, tokens, progress=False)
    return (blocks_from_stream(written.stream, config.cutoff, "self-written text", bos=leading_bos(loaded.tokenizer)),
            written.record)


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
    config = with_teacher(config, pruned, teacher)
    out = Path(out).expanduser().resolve() if out is not None else None
    checkpoints = checkpoint_dir_for(out) if out is not None else None
    _prepare_folders(out, checkpoints, resume, overwrite)

    accelerator = make_accelerator(device, config.mixed_precision)
    loaded = _loaded(pruned, dtype, accelerator.device)
    if loaded.tokenizer is None:
        raise LayerfoldError("healing needs the model's tokenizer")
    teach = _teacher(config, teacher, loaded, dtype, accelerator.device)
    blocks, written = _blocks(config, loaded, teach, accelerator, progress)
    before = _evaluate(loaded.model, loaded.tokenizer, config, progress) if accelerator.is_main_process else {}

    trainer = _Trainer(accelerator, loaded, config, blocks, teach)
    trainer.self_text = written
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
    """The trained model (LoRA adapters, or the decoder layers), its optimizer and schedule, the block
    order, and the step loop."""

    def __init__(self, accelerator, loaded: LoadedModel, config: HealConfig, blocks: torch.Tensor,
                 teacher: LoadedModel | None) -> None:
        from accelerate.utils import set_seed
        from transformers import get_linear_schedule_with_warmup

        self.acc, self.loaded, self.config, self.blocks, self.teacher = accelerator, loaded, config, blocks, teacher
        self.self_text: dict | None = None
        self.weights = LossWeights(distill=teacher is not None, temperature=config.temperature,
                                   kl=config.kl_weight, ce=config.ce_weight, hidden=config.hidden_weight)
        self.per_step = config.batch_size * config.grad_accum * accelerator.num_processes
        self.total = planned_steps(config, len(blocks), accelerator.num_processes)
        self.order = block_order(len(blocks), self.total * self.per_step, config.seed)
        set_seed(config.seed)
        if config.train == "lora":
            self.targets = projection_names(loaded.model)
            model = attach_lora(loaded.model, config)
        else:
            self.targets = train_decoder_layers(loaded.model)
            model = loaded.model
        self.adapters = trainable_parameters(model)  # what trains, and what a checkpoint holds
        optimizer = torch.optim.AdamW(list(self.adapters.values()), lr=config.lr, weight_decay=config.weight_decay)
        self.warmup = min(config.warmup_steps, self.total // 10)
        # not passed through accelerator.prepare: its scheduler wrapper steps once per process
        self.scheduler = get_linear_schedule_with_warmup(optimizer, self.warmup, self.total)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.forward = torch.compile(self.model) if config.compile else self.model
        self.teacher_forward = None
        if teacher is not None:
            self.teacher_forward = torch.compile(teacher.model) if config.compile else teacher.model
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
        c, teacher = self.config, self.teacher_forward
        self.model.train()
        totals: dict[str, float] = {}
        for micro in range(c.grad_accum):
            ids = self.micro_batch(step, micro)
            last = micro == c.grad_accum - 1
            with contextlib.nullcontext() if last else self.acc.no_sync(self.model):
                out = self.forward(input_ids=ids, use_cache=False, output_hidden_states=self.weights.needs_hidden)
                teacher_out = None
                if teacher is not None:
                    with self.acc.autocast():
                        teacher_out = teacher_outputs(teacher, ids, self.weights)
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
        """The plain transformers model: LoRA merged back, or the model whose layers trained."""
        self.acc.wait_for_everyone()
        model = self.acc.unwrap_model(self.model)
        if self.config.train == "lora":
            return merge_lora(model).eval()
        model.requires_grad_(False)
        return model.eval()

    def facts(self) -> dict:
        c, n = self.config, len(self.blocks)
        return {
            "mode": c.mode, "model": self.loaded.source, "teacher": self.teacher.source if self.teacher else None,
            "train": c.train, "recipe": c.model_dump(mode="json"),
            "data": {"spec": c.data, "description": describe_data(c.data), "blocks": n, "block_tokens": c.cutoff,
                     "tokens": n * c.cutoff, "blocks_start_with_bos": leading_bos(self.loaded.tokenizer) is not None,
                     "self_text": self.self_text},
            "trainable_parameters": sum(p.numel() for p in self.adapters.values()),
            "lora": {"targets": len(self.targets),
                     "target_kinds": sorted({t.rsplit(".", 1)[-1] for t in self.targets}),
                     "trainable_parameters": sum(p.numel() for p in self.adapters.values())}
            if c.train == "lora" else None,
            "trained_layers": self.targets if c.train == "layers" else None,
            "steps": self.total, "warmup_steps": self.warmup, "processes": self.acc.num_processes,
            "blocks_per_step": self.per_step, "tokens_trained": self.total * self.per_step * c.cutoff,
            "epochs_over_data": self.total * self.per_step / n, "resumed_from_step": self.resumed_from,
            "train_seconds_this_run": round(self.train_seconds, 2),
            "train_tokens_per_second_this_run": round((self.total - self.first_step) * self.per_step * c.cutoff
                                                      / self.train_seconds) if self.train_seconds else None,
            "loss_first": self.losses[0]["loss"] if self.losses else None,
            "loss_last": self.losses[-1]["loss"] if self.losses else None,
        }


def _save(model: nn.Module, loaded: LoadedModel, out: Path, record: dict, overwrite: bool) -> Path:
    import json

    from layerfold.output import save_model

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
    what = f"distilled from `{record['teacher']}`" if record["teacher"] else "next-token loss"
    table = f"\n| text | before | after |\n|---|---|---|\n{rows}\n" if rows else ""
    trained = (f"LoRA (rank {recipe['rank']}, alpha {recipe['alpha']}, dropout {recipe['dropout']}) on "
               f"{record['lora']['targets']} projections of the decoder layers, merged back into the weights"
               if record["train"] == "lora" else
               f"every weight of the {len(record['trained_layers'])} decoder layers (embeddings, final norm and "
               "LM head frozen)")
    text = ("text written by the original model (see `heal.json`, data.self_text)"
            if record["data"]["self_text"] else record["data"]["description"])
    return card.rstrip() + f"""

## Healing

{trained}, {what}: {record['steps']} steps, {record['tokens_trained']:,} tokens of {text}. The recipe, the
data and the loss of every step are in `heal.json`.

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
