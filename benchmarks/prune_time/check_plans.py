"""Same plans before and after the speed-up: the evidence that the fast default decides as before.

    python benchmarks/prune_time/check_plans.py plan --model smollm2 --ratio 0.2 --out a.json
    python benchmarks/prune_time/check_plans.py compare a.json b.json
    python benchmarks/prune_time/check_plans.py trace --model smollm2 --ratio 0.35 --out trace.jsonl

``plan`` makes the default ``slm`` plan (float32, CPU, the default calibration: 10 x 128 book
tokens, seed 1234) and writes what decides it: the windows, every channel factor as the plan
stores it (six decimals), the portfolio's candidates and scores, and the greedy fold's windows.
Run it with two versions of the package (``PYTHONPATH=<copy>/src``) and ``compare`` the files.

    python benchmarks/prune_time/check_plans.py sizes smollm2-trace.jsonl gemma-trace.jsonl --record

``trace`` runs the greedy fold scoring every candidate at every step and records, per step, each
candidate's exact score, its rank by the shortlist's proxy and the pair chosen: the margin by
which the shortlist contains the winner.  ``--model`` is ``smollm2`` (the embedded model) or
a model folder (e.g. Gemma-3-270M converted from its GGUF wheels, see /work/shared/ASSETS.md).
``sizes`` replays full-fold traces through every shortlist size of a grid and records which sizes
follow every step of every trace, and at what cost in decoder-layer runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path


def load(name: str):
    from layerfold import api

    return api.load_model(None if name == "smollm2" else name, dtype="float32", device="cpu")


def plan(args) -> None:
    from layerfold import api
    from layerfold.methods.base import Target

    loaded = load(args.model)
    start = time.perf_counter()
    result = api.make_plan(loaded, "slm", Target(ratio=args.ratio), progress=False)
    seconds = time.perf_counter() - start
    scores = result.plan.scores
    record = {"model": args.model, "ratio": args.ratio, "planning_seconds": round(seconds, 1),
              "windows": [list(w) for w in result.plan.windows()],
              "channel_scale": {f"{op.lo}-{op.hi}": op.detail.get("channel_scale") for op in result.plan.operations},
              "portfolio": scores.get("portfolio"), "portfolio_removed": scores.get("portfolio_removed"),
              "pick": scores.get("portfolio_pick")}
    Path(args.out).write_text(json.dumps(record))
    print(json.dumps({k: record[k] for k in ("model", "ratio", "planning_seconds", "windows", "pick")}))


def compare(args) -> None:
    a, b = (json.loads(Path(p).read_text()) for p in (args.a, args.b))
    same = {key: a[key] == b[key] for key in ("windows", "channel_scale", "portfolio_removed", "pick")}
    close = all(abs(a["portfolio"][k] - b["portfolio"][k]) <= 1e-9 for k in a["portfolio"]) if a["portfolio"] else True
    print(json.dumps({"same": same, "portfolio_scores_within_1e-9": close}))
    sys.exit(0 if all(same.values()) else 1)


def trace(args) -> None:
    from layerfold.calibrate import capture
    from layerfold.data.tokens import CalibrationConfig, sample_windows
    from layerfold.methods.base import Target
    from layerfold.methods.slm import SlmEngine, greedy_fold
    from layerfold.methods.slm.shortlist import segment_influence
    from layerfold.models.arch import layer_parameter_count

    loaded = load(args.model)
    calibration = CalibrationConfig()
    tokens = sample_windows(loaded.tokenizer, calibration)
    layers = loaded.arch.layer_list(loaded.model)
    budget = Target(ratio=args.ratio).layers_to_remove(loaded.model, len(layers), layer_parameter_count(layers[0]))
    cache = capture(loaded.model, loaded.arch, tokens, batch_size=calibration.batch_size, progress=False)
    engine = SlmEngine(cache, "output-cosine", "base", "base")
    rows = []

    def observe(step) -> None:
        proxy = segment_influence(step.entering)
        order = sorted(step.scores, key=lambda k: -step.scores[k])
        by_proxy = sorted(range(len(proxy)), key=lambda k: proxy[k])
        rows.append({"segments": step.segments, "scored": sorted(step.scores),
                     "scores": [step.scores[k] for k in sorted(step.scores)],
                     "sample_cosines": [step.sample_cosines[k] for k in sorted(step.scores)],
                     "influence": proxy, "chosen": step.chosen, "rank_by_influence": by_proxy.index(step.chosen),
                     "runner_up_gap": step.scores[order[0]] - step.scores[order[1]] if len(order) > 1 else None})
        window = (step.segments[step.chosen][0], step.segments[step.chosen + 1][1])
        print(f"step {len(rows)}: chose pair {step.chosen}, window {window}, rank by influence "
              f"{rows[-1]['rank_by_influence']}, {time.perf_counter() - start:.0f} s", flush=True)
        with Path(args.out).open("a") as fh:  # step by step: a run cut short keeps its steps
            fh.write(json.dumps({"kind": "step", "model": args.model, "shortlist": args.shortlist,
                                 "step": len(rows), **rows[-1]}) + "\n")

    start = time.perf_counter()
    shortlist = None
    if args.shortlist:
        from layerfold.methods.slm.shortlist import Shortlist

        shortlist = Shortlist()
    run = greedy_fold(engine, budget, progress=False, pairs=shortlist, observe=observe)
    record = {"kind": "trace", "model": args.model, "ratio": args.ratio, "budget": budget,
              "shortlist": args.shortlist, "windows": [list(w) for w in run.windows],
              "seconds": round(time.perf_counter() - start, 1), "evaluated": engine.evaluated}
    with Path(args.out).open("a") as fh:
        fh.write(json.dumps(record) + "\n")
    print(json.dumps(record))


def chosen_pairs(path: str, model: str, shortlist: bool) -> list[int]:
    """The pair each step chose, from a trace's step rows (``--out`` of ``trace``) or its printed log."""
    text = Path(path).read_text()
    if path.endswith(".jsonl"):
        rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        return [r["chosen"] for r in rows if r["kind"] == "step" and r["model"] == model
                and bool(r["shortlist"]) == shortlist]
    return [int(line.split("chose ")[1].split()[0].removeprefix("pair")) if "chose pair" not in line
            else int(line.split("chose pair ")[1].split(",")[0]) for line in text.splitlines()
            if line.startswith("step ")]


def windows_after(pairs: list[int], num_layers: int) -> list[list[list[int]]]:
    """The fold's windows after each step, from the pair each step chose."""
    segments = [(i, i) for i in range(num_layers)]
    out = []
    for k in pairs:
        segments[k:k + 2] = [(segments[k][0], segments[k + 1][1])]
        out.append([list(seg) for seg in segments if seg[1] > seg[0]])
    return out


def append_row(row: dict) -> None:
    """Append ``row`` (with run.py's provenance, its command named as this script) to results.jsonl."""
    row["command"] = row["command"].replace("run.py", "check_plans.py")
    with (Path(__file__).parent / "results.jsonl").open("a") as fh:
        fh.write(json.dumps(row) + "\n")


def verdict(args) -> None:
    """Compare the full fold's steps with the shortlist's; append the comparison to results.jsonl
    (with the command, commit, date and machine, as run.py's rows)."""
    sys.path.insert(0, str(Path(__file__).parent))
    from run import cpu_machine, provenance

    exact = windows_after(chosen_pairs(args.exact, args.model, False), args.layers)
    short = windows_after(chosen_pairs(args.short, args.model, True), args.layers)
    steps = min(len(exact), len(short))
    same = [exact[i] == short[i] for i in range(steps)]
    row = {"kind": "greedy-check", "model": args.model, "layers": args.layers, "budgets": args.budgets,
           "steps_compared": steps, "identical_steps": sum(same), "identical": all(same),
           "full_fold_windows": {str(b): exact[b - 1] for b in args.budgets if b <= len(exact)},
           "shortlist_windows": {str(b): short[b - 1] for b in args.budgets if b <= len(short)},
           **provenance(sys.argv[1:]), "machine": cpu_machine(), "note": args.note}
    append_row(row)
    print(json.dumps(row))


def follow(rows: list[dict], shortlist) -> tuple[int, int]:
    """Replay a full fold's trace (``rows``, every pair scored at every step) through ``shortlist``:
    the steps at which its best shortlisted pair is the full fold's choice before it first is not,
    and the decoder-layer runs it spends on them (a pair runs the segments above the one it removes).
    Exact while the paths agree: a shortlisted pair's score is the one the full fold gave it."""
    last: dict = {}
    formed = None
    runs = 0
    for step, row in enumerate(rows):
        segments = [tuple(seg) for seg in row["segments"]]
        scores = dict(zip(row["scored"], row["scores"], strict=True))
        chosen = shortlist.choose(segments, row["influence"], last, formed)
        runs += sum(len(segments) - (k + 2) for k in chosen)
        best = max(chosen, key=lambda k: scores[k])  # ties: the lowest, as the fold does
        if best != row["chosen"]:
            return step, runs
        last.update({(segments[k], segments[k + 1]): scores[k] for k in chosen})
        formed = (segments[best][0], segments[best + 1][1])
    return len(rows), runs


def sizes(args) -> None:
    """Every shortlist size of a grid replayed on full-fold traces: the sizes that follow every step of
    every trace, cheapest first, with their layer runs per trace and budget; one row to results.jsonl."""
    import itertools

    from layerfold.methods.slm.shortlist import Shortlist

    sys.path.insert(0, str(Path(__file__).parent))
    from run import cpu_machine, provenance

    traces = {}
    for path in args.traces:
        rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
        steps = [r for r in rows if r["kind"] == "step" and not r["shortlist"]]
        traces[steps[0]["model"]] = steps
    full = {m: sum(len(r["segments"]) - (k + 2) for r in steps for k in r["scored"]) for m, steps in traces.items()}
    grid = []
    for by_score, by_influence, first_step in itertools.product(range(5), range(4), range(2, 16)):
        shortlist = Shortlist(by_score, by_influence, first_step)
        outcome = {m: follow(steps, shortlist) for m, steps in traces.items()}
        grid.append({"by_score": by_score, "by_influence": by_influence, "first_step": first_step,
                     "follows": all(done == len(traces[m]) for m, (done, _) in outcome.items()),
                     "steps_followed": {m: done for m, (done, _) in outcome.items()},
                     "layer_runs": {m: runs for m, (_, runs) in outcome.items()}})
    following = sorted((g for g in grid if g["follows"]), key=lambda g: sum(g["layer_runs"].values()))
    default = Shortlist()
    mine = next(g for g in grid if (g["by_score"], g["by_influence"], g["first_step"])
                == (default.by_score, default.by_influence, default.first_step))
    row = {"kind": "shortlist-sizes", "traces": {m: len(steps) for m, steps in traces.items()},
           "full_fold_layer_runs": full, "grid_size": len(grid), "following": following[:8],
           "following_count": len(following), "default": mine,
           "also": [g for g in grid if f"{g['by_score']},{g['by_influence']},{g['first_step']}" in args.also],
           **provenance(sys.argv[1:]), "machine": cpu_machine(),
           "note": args.note}
    if args.record:
        append_row(row)
    print(json.dumps({k: row[k] for k in ("traces", "full_fold_layer_runs", "following_count", "default")}))
    for g in following[:8]:
        print(g["by_score"], g["by_influence"], g["first_step"], g["layer_runs"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    for name in ("plan", "trace"):
        p = sub.add_parser(name)
        p.add_argument("--model", default="smollm2")
        p.add_argument("--ratio", type=float, default=0.2)
        p.add_argument("--out", required=True)
        if name == "trace":
            p.add_argument("--shortlist", action="store_true", help="Shortlist()'s pairs (else every pair)")
    p = sub.add_parser("verdict")
    p.add_argument("--model", required=True)
    p.add_argument("--layers", type=int, required=True)
    p.add_argument("--budgets", type=int, nargs="+", required=True)
    p.add_argument("--exact", required=True, help="the full fold's trace (step rows or printed log)")
    p.add_argument("--short", required=True, help="the shortlist fold's trace")
    p.add_argument("--note", default="")
    p = sub.add_parser("sizes")
    p.add_argument("traces", nargs="+", help="full-fold traces (trace's --out, without --shortlist)")
    p.add_argument("--note", default="")
    p.add_argument("--record", action="store_true", help="append the outcome to results.jsonl")
    p.add_argument("--also", nargs="*", default=[], metavar="S,I,F",
                   help="sizes (by_score,by_influence,first_step) whose outcome the row also keeps")
    p = sub.add_parser("compare")
    p.add_argument("a")
    p.add_argument("b")
    args = parser.parse_args()
    {"plan": plan, "compare": compare, "trace": trace, "verdict": verdict, "sizes": sizes}[args.mode](args)


if __name__ == "__main__":
    main()
