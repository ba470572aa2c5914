"""The SLM engine: the decisions of the authors' loop and of the paper's, exact target sizes,
options checked when they are built, plan round trip."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

from layerfold import api
from layerfold.errors import LayerfoldError
from layerfold.methods.base import Target, make_method
from layerfold.models.load import wrap_model

sys.path.insert(0, str(Path(__file__).parent))
from authors_loop import sliding_loop  # noqa: E402


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


def threshold_plan(model, toks, method: str, threshold: float):
    return api.make_plan(wrap_model(model), method, options={"threshold": threshold}, tokens=toks, progress=False)


# slm-reference on tiny_llama() (8 layers) and tokens(): threshold -> windows, layers left.  At 0.995
# the last pair (6, 7) would pass (slm-paper fuses it); at 0.5 the window still grows at layer 0
# when the loop ends, so it is dropped and nothing is fused.
AUTHORS_DECISIONS = {0.995: ([(5, 6)], 7), 0.95: ([(3, 6)], 5), 0.8: ([(1, 6)], 3), 0.5: ([], 8)}
PAPER_DECISIONS = {0.995: ([(6, 7)], 7), 0.95: ([(3, 4), (5, 7)], 5), 0.5: ([(0, 1), (2, 7)], 2)}


@pytest.mark.parametrize("threshold", sorted(AUTHORS_DECISIONS))
def test_slm_reference_decides_as_the_authors_loop(threshold):
    model, toks = tiny_llama(), tokens()
    windows, layers = AUTHORS_DECISIONS[threshold]
    loop = sliding_loop(model, toks, threshold, "reference", authors=True)
    assert (loop.windows, loop.layers) == (windows, layers)
    result = threshold_plan(model, toks, "slm-reference", threshold)
    assert (sorted(result.plan.windows()), result.plan.num_layers_after) == (windows, layers)
    # the engine scores the same candidates; the authors' loop scores the fused model once more after each window
    assert result.plan.scores["candidates_evaluated"] == loop.candidates


@pytest.mark.parametrize("threshold", sorted(PAPER_DECISIONS))
def test_slm_paper_decides_as_the_papers_loop(threshold):
    model, toks = tiny_llama(), tokens()
    windows, layers = PAPER_DECISIONS[threshold]
    loop = sliding_loop(model, toks, threshold, "diff", authors=False)
    assert (loop.windows, loop.layers, loop.rechecks) == (windows, layers, 0)
    result = threshold_plan(model, toks, "slm-paper", threshold)
    assert (sorted(result.plan.windows()), result.plan.num_layers_after) == (windows, layers)
    assert result.plan.scores["candidates_evaluated"] == loop.candidates


def test_each_detail_of_the_authors_loop_changes_its_own_decision():
    """Start, comparison and the last window, one at a time, on the engine."""
    from layerfold.calibrate import capture
    from layerfold.methods.slm import AUTHORS_LOOP, PAPER_LOOP, SlidingLoop, SlmEngine
    from layerfold.models.arch import architecture_for

    model, toks = tiny_llama(), tokens()
    engine = SlmEngine(capture(model, architecture_for(model.config), toks, progress=False), "output-cosine",
                       "reference", "base")
    # the start: with the last layer open to merging, 0.995 fuses the last pair
    assert engine.run(0.995, loop=PAPER_LOOP).windows == [(6, 7)]
    assert engine.run(0.995, loop=SlidingLoop(keep_top=1)).windows == [(5, 6)]
    # the comparison: a threshold equal to the first candidate's similarity passes it only with >=
    first = engine.similarity((), 5, 6)
    assert (5, 6) in engine.run(first, loop=SlidingLoop(keep_top=1)).windows
    strict = engine.run(first, loop=SlidingLoop(keep_top=1, strict=True))
    assert strict.rejected[(5, 6)] == first and (5, 6) not in strict.windows
    # the last window: still growing at layer 0, fused or dropped
    assert engine.run(0.5, loop=SlidingLoop(keep_top=1)).windows == [(0, 6)]
    assert engine.run(0.5, loop=AUTHORS_LOOP).windows == []


@pytest.mark.parametrize("method", ["slm-paper", "slm-reference"])
def test_target_search_meets_every_size_the_loop_can_reach(method):
    model, toks = tiny_llama(), tokens()
    for keep in (7, 5, 2):
        result = api.make_plan(wrap_model(model), method, Target(layers=keep), tokens=toks, progress=False)
        assert result.plan.num_layers_after == keep and result.plan.threshold is not None
    if method == "slm-reference":  # the last layer is never merged: one layer cannot be left
        with pytest.raises(LayerfoldError, match="top 1 never merged"):
            api.make_plan(wrap_model(model), method, Target(layers=1), tokens=toks, progress=False)


@pytest.mark.parametrize("keep", [7, 5, 3, 1])
@pytest.mark.parametrize("selection", ["sliding", "greedy", "optimal"])
def test_target_search_hits_every_reachable_size(keep, selection):
    model = tiny_llama()
    options = {"selection": selection}
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


def test_unset_selection_follows_one_rule():
    """Unset, the selection is sliding with a threshold, greedy with another fused layer than the
    base layer as it is, else the portfolio; an explicit selection is kept."""
    assert make_method("slm", {"threshold": 0.9}).chosen_selection == "sliding"
    assert make_method("slm", {}).chosen_selection == "portfolio"
    assert make_method("slm", {"merge": "diff"}).chosen_selection == "greedy"
    assert make_method("slm", {"norms": "merge"}).chosen_selection == "greedy"
    assert make_method("slm", {"merge": "diff", "selection": "optimal"}).chosen_selection == "optimal"
    assert make_method("slm-paper", {}).merge == "diff" and make_method("slm-paper", {}).chosen_selection == "sliding"
    assert make_method("slm-reference", {}).merge == "reference"


@pytest.mark.parametrize("options, message", [
    ({"selection": "greedy", "threshold": 0.9}, "selection=greedy aims at a size"),
    ({"threshold": 0.9, "criterion": "loss"}, "no threshold scale"),
    ({"selection": "portfolio", "merge": "diff"}, "needs merge=base and norms=base"),
    ({"selection": "influence", "norms": "merge"}, "needs merge=base and norms=base"),
    ({"criterion": "cka-linear"}, "selection=portfolio scores the whole model's output"),
    ({"selection": "greedy", "criterion": "angular"}, "selection=greedy scores the whole model's output"),
    ({"merge": "dif"}, "unknown merge operator 'dif'. Did you mean 'diff'"),
    ({"rescale": "kl"}, "option 'rescale'"),
    ({"fit": "ridge"}, "unknown slm option 'fit'"),
    ({"threshold": 1.5}, "less than or equal to 1"),
])
def test_conflicting_options_are_refused_when_built(options, message):
    """make_method (which the CLI calls before loading the model) refuses them, in one line."""
    with pytest.raises(LayerfoldError, match=message):
        make_method("slm", options)


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


def test_portfolio_keeps_the_best_scoring_candidate():
    model, toks = tiny_llama(layers=10, seed=4), tokens()
    result = api.make_plan(wrap_model(model), "slm", Target(layers=7), options={"selection": "portfolio"},
                           tokens=toks, progress=False)
    scores = result.plan.scores["portfolio"]
    assert set(scores) <= {"greedy", "optimal", "block-influence", "angular-block"} and len(scores) >= 3
    chosen = result.plan.scores["portfolio_pick"]
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


@pytest.mark.parametrize("options", [{"selection": "portfolio", "criterion": "cka-linear"},
                                     {"selection": "influence", "merge": "mean"}])
def test_portfolio_and_influence_need_plans_of_removed_layers(options):
    with pytest.raises(LayerfoldError, match="merge=base|output-cosine"):
        api.make_plan(wrap_model(tiny_llama()), "slm", Target(layers=5), options=options, tokens=tokens(),
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


def test_angular_selection_folds_angulars_block_with_the_channel_correction():
    from layerfold.calibrate import capture
    from layerfold.methods.angular import block_distances
    from layerfold.methods.slm import removed_layers
    from layerfold.models.arch import architecture_for

    model, toks = tiny_llama(layers=8, seed=1), tokens()
    result = api.make_plan(wrap_model(model), "slm", Target(layers=6), options={"selection": "angular"}, tokens=toks,
                           progress=False)
    distance = block_distances(capture(model, architecture_for(model.config), toks, progress=False), 2)
    start = min((lo for lo in distance if lo > 0), key=lambda lo: distance[lo])  # Angular's block, layer 0 kept
    assert removed_layers(result.plan.windows()) == {start, start + 1}
    assert len(result.plan.windows()) == 1 and result.plan.num_layers_after == 6
    assert all("channel_scale" in op.detail for op in result.plan.operations)
