"""The SLM authors' search loop, rewritten plainly and slowly for the tests, apart from layerfold.

For every candidate window the current compressed model is deep-copied, the window fused into the
copy, the whole copy run over the calibration samples one at a time, and its final hidden states
compared with the original model's (each sample's states flattened, cosine, mean over samples).
Nothing of layerfold's engine, merge operators or surgery is used, so that the tests compare the
engine with an independent account of the decisions.

``authors=True`` follows the authors' released code (SLM.py): the first candidate is the pair just
below the top (the last layer is never merged); a candidate passes when its similarity is strictly
greater than the threshold; after a window is fused the loop scores the model once more as it
stands before going on; a window still growing when the loop passes layer 0 is dropped.
``authors=False`` is the paper's loop as ``slm-paper`` reads it: the first candidate is the last
pair, a similarity equal to the threshold passes, no extra scoring, and the last window is fused.

Written for Llama-like models (``model.model.layers``, norms named ``*norm*``).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch


@torch.no_grad()
def final_hidden(model, tokens: torch.Tensor) -> list[torch.Tensor]:
    """Final (normed) hidden states, one sample at a time."""
    return [model(input_ids=row[None], output_hidden_states=True, use_cache=False).hidden_states[-1][0].double()
            for row in tokens]


def similarity(outputs: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
    cosines = [torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0)
               for a, b in zip(outputs, reference, strict=True)]
    return float(torch.stack(cosines).mean())


@torch.no_grad()
def fused(model, low: int, high: int, operator: str):
    """A copy of ``model`` with layers ``low..high`` fused into layer ``low`` (norms stay layer
    ``low``'s).  ``reference``: the authors' in-place loop, base <- base + (layer - base) for each
    layer of the window in turn, on the projections' weights only; ``diff``: the paper's
    base + sum_k (layer_k - base) on every other parameter."""
    out = copy.deepcopy(model)
    layers = out.model.layers
    source = {k: dict(model.model.layers[k].named_parameters()) for k in range(low, high + 1)}
    for name, param in layers[low].named_parameters():
        if "norm" in name:
            continue
        if operator == "reference":
            if name.endswith(".weight"):
                for k in range(low, high + 1):
                    param.add_(source[k][name] - param)
        elif operator == "diff":
            param.add_(sum(source[k][name] - source[low][name] for k in range(low + 1, high + 1)))
        else:
            raise ValueError(f"unknown operator {operator}")
    for k in range(high, low, -1):
        del layers[k]
    for i, layer in enumerate(layers):
        layer.self_attn.layer_idx = i
    out.config.num_hidden_layers = len(layers)
    return out


@dataclass
class LoopResult:
    windows: list[tuple[int, int]]  # original layer indices, base first
    candidates: int  # candidate windows scored
    rechecks: int  # extra scorings of the model as it stands (the authors' loop, after each fused window)
    layers: int  # layers left


def sliding_loop(model, tokens: torch.Tensor, threshold: float, operator: str = "reference",
                 authors: bool = True) -> LoopResult:
    reference = final_hidden(model, tokens)
    current = model
    windows: list[tuple[int, int]] = []
    candidates = rechecks = 0
    high = len(model.model.layers) - (2 if authors else 1)
    low = high - 1
    while low >= 0:
        if low == high:  # the authors' loop after fusing a window: the window (low, low) changes nothing
            trial, rechecks = current, rechecks + 1
        else:
            trial, candidates = fused(current, low, high, operator), candidates + 1
        sim = similarity(final_hidden(trial, tokens), reference)
        if (sim > threshold) if authors else (sim >= threshold):
            low -= 1
        elif low == high:
            raise AssertionError("the authors' loop would repeat this step forever")
        elif low + 1 != high:
            current = fused(current, low + 1, high, operator)
            windows.append((low + 1, high))
            high = low
            if not authors:
                low = high - 1
        else:
            high, low = high - 1, low - 1
    if not authors and high > low + 1:
        current = fused(current, low + 1, high, operator)
        windows.append((low + 1, high))
    return LoopResult(sorted(windows), candidates, rechecks, len(current.model.layers))
