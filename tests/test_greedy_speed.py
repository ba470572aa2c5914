"""The greedy fold's fast path takes exactly the decisions of the reference fold.

``reference_greedy`` below is the fold as first written: every candidate builds its fused layer and
runs it with every segment above it from the state entering its window, and the states above a
committed window are propagated again.  The fast path (merge=base) must give the same windows and
bit-identical scores; these tests check decisions, never timings (benchmarks/prune_time does)."""

from __future__ import annotations

import pytest
import torch
import transformers

from layerfold.calibrate import capture
from layerfold.methods.slm import SlmEngine, SlmRun, greedy_fold
from layerfold.models.arch import architecture_for


def reference_greedy(engine: SlmEngine, budget: int) -> SlmRun:
    """The greedy fold as first written (no shortcut): the reference the fast path must match."""
    segments = [(i, i) for i in range(engine.num_layers)]
    current = list(engine.cache.inputs[: engine.num_layers])
    scores = {}
    for _ in range(budget):
        best = None
        for k in range(len(segments) - 1):
            window = (segments[k][0], segments[k + 1][1])
            modules = [(engine.candidate(window), window[0])]
            modules += [(engine.module_of(seg), seg[0]) for seg in segments[k + 2:]]
            outs = engine.cache.run(window[0], modules, hidden=current[window[0]],
                                    final_norm=engine.criterion == "output-cosine")
            score = engine.score_output(outs)
            if best is None or score > best[0]:
                best = (score, k)
        score, k = best
        window = (segments[k][0], segments[k + 1][1])
        segments[k:k + 2] = [window]
        scores = {w: s for w, s in scores.items() if not (window[0] <= w[0] <= window[1])}
        scores[window] = score
        hidden = current[segments[k][0]]
        for seg, nxt in zip(segments[k:], segments[k + 1:], strict=False):
            hidden = engine.cache.run(seg[0], [(engine.module_of(seg), seg[0])], hidden=hidden)
            current[nxt[0]] = list(hidden)
    windows = [seg for seg in segments if seg[1] > seg[0]]
    return SlmRun(windows=windows, scores={w: scores.get(w, float("nan")) for w in windows})


def similar_llama(layers: int = 12, seed: int = 0) -> torch.nn.Module:
    """A tiny Llama whose neighbouring layers are alike, as in trained models, so that windows of
    several sizes occur."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for i in range(1, layers):
            for p, q in zip(model.model.layers[i].parameters(), model.model.layers[i - 1].parameters(), strict=True):
                p.mul_(0.3).add_(0.7 * q)
    return model


def engine_for(model, criterion: str = "output-cosine", merge: str = "base", batch_size: int = 3) -> SlmEngine:
    toks = torch.randint(0, model.config.vocab_size, (5, 16), generator=torch.Generator().manual_seed(1))
    cache = capture(model, architecture_for(model.config), toks, batch_size=batch_size, progress=False)
    return SlmEngine(cache, criterion, merge, "base")


@pytest.mark.parametrize("criterion", ["output-cosine", "loss"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_fold_takes_the_reference_decisions(criterion, seed):
    engine = engine_for(similar_llama(seed=seed), criterion)
    budget = engine.num_layers - 2
    got, expected = greedy_fold(engine, budget, progress=False), reference_greedy(engine, budget)
    assert got.windows == expected.windows
    assert got.scores == expected.scores  # bit for bit: the same layer calls on the same states


@pytest.mark.parametrize("name", ["gemma3", "gpt2", "opt", "qwen2"])
def test_fast_fold_matches_the_reference_on_other_architectures(tiny_model, name):
    engine = engine_for(tiny_model(name))
    got, expected = greedy_fold(engine, 4, progress=False), reference_greedy(engine, 4)
    assert got.windows == expected.windows and got.scores == expected.scores


def test_other_merges_keep_the_fusing_fold():
    """merge=diff builds a new layer per window: the fold runs it (the fast path does not apply)."""
    engine = engine_for(similar_llama(layers=8), merge="diff")
    got, expected = greedy_fold(engine, 4, progress=False), reference_greedy(engine, 4)
    assert got.windows == expected.windows and got.scores == expected.scores


def test_observe_reports_every_candidate_and_the_choice():
    engine = engine_for(similar_llama(layers=8))
    steps = []
    run = greedy_fold(engine, 3, progress=False, observe=steps.append)
    assert len(steps) == 3
    for step in steps:
        assert sorted(step.scores) == list(range(len(step.segments) - 1))
        assert step.chosen == max(step.scores, key=step.scores.get)
        assert len(step.entering) == len(step.segments) + 1
    assert sum(hi - lo for lo, hi in run.windows) == 3


def test_shortlist_scores_its_pairs_exactly_and_keeps_the_best_of_them():
    """With a shortlist (the default's), each step scores only its pairs, each exactly as the full
    fold would, and takes the best of them; a shortlist that covers every pair is the full fold."""
    from layerfold.methods.slm.shortlist import Shortlist

    engine = engine_for(similar_llama(layers=12, seed=3))
    steps = []
    small = Shortlist(by_score=1, by_influence=1, first_step=2)
    greedy_fold(engine, 4, progress=False, pairs=small, observe=steps.append)
    assert len(steps[0].scores) == 2  # then one by score, one by influence, the two next to the new window
    assert all(len(step.scores) <= 4 for step in steps[1:])
    for step in steps:
        assert step.chosen == max(step.scores, key=step.scores.get)
        full = []  # each pair scored as the reference fold does: its window fused, run with all above
        for k in step.scores:
            window = (step.segments[k][0], step.segments[k + 1][1])
            modules = [(engine.candidate(window), window[0])]
            modules += [(engine.module_of(seg), seg[0]) for seg in step.segments[k + 2:]]
            outs = engine.cache.run(window[0], modules, hidden=step.entering[k], final_norm=True)
            full.append(engine.score_output(outs))
        assert full == [step.scores[k] for k in step.scores]
    wide = Shortlist(by_score=12, by_influence=12, first_step=12)
    assert greedy_fold(engine, 5, progress=False, pairs=wide).windows == reference_greedy(engine, 5).windows


def test_estimate_counts_the_layer_runs_of_the_full_fold():
    """The planning estimate's count of the fold's layer runs is the number the fold makes."""
    from layerfold.methods.slm.estimate import greedy_layer_runs

    engine = engine_for(similar_llama(layers=9))
    calls = []
    hooks = [layer.register_forward_hook(lambda *_: calls.append(1)) for layer in engine.cache.layers]
    try:
        greedy_fold(engine, 4, progress=False)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) / engine.cache.batches() == greedy_layer_runs(9, 4)


def test_default_plan_announces_its_estimate_up_front(capsys):
    """The default says how long its plan will take before it runs, and records the figure."""
    from layerfold import api
    from layerfold.methods.base import Target
    from layerfold.models.load import wrap_model

    model = similar_llama(layers=8)
    result = api.make_plan(wrap_model(model), "slm", Target(layers=6), tokens=torch.randint(4, 100, (4, 16)),
                           progress=True)
    import re

    estimate = result.plan.provenance["planning_estimate_seconds"]  # tenths of a second: 0.0 on a tiny model
    said = re.search(r"planning: about (\d+) s on this machine", capsys.readouterr().err)
    assert estimate >= 0 and said is not None and abs(int(said.group(1)) - estimate) <= 1
    from layerfold.methods.slm.estimate import planning_seconds
    from layerfold.methods.slm.shortlist import Shortlist

    cache = engine_for(model).cache
    assert cache.layer_seconds > 0
    assert 0 < planning_seconds(cache, 2, Shortlist()) < planning_seconds(cache, 2)


def test_default_greedy_fold_scores_its_shortlist_and_pairs_all_every_pair():
    """``slm`` scores a shortlist of pairs by default and every pair with ``pairs=all``: the greedy
    candidate of ``pairs=all`` is the reference fold's, and the shortlist scores fewer candidates."""
    from layerfold import api
    from layerfold.methods.base import Target
    from layerfold.methods.slm import removed_layers
    from layerfold.methods.slm.method import SlidingLayerMerging
    from layerfold.methods.slm.shortlist import Shortlist
    from layerfold.models.load import wrap_model

    assert isinstance(SlidingLayerMerging().pair_chooser(), Shortlist)
    assert SlidingLayerMerging(pairs="all").pair_chooser() is None
    model = similar_llama(layers=12, seed=2)
    tokens = torch.randint(0, model.config.vocab_size, (5, 16), generator=torch.Generator().manual_seed(1))
    plans = {pairs: api.make_plan(wrap_model(model), "slm", Target(layers=8), tokens=tokens, progress=False,
                                  options={"pairs": pairs}).plan for pairs in ("shortlist", "all")}
    engine = engine_for(model)
    reference = sorted(removed_layers(reference_greedy(engine, 4).windows))
    assert plans["all"].scores["portfolio_removed"]["greedy"] == reference
    assert plans["shortlist"].scores["candidates_evaluated"] < plans["all"].scores["candidates_evaluated"]


def test_estimate_counts_the_shortlists_first_step_exactly():
    """The estimate's first shortlist step is the layer runs the fold's first step makes: the pairs of
    lowest block influence, each running the layers above the one it removes."""
    from layerfold.methods.shortgpt import block_influence
    from layerfold.methods.slm.estimate import shortlist_layer_runs
    from layerfold.methods.slm.shortlist import Shortlist

    engine = engine_for(similar_llama(layers=10, seed=4))
    shortlist = Shortlist(first_step=4)
    calls = []
    hooks = [layer.register_forward_hook(lambda *_: calls.append(1)) for layer in engine.cache.layers]
    try:
        greedy_fold(engine, 1, progress=False, pairs=shortlist)
    finally:
        for hook in hooks:
            hook.remove()
    assert len(calls) / engine.cache.batches() == shortlist_layer_runs(block_influence(engine.cache), 1, shortlist)
