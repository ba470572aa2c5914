"""LoRA adapters (through peft) on every linear projection of the decoder layers, and the merge back.

Targets are found as module objects, not by name patterns: every ``nn.Linear`` (or
transformers' ``Conv1D``, which GPT-2 uses for its projections) inside the decoder layers
that the architecture description locates.  Embeddings and the LM head stay frozen and
untouched, as in LLM-Pruner's recipe.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from layerfold.errors import LayerfoldError
from layerfold.models.arch import architecture_for
from layerfold.recover.config import HealConfig


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - transformers always has it today
        return None
    return Conv1D


def is_projection(module: nn.Module) -> bool:
    conv1d = _conv1d_type()
    return isinstance(module, nn.Linear) or (conv1d is not None and isinstance(module, conv1d))


def projection_names(model: nn.Module) -> list[str]:
    """Full module names (from the causal-LM root) of the decoder layers' linear projections."""
    arch = architecture_for(model.config)
    layers = arch.layer_list(model)
    names = [f"{arch.layers}.{i}.{sub}" for i, layer in enumerate(layers)
             for sub, module in layer.named_modules() if sub and is_projection(module)]
    if not names:
        raise LayerfoldError(f"{arch.name}: no linear projection found inside the decoder layers")
    return names


def attach_lora(model: nn.Module, config: HealConfig):
    """Wrap ``model`` in a peft LoRA model (in place: its projections are replaced by LoRA layers).

    Only the adapters train.  peft keeps adapter weights in float32 when the base model is in
    bfloat16 or float16 (``autocast_adapter_dtype``), so small updates are not rounded away.
    """
    from peft import LoraConfig, get_peft_model

    targets = projection_names(model)
    conv1d = _conv1d_type()
    modules = dict(model.named_modules())
    fan_in_fan_out = conv1d is not None and any(isinstance(modules[n], conv1d) for n in targets)
    lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=config.dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM", fan_in_fan_out=fan_in_fan_out)
    with warnings.catch_warnings():
        # peft flips fan_in_fan_out per module when a model mixes Linear and Conv1D; that is what we want
        warnings.filterwarnings("ignore", message=".*fan_in_fan_out.*")
        # peft 0.21 reads transformers' deprecated `is_gradient_checkpointing`; not ours to fix
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        return get_peft_model(model, lora)


def train_decoder_layers(model: nn.Module) -> list[str]:
    """Freeze everything but the decoder layers (the ones the plan kept or fused); return their names.

    Embeddings, the final norm and the LM head stay as the original model had them: they are
    shared with the teacher's view of the vocabulary, and depth pruning did not touch them."""
    arch = architecture_for(model.config)
    model.requires_grad_(False)
    names = []
    for i, layer in enumerate(arch.layer_list(model)):
        layer.requires_grad_(True)
        names.append(f"{arch.layers}.{i}")
    return names


def trainable_parameters(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def merge_lora(peft_model) -> nn.Module:
    """Fold the adapters into the base weights and return the plain transformers model."""
    merged = peft_model.merge_and_unload(progressbar=False, safe_merge=True)
    leftovers = [n for n, _ in merged.named_modules() if "lora_" in n.rsplit(".", 1)[-1]]
    if leftovers:  # pragma: no cover - guards against a peft behaviour change
        raise LayerfoldError(f"LoRA modules left after merging: {leftovers[:3]}")
    return merged
