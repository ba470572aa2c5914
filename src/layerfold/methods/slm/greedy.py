"""The greedy fold: adjacent segments folded one pair at a time, each time the pair whose fused
layer keeps the whole model's output closest to the original's.

When a window's fused layer is its base layer (``merge="base"``, the default), folding segment
``k + 1`` into segment ``k`` removes segment ``k + 1``'s layer and leaves everything below it
as it is: the candidate's output is the rest of the stack run from the state that already enters
segment ``k + 1`` in the current folded model.  The fold keeps those states (one per segment),
scores each candidate from there, and takes the next step's states from the winner's own run, so
no layer below a candidate is ever run again and nothing is propagated twice.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from layerfold.errors import LayerfoldError
from layerfold.methods.slm.engine import SlmEngine, SlmRun, Window

Hidden = list[torch.Tensor]  # one tensor per calibration batch


PairChooser = Callable[[list[Window], list[Hidden], dict[tuple[Window, Window], float], Window | None], list[int]]
"""Which pairs a step of the fold (merge=base) scores, from the segments, the state entering each
(``[-1]``: the output), each pair's score when it was last scored and the window the last step
formed; the pairs in increasing order.  None (the default) scores every pair."""


@dataclass
class GreedyStep:
    """One step of the fold (merge=base), for callers that study it: the segments before the step,
    the state entering each of them (``entering[-1]``: the model's output), the score of every
    candidate pair scored (pair ``k`` folds segment ``k + 1`` into segment ``k``), each one's cosine
    with the original output per calibration sample, and the pair chosen."""

    segments: list[Window]
    entering: list[Hidden]
    scores: dict[int, float]
    sample_cosines: dict[int, list[float]]
    chosen: int


def greedy_fold(engine: SlmEngine, budget: int, progress: bool = True,
                pairs: PairChooser | None = None,
                observe: Callable[[GreedyStep], None] | None = None) -> SlmRun:
    """Fold adjacent segments one pair at a time, each time the pair whose fused layer
    keeps the whole model's output closest to the original (the criterion on final states).

    With merge=base, each step scores the pairs ``pairs`` chooses (None: every pair);
    ``observe`` is then called after each step with its :class:`GreedyStep`."""
    if engine.criterion not in ("output-cosine", "loss"):
        raise LayerfoldError("greedy selection scores the model's output: use criterion output-cosine or loss")
    if engine.num_layers > 1 and engine.candidate((0, 1)) is engine.cache.layers[0]:
        return _fold_removing(engine, budget, progress, pairs, observe)
    return _fold_fusing(engine, budget, progress)


def _fold_removing(engine: SlmEngine, budget: int, progress: bool, choose: PairChooser | None,
                   observe: Callable[[GreedyStep], None] | None) -> SlmRun:
    """The fold when a window's fused layer is its base layer: each candidate removes one segment's
    layer; it runs only the segments above the one it removes."""
    cache = engine.cache
    segments: list[Window] = [(i, i) for i in range(engine.num_layers)]
    entering: list[Hidden] = list(cache.inputs[: engine.num_layers + 1])  # entering[-1]: the output
    scores: dict[Window, float] = {}
    last: dict[tuple[Window, Window], float] = {}  # each pair's score when it was last scored
    formed: Window | None = None  # the window the last step formed
    for _ in tqdm(range(budget), desc="folding", disable=not progress, leave=False):
        best: tuple[float, int, list[Hidden]] | None = None
        seen: dict[int, float] = {}
        per_sample: dict[int, list[float]] = {}
        pairs = range(len(segments) - 1) if choose is None else choose(segments, entering, last, formed)
        for k in pairs:
            states = _run_segments(engine, segments, k + 2, entering[k + 1])
            final = _final(engine, states[-1])
            score = seen[k] = engine.score_output(final)
            engine.evaluated += 1
            if observe is not None:
                per_sample[k] = _sample_cosines(engine, final)
            if best is None or score > best[0]:
                best = (score, k, states)
        score, k, states = best
        last.update({(segments[j], segments[j + 1]): value for j, value in seen.items()})
        if observe is not None:
            observe(GreedyStep(list(segments), list(entering), seen, per_sample, k))
        window = formed = (segments[k][0], segments[k + 1][1])
        segments[k:k + 2] = [window]
        entering[k + 1:] = states  # the winner ran every segment above the new window
        scores = {w: s for w, s in scores.items() if not (window[0] <= w[0] <= window[1])}
        scores[window] = score
    engine.retain(seg for seg in segments if seg[1] > seg[0])
    windows = [seg for seg in segments if seg[1] > seg[0]]
    return SlmRun(windows=windows, scores={w: scores.get(w, float("nan")) for w in windows})


def _run_segments(engine: SlmEngine, segments: list[Window], first: int, hidden: Hidden) -> list[Hidden]:
    """Run segments ``first`` onwards (each by its base layer) from ``hidden``; returns the state
    entering each of them after the first, then the output: ``len(segments) - first + 1`` states."""
    cache = engine.cache
    states = [hidden]
    for seg in segments[first:]:
        out = cache.run(seg[0], [(cache.layers[seg[0]], seg[0])], hidden=states[-1])
        states.append([h.to(cache.store_device) for h in out])
    return states


def _final(engine: SlmEngine, output: Hidden) -> Hidden:
    """What the criterion scores: the last layer's output, after the final norm for output-cosine."""
    if engine.criterion == "output-cosine":
        return engine.cache.run(engine.num_layers, [], hidden=output, final_norm=True)
    return output


def _sample_cosines(engine: SlmEngine, final: Hidden) -> list[float]:
    """Cosine of each calibration sample's (flattened, normed) output with the original's."""
    out = torch.cat(final).flatten(1).double()
    ref = engine.reference_output().flatten(1).double().to(out.device)
    return torch.nn.functional.cosine_similarity(out, ref, dim=-1).tolist()


def _fold_fusing(engine: SlmEngine, budget: int, progress: bool) -> SlmRun:
    """The fold for any other fused layer: each candidate builds the fused layer and runs it with
    the segments above it, from the state entering its window."""
    segments: list[Window] = [(i, i) for i in range(engine.num_layers)]
    current = list(engine.cache.inputs[: engine.num_layers])  # input of each segment's first layer
    scores: dict[Window, float] = {}
    for _ in tqdm(range(budget), desc="folding", disable=not progress, leave=False):
        best: tuple[float, int] | None = None
        for k in range(len(segments) - 1):
            window = (segments[k][0], segments[k + 1][1])
            modules = [(engine.candidate(window), window[0])]
            modules += [(engine.module_of(seg), seg[0]) for seg in segments[k + 2:]]
            outs = engine.cache.run(window[0], modules, hidden=current[window[0]],
                                    final_norm=engine.criterion == "output-cosine")
            score = engine.score_output(outs)
            engine.evaluated += 1
            if best is None or score > best[0]:
                best = (score, k)
        score, k = best
        window = (segments[k][0], segments[k + 1][1])
        segments[k:k + 2] = [window]
        engine.retain(seg for seg in segments if seg[1] > seg[0])
        scores = {w: s for w, s in scores.items() if not (window[0] <= w[0] <= window[1])}
        scores[window] = score
        _propagate(engine, segments, current, k)
    windows = [seg for seg in segments if seg[1] > seg[0]]
    return SlmRun(windows=windows, scores={w: scores.get(w, float("nan")) for w in windows})


def _propagate(engine: SlmEngine, segments: list[Window], current: list, k: int) -> None:
    """Recompute the inputs of the segments above segment ``k`` in the folded model."""
    hidden = current[segments[k][0]]
    for seg, nxt in zip(segments[k:], segments[k + 1:], strict=False):
        hidden = engine.cache.run(seg[0], [(engine.module_of(seg), seg[0])], hidden=hidden)
        current[nxt[0]] = [h.to(engine.cache.store_device) for h in hidden]
