"""RESULTS.md and recovery.png from results.jsonl (every figure in them is read from the rows).

    python benchmarks/recovery/report.py
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOALS = {"smollm2-0.2": 1.3, "smollm2-0.35": 2.0}  # healed WikiText-2 within this factor of dense (issue 23)
SOURCES = ("wikitext2", "ptb", "lambada")


def load(path: Path = HERE / "results.jsonl") -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _ppl(row: dict) -> str:
    return " | ".join(f"{row['perplexity'][s]:.1f}" if s in row["perplexity"] else "-" for s in SOURCES)


def _speed(value) -> str:
    return f"{value:,}" if value else "-"


def table(rows: list[dict]) -> str:
    dense = next(r for r in rows if r["kind"] == "dense")
    head = ("| plan | layers | healing | tokens | WikiText-2 | PTB | LAMBADA | WikiText-2 / dense | train tok/s | "
            "text written, tok/s (steady) |\n|---|---|---|---|---|---|---|---|---|---|")
    lines = [head, f"| dense | {dense['layers']} | - | - | {_ppl(dense)} | 1.00 | - | - |"]
    for plan in dict.fromkeys(r["plan"] for r in rows if r["kind"] != "dense"):
        group = [r for r in rows if r.get("plan") == plan]
        for r in sorted(group, key=lambda r: (r["kind"] != "pruned", r.get("budget") or 0, r.get("arm") or "")):
            ratio = r["perplexity"]["wikitext2"] / dense["perplexity"]["wikitext2"]
            written = (r.get("self_text") or {}).get("steady_tokens_per_second")
            what = "none" if r["kind"] == "pruned" else r["arm"]
            tokens = f"{r['tokens_trained']:,}" if r["kind"] == "healed" else "-"
            lines.append(f"| {plan} | {r['layers']} | {what} | {tokens} | {_ppl(r)} | {ratio:.2f} | "
                         f"{_speed(r.get('train_tokens_per_second'))} | {_speed(written)} |")
    return "\n".join(lines)


def goals(rows: list[dict]) -> str:
    dense = next(r for r in rows if r["kind"] == "dense")["perplexity"]["wikitext2"]
    out = []
    for plan, factor in GOALS.items():
        healed = [r for r in rows if r.get("plan") == plan and r["kind"] == "healed"]
        if not healed:
            continue
        best = min(healed, key=lambda r: r["perplexity"]["wikitext2"])
        ratio = best["perplexity"]["wikitext2"] / dense
        verdict = "reached" if ratio <= factor else "not reached"
        out.append(f"- {plan}: goal WikiText-2 within {factor}x dense ({factor * dense:.1f}); best healed "
                   f"{best['perplexity']['wikitext2']:.1f} = {ratio:.2f}x ({best['arm']}, {best['tokens_trained']:,} "
                   f"tokens): **{verdict}**.")
    return "\n".join(out)


def comparisons(rows: list[dict]) -> str:
    """layers-self against lora-books at each plan and budget where both ran."""
    by = {(r["plan"], r["budget"], r["arm"]): r for r in rows if r["kind"] == "healed"}
    out = []
    for (plan, budget, arm), r in sorted(by.items()):
        other = by.get((plan, budget, "lora-books"))
        if arm != "layers-self" or other is None:
            continue
        parts = ", ".join(f"{s} {r['perplexity'][s]:.1f} vs {other['perplexity'][s]:.1f}" for s in SOURCES)
        out.append(f"- {plan} at {budget / 1e6:g}M tokens, layers-self vs lora-books: {parts}.")
    return "\n".join(out)


def trends(rows: list[dict]) -> str:
    """For each plan and arm measured at two or more budgets: perplexity against log(tokens), a straight line
    through the points, read at four times the largest budget.  An extrapolation, not a measurement."""
    series = defaultdict(list)
    for r in rows:
        if r["kind"] == "healed":
            series[(r["plan"], r["arm"])].append((r["tokens_trained"], r["perplexity"]["wikitext2"]))
    out = []
    for (plan, arm), points in sorted(series.items()):
        if len(points) < 2:
            out.append(f"- {plan}, {arm}: one budget only ({points[0][0]:,} tokens): no trend to read.")
            continue
        xs, ys = [math.log(t) for t, _ in points], [p for _, p in points]
        mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sum((x - mx) ** 2 for x in xs)
        at = max(t for t, _ in points) * 4
        guess = my + slope * (math.log(at) - mx)
        out.append(f"- {plan}, {arm}: {slope * math.log(4):+.1f} WikiText-2 perplexity per 4x tokens over "
                   f"{len(points)} budgets; the same line gives {guess:.1f} at {at / 1e6:.0f}M tokens (if the gain "
                   "per doubling does not shrink, which it usually does).")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dense = next(r for r in rows if r["kind"] == "dense")["perplexity"]["wikitext2"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colors = {"smollm2-0.2": "tab:blue", "smollm2-0.35": "tab:red"}
    styles = {"layers-self": "-o", "lora-books": "--s", "lora-self": ":^"}
    for plan, color in colors.items():
        unhealed = next((r for r in rows if r.get("plan") == plan and r["kind"] == "pruned"), None)
        for arm, style in styles.items():
            pts = sorted((r["tokens_trained"], r["perplexity"]["wikitext2"]) for r in rows
                         if r.get("plan") == plan and r.get("arm") == arm)
            if not pts:
                continue
            if unhealed is not None:  # the unhealed model drawn at 100k tokens, the left edge of the log axis
                pts = [(1e5, unhealed["perplexity"]["wikitext2"]), *pts]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=f"{plan} {arm}")
        ax.axhline(GOALS[plan] * dense, color=color, lw=0.8, alpha=0.6)
        ax.text(1.05e5, GOALS[plan] * dense * 1.02, f"goal {GOALS[plan]}x dense", color=color, fontsize=8)
    ax.axhline(dense, color="black", lw=0.8)
    ax.text(1.05e5, dense * 1.02, "dense", fontsize=8)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("healing tokens (leftmost point: unhealed)")
    ax.set_ylabel("WikiText-2 perplexity (128-token windows)")
    ax.set_title("SmolLM2-135M, the default's plans: quality against healing tokens")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    rows = load()
    current = [r for r in rows if "source" not in r]
    earlier = [r for r in rows if "source" in r]
    meta = current[0]
    plot(current, HERE / "recovery.png")
    commands = "\n".join(f"    {c}" for c in dict.fromkeys(r["command"] for r in current))
    machine = meta["machine"]
    text = f"""# Recovery after pruning: healing on text the original model writes

Generated by `benchmarks/recovery/report.py` from `results.jsonl` (each row carries its commit, date, machine
and command). Machine: {machine.get('gpu', 'CPU')}, torch {machine['torch']}, transformers
{machine['transformers']}; commit {meta['commit']}; {meta['date'][:10]}. Commands:

{commands}

SmolLM2-135M-Instruct (the embedded default, 30 layers), the default's saved plans
(`benchmarks/quality/default_plans/smollm2-0.2.json`: 24 layers; `smollm2-0.35.json`: 20 layers). Each healed row
starts from the same pruned weights. Arms, at the same token budget and the same 64 x 256-token blocks per step:

- `lora-books`: today's `layerfold heal` (LoRA rank 8 on every projection, next-token loss on the book text,
  lr 1e-4), model in float32 with bf16 autocast;
- `layers-self`: `layerfold heal --data self` (the decoder layers train, lr 2e-4, KL to the dense model's logits
  on text the dense model wrote from the openings of the calibration passages: temperature 1, top-p 0.95, 256 new
  tokens a sample, 1024 samples a batch, seed 1234).

Perplexity: every non-overlapping 128-token window of each test text, no BOS. The self-written text dropped the
samples that ended within 16 tokens (about 1.5%); no sample repeated another's opening and none shared a 13-token
window with WikiText-2, PTB or LAMBADA (`self_text.filter` in the rows).

{table(current)}

![quality against healing tokens](recovery.png)

## Against the goals (issue 23)

{goals(current)}
- Zero-shot accuracy (the seven tasks) was not measured for these rows: the GPU time ran out first.

## Reading

{comparisons(current)}
- The two arms differ in three things at once: the text (self-written vs books), what trains (the decoder
  layers vs LoRA adapters, with their own learning rates) and the loss (KL to the dense model vs next-token).
  `lora-self` (LoRA distilled on the same self-written text) separates them; it is in the job list and was not
  reached, so which of the three gives the gain is not measured here.
- LAMBADA is held-out passages of the same books as `books`: LoRA on books is in-domain there, so LAMBADA
  flatters it beside WikiText-2 and PTB.
- Not reached before the GPU time ran out (all in `jobs.txt`): `lora-books` at 8M tokens (it was running), both
  arms of the 35% plan at 8M, `lora-self`, a speed row with `--compile`, Gemma-3-270M, zero-shot accuracy.

## What more tokens would give

{trends(current)}

## Speed (H200, SmolLM2-135M, no torch.compile of the training step)

- Writing the text: `generate` with a static cache (transformers compiles its decoding step), 1024 samples of
  264 tokens a batch: the `text written` column, steady rate without the first batch (which compiles).
- Training: the `train tok/s` column, tokens of the budget per second of the step loop, bf16 autocast, 64 blocks
  of 256 tokens per micro-batch, one micro-batch per step; `layers-self` includes the teacher's forward pass.

## An earlier run (for reference; other plans and recipe)

Its rows are folded into `results.jsonl` (marked `source`): LoRA on books at 491,520 tokens, model in bfloat16,
4 x 16 blocks per step, older plans (`slm`: {next((r['plan_summary'] for r in earlier if r['kind'] == 'pruned'), '')}).

{table(earlier) if earlier else ''}
"""
    (HERE / "RESULTS.md").write_text(text)
    print(f"wrote {HERE / 'RESULTS.md'} and {HERE / 'recovery.png'}")


if __name__ == "__main__":
    main()
