"""Cross-check layerfold's baselines on SmolLM2-135M against figures measured apart from the
project (calibration: 10 x 128 tokens of PTB train at token offsets 0, 5000, ...; perplexity
over the first 60 windows of 128 tokens of WikiText-2 and PTB test, no BOS, float32).

    LAYERFOLD_WIKITEXT2=/path/to/wiki.test.raw python benchmarks/studies/crosscheck_baselines/crosscheck_baselines.py \
        benchmarks/studies/crosscheck_baselines/results.json
"""
import copy
import json
import sys
import time

import torch

from layerfold import api
from layerfold.data.tokens import CalibrationConfig
from layerfold.evaluate.perplexity import perplexity
from layerfold.methods.base import Target
from layerfold.models.load import load_model
from layerfold.plan import Operation

torch.set_num_threads(1)
out_path = sys.argv[1]
lm = load_model()
cal = CalibrationConfig(source="ptb-train", samples=10, seq_len=128, sampling="strided", stride=5000)
results = []


def ppl(model):
    return {s: round(perplexity(model, lm.tokenizer, s, 128, max_windows=60, progress=False).perplexity, 2)
            for s in ("wikitext2", "ptb")}


def record(name, keep, plan, model, seconds):
    row = {"method": name, "layers": keep, "removed": plan.kept_sources() and sorted(
        set(range(plan.num_layers)) - set(plan.kept_sources())) if plan else [], "ppl": ppl(model),
        "planning_s": round(seconds, 1), "scores": plan.scores if plan else {}}
    results.append(row)
    print(json.dumps({k: v for k, v in row.items() if k != "scores"}), flush=True)
    with open(out_path, "w") as fh:
        json.dump(results, fh, indent=1)


record("dense", 30, None, lm.model, 0.0)
for method in ("shortgpt", "angular", "last-n", "sleb"):
    for keep in ((24, 20) if method != "last-n" else (24,)):
        if method == "sleb" and keep == 24:
            continue  # greedy: the 24-layer plan is the first six steps of the 20-layer run (below)
        t = time.perf_counter()
        result = api.make_plan(lm, method, Target(layers=keep), cal, progress=False)
        seconds = time.perf_counter() - t
        record(method, keep, result.plan, api.apply_plan(copy.deepcopy(lm.model), result), seconds)
        if method == "sleb":
            order = result.plan.scores["removal_order"][:6]
            plan24 = copy.deepcopy(result.plan)
            plan24.operations = [Operation("drop", i, i) for i in sorted(order)]
            plan24.scores = {"removal_order": order, "note": "first six steps of the 20-layer run"}
            record("sleb", 24, plan24, api.apply_plan(copy.deepcopy(lm.model), plan24), seconds)
