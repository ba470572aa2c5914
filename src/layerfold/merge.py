"""Merge operators: turn one window of consecutive layers into the weights of one layer.

``layers[0]`` is the window's base (its lowest layer, whose position the fused layer takes);
``layers[-1]`` is its top.  Every parameter of the layer takes part, biases included.
Normalisation parameters follow ``norms``: ``"base"`` keeps the base layer's, ``"merge"``
applies the operator to them too.  ``reference`` is the exception: it keeps the base layer's
norms and biases whatever ``norms`` says, as the authors' code does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from layerfold.errors import LayerfoldError
from layerfold.models.arch import norm_parameter_names
from layerfold.registry import Registry

MERGES: Registry = Registry("merge operator")
NORM_POLICIES = ("base", "merge")


def _accumulate(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    return [t.detach().to(torch.float32) for t in tensors]


@MERGES.register("diff")
def merge_diff(values: list[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """The paper (SLM, arXiv 2502.19159, eq. 4): theta_base + scale * sum_k (theta_k - theta_base)."""
    base, *others = _accumulate(values)
    out = base.clone()
    for t in others:
        out += scale * (t - base)
    return out


@MERGES.register("mean")
def merge_mean(values: list[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """Plain average of the window (model-soup style)."""
    return torch.stack(_accumulate(values)).mean(0)


@MERGES.register("reference")
def merge_reference(values: list[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """The authors' released code: its in-place loop over the window, base <- base + (layer - base),
    leaves the top layer's weights in the base layer.  It writes only the projections' weights:
    norms and biases stay the base's (see :func:`merge_window`)."""
    return values[-1].detach().to(torch.float32).clone()


@MERGES.register("base")
def merge_keep_base(values: list[torch.Tensor], scale: float = 1.0) -> torch.Tensor:
    """Keep the base layer as it is: the window's upper layers are simply removed."""
    return values[0].detach().to(torch.float32).clone()


def merge_window(layers: Sequence[nn.Module], operator: str = "diff", norms: str = "base",
                 scale: float = 1.0) -> dict[str, torch.Tensor]:
    """State dict (relative to one layer) of the fused layer."""
    fn = MERGES.get(operator)
    states, names = _window_states(layers, norms)
    from_base = _taken_from_base(layers[0], operator, norms)
    merged: dict[str, torch.Tensor] = {}
    for name in names:
        values = [st[name] for st in states]
        if name in from_base:
            out = values[0].detach().to(torch.float32).clone()
        else:
            out = fn(values, scale=scale)
        merged[name] = out.to(values[0].dtype)
    return merged


def _taken_from_base(layer: nn.Module, operator: str, norms: str) -> set[str]:
    """Names of the parameters the fused layer takes unmerged from the base layer."""
    names = norm_parameter_names(layer) if norms == "base" or operator == "reference" else set()
    if operator == "reference":  # the authors' loop writes only the projections' weights
        names |= {name for name, _ in layer.named_parameters() if name.rsplit(".", 1)[-1] == "bias"}
    return names


def _window_states(layers: Sequence[nn.Module], norms: str) -> tuple[list[dict[str, torch.Tensor]], list[str]]:
    """Each layer's parameters by name, after checking the window can be merged."""
    if len(layers) < 2:
        raise LayerfoldError("a merge window needs at least two layers")
    if norms not in NORM_POLICIES:
        raise LayerfoldError(f"unknown norm policy '{norms}': choose one of {', '.join(NORM_POLICIES)}")
    states = [dict(layer.named_parameters()) for layer in layers]
    names = list(states[0])
    for i, st in enumerate(states[1:], 1):
        if list(st) != names or any(st[n].shape != states[0][n].shape for n in names):
            raise LayerfoldError(f"layers 0 and {i} of the window differ in structure; they cannot be merged")
    return states, names


BRANCH_KINDS = ("linear", "unit-offset-norm")


@torch.no_grad()
def scale_branches(layer: nn.Module, branches: dict[str, str] | None,
                   factor: float | Mapping[str, torch.Tensor]) -> None:
    """Scale in place everything ``layer`` adds to its residual stream by ``factor``.

    ``branches`` is the architecture's ``residual_branches`` (dotted module path -> kind).  A
    number scales every branch alike: with 0 the layer passes its input through unchanged, with 1
    it is untouched.  A mapping gives, for some of the branches (by path), one factor per output
    channel (a vector as long as the hidden size)."""
    from layerfold.models.arch import get_dotted

    if not branches:
        raise LayerfoldError("this architecture does not describe its residual branches "
                             "(residual_branches), so its layers cannot be rescaled")
    if not isinstance(factor, Mapping):
        if factor == 1.0:
            return
        per_path = {path: torch.tensor(float(factor)) for path in branches}
    else:
        unknown = sorted(set(factor) - set(branches))
        if unknown:
            raise LayerfoldError(f"channel factors for {unknown}, which are not residual branches of this "
                                 f"architecture ({', '.join(branches)})")
        per_path = {path: torch.as_tensor(v, dtype=torch.float32) for path, v in factor.items()}
    for path, scale in per_path.items():
        module, kind = get_dotted(layer, path), branches[path]
        if kind not in BRANCH_KINDS:
            raise LayerfoldError(f"unknown residual branch kind '{kind}' for {path}: choose one of "
                                 f"{', '.join(BRANCH_KINDS)}")
        out_dim = 1 if kind == "linear" and hasattr(module, "nf") else 0  # GPT-2's Conv1D stores [in, out]
        width = module.weight.shape[out_dim]
        if scale.dim() and scale.shape != (width,):
            raise LayerfoldError(f"{path} has {width} output channels, got {tuple(scale.shape)} channel factors")
        if kind == "linear":
            shape = [1] * module.weight.dim()
            if scale.dim():
                shape[out_dim] = width
            module.weight.mul_(scale.reshape(shape).to(module.weight.device, module.weight.dtype))
            if getattr(module, "bias", None) is not None:
                module.bias.mul_(scale.to(module.bias.device, module.bias.dtype))
        else:
            w = module.weight
            w.copy_((scale.to(w.device) * (1 + w.float()) - 1).to(w.dtype))


def build_fused_layer(layers: Sequence[nn.Module], operator: str = "diff", norms: str = "base",
                      scale: float = 1.0) -> nn.Module:
    """A new layer module (a copy of the base's structure) carrying the merged weights."""
    import copy

    if operator == "base":
        # every parameter (norms too, whatever the policy) is the base layer's: a plain copy gives the
        # same weights without the float32 round trip (a fused candidate is built per scored window)
        MERGES.get(operator)
        _window_states(layers, norms)
        return copy.deepcopy(layers[0])
    fused = copy.deepcopy(layers[0])
    state = merge_window(layers, operator=operator, norms=norms, scale=scale)
    with torch.no_grad():
        for name, param in fused.named_parameters():
            param.copy_(state[name])
    return fused
