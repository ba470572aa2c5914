"""Every supported architecture: prune (hand-written plan and SLM), save, reload with plain
transformers, same logits, generation with a KV cache, config rewritten in step."""

from __future__ import annotations

import pytest
import torch
from conftest import ARCHITECTURES, LAYERS, VARIANTS, VOCAB, check_layer_bookkeeping

from layerfold import api
from layerfold.methods.base import Target
from layerfold.models.arch import architecture_for
from layerfold.output import save_model
from layerfold.plan import Operation, Plan
from layerfold.surgery import apply_plan

ALL = ARCHITECTURES + VARIANTS
SEQ = 12  # longer than the sliding window (4), so that sliding and full attention differ


def _tokens(n: int = 2, seq: int = SEQ, seed: int = 1) -> torch.Tensor:
    return torch.randint(3, VOCAB, (n, seq), generator=torch.Generator().manual_seed(seed))


def _logits(model, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits


def _greedy(model, prompt: torch.Tensor, use_cache: bool = True) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompt, max_new_tokens=5, do_sample=False, use_cache=use_cache,
                              pad_token_id=0, eos_token_id=None)


def _reload(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


def _hand_plan() -> Plan:
    """Fuse 1..2 and drop 4 of a 6-layer model: sources [0, 1, 3, 5]."""
    return Plan(method="manual", num_layers=LAYERS, operations=[Operation("fuse", 1, 2), Operation("drop", 4, 4)],
                merge={"operator": "diff", "norms": "base"})


def check_save_reload_generate(model, tmp_path) -> None:
    tokens = _tokens()
    expected = _logits(model, tokens)
    assert torch.isfinite(expected).all()
    out = save_model(model, None, tmp_path / "pruned")
    reloaded = _reload(out)
    check_layer_bookkeeping(reloaded)
    torch.testing.assert_close(_logits(reloaded, tokens), expected, rtol=1e-5, atol=1e-5)
    prompt = tokens[:1, :6]
    greedy = _greedy(model, prompt)
    assert greedy.shape == (1, 11)
    # the KV cache is indexed by layer_idx: a stale index would make cached decoding diverge
    assert torch.equal(greedy, _greedy(model, prompt, use_cache=False))
    assert torch.equal(greedy, _greedy(reloaded, prompt))


@pytest.mark.parametrize("name", ALL)
def test_hand_plan_prune_save_reload(name, tiny_model, tmp_path):
    model = tiny_model(name)
    arch = architecture_for(model.config)
    before_types = list(getattr(model.config, "layer_types", None) or [])
    before_window_layers = getattr(model.config, "max_window_layers", None)
    kept = {i: arch.layer_list(model)[i] for i in (0, 3, 5)}
    plan = _hand_plan()
    apply_plan(model, plan)

    layers = arch.layer_list(model)
    assert len(layers) == 4 == plan.num_layers_after
    assert [layers[0], layers[2], layers[3]] == [kept[0], kept[3], kept[5]]  # kept layers untouched
    if before_types:
        assert model.config.layer_types == [before_types[i] for i in (0, 1, 3, 5)]
    if before_window_layers is not None:
        assert model.config.max_window_layers == sum(1 for i in (0, 1, 3, 5) if i < before_window_layers)
    check_layer_bookkeeping(model)
    check_save_reload_generate(model, tmp_path)


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_slm_plan_prune_save_reload(name, tiny_model, tmp_path):
    model = tiny_model(name)
    result = api.make_plan(model, method="slm", target=Target(layers=4), tokens=_tokens(4, 16, seed=2),
                           progress=False)
    plan = result.plan
    assert plan.num_layers == LAYERS and plan.num_layers_after == 4
    assert plan.architecture == architecture_for(model.config).name
    assert all(op.kind == "fuse" for op in plan.operations)
    api.apply_plan(model, result)
    assert len(architecture_for(model.config).layer_list(model)) == 4
    check_layer_bookkeeping(model)
    check_save_reload_generate(model, tmp_path)


def test_every_architecture_file_has_a_tiny_model(architecture_names):
    assert sorted(ARCHITECTURES) == architecture_names


def test_qwen2_window_layers_follow_the_kept_layers(tiny_model):
    """max_window_layers=3 of 6: full attention below 3, sliding above; dropping 0 and 4
    leaves [1, 2, 3, 5] -> two full, two sliding."""
    model = tiny_model("qwen2")
    assert model.config.layer_types == ["full_attention"] * 3 + ["sliding_attention"] * 3
    apply_plan(model, Plan(method="manual", num_layers=LAYERS,
                           operations=[Operation("drop", 0, 0), Operation("drop", 4, 4)]))
    assert model.config.max_window_layers == 2
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2
    assert model.config.num_hidden_layers == 4
    check_layer_bookkeeping(model)


def test_gemma3_pattern_replaced_by_layer_types(tiny_model, tmp_path):
    from transformers import AutoConfig

    model = tiny_model("gemma3")
    apply_plan(model, Plan(method="manual", num_layers=LAYERS, operations=[Operation("drop", 2, 2)]))
    expected = ["sliding_attention"] * 4 + ["full_attention"]
    assert model.config.layer_types == expected
    save_model(model, None, tmp_path / "g3")
    assert AutoConfig.from_pretrained(tmp_path / "g3").layer_types == expected


def test_plan_for_other_depth_is_refused(tiny_model):
    from layerfold.errors import LayerfoldError

    model = tiny_model("llama")
    with pytest.raises(LayerfoldError, match="plan is for 8 layers"):
        apply_plan(model, Plan(method="manual", num_layers=8, operations=[Operation("drop", 7, 7)]))


def test_unsupported_architecture_is_named(tiny_model):
    from transformers import BertConfig

    from layerfold.errors import LayerfoldError

    with pytest.raises(LayerfoldError, match="unsupported architecture 'bert'.*llama"):
        architecture_for(BertConfig())


def test_save_model_overwrite_and_failed_swap(tiny_model, tmp_path, monkeypatch):
    import os

    from layerfold import output
    from layerfold.errors import LayerfoldError

    model = tiny_model("gpt2")
    out = tmp_path / "out"
    out.write_text("a file in the way")
    with pytest.raises(LayerfoldError, match="exists"):
        save_model(model, None, out)
    with pytest.raises(LayerfoldError, match="not a folder layerfold wrote"):  # a file layerfold did not write
        save_model(model, None, out, overwrite=True)
    out.unlink()
    save_model(model, None, out)
    save_model(model, None, out, overwrite=True)  # its own output: replaced
    assert (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    # the new folder cannot be renamed into place: the previous one comes back, nothing is left over
    real_replace = os.replace

    def failing_replace(src, dst):
        if ".partial-" in str(src):
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(output.os, "replace", failing_replace)
    previous = out.stat().st_ino
    with pytest.raises(OSError, match="rename failed"):
        save_model(model, None, out, overwrite=True)
    assert out.stat().st_ino == previous and (out / "config.json").is_file()  # the same folder, back in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_deprecation_warnings_fail_the_suite():
    """pyproject's filterwarnings turns FutureWarning and DeprecationWarning into errors when
    attributed to transformers, and when transformers attributes them to its caller
    (``stacklevel=2``): our package or a test."""
    import warnings

    for module in ("transformers.configuration_utils", "layerfold.surgery", "test_architectures"):
        for category in (FutureWarning, DeprecationWarning):
            with pytest.raises(category):
                warnings.warn_explicit("deprecated", category, "x.py", 1, module=module)
