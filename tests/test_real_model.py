"""The embedded SmolLM2-135M once, end to end: the ``layerfold prune`` command in a fresh
process, then the same plan applied in memory through the API, the saved folder reloaded
with plain transformers, identical logits, finite PTB perplexity, identical greedy text.

Calibration is cut to 2 windows of 64 tokens to keep the whole test well under a minute on
2 CPU cores (about 28 s of CPU time), and everything runs on one thread: on a busy 2-core
machine a second torch thread makes each matmul wait for the pool, many times slower.  The
default cache is used (the first run on a new machine converts the GGUF once).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import check_layer_bookkeeping

pytestmark = pytest.mark.slow

PTB_WINDOWS = 4


def _layerfold_command() -> list[str]:
    script = Path(sys.executable).with_name("layerfold")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "layerfold.cli"]


@pytest.fixture(scope="module")
def pruned_by_cli(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("real") / "smollm2-27"
    cmd = [*_layerfold_command(), "prune", "--target-layers", "27", "--ppl", "", "--out", str(out),
           "--calib-samples", "2", "--calib-seq-len", "64"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "30 -> 27 layers" in done.stdout
    return out


def _ppl(model, tokenizer) -> float:
    from layerfold.evaluate.perplexity import perplexity

    return perplexity(model, tokenizer, "ptb", seq_len=128, max_windows=PTB_WINDOWS, progress=False).perplexity


def _greedy(model, tokenizer) -> torch.Tensor:
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        return model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)


def test_default_model_prune_save_reload(pruned_by_cli):
    from transformers import AutoModelForCausalLM

    from layerfold import api
    from layerfold.models.load import load_model

    config = json.loads((pruned_by_cli / "config.json").read_text())
    assert config["num_hidden_layers"] == 27
    plan = json.loads((pruned_by_cli / "plan.json").read_text())
    assert plan["method"] == "slm" and plan["num_layers"] == 30 and plan["target"] == {"layers": 27}
    assert (pruned_by_cli / "README.md").is_file() and (pruned_by_cli / "tokenizer.json").is_file()

    lm = load_model()
    assert lm.arch.name == "llama" and len(lm.arch.layer_list(lm.model)) == 30
    dense = _ppl(lm.model, lm.tokenizer)
    assert 30 < dense < 400, dense  # a trained model (random weights would give ~49,000)

    api.apply_plan(lm, api.load_plan(pruned_by_cli / "plan.json"))
    check_layer_bookkeeping(lm.model)
    reloaded = AutoModelForCausalLM.from_pretrained(pruned_by_cli).eval()
    check_layer_bookkeeping(reloaded)

    tokens = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(reloaded(tokens).logits, lm.model(tokens).logits, rtol=1e-4, atol=1e-4)
    pruned = _ppl(reloaded, lm.tokenizer)
    assert math.isfinite(pruned) and pruned > 1
    assert _ppl(lm.model, lm.tokenizer) == pytest.approx(pruned, rel=1e-4)

    greedy = _greedy(lm.model, lm.tokenizer)
    assert torch.equal(greedy, _greedy(reloaded, lm.tokenizer))
    assert lm.tokenizer.decode(greedy[0, -8:], skip_special_tokens=True).strip()


def test_the_conversion_reads_the_gguf_once_and_leaves_gguf_as_it_was():
    """The default model's conversion memoises gguf's reader and tensor-name map only within it."""
    import gguf

    from layerfold.models.default import _gguf_read_once

    reader, names = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_read_once():
        assert gguf.GGUFReader is not reader and gguf.get_tensor_name_map is not names
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert gguf.GGUFReader is reader and gguf.get_tensor_name_map is names
