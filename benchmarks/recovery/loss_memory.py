"""Memory and time of the healing losses on one micro-batch: layerfold's sliced losses against torch's.

    python benchmarks/recovery/loss_memory.py

For each case (a vocabulary and micro-batch of SmolLM2-135M and of Gemma-3-270M, bf16 logits as under
bf16 autocast) and each loss (the distillation KL of ``--data self``, the next-token cross-entropy of
LoRA on books), one fresh process per implementation builds random student and teacher logits, then
computes the loss and its gradient; the row records how much the process's peak memory grew past the
logits themselves (resident memory on the CPU; the tensors are the same on a GPU) and the seconds.
``torch`` is the plain formulation: float32 log-softmax of ``logits[:, :-1]``, ``F.kl_div`` or
``F.cross_entropy``, autograd. One row per case, loss and implementation is appended to results.jsonl
(kind ``loss-memory``, with commit, date, machine and command).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
CASES = {"smollm2": (49_152, 16), "gemma": (262_144, 4)}  # vocabulary, blocks of 256 tokens


def torch_loss(loss: str, student, teacher, ids):
    s = F.log_softmax(student[:, :-1].float().flatten(0, 1), dim=-1)
    if loss == "ce":
        return F.cross_entropy(s, ids[:, 1:].flatten())
    t = F.log_softmax(teacher[:, :-1].float().flatten(0, 1), dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean")


def layerfold_loss(loss: str, student, teacher, ids):
    from layerfold.recover.distill import logits_kl, next_token_ce

    return next_token_ce(student, ids) if loss == "ce" else logits_kl(student, teacher)


def measure(case: str, loss: str, impl: str) -> dict:
    """In this process: the peak memory growth (GiB) and seconds of one loss and its backward."""
    vocab, blocks = CASES[case]
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(blocks, 256, vocab, generator=gen, dtype=torch.bfloat16, requires_grad=True)
    teacher = torch.randn(blocks, 256, vocab, generator=gen, dtype=torch.bfloat16)
    ids = torch.randint(0, vocab, (blocks, 256), generator=gen)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    value = (torch_loss if impl == "torch" else layerfold_loss)(loss, student, teacher, ids)
    value.backward()
    seconds = time.perf_counter() - start
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20  # KiB -> GiB
    return {"case": case, "loss": loss, "impl": impl, "vocab": vocab, "blocks": blocks, "block_tokens": 256,
            "logits_gib": student.numel() * 2 / 2**30, "peak_growth_gib": round(grown, 3),
            "seconds": round(seconds, 2), "value": float(value.detach())}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--one", nargs=3, metavar=("CASE", "LOSS", "IMPL"), help=argparse.SUPPRESS)
    p.add_argument("--results", default=str(HERE / "results.jsonl"))
    args = p.parse_args(argv)
    if args.one:  # the child process: one measurement, printed as JSON
        print(json.dumps(measure(*args.one)))
        return
    sys.path.insert(0, str(HERE))
    from run import Rows, log

    rows = Rows(Path(args.results), argparse.Namespace(device="cpu"))
    rows.common["smoke"] = False  # a CPU measurement of memory, not a smoke run
    for case in CASES:
        for loss in ("kl", "ce"):
            for impl in ("torch", "layerfold"):
                out = subprocess.run([sys.executable, __file__, "--one", case, loss, impl], capture_output=True,
                                     text=True, check=True).stdout
                row = {"kind": "loss-memory", **json.loads(out.strip().splitlines()[-1])}
                rows.add(row)
                log(f"{case} {loss} {impl}: +{row['peak_growth_gib']:.2f} GiB, {row['seconds']:.1f} s")


if __name__ == "__main__":
    main()
