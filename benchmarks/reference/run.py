"""``slm-reference`` beside the authors' own code on SmolLM2-135M, threshold by threshold.

The authors' code was run on the embedded SmolLM2-135M with 10 x 128 calibration tokens of PTB
train taken at tokens 0, 5000, ..., 45000 (``--calib-source ptb-train --calib-sampling strided``);
its figures are in ``AUTHORS`` below.  This script plans ``slm-reference`` with the same tokens at
each threshold, applies the plan and measures PTB test perplexity on the first 40 non-overlapping
windows of 128 tokens, no BOS (:func:`layerfold.evaluate.perplexity.perplexity`), once with the
weights as loaded (float32, dequantised from the embedded Q4_1 file) and once with every weight
rounded to bfloat16 and back (the authors' checkpoint was bfloat16); computation is float32 on
the CPU in both.

    nice python benchmarks/reference/run.py              # measure, append rows to results.jsonl, write RESULTS.md
    python benchmarks/reference/run.py --report-only     # RESULTS.md from results.jsonl

Each row carries commit, date, machine and command.  The thresholds of one weights variant share
one engine (``SharedEngine``): its memo is exact (a candidate's score depends only on the windows
already fused above it), so the decisions are those of separate runs and each candidate is scored
once; ``candidates`` counts the candidates a threshold scored that no earlier threshold had.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.jsonl"
REPORT = HERE / "RESULTS.md"
THRESHOLDS = (0.97, 0.95, 0.90, 0.99, 0.98, 0.96, 0.93, 0.85)  # the authors' three first
PTB_WINDOWS = 40
# the authors' code on the same model and calibration tokens (windows as fused layer ranges, base first)
AUTHORS = {0.97: {"windows": "one pair", "layers": 29, "ptb": 184.61},
           0.95: {"windows": None, "layers": 27, "ptb": 248.69},
           0.90: {"windows": [[25, 26], [27, 28]], "layers": 28, "ptb": 1328.22}}


def git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=HERE).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def rounded_to_bfloat16(model: torch.nn.Module) -> torch.nn.Module:
    """A copy whose every parameter is rounded to bfloat16 and stored back in float32."""
    out = copy.deepcopy(model)
    with torch.no_grad():
        for param in out.parameters():
            param.copy_(param.to(torch.bfloat16).to(param.dtype))
    return out


def shared_engine_method(options: dict, engines: dict):
    """``slm-reference`` with ``options``, its engine shared through ``engines`` (one per model)."""
    from layerfold.methods.slm import SlmReference

    class SharedEngine(SlmReference):
        def make_engine(self, ctx):
            key = id(ctx.model)
            if key not in engines:
                engines[key] = super().make_engine(ctx)
            return engines[key]

    return SharedEngine(**options)


def measure(thresholds: tuple[float, ...], weights: tuple[str, ...], out: Path) -> list[dict]:
    from layerfold import api
    from layerfold.data.tokens import CalibrationConfig, sample_windows
    from layerfold.evaluate.perplexity import perplexity
    from layerfold.methods.base import PlanContext, Target
    from layerfold.models.load import wrap_model

    torch.set_grad_enabled(False)
    loaded = api.load_model()
    calibration = CalibrationConfig(source="ptb-train", samples=10, seq_len=128, sampling="strided")
    tokens = sample_windows(loaded.tokenizer, calibration)
    base = {"commit": git_commit(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "machine": f"{os.cpu_count()}-core CPU ({platform.machine()}), torch {torch.__version__}",
            "command": " ".join(["python", *sys.argv]), "model": "SmolLM2-135M-Instruct (embedded)",
            "calibration": "ptb-train, 10 x 128 tokens at 0, 5000, ..., 45000",
            "ppl_protocol": f"PTB test, first {PTB_WINDOWS} windows of 128 tokens, no BOS"}
    rows = []

    def keep(row: dict) -> None:
        rows.append(row)
        with out.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)

    for kind in weights:
        model = loaded.model if kind == "float32" else rounded_to_bfloat16(loaded.model)
        variant = wrap_model(model, tokenizer=loaded.tokenizer, source=loaded.source)
        dense = perplexity(model, loaded.tokenizer, "ptb", max_windows=PTB_WINDOWS, progress=False)
        keep({**base, "weights": kind, "method": "dense", "threshold": None, "windows": [],
              "layers": len(variant.arch.layer_list(model)), "ppl/ptb": dense.perplexity})
        ctx = PlanContext(loaded=variant, calibration=calibration, target=Target(), progress=False,
                          tokens_override=tokens)
        engines: dict = {}
        scored = 0
        for threshold in thresholds:
            start = time.perf_counter()
            result = shared_engine_method({"threshold": threshold}, engines).plan(ctx)
            seconds = time.perf_counter() - start
            pruned = api.apply_plan(copy.deepcopy(model), result)
            ppl = perplexity(pruned, loaded.tokenizer, "ptb", max_windows=PTB_WINDOWS, progress=False)
            total = result.plan.scores["candidates_evaluated"]
            keep({**base, "weights": kind, "method": "slm-reference", "threshold": threshold,
                  "windows": [list(w) for w in sorted(result.plan.windows())], "layers": result.plan.num_layers_after,
                  "candidates": total - scored, "plan_seconds": round(seconds, 1), "ppl/ptb": ppl.perplexity})
            scored = total
            del pruned
    return rows


def windows_text(windows) -> str:
    if windows is None:
        return "-"
    if isinstance(windows, str):
        return windows
    return ", ".join(f"({lo}-{hi})" for lo, hi in sorted(windows, reverse=True)) or "none"


def report(rows: list[dict]) -> str:
    lines = ["# slm-reference beside the authors' code: results", "",
             "Generated by `python benchmarks/reference/run.py --report-only` from `results.jsonl`; do not edit "
             "by hand. SmolLM2-135M-Instruct (embedded), calibration 10 x 128 tokens of PTB train at tokens 0, "
             "5000, ..., 45000; PTB test perplexity on the first 40 windows of 128 tokens, no BOS; float32 "
             "computation on the CPU. The authors' columns are their code's figures on the same model and tokens "
             "(its checkpoint was bfloat16). A window (lo-hi) is fused into one layer.", ""]
    for kind in sorted({r["weights"] for r in rows}, key=lambda k: k != "bfloat16-rounded"):
        group = [r for r in rows if r["weights"] == kind]
        latest = {}
        for r in group:  # the last row of each threshold
            latest[r["threshold"]] = r
        lines += [f"## Weights: {kind}", "",
                  "| threshold | windows | layers | PTB | authors' windows | authors' layers | authors' PTB | "
                  "new candidates | plan s | commit | date | machine |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for threshold in sorted(latest, key=lambda t: -1 if t is None else -t):
            r = latest[threshold]
            theirs = AUTHORS.get(threshold, {})
            lines.append(f"| {'dense' if threshold is None else f'{threshold:.2f}'} | {windows_text(r['windows'])} "
                         f"| {r['layers']} | {r['ppl/ptb']:.2f} | {windows_text(theirs.get('windows'))} | "
                         f"{theirs.get('layers', '-')} | {theirs.get('ptb', '-')} | {r.get('candidates', '-')} | "
                         f"{r.get('plan_seconds', '-')} | {r['commit']} | {r['date']} | {r['machine']} |")
        lines.append("")
    commands = sorted({r["command"] for r in rows})
    lines += ["Commands: " + "; ".join(f"`{c}`" for c in commands), ""]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report-only", action="store_true", help="only write RESULTS.md from results.jsonl")
    parser.add_argument("--thresholds", default=",".join(str(t) for t in THRESHOLDS))
    parser.add_argument("--weights", default="bfloat16-rounded,float32",
                        help="comma-separated: bfloat16-rounded, float32")
    args = parser.parse_args()
    if not args.report_only:
        weights = tuple(w.strip() for w in args.weights.split(",") if w.strip())
        unknown = set(weights) - {"bfloat16-rounded", "float32"}
        if unknown:
            parser.error(f"unknown weights {sorted(unknown)}: bfloat16-rounded or float32")
        measure(tuple(float(t) for t in args.thresholds.split(",")), weights, RESULTS)
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    REPORT.write_text(report(rows))


if __name__ == "__main__":
    main()
