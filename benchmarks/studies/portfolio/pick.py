"""Which score picks the portfolio candidate that validation perplexity prefers?

`heldout.py` recorded, for SmolLM2-135M and Gemma-3-270M at 20% and 35%, the
four candidate plans of the default `slm` (removed layers), their output-cosine score on the
calibration windows and their PTB-valid perplexity (`heldout.jsonl`).  This
script rebuilds the same calibration (10 x 128 book tokens, seed 1234) and scores every recorded
candidate with the engine's scores: the output cosine, the calibration loss, and the KL divergence
of the pruned model's next-token distributions from the original's (`SlmEngine.kl_removal`, the
default pick), plus top-1 agreement.  It prints one JSON line per candidate; a
score "agrees" in a case when its best candidate has the lowest PTB-valid perplexity.

    python benchmarks/studies/portfolio/pick.py --label SmolLM2-135M > rows.jsonl
    python benchmarks/studies/portfolio/pick.py --label /tmp/gemma/hf --model /tmp/gemma/hf >> rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from layerfold import api
from layerfold.calibrate import capture
from layerfold.data.tokens import CalibrationConfig, sample_windows
from layerfold.methods._common import calibration_loss, output_head

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
from quality.configs import require_lab  # noqa: E402

require_lab()  # the KL pick and the grid rescaling are benchmarks/lab's (LabEngine), no longer the package's
from lab import LabEngine as SlmEngine  # noqa: E402

RECORDED = Path(__file__).parent / "heldout.jsonl"


def top1(cache, outs) -> float:
    norm, head = cache.arch.final_norm_module(cache.model), output_head(cache)
    same = total = 0
    with torch.no_grad():
        for ref, out in zip(cache.inputs[cache.num_layers], outs, strict=True):
            same += int((head(norm(ref)).argmax(-1) == head(norm(out)).argmax(-1)).sum())
            total += ref.shape[0] * ref.shape[1]
    return same / total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    parser.add_argument("--label", required=True, help="the 'model' field of the recorded rows to score")
    args = parser.parse_args()
    rows = [json.loads(line) for line in RECORDED.read_text().splitlines()]
    rows = [r for r in rows if r["model"] == args.label]
    if not rows:
        raise SystemExit(f"no recorded candidates for {args.label!r} in {RECORDED}")
    base = api.load_model(args.model, device="cpu")
    tokens = sample_windows(base.tokenizer, CalibrationConfig(source="books", samples=10, seq_len=128, seed=1234))
    cache = capture(base.model, base.arch, tokens, progress=False)
    engine = SlmEngine(cache, "output-cosine", "base", "base")
    n = cache.num_layers
    for r in rows:
        removed = set(r["removed"])
        start = min(removed)
        outs = cache.run(start, [(cache.layers[i], i) for i in range(start, n) if i not in removed])
        print(json.dumps({"model": r["model"], "ratio": r["ratio"], "candidate": r["candidate"],
                          "removed": r["removed"], "cosine": engine.score_removal(removed),
                          "kl": engine.kl_removal(removed), "loss": calibration_loss(cache, outs),
                          "top1": top1(cache, outs), "ppl/ptb-valid@128": r["ppl/ptb-valid@128"],
                          "ppl_windows": r["ppl_windows"]}), flush=True)


if __name__ == "__main__":
    main()
