"""Larger than the GPU (``--max-gpu-memory``) and several GPUs (``--device-map``), on the CPU.

Streaming is exercised with the compute device set to the CPU: every layer still travels
through the same swap (copies are made even when the device does not change), so the tests
check the plan is the one made without streaming, that one module at a time is on the device,
that the CPU weights are untouched, and that the pruned model, saved shard by shard, loads
with plain transformers.  The per-module device routing of models spread over devices is
checked with layers on the ``meta`` device and with accelerate's hooks.
"""

from __future__ import annotations

import json

import pytest
import torch

from layerfold import api
from layerfold.calibrate import call_layer, capture
from layerfold.errors import LayerfoldError
from layerfold.methods.base import Target
from layerfold.models.arch import architecture_for
from layerfold.streaming import STREAM_ATTR, LayerStreamer, execution_device, parse_memory, tensor_bytes

CPU = {"max_gpu_memory": "1GiB", "compute_device": "cpu"}


def calib_tokens(n: int = 6, t: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 150, (n, t), generator=torch.Generator().manual_seed(seed))


def ops(result) -> list[tuple]:
    """Each operation with its score and rescaling factor (the default slm rescales its windows)."""
    return [(o.kind, o.lo, o.hi, o.score, o.detail.get("branch_scale")) for o in result.plan.operations]


def state(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("text, size", [("8GiB", 8 * 2**30), ("8GB", 8 * 10**9), ("8000MiB", 8000 * 2**20),
                                        ("8G", 8 * 2**30), ("1.5 GiB", int(1.5 * 2**30)), ("512mb", 512 * 10**6),
                                        ("4096", 4096), (2**20, 2**20)])
def test_parse_memory(text, size):
    assert parse_memory(text) == size


@pytest.mark.parametrize("text", ["8 gigs", "", "GiB", "8XB", "-1GiB", "eight GiB", "8GiB8"])
def test_parse_memory_refuses_bad_sizes(text):
    with pytest.raises(LayerfoldError, match="cannot read the memory size"):
        parse_memory(text)


def test_parse_memory_refuses_zero():
    with pytest.raises(LayerfoldError, match="more than 0"):
        parse_memory("0GB")


@pytest.mark.parametrize("method, options", [("slm", None), ("shortgpt", None), ("sleb", None),
                                             ("slm", {"selection": "greedy", "merge": "mean"}),
                                             ("slm-paper", None), ("slm", {"rescale": "none"})])
def test_same_plan_with_and_without_streaming(tiny_model, method, options):
    model = tiny_model("llama")
    before = state(model)
    toks = calib_tokens()
    plain = api.make_plan(model, method, Target(ratio=0.34), options=options, tokens=toks, progress=False)
    streamed = api.make_plan(model, method, Target(ratio=0.34), options=options, tokens=toks, progress=False, **CPU)
    assert ops(streamed) == ops(plain)
    if method == "slm" and options in (None, {"rescale": "channels+kl"}):  # the default fits channel factors
        assert all(op.detail.get("channel_scale") for op in plain.plan.operations)
    for a, b in zip(streamed.plan.operations, plain.plan.operations, strict=True):  # per-channel factors
        assert set(a.detail.get("channel_scale", {})) == set(b.detail.get("channel_scale", {}))
        for path, factors in b.detail.get("channel_scale", {}).items():
            torch.testing.assert_close(torch.tensor(a.detail["channel_scale"][path]), torch.tensor(factors))
    for lo, tensors in plain.overrides.items():  # fitted fused layers (fit=ridge)
        for name, t in tensors.items():
            torch.testing.assert_close(streamed.overrides[lo][name], t)
    record = streamed.plan.provenance["streaming"]
    layer_bytes = tensor_bytes(model.model.layers[0])
    assert record["uploads"] > 0 and record["peak_streamed_bytes"] == layer_bytes  # one module at a time
    assert record["device"] == "cpu" and record["max_gpu_memory_bytes"] == 2**30
    after = state(model)  # weights untouched, hooks gone, everything back home
    assert all(torch.equal(after[k], v) for k, v in before.items())
    for layer in model.model.layers:
        assert not layer._forward_pre_hooks and not layer._forward_hooks and not hasattr(layer, STREAM_ATTR)
    assert {p.device.type for p in model.parameters()} == {"cpu"}


def test_streamed_layers_run_on_copies_and_whole_forward_matches(tiny_model):
    model = tiny_model("gemma3")
    arch = architecture_for(model.config)
    ids = calib_tokens(2, 12)
    with torch.no_grad():
        expected = model(input_ids=ids).logits
    layer = arch.layer_list(model)[2]
    home = layer.mlp.down_proj.weight.data_ptr()
    seen = []
    streamer = LayerStreamer("cpu", 2**30).attach(model, arch)
    try:
        handle = layer.register_forward_pre_hook(lambda m, a: seen.append(m.mlp.down_proj.weight.data_ptr()))
        with torch.no_grad():
            logits = model(input_ids=ids).logits
        handle.remove()
        cache = capture(model, arch, ids, progress=False, streamer=streamer)
        assert cache.store_device == torch.device("cpu") and cache.device == torch.device("cpu")
        assert streamer.stats["uploads"] == 2 * len(arch.layer_list(model))  # two forwards
    finally:
        streamer.detach()
    torch.testing.assert_close(logits, expected)
    assert seen and seen[0] != home  # the layer ran on a copy of its weights
    assert layer.mlp.down_proj.weight.data_ptr() == home


def test_cap_too_small_for_one_layer(tiny_model):
    model = tiny_model("llama")
    with pytest.raises(LayerfoldError, match="too small to stream this model.*raise the cap"):
        api.make_plan(model, "shortgpt", Target(ratio=0.34), tokens=calib_tokens(), progress=False,
                      max_gpu_memory="64KiB", compute_device="cpu")
    assert not model.model.layers[0]._forward_pre_hooks


def test_bad_cap_and_missing_gpu(tiny_model, monkeypatch):
    model = tiny_model("llama")
    with pytest.raises(LayerfoldError, match="cannot read the memory size"):
        api.make_plan(model, "shortgpt", Target(ratio=0.34), tokens=calib_tokens(), progress=False,
                      max_gpu_memory="eight", compute_device="cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LayerfoldError, match="CUDA GPU"):
        api.make_plan(model, "shortgpt", Target(ratio=0.34), tokens=calib_tokens(), progress=False,
                      max_gpu_memory="8GiB")


def test_streaming_refuses_a_model_off_the_cpu(tiny_model):
    model = tiny_model("llama").to("meta")
    with pytest.raises(LayerfoldError, match="held in CPU memory"):
        LayerStreamer("cpu", 2**30).attach(model, architecture_for(model.config))


def test_taylor_refuses_streaming(tiny_model):
    with pytest.raises(LayerfoldError, match="without --max-gpu-memory"):
        api.make_plan(tiny_model("llama"), "shortened-taylor", Target(layers=4),
                      options={"keep_first": 1, "keep_last": 1}, tokens=calib_tokens(), progress=False, **CPU)


@pytest.mark.parametrize("name", ["mistral", "qwen3", "gemma2", "phi3", "opt", "gpt2", "gpt_neox", "smollm2"])
def test_same_plan_streamed_on_every_architecture(tiny_model, name):
    model = tiny_model(name)
    toks = calib_tokens()
    plain = api.make_plan(model, "slm", Target(ratio=0.34), tokens=toks, progress=False)
    homes = {name: t.data_ptr() for name, t in [*model.named_parameters(), *model.named_buffers()]}
    assert ops(api.make_plan(model, "slm", Target(ratio=0.34), tokens=toks, progress=False, **CPU)) == ops(plain)
    # every tensor back in its own CPU memory (tied embeddings included), none left on a copy
    assert {name: t.data_ptr() for name, t in [*model.named_parameters(), *model.named_buffers()]} == homes


def test_streamed_prune_saves_shards_that_load_with_transformers(tiny_model, tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from layerfold.models.load import wrap_model

    text = tmp_path / "eval.txt"
    text.write_text("A small model reads a short text, and the text goes on for a while. " * 12)
    toks = calib_tokens()
    reference = wrap_model(tiny_model("llama"), tiny_tokenizer)
    plain = api.prune(reference, None, plan=api.make_plan(reference, "slm", Target(ratio=0.34), tokens=toks,
                                                          progress=False), ppl=(str(text),), ppl_windows=4,
                      progress=False)
    model = tiny_model("llama")
    loaded = wrap_model(model, tiny_tokenizer)
    plan = api.make_plan(loaded, "slm", Target(ratio=0.34), tokens=toks, progress=False, **CPU)
    report = api.prune(loaded, tmp_path / "out", plan=plan, ppl=(str(text),), ppl_windows=4, progress=False,
                       max_shard_size="40KB", **CPU)
    assert report.perplexity_before == plain.perplexity_before and report.perplexity_after == plain.perplexity_after
    reference = reference.model
    shards = sorted(p.name for p in report.out.glob("*.safetensors"))
    assert len(shards) > 1 and (report.out / "model.safetensors.index.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(report.out).eval()
    assert reloaded.config.num_hidden_layers == 4
    ids = calib_tokens(2, 12, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, model(input_ids=ids).logits)
        torch.testing.assert_close(reloaded(input_ids=ids).logits, reference(input_ids=ids).logits)


def test_streamed_analysis_matches(tiny_model, tmp_path):
    model = tiny_model("qwen2")
    toks = calib_tokens()
    plain = api.analyze(model, tmp_path / "a", measures="cosine,cka-linear", tokens=toks, progress=False)
    streamed = api.analyze(model, tmp_path / "b", measures="cosine,cka-linear", tokens=toks, progress=False, **CPU)
    for kind in ("cosine", "cka-linear"):
        assert streamed["measures"][kind]["matrix"] == plain["measures"][kind]["matrix"]


# -- several devices: each module runs where it lives -----------------------------------------


def test_execution_device_prefers_hooks_then_own_weights():
    from types import SimpleNamespace

    layer = torch.nn.Linear(2, 2)
    assert execution_device(layer, "meta") == torch.device("cpu")
    assert execution_device(torch.nn.Identity(), "meta") == torch.device("meta")
    layer._hf_hook = SimpleNamespace(execution_device="meta")
    assert execution_device(layer, "cpu") == torch.device("meta")


def test_layers_on_another_device_get_their_inputs_there(tiny_model):
    """A model split over devices: hidden states follow each layer to its own device (here layers
    3-5 on ``meta``, which computes shapes only), not the first parameter's device."""
    model = tiny_model("llama")
    arch = architecture_for(model.config)
    cache = capture(model, arch, calib_tokens(4, 8), batch_size=2, progress=False)
    layers = arch.layer_list(model)
    for i in range(3, 6):
        layers[i].to("meta")
    outs = cache.run(0, [(layers[i], i) for i in range(6)])
    assert [o.device.type for o in outs] == ["meta", "meta"] and outs[0].shape == (2, 8, model.config.hidden_size)
    out = call_layer(layers[4], cache.inputs[4][0], cache.extras[4][0], cache.device)  # cpu in, meta layer
    assert out.device.type == "meta"


def test_same_plan_with_accelerate_hooks(tiny_model):
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    toks = calib_tokens()
    plain = api.make_plan(tiny_model("llama"), "slm", Target(ratio=0.34), tokens=toks, progress=False)
    model = tiny_model("llama")
    for layer in model.model.layers:
        add_hook_to_module(layer, AlignDevicesHook(execution_device="cpu"))
    hooked = api.make_plan(model, "slm", Target(ratio=0.34), tokens=toks, progress=False)
    assert ops(hooked) == ops(plain)


def test_load_with_device_map(tiny_model_dir):
    from layerfold.models.load import load_model

    loaded = load_model(str(tiny_model_dir("llama")), device_map="auto")
    assert {p.device.type for p in loaded.model.parameters()} == {"cpu"}
    with pytest.raises(LayerfoldError, match="unknown device map"):
        load_model(str(tiny_model_dir("llama")), device_map="everywhere")


def test_device_map_offload_is_refused():
    from layerfold.models.load import _check_offload

    model = torch.nn.Linear(2, 2)
    for fine in ({"": 0}, {"a": 0, "b": 1}, {"": "cpu"}):
        model.hf_device_map = fine
        _check_offload(model, "m")
    for offloaded in ({"a": 0, "b": "cpu"}, {"a": 0, "b": "disk"}):
        model.hf_device_map = offloaded
        with pytest.raises(LayerfoldError, match="use --max-gpu-memory"):
            _check_offload(model, "m")


# -- the command line -------------------------------------------------------------------------



@pytest.mark.parametrize("args, message", [
    (["--max-gpu-memory", "lots"], "cannot read the memory size 'lots'"),
    (["--max-gpu-memory", "8GiB", "--device-map", "auto"], "not both"),
    (["--device-map", "everywhere"], "unknown device map"),
])
def test_cli_refuses_bad_placement(args, message, run, tiny_model_dir, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    for command in (["plan", "--out", "p.json"], ["prune", "--out", "o"], ["analyze", "--out", "a"]):
        code, out, err = run(*command[:1], tiny_model_dir("llama"), *command[1:], "--calib-source", calib,
                             "--calib-samples", "2", "--calib-seq-len", "16", *args)
        assert code == 2 and message in err and "Traceback" not in err, err
    assert not any((tmp_path / name).exists() for name in ("p.json", "o", "a"))


def test_cli_without_gpu(run, tiny_model_dir, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code, _, err = run("plan", tiny_model_dir("llama"), "--max-gpu-memory", "8GiB", "--out", "p.json")
    assert code == 2 and "none is available" in err


def test_cli_plan_streamed_matches(run, tiny_model_dir, monkeypatch, tmp_path):
    import layerfold.streaming as streaming

    monkeypatch.setattr(streaming, "resolve_compute_device", lambda device: torch.device("cpu"))
    calib = tmp_path / "calib.txt"
    calib.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    common = [tiny_model_dir("llama"), "--ratio", "0.34", "--calib-source", calib, "--calib-samples", "2",
              "--calib-seq-len", "16"]
    assert run("plan", *common, "--out", "plain.json")[0] == 0
    code, out, err = run("plan", *common, "--out", "streamed.json", "--max-gpu-memory", "1GiB")
    assert code == 0, err
    plain, streamed = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("plain", "streamed"))
    assert streamed["operations"] == plain["operations"]
    assert streamed["provenance"]["streaming"]["max_gpu_memory_bytes"] == 2**30
