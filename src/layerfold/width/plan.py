"""A width plan is data: the kept MLP channels, KV groups and query heads of every layer, as JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from layerfold.errors import LayerfoldError

WIDTH_PLAN_VERSION = 1


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
