"""``layerfold analyze`` on a tiny random Llama: matrices, files, plan outlines, output folder."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from layerfold.calibrate import capture
from layerfold.errors import LayerfoldError
from layerfold.models.arch import architecture_for
from layerfold.plan import Operation, Plan
from layerfold.report.analysis import DEFAULT_MEASURES, analyze, cka_matrix, cosine_matrix, u_centre
from layerfold.report.heatmap import INSET, heatmap_figure
from layerfold.similarity import cka_linear, cka_rbf, hsic_unbiased, rbf_kernel, similarity_matrix

LAYERS = 5
VOCAB = 96


def _config() -> LlamaConfig:
    return LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=LAYERS,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(_config()).eval()


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 12), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def full_run(model, tokens, tmp_path_factory) -> tuple[dict, Path]:
    """One analysis with every default measure, shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("full")
    return analyze(model, root / "analysis", tokens=tokens, progress=False), root


def _plan(num_layers: int = LAYERS) -> Plan:
    return Plan(method="manual", num_layers=num_layers,
                operations=[Operation("fuse", 1, 3, score=0.9), Operation("drop", 4, 4, score=0.1)])


def _read_csv(path: Path) -> tuple[list[str], list[list[float]]]:
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], [[float(v) for v in row[1:]] for row in rows[1:]]


def test_analyze_writes_json_csv_and_png(full_run, tokens) -> None:
    result, tmp_path = full_run
    out = tmp_path / "analysis"
    expected = {"analysis.json"} | {f"{k}.{ext}" for k in DEFAULT_MEASURES for ext in ("csv", "png")}
    assert set(result["files"]) == expected
    assert {p.name for p in out.iterdir() if not p.name.startswith(".")} == expected
    assert [p.name for p in tmp_path.iterdir()] == ["analysis"]  # no temporary folder left behind
    record = json.loads((out / "analysis.json").read_text())
    assert record["num_layers"] == LAYERS and record["tokens"] == tokens.numel()
    assert list(record["measures"]) == list(DEFAULT_MEASURES)
    for kind, entry in record["measures"].items():
        m = torch.tensor(entry["matrix"], dtype=torch.float64)
        assert m.shape == (LAYERS, LAYERS)
        assert torch.equal(m, m.T) and torch.equal(m.diagonal(), torch.ones(LAYERS, dtype=torch.float64))
        assert entry["adjacent"] == [entry["matrix"][i][i + 1] for i in range(LAYERS - 1)]
        header, rows = _read_csv(out / f"{kind}.csv")
        assert header == ["layer", *map(str, range(LAYERS))]
        assert rows == entry["matrix"]  # full precision round trip
        image = (out / f"{kind}.png").read_bytes()
        assert image.startswith(b"\x89PNG\r\n\x1a\n") and len(image) > 5000


def test_analyze_matrices_equal_pairwise_similarity_of_layer_outputs(model, tokens, full_run) -> None:
    result = full_run[0]
    cache = capture(model, architecture_for(model.config), tokens, progress=False)
    outputs = [cache.output(i) for i in range(LAYERS)]
    for kind in DEFAULT_MEASURES:
        expected = similarity_matrix(outputs, kind)
        got = torch.tensor(result["measures"][kind]["matrix"], dtype=torch.float64)
        assert torch.allclose(got, expected, atol=1e-10, rtol=0), kind
        assert not torch.allclose(got, torch.ones_like(got))  # layers do differ


def test_u_centred_inner_product_is_unbiased_hsic() -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(30, 4, generator=g, dtype=torch.float64)
    y = x.sin() + 0.3 * torch.randn(30, 4, generator=g, dtype=torch.float64)
    k, l = rbf_kernel(x), rbf_kernel(y)
    inner = float((u_centre(k) * u_centre(l)).sum()) / (30 * 27)
    assert inner == pytest.approx(float(hsic_unbiased(k, l)), rel=1e-10)


@pytest.mark.parametrize("kind,fn", [("cka-linear", cka_linear), ("cka-rbf", cka_rbf)])
def test_cka_matrix_subsamples_tokens_like_the_pairwise_function(kind, fn) -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(2, 20, 6, generator=g, dtype=torch.float64)
    outputs = [base + 0.5 * i * torch.randn(2, 20, 6, generator=g, dtype=torch.float64) for i in range(3)]
    fast = cka_matrix(outputs, kind, max_tokens=16)  # 40 tokens -> 16 sampled
    for i, j in ((0, 1), (0, 2), (1, 2)):
        assert fast[i, j].item() == pytest.approx(fn(outputs[i], outputs[j], max_tokens=16), abs=1e-10)
    assert fast[0, 1].item() != pytest.approx(fn(outputs[0], outputs[1]), abs=1e-6)  # sampling matters


def test_cosine_matrix_handles_float32_outputs() -> None:
    g = torch.Generator().manual_seed(4)
    outputs = [torch.randn(2, 7, 5, generator=g) for _ in range(3)]
    assert torch.allclose(cosine_matrix(outputs), similarity_matrix(outputs, "cosine"), atol=1e-12, rtol=0)


def test_plan_windows_are_outlined(model, tokens, tmp_path: Path) -> None:
    plan_file = tmp_path / "plan.json"
    _plan().save(plan_file)
    plain = analyze(model, tmp_path / "plain", measures="cosine", tokens=tokens, progress=False)
    outlined = analyze(model, tmp_path / "outlined", measures="cosine", plan=plan_file, tokens=tokens,
                       progress=False)
    assert outlined["plan"]["summary"] == "manual: 5 -> 2 layers (fuse 1-3; drop 4)"
    assert (tmp_path / "outlined" / "plan.json").is_file()
    assert outlined["measures"]["cosine"]["matrix"] == plain["measures"]["cosine"]["matrix"]
    from matplotlib.image import imread

    a = imread(tmp_path / "plain" / "cosine.png")
    b = imread(tmp_path / "outlined" / "cosine.png")
    assert a.shape == b.shape and not np.array_equal(a, b)


def test_heatmap_draws_fuse_square_and_drop_mark() -> None:
    from matplotlib.patches import Rectangle

    fig = heatmap_figure(np.eye(LAYERS), "title", plan=_plan())
    ax = fig.axes[0]
    squares = [p.get_bbox().bounds for p in ax.patches if isinstance(p, Rectangle)]
    assert len(squares) == 1  # layers 1..3: cells 0.5 .. 3.5, drawn a little inside
    assert squares[0] == pytest.approx((0.5 + INSET, 0.5 + INSET, 3 - 2 * INSET, 3 - 2 * INSET))
    crosses = [line for line in ax.lines if line.get_marker() == "x"]
    assert len(crosses) == 1 and list(crosses[0].get_xdata()) == [4] and list(crosses[0].get_ydata()) == [4]
    assert ax.get_title() == "title"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["fuse window", "dropped layer"]


def test_plan_for_another_model_is_refused_before_writing(model, tokens, tmp_path: Path) -> None:
    with pytest.raises(LayerfoldError, match="plan is for 7 layers, the model has 5"):
        analyze(model, tmp_path / "out", plan=_plan(7), tokens=tokens, progress=False)
    assert not (tmp_path / "out").exists()


def test_existing_output_folder_is_refused_unless_overwrite(model, tokens, tmp_path: Path) -> None:
    out = tmp_path / "out"
    analyze(model, out, measures="cosine", tokens=tokens, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(LayerfoldError, match="exists"):
        analyze(model, out, measures="angular", tokens=tokens, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    analyze(model, out, measures="angular", tokens=tokens, progress=False, overwrite=True)
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "analysis.json", "angular.csv", "angular.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_unknown_measure_is_refused_with_a_suggestion(model, tokens, tmp_path: Path) -> None:
    with pytest.raises(LayerfoldError, match="Did you mean 'cka-rbf'"):
        analyze(model, tmp_path / "out", measures="cosine,cka-rfb", tokens=tokens, progress=False)
    with pytest.raises(LayerfoldError, match="no measure"):
        analyze(model, tmp_path / "out", measures=" , ", tokens=tokens, progress=False)


def _model_folder(root: Path) -> tuple[Path, Path]:
    """A tiny Llama with a word-level tokenizer saved as a plain folder, and a text file."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [f"w{i}" for i in range(VOCAB - 1)]
    text = " ".join(words[(i * 7) % len(words)] for i in range(400))
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    folder = root / "tiny-llama"
    torch.manual_seed(0)
    LlamaForCausalLM(_config()).save_pretrained(folder)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]").save_pretrained(folder)
    text_file = root / "calib.txt"
    text_file.write_text(text)
    return folder, text_file


def test_cli_analyze(tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from layerfold.cli.analyze import register

    app = typer.Typer()
    app.callback()(lambda: None)
    register(app)
    folder, text = _model_folder(tmp_path)
    out = tmp_path / "report"
    args = ["analyze", str(folder), "--out", str(out), "--calib-source", str(text), "--calib-samples", "2",
            "--calib-seq-len", "8", "--measures", "cka-rbf,angular"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == [
        "analysis.json", "angular.csv", "angular.png", "cka-rbf.csv", "cka-rbf.png"]
    record = json.loads((out / "analysis.json").read_text())
    assert record["tokens"] == 16 and record["calibration"]["samples"] == 2
    again = CliRunner().invoke(app, args)
    assert isinstance(again.exception, LayerfoldError)
