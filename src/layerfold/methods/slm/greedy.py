"""The greedy fold: adjacent segments folded one pair at a time, each time the pair whose fused
layer keeps the whole model's output closest to the original's."""

from __future__ import annotations

from tqdm.auto import tqdm

from layerfold.errors import LayerfoldError
from layerfold.methods.slm.engine import SlmEngine, SlmRun, Window


def greedy_fold(engine: SlmEngine, budget: int, progress: bool = True) -> SlmRun:
    """Fold adjacent segments one pair at a time, each time the pair whose fused layer
    keeps the whole model's output closest to the original (the criterion on final states)."""
    if engine.criterion not in ("output-cosine", "loss"):
        raise LayerfoldError("greedy selection scores the model's output: use criterion output-cosine or loss")
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
