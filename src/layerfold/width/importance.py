"""Importance of every layer's MLP channels, query heads and KV groups.

- ``wanda-sp`` (default): activation-weighted magnitude of the output projection, as the
  Wanda-sp baseline of FLAP: mean over output rows of ``|W[:, j]|`` times ``||x_j||_2``,
  the norm of input channel ``j`` over all calibration tokens.
- ``flap``: FLAP's fluctuation metric, ``Var(x_j) * ||W[:, j]||^2`` (no bias compensation:
  Llama-style projections have no bias to absorb it).
- ``taylor``: LLM-Pruner's first-order element-wise importance, ``sum |w * dL/dw|`` over
  every weight of the channel or head, with the gradient of the calibration loss.

The activation statistics come from the layer inputs captured once with
:func:`layerfold.calibrate.capture`; each layer is then run once from its cached input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from layerfold.calibrate import capture
from layerfold.errors import did_you_mean
from layerfold.models.arch import Architecture, architecture_for
from layerfold.width.layout import Geometry, Layout

IMPORTANCES = ("wanda-sp", "flap", "taylor")


@dataclass
class LayerScores:
    mlp: torch.Tensor  # [intermediate]
    heads: torch.Tensor  # [heads], per query head
    groups: torch.Tensor  # [kv_heads]


class _InputStats:
    """Running per-channel sum and sum of squares of a module's input."""

    def __init__(self) -> None:
        self.sum: torch.Tensor | None = None
        self.sumsq: torch.Tensor | None = None
        self.count = 0

    def hook(self, module, args) -> None:
        x = args[0].detach().float().reshape(-1, args[0].shape[-1])
        s, sq = x.sum(0).cpu(), x.pow(2).sum(0).cpu()
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = sq if self.sumsq is None else self.sumsq + sq
        self.count += x.shape[0]

    def variance(self) -> torch.Tensor:
        mean = self.sum / self.count
        return (self.sumsq / self.count - mean.pow(2)).clamp_min(0) * self.count / max(1, self.count - 1)


def _channel_scores(weight: torch.Tensor, stats: _InputStats, importance: str) -> torch.Tensor:
    w = weight.detach().float().cpu()
    if importance == "wanda-sp":
        return w.abs().mean(0) * stats.sumsq.sqrt()
    return stats.variance() * w.pow(2).sum(0)


def _heads_from_channels(channel: torch.Tensor, geo: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    heads = channel.view(geo.heads, geo.head_dim).sum(1)
    return heads, heads.view(geo.kv_heads, geo.q_per_group).sum(1)


def activation_scores(cache, layout: Layout, geo: Geometry, importance: str,
                      progress: bool = True) -> list[LayerScores]:
    """Score every layer's channels and heads from its cached inputs (one pass per layer)."""
    scores = []
    for i, layer in enumerate(tqdm(cache.layers, desc=f"importance ({importance})", disable=not progress,
                                   leave=False)):
        o, down = layout.linear(layer, "o_proj"), layout.linear(layer, "down_proj")
        o_stats, down_stats = _InputStats(), _InputStats()
        handles = [o.register_forward_pre_hook(o_stats.hook), down.register_forward_pre_hook(down_stats.hook)]
        try:
            cache.run(i, [(layer, i)])
        finally:
            for h in handles:
                h.remove()
        heads, groups = _heads_from_channels(_channel_scores(o.weight, o_stats, importance), geo)
        scores.append(LayerScores(mlp=_channel_scores(down.weight, down_stats, importance), heads=heads,
                                  groups=groups))
    return scores


def taylor_scores(model: nn.Module, arch: Architecture, layout: Layout, geo: Geometry, tokens: torch.Tensor,
                  batch_size: int = 8, progress: bool = True) -> list[LayerScores]:
    """LLM-Pruner's element-wise first-order importance ``sum |w * dL/dw|`` per unit, with the
    gradient of the mean next-token loss over the calibration tokens."""
    layers = arch.layer_list(model)
    names = [*layout.input_rows(), "o_proj", *layout.mlp_rows(), "down_proj"]
    watched = {id(p) for layer in layers for n in names for p in layout.linear(layer, n).parameters()}
    flags = {p: p.requires_grad for p in model.parameters()}
    device = next(model.parameters()).device
    chunks = list(torch.split(tokens, batch_size))
    try:
        for p in model.parameters():
            p.requires_grad_(id(p) in watched)
            p.grad = None
        with torch.enable_grad():
            for chunk in tqdm(chunks, desc="importance (taylor)", disable=not progress, leave=False):
                chunk = chunk.to(device)
                loss = model(input_ids=chunk, labels=chunk, use_cache=False).loss
                (loss * len(chunk) / len(tokens)).backward()
        return [_taylor_layer(layer, layout, geo) for layer in layers]
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None


def _saliency(lin: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """|w * grad| of the weight, and of the bias (or None)."""
    w = (lin.weight.detach() * lin.weight.grad).abs().float().cpu()
    b = None
    if lin.bias is not None and lin.bias.grad is not None:
        b = (lin.bias.detach() * lin.bias.grad).abs().float().cpu()
    return w, b


def _row_scores(lin: nn.Linear) -> torch.Tensor:
    w, b = _saliency(lin)
    return w.sum(1) + (b if b is not None else 0)


def _taylor_layer(layer: nn.Module, layout: Layout, geo: Geometry) -> LayerScores:
    n_int, d = geo.intermediate, geo.head_dim
    mlp = _saliency(layout.linear(layer, "down_proj"))[0].sum(0)
    if layout.gate_up_proj:
        rows = _row_scores(layout.linear(layer, "gate_up_proj"))
        mlp = mlp + rows[:n_int] + rows[n_int:]
    else:
        mlp = mlp + _row_scores(layout.linear(layer, "gate_proj")) + _row_scores(layout.linear(layer, "up_proj"))
    q_dim, kv_dim = geo.heads * d, geo.kv_heads * d
    if layout.qkv_proj:
        rows = _row_scores(layout.linear(layer, "qkv_proj"))
        q, k, v = rows[:q_dim], rows[q_dim:q_dim + kv_dim], rows[q_dim + kv_dim:]
    else:
        q, k, v = (_row_scores(layout.linear(layer, n)) for n in ("q_proj", "k_proj", "v_proj"))
    heads = (q + _saliency(layout.linear(layer, "o_proj"))[0].sum(0)).view(geo.heads, d).sum(1)
    groups = heads.view(geo.kv_heads, geo.q_per_group).sum(1) + (k + v).view(geo.kv_heads, d).sum(1)
    return LayerScores(mlp=mlp, heads=heads, groups=groups)


def layer_scores(model: nn.Module, tokens: torch.Tensor, importance: str = "wanda-sp", batch_size: int = 8,
                 progress: bool = True) -> list[LayerScores]:
    """Importance of every layer's MLP channels, query heads and KV groups."""
    if importance not in IMPORTANCES:
        raise did_you_mean(importance, IMPORTANCES, "importance")
    arch = architecture_for(model.config)
    layout, geo = Layout.of(arch), Geometry.of(model.config)
    if importance == "taylor":
        return taylor_scores(model, arch, layout, geo, tokens, batch_size, progress)
    cache = capture(model, arch, tokens, batch_size=batch_size, progress=progress)
    return activation_scores(cache, layout, geo, importance, progress)
