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
from layerfold.similarity import cosine

Hidden = list[torch.Tensor]  # one tensor per calibration batch


@dataclass(frozen=True)
class Shortlist:
    """Which candidate pairs a step of the fold scores (merge=base): the pairs never scored
    before that hold the window the last step formed (at most two), the ``by_score`` best by the
    score each had at the last step that scored it, and the ``by_influence`` whose removed segment
    has the lowest block influence in the current folded model (1 - mean token cosine between the
    state entering it and the state leaving it; ``first_step`` of them at the first step, when no
    pair has a score yet).  The pair chosen is the best of those scored, by the criterion itself;
    the full fold (``shortlist=None``, the default) scores every pair.

    Not the default: on SmolLM2-135M (default calibration, float32) the shortlist 3/3/6 takes the
    full fold's first three steps but not its fourth (it folds layer 13 where the full fold folds
    layer 5), so it can change a plan (benchmarks/prune_time/RESULTS.md); on a Llama-2-7B shape on
    one H200 it plans in 2.1 s instead of about 6 s."""

    by_score: int = 3
    by_influence: int = 3
    first_step: int = 6

    def pairs(self, segments: list[Window], entering: list[Hidden], last: dict[tuple[Window, Window], float],
              formed: Window | None) -> list[int]:
        """The pairs to score, in increasing order (so that ties go to the lowest, as in the full
        fold); ``formed`` is the window the last step formed."""
        pairs = [(segments[k], segments[k + 1]) for k in range(len(segments) - 1)]
        influence = [1.0 - cosine(torch.cat(entering[k + 1]), torch.cat(entering[k + 2])) for k in range(len(pairs))]
        count = self.by_influence if last else self.first_step
        chosen = set(sorted(range(len(pairs)), key=lambda k: (influence[k], k))[:count])
        known = [k for k, pair in enumerate(pairs) if pair in last]
        chosen |= set(sorted(known, key=lambda k: (-last[pairs[k]], k))[: self.by_score])
        chosen |= {k for k, pair in enumerate(pairs) if formed in pair}  # the only pairs new to this step
        return sorted(chosen)


DEFAULT_SHORTLIST: Shortlist | None = None  # every pair scored: the plans stay those of the full fold


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
                shortlist: Shortlist | None = DEFAULT_SHORTLIST,
                observe: Callable[[GreedyStep], None] | None = None) -> SlmRun:
    """Fold adjacent segments one pair at a time, each time the pair whose fused layer
    keeps the whole model's output closest to the original (the criterion on final states).

    With merge=base, each step scores the pairs of ``shortlist`` (None: every pair);
    ``observe`` is then called after each step with its :class:`GreedyStep`."""
    if engine.criterion not in ("output-cosine", "loss"):
        raise LayerfoldError("greedy selection scores the model's output: use criterion output-cosine or loss")
    if engine.num_layers > 1 and engine.candidate((0, 1)) is engine.cache.layers[0]:
        return _fold_removing(engine, budget, progress, shortlist, observe)
    return _fold_fusing(engine, budget, progress)


def _fold_removing(engine: SlmEngine, budget: int, progress: bool, shortlist: Shortlist | None,
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
        pairs = range(len(segments) - 1) if shortlist is None else shortlist.pairs(segments, entering, last, formed)
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
