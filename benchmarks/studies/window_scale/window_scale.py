"""The experiment behind ``rescale=kl`` (once the default, now an option of ``slm-lab`` in benchmarks/lab;
residual branches described per architecture).  Scale the
residual contributions of each window's kept base layer by a factor alpha, chosen on the
calibration tokens by the KL divergence of the pruned model's next-token distributions from the
original's.

For each plan given (``layerfold plan`` JSON of the default, merge=base), the windows are taken
bottom-up; for each, alpha runs over a grid and the one with the lowest KL of the whole pruned
model is kept (alpha = 1 is in the grid, so the calibration KL can only fall). Alpha multiplies
the attention and MLP output projections (Llama-style layers), or both post-norms' scales on
Gemma 2/3 layers (their outputs are normalised), which is exactly bakeable into the weights.
Prints the alphas, the calibration KL and PTB-valid perplexity (validation text) before and
after, one JSON line per plan.

    python benchmarks/studies/window_scale/window_scale.py --plans smollm2-0.2.json,smollm2-0.35.json --windows 100
    python benchmarks/studies/window_scale/window_scale.py --model GEMMA_FOLDER --bos \\
        --plans gemma-0.2.json,gemma-0.35.json --windows 30
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
from layerfold.methods._common import output_kl
from layerfold.plan import Plan

GRID = [0.6, 0.8, 0.9, 1.0, 1.1, 1.2, 1.4, 1.6, 2.0]


@torch.no_grad()
def scale_layer(layer: torch.nn.Module, alpha: float) -> None:
    if hasattr(layer, "post_feedforward_layernorm"):  # Gemma 2/3: x_norm * (1 + w) sets the output scale
        for norm in (layer.post_attention_layernorm, layer.post_feedforward_layernorm):
            norm.weight.copy_(alpha * (1 + norm.weight) - 1)
    else:
        layer.self_attn.o_proj.weight.mul_(alpha)
        layer.mlp.down_proj.weight.mul_(alpha)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--plans", required=True, help="comma list of plan.json files (merge=base)")
    parser.add_argument("--windows", type=int, default=None, help="PTB-valid windows (default: all)")
    parser.add_argument("--bos", action="store_true")
    args = parser.parse_args()
    base = api.load_model(args.model, device="cpu")
    tokens = sample_windows(base.tokenizer, CalibrationConfig(source="books", samples=10, seq_len=128, seed=1234))
    cache = capture(base.model, base.arch, tokens, progress=False)
    n = cache.num_layers
    for path in args.plans.split(","):
        plan = Plan.load(path)
        removed = {i for op in plan.operations for i in range(op.lo + 1, op.hi + 1)}
        start = min(op.lo for op in plan.operations)
        modules = {i: cache.layers[i] for i in range(start, n) if i not in removed}

        def kl(start: int = start, modules: dict = modules) -> float:
            return output_kl(cache, cache.run(start, [(modules[i], i) for i in sorted(modules)]))

        kl_before, alphas, kl_after = kl(), {}, None
        for op in plan.operations:
            best = None
            for alpha in GRID:
                trial = copy.deepcopy(cache.layers[op.lo])
                scale_layer(trial, alpha)
                modules[op.lo] = trial
                value = kl()
                if best is None or value < best[1]:
                    best = (alpha, value, trial)
            alphas[f"{op.lo}-{op.hi}"], kl_after, modules[op.lo] = best
        ppl = {}
        for name, scaled in (("before", False), ("after", True)):
            model = copy.deepcopy(base)
            if scaled:
                layers = model.arch.layer_list(model.model)
                for op in plan.operations:
                    scale_layer(layers[op.lo], alphas[f"{op.lo}-{op.hi}"])
            api.apply_plan(model, plan)
            ppl[name] = perplexity(model.model, model.tokenizer, "ptb-valid", 128, bos=args.bos,
                                   max_windows=args.windows, progress=False).perplexity
        print(json.dumps({"model": args.model or "SmolLM2-135M", "plan": plan.summary(), "alphas": alphas,
                          "kl_before": kl_before, "kl_after": kl_after, "ptb_valid_before": ppl["before"],
                          "ptb_valid_after": ppl["after"], "ppl_windows": args.windows or "all"}), flush=True)


if __name__ == "__main__":
    main()
