"""Same plans before and after the speed-up: the evidence that the fast default decides as before.

    python benchmarks/prune_time/check_plans.py plan --model smollm2 --ratio 0.2 --out a.json
    python benchmarks/prune_time/check_plans.py compare a.json b.json
    python benchmarks/prune_time/check_plans.py trace --model smollm2 --ratio 0.35 --out trace.jsonl

``plan`` makes the default ``slm`` plan (float32, CPU, the default calibration: 10 x 128 book
tokens, seed 1234) and writes what decides it: the windows, every channel factor as the plan
stores it (six decimals), the portfolio's candidates and scores, and the greedy fold's windows.
Run it with two versions of the package (``PYTHONPATH=<copy>/src``) and ``compare`` the files.

``trace`` runs the greedy fold scoring every candidate at every step and records, per step, each
candidate's exact score, its rank by the shortlist's proxy and the pair chosen: the margin by
which the shortlist contains the winner.  ``--model`` is ``smollm2`` (the embedded model) or
a model folder (e.g. Gemma-3-270M converted from its GGUF wheels, see /work/shared/ASSETS.md).
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


def influence(entering, k: int) -> float:
    """Block influence of segment ``k + 1`` in the current folded model: 1 - mean token cosine of
    the state entering it and the state leaving it."""
    import torch

    a = torch.cat([h.double() for h in entering[k + 1]]).flatten(0, -2)
    b = torch.cat([h.double() for h in entering[k + 2]]).flatten(0, -2)
    return float(1 - torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def trace(args) -> None:
    from layerfold.calibrate import capture
    from layerfold.data.tokens import CalibrationConfig, sample_windows
    from layerfold.methods.base import Target
    from layerfold.methods.slm import SlmEngine, greedy_fold
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
        proxy = [influence(step.entering, k) for k in range(len(step.segments) - 1)]
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
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
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
    row["command"] = row["command"].replace("run.py", "check_plans.py")
    with (Path(__file__).parent / "results.jsonl").open("a") as fh:
        fh.write(json.dumps(row) + "\n")
    print(json.dumps(row))


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
    p = sub.add_parser("compare")
    p.add_argument("a")
    p.add_argument("b")
    args = parser.parse_args()
    {"plan": plan, "compare": compare, "trace": trace, "verdict": verdict}[args.mode](args)


if __name__ == "__main__":
    main()
