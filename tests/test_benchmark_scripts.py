"""The helpers of benchmarks/ that published figures go through: reading, filtering and renaming quality
rows (quality/report.py), the paired bootstrap of zero-shot outcomes (quality/paired.py), and the probes
of the finished studies."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def _script(name: str):
    """The module at ``benchmarks/NAME.py``, imported with benchmarks/ on the path as the scripts run."""
    sys.path.insert(0, str(BENCH))
    try:
        spec = importlib.util.spec_from_file_location(name.replace("/", "."), BENCH / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    finally:
        sys.path.remove(str(BENCH))


def test_renames_swap_two_configurations_and_full_sets_merge_by_configuration(tmp_path):
    report = _script("quality/report")
    seven = dict.fromkeys(report.TASKS, 0.5)
    old = tmp_path / "old.jsonl"
    old.write_text(json.dumps({"config": "slm", "ratio": 0.2, "zeroshot": seven, "ppl/ptb@2048": 99.0}) + "\n")
    new = tmp_path / "new.jsonl"
    new.write_text("\n".join(json.dumps(r) for r in [
        {"config": "slm", "ratio": 0.2, "zeroshot": seven, "zs/mean": 0.5},
        {"config": "slm/channels", "ratio": 0.2, "zeroshot": seven, "zs/mean": 0.6}]) + "\n")
    rows = report.read_rows(f"{new}|slm>slm/channels+kl,slm/channels>slm")
    assert [(r["config"], r["zs/mean"]) for r in rows] == [("slm/channels+kl", 0.5), ("slm", 0.6)]
    table = report.fullsets_table(f"{old}|slm>slm/channels+kl;{new}|slm>slm/channels+kl,slm/channels>slm")
    body = [line for line in table.splitlines() if line.startswith("| slm")]
    assert len(body) == 2  # one row per configuration and ratio, not one per file
    merged = next(line for line in body if line.startswith("| slm/channels+kl "))
    assert "| 50.0 |" in merged and "| 99.0 |" in merged  # the later file's mean, the earlier one's perplexity


def test_paired_bootstrap_of_identical_and_dominating_outcomes():
    paired = _script("quality/paired").paired
    a = [np.array([1, 0, 1, 1, 0] * 40, dtype=np.uint8), np.array([0, 1] * 50, dtype=np.uint8)]
    point, low, high, p = paired(a, a, resamples=200, seed=0)
    assert (point, low, high, p) == (0.0, 0.0, 0.0, 1.0)
    better = [np.ones_like(a[0]), a[1]]  # task 1: right everywhere; task 2: the same outcomes
    point, low, high, p = paired(better, a, resamples=200, seed=0)
    assert point == pytest.approx((1 - a[0].mean()) / 2)
    assert 0 < low <= point <= high and p == 0.0


@pytest.mark.parametrize("bos", [False, True])
def test_copy_probe_scores_only_the_second_copy(bos):
    """A fake model that predicts each token of a row's second half from its first half (and nothing
    right elsewhere) scores 100% and zero NLL loss against the probe; one shifted by a token, 0%."""
    import torch

    probe = _script("studies/copying/induction_probe")
    length = 6
    ids = torch.randint(10, 50, (5, length))
    rows = torch.cat([torch.full((5, 1), 1) if bos else ids[:, :0], ids, ids], dim=1)
    start = 1 + length if bos else length

    class Copier(torch.nn.Module):
        def __init__(self, shift: int):
            super().__init__()
            self.weight, self.shift = torch.nn.Parameter(torch.zeros(1)), shift

        def forward(self, x):
            logits = torch.full((*x.shape, 64), -30.0)
            for t in range(x.shape[1]):  # the token `length` back, one ahead: right on the second copy only
                src = t + 1 - length + self.shift
                if 0 <= src < x.shape[1] and t >= start:
                    logits[:, t].scatter_(1, x[:, src:src + 1], 30.0)
            return type("Out", (), {"logits": logits})()

    exact = probe.copy_scores(Copier(0), rows, batch=2)
    assert exact["top1"] == 1.0 and exact["nll"] < 1e-6
    assert probe.copy_scores(Copier(1), rows, batch=2)["top1"] < 0.5


def test_copy_aware_calibration_repeats_each_windows_first_half():
    """quality/run.py's `slm/books+repeats` plans on the calibration windows followed by each window's
    first half shown twice (no new text); every other configuration on the windows as given."""
    import torch

    sys.path.insert(0, str(BENCH))  # calibration_for imports studies.copying.copy_calibration as the scripts do
    try:
        quality = _script("quality/run")
        tokens = torch.arange(40).reshape(4, 10)
        repeated = quality.calibration_for("slm/books+repeats", tokens)
        plain = quality.calibration_for("slm", tokens)
    finally:
        sys.path.remove(str(BENCH))
    assert plain is tokens
    assert repeated.shape == (8, 10) and torch.equal(repeated[:4], tokens)
    assert torch.equal(repeated[4:, :5], tokens[:, :5]) and torch.equal(repeated[4:, 5:], tokens[:, :5])
    assert set(repeated.unique().tolist()) == set(tokens.unique().tolist())  # no new text


def test_mc_predictor_measures_of_a_model_against_itself_and_rank_correlation():
    """studies/mc_predictors: a model measured against itself agrees everywhere with KL 0, and the best
    temperature never scores worse than T=1; Spearman is +1/-1 for monotone orders, ties averaged."""
    import torch

    sys.path.insert(0, str(BENCH))
    try:
        mc = _script("studies/mc_predictors/mc_predictors")
    finally:
        sys.path.remove(str(BENCH))
    torch.manual_seed(0)

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(20, 20)

        def forward(self, ids):
            return type("Out", (), {"logits": 3 * self.emb(ids)})()

    model, ids = Tiny(), torch.randint(0, 20, (5, 9))
    same = mc.measures(model, model, ids, batch_size=2)
    assert same["agree"] == 1.0 and same["kl"] == pytest.approx(0.0, abs=1e-6)
    assert same["nll_t"] <= same["nll"] and same["tokens"] == 5 * 8
    other = Tiny()
    diff = mc.measures(other, model, ids, batch_size=2)
    assert diff["kl"] > 0 and diff["agree"] < 1.0
    assert mc.spearman([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert mc.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert mc.spearman([1, 1, 2], [5, 5, 9]) == pytest.approx(1.0)


def test_boolq_bias_reads_the_answers_back_from_outcomes():
    """An answerer that says yes to everything is right exactly on the yes questions: its yes rate is 1 and
    its balanced accuracy 50, whatever its accuracy; one right everywhere has balanced accuracy 100."""
    bias = _script("studies/boolq_bias/boolq_bias").bias
    gold = np.array([1, 1, 1, 0, 1, 0, 0, 1, 1, 1], dtype=np.uint8)
    always_yes = bias(gold.copy(), gold)
    assert always_yes == pytest.approx({"accuracy": 0.7, "yes_rate": 1.0, "balanced": 0.5})
    always_no = bias(1 - gold[:8], gold)  # outcomes of the first eight questions only
    assert always_no == pytest.approx({"accuracy": 3 / 8, "yes_rate": 0.0, "balanced": 0.5})
    assert bias(np.ones(10, dtype=np.uint8), gold)["balanced"] == 1.0


def test_plot_depth_implied_by_ratios_when_no_unpruned_row():
    depth = _script("quality/report").implied_depth
    assert depth({("a", 0.2): {"layers": 24}, ("a", 0.35): {"layers": 20}}) == 30  # round(10.5) = 10
    assert depth({("a", 0.2): {"layers": 14}, ("b", 0.35): {"layers": 12}}) == 18
    assert depth({("a", 0.0): {"layers": 30}}) == 0  # nothing pruned: nothing to infer
    with pytest.raises(ValueError, match="no depth"):
        depth({("a", 0.5): {"layers": 10}, ("b", 0.5): {"layers": 11}})


def test_cloze_probe_items_and_scores():
    """The continuation-choice probe of studies/mc_predictors: choice 0 continues its context, the others are
    the spans further on; a model that knows the text's rule always picks choice 0, a uniform one scores
    every choice alike (probe NLL log 4)."""
    import torch

    sys.path.insert(0, str(BENCH))
    try:
        mc = _script("studies/mc_predictors/mc_predictors")
    finally:
        sys.path.remove(str(BENCH))
    vocab = 50
    stream = torch.arange(3000) % vocab  # each token is the previous one plus one
    items = mc.cloze_items(stream, 5, bos_id=None)
    assert items.shape == (5, 4, 128)
    assert torch.equal(items[1, 0], stream[128:256])
    assert torch.equal(items[1, 2, 96:], stream[128 + 96 + 512:128 + 96 + 544])
    assert mc.cloze_items(stream, 2, bos_id=7)[:, :, 0].eq(7).all()
    from layerfold.errors import LayerfoldError

    with pytest.raises(LayerfoldError, match="fewer than"):
        mc.cloze_items(stream[:1000], 5)

    class Rule(torch.nn.Module):
        def __init__(self, sharp):
            super().__init__()
            self.sharp = sharp

        def forward(self, ids):
            logits = torch.nn.functional.one_hot((ids + 1) % vocab, vocab).float() * self.sharp
            return type("Out", (), {"logits": logits})()

    knows = mc.cloze_measures(Rule(10.0), items, batch_size=3)
    assert knows["cloze"] == 1.0 and knows["cloze_nll"] < 0.01 and knows["cloze_items"] == 5
    blind = mc.cloze_measures(Rule(0.0), items, batch_size=3)
    assert blind["cloze_nll"] == pytest.approx(math.log(4))


def test_plan_claims_give_each_plan_to_its_first_claimant(tmp_path):
    """quality/run.py --zs-unique: a plan already claimed (by this process, or by another sharing the folder)
    names its first claimant; the same windows at another ratio or in another scope are another plan."""
    claims_cls = _script("quality/run").PlanClaims
    a = claims_cls(str(tmp_path / "claims"), "smol")
    assert a.claim("slm: 30 -> 24 layers (fuse 12-18)", 0.2, "slm") == "slm"
    assert a.claim("slm: 30 -> 24 layers (fuse 12-18)", 0.2, "slm/optimal+channels") == "slm"
    assert a.claim("slm: 30 -> 24 layers (fuse 12-18)", 0.35, "slm/optimal+channels") == "slm/optimal+channels"
    other = claims_cls(str(tmp_path / "claims"), "smol")  # a second process
    assert other.claim("slm: 30 -> 24 layers (fuse 12-18)", 0.2, "slm/pick-choice") == "slm"
    assert claims_cls(str(tmp_path / "claims"), "gemma").claim("slm: 30 -> 24 layers (fuse 12-18)", 0.2, "x") == "x"
    alone = claims_cls(None, "smol")
    assert alone.claim("p", 0.2, "first") == "first" and alone.claim("p", 0.2, "second") == "first"


def test_skipped_rows_take_the_outcomes_of_the_plan_they_share():
    """quality/paired.py: a row run.py --zs-unique skipped gets the outcomes of the configuration that
    scored its plan at its ratio, along a chain; one whose owner has no outcomes is left out."""
    rows = [{"config": "slm", "ratio": 0.2, "heldout_docs": {"t": "0110"}},
            {"config": "a", "ratio": 0.2, "phase": "skipped", "same_plan_as": "slm"},
            {"config": "b", "ratio": 0.2, "phase": "skipped", "same_plan_as": "a"},
            {"config": "c", "ratio": 0.35, "phase": "skipped", "same_plan_as": "slm"},
            {"config": "slm", "ratio": 0.2, "phase": "ppl"}]
    out = {(r["config"], r["ratio"]): r for r in _script("quality/paired").same_plan_rows(rows)}
    assert set(out) == {("slm", 0.2), ("a", 0.2), ("b", 0.2)}
    assert out[("b", 0.2)]["heldout_docs"] == {"t": "0110"} and out[("a", 0.2)]["same_plan_as"] == "slm"


def test_rows_filtered_by_their_fields_and_same_plan_rows_show_the_named_rows_figures(tmp_path):
    """quality/report.py: ``PATH@key=value`` keeps the rows with those values; a row that only names another
    configuration's plan takes that row's figures (not its pruning time), along a chain."""
    report = _script("quality/report")
    rows = tmp_path / "results.jsonl"
    rows.write_text("\n".join(json.dumps(r) for r in [
        {"model": "a", "table": "subsets", "config": "x", "ratio": 0.2, "ppl/ptb@128": 10.0, "prune_seconds": 3.0},
        {"model": "a", "table": "subsets", "config": "y", "ratio": 0.2, "phase": "skipped", "same_plan_as": "x"},
        {"model": "a", "table": "subsets", "config": "z", "ratio": 0.2, "phase": "skipped", "same_plan_as": "y"},
        {"model": "b", "table": "subsets", "config": "x", "ratio": 0.2, "ppl/ptb@128": 99.0}]) + "\n")
    assert [r["model"] for r in report.read_rows(f"{rows}@model=b")] == ["b"]
    assert len(report.read_rows(f"{rows}@model=a,table=full-sets")) == 0
    merged = report.with_same_plans(report.load(f"{rows}@model=a"))
    assert merged[("y", 0.2)]["ppl/ptb@128"] == 10.0 and "prune_seconds" not in merged[("y", 0.2)]
    assert merged[("z", 0.2)]["ppl/ptb@128"] == 10.0 and merged[("z", 0.2)]["same_plan_as"] == "x"


@pytest.mark.parametrize("results", sorted(BENCH.glob("*/results.jsonl")), ids=lambda p: p.parent.name)
def test_committed_results_rows_say_which_commit_date_and_machine_made_them(results):
    for line in results.read_text().splitlines():
        row = json.loads(line)
        assert row.get("commit") and row.get("date") and row.get("machine"), line[:200]


def test_every_quality_configuration_names_a_method_that_accepts_its_options():
    """quality/configs.py: each configuration's options validate against its method (slm-lab's through
    benchmarks/lab, which registers it), so a renamed or removed option fails here, not on a GPU."""
    import layerfold.methods  # noqa: F401  (registers the package's methods)
    from layerfold.methods.base import METHODS

    configs = _script("quality/configs")
    sys.path.insert(0, str(BENCH))
    try:
        pytest.importorskip("lab", reason="benchmarks/lab registers slm-lab")
    finally:
        sys.path.remove(str(BENCH))
    for name, (method, options) in configs.CONFIGS.items():
        try:
            METHODS.get(method)(**options)
        except Exception as exc:
            raise AssertionError(f"configuration {name}: {method} {options}: {exc}") from exc
    assert set(configs.WITH_CHANNELS) | set(configs.CALIB_REPEATS) <= set(configs.CONFIGS)


def test_default_shortlist_follows_the_committed_full_fold_traces():
    """Replayed through the default shortlist, the committed full-fold traces (every pair scored at every
    step, SmolLM2-135M for ten steps and Gemma-3-270M for six) keep the full fold's choice at every step;
    the first sizes, 3/3/6, leave SmolLM2's path at its fourth step (where the pair of layer 5 wins)."""
    from layerfold.methods.slm.shortlist import Shortlist

    check_plans = _script("prune_time/check_plans")
    traces = sorted((BENCH / "prune_time" / "traces").glob("*-full.jsonl"))
    assert len(traces) == 2
    for path in traces:
        steps = [json.loads(line) for line in path.read_text().splitlines() if '"kind": "step"' in line]
        assert all(len(r["scored"]) == len(r["segments"]) - 1 for r in steps)  # every pair was scored
        followed, runs = check_plans.follow(steps, Shortlist())
        assert followed == len(steps)
        assert runs < sum(len(r["segments"]) - (k + 2) for r in steps for k in r["scored"]) / 2
    smollm2 = [json.loads(line) for line in (BENCH / "prune_time" / "traces" / "smollm2-0.35-full.jsonl")
               .read_text().splitlines() if '"kind": "step"' in line]
    assert check_plans.follow(smollm2, Shortlist(3, 3, 6))[0] == 3
