"""Does scoring the portfolio's candidates on held-out windows pick better plans?

The default `slm` builds four candidate plans on the calibration windows and keeps the one whose
pruned model's output is closest (cosine) to the dense model's, on those same windows.  The greedy
candidate was itself chosen by that score on those windows, so its score is biased upwards.  This
script scores every candidate on both the calibration windows (10 x 128 book tokens, seed 1234) and
32 held-out windows of the same book text (disjoint from the calibration windows), and prints the
PTB-valid perplexity of each candidate: the validation text the defaults are chosen on.

    python benchmarks/studies/portfolio/heldout.py --model FOLDER --ratios 0.2,0.35 [--bos] > rows.jsonl
"""

from __future__ import annotations

import argparse
import copy
import json

import torch

from layerfold import api
from layerfold.calibrate import capture
from layerfold.data.tokens import CalibrationConfig, sample_windows
from layerfold.evaluate.perplexity import perplexity
from layerfold.methods.base import Target
from layerfold.methods.slm import SlmEngine, portfolio_candidates, windows_of
from layerfold.plan import Operation, Plan
from layerfold.width import held_out_windows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ratios", default="0.2,0.35")
    parser.add_argument("--held-out", type=int, default=32)
    parser.add_argument("--ppl-windows", type=int, default=None)
    parser.add_argument("--bos", action="store_true")
    args = parser.parse_args()
    base = api.load_model(args.model, device=args.device)
    calib = CalibrationConfig(source="books", samples=10, seq_len=128, seed=1234)
    tokens = sample_windows(base.tokenizer, calib)
    held = held_out_windows(base.tokenizer, calib, args.held_out)
    cache = capture(base.model, base.arch, tokens, progress=False)
    held_cache = capture(base.model, base.arch, held, progress=False)
    n = cache.num_layers
    for ratio in (float(r) for r in args.ratios.split(",")):
        budget = Target(ratio=ratio).layers_to_remove(base.model, n, 0)
        engine = SlmEngine(cache, "output-cosine", "base", "base")
        candidates = portfolio_candidates(engine, cache, budget, progress=False)
        held_engine = SlmEngine(held_cache, "output-cosine", "base", "base")
        for name, removed in candidates.items():
            loaded = copy.deepcopy(base)
            ops = [Operation("fuse", lo, hi) for lo, hi in windows_of(removed)]
            plan = Plan(method="slm", num_layers=n, operations=ops,
                        merge={"operator": "base", "norms": "base", "scale": 1.0})
            api.apply_plan(loaded, plan)
            valid = perplexity(loaded.model, loaded.tokenizer, "ptb-valid", 128, bos=args.bos,
                               max_windows=args.ppl_windows, progress=False).perplexity
            print(json.dumps({"model": args.model or "SmolLM2-135M", "ratio": ratio, "candidate": name,
                              "removed": sorted(removed), "score_calibration": engine.score_removal(removed),
                              "score_held_out": held_engine.score_removal(removed), "ppl/ptb-valid@128": valid,
                              "ppl_windows": args.ppl_windows or "all", "bos": args.bos}), flush=True)
            del loaded
        torch.cuda.empty_cache() if torch.cuda.is_available() else None


if __name__ == "__main__":
    main()
