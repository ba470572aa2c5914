"""Per-channel rescaling of a window's kept layer, fitted in closed form on the calibration activations.

An experiment beside the then default's `rescale=kl` (one factor per window from a grid).  Here
each output channel of each residual branch of the kept layer (attention and MLP out-projections)
gets its own factor: per channel ``c`` and window ``[lo, hi]``, least squares over the calibration
tokens of

    y_c - h_c  ~  s_attn,c * a_c + s_mlp,c * m_c      (+ ridge  lam * (sum a_c^2 (s_attn,c - 1)^2 + ...))

where ``h`` enters the kept layer in the pruned model (windows below already corrected), ``a`` and
``m`` are what its attention and MLP add, and ``y`` is the original model's residual stream after
layer ``hi``.  Two parameters per channel from 1,280 tokens, unlike ``fit=ridge``'s full matrix.
The factors are baked into the rows of the out-projections, so the model stays a plain checkpoint.

    python benchmarks/studies/channel_fit/channel_fit.py --plan "3-7;12-14;15-18;24-25" --lam 0,0.1,1
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
from layerfold.methods.slm import removed_layers
from layerfold.models.arch import get_dotted
from layerfold.plan import Operation, Plan


def parse(spec: str) -> list[tuple[int, int]]:
    return [tuple(map(int, part.split("-"))) for part in spec.split(";")]


@torch.no_grad()
def bake(layer, path: str, kind: str, s: torch.Tensor) -> None:
    """Scale output channel c of the branch at ``path`` by ``s[c]``."""
    module = get_dotted(layer, path)
    if kind == "linear":
        module.weight.mul_(s.to(module.weight.dtype).unsqueeze(1))
        if getattr(module, "bias", None) is not None:
            module.bias.mul_(s.to(module.bias.dtype))
    else:  # unit-offset-norm: the output is (1 + w) * normalised input
        module.weight.copy_((s * (1 + module.weight.float()) - 1).to(module.weight.dtype))


@torch.no_grad()
def fit(cache, windows, lam: float, skip_first: bool, scalar: bool) -> dict[int, dict[str, torch.Tensor]]:
    """Per window (by its kept layer ``lo``): branch path -> per-channel factors."""
    branches = list(cache.arch.residual_branches)
    n = cache.num_layers
    removed = removed_layers(windows)
    order = [i for i in range(windows[0][0], n) if i not in removed]
    modules: dict[int, torch.nn.Module] = {}
    factors = {}
    start = windows[0][0]
    for lo, hi in windows:
        below = [(modules.get(j, cache.layers[j]), j) for j in order if j < lo]
        hidden = cache.run(start, below) if below else cache.inputs[lo]
        layer = copy.deepcopy(cache.layers[lo])
        seen: dict[str, list[torch.Tensor]] = {p: [] for p in branches}
        hooks = [get_dotted(layer, p).register_forward_hook(
            lambda m, a, out, p=p, seen=seen: seen[p].append(out.float()))
                 for p in branches]
        outs = cache.run(lo, [(layer, lo)], hidden=hidden)
        for h in hooks:
            h.remove()
        x = torch.cat([h.float() for h in hidden])
        y = torch.cat([t.float() for t in cache.inputs[hi + 1]])
        del outs
        feats = [torch.cat(seen[p]) for p in branches]  # each [N, T, H]
        if skip_first:
            x, y, feats = x[:, 1:], y[:, 1:], [f[:, 1:] for f in feats]
        width = x.shape[-1]
        d = (y - x).reshape(-1, width)
        f = torch.stack([t.reshape(-1, width) for t in feats], -1)  # [tokens, H, k]
        k = f.shape[-1]
        if scalar:  # one factor per branch, all channels
            gram = torch.einsum("thi,thj->ij", f, f)
            rhs = torch.einsum("thi,th->i", f, d)
            reg = lam * torch.diag(torch.diagonal(gram))
            s = torch.linalg.solve(gram + reg, rhs + reg @ torch.ones(k))
            s = s.expand(width, k)
        else:
            gram = torch.einsum("thi,thj->hij", f, f)  # [H, k, k]
            rhs = torch.einsum("thi,th->hi", f, d)
            reg = lam * torch.diag_embed(torch.diagonal(gram, dim1=-2, dim2=-1))
            s = torch.linalg.solve(gram + reg + 1e-6 * torch.eye(k), (rhs.unsqueeze(-1) + reg @ torch.ones(k, 1)))
            s = s.squeeze(-1)
        factors[lo] = {p: s[:, i].clone() for i, p in enumerate(branches)}
        for i, p in enumerate(branches):
            bake(layer, p, cache.arch.residual_branches[p], s[:, i])
        modules[lo] = layer
    return factors


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--plan", required=True, help='windows, e.g. "3-7;12-14;15-18;24-25"')
    parser.add_argument("--lam", default="0,1", help="ridge strengths toward factor 1, comma-separated")
    parser.add_argument("--skip-first", action="store_true", help="leave each sample's first token out of the fit")
    parser.add_argument("--scalar", action="store_true", help="one factor per branch instead of per channel")
    parser.add_argument("--bos", action="store_true", help="BOS first in every perplexity window (Gemma)")
    parser.add_argument("--windows", type=int, default=None, help="PTB-valid windows (default all)")
    args = parser.parse_args()
    base = api.load_model(args.model, device="cpu")
    tokens = sample_windows(base.tokenizer, CalibrationConfig(source="books", samples=10, seq_len=128, seed=1234))
    cache = capture(base.model, base.arch, tokens, progress=False)
    windows = sorted(parse(args.plan))
    n = cache.num_layers
    plan = Plan(method="slm", num_layers=n, operations=[Operation("fuse", lo, hi) for lo, hi in windows],
                merge={"operator": "base", "norms": "base"})
    for lam in [float(v) for v in args.lam.split(",")]:
        factors = fit(cache, windows, lam, args.skip_first, args.scalar)
        model = copy.deepcopy(base)
        api.apply_plan(model, plan)
        layers = model.arch.layer_list(model.model)
        kept = [i for i in range(n) if i not in removed_layers(windows)]
        with torch.no_grad():
            for lo, per in factors.items():
                layer = layers[kept.index(lo)]
                for p, s in per.items():
                    bake(layer, p, model.arch.residual_branches[p], s)
        ppl = perplexity(model.model, model.tokenizer, "ptb-valid", 128, bos=args.bos, max_windows=args.windows,
                         progress=False).perplexity
        summary = {lo: {p.split(".")[-1]: [round(float(s.mean()), 3), round(float(s.std()), 3)]
                        for p, s in per.items()} for lo, per in factors.items()}
        print(json.dumps({"model": args.model or "SmolLM2-135M", "plan": args.plan, "lam": lam,
                          "skip_first": args.skip_first, "scalar": args.scalar, "ptb_valid": ppl,
                          "factors_mean_std": summary}), flush=True)


if __name__ == "__main__":
    main()
