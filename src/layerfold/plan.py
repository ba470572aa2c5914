"""The Plan: what to cut, decided by a method, applied by :mod:`layerfold.surgery`.

A plan is plain data (JSON): an ordered list of operations on the original layer indices,
with the scores that justified each, plus the provenance needed to reproduce it.
"""

from __future__ import annotations

import json
import numbers
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from layerfold.errors import LayerfoldError

PLAN_VERSION = 1


@dataclass
class Operation:
    """``fuse``: replace layers ``lo..hi`` (inclusive, consecutive) by one layer at ``lo``;
    ``drop``: remove layer ``lo`` (``hi == lo``)."""

    kind: Literal["fuse", "drop"]
    lo: int
    hi: int
    score: float | None = None
    detail: dict[str, Any] = field(default_factory=dict)

    @property
    def layers(self) -> list[int]:
        return list(range(self.lo, self.hi + 1))

    @property
    def removed(self) -> int:
        return self.hi - self.lo + 1 if self.kind == "drop" else self.hi - self.lo


@dataclass
class Plan:
    method: str
    num_layers: int  # before
    operations: list[Operation]
    model: str = ""
    architecture: str = ""
    merge: dict[str, Any] = field(default_factory=dict)  # operator name and options, for fuse ops
    criterion: str | None = None
    threshold: float | None = None
    target: dict[str, Any] = field(default_factory=dict)
    calibration: dict[str, Any] = field(default_factory=dict)
    seed: int | None = None
    scores: dict[str, Any] = field(default_factory=dict)  # method-wide scores (e.g. per-layer importance)
    provenance: dict[str, Any] = field(default_factory=dict)
    fingerprint: dict[str, str] = field(default_factory=dict)  # of the source model (models/fingerprint.py)
    version: int = PLAN_VERSION

    def __post_init__(self) -> None:
        self.validate()

    @property
    def num_layers_after(self) -> int:
        return self.num_layers - sum(op.removed for op in self.operations)

    @property
    def removed_layers(self) -> int:
        return self.num_layers - self.num_layers_after

    def validate(self) -> None:
        if not _is_int(self.num_layers) or self.num_layers < 1:
            raise LayerfoldError(f"plan: num_layers must be a positive integer, got {self.num_layers!r}")
        if not isinstance(self.operations, list):
            raise LayerfoldError("plan: operations must be a list")
        used: set[int] = set()
        for op in self.operations:
            if op.kind not in ("fuse", "drop"):
                raise LayerfoldError(f"plan: unknown operation '{op.kind}' (fuse or drop)")
            if not (_is_int(op.lo) and _is_int(op.hi)):
                raise LayerfoldError(f"plan: layer indices must be integers, got {op.lo!r}..{op.hi!r}")
            if op.lo > op.hi:
                raise LayerfoldError(f"plan: layers {op.lo}..{op.hi} run backwards (lo must not exceed hi)")
            if not 0 <= op.lo <= op.hi < self.num_layers:
                raise LayerfoldError(f"plan: layers {op.lo}..{op.hi} outside 0..{self.num_layers - 1}")
            if op.kind == "fuse" and op.hi == op.lo:
                raise LayerfoldError(f"plan: fuse window {op.lo}..{op.hi} has one layer; nothing to fuse")
            overlap = used.intersection(op.layers)
            if overlap:
                raise LayerfoldError(f"plan: layer {min(overlap)} appears in two operations")
            used.update(op.layers)
        if self.num_layers_after < 1:
            raise LayerfoldError("plan removes every layer")

    def kept_sources(self) -> list[int]:
        """For each layer of the pruned model, the original index it comes from (a fused
        layer is placed where its window's base, the lowest layer, was)."""
        gone: set[int] = set()
        for op in self.operations:
            gone.update(op.layers if op.kind == "drop" else op.layers[1:])
        return [i for i in range(self.num_layers) if i not in gone]

    def windows(self) -> list[tuple[int, int]]:
        return [(op.lo, op.hi) for op in self.operations if op.kind == "fuse"]

    def summary(self) -> str:
        """One line: the method, the layer counts and each operation (a rescaled fused layer with
        its factor, e.g. ``fuse 3-7 x1.2``; ``+channels`` when it has per-channel factors)."""

        def part(op: Operation) -> str:
            if op.kind == "drop":
                return f"drop {op.lo}"
            factor = op.detail.get("branch_scale", 1.0)
            return (f"fuse {op.lo}-{op.hi}" + (" +channels" if op.detail.get("channel_scale") else "")
                    + (f" x{factor:g}" if factor != 1.0 else ""))

        parts = [part(op) for op in self.operations]
        return f"{self.method}: {self.num_layers} -> {self.num_layers_after} layers ({'; '.join(parts) or 'no change'})"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=_json_default)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Plan:
        if not isinstance(raw, dict):
            raise LayerfoldError("plan: expected a JSON object")
        if raw.get("version", PLAN_VERSION) > PLAN_VERSION:
            raise LayerfoldError(f"plan version {raw['version']} is newer than this layerfold understands")
        unknown = set(raw) - set(cls.__dataclass_fields__)
        if unknown:
            raise LayerfoldError(f"plan: unknown fields {sorted(unknown)}")
        missing = {"method", "num_layers"} - set(raw)
        if missing:
            raise LayerfoldError(f"plan: missing fields {sorted(missing)}")
        ops = raw.get("operations", [])
        if not isinstance(ops, list):
            raise LayerfoldError("plan: operations must be a list")
        return cls(**{**raw, "operations": [_operation(i, op) for i, op in enumerate(ops, 1)]})

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        p = Path(path)
        if not p.is_file():
            raise LayerfoldError(f"plan file {p} does not exist" if not p.exists() else f"plan file {p} is a folder")
        try:
            raw = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise LayerfoldError(f"plan file {p} is not valid JSON: {exc}") from exc
        try:
            return cls.from_dict(raw)
        except TypeError as exc:  # a field of the wrong kind, e.g. operations given as numbers
            raise LayerfoldError(f"plan file {p} is malformed: {exc}") from exc


def _operation(number: int, raw) -> Operation:
    fields = set(Operation.__dataclass_fields__)
    if not isinstance(raw, dict) or not {"kind", "lo", "hi"} <= set(raw) <= fields:
        raise LayerfoldError(f"plan: operation {number} must be an object with kind, lo, hi "
                             f"(and optionally score, detail), got {raw!r}")
    return Operation(**raw)


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy ints too


def _json_default(obj):
    if hasattr(obj, "tolist"):  # tensors and numpy values, scalars or not
        return obj.tolist()
    return str(obj)


def library_versions() -> dict[str, str]:
    import torch
    import transformers

    from layerfold.version import __version__

    return {"layerfold": __version__, "torch": torch.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


@dataclass
class PlanResult:
    """A plan and, where a method fitted them on data, the weights of its fused layers
    (window base -> state dict), saved beside the plan as ``plan.tensors.safetensors``."""

    plan: Plan
    overrides: dict[int, dict[str, Any]] = field(default_factory=dict)


def save_plan(result: PlanResult, path: str | Path) -> Path:
    """Write ``plan.json`` (and the fitted fused-layer weights, if any, beside it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    result.plan.save(path)
    if result.overrides:
        from safetensors.torch import save_file

        flat = {f"{lo}/{name}": t.contiguous() for lo, state in result.overrides.items() for name, t in state.items()}
        save_file(flat, str(path.with_name(path.stem + ".tensors.safetensors")))
    return path


def load_plan(path: str | Path) -> PlanResult:
    import warnings

    path = Path(path)
    plan = Plan.load(path)
    if not plan.fingerprint:
        warnings.warn(f"{path} records no fingerprint of its source model (written by an older layerfold): "
                      "layerfold cannot check that it is applied to the model it was made for", stacklevel=2)
    tensors = path.with_name(path.stem + ".tensors.safetensors")
    overrides: dict[int, dict[str, Any]] = {}
    if tensors.is_file():
        from safetensors.torch import load_file

        for key, t in load_file(str(tensors)).items():
            lo, name = key.split("/", 1)
            overrides.setdefault(int(lo), {})[name] = t
    return PlanResult(plan, overrides)


def check_plan_matches(plan: Plan, model, force: bool = False) -> None:
    """Refuse to apply ``plan`` to a model other than the one it was made for (its recorded
    fingerprint differs) unless ``force``.  A plan with no fingerprint (built by hand, or read
    from a file written by an older layerfold, which :func:`load_plan` warns about) is not checked."""
    import warnings

    from layerfold.models.fingerprint import model_fingerprint

    if not plan.fingerprint:
        return
    current = model_fingerprint(model)
    differs = [part for part in ("config", "weights") if plan.fingerprint.get(part) != current[part]]
    if not differs:
        return
    what = "shape" if "config" in differs else "weights"
    message = (f"the plan was made for another model ({plan.model or 'unnamed'}): this model's {what} differ "
               f"from its source's")
    if force:
        warnings.warn(message + "; applied anyway (forced)", stacklevel=2)
        return
    raise LayerfoldError(message + "; make a plan for this model, or pass --force to apply it anyway")


def check_plan_file(path: str | Path, model: str | None = None, force: bool = False) -> Plan:
    """Check a plan file before any weight is loaded: valid JSON, a valid plan, the layer count
    of the model's ``config.json`` (``model``: a hub id, a folder, or None for the embedded
    default) and, unless ``force``, the shape recorded in the plan's fingerprint.  Returns the plan."""
    plan = Plan.load(path)
    from transformers import AutoConfig

    from layerfold.models.arch import architecture_for
    from layerfold.models.fingerprint import config_fingerprint
    from layerfold.models.load import resolve_source

    label, source = resolve_source(model)
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=False)
    except (OSError, ValueError) as exc:
        raise LayerfoldError(f"cannot read the config of '{label}': {str(exc).strip().splitlines()[0]}") from exc
    layers = architecture_for(config).num_layers(config)
    if layers != plan.num_layers:
        raise LayerfoldError(f"plan file {path} is for a {plan.num_layers}-layer model; '{label}' has {layers} layers")
    if not force and plan.fingerprint.get("config") not in (None, config_fingerprint(config)):
        raise LayerfoldError(f"plan file {path} was made for a model of another shape ({plan.model or 'unnamed'}) "
                             f"than '{label}'; make a plan for this model, or pass --force to apply it anyway")
    return plan
