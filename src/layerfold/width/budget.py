"""How many units each layer loses for a parameter budget, how that budget may be shared between
attention and the MLP, and which units go (the lowest scores)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from layerfold.errors import LayerfoldError
from layerfold.width.importance import LayerScores
from layerfold.width.layout import Geometry, UnitCosts
from layerfold.width.plan import LayerWidth

ATTENTION_MODES = ("auto", "groups", "query-heads", "off")


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


def per_layer_budget(ratio: float | None, params: int | None, costs: UnitCosts, n_layers: int) -> float:
    if (ratio is None) == (params is None):
        raise LayerfoldError("give exactly one of a width ratio and a number of parameters to remove")
    if ratio is not None:
        if not 0 < ratio < 1:
            raise LayerfoldError(f"--width must be between 0 and 1 (exclusive), got {ratio}")
        return ratio * costs.prunable
    if params <= 0:
        raise LayerfoldError("the width step has no parameters to remove")
    return params / n_layers


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
