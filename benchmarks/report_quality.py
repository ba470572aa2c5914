"""Turn the JSON lines written by benchmarks/quality.py into quality.md tables and a plot.

    python benchmarks/report_quality.py benchmarks/results/quality_run1.jsonl benchmarks/results/quality_run2.jsonl
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

TASKS = ["boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa"]
PPL = ["ppl/wikitext2@128", "ppl/ptb@128", "ppl/lambada@128", "ppl/ptb-valid@128"]


def load(paths: list[str]) -> dict[tuple[str, float], dict]:
    rows: dict[tuple[str, float], dict] = {}
    for path in paths:
        for line in Path(path).read_text().splitlines():
            row = json.loads(line)
            if "config" not in row or row["config"] == "slm":
                # run 1 measured "slm" when its defaults were still the paper's (its rows equal
                # slm-paper's); the current default is the row slm/optimal+base
                continue
            merged = rows.setdefault((row["config"], row["ratio"]), {})
            merged.update({k: v for k, v in row.items() if v is not None})
    return rows


def fmt(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if value >= 1e5:
        return f"{value:.1e}"
    return f"{value:.{digits}f}"


def table(rows: dict, ratio: float) -> str:
    head = ("| method | layers | prune s | WikiText-2 | PTB | LAMBADA | PTB-valid | 7-task avg | avg w/o BoolQ | "
            + " | ".join(TASKS) + " |")
    lines = [head, "|" + "---|" * (9 + len(TASKS))]
    dense = rows.get(("dense", 0.0))
    chosen = [(k, r) for k, r in rows.items() if k[1] == ratio]
    chosen.sort(key=lambda kr: kr[1].get("ppl/ptb-valid@128", float("inf")))
    for (name, _), r in ([(("dense", 0.0), dense)] if dense else []) + chosen:
        zs = r.get("zeroshot", {})
        label = "**slm (default) = slm/greedy+base**" if name == "slm/greedy+base" else name
        cells = [label, str(r.get("layers", "-")), fmt(r.get("prune_seconds"), 2)]
        cells += [fmt(r.get(k)) for k in PPL]
        cells += [fmt(100 * r["zs/mean"]) if "zs/mean" in r else "-",
                  fmt(100 * r["zs/mean_without_boolq"]) if "zs/mean_without_boolq" in r else "-"]
        cells += [fmt(100 * zs[t]) if t in zs else "-" for t in TASKS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(rows: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    by_method: dict[str, list] = {}
    for (name, _ratio), r in rows.items():
        if name != "dense":
            by_method.setdefault(name, []).append((30 - r.get("layers", 30), r))
    dense = rows.get(("dense", 0.0), {})
    for name, points in sorted(by_method.items()):
        points.sort(key=lambda p: p[0])
        xs = [0] + [p[0] for p in points]
        ppl = [dense.get("ppl/ptb@128")] + [p[1].get("ppl/ptb@128") for p in points]
        style = "-o" if not name.startswith("slm/") and "/" not in name else ":."
        ax1.plot(xs, ppl, style, label=name, linewidth=2.5 if name == "slm" else 1)
        zs = [(0, dense.get("zs/mean"))] + [(p[0], p[1].get("zs/mean")) for p in points]
        zs = [(x, 100 * y) for x, y in zs if y is not None]
        if len(zs) > 1:
            ax2.plot(*zip(*zs, strict=True), "-o", label=name, linewidth=2.5 if name == "slm" else 1)
    ax1.set_yscale("log")
    ax1.set_xlabel("decoder layers removed (of 30)")
    ax1.set_ylabel("PTB test perplexity, 128 tokens (log)")
    ax2.set_xlabel("decoder layers removed (of 30)")
    ax2.set_ylabel("7-task zero-shot mean, % (300 docs/task)")
    ax1.legend(fontsize=6, ncol=2)
    ax2.legend(fontsize=7)
    fig.suptitle("SmolLM2-135M: depth pruning methods (benchmarks/results/quality.md)")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> None:
    rows = load(sys.argv[1:])
    out_dir = Path("benchmarks/results")
    (out_dir / "quality.json").write_text(json.dumps([{"config": k[0], "ratio": k[1], **v}
                                                     for k, v in sorted(rows.items())], indent=1) + "\n")
    plot(rows, out_dir / "quality.png")
    for ratio in sorted({k[1] for k in rows if k[1] > 0}):
        print(f"\n### {int(round(ratio * 100))}% of decoder layers removed\n")
        print(table(rows, ratio))


if __name__ == "__main__":
    main()
