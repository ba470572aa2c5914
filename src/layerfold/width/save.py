"""Saving a width-pruned model: a plain Hugging Face folder written through
:func:`layerfold.output.save_model`, with ``width_plan.json``, the depth ``plan.json`` (if any),
``shrink.json`` and a model card."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from layerfold.output import PruneReport, save_model
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
    extra = {"README.md": width_card(report, loaded, command)}
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


def width_card(report: PruneReport, loaded, command: str) -> str:
    """The model card of a width-pruned folder (with :func:`layerfold.output.model_card`'s
    arguments: it is meant to become that function's width case)."""
    lines = ["---", "library_name: transformers", "tags: [layerfold, width-pruning]", "---",
             f"# {Path(str(loaded.source)).name} shrunk by layerfold", ""]
    lines += [f"Decoder layers {report.layers_before} -> {report.layers_after}; parameters {report.params_before:,} "
              f"-> {report.params_after:,} ({1 - report.params_after / report.params_before:.1%} removed).", ""]
    if report.plan is not None:
        lines += ["Depth: " + report.plan.summary().replace("\n", " "), ""]
    if report.width is not None:
        text = report.width.summary()
        lines += [text[0].upper() + text[1:] + ". Every layer keeps the same number of MLP channels and heads "
                  "(chosen per layer by importance), because a transformers config holds one "
                  "`intermediate_size` and one head count; `head_dim` is written explicitly.", ""]
    if report.depth_width:
        lines += _split_lines(report.depth_width)
    if report.perplexity_before:
        lines += ["| perplexity (128-token windows, no BOS) | before | after |", "|---|---|---|"]
        lines += [f"| {s} | {v:.2f} | {report.perplexity_after.get(s, float('nan')):.2f} |"
                  for s, v in report.perplexity_before.items()]
        lines.append("")
    lines += ["Load it with plain transformers:", "", "```python", "from transformers import AutoModelForCausalLM",
              'model = AutoModelForCausalLM.from_pretrained("<this folder>")', "```", ""]
    if report.width is not None:
        again = (f"layerfold prune {loaded.source} --plan plan.json --width-plan width_plan.json"
                 if report.plan is not None else f"layerfold shrink {loaded.source} --plan width_plan.json")
        lines += [f"The plans are data: `{again}` applies them again.", ""]
    if command:
        lines += ["Made with:", "", f"    {command}", ""]
    return "\n".join(lines)


def _split_lines(dw: dict) -> list[str]:
    """The depth/width split taken, and every candidate's held-out loss."""
    lines = [f"Budget: --param-ratio {dw['param_ratio']}, split {dw['split']} (share of the removed "
             "parameters taken by depth).", ""]
    if dw["candidates"]:
        lines += ["| split | layers | parameters | held-out calibration NLL |", "|---|---|---|---|"]
        for c in dw["candidates"]:
            loss = c["error"] if c["error"] is not None else f"{c['heldout_nll']:.4f}"
            lines.append(f"| {c['split']} | {c['layers']} | {c['params']} | {loss} |")
        lines.append("")
    return lines
