"""How fast the dense model writes its healing text, by samples per batch (the recipe's ``batch``).

    python benchmarks/recovery/gen_speed.py --device cuda --batches 512,1024,2048,4096 --chunks 3

Each batch size writes ``--chunks`` batches of the default recipe (book-opening seeds, temperature 1,
top-p 0.95, 256 new tokens a sample) with the dense model in bfloat16, as ``layerfold heal --data self``
does on CUDA, without the on-disk cache (so every batch is generated).  The steady rate leaves out the
first batch, which compiles the decoding step.  One row per batch size is appended to results.jsonl
(kind ``generation-speed``, with commit, date, machine and command).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> None:
    sys.path.insert(0, str(HERE))
    from run import Rows, log

    from layerfold.models.load import load_model
    from layerfold.recover.selftext import SelfTextRecipe, self_text

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="model folder (default: the embedded SmolLM2-135M)")
    p.add_argument("--batches", default="512,1024,2048,4096", help="samples per batch, comma-separated")
    p.add_argument("--chunks", type=int, default=3, help="batches written per batch size (the first compiles)")
    p.add_argument("--length", type=int, default=256, help="new tokens per sample")
    p.add_argument("--device", default="cuda")
    p.add_argument("--results", default=str(HERE / "results.jsonl"))
    args = p.parse_args(argv)
    loaded = load_model(args.model, dtype="bfloat16" if args.device.startswith("cuda") else "float32",
                        device=args.device)
    rows = Rows(Path(args.results), args)
    for batch in (int(b) for b in args.batches.split(",") if b.strip()):
        recipe = SelfTextRecipe(batch=batch, length=args.length)
        # one token more than chunks - 1 batches can keep (seed, new tokens and an end-of-sequence a sample):
        # exactly --chunks batches are written unless the filter drops more than a chunk's worth
        tokens = (args.chunks - 1) * batch * (recipe.seed_tokens + args.length + 1) + 1
        try:
            written = self_text(loaded.model, loaded.tokenizer, recipe, tokens, progress=False, use_cache=False,
                                check_contamination=False)
            record = written.record
        except torch.OutOfMemoryError as exc:
            record = {"error": f"out of memory: {str(exc).splitlines()[0]}"}
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        row = {"kind": "generation-speed", "model": loaded.source, "batch": batch, "length": args.length,
               "chunks": record.get("chunks_generated_now"), "seconds": record.get("generation_seconds"),
               "tokens_per_second": record.get("generation_tokens_per_second"),
               "steady_tokens_per_second": record.get("steady_tokens_per_second"),
               "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
               "error": record.get("error")}
        rows.add(row)
        log(json.dumps(row))


if __name__ == "__main__":
    main()
