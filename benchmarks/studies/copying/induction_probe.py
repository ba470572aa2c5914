"""Copying from context, probed cheaply: does a pruned model still continue a repeated sequence?

The zero-shot validation tasks put ShortGPT's plans ahead of layerfold's default on multiple-choice validation tasks
while far behind on perplexity, with the widest gap on SciQ, whose prompt holds a passage that
contains the answer (benchmarks/quality/). One hypothesis: the default's contiguous middle windows take out
more of the model's in-context copying (induction) than single layers spread over the depth do. This
probe measures that directly, without lm-evaluation-harness: sequences of ``--length`` tokens are
shown twice in a row, and on the second copy the model should predict each next token from the
first. Two kinds of sequence: *natural* (windows of PTB train text, never evaluation text) and
*random* (tokens drawn uniformly from those windows' tokens, so only copying can predict them).
For each, the second copy's mean NLL and top-1 accuracy (the first token of the copy excluded).

    python benchmarks/studies/copying/induction_probe.py --configs dense,slm,shortgpt,sleb,angular --ratios 0.2,0.35 \\
        --out benchmarks/studies/copying/induction_probe.jsonl

``--drop-each`` instead removes one layer at a time (every layer in turn), to see where copying lives;
``--bos`` puts one BOS token before each row (Gemma); ``--table FILE`` prints a file's rows (this
script's or copy_calibration.py's) as markdown. Results: README.md beside this file.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

from layerfold import api
from layerfold.data.tokens import CalibrationConfig, sample_windows
from layerfold.methods.base import PlanResult
from layerfold.plan import Operation, Plan

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
from quality.run import plan_config  # noqa: E402


def probe_sequences(tokenizer, samples: int, length: int, seed: int, bos: bool = False) -> dict[str, torch.Tensor]:
    """``samples`` x (2 * ``length``) token ids: each row a sequence followed by itself (after one BOS
    token with ``bos``, which Gemma needs)."""
    natural = sample_windows(tokenizer, CalibrationConfig(source="ptb-train", samples=samples, seq_len=length,
                                                          seed=seed))
    vocab = natural.unique()
    g = torch.Generator().manual_seed(seed)
    random = vocab[torch.randint(len(vocab), (samples, length), generator=g)]
    first = torch.full((samples, 1), tokenizer.bos_token_id, dtype=natural.dtype) if bos else natural[:, :0]
    return {name: torch.cat([first, seq, seq], dim=1) for name, seq in [("natural", natural), ("random", random)]}


@torch.no_grad()
def copy_scores(model, ids: torch.Tensor, batch: int = 16) -> dict[str, float]:
    """Mean NLL and top-1 accuracy over the second copy, its first token excluded (a leading BOS, when
    the rows have an odd length, is not part of either copy)."""
    start = ids.shape[1] // 2 + ids.shape[1] % 2  # where the second copy starts
    nll, hits, count = 0.0, 0, 0
    for first in range(0, len(ids), batch):
        chunk = ids[first:first + batch].to(next(model.parameters()).device)
        logits = model(chunk).logits.float()
        pred, target = logits[:, start:-1], chunk[:, start + 1:]
        nll += torch.nn.functional.cross_entropy(pred.reshape(-1, pred.shape[-1]), target.reshape(-1),
                                                 reduction="sum").item()
        hits += (pred.argmax(-1) == target).sum().item()
        count += target.numel()
    return {"nll": nll / count, "top1": hits / count}


def record(row: dict, model, probes: dict[str, torch.Tensor], out: str) -> None:
    """``row`` with ``model``'s copy scores on each probe, appended to ``out`` as a JSON line and printed."""
    for kind, ids in probes.items():
        for metric, value in copy_scores(model, ids).items():
            row[f"{kind}/{metric}"] = value
    with open(out, "a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row), flush=True)


def table(path: str) -> str:
    """A markdown table of the rows in ``path`` (this script's or copy_calibration.py's)."""
    rows = [json.loads(line) for line in open(path)]
    if all(r.get("config", "").startswith("drop ") for r in rows):  # --drop-each: one column per layer
        return "\n".join([
            "| layer removed | " + " | ".join(r["config"].split()[1] for r in rows) + " |",
            "|---" * (len(rows) + 1) + "|",
            "| natural: top-1 % | " + " | ".join(f"{100 * r['natural/top1']:.0f}" for r in rows) + " |",
            "| random: top-1 % | " + " | ".join(f"{100 * r['random/top1']:.0f}" for r in rows) + " |"])
    lines = ["| configuration | ratio | plan | natural: top-1 % | natural: NLL | random: top-1 % | random: NLL |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r.get("config") or r.get("variant")
        extra = f" (PTB-valid {r['ppl/ptb-valid@128']:.1f})" if "ppl/ptb-valid@128" in r else ""
        lines.append(f"| {name} | {r['ratio']} | {r['plan']}{extra} | {100 * r['natural/top1']:.1f} | "
                     f"{r['natural/nll']:.2f} | {100 * r['random/top1']:.1f} | {r['random/nll']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bos", action="store_true", help="a BOS token before each probe row (Gemma)")
    parser.add_argument("--configs", default="dense,slm,shortgpt,sleb,angular")
    parser.add_argument("--ratios", default="0.2,0.35")
    parser.add_argument("--samples", type=int, default=64)
    parser.add_argument("--length", type=int, default=48)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--drop-each", action="store_true", help="one row per single removed layer instead")
    parser.add_argument("--table", default=None, help="print a markdown table of this file's rows and stop")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.table:
        print(table(args.table))
        return
    if not args.out:
        parser.error("--out is required")
    base = api.load_model(args.model, device=args.device)
    calib = CalibrationConfig(source="books", samples=10, seq_len=128, seed=1234)  # the benchmark's calibration
    tokens = sample_windows(base.tokenizer, calib)
    probes = probe_sequences(base.tokenizer, args.samples, args.length, args.seed, args.bos)
    n = len(base.arch.layer_list(base.model))
    if args.drop_each:
        jobs = [(f"drop {i}", None, PlanResult(Plan("drop-each", n, [Operation("drop", i, i)]), {}))
                for i in range(n)]
    else:
        jobs = [(name, ratio, None) for name in args.configs.split(",")
                for ratio in ([0.0] if name == "dense" else [float(r) for r in args.ratios.split(",")])]
    for name, ratio, given in jobs:
        loaded = copy.deepcopy(base)
        plan = "-"
        t0 = time.perf_counter()
        if given is not None:
            api.apply_plan(loaded, given)
            plan = given.plan.summary()
        elif name != "dense":
            result = plan_config(loaded, name, ratio, calib, tokens)
            api.apply_plan(loaded, result)
            plan = result.plan.summary()
        record({"config": name, "ratio": ratio, "plan": plan, "seconds": round(time.perf_counter() - t0, 1),
                "samples": args.samples, "length": args.length, "seed": args.seed}, loaded.model, probes, args.out)
        del loaded


if __name__ == "__main__":
    main()
