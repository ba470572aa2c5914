"""Architectures as data: where the decoder layers live and what in the config counts them.

Each supported family is one JSON file in ``architectures/``.  Adding an architecture means
adding a description, not code.  Fields:

- ``model_types``: the ``config.model_type`` values it covers.
- ``layers``: dotted path from the causal-LM module to the ``nn.ModuleList`` of decoder layers.
- ``layer_count_keys``: config keys holding the number of decoder layers.
- ``per_layer_lists``: config keys holding one entry per layer (rewritten to the kept layers).
- ``layers_below_keys``: config integers meaning "the first N layers" (e.g. Qwen2's
  ``max_window_layers``), rewritten to the number of kept layers that were below N.
- ``layer_index_attrs``: attributes, relative to a decoder layer, holding its index (the
  KV cache uses it), renumbered after surgery.
- ``final_norm``, ``embeddings``: dotted paths used by the calibration engine.
- ``width`` (optional): where a layer's attention and MLP projections are, for structured
  width pruning (see :mod:`layerfold.width`); architectures without it cannot be shrunk.
- ``mlp_out``: the MLP's output projection, relative to a layer, when the layer's output is
  linear in its weight (the residual adds it directly); empty where a norm follows it
  (Gemma 2/3), which rules out the closed-form fused-layer correction.
- ``residual_branches``: the modules whose outputs a layer adds to its residual stream, relative
  to a layer, each with how to scale its contribution by a factor: ``"linear"`` (a projection:
  weight and bias times the factor) or ``"unit-offset-norm"`` (a norm computing x * (1 + w),
  Gemma 2/3's post-norms: w becomes factor * (1 + w) - 1).  Used to rescale a window's kept
  layer (:func:`layerfold.merge.scale_branches`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import cache
from importlib import resources

import torch
from torch import nn

from layerfold.errors import LayerfoldError


@dataclass(frozen=True)
class Architecture:
    name: str
    model_types: tuple[str, ...]
    layers: str
    layer_count_keys: tuple[str, ...]
    per_layer_lists: tuple[str, ...] = ()
    layers_below_keys: tuple[str, ...] = ()
    layer_index_attrs: tuple[str, ...] = ()
    final_norm: str = ""
    embeddings: str = ""
    mlp_out: str = ""
    notes: str = field(default="", compare=False)
    width: dict | None = field(default=None, compare=False)  # optional, read by layerfold.width
    residual_branches: dict | None = field(default=None, compare=False)

    def layer_list(self, model: nn.Module) -> nn.ModuleList:
        layers = get_dotted(model, self.layers)
        if not isinstance(layers, nn.ModuleList):
            raise LayerfoldError(f"{self.name}: '{self.layers}' is not a list of layers in this model")
        return layers

    def set_layer_list(self, model: nn.Module, layers: nn.ModuleList) -> None:
        parent_path, _, attr = self.layers.rpartition(".")
        parent = get_dotted(model, parent_path) if parent_path else model
        setattr(parent, attr, layers)

    def num_layers(self, config) -> int:
        return int(getattr(config, self.layer_count_keys[0]))

    def final_norm_module(self, model: nn.Module) -> nn.Module:
        return get_dotted(model, self.final_norm) if self.final_norm else nn.Identity()


def get_dotted(obj, path: str):
    for part in path.split("."):
        if not hasattr(obj, part):
            raise LayerfoldError(f"'{path}' not found on {type(obj).__name__}")
        obj = getattr(obj, part)
    return obj


def set_dotted(obj, path: str, value) -> None:
    parent_path, _, attr = path.rpartition(".")
    parent = get_dotted(obj, parent_path) if parent_path else obj
    setattr(parent, attr, value)


@cache
def all_architectures() -> dict[str, Architecture]:
    found: dict[str, Architecture] = {}
    folder = resources.files("layerfold.models") / "architectures"
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".json"):
            continue
        raw = json.loads(entry.read_text())
        arch = Architecture(**{k: tuple(v) if isinstance(v, list) else v for k, v in raw.items()})
        found[arch.name] = arch
    return found


def supported_model_types() -> list[str]:
    return sorted(t for a in all_architectures().values() for t in a.model_types)


def architecture_for(config) -> Architecture:
    model_type = getattr(config, "model_type", None)
    for arch in all_architectures().values():
        if model_type in arch.model_types:
            return arch
    raise LayerfoldError(
        f"unsupported architecture '{model_type}'. Supported model types: {', '.join(supported_model_types())}. "
        "Add a description in layerfold/models/architectures/ to support another."
    )


def parameter_count(model: nn.Module) -> int:
    """Unique parameters (tied embeddings counted once)."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


def layer_parameter_count(layer: nn.Module) -> int:
    return sum(p.numel() for p in layer.parameters())


def is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or "norm" in type(module).__name__.lower()


def norm_parameter_names(layer: nn.Module) -> set[str]:
    """Names (relative to the layer) of parameters that belong to normalisation modules."""
    names: set[str] = set()
    for mod_name, mod in layer.named_modules():
        if is_norm(mod):
            for p_name, _ in mod.named_parameters(recurse=False):
                names.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return names


def first_param(model: nn.Module) -> torch.Tensor:
    return next(model.parameters())
