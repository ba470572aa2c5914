"""RESULTS.md and recovery.png from results.jsonl (every figure in the tables is read from the rows; the prose
under "Reading" is reading.md, written by hand from those tables).

    python benchmarks/recovery/report.py
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent
# by share of layers removed: healed WikiText-2 within this factor of dense (issue 23)
GOALS = {"0.2": 1.3, "0.35": 2.0}
ZEROSHOT_GOAL = {"0.2": 1.0}  # healed zero-shot mean within this many points of dense (issue 23)
SOURCES = ("wikitext2", "ptb", "lambada")
TASKS = ("boolq", "piqa", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
# where a model's plans came from, a section each in this order: today's default plans rescale channels (their
# summaries carry "+channels"), the earlier ones of benchmarks/quality/default_plans do not (and share their names)
PLAN_SOURCES = {True: "today's default plans", False: "earlier plans (without channel rescaling)"}


def family(row: dict) -> str:
    """The model a row measured (the Gemma rows carry the folder it was converted into)."""
    return "Gemma-3-270M" if "gemma" in row["model"].lower() else "SmolLM2-135M-Instruct"


def rescaled(plan_summary: str) -> bool:
    """Whether a plan is one of today's default's: its summary names channel factors."""
    return "+channels" in plan_summary


def section_of(row: dict) -> str:
    """The report section of a row: its model and, for a pruned or healed row, where its plan came from."""
    if row["kind"] == "dense":
        return family(row)
    return f"{family(row)}: {PLAN_SOURCES[rescaled(row['plan_summary'])]}"


def sections(rows: list[dict]) -> dict[str, list[dict]]:
    """The rows of each section, models in the order of their rows and today's plans first; a model's dense row
    goes into each of its sections."""
    out = {}
    for name in dict.fromkeys(family(r) for r in rows):
        for title in (f"{name}: {source}" for source in PLAN_SOURCES.values()):
            group = [r for r in rows if section_of(r) in (name, title)]
            if any(r["kind"] != "dense" for r in group):
                out[title] = group
    return out


def ratio_of(plan: str) -> str:
    return plan.rsplit("-", 1)[-1]


def load(path: Path = HERE / "results.jsonl") -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def merged(rows: list[dict]) -> list[dict]:
    """One row per model: the dense and unhealed rows measured again (with zero-shot) are merged into the
    first, later values winning; healed rows are one per plan, arm and budget, the latest kept."""
    out: dict[tuple, dict] = {}
    for r in rows:
        key = (family(r), r["kind"], r.get("plan"), r.get("plan_summary"), r.get("arm"), r.get("budget"))
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
    """One model's rows against the quality goals: healed WikiText-2 within a factor of dense, and at 20% the
    zero-shot mean within a point of dense (with and without BoolQ)."""
    dense_row = next(r for r in rows if r["kind"] == "dense")
    dense, dense_zs = dense_row["perplexity"]["wikitext2"], dense_row.get("zeroshot")
    out = []
    for plan in dict.fromkeys(r["plan"] for r in rows if r["kind"] == "healed"):
        factor = GOALS.get(ratio_of(plan))
        healed = [r for r in rows if r.get("plan") == plan and r["kind"] == "healed"]
        if factor is None:
            continue
        best = min(healed, key=lambda r: r["perplexity"]["wikitext2"])
        ratio = best["perplexity"]["wikitext2"] / dense
        verdict = "reached" if ratio <= factor else "not reached"
        out.append(f"- {plan}: goal WikiText-2 within {factor}x dense ({factor * dense:.1f}); best healed "
                   f"{best['perplexity']['wikitext2']:.1f} = {ratio:.2f}x ({best['arm']}, {best['tokens_trained']:,} "
                   f"tokens): **{verdict}**.")
        points = ZEROSHOT_GOAL.get(ratio_of(plan))
        if points is None:
            continue
        scored = [r for r in healed if r.get("zeroshot")]
        if not scored or not dense_zs:
            out.append(f"- {plan}: goal zero-shot mean within {points:g} point of dense: not measured.")
            continue
        best = max(scored, key=lambda r: r["zeroshot"]["mean_without_boolq"])
        gaps = {k: dense_zs[k] - best["zeroshot"][k] for k in ("mean", "mean_without_boolq")}
        verdict = "reached" if max(gaps.values()) <= points else "not reached"
        out.append(f"- {plan}: goal zero-shot mean within {points:g} point of dense ({dense_zs['mean']:.1f}; "
                   f"{dense_zs['mean_without_boolq']:.1f} without BoolQ); best healed ({best['arm']}, "
                   f"{best['tokens_trained']:,} tokens) {best['zeroshot']['mean']:.1f} "
                   f"({best['zeroshot']['mean_without_boolq']:.1f} without BoolQ), {gaps['mean']:.1f} and "
                   f"{gaps['mean_without_boolq']:.1f} points below: **{verdict}**.")
    return "\n".join(out)


def zeroshot_tasks(rows: list[dict]) -> str:
    """Each zero-shot task's figure for the rows that have them (where healing does and does not help)."""
    kinds = ("dense", "pruned", "healed")
    scored = []  # section by section, dense first, then each plan unhealed and healed by budget
    for group in sections(rows).values():
        for r in sorted(group, key=lambda r: (kinds.index(r["kind"]), r.get("plan") or "", r.get("budget") or 0)):
            if r.get("zeroshot") and not any(r is s for s in scored):
                scored.append(r)
    if not scored:
        return ""
    head = ("| model | healing | tokens | " + " | ".join(TASKS) + " | mean | without BoolQ |\n"
            + "|---" * (len(TASKS) + 5) + "|")
    lines = [head]
    for r in scored:
        zs = r["zeroshot"]
        what = "dense" if r["kind"] == "dense" else f"{r['plan']}, {r.get('arm') or 'none'}"
        tokens = f"{r['tokens_trained']:,}" if r["kind"] == "healed" else "-"
        lines.append(f"| {section_of(r)} | {what} | {tokens} | " + " | ".join(f"{zs['tasks'][t]:.1f}" for t in TASKS)
                     + f" | {zs['mean']:.1f} | {zs['mean_without_boolq']:.1f} |")
    return "\n".join(lines)


def speed_goals(rows: list[dict], written: list[dict]) -> str:
    """The two speed goals (SmolLM2 on one H200): writing the text at 50k tokens/s or more, training at 100k."""
    steady = [(r["steady_tokens_per_second"], f"`gen_speed.py`, {r['batch']} samples a batch") for r in written
              if r.get("steady_tokens_per_second")]
    steady += [(r["self_text"]["steady_tokens_per_second"], f"{r['arm']} run, {r['self_text']['recipe']['batch']} "
                "samples a batch") for r in rows if (r.get("self_text") or {}).get("steady_tokens_per_second")
               and family(r).startswith("SmolLM2") and "H200" in r["machine"].get("gpu", "")]
    trained = [r["train_tokens_per_second"] for r in rows if r.get("train_tokens_per_second")
               and r.get("arm") == "layers-self" and family(r).startswith("SmolLM2")
               and "H200" in r["machine"].get("gpu", "")]
    out = []
    if steady:
        best, how = max(steady)
        out.append(f"- Writing the text: goal 50,000 tokens/s; best steady {best:,} ({how}): "
                   f"**{'reached' if best >= 50_000 else 'not reached'}**.")
    if trained:
        verdict = ("reached" if min(trained) >= 100_000 else "reached by some runs" if max(trained) >= 100_000
                   else "not reached")
        out.append(f"- Training (`layers-self`, SmolLM2 on the H200): goal 100,000 tokens/s; {min(trained):,} to "
                   f"{max(trained):,} across the runs: "
                   f"**{verdict}**.")
    return "\n".join(out)


def comparisons(rows: list[dict]) -> str:
    """The arms against each other at each plan and budget where both ran: layers-self and lora-self against
    lora-books (the text, then what trains), layers-self against lora-self (what trains, on the same text)."""
    by = {(r["plan"], r["budget"], r["arm"]): r for r in rows if r["kind"] == "healed"}  # one model's rows
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


def plot(models: dict[str, list[dict]], path: Path) -> None:
    """One panel per section: WikiText-2 perplexity against healing tokens, a line per plan and arm."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 4.8), squeeze=False)
    colors = {"0.2": "tab:blue", "0.35": "tab:red"}
    styles = {"layers-self": "-o", "lora-books": "--s", "lora-self": ":^"}
    for ax, (name, rows) in zip(axes[0], models.items(), strict=True):
        dense = next(r for r in rows if r["kind"] == "dense")["perplexity"]["wikitext2"]
        for plan in dict.fromkeys(r["plan"] for r in rows if r["kind"] != "dense"):
            color = colors.get(ratio_of(plan), "tab:gray")
            unhealed = next((r for r in rows if r.get("plan") == plan and r["kind"] == "pruned"), None)
            for arm, style in styles.items():
                pts = sorted((r["tokens_trained"], r["perplexity"]["wikitext2"]) for r in rows
                             if r.get("plan") == plan and r.get("arm") == arm)
                if not pts:
                    continue
                if unhealed is not None:  # the unhealed model drawn at 100k tokens, the left edge of the log axis
                    pts = [(1e5, unhealed["perplexity"]["wikitext2"]), *pts]
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color=color, label=f"{plan} {arm}")
            factor = GOALS.get(ratio_of(plan))
            if factor:
                ax.axhline(factor * dense, color=color, lw=0.8, alpha=0.6)
                ax.text(1.05e5, factor * dense * 1.02, f"goal {factor}x dense", color=color, fontsize=8)
        ax.axhline(dense, color="black", lw=0.8)
        ax.text(1.05e5, dense * 1.02, "dense", fontsize=8)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("healing tokens (leftmost point: unhealed)")
        ax.set_ylabel("WikiText-2 perplexity (128-token windows)")
        ax.set_title(f"{name}\nquality against healing tokens", fontsize=10)
        ax.legend(fontsize=7)
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


def loss_memory(rows: list[dict]) -> str:
    """The rows of ``loss_memory.py``: memory and seconds of one micro-batch's loss and gradient, torch's
    formulation against layerfold's sliced one."""
    if not rows:
        return "Not measured yet (`loss_memory.py`)."
    lines = ["| vocabulary | blocks of 256 tokens | bf16 logits GiB | loss | torch: peak growth GiB | layerfold | "
             "torch: seconds | layerfold |", "|---" * 8 + "|"]
    by = {(r["case"], r["loss"], r["impl"]): r for r in rows}  # the latest of each
    for case, loss in dict.fromkeys((r["case"], r["loss"]) for r in rows):
        t, ours = by.get((case, loss, "torch")), by.get((case, loss, "layerfold"))
        if t and ours:
            lines.append(f"| {t['vocab']:,} ({case}) | {t['blocks']} | {t['logits_gib']:.2f} | {loss} | "
                         f"{t['peak_growth_gib']:.2f} | {ours['peak_growth_gib']:.2f} | {t['seconds']:.1f} | "
                         f"{ours['seconds']:.1f} |")
    r = rows[-1]
    return ("\n".join(lines) + f"\n\n    {r['command']}    # commit {r['commit']}, {r['date'][:10]}, "
            f"{r['machine']['cpus']} CPU cores, torch {r['machine']['torch']}")


def plan_source(plans: dict[str, str]) -> str:
    if all(rescaled(v) for v in plans.values()):
        return "today's default, `benchmarks/recovery/plans`: `layerfold prune --ratio R` with its channel factors"
    return ("`benchmarks/quality/default_plans`: an earlier default's, without the channel rescaling; today's default "
            "has the same 20% window and other 35% windows, in `benchmarks/recovery/plans`")


def model_section(name: str, rows: list[dict], runs: list[dict]) -> str:
    """One section: its merged rows, and every run as measured (for the repeats)."""
    plans = {r["plan"]: r["plan_summary"] for r in rows if r["kind"] in ("pruned", "healed")}
    machines = sorted({r["machine"].get("gpu", "CPU") for r in rows})
    return f"""## {name}

Plans: {'; '.join(f'`{k}`: {v}' for k, v in plans.items())} ({plan_source(plans)}). Rows measured on
{' and '.join(machines)}.

{table(rows)}

### Against the goals (issue 23)

{goals(rows)}

### Arms at equal budgets

{comparisons(rows)}
{repeats(runs)}

### What more tokens would give

{trends(rows)}
"""


def main() -> None:
    rows = load()
    written = [r for r in rows if r["kind"] == "generation-speed"]
    losses = [r for r in rows if r["kind"] == "loss-memory"]
    rows = [r for r in rows if r["kind"] not in ("generation-speed", "loss-memory")]
    measured = [r for r in rows if "source" not in r]
    current = merged(measured)
    earlier = [r for r in rows if "source" in r]
    models, measured_by = sections(current), sections(measured)
    plot(models, HERE / "recovery.png")
    runs = {}
    for r in rows:
        if "source" not in r:
            runs.setdefault(r["command"], (r["commit"], r["date"][:10], r["machine"].get("gpu", "CPU")))
    commands = "\n".join(f"    {c}    # commit {commit}, {date}, {gpu}" for c, (commit, date, gpu) in runs.items())
    versions = sorted({f"torch {r['machine']['torch']}, transformers {r['machine']['transformers']}" for r in current})
    text = f"""# Recovery after pruning: healing on text the original model writes

Generated by `benchmarks/recovery/report.py` from `results.jsonl` (each row carries its commit, date, machine
and command; {'; '.join(versions)}). Commands, each with the commit, date and GPU of its rows:

{commands}

Each healed row starts from the same pruned weights as its plan's unhealed row. Arms, at the same token budget and
the same 64 x 256-token blocks per step:

- `lora-books`: today's `layerfold heal` (LoRA rank 8 on every projection, next-token loss on the book text,
  lr 1e-4), model in float32 with bf16 autocast;
- `lora-self`: LoRA as in `lora-books`, distilled (KL) on the self-written text below;
- `layers-self`: `layerfold heal --data self` (the decoder layers train, lr 2e-4, KL to the dense model's logits
  on text the dense model wrote from the openings of the calibration passages: temperature 1, top-p 0.95, 256 new
  tokens a sample, 1024 samples a batch, seed 1234).

Perplexity: every non-overlapping 128-token window of each test text (Gemma: each window led by BOS, as it
expects; SmolLM2: no BOS). Gemma's training blocks and writing seeds are led by BOS too (its tokenizer puts BOS
in front of every text). The self-written text dropped the samples that ended within 16 tokens (about 1.5%);
no sample repeated another's opening and none shared a 13-token window with WikiText-2, PTB or LAMBADA
(`self_text.filter` in the rows). Zero-shot: the seven tasks, full sets.

![quality against healing tokens](recovery.png)

{chr(10).join(model_section(name, group, measured_by[name]) for name, group in models.items())}
## Zero-shot by task

{zeroshot_tasks(current)}

## Speed goals (SmolLM2-135M on one H200)

{speed_goals(current, written)}

- Writing the text: `generate` with a static cache (transformers compiles its decoding step): the `text written`
  column, steady rate without the first batch (which compiles).
- Writing speed by samples a batch (`gen_speed.py`: the default recipe, dense model in bf16, no cache):

{generation(written)}

- Training: the `train tok/s` column, tokens of the budget per second of the step loop, bf16 autocast, 64 blocks
  of 256 tokens per step; `layers-self` includes the teacher's forward pass. Rows run beside another job on the
  same GPU (their `note` says so) are not clean speed figures.

- The losses' memory (`loss_memory.py`; one micro-batch's loss and gradient with respect to random bf16
  logits, on the CPU, whose peak resident memory shows what the same tensors take on a GPU; each measurement
  in a fresh process): the growth of peak memory past the logits themselves, and the seconds.

{loss_memory(losses)}

## Reading

READING

## An earlier run (for reference; other plans and recipe)

Its rows are folded into `results.jsonl` (marked `source`): LoRA on books at 491,520 tokens, model in bfloat16,
4 x 16 blocks per step, older plans (`slm`: {next((r['plan_summary'] for r in earlier if r['kind'] == 'pruned'), '')}).

{table(earlier) if earlier else ''}
"""
    reading = "\n".join(line for line in (HERE / "reading.md").read_text().splitlines() if not line.startswith("<!--"))
    text = text.replace("READING", reading.strip())
    (HERE / "RESULTS.md").write_text(text)
    print(f"wrote {HERE / 'RESULTS.md'} and {HERE / 'recovery.png'}")


if __name__ == "__main__":
    main()
