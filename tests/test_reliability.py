"""Nothing a user types loses their data or writes a broken model with success: the overwrite
rule, signals during a save, leftovers of killed runs, non-finite weights and activations,
calibration text, plan fingerprints, calibration files, the model card, model names, free disk.

Fault injection is real where it matters: a SIGTERM or SIGHUP sent to a subprocess in the middle
of a save, a SIGKILL leaving a partial folder behind, a model with one NaN weight.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from conftest import assert_user_error

from layerfold import output
from layerfold.errors import LayerfoldError
from layerfold.output import MARKER, check_out, save_model

TESTS = Path(__file__).parent
CALIB = ["--ppl", "", "--calib-samples", "2", "--calib-seq-len", "16"]


def leftovers(folder: Path, name: str) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(f".{name}."))


# 1. --overwrite replaces only what layerfold wrote


def test_overwrite_keeps_a_folder_of_foreign_files(tiny_model, tmp_path):
    out = tmp_path / "work"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    (out / "sub" / "data.csv").write_text("1,2")
    with pytest.raises(LayerfoldError, match="not a folder layerfold wrote") as info:
        save_model(tiny_model("llama"), None, out, overwrite=True)
    assert "\n" not in str(info.value)
    assert (out / "notes.txt").read_text() == "mine" and (out / "sub" / "data.csv").read_text() == "1,2"
    assert leftovers(tmp_path, "work") == []


def test_overwrite_from_the_command_line_keeps_foreign_files(run, tmp_path, tiny_model_dir, text_file):
    out = tmp_path / "work"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    result = run("prune", tiny_model_dir("llama"), "--out", out, "--overwrite", "--target-layers", "4",
                 "--calib-source", text_file, *CALIB)
    assert_user_error(result, "not a folder layerfold wrote")
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_overwrite_replaces_its_own_output_but_not_files_added_to_it(tiny_model, tmp_path):
    model, out = tiny_model("gpt2"), tmp_path / "out"
    save_model(model, None, out)
    assert (out / MARKER).is_file()
    save_model(model, None, out, overwrite=True)
    (out / "notes.txt").write_text("added by the user")
    with pytest.raises(LayerfoldError, match=r"holds files layerfold did not write \(notes.txt\)"):
        save_model(model, None, out, overwrite=True)
    assert (out / "notes.txt").read_text() == "added by the user"


def test_overwrite_refuses_the_current_folder_its_parents_home_and_root(tmp_path, monkeypatch):
    work = tmp_path / "a" / "b"
    work.mkdir(parents=True)
    (work / MARKER).write_text('{"files": []}')  # even a folder that looks like an output
    monkeypatch.chdir(work)
    for target, pattern in [(".", "current folder"), ("..", "current folder"), (str(tmp_path), "current folder"),
                            ("/", "filesystem root")]:
        with pytest.raises(LayerfoldError, match=pattern):
            check_out(target, overwrite=True)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    with pytest.raises(LayerfoldError, match="home folder"):
        check_out(home, overwrite=True)


def test_overwrite_refuses_a_link(tiny_model, tmp_path):
    real = tmp_path / "real"
    save_model(tiny_model("gpt2"), None, real)
    link = tmp_path / "link"
    link.symlink_to(real)
    with pytest.raises(LayerfoldError, match="a link"):
        check_out(link, overwrite=True)


# 2. signals during a save, leftovers of killed runs

SAVER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    sys.path.insert(0, sys.argv[2])
    from conftest import build_tiny_model
    from layerfold.output import save_model

    def slow(folder):
        (folder / "ready").write_text("")  # the test waits for this, then signals
        time.sleep(120)

    save_model(build_tiny_model("llama"), None, Path(sys.argv[1]), write_extra=slow)
""")


def default_signals() -> None:
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


def start_slow_save(out: Path) -> subprocess.Popen:
    """A real process saving a tiny model into ``out``, stopped inside the save (weights written)."""
    # SIGTERM and SIGHUP at their defaults in the child, as in a terminal, even when the tests themselves run
    # under nohup (an ignored SIGHUP is inherited, and layerfold rightly leaves it ignored)
    proc = subprocess.Popen([sys.executable, "-c", SAVER, str(out), str(TESTS)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_signals)
    deadline = time.monotonic() + 300
    while not any(out.parent.glob(f".{out.name}.partial-*/ready")):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"the saving process never got to the save: {proc.communicate()[1]}")
        time.sleep(0.1)
    return proc


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_mid_save_leave_nothing(tmp_path, signum):
    out = tmp_path / "out"
    proc = start_slow_save(out)
    proc.send_signal(signum)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signum, err
    assert f"{signal.Signals(signum).name} received" in err
    assert "Traceback" not in err
    assert not out.exists()
    assert leftovers(tmp_path, "out") == []


def test_partial_folder_of_a_killed_run_is_removed_by_the_next(tiny_model, tmp_path):
    out = tmp_path / "out"
    proc = start_slow_save(out)
    proc.kill()  # SIGKILL: no handler runs
    proc.communicate(timeout=60)
    stale = leftovers(tmp_path, "out")
    assert len(stale) == 1 and f".partial-{proc.pid}-" in stale[0]
    save_model(tiny_model("gpt2"), None, out)
    assert leftovers(tmp_path, "out") == []
    assert (out / "config.json").is_file()


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_folder_set_aside_by_a_killed_swap_is_put_back(tmp_path, tiny_model):
    out = tmp_path / "out"
    save_model(tiny_model("gpt2"), None, out)
    aside = tmp_path / f".out.old-{dead_pid()}"
    os.replace(out, aside)  # killed between setting the old output aside and moving the new one in
    with pytest.raises(LayerfoldError, match="exists"):  # put back first, so the out-exists rule sees it
        save_model(tiny_model("gpt2"), None, out)
    assert (out / "config.json").is_file() and not aside.exists()


def test_leftovers_of_a_running_process_are_left_alone_and_unknown_ones_named(tmp_path):
    mine = tmp_path / f".out.partial-{os.getpid()}-abc"
    legacy = tmp_path / ".out.partial-xyz"
    mine.mkdir()
    legacy.mkdir()
    with pytest.warns(UserWarning, match=r"\.out\.partial-xyz was left by an interrupted layerfold run"):
        output.clean_stale(tmp_path / "out")
    assert mine.is_dir() and legacy.is_dir()


def test_signal_handlers_are_restored_after_a_save(tiny_model, tmp_path):
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)
    save_model(tiny_model("gpt2"), None, tmp_path / "out")
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGHUP)) == before


# 3. non-finite weights and activations


def nan_model(tiny_model, layer: int = 2):
    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[layer].mlp.down_proj.weight[3, 5] = float("nan")
    return model


@pytest.fixture
def nan_model_dir(tiny_model, tiny_tokenizer, tmp_path):
    path = tmp_path / "nan-model"
    nan_model(tiny_model).save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("method", ["shortgpt", "last-n", "slm"])
def test_nan_model_is_refused_naming_the_tensor(run, nan_model_dir, tmp_path, text_file, method):
    out = tmp_path / "out"
    result = run("prune", nan_model_dir, "--out", out, "--method", method, "--target-layers", "4",
                 "--calib-source", text_file, *CALIB)
    line = assert_user_error(result, "model.layers.2.mlp.down_proj.weight (decoder layer 2) holds NaN")
    assert "max_window" not in line
    assert not out.exists() and leftovers(tmp_path, "out") == []


@pytest.mark.parametrize("method", ["shortgpt", "last-n", "slm"])
def test_nan_model_in_memory_is_never_written(tiny_model, tiny_tokenizer, tmp_path, text_file, method):
    from layerfold.api import prune
    from layerfold.data.tokens import CalibrationConfig
    from layerfold.methods.base import Target
    from layerfold.models.load import wrap_model

    loaded = wrap_model(nan_model(tiny_model), tiny_tokenizer)
    with pytest.raises(LayerfoldError, match="decoder layer 2") as info:
        prune(loaded, tmp_path / "out", method=method, target=Target(layers=4), progress=False,
              calibration=CalibrationConfig(source=str(text_file), samples=2, seq_len=16))
    assert "max_window" not in str(info.value)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path, "out") == []


def test_nan_activations_name_the_layer(tiny_model):
    from layerfold.calibrate import capture
    from layerfold.models.arch import architecture_for

    model = nan_model(tiny_model)
    tokens = torch.randint(4, 100, (2, 12))
    with pytest.raises(LayerfoldError, match="NaN or Inf at the output of decoder layer 2"):
        capture(model, architecture_for(model.config), tokens, progress=False)


def test_non_finite_weights_are_never_written(tiny_model, tmp_path):
    model = tiny_model("gpt2")
    with torch.no_grad():
        model.transformer.h[1].mlp.c_fc.weight[0, 0] = float("inf")
    with pytest.raises(LayerfoldError, match=r"refusing to write .*transformer.h.1.mlp.c_fc.weight "
                                             r"\(decoder layer 1\) holds Inf"):
        save_model(model, None, tmp_path / "out", layers=list(model.transformer.h))
    assert list(tmp_path.iterdir()) == []


def test_fusing_into_non_finite_weights_is_refused_before_the_model_changes(tiny_model):
    from layerfold.plan import Operation, Plan
    from layerfold.surgery import apply_plan

    model = tiny_model("llama")
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight.fill_(3e38)  # finite, but the merge overflows float32
    plan = Plan(method="slm", num_layers=6, operations=[Operation("fuse", 1, 3)], merge={"operator": "mean"})
    plan.operations[0].detail["branch_scale"] = 4.0
    with pytest.raises(LayerfoldError, match=r"fusing layers 1..3 gave non-finite weights.*layer 1 has Inf"):
        apply_plan(model, plan)
    assert len(model.model.layers) == 6


# 4. calibration never on evaluation text


@pytest.mark.parametrize("source", ["ptb", "wikitext2", "lambada"])
def test_calibration_on_evaluation_text_is_refused(source):
    from layerfold.data.tokens import CalibrationConfig

    with pytest.raises(LayerfoldError, match=f"'{source}' is an evaluation set"):
        CalibrationConfig(source=source)
    for fine in ("ptb-train", "ptb-valid", "books", "my-notes.txt"):
        CalibrationConfig(source=fine)


def test_calib_source_ptb_on_the_command_line(run, tiny_model_dir, tmp_path):
    assert_user_error(run("prune", tiny_model_dir("llama"), "--out", tmp_path / "out", "--calib-source", "ptb"),
                   "'ptb' is an evaluation set")


# 5. the plan's fingerprint of its source model


def plan_for(model, tokens):
    from layerfold.methods.base import Target
    from layerfold.methods.planning import make_plan
    from layerfold.models.load import wrap_model

    return make_plan(wrap_model(model), "shortgpt", Target(layers=4), progress=False, tokens=tokens)


def test_plan_refuses_another_model_of_the_same_shape(tiny_model):
    from conftest import build_tiny_model

    from layerfold.surgery import apply_plan

    tokens = torch.randint(4, 100, (2, 12))
    result = plan_for(tiny_model("llama"), tokens)
    assert set(result.plan.fingerprint) == {"config", "weights"}
    other = build_tiny_model("llama", seed=1)
    with pytest.raises(LayerfoldError, match="made for another model.*weights differ.*--force"):
        apply_plan(other, result.plan)
    assert len(other.model.layers) == 6
    with pytest.warns(UserWarning, match="applied anyway"):
        apply_plan(other, result.plan, force=True)
    assert len(other.model.layers) == 4


def test_plan_fingerprint_ignores_the_dtype(tiny_model):
    from layerfold.surgery import apply_plan

    tokens = torch.randint(4, 100, (2, 12))
    result = plan_for(tiny_model("llama"), tokens)
    apply_plan(tiny_model("llama").to(torch.bfloat16), result.plan)


def test_plan_without_fingerprint_still_applies_with_a_warning(tiny_model, tmp_path):
    from layerfold.plan import load_plan, save_plan
    from layerfold.surgery import apply_plan

    result = plan_for(tiny_model("llama"), torch.randint(4, 100, (2, 12)))
    result.plan.fingerprint = {}
    save_plan(result, tmp_path / "plan.json")
    with pytest.warns(UserWarning, match="no fingerprint"):
        old = load_plan(tmp_path / "plan.json")
    apply_plan(tiny_model("qwen2-full"), old.plan)  # same layer count: not checked


def test_plan_file_checked_against_a_config_before_loading_weights(tiny_model, tiny_model_dir, tmp_path):
    from layerfold.plan import check_plan_file, save_plan

    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LayerfoldError, match="is not valid JSON"):
        check_plan_file(bad, str(tiny_model_dir("llama")))
    result = plan_for(tiny_model("llama"), torch.randint(4, 100, (2, 12)))
    path = save_plan(result, tmp_path / "plan.json")
    assert check_plan_file(path, str(tiny_model_dir("llama"))).num_layers == 6
    with pytest.raises(LayerfoldError, match="another shape.*--force"):
        check_plan_file(path, str(tiny_model_dir("qwen2-full")))
    check_plan_file(path, str(tiny_model_dir("qwen2-full")), force=True)
    result.plan.num_layers, result.plan.operations = 7, []
    save_plan(result, path)
    with pytest.raises(LayerfoldError, match="is for a 7-layer model; .* has 6 layers"):
        check_plan_file(path, str(tiny_model_dir("llama")), force=True)


# 6. calibration files


@pytest.mark.parametrize("content, pattern", [
    (b"caf\xe9 au lait " * 50, "is not UTF-8 text"),
    (b"", "is empty"),
    (b"  \n\n ", "is empty"),
    (b"short text", "is too short"),
])
def test_bad_calibration_file_is_one_line(tmp_path, content, pattern):
    from layerfold.data.sources import load_text
    from layerfold.data.tokens import CalibrationConfig, check_calibration_source

    path = tmp_path / "calib.txt"
    path.write_bytes(content)
    load_text.cache_clear()
    with pytest.raises(LayerfoldError, match=pattern) as info:
        check_calibration_source(CalibrationConfig(source=str(path), samples=2, seq_len=16))
    assert "\n" not in str(info.value)


def test_missing_or_folder_calibration_source(tmp_path):
    from layerfold.data.tokens import CalibrationConfig, check_calibration_source

    with pytest.raises(LayerfoldError, match="does not exist"):
        check_calibration_source(CalibrationConfig(source=str(tmp_path / "nope.txt")))
    with pytest.raises(LayerfoldError, match="is a folder"):
        check_calibration_source(CalibrationConfig(source=str(tmp_path)))


def test_non_utf8_calibration_file_on_the_command_line(run, tiny_model_dir, tmp_path):
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\u00e9 ".encode("latin-1") * 100)
    assert_user_error(run("prune", tiny_model_dir("llama"), "--out", tmp_path / "out", "--target-layers", "4",
                       "--calib-source", path, *CALIB), "is not UTF-8 text")


# 7. the model card and the output's permissions


def test_model_card_apply_again_command_and_no_placeholder(tiny_model, tiny_tokenizer, tiny_model_dir, tmp_path):
    from layerfold.models.default import DEFAULT_MODEL_NAME
    from layerfold.models.load import LoadedModel, load_model
    from layerfold.output import PruneReport, again_command, model_card

    loaded = load_model(str(tiny_model_dir("llama")))
    assert again_command(loaded) == f"layerfold prune {tiny_model_dir('llama')} --plan plan.json --out pruned"
    default = LoadedModel(model=None, tokenizer=None, arch=loaded.arch, source=DEFAULT_MODEL_NAME,
                          path=str(tmp_path))
    assert again_command(default) == "layerfold prune --plan plan.json --out pruned"
    hub = LoadedModel(model=None, tokenizer=None, arch=loaded.arch, source="org/model", path="org/model")
    assert again_command(hub) == "layerfold prune org/model --plan plan.json --out pruned"
    result = plan_for(loaded.model, torch.randint(4, 100, (2, 12)))
    card = model_card(PruneReport(plan=result.plan, out=None, layers_before=6, layers_after=4, params_before=1,
                                  params_after=1), default, "layerfold prune")
    assert "https://" not in card and "`layerfold prune --plan plan.json --out pruned`" in card


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_output_folder_respects_the_umask(tiny_model, tmp_path, umask):
    previous = os.umask(umask)
    try:
        save_model(tiny_model("gpt2"), None, tmp_path / "out")
    finally:
        os.umask(previous)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o777 & ~umask


# 8. model names and method names


@pytest.mark.parametrize("name, pattern", [
    ("./nope_dir", "model folder ./nope_dir does not exist"),
    ("nope/x/y", "does not exist"),
    ("nope_dir/", "does not exist"),
    ("not a name", "neither a local folder nor a valid hub id"),
])
def test_local_looking_names_fail_at_once(name, pattern, monkeypatch, tmp_path):
    from layerfold.models.load import resolve_source

    monkeypatch.chdir(tmp_path)
    with pytest.raises(LayerfoldError, match=pattern):
        resolve_source(name)


def test_hub_id_offline_without_a_cached_copy_fails_without_retries(monkeypatch, tmp_path):
    from huggingface_hub import constants

    from layerfold.models.load import resolve_source

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    with pytest.raises(LayerfoldError, match="HF_HUB_OFFLINE is set"):
        resolve_source("nope_dir")


def test_hub_id_with_no_network_fails_in_one_request(monkeypatch, tmp_path):
    import huggingface_hub

    from layerfold.models.load import resolve_source

    calls = []

    def unreachable(*args, **kwargs):
        calls.append(args)
        raise ConnectionError("no route to host")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(huggingface_hub, "get_hf_file_metadata", unreachable)
    with pytest.raises(LayerfoldError, match="the hub cannot be reached"):
        resolve_source("nope_dir")
    assert len(calls) == 1


def test_method_names_match_whatever_the_case():
    from layerfold.methods.base import METHODS, make_method

    assert type(make_method("SLM")) is type(make_method("slm"))
    assert METHODS.canonical("Shortened_PPL") == "shortened-ppl"
    with pytest.raises(LayerfoldError, match="Did you mean 'shortgpt'"):
        make_method("SHORTGTP")


def test_models_and_tokenizers_are_loaded_without_remote_code(tiny_model_dir, monkeypatch):
    import transformers

    from layerfold.models.load import load_model

    seen = []
    for cls in (transformers.AutoConfig, transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        real = cls.from_pretrained.__func__

        def spy(klass, *args, _real=real, **kwargs):
            seen.append((klass.__name__, kwargs.get("trust_remote_code", "missing")))
            return _real(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    load_model(str(tiny_model_dir("llama")))
    assert seen and all(flag is False for _, flag in seen), seen


# 9. free disk


def test_too_little_free_disk_is_refused_before_writing(tiny_model, tmp_path, monkeypatch):
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(output.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(LayerfoldError, match=r"not enough free disk for .*needs about [\d.]+ MB, .* has 0.0 MB free"):
        save_model(tiny_model("gpt2"), None, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv, expected", [
    (["/usr/bin/layerfold", "prune", "--out", "a b"], "layerfold prune --out 'a b'"),
    (["script.py", "--x", "1"], "python script.py --x 1"),
    (["-c"], "(from Python, through layerfold.api)"),
    ([""], "(from Python, through layerfold.api)"),
])
def test_command_line_names_what_made_the_output(monkeypatch, argv, expected):
    from layerfold.output import command_line

    monkeypatch.setattr(sys, "argv", argv)
    assert command_line() == expected
