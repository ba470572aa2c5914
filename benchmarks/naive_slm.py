"""The SLM authors' search loop, written naively on purpose: for every candidate window,
deep-copy the current compressed model, merge the window into the copy, run the full model
at batch 1 over the calibration set, and compare its final hidden states with the original
model's.  Kept here (not in the library) as the baseline that layerfold's incremental engine
must match decision for decision, and beat on time and memory.
"""

from __future__ import annotations

import copy

import torch

from layerfold.models.arch import architecture_for
from layerfold.plan import Operation, Plan
from layerfold.similarity import sample_cosine
from layerfold.surgery import apply_plan


@torch.no_grad()
def final_hidden(model, tokens: torch.Tensor) -> torch.Tensor:
    device = next(model.parameters()).device
    outs = [model(input_ids=row[None].to(device), output_hidden_states=True, use_cache=False).hidden_states[-1]
            for row in tokens]
    return torch.cat(outs).float().cpu()


def compressed(original, windows: list[tuple[int, int]], merge: str, norms: str):
    model = copy.deepcopy(original)
    n = architecture_for(model.config).num_layers(model.config)
    if windows:
        plan = Plan(method="naive", num_layers=n, operations=[Operation("fuse", lo, hi) for lo, hi in windows],
                    merge={"operator": merge, "norms": norms})
        apply_plan(model, plan)
    return model


def naive_slm(model, tokens: torch.Tensor, threshold: float, merge: str = "diff", norms: str = "base"):
    """Windows chosen by the authors' loop at one threshold (output-cosine criterion)."""
    reference = final_hidden(model, tokens)
    n = architecture_for(model.config).num_layers(model.config)
    windows: list[tuple[int, int]] = []
    high, low = n - 1, n - 2
    candidates = 0
    while low >= 0:
        candidate = compressed(model, windows + [(low, high)], merge, norms)
        sim = sample_cosine(final_hidden(candidate, tokens), reference)
        candidates += 1
        del candidate
        if sim >= threshold:
            low -= 1
        else:
            if high > low + 1:
                windows.append((low + 1, high))
            high, low = low, low - 1
    if high > low + 1:
        windows.append((low + 1, high))
    return sorted(windows), candidates
