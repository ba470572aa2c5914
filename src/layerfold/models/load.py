"""Load a causal LM: a hub id, a local folder, or (no name) the embedded default."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from layerfold.errors import LayerfoldError, did_you_mean
from layerfold.models.arch import Architecture, architecture_for

DTYPES = {"auto": "auto", "float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    arch: Architecture
    source: str  # what the user asked for (or the default's name)
    path: str  # where it was loaded from


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise LayerfoldError(f"--device {device} asked for, but no CUDA device is available")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise LayerfoldError(f"unknown device '{device}': use cpu, cuda, cuda:N or auto") from exc


def resolve_dtype(dtype: str | torch.dtype):
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise did_you_mean(dtype, list(DTYPES), "dtype")
    return DTYPES[dtype]


def resolve_source(name_or_path: str | None) -> tuple[str, str]:
    """(label, loadable path or hub id)."""
    if name_or_path in (None, "", "default"):
        from layerfold.models.default import DEFAULT_MODEL_NAME, default_model_dir

        return DEFAULT_MODEL_NAME, str(default_model_dir())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise LayerfoldError(f"{path} has no config.json: not a Hugging Face model folder")
        return str(name_or_path), str(path)
    looks_local = name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if looks_local:
        raise LayerfoldError(f"model path {name_or_path} does not exist")
    return name_or_path, name_or_path


DEVICE_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def resolve_device_map(device_map: str | dict | None) -> str | dict | None:
    """accelerate's placement strategies by name (a dict is passed through as is)."""
    if device_map is None or isinstance(device_map, dict):
        return device_map
    if device_map not in DEVICE_MAPS:
        raise did_you_mean(device_map, list(DEVICE_MAPS), "device map")
    return device_map


def load_model(name_or_path: str | None = None, dtype: str | torch.dtype = "float32",
               device: str = "cpu", device_map: str | dict | None = None) -> LoadedModel:
    """Load a causal LM and its tokenizer; checks the architecture is supported.

    ``device_map`` (``"auto"``, ``"balanced"``, ``"sequential"``, or a dict of module name to
    device) spreads the model over the available GPUs with accelerate, instead of putting it
    whole on ``device``; layerfold then runs each layer on its own GPU."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    label, path = resolve_source(name_or_path)
    local = Path(path).is_dir()
    device_map = resolve_device_map(device_map)
    torch_dtype = resolve_dtype(dtype)
    target_device = resolve_device(device) if device_map is None else None
    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:  # ValueError: a config.json without a known model_type
        where = "its config.json cannot be used" if local else "not a local folder, and the hub said"
        raise LayerfoldError(f"cannot load model '{label}': {where}: {_first_line(exc)}") from exc
    arch = architecture_for(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise LayerfoldError(f"cannot load the tokenizer of '{label}' (a model folder needs its tokenizer "
                             f"files): {_first_line(exc)}") from exc
    try:
        extra = {} if device_map is None else {"device_map": device_map}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, **extra)
    except ValueError as exc:
        raise LayerfoldError(f"'{label}' is not a causal language model: {_first_line(exc)}") from exc
    except OSError as exc:  # no weights file
        raise LayerfoldError(f"cannot load the weights of '{label}': {_first_line(exc)}") from exc
    if target_device is not None:
        model.to(target_device)
    _check_offload(model, label)
    model.eval()
    return LoadedModel(model=model, tokenizer=tokenizer, arch=arch, source=label, path=path)


def _check_offload(model: torch.nn.Module, label: str) -> None:
    """Refuse accelerate's offloading (weights kept on ``meta`` between calls): layerfold reads
    the layers' weights to fuse them."""
    places = {str(d) for d in (getattr(model, "hf_device_map", None) or {}).values()}
    if "disk" in places or ("cpu" in places and len(places) > 1):
        raise LayerfoldError(f"'{label}' does not fit on the GPUs: the device map offloads part of it to the CPU "
                             "or disk, which layerfold cannot fuse; use --max-gpu-memory instead, which streams "
                             "the layers from CPU memory")


def wrap_model(model: torch.nn.Module, tokenizer=None, source: str = "in-memory") -> LoadedModel:
    """Wrap an in-memory transformers model for the API."""
    return LoadedModel(model=model, tokenizer=tokenizer, arch=architecture_for(model.config), source=source,
                       path=source)


def _first_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def as_loaded(model, dtype: str = "float32", device: str = "cpu") -> LoadedModel:
    """A :class:`LoadedModel` from one, a bare ``nn.Module``, a hub id, a folder or None (the embedded model)."""
    if isinstance(model, LoadedModel):
        return model
    if isinstance(model, torch.nn.Module):
        return wrap_model(model)
    return load_model(model, dtype=dtype, device=device)
