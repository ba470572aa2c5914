"""What every method shares: the target size, the planning context, registration."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict

from layerfold.calibrate import LayerCache, capture
from layerfold.data.tokens import CalibrationConfig, sample_windows, tokens_hash
from layerfold.errors import LayerfoldError, did_you_mean
from layerfold.models.arch import layer_parameter_count, parameter_count
from layerfold.models.load import LoadedModel
from layerfold.plan import Plan, PlanResult, library_versions
from layerfold.registry import Registry
from layerfold.streaming import LayerStreamer


@dataclass(frozen=True)
class Target:
    """How much to remove: exactly one of ``layers`` (layers to keep), ``ratio`` (share of
    decoder layers removed) and ``param_ratio`` (share of all parameters removed), or none
    (a threshold-driven method decides)."""

    layers: int | None = None
    ratio: float | None = None
    param_ratio: float | None = None

    def __post_init__(self) -> None:
        given = [v is not None for v in (self.layers, self.ratio, self.param_ratio)]
        if sum(given) > 1:
            raise LayerfoldError("give only one of --target-layers, --ratio, --param-ratio")
        for name, v in (("--ratio", self.ratio), ("--param-ratio", self.param_ratio)):
            if v is not None and not 0 < v < 1:
                raise LayerfoldError(f"{name} must be between 0 and 1 (exclusive), got {v}")

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.layers, self.ratio, self.param_ratio))

    def layers_to_remove(self, model: torch.nn.Module, num_layers: int, layer_params: int) -> int | None:
        """Number of decoder layers to remove, or None if no target is set."""
        if self.layers is not None:
            if not 1 <= self.layers < num_layers:
                raise LayerfoldError(f"--target-layers must be between 1 and {num_layers - 1} for this "
                                     f"{num_layers}-layer model, got {self.layers}")
            return num_layers - self.layers
        if self.ratio is not None:
            remove = round(self.ratio * num_layers)
        elif self.param_ratio is not None:
            total = parameter_count(model)
            remove = math.ceil(self.param_ratio * total / layer_params - 1e-9)
        else:
            return None
        if remove < 1:
            raise LayerfoldError(f"the target removes no layer of this {num_layers}-layer model; ask for more")
        if remove >= num_layers:
            raise LayerfoldError(f"the target would remove {remove} of {num_layers} layers; at least one must stay")
        return remove

    def describe(self) -> dict:
        return {k: v for k, v in (("layers", self.layers), ("ratio", self.ratio), ("param_ratio", self.param_ratio))
                if v is not None}


@dataclass
class PlanContext:
    loaded: LoadedModel
    calibration: CalibrationConfig
    target: Target
    progress: bool = True
    tokens_override: torch.Tensor | None = None
    info: dict = field(default_factory=dict)
    streamer: LayerStreamer | None = None  # layers streamed from the CPU (--max-gpu-memory)

    @property
    def model(self) -> torch.nn.Module:
        return self.loaded.model

    @property
    def num_layers(self) -> int:
        return len(self.loaded.arch.layer_list(self.model))

    @cached_property
    def tokens(self) -> torch.Tensor:
        if self.tokens_override is not None:
            return self.tokens_override
        if self.loaded.tokenizer is None:
            raise LayerfoldError("calibration needs a tokenizer")
        return sample_windows(self.loaded.tokenizer, self.calibration)

    @cached_property
    def cache(self) -> LayerCache:
        return capture(self.model, self.loaded.arch, self.tokens, batch_size=self.calibration.batch_size,
                       progress=self.progress, streamer=self.streamer)

    def layers_to_remove(self) -> int | None:
        layer_params = layer_parameter_count(self.loaded.arch.layer_list(self.model)[0])
        return self.target.layers_to_remove(self.model, self.num_layers, layer_params)

    def calibration_record(self) -> dict:
        return {**self.calibration.describe(), "tokens_sha256_16": tokens_hash(self.tokens)}

    def new_plan(self, method: str, operations, **fields) -> Plan:
        return Plan(method=method, num_layers=self.num_layers, operations=operations, model=self.loaded.source,
                    architecture=self.loaded.arch.name, calibration=self.calibration_record(),
                    seed=self.calibration.seed, target=self.target.describe(),
                    provenance={"versions": library_versions(), **self.info}, **fields)




class Method(BaseModel):
    """A planner: looks at the model and calibration data, returns a Plan. Options are
    declared as fields and validated; unknown options are refused."""

    model_config = ConfigDict(extra="forbid")
    name: ClassVar[str] = ""
    needs_target: ClassVar[bool] = True

    def plan(self, ctx: PlanContext) -> PlanResult:  # pragma: no cover - interface
        raise NotImplementedError

    def required_removal(self, ctx: PlanContext) -> int:
        remove = ctx.layers_to_remove()
        if remove is None:
            raise LayerfoldError(f"method '{self.name}' needs a size: give --target-layers, --ratio or --param-ratio")
        return remove


METHODS: Registry[type[Method]] = Registry("method")


def register(cls: type[Method]) -> type[Method]:
    if not cls.name:
        raise ValueError(f"{cls.__name__} has no name")
    METHODS.register(cls.name)(cls)
    return cls


def make_method(name: str, options: dict | None = None) -> Method:
    from pydantic import ValidationError

    import layerfold.methods  # noqa: F401  (registers every method)

    cls = METHODS.get(name)
    try:
        return cls(**(options or {}))
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(p) for p in first["loc"])
        if first["type"] == "extra_forbidden":
            raise did_you_mean(loc, sorted(cls.model_fields), f"{name} option") from exc
        raise LayerfoldError(f"method '{name}': option '{loc}': {first['msg']}") from exc
