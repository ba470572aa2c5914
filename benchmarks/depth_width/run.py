"""Depth only, width only, and depth plus width at the same parameter budget, on the embedded
SmolLM2-135M (CPU).

For each overall budget P (share of ALL parameters removed, embeddings included) the model is
pruned at every split D in --splits (D = share of the removed parameters taken by depth:
0 = width only, 1 = depth only), through ``layerfold.width.depth_width_prune(split="auto")``,
which prunes a copy per split and keeps the lowest loss on held-out calibration windows;
every candidate is also scored here on the evaluation sets so that the table shows all
splits and which one the calibration loss picked (the evaluation sets never steer a choice).

Measured: perplexity = exp(mean token NLL) over the first 60 non-overlapping 128-token windows
(no BOS) of WikiText-2 raw test and PTB test (lines joined by spaces), float32, CPU.
No recovery training.  Depth: --method (default slm) with ``Target(param_ratio=D * P)``;
width: wanda-sp importance, whole KV groups, uniform widths, MLP width a multiple of 8.

    LAYERFOLD_WIKITEXT2=/path/wiki.test.raw python benchmarks/depth_width/run.py --out depth_width

writes ``depth_width.json`` (the record) and prints its markdown; the committed record is a row of
results.jsonl (``kind: cpu-run``) and report.py writes RESULTS.md from it and the GPU rows (run_gpu.py).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

from layerfold import api
from layerfold.cli.options import method_options as _options
from layerfold.data.tokens import CalibrationConfig
from layerfold.evaluate.perplexity import perplexity
from layerfold.models.arch import parameter_count
from layerfold.width import depth_width_prune, shrink

SOURCES = ("wikitext2", "ptb")


def machine() -> dict:
    import transformers

    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout.splitlines()[:10]
    except OSError:
        lscpu = []
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "lscpu_head": lscpu}


def git_commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=False).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "src"], capture_output=True, text=True,
                               check=False).stdout
    except OSError:
        return "unknown"
    return head.strip() + (" (src/ has uncommitted changes)" if dirty.strip() else "")


def evaluate(loaded, windows: int) -> dict[str, float]:
    return {s: perplexity(loaded.model, loaded.tokenizer, s, seq_len=128, max_windows=windows,
                          progress=False).perplexity for s in SOURCES}


def row_of(loaded, before: int, label: str, windows: int, **extra) -> dict:
    params = parameter_count(loaded.model)
    cfg = loaded.model.config
    row = {"label": label, "layers": len(loaded.arch.layer_list(loaded.model)), "params": params,
           "removed": round(1 - params / before, 4), "intermediate_size": cfg.intermediate_size,
           "heads": f"{cfg.num_attention_heads}/{cfg.num_key_value_heads}", **extra}
    start = time.perf_counter()
    row["perplexity"] = evaluate(loaded, windows)
    row["eval_seconds"] = round(time.perf_counter() - start, 1)
    print(json.dumps(row), flush=True)
    return row


def run_budget(base, ratio: float, splits: list[float], method: str, options: dict, calib: CalibrationConfig,
               held_out: int, windows: int, before: int) -> dict:
    rows: list[dict] = []

    def on_candidate(cand, trial) -> None:
        rows.append(row_of(trial, before, f"split {cand.split}", windows, split=cand.split,
                           heldout_nll=round(cand.heldout_nll, 4), attention=cand.attention,
                           depth_plan=cand.depth_plan, depth_options=cand.depth_options,
                           attention_search=cand.attention_search,
                           seconds_since_start=round(time.perf_counter() - start, 1)))

    loaded = copy.deepcopy(base)
    start = time.perf_counter()
    result = depth_width_prune(loaded, ratio, split="auto", method=method, calibration=calib, options=options,
                               splits=splits, held_out=held_out, progress=False, on_candidate=on_candidate)
    errors = [{"split": c.split, "error": c.error} for c in result.candidates if c.error]
    return {"param_ratio": ratio, "chosen_split": result.split, "rows": rows, "errors": errors,
            "depth_plan": result.depth.plan.summary() if result.depth else None,
            "total_seconds": round(time.perf_counter() - start, 1)}


def width_variants(base, ratio: float, calib: CalibrationConfig, windows: int, before: int,
                   variants: list[str]) -> list[dict]:
    """Width only at the same budget with other importances / attention modes (for the docs)."""
    rows = []
    for variant in variants:
        importance, attention = variant.split(":")
        loaded = copy.deepcopy(base)
        plan = shrink(loaded, params=round(ratio * before), calibration=calib, importance=importance,
                      attention=attention, progress=False)
        rows.append(row_of(loaded, before, f"width only, {importance}, attention {attention}", windows,
                           importance=importance, attention=attention, chosen_attention=plan.attention,
                           attention_search=plan.target.get("attention_search"), param_ratio=ratio))
    return rows


def markdown(record: dict) -> str:
    m = record["machine"]
    lines = [
        "# Depth, width, and depth plus width at one parameter budget (SmolLM2-135M, CPU)", "",
        "What is measured: perplexity = exp(mean token NLL) over the first "
        f"{record['windows']} non-overlapping 128-token windows (no BOS, float32) of WikiText-2 raw test and "
        "PTB test (lines joined by spaces). No recovery training. Budgets are shares of ALL parameters "
        "(embeddings included, tied embeddings counted once). `split` = share of the removed parameters taken "
        "by depth (0: width only, 1: depth only); depth rounds up to whole layers, width takes the rest. "
        f"Depth: `{record['method']}` (options {json.dumps(record['method_options'] or 'default')}; as validated: "
        f"`{json.dumps(record['depth_options'])}`) planned with `Target(param_ratio=split * P)`; width: "
        "wanda-sp importance, one width for all layers, kept MLP width a multiple of 8, attention `auto` (the "
        "share between attention and MLP with the lowest held-out calibration loss among: no attention, "
        "whole KV groups, query heads in every group; column `attention`). "
        f"Calibration: {record['calibration']['samples']} x {record['calibration']['seq_len']} tokens of "
        f"`{record['calibration']['source']}` (seed {record['calibration']['seed']}); the split marked **auto** is "
        f"the one `--split auto` picks: lowest NLL on {record['held_out']} held-out windows of the same "
        "calibration source (evaluation sets never steer a choice).", "",
        f"Command: `{record['command']}` (layerfold commit {record['layerfold_commit']})", "",
        f"Machine: {m['platform']}, {m['cpu_count']} CPUs (shared), torch {m['torch']}, transformers "
        f"{m['transformers']}, python {m['python']}.", "",
        "```", *m["lscpu_head"], "```", "",
        "| budget | split | layers | attention | heads (q/kv) | MLP width | params | removed | held-out NLL | "
        "WikiText-2 | PTB |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    d = record["dense"]
    lines.append(f"| dense | - | {d['layers']} | - | {d['heads']} | {d['intermediate_size']} | {d['params']:,} | 0 | "
                 f"{record['dense_heldout_nll']:.4f} | {d['perplexity']['wikitext2']:.1f} | "
                 f"{d['perplexity']['ptb']:.1f} |")
    for budget in record["budgets"]:
        for r in budget["rows"]:
            auto = " **auto**" if r["split"] == budget["chosen_split"] else ""
            name = {0.0: " (width only)", 1.0: " (depth only)"}.get(r["split"], "")
            lines.append(f"| {budget['param_ratio']:.0%} | {r['split']}{name}{auto} | {r['layers']} | "
                         f"{r['attention'] or '-'} | {r['heads']} | "
                         f"{r['intermediate_size']} | {r['params']:,} | {r['removed']:.1%} | {r['heldout_nll']:.4f} | "
                         f"{r['perplexity']['wikitext2']:.1f} | {r['perplexity']['ptb']:.1f} |")
        for e in budget["errors"]:
            lines.append(f"| {budget['param_ratio']:.0%} | {e['split']} | - | - | - | - | - | - | {e['error']} | - "
                         "| - |")
    if record.get("variants"):
        lines += ["", "Width only, other importances and attention modes (same budgets):", "",
                  "| budget | importance | attention (chosen) | heads (q/kv) | MLP width | removed | WikiText-2 "
                  "| PTB |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in record["variants"]:
            chosen = f" ({r['chosen_attention']})" if r["attention"] == "auto" else ""
            lines.append(f"| {r['param_ratio']:.0%} | {r['importance']} | {r['attention']}{chosen} | {r['heads']} | "
                         f"{r['intermediate_size']} | {r['removed']:.1%} | {r['perplexity']['wikitext2']:.1f} | "
                         f"{r['perplexity']['ptb']:.1f} |")
    lines += ["", f"Total wall time {record['seconds']:.0f} s on a CPU shared with other jobs (timings not "
              "comparable).", ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratios", default="0.2,0.35")
    parser.add_argument("--splits", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--method", default="slm")
    parser.add_argument("--set", dest="options", action="append", default=[],
                        help="depth method option key=value (JSON value), repeatable")
    parser.add_argument("--windows", type=int, default=60)
    parser.add_argument("--held-out", type=int, default=16)
    parser.add_argument("--variants", default="flap:auto,taylor:auto,wanda-sp:groups,wanda-sp:query-heads",
                        help="width-only variants importance:attention ('' for none)")
    parser.add_argument("--out", type=Path, default=Path("depth_width"), help="writes OUT.json")
    args = parser.parse_args()
    start = time.perf_counter()
    torch.manual_seed(0)
    base = api.load_model()
    calib = CalibrationConfig()
    before = parameter_count(base.model)
    from layerfold.evaluate.perplexity import perplexity_of_windows
    from layerfold.width import held_out_windows

    heldout = held_out_windows(base.tokenizer, calib, args.held_out)
    options = _options(args.options)
    wikitext = os.environ.get("LAYERFOLD_WIKITEXT2")
    command = (f"LAYERFOLD_WIKITEXT2={wikitext} " if wikitext else "") + "python " + shlex.join(sys.argv)
    record = {"command": command, "machine": machine(),
              "layerfold_commit": git_commit(), "method": args.method, "method_options": options,
              "windows": args.windows, "held_out": args.held_out,
              "calibration": calib.describe(),
              "dense_heldout_nll": perplexity_of_windows(base.model, heldout, bos=False, progress=False)[0],
              "dense": row_of(base, before, "dense", args.windows), "budgets": [], "variants": []}
    splits = [float(s) for s in args.splits.split(",")]
    ratios = [float(r) for r in args.ratios.split(",")]
    partial = args.out.with_suffix(".partial.json")
    partial.parent.mkdir(parents=True, exist_ok=True)
    for ratio in ratios:
        record["budgets"].append(run_budget(base, ratio, splits, args.method, options, calib, args.held_out,
                                            args.windows, before))
        partial.write_text(json.dumps(record, indent=1) + "\n")  # a long run keeps what it has measured
    variants = [v for v in args.variants.split(",") if v]
    for ratio in ratios:
        record["variants"] += width_variants(base, ratio, calib, args.windows, before, variants)
    record["depth_options"] = next((r["depth_options"] for b in record["budgets"] for r in b["rows"]
                                    if r.get("depth_options")), None)
    record["seconds"] = round(time.perf_counter() - start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(record, indent=1) + "\n")
    partial.unlink(missing_ok=True)
    print(markdown(record))


if __name__ == "__main__":
    main()
