"""Closed-form correction of a fused layer, fitted on calibration activations (``slm-lab``'s
``fit=ridge``, measured and not adopted: docs/measured-options.md).

A fused layer F should map the window's input x to the window's output y.  In most decoder
blocks the output is ``rest(x) + a(x) W^T (+ b)``, where ``W`` is the MLP's output projection
and ``a(x)`` its input: the output is linear in ``W``.  Holding everything else fixed, the
``W`` that best reproduces the window is a ridge regression,

    W^T = (A^T A + lam I)^-1 (A^T (y - rest) + lam W0^T),   lam = ridge * trace(A^T A) / d,

shrunk towards the merged weights ``W0``.  It costs one pass of the fused layer over the
calibration set and one d x d solve (d = MLP width), computed in float64.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from layerfold.calibrate import call_layer
from layerfold.errors import LayerfoldError
from layerfold.models.arch import Architecture, get_dotted


def _weight_in_out(proj: nn.Module) -> torch.Tensor:
    """The projection's weight as [in, out] (nn.Linear stores [out, in]; GPT-2's Conv1D [in, out])."""
    return proj.weight.T if isinstance(proj, nn.Linear) else proj.weight


@torch.no_grad()
def fit_output_projection(layer: nn.Module, arch: Architecture, inputs: Sequence[torch.Tensor],
                          targets: Sequence[torch.Tensor], extras: Sequence[tuple[tuple, dict]],
                          ridge: float = 1e-2) -> None:
    """Refit ``layer``'s MLP output projection in place so that layer(inputs) ~ targets."""
    if not arch.mlp_out:
        raise LayerfoldError(f"the fused-layer correction is not available for {arch.name}: a norm follows "
                             "its MLP output, so the layer is not linear in that projection")
    proj = get_dotted(layer, arch.mlp_out)
    device = proj.weight.device
    captured: dict[str, torch.Tensor] = {}

    def hook(module, args, output):
        captured["a"] = args[0]
        captured["p"] = output

    handle = proj.register_forward_hook(hook)
    gram = cross = None
    has_bias = getattr(proj, "bias", None) is not None
    try:
        for x, y, extra in zip(inputs, targets, extras, strict=True):
            out = call_layer(layer, x.to(device), extra, device)  # a streamed layer computes elsewhere
            a = captured["a"].reshape(-1, captured["a"].shape[-1]).to(device, torch.float64)
            rest = (out - captured["p"]).reshape(-1, out.shape[-1]).to(device, torch.float64)
            r = y.to(device).reshape(-1, out.shape[-1]).to(torch.float64) - rest
            if has_bias:
                a = torch.cat([a, torch.ones(a.shape[0], 1, dtype=a.dtype, device=a.device)], dim=1)
            gram = a.T @ a if gram is None else gram + a.T @ a
            cross = a.T @ r if cross is None else cross + a.T @ r
    finally:
        handle.remove()
    w0 = _weight_in_out(proj).to(torch.float64)
    if has_bias:
        w0 = torch.cat([w0, proj.bias.to(torch.float64)[None]], dim=0)
    lam = ridge * torch.trace(gram) / gram.shape[0]
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    solution = torch.linalg.solve(gram + lam * eye, cross + lam * w0)
    if has_bias:
        proj.bias.copy_(solution[-1].to(proj.bias.dtype))
        solution = solution[:-1]
    new_weight = solution.T if isinstance(proj, nn.Linear) else solution
    proj.weight.copy_(new_weight.to(proj.weight.dtype))
