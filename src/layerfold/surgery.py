"""Apply a Plan: drop and fuse layers, rewrite the config, renumber, save atomically.

Surgery never decides what to cut; it only carries out a :class:`~layerfold.plan.Plan`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from torch import nn

from layerfold.errors import LayerfoldError
from layerfold.merge import build_fused_layer, scale_branches
from layerfold.models.arch import Architecture, architecture_for, get_dotted, set_dotted
from layerfold.plan import Plan

FusedOverrides = dict[int, dict[str, torch.Tensor]]


def apply_plan(model: nn.Module, plan: Plan, overrides: FusedOverrides | None = None) -> nn.Module:
    """Prune ``model`` in place following ``plan`` and return it.

    ``overrides`` maps a fuse window's base index to the full state dict of its fused layer
    (for fused layers whose weights were fitted on data rather than given by a merge operator).
    A fuse operation whose ``detail`` has ``channel_scale`` (branch path -> one factor per output
    channel) gets its fused layer's residual branches scaled channel by channel, then by
    ``branch_scale``, one factor for all (:func:`layerfold.merge.scale_branches`).
    """
    arch = architecture_for(model.config)
    layers = arch.layer_list(model)
    if len(layers) != plan.num_layers:
        raise LayerfoldError(f"plan is for {plan.num_layers} layers, the model has {len(layers)}")
    overrides = overrides or {}
    merge = plan.merge or {}
    fuse_at = {op.lo: op for op in plan.operations if op.kind == "fuse"}
    new_layers: list[nn.Module] = []
    sources = plan.kept_sources()
    for src in sources:
        if src in fuse_at:
            op = fuse_at[src]
            window = [layers[i] for i in op.layers]
            if src in overrides:
                fused = _layer_with_state(window[0], overrides[src])
            else:
                fused = build_fused_layer(window, operator=op.detail.get("merge", merge.get("operator", "diff")),
                                          norms=merge.get("norms", "base"), scale=op.detail.get("scale", 1.0))
            if op.detail.get("channel_scale"):
                scale_branches(fused, arch.residual_branches,
                               {path: torch.tensor(v, dtype=torch.float32)
                                for path, v in op.detail["channel_scale"].items()})
            if op.detail.get("branch_scale", 1.0) != 1.0:
                scale_branches(fused, arch.residual_branches, float(op.detail["branch_scale"]))
            new_layers.append(fused)
        else:
            new_layers.append(layers[src])
    arch.set_layer_list(model, nn.ModuleList(new_layers))
    renumber_layers(model, arch)
    rewrite_config(model.config, arch, sources)
    return model


def _layer_with_state(template: nn.Module, state: dict[str, torch.Tensor]) -> nn.Module:
    import copy

    layer = copy.deepcopy(template)
    missing = set(dict(layer.named_parameters())) - set(state)
    if missing:
        raise LayerfoldError(f"fused-layer weights miss {sorted(missing)[:3]}")
    with torch.no_grad():
        for name, param in layer.named_parameters():
            param.copy_(state[name].to(param.dtype))
    return layer


def renumber_layers(model: nn.Module, arch: Architecture) -> None:
    """Set the layer-index attributes (used by the KV cache) to the new positions."""
    for new_idx, layer in enumerate(arch.layer_list(model)):
        for attr in arch.layer_index_attrs:
            owner_path, _, name = attr.rpartition(".")
            try:
                owner = get_dotted(layer, owner_path) if owner_path else layer
            except LayerfoldError:
                continue
            if hasattr(owner, name):
                set_dotted(layer, attr, new_idx)


def rewrite_config(config, arch: Architecture, sources: list[int]) -> None:
    """Rewrite every config field that depends on the layer count for the kept ``sources``."""
    for key in arch.layer_count_keys:
        setattr(config, key, len(sources))
    for key in arch.per_layer_lists:
        values = getattr(config, key, None)
        if values is not None:
            setattr(config, key, [values[i] for i in sources])
    for key in arch.layers_below_keys:
        value = getattr(config, key, None)
        if value is not None:
            setattr(config, key, sum(1 for i in sources if i < value))
    for key in ("sliding_window_pattern", "_sliding_window_pattern"):
        # layer_types now spells the pattern out; a period would no longer line up
        if getattr(config, "layer_types", None) is not None and hasattr(config, key):
            try:
                delattr(config, key)
            except AttributeError:
                pass


SHARD_SIZE = "5GB"  # safetensors shard size: transformers 4's default (5's is 50GB, one file up to that)


def save_model(model: nn.Module, tokenizer, out: str | Path, overwrite: bool = False,
               extra_files: dict[str, str] | None = None, write_extra=None,
               max_shard_size: str | int = SHARD_SIZE) -> Path:
    """Save with ``save_pretrained`` into a temporary folder beside ``out``, then rename.

    The weights are written as safetensors shards of at most ``max_shard_size`` (with an index
    when there are several), one shard at a time from wherever the weights are (the CPU for a
    streamed model).  Nothing half-written is ever left at ``out``: a failure removes the
    temporary folder.
    """
    out = Path(out).expanduser().resolve()

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp, max_shard_size=max_shard_size)
        if write_extra is not None:
            write_extra(tmp)  # more files, written inside the temporary folder so they land atomically
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)

    write_folder(out, overwrite, write)
    return out


def write_folder(out: Path, overwrite: bool, write):
    """Run ``write(tmp)`` on a temporary folder beside ``out``, then rename it to ``out``
    (replacing an existing one only with ``overwrite``); return what ``write`` returned.
    Nothing half-written is ever left at ``out``: a failure removes the temporary folder."""
    if out.exists() and not overwrite:
        raise LayerfoldError(f"output folder {out} exists: choose another --out or pass --overwrite")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        result = write(tmp)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return result


def _move_into_place(tmp: Path, out: Path) -> None:
    """Rename ``tmp`` to ``out``; an existing ``out`` is set aside first, put back if the
    rename fails, and removed once the new folder is in place."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)


def config_summary(model: nn.Module) -> dict:
    cfg = model.config.to_dict()
    return {k: cfg[k] for k in ("model_type", "num_hidden_layers", "n_layer", "layer_types") if k in cfg}


def dumps(obj) -> str:
    return json.dumps(obj, indent=2)
