"""Quality benchmark: every method at 20% and 35% of decoder layers on the embedded model.

Calibration as the paper: 10 x 128 tokens of book text (the LAMBADA calibration half), seed
1234, never overlapping evaluation text.  For each method and ratio it records pruning wall
time, perplexity (WikiText-2 and PTB test at 128 and 2048 tokens, LAMBADA evaluation half at
128, PTB *valid* at 128: the validation figure on which layerfold's defaults are chosen),
and the seven-task zero-shot average through lm-evaluation-harness (with and without BoolQ);
``--zs-tasks heldout`` scores the zero-shot validation tasks instead, ``--zs-docs`` keeps each
document's outcome for paired comparisons (benchmarks/quality/paired.py).  ``--heal`` LoRA-heals
each zero-shot configuration first, with ``layerfold heal``'s recipe on the calibration books
(never evaluation text), and names its rows ``NAME+lora``: the comparison after recovery.

Each row is appended to ``--out`` as one JSON line the moment it is done, so a run cut short
keeps what it finished.  ``--budget-s`` skips zero-shot for rows started after that many
seconds (their perplexities are still measured).

    python benchmarks/quality/run.py --device cuda --out rows.jsonl

The configurations are named in configs.py; results.jsonl holds the committed rows (each with commit,
date and machine) and report.py turns them into RESULTS.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

from layerfold import api
from layerfold.data.tokens import CalibrationConfig, sample_windows
from layerfold.evaluate.perplexity import perplexity
from layerfold.methods.base import Target

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: quality.configs, studies, lab
from quality.configs import ALWAYS_ZEROSHOT, CALIB_REPEATS, CONFIGS, LAB, WITH_CHANNELS, require_lab  # noqa: E402

PPL = [("wikitext2", 128), ("ptb", 128), ("lambada", 128), ("ptb-valid", 128), ("wikitext2", 2048), ("ptb", 2048)]


def measure(loaded, args, lengths: tuple[int, ...] = (128,)) -> dict:
    """The perplexities of ``loaded`` on the texts of PPL at ``lengths``."""
    row: dict = {}
    for source, seq_len in PPL:
        if seq_len not in lengths or (args.sources and source not in args.sources.split(",")):
            continue
        try:
            r = perplexity(loaded.model, loaded.tokenizer, source, seq_len, bos=args.bos, batch_size=args.batch_size,
                           max_windows=args.ppl_windows if seq_len == 128 else args.ppl_windows_long, progress=False)
            row[f"ppl/{source}@{seq_len}"] = r.perplexity
        except Exception as exc:  # a missing source must not lose the row
            row[f"ppl/{source}@{seq_len}"] = None
            row.setdefault("errors", []).append(f"{source}@{seq_len}: {exc}")
    return row


def zeroshot_row(loaded, args) -> dict:
    """The zero-shot figures of ``loaded`` on ``--zs-tasks``: the seven tasks under ``zeroshot`` (with
    the papers' means), any other group under ``heldout`` (with its plain mean); ``--zs-docs`` adds
    the per-document outcomes (``*_docs``) that benchmarks/quality/paired.py compares."""
    from layerfold.evaluate.zeroshot import ZEROSHOT7, evaluate_zeroshot, resolve_tasks

    seven = tuple(resolve_tasks(args.zs_tasks)) == ZEROSHOT7
    zs = evaluate_zeroshot(loaded.model, loaded.tokenizer, args.zs_tasks, limit=args.zs_limit,
                           batch_size=args.zs_batch, progress=False, per_doc=args.zs_docs)
    key = "zeroshot" if seven else "heldout"
    values = {n: t["value"] for n, t in zs["tasks"].items()}
    row = {key: values, f"{key}_samples": {n: t["samples"] for n, t in zs["tasks"].items()}}
    if seven:
        row["zs/mean"] = zs["summary"].get("mean")
        row["zs/mean_without_boolq"] = zs["summary"].get("mean_without_boolq")
    else:
        row["heldout/mean"] = sum(values.values()) / len(values)
    if args.zs_docs:
        row[f"{key}_docs"] = {n: t["docs"] for n, t in zs["tasks"].items()}
    row["zs_seconds"] = zs["seconds"]
    return row


def healed(loaded, args) -> dict:
    """Heal ``loaded`` in place with LoRA, ``layerfold heal``'s recipe (rank 8 on every decoder projection,
    book text, ``--heal-epochs`` epochs, 64 blocks of 256 tokens a step, as 16 x 4 micro-batches); the facts
    of the run for its row."""
    from layerfold.recover import heal, make_config

    config = make_config(epochs=args.heal_epochs, batch_size=16, grad_accum=4, eval_sources=())
    record = heal(loaded, None, config, device="cuda" if args.device.startswith("cuda") else "cpu",
                  progress=False).record
    loaded.model.eval()
    return {"heal": {k: record[k] for k in ("steps", "tokens_trained", "epochs_over_data", "loss_first", "loss_last",
                                            "seconds")} | {"recipe": record["recipe"]}}


def with_channels(loaded, result, tokens):
    """``result``'s removed layers as windows (each kept layer below a removed run is its base),
    with slm's per-channel factors fitted on ``tokens`` (:meth:`SlmEngine.fit_channels`)."""
    from layerfold.calibrate import capture
    from layerfold.methods.base import PlanResult
    from layerfold.methods.slm import SlmEngine, windows_of
    from layerfold.plan import Operation

    plan = result.plan
    removed = set(range(plan.num_layers)) - set(plan.kept_sources())
    if 0 in removed:
        raise ValueError("the plan removes layer 0: no window keeps a layer below it")
    windows = windows_of(removed)
    cache = capture(loaded.model, loaded.arch, tokens, progress=False)
    factors, _ = SlmEngine(cache, "output-cosine", "base", "base").fit_channels(windows, progress=False)
    ops = [Operation("fuse", lo, hi, detail={"channel_scale": {p: t.tolist() for p, t in factors[(lo, hi)].items()}})
           for lo, hi in windows]
    new = dataclasses.replace(plan, method=f"{plan.method}+channels", operations=ops,
                              merge={"operator": "base", "norms": "base"})
    return PlanResult(new, {})


def calibration_for(name: str, tokens: torch.Tensor) -> torch.Tensor:
    """The calibration tokens configuration ``name`` plans on: ``tokens``, or for CALIB_REPEATS the
    copy-aware set of studies/copying/copy_calibration.py (each window followed by its first half twice)."""
    if name in CALIB_REPEATS:
        from studies.copying.copy_calibration import with_repeats

        return with_repeats(tokens)
    return tokens


def plan_config(loaded, name: str, ratio: float, calib: CalibrationConfig, tokens: torch.Tensor):
    """The plan of configuration ``name`` (CONFIGS) at ``ratio`` for ``loaded``, on its calibration tokens
    (:func:`calibration_for`), with slm's channel factors fitted after it for WITH_CHANNELS."""
    method, options = CONFIGS[name]
    if method == LAB:
        require_lab()
    result = api.make_plan(loaded, method, Target(ratio=ratio), calib, options, progress=False,
                           tokens=calibration_for(name, tokens))
    return with_channels(loaded, result, tokens) if name in WITH_CHANNELS else result


class PlanClaims:
    """Which configuration scores a plan: the first to claim it, in this process or, with a folder, in any
    process sharing it (one file a plan, created exclusively)."""

    def __init__(self, folder: str | None, scope: str) -> None:
        self.folder = Path(folder) if folder else None
        self.scope = scope
        self.owners: dict[str, str] = {}
        if self.folder:
            self.folder.mkdir(parents=True, exist_ok=True)

    def claim(self, summary: str, ratio: float, name: str) -> str:
        """The owner of (``summary``, ``ratio``): ``name`` if it claims it now (or had), else the earlier one."""
        import hashlib

        key = hashlib.sha256(f"{self.scope}|{ratio}|{summary}".encode()).hexdigest()[:20]
        if key not in self.owners and self.folder:
            path = self.folder / key
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                with os.fdopen(fd, "w") as fh:
                    fh.write(name)
            except FileExistsError:
                time.sleep(0.2)  # the claimant writes its name right after creating the file
                self.owners[key] = path.read_text() or name
        self.owners.setdefault(key, name)
        return self.owners[key]


def git_commit() -> str | None:
    """The short commit of the checkout this runs from, or None outside a git checkout (pass --commit)."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ratios", default="0.2,0.35")
    parser.add_argument("--configs", default="all")
    parser.add_argument("--zeroshot-configs", default="auto",
                        help="'auto' (slm, slm-paper, slm-reference, the baselines, and the two SLM variants with "
                             "the best PTB-valid perplexity), 'none', or a comma list")
    parser.add_argument("--zs-limit", type=int, default=None)
    parser.add_argument("--zs-batch", type=int, default=64)
    parser.add_argument("--zs-tasks", default="zeroshot7",
                        help="zeroshot7 (reported), or heldout (zero-shot validation: splits no reported "
                             "figure scores)")
    parser.add_argument("--zs-docs", action="store_true", help="record per-document outcomes (paired comparisons)")
    parser.add_argument("--zs-unique", action="store_true",
                        help="no zero-shot for a configuration whose plan is one already scored (here, or by any "
                             "process sharing --zs-claims) or one of --zs-known's: a row naming it (same_plan_as)")
    parser.add_argument("--zs-claims", default=None,
                        help="folder where processes with --zs-unique claim each plan they score (one file a plan)")
    parser.add_argument("--zs-known", default="",
                        help="comma list of configurations planned in phase 1 whose zero-shot is known (not run); "
                             "with --zs-unique, plans equal to theirs are skipped")
    parser.add_argument("--ppl-windows", type=int, default=None, help="128-token windows per source (all)")
    parser.add_argument("--ppl-windows-long", type=int, default=None, help="2048-token windows per source (all)")
    parser.add_argument("--long", action="store_true", help="2048-token perplexity for the zero-shot rows")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--bos", action="store_true", help="BOS first in every perplexity window (Gemma needs it)")
    parser.add_argument("--sources", default=None, help="perplexity texts (default: all of PPL)")
    parser.add_argument("--calib-samples", type=int, default=10)
    parser.add_argument("--calib-source", default="books")
    parser.add_argument("--budget-s", type=float, default=float("inf"), help="no zero-shot started after this")
    parser.add_argument("--no-dense", action="store_true", help="skip the dense row (another process measures it)")
    parser.add_argument("--heal", action="store_true",
                        help="LoRA-heal each zero-shot configuration first (rows NAME+lora, with their 128-token "
                             "perplexities)")
    parser.add_argument("--heal-epochs", type=float, default=2.0, help="epochs over the book text (layerfold heal: 2)")
    parser.add_argument("--commit", default=None, help="layerfold commit recorded in each row (default: git's HEAD)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    start = time.perf_counter()
    base = api.load_model(args.model, device=args.device)
    n = len(base.arch.layer_list(base.model))
    calib = CalibrationConfig(source=args.calib_source, samples=args.calib_samples, seq_len=128, seed=1234)
    tokens = sample_windows(base.tokenizer, calib)
    names = list(CONFIGS) if args.configs == "all" else [c for c in args.configs.split(",") if c != "none"]
    ratios = [float(r) for r in args.ratios.split(",")]
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else "cpu"
    env = {"commit": args.commit or git_commit(), "date": time.strftime("%Y-%m-%d", time.gmtime()),
           "machine": device if device != "cpu" else f"{os.cpu_count()}-core CPU", "device": device,
           "torch": torch.__version__, "calibration": calib.describe()}

    def emit(row: dict) -> None:
        row = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}
        with open(args.out, "a") as fh:
            fh.write(json.dumps({**row, **env}, default=float) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k.startswith(("config", "ratio", "ppl/ptb-valid", "zs/m",
                                                                         "heldout/m", "layers", "error"))}),
              flush=True)

    # phase 1: plan, apply, perplexity for every configuration
    plans: dict[tuple[str, float], object] = {}
    valid: dict[str, list[float]] = {}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    if not args.no_dense:
        emit({"config": "dense", "ratio": 0.0, "layers": n, "phase": "ppl", **measure(base, args)})
    for name in names:
        for ratio in ratios:
            loaded = copy.deepcopy(base)
            t0 = time.perf_counter()
            try:
                result = plan_config(loaded, name, ratio, calib, tokens)
            except Exception as exc:
                emit({"config": name, "ratio": ratio, "error": f"{type(exc).__name__}: {exc}"})
                continue
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            plans[(name, ratio)] = result
            api.apply_plan(loaded, result)
            row = measure(loaded, args)
            valid.setdefault(name, []).append(row.get("ppl/ptb-valid@128") or float("inf"))
            picked = {k: v for k, v in result.plan.scores.items() if k.startswith(("portfolio", "choice_items"))}
            emit({"config": name, "ratio": ratio, "layers": result.plan.num_layers_after, "phase": "ppl",
                  "plan": result.plan.summary(), "prune_seconds": seconds, **({"scores": picked} if picked else {}),
                  **row})
            del loaded
    # phase 2: zero-shot for the configurations that matter, chosen on validation perplexity only
    if args.zeroshot_configs == "none":
        return
    if args.zeroshot_configs == "auto":
        variants = sorted((sum(math.log(v) for v in vals) / len(vals), name) for name, vals in valid.items()
                          if name.startswith("slm/") or name.startswith("slm-paper/"))
        chosen = ["dense", *[c for c in ALWAYS_ZEROSHOT if c in names], *[name for _, name in variants[:2]]]
    else:
        chosen = args.zeroshot_configs.split(",")
    print(json.dumps({"zeroshot_for": chosen}), flush=True)
    known = [k for k in args.zs_known.split(",") if k]
    claims = PlanClaims(args.zs_claims, f"{args.model}|{args.calib_source}|{args.calib_samples}")
    for k in known:
        for r in ratios:
            if (k, r) in plans:
                claims.claim(plans[(k, r)].plan.summary(), r, k)
    for name in [c for c in chosen if c not in known]:
        for ratio in ([0.0] if name == "dense" else ratios):
            if args.zs_unique and name != "dense" and (name, ratio) in plans:
                summary = plans[(name, ratio)].plan.summary()
                owner = claims.claim(summary, ratio, name)
                if owner != name:
                    emit({"config": name, "ratio": ratio, "phase": "skipped", "same_plan_as": owner, "plan": summary})
                    continue
            if time.perf_counter() - start > args.budget_s:
                print(json.dumps({"skipped_zeroshot": name, "ratio": ratio}), flush=True)
                continue
            loaded = copy.deepcopy(base)
            layers = n
            if name != "dense":
                if (name, ratio) not in plans:
                    plans[(name, ratio)] = plan_config(loaded, name, ratio, calib, tokens)
                api.apply_plan(loaded, plans[(name, ratio)])
                layers = plans[(name, ratio)].plan.num_layers_after
            extra = {**healed(loaded, args), **measure(loaded, args)} if args.heal else {}
            zs = zeroshot_row(loaded, args)
            long = measure(loaded, args, lengths=(2048,)) if args.long else {}
            emit({"config": f"{name}+lora" if args.heal else name, "ratio": ratio, "layers": layers,
                  "phase": "zeroshot" if "zeroshot" in zs else "heldout", **extra, **long, **zs})
            del loaded


if __name__ == "__main__":
    main()
