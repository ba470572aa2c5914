"""Does a rescaling factor chosen on the calibration KL hold on both halves of the calibration set?

A check of the then default's `rescale=kl` (which takes, per window, the grid factor with the
lowest KL over all 10 calibration samples).  For the portfolio's picked candidate (and the optimal
windows), window by window as the engine goes, it prints the KL of each half (samples 0-4, 5-9) at
factor 1 and at the chosen factor, and the factor a guard would keep: the best one that lowers the
KL on both halves.  ``--eval`` instead measures PTB-valid perplexity (validation text, all windows)
of SmolLM2 plans written as ``"3-7;12-14;15-18x0.9;24-25x1.1"`` (window, optional factor).

    python benchmarks/studies/rescale_guard/rescale_guard.py --ratio 0.35
    python benchmarks/studies/rescale_guard/rescale_guard.py --model GEMMA_FOLDER --ratio 0.35
    python benchmarks/studies/rescale_guard/rescale_guard.py --eval "3-7;12-14;15-18x0.9;24-25x1.1"
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
from layerfold.merge import scale_branches
from layerfold.methods._common import _logits
from layerfold.methods.slm import SlmEngine, portfolio_candidates, windows_of
from layerfold.plan import Operation, Plan

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/
from quality.configs import require_lab  # noqa: E402

require_lab()  # the KL pick and the grid rescaling are benchmarks/lab's (LabEngine), no longer the package's
from lab import RESCALE_GRID  # noqa: E402


@torch.no_grad()
def per_sample_kl(cache, outs) -> torch.Tensor:
    norm, n, vals = cache.arch.final_norm_module(cache.model), cache.num_layers, []
    for ref, out in zip(cache.inputs[n], outs, strict=True):
        width = ref.shape[-1]
        p = torch.log_softmax(_logits(cache, norm(ref).reshape(-1, width)), -1)
        q = torch.log_softmax(_logits(cache, norm(out).reshape(-1, width)), -1)
        vals += (p.exp() * (p - q)).sum(-1).reshape(ref.shape[0], -1).mean(-1).tolist()
    return torch.tensor(vals)


def evaluate(base, specs: list[str]) -> None:
    n = len(base.arch.layer_list(base.model))
    for spec in specs:
        ops = []
        for part in spec.split(";"):
            window, _, factor = part.partition("x")
            lo, hi = map(int, window.split("-"))
            ops.append(Operation("fuse", lo, hi, detail={"branch_scale": float(factor)} if factor else {}))
        plan = Plan(method="slm", num_layers=n, operations=ops, merge={"operator": "base", "norms": "base"})
        model = copy.deepcopy(base)
        api.apply_plan(model, plan)
        ppl = perplexity(model.model, model.tokenizer, "ptb-valid", 128, progress=False).perplexity
        print(json.dumps({"plan": plan.summary(), "ptb_valid": ppl}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--ratio", type=float, default=0.35)
    parser.add_argument("--eval", nargs="*", default=None, help="plans to measure on PTB-valid instead")
    args = parser.parse_args()
    base = api.load_model(args.model, device="cpu")
    if args.eval:
        evaluate(base, args.eval)
        return
    tokens = sample_windows(base.tokenizer, CalibrationConfig(source="books", samples=10, seq_len=128, seed=1234))
    cache = capture(base.model, base.arch, tokens, progress=False)
    n = cache.num_layers
    engine = SlmEngine(cache, "output-cosine", "base", "base")
    candidates = portfolio_candidates(engine, cache, round(args.ratio * n), progress=False)
    scores = {k: engine.score_removal(v) for k, v in candidates.items()}
    pick = max(scores, key=scores.get)
    halves = slice(0, 5), slice(5, 10)
    for name in dict.fromkeys([pick, "optimal"]):
        windows, removed = sorted(windows_of(candidates[name])), candidates[name]
        order = [i for i in range(windows[0][0], n) if i not in removed]
        modules: dict[int, torch.nn.Module] = {}
        for lo, hi in windows:
            kl = {}
            for factor in RESCALE_GRID:
                trial = copy.deepcopy(cache.layers[lo])
                scale_branches(trial, cache.arch.residual_branches, factor)
                modules[lo] = trial
                kl[factor] = per_sample_kl(cache, cache.run(windows[0][0], [(modules.get(j, cache.layers[j]), j)
                                                                            for j in order]))
            best = min(kl, key=lambda f: float(kl[f].mean()))
            both = [f for f in kl if f == 1.0 or all(kl[f][h].mean() < kl[1.0][h].mean() for h in halves)]
            guarded = min(both, key=lambda f: float(kl[f].mean()))
            print(json.dumps({"model": args.model or "SmolLM2-135M", "ratio": args.ratio, "candidate": name,
                              "window": f"{lo}-{hi}", "best": best, "guarded": guarded,
                              "kl_halves_at_1": [float(kl[1.0][h].mean()) for h in halves],
                              "kl_halves_at_best": [float(kl[best][h].mean()) for h in halves]}), flush=True)
            trial = copy.deepcopy(cache.layers[lo])  # go on as the engine does: the best factor kept
            scale_branches(trial, cache.arch.residual_branches, best)
            modules[lo] = trial


if __name__ == "__main__":
    main()
