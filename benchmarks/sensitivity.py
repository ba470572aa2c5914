"""Calibration sensitivity of the default `slm` and of ShortGPT on the embedded model (CPU).

Removes 20% of the layers (30 -> 24) with 10, 32 and 128 calibration samples of 128 tokens
of book text, and with 10 samples of WikiText-2; reports the plan and perplexity over the
first 60 windows of 128 tokens of PTB test and WikiText-2 test.  A row calibrated on
WikiText-2 test is not evaluated on WikiText-2 (calibration never overlaps evaluation).

    LAYERFOLD_WIKITEXT2=/path/wiki.test.raw python benchmarks/sensitivity.py > benchmarks/results/sensitivity.jsonl
"""

from __future__ import annotations

import copy
import json
import platform
import time

import torch

from layerfold import api
from layerfold.data.tokens import CalibrationConfig
from layerfold.evaluate.perplexity import perplexity
from layerfold.methods.base import Target

SETTINGS = [("books", 10), ("books", 32), ("books", 128), ("wikitext2", 10)]


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default="slm,shortgpt")
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--windows", type=int, default=60, help="perplexity windows per text (0: all)")
    parser.add_argument("--bos", action="store_true")
    args = parser.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(2)
    base = api.load_model(args.model, device=args.device)
    for spec in args.methods.split(";"):
        method, _, opts = spec.partition(":")  # e.g. "slm:selection=portfolio"
        options = dict(kv.split("=", 1) for kv in opts.split("+") if kv)
        for source, samples in SETTINGS:
            loaded = copy.deepcopy(base)
            calib = CalibrationConfig(source=source, samples=samples, seq_len=128, seed=1234)
            t0 = time.perf_counter()
            result = api.make_plan(loaded, method, Target(ratio=args.ratio), calib, options,
                                   progress=False)
            seconds = time.perf_counter() - t0
            api.apply_plan(loaded, result)
            where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"{platform.machine()} CPU"
            row = {"method": spec, "model": args.model or "SmolLM2-135M", "ratio": args.ratio,
                   "calib_source": source, "calib_samples": samples,
                   "plan": result.plan.summary(), "plan_seconds": round(seconds, 1),
                   "machine": f"{where}, torch {torch.__version__}"}
            windows = args.windows or None
            for text in ("ptb", "wikitext2", "lambada"):
                if text == source:
                    continue
                row[f"ppl/{text}@128x{windows or 'all'}"] = perplexity(
                    loaded.model, loaded.tokenizer, text, 128, bos=args.bos, max_windows=windows,
                    progress=False).perplexity
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
