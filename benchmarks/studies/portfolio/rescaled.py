"""Would the portfolio pick better if it compared its candidates after rescaling them?

The default `slm` picks among its candidate plans (greedy fold, optimal windows, lowest block
influence, closest angular block) by the output cosine, then rescales the winner's windows
(`rescale=kl`).  This script rescales *every* candidate and scores each rescaled model on the
calibration tokens (10 x 128 book tokens, seed 1234) by the output cosine (final hidden states after
the final norm) and by KL(original || pruned) of next-token distributions, and measures its
PTB-valid perplexity (validation text; never a test set), so one can see whether scoring after
rescaling would agree with validation.  One JSON line per candidate.

    python benchmarks/studies/portfolio/rescaled.py --ratio 0.35 >> benchmarks/studies/portfolio/rescaled.jsonl
    python benchmarks/studies/portfolio/rescaled.py --model GEMMA_FOLDER --bos --ratio 0.2 --device cuda >> ...
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import torch

from layerfold import api
from layerfold.calibrate import capture
from layerfold.data.tokens import CalibrationConfig, sample_windows
from layerfold.evaluate.perplexity import perplexity
from layerfold.methods.slm import portfolio_candidates, windows_of
from layerfold.plan import Operation, Plan

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
from quality.configs import require_lab  # noqa: E402

require_lab()  # the KL pick and the grid rescaling are benchmarks/lab's (LabEngine), no longer the package's
from lab import LabEngine as SlmEngine  # noqa: E402


@torch.no_grad()
def final_states(model, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Last hidden states (after the final norm) and log-probabilities on ``tokens``."""
    out = model(tokens.to(next(model.parameters()).device), output_hidden_states=True)
    return out.hidden_states[-1].float(), torch.log_softmax(out.logits.float(), -1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ratio", type=float, default=0.35)
    parser.add_argument("--bos", action="store_true")
    parser.add_argument("--windows", type=int, default=None, help="PTB-valid windows (default: all)")
    args = parser.parse_args()
    base = api.load_model(args.model, device=args.device)
    tokens = sample_windows(base.tokenizer, CalibrationConfig(source="books", samples=10, seq_len=128, seed=1234))
    cache = capture(base.model, base.arch, tokens, progress=False)
    n = cache.num_layers
    budget = round(args.ratio * n)
    engine = SlmEngine(cache, "output-cosine", "base", "base")
    ref_states, ref_logp = final_states(base.model, tokens)
    for name, removed in portfolio_candidates(engine, cache, budget, progress=False).items():
        windows = windows_of(removed)
        factors, kl_before, kl_after = engine.rescale(windows, progress=False)
        row = {"model": args.model or "SmolLM2-135M", "ratio": args.ratio, "candidate": name,
               "cosine_before": engine.score_removal(removed), "kl_before": kl_before, "kl_after": kl_after,
               "factors": {f"{lo}-{hi}": f for (lo, hi), f in factors.items()}}
        for scaled in (False, True):
            ops = [Operation("fuse", lo, hi, detail={"branch_scale": factors[(lo, hi)]} if scaled and
                             factors[(lo, hi)] != 1.0 else {}) for lo, hi in windows]
            plan = Plan(method="slm", num_layers=n, operations=ops, merge={"operator": "base", "norms": "base"})
            model = copy.deepcopy(base)
            api.apply_plan(model, plan)
            states, logp = final_states(model.model, tokens)
            tag = "after" if scaled else "before"
            cos = torch.nn.functional.cosine_similarity(states.reshape(len(tokens), -1),
                                                        ref_states.reshape(len(tokens), -1), dim=-1).mean()
            row[f"cosine_{tag}_check"] = float(cos)
            row[f"kl_{tag}_check"] = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
            row[f"ptb_valid_{tag}"] = perplexity(model.model, model.tokenizer, "ptb-valid", 128, bos=args.bos,
                                                 max_windows=args.windows, progress=False).perplexity
            row["plan"] = plan.summary()
            del model
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
