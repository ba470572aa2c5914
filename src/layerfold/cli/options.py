"""Options shared by the commands, declared once, and the checks that run before any model is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from layerfold.errors import LayerfoldError

ModelArg = Annotated[str | None, typer.Argument(help="Hub id or local folder; default: the embedded SmolLM2-135M.")]
Dtype = Annotated[str, typer.Option(help="float32, bfloat16, float16 or auto.")]
Device = Annotated[str, typer.Option(help="cpu, cuda, cuda:N or auto.")]
MaxGpuMemory = Annotated[str | None, typer.Option(
    "--max-gpu-memory", help="Larger than the GPU: keep the weights in CPU memory and bring one decoder layer at "
                             "a time to the GPU (--device, default cuda), within this much GPU memory: 8GiB, 8GB, "
                             "8000MiB. Activations stay on the CPU; the plan is the same as without the cap.")]
DeviceMap = Annotated[str | None, typer.Option(
    "--device-map", help="Several GPUs: spread the model over them with accelerate (auto, balanced, "
                         "balanced_low_0, sequential); each layer runs on its own GPU. Replaces --device.")]


def placement(device: str, max_gpu_memory: str | None, device_map: str | None) -> tuple[dict, dict]:
    """(load_model keywords, streaming keywords for the API), checked before anything is loaded."""
    if max_gpu_memory is not None and device_map is not None:
        raise LayerfoldError("give either --max-gpu-memory (stream from the CPU through one GPU) or --device-map "
                             "(spread over GPUs), not both")
    if max_gpu_memory is not None:
        from layerfold.streaming import parse_memory, resolve_compute_device

        parse_memory(max_gpu_memory)
        compute = resolve_compute_device(None if device in ("cpu", "auto") else device)
        return {"device": "cpu"}, {"max_gpu_memory": max_gpu_memory, "compute_device": compute}
    if device_map is not None:
        from layerfold.models.load import resolve_device_map

        return {"device_map": resolve_device_map(device_map)}, {}
    return {"device": device}, {}


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


def planning(method, threshold, target_layers, ratio, param_ratio, criterion, merge, norms, set_,
              calib_source, calib_samples, calib_seq_len, seed, calib_sampling):
    from layerfold.data.tokens import CalibrationConfig
    from layerfold.methods.base import Target, make_method

    if target_layers is not None and target_layers < 1:
        raise LayerfoldError(f"--target-layers must be at least 1, got {target_layers}")
    target = Target(layers=target_layers, ratio=ratio, param_ratio=param_ratio)
    if not target.given and threshold is None and method == "slm":
        target = Target(ratio=0.2)
    options = method_options(set_, threshold=threshold, criterion=criterion, merge=merge, norms=norms)
    make_method(method, options)  # unknown method or option: fail before loading the model
    calib = CalibrationConfig(source=calib_source, samples=calib_samples, seq_len=calib_seq_len, seed=seed,
                              sampling=calib_sampling)
    return target, options, calib


Method = Annotated[str, typer.Option(help="Planner: slm (default), shortgpt, angular, laco, sleb, "
                                          "shortened-ppl, shortened-taylor, last-n. See `layerfold methods`.")]
Threshold = Annotated[float | None, typer.Option(help="slm, laco: similarity threshold, as in the papers.")]
TargetLayers = Annotated[int | None, typer.Option("--target-layers", help="Layers to keep.")]
Ratio = Annotated[float | None, typer.Option(help="Share of decoder layers to remove (default 0.2 for slm).")]
ParamRatio = Annotated[float | None, typer.Option("--param-ratio", help="Share of all parameters to remove.")]
Criterion = Annotated[str | None, typer.Option(help="slm: output-cosine, cka-linear, cka-rbf or angular.")]
Merge = Annotated[str | None, typer.Option(help="slm, laco: merge operator (diff, mean, reference, base).")]
Norms = Annotated[str | None, typer.Option(help="slm: norm parameters: base (keep the base layer's) or merge.")]
SetOpt = Annotated[list[str] | None, typer.Option("--set", help="Other method option, key=value (repeatable).")]
CalibSource = Annotated[str, typer.Option(help="Calibration text: books, ptb-train, wikitext2, or a file.")]
CalibSamples = Annotated[int, typer.Option(help="Calibration samples.")]
CalibSeqLen = Annotated[int, typer.Option(help="Tokens per calibration sample.")]
Seed = Annotated[int, typer.Option(help="Seed for calibration sampling.")]
Sampling = Annotated[str, typer.Option(help="random (seeded) or strided.")]


def check_out(out: Path | None, overwrite: bool) -> None:
    """Refuse an existing output folder before any work is done."""
    if out is not None and out.exists() and not overwrite:
        raise LayerfoldError(f"output folder {out} exists: choose another --out or pass --overwrite")



def print_split(console, dw: dict) -> None:
    """The depth/width split a combined prune took, and every candidate split's held-out loss."""
    console.print(f"split {dw['split']} (share of removed parameters taken by depth): removed "
                  f"{dw['achieved_ratio']:.1%} of parameters")
    for cand in dw["candidates"]:
        loss = f"{cand['heldout_nll']:.4f}" if cand["heldout_nll"] is not None else cand["error"]
        console.print(f"  split {cand['split']}: layers {cand['layers']}, held-out calibration NLL {loss}")
