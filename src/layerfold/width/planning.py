"""Planning width pruning (which channels and heads go, without changing the model) and
:func:`shrink`, which plans and applies in one call."""

from __future__ import annotations

from dataclasses import asdict, replace

import torch
from torch import nn

from layerfold.data.tokens import CalibrationConfig, tokens_hash
from layerfold.errors import LayerfoldError, did_you_mean
from layerfold.evaluate.perplexity import perplexity_of_windows
from layerfold.models.arch import architecture_for, parameter_count
from layerfold.width.apply import apply_width, span
from layerfold.width.budget import (
    ATTENTION_MODES,
    attention_options,
    choose_units,
    per_layer_budget,
    plan_budget,
    removed_per_layer,
)
from layerfold.width.calibration import calibration_tokens, held_out_windows
from layerfold.width.importance import layer_scores
from layerfold.width.layout import Geometry, Layout, unit_costs
from layerfold.width.plan import LayerWidth, WidthPlan


def _model_of(model) -> tuple[nn.Module, object, str]:
    if isinstance(model, nn.Module):
        return model, None, "in-memory"
    return model.model, model.tokenizer, model.source


def plan_width(model, ratio: float | None = None, *, params: int | None = None, calibration=None,
               tokens: torch.Tensor | None = None, heldout_tokens: torch.Tensor | None = None,
               importance: str = "wanda-sp", attention: str = "auto", heads: int | None = None,
               multiple_of: int = 8, batch_size: int = 8, held_out: int = 16, progress: bool = True) -> WidthPlan:
    """Decide which channels and heads to remove, without changing the model.

    Give ``ratio`` (share of every layer's attention and MLP projection parameters to remove)
    or ``params`` (parameters to remove from all layers together).  ``attention="auto"`` tries
    a few ways to share the budget between attention and MLP (see :func:`attention_options`)
    and keeps the one with the lowest loss on ``heldout_tokens`` (by default ``held_out``
    held-out windows of the calibration source; the calibration tokens themselves when there
    is no tokenizer).
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
    per_layer = per_layer_budget(ratio, params, costs, len(layers))
    if attention != "auto":
        plan_budget(costs, geo, per_layer, attention, heads, multiple_of)  # fail before any work
    toks = calibration_tokens(tokenizer, calibration, tokens)
    scores = layer_scores(module, toks, importance, batch_size, progress)
    search: list[dict] = []
    if attention == "auto":
        held, where = _selection_tokens(tokenizer, calibration, tokens, heldout_tokens, toks, held_out)
        attention, budget, chosen, search = _search_attention(module, layout, geo, costs, per_layer, scores,
                                                              multiple_of, held, batch_size)
        search = [{**c, "selection_tokens": where} for c in search]
    else:
        budget = plan_budget(costs, geo, per_layer, attention, heads, multiple_of)
        chosen = [choose_units(sc, geo, budget) for sc in scores]
    after = replace(geo, heads=len(chosen[0].q_keep), kv_heads=len(chosen[0].kv_keep),
                    intermediate=len(chosen[0].mlp_keep))
    before_params = parameter_count(module)
    calib = {**(calibration.describe() if calibration is not None and tokens is None else {}),
             "tokens_sha256_16": tokens_hash(toks), "windows": int(toks.shape[0]), "seq_len": int(toks.shape[1])}
    target = {"ratio": ratio, "params": params, "heads": heads, "multiple_of": multiple_of,
              "removed_per_layer": asdict(budget), "attention_search": search or None}
    return WidthPlan(architecture=arch.name, importance=importance, attention=attention, before=geo.describe(),
                     after=after.describe(), layers=chosen, target={k: v for k, v in target.items() if v is not None},
                     calibration=calib, params_before=before_params,
                     params_after=before_params - len(layers) * removed_per_layer(budget, costs, geo),
                     model=source)


def _selection_tokens(tokenizer, calibration, tokens, heldout_tokens, calib_tokens,
                      held_out: int) -> tuple[torch.Tensor, str]:
    if heldout_tokens is not None:
        return heldout_tokens, "held-out tokens given"
    if tokenizer is not None and tokens is None:
        held = held_out_windows(tokenizer, calibration or CalibrationConfig(), held_out)
        return held, f"{held_out} held-out calibration windows"
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
    arch = architecture_for(module.config)
    saved: list[tuple[nn.Linear, torch.Tensor, torch.Tensor]] = []
    try:
        with torch.no_grad():
            for layer, lw in zip(arch.layer_list(module), chosen, strict=True):
                kept_heads = set(lw.q_keep)
                kept_mlp = set(lw.mlp_keep)
                for name, cols in (("o_proj", span([h for h in range(geo.heads) if h not in kept_heads],
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


def shrink(model, ratio: float | None = None, calibration=None, tokens: torch.Tensor | None = None,
           importance: str = "wanda-sp", *, params: int | None = None, attention: str = "auto",
           heads: int | None = None, multiple_of: int = 8, batch_size: int = 8,
           heldout_tokens: torch.Tensor | None = None, held_out: int = 16, progress: bool = True) -> WidthPlan:
    """Width-prune ``model`` (a LoadedModel or a transformers model) in place; returns the plan.

    ``ratio``: share of every decoder layer's attention and MLP projection parameters removed
    (or ``params``: parameters to remove in all).  Calibration comes from ``tokens``
    (``[N, T]`` ids) or ``calibration`` (a :class:`~layerfold.data.tokens.CalibrationConfig`).
    ``attention``: ``auto`` (default: the share between attention and MLP with the lowest
    held-out calibration loss), ``groups``, ``query-heads`` or ``off``; see :func:`plan_width`.
    """
    plan = plan_width(model, ratio, params=params, calibration=calibration, tokens=tokens,
                      heldout_tokens=heldout_tokens, importance=importance, attention=attention, heads=heads,
                      multiple_of=multiple_of, batch_size=batch_size, held_out=held_out, progress=progress)
    module = _model_of(model)[0]
    apply_width(module, plan)
    plan.params_after = parameter_count(module)
    return plan
