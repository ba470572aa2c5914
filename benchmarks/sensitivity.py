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
    torch.set_num_threads(2)
    base = api.load_model()
    for method in ("slm", "shortgpt"):
        for source, samples in SETTINGS:
            loaded = copy.deepcopy(base)
            calib = CalibrationConfig(source=source, samples=samples, seq_len=128, seed=1234)
            t0 = time.perf_counter()
            result = api.make_plan(loaded, method, Target(ratio=0.2), calib, progress=False)
            seconds = time.perf_counter() - t0
            api.apply_plan(loaded, result)
            row = {"method": method, "calib_source": source, "calib_samples": samples,
                   "plan": result.plan.summary(), "plan_seconds": round(seconds, 1),
                   "machine": f"{platform.machine()} CPU, torch {torch.__version__}"}
            for text in ("ptb", "wikitext2"):
                if text == source:
                    continue
                row[f"ppl/{text}@128x60"] = perplexity(loaded.model, loaded.tokenizer, text, 128, max_windows=60,
                                                       progress=False).perplexity
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
