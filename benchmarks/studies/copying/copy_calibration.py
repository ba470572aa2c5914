"""Does the default keep more in-context copying if its calibration windows show some?

``induction_probe.py`` found that the layers the default folds at SmolLM2 20% (13-18) carry most
of the model's copying of a repeated sequence. The calibration text (10 x 128 tokens of book
passages) almost never repeats itself, so the output cosine that chooses the windows cannot see
that loss. This experiment adds, beside each calibration window, the same window's first half
shown twice (no new text: the same 10 x 128 tokens), and plans again. For each plan it records
PTB-valid perplexity over the first ``--windows`` 128-token windows and the copying probe.

    python benchmarks/studies/copying/copy_calibration.py --ratios 0.2,0.35 \\
        --out benchmarks/studies/copying/copy_calibration.jsonl
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import torch

from layerfold import api
from layerfold.data.tokens import CalibrationConfig, sample_windows
from layerfold.evaluate.perplexity import perplexity
from layerfold.methods.base import Target

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
from studies.copying.induction_probe import probe_sequences, record  # noqa: E402


def with_repeats(tokens: torch.Tensor) -> torch.Tensor:
    """``tokens`` followed by, for each window, its first half twice (same length)."""
    half = tokens[:, : tokens.shape[1] // 2]
    return torch.cat([tokens, torch.cat([half, half], dim=1)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--bos", action="store_true")
    parser.add_argument("--ratios", default="0.2,0.35")
    parser.add_argument("--variants", default="books,books+repeats")
    parser.add_argument("--windows", type=int, default=None, help="PTB-valid windows (default all)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    base = api.load_model(args.model)
    calib = CalibrationConfig(source="books", samples=10, seq_len=128, seed=1234)
    tokens = sample_windows(base.tokenizer, calib)
    probes = probe_sequences(base.tokenizer, 64, 48, 7, args.bos)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for variant in args.variants.split(","):
            loaded = copy.deepcopy(base)
            t0 = time.perf_counter()
            used = with_repeats(tokens) if variant == "books+repeats" else tokens
            result = api.make_plan(loaded, "slm", Target(ratio=ratio), calib, {}, progress=False, tokens=used)
            seconds = time.perf_counter() - t0
            api.apply_plan(loaded, result)
            ppl = perplexity(loaded.model, loaded.tokenizer, "ptb-valid", 128, bos=args.bos, batch_size=8,
                             max_windows=args.windows, progress=False).perplexity
            record({"variant": variant, "ratio": ratio, "plan": result.plan.summary(),
                    "pick": result.plan.scores.get("portfolio_pick"), "prune_seconds": round(seconds, 1),
                    "ppl/ptb-valid@128": ppl, "windows": args.windows}, loaded.model, probes, args.out)


if __name__ == "__main__":
    main()
