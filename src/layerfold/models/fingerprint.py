"""A model's fingerprint: which model a plan was made for, cheap to compute and to compare.

Two parts, both short sha256 digests:

- ``config``: the fields that shape the layers (model type, widths, head counts, vocabulary,
  layer count), so that a plan can be checked against a ``config.json`` before any weight is read;
- ``weights``: the first values of the input embedding and of every parameter of every decoder
  layer, each rounded to bfloat16 first so that the same checkpoint loaded in float32, bfloat16
  or float16 gives the same digest, while a fine-tune or another seed of the same shape does not.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn

from layerfold.models.arch import architecture_for, get_dotted

SHAPE_KEYS = ("model_type", "vocab_size", "hidden_size", "n_embd", "intermediate_size", "n_inner", "ffn_dim",
              "num_attention_heads", "n_head", "num_key_value_heads", "head_dim")
SAMPLE = 64  # leading values taken from each tensor


def config_fingerprint(config) -> str:
    """Digest of the config fields that shape the layers (and of the layer count)."""
    from layerfold.errors import LayerfoldError

    fields = {}
    for key in (*SHAPE_KEYS, *architecture_for(config).layer_count_keys):
        try:
            value = get_dotted(config, key)
        except LayerfoldError:
            continue
        if isinstance(value, (int, float, str, bool)) or value is None:
            fields[key] = value
    return _digest(json.dumps(fields, sort_keys=True).encode())


def weights_fingerprint(model: nn.Module) -> str:
    """Digest of the leading values of the input embedding and of every decoder-layer parameter."""
    layers = architecture_for(model.config).layer_list(model)
    tensors = [model.get_input_embeddings().weight, *(p for layer in layers for p in layer.parameters())]
    digest = hashlib.sha256()
    for tensor in tensors:
        head = tensor.detach().reshape(-1)[:SAMPLE].to("cpu", torch.float32).to(torch.bfloat16)
        digest.update(head.view(torch.int16).numpy().tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> dict[str, str]:
    return {"config": config_fingerprint(model.config), "weights": weights_fingerprint(model)}


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]
