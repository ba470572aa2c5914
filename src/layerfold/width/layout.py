"""Where a decoder layer's projections are, the widths a config gives them, and what one unit
(an MLP channel, a query head, a KV group) costs in parameters."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from layerfold.errors import LayerfoldError
from layerfold.models.arch import Architecture, all_architectures, get_dotted


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
