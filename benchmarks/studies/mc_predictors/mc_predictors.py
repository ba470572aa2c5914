"""Which cheap measure on validation text orders pruned models as multiple-choice accuracy does?

The default is chosen on PTB-valid perplexity, and on the zero-shot validation tasks ShortGPT's plans
beat it while their perplexity is far worse (benchmarks/quality/); at Gemma 20% Angular, which drops the last
four layers, has the best validation accuracy and a perplexity 60 times the default's. A criterion
that tracked multiple-choice accuracy could pick plans for it. This script measures, for the plans
of several configurations (the same plans as benchmarks/quality/run.py builds) on the first ``--windows``
128-token windows of PTB valid:

- ``nll``: the mean next-token NLL (log of the perplexity);
- ``nll_t``: the NLL after the best single temperature on the logits (grid 0.5-3), the part of the
  loss a miscalibrated scale explains away (a choice between answers hardly depends on it);
- ``top1``: the share of tokens where the pruned model's first choice is the text's token;
- ``agree``: the share where it is the dense model's first choice;
- ``kl``: KL(dense || pruned) of the next-token distributions;
- ``cloze`` and ``cloze_nll``: a multiple-choice probe built from the same text, scored as
  the zero-shot tasks score answers (:mod:`lab.choice`, which ``slm-lab --set pick=choice`` runs on
  the calibration source). Each of ``--cloze-items`` items is a 96-token context, its true
  32-token continuation and three distractors, the 32 tokens at the same place 256, 512 and 768 tokens
  further on (the same kind of text, often the same article); a choice's score is the summed
  log-likelihood of its tokens after the context. ``cloze`` is the share of items whose true
  continuation scores highest, ``cloze_nll`` the mean negative log of the true continuation's share of
  the softmax over the four scores (a graded version of the same choice).

``--report`` joins these rows with the per-cell zero-shot validation means of quality.py rows and
prints, per model and ratio, the Spearman correlation of each measure with the held-out mean across
the plans (a measure where lower is better is negated first, so +1 means "orders plans as the
validation tasks do").

    python benchmarks/studies/mc_predictors/mc_predictors.py --windows 40 --out smol.jsonl
    python benchmarks/studies/mc_predictors/mc_predictors.py --model GEMMA_FOLDER --bos --windows 30 --out ...
    python benchmarks/studies/mc_predictors/mc_predictors.py --report smol.jsonl \\
        --heldout "SmolLM2-135M=ROWS..." --heldout "Gemma-3-270M=ROWS..."
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # benchmarks/

TEMPERATURES = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.15, 1.3, 1.5, 1.75, 2.0, 2.5, 3.0]
MEASURES = {"nll": -1, "nll_t": -1, "top1": 1, "agree": 1, "kl": -1,  # sign: +1 when higher is better
            "cloze": 1, "cloze_nll": -1}
CONFIGS = "slm,slm/channels+kl,slm/books+repeats,shortgpt,shortgpt+channels,sleb,angular"


@torch.no_grad()
def measures(model, dense, windows: torch.Tensor, batch_size: int) -> dict:
    """The measures above for ``model`` against ``dense`` on ``windows`` (all tokens after the first
    scored; with BOS first, every text token)."""
    nll_t = torch.zeros(len(TEMPERATURES), dtype=torch.float64)
    top1 = agree = kl = 0.0
    count = 0
    for start in range(0, len(windows), batch_size):
        ids = windows[start:start + batch_size].to(next(model.parameters()).device)
        logits = model(ids).logits[:, :-1].float()
        ref = torch.log_softmax(dense(ids).logits[:, :-1].float(), dim=-1)
        target = ids[:, 1:]
        for k, t in enumerate(TEMPERATURES):
            logp = torch.log_softmax(logits / t, dim=-1)
            nll_t[k] -= logp.gather(-1, target.unsqueeze(-1)).sum().double().cpu()
        logp = torch.log_softmax(logits, dim=-1)
        first = logits.argmax(-1)
        top1 += (first == target).sum().item()
        agree += (first == ref.argmax(-1)).sum().item()
        kl += (ref.exp() * (ref - logp)).sum().item()
        count += target.numel()
    best = int(torch.argmin(nll_t))
    return {"nll": nll_t[TEMPERATURES.index(1.0)].item() / count, "nll_t": nll_t[best].item() / count,
            "temperature": TEMPERATURES[best], "top1": top1 / count, "agree": agree / count, "kl": kl / count,
            "tokens": count}


def lab_choice():
    """benchmarks/lab's continuation-choice probe (the one ``slm-lab --set pick=choice`` compares plans by)."""
    from quality.configs import require_lab

    require_lab()
    from lab import choice

    return choice


def cloze_items(stream: torch.Tensor, count: int, bos_id: int | None = None) -> torch.Tensor:
    """``[count, 4, length]`` token ids of the probe (:func:`lab.choice.choice_items`)."""
    choice_items = lab_choice().choice_items

    return choice_items(stream, count, bos_id)


def cloze_measures(model, items: torch.Tensor, batch_size: int) -> dict:
    """``cloze`` and ``cloze_nll`` of ``model`` on :func:`cloze_items` (choice 0 is the true one)."""
    model_choice_score = lab_choice().model_choice_score

    score = model_choice_score(model, items, batch_size=batch_size)
    return {"cloze": score.accuracy, "cloze_nll": score.nll, "cloze_items": len(items)}


def run(args) -> None:
    from quality.run import plan_config

    from layerfold import api
    from layerfold.data.sources import load_text
    from layerfold.data.tokens import CalibrationConfig, sample_windows, token_stream
    from layerfold.evaluate.perplexity import windows_from_stream

    base = api.load_model(args.model, device=args.device)
    bos_id = base.tokenizer.bos_token_id if args.bos else None
    stream = token_stream(base.tokenizer, load_text("ptb-valid"))
    windows = windows_from_stream(stream, 128, bos_id, args.windows)
    items = cloze_items(stream, args.cloze_items, bos_id)
    calib = CalibrationConfig(source="books", samples=10, seq_len=128, seed=1234)
    tokens = sample_windows(base.tokenizer, calib)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for name in args.configs.split(","):
            loaded = copy.deepcopy(base)
            t0 = time.perf_counter()
            result = plan_config(loaded, name, ratio, calib, tokens)
            api.apply_plan(loaded, result)
            row = {"config": name, "ratio": ratio, "plan": result.plan.summary(), "windows": len(windows),
                   **measures(loaded.model, base.model, windows, args.batch_size),
                   **cloze_measures(loaded.model, items, args.batch_size),
                   "seconds": round(time.perf_counter() - t0, 1)}
            with open(args.out, "a") as fh:
                fh.write(json.dumps(row) + "\n")
            print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
            del loaded


def spearman(a: list[float], b: list[float]) -> float:
    """Spearman's rank correlation (scipy's; ties get average ranks)."""
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


def report(args) -> None:
    """Per model and ratio: each plan's measures beside its held-out mean, and each measure's Spearman
    correlation with the held-out mean across the plans."""
    from quality.paired import mean_accuracy, outcomes, read

    pooled: dict[str, list[float]] = {m: [] for m in MEASURES}
    for spec, path in zip(args.heldout, args.report, strict=True):
        label, rows = read(spec)
        held = {(r["config"], r["ratio"]): 100 * mean_accuracy(outcomes(r, "heldout", list(r["heldout_docs"])))
                for r in rows if "heldout_docs" in r}
        mine = [json.loads(line) for line in open(path) if line.strip()]
        for ratio in sorted({r["ratio"] for r in mine}):
            cell = [r for r in mine if r["ratio"] == ratio and (r["config"], ratio) in held]
            print(f"#### {label}, {ratio:.0%} of layers removed ({cell[0]['windows']} PTB-valid windows)\n")
            probe = all("cloze" in r for r in cell)  # rows measured before the probe existed have none
            extra = " probe accuracy | probe NLL |" if probe else ""
            print("| configuration | held-out mean | perplexity | NLL | NLL at best T (T) | top-1 | agrees with dense "
                  f"| KL |{extra}\n" + "|---" * (10 if probe else 8) + "|")
            for r in sorted(cell, key=lambda r: -held[(r["config"], ratio)]):
                print(f"| {r['config']} | {held[(r['config'], ratio)]:.2f} | {math.exp(r['nll']):.1f} | {r['nll']:.3f} "
                      f"| {r['nll_t']:.3f} ({r['temperature']}) | {100 * r['top1']:.1f} | {100 * r['agree']:.1f} "
                      f"| {r['kl']:.3f} |" + (f" {100 * r['cloze']:.1f} | {r['cloze_nll']:.3f} |" if probe else ""))
            acc = [held[(r["config"], ratio)] for r in cell]
            cors = {m: spearman([s * r[m] for r in cell], acc) for m, s in MEASURES.items()
                    if all(m in r for r in cell)}
            for m, c in cors.items():
                pooled[m].append(c)
            print("\nSpearman with the held-out mean (+1: orders the plans as the validation tasks do): "
                  + ", ".join(f"{m} {c:+.2f}" for m, c in cors.items()) + "\n")
    print("Mean Spearman over the cells: " + ", ".join(f"{m} {sum(v) / len(v):+.2f}" for m, v in pooled.items() if v))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--bos", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--ratios", default="0.2,0.35")
    parser.add_argument("--configs", default=CONFIGS)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--cloze-items", type=int, default=200, help="items of the continuation-choice probe")
    parser.add_argument("--out", help="append one JSON row per plan here")
    parser.add_argument("--report", action="append", help="rows written by --out (one per --heldout, same order)")
    parser.add_argument("--heldout", action="append", help="LABEL=PATH of quality.py --zs-tasks heldout rows")
    args = parser.parse_args()
    if args.report:
        report(args)
    elif args.out:
        run(args)
    else:
        parser.error("give --out (measure) or --report with --heldout (compare)")


if __name__ == "__main__":
    main()
