"""Shortened LLaMA (Kim et al. 2024, "Shortened LLaMA: Depth Pruning for Large Language Models
with Comparison of Retraining Methods", arXiv 2402.02834): one-shot block importance, then the
n least important blocks (decoder layers) are removed at once.

- ``shortened-ppl``: importance of layer i = calibration perplexity of the model without layer
  i alone.  Runs only the layers above i from its cached input.
- ``shortened-taylor`` (the paper's Taylor+): importance = sum over the layer's weights of
  |w * dL/dw|, L the mean next-token loss over the calibration set (one backward pass).  As in
  the authors' code, every parameter named ``*weight`` counts (norm weights included, biases
  not), and the "+" heuristic keeps the first four and last two layers out of the candidates.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from layerfold.calibrate import LayerCache, call_layer
from layerfold.errors import LayerfoldError
from layerfold.methods._common import batch_targets, check_candidates, drop_ops, loss_without, lowest, nll_sum
from layerfold.methods.base import Method, PlanContext, PlanResult, register


class _OneShot(Method):
    criterion: ClassVar[str] = ""
    keep_first: int = 0
    keep_last: int = 0

    def importance(self, ctx: PlanContext) -> dict[int, float]:  # pragma: no cover - interface
        raise NotImplementedError

    def plan(self, ctx: PlanContext) -> PlanResult:
        remove = self.required_removal(ctx)
        candidates = check_candidates(self.name, ctx.num_layers, self.keep_first, self.keep_last, remove)
        scores = self.importance(ctx)
        chosen = lowest(scores, remove, candidates)
        plan = ctx.new_plan(self.name, drop_ops(chosen, scores), criterion=self.criterion,
                            scores={"importance": [scores[i] for i in range(ctx.num_layers)],
                                    "candidates": candidates, "removed": chosen})
        return PlanResult(plan)


@register
class ShortenedPpl(_OneShot):
    """Shortened LLaMA, PPL criterion (Kim et al. 2024): drop the layers whose removal hurts calibration PPL least."""

    name: ClassVar[str] = "shortened-ppl"
    criterion: ClassVar[str] = "perplexity-without-layer"

    def importance(self, ctx: PlanContext) -> dict[int, float]:
        cache = ctx.cache
        n = cache.num_layers
        return {i: math.exp(loss_without(cache, cache.inputs[i], range(i + 1, n)))
                for i in tqdm(range(n), desc="shortened-ppl", disable=not ctx.progress, leave=False)}


@register
class ShortenedTaylor(_OneShot):
    """Shortened LLaMA, Taylor+ criterion (Kim et al. 2024): drop the layers of least sum |w * dL/dw|."""

    name: ClassVar[str] = "shortened-taylor"
    criterion: ClassVar[str] = "taylor"
    keep_first: int = 4
    keep_last: int = 2

    def importance(self, ctx: PlanContext) -> dict[int, float]:
        return taylor_importance(ctx.cache, progress=ctx.progress)


def taylor_importance(cache: LayerCache, progress: bool = False) -> dict[int, float]:
    """sum |w * dL/dw| over each layer's ``*weight`` parameters, L the mean calibration NLL.

    Runs the decoder layers from the cached embeddings with autograd on, one batch at a time,
    asking gradients of the layers' weights only."""
    if cache.streamer is not None and cache.streamer.active:
        raise LayerfoldError("shortened-taylor backpropagates through the whole model at once, which cannot be "
                             "streamed layer by layer: run it without --max-gpu-memory")
    layers = cache.layers
    weights = [[p for name, p in layer.named_parameters() if name.endswith("weight")] for layer in layers]
    flat = [p for group in weights for p in group]
    grads = [torch.zeros_like(p, dtype=torch.float32) for p in flat]
    targets = batch_targets(cache)
    total_tokens = sum(t[:, 1:].numel() for t in targets)
    was_required = [p.requires_grad for p in flat]
    try:
        for p in flat:
            p.requires_grad_(True)
        for b in tqdm(range(cache.batches()), desc="taylor backward", disable=not progress, leave=False):
            with torch.enable_grad():
                h = cache.inputs[0][b].to(cache.device)
                for i, layer in enumerate(layers):
                    h = call_layer(layer, h, cache.extras[i][b], cache.device)
                loss, _ = nll_sum(cache, h, targets[b])
                batch_grads = torch.autograd.grad(loss / total_tokens, flat, allow_unused=True)
            for acc, g in zip(grads, batch_grads, strict=True):
                if g is not None:
                    acc += g.float()
    finally:
        for p, req in zip(flat, was_required, strict=True):
            p.requires_grad_(req)
    scores, k = {}, 0
    for i, group in enumerate(weights):
        total = 0.0
        for p in group:
            total += float((p.detach().float() * grads[k]).abs().sum())
            k += 1
        scores[i] = total
    return scores
