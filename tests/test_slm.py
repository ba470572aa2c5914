"""The SLM engine: same decisions as the naive loop, exact target sizes, plan round trip."""

from __future__ import annotations

import copy
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

from layerfold import api
from layerfold.errors import LayerfoldError
from layerfold.methods.base import Target
from layerfold.models.load import wrap_model

_spec = importlib.util.spec_from_file_location("naive_slm", Path(__file__).parents[1] / "benchmarks" / "naive_slm.py")
naive = importlib.util.module_from_spec(_spec)
sys.modules["naive_slm"] = naive
_spec.loader.exec_module(naive)


def tiny_llama(layers: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                                   bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    # make neighbouring layers similar, as in trained models, so windows of several sizes occur
    layers_ = model.model.layers
    with torch.no_grad():
        for i in range(1, layers):
            for p, q in zip(layers_[i].parameters(), layers_[i - 1].parameters(), strict=True):
                p.mul_(0.3).add_(0.7 * q)
    return model


def tokens(n: int = 4, t: int = 16, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, t), generator=torch.Generator().manual_seed(seed))


def engine_windows(model, toks, threshold, merge="diff"):
    result = api.make_plan(wrap_model(model), "slm",
                           options={"threshold": threshold, "merge": merge, "selection": "sliding"},
                           tokens=toks, progress=False)
    return sorted(result.plan.windows()), result


@pytest.mark.parametrize("merge", ["diff", "reference"])
def test_engine_takes_the_naive_loops_decisions(merge):
    model = tiny_llama()
    toks = tokens()
    sims = []
    for threshold in (0.999, 0.99, 0.95, 0.8):
        expected, _ = naive.naive_slm(model, toks, threshold, merge=merge)
        got, result = engine_windows(model, toks, threshold, merge)
        assert got == expected, f"threshold {threshold}"
        sims.append(len(got))
    assert len(set(sims)) > 1, "thresholds should make different plans, else the test shows nothing"


@pytest.mark.parametrize("keep", [7, 5, 3, 1])
@pytest.mark.parametrize("selection", ["sliding", "greedy", "optimal"])
def test_target_search_hits_every_reachable_size(keep, selection):
    model = tiny_llama()
    options = {"selection": selection, "max_window": 8}
    result = api.make_plan(wrap_model(model), "slm", Target(layers=keep), options=options,
                           tokens=tokens(), progress=False)
    assert result.plan.num_layers_after == keep
    pruned = api.apply_plan(copy.deepcopy(model), result)
    assert len(pruned.model.layers) == keep
    assert pruned.config.num_hidden_layers == keep


def test_ratio_and_param_ratio_targets():
    model = tiny_llama(layers=10)
    r = api.make_plan(wrap_model(model), "slm", Target(ratio=0.3), tokens=tokens(), progress=False)
    assert r.plan.num_layers_after == 7
    r = api.make_plan(wrap_model(model), "slm", Target(param_ratio=0.2), tokens=tokens(), progress=False)
    total = sum(p.numel() for p in model.parameters())
    per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    removed = r.plan.removed_layers
    assert removed * per_layer >= 0.2 * total > (removed - 1) * per_layer


@pytest.mark.parametrize("target", [Target(layers=0), Target(layers=8), Target(ratio=0.99)])
def test_impossible_targets_are_refused(target):
    with pytest.raises(LayerfoldError):
        api.make_plan(wrap_model(tiny_llama()), "slm", target, tokens=tokens(), progress=False)


def test_threshold_and_target_conflict_and_range():
    with pytest.raises(LayerfoldError, match="either"):
        api.make_plan(wrap_model(tiny_llama()), "slm", Target(layers=4), options={"threshold": 0.9},
                      tokens=tokens(), progress=False)
    with pytest.raises(LayerfoldError, match="threshold.*less than or equal to 1"):
        api.make_plan(wrap_model(tiny_llama()), "slm", options={"threshold": 2.0, "selection": "sliding"},
                      tokens=tokens(), progress=False)
    with pytest.raises(LayerfoldError, match="unknown merge operator 'dif'. Did you mean 'diff'"):
        api.make_plan(wrap_model(tiny_llama()), "slm", Target(layers=4), options={"merge": "dif"},
                      tokens=tokens(), progress=False)
    with pytest.raises(LayerfoldError, match="option"):
        api.make_plan(wrap_model(tiny_llama()), "slm", Target(layers=4), options={"bogus": 1},
                      tokens=tokens(), progress=False)


def test_fitted_plan_saves_and_applies_again(tmp_path):
    model = tiny_llama()
    toks = tokens()
    result = api.make_plan(wrap_model(model), "slm", Target(layers=5),
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
    from layerfold.calibrate import capture
    from layerfold.correction import fit_output_projection
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


def test_a_threshold_alone_means_the_papers_sliding_loop():
    from layerfold.methods.base import make_method

    assert make_method("slm", {"threshold": 0.9}).selection == "sliding"
    assert make_method("slm", {}).selection == "portfolio"
    # another fused layer than the base layer: the default falls back to the greedy fold
    assert make_method("slm", {"fit": "ridge"}).selection == "greedy"
    assert make_method("slm", {"merge": "diff"}).selection == "greedy"
    assert make_method("slm", {"merge": "diff", "selection": "optimal"}).selection == "optimal"
    assert make_method("slm-paper", {}).merge == "diff"


def test_optimal_selection_folds_the_window_whose_layers_do_nothing():
    """Layers 4 and 5 made exact identities: keeping layer 3 and folding 3..5 costs nothing."""
    model = tiny_llama(layers=8, seed=3)
    with torch.no_grad():
        for i in (4, 5):
            model.model.layers[i].self_attn.o_proj.weight.zero_()
            model.model.layers[i].mlp.down_proj.weight.zero_()
    result = api.make_plan(wrap_model(model), "slm", Target(layers=6), options={"selection": "optimal"},
                           tokens=tokens(), progress=False)
    assert result.plan.windows() == [(3, 5)]
    assert result.plan.operations[0].score == pytest.approx(1.0)


def test_removed_layers_and_windows_round_trip():
    from layerfold.methods.slm import removed_layers, windows_of

    assert windows_of({2, 3, 4, 7}) == [(1, 4), (6, 7)]
    assert removed_layers([(1, 4), (6, 7)]) == {2, 3, 4, 7}
    assert windows_of(set()) == []


def _engine(model, toks):
    from layerfold.calibrate import capture
    from layerfold.methods.slm import SlmEngine
    from layerfold.models.arch import architecture_for

    cache = capture(model, architecture_for(model.config), toks, progress=False)
    return SlmEngine(cache, "output-cosine", "base", "base")


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
    result = api.make_plan(wrap_model(model), "slm", Target(layers=7),
                           options={"selection": "greedy", "refine": 4, "refine_radius": radius},
                           tokens=toks, progress=False)
    greedy = api.make_plan(wrap_model(model), "slm", Target(layers=7), tokens=toks, progress=False)
    assert result.plan.num_layers_after == 7
    got = removed_layers(result.plan.windows())
    assert fresh.score_removal(got) >= fresh.score_removal(removed_layers(greedy.plan.windows())) - 1e-9


@pytest.mark.parametrize("pick", ["kl", "criterion"])
def test_portfolio_keeps_the_best_scoring_candidate(pick):
    model, toks = tiny_llama(layers=10, seed=4), tokens()
    result = api.make_plan(wrap_model(model), "slm", Target(layers=7), options={"selection": "portfolio", "pick": pick},
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


@pytest.mark.parametrize("seed", [4, 7])  # ShortGPT drops 6-8 (one window) and 5, 8-9 (two)
def test_influence_selection_folds_shortgpts_layers_with_the_channel_correction(seed):
    """selection=influence removes the layers ShortGPT removes, each run folded into the kept layer
    below it with per-channel factors; it needs a size."""
    from layerfold.methods.slm import removed_layers

    model, toks = tiny_llama(layers=10, seed=seed), tokens()
    result = api.make_plan(wrap_model(model), "slm", Target(layers=7), options={"selection": "influence"},
                           tokens=toks, progress=False)
    shortgpt = api.make_plan(wrap_model(model), "shortgpt", Target(layers=7), tokens=toks, progress=False)
    gone = set(range(10)) - set(shortgpt.plan.kept_sources())
    assert 0 not in gone  # (layer 0 has no layer below to fold into; selection=influence never removes it)
    assert result.plan.num_layers_after == 7 and result.plan.scores["selection"] == "influence"
    assert removed_layers(result.plan.windows()) == gone
    assert all(op.kind == "fuse" and "channel_scale" in op.detail for op in result.plan.operations)
    with pytest.raises(LayerfoldError, match="aims at a size"):
        api.make_plan(wrap_model(model), "slm", options={"selection": "influence", "threshold": 0.9}, tokens=toks,
                      progress=False)


def test_portfolio_picks_by_the_criterion_by_default():
    from layerfold.methods.base import make_method

    assert make_method("slm", {}).pick == "criterion"
    with pytest.raises(Exception, match="pick"):
        make_method("slm", {"pick": "cosine"})


def test_output_kl_matches_the_models_own_logits():
    """The engine's KL of a removal equals KL(original || pruned) computed from the two models'
    logits on the calibration tokens; no removal gives 0."""
    from layerfold.calibrate import capture
    from layerfold.methods.slm import SlmEngine
    from layerfold.models.arch import architecture_for

    model, toks = tiny_llama(layers=8, seed=5), tokens(n=3, t=12)
    cache = capture(model, architecture_for(model.config), toks, batch_size=2, progress=False)
    engine = SlmEngine(cache, "output-cosine", "base", "base")
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


@pytest.mark.parametrize("options", [{"refine": 2, "merge": "diff"}, {"selection": "portfolio", "fit": "ridge"},
                                     {"selection": "portfolio", "criterion": "cka-linear"},
                                     {"selection": "influence", "merge": "mean"}])
def test_refine_and_portfolio_need_plans_of_removed_layers(options):
    with pytest.raises(LayerfoldError, match="merge=base|output-cosine"):
        api.make_plan(wrap_model(tiny_llama()), "slm", Target(layers=5), options=options, tokens=tokens(),
                      progress=False)
    with pytest.raises(LayerfoldError, match="aims at a size"):
        api.make_plan(wrap_model(tiny_llama()), "slm", options={"refine": 1, "threshold": 0.9}, tokens=tokens(),
                      progress=False)


def test_engine_keeps_only_the_fused_layers_of_the_model_it_scores():
    """Memory: a target search or a greedy fold must not accumulate every window it ever fused."""
    from layerfold.methods.slm import SlmEngine, greedy_fold

    model, toks = tiny_llama(layers=10, seed=5), tokens()
    engine = _engine(model, toks)
    diff = SlmEngine(engine.cache, "output-cosine", "diff", "base")
    _, run = diff.search(4, progress=False)
    assert set(diff._fused) <= set(diff.run(-1.0, 4).windows)  # only the last run's windows stay
    greedy = SlmEngine(engine.cache, "output-cosine", "diff", "base")
    result = greedy_fold(greedy, 4, progress=False)
    assert set(greedy._fused) == set(result.windows)
    # the base merge needs no copy at all: the fused layer is the base layer itself
    assert engine.candidate((2, 4)) is engine.cache.layers[2]


def rebuilt_kl(model, plan, toks) -> float:
    """KL(original || pruned) on ``toks`` of the model that ``plan``, saved to JSON and read back,
    builds from ``model``."""
    saved = type(plan).from_dict(json.loads(plan.to_json()))
    pruned = api.apply_plan(wrap_model(copy.deepcopy(model)), saved)
    with torch.no_grad():
        p = torch.log_softmax(model(toks).logits.float(), -1)
        q = torch.log_softmax(pruned(toks).logits.float(), -1)
    return float((p.exp() * (p - q)).sum(-1).mean())


def test_rescale_lowers_the_calibration_kl_and_the_saved_plan_rebuilds_it():
    """rescale=kl picks a factor per window that never raises the KL; the plan carries the factors,
    and the model surgery builds from it has exactly the KL the engine reported."""
    from layerfold.methods.slm import RESCALE_GRID

    model, toks = tiny_llama(layers=10, seed=4), tokens()
    plain = api.make_plan(wrap_model(copy.deepcopy(model)), "slm", Target(layers=6), tokens=toks, progress=False)
    result = api.make_plan(wrap_model(copy.deepcopy(model)), "slm", Target(layers=6), options={"rescale": "kl"},
                           tokens=toks, progress=False)
    assert result.plan.windows() == plain.plan.windows()  # the windows are chosen first, then rescaled
    info = result.plan.scores["rescale"]
    assert info["objective"] == "kl" and info["after"] <= info["before"]
    assert set(info["factors"].values()) <= set(RESCALE_GRID)
    scaled = {op.lo: op.detail["branch_scale"] for op in result.plan.operations if "branch_scale" in op.detail}
    assert scaled, "some window should take a factor other than 1 on this model"
    assert all(v != 1.0 for v in scaled.values())
    assert info["after"] < info["before"]
    assert rebuilt_kl(model, result.plan, toks) == pytest.approx(info["after"], rel=1e-4)
    by_cosine = api.make_plan(wrap_model(copy.deepcopy(model)), "slm", Target(layers=6),
                              options={"rescale": "criterion"}, tokens=toks, progress=False).plan.scores["rescale"]
    assert by_cosine["objective"] == "-output-cosine"
    assert -1 <= -by_cosine["after"] <= 1 and by_cosine["after"] <= by_cosine["before"]


def test_channel_factors_are_the_least_squares_fit_and_the_saved_plan_rebuilds_them():
    """rescale=channels: for the lowest window, without ridge, each channel's two factors are the
    least-squares solution computed here with lstsq; with the default ridge the plan carries the
    factors, lowers the window's residual error against factor 1, and rebuilds a model with
    exactly the KL the engine reported."""
    from layerfold.calibrate import capture
    from layerfold.merge import scale_branches
    from layerfold.methods.slm import SlmEngine
    from layerfold.models.arch import get_dotted

    model, toks = tiny_llama(layers=10, seed=4), tokens()
    wrapped = wrap_model(copy.deepcopy(model))
    result = api.make_plan(wrapped, "slm", Target(layers=6), options={"rescale": "channels"}, tokens=toks,
                           progress=False)
    windows = result.plan.windows()
    cache = capture(wrapped.model, wrapped.arch, toks, progress=False)
    engine = SlmEngine(cache, "output-cosine", "base", "base")
    lo, hi = windows[0]
    exact = engine.fit_channels([windows[0]], ridge=0.0, progress=False)[0][(lo, hi)]
    branches = list(wrapped.arch.residual_branches)
    layer, seen = copy.deepcopy(cache.layers[lo]), {}
    for p in branches:
        get_dotted(layer, p).register_forward_hook(lambda m, a, out, p=p: seen.__setitem__(p, out.double()))
    x, y = cache.input_of(lo).double(), cache.input_of(hi + 1).double()
    cache.run(lo, [(layer, lo)], hidden=[cache.input_of(lo)])
    width = x.shape[-1]
    for c in range(width):
        design = torch.stack([seen[p][..., c].reshape(-1) for p in branches], -1)
        target = (y - x)[..., c].reshape(-1, 1)
        solution = torch.linalg.lstsq(design, target).solution.squeeze(-1)
        got = torch.stack([exact[p][c].double() for p in branches])
        torch.testing.assert_close(got, solution, rtol=1e-3, atol=1e-4)
    # the plan: every window carries one factor per channel and branch, the residual error drops
    per_window = {(op.lo, op.hi): op.detail["channel_scale"] for op in result.plan.operations}
    assert set(per_window) == set(windows)
    assert all(len(v) == width for c in per_window.values() for v in c.values())
    assert "+channels" in result.plan.summary()
    fitted = copy.deepcopy(cache.layers[lo])
    scale_branches(fitted, wrapped.arch.residual_branches,
                   {p: torch.tensor(v) for p, v in per_window[(lo, hi)].items()})
    error = {name: float(((torch.cat(cache.run(lo, [(m, lo)])) - y.float()) ** 2).sum())
             for name, m in (("one", cache.layers[lo]), ("fitted", fitted))}
    assert error["fitted"] < error["one"]
    info = result.plan.scores["channels"]
    assert info["ridge"] == 3.0 and info["kl_after"] != info["kl_before"]
    assert rebuilt_kl(model, result.plan, toks) == pytest.approx(info["kl_after"], rel=1e-4)
    both = api.make_plan(wrap_model(copy.deepcopy(model)), "slm", Target(layers=6),
                         options={"rescale": "channels+kl"}, tokens=toks, progress=False).plan
    assert both.scores["rescale"]["before"] == pytest.approx(info["kl_after"], rel=1e-5)
    assert both.scores["rescale"]["after"] <= both.scores["rescale"]["before"]


def test_rescale_refuses_a_fitted_layer():
    with pytest.raises(LayerfoldError, match="rescale"):
        api.make_plan(wrap_model(tiny_llama()), "slm", Target(layers=5),
                      options={"selection": "greedy", "fit": "ridge", "rescale": "kl"}, tokens=tokens(), progress=False)
