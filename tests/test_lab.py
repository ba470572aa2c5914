"""The continuation-choice probe (layerfold.choice) and slm's pick=choice."""

from __future__ import annotations

import copy

import pytest
import torch

from layerfold import api
from layerfold.choice import (
    choice_items,
    default_bos,
    items_fit,
    model_choice_score,
    plan_choice_scores,
    score_from_logprobs,
)
from layerfold.errors import LayerfoldError
from layerfold.methods.base import Target
from layerfold.models.load import wrap_model


def char_tokenizer():
    """A character-level fast tokenizer over printable ASCII (ids 2-96; 0 pad, 1 BOS), so that a
    tiny random model can read a text file as calibration source."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, **{chr(c): c - 30 for c in range(32, 127)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>")


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


def test_default_bos_follows_the_tokenizer():
    tok = char_tokenizer()
    assert default_bos(tok) is None  # it adds no special token by default
    from tokenizers import processors

    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert default_bos(tok) == 1


def test_pick_choice_keeps_the_candidate_the_probe_prefers(tmp_path):
    import random

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "then", "dog", "ran", "far", "away", "home"]
    path = tmp_path / "text.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(2500)))
    loaded = wrap_model(tiny(layers=8, seed=2), tokenizer=char_tokenizer())
    from layerfold.data.tokens import CalibrationConfig

    result = api.make_plan(loaded, "slm", Target(layers=6), options={"pick": "choice", "choice_items": 12},
                           calibration=CalibrationConfig(source=str(path), samples=4, seq_len=32), progress=False)
    scores = result.plan.scores
    choice = scores["portfolio_choice"]
    assert set(choice) == set(scores["portfolio"]) and scores["choice_items"] == 12
    assert all(0 <= c["accuracy"] <= 1 and c["nll"] > 0 for c in choice.values())
    best = max(choice, key=lambda n: (choice[n]["accuracy"], -choice[n]["nll"], scores["portfolio"][n]))
    assert scores["portfolio_pick"] == best
    assert result.plan.num_layers_after == 6
    with pytest.raises(LayerfoldError, match="choice_items=N"):
        api.make_plan(loaded, "slm", Target(layers=6), options={"pick": "choice", "choice_items": 1000},
                      calibration=CalibrationConfig(source=str(path), samples=4, seq_len=32), progress=False)


def test_pick_choice_needs_the_portfolio_and_angular_selection_folds_angulars_block():
    from layerfold.methods.slm import removed_layers

    model = tiny(layers=8, seed=1)
    toks = torch.randint(2, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    with pytest.raises(LayerfoldError, match="pick=choice compares the portfolio"):
        api.make_plan(wrap_model(model), "slm", Target(layers=6), options={"pick": "choice", "selection": "greedy"},
                      tokens=toks, progress=False)
    result = api.make_plan(wrap_model(model), "slm", Target(layers=6), options={"selection": "angular"}, tokens=toks,
                           progress=False)
    from layerfold.calibrate import capture
    from layerfold.methods.angular import block_distances
    from layerfold.models.arch import architecture_for

    distance = block_distances(capture(model, architecture_for(model.config), toks, progress=False), 2)
    start = min((lo for lo in distance if lo > 0), key=lambda lo: distance[lo])  # Angular's block, layer 0 kept
    assert removed_layers(result.plan.windows()) == {start, start + 1}
    assert len(result.plan.windows()) == 1 and result.plan.num_layers_after == 6
    assert all("channel_scale" in op.detail for op in result.plan.operations)
