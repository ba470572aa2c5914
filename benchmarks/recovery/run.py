"""Recovery after pruning: LoRA healing against distillation from the original, same token budget.

SmolLM2-135M (the embedded default, 30 layers) pruned to 20 layers (35%: 10 removed) by each
method's plan, then healed twice from the same pruned weights with the same LoRA recipe,
data, seed and number of tokens:

- ``lora``: next-token cross-entropy on the healing text (LLM-Pruner's recipe);
- ``distill``: KL to the dense model's next-token distribution (the dense model is the teacher);
- ``distill-hidden`` (optional): the same plus final-hidden-state matching.

Perplexity (fixed 128-token windows, no BOS, ``layerfold.evaluate.perplexity``) of the dense
model, the pruned model and each healed model.  Healing text: ``books`` by default (the
LAMBADA calibration half; never an evaluation set).

On the GPU machine (the lead runs this):

    python benchmarks/recovery.py --method slm --method shortgpt --device cuda --dtype bfloat16 \\
        --max-tokens 2000000 --eval wikitext2,ptb --eval-windows 60

A small CPU smoke run (writes elsewhere, clearly labelled):

    python benchmarks/recovery.py --method slm --device cpu --max-steps 20 --batch-size 1 \\
        --grad-accum 1 --cutoff 128 --eval ptb --eval-windows 10 --results /tmp/recovery-smoke
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from layerfold import api
from layerfold.data.tokens import CalibrationConfig
from layerfold.evaluate.perplexity import perplexity
from layerfold.methods.base import Target
from layerfold.models.arch import parameter_count
from layerfold.models.load import LoadedModel, load_model, wrap_model
from layerfold.recover import heal, make_config

RESULTS = Path(__file__).resolve().parent / "results" / "recovery"
MODES = ("lora", "distill", "distill-hidden")


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def machine_info(device: str) -> dict:
    import transformers

    info = {"device": device, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads()}
    if device.startswith("cuda") and torch.cuda.is_available():
        info.update(gpu=torch.cuda.get_device_name(), cuda=torch.version.cuda)
    return info


def evaluate(model: torch.nn.Module, tokenizer, args) -> dict[str, float]:
    model.eval()
    return {s: perplexity(model, tokenizer, s, seq_len=128, batch_size=args.eval_batch_size,
                          max_windows=args.eval_windows, progress=False).perplexity for s in args.eval}


def heal_config(args, mode: str):
    distill = {"distill": "dense"} if mode.startswith("distill") else {}
    hidden = {"hidden_weight": args.hidden_weight} if mode == "distill-hidden" else {}
    return make_config(data=args.data, cutoff=args.cutoff, batch_size=args.batch_size, grad_accum=args.grad_accum,
                       max_steps=args.max_steps, max_tokens=args.max_tokens, lr=args.lr, seed=args.seed,
                       temperature=args.temperature, eval_sources=(), checkpoint_every=0, **distill, **hidden)


def prune(dense: LoadedModel, method: str, remove: int, args) -> tuple[LoadedModel, dict]:
    model = copy.deepcopy(dense.model).requires_grad_(True)  # gradient-based planners need it
    loaded = wrap_model(model, dense.tokenizer, source=f"{dense.source}-{method}")
    layers = len(dense.arch.layer_list(dense.model))
    calib = CalibrationConfig(source=args.calib_source, samples=args.calib_samples, seq_len=128, seed=args.seed)
    start = time.perf_counter()
    result = api.make_plan(loaded, method=method, target=Target(layers=layers - remove), calibration=calib,
                           progress=False)
    api.apply_plan(loaded, result)
    return loaded, {"plan": result.plan.summary(), "operations": [[op.kind, op.lo, op.hi] for op in
                                                                  result.plan.operations],
                    "planning_seconds": round(time.perf_counter() - start, 2),
                    "layers": len(loaded.arch.layer_list(model)), "parameters": parameter_count(model)}


def tenth_losses(losses: list[dict]) -> dict[str, float]:
    """Mean training loss over the first and the last tenth of the steps (one step is noisy)."""
    k = max(1, len(losses) // 10)
    return {"loss_first_tenth": sum(x["loss"] for x in losses[:k]) / k,
            "loss_last_tenth": sum(x["loss"] for x in losses[-k:]) / k}


def run_mode(pruned: LoadedModel, dense: LoadedModel, mode: str, args) -> dict:
    student = wrap_model(copy.deepcopy(pruned.model), pruned.tokenizer, source=pruned.source)
    teacher = wrap_model(dense.model, dense.tokenizer, source="dense") if mode.startswith("distill") else None
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    report = heal(student, None, heal_config(args, mode), teacher=teacher, device=args.device,
                  progress=not args.quiet)
    record = report.record
    row = {"mode": mode, "perplexity": evaluate(report.model, pruned.tokenizer, args),
           "steps": record["steps"], "tokens_trained": record["tokens_trained"],
           "epochs_over_data": round(record["epochs_over_data"], 3),
           "train_seconds": record["train_seconds_this_run"],
           "tokens_per_second": round(record["tokens_trained"] / max(record["train_seconds_this_run"], 1e-9)),
           "peak_gpu_memory_gib": record["peak_gpu_memory_gib"], **tenth_losses(record["losses"]),
           "losses": record["losses"], "trainable_parameters": record["lora"]["trainable_parameters"]}
    del report, student
    gc.collect()
    return row


def run(args) -> dict:
    torch.manual_seed(args.seed)
    dense = load_model(args.model, dtype=args.dtype, device=args.device)
    layers = len(dense.arch.layer_list(dense.model))
    log(f"{dense.source}: {layers} layers; evaluating the dense model")
    result = {"command": "python " + shlex.join(sys.argv), "machine": machine_info(args.device),
              "model": dense.source, "dtype": args.dtype, "remove": args.remove,
              "recipe": heal_config(args, "lora").model_dump(mode="json"), "eval_windows": args.eval_windows,
              "dense": {"layers": layers, "parameters": parameter_count(dense.model),
                        "perplexity": evaluate(dense.model, dense.tokenizer, args)},
              "methods": {}}
    for method in args.method:
        log(f"{method}: planning {layers} -> {layers - args.remove} layers")
        pruned, facts = prune(dense, method, args.remove, args)
        facts["perplexity"] = evaluate(pruned.model, pruned.tokenizer, args)
        log(f"{method}: {facts['plan']}; perplexity {facts['perplexity']}")
        facts["healed"] = []
        for mode in args.modes:
            log(f"{method}: healing ({mode})")
            row = run_mode(pruned, dense, mode, args)
            log(f"{method} + {mode}: {row['steps']} steps, {row['tokens_trained']:,} tokens, "
                f"{row['train_seconds']:.1f} s; perplexity {row['perplexity']}")
            facts["healed"].append(row)
        result["methods"][method] = facts
        del pruned
        gc.collect()
    return result


def _fmt(x: float) -> str:
    return f"{x:,.1f}" if x < 1e5 else f"{x:.3g}"


def markdown(res: dict, smoke: bool) -> str:
    sources = list(res["dense"]["perplexity"])
    recipe = res["recipe"]
    head = "| model | layers | " + " | ".join(f"{s} ppl" for s in sources) + \
        " | steps | tokens | train loss, first -> last tenth of steps | heal time (s) | tokens/s |"
    sep = "|" + "---|" * (head.count("|") - 1)
    rows = [f"| dense | {res['dense']['layers']} | " + " | ".join(_fmt(res['dense']['perplexity'][s])
                                                                  for s in sources) + " | - | - | - | - | - |"]
    for method, facts in res["methods"].items():
        rows.append(f"| {method} (no healing) | {facts['layers']} | " +
                    " | ".join(_fmt(facts['perplexity'][s]) for s in sources) + " | - | - | - | - | - |")
        for row in facts["healed"]:
            rows.append(f"| {method} + {row['mode']} | {facts['layers']} | " +
                        " | ".join(_fmt(row['perplexity'][s]) for s in sources) +
                        f" | {row['steps']} | {row['tokens_trained']:,} | {row['loss_first_tenth']:.3f} -> "
                        f"{row['loss_last_tenth']:.3f} | {row['train_seconds']:.1f} | {row['tokens_per_second']:,} |")
    plans = "\n".join(f"- {m}: {f['plan']}" for m, f in res["methods"].items())
    title = "# Recovery after pruning: LoRA vs distillation" + (" (CPU SMOKE RUN, not a result)" if smoke else "")
    warning = ("\n**A CPU smoke run proving the script works end to end; its figures are not the benchmark "
               "result.**\n" if smoke else "")
    machine = res["machine"]
    return f"""{title}
{warning}
    {res['command']}

Machine: {machine.get('gpu', 'CPU')} ({machine['platform']}), torch {machine['torch']}, transformers
{machine['transformers']}; model {res['model']} in {res['dtype']}.

Plans ({res['remove']} layers removed):
{plans}

Healing: LoRA rank {recipe['rank']}, alpha {recipe['alpha']}, dropout {recipe['dropout']} on every linear
projection of the decoder layers, lr {recipe['lr']}, {recipe['cutoff']}-token blocks, {recipe['batch_size']} x
{recipe['grad_accum']} blocks per step, data `{recipe['data']}`, seed {recipe['seed']}. `lora` minimises the
next-token loss; `distill` the KL to the dense model's next-token distribution (temperature
{recipe['temperature']}); `distill-hidden` adds final-hidden-state matching. Every healed row of one method
starts from the same pruned weights and trains on the same blocks in the same order. Training loss is
the quantity each mode minimises (cross-entropy for `lora`, KL for `distill`), so it does not compare
across modes; perplexity does. Perplexity: first {res['eval_windows']} non-overlapping 128-token windows, no
BOS.

{head}
{sep}
""" + "\n".join(rows) + "\n"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--method", action="append", help="planner (repeatable; default slm and shortgpt)")
    p.add_argument("--remove", type=int, default=10, help="decoder layers to remove (default 10 of 30: 35%%)")
    p.add_argument("--modes", default="lora,distill", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--data", default="books")
    p.add_argument("--max-tokens", type=int, default=None, help="token budget per healing run")
    p.add_argument("--max-steps", type=int, default=None, help="or a step budget")
    p.add_argument("--cutoff", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--grad-accum", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--hidden-weight", type=float, default=1.0, help="for the distill-hidden mode")
    p.add_argument("--calib-source", default="books")
    p.add_argument("--calib-samples", type=int, default=10)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--eval", default="wikitext2,ptb", help="perplexity sources, comma-separated")
    p.add_argument("--eval-windows", type=int, default=60)
    p.add_argument("--eval-batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--results", default=str(RESULTS), help="writes RESULTS.json and RESULTS.md")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    args.method = args.method or ["slm", "shortgpt"]
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    args.eval = [s.strip() for s in args.eval.split(",") if s.strip()]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown:
        p.error(f"unknown mode(s) {unknown}: choose from {', '.join(MODES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    start = time.perf_counter()
    res = run(args)
    res["seconds"] = round(time.perf_counter() - start, 1)
    smoke = not args.device.startswith("cuda")
    res["smoke_run"] = smoke
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    out.with_suffix(".md").write_text(markdown(res, smoke))
    log(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({res['seconds']} s)")


if __name__ == "__main__":
    main()
