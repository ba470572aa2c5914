"""The greedy fold's first shortlist sizes (3/3/6, ``slm-lab``) against the full fold (the default's
plans) on zero-shot: SmolLM2-135M at one ratio, both plans made here, each scored on the seven tasks
(full sets, per-document outcomes for a paired comparison).  One JSON row per plan to ``--out``.

    python benchmarks/quality/pairs_zeroshot.py --device cuda --ratio 0.35 --out rows.jsonl
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import sys
import time
from pathlib import Path

import torch

from layerfold import api
from layerfold.evaluate.zeroshot import evaluate_zeroshot
from layerfold.methods.base import Target


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--ratio", type=float, default=0.35)
    p.add_argument("--limit", type=int, default=None, help="documents per task (a smoke test)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--commit", default="unknown")
    p.add_argument("--out", required=True)
    args = p.parse_args()
    dense = api.load_model(None, dtype="float32", device=args.device)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    import lab  # noqa: F401  (registers slm-lab)

    runs = {"shortlist": ("slm-lab", {"pairs": "shortlist", "shortlist": [3, 3, 6]}), "all": ("slm", {"pairs": "all"})}
    for pairs, (method, options) in runs.items():
        loaded = copy.deepcopy(dense)
        result = api.make_plan(loaded, method, Target(ratio=args.ratio), options=options, progress=False)
        api.apply_plan(loaded, result)
        start = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.device.startswith("cuda")):
            zs = evaluate_zeroshot(loaded.model, loaded.tokenizer, "zeroshot7", limit=args.limit,
                                   batch_size=args.batch_size, progress=False, per_doc=True)
        row = {"model": "SmolLM2-135M", "ratio": args.ratio, "pairs": pairs, "method": method, "options": options,
               "plan": result.plan.summary(),
               "zeroshot": {n: t["value"] for n, t in zs["tasks"].items()},
               "docs": {n: t.get("docs") for n, t in zs["tasks"].items()}, **zs["summary"],
               "limit": args.limit, "zs_seconds": round(time.perf_counter() - start, 1), "commit": args.commit,
               "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
               "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu",
               "torch": torch.__version__}
        with open(args.out, "a") as fh:
            fh.write(json.dumps(row) + "\n")
        print(pairs, row["plan"], round(100 * row["mean"], 2), round(100 * row.get("mean_without_boolq", 0), 2),
              flush=True)


if __name__ == "__main__":
    main()
