"""Options shared by the commands, declared once, and the checks that run before any model is loaded.

Options that several commands take come in groups (:class:`Planning`, :class:`Calibration`,
:class:`Placement`): each option is declared once, as an annotated field of a pydantic model, and
:func:`with_groups` adds a group's options to a command, which receives them as one validated object.
"""

from __future__ import annotations

import functools
import inspect
import json
import typing
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated

import typer
from pydantic import BaseModel, ConfigDict

from layerfold.errors import LayerfoldError

if TYPE_CHECKING:
    from layerfold.data.tokens import CalibrationConfig
    from layerfold.methods.base import Target

ModelArg = Annotated[str | None, typer.Argument(help="Hub id or local folder; default: the embedded SmolLM2-135M.")]
Dtype = Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto (cuda when there is a GPU, else cpu).")]
MaxGpuMemory = Annotated[str | None, typer.Option(
    "--max-gpu-memory", help="Larger than the GPU: keep the weights in CPU memory and bring one decoder layer at "
                             "a time to the GPU (--device, default cuda), within this much GPU memory: 8GiB, 8GB, "
                             "8000MiB. Activations stay on the CPU; the plan is the same as without the cap.")]
DeviceMap = Annotated[str | None, typer.Option(
    "--device-map", help="Several GPUs: spread the model over them with accelerate (auto, balanced, "
                         "balanced_low_0, sequential); each layer runs on its own GPU. Replaces --device.")]

Method = Annotated[str, typer.Option(help="Planner: slm (default), shortgpt, angular, laco, sleb, "
                                          "shortened-ppl, shortened-taylor, last-n. See `layerfold methods`.")]
Threshold = Annotated[float | None, typer.Option(help="slm, laco: similarity threshold, as in the papers.")]
TargetLayers = Annotated[int | None, typer.Option("--target-layers", help="Layers to keep.")]
Ratio = Annotated[float | None, typer.Option(help="Share of decoder layers to remove (default 0.2 for slm).")]
ParamRatio = Annotated[float | None, typer.Option("--param-ratio", help="Share of all parameters to remove.")]
Criterion = Annotated[str | None, typer.Option(
    help="slm: output-cosine, cka-linear, cka-rbf, angular, or loss (with a target size).")]
Merge = Annotated[str | None, typer.Option(
    help="slm, laco: merge operator: base, diff (the paper's), mean, reference (the authors' fused layer).")]
Norms = Annotated[str | None, typer.Option(help="slm: norm parameters: base (keep the base layer's) or merge.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Other method option, key=value (repeatable).")]
CalibSource = Annotated[str, typer.Option(help="Calibration text: books, ptb-train, or a text or .jsonl file.")]
CalibSamples = Annotated[int, typer.Option(help="Calibration samples.")]
CalibSeqLen = Annotated[int, typer.Option(help="Tokens per calibration sample.")]
Seed = Annotated[int, typer.Option(help="Seed for calibration sampling.")]
Sampling = Annotated[str, typer.Option(help="random (seeded) or strided.")]


class OptionGroup(BaseModel):
    """Options declared once, as fields annotated with their ``typer.Option``; a command that
    takes the group (:func:`with_groups`) gets them as one object, whose ``model_fields_set``
    holds the options given on the command line."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def parameters(cls) -> list[inspect.Parameter]:
        hints = typing.get_type_hints(cls, include_extras=True)
        return [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=hints[name], default=field.default)
                for name, field in cls.model_fields.items()]

    def flags_given(self) -> list[str]:
        """The given options as the user typed them (``--target-layers``, ``--set``)."""
        return ["--" + name.rstrip("_").replace("_", "-") for name in type(self).model_fields
                if name in self.model_fields_set]


def with_groups(**groups: type[OptionGroup]) -> Callable[[Callable], Callable]:
    """Give a command the options of each group: the command's parameter ``name: Group`` becomes
    the group's options on the command line and, when the command runs, one ``Group`` built from
    the options the user gave (the others keep their defaults)."""

    def decorate(func: Callable) -> Callable:
        hints = typing.get_type_hints(func, include_extras=True)
        params: list[inspect.Parameter] = []
        for param in inspect.signature(func).parameters.values():
            if param.name in groups:
                params.extend(groups[param.name].parameters())
            else:
                params.append(param.replace(kind=inspect.Parameter.KEYWORD_ONLY, annotation=hints[param.name]))
        params.append(inspect.Parameter("_context", inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context))

        @functools.wraps(func)
        def command(**values):
            context = values.pop("_context")
            for name, group in groups.items():
                mine = {field: values.pop(field) for field in group.model_fields}
                values[name] = group(**{field: value for field, value in mine.items()
                                        if context.get_parameter_source(field).name != "DEFAULT"})
            return func(**values)

        command.__signature__ = inspect.Signature(params)
        command.__annotations__ = {p.name: p.annotation for p in params}
        return command

    return decorate


class Planning(OptionGroup):
    """What to cut and how: the method, its size target and its options (prune and plan)."""

    method: Method = "slm"
    threshold: Threshold = None
    target_layers: TargetLayers = None
    ratio: Ratio = None
    param_ratio: ParamRatio = None
    criterion: Criterion = None
    merge: Merge = None
    norms: Norms = None
    set_: SetOpt = None

    def resolve(self) -> tuple[str, Target, dict]:
        """(the method's registered name, the :class:`~layerfold.methods.base.Target`, the method's
        options), checked: an unknown method or option, or an impossible target, fails here."""
        from layerfold.methods.base import Target, make_method

        if self.target_layers is not None and self.target_layers < 1:
            raise LayerfoldError(f"--target-layers must be at least 1, got {self.target_layers}")
        target = Target(layers=self.target_layers, ratio=self.ratio, param_ratio=self.param_ratio)
        options = method_options(self.set_, threshold=self.threshold, criterion=self.criterion, merge=self.merge,
                                 norms=self.norms)
        name = make_method(self.method, options).name  # the registered spelling of the name the user typed
        if not target.given and self.threshold is None and name == "slm":
            target = Target(ratio=0.2)
        return name, target, options


class Calibration(OptionGroup):
    """The calibration text: which, how many windows of how many tokens, how they are drawn."""

    calib_source: CalibSource = "books"
    calib_samples: CalibSamples = 10
    calib_seq_len: CalibSeqLen = 128
    seed: Seed = 1234
    calib_sampling: Sampling = "random"

    def config(self) -> CalibrationConfig:
        from layerfold.data.tokens import CalibrationConfig

        return CalibrationConfig(source=self.calib_source, samples=self.calib_samples, seq_len=self.calib_seq_len,
                                 seed=self.seed, sampling=self.calib_sampling)


class Placement(OptionGroup):
    """Where the model's weights live and its layers run."""

    dtype: Dtype = "float32"
    device: Device = "auto"
    max_gpu_memory: MaxGpuMemory = None
    device_map: DeviceMap = None

    def resolve(self) -> tuple[dict, dict]:
        """(load_model keywords, streaming keywords for the API), checked before anything is loaded."""
        if self.max_gpu_memory is not None and self.device_map is not None:
            raise LayerfoldError("give either --max-gpu-memory (stream from the CPU through one GPU) or "
                                 "--device-map (spread over GPUs), not both")
        if self.max_gpu_memory is not None:
            from layerfold.streaming import parse_memory, resolve_compute_device

            parse_memory(self.max_gpu_memory)
            compute = resolve_compute_device(None if self.device in ("cpu", "auto") else self.device)
            return ({"dtype": self.dtype, "device": "cpu"},
                    {"max_gpu_memory": self.max_gpu_memory, "compute_device": compute})
        if self.device_map is not None:
            from layerfold.models.load import resolve_device_map

            return {"dtype": self.dtype, "device_map": resolve_device_map(self.device_map)}, {}
        return {"dtype": self.dtype, "device": self.device}, {}


def refuse_beside_plan(*groups: OptionGroup) -> None:
    """A saved plan already decided what the given options would decide: refuse them, not ignore them."""
    given = [flag for group in groups for flag in group.flags_given()]
    if given:
        raise LayerfoldError(f"--plan applies a saved plan, which {', '.join(given)} would not change: drop "
                             f"{'it' if len(given) == 1 else 'them'}, or drop --plan to plan again")


def split_list(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


def method_options(pairs: list[str] | None, **given) -> dict:
    opts = {k: v for k, v in given.items() if v is not None}
    for pair in pairs or []:
        if "=" not in pair:
            raise LayerfoldError(f"--set expects key=value, got '{pair}'")
        key, value = pair.split("=", 1)
        try:
            opts[key.replace("-", "_")] = json.loads(value)
        except json.JSONDecodeError:
            opts[key.replace("-", "_")] = value
    return opts


def print_split(console, dw: dict) -> None:
    """The depth/width split a combined prune took, and every candidate split's held-out loss."""
    console.print(f"split {dw['split']} (share of removed parameters taken by depth): removed "
                  f"{dw['achieved_ratio']:.1%} of parameters")
    for cand in dw["candidates"]:
        loss = f"{cand['heldout_nll']:.4f}" if cand["heldout_nll"] is not None else cand["error"]
        console.print(f"  split {cand['split']}: layers {cand['layers']}, held-out calibration NLL {loss}")


def print_report(report) -> None:
    """What a prune or shrink did: its plans, the split, layers, parameters and perplexity before and after."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if report.plan is not None:
        console.print(report.plan.summary())
    if report.width is not None:
        console.print(report.width.summary())
    if report.depth_width:
        print_split(console, report.depth_width)
    table = Table(show_header=True)
    table.add_column("")
    table.add_column("before", justify="right")
    table.add_column("after", justify="right")
    table.add_row("decoder layers", str(report.layers_before), str(report.layers_after))
    table.add_row("parameters", f"{report.params_before:,}", f"{report.params_after:,}")
    for source, value in report.perplexity_before.items():
        table.add_row(f"{source} perplexity (128 tok{', BOS first' if report.ppl_bos else ''})", f"{value:.2f}",
                      f"{report.perplexity_after[source]:.2f}")
    console.print(table)
    if report.out is not None:
        console.print(f"saved to {report.out}  ({report.seconds:.1f} s)")

