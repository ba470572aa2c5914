"""Where the time of ``layerfold prune`` goes: a breakdown per stage, end to end.

    python benchmarks/prune_time/run.py cpu --runs 3 --ratio 0.2 --note "nothing else running"
    python benchmarks/prune_time/run.py gpu --shape 7b              # the 7B shape's plan on one GPU
    python benchmarks/prune_time/run.py report                      # RESULTS.md from results.jsonl

``cpu`` runs what the README's main command runs (the embedded SmolLM2-135M, default ``slm``,
``--ratio 0.2``, float32 on the CPU, calibration 10 x 128 book tokens, PTB perplexity before and
after on 40 windows, save), each repetition in a fresh process so that imports count too, and
times every stage: the functions the stages consist of are wrapped by timers that record their
exclusive time (a stage inside another is subtracted from the outer one).  It appends one row to
``results.jsonl`` with the minimum and median over the runs of the end-to-end time and of each
stage, the command, commit, date, machine, torch's thread count, the load average before the
first run and ``--note`` (what else was running).

``gpu`` times the default's plan (``api.make_plan``) of a model random-initialised from a real
config's shape (Llama-2-7B: 32 layers, hidden 4096, MLP 11008, 32 heads), bf16 on one GPU,
10 x 128 random calibration token ids, at 20% and 35%, with the peak GPU memory over the weights.

``report`` writes RESULTS.md from results.jsonl.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results.jsonl"
REPORT = HERE / "RESULTS.md"
ROOT = HERE.parent.parent

# (module, attribute, stage); a class attribute is written "Class.method"
STAGES = [
    ("layerfold.api", "load_model", "load"),
    ("layerfold.api", "_ppl", "perplexity"),  # the name before a3bf521's successors
    ("layerfold.api", "perplexities", "perplexity"),
    ("layerfold.methods.base", "sample_windows", "calibration text"),
    ("layerfold.methods.base", "capture", "capture"),
    ("layerfold.methods.slm.selection", "greedy_fold", "greedy fold"),
    ("layerfold.methods.slm.engine", "SlmEngine.optimal", "optimal windows"),
    ("layerfold.methods.slm.selection", "influence_removal", "block influence"),
    ("layerfold.methods.slm.selection", "angular_removal", "angular"),
    ("layerfold.methods.slm.engine", "SlmEngine.score_removal", "candidate scoring"),
    ("layerfold.methods.slm.engine", "SlmEngine.fit_channels", "channel fit"),
    ("layerfold.methods.slm.engine", "SlmEngine.kl_of", "KL"),
    ("layerfold.methods.slm.engine", "SlmEngine.kls_of", "KL"),  # both KLs, the original's distributions made once
    ("layerfold.api", "apply_plan", "apply"),
    ("layerfold.api", "save_model", "save"),
]
PLAN_STAGES = {"calibration text", "capture", "greedy fold", "optimal windows", "block influence", "angular",
               "candidate scoring", "channel fit", "KL", "plan (other)"}
ORDER = ["import", "load", "perplexity before", "calibration text", "capture", "greedy fold", "optimal windows",
         "block influence", "angular", "candidate scoring", "channel fit", "KL", "plan (other)", "apply",
         "perplexity after", "save", "other"]


class StageClock:
    """Exclusive wall time per stage: while a stage runs inside another, the outer one's clock stops."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}
        self._stack: list[list] = []  # [name, start, time spent in inner stages]

    def enter(self, name: str) -> None:
        self._stack.append([name, time.perf_counter(), 0.0])

    def leave(self) -> None:
        name, start, inner = self._stack.pop()
        total = time.perf_counter() - start
        self.seconds[name] = self.seconds.get(name, 0.0) + total - inner
        self.calls[name] = self.calls.get(name, 0) + 1
        if self._stack:
            self._stack[-1][2] += total

    def wrap(self, module, attribute: str, stage: str) -> bool:
        owner = module
        *path, name = attribute.split(".")
        for part in path:
            owner = getattr(owner, part, None)
        original = getattr(owner, name, None) if owner is not None else None
        if original is None:
            return False

        @functools.wraps(original)
        def timed(*args, **kwargs):
            label = stage
            if stage == "perplexity":
                label = "perplexity before" if "perplexity before" not in self.seconds else "perplexity after"
            self.enter(label)
            try:
                return original(*args, **kwargs)
            finally:
                self.leave()

        setattr(owner, name, timed)
        return True


def child(args) -> None:
    """One repetition in this process: prune the embedded model as the CLI does; print the stages."""
    import importlib

    start = time.perf_counter()
    import torch

    from layerfold import api
    from layerfold.methods.base import Target

    imported = time.perf_counter() - start
    clock = StageClock()
    wrapped = {(m, a): clock.wrap(importlib.import_module(m), a, stage) for m, a, stage in STAGES}
    missing = sorted({stage for (m, a), ok in wrapped.items() for mm, aa, stage in STAGES
                      if (mm, aa) == (m, a) and not ok} - {stage for (m, a, stage) in STAGES if wrapped[(m, a)]})
    plan_start = [0.0]
    original_make_plan = api.make_plan

    def make_plan(*a, **kw):  # the plan's own remainder (engine set-up, plan record) is "plan (other)"
        plan_start[0] = time.perf_counter()
        clock.enter("plan (other)")
        try:
            return original_make_plan(*a, **kw)
        finally:
            clock.leave()

    api.make_plan = make_plan
    caches = []  # the plan's capture, for the planning time estimate made from its layer time
    import layerfold.methods.base as base

    timed_capture = base.capture
    base.capture = lambda *a, **kw: caches.append(timed_capture(*a, **kw)) or caches[-1]
    if args.threads:
        torch.set_num_threads(args.threads)
    clock.enter("other")
    loaded = api.load_model(None, dtype="float32", device=args.device)
    with tempfile.TemporaryDirectory() as tmp:
        windows = {"ppl_windows": args.ppl_windows} if args.ppl_windows else {}  # else layerfold prune's default
        report = api.prune(loaded, Path(tmp) / "out", method="slm", target=Target(ratio=args.ratio),
                           options=json.loads(args.options) if args.options else None,
                           ppl=("ptb",), progress=False, command="layerfold prune (benchmark)", **windows)
    clock.leave()
    end_to_end = time.perf_counter() - start
    seconds = {"import": imported, **clock.seconds}
    if args.save_plans:
        Path(args.save_plans).mkdir(parents=True, exist_ok=True)
        (Path(args.save_plans) / f"plan-{args.ratio}-{os.getpid()}.json").write_text(report.plan.to_json())
    plan = report.plan
    plan_seconds = sum(v for k, v in seconds.items() if k in PLAN_STAGES)
    options = json.loads(args.options) if args.options else None
    print(json.dumps({"seconds": seconds, "end_to_end": end_to_end, "missing_stages": missing,
                      "plan_seconds": plan_seconds, "estimate": estimate(caches, plan.removed_layers, options),
                      "threads": torch.get_num_threads(), "windows": [list(w) for w in plan.windows()],
                      "planning_seconds": plan.provenance.get("planning_seconds"),
                      "ppl_after": report.perplexity_after, "ppl_windows": report.ppl_windows}))


def estimate(caches: list, budget: int, options: dict | None = None) -> float | None:
    """The planning time layerfold's estimate gives from the plan's own capture (its layer time),
    capture included, for the default's options updated with ``options`` (None where the package has
    no estimate)."""
    try:
        from layerfold.methods.slm.estimate import planning_seconds
    except ImportError:
        return None
    try:
        from layerfold.methods.slm.shortlist import Shortlist
    except ImportError:  # a commit before the shortlist: every pair
        chooser = None
    else:
        chooser = Shortlist() if (options or {}).get("pairs", "shortlist") == "shortlist" else None
    seconds = planning_seconds(caches[0], budget, chooser) if chooser else planning_seconds(caches[0], budget)
    return round(seconds + caches[0].layer_seconds * caches[0].num_layers, 2)


def git(*cmd: str) -> str:
    try:
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def provenance(argv: list[str], commit: str = "") -> dict:
    """Command, commit (``+uncommitted-src`` when src/ has changes not committed) and date; ``commit``
    names the commit of a copy without git (``git archive``)."""
    dirty = False
    if not commit:
        commit = git("rev-parse", "HEAD")
        dirty = bool(git("status", "--porcelain", "--untracked-files=no", "src"))
    return {"command": "python benchmarks/prune_time/run.py " + " ".join(shlex.quote(a) for a in argv),
            "commit": commit + ("+uncommitted-src" if dirty else ""),
            "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")}


def cpu_machine() -> dict:
    import torch

    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": name, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version()}


def matmul_gflops(seconds: float = 1.0) -> float:
    """This machine's float32 matrix-multiply rate now (one decoder layer's MLP shape on the calibration
    tokens), in GFLOP/s: a shared or throttled CPU can run at half its speed of an hour before, and this
    says which a row met."""
    import torch

    a, b = torch.randn(1280, 576), torch.randn(576, 1536)
    a @ b
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        count += 1
    return round(2 * 1280 * 576 * 1536 * count / (time.perf_counter() - start) / 1e9, 1)


def summary(values: list[float]) -> dict:
    return {"min": round(min(values), 2), "median": round(statistics.median(values), 2)}


def cpu(args, argv: list[str]) -> None:
    row = {"kind": "cpu", "label": args.label, **provenance(argv, args.commit), "machine": cpu_machine(),
           "load_average_before": os.getloadavg(), "note": args.note, "ratio": args.ratio,
           "options": args.options or None, "runs": []}
    cmd = [sys.executable, str(Path(__file__).resolve()), "child", "--ratio", str(args.ratio),
           "--device", args.device] + (["--threads", str(args.threads)] if args.threads else []) + (
        ["--ppl-windows", str(args.ppl_windows)] if args.ppl_windows else []) + (
        ["--options", args.options] if args.options else []) + (
        ["--save-plans", args.save_plans] if args.save_plans else [])
    if args.nice:
        cmd = ["nice", "-n", str(args.nice), *cmd]
    row["first_use"] = args.first_use
    for i in range(args.runs):
        gflops = matmul_gflops()
        env = dict(os.environ)
        fresh = tempfile.mkdtemp(prefix="layerfold-cache-") if args.first_use else None
        if fresh:  # an empty cache: the embedded model is converted and the texts prepared, as on first use
            env["LAYERFOLD_CACHE"] = fresh
        start = time.perf_counter()
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
        finally:
            if fresh:
                shutil.rmtree(fresh, ignore_errors=True)
        wall = time.perf_counter() - start
        if out.returncode != 0:
            sys.exit(f"run {i + 1} failed:\n{out.stderr[-4000:]}")
        run = json.loads(out.stdout.strip().splitlines()[-1])
        run["process_wall"] = wall
        run["matmul_gflops_before"] = gflops
        run["load_average_after"] = os.getloadavg()
        row["runs"].append(run)
        print(f"run {i + 1}: {wall:.1f} s  " + ", ".join(f"{k} {v:.1f}" for k, v in run["seconds"].items()),
              flush=True)
    runs = row["runs"]
    row["threads"] = runs[0]["threads"]
    row["end_to_end"] = summary([r["process_wall"] for r in runs])
    stages = sorted({s for r in runs for s in r["seconds"]}, key=lambda s: ORDER.index(s) if s in ORDER else 99)
    row["stages"] = {s: summary([r["seconds"].get(s, 0.0) for r in runs]) for s in stages}
    row["windows"] = runs[0]["windows"]
    row["same_plan_every_run"] = all(r["windows"] == runs[0]["windows"] for r in runs)
    with RESULTS.open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps({k: row[k] for k in ("end_to_end", "stages", "windows")}, indent=1))
    write_report()


def gpu(args, argv: list[str]) -> None:
    """The default's plan of a random model of a real shape on one GPU: time and peak memory."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    from layerfold import api
    from layerfold.calibrate import capture
    from layerfold.methods.base import Target
    from layerfold.models.load import wrap_model

    shapes = {"7b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096),
              "tiny": dict(num_hidden_layers=12, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=256, max_position_embeddings=512)}  # a smoke test
    config = LlamaConfig(**shapes[args.shape])
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16).eval()
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    loaded = wrap_model(model)
    tokens = torch.randint(0, config.vocab_size, (10, 128), generator=torch.Generator().manual_seed(1234))
    row = {"kind": "gpu", "label": args.label, **provenance(argv, args.commit), "shape": args.shape,
           "machine": {"gpu": torch.cuda.get_device_name() if cuda else "none (CPU)", "torch": torch.__version__},
           "note": args.note,
           "weights_gib": round(weights / 2**30, 2), "plans": {}}
    for ratio in args.ratios:
        times, peaks = [], []
        for _ in range(args.runs):
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            result = api.make_plan(loaded, "slm", Target(ratio=ratio), tokens=tokens, progress=False)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
            peaks.append(torch.cuda.max_memory_allocated() / weights if cuda else float("nan"))
        budget = result.plan.removed_layers
        row["plans"][str(ratio)] = {"seconds": summary(times), "all_seconds": [round(t, 3) for t in times],
                                    "peak_over_weights": round(max(peaks), 3),
                                    "windows": [list(w) for w in result.plan.windows()],
                                    "estimate": estimate([capture(model, loaded.arch, tokens, progress=False)], budget)}
        print(ratio, row["plans"][str(ratio)], flush=True)
    out = Path(args.out) if args.out else RESULTS
    with out.open("a") as fh:
        fh.write(json.dumps(row) + "\n")


# Labels of rows measured before later changes made them ambiguous, by (commit, label as recorded): the
# shortlist's sizes were 3/3/6 from 203d4c6 until they became 3/1/12.
LABELS = {
    ("203d4c6", "shortlist, 40-window check"): "shortlist 3/3/6, 40-window check",
    ("203d4c6", "shortlist (the default)"): "shortlist 3/3/6 (the default then)",
    ("a270e7d", "shortlist, 16-window check (the default)"): "shortlist 3/3/6, 16-window check (the default then)",
    ("e7f4c0a", "first use (empty cache), the default"): "first use (empty cache), shortlist 3/3/6 (the default then)",
    ("8109750", "after (full fold, the default)"): "after (full fold, the default then)",
    ("a56ca62", "shortlist 3/1/12 (the default)"): "shortlist 3/1/12, check measured each run",
    ("a5ecec2", "shortlist 3/1/12 (the default)"): "shortlist 3/1/12, block influence on the CPU",
    ("62eac78", "first use (empty cache), the default"): "first use (empty cache), shortlist 3/1/12 (the default)",
}


def write_report() -> None:
    rows = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()] if RESULTS.exists() else []
    for r in rows:
        r["label"] = LABELS.get((r.get("commit", "")[:7], r.get("label")), r.get("label"))
    lines = ["# Where the time of `layerfold prune` goes", "",
             "Generated by `python benchmarks/prune_time/run.py report` from results.jsonl; every figure is the",
             "minimum / median (seconds) over the runs of one row. Each run is a fresh process pruning the",
             "embedded SmolLM2-135M as the README's command does (float32, CPU, 10 x 128 calibration tokens,",
             "PTB perplexity before and after on the check's windows (a row's `check windows`: 40 before",
             "commit f573574, 16 from it), save). `matmul GFLOP/s`: the machine's float32 matrix-multiply rate just",
             "before each run (min-max over the runs); this shared 2-core CPU has measured anywhere from 77 to 163",
             "GFLOP/s within the same hour, and every stage scales with it.", ""]
    cpu_rows = [r for r in rows if r["kind"] == "cpu"]
    if cpu_rows:
        lines += ["## CPU, end to end and per stage", ""]
        head = "| stage | " + " | ".join(f"{r['label']} ({r['ratio']:.0%})" for r in cpu_rows) + " |"
        lines += [head, "|---" * (len(cpu_rows) + 1) + "|"]
        stages = [s for s in ORDER if any(s in r["stages"] for r in cpu_rows)]
        for stage in ["end to end", *stages]:
            cells = []
            for r in cpu_rows:
                v = r["end_to_end"] if stage == "end to end" else r["stages"].get(stage)
                cells.append(f"{v['min']:.1f} / {v['median']:.1f}" if v else "")
            name = f"**{stage}**" if stage == "end to end" else stage
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        lines += ["", "| row | commit | date | machine | threads | runs | load average before | matmul GFLOP/s | "
                  "check windows | windows | note |", "|---" * 11 + "|"]
        for r in cpu_rows:
            m = r["machine"]
            load = " ".join(f"{v:.2f}" for v in r["load_average_before"])
            rates = [x["matmul_gflops_before"] for x in r["runs"] if "matmul_gflops_before" in x]
            rate = f"{min(rates):.0f}-{max(rates):.0f}" if rates else "not measured"
            check = r["runs"][0].get("ppl_windows", 40)
            check = f"{check}, empty cache" if r.get("first_use") else check
            lines.append(f"| {r['label']} ({r['ratio']:.0%}) | {r['commit'][:12]}{'+' if '+' in r['commit'] else ''}"
                         f" | {r['date']} | {m['cpu']}, {m['cores']} cores, torch {m['torch']} | {r['threads']} | "
                         f"{len(r['runs'])} | {load} | {rate} | {check} | {r['windows']} | {r['note']} |")
        lines += ["", "Commands:", ""] + [f"    {r['command']}" for r in cpu_rows] + [""]
    gpu_rows = [r for r in rows if r["kind"] == "gpu"]
    if gpu_rows:
        lines += ["## GPU: the default's plan of a random model of a real shape", "",
                  "| row | shape | ratio | plan seconds (min / median) | estimate | peak / weights | windows | commit "
                  "| date | machine | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in gpu_rows:
            for ratio, p in r["plans"].items():
                lines.append(f"| {r['label']} | {r['shape']} ({r['weights_gib']} GiB bf16) | {float(ratio):.0%} | "
                             f"{p['seconds']['min']:.2f} / {p['seconds']['median']:.2f} | "
                             f"{'' if p.get('estimate') is None else format(p['estimate'], '.1f')} | "
                             f"{p['peak_over_weights']:.2f}"
                             f" | {p['windows']} | {r['commit'][:12]} | {r['date']} | {r['machine']['gpu']} | "
                             f"{r.get('note', '')} |")
        lines += ["", "Random bf16 weights from the shape, 10 x 128 random calibration token ids, "
                  "`api.make_plan(loaded, 'slm', Target(ratio=...))` timed from the call to its return (the GPU "
                  "synchronised); peak: `torch.cuda.max_memory_allocated()` over the weights' bytes. A row of another "
                  "commit ran with `PYTHONPATH` on a `git archive` of that commit's `src`. Commands:", ""]
        lines += [f"    {r['command']}" for r in gpu_rows] + [""]
    checks = [r for r in rows if r["kind"] == "greedy-check"]
    if checks:
        lines += ["## Same decisions: the greedy fold with its shortlist against the full fold", "",
                  "Each row compares the windows after every step of the full fold (every pair scored) with the "
                  "shortlist's, on the default calibration (float32, CPU), from `check_plans.py trace` (with and "
                  "without `--shortlist`) and `check_plans.py verdict`. A budget's windows are those after that "
                  "many steps.", "",
                  "| model | steps compared | identical steps | budget: full fold | budget: shortlist | date | note |",
                  "|---|---|---|---|---|---|---|"]
        for r in checks:
            full = "; ".join(f"{b}: {w}" for b, w in r["full_fold_windows"].items())
            short = "; ".join(f"{b}: {w}" for b, w in r["shortlist_windows"].items())
            lines.append(f"| {r['model']} | {r['steps_compared']} | {r['identical_steps']} | {full} | {short} | "
                         f"{r['date']} | {r['note']} |")
        lines.append("")
    grids = [r for r in rows if r["kind"] == "shortlist-sizes"]
    if grids:
        lines += ["## Which shortlist sizes follow the full fold", "",
                  "`check_plans.py sizes` replays full-fold traces (every pair scored at every step; "
                  "`traces/*-full.jsonl`, from `check_plans.py trace`) through each shortlist size of a grid: a size "
                  "follows a trace when, at every step, the best of the pairs it scores is the full fold's choice. "
                  "Layer runs: decoder-layer runs of the shortlisted pairs over the trace's steps.", ""]
        for r in grids:
            models = list(r["traces"])
            traced = ", ".join(f"{m} ({n} steps, {r['full_fold_layer_runs'][m]} layer runs scoring every pair)"
                               for m, n in r["traces"].items())
            lines += [f"Traces: {traced}; {r['following_count']} of {r['grid_size']} sizes follow every step of "
                      f"both. {r['note']} ({r['commit'][:12]}, {r['date']}).", "",
                      "| by last score | by influence | at the first step | follows | steps followed | layer runs |",
                      "|---|---|---|---|---|---|"]
            default = (r["default"]["by_score"], r["default"]["by_influence"], r["default"]["first_step"])
            shown = [*r["following"], *[g for g in r["also"] if g not in r["following"]]]
            for g in shown:
                size = (g["by_score"], g["by_influence"], g["first_step"])
                mark = " (the default)" if size == default else ""
                lines.append(f"| {g['by_score']}{mark} | {g['by_influence']} | {g['first_step']} | "
                             f"{'yes' if g['follows'] else 'no'} | "
                             + ", ".join(f"{g['steps_followed'][m]}" for m in models) + " | "
                             + ", ".join(f"{g['layer_runs'][m]}" for m in models) + " |")
            lines += ["", f"    {r['command']}", ""]
    REPORT.write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("cpu", "child"):
        p = sub.add_parser(name)
        p.add_argument("--ratio", type=float, default=0.2)
        p.add_argument("--device", default="cpu")
        p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
        p.add_argument("--options", default="", help="method options as JSON")
        p.add_argument("--save-plans", default="", help="write each run's plan.json into this folder")
        p.add_argument("--first-use", action="store_true",
                       help="each run with an empty layerfold cache (the model converted, the texts prepared)")
        p.add_argument("--ppl-windows", type=int, default=0,
                       help="windows of the perplexity check (0: layerfold prune's default)")
        if name == "cpu":
            p.add_argument("--runs", type=int, default=3)
            p.add_argument("--label", default="current")
            p.add_argument("--note", default="", help="what else was running on the machine")
            p.add_argument("--nice", type=int, default=0, help="run each repetition under nice -n N")
            p.add_argument("--commit", default="", help="the commit of a copy without git (git archive)")
    p = sub.add_parser("gpu")
    p.add_argument("--shape", default="7b")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.35])
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--label", default="current")
    p.add_argument("--note", default="")
    p.add_argument("--out", default="", help="results file (default: results.jsonl here)")
    p.add_argument("--commit", default="", help="the commit of a copy without git")
    sub.add_parser("report")
    args = parser.parse_args(argv)
    if args.mode == "child":
        child(args)
    elif args.mode == "cpu":
        cpu(args, argv)
    elif args.mode == "gpu":
        gpu(args, argv)
    else:
        write_report()


if __name__ == "__main__":
    main()
