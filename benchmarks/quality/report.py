"""Turn the JSON lines written by benchmarks/quality.py into tables, a JSON summary, a plot and
the validation ranking that picks layerfold's default.

    python benchmarks/report_quality.py --model SmolLM2-135M=benchmarks/results/quality_smol \\
        --model "Gemma-3-270M (H200)=benchmarks/results/quality_gemma/session3_gpu_*.jsonl" \\
        --model "Gemma-3-270M (CPU)=benchmarks/results/quality_gemma/session*_cpu*.jsonl" \\
        --rank "SmolLM2-135M,Gemma-3-270M (CPU)" --rank "SmolLM2-135M,Gemma-3-270M (H200)" \\
        --fullsets "benchmarks/results/quality_smol_fullsets*.jsonl"

Each ``--model LABEL=PATH`` names a folder of ``*.jsonl``, one file or a glob pattern; rows of the
same configuration and ratio are merged (perplexity phase + zero-shot phase; later files win). A
label may be given several times (its sources merge in order), and ``LABEL=PATH|OLD>NEW`` renames
configuration OLD to NEW in that source (``|A>B,C>D``: several at once). ``--same-plan
LABEL:CONFIG@RATIO=OTHER`` shows, for a configuration whose plan was checked to equal OTHER's
(same removed layers, same fused layers), OTHER's measured figures, marked as such in the table.
Prints markdown (one table per model and ratio, one validation ranking per ``--rank`` list of
labels, default all of them, then the ``--fullsets`` zero-shot table) and writes quality.json and
quality.png into ``--out``.
"""

from __future__ import annotations

import argparse
import glob
import json
import math
from pathlib import Path

TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
PPL = ["ppl/wikitext2@128", "ppl/ptb@128", "ppl/lambada@128", "ppl/ptb-valid@128", "ppl/wikitext2@2048",
       "ppl/ptb@2048"]
PPL_HEAD = ["WikiText-2", "PTB", "LAMBADA", "PTB-valid", "WikiText-2 @2048", "PTB @2048"]
SELECTION = "ppl/ptb-valid@128"


def files_of(spec: str) -> list[Path]:
    """A folder's ``*.jsonl``, one file, or the files a glob pattern matches (sorted)."""
    path = Path(spec)
    if any(c in spec for c in "*?["):
        files = sorted(Path(f) for f in glob.glob(spec))
    else:
        files = sorted(path.glob("*.jsonl")) if path.is_dir() else [path]
    if not files:
        raise SystemExit(f"no result files at {spec}")
    return files


def read_rows(spec: str) -> list[dict]:
    """The rows of the files at ``spec``; ``PATH|OLD>NEW`` renames configuration OLD to NEW in
    them (rows measured before a default changed keep their meaning), ``PATH|A>B,C>D`` several at
    once (each row renamed at most once, so two names can swap)."""
    path, _, renames = spec.partition("|")
    mapping = dict(pair.split(">", 1) for pair in renames.split(",")) if renames else {}
    rows = []
    for file in files_of(path):
        for line in file.read_text().splitlines():
            row = json.loads(line)
            if "config" not in row:
                continue
            row["config"] = mapping.get(row["config"], row["config"])
            rows.append(row)
    return rows


def read_sources(spec: str) -> list[dict]:
    """The rows of several :func:`read_rows` specs joined by ``;`` (each with its own renames), in order."""
    return [row for part in spec.split(";") for row in read_rows(part)]


def load(spec: str, rows: dict[tuple[str, float], dict] | None = None) -> dict[tuple[str, float], dict]:
    """Rows of ``spec`` (see :func:`read_rows`) merged by configuration and ratio into ``rows``."""
    rows = {} if rows is None else rows
    for row in read_rows(spec):
        merged = rows.setdefault((row["config"], row["ratio"]), {})
        merged.update({k: v for k, v in row.items() if v is not None})
    return rows


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if value >= 1e5:
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def pct(row: dict, key: str) -> str:
    return fmt(100 * row[key]) if row.get(key) is not None else "-"


def table(rows: dict, ratio: float, default: str) -> str:
    head = ("| method | layers | prune s | " + " | ".join(PPL_HEAD) + " | 7-task avg | avg w/o BoolQ | "
            + " | ".join(TASKS) + " |")
    lines = [head, "|" + "---|" * (5 + len(PPL) + len(TASKS))]
    dense = rows.get(("dense", 0.0))
    chosen = [(k, r) for k, r in rows.items() if k[1] == ratio]
    chosen.sort(key=lambda kr: kr[1].get(SELECTION) or float("inf"))
    for (name, _), r in ([(("dense", 0.0), dense)] if dense else []) + chosen:
        zs = r.get("zeroshot", {})
        label = f"**{name}** (default)" if name == default else name
        if r.get("same_plan_as"):
            label += f" = {r['same_plan_as']} (same plan)"
        cells = [label, str(r.get("layers", "-")), fmt(r.get("prune_seconds"), 2)]
        cells += [fmt(r.get(k)) for k in PPL]
        cells += [pct(r, "zs/mean"), pct(r, "zs/mean_without_boolq")]
        cells += [fmt(100 * zs[t]) if t in zs else "-" for t in TASKS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def fullsets_table(spec: str) -> str:
    """Zero-shot rows measured on the full task sets (every document), one per configuration and
    ratio (rows of the same one merged, later sources win), with the number of documents checked."""
    merged: dict[tuple[str, float], dict] = {}
    for r in read_sources(spec):
        if r.get("zeroshot"):
            merged.setdefault((r["config"], r["ratio"]), {}).update({k: v for k, v in r.items() if v is not None})
    rows = list(merged.values())
    lines = ["| method | ratio | layers | 7-task avg | avg w/o BoolQ | WikiText-2 @2048 | PTB @2048 | "
             + " | ".join(TASKS) + " |", "|" + "---|" * (7 + len(TASKS))]
    for r in sorted(rows, key=lambda r: (r["ratio"], -(r.get("zs/mean") or 0))):
        zs = r["zeroshot"]
        lines.append("| " + " | ".join([r["config"], str(r["ratio"]), str(r.get("layers", "-")), pct(r, "zs/mean"),
                                        pct(r, "zs/mean_without_boolq"), fmt(r.get("ppl/wikitext2@2048")),
                                        fmt(r.get("ppl/ptb@2048"))]
                                       + [fmt(100 * zs[t]) if t in zs else "-" for t in TASKS]) + " |")
    samples = {tuple(sorted(r["zeroshot_samples"].items())) for r in rows
               if isinstance(r.get("zeroshot_samples"), dict)}
    docs = " / ".join(str(dict(next(iter(samples)))[t]) for t in TASKS) if len(samples) == 1 else "mixed counts"
    return f"Documents per task ({', '.join(TASKS)}): {docs}.\n\n" + "\n".join(lines)


def ranking(models: dict[str, dict]) -> list[tuple[float, str, list]]:
    """Geometric mean of PTB-valid over every (model, ratio) measured; configurations missing
    one are left out."""
    cases = sorted({(m, k[1]) for m, rows in models.items() for k in rows if k[1] > 0})
    names = {k[0] for rows in models.values() for k in rows if k[1] > 0}
    ranked = []
    for name in names:
        values = [models[m].get((name, ratio), {}).get(SELECTION) for m, ratio in cases]
        if all(v for v in values):
            ranked.append((math.exp(sum(math.log(v) for v in values) / len(values)), name, values))
    return sorted(ranked), cases


def implied_depth(rows: dict[tuple[str, float], dict]) -> int:
    """The model's depth when no unpruned row gives it: the smallest one from which every row's ratio
    leaves its layer count (a ratio removes ``round(ratio * depth)`` layers, as ``Target``)."""
    pruned = [(ratio, r["layers"]) for (_, ratio), r in rows.items() if ratio > 0 and r.get("layers")]
    if not pruned:
        return 0
    depth = max(layers for _, layers in pruned) + 1
    while any(depth - round(ratio * depth) != layers for ratio, layers in pruned):
        depth += 1
        if depth > 10 * max(layers for _, layers in pruned):
            raise ValueError(f"no depth leaves these layer counts at these ratios: {sorted(set(pruned))}")
    return depth


def plot(models: dict[str, dict], out: Path, default: str = "slm") -> None:
    """Perplexity and zero-shot mean against layers removed, per model; ``default`` (and its healed rows,
    ``DEFAULT+lora``) drawn thick and red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(models), 2, figsize=(13, 4.5 * len(models)), squeeze=False)
    for (label, rows), (ax1, ax2) in zip(models.items(), axes, strict=True):
        base = ("dense", 0.0) if ("dense", 0.0) in rows else next((k for k in rows if k[1] == 0.0), None)
        dense = rows.get(base, {})
        total = dense.get("layers") or implied_depth(rows)
        by_method: dict[str, list] = {}
        for key, r in rows.items():
            name = key[0]
            if key != base and r.get("layers"):
                by_method.setdefault(name, []).append((total - r["layers"], r))
        for name, points in sorted(by_method.items()):
            points.sort(key=lambda p: p[0])
            main = "/" not in name
            marked = name in (default, f"{default}+lora")
            width = 3 if marked else 1
            style = {"color": "red", "zorder": 5} if marked else {}
            xs = [0] + [p[0] for p in points]
            ppl = [dense.get("ppl/ptb@128")] + [p[1].get("ppl/ptb@128") for p in points]
            ax1.plot(xs, ppl, "-o" if main else ":.", label=name, linewidth=width, **style)
            zs = [(0, dense.get("zs/mean"))] + [(p[0], p[1].get("zs/mean")) for p in points]
            zs = [(x, 100 * y) for x, y in zs if y is not None]
            if len(zs) > 1:
                ax2.plot(*zip(*zs, strict=True), "-o" if main else ":.", label=name, linewidth=width, **style)
        if not ax2.lines:
            ax2.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax2.transAxes)
        ax1.set_yscale("log")
        ax1.set_title(f"{label}: PTB test perplexity (128 tokens, log)")
        ax2.set_title(f"{label}: 7-task zero-shot mean, %")
        for ax in (ax1, ax2):
            ax.set_xlabel(f"decoder layers removed (of {total})")
        ax1.legend(fontsize=6, ncol=2)
        if ax2.lines:
            ax2.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", action="append", required=True, help="LABEL=PATH (folder of .jsonl or a file)")
    parser.add_argument("--default", default="slm", help="the configuration marked as layerfold's default")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--rank", action="append", default=[],
                        help="comma list of model labels for one validation ranking (repeatable; default: all)")
    parser.add_argument("--same-plan", action="append", default=[], metavar="LABEL:CONFIG@RATIO=OTHER",
                        help="CONFIG builds the same model as OTHER there (checked apart): show OTHER's figures")
    parser.add_argument("--fullsets", action="append", default=[],
                        help="zero-shot rows on the full task sets: [LABEL=]sources as --model's PATH, "
                             "';'-separated (LABEL defaults to SmolLM2-135M); once per model")
    args = parser.parse_args()
    models = {}
    for spec in args.model:  # a label given twice merges its sources, later ones winning
        label, _, path = spec.partition("=")
        models[label] = load(path, models.get(label))
    for spec in args.same_plan:
        label, _, rest = spec.partition(":")
        target, _, other = rest.partition("=")
        config, _, ratio = target.partition("@")
        source = models.get(label, {}).get((other, float(ratio)))
        if source is None:
            parser.error(f"--same-plan {spec}: no row {other} at {ratio} for {label}")
        # the figures are the model's; the pruning time was OTHER's, not this configuration's
        models[label][(config, float(ratio))] = {**{k: v for k, v in source.items() if k != "prune_seconds"},
                                                 "config": config, "same_plan_as": other}
    for labels in args.rank:
        unknown = [name for name in labels.split(",") if name not in models]
        if unknown:
            parser.error(f"--rank names unknown labels {unknown}; known: {list(models)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps(
        {label: [{"config": k[0], "ratio": k[1], **v} for k, v in sorted(rows.items())]
         for label, rows in models.items()}, indent=1) + "\n")
    plot(models, out / "quality.png", args.default)
    for label, rows in models.items():
        for ratio in sorted({k[1] for k in rows if k[1] > 0}):
            print(f"\n### {label}, {int(round(ratio * 100))}% of decoder layers removed\n")
            print(table(rows, ratio, args.default))
    for labels in args.rank or [",".join(models)]:
        ranked, cases = ranking({name: models[name] for name in labels.split(",")})
        print("\n### Validation ranking (geometric mean of PTB-valid perplexity over "
              + ", ".join(f"{m} {int(round(r * 100))}%" for m, r in cases) + ")\n")
        print("| rank | configuration | geometric mean | "
              + " | ".join(f"{m} {int(round(r * 100))}%" for m, r in cases) + " |")
        print("|" + "---|" * (3 + len(cases)))
        for i, (g, name, values) in enumerate(ranked, 1):
            print(f"| {i} | {name} | {fmt(g)} | " + " | ".join(fmt(v) for v in values) + " |")
    for spec in args.fullsets:
        label, _, sources = spec.partition("=") if "=" in spec.split("|")[0] else ("", "", spec)
        print(f"\n### Zero-shot on the full task sets ({label or 'SmolLM2-135M'})\n")
        print(fullsets_table(sources))


if __name__ == "__main__":
    main()
