"""On the real SmolLM2-135M: the incremental SLM engine takes exactly the naive loop's
decisions (deep copy, full forward, compare) at several thresholds, and the default method
folds the middle of the network, not its last layers.

Calibration is cut to 2 windows of 32 tokens (book text) to keep this within CI's budget."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from layerfold import api
from layerfold.data.tokens import CalibrationConfig, sample_windows
from layerfold.methods.base import Target

pytestmark = pytest.mark.slow

_spec = importlib.util.spec_from_file_location("naive_slm", Path(__file__).parents[1] / "benchmarks" / "naive_slm.py")
naive = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("naive_slm", naive)
_spec.loader.exec_module(naive)


@pytest.fixture(scope="module")
def smollm2():
    loaded = api.load_model()
    tokens = sample_windows(loaded.tokenizer, CalibrationConfig(source="books", samples=2, seq_len=32, seed=1234))
    return loaded, tokens


@pytest.mark.parametrize("threshold", [0.995, 0.98])
def test_engine_matches_the_naive_loop_on_smollm2(smollm2, threshold):
    loaded, tokens = smollm2
    expected, candidates = naive.naive_slm(loaded.model, tokens, threshold, merge="diff")
    result = api.make_plan(loaded, "slm-paper", options={"threshold": threshold}, tokens=tokens, progress=False)
    assert sorted(result.plan.windows()) == expected
    assert result.plan.scores["candidates_evaluated"] == candidates


def test_default_folds_the_middle_not_the_top(smollm2):
    loaded, tokens = smollm2
    result = api.make_plan(loaded, "slm", Target(layers=26), tokens=tokens, progress=False)
    assert result.plan.num_layers_after == 26
    assert all(hi < 28 for _, hi in result.plan.windows()), result.plan.summary()
