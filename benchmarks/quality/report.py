"""RESULTS.md of the quality benchmark, generated from results.jsonl: one table per model, machine and
ratio, the validation rankings that chose the default, the zero-shot tables on the full task sets and
after healing, and the paired comparisons of per-document zero-shot outcomes (paired.py).

    python benchmarks/quality/report.py            # writes benchmarks/quality/RESULTS.md and quality.png

Rows of the same configuration and ratio within one table are merged (the perplexity phase and the
zero-shot phase; later rows win). A row that names another configuration's plan (``same_plan_as``: its
plan was checked to equal that one's) shows that configuration's figures, marked as such. The helpers
also read rows written by run.py before they are folded into results.jsonl: ``PATH`` is a folder of
``*.jsonl``, one file or a glob; ``PATH|OLD>NEW`` renames configuration OLD to NEW (``|A>B,C>D``: several
at once); ``PATH@key=value,...`` keeps the rows whose fields have those values (``@table=full-sets``).
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
# configurations whose name needs a word in the tables: the default's greedy fold scores a shortlist of pairs
# (pairs=shortlist) since commit 203d4c6, with sizes that give the plans of scoring every pair (pairs=all, what
# rows named slm measured before it) in every cell; slm/shortlist ran its first sizes, which did not at SmolLM2 35%
NOTES = {"slm/shortlist": "shortlist sizes 3/3/6, the default's first; not kept", "slm/all-pairs": "pairs=all"}


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
    """The rows of the files at ``spec``; ``PATH@key=value,...`` keeps the rows with those values;
    ``PATH|OLD>NEW`` renames configuration OLD to NEW in
    them (rows measured before a default changed keep their meaning), ``PATH|A>B,C>D`` several at
    once (each row renamed at most once, so two names can swap)."""
    spec, _, where = spec.partition("@")
    path, _, renames = spec.partition("|")
    wanted = dict(pair.split("=", 1) for pair in where.split(",")) if where else {}
    mapping = dict(pair.split(">", 1) for pair in renames.split(",")) if renames else {}
    rows = []
    for file in files_of(path):
        for line in file.read_text().splitlines():
            row = json.loads(line)
            if "config" not in row or any(str(row.get(k)) != v for k, v in wanted.items()):
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
        if name in NOTES:
            label += f" ({NOTES[name]})"
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


HERE = Path(__file__).resolve().parent
SMOL, GEMMA, H200, CPU = "SmolLM2-135M", "Gemma-3-270M", "H200 GPU", "2-core CPU"
# label -> the rows of results.jsonl it shows
TABLES = {
    f"{SMOL} (H200)": {"model": SMOL, "machine": H200, "table": "subsets"},
    f"{GEMMA} (H200)": {"model": GEMMA, "machine": H200, "table": "subsets"},
    f"{GEMMA} (CPU, first 30 windows of each text)": {"model": GEMMA, "machine": CPU, "table": "subsets"},
    f"{SMOL}, healed (H200)": {"model": SMOL, "machine": H200, "table": "healed"},
    f"{GEMMA}, healed (H200)": {"model": GEMMA, "machine": H200, "table": "healed"},
}
RANKINGS = [(f"{SMOL} (H200)", f"{GEMMA} (H200)"), (f"{SMOL} (H200)", f"{GEMMA} (CPU, first 30 windows of each text)")]
FULL_SETS = {f"{model} (H200)": {"model": model, "machine": H200, "table": "full-sets"} for model in (SMOL, GEMMA)}
# paired comparisons (paired.py): title, tables of rows, its options
PAIRED = [
    ("Zero-shot validation tasks (the tie-break of the default's rule), paired against the default", "validation-tasks",
     ["--key", "heldout", "--rank", "--per-task"]),
    ("The seven reported tasks on the full task sets, paired against the default", "full-sets", ["--key", "zeroshot"]),
    ("The seven tasks after healing every plan alike (LoRA, `layerfold heal`'s recipe), paired against the healed "
     "default", "healed", ["--key", "zeroshot", "--against", "slm+lora", "--rank", "--per-task"]),
]


def spec_of(results: Path, where: dict[str, str]) -> str:
    """A :func:`read_rows` spec for the rows of ``results`` with the values of ``where``."""
    return f"{results}@" + ",".join(f"{k}={v}" for k, v in where.items())


def with_same_plans(rows: dict[tuple[str, float], dict]) -> dict[tuple[str, float], dict]:
    """Rows that only name another configuration's plan (``same_plan_as``) take that row's figures, not
    its pruning time (followed along chains)."""
    for key, row in rows.items():
        other = row.get("same_plan_as")
        seen = {key[0]}
        while other and (other, key[1]) in rows and other not in seen and rows[(other, key[1])].get("same_plan_as"):
            seen.add(other)
            other = rows[(other, key[1])]["same_plan_as"]
        source = rows.get((other, key[1])) if other else None
        if source:  # what the row did not measure itself
            row.update({k: v for k, v in source.items()
                        if k not in row and k not in ("prune_seconds", "config", "same_plan_as")})
            row["same_plan_as"] = other
    return rows


def provenance(results: Path) -> str:
    """Which commits, dates and machines made the rows of each table."""
    seen: dict[tuple, int] = {}
    for line in results.read_text().splitlines():
        r = json.loads(line)
        key = (r["model"], r["table"], r["machine"], r["commit"], r["date"])
        seen[key] = seen.get(key, 0) + 1
    lines = ["| model | table | machine | commit | date | rows |", "|---|---|---|---|---|---|"]
    lines += [f"| {' | '.join(k)} | {n} |" for k, n in sorted(seen.items())]
    return "\n".join(lines)


def paired_section(results: Path, table_name: str, options: list[str]) -> str:
    """The output of paired.py for ``table_name``'s H200 rows of both models."""
    import contextlib
    import io
    import sys

    sys.path.insert(0, str(HERE.parent))
    from quality import paired

    argv = [*options]
    for model in (SMOL, GEMMA):
        argv += ["--rows", f"{model}=" + spec_of(results, {"model": model, "machine": H200, "table": table_name})]
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        paired.run(paired.parse(argv))
    return buffer.getvalue().strip()


def render(results: Path, out: Path, default: str = "slm", plot_to: Path | None = None) -> str:
    """RESULTS.md's text for ``results``; the plot goes to ``plot_to`` when given."""
    models = {label: with_same_plans(load(spec_of(results, where))) for label, where in TABLES.items()}
    parts = [
        "# Quality benchmark: results",
        "",
        f"Generated by `python benchmarks/quality/report.py` from `{results.name}`; do not edit by hand. The "
        "protocol, the rule that chose the default and the commands are in README.md beside this file. "
        "Perplexities are fixed-length token perplexities (128 tokens unless marked @2048); zero-shot figures "
        "are accuracies in percent; rows are sorted by PTB-valid, the validation text the default was chosen on.",
    ]
    for label, rows in models.items():
        for ratio in sorted({k[1] for k in rows if k[1] > 0}):
            parts += ["", f"## {label}, {int(round(ratio * 100))}% of decoder layers removed", "",
                      table(rows, ratio, default)]
    for labels in RANKINGS:
        ranked, cases = ranking({name: models[name] for name in labels})
        names = [f"{m} {int(round(r * 100))}%" for m, r in cases]
        parts += ["", "## Validation ranking (geometric mean of PTB-valid perplexity over " + ", ".join(names) + ")",
                  "", "| rank | configuration | geometric mean | " + " | ".join(names) + " |",
                  "|" + "---|" * (3 + len(cases))]
        parts += [f"| {i} | {name} | {fmt(g)} | " + " | ".join(fmt(v) for v in values) + " |"
                  for i, (g, name, values) in enumerate(ranked, 1)]
    for label, where in FULL_SETS.items():
        parts += ["", f"## Zero-shot on the full task sets: {label}", "", fullsets_table(spec_of(results, where))]
    for title, table_name, options in PAIRED:
        parts += ["", f"## {title}", "", paired_section(results, table_name, options)]
    parts += ["", "## Where the rows come from", "", provenance(results)]
    if plot_to is not None:
        plot(models, plot_to, default)
        parts += ["", f"![perplexity and zero-shot against layers removed]({plot_to.name})"]
    return "\n".join(parts) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--results", type=Path, default=HERE / "results.jsonl")
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    parser.add_argument("--default", default="slm", help="the configuration marked as layerfold's default")
    parser.add_argument("--no-plot", action="store_true", help="skip quality.png (needs matplotlib)")
    args = parser.parse_args()
    plot_to = None if args.no_plot else args.out.with_name("quality.png")
    args.out.write_text(render(args.results, args.out, args.default, plot_to))
    print(f"wrote {args.out}" + (f" and {plot_to}" if plot_to else ""))


if __name__ == "__main__":
    main()
