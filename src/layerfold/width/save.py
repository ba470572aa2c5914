"""Saving a width-pruned model: a plain Hugging Face folder written through
:func:`layerfold.output.save_model`, with ``width_plan.json``, the depth ``plan.json`` (if any),
``shrink.json`` and a model card."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from layerfold.output import PruneReport, model_card, save_model
from layerfold.plan import PlanResult, save_plan


@dataclass
class ShrinkRecord:
    """Before/after figures written into ``shrink.json``."""

    layers: tuple[int, int]
    params: tuple[int, int]
    perplexity_before: dict[str, float] = field(default_factory=dict)
    perplexity_after: dict[str, float] = field(default_factory=dict)
    depth_width: dict | None = None

    @classmethod
    def of(cls, report: PruneReport) -> ShrinkRecord:
        return cls(layers=(report.layers_before, report.layers_after), params=(report.params_before,
                   report.params_after), perplexity_before=report.perplexity_before,
                   perplexity_after=report.perplexity_after, depth_width=report.depth_width)


def save_shrunk(loaded, out: str | Path, report: PruneReport, depth: PlanResult | None = None, command: str = "",
                overwrite: bool = False) -> Path:
    """Save the model as a plain Hugging Face folder with ``width_plan.json`` (``report.width``),
    the depth ``plan.json`` (``depth``, if any, with its fused-layer weights), ``shrink.json``
    and a model card."""
    extra = {"README.md": model_card(report, loaded, command)}
    if report.width is not None:
        extra["width_plan.json"] = report.width.to_json() + "\n"
    if depth is not None:
        extra["plan.json"] = depth.plan.to_json() + "\n"
    extra["shrink.json"] = json.dumps(asdict(ShrinkRecord.of(report)), indent=2) + "\n"

    def write_overrides(folder: Path) -> None:  # fused-layer weights beside plan.json, inside the atomic write
        save_plan(depth, folder / "plan.json")

    overrides = depth is not None and bool(depth.overrides)
    return save_model(loaded.model, loaded.tokenizer, out, overwrite=overwrite, extra_files=extra,
                      write_extra=write_overrides if overrides else None, layers=loaded.arch.layer_list(loaded.model))
