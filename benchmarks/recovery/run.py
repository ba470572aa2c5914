"""Recovery after pruning: today's LoRA on books against healing on text the original model writes.

The default's saved plans (``plans/`` beside this file: ``layerfold prune --ratio R`` of each model,
with their channel factors) are applied to the dense model; each pruned model is then healed from
the same pruned weights under each arm, at each token budget:

- ``lora-books``: LoRA (rank 8) on the next-token loss of the book text (``layerfold heal``'s
  default recipe with a token budget);
- ``layers-self``: every weight of the decoder layers, distilled (KL on the logits) from the dense
  model on text the dense model writes (``layerfold heal --data self --train layers``);
- ``lora-self``: LoRA distilled on the same self-written text (separates the text from what trains).

Perplexity (every non-overlapping 128-token window, no BOS) on WikiText-2, PTB and LAMBADA for
the dense, pruned and healed models, and with ``--zeroshot`` the seven zero-shot tasks; one row per
model in ``results.jsonl`` (appended as each
finishes, with commit, date, machine and command). ``--save-dir`` keeps the healed models of the
largest budget (for zero-shot scoring with ``layerfold eval``).  ``report.py`` writes RESULTS.md and the
plot from the rows.

On the GPU (the job list is ``jobs.txt`` beside this file)::

    python benchmarks/recovery/run.py --device cuda --budgets 2000000,8000000 --results $HOME/lf/out/recovery.jsonl

A CPU smoke run (rows marked ``smoke``; not results)::

    python benchmarks/recovery/run.py --device cpu --budgets 32768 --batch-size 8 --cutoff 128 --eval-windows 8 \\
        --gen-batch 16 --arms layers-self --plan benchmarks/recovery/plans/smollm2-0.35.json \\
        --results /tmp/r.jsonl
"""

from __future__ import annotations

import argparse
import copy
import datetime
import gc
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from layerfold.evaluate.perplexity import perplexity
from layerfold.models.arch import parameter_count
from layerfold.models.load import LoadedModel, load_model, wrap_model
from layerfold.plan import load_plan
from layerfold.recover import heal, make_config
from layerfold.surgery import apply_plan

HERE = Path(__file__).resolve().parent
PLANS = HERE / "plans"
ARMS = ("lora-books", "layers-self", "lora-self")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("LAYERFOLD_COMMIT", "unknown")


def machine(device: str) -> dict:
    import transformers

    info = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return info


class Rows:
    """results.jsonl, appended one row at a time (so a run cut short keeps what it finished)."""

    def __init__(self, path: Path, args) -> None:
        self.path, self.common = path, {"commit": commit(), "machine": machine(args.device),
                                        "command": "python " + shlex.join(sys.argv), "smoke": args.device == "cpu"}
        path.parent.mkdir(parents=True, exist_ok=True)

    def add(self, row: dict) -> None:
        row = {**row, "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"), **self.common}
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        log(f"row: {row.get('plan') or row['kind']} {row.get('arm', '')} {row.get('budget', '')} "
            f"{ {k: round(v, 2) for k, v in row.get('perplexity', {}).items()} }")


def evaluate(model: torch.nn.Module, tokenizer, args) -> dict[str, float]:
    model.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device.startswith("cuda")):
        return {s: perplexity(model, tokenizer, s, seq_len=128, bos=args.bos, batch_size=args.eval_batch_size,
                              max_windows=args.eval_windows, progress=False).perplexity for s in args.eval}


def release_cached_memory(args) -> None:
    """Give the GPU memory torch keeps cached back, for the other jobs that share the GPU."""
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()


def zeroshot(model: torch.nn.Module, tokenizer, args) -> dict | None:
    """The seven zero-shot tasks (full sets; ``--zeroshot``): each task's figure and the means with and
    without BoolQ, in percent."""
    if not args.zeroshot:
        return None
    from layerfold.evaluate.zeroshot import evaluate_zeroshot

    model.eval()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device.startswith("cuda")):
        out = evaluate_zeroshot(model, tokenizer, "zeroshot7", batch_size=args.zs_batch, progress=False)
    release_cached_memory(args)  # lm-eval's largest batches stay cached
    return {"tasks": {name: 100 * t["value"] for name, t in out["tasks"].items()},
            **{k: 100 * v for k, v in out["summary"].items() if k.startswith("mean")}}


def arm_config(arm: str, budget: int, args):
    data, train = {"lora-books": ("books", "lora"), "layers-self": ("self", "layers"),
                   "lora-self": ("self", "lora")}[arm]
    lr = args.layers_lr if train == "layers" else args.lora_lr
    self_text = dict(batch=args.gen_batch, length=args.gen_length)
    return make_config(data=data, train=train, lr=lr, max_tokens=budget, cutoff=args.cutoff,
                       batch_size=args.batch_size, grad_accum=args.grad_accum, seed=args.seed, eval_sources=(),
                       checkpoint_every=0, self_text=self_text, compile=args.compile)


def pruned_copy(dense: LoadedModel, plan_path: Path) -> tuple[LoadedModel, dict]:
    result = load_plan(plan_path)
    model = apply_plan(copy.deepcopy(dense.model), result.plan, result.overrides)
    facts = {"plan": plan_path.stem, "plan_summary": result.plan.summary(),
             "layers": len(dense.arch.layer_list(model)), "parameters": parameter_count(model)}
    return wrap_model(model, dense.tokenizer, source=f"{dense.source}-{plan_path.stem}"), facts


def heal_row(pruned: LoadedModel, teacher: LoadedModel, arm: str, budget: int, args) -> tuple[dict, torch.nn.Module]:
    student = wrap_model(copy.deepcopy(pruned.model), pruned.tokenizer, source=pruned.source)
    config = arm_config(arm, budget, args)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    report = heal(student, None, config, teacher=teacher if config.distilling else None, device=args.device,
                  progress=not args.quiet)
    r = report.record
    k = max(1, len(r["losses"]) // 10)
    row = {"arm": arm, "budget": budget, "train": r["train"], "mode": r["mode"], "data": config.data,
           "lr": config.lr, "steps": r["steps"], "tokens_trained": r["tokens_trained"],
           "train_seconds": r["train_seconds_this_run"],
           "train_tokens_per_second": r["train_tokens_per_second_this_run"],
           "trainable_parameters": r["trainable_parameters"], "peak_gpu_memory_gib": r["peak_gpu_memory_gib"],
           "loss_first_tenth": sum(x["loss"] for x in r["losses"][:k]) / k,
           "loss_last_tenth": sum(x["loss"] for x in r["losses"][-k:]) / k,
           "self_text": _self_text_summary(r["data"]["self_text"]), "recipe": r["recipe"]}
    return row, report.model


def _self_text_summary(record: dict | None) -> dict | None:
    if record is None:
        return None
    keys = ("recipe", "chunks", "chunks_generated_now", "tokens_kept", "tokens_generated_now", "generation_seconds",
            "generation_tokens_per_second", "steady_tokens_per_second", "filter")
    return {k: record.get(k) for k in keys}


def run(args) -> None:
    rows = Rows(Path(args.results), args)
    torch.manual_seed(args.seed)
    dense = load_model(args.model, dtype="float32", device=args.device)
    teacher = dense
    if args.device.startswith("cuda"):  # the frozen teacher (and writer) in bf16: it runs under bf16 autocast
        teacher = wrap_model(copy.deepcopy(dense.model).to(torch.bfloat16), dense.tokenizer, source=dense.source)
    if not (args.skip_reference or args.no_dense):
        rows.add({"kind": "dense", "model": dense.source, "layers": len(dense.arch.layer_list(dense.model)),
                  "parameters": parameter_count(dense.model), "perplexity": evaluate(dense.model, dense.tokenizer,
                                                                                     args),
                  "zeroshot": zeroshot(dense.model, dense.tokenizer, args)})
    pruned = {}
    for plan_path in args.plan:
        pruned[plan_path] = pruned_copy(dense, plan_path)
        loaded, facts = pruned[plan_path]
        if not (args.skip_reference or args.no_unhealed):
            rows.add({"kind": "pruned", "model": dense.source, **facts,
                      "perplexity": evaluate(loaded.model, loaded.tokenizer, args),
                      "zeroshot": zeroshot(loaded.model, loaded.tokenizer, args)})
    for budget in args.budgets:
        for plan_path in args.plan:
            loaded, facts = pruned[plan_path]
            for arm in args.arms:
                log(f"{facts['plan']}: {arm} at {budget:,} tokens")
                row, model = heal_row(loaded, teacher, arm, budget, args)
                row["perplexity"] = evaluate(model, loaded.tokenizer, args)
                row["zeroshot"] = zeroshot(model, loaded.tokenizer, args) if budget in args.zeroshot_at else None
                rows.add({"kind": "healed", "model": dense.source, **facts, **row})
                if args.save_dir and budget == max(args.budgets):
                    model.save_pretrained(Path(args.save_dir) / f"{facts['plan']}-{arm}-{budget}")
                del model
                gc.collect()
                release_cached_memory(args)


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--plan", action="append", type=Path,
                   help="saved plan (repeatable; default: the SmolLM2 default's plans at 20%% and 35%%)")
    p.add_argument("--budgets", default="2000000,8000000", help="healing tokens per run, comma-separated")
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--cutoff", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64, help="blocks per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--lora-lr", type=float, default=1e-4)
    p.add_argument("--layers-lr", type=float, default=2e-4)
    p.add_argument("--gen-batch", type=int, default=1024, help="samples the dense model writes together")
    p.add_argument("--gen-length", type=int, default=256)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--eval", default="wikitext2,ptb,lambada", help="perplexity sources, comma-separated")
    p.add_argument("--eval-windows", type=int, default=100000, help="windows per source (default: all)")
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--zeroshot", action="store_true", help="also the seven zero-shot tasks (full sets)")
    p.add_argument("--zs-batch", type=int, default=64, help="zero-shot batch size")
    p.add_argument("--zeroshot-at", default=None,
                   help="with --zeroshot, the healed models scored only at these budgets (default: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--skip-reference", action="store_true", help="no dense and unhealed rows (already measured)")
    p.add_argument("--no-dense", action="store_true", help="no dense row (already measured)")
    p.add_argument("--no-unhealed", action="store_true", help="no unhealed rows (already measured)")
    p.add_argument("--bos", action="store_true", help="perplexity windows start with BOS (Gemma)")
    p.add_argument("--save-dir", default=None, help="keep the healed models of the largest budget here")
    p.add_argument("--results", default=str(HERE / "results.jsonl"))
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.plan = args.plan or [PLANS / "smollm2-0.2.json", PLANS / "smollm2-0.35.json"]
    args.budgets = [int(b) for b in args.budgets.split(",") if b.strip()]
    args.arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    args.zeroshot_at = (args.budgets if args.zeroshot_at is None
                        else [int(b) for b in args.zeroshot_at.split(",") if b.strip()])
    args.eval = [s.strip() for s in args.eval.split(",") if s.strip()]
    unknown = [a for a in args.arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {unknown}: choose from {', '.join(ARMS)}")
    return args


if __name__ == "__main__":
    start = time.perf_counter()
    run(parse())
    log(f"done in {time.perf_counter() - start:.0f} s")
