"""On the real SmolLM2-135M: the incremental SLM engine takes exactly the decisions of a naive
loop (deep copy, full forward, compare; tests/authors_loop.py) for the paper's loop and for the
authors', and the default method folds the middle of the network, not its last layers.

Calibration is cut to 2 windows of 32 tokens (book text) to keep this within CI's budget."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from layerfold import api
from layerfold.data.tokens import CalibrationConfig, sample_windows
from layerfold.methods.base import Target

sys.path.insert(0, str(Path(__file__).parent))
from authors_loop import sliding_loop  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    loaded = api.load_model()
    tokens = sample_windows(loaded.tokenizer, CalibrationConfig(source="books", samples=2, seq_len=32, seed=1234))
    return loaded, tokens


@pytest.mark.parametrize("threshold", [0.995, 0.98])
def test_slm_paper_matches_the_naive_papers_loop_on_smollm2(smollm2, threshold):
    loaded, tokens = smollm2
    loop = sliding_loop(loaded.model, tokens, threshold, "diff", authors=False)
    result = api.make_plan(loaded, "slm-paper", options={"threshold": threshold}, tokens=tokens, progress=False)
    assert sorted(result.plan.windows()) == loop.windows
    assert result.plan.scores["candidates_evaluated"] == loop.candidates


def test_slm_reference_matches_the_authors_loop_on_smollm2(smollm2):
    loaded, tokens = smollm2
    loop = sliding_loop(loaded.model, tokens, 0.98, "reference", authors=True)
    result = api.make_plan(loaded, "slm-reference", options={"threshold": 0.98}, tokens=tokens, progress=False)
    assert sorted(result.plan.windows()) == loop.windows
    assert all(hi < 29 for _, hi in loop.windows)  # the last layer is never merged
    assert result.plan.scores["candidates_evaluated"] == loop.candidates


def test_default_folds_the_middle_not_the_top(smollm2):
    loaded, tokens = smollm2
    result = api.make_plan(loaded, "slm", Target(layers=26), tokens=tokens, progress=False)
    assert result.plan.num_layers_after == 26
    assert all(hi < 28 for _, hi in result.plan.windows()), result.plan.summary()
