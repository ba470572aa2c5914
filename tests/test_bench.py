"""`layerfold bench` on CPU: a tiny random Llama against a pruned copy (structure only, no timings),
and graph mode's decode (the step a CUDA graph captures on a GPU, run eagerly here) against
greedy ``generate``; graph-compiled's step compiled by torch.compile (backend aot_eager here: the
same dynamo graph and in-place state, without inductor's minutes of C++ builds on a small CPU;
``LAYERFOLD_TEST_INDUCTOR=1`` runs inductor too)."""

from __future__ import annotations

import copy
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from conftest import _config, build_tiny_model
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from layerfold.bench import speed
from layerfold.bench.speed import SpeedConfig, _where, graph_decode, measure_models
from layerfold.cli import app, register_all
from layerfold.cli.bench import _modes
from layerfold.errors import LayerfoldError
from layerfold.plan import Operation, Plan
from layerfold.surgery import apply_plan

LAYERS = 4


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    dense = LlamaForCausalLM(config).eval()
    pruned = apply_plan(copy.deepcopy(dense), Plan(method="test", num_layers=LAYERS, operations=[
        Operation("drop", 1, 1), Operation("fuse", 2, 3)], merge={"operator": "diff", "norms": "base"}))
    root = tmp_path_factory.mktemp("bench")
    dense.save_pretrained(root / "dense")
    pruned.save_pretrained(root / "pruned")
    return root


@pytest.fixture(scope="module")
def cli():
    register_all()
    return CliRunner(env={"COLUMNS": "250"})


def test_bench_cli_dense_vs_pruned(folders, cli):
    out = folders / "results.json"
    result = cli.invoke(app, ["bench", str(folders / "dense"), "--vs", str(folders / "pruned"), "--device", "cpu",
                              "--dtype", "float32", "--batch-sizes", "1,2", "--new-tokens", "3", "--prompt-len", "5",
                              "--repeats", "2", "--no-compile", "--out", str(out)])
    assert result.exit_code == 0, result.output
    for column in ("decode ms/tok", "prefill tok/s", "speed-up decode", "ideal L/L'"):
        assert column in result.output
    results = json.loads(out.read_text())
    assert results["reference"] == "dense"
    assert results["models"]["dense"]["layers"] == LAYERS
    assert results["models"]["pruned"]["layers"] == 2
    assert results["machine"]["device"] == "cpu"
    rows = results["results"]
    cells = {(r["mode"], r["batch"], r["model"]) for r in rows}
    assert cells == {(m, b, n) for m in ("eager", "static") for b in (1, 2) for n in ("dense", "pruned")}
    for row in rows:
        assert len(row["runs"]["decode_s"]) == 2
        assert row["total_s"] >= row["prefill_s"] > 0 and row["decode_s"] > 0
        assert row["peak_memory_bytes"] is None  # not measured on CPU
        assert row["x_floor"] > 0
        if row["model"] == "dense":
            assert row["speedup_decode"] == 1.0 and row["ideal_layers"] == 1.0
        else:
            assert row["ideal_layers"] == pytest.approx(LAYERS / 2)
            assert row["ideal_bytes"] > 1


def test_bench_rejects_bad_batch_sizes(folders, cli):
    result = cli.invoke(app, ["bench", str(folders / "dense"), "--device", "cpu", "--batch-sizes", "1,x"])
    assert isinstance(result.exception, LayerfoldError)
    result = cli.invoke(app, ["bench", str(folders / "dense"), "--device", "cpu", "--new-tokens", "1"])
    assert isinstance(result.exception, LayerfoldError)


# ------------------------------------------------------------------------ graph mode

PROMPT, NEW = 5, 12


def _tiny(name: str) -> torch.nn.Module:
    """A conftest tiny model; ``NAME-wide``: its sliding window longer than prompt + new tokens."""
    if not name.endswith("-wide"):
        return build_tiny_model(name)
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    config = _config(name[: -len("-wide")])
    config.sliding_window = 64
    return AutoModelForCausalLM.from_config(config).eval()


def _pruned(model: torch.nn.Module) -> torch.nn.Module:
    n = model.config.num_hidden_layers
    return apply_plan(copy.deepcopy(model), Plan(method="test", num_layers=n, operations=[Operation("drop", 2, 3)]))


def _greedy(model: torch.nn.Module, prompt: torch.Tensor) -> torch.Tensor:
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=NEW, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    assert out.shape[1] == PROMPT + NEW
    return out[:, PROMPT:]


@pytest.mark.parametrize("name", ["llama", "qwen2-full", "gemma", "opt", "gpt2", "gpt_neox", "mistral-wide",
                                  "qwen3-wide", "gemma2-wide", "gemma3-wide", "phi3-wide"])
def test_graph_decode_matches_greedy_generate(name):
    """The decode step graph mode captures (4-D mask, static cache, in-place counters) gives
    generate's greedy tokens, dense and pruned; ``-wide``: sliding layers whose window holds the
    whole sequence (their cache's Python-side branch stays on the in-place path)."""
    dense = _tiny(name)
    prompt = torch.randint(3, dense.config.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    for model in (dense, _pruned(dense)):
        tokens = graph_decode(model, prompt, NEW)
        assert tokens.shape == (2, NEW)
        assert torch.equal(tokens, _greedy(model, prompt))


@pytest.mark.parametrize("name", ["mistral", "qwen2", "qwen3", "gemma2", "gemma3", "phi3"])
def test_graph_mode_refuses_short_sliding_windows(name):
    model = build_tiny_model(name)
    prompt = torch.randint(3, model.config.vocab_size, (2, PROMPT))
    with pytest.raises(LayerfoldError, match="sliding window of 4 tokens"):
        graph_decode(model, prompt, NEW)


def test_measure_models_graph_rows_like_other_modes():
    dense = build_tiny_model("llama")
    models = {"dense": dense, "pruned": _pruned(dense)}
    config = SpeedConfig(batch_sizes=(1, 2), new_tokens=4, prompt_len=PROMPT, repeats=2, modes=("eager", "graph"),
                         warmup_tokens=2)
    results = measure_models(models, config)
    assert results["config"]["modes"] == ["eager", "graph(eager)"]  # no CUDA graph on the CPU
    rows = results["results"]
    assert {(r["mode"], r["batch"], r["model"]) for r in rows} == {
        (m, b, n) for m in ("eager", "graph(eager)") for b in (1, 2) for n in models}
    keys = {frozenset(r) for r in rows}
    assert len(keys) == 1
    for row in rows:
        assert row["total_s"] >= row["prefill_s"] > 0 and row["decode_s"] > 0
        assert len(row["runs"]["decode_s"]) == 2
        if row["model"] == "pruned":
            assert row["ideal_layers"] == pytest.approx(6 / 4) and row["decode_share_of_ideal"] > 0


def test_graph_mode_rejects_unknown_modes():
    with pytest.raises(LayerfoldError, match="unknown mode"):
        SpeedConfig(modes=("graphs",))
    with pytest.raises(LayerfoldError, match="graph-compiled compiles"):
        SpeedConfig(modes=("graph-compiled",), compile=False)
    with pytest.raises(LayerfoldError, match="unknown compile mode"):
        SpeedConfig(modes=("graph-compiled",), compile_mode="reduce-overhead")  # its CUDA graphs would nest


def test_cli_graph_flag_follows_compile():
    assert _modes(eager=True, static=True, graph=True, compile=True) == ("eager", "static", "graph-compiled")
    assert _modes(eager=False, static=False, graph=True, compile=False) == ("graph",)
    assert _modes(eager=True, static=False, graph=False, compile=True) == ("eager",)
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    config = SpeedConfig(modes=("graph", "graph-compiled"))
    assert [config.mode_label(m, cuda) for m in config.modes] == ["graph", "graph-compiled"]
    assert [config.mode_label(m, cpu) for m in config.modes] == ["graph(eager)", "graph-compiled(uncaptured)"]
    assert SpeedConfig(modes=("graph",), compile=False).mode_label("graph", cuda) == "graph"  # captured either way


_DYNAMO = pytest.mark.skipif(not torch._dynamo.is_dynamo_supported(), reason="torch.compile unsupported here")


@_DYNAMO
def test_graph_compiled_decode_matches_greedy_generate():
    """The compiled step (one dynamo graph, cache and counters mutated in place, no recompile
    from step to step: every call after the first runs under fail_on_recompile) gives generate's
    greedy tokens.  Mistral (Llama's layer) with a window that holds the sequence: its sliding
    layers' Python-side length must be pinned, or every step recompiles.  (All 11 architectures,
    dense and pruned, pass this way; 1-2 s each, so one here.)"""
    model = _tiny("mistral-wide")
    prompt = torch.randint(3, model.config.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    config = SpeedConfig(batch_sizes=(2,), new_tokens=NEW, prompt_len=PROMPT)
    runner = speed._GraphRunner(model, config, torch.device("cpu"), capture=False, compiled=True,
                                backend="aot_eager")
    with torch.no_grad():
        for _ in range(2):  # the second call reuses the compiled step
            runner.generate(prompt, NEW)
            assert torch.equal(runner.tokens, _greedy(model, prompt))
    assert runner.fullgraph is True


@_DYNAMO
@pytest.mark.skipif(os.environ.get("LAYERFOLD_TEST_INDUCTOR") != "1",
                    reason="inductor builds C++ for 10-20 s per model on a 2-core CPU; set LAYERFOLD_TEST_INDUCTOR=1")
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")),
                    reason="inductor on the CPU needs a C++ compiler")
@pytest.mark.parametrize("name", ["llama", "gemma2-wide"])
def test_graph_compiled_inductor_matches_greedy_generate(name):
    dense = _tiny(name)
    prompt = torch.randint(3, dense.config.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(1))
    for model in (dense, _pruned(dense)):
        assert torch.equal(graph_decode(model, prompt, NEW, compiled=True, backend="inductor"), _greedy(model, prompt))


@_DYNAMO
def test_measure_models_graph_compiled_rows(monkeypatch):
    """Rows and labels of graph-compiled beside graph, and the benchmark's markdown of both
    (backend eager: dynamo's graph run as is, the cheapest compile)."""
    monkeypatch.setattr(speed, "GRAPH_COMPILE_BACKEND", "eager")
    dense = build_tiny_model("llama")
    models = {"dense": dense, "pruned": _pruned(dense)}
    config = SpeedConfig(batch_sizes=(2,), new_tokens=4, prompt_len=PROMPT, repeats=1,
                         modes=("graph", "graph-compiled"), warmup_tokens=2)
    results = measure_models(models, config)
    assert results["config"]["modes"] == ["graph(eager)", "graph-compiled(uncaptured)"]
    assert results["config"]["compile_mode"] == "default"
    rows = {(r["mode"], r["model"]): r for r in results["results"]}
    assert set(rows) == {(m, n) for m in ("graph(eager)", "graph-compiled(uncaptured)") for n in models}
    for (_mode, name), row in rows.items():
        assert row["x_floor"] > 0 and row["decode_s"] > 0
        assert (row["decode_share_of_ideal"] is None) == (name == "dense")
    script = Path(__file__).parents[1] / "benchmarks" / "speed" / "run.py"
    spec = importlib.util.spec_from_file_location("speed_bench", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    text = bench.inference_markdown({**results, "shape": {"name": "tiny", "dtype": "float32"}})
    assert "| graph-compiled(uncaptured) | 2 | pruned |" in text
    assert "graph(eager) x floor | graph(eager) share of ideal | graph-compiled(uncaptured) ms/tok" in text


def test_capture_failure_names_the_op():
    def broken():
        torch.zeros(1).item()
        raise RuntimeError("operation not permitted when stream is capturing")

    try:
        try:
            broken()
        except RuntimeError:
            raise RuntimeError("capture invalidated") from None
    except RuntimeError as exc:
        text = _where(exc)
    assert "operation not permitted when stream is capturing" in text
    assert "test_bench.py" in text and "in broken" in text


def test_bench_cli_graph_mode(folders, cli):
    out = folders / "graph.json"
    result = cli.invoke(app, ["bench", str(folders / "dense"), "--vs", str(folders / "pruned"), "--device", "cpu",
                              "--dtype", "float32", "--batch-sizes", "2", "--new-tokens", "3", "--prompt-len", "5",
                              "--repeats", "1", "--no-eager", "--no-static", "--graph", "--no-compile",
                              "--out", str(out)])
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())["results"]
    assert {(r["mode"], r["model"]) for r in rows} == {("graph(eager)", "dense"), ("graph(eager)", "pruned")}
