"""Paired comparisons of zero-shot results: is one pruned model's lead over another more than noise?

Two models scored on the same documents differ on fewer documents than two independent samples
would, so their difference is measured far more tightly than each figure's own standard error
suggests.  This reads rows written by ``benchmarks/quality/run.py --zs-docs`` (per-document outcomes)
and, for each model, ratio and pair of configurations, reports the difference of the means with a
95% paired bootstrap interval: documents are resampled within each task, the same documents for
both configurations, and the task means recomputed (the mean over tasks weights tasks equally, as
the papers' average does).

    R=benchmarks/quality/results.jsonl
    python benchmarks/quality/paired.py --key zeroshot --against slm \\
        --rows "SmolLM2-135M=$R@model=SmolLM2-135M,machine=H200 GPU,table=full-sets"

``PATH`` takes quality/report.py's forms (a file, folder or glob; ``@key=value,...`` filters; ``|OLD>NEW``
renames), several joined by ``;``.
``--key heldout`` compares the zero-shot validation tasks instead (``--zs-tasks heldout``),
``--per-task`` adds each configuration's accuracy per task, and ``--rank`` prints the mean per
configuration over every model and ratio given.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from quality.report import read_sources  # noqa: E402


def read(spec: str) -> tuple[str, list[dict]]:
    """``LABEL=PATH`` (``quality.report.read_rows``: a folder, file or glob, ``@key=value`` filters,
    ``|OLD>NEW`` renames; several such paths joined by ``;``) -> the label and its rows with
    per-document outcomes, a row that ``quality/run.py --zs-unique`` skipped (``same_plan_as``) taking
    the outcomes of the configuration that scored its plan."""
    label, _, rest = spec.partition("=")
    return label, same_plan_rows(read_sources(rest))


def same_plan_rows(rows: list[dict]) -> list[dict]:
    """The rows with per-document outcomes, plus each skipped row (``same_plan_as``) filled with the
    outcomes of the row it names at its ratio (followed along chains); a name with no such row is left out."""
    scored = {(r["config"], r["ratio"]): r for r in rows if any(k.endswith("_docs") for k in r)}
    skipped = {(r["config"], r["ratio"]): r["same_plan_as"] for r in rows if r.get("same_plan_as")}
    out = list(scored.values())
    for (config, ratio), owner in skipped.items():
        seen = {config}
        while (owner, ratio) not in scored and (owner, ratio) in skipped and owner not in seen:
            seen.add(owner)
            owner = skipped[(owner, ratio)]
        if (owner, ratio) in scored and (config, ratio) not in scored:
            out.append({**scored[(owner, ratio)], "config": config, "same_plan_as": owner})
    return out


def outcomes(row: dict, key: str, tasks: list[str]) -> list[np.ndarray]:
    docs = row[f"{key}_docs"]
    return [np.frombuffer(docs[t].encode(), dtype=np.uint8) - ord("0") for t in tasks]


def paired(a: list[np.ndarray], b: list[np.ndarray], resamples: int, seed: int) -> tuple[float, float, float, float]:
    """Mean over tasks of (a - b), its 95% bootstrap interval, and the share of resamples <= 0."""
    rng = np.random.default_rng(seed)
    diffs = [x.astype(np.float64) - y for x, y in zip(a, b, strict=True)]
    total = np.zeros(resamples)
    for d in diffs:
        for lo in range(0, resamples, 100):  # chunks keep a 10k-document task's index matrix small
            hi = min(lo + 100, resamples)
            idx = rng.integers(0, len(d), size=(hi - lo, len(d)))
            total[lo:hi] += d[idx].mean(axis=1)
    total /= len(diffs)
    point = float(np.mean([d.mean() for d in diffs]))
    low, high = np.percentile(total, [2.5, 97.5])
    return point, float(low), float(high), float((total <= 0).mean())


def mean_accuracy(per_task: list[np.ndarray]) -> float:
    """The plain mean over tasks of each task's accuracy (tasks weigh alike)."""
    return float(np.mean([x.mean() for x in per_task]))


def compared(a: list[np.ndarray], b: list[np.ndarray], args) -> str:
    """Table cells of :func:`paired`: the difference in points with its interval, then P(<=0)."""
    point, low, high, p = paired(a, b, args.resamples, args.seed)
    return f"{100 * point:+.2f} [{100 * low:+.2f}, {100 * high:+.2f}] | {p:.3f}"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", action="append", required=True, help="LABEL=PATH of run.py --zs-docs rows")
    parser.add_argument("--key", choices=["zeroshot", "heldout"], default="zeroshot")
    parser.add_argument("--against", default="slm", help="the configuration every other is compared with")
    parser.add_argument("--resamples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--rank", action="store_true", help="also the mean per configuration over all models/ratios")
    parser.add_argument("--per-task", action="store_true", help="also each configuration's accuracy per task")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    """Print the comparisons ``args`` ask for (markdown)."""

    print(f"Paired bootstrap ({args.resamples} resamples, seed {args.seed}) of `{args.against}` minus each other "
          f"configuration on the `{args.key}` tasks, points of accuracy; `P(<=0)` is the share of resamples in "
          f"which `{args.against}` does not lead.\n")
    means: dict[str, list[list[np.ndarray]]] = {}  # configuration -> per cell, its outcomes per task
    pooled: dict[str, list[list[np.ndarray]]] = {}  # the reference's outcomes in the same cells
    for spec in args.rows:
        label, rows = read(spec)
        by = {(r["config"], r["ratio"]): r for r in rows if f"{args.key}_docs" in r}
        for ratio in sorted({r for _, r in by if r > 0}):
            if (args.against, ratio) not in by:
                print(f"{label} {ratio:.0%}: no `{args.against}` row with outcomes\n")
                continue
            ref = by[(args.against, ratio)]
            tasks = list(ref[f"{args.key}_docs"])
            others = [(c, r) for (c, r) in by if r in (ratio, 0.0) and c != args.against]
            if not others:
                print(f"{label} {ratio:.0%}: no other configuration with outcomes to compare with\n")
                continue
            subsets = {"all": tasks}
            if "boolq" in tasks:
                subsets["w/o BoolQ"] = [t for t in tasks if t != "boolq"]
            print(f"### {label}, {ratio:.0%} of layers removed ({args.key}: {', '.join(tasks)})\n")
            head = " | ".join(f"{s} diff [95% CI] | P(<=0)" for s in subsets)
            print(f"| other | {args.against} mean | other mean | {head} |")
            print("|---" * (3 + 2 * len(subsets)) + "|")
            for config, r in sorted(others, key=lambda k: k[1]):
                row = by[(config, r)]
                if list(row[f"{args.key}_docs"]) != tasks or any(
                        len(row[f"{args.key}_docs"][t]) != len(ref[f"{args.key}_docs"][t]) for t in tasks):
                    print(f"| {config} | (different tasks or documents: not compared) |")
                    continue
                cells = [compared(outcomes(ref, args.key, subset), outcomes(row, args.key, subset), args)
                         for subset in subsets.values()]
                ref_mean, other_mean = (mean_accuracy(outcomes(r, args.key, tasks)) for r in (ref, row))
                print(f"| {config} | {100 * ref_mean:.2f} | {100 * other_mean:.2f} | {' | '.join(cells)} |")
            print()
            if args.per_task:
                print(f"| configuration | mean | {' | '.join(tasks)} |\n" + "|---" * (2 + len(tasks)) + "|")
                same = [k for k in by if k[1] in (ratio, 0.0) and list(by[k][f"{args.key}_docs"]) == tasks]
                accs = {k: [100 * x.mean() for x in outcomes(by[k], args.key, tasks)] for k in same}  # per task
                for key in sorted(same, key=lambda k: -np.mean(accs[k])):
                    cells = " | ".join(f"{a:.1f}" for a in accs[key])
                    print(f"| {key[0]} | {np.mean(accs[key]):.2f} | {cells} |")
                print()
            for (config, r), row in by.items():
                if r == ratio and list(row[f"{args.key}_docs"]) == tasks:
                    means.setdefault(config, []).append(outcomes(row, args.key, tasks))
                    pooled.setdefault(config, []).append(outcomes(ref, args.key, tasks))
    if args.rank:
        cells = len(max(means.values(), key=len))
        print(f"### Mean `{args.key}` accuracy over every model and ratio given ({cells} cells)\n")
        print(f"Each cell's tasks weigh alike; `{args.against}` minus each, paired over the same cells.\n")
        print(f"| configuration | cells | mean | {args.against} minus it [95% CI] | P(<=0) |\n|---|---|---|---|---|")
        flat = {config: [x for g in groups for x in g] for config, groups in means.items()}
        for config in sorted(flat, key=lambda c: -mean_accuracy(flat[c])):
            flag = "" if len(means[config]) == cells else " (not in every cell)"
            diff = "- | -" if config == args.against else compared(
                [x for g in pooled[config] for x in g], flat[config], args)
            print(f"| {config} | {len(means[config])}{flag} | {100 * mean_accuracy(flat[config]):.2f} | {diff} |")


if __name__ == "__main__":
    run(parse())
