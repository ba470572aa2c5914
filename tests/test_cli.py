"""The ``layerfold`` command on bad input: exit code 2, one ``error:`` line, nothing written;
a failed save leaves nothing half-written; and one tiny prune end to end.

The CLI runs in-process through :func:`layerfold.cli.main` (the real entry point, which
turns user errors into exit code 2), so no interpreter start-up is paid per case.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error, write_json

CALIB = ["--ppl", "", "--calib-samples", "2", "--calib-seq-len", "16"]


def nothing_written(folder: Path, out_name: str) -> bool:
    """No ``out_name`` folder and no leftover temporary sibling of it."""
    return not any(p.name == out_name or p.name.startswith(f".{out_name}.") for p in folder.iterdir())


def test_missing_model_path(run, tmp_path):
    result = run("prune", tmp_path / "no-such-model", "--out", tmp_path / "out")
    assert_user_error(result, "does not exist")
    assert nothing_written(tmp_path, "out")


def test_folder_without_config(run, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_user_error(run("prune", tmp_path / "empty", "--out", tmp_path / "out"), "has no config.json")
    assert nothing_written(tmp_path, "out")


@pytest.mark.parametrize(("config", "message"), [
    ({"model_type": "bert", "hidden_size": 32}, "unsupported architecture 'bert'"),
    ({"model_type": "t5"}, "unsupported architecture 't5'"),
    ({"hidden_size": 32}, "config.json cannot be used"),
])
def test_config_not_a_supported_causal_lm(config, message, run, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    write_json(folder / "config.json", config)
    assert_user_error(run("prune", folder, "--out", tmp_path / "out"), message)
    assert nothing_written(tmp_path, "out")


def test_folder_without_tokenizer(run, tmp_path, tiny_model):
    folder = tmp_path / "model"
    tiny_model("llama").save_pretrained(folder)
    assert_user_error(run("prune", folder, "--out", tmp_path / "out"), "tokenizer")


@pytest.mark.parametrize(("args", "message"), [
    (["--threshold", "2"], "option 'threshold': Input should be less than or equal to 1"),
    (["--target-layers", "0"], "--target-layers must be at least 1"),
    (["--target-layers", "6"], "--target-layers must be between 1 and 5"),
    (["--target-layers", "9"], "--target-layers must be between 1 and 5"),
    (["--ratio", "1.5"], "--ratio must be between 0 and 1"),
    (["--target-layers", "4", "--ratio", "0.5"], "give only one of"),
    (["--method", "slmm"], "Did you mean 'slm'"),
    (["--merge", "meen", "--target-layers", "4"], "Did you mean 'mean'"),
    (["--set", "colour=red"], "option 'colour'"),
    (["--ratio", "0.99"], "would remove 6 of 6 layers"),
    (["--ratio", "0.01"], "removes no layer"),
])
def test_bad_options(args, message, run, tmp_path, tiny_model_dir, text_file):
    model_dir = tiny_model_dir("llama")
    out = tmp_path / "out"
    result = run("prune", model_dir, "--out", out, "--calib-source", text_file, *CALIB, *args)
    assert_user_error(result, message)
    assert nothing_written(tmp_path, "out")


def test_bad_options_are_reported_before_the_model_is_loaded(run, tmp_path, tiny_model_dir, text_file,
                                                            no_weights_loaded):
    model_dir = tiny_model_dir("llama")
    for args, message in [(["--target-layers", "6"], "--target-layers must be between 1 and 5"),
                          (["--ratio", "0.99"], "would remove 6 of 6 layers"),
                          (["--method", "slmm"], "Did you mean 'slm'")]:
        for command in ("prune", "plan"):
            result = run(command, model_dir, "--out", tmp_path / "out", "--calib-source", text_file, *CALIB[2:],
                         *args)
            assert_user_error(result, message)
    assert nothing_written(tmp_path, "out")


def _saved_plan(folder: Path, num_layers: int = 6) -> Path:
    from layerfold.plan import Operation, Plan

    path = folder / "saved-plan.json"
    Plan(method="shortgpt", num_layers=num_layers, operations=[Operation("drop", 1, 1)]).save(path)
    return path


@pytest.mark.parametrize(("args", "message"), [
    (["--ratio", "0.25", "--method", "shortgpt"], "--method, --ratio would not change"),
    (["--calib-samples", "4"], "--calib-samples would not change: drop it"),
    (["--set", "merge=mean"], "--set would not change"),
])
def test_planning_options_beside_plan_are_refused(args, message, run, tmp_path, tiny_model_dir,
                                                  no_weights_loaded):
    plan = _saved_plan(tmp_path)
    result = run("prune", tiny_model_dir("llama"), "--plan", plan, "--out", tmp_path / "out", "--ppl", "", *args)
    assert_user_error(result, f"--plan applies a saved plan, which {message}")
    assert nothing_written(tmp_path, "out")


@pytest.mark.parametrize(("text", "message"), [
    (None, "plan file missing-plan.json does not exist"),
    ('{"method": "slm", "num_layers": ', "is not valid JSON"),
    ('{"method": "slm", "num_layers": 6, "operations": [{"kind": "drop", "lo": 7, "hi": 7}]}', "outside 0..5"),
    ('{"method": "slm", "num_layers": 8, "operations": []}', "is for a 8-layer model;"),
    ('{"method": "slm", "num_layers": 6, "operations": [], "fingerprint": {"config": "0"}}', "another shape"),
])
def test_bad_plan_file_is_reported_before_the_model_is_loaded(text, message, run, tmp_path, tiny_model_dir,
                                                              no_weights_loaded):
    plan = tmp_path / "missing-plan.json"
    if text is not None:
        plan.write_text(text)
    result = run("prune", tiny_model_dir("llama"), "--plan", plan.name, "--out", tmp_path / "out", "--ppl", "")
    assert_user_error(result, message)
    assert nothing_written(tmp_path, "out")


def test_force_applies_a_plan_of_another_model_and_needs_a_plan(run, tmp_path, tiny_model_dir, text_file):
    from layerfold.plan import Operation, Plan

    plan = tmp_path / "other.json"
    Plan(method="shortgpt", num_layers=6, operations=[Operation("drop", 1, 1)],
         fingerprint={"config": "0", "weights": "0"}).save(plan)
    model_dir = tiny_model_dir("llama")
    assert_user_error(run("prune", model_dir, "--force", "--out", tmp_path / "out", "--target-layers", "4"),
                      "--force applies a --plan made for another model: it needs --plan")
    assert nothing_written(tmp_path, "out")
    with pytest.warns(UserWarning, match="applied anyway"):
        code, stdout, err = run("prune", model_dir, "--plan", plan, "--force", "--out", tmp_path / "out", "--ppl", "")
    assert code == 0, err
    assert "6 -> 5 layers" in stdout


def test_method_name_in_any_case_is_the_registered_one(run, tmp_path, tiny_model_dir, text_file):
    model_dir = tiny_model_dir("llama")
    code, _, err = run("prune", model_dir, "--method", "ShortGPT", "--target-layers", "4", "--calib-source",
                       text_file, *CALIB)
    assert code == 0, err
    assert [p.name for p in (tmp_path / "layerfold-out").iterdir()] == [f"{model_dir.name}-shortgpt"]


@pytest.mark.parametrize("command", ["prune", "plan", "analyze"])
def test_missing_calibration_file_is_reported_before_the_model_is_loaded(command, run, tmp_path, tiny_model_dir,
                                                                         no_weights_loaded):
    result = run(command, tiny_model_dir("llama"), "--out", tmp_path / "out", "--calib-source", "no/such.txt",
                 "--target-layers" if command != "analyze" else "--measures", "4" if command != "analyze" else "cosine")
    assert_user_error(result, "text file no/such.txt does not exist")
    assert nothing_written(tmp_path, "out")


def test_missing_perplexity_text_is_reported_before_the_model_is_loaded(run, tmp_path, tiny_model_dir, text_file,
                                                                        no_weights_loaded):
    result = run("prune", tiny_model_dir("llama"), "--out", tmp_path / "out", "--target-layers", "4",
                 "--calib-source", text_file, *CALIB[2:], "--ppl", "ptb,nowhere.txt")
    assert_user_error(result, "text file nowhere.txt does not exist")
    assert nothing_written(tmp_path, "out")


def test_too_short_calibration_text_is_reported_before_the_model_is_loaded(run, tmp_path, tiny_model_dir,
                                                                           text_file, no_weights_loaded):
    result = run("prune", tiny_model_dir("llama"), "--out", tmp_path / "out", "--target-layers", "4",
                 "--calib-source", text_file, "--calib-samples", "10", "--calib-seq-len", "128")
    assert_user_error(result, "is too short")
    assert nothing_written(tmp_path, "out")


def test_existing_out_is_kept_without_overwrite(run, tmp_path, tiny_model_dir):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert_user_error(run("prune", tiny_model_dir("llama"), "--out", out, "--target-layers", "4"),
                      "exists: choose another --out or pass --overwrite")
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    plan = tmp_path / "plan.json"
    plan.write_text("{}")
    assert_user_error(run("plan", tiny_model_dir("llama"), "--out", plan, "--target-layers", "4"), "exists")
    assert plan.read_text() == "{}"


def _break_save(monkeypatch, exc: BaseException) -> None:
    """Make save_pretrained write part of its output, then fail."""
    from transformers import PreTrainedModel

    def failing_save(self, folder, *args, **kwargs):
        Path(folder, "config.json").write_text("{}")
        raise exc

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", failing_save)


@pytest.mark.parametrize("overwrite", [False, True])
def test_failed_save_leaves_nothing_half_written(overwrite, run, monkeypatch, tmp_path, tiny_model_dir,
                                                 text_file):
    out = tmp_path / "out"
    model_dir = tiny_model_dir("llama")
    args = ["prune", model_dir, "--out", out, "--target-layers", "4", "--calib-source", text_file, *CALIB]
    previous = {}
    if overwrite:  # a previous result, which --overwrite may replace
        assert run(*args)[0] == 0
        previous = {p.name: p.read_bytes() for p in out.iterdir()}
    _break_save(monkeypatch, OSError("No space left on device"))
    with pytest.raises(OSError, match="No space left"):
        run(*args, *(["--overwrite"] if overwrite else []))
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert leftovers == []
    if overwrite:  # the previous folder is untouched
        assert {p.name: p.read_bytes() for p in out.iterdir()} == previous
    else:
        assert not out.exists()


def test_interrupted_save(run, monkeypatch, tmp_path, tiny_model_dir, text_file):
    model_dir = tiny_model_dir("llama")
    _break_save(monkeypatch, KeyboardInterrupt())
    code, _, err = run("prune", model_dir, "--out", tmp_path / "out", "--target-layers", "4",
                       "--calib-source", text_file, *CALIB)
    assert code == 130
    assert "interrupted; nothing was written" in err
    assert nothing_written(tmp_path, "out")


def test_out_of_gpu_memory_is_one_line(run, monkeypatch, tmp_path, tiny_model_dir, text_file):
    import torch

    model_dir = tiny_model_dir("llama")
    _break_save(monkeypatch, torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 39.16 GiB. GPU 0 has a "
                                                    "total capacity of 79.18 GiB of which 2.11 GiB is free."))
    code, _, err = run("prune", model_dir, "--out", tmp_path / "out", "--target-layers", "4",
                       "--calib-source", text_file, *CALIB)
    assert code == 3
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == [err.strip().splitlines()[-1]]  # one line, the last (after the progress output)
    assert errors[0].startswith("error: CUDA out of memory (tried to allocate 39.16 GiB); the output folder was not "
                                 "written. Lower --batch-size")
    assert "Traceback" not in err
    assert nothing_written(tmp_path, "out")


def test_prune_plan_and_reapply_end_to_end(run, tmp_path, tiny_model_dir, text_file, monkeypatch):
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model_dir("qwen2")
    out = tmp_path / "out"
    code, stdout, err = run("prune", model_dir, "--out", out, "--target-layers", "4", "--calib-source", text_file,
                            *CALIB)
    assert code == 0, err
    assert "6 -> 4 layers" in stdout
    assert {"config.json", "model.safetensors", "plan.json", "README.md", "tokenizer.json"} <= {
        p.name for p in out.iterdir()}
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4 and len(config["layer_types"]) == 4
    plan = json.loads((out / "plan.json").read_text())
    assert plan["num_layers"] == 6 and plan["target"] == {"layers": 4}
    assert plan["calibration"]["source"] == str(text_file)

    # the dry run writes the same plan; the saved plan applied again gives the same weights
    code, _, err = run("plan", model_dir, "--out", tmp_path / "dry.json", "--target-layers", "4",
                       "--calib-source", text_file, "--calib-samples", "2", "--calib-seq-len", "16")
    assert code == 0, err
    dry = json.loads((tmp_path / "dry.json").read_text())
    assert dry["operations"] == plan["operations"]
    code, _, err = run("prune", model_dir, "--plan", out / "plan.json", "--out", tmp_path / "again", "--ppl", "")
    assert code == 0, err
    first = AutoModelForCausalLM.from_pretrained(out).state_dict()
    second = AutoModelForCausalLM.from_pretrained(tmp_path / "again").state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)

    # a plan for another depth is refused, before the model is loaded
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", None)
    assert_user_error(run("prune", out, "--plan", out / "plan.json", "--out", tmp_path / "x", "--ppl", ""),
                      "is for a 6-layer model;")


def test_python_api_checks_the_same_before_loading(tmp_path, tiny_model_dir, text_file, no_weights_loaded):
    from layerfold import api
    from layerfold.data.tokens import CalibrationConfig
    from layerfold.errors import LayerfoldError
    from layerfold.methods.base import Target

    calib = CalibrationConfig(source=str(text_file), samples=2, seq_len=16)
    with pytest.raises(LayerfoldError, match="--target-layers must be between 1 and 5"):
        api.prune(str(tiny_model_dir("llama")), tmp_path / "out", target=Target(layers=6), calibration=calib)
    with pytest.raises(LayerfoldError, match="is not valid JSON"):
        (tmp_path / "bad.json").write_text("{")
        api.prune(str(tiny_model_dir("llama")), tmp_path / "out", plan=tmp_path / "bad.json")
    assert nothing_written(tmp_path, "out")


@pytest.mark.parametrize("command", ["prune", "plan", "analyze", "eval"])
def test_device_is_auto_unless_given(command, run, monkeypatch, tmp_path, tiny_model_dir, text_file):
    from layerfold import api
    from layerfold.errors import LayerfoldError

    asked = []

    def record(model, **kwargs):
        asked.append(kwargs.get("device"))
        raise LayerfoldError("stopped after the load was asked for")

    monkeypatch.setattr(api, "load_model", record)
    args = [] if command == "eval" else ["--out", tmp_path / "out", "--calib-source", text_file, *CALIB[2:]]
    for device in ([], ["--device", "cpu"]):
        assert_user_error(run(command, tiny_model_dir("llama"), *args, *device), "stopped after the load")
    assert asked == ["auto", "cpu"]


def test_methods_lists_every_method_and_shows_one_methods_options(run):
    code, out, _ = run("methods")
    assert code == 0 and "slm " in out and "shortgpt" in out and "merge operators:" in out
    code, out, _ = run("methods", "SLM")
    assert code == 0 and "Sliding Layer Merging" in out
    assert "pairs           default 'shortlist'" in out and "rescale         default 'channels'" in out
    assert_user_error(run("methods", "slmm"), "Did you mean 'slm'")
