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
ZEROSHOT_GOAL = {"smollm2-0.2": 1.0}  # healed zero-shot mean within this many points of dense (issue 23)
SOURCES = ("wikitext2", "ptb", "lambada")


def load(path: Path = HERE / "results.jsonl") -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def merged(rows: list[dict]) -> list[dict]:
    """One row per model: the dense and unhealed rows measured again (with zero-shot) are merged into the
    first, later values winning; healed rows are one per plan, arm and budget, the latest kept."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (r["kind"], r.get("plan"), r.get("arm"), r.get("budget"))
        if key in out:
            out[key] = {**out[key], **{k: v for k, v in r.items() if v is not None}}
        else:
            out[key] = dict(r)
    return list(out.values())


def repeats(rows: list[dict]) -> str:
    """Healed runs measured more than once (the table shows the latest): each WikiText-2 figure in order."""
    seen: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if r["kind"] == "healed":
            seen[(r["plan"], r["arm"], r["tokens_trained"])].append(r["perplexity"]["wikitext2"])
    return "\n".join(f"- {plan}, {arm} at {tokens:,} tokens ran {len(v)} times: WikiText-2 "
                     + ", ".join(f"{x:.1f}" for x in v) + " (the run is not bit-reproducible on the GPU; the table "
                     "shows the last)." for (plan, arm, tokens), v in seen.items() if len(v) > 1)


def _zs(row: dict) -> str:
    zs = row.get("zeroshot")
    if not zs:
        return "- | -"
    return f"{zs['mean']:.1f} | {zs['mean_without_boolq']:.1f}"


def _ppl(row: dict) -> str:
    return " | ".join(f"{row['perplexity'][s]:.1f}" if s in row["perplexity"] else "-" for s in SOURCES)


def _speed(value) -> str:
    return f"{value:,}" if value else "-"


def table(rows: list[dict]) -> str:
    dense = next(r for r in rows if r["kind"] == "dense")
    head = ("| plan | layers | healing | tokens | WikiText-2 | PTB | LAMBADA | WikiText-2 / dense | zero-shot mean | "
            "without BoolQ | train tok/s | text written, tok/s (steady) |\n" + "|---" * 12 + "|")
    lines = [head, f"| dense | {dense['layers']} | - | - | {_ppl(dense)} | 1.00 | {_zs(dense)} | - | - |"]
    for plan in dict.fromkeys(r["plan"] for r in rows if r["kind"] != "dense"):
        group = [r for r in rows if r.get("plan") == plan]
        for r in sorted(group, key=lambda r: (r["kind"] != "pruned", r.get("budget") or 0, r.get("arm") or "")):
            ratio = r["perplexity"]["wikitext2"] / dense["perplexity"]["wikitext2"]
            written = (r.get("self_text") or {}).get("steady_tokens_per_second")
            what = "none" if r["kind"] == "pruned" else r["arm"]
            tokens = f"{r['tokens_trained']:,}" if r["kind"] == "healed" else "-"
            lines.append(f"| {plan} | {r['layers']} | {what} | {tokens} | {_ppl(r)} | {ratio:.2f} | {_zs(r)} | "
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
    dense_zs = next(r for r in rows if r["kind"] == "dense").get("zeroshot")
    for plan, points in ZEROSHOT_GOAL.items():
        scored = [r for r in rows if r.get("plan") == plan and r["kind"] == "healed" and r.get("zeroshot")]
        if not scored or not dense_zs:
            out.append(f"- {plan}: goal zero-shot mean within {points:g} point of dense: not measured.")
            continue
        best = max(scored, key=lambda r: r["zeroshot"]["mean"])
        gaps = {k: dense_zs[k] - best["zeroshot"][k] for k in ("mean", "mean_without_boolq")}
        verdict = "reached" if max(gaps.values()) <= points else "not reached"
        out.append(f"- {plan}: goal zero-shot mean within {points:g} point of dense ({dense_zs['mean']:.1f}; "
                   f"{dense_zs['mean_without_boolq']:.1f} without BoolQ); healed ({best['arm']}, "
                   f"{best['tokens_trained']:,} tokens) {best['zeroshot']['mean']:.1f} "
                   f"({best['zeroshot']['mean_without_boolq']:.1f} without BoolQ), {gaps['mean']:.1f} and "
                   f"{gaps['mean_without_boolq']:.1f} points below: **{verdict}**.")
    return "\n".join(out)


def speed_goals(rows: list[dict], written: list[dict]) -> str:
    """The two speed goals (SmolLM2 on one H200): writing the text at 50k tokens/s or more, training at 100k."""
    steady = [(r["steady_tokens_per_second"], f"`gen_speed.py`, {r['batch']} samples a batch") for r in written
              if r.get("steady_tokens_per_second")]
    steady += [(r["self_text"]["steady_tokens_per_second"], f"{r['arm']} run, {r['self_text']['recipe']['batch']} "
                "samples a batch") for r in rows if (r.get("self_text") or {}).get("steady_tokens_per_second")]
    trained = [r["train_tokens_per_second"] for r in rows if r.get("train_tokens_per_second")
               and r.get("arm") == "layers-self"]
    out = []
    if steady:
        best, how = max(steady)
        out.append(f"- Writing the text: goal 50,000 tokens/s; best steady {best:,} ({how}): "
                   f"**{'reached' if best >= 50_000 else 'not reached'}**.")
    if trained:
        verdict = ("reached" if min(trained) >= 100_000 else "reached by some runs" if max(trained) >= 100_000
                   else "not reached")
        out.append(f"- Training (`layers-self`): goal 100,000 tokens/s; {min(trained):,} to {max(trained):,} "
                   "across the runs: "
                   f"**{verdict}**.")
    return "\n".join(out)


def comparisons(rows: list[dict]) -> str:
    """The arms against each other at each plan and budget where both ran: layers-self and lora-self against
    lora-books (the text, then what trains), layers-self against lora-self (what trains, on the same text)."""
    by = {(r["plan"], r["budget"], r["arm"]): r for r in rows if r["kind"] == "healed"}
    out = []
    for first, second in (("layers-self", "lora-books"), ("lora-self", "lora-books"), ("layers-self", "lora-self")):
        for (plan, budget, arm), r in sorted(by.items()):
            other = by.get((plan, budget, second))
            if arm != first or other is None:
                continue
            parts = ", ".join(f"{s} {r['perplexity'][s]:.1f} vs {other['perplexity'][s]:.1f}" for s in SOURCES)
            out.append(f"- {plan} at {budget / 1e6:g}M tokens, {first} vs {second}: {parts}.")
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


def generation(rows: list[dict]) -> str:
    """The writing-speed rows of ``gen_speed.py``: tokens per second by samples per batch."""
    if not rows:
        return "Not measured yet (`gen_speed.py`)."
    lines = ["| samples a batch | new tokens a sample | batches | steady tok/s | all batches tok/s | peak GiB | "
             "commit | date | machine |", "|---" * 9 + "|"]
    for r in rows:
        steady = r.get("error") or _speed(r.get("steady_tokens_per_second"))
        lines.append(f"| {r['batch']} | {r['length']} | {r.get('chunks')} | {steady} | "
                     f"{_speed(r.get('tokens_per_second'))} | {r.get('peak_gib')} | {r['commit']} | "
                     f"{r['date'][:16].replace('T', ' ')} UTC | {r['machine'].get('gpu', 'CPU')} |")
    commands = sorted({r["command"] for r in rows})
    return "\n".join(lines) + "\n\n" + "\n".join(f"    {c}" for c in commands)


def main() -> None:
    rows = load()
    written = [r for r in rows if r["kind"] == "generation-speed"]
    rows = [r for r in rows if r["kind"] != "generation-speed"]
    current = merged([r for r in rows if "source" not in r])
    earlier = [r for r in rows if "source" in r]
    meta = current[0]
    plot(current, HERE / "recovery.png")
    runs = {}
    for r in rows:
        if "source" not in r:
            runs.setdefault(r["command"], (r["commit"], r["date"][:10]))
    commands = "\n".join(f"    {c}    # commit {commit}, {date}" for c, (commit, date) in runs.items())
    machine = meta["machine"]
    plans = {r["plan"]: r["plan_summary"] for r in current if r["kind"] == "pruned"}
    text = f"""# Recovery after pruning: healing on text the original model writes

Generated by `benchmarks/recovery/report.py` from `results.jsonl` (each row carries its commit, date, machine
and command). Machine: {machine.get('gpu', 'CPU')}, torch {machine['torch']}, transformers
{machine['transformers']}. Commands, each with the commit and date of its rows:

{commands}

SmolLM2-135M-Instruct (the embedded default, 30 layers), the plans saved in `benchmarks/quality/default_plans`
(an earlier default's, without the channel rescaling: {'; '.join(f'`{k}`: {v}' for k, v in plans.items())}).
Each healed row
starts from the same pruned weights. Arms, at the same token budget and the same 64 x 256-token blocks per step:

- `lora-books`: today's `layerfold heal` (LoRA rank 8 on every projection, next-token loss on the book text,
  lr 1e-4), model in float32 with bf16 autocast;
- `lora-self`: LoRA as in `lora-books`, distilled (KL) on the self-written text below;
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
{speed_goals(current, written)}

## Reading

{comparisons(current)}
{repeats([r for r in rows if "source" not in r])}
- `layers-self` and `lora-books` differ in three things at once: the text (self-written vs books), what trains
  (the decoder layers vs LoRA adapters, with their own learning rates) and the loss (KL to the dense model vs
  next-token). `lora-self` (LoRA distilled on the same self-written text) separates them: at the same 2M tokens
  it lands next to `lora-books` on WikiText-2 and PTB, far from `layers-self`, so the gain comes from training
  the decoder layers themselves, not from the text or the loss.
- Zero-shot (the seven tasks, full sets): the unhealed 20% plan's mean is propped up by BoolQ (its
  majority-class answer); without BoolQ healing gains about half a point at 20% and a point at 35%, far
  less than perplexity recovers.
- LAMBADA is held-out passages of the same books as `books`: LoRA on books is in-domain there, so LAMBADA
  flatters it beside WikiText-2 and PTB.
- Not run (the GPU time went to the rows above): `lora-books` at 8M tokens, 32M-token budgets, `lora-self` at 8M,
  a speed row with `--compile`, and Gemma-3-270M (its model arrives in four more GPU calls).

## What more tokens would give

{trends(current)}

## Speed (H200, SmolLM2-135M, no torch.compile of the training step)

- Writing the text: `generate` with a static cache (transformers compiles its decoding step), 1024 samples of
  264 tokens a batch: the `text written` column, steady rate without the first batch (which compiles).
- Writing speed by samples a batch (`gen_speed.py`: the default recipe, dense model in bf16, no cache):

{generation(written)}

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
