"""Apply a Plan: drop and fuse layers, rewrite the config, renumber, save atomically.

Surgery never decides what to cut; it only carries out a :class:`~layerfold.plan.Plan`.
"""

from __future__ import annotations

import json

import torch
from torch import nn

from layerfold.errors import LayerfoldError
from layerfold.finite import check_finite_layers
from layerfold.merge import build_fused_layer, scale_branches
from layerfold.models.arch import Architecture, architecture_for, get_dotted, set_dotted
from layerfold.plan import Plan, check_plan_matches

FusedOverrides = dict[int, dict[str, torch.Tensor]]


def apply_plan(model: nn.Module, plan: Plan, overrides: FusedOverrides | None = None,
               force: bool = False) -> nn.Module:
    """Prune ``model`` in place following ``plan`` and return it.

    ``overrides`` maps a fuse window's base index to the full state dict of its fused layer
    (for fused layers whose weights were fitted on data rather than given by a merge operator).
    A fuse operation whose ``detail`` has ``channel_scale`` (branch path -> one factor per output
    channel) gets its fused layer's residual branches scaled channel by channel, then by
    ``branch_scale``, one factor for all (:func:`layerfold.merge.scale_branches`).

    A plan made for another model (its fingerprint differs) is refused unless ``force``
    (:func:`layerfold.plan.check_plan_matches`); fused layers with non-finite weights are
    refused before the model is changed.
    """
    arch = architecture_for(model.config)
    layers = arch.layer_list(model)
    if len(layers) != plan.num_layers:
        raise LayerfoldError(f"plan is for {plan.num_layers} layers, the model has {len(layers)}")
    check_plan_matches(plan, model, force)
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
            check_finite_layers([(src, fused)], f"fusing layers {op.lo}..{op.hi} gave non-finite weights "
                                                 "(the source layers or the merge options are broken)")
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


def config_summary(model: nn.Module) -> dict:
    cfg = model.config.to_dict()
    return {k: cfg[k] for k in ("model_type", "num_hidden_layers", "n_layer", "layer_types") if k in cfg}


def dumps(obj) -> str:
    return json.dumps(obj, indent=2)
