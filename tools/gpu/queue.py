"""Run a list of benchmark commands on every GPU of a machine, several at a time per GPU.

Small models leave an H200 mostly idle (lm-evaluation-harness and perplexity loops are bound by
the host), so jobs share GPUs: ``--per-gpu`` processes on each, each job pinned to one GPU through
``CUDA_VISIBLE_DEVICES``.  Jobs come from a file, one shell command per line (``#`` comments and
blank lines skipped), started in file order (put the long ones first); each job's output goes
to ``LOGS/<n>.log`` and its exit status to ``LOGS/status.jsonl``.  Used through
``tools/gpu/remote.sh``, which starts it in the background so that it outlives the command
that launched it.

    python3 tools/gpu/queue.py jobs.txt --logs ~/lf/out/logs --per-gpu 3
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from pathlib import Path


def gpu_count() -> int:
    try:
        out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=True).stdout
        return max(1, sum(1 for line in out.splitlines() if line.startswith("GPU ")))
    except (OSError, subprocess.CalledProcessError):
        return 1


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("jobs")
    parser.add_argument("--logs", required=True)
    parser.add_argument("--per-gpu", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="OMP/MKL threads per job")
    parser.add_argument("--gpus", default=None, help="comma list of GPU indices to use (default: all)")
    args = parser.parse_args()
    jobs = [line.strip() for line in Path(args.jobs).read_text().splitlines()
            if line.strip() and not line.lstrip().startswith("#")]
    logs = Path(args.logs)
    logs.mkdir(parents=True, exist_ok=True)
    gpus = [int(g) for g in args.gpus.split(",")] if args.gpus else list(range(gpu_count()))
    slots = [gpu for _ in range(args.per_gpu) for gpu in gpus]
    running: dict[int, tuple[subprocess.Popen, int, float, str]] = {}  # slot -> (process, job, start, cmd)
    queue = list(enumerate(jobs))
    status = logs / "status.jsonl"

    def record(**row) -> None:
        with status.open("a") as fh:
            fh.write(json.dumps(row) + "\n")

    while queue or running:
        for slot, (proc, n, start, cmd) in list(running.items()):
            if proc.poll() is not None:
                record(job=n, rc=proc.returncode, seconds=round(time.time() - start, 1), gpu=slots[slot], cmd=cmd)
                del running[slot]
        for slot in range(len(slots)):
            if slot in running or not queue:
                continue
            n, cmd = queue.pop(0)
            env = {**os.environ, "CUDA_VISIBLE_DEVICES": str(slots[slot]), "OMP_NUM_THREADS": str(args.threads),
                   "MKL_NUM_THREADS": str(args.threads), "TOKENIZERS_PARALLELISM": "false"}
            log = (logs / f"{n}.log").open("w")
            log.write(f"$ {cmd}\n")
            log.flush()
            proc = subprocess.Popen(["bash", "-c", cmd], stdout=log, stderr=subprocess.STDOUT, env=env)
            running[slot] = (proc, n, time.time(), cmd)
            record(job=n, started=True, gpu=slots[slot], cmd=cmd)
        time.sleep(2)
    record(done=True)


if __name__ == "__main__":
    main()
