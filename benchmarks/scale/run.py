"""Larger than the GPU: a Llama-2-13B-shaped model planned with the GPU capped at 8 GiB.

    python3 benchmarks/scale/run.py --out scale.json              # one H200 (or several)
    python3 benchmarks/scale/run.py --tiny --out scale-tiny.json  # a CPU smoke test
    python benchmarks/scale/report.py                             # RESULTS.md from results.jsonl

The model is random-initialised from Llama-2-13B's shape (40 layers, hidden 5120, MLP 13824, 40
heads, vocab 32000), bf16, held in CPU memory (the random weights are drawn on the GPU when
there is one, which is faster, then moved to the CPU).  Calibration: 10 x 128 random token ids,
seed 1234.  Two plans at 35% of the layers (14 of 40): the default ``slm`` and ``shortgpt``,

(b) streamed: ``max_gpu_memory=8GiB`` (``layerfold.streaming``), weights on the CPU, one layer at
    a time on the GPU; ``torch.cuda.max_memory_allocated`` is reset before and read after each
    plan and must stay under the cap;
(a) uncapped: the whole model on one GPU;
(c) with two GPUs or more: the model spread over all of them by accelerate's ``device_map``
    (``infer_auto_device_map`` on balanced memory, then ``dispatch_model``, which is what
    ``from_pretrained(device_map=...)`` does); with ``--tiny`` and fewer GPUs, a CPU-only
    stand-in with accelerate's hooks on every layer;

and checks that all of them make the same plan.  The streamed ``slm`` plan is then applied to
the CPU model and saved shard by shard (``save_model``, 2 GB shards) to a temporary folder whose
config is read back (26 layers); with ``--tiny`` the saved model is also loaded and its logits
compared with the in-memory pruned model's.

Cost of the default ``slm`` under streaming: the greedy fold scores every adjacent pair at each
of the 14 steps, each candidate running the layers above it, about sum_n n(n-1)/2 + n/2 ~ 8,000
layer runs for n = 40 .. 27 segments, each bringing ~0.59 GiB of weights over PCIe (~12 ms at
50 GB/s from pinned memory: ~100 s), plus ~450 candidate layers copied on the CPU and sent from
pageable memory.  The script measures the transfer speed first and, if the estimate does not fit
``--budget-s`` (340 s for the whole script), plans with ``--set selection=optimal`` instead (in
every run, so that the plans stay comparable) and says so in the output.

Writes JSON to ``--out`` after every phase (a cut-off run keeps what it measured) and prints a
markdown summary.
"""

from __future__ import annotations

import argparse
import copy
import gc
import itertools
import json
import shutil
import statistics
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

import torch

from layerfold import api
from layerfold.bench.speed import machine_info
from layerfold.methods.base import Target
from layerfold.models.arch import architecture_for
from layerfold.models.load import wrap_model
from layerfold.streaming import GIB, LayerStreamer, parse_memory

SHAPES = {
    "13b": dict(num_hidden_layers=40, hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5,
                tie_word_embeddings=False),
    "tiny": dict(num_hidden_layers=12, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256, max_position_embeddings=512, tie_word_embeddings=False),
}
LAYER_CLASS = "LlamaDecoderLayer"
METHODS = ("slm", "shortgpt")
START = time.perf_counter()


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f} s] {msg}", flush=True)


def sync() -> None:
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.synchronize(i)


@contextmanager
def default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_cpu_model(shape: str, dtype: torch.dtype, seed: int, draw_on: str) -> torch.nn.Module:
    """transformers' random initialisation, drawn on ``draw_on``, the model left on the CPU."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    with default_dtype(dtype), torch.device(draw_on):
        model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    model.to("cpu")
    if draw_on != "cpu":
        torch.cuda.empty_cache()
    return model.eval()


def _device_for(name: str, device_map: dict) -> str | int:
    parts = name.split(".")
    for k in range(len(parts), -1, -1):
        key = ".".join(parts[:k])
        if key in device_map:
            return device_map[key]
    return next(iter(device_map.values()))  # a module the map leaves out: the main device


def placed_copy(cpu_model: torch.nn.Module, device_map: dict, dtype: torch.dtype) -> torch.nn.Module:
    """A copy of ``cpu_model`` with each tensor put straight on its device of ``device_map``
    (accelerate's empty-weights skeleton; the CPU model is left as it is)."""
    from accelerate import init_empty_weights
    from accelerate.utils import set_module_tensor_to_device
    from transformers import LlamaForCausalLM

    with init_empty_weights(), default_dtype(dtype):
        skeleton = LlamaForCausalLM(copy.deepcopy(cpu_model.config))
    for name, tensor in itertools.chain(cpu_model.named_parameters(), cpu_model.named_buffers()):
        set_module_tensor_to_device(skeleton, name, _device_for(name, device_map), value=tensor)
    return skeleton.eval()


def spread_over_gpus(cpu_model: torch.nn.Module, dtype: torch.dtype, simulate: bool) -> tuple[torch.nn.Module, dict]:
    """The model spread over every GPU as ``from_pretrained(device_map="auto")`` spreads it
    (balanced memory, whole decoder layers); ``simulate``: every module on the CPU behind
    accelerate's hooks, to run the code path without GPUs."""
    from accelerate import dispatch_model, infer_auto_device_map
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module
    from accelerate.utils import get_balanced_memory

    if simulate:
        device_map = {"": "cpu"}
        model = placed_copy(cpu_model, device_map, dtype)
        for layer in model.model.layers:
            add_hook_to_module(layer, AlignDevicesHook(execution_device="cpu"))
        return model, device_map
    with _empty(cpu_model, dtype) as skeleton:
        memory = get_balanced_memory(skeleton, no_split_module_classes=[LAYER_CLASS], dtype=dtype)
        memory.pop("cpu", None)
        device_map = infer_auto_device_map(skeleton, max_memory=memory, no_split_module_classes=[LAYER_CLASS],
                                           dtype=dtype)
    if any(isinstance(d, str) and d in ("cpu", "disk") for d in device_map.values()):
        raise RuntimeError(f"the model does not fit on the GPUs: {device_map}")
    model = placed_copy(cpu_model, device_map, dtype)
    model = dispatch_model(model, device_map=device_map)
    return model, device_map


@contextmanager
def _empty(cpu_model: torch.nn.Module, dtype: torch.dtype):
    from accelerate import init_empty_weights
    from transformers import LlamaForCausalLM

    with init_empty_weights(), default_dtype(dtype):
        yield LlamaForCausalLM(copy.deepcopy(cpu_model.config))


def greedy_cost(num_layers: int, remove: int) -> tuple[int, int]:
    """(layer runs, candidate fused layers built) of the default slm's greedy fold."""
    runs = builds = 0
    for n in range(num_layers, num_layers - remove, -1):
        runs += n * (n - 1) // 2 + n // 2  # candidates with the layers above them; propagation
        builds += n - 1
    return runs, builds


def probe(model, arch, cap: int, compute: torch.device) -> dict:
    """Transfer speed of one streamed layer (pinned, as the streamer keeps them) and of a
    fresh candidate copy (pageable), and the CPU cost of that copy."""
    streamer = LayerStreamer(compute, cap)
    tick = time.perf_counter()
    streamer.attach(model, arch)  # pins the decoder layers once (kept pinned afterwards)
    pin_s = time.perf_counter() - tick
    layers = arch.layer_list(model)
    try:
        times, copies, pageable = [], [], []
        for i in (1, 2, 3, 1, 2, 3):
            sync()
            tick = time.perf_counter()
            with streamer.on_device(layers[i]):
                sync()
            times.append(time.perf_counter() - tick)
        for i in (1, 2):
            tick = time.perf_counter()
            fresh = copy.deepcopy(layers[i])
            copies.append(time.perf_counter() - tick)
            sync()
            tick = time.perf_counter()
            with streamer.on_device(fresh):
                sync()
            pageable.append(time.perf_counter() - tick)
            del fresh
    finally:
        streamer.detach()
    layer_bytes = streamer.stats["max_layer_bytes"]
    upload = min(times[3:])
    return {"pin_seconds": round(pin_s, 3), "pinned": streamer.stats["pinned"], "layer_bytes": layer_bytes,
            "upload_s": upload, "upload_gb_per_s": layer_bytes / upload / 1e9,
            "candidate_copy_s": min(copies), "candidate_upload_s": min(pageable),
            "candidate_upload_gb_per_s": layer_bytes / min(pageable) / 1e9}


def peak_reset() -> None:
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            torch.cuda.reset_peak_memory_stats(i)


def peaks() -> dict[str, float]:
    if not torch.cuda.is_available():
        return {}
    return {f"cuda:{i}": torch.cuda.max_memory_allocated(i) / GIB for i in range(torch.cuda.device_count())}


def windows(result) -> list[list]:
    return [[o.kind, o.lo, o.hi] for o in result.plan.operations]


def plan_once(model, method: str, options: dict | None, tokens, ratio: float, **stream) -> dict:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    peak_reset()
    sync()
    tick = time.perf_counter()
    result = api.make_plan(wrap_model(model), method, Target(ratio=ratio), options=options, tokens=tokens,
                           progress=False, **stream)
    sync()
    seconds = time.perf_counter() - tick
    record = {"method": method, "options": options or {}, "seconds": round(seconds, 2), "plan": windows(result),
              "scores": [o.score for o in result.plan.operations], "peak_gib": peaks(),
              "summary": result.plan.summary()}
    if "streaming" in result.plan.provenance:
        record["streaming"] = result.plan.provenance["streaming"]
    log(f"{method}: {seconds:.1f} s, plan {record['plan']}, peak {record['peak_gib']}")
    return record, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="JSON results")
    parser.add_argument("--tiny", action="store_true", help="a tiny Llama, runs on the CPU (smoke test)")
    parser.add_argument("--cap", default="8GiB", help="--max-gpu-memory of the streamed runs")
    parser.add_argument("--ratio", type=float, default=0.35)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--budget-s", type=float, default=340.0,
                        help="wall-clock budget: beyond it the slm plans use selection=optimal")
    parser.add_argument("--slm-set", action="append", default=[], metavar="KEY=VALUE",
                        help="slm options for every run (skips the automatic choice)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="plan the streamed slm this many times (the row keeps each time, the minimum, the median)")
    parser.add_argument("--save-dir", type=Path, default=None, help="where the pruned model is written, then removed")
    args = parser.parse_args()

    shape = "tiny" if args.tiny else "13b"
    if args.tiny:
        torch.set_num_threads(1)  # tiny matmuls run fastest on one thread
    dtype = torch.float32 if args.tiny else torch.bfloat16
    has_gpu = torch.cuda.is_available()
    if not has_gpu and not args.tiny:
        parser.error("the 13B run needs a CUDA GPU; use --tiny on the CPU")
    compute = torch.device("cuda", 0) if has_gpu else torch.device("cpu")
    cap = parse_memory(args.cap)
    gpus = torch.cuda.device_count() if has_gpu else 0
    results: dict = {"command": " ".join(sys.argv), "shape": shape, "config": SHAPES[shape], "dtype": str(dtype),
                     "machine": machine_info(compute), "gpus": gpus, "cap": args.cap, "cap_bytes": cap,
                     "ratio": args.ratio, "calibration": {"samples": args.samples, "seq_len": args.seq_len,
                                                          "seed": args.seed, "tokens": "random ids"},
                     "runs": {}, "checks": {}, "errors": {}, "notes": []}
    if has_gpu:
        results["machine"]["gpu_names"] = [torch.cuda.get_device_name(i) for i in range(gpus)]

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        results["elapsed_s"] = round(time.perf_counter() - START, 1)
        args.out.write_text(json.dumps(results, indent=2, default=str) + "\n")

    def phase(name: str, fn) -> object:
        try:
            return fn()
        except Exception as exc:  # record and go on: one command should bring back all it can
            results["errors"][name] = f"{type(exc).__name__}: {exc}"
            log(f"{name} FAILED: {exc}")
            traceback.print_exc()
            return None
        finally:
            save()

    log(f"building the {shape} model ({dtype}) ...")
    tick = time.perf_counter()
    model = build_cpu_model(shape, dtype, args.seed, "cuda" if has_gpu else "cpu")
    arch = architecture_for(model.config)
    n_layers = len(arch.layer_list(model))
    results["build_s"] = round(time.perf_counter() - tick, 1)
    results["weights_gib"] = sum(p.numel() * p.element_size() for p in model.parameters()) / GIB
    log(f"built in {results['build_s']} s: {results['weights_gib']:.2f} GiB of weights on the CPU")
    tokens = torch.randint(0, model.config.vocab_size, (args.samples, args.seq_len),
                           generator=torch.Generator().manual_seed(args.seed))
    stream = {"max_gpu_memory": args.cap, "compute_device": compute}
    remove = round(args.ratio * n_layers)

    # -- transfer speed, then the streamed shortgpt, then the choice of slm selection ------------
    speed = phase("probe", lambda: probe(model, arch, cap, compute))
    results["probe"] = speed
    runs = results["runs"]
    capped = phase("capped_shortgpt", lambda: plan_once(model, "shortgpt", None, tokens, args.ratio, **stream))
    if capped:
        runs["capped_shortgpt"] = capped[0]
    slm_options: dict = {}
    for pair in args.slm_set:
        key, _, value = pair.partition("=")
        try:
            slm_options[key] = json.loads(value)
        except json.JSONDecodeError:
            slm_options[key] = value
    greedy_runs, builds = greedy_cost(n_layers, remove)
    estimate = None
    if speed:
        estimate = (greedy_runs * speed["upload_s"] * 1.15
                    + builds * (speed["candidate_copy_s"] + speed["candidate_upload_s"]))
    elapsed = time.perf_counter() - START
    # what follows the streamed slm: the uncapped run (~40 s), the spread one (~45 s), the save (~30 s)
    reserve = 30.0 if args.tiny else 90.0 + (45.0 if gpus >= 2 else 0.0)
    results["slm_estimate"] = {"greedy_layer_runs": greedy_runs, "candidate_builds": builds,
                               "streamed_seconds": None if estimate is None else round(estimate, 1),
                               "elapsed_before_s": round(elapsed, 1), "reserve_s": reserve,
                               "budget_s": args.budget_s}
    if not args.slm_set and estimate is not None and elapsed + estimate + reserve > args.budget_s:
        slm_options = {"selection": "optimal"}
        note = (f"the default greedy slm would take about {estimate:.0f} s streamed ({greedy_runs} layer runs at "
                f"{speed['upload_s'] * 1000:.0f} ms, {builds} candidate copies), beyond the {args.budget_s:.0f} s "
                "budget: every slm run here uses --set selection=optimal instead")
        results["notes"].append(note)
        log(note)
    results["slm_options"] = slm_options
    capped_slm = None
    for repeat in range(args.repeat):
        capped = phase("capped_slm", lambda: plan_once(model, "slm", slm_options or None, tokens, args.ratio, **stream))
        if not capped:
            break
        record, capped_slm = capped
        if repeat:  # every repetition must plan alike; the row keeps the first one's plan
            results["checks"][f"capped_slm_repeat_{repeat}_same_plan"] = record["plan"] == runs["capped_slm"]["plan"]
            record = {**runs["capped_slm"], "all_seconds": runs["capped_slm"]["all_seconds"] + [record["seconds"]]}
        else:
            record["all_seconds"] = [record["seconds"]]
        record["min_seconds"] = min(record["all_seconds"])
        record["median_seconds"] = statistics.median(record["all_seconds"])
        runs["capped_slm"] = record
        save()

    # -- uncapped, whole model on one GPU --------------------------------------------------------
    def uncapped() -> None:
        device = "cuda:0" if has_gpu else "cpu"
        whole = placed_copy(model, {"": device}, dtype)
        try:
            for method in METHODS:
                record, _ = plan_once(whole, method, slm_options if method == "slm" else None, tokens, args.ratio)
                runs[f"uncapped_{method}"] = record
                save()
        finally:
            del whole

    phase("uncapped", uncapped)

    # -- spread over several GPUs ----------------------------------------------------------------
    def spread() -> None:
        gc.collect()
        if has_gpu:
            torch.cuda.empty_cache()
        simulate = gpus < 2
        spread_model, device_map = spread_over_gpus(model, dtype, simulate)
        results["device_map"] = {k: str(v) for k, v in device_map.items()}
        try:
            for method in METHODS:
                record, _ = plan_once(spread_model, method, slm_options if method == "slm" else None, tokens,
                                      args.ratio)
                record["simulated_on_cpu"] = simulate
                runs[f"spread_{method}"] = record
                save()
        finally:
            del spread_model

    if gpus >= 2 or args.tiny:
        phase("spread", spread)
    else:
        results["notes"].append("one GPU: the device_map run (c) was not made")

    # -- checks ----------------------------------------------------------------------------------
    checks = results["checks"]
    for method in METHODS:
        ref = runs.get(f"uncapped_{method}")
        for kind in ("capped", "spread"):
            other = runs.get(f"{kind}_{method}")
            if ref and other:
                checks[f"{kind}_{method}_same_plan"] = other["plan"] == ref["plan"]
                # equal to 1e-12: a cosine reduced in float64 on the GPU (uncapped) and on the CPU (streamed,
                # the activations kept there) may differ in the last bit
                checks[f"{kind}_{method}_same_scores"] = len(other["scores"]) == len(ref["scores"]) and all(
                    abs(a - b) <= 1e-12 for a, b in zip(other["scores"], ref["scores"], strict=True))
        capped_run = runs.get(f"capped_{method}")
        if capped_run and has_gpu:
            checks[f"capped_{method}_peak_under_cap"] = capped_run["peak_gib"]["cuda:0"] * GIB < cap
    save()

    # -- save the streamed slm plan's model shard by shard, read it back -------------------------
    def save_pruned() -> None:
        from transformers import AutoConfig

        from layerfold.output import save_model

        if capped_slm is None:
            raise RuntimeError("no streamed slm plan to apply")
        reference = copy.deepcopy(model) if args.tiny else None
        api.apply_plan(model, capped_slm)
        parent = args.save_dir or Path.cwd()
        parent.mkdir(parents=True, exist_ok=True)
        folder = Path(tempfile.mkdtemp(prefix="scale-pruned-", dir=parent))
        try:
            tick = time.perf_counter()
            out = save_model(model, None, folder / "model", max_shard_size="2GB")
            seconds = time.perf_counter() - tick
            shards = sorted(out.glob("*.safetensors"))
            config = AutoConfig.from_pretrained(out)
            record = {"seconds": round(seconds, 1), "shards": len(shards),
                      "bytes": sum(p.stat().st_size for p in shards),
                      "index": (out / "model.safetensors.index.json").is_file(),
                      "num_hidden_layers": config.num_hidden_layers, "expected_layers": n_layers - remove}
            checks["saved_layer_count"] = config.num_hidden_layers == n_layers - remove
            if args.tiny:
                from transformers import AutoModelForCausalLM

                api.apply_plan(reference, capped_slm)
                reloaded = AutoModelForCausalLM.from_pretrained(out).eval()
                ids = tokens[:2, :32]
                with torch.no_grad():
                    diff = (reloaded(input_ids=ids).logits - reference(input_ids=ids).logits).abs().max()
                record["max_logit_diff_vs_in_memory"] = float(diff)
                checks["saved_logits_match"] = float(diff) < 1e-4
            results["save"] = record
            log(f"saved {record['shards']} shards, {record['bytes'] / 1e9:.1f} GB in {seconds:.1f} s; "
                f"config reads {config.num_hidden_layers} layers")
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    phase("save", save_pruned)
    results["passed"] = bool(checks) and all(checks.values()) and not results["errors"]
    save()
    print(markdown(results))
    return 0 if results["passed"] else 1


def markdown(results: dict) -> str:
    lines = [f"## Streaming: {results['shape']} Llama ({results['config']['num_hidden_layers']} layers, "
             f"{results.get('weights_gib', 0):.1f} GiB of {results['dtype']} weights), cap {results['cap']}", ""]
    machine = results["machine"]
    lines.append(f"Machine: {machine.get('gpu', 'CPU only')} x {results['gpus']}, torch {machine['torch']}, "
                 f"transformers {machine['transformers']}; calibration {results['calibration']['samples']} x "
                 f"{results['calibration']['seq_len']} random tokens; ratio {results['ratio']}.")
    if results.get("probe"):
        p = results["probe"]
        lines.append(f"Transfer: one layer ({p['layer_bytes'] / GIB:.2f} GiB) in {p['upload_s'] * 1000:.1f} ms "
                     f"({p['upload_gb_per_s']:.1f} GB/s, pinned={p['pinned']}, pinning took {p['pin_seconds']} s); "
                     f"a fresh candidate copy {p['candidate_copy_s'] * 1000:.0f} ms on the CPU + "
                     f"{p['candidate_upload_s'] * 1000:.0f} ms to the GPU.")
    est = results.get("slm_estimate", {})
    if est.get("streamed_seconds") is not None:
        lines.append(f"Default slm streamed, estimated: {est['greedy_layer_runs']} layer runs, "
                     f"{est['candidate_builds']} candidates, ~{est['streamed_seconds']} s.")
    lines += [f"Note: {n}" for n in results["notes"]]
    lines += ["", "| run | method | options | seconds | peak GiB (max_memory_allocated) | plan |",
              "|---|---|---|---:|---|---|"]
    for name, run in results["runs"].items():
        peak = ", ".join(f"{d} {v:.2f}" for d, v in run["peak_gib"].items()) or "-"
        plan = " ".join(f"{k[0]}{lo}" + (f"-{hi}" if hi != lo else "") for k, lo, hi in run["plan"])
        opts = ",".join(f"{k}={v}" for k, v in run["options"].items()) or "default"
        seconds = run["seconds"]
        if len(run.get("all_seconds", [])) > 1:
            seconds = (f"{run['min_seconds']} / {run['median_seconds']} (min / median of {len(run['all_seconds'])}: "
                       + ", ".join(str(t) for t in run["all_seconds"]) + ")")
        lines.append(f"| {name} | {run['method']} | {opts} | {seconds} | {peak} | {plan} |")
    if results.get("save"):
        s = results["save"]
        lines += ["", f"Saved (streamed slm plan, CPU weights): {s['shards']} safetensors shards, "
                      f"{s['bytes'] / 1e9:.2f} GB in {s['seconds']} s; config reads {s['num_hidden_layers']} layers "
                      f"(expected {s['expected_layers']})."]
    lines += ["", "Checks: " + ", ".join(f"{k} {'ok' if v else 'FAILED'}" for k, v in results["checks"].items())]
    if results["errors"]:
        lines += ["", "Errors: " + "; ".join(f"{k}: {v}" for k, v in results["errors"].items())]
    lines.append(f"\nPassed: {results.get('passed')}; {results.get('elapsed_s')} s in all.")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
