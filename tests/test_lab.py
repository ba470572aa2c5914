"""Method ``slm-lab`` (benchmarks/lab): the options measured and not adopted still give the plans
they gave inside the package; the continuation-choice probe behind ``pick=choice``."""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))
sys.path.insert(0, str(Path(__file__).parent))

import lab  # noqa: E402,F401  (registers slm-lab)
from conftest import build_tiny_tokenizer  # noqa: E402
from lab.choice import (  # noqa: E402
    choice_items,
    items_fit,
    model_choice_score,
    plan_choice_scores,
    score_from_logprobs,
)
from test_slm import rebuilt_kl, tiny_llama, tokens  # noqa: E402

from layerfold import api  # noqa: E402
from layerfold.errors import LayerfoldError  # noqa: E402
from layerfold.methods.base import Target, make_method  # noqa: E402
from layerfold.models.load import wrap_model  # noqa: E402


def tiny(layers: int = 6, seed: int = 0, types: list[str] | None = None):
    import transformers

    torch.manual_seed(seed)
    common = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=100, bos_token_id=1, pad_token_id=0, eos_token_id=0)
    if types is None:
        cfg = transformers.LlamaConfig(**common)
    else:  # Gemma 3: attention kinds per layer, the case a layer list swapped in place would get wrong
        cfg = transformers.Gemma3TextConfig(**common, head_dim=8, sliding_window=4, query_pre_attn_scalar=8,
                                            layer_types=types)
    return transformers.AutoModelForCausalLM.from_config(cfg).eval()


def test_items_put_the_true_continuation_first_and_the_distractors_further_on():
    stream = torch.arange(2000)
    items = choice_items(stream, 3, context=10, continuation=4, offsets=(100, 200, 300))
    assert items.shape == (3, 4, 14)
    assert torch.equal(items[1, 0], torch.arange(14, 28))  # item 1 starts at 14: its context, then its truth
    assert torch.equal(items[1, 2, 10:], torch.arange(14 + 10 + 200, 14 + 10 + 204))  # same context, span 200 on
    assert all(torch.equal(items[1, k, :10], items[1, 0, :10]) for k in range(4))
    with_bos = choice_items(stream, 3, bos_id=7, context=10, continuation=4, offsets=(100, 200, 300))
    assert with_bos.shape == (3, 4, 15) and (with_bos[..., 0] == 7).all()
    assert items_fit(2000, 10, 4, (100, 200, 300)) == (2000 - 300 - 14) // 14 + 1
    with pytest.raises(LayerfoldError, match="fewer than"):
        choice_items(stream, items_fit(2000, 10, 4, (100, 200, 300)) + 1, context=10, continuation=4,
                     offsets=(100, 200, 300))


def test_score_counts_wins_and_grades_the_true_choice():
    scores = torch.tensor([[0.0, -1.0, -2.0, -3.0], [-5.0, 0.0, -1.0, -1.0]])
    s = score_from_logprobs(scores)
    assert s.accuracy == 0.5
    expected = -(torch.log_softmax(scores.double(), -1)[:, 0]).mean().item()
    assert s.nll == pytest.approx(expected)


@pytest.mark.parametrize("types", [None, ["sliding_attention", "full_attention", "sliding_attention",
                                          "sliding_attention", "full_attention", "sliding_attention"]])
def test_plan_scores_equal_those_of_the_model_with_the_layers_removed(types):
    """Run from one capture at the first removed layer, each plan scores as the model built without
    its layers does (Gemma 3 included: each kept layer keeps its own attention kind)."""
    model = tiny(types=types)
    items = torch.randint(2, 100, (6, 4, 20), generator=torch.Generator().manual_seed(3))
    plans = {"none": set(), "one": {2}, "two": {3, 4}}
    scores = plan_choice_scores(wrap_model(model), plans, items, continuation=5, batch_size=5, progress=False)
    for name, removed in plans.items():
        pruned = copy.deepcopy(model)
        _apply_drop(pruned, sorted(removed))
        direct = model_choice_score(pruned, items, continuation=5, batch_size=7)
        assert scores[name].accuracy == pytest.approx(direct.accuracy)
        assert scores[name].nll == pytest.approx(direct.nll, rel=1e-4, abs=1e-5)
    assert scores["two"].nll != pytest.approx(scores["none"].nll)


def _apply_drop(model, removed: list[int]) -> None:
    from layerfold.plan import Operation, Plan
    from layerfold.surgery import apply_plan

    n = model.config.num_hidden_layers
    ops = [Operation("drop", i, i) for i in removed]
    apply_plan(model, Plan(method="manual", num_layers=n, operations=ops))


def test_pick_choice_keeps_the_candidate_the_probe_prefers(tmp_path):
    import random

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "dog", "ran", "far", "away", "home"]
    path = tmp_path / "text.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(2500)))
    loaded = wrap_model(tiny(layers=8, seed=2), tokenizer=build_tiny_tokenizer(vocab_size=100))
    from layerfold.data.tokens import CalibrationConfig

    result = api.make_plan(loaded, "slm-lab", Target(layers=6), options={"pick": "choice", "choice_items": 12},
                           calibration=CalibrationConfig(source=str(path), samples=4, seq_len=32), progress=False)
    scores = result.plan.scores
    choice = scores["portfolio_choice"]
    assert set(choice) == set(scores["portfolio"]) and scores["choice_items"] == 12
    assert all(0 <= c["accuracy"] <= 1 and c["nll"] > 0 for c in choice.values())
    best = max(choice, key=lambda n: (choice[n]["accuracy"], -choice[n]["nll"], scores["portfolio"][n]))
    assert scores["portfolio_pick"] == best
    assert result.plan.num_layers_after == 6
    with pytest.raises(LayerfoldError, match="choice_items=N"):
        api.make_plan(loaded, "slm-lab", Target(layers=6), options={"pick": "choice", "choice_items": 1000},
                      calibration=CalibrationConfig(source=str(path), samples=4, seq_len=32), progress=False)


def test_pick_choice_needs_the_portfolio():
    with pytest.raises(LayerfoldError, match="pick=choice compares the portfolio"):
        make_method("slm-lab", {"pick": "choice", "selection": "greedy"})


def test_slm_lab_gives_slms_plans_for_slms_options():
    """slm-lab's greedy fold scores every pair by default (as when its options were measured): it gives
    slm's plans with pairs=all, and with the shortlist when asked for it."""
    model, toks = tiny_llama(layers=10, seed=4), tokens()
    for options in ({}, {"selection": "greedy", "rescale": "none"}, {"threshold": 0.99}, {"pairs": "shortlist"}):
        target = Target() if "threshold" in options else Target(layers=7)
        ours = api.make_plan(wrap_model(model), "slm", target, options={"pairs": "all", **options}, tokens=toks,
                             progress=False).plan
        lab_plan = api.make_plan(wrap_model(model), "slm-lab", target, options=options, tokens=toks,
                                 progress=False).plan
        assert lab_plan.method == "slm-lab"
        assert lab_plan.operations == ours.operations and lab_plan.merge == ours.merge
        assert lab_plan.scores == ours.scores and lab_plan.threshold == ours.threshold


def test_fit_rule_and_lab_conflicts():
    """With fit=ridge and nothing else given, slm-lab folds greedily and does not rescale."""
    method = make_method("slm-lab", {"fit": "ridge"})
    assert method.chosen_selection == "greedy" and method.chosen_rescale == "none"
    assert make_method("slm-lab", {"fit": "ridge", "threshold": 0.9}).chosen_selection == "sliding"
    assert make_method("slm-lab", {}).chosen_rescale == "channels"
    for options in ({"refine": 2, "merge": "diff"}, {"selection": "portfolio", "fit": "ridge"}):
        with pytest.raises(LayerfoldError, match="merge=base"):
            make_method("slm-lab", options)
    with pytest.raises(LayerfoldError, match="aims at a size"):
        make_method("slm-lab", {"refine": 1, "threshold": 0.9})


def test_fitted_plan_saves_and_applies_again(tmp_path):
    model = tiny_llama()
    toks = tokens()
    result = api.make_plan(wrap_model(model), "slm-lab", Target(layers=5),
                           options={"fit": "ridge", "merge": "base", "selection": "greedy"},
                           tokens=toks, progress=False)
    assert result.overrides, "a fitted plan carries its fused-layer weights"
    api.save_plan(result, tmp_path / "plan.json")
    again = api.load_plan(tmp_path / "plan.json")
    assert again.plan.to_dict() == result.plan.to_dict()
    a = api.apply_plan(copy.deepcopy(model), result)
    b = api.apply_plan(copy.deepcopy(model), again)
    x = tokens(2, 12, seed=5)
    with torch.no_grad():
        assert torch.equal(a(x).logits, b(x).logits)


def test_fit_reduces_the_windows_error():
    """The ridge correction makes the fused layer reproduce its window better on calibration data."""
    from lab.correction import fit_output_projection

    from layerfold.calibrate import capture
    from layerfold.merge import build_fused_layer
    from layerfold.models.arch import architecture_for

    model = tiny_llama()
    arch = architecture_for(model.config)
    cache = capture(model, arch, tokens(8, 16), batch_size=4, progress=False)
    lo, hi = 2, 4
    fused = build_fused_layer([cache.layers[i] for i in range(lo, hi + 1)], operator="base")

    def error(layer):
        out = cache.final(cache.run(lo, [(layer, lo)]))
        return float((out - cache.output(hi)).pow(2).mean())

    before = error(fused)
    fit_output_projection(fused, arch, cache.inputs[lo], cache.inputs[hi + 1], cache.extras[lo], ridge=1e-3)
    assert error(fused) < 0.9 * before


def _engine(model, toks):
    from layerfold.calibrate import capture
    from layerfold.models.arch import architecture_for

    return lab.LabEngine(capture(model, architecture_for(model.config), toks, progress=False), "output-cosine",
                         "base", "base")


@pytest.mark.parametrize("radius", [0, 2])
def test_refine_swaps_only_improve_and_incremental_scores_match_a_full_run(radius):
    from layerfold.methods.slm import removed_layers

    model, toks = tiny_llama(layers=10, seed=2), tokens()
    engine = _engine(model, toks)
    start = {7, 8, 9}  # the top layers: a poor plan, so swaps are found
    removed, history = engine.refine(start, passes=4, radius=radius, progress=False)
    assert len(removed) == 3 and 0 not in removed
    assert history, "a plan that drops the last layers should be improved"
    scores = [engine.score_removal(start)] + [s for _, _, s in history]
    assert all(b > a for a, b in zip(scores, scores[1:], strict=False))
    if radius:
        assert all(abs(r - k) <= radius for r, k, _ in history)
    fresh = _engine(model, toks)  # no memo: scored from scratch on the original activations
    assert fresh.score_removal(removed) == pytest.approx(history[-1][2], abs=1e-6)
    # the plan's model really is the one scored: apply it and compare final hidden states
    result = api.make_plan(wrap_model(model), "slm-lab", Target(layers=7),
                           options={"selection": "greedy", "refine": 4, "refine_radius": radius},
                           tokens=toks, progress=False)
    greedy = api.make_plan(wrap_model(model), "slm", Target(layers=7), tokens=toks, progress=False)
    assert result.plan.num_layers_after == 7
    got = removed_layers(result.plan.windows())
    assert fresh.score_removal(got) >= fresh.score_removal(removed_layers(greedy.plan.windows())) - 1e-9


@pytest.mark.parametrize("pick", ["kl", "criterion"])
def test_portfolio_keeps_the_best_candidate_by_kl_or_criterion(pick):
    model, toks = tiny_llama(layers=10, seed=4), tokens()
    result = api.make_plan(wrap_model(model), "slm-lab", Target(layers=7), options={"selection": "portfolio",
                                                                                 "pick": pick},
                           tokens=toks, progress=False)
    scores = result.plan.scores["portfolio"]
    assert set(scores) <= {"greedy", "optimal", "block-influence", "angular-block"} and len(scores) >= 3
    chosen = result.plan.scores["portfolio_pick"]
    if pick == "kl":
        kl = result.plan.scores["portfolio_kl"]
        assert set(kl) == set(scores) and min(kl.values()) >= 0
        assert kl[chosen] == min(kl.values())
    else:
        assert "portfolio_kl" not in result.plan.scores
        assert scores[chosen] == max(scores.values())
    assert result.plan.num_layers_after == 7


def test_portfolio_picks_by_the_criterion_by_default():
    assert make_method("slm-lab", {}).pick == "criterion"
    with pytest.raises(LayerfoldError, match="pick"):
        make_method("slm-lab", {"pick": "cosine"})


def test_output_kl_matches_the_models_own_logits():
    """The engine's KL of a removal equals KL(original || pruned) computed from the two models'
    logits on the calibration tokens; no removal gives 0."""
    from layerfold.calibrate import capture
    from layerfold.models.arch import architecture_for

    model, toks = tiny_llama(layers=8, seed=5), tokens(n=3, t=12)
    cache = capture(model, architecture_for(model.config), toks, batch_size=2, progress=False)
    engine = lab.LabEngine(cache, "output-cosine", "base", "base")
    assert engine.kl_removal(set()) == pytest.approx(0.0, abs=1e-9)
    removed = {3, 4, 6}
    pruned = copy.deepcopy(model)
    pruned.model.layers = torch.nn.ModuleList(l for i, l in enumerate(pruned.model.layers) if i not in removed)
    pruned.config.num_hidden_layers = len(pruned.model.layers)
    for i, layer in enumerate(pruned.model.layers):
        layer.self_attn.layer_idx = i
    with torch.no_grad():
        p = torch.log_softmax(model(toks).logits.float(), -1)
        q = torch.log_softmax(pruned(toks).logits.float(), -1)
    expected = float((p.exp() * (p - q)).sum(-1).mean())
    assert expected > 1e-4
    assert engine.kl_removal(removed) == pytest.approx(expected, rel=1e-4)


def test_rescale_lowers_the_calibration_kl_and_the_saved_plan_rebuilds_it():
    """rescale=kl picks a factor per window that never raises the KL; the plan carries the factors,
    and the model surgery builds from it has exactly the KL the engine reported."""
    model, toks = tiny_llama(layers=10, seed=4), tokens()
    plain = api.make_plan(wrap_model(copy.deepcopy(model)), "slm", Target(layers=6), tokens=toks, progress=False)
    result = api.make_plan(wrap_model(copy.deepcopy(model)), "slm-lab", Target(layers=6), options={"rescale": "kl"},
                           tokens=toks, progress=False)
    assert result.plan.windows() == plain.plan.windows()  # the windows are chosen first, then rescaled
    info = result.plan.scores["rescale"]
    assert info["objective"] == "kl" and info["after"] <= info["before"]
    assert set(info["factors"].values()) <= set(lab.RESCALE_GRID)
    scaled = {op.lo: op.detail["branch_scale"] for op in result.plan.operations if "branch_scale" in op.detail}
    assert scaled, "some window should take a factor other than 1 on this model"
    assert all(v != 1.0 for v in scaled.values())
    assert info["after"] < info["before"]
    assert rebuilt_kl(model, result.plan, toks) == pytest.approx(info["after"], rel=1e-4)
    by_cosine = api.make_plan(wrap_model(copy.deepcopy(model)), "slm-lab", Target(layers=6),
                              options={"rescale": "criterion"}, tokens=toks, progress=False).plan.scores["rescale"]
    assert by_cosine["objective"] == "-output-cosine"
    assert -1 <= -by_cosine["after"] <= 1 and by_cosine["after"] <= by_cosine["before"]


def test_channels_then_kl_starts_the_grid_from_the_channel_fitted_model():
    model, toks = tiny_llama(layers=10, seed=4), tokens()
    info = api.make_plan(wrap_model(copy.deepcopy(model)), "slm", Target(layers=6), tokens=toks,
                         progress=False).plan.scores["channels"]
    both = api.make_plan(wrap_model(copy.deepcopy(model)), "slm-lab", Target(layers=6),
                         options={"rescale": "channels+kl"}, tokens=toks, progress=False).plan
    assert both.scores["rescale"]["before"] == pytest.approx(info["kl_after"], rel=1e-5)
    assert both.scores["rescale"]["after"] <= both.scores["rescale"]["before"]


def test_rescale_refuses_a_fitted_layer():
    with pytest.raises(LayerfoldError, match="rescale"):
        make_method("slm-lab", {"selection": "greedy", "fit": "ridge", "rescale": "kl"})
