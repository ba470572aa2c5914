"""Merge operators checked on the weights, against formulas computed here independently."""

from __future__ import annotations

import pytest
import torch

from layerfold.errors import LayerfoldError
from layerfold.merge import build_fused_layer, merge_window, scale_branches
from layerfold.models.arch import architecture_for, norm_parameter_names
from layerfold.plan import Operation, Plan
from layerfold.surgery import apply_plan

# one family with biases everywhere (OPT), one with q/k/v biases (Qwen2), one with per-head
# q/k norms inside attention (Qwen3), one with GPT-2's Conv1D and ln_1/ln_2, one with (1 + w) norms
MERGE_ARCHS = ["opt", "qwen2", "qwen3", "gpt2", "gemma3"]


def _is_norm_name(name: str) -> bool:
    """Norm parameters told apart by name, independently of layerfold's module-type test."""
    owner = name.rsplit(".", 1)[0]
    return "norm" in owner or owner.startswith("ln_")


def _window(model, lo: int, hi: int):
    layers = architecture_for(model.config).layer_list(model)
    return [layers[i] for i in range(lo, hi + 1)]


def _params(layers) -> list[dict[str, torch.Tensor]]:
    return [{n: p.detach().clone() for n, p in layer.named_parameters()} for layer in layers]


@pytest.mark.parametrize("name", MERGE_ARCHS)
def test_norm_parameters_are_found(name, tiny_model):
    layer = _window(tiny_model(name), 0, 0)[0]
    names = [n for n, _ in layer.named_parameters()]
    expected = {n for n in names if _is_norm_name(n)}
    assert expected, "the tiny model should have norm parameters"
    assert norm_parameter_names(layer) == expected


@pytest.mark.parametrize("name", MERGE_ARCHS)
@pytest.mark.parametrize("norms", ["base", "merge"])
def test_diff_is_base_plus_sum_of_differences(name, norms, tiny_model):
    model = tiny_model(name)
    window = _window(model, 1, 4)
    params = _params(window)
    merged = merge_window(window, operator="diff", norms=norms)
    assert set(merged) == set(params[0])
    biases = [n for n in merged if n.endswith("bias") and not _is_norm_name(n)]
    if name in ("opt", "qwen2", "gpt2"):
        assert biases, "this family has biases; they must take part"
    for pname, value in merged.items():
        base = params[0][pname]
        if _is_norm_name(pname) and norms == "base":
            expected = base
        else:
            expected = base + sum(p[pname] - base for p in params[1:])
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=pname)
    # the window's layers are not modified
    for layer, before in zip(window, params, strict=True):
        for pname, p in layer.named_parameters():
            assert torch.equal(p, before[pname])


@pytest.mark.parametrize("name", MERGE_ARCHS)
@pytest.mark.parametrize("norms", ["base", "merge"])
def test_mean(name, norms, tiny_model):
    window = _window(tiny_model(name), 2, 4)
    params = _params(window)
    merged = merge_window(window, operator="mean", norms=norms)
    for pname, value in merged.items():
        if _is_norm_name(pname) and norms == "base":
            expected = params[0][pname]
        else:
            expected = sum(p[pname] for p in params) / len(params)
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6, msg=pname)


@pytest.mark.parametrize("name", MERGE_ARCHS)
@pytest.mark.parametrize("norms", ["base", "merge"])
def test_reference_is_top_weights_with_base_norms_and_biases(name, norms, tiny_model):
    """The authors' code writes only the projections' weights: the fused layer has the top layer's
    weights and keeps the base's norms and biases, whatever the norm policy asks."""
    window = _window(tiny_model(name), 0, 3)
    params = _params(window)
    merged = merge_window(window, operator="reference", norms=norms)
    for pname, value in merged.items():
        from_base = _is_norm_name(pname) or pname.endswith(".bias")
        expected = params[0][pname] if from_base else params[-1][pname]
        assert torch.equal(value, expected), pname


@pytest.mark.parametrize("name", MERGE_ARCHS)
def test_two_layer_diff_window_is_the_top_layer_except_norms(name, tiny_model):
    window = _window(tiny_model(name), 3, 4)
    base, top = _params(window)
    fused = build_fused_layer(window, operator="diff", norms="base")
    assert fused is not window[0]
    for pname, p in fused.named_parameters():
        expected = base[pname] if _is_norm_name(pname) else top[pname]
        torch.testing.assert_close(p.detach(), expected, rtol=0, atol=1e-6, msg=pname)


def test_diff_scale(tiny_model):
    window = _window(tiny_model("qwen2"), 0, 2)
    params = _params(window)
    merged = merge_window(window, operator="diff", norms="merge", scale=0.5)
    for pname, value in merged.items():
        base = params[0][pname]
        expected = base + 0.5 * sum(p[pname] - base for p in params[1:])
        torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)


def test_merge_keeps_dtype_and_accumulates_in_float32(tiny_model):
    model = tiny_model("llama").to(torch.bfloat16)
    window = _window(model, 0, 4)
    params = [{n: p.float() for n, p in d.items()} for d in _params(window)]
    merged = merge_window(window, operator="mean", norms="merge")
    for pname, value in merged.items():
        assert value.dtype == torch.bfloat16
        expected = (sum(p[pname] for p in params) / len(params)).to(torch.bfloat16)
        assert torch.equal(value, expected), pname


def test_surgery_uses_the_plans_merge_and_per_operation_override(tiny_model):
    model = tiny_model("opt")
    window_a = _params(_window(model, 0, 1))
    window_b = _params(_window(model, 3, 5))
    plan = Plan(method="manual", num_layers=6, merge={"operator": "mean", "norms": "merge"},
                operations=[Operation("fuse", 0, 1), Operation("fuse", 3, 5, detail={"merge": "reference"})])
    apply_plan(model, plan)
    layers = architecture_for(model.config).layer_list(model)
    assert len(layers) == 3
    for pname, p in layers[0].named_parameters():
        torch.testing.assert_close(p.detach(), (window_a[0][pname] + window_a[1][pname]) / 2)
    for pname, p in layers[2].named_parameters():  # reference: the top's weights, the base's norms and biases
        from_base = _is_norm_name(pname) or pname.endswith(".bias")
        expected = window_b[0][pname] if from_base else window_b[-1][pname]
        assert torch.equal(p.detach(), expected), pname


def test_merge_errors(tiny_model):
    window = _window(tiny_model("llama"), 0, 1)
    with pytest.raises(LayerfoldError, match="at least two layers"):
        merge_window(window[:1])
    with pytest.raises(LayerfoldError, match="norm policy"):
        merge_window(window, norms="average")
    with pytest.raises(LayerfoldError, match="Did you mean 'mean'"):
        merge_window(window, operator="meen")


@pytest.mark.parametrize("name", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "opt",
                                  "gpt2", "gpt_neox"])
def test_scaling_the_residual_branches(name, tiny_model):
    """Every architecture names everything a layer adds to its residual stream: with factor 0 the
    layer passes its input through, with 1 nothing changes, and a factor moves the output off it."""
    model = tiny_model(name)
    arch = architecture_for(model.config)
    assert arch.residual_branches, f"{name} describes no residual branches"
    layer = arch.layer_list(model)[1]
    hidden = torch.randn(2, 5, model.config.hidden_size)
    captured = {}

    def hook(module, args, kwargs):
        captured["args"], captured["kwargs"] = args[1:], dict(kwargs)

    handle = layer.register_forward_pre_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(torch.randint(3, 100, (2, 5)))
    handle.remove()

    def run(module):
        kwargs = {k: v for k, v in captured["kwargs"].items() if k not in ("hidden_states", "past_key_values",
                                                                             "cache", "layer_past", "use_cache")}
        with torch.no_grad():
            out = module(hidden, *captured["args"], **kwargs)
        return out[0] if isinstance(out, tuple) else out

    import copy

    original = run(layer)
    for factor, check in ((1.0, lambda out: torch.equal(out, original)),
                          (0.0, lambda out: torch.allclose(out, hidden, atol=1e-6)),
                          (1.5, lambda out: not torch.allclose(out, original, atol=1e-4))):
        scaled = copy.deepcopy(layer)
        scale_branches(scaled, arch.residual_branches, factor)
        assert check(run(scaled)), (name, factor)
    assert not torch.allclose(original, hidden, atol=1e-4)  # the layer does something to start with


@pytest.mark.parametrize("name", ["llama", "qwen2", "gemma3", "phi3", "opt", "gpt2", "gpt_neox"])
def test_channel_factors_scale_each_branch_output_channel(name, tiny_model):
    """Per-channel factors baked into the weights give the layer that multiplies each branch's
    output, channel by channel, at run time (a forward hook computes the expected output)."""
    import copy

    model = tiny_model(name)
    arch = architecture_for(model.config)
    layer = arch.layer_list(model)[1]
    width = model.config.hidden_size
    captured = {}

    def pre(module, args, kwargs):
        captured["args"] = args[1:]
        captured["kwargs"] = {k: v for k, v in kwargs.items()
                              if k not in ("hidden_states", "past_key_values", "cache", "layer_past", "use_cache")}

    handle = layer.register_forward_pre_hook(pre, with_kwargs=True)
    with torch.no_grad():
        model(torch.randint(3, 100, (2, 5)))
    handle.remove()

    hidden = torch.randn(2, 5, width)

    def run(module):
        with torch.no_grad():
            out = module(hidden, *captured["args"], **captured["kwargs"])
        return out[0] if isinstance(out, tuple) else out

    from layerfold.models.arch import get_dotted

    torch.manual_seed(1)
    factors = {path: 0.5 + torch.rand(width) for path in arch.residual_branches}
    expected_layer = copy.deepcopy(layer)
    for path, f in factors.items():
        get_dotted(expected_layer, path).register_forward_hook(lambda m, a, out, f=f: out * f)
    baked = copy.deepcopy(layer)
    scale_branches(baked, arch.residual_branches, factors)
    expected = run(expected_layer)
    torch.testing.assert_close(run(baked), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected, run(layer), atol=1e-4)
    # a constant vector is the number
    ones = copy.deepcopy(layer)
    scale_branches(ones, arch.residual_branches, {p: torch.full((width,), 0.7) for p in arch.residual_branches})
    number = copy.deepcopy(layer)
    scale_branches(number, arch.residual_branches, 0.7)
    torch.testing.assert_close(run(ones), run(number))


def test_surgery_applies_the_branch_scale(tiny_model):
    model = tiny_model("gemma3")
    arch = architecture_for(model.config)
    base = {n: p.detach().clone() for n, p in arch.layer_list(model)[2].named_parameters()}
    plan = Plan(method="manual", num_layers=6, merge={"operator": "base", "norms": "base"},
                operations=[Operation("fuse", 2, 3, detail={"branch_scale": 0.5})])
    apply_plan(model, plan)
    fused = dict(arch.layer_list(model)[2].named_parameters())
    for pname, value in base.items():
        if pname in ("post_attention_layernorm.weight", "post_feedforward_layernorm.weight"):
            torch.testing.assert_close(fused[pname].detach(), 0.5 * (1 + value) - 1)
        else:
            assert torch.equal(fused[pname].detach(), value), pname


def test_scale_branches_errors(tiny_model):
    layer = _window(tiny_model("llama"), 0, 0)[0]
    with pytest.raises(LayerfoldError, match="residual_branches"):
        scale_branches(layer, None, 0.5)
    with pytest.raises(LayerfoldError, match="unknown residual branch kind"):
        scale_branches(layer, {"mlp.down_proj": "cubic"}, 0.5)
    branches = {"mlp.down_proj": "linear"}
    with pytest.raises(LayerfoldError, match="not residual branches"):
        scale_branches(layer, branches, {"self_attn.q_proj": torch.ones(3)})
    with pytest.raises(LayerfoldError, match="output channels"):
        scale_branches(layer, branches, {"mlp.down_proj": torch.ones(3)})
