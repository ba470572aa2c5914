"""Width pruning (MLP channels, attention heads / KV groups) and depth plus width under one budget.

Tiny random models of every supported architecture are width-pruned, saved, reloaded with
plain transformers and compared with the in-memory model; crafted dead channels and heads
must be the first removed, whatever the importance.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_tiny_model

from layerfold.errors import LayerfoldError
from layerfold.models.arch import architecture_for, parameter_count
from layerfold.width import (
    Geometry,
    Layout,
    WidthPlan,
    apply_width,
    depth_width_prune,
    plan_width,
    shrink,
    unit_costs,
)

SUPPORTED = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3"]
RATIO = 0.3  # tiny models (4 heads / 2 KV, 64 channels): one KV group and 16 MLP channels per layer


def _tokens(n: int = 4, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 160, (n, t), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("name", SUPPORTED)
def test_shrunk_model_reloads_with_plain_transformers(name, tmp_path):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = build_tiny_model(name)
    before = Geometry.of(model.config)
    plan = shrink(model, RATIO, tokens=_tokens(), attention="groups", progress=False)
    assert plan.after == {"intermediate_size": 48, "num_attention_heads": 2, "num_key_value_heads": 1,
                          "head_dim": before.head_dim}
    assert plan.params_after == parameter_count(model) < plan.params_before
    model.save_pretrained(tmp_path)

    config = AutoConfig.from_pretrained(tmp_path)
    assert (config.intermediate_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim) == \
        (48, 2, 1, before.head_dim)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()  # plain: default attention, no layerfold
    layout = Layout.of(architecture_for(config))
    layer = architecture_for(config).layer_list(reloaded)[0]
    d, hidden = before.head_dim, before.hidden
    if layout.qkv_proj:
        assert layout.linear(layer, "qkv_proj").weight.shape == (2 * d + 2 * d, hidden)
        assert layout.linear(layer, "gate_up_proj").weight.shape == (2 * 48, hidden)
    else:
        assert layout.linear(layer, "q_proj").weight.shape == (2 * d, hidden)
        assert layout.linear(layer, "k_proj").weight.shape == (d, hidden)
        assert layout.linear(layer, "gate_proj").weight.shape == (48, hidden)
    assert layout.linear(layer, "o_proj").weight.shape == (hidden, 2 * d)
    assert layout.linear(layer, "down_proj").weight.shape == (hidden, 48)

    ids = _tokens(2, 12, seed=1)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)
    prompt = ids[:1, :5]
    out = reloaded.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)
    assert torch.equal(out, model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=0))


@pytest.mark.parametrize("name, heads, kv", [("llama", 2, 2), ("smollm2", 2, 1)])
def test_query_heads_mode_keeps_every_kv_head(name, heads, kv, tmp_path):
    """Thinning every group (the only way under multi-query attention: smollm2 here has 1 KV head)."""
    from transformers import AutoModelForCausalLM

    model = build_tiny_model(name)
    plan = shrink(model, RATIO, tokens=_tokens(), attention="query-heads", heads=1, progress=False)
    assert (plan.after["num_attention_heads"], plan.after["num_key_value_heads"]) == (heads, kv)
    model.save_pretrained(tmp_path)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = _tokens(2, 12, seed=2)
    torch.testing.assert_close(_logits(reloaded, ids), _logits(model, ids), atol=1e-5, rtol=1e-5)


def _kill_mlp_channel(model, layer: int, channel: int) -> None:
    arch = architecture_for(model.config)
    down = Layout.of(arch).linear(arch.layer_list(model)[layer], "down_proj")
    with torch.no_grad():
        down.weight[:, channel] = 0


def _kill_group(model, layer: int, group: int) -> None:
    arch = architecture_for(model.config)
    geo = Geometry.of(model.config)
    o = Layout.of(arch).linear(arch.layer_list(model)[layer], "o_proj")
    width = geo.q_per_group * geo.head_dim
    with torch.no_grad():
        o.weight[:, group * width:(group + 1) * width] = 0


@pytest.mark.parametrize("importance", ["wanda-sp", "flap", "taylor"])
@pytest.mark.parametrize("name", ["llama", "phi3"])
def test_importance_removes_dead_units_first(name, importance):
    model = build_tiny_model(name)
    dead_channels = {0: 5, 1: 40, 2: 63}  # a different channel in each layer: chosen per layer
    for layer, channel in dead_channels.items():
        _kill_mlp_channel(model, layer, channel)
    _kill_group(model, 0, 1)
    _kill_group(model, 1, 0)
    arch = architecture_for(model.config)
    costs = unit_costs(arch.layer_list(model)[0], Layout.of(arch), Geometry.of(model.config))
    n_layers = len(arch.layer_list(model))
    plan = plan_width(model, params=n_layers * costs.mlp_channel, tokens=_tokens(), importance=importance,
                      attention="off", multiple_of=1, progress=False)
    for layer, channel in dead_channels.items():
        assert len(plan.layers[layer].mlp_keep) == 63 and channel not in plan.layers[layer].mlp_keep
    plan = plan_width(model, params=n_layers * costs.kv_group, tokens=_tokens(), importance=importance,
                      attention="groups", heads=1, multiple_of=1, progress=False)
    assert plan.layers[0].kv_keep == [0] and plan.layers[0].q_keep == [0, 1]
    assert plan.layers[1].kv_keep == [1] and plan.layers[1].q_keep == [2, 3]


@pytest.mark.parametrize("name", SUPPORTED)
def test_removing_dead_units_leaves_the_output_unchanged(name):
    """Heads, KV groups and channels that contribute nothing are removed with no change to the
    logits: checks that every projection (fused ones too) is sliced consistently."""
    model = build_tiny_model(name)
    arch, geo = architecture_for(model.config), Geometry.of(model.config)
    for i in range(len(arch.layer_list(model))):
        _kill_group(model, i, i % 2)
        for channel in (3 * i, 3 * i + 1, 40 + i):
            _kill_mlp_channel(model, i, channel)
    ids = _tokens(2, 12, seed=4)
    expected = _logits(model, ids)
    costs = unit_costs(arch.layer_list(model)[0], Layout.of(arch), geo)
    plan = shrink(model, params=6 * (costs.kv_group + 3 * costs.mlp_channel), tokens=_tokens(), attention="groups",
                  heads=1, multiple_of=1, progress=False)
    assert plan.after["intermediate_size"] == 61 and plan.after["num_key_value_heads"] == 1
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["qwen3", "phi3"])
def test_removing_dead_query_heads_leaves_the_output_unchanged(name):
    model = build_tiny_model(name)
    arch, geo = architecture_for(model.config), Geometry.of(model.config)
    for i, layer in enumerate(arch.layer_list(model)):
        o = Layout.of(arch).linear(layer, "o_proj")
        for group in range(geo.kv_heads):  # one dead query head in every group, a different one per layer
            head = group * geo.q_per_group + (i + group) % geo.q_per_group
            with torch.no_grad():
                o.weight[:, head * geo.head_dim:(head + 1) * geo.head_dim] = 0
    ids = _tokens(2, 12, seed=5)
    expected = _logits(model, ids)
    plan = shrink(model, 0.1, tokens=_tokens(), attention="query-heads", heads=1, progress=False)
    assert (plan.after["num_attention_heads"], plan.after["num_key_value_heads"]) == (2, 2)
    torch.testing.assert_close(_logits(model, ids), expected, atol=1e-5, rtol=1e-5)


def test_auto_attention_takes_a_dead_kv_group_rather_than_live_channels():
    model = build_tiny_model("llama")
    arch, geo = architecture_for(model.config), Geometry.of(model.config)
    for i in range(len(arch.layer_list(model))):
        _kill_group(model, i, 1)
    costs = unit_costs(arch.layer_list(model)[0], Layout.of(arch), geo)
    held = _tokens(4, 16, seed=7)
    from layerfold.evaluate.perplexity import perplexity_of_windows

    dense = perplexity_of_windows(model, held, bos=False, progress=False)[0]
    plan = shrink(model, params=6 * costs.kv_group, tokens=_tokens(), heldout_tokens=held, multiple_of=1,
                  progress=False)
    search = {(c["attention"], c["heads"]): c["heldout_nll"] for c in plan.target["attention_search"]}
    assert set(search) == {("off", 0), ("groups", 1), ("query-heads", 1)}
    assert plan.attention == "groups" and plan.after["num_key_value_heads"] == 1
    assert plan.after["intermediate_size"] == 64
    assert search[("groups", 1)] == pytest.approx(dense, abs=1e-5)
    assert search[("groups", 1)] < min(search[("off", 0)], search[("query-heads", 1)])
    assert perplexity_of_windows(model, held, bos=False, progress=False)[0] == pytest.approx(dense, abs=1e-5)


def test_masked_loss_equals_the_loss_after_removal():
    from layerfold.evaluate.perplexity import perplexity_of_windows
    from layerfold.width import masked_loss

    model = build_tiny_model("phi3")
    arch, geo = architecture_for(model.config), Geometry.of(model.config)
    plan = plan_width(model, RATIO, tokens=_tokens(), attention="query-heads", heads=1, progress=False)
    held = _tokens(3, 16, seed=8)
    masked = masked_loss(model, Layout.of(arch), geo, plan.layers, held)
    untouched = perplexity_of_windows(model, held, bos=False, progress=False)[0]
    apply_width(model, plan)
    assert perplexity_of_windows(model, held, bos=False, progress=False)[0] == pytest.approx(masked, abs=1e-5)
    assert masked != pytest.approx(untouched, abs=1e-3)  # the mask was undone before removal


def test_width_plan_is_data_and_applies_again(tmp_path):
    model, again = build_tiny_model("qwen2"), build_tiny_model("qwen2")
    plan = shrink(model, RATIO, tokens=_tokens(), importance="flap", progress=False)
    plan.save(tmp_path / "width_plan.json")
    loaded = WidthPlan.load(tmp_path / "width_plan.json")
    assert loaded.to_json() == plan.to_json()
    apply_width(again, loaded)
    ids = _tokens(2, 10, seed=3)
    torch.testing.assert_close(_logits(again, ids), _logits(model, ids), atol=0, rtol=0)
    with pytest.raises(LayerfoldError, match="widths"):
        apply_width(again, loaded)  # already pruned: the plan's widths no longer match


def test_budget_in_parameters_is_met():
    model = build_tiny_model("llama")
    arch = architecture_for(model.config)
    costs = unit_costs(arch.layer_list(model)[0], Layout.of(arch), Geometry.of(model.config))
    before = parameter_count(model)
    plan = shrink(model, params=6 * (costs.kv_group + 10 * costs.mlp_channel), tokens=_tokens(), attention="groups",
                  multiple_of=1, progress=False)  # a share of 0.27 of 2 KV groups rounds to one
    assert plan.target["removed_per_layer"] == {"kv_groups": 1, "query_heads": 0, "mlp_channels": 10}
    assert parameter_count(model) == before - 6 * (costs.kv_group + 10 * costs.mlp_channel)


@pytest.mark.parametrize("name", ["opt", "gpt2", "gpt_neox"])
def test_unsupported_architectures_are_refused_clearly(name):
    model = build_tiny_model(name)
    with pytest.raises(LayerfoldError, match="supported model types: .*llama.*phi3"):
        shrink(model, RATIO, tokens=_tokens())


def test_bad_options_are_refused():
    model = build_tiny_model("llama")
    with pytest.raises(LayerfoldError, match="between 0 and 1"):
        shrink(model, 1.5, tokens=_tokens())
    with pytest.raises(LayerfoldError, match="Did you mean 'taylor'"):
        shrink(model, RATIO, tokens=_tokens(), importance="tailor")
    with pytest.raises(LayerfoldError, match="KV groups"):
        shrink(model, RATIO, tokens=_tokens(), attention="groups", heads=2)
    with pytest.raises(LayerfoldError, match="--heads needs"):
        shrink(model, RATIO, tokens=_tokens(), heads=1)
    with pytest.raises(LayerfoldError, match="split"):
        depth_width_prune(model, 0.3, split=1.5, tokens=_tokens())


def test_depth_width_auto_split_picks_the_lowest_held_out_loss():
    from layerfold.models.load import wrap_model

    loaded = wrap_model(build_tiny_model("llama"))
    before = parameter_count(loaded.model)
    result = depth_width_prune(loaded, 0.3, split="auto", method="slm", splits=(0.0, 0.5, 1.0), multiple_of=1,
                               tokens=_tokens(4, 16), heldout_tokens=_tokens(4, 16, seed=9), progress=False)
    assert [c.split for c in result.candidates] == [0.0, 0.5, 1.0]
    assert all(c.error is None for c in result.candidates)
    best = min(result.candidates, key=lambda c: c.heldout_nll)
    assert result.split == best.split and result.params_after == best.params == parameter_count(loaded.model)
    by_split = {c.split: c for c in result.candidates}
    assert by_split[0.0].layers == 6 and by_split[1.0].layers < 6 and by_split[1.0].width is None
    for cand in result.candidates:  # width tops depth up to the asked share; depth alone rounds up to layers
        removed = 1 - cand.params / before
        assert 0.29 <= removed <= 0.31 if cand.width else removed >= 0.3


def test_cli_width_and_combined(tmp_path, tiny_model_dir):
    from typer.testing import CliRunner

    from layerfold.cli import app, register_all

    register_all()
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"the cat number {i} sat on the mat." for i in range(400)))
    common = ["--calib-source", str(text), "--calib-samples", "4", "--calib-seq-len", "16", "--ppl", ""]
    folder = tiny_model_dir("mistral")
    result = CliRunner().invoke(app, ["shrink", str(folder), "--width", "0.3", "--attention", "groups",
                                      "--out", str(tmp_path / "w"), *common])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "w" / "config.json").read_text())["intermediate_size"] == 48
    assert json.loads((tmp_path / "w" / "width_plan.json").read_text())["after"]["num_key_value_heads"] == 1

    args = ["shrink", str(folder), "--param-ratio", "0.3", "--split", "0.5", "--multiple-of", "1",
            "--out", str(tmp_path / "dw"), *common]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "dw" / "config.json").read_text())
    assert config["num_hidden_layers"] < 6 and config["intermediate_size"] < 64
    assert (tmp_path / "dw" / "plan.json").is_file() and (tmp_path / "dw" / "shrink.json").is_file()
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "dw").generate(torch.tensor([[5, 6, 7]]), max_new_tokens=3,
                                                                     do_sample=False, pad_token_id=0)
    result = CliRunner().invoke(app, ["shrink", str(folder), "--width", "0.3", "--param-ratio", "0.3"])
    assert isinstance(result.exception, LayerfoldError)


# --------------------------------------------------------------------------- `layerfold prune` with width



@pytest.fixture
def calib_text(tmp_path):
    path = tmp_path / "calib.txt"
    path.write_text(" ".join(f"the cat number {i} sat on the mat." for i in range(200)))
    return path


def _calib_args(text) -> list[str]:
    return ["--calib-source", str(text), "--calib-samples", "4", "--calib-seq-len", "16", "--held-out", "2",
            "--ppl", ""]


def test_prune_with_width_saves_one_folder_with_the_in_memory_logits(run, tmp_path, tiny_model_dir,
                                                                   calib_text):
    from transformers import AutoConfig, AutoModelForCausalLM

    from layerfold import api
    from layerfold.data.tokens import CalibrationConfig
    from layerfold.methods.base import Target
    from layerfold.width import WidthRequest

    folder = tiny_model_dir("llama")
    head_dim = Geometry.of(AutoConfig.from_pretrained(folder)).head_dim
    code, out, err = run("prune", folder, "--target-layers", "4", "--width", "0.3",
                                "--attention", "groups", "--out", tmp_path / "cli", *_calib_args(calib_text))
    assert code == 0, err
    assert "6 -> 4 layers" in out and "intermediate 64 -> 48" in out
    saved = {p.name for p in (tmp_path / "cli").iterdir()}
    assert {"config.json", "model.safetensors", "plan.json", "width_plan.json", "shrink.json", "README.md",
            "tokenizer.json"} <= saved
    config = AutoConfig.from_pretrained(tmp_path / "cli")
    assert (config.num_hidden_layers, config.intermediate_size, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim) == (4, 48, 2, 1, head_dim)
    assert json.loads((tmp_path / "cli" / "plan.json").read_text())["target"] == {"layers": 4}

    # the same prune from Python: its folder and the CLI's reload with plain transformers to the
    # in-memory model's logits
    loaded = api.load_model(str(folder))
    calib = CalibrationConfig(source=str(calib_text), samples=4, seq_len=16)
    report = api.prune(loaded, tmp_path / "api", target=Target(layers=4), calibration=calib, progress=False,
                       width=WidthRequest(ratio=0.3, attention="groups", held_out=2))
    assert report.width.after["intermediate_size"] == 48 and report.layers_after == 4
    ids = _tokens(2, 12)
    expected = _logits(loaded.model.eval(), ids)
    for saved_folder in (tmp_path / "api", tmp_path / "cli"):
        reloaded = AutoModelForCausalLM.from_pretrained(saved_folder).eval()
        assert parameter_count(reloaded) == report.params_after == parameter_count(loaded.model)
        assert torch.equal(_logits(reloaded, ids), expected)


def test_prune_param_ratio_split_and_reapply(run, tmp_path, tiny_model_dir, calib_text):
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dir("llama")
    before = parameter_count(AutoModelForCausalLM.from_pretrained(folder))
    code, out, err = run("prune", folder, "--param-ratio", "0.3", "--split", "auto",
                                "--multiple-of", "1", "--out", tmp_path / "dw", *_calib_args(calib_text))
    assert code == 0, err
    record = json.loads((tmp_path / "dw" / "shrink.json").read_text())["depth_width"]
    assert [c["split"] for c in record["candidates"]] == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert f"split {record['split']}" in out
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "dw")
    assert 1 - parameter_count(model) / before >= 0.29
    assert model.config.num_hidden_layers == record["layers"][1]

    # a fixed split with depth and width: the saved plans applied again give the same weights
    code, _, err = run("prune", folder, "--param-ratio", "0.3", "--split", "0.5",
                              "--multiple-of", "1", "--out", tmp_path / "half", *_calib_args(calib_text))
    assert code == 0, err
    half = tmp_path / "half"
    config = json.loads((half / "config.json").read_text())
    assert config["num_hidden_layers"] < 6 and config["intermediate_size"] < 64
    code, _, err = run("prune", folder, "--plan", half / "plan.json", "--width-plan",
                              half / "width_plan.json", "--out", tmp_path / "again", "--ppl", "")
    assert code == 0, err
    first = AutoModelForCausalLM.from_pretrained(half).state_dict()
    second = AutoModelForCausalLM.from_pretrained(tmp_path / "again").state_dict()
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize(("args", "message"), [
    (["--width", "1.5"], "--width must be between 0 and 1"),
    (["--width", "0"], "--width must be between 0 and 1"),
    (["--param-ratio", "0.3", "--split", "1.5"], "--split must be 'auto' or a number in [0, 1]"),
    (["--param-ratio", "1.2", "--split", "auto"], "--param-ratio must be between 0 and 1"),
    (["--split", "auto"], "--split shares --param-ratio between depth and width"),
    (["--ratio", "0.3", "--split", "0.5"], "--split shares --param-ratio between depth and width"),
    (["--param-ratio", "0.3", "--split", "0.5", "--threshold", "0.9"], "drop --threshold"),
    (["--param-ratio", "0.3", "--split", "auto", "--width", "0.2"], "not --width and --split"),
    (["--importance", "flap"], "--importance: width pruning options; add --width"),
    (["--width", "0.3", "--importance", "tailor"], "Did you mean 'taylor'"),
    (["--width", "0.3", "--heads", "1"], "--heads needs --attention groups or query-heads"),
    (["--width-plan", "missing.json"], "width plan file missing.json does not exist"),
])
def test_prune_width_refuses_bad_combinations(args, message, run, tmp_path, tiny_model_dir):
    code, out, err = run("prune", tiny_model_dir("llama"), "--out", tmp_path / "out", "--ppl",
                                "", *args)
    assert code == 2, (out, err)
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_prune_width_refuses_an_architecture_without_width_before_any_work(run, tmp_path,
                                                                          tiny_model_dir):
    code, _, err = run("prune", tiny_model_dir("gpt2"), "--target-layers", "4", "--width", "0.2",
                              "--out", tmp_path / "out", "--ppl", "")
    assert code == 2 and "width pruning does not support" in err and "supported model types" in err
    assert not (tmp_path / "out").exists()


def test_a_config_with_per_layer_widths_is_refused():
    from types import SimpleNamespace

    config = SimpleNamespace(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=[64] * 6)
    with pytest.raises(LayerfoldError, match="no single configured width"):
        Geometry.of(config)


def test_shrink_and_the_python_path_write_the_same_width_plan(run, tmp_path, tiny_model_dir, calib_text):
    """``layerfold shrink --width`` goes through :func:`prune_with_width` (width alone: no depth
    method), as ``prune --width`` and ``api.prune(width=...)`` do: the same request from Python
    writes the same plan and record, and ``--held-out`` reaches the attention search."""
    from layerfold import api
    from layerfold.data.tokens import CalibrationConfig
    from layerfold.width import WidthRequest, prune_with_width

    folder = tiny_model_dir("qwen2")
    code, out, err = run("shrink", folder, "--width", "0.3", "--out", tmp_path / "cli", *_calib_args(calib_text))
    assert code == 0, err
    assert "intermediate 64 ->" in out and "saved to" in out
    calib = CalibrationConfig(source=str(calib_text), samples=4, seq_len=16)
    report = prune_with_width(api.load_model(str(folder)), tmp_path / "py", WidthRequest(ratio=0.3, held_out=2),
                              method=None, calibration=calib, progress=False)
    assert report.plan is None and report.layers_after == report.layers_before == 6
    for name in ("width_plan.json", "shrink.json"):
        assert (tmp_path / "cli" / name).read_text() == (tmp_path / "py" / name).read_text(), name
    assert not (tmp_path / "cli" / "plan.json").exists()
    search = json.loads((tmp_path / "cli" / "width_plan.json").read_text())["target"]["attention_search"]
    assert {c["selection_tokens"] for c in search} == {"2 held-out calibration windows"}


def test_width_alone_with_a_split_needs_a_depth_method(tiny_model_dir):
    from layerfold import api
    from layerfold.methods.base import Target
    from layerfold.width import WidthRequest, prune_with_width

    loaded = api.load_model(str(tiny_model_dir("llama")))
    with pytest.raises(LayerfoldError, match="give the method"):
        prune_with_width(loaded, None, WidthRequest(split=0.5), method=None, target=Target(param_ratio=0.3))
