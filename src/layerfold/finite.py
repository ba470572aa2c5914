"""Finite weights: find the first NaN or infinite value in a model and name where it is.

A model with a NaN weight runs without error and its pruned copy saves without error; every
number it gives is NaN.  layerfold checks on load, after surgery, and before writing.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from layerfold.errors import LayerfoldError

_CHUNK = 1 << 24  # elements checked at once: bounds the temporary boolean mask on a large embedding


def non_finite_kind(tensor: torch.Tensor) -> str | None:
    """``"NaN"``, ``"Inf"`` or None, checked in chunks (no full-size mask on a large tensor)."""
    if tensor.device.type == "meta" or not (tensor.is_floating_point() or tensor.is_complex()):
        return None
    flat = tensor.detach().reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        chunk = flat[start:start + _CHUNK]
        if not bool(torch.isfinite(chunk).all()):
            return "NaN" if bool(torch.isnan(chunk).any()) else "Inf"
    return None


def _named_tensors(module: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    seen: set[int] = set()
    for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
        if id(tensor) not in seen:  # tied weights once
            seen.add(id(tensor))
            yield (f"{prefix}{name}", tensor)


def first_non_finite(module: nn.Module) -> tuple[str, str] | None:
    """(tensor name, ``"NaN"`` or ``"Inf"``) of the first non-finite parameter or buffer, or None."""
    for name, tensor in _named_tensors(module):
        kind = non_finite_kind(tensor)
        if kind is not None:
            return name, kind
    return None


def decoder_layer_of(model: nn.Module, tensor_name: str, layers: list[nn.Module] | None) -> int | None:
    """Index of the decoder layer (among ``layers``, module objects) holding the parameter ``tensor_name``."""
    if not layers:
        return None
    owner = dict(model.named_parameters()).get(tensor_name)
    if owner is None:
        owner = dict(model.named_buffers()).get(tensor_name)
    if owner is None:
        return None
    for index, layer in enumerate(layers):
        if any(t is owner for t in [*layer.parameters(), *layer.buffers()]):
            return index
    return None


def check_finite_weights(model: nn.Module, context: str, layers: list[nn.Module] | None = None) -> None:
    """Raise one line naming the first non-finite tensor (and its decoder layer, when the decoder
    ``layers`` are given)."""
    bad = first_non_finite(model)
    if bad is None:
        return
    name, kind = bad
    layer = decoder_layer_of(model, name, layers)
    where = f" (decoder layer {layer})" if layer is not None else ""
    raise LayerfoldError(f"{context}: weight {name}{where} holds {kind} values; the model is broken "
                         "(a corrupt or overflowed checkpoint): fix or re-download it")


def check_finite_layers(layers: Iterable[tuple[int, nn.Module]], context: str) -> None:
    """Raise one line naming the first layer (by its index) with a non-finite parameter or buffer."""
    for index, layer in layers:
        bad = first_non_finite(layer)
        if bad is not None:
            name, kind = bad
            raise LayerfoldError(f"{context}: layer {index} has {kind} values in {name}")


class ActivationWatch:
    """Whether each decoder layer's input stayed finite during a forward pass, recorded without
    a device synchronisation per layer and checked once after the pass (:meth:`check`)."""

    def __init__(self, num_layers: int) -> None:
        self.num_layers = num_layers
        self.finite: list[list[torch.Tensor]] = [[] for _ in range(num_layers + 1)]

    def see(self, index: int, hidden: torch.Tensor) -> None:
        """Record the hidden states entering layer ``index`` (``num_layers``: the last layer's output)."""
        self.finite[index].append(torch.isfinite(hidden.detach()).all())

    def check(self, what: str = "calibration") -> None:
        for index, flags in enumerate(self.finite):
            if flags and not all(bool(flag) for flag in flags):
                if index == 0:
                    where = "the embeddings' output (the input of decoder layer 0)"
                else:
                    where = f"the output of decoder layer {index - 1}"
                raise LayerfoldError(f"{what} activations became NaN or Inf at {where}: the model's weights or "
                                     "its dtype cannot run this text (try --dtype float32)")
