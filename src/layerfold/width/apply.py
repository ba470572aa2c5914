"""Applying a width plan: the only code of the width package that edits a model (weights sliced,
the modules' copies of the counts and the config rewritten)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from layerfold.errors import LayerfoldError
from layerfold.models.arch import architecture_for, get_dotted
from layerfold.width.layout import Geometry, Layout
from layerfold.width.plan import LayerWidth, WidthPlan

_ATTENTION_COUNT_ATTRS = ("num_key_value_groups", "num_key_value_heads", "num_heads", "num_attention_heads")


def _keep_rows(lin: nn.Linear, idx: torch.Tensor) -> None:
    idx = idx.to(lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.detach().index_select(0, idx).clone(),
                              requires_grad=lin.weight.requires_grad)
    if lin.bias is not None:
        lin.bias = nn.Parameter(lin.bias.detach().index_select(0, idx).clone(), requires_grad=lin.bias.requires_grad)
    lin.out_features = len(idx)


def _keep_cols(lin: nn.Linear, idx: torch.Tensor) -> None:
    idx = idx.to(lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.detach().index_select(1, idx).clone(),
                              requires_grad=lin.weight.requires_grad)
    lin.in_features = len(idx)


def span(units: Sequence[int], size: int) -> torch.Tensor:
    return torch.tensor([u * size + k for u in units for k in range(size)], dtype=torch.long)


def _check_layer(lw: LayerWidth, geo: Geometry, after: Geometry, index: int) -> None:
    per = after.heads // after.kv_heads
    ok = (len(lw.mlp_keep) == after.intermediate and len(lw.kv_keep) == after.kv_heads
          and len(lw.q_keep) == after.heads
          and all(geo.group_of(h) == lw.kv_keep[n // per] for n, h in enumerate(lw.q_keep))
          and all(0 <= j < geo.intermediate for j in lw.mlp_keep) and len(set(lw.mlp_keep)) == len(lw.mlp_keep))
    if not ok:
        raise LayerfoldError(f"width plan: layer {index} does not match the plan's widths or the model")


def shrink_layer(layer: nn.Module, layout: Layout, geo: Geometry, lw: LayerWidth) -> None:
    d = geo.head_dim
    q_rows, kv_rows = span(lw.q_keep, d), span(lw.kv_keep, d)
    if layout.qkv_proj:
        q_dim, kv_dim = geo.heads * d, geo.kv_heads * d
        _keep_rows(layout.linear(layer, "qkv_proj"), torch.cat([q_rows, q_dim + kv_rows, q_dim + kv_dim + kv_rows]))
    else:
        _keep_rows(layout.linear(layer, "q_proj"), q_rows)
        _keep_rows(layout.linear(layer, "k_proj"), kv_rows)
        _keep_rows(layout.linear(layer, "v_proj"), kv_rows)
    _keep_cols(layout.linear(layer, "o_proj"), q_rows)
    keep = torch.tensor(lw.mlp_keep, dtype=torch.long)
    if layout.gate_up_proj:
        _keep_rows(layout.linear(layer, "gate_up_proj"), torch.cat([keep, geo.intermediate + keep]))
    else:
        _keep_rows(layout.linear(layer, "gate_proj"), keep)
        _keep_rows(layout.linear(layer, "up_proj"), keep)
    _keep_cols(layout.linear(layer, "down_proj"), keep)


def _set_module_counts(layer: nn.Module, layout: Layout, after: Geometry) -> None:
    """Attention and MLP modules keep copies of the counts; forward passes read some of them."""
    attention = get_dotted(layer, layout.attention)
    values = {"num_key_value_groups": after.heads // after.kv_heads, "num_key_value_heads": after.kv_heads,
              "num_heads": after.heads, "num_attention_heads": after.heads}
    for attr in _ATTENTION_COUNT_ATTRS:
        if isinstance(getattr(attention, attr, None), int):
            setattr(attention, attr, values[attr])
    mlp = get_dotted(layer, layout.mlp)
    if isinstance(getattr(mlp, "intermediate_size", None), int):
        mlp.intermediate_size = after.intermediate


def rewrite_width_config(config, after: Geometry) -> None:
    """One width for all layers; ``head_dim`` is written explicitly so that it is not
    recomputed from ``hidden_size / num_attention_heads`` on reload."""
    config.intermediate_size = after.intermediate
    config.num_attention_heads = after.heads
    config.num_key_value_heads = after.kv_heads
    config.head_dim = after.head_dim


def apply_width(model: nn.Module, plan: WidthPlan) -> nn.Module:
    """Prune ``model`` in place following ``plan`` and return it."""
    arch = architecture_for(model.config)
    layout = Layout.of(arch)
    geo = Geometry.of(model.config)
    if geo.describe() != plan.before:
        raise LayerfoldError(f"width plan is for widths {plan.before}, the model has {geo.describe()}")
    after = Geometry(hidden=geo.hidden, heads=plan.after["num_attention_heads"],
                     kv_heads=plan.after["num_key_value_heads"], head_dim=geo.head_dim,
                     intermediate=plan.after["intermediate_size"])
    layers = arch.layer_list(model)
    if len(layers) != len(plan.layers):
        raise LayerfoldError(f"width plan is for {len(plan.layers)} layers, the model has {len(layers)}")
    for i, lw in enumerate(plan.layers):
        _check_layer(lw, geo, after, i)
    for layer, lw in zip(layers, plan.layers, strict=True):
        shrink_layer(layer, layout, geo, lw)
        _set_module_counts(layer, layout, after)
    rewrite_width_config(model.config, after)
    return model
