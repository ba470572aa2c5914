"""Diagnose and tune SLM variants on the embedded model, on VALIDATION text only.

Calibration: 10 x 128 tokens of book text (LAMBADA calibration half), seed 1234.
Scored on PTB *valid* (never the test sets reported in quality.md): perplexity over the
first 40 windows of 128 tokens.  Each configuration prints one JSON line.

    python benchmarks/explore_slm.py --layers 24 --configs all > benchmarks/results/explore_slm.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json
import time

import torch

from layerfold import api
from layerfold.data.tokens import CalibrationConfig, sample_windows
from layerfold.evaluate.perplexity import perplexity
from layerfold.methods.base import Target

CONFIGS = {
    "paper": ("slm", {"selection": "sliding", "criterion": "output-cosine", "merge": "diff"}),
    "reference": ("slm", {"selection": "sliding", "criterion": "output-cosine", "merge": "reference"}),
    "sliding-base": ("slm", {"selection": "sliding", "criterion": "output-cosine", "merge": "base"}),
    "sliding-diff-fit": ("slm", {"selection": "sliding", "criterion": "output-cosine", "merge": "diff", "fit": "ridge"}),
    "sliding-base-fit": ("slm", {"selection": "sliding", "criterion": "output-cosine", "merge": "base", "fit": "ridge"}),
    "greedy-cos-base": ("slm", {"selection": "greedy", "criterion": "output-cosine", "merge": "base"}),
    "greedy-cos-diff": ("slm", {"selection": "greedy", "criterion": "output-cosine", "merge": "diff"}),
    "greedy-cos-mean": ("slm", {"selection": "greedy", "criterion": "output-cosine", "merge": "mean"}),
    "greedy-cos-base-fit": ("slm", {"selection": "greedy", "criterion": "output-cosine", "merge": "base", "fit": "ridge"}),
    "greedy-cos-diff-fit": ("slm", {"selection": "greedy", "criterion": "output-cosine", "merge": "diff", "fit": "ridge"}),
    "greedy-loss-base-fit": ("slm", {"selection": "greedy", "criterion": "loss", "merge": "base", "fit": "ridge"}),
    "optimal-base": ("slm", {"selection": "optimal", "merge": "base"}),
    "optimal-base-fit": ("slm", {"selection": "optimal", "merge": "base", "fit": "ridge"}),
    "optimal-diff-fit": ("slm", {"selection": "optimal", "merge": "diff", "fit": "ridge"}),
    "optimal-mean-fit": ("slm", {"selection": "optimal", "merge": "mean", "fit": "ridge"}),
    "shortgpt": ("shortgpt", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers", type=int, required=True, help="layers to keep")
    parser.add_argument("--configs", default="all")
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--windows", type=int, default=40)
    args = parser.parse_args()
    torch.manual_seed(0)
    base = api.load_model()
    calib = CalibrationConfig(source="books", samples=args.samples, seq_len=128, seed=1234)
    tokens = sample_windows(base.tokenizer, calib)
    names = list(CONFIGS) if args.configs == "all" else args.configs.split(",")
    for name in names:
        method, options = CONFIGS[name]
        loaded = copy.deepcopy(base)
        start = time.perf_counter()
        result = api.make_plan(loaded, method, Target(layers=args.layers), calib, options, progress=False,
                               tokens=tokens)
        seconds = time.perf_counter() - start
        api.apply_plan(loaded, result)
        ppl = perplexity(loaded.model, loaded.tokenizer, "ptb-valid", 128, max_windows=args.windows,
                         progress=False).perplexity
        print(json.dumps({"config": name, "layers": args.layers, "ptb_valid": round(ppl, 2),
                          "plan": result.plan.summary(), "seconds": round(seconds, 1)}), flush=True)


if __name__ == "__main__":
    main()
