"""Calibration sensitivity of the default `slm` and of a baseline (ShortGPT by default).

Removes ``--ratio`` of the layers (default 20%) with 10, 32 and 128 calibration samples of 128
tokens of book text, and with 10 samples of WikiText-2; reports the plan and perplexity over the
first ``--windows`` windows of 128 tokens (0: all) of PTB test, WikiText-2 test and LAMBADA.  A row
calibrated on WikiText-2 test is not evaluated on WikiText-2 (calibration never overlaps
evaluation).

    python3 benchmarks/sensitivity/run.py --device cuda --methods "slm;shortgpt" --windows 0 >> rows.jsonl
    python3 benchmarks/sensitivity/run.py --model GEMMA --bos --device cuda --windows 0 \
        --methods "slm;slm-lab:pick=kl+rescale=channels" >> rows.jsonl

Each row carries commit, date and machine; rows are committed in results.jsonl and report.py writes
RESULTS.md.  Method ``slm-lab`` (options measured and not adopted) comes from benchmarks/lab/."""

from __future__ import annotations

import copy
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

from layerfold import api
from layerfold.cli.options import method_options as _options
from layerfold.data.tokens import CalibrationConfig
from layerfold.evaluate.perplexity import perplexity
from layerfold.methods.base import Target

# calibration on evaluation text (wikitext2, ptb, lambada) is refused
SETTINGS = [("books", 10), ("books", 32), ("books", 128), ("ptb-train", 10)]
BENCHMARKS = Path(__file__).resolve().parents[1]


def git_commit() -> str | None:
    """The short commit of this checkout, or None outside git (pass --commit)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=BENCHMARKS).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def register_lab() -> None:
    """Method ``slm-lab`` from benchmarks/lab (quality.configs.require_lab: a clear error when it is missing)."""
    sys.path.insert(0, str(BENCHMARKS))
    from quality.configs import require_lab

    require_lab()


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--methods", default="slm;shortgpt",
                        help='";"-separated methods, each with "+"-joined options as --set takes them, '
                             'e.g. "slm:selection=greedy;slm-lab:refine=2;shortgpt"')
    parser.add_argument("--ratio", type=float, default=0.2)
    parser.add_argument("--windows", type=int, default=60, help="perplexity windows per text (0: all)")
    parser.add_argument("--bos", action="store_true")
    parser.add_argument("--commit", default=None, help="layerfold commit recorded in each row (default: git's HEAD)")
    args = parser.parse_args()
    commit, date = args.commit or git_commit(), time.strftime("%Y-%m-%d", time.gmtime())
    if args.device == "cpu":
        torch.set_num_threads(2)
    base = api.load_model(args.model, device=args.device)
    for spec in args.methods.split(";"):
        method, _, opts = spec.partition(":")  # e.g. "slm:selection=portfolio"
        if method == "slm-lab":
            register_lab()
        options = _options(re.split(r"\+(?=\w+=)", opts) if opts else [])  # "+" before key=, not in "channels+kl"
        for source, samples in SETTINGS:
            loaded = copy.deepcopy(base)
            calib = CalibrationConfig(source=source, samples=samples, seq_len=128, seed=1234)
            t0 = time.perf_counter()
            result = api.make_plan(loaded, method, Target(ratio=args.ratio), calib, options,
                                   progress=False)
            seconds = time.perf_counter() - t0
            api.apply_plan(loaded, result)
            where = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else f"{platform.machine()} CPU"
            machine = where.split(" (")[0] if args.device.startswith("cuda") else f"{os.cpu_count()}-core CPU"
            row = {"commit": commit, "date": date, "machine": machine, "device": f"{where}, torch {torch.__version__}",
                   "method": spec, "model": args.model or "SmolLM2-135M", "ratio": args.ratio,
                   "calib_source": source, "calib_samples": samples,
                   "plan": result.plan.summary(), "plan_seconds": round(seconds, 1)}
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
