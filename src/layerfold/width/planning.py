"""Structured width pruning of the decoder layers, and depth plus width under one budget.

Width pruning removes whole MLP intermediate channels (a row of the gate and up projections
with the matching column of the down projection) and whole attention heads (rows of the
query, key and value projections with the matching columns of the output projection).
Under grouped-query attention the unit is a KV group: one key/value head together with
every query head that shares it; ``attention="query-heads"`` instead removes the same
number of query heads inside every group (the only way to thin multi-query attention).

transformers configs hold ONE ``intermediate_size`` and one head count for all layers, so
every layer loses the same number of channels and heads; which ones is chosen per layer by
importance.  The config is rewritten (``intermediate_size``, ``num_attention_heads``,
``num_key_value_heads`` and an explicit ``head_dim``) and the result loads with plain
``AutoModelForCausalLM.from_pretrained``.

Importance (per channel, per head):

- ``wanda-sp`` (default): activation-weighted magnitude of the output projection, as the
  Wanda-sp baseline of FLAP: mean over output rows of ``|W[:, j]|`` times ``||x_j||_2``,
  the norm of input channel ``j`` over all calibration tokens.
- ``flap``: FLAP's fluctuation metric, ``Var(x_j) * ||W[:, j]||^2`` (no bias compensation:
  Llama-style projections have no bias to absorb it).
- ``taylor``: LLM-Pruner's first-order element-wise importance, ``sum |w * dL/dw|`` over
  every weight of the channel or head, with the gradient of the calibration loss.

The activation statistics come from the layer inputs captured once with
:func:`layerfold.calibrate.capture`; each layer is then run once from its cached input.

A width plan is data (:class:`WidthPlan`, JSON): the kept channels and heads of every
layer; :func:`apply_width` is the only code here that edits a model.
"""

from __future__ import annotations

import copy
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from layerfold.errors import LayerfoldError, did_you_mean
from layerfold.models.arch import Architecture, all_architectures, architecture_for, get_dotted, parameter_count
from layerfold.output import check_out
from layerfold.surgery import apply_plan

IMPORTANCES = ("wanda-sp", "flap", "taylor")
ATTENTION_MODES = ("auto", "groups", "query-heads", "off")
AUTO_SPLITS = (0.0, 0.25, 0.5, 0.75, 1.0)
WIDTH_PLAN_VERSION = 1
_ATTENTION_COUNT_ATTRS = ("num_key_value_groups", "num_key_value_heads", "num_heads", "num_attention_heads")


# --------------------------------------------------------------------------- structure


@dataclass(frozen=True)
class Layout:
    """Where a decoder layer's projections are (dotted paths relative to the layer), read from
    the optional ``width`` entry of the architecture description."""

    attention: str
    mlp: str
    o_proj: str
    down_proj: str
    q_proj: str = ""
    k_proj: str = ""
    v_proj: str = ""
    qkv_proj: str = ""  # fused [q; k; v] rows (Phi-3)
    gate_proj: str = ""
    up_proj: str = ""
    gate_up_proj: str = ""  # fused [gate; up] rows (Phi-3)

    @classmethod
    def of(cls, arch: Architecture) -> Layout:
        if not arch.width:
            supported = sorted(t for a in all_architectures().values() if a.width for t in a.model_types)
            raise LayerfoldError(f"width pruning does not support '{arch.name}' models; supported model types: "
                                 f"{', '.join(supported)} (add a 'width' entry to its architecture description)")
        layout = cls(**arch.width)
        if not (layout.qkv_proj or (layout.q_proj and layout.k_proj and layout.v_proj)):
            raise LayerfoldError(f"{arch.name}: the width description needs q_proj, k_proj, v_proj or qkv_proj")
        if not (layout.gate_up_proj or (layout.gate_proj and layout.up_proj)):
            raise LayerfoldError(f"{arch.name}: the width description needs gate_proj and up_proj or gate_up_proj")
        return layout

    def linear(self, layer: nn.Module, name: str) -> nn.Linear:
        return get_dotted(layer, getattr(self, name))

    def input_rows(self) -> list[str]:
        """Projections whose output rows are pruned with attention heads (besides o_proj's columns)."""
        return ["qkv_proj"] if self.qkv_proj else ["q_proj", "k_proj", "v_proj"]

    def mlp_rows(self) -> list[str]:
        return ["gate_up_proj"] if self.gate_up_proj else ["gate_proj", "up_proj"]


@dataclass(frozen=True)
class Geometry:
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int

    @classmethod
    def of(cls, config) -> Geometry:
        per_layer = [k for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")
                     if isinstance(getattr(config, k, None), (list, tuple))]
        if per_layer:
            raise LayerfoldError(f"this model has no single configured width ({', '.join(per_layer)} given per "
                                 "layer); width pruning needs one intermediate_size and one head count for all "
                                 "layers")
        heads = int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        return cls(hidden=int(config.hidden_size), heads=heads, kv_heads=kv, head_dim=head_dim,
                   intermediate=int(config.intermediate_size))

    @property
    def q_per_group(self) -> int:
        return self.heads // self.kv_heads

    def group_of(self, head: int) -> int:
        return head // self.q_per_group

    def describe(self) -> dict:
        return {"intermediate_size": self.intermediate, "num_attention_heads": self.heads,
                "num_key_value_heads": self.kv_heads, "head_dim": self.head_dim}


@dataclass(frozen=True)
class UnitCosts:
    """Parameters removed with one unit, per layer."""

    mlp_channel: int
    query_head: int
    kv_group: int
    prunable: int  # all parameters of the layer's attention and MLP projections


def unit_costs(layer: nn.Module, layout: Layout, geo: Geometry) -> UnitCosts:
    def row(name: str) -> int:
        lin = layout.linear(layer, name)
        return lin.in_features + (1 if lin.bias is not None else 0)

    def col(name: str) -> int:
        return layout.linear(layer, name).out_features

    if layout.gate_up_proj:
        mlp = 2 * row("gate_up_proj") + col("down_proj")
    else:
        mlp = row("gate_proj") + row("up_proj") + col("down_proj")
    d = geo.head_dim
    if layout.qkv_proj:
        q_row = row("qkv_proj")
        kv = 2 * q_row
    else:
        q_row = row("q_proj")
        kv = row("k_proj") + row("v_proj")
    query_head = d * (q_row + col("o_proj"))
    kv_group = geo.q_per_group * query_head + d * kv
    names = {n for n in (*layout.input_rows(), "o_proj", *layout.mlp_rows(), "down_proj")}
    prunable = sum(p.numel() for n in names for p in layout.linear(layer, n).parameters())
    return UnitCosts(mlp_channel=mlp, query_head=query_head, kv_group=kv_group, prunable=prunable)


# --------------------------------------------------------------------------- the plan (data)


@dataclass
class LayerWidth:
    """Kept units of one layer (indices into the layer before pruning, ascending)."""

    mlp_keep: list[int]
    kv_keep: list[int]
    q_keep: list[int]  # global query-head indices, grouped in the order of kv_keep


@dataclass
class WidthPlan:
    architecture: str
    importance: str
    attention: str
    before: dict
    after: dict
    layers: list[LayerWidth]
    target: dict = field(default_factory=dict)
    calibration: dict = field(default_factory=dict)
    params_before: int | None = None
    params_after: int | None = None
    model: str = ""
    version: int = WIDTH_PLAN_VERSION

    def to_json(self) -> str:
        """Indented, but one line per layer (the kept-index lists are long)."""
        raw = asdict(self)
        layers = raw.pop("layers")
        head = json.dumps(raw, indent=1)
        rows = ",\n  ".join(json.dumps(lw, separators=(",", ":")) for lw in layers)
        return head[:-2] + ',\n "layers": [\n  ' + rows + "\n ]\n}"

    @classmethod
    def from_dict(cls, raw: dict) -> WidthPlan:
        if raw.get("version") != WIDTH_PLAN_VERSION:
            raise LayerfoldError(f"width plan version {raw.get('version')} is not {WIDTH_PLAN_VERSION}")
        raw = dict(raw)
        raw["layers"] = [LayerWidth(**lw) for lw in raw["layers"]]
        return cls(**raw)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> WidthPlan:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError, KeyError) as exc:
            raise LayerfoldError(f"cannot read width plan {path}: {exc}") from exc

    def summary(self) -> str:
        b, a = self.before, self.after
        return (f"width ({self.importance}, attention {self.attention}): intermediate {b['intermediate_size']} -> "
                f"{a['intermediate_size']}, heads {b['num_attention_heads']}/{b['num_key_value_heads']} KV -> "
                f"{a['num_attention_heads']}/{a['num_key_value_heads']} KV, head_dim {a['head_dim']}, "
                f"{len(self.layers)} layers")


# --------------------------------------------------------------------------- budget


@dataclass(frozen=True)
class WidthBudget:
    """Units removed in every layer."""

    kv_groups: int
    query_heads: int  # per kept group
    mlp_channels: int


def plan_budget(costs: UnitCosts, geo: Geometry, per_layer: float, attention: str = "groups",
                heads: int | None = None, multiple_of: int = 8) -> WidthBudget:
    """Turn a number of parameters to remove per layer into whole units.

    Attention loses the share of its units nearest the overall share (``heads`` overrides),
    never more than the budget; the MLP channels make up the rest, the kept count rounded to
    ``multiple_of``.
    """
    share = per_layer / costs.prunable
    groups = q_heads = 0
    if attention == "groups":
        groups = _attention_units(heads, share, geo.kv_heads, costs.kv_group, per_layer, "KV groups")
    elif attention == "query-heads":
        q_heads = _attention_units(heads, share, geo.q_per_group, costs.query_head * geo.kv_heads, per_layer,
                                   "query heads per group")
    elif heads:
        raise LayerfoldError("--heads needs --attention groups or query-heads")
    attn_cost = groups * costs.kv_group + q_heads * costs.query_head * (geo.kv_heads - groups)
    channels = max(0, round((per_layer - attn_cost) / costs.mlp_channel))
    keep = geo.intermediate - channels
    if multiple_of > 1 and channels:
        keep = max(multiple_of, round(keep / multiple_of) * multiple_of)
    keep = min(keep, geo.intermediate)
    if keep < 1:
        raise LayerfoldError(f"the width target removes every MLP channel ({geo.intermediate}); ask for less")
    return WidthBudget(kv_groups=groups, query_heads=q_heads, mlp_channels=geo.intermediate - keep)


def _attention_units(given: int | None, share: float, units: int, unit_cost: int, per_layer: float,
                     what: str) -> int:
    if given is not None:
        if not 0 <= given < units:
            raise LayerfoldError(f"--heads: can remove 0 to {units - 1} {what} here, got {given}")
        return given
    n = min(units - 1, round(share * units))
    while n > 0 and n * unit_cost > per_layer:
        n -= 1
    return n


# --------------------------------------------------------------------------- importance


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


# --------------------------------------------------------------------------- choosing units


def _lowest(scores: torch.Tensor, n: int) -> set[int]:
    """Indices of the ``n`` lowest scores (ties: lower index first, for determinism)."""
    if n == 0:
        return set()
    order = sorted(range(len(scores)), key=lambda j: (float(scores[j]), j))
    return set(order[:n])


def choose_units(scores: LayerScores, geo: Geometry, budget: WidthBudget) -> LayerWidth:
    drop_mlp = _lowest(scores.mlp, budget.mlp_channels)
    drop_groups = _lowest(scores.groups, budget.kv_groups)
    kv_keep = [g for g in range(geo.kv_heads) if g not in drop_groups]
    q_keep: list[int] = []
    for g in kv_keep:
        members = list(range(g * geo.q_per_group, (g + 1) * geo.q_per_group))
        drop = {members[j] for j in _lowest(scores.heads[members], budget.query_heads)}
        q_keep.extend(h for h in members if h not in drop)
    return LayerWidth(mlp_keep=[j for j in range(geo.intermediate) if j not in drop_mlp], kv_keep=kv_keep,
                      q_keep=q_keep)


# --------------------------------------------------------------------------- applying a plan


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


def _span(units: Sequence[int], size: int) -> torch.Tensor:
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
    q_rows, kv_rows = _span(lw.q_keep, d), _span(lw.kv_keep, d)
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


# --------------------------------------------------------------------------- planning


def _model_of(model) -> tuple[nn.Module, object, str]:
    if isinstance(model, nn.Module):
        return model, None, "in-memory"
    return model.model, model.tokenizer, model.source


def _calibration_tokens(tokenizer, calibration, tokens: torch.Tensor | None) -> torch.Tensor:
    if tokens is not None:
        return tokens
    from layerfold.data.tokens import CalibrationConfig, sample_windows

    if tokenizer is None:
        raise LayerfoldError("width pruning needs calibration tokens: pass tokens= or a model with a tokenizer")
    return sample_windows(tokenizer, calibration or CalibrationConfig())


def layer_scores(model: nn.Module, tokens: torch.Tensor, importance: str = "wanda-sp", batch_size: int = 8,
                 progress: bool = True) -> list[LayerScores]:
    """Importance of every layer's MLP channels, query heads and KV groups."""
    if importance not in IMPORTANCES:
        raise did_you_mean(importance, IMPORTANCES, "importance")
    arch = architecture_for(model.config)
    layout, geo = Layout.of(arch), Geometry.of(model.config)
    if importance == "taylor":
        return taylor_scores(model, arch, layout, geo, tokens, batch_size, progress)
    from layerfold.calibrate import capture

    cache = capture(model, arch, tokens, batch_size=batch_size, progress=progress)
    return activation_scores(cache, layout, geo, importance, progress)


def plan_width(model, ratio: float | None = None, *, params: int | None = None, calibration=None,
               tokens: torch.Tensor | None = None, heldout_tokens: torch.Tensor | None = None,
               importance: str = "wanda-sp", attention: str = "auto", heads: int | None = None,
               multiple_of: int = 8, batch_size: int = 8, progress: bool = True) -> WidthPlan:
    """Decide which channels and heads to remove, without changing the model.

    Give ``ratio`` (share of every layer's attention and MLP projection parameters to remove)
    or ``params`` (parameters to remove from all layers together).  ``attention="auto"`` tries
    a few ways to share the budget between attention and MLP (see :func:`attention_options`)
    and keeps the one with the lowest loss on ``heldout_tokens`` (by default held-out windows
    of the calibration source; the calibration tokens themselves when there is no tokenizer).
    """
    module, tokenizer, source = _model_of(model)
    arch = architecture_for(module.config)
    layout, geo = Layout.of(arch), Geometry.of(module.config)
    if attention not in ATTENTION_MODES:
        raise did_you_mean(attention, ATTENTION_MODES, "attention mode")
    if attention in ("auto", "off") and heads is not None:
        raise LayerfoldError("--heads needs --attention groups or query-heads")
    if multiple_of < 1:
        raise LayerfoldError("--multiple-of must be at least 1")
    layers = arch.layer_list(module)
    costs = unit_costs(layers[0], layout, geo)
    per_layer = _per_layer_budget(ratio, params, costs, len(layers))
    if attention != "auto":
        plan_budget(costs, geo, per_layer, attention, heads, multiple_of)  # fail before any work
    toks = _calibration_tokens(tokenizer, calibration, tokens)
    scores = layer_scores(module, toks, importance, batch_size, progress)
    search: list[dict] = []
    if attention == "auto":
        held, where = _selection_tokens(tokenizer, calibration, tokens, heldout_tokens, toks)
        attention, budget, chosen, search = _search_attention(module, layout, geo, costs, per_layer, scores,
                                                              multiple_of, held, batch_size)
        search = [{**c, "selection_tokens": where} for c in search]
    else:
        budget = plan_budget(costs, geo, per_layer, attention, heads, multiple_of)
        chosen = [choose_units(sc, geo, budget) for sc in scores]
    after = replace(geo, heads=len(chosen[0].q_keep), kv_heads=len(chosen[0].kv_keep),
                    intermediate=len(chosen[0].mlp_keep))
    before_params = parameter_count(module)
    from layerfold.data.tokens import tokens_hash

    calib = {**(calibration.describe() if calibration is not None and tokens is None else {}),
             "tokens_sha256_16": tokens_hash(toks), "windows": int(toks.shape[0]), "seq_len": int(toks.shape[1])}
    target = {"ratio": ratio, "params": params, "heads": heads, "multiple_of": multiple_of,
              "removed_per_layer": asdict(budget), "attention_search": search or None}
    return WidthPlan(architecture=arch.name, importance=importance, attention=attention, before=geo.describe(),
                     after=after.describe(), layers=chosen, target={k: v for k, v in target.items() if v is not None},
                     calibration=calib, params_before=before_params,
                     params_after=before_params - len(layers) * removed_per_layer(budget, costs, geo),
                     model=source)


def removed_per_layer(budget: WidthBudget, costs: UnitCosts, geo: Geometry) -> int:
    return (budget.mlp_channels * costs.mlp_channel + budget.kv_groups * costs.kv_group
            + budget.query_heads * (geo.kv_heads - budget.kv_groups) * costs.query_head)


def attention_options(costs: UnitCosts, geo: Geometry, per_layer: float, spread: int = 4) -> list[tuple[str, int]]:
    """Ways to take attention units within the budget, for ``attention="auto"``: none; whole KV
    groups; query heads in every group.  Each kind tries at most ``spread + 1`` counts spread
    evenly between 0 and the most the budget (and the model) allows."""
    options = [("off", 0)]
    for mode, units, cost in (("groups", geo.kv_heads - 1, costs.kv_group),
                              ("query-heads", geo.q_per_group - 1, costs.query_head * geo.kv_heads)):
        most = min(units, int(per_layer // cost))
        counts = sorted({round(most * k / spread) for k in range(1, spread + 1)} - {0})
        options += [(mode, n) for n in counts]
    return options


def _selection_tokens(tokenizer, calibration, tokens, heldout_tokens, calib_tokens) -> tuple[torch.Tensor, str]:
    if heldout_tokens is not None:
        return heldout_tokens, "held-out tokens given"
    if tokenizer is not None and tokens is None:
        from layerfold.data.tokens import CalibrationConfig

        return held_out_windows(tokenizer, calibration or CalibrationConfig(), 16), "16 held-out calibration windows"
    return calib_tokens, "calibration tokens (no held-out set given)"


def _search_attention(module, layout, geo, costs, per_layer, scores, multiple_of, held, batch_size):
    """Try each attention option (units masked in place, not removed) and keep the lowest loss."""
    best, search = None, []
    for mode, n in attention_options(costs, geo, per_layer):
        try:
            budget = plan_budget(costs, geo, per_layer, mode, n if mode != "off" else None, multiple_of)
        except LayerfoldError:
            continue
        chosen = [choose_units(sc, geo, budget) for sc in scores]
        nll = masked_loss(module, layout, geo, chosen, held, batch_size)
        search.append({"attention": mode, "heads": n, "mlp_channels": budget.mlp_channels, "heldout_nll": nll})
        if best is None or nll < best[0]:
            best = (nll, mode, budget, chosen)
    if best is None:
        raise LayerfoldError("the width target removes every MLP channel whatever attention gives; ask for less")
    return best[1], best[2], best[3], search


def masked_loss(module: nn.Module, layout: Layout, geo: Geometry, chosen: list[LayerWidth], tokens: torch.Tensor,
                batch_size: int = 8) -> float:
    """Mean next-token loss with the units not kept zeroed in the output projections (the same
    function as removing them), weights restored afterwards."""
    from layerfold.evaluate.perplexity import perplexity_of_windows

    arch = architecture_for(module.config)
    saved: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer, lw in zip(arch.layer_list(module), chosen, strict=True):
                kept_heads = set(lw.q_keep)
                kept_mlp = set(lw.mlp_keep)
                for name, cols in (("o_proj", _span([h for h in range(geo.heads) if h not in kept_heads],
                                                    geo.head_dim)),
                                   ("down_proj", torch.tensor([j for j in range(geo.intermediate)
                                                               if j not in kept_mlp], dtype=torch.long))):
                    lin = layout.linear(layer, name)
                    cols = cols.to(lin.weight.device)
                    saved.append((lin, cols, lin.weight[:, cols].clone()))
                    lin.weight[:, cols] = 0
        return perplexity_of_windows(module, tokens, bos=False, batch_size=batch_size, progress=False)[0]
    finally:
        with torch.no_grad():
            for lin, cols, values in reversed(saved):
                lin.weight[:, cols] = values


def _per_layer_budget(ratio: float | None, params: int | None, costs: UnitCosts, n_layers: int) -> float:
    if (ratio is None) == (params is None):
        raise LayerfoldError("give exactly one of a width ratio and a number of parameters to remove")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise LayerfoldError(f"--width must be between 0 and 1 (exclusive), got {ratio}")
        return ratio * costs.prunable
    if params <= 0:
        raise LayerfoldError("the width step has no parameters to remove")
    return params / n_layers


def shrink(model, ratio: float | None = None, calibration=None, tokens: torch.Tensor | None = None,
           importance: str = "wanda-sp", *, params: int | None = None, attention: str = "auto",
           heads: int | None = None, multiple_of: int = 8, batch_size: int = 8,
           heldout_tokens: torch.Tensor | None = None, progress: bool = True) -> WidthPlan:
    """Width-prune ``model`` (a LoadedModel or a transformers model) in place; returns the plan.

    ``ratio``: share of every decoder layer's attention and MLP projection parameters removed
    (or ``params``: parameters to remove in all).  Calibration comes from ``tokens``
    (``[N, T]`` ids) or ``calibration`` (a :class:`~layerfold.data.tokens.CalibrationConfig`).
    ``attention``: ``auto`` (default: the share between attention and MLP with the lowest
    held-out calibration loss), ``groups``, ``query-heads`` or ``off``; see :func:`plan_width`.
    """
    plan = plan_width(model, ratio, params=params, calibration=calibration, tokens=tokens,
                      heldout_tokens=heldout_tokens, importance=importance, attention=attention, heads=heads,
                      multiple_of=multiple_of, batch_size=batch_size, progress=progress)
    module = _model_of(model)[0]
    apply_width(module, plan)
    plan.params_after = parameter_count(module)
    return plan


# --------------------------------------------------------------------------- depth + width


@dataclass
class SplitCandidate:
    split: float
    layers: int | None = None
    params: int | None = None
    heldout_nll: float | None = None
    width: dict | None = None  # widths after, when width pruning took part
    attention: str | None = None  # how width pruning treated attention (auto picks one)
    attention_search: list | None = None
    depth_plan: str | None = None  # summary of the depth step's plan
    depth_options: dict | None = None  # the depth method's options, as validated
    error: str | None = None


@dataclass
class DepthWidthResult:
    """``loaded.model`` is the pruned model (with ``split="auto"``: the winning candidate's copy)."""

    loaded: object
    param_ratio: float
    split: float
    depth: object | None  # PlanResult of the depth step, None when no layer was removed
    width: WidthPlan | None
    layers_before: int
    layers_after: int
    params_before: int
    params_after: int
    candidates: list[SplitCandidate] = field(default_factory=list)

    @property
    def achieved_ratio(self) -> float:
        return 1 - self.params_after / self.params_before

    def summary(self) -> dict:
        return {"param_ratio": self.param_ratio, "split": self.split, "achieved_ratio": round(self.achieved_ratio, 4),
                "layers": [self.layers_before, self.layers_after], "params": [self.params_before, self.params_after],
                "width": self.width.after if self.width else None,
                "candidates": [asdict(c) for c in self.candidates]}


def held_out_windows(tokenizer, calibration, held_out: int) -> torch.Tensor:
    """Windows of the calibration source that are not calibration windows.

    Drawing ``samples + held_out`` windows with the same seed yields a superset of the
    calibration windows (the same permutation, or the same strides, extended); the extra
    ones are held out.
    """
    from layerfold.data.tokens import sample_windows

    cal = sample_windows(tokenizer, calibration)
    both = sample_windows(tokenizer, replace(calibration, samples=calibration.samples + held_out))
    seen = {tuple(row.tolist()) for row in cal}
    rows = [row for row in both if tuple(row.tolist()) not in seen]
    if not rows:
        raise LayerfoldError("no held-out calibration windows could be drawn; use more text or fewer samples")
    return torch.stack(rows)


def _parse_split(split: float | str) -> float | None:
    if split == "auto":
        return None
    try:
        value = float(split)
    except (TypeError, ValueError) as exc:
        raise LayerfoldError(f"--split must be 'auto' or a number in [0, 1], got '{split}'") from exc
    if not 0 <= value <= 1:
        raise LayerfoldError(f"--split must be 'auto' or a number in [0, 1], got {value}")
    return value


def _prune_at_split(loaded, param_ratio: float, split: float, method: str, calibration, tokens: torch.Tensor,
                    heldout: torch.Tensor | None, options: dict | None, width_options: dict, progress: bool):
    """Depth then width on ``loaded`` in place; returns (depth PlanResult or None, WidthPlan or None)."""
    from layerfold.methods.base import Target
    from layerfold.methods.planning import make_plan

    total = parameter_count(loaded.model)
    depth = None
    if split > 0:
        depth = make_plan(loaded, method, Target(param_ratio=split * param_ratio), calibration, options, progress,
                          tokens=tokens)
        apply_plan(loaded.model, depth.plan, depth.overrides)
    remaining = round(param_ratio * total) - (total - parameter_count(loaded.model))
    width = None
    if split < 1 and remaining > 0:
        width = shrink(loaded, params=remaining, tokens=tokens, heldout_tokens=heldout, progress=progress,
                       **width_options)
        if calibration is not None:
            width.calibration = {**calibration.describe(), **width.calibration}
    return depth, width


def depth_width_prune(loaded, param_ratio: float, split: float | str = "auto", method: str = "slm",
                      calibration=None, options: dict | None = None, *, importance: str = "wanda-sp",
                      attention: str = "auto", heads: int | None = None, multiple_of: int = 8,
                      splits: Sequence[float] = AUTO_SPLITS, held_out: int = 16, tokens: torch.Tensor | None = None,
                      heldout_tokens: torch.Tensor | None = None, progress: bool = True,
                      on_candidate: Callable | None = None) -> DepthWidthResult:
    """Remove ``param_ratio`` of all parameters: the share ``split`` of them by depth (planned by
    ``method`` with ``Target(param_ratio=split * param_ratio)`` and applied), the rest by width.

    Depth removes whole layers (rounded up by the target), so width takes what is left;
    ``split="auto"`` prunes a copy of the model at each of ``splits`` and keeps the one with
    the lowest loss on held-out calibration windows (never on an evaluation set).
    ``on_candidate(candidate, loaded_copy)`` is called for each pruned candidate before it is
    compared (benchmarks use it to evaluate every split).
    """
    from layerfold.data.tokens import CalibrationConfig
    from layerfold.evaluate.perplexity import perplexity_of_windows
    from layerfold.models.load import as_loaded

    loaded = as_loaded(loaded)
    if not 0 < param_ratio < 1:
        raise LayerfoldError(f"--param-ratio must be between 0 and 1 (exclusive), got {param_ratio}")
    fixed = _parse_split(split)
    Layout.of(loaded.arch)  # fail early on an unsupported architecture
    calibration = calibration or CalibrationConfig()
    tokens = _calibration_tokens(loaded.tokenizer, calibration, tokens)
    width_options = {"importance": importance, "attention": attention, "heads": heads, "multiple_of": multiple_of,
                     "batch_size": calibration.batch_size}
    layers_before = len(loaded.arch.layer_list(loaded.model))
    params_before = parameter_count(loaded.model)
    candidates: list[SplitCandidate] = []
    if heldout_tokens is None and loaded.tokenizer is not None and (fixed is None or attention == "auto"):
        heldout_tokens = held_out_windows(loaded.tokenizer, calibration, held_out)
    if fixed is not None:
        depth, width = _prune_at_split(loaded, param_ratio, fixed, method, calibration, tokens, heldout_tokens,
                                       options, width_options, progress)
        chosen = fixed
    else:
        if heldout_tokens is None:
            raise LayerfoldError("split='auto' needs held-out tokens: pass heldout_tokens= or a tokenizer")
        best = None
        for s in (_parse_split(v) for v in splits):
            trial = replace(loaded, model=copy.deepcopy(loaded.model))
            cand = SplitCandidate(split=s)
            candidates.append(cand)
            try:
                depth, width = _prune_at_split(trial, param_ratio, s, method, calibration, tokens, heldout_tokens,
                                               options, width_options, progress)
            except LayerfoldError as exc:
                cand.error = str(exc)
                continue
            cand.layers = len(trial.arch.layer_list(trial.model))
            cand.params = parameter_count(trial.model)
            if depth is not None:
                cand.depth_plan = depth.plan.summary()
                cand.depth_options = depth.plan.provenance.get("options")
            if width is not None:
                cand.width, cand.attention = width.after, width.attention
                cand.attention_search = width.target.get("attention_search")
            cand.heldout_nll = perplexity_of_windows(trial.model, heldout_tokens, bos=False,
                                                     batch_size=calibration.batch_size, progress=False)[0]
            if on_candidate is not None:
                on_candidate(cand, trial)
            if best is None or cand.heldout_nll < best[0]:
                best = (cand.heldout_nll, s, trial, depth, width)
            del trial
        if best is None:
            raise LayerfoldError(f"no split could reach --param-ratio {param_ratio}: {candidates[-1].error}")
        _, chosen, trial, depth, width = best
        loaded.model = trial.model
    return DepthWidthResult(loaded=loaded, param_ratio=param_ratio, split=chosen, depth=depth, width=width,
                            layers_before=layers_before, layers_after=len(loaded.arch.layer_list(loaded.model)),
                            params_before=params_before, params_after=parameter_count(loaded.model),
                            candidates=candidates)


@dataclass
class ShrinkRecord:
    """Before/after figures written into the model card and ``shrink.json``."""

    layers: tuple[int, int]
    params: tuple[int, int]
    perplexity_before: dict[str, float] = field(default_factory=dict)
    perplexity_after: dict[str, float] = field(default_factory=dict)
    depth_width: dict | None = None


def save_shrunk(loaded, out: str | Path, width: WidthPlan | None, depth=None, record: ShrinkRecord | None = None,
                command: str = "", overwrite: bool = False) -> Path:
    """Save the model as a plain Hugging Face folder with ``width_plan.json``, the depth
    ``plan.json`` (if any), ``shrink.json`` and a model card."""
    from layerfold.output import save_model
    from layerfold.plan import save_plan

    extra = {"README.md": _card(loaded, width, depth, record, command)}
    if width is not None:
        extra["width_plan.json"] = width.to_json() + "\n"
    if depth is not None:
        extra["plan.json"] = depth.plan.to_json() + "\n"
    if record is not None:
        extra["shrink.json"] = json.dumps(asdict(record), indent=2) + "\n"
    saved = save_model(loaded.model, loaded.tokenizer, out, overwrite=overwrite, extra_files=extra)
    if depth is not None and depth.overrides:
        save_plan(depth, saved / "plan.json")
    return saved


def _card(loaded, width: WidthPlan | None, depth, record: ShrinkRecord | None, command: str) -> str:
    lines = ["---", "library_name: transformers", "tags: [layerfold, width-pruning]", "---",
             f"# {Path(str(loaded.source)).name} shrunk by layerfold", ""]
    if record is not None:
        lines += [f"Decoder layers {record.layers[0]} -> {record.layers[1]}; parameters {record.params[0]:,} -> "
                  f"{record.params[1]:,} ({1 - record.params[1] / record.params[0]:.1%} removed).", ""]
    if depth is not None:
        lines += ["Depth: " + depth.plan.summary().replace("\n", " "), ""]
    if width is not None:
        text = width.summary()
        lines += [text[0].upper() + text[1:] + ". Every layer keeps the same number of MLP channels and heads "
                  "(chosen per layer by importance), because a transformers config holds one "
                  "`intermediate_size` and one head count; `head_dim` is written explicitly.", ""]
    if record is not None and record.depth_width:
        dw = record.depth_width
        lines += [f"Budget: --param-ratio {dw['param_ratio']}, split {dw['split']} (share of the removed "
                  "parameters taken by depth).", ""]
        if dw["candidates"]:
            lines += ["| split | layers | parameters | held-out calibration NLL |", "|---|---|---|---|"]
            for c in dw["candidates"]:
                loss = c["error"] if c["error"] is not None else f"{c['heldout_nll']:.4f}"
                lines.append(f"| {c['split']} | {c['layers']} | {c['params']} | {loss} |")
            lines.append("")
    if record is not None and record.perplexity_before:
        lines += ["| perplexity (128-token windows, no BOS) | before | after |", "|---|---|---|"]
        lines += [f"| {s} | {v:.2f} | {record.perplexity_after.get(s, float('nan')):.2f} |"
                  for s, v in record.perplexity_before.items()]
        lines.append("")
    lines += ["Load it with plain transformers:", "", "```python", "from transformers import AutoModelForCausalLM",
              'model = AutoModelForCausalLM.from_pretrained("<this folder>")', "```", ""]
    if width is not None:
        again = (f"layerfold prune {loaded.source} --plan plan.json --width-plan width_plan.json" if depth is not None
                 else f"layerfold shrink {loaded.source} --plan width_plan.json")
        lines += [f"The plans are data: `{again}` applies them again.", ""]
    if command:
        lines += ["Made with:", "", f"    {command}", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- `layerfold prune` with width


@dataclass(frozen=True)
class WidthRequest:
    """Width pruning inside ``layerfold prune`` (one output folder): exactly one of

    - ``ratio`` (``--width R``): after the depth step (any depth target, or a saved ``--plan``),
      remove ``R`` of every remaining decoder layer's attention and MLP projection parameters,
      as ``layerfold shrink --width R``;
    - ``split`` (``--split auto|D`` with ``--param-ratio P``): ``P`` of ALL parameters removed,
      the share ``D`` by depth and the rest by width, as ``layerfold shrink --param-ratio P --split D``;
    - ``plan`` (``--width-plan``): a saved ``width_plan.json`` applied after the depth step.

    The other fields are ``layerfold shrink``'s options, with its defaults.
    """

    ratio: float | None = None
    split: float | str | None = None
    plan: str | Path | None = None
    importance: str = "wanda-sp"
    attention: str = "auto"
    heads: int | None = None
    multiple_of: int = 8
    held_out: int = 16

    def __post_init__(self) -> None:
        given = [name for name, v in (("--width", self.ratio), ("--split", self.split), ("--width-plan", self.plan))
                 if v is not None]
        if len(given) != 1:
            raise LayerfoldError("give one of --width (width after the depth step), --split (one --param-ratio "
                                 "shared by depth and width) and --width-plan" + (f", not {' and '.join(given)}"
                                                                                   if given else ""))
        if self.ratio is not None and not 0 < self.ratio < 1:
            raise LayerfoldError(f"--width must be between 0 and 1 (exclusive), got {self.ratio}")
        if self.split is not None:
            _parse_split(self.split)
        if self.plan is not None and not Path(self.plan).is_file():
            raise LayerfoldError(f"width plan file {self.plan} does not exist")
        if self.importance not in IMPORTANCES:
            raise did_you_mean(self.importance, IMPORTANCES, "importance")
        if self.attention not in ATTENTION_MODES:
            raise did_you_mean(self.attention, ATTENTION_MODES, "attention mode")
        if self.heads is not None and self.attention not in ("groups", "query-heads"):
            raise LayerfoldError("--heads needs --attention groups or query-heads")
        if self.multiple_of < 1:
            raise LayerfoldError("--multiple-of must be at least 1")
        if self.held_out < 1:
            raise LayerfoldError("--held-out must be at least 1")

    @classmethod
    def from_options(cls, ratio: float | None = None, split: str | None = None, plan: str | Path | None = None,
                     **options) -> WidthRequest | None:
        """From command-line options (``None``: not given); None when no width pruning is asked for."""
        given = {k: v for k, v in options.items() if v is not None}
        if ratio is None and split is None and plan is None:
            if given:
                names = ", ".join("--" + k.replace("_", "-") for k in given)
                raise LayerfoldError(f"{names}: width pruning options; add --width, --split (with --param-ratio) "
                                     "or --width-plan")
            return None
        return cls(ratio=ratio, split=split, plan=plan, **given)

    def check_depth(self, target, plan, options: dict | None) -> None:
        """Refuse depth settings that do not go with this request (before any work)."""
        if self.split is None:
            return
        if target is None or target.param_ratio is None or target.layers is not None or target.ratio is not None:
            raise LayerfoldError("--split shares --param-ratio between depth and width: give --param-ratio "
                                 "(not --ratio or --target-layers)")
        if plan is not None:
            raise LayerfoldError("--split plans depth and width together; it cannot apply a saved --plan "
                                 "(use --width or --width-plan with --plan)")
        if (options or {}).get("threshold") is not None:
            raise LayerfoldError("--split aims depth at a share of --param-ratio; drop --threshold")

    def width_options(self) -> dict:
        return {"importance": self.importance, "attention": self.attention, "heads": self.heads,
                "multiple_of": self.multiple_of}


def check_width_support(loaded) -> None:
    """Fail before any work on an architecture or config that width pruning cannot handle."""
    Layout.of(loaded.arch)
    Geometry.of(loaded.model.config)


def prune_with_width(loaded, out: str | Path | None, request: WidthRequest, *, method: str = "slm", target=None,
                     calibration=None, options: dict | None = None, plan=None, overwrite: bool = False,
                     ppl: tuple[str, ...] = (), ppl_windows: int | None = 40, progress: bool = True,
                     command: str | None = None):
    """Depth then width on ``loaded`` in place, saved as ONE plain Hugging Face folder (with
    ``plan.json`` when depth removed layers, ``width_plan.json``, ``shrink.json`` and a model
    card); returns an :class:`layerfold.api.PruneReport`.  ``api.prune(..., width=request)``
    comes here."""
    from layerfold.data.tokens import CalibrationConfig
    from layerfold.evaluate.perplexity import perplexities
    from layerfold.methods.planning import make_plan
    from layerfold.output import PruneReport, command_line
    from layerfold.plan import PlanResult, load_plan

    request.check_depth(target, plan, options)
    check_out(out, overwrite)
    check_width_support(loaded)
    calibration = calibration or CalibrationConfig()
    start = time.perf_counter()
    layers_before, params_before = len(loaded.arch.layer_list(loaded.model)), parameter_count(loaded.model)
    before = perplexities(loaded, ppl, ppl_windows, progress)
    depth, summary = None, None
    if request.split is not None:
        result = depth_width_prune(loaded, target.param_ratio, request.split, method, calibration, options,
                                   held_out=request.held_out, progress=progress, **request.width_options())
        depth, wplan, summary = result.depth, result.width, result.summary()
    else:
        depth = (plan if isinstance(plan, PlanResult) else load_plan(plan) if plan is not None
                 else make_plan(loaded, method, target, calibration, options, progress))
        apply_plan(loaded.model, depth.plan, depth.overrides)
        if request.plan is not None:
            wplan = WidthPlan.load(request.plan)
            apply_width(loaded.model, wplan)
            wplan.params_after = parameter_count(loaded.model)
        else:
            heldout = None
            if request.attention == "auto" and loaded.tokenizer is not None:
                heldout = held_out_windows(loaded.tokenizer, calibration, request.held_out)
            wplan = shrink(loaded, request.ratio, calibration=calibration, heldout_tokens=heldout,
                           batch_size=calibration.batch_size, progress=progress, **request.width_options())
    after = perplexities(loaded, ppl, ppl_windows, progress)
    record = ShrinkRecord(layers=(layers_before, len(loaded.arch.layer_list(loaded.model))),
                          params=(params_before, parameter_count(loaded.model)), perplexity_before=before,
                          perplexity_after=after, depth_width=summary)
    report = PruneReport(plan=depth.plan if depth is not None else None, out=None, layers_before=layers_before,
                             layers_after=record.layers[1], params_before=params_before,
                             params_after=record.params[1], perplexity_before=before, perplexity_after=after,
                             seconds=time.perf_counter() - start, ppl_windows=ppl_windows, width=wplan,
                             depth_width=summary)
    if out is not None:
        report.out = save_shrunk(loaded, out, wplan, depth, record, command=command or command_line(),
                                 overwrite=overwrite)
    return report


def width_ratio_of(params_removed: int, model: nn.Module) -> float:
    """Share of the decoder layers' attention and MLP projection parameters that ``params_removed`` is."""
    arch = architecture_for(model.config)
    layers = arch.layer_list(model)
    costs = unit_costs(layers[0], Layout.of(arch), Geometry.of(model.config))
    return params_removed / (costs.prunable * len(layers))


__all__ = ["ATTENTION_MODES", "AUTO_SPLITS", "IMPORTANCES", "DepthWidthResult", "Layout", "ShrinkRecord", "WidthPlan",
           "WidthRequest", "apply_width", "depth_width_prune", "layer_scores", "plan_width", "prune_with_width",
           "save_shrunk", "shrink"]
