"""`layerfold bench` on CPU: a tiny random Llama against a pruned copy (structure only, no timings)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

from layerfold.cli import app
from layerfold.commands import register_all
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
    register_all(app)
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
