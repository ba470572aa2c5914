"""Load a causal LM: a hub id, a local folder, or (no name) the embedded default."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from layerfold.errors import LayerfoldError, did_you_mean
from layerfold.finite import check_finite_weights
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
    """(label, loadable path or hub id), checked quickly: a local-looking name that does not
    exist, an invalid hub id, or a hub model that cannot be reached fails here in one line,
    without the hub client's retries (:func:`check_hub_model`)."""
    if name_or_path in (None, "", "default"):
        from layerfold.models.default import DEFAULT_MODEL_NAME, default_model_dir

        return DEFAULT_MODEL_NAME, str(default_model_dir())
    path = Path(name_or_path).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise LayerfoldError(f"{path} has no config.json: not a Hugging Face model folder")
        return str(name_or_path), str(path)
    if _looks_local(name_or_path):
        raise LayerfoldError(f"model folder {name_or_path} does not exist")
    return name_or_path, check_hub_model(name_or_path)


def _looks_local(name: str) -> bool:
    separators = {"/", os.sep} | ({os.altsep} if os.altsep else set())
    return (name.startswith((".", "~", *separators)) or name.endswith(tuple(separators))
            or name.count("/") > 1 or (os.sep != "/" and os.sep in name))


def check_hub_model(repo_id: str) -> str:
    """What to load for a hub id: the id, or its cached snapshot folder when the hub cannot be
    reached.  One request, no retries: an invalid id, a missing or gated model, no network and
    no cached copy, or ``HF_HUB_OFFLINE`` with no cached copy fail in one line."""
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        RepositoryNotFoundError,
    )

    try:
        cached = try_to_load_from_cache(repo_id, "config.json")
    except HFValidationError as exc:
        raise LayerfoldError(f"model '{repo_id}' is neither a local folder nor a valid hub id") from exc
    snapshot = str(Path(cached).parent) if isinstance(cached, str) else None
    if constants.HF_HUB_OFFLINE:
        if snapshot is None:
            raise LayerfoldError(f"model '{repo_id}' is not a local folder, and HF_HUB_OFFLINE is set and the hub "
                                 "cache has no copy of it: give a model folder or unset HF_HUB_OFFLINE")
        return snapshot
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, "config.json"), timeout=10)
    except GatedRepoError as exc:
        raise LayerfoldError(f"hub model '{repo_id}' is gated: accept its terms on the hub and log in "
                             "(hf auth login)") from exc
    except RepositoryNotFoundError as exc:
        raise LayerfoldError(f"model '{repo_id}' is neither a local folder nor a hub model (or it is private: "
                             "log in with hf auth login)") from exc
    except EntryNotFoundError as exc:
        raise LayerfoldError(f"hub model '{repo_id}' has no config.json: not a transformers model") from exc
    except HfHubHTTPError as exc:
        if snapshot is not None:
            return snapshot
        raise LayerfoldError(f"the hub refused '{repo_id}': {_first_line(exc)}") from exc
    except Exception as exc:  # no network: connection or timeout errors of the HTTP client
        if snapshot is not None:
            return snapshot
        raise LayerfoldError(f"model '{repo_id}' is not a local folder, and the hub cannot be reached "
                             f"({type(exc).__name__}): check the name, or the network") from exc
    return repo_id


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
    label, path = resolve_source(name_or_path)  # before importing transformers: a bad name fails at once
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    local = Path(path).is_dir()
    device_map = resolve_device_map(device_map)
    torch_dtype = resolve_dtype(dtype)
    target_device = resolve_device(device) if device_map is None else None
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:  # ValueError: a config.json without a known model_type
        where = "its config.json cannot be used" if local else "not a local folder, and the hub said"
        raise LayerfoldError(f"cannot load model '{label}': {where}: {_first_line(exc)}") from exc
    arch = architecture_for(config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise LayerfoldError(f"cannot load the tokenizer of '{label}' (a model folder needs its tokenizer "
                             f"files): {_first_line(exc)}") from exc
    try:
        extra = {} if device_map is None else {"device_map": device_map}
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=False, **extra)
    except ValueError as exc:
        raise LayerfoldError(f"'{label}' is not a causal language model: {_first_line(exc)}") from exc
    except OSError as exc:  # no weights file
        raise LayerfoldError(f"cannot load the weights of '{label}': {_first_line(exc)}") from exc
    if target_device is not None:
        model.to(target_device)
    _check_offload(model, label)
    check_finite_weights(model, f"cannot use '{label}'", arch.layer_list(model))
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
