"""Shared fixtures: tiny random causal LMs of every supported architecture, built locally
from the real transformers config classes (nothing is downloaded).

``tiny_model(name)`` returns a fresh model in eval mode, float32, with every parameter
randomised (norm weights and biases too, so that layers differ and merge operators can be
told apart).  Names are the architecture names of ``layerfold/models/architectures/*.json``
plus a few real-config variants (``smollm2``, ``vicuna``, ``qwen2-full``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

VOCAB = 160
HIDDEN = 32
LAYERS = 6
WINDOW = 4  # sliding window, shorter than the test sequences so that it matters

_COMMON = {"vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": 64, "num_hidden_layers": LAYERS,
           "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 128,
           "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "initializer_range": 0.1}


def _config(name: str):
    import transformers as tf

    if name in ("llama", "vicuna"):
        # Vicuna is Llama 2 with a 4096 context: same config class, untied embeddings
        return tf.LlamaConfig(**_COMMON, tie_word_embeddings=False, rms_norm_eps=1e-5)
    if name == "smollm2":
        # SmolLM2-135M's shape scaled down: 9/3 heads -> 3/1, tied embeddings, 64-dim heads -> 16
        return tf.LlamaConfig(**{**_COMMON, "hidden_size": 48, "num_attention_heads": 3, "num_key_value_heads": 1},
                              tie_word_embeddings=True, rope_theta=100000.0)
    if name == "mistral":
        return tf.MistralConfig(**_COMMON, sliding_window=WINDOW)
    if name == "qwen2":
        return tf.Qwen2Config(**_COMMON, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=3)
    if name == "qwen2-full":
        return tf.Qwen2Config(**_COMMON)
    if name == "qwen3":
        return tf.Qwen3Config(**_COMMON, head_dim=8, use_sliding_window=True, sliding_window=WINDOW,
                              max_window_layers=2)
    if name == "gemma":
        return tf.GemmaConfig(**_COMMON, head_dim=8)
    if name == "gemma2":
        return tf.Gemma2Config(**_COMMON, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
                               attn_logit_softcapping=50.0, final_logit_softcapping=30.0)
    if name == "gemma3":
        # Gemma 3 270M alternates five sliding layers and one full; keep that period (6 layers -> 5 + 1)
        # but spell it with two full layers so that dropping one still leaves both kinds
        types = ["sliding_attention", "sliding_attention", "full_attention",
                 "sliding_attention", "sliding_attention", "full_attention"]
        return tf.Gemma3TextConfig(**_COMMON, head_dim=8, sliding_window=WINDOW, query_pre_attn_scalar=8,
                                   layer_types=types)
    if name == "phi3":
        return tf.Phi3Config(**_COMMON, sliding_window=WINDOW)
    if name == "opt":
        return tf.OPTConfig(vocab_size=VOCAB, hidden_size=HIDDEN, ffn_dim=64, num_hidden_layers=LAYERS,
                            num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=HIDDEN,
                            pad_token_id=0, bos_token_id=1, eos_token_id=2, init_std=0.1)
    if name == "gpt2":
        return tf.GPT2Config(vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=128,
                             bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    if name == "gpt_neox":
        return tf.GPTNeoXConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS,
                                num_attention_heads=4, max_position_embeddings=128, rotary_pct=0.5,
                                bos_token_id=1, eos_token_id=2, initializer_range=0.1)
    raise KeyError(f"no tiny config for '{name}'")


ARCHITECTURES = ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3", "phi3", "opt", "gpt2",
                 "gpt_neox"]
VARIANTS = ["smollm2", "vicuna", "qwen2-full"]


def build_tiny_model(name: str, seed: int = 0) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    config = _config(name)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:  # norm weights, biases: make every layer's different
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Every test runs torch on one thread: tiny models run fastest so (with more, each small
    matmul pays the thread pool's hand-off, tens of ms on a busy 2-core machine), and the real
    model's tests stay predictable on a shared CI machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_model() -> Callable[..., torch.nn.Module]:
    """Factory: ``tiny_model("qwen2")`` -> a fresh tiny random model of that architecture."""
    return build_tiny_model


@pytest.fixture(scope="session")
def architecture_names() -> list[str]:
    from layerfold.models.arch import all_architectures

    return sorted(all_architectures())


def build_tiny_tokenizer(vocab_size: int = VOCAB):
    """A character-level fast tokenizer (ids < ``vocab_size``) with BOS/EOS/pad/unk."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    assert len(vocab) <= vocab_size
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


@pytest.fixture
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture
def tiny_model_dir(tmp_path_factory) -> Callable[[str], Path]:
    """Factory: a saved tiny model folder (config, weights, tokenizer) for CLI and loading tests."""
    made: dict[str, Path] = {}

    def make(name: str = "llama") -> Path:
        if name not in made:
            path = tmp_path_factory.mktemp(f"tiny-{name}")
            build_tiny_model(name).save_pretrained(path)
            build_tiny_tokenizer().save_pretrained(path)
            made[name] = path
        return made[name]

    return make


def write_json(path: Path, data: dict) -> Path:
    path.write_text(json.dumps(data))
    return path


def check_layer_bookkeeping(model) -> None:
    """Every ``layer_idx`` is the layer's position; every per-layer attention kind matches
    the config's ``layer_types`` at that position; the layer-count keys agree."""
    from layerfold.models.arch import architecture_for

    arch = architecture_for(model.config)
    layers = arch.layer_list(model)
    for key in arch.layer_count_keys:
        assert getattr(model.config, key) == len(layers), key
    types = getattr(model.config, "layer_types", None)
    if types is not None:
        assert len(types) == len(layers)
    for pos, layer in enumerate(layers):
        for name, module in layer.named_modules():
            if isinstance(getattr(module, "layer_idx", None), int):
                assert module.layer_idx == pos, f"layer {pos} {name}.layer_idx = {module.layer_idx}"
            if types is not None and isinstance(getattr(module, "attention_type", None), str):
                assert module.attention_type == types[pos], f"layer {pos}: {module.attention_type} vs {types[pos]}"
            if types is not None and hasattr(module, "sliding_window") and name.endswith("attn"):
                sliding = module.sliding_window is not None
                assert sliding == (types[pos] == "sliding_attention"), f"layer {pos} {name}"


@pytest.fixture
def run(monkeypatch, capsys, tmp_path):
    """``run(*args)`` -> (exit code, stdout, stderr) of ``layerfold ARGS`` run in-process through the
    real entry point, with the working folder in tmp_path."""
    import sys

    from layerfold import cli

    monkeypatch.chdir(tmp_path)

    def invoke(*args: str) -> tuple[int, str, str]:
        monkeypatch.setattr(sys, "argv", ["layerfold", *map(str, args)])
        try:
            cli.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return invoke


@pytest.fixture
def text_file(tmp_path) -> Path:
    """A short calibration text file, enough for a few 16-token windows of the tiny tokenizer."""
    path = tmp_path / "calib.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 8)
    return path


def assert_user_error(result: tuple[int, str, str], pattern: str) -> str:
    """``run(...)``'s result is a user error: exit code 2 and one ``error:`` line holding ``pattern``
    (returned)."""
    code, out, err = result
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2, (out, err)
    assert len(errors) == 1, err
    assert pattern in errors[0], errors[0]
    assert "Traceback" not in err
    return errors[0]


@pytest.fixture
def no_weights_loaded(monkeypatch):
    """Fail the test if any model's weights are loaded: for mistakes that must be reported first."""
    from transformers import AutoModelForCausalLM

    def refuse(*args, **kwargs):
        raise AssertionError("model weights were loaded before the mistake was reported")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)


class Interrupted(Exception):
    """Raised by :func:`interrupt_at`'s callback: a run stopped part way, as by Ctrl-C."""


def interrupt_at(stop: int):
    """An ``on_step`` callback for heal that interrupts the run when it reaches step ``stop``."""

    def callback(step, log):
        if step == stop:
            raise Interrupted

    return callback

