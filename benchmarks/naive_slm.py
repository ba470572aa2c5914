"""The sliding loop written naively, the way the SLM authors' code runs it: for every candidate
window, deep-copy the model, fuse the windows (those committed and the candidate) into the copy,
run the whole copy at batch 1 over the calibration set, and compare its final hidden states with
the original model's.  It is the timing baseline of benchmarks/speed: layerfold's engine takes the
same decisions (checked there) and must beat it on time and memory.

The loop's details follow :class:`layerfold.methods.slm.SlidingLoop`: by default the paper's loop
as ``slm-paper`` runs it (the first candidate is the last pair, a similarity equal to the threshold
passes, the window still growing at layer 0 is fused); ``loop=AUTHORS_LOOP`` gives the authors'
(the pair below the top first, strictly greater, that last window dropped).  The tests check the
engine against an independent rewrite of both loops, tests/authors_loop.py.
"""

from __future__ import annotations

import copy

import torch

from layerfold.methods.slm import PAPER_LOOP, SlidingLoop
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


def naive_slm(model, tokens: torch.Tensor, threshold: float, merge: str = "diff", norms: str = "base",
              loop: SlidingLoop = PAPER_LOOP) -> tuple[list[tuple[int, int]], int]:
    """Windows chosen by the sliding loop at one threshold (output-cosine criterion), and the
    number of candidates scored."""
    reference = final_hidden(model, tokens)
    n = architecture_for(model.config).num_layers(model.config)
    windows: list[tuple[int, int]] = []
    high = n - 1 - loop.keep_top
    low = high - 1
    candidates = 0
    while low >= 0:
        candidate = compressed(model, windows + [(low, high)], merge, norms)
        sim = sample_cosine(final_hidden(candidate, tokens), reference)
        candidates += 1
        del candidate
        if loop.passes(sim, threshold):
            low -= 1
        else:
            if high > low + 1:
                windows.append((low + 1, high))
            high, low = low, low - 1
    if loop.keep_pending and high > low + 1:
        windows.append((low + 1, high))
    return sorted(windows), candidates
