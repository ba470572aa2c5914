"""Depth only, width only and the auto-picked depth plus width split, on a GPU: perplexity,
zero-shot accuracy and inference speed against the dense model, in one command.

    run     prune SmolLM2-135M (embedded) at each --ratios budget (share of ALL parameters) with
            ``layerfold.width.depth_width_prune(split="auto")``: a copy pruned at each split
            0, 0.25, 0.5, 0.75, 1 (0 = width only, 1 = depth only), the lowest held-out
            calibration loss kept (evaluation sets never steer a choice).  Then, in this order,
            each result written to ``<out>/depth_width_gpu.jsonl`` as soon as it exists:
              1. perplexity (WikiText-2 raw test, PTB test; 128-token windows, no BOS, float32)
                 of the dense model and of every split tried;
              2. zero-shot (lm-evaluation-harness through ``layerfold.evaluate.zeroshot``,
                 seven tasks, first --zs-limit documents each, batch --zs-batch) of the dense
                 model, then per budget: the auto pick, depth only, width only;
              3. inference speed of the same models with ``layerfold.bench.speed`` (greedy
                 ``generate``, random 128-token prompt, 128 new tokens; static KV cache +
                 ``torch.compile``, CUDA graphs, as ``layerfold bench``; bf16 copies), one
                 ``measure_models`` call per batch size, dense first (the reference).
            Nothing new starts after --budget-s seconds (a "skipped" row says what was left),
            so a run cut by a time limit keeps every finished row.
    report  print the GPU tables of a JSONL (or write them between markers into a markdown file);
            the committed rows are in results.jsonl and report.py writes RESULTS.md from them.

On the H200 (no network; SmolLM2 through layerfold's loader, WikiText-2 from $LAYERFOLD_WIKITEXT2):

    PYTHONPATH=src LAYERFOLD_WIKITEXT2=/path/wiki.test.raw HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 \\
        python benchmarks/depth_width/run_gpu.py run --device cuda --out $OUT
    python benchmarks/depth_width/run_gpu.py report $OUT/depth_width_gpu.jsonl

Smoke test on a CPU (SmolLM2 cut to 6 layers, its first 5 and its last; budgets 10% and 20%; 4 x 64
calibration tokens; 2 perplexity windows; 2 documents per zero-shot task; eager speed, 4 new tokens):

    python benchmarks/depth_width/run_gpu.py run --device cpu --tiny --out /tmp/dwg
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/
from depth_width.run import git_commit  # noqa: E402

JSONL = "depth_width_gpu.jsonl"
SOURCES = ("wikitext2", "ptb")
TASK_NAMES = {"boolq": "BoolQ", "piqa": "PIQA", "hellaswag": "HellaSwag", "winogrande": "WinoGrande",
              "arc_easy": "ARC-e", "arc_challenge": "ARC-c", "openbookqa": "OBQA"}
BEGIN, END = "<!-- depth_width_gpu: begin (written by benchmarks/depth_width/run_gpu.py report) -->", \
    "<!-- depth_width_gpu: end -->"
TINY = {"ratios": "0.1,0.2", "calib_samples": 4, "calib_seq_len": 64, "held_out": 4, "ppl_windows": 2,
        "zs_limit": 2, "zs_batch": 8, "speed_modes": "eager", "speed_batch_sizes": "1,2", "new_tokens": 4,
        "prompt_len": 16, "repeats": 1, "warmup_tokens": 2}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


class Writer:
    """Appends one JSON row per result to the JSONL, flushed at once; every row says which commit, date and
    machine made it (``stamp``)."""

    def __init__(self, path: Path, run_id: str, stamp: dict | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self.run_id, self.stamp = path, run_id, stamp or {}

    def __call__(self, kind: str, **row) -> dict:
        row = {"kind": kind, "run": self.run_id, **self.stamp, **row}
        with open(self.path, "a") as fh:
            fh.write(json.dumps(row, default=float) + "\n")
        brief = {k: v for k, v in row.items() if k in ("kind", "label", "batch", "mode", "what", "seconds",
                                                         "zs_mean", "perplexity", "decode_ms_per_token",
                                                         "speedup_total", "chosen_split")}
        log(json.dumps(brief, default=float))
        return row


# ------------------------------------------------------------------------------ models


def truncate(loaded, layers: int) -> None:
    """Keep the first ``layers - 1`` decoder layers and the last one (the --tiny smoke model)."""
    from layerfold.plan import Operation, Plan
    from layerfold.surgery import apply_plan

    n = len(loaded.arch.layer_list(loaded.model))
    if layers < n:
        apply_plan(loaded.model, Plan(method="truncate", num_layers=n,
                                      operations=[Operation("drop", i, i) for i in range(layers - 1, n - 1)]))


def describe(model, before: int) -> dict:
    from layerfold.models.arch import architecture_for, parameter_count

    cfg = model.config
    params = parameter_count(model)
    return {"layers": len(architecture_for(cfg).layer_list(model)), "params": params,
            "removed": round(1 - params / before, 4), "intermediate_size": cfg.intermediate_size,
            "heads": f"{cfg.num_attention_heads}/{cfg.num_key_value_heads}"}


def eval_windows(tokenizer, windows: int | None) -> dict:
    from layerfold.data.sources import load_text, source_description
    from layerfold.data.tokens import token_stream
    from layerfold.evaluate.perplexity import windows_from_stream

    out = {}
    for source in SOURCES:
        w = windows_from_stream(token_stream(tokenizer, load_text(source)), 128, None, windows)
        out[source] = (w, f"{source_description(source)}; {len(w)} non-overlapping windows of 128 tokens, no BOS")
    return out


def perplexities(model, windows: dict, batch_size: int) -> dict[str, float]:
    import math

    from layerfold.evaluate.perplexity import perplexity_of_windows

    return {s: math.exp(perplexity_of_windows(model, w, False, batch_size, progress=False)[0])
            for s, (w, _) in windows.items()}


def label_of(ratio: float, split: float) -> str:
    kind = {0.0: "width only", 1.0: "depth only"}.get(split, f"split {split}")
    return f"{ratio:.0%} {kind}"


# ------------------------------------------------------------------------------- phases


def prune_budget(base, ratio: float, args, calib, heldout, windows, before: int, write) -> dict[str, object]:
    """All splits at one budget; returns {role: model} for depth only, width only and the auto pick."""
    from layerfold.width import depth_width_prune

    kept: dict[float, object] = {}
    start = time.perf_counter()

    def on_candidate(cand, trial) -> None:
        t0 = time.perf_counter()
        ppl = perplexities(trial.model, windows, args.ppl_batch) if windows else None
        write("model", label=label_of(ratio, cand.split), budget=ratio, split=cand.split,
              heldout_nll=cand.heldout_nll, attention=cand.attention, depth_plan=cand.depth_plan,
              attention_search=cand.attention_search, perplexity=ppl, ppl_seconds=round(time.perf_counter() - t0, 1),
              **describe(trial.model, before))
        if cand.split in (0.0, 1.0):
            kept[cand.split] = trial.model

    loaded = copy.deepcopy(base)
    result = depth_width_prune(loaded, ratio, split="auto", method=args.method, calibration=calib,
                               splits=[float(s) for s in args.splits.split(",")], held_out=args.held_out,
                               heldout_tokens=heldout, progress=False, on_candidate=on_candidate)
    write("prune", label=f"{ratio:.0%}", budget=ratio, chosen_split=result.split,
          candidates=[{"split": c.split, "layers": c.layers, "params": c.params, "heldout_nll": c.heldout_nll,
                       "error": c.error} for c in result.candidates],
          seconds=round(time.perf_counter() - start, 1))
    models = {f"{ratio:.0%} auto": result.loaded.model}
    models.update({label_of(ratio, s): m for s, m in sorted(kept.items(), reverse=True)
                   if s != result.split})  # the pick is not evaluated twice
    return models


def zeroshot(models: dict, tokenizer, args, write, deadline: float) -> None:
    from layerfold.evaluate.zeroshot import evaluate_zeroshot

    for label, model in models.items():
        if time.perf_counter() > deadline:
            write("skipped", what="zeroshot", label=label, reason="--budget-s reached")
            continue
        zs = evaluate_zeroshot(model, tokenizer, "zeroshot7", limit=args.zs_limit, batch_size=args.zs_batch,
                               progress=False)
        protocol = {k: v for k, v in zs["protocol"].items() if k not in ("splits", "metrics", "mean")}
        write("zeroshot", label=label, tasks={t: r["value"] for t, r in zs["tasks"].items()},
              samples={t: r["samples"] for t, r in zs["tasks"].items()}, zs_mean=zs["summary"].get("mean"),
              zs_mean_without_boolq=zs["summary"].get("mean_without_boolq"), protocol=protocol,
              seconds=zs["seconds"])
        if model.device.type == "cuda":
            torch.cuda.empty_cache()


def speed(models: dict, args, write, deadline: float) -> None:
    import torch._dynamo

    from layerfold.bench.speed import SpeedConfig, measure_models

    # one static compile per model and batch size: a recompile for a second batch size would
    # otherwise go dynamic, which took longer (tiny Llama on CPU, warm-up at batch 4 after batch 1:
    # 24 s and 13 s dynamic against 18 s and 5 s static; no per-step recompiles either way)
    torch._dynamo.config.automatic_dynamic_shapes = False
    dtype = getattr(torch, args.speed_dtype)
    copies = {label: copy.deepcopy(m).to(dtype).eval() for label, m in models.items()}
    for batch in (int(b) for b in args.speed_batch_sizes.split(",")):
        if time.perf_counter() > deadline:
            write("skipped", what="speed", batch=batch, reason="--budget-s reached")
            continue
        config = SpeedConfig(batch_sizes=(batch,), new_tokens=args.new_tokens, prompt_len=args.prompt_len,
                             repeats=args.repeats, compile=not args.no_compile,
                             modes=tuple(args.speed_modes.split(",")), warmup_tokens=args.warmup_tokens)
        start = time.perf_counter()
        result = measure_models(copies, config, log=log)
        for row in result["results"]:
            row["label"] = row.pop("model")
            write("speed", dtype=args.speed_dtype, config=result["config"], **row)
        write("speed_done", batch=batch, facts=result["models"], seconds=round(time.perf_counter() - start, 1))
    del copies
    gc.collect()


def machine(device: torch.device) -> dict:
    import lm_eval

    from layerfold.bench.speed import machine_info

    info = {**machine_info(device), "torch_threads": torch.get_num_threads(), "lm_eval": lm_eval.__version__}
    if device.type == "cuda":
        try:
            info["nvidia_smi"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True, text=True, check=False, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return info


def run(args) -> None:
    from layerfold import api
    from layerfold.data.tokens import CalibrationConfig
    from layerfold.evaluate.perplexity import perplexity_of_windows
    from layerfold.models.arch import parameter_count
    from layerfold.width import held_out_windows

    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's progress bars would drown the log
    start = time.perf_counter()
    deadline = start + args.budget_s
    phases = set(args.phases.split(","))
    torch.manual_seed(0)
    wikitext = os.environ.get("LAYERFOLD_WIKITEXT2")
    command = (f"LAYERFOLD_WIKITEXT2={wikitext} " if wikitext else "") + "python " + shlex.join(sys.argv)
    base = api.load_model(args.model, device=args.device)
    device = next(base.model.parameters()).device
    label = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()}-core CPU"
    stamp = {"commit": args.commit or git_commit(), "date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": label}
    write = Writer(args.out / JSONL, time.strftime("%Y%m%dT%H%M%S"), stamp)
    if args.tiny:
        truncate(base, args.tiny_layers)
    calib = CalibrationConfig(samples=args.calib_samples, seq_len=args.calib_seq_len,
                              batch_size=args.calib_batch)
    write("run", command=command, machine=machine(device), layerfold_commit=args.commit or git_commit(),
          model=base.source + (f" (first {args.tiny_layers - 1} layers and the last)" if args.tiny else ""),
          tiny=args.tiny, method=args.method, calibration=calib.describe(), held_out=args.held_out,
          args={k: str(v) for k, v in vars(args).items()})
    before = parameter_count(base.model)
    windows = eval_windows(base.tokenizer, args.ppl_windows) if "ppl" in phases else {}
    heldout = held_out_windows(base.tokenizer, calib, args.held_out)
    if windows:
        write("protocol", perplexity={s: p for s, (_, p) in windows.items()}, dtype="float32")
    write("model", label="dense", budget=0.0, split=None,
          perplexity=perplexities(base.model, windows, args.ppl_batch) if windows else None,
          heldout_nll=perplexity_of_windows(base.model, heldout, bos=False, progress=False)[0],
          **describe(base.model, before))
    models = {"dense": base.model}
    for ratio in (float(r) for r in args.ratios.split(",")):
        models.update(prune_budget(base, ratio, args, calib, heldout, windows, before, write))
        gc.collect()
    if "zeroshot" in phases:
        zeroshot(models, base.tokenizer, args, write, deadline)
    if "speed" in phases:
        speed(models, args, write, deadline)
    write("done", seconds=round(time.perf_counter() - start, 1))
    try:  # the table in the log too (a report failure must not lose the run)
        print(markdown(read_rows([write.path])), flush=True)
    except Exception as exc:  # noqa: BLE001
        log(f"report failed: {type(exc).__name__}: {exc}")


# ------------------------------------------------------------------------------- report


def read_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        rows += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return rows


def latest(rows: list[dict], kind: str, key) -> dict:
    """The last row of each key (a later run of the same item replaces an earlier one)."""
    return {key(r): r for r in rows if r["kind"] == kind}


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def _num(v) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown(rows: list[dict]) -> str:
    runs = [r for r in rows if r["kind"] == "run"]
    if not runs:
        raise SystemExit("no 'run' row in the JSONL")
    models = latest(rows, "model", lambda r: r["label"])
    prunes = latest(rows, "prune", lambda r: r["budget"])
    zs = latest(rows, "zeroshot", lambda r: r["label"])
    speeds = latest(rows, "speed", lambda r: (r["mode"], r["batch"], r["label"]))
    protocol = next((r for r in reversed(rows) if r["kind"] == "protocol"), {})
    done = [r for r in rows if r["kind"] == "done"]
    skipped = [r for r in rows if r["kind"] == "skipped"]
    first = runs[-1]
    m, a = first["machine"], first["args"]
    zs_proto = next(iter(zs.values()), {}).get("protocol", {})
    lines = [
        "## On a GPU: perplexity, zero-shot and inference speed" + (" (smoke run, tiny model)" if first["tiny"]
                                                                   else ""), "",
        f"What is measured: {first['model']} pruned at each budget (share of ALL parameters) by "
        f"`depth_width_prune(split=\"auto\")` (depth: `{first['method']}`; width: wanda-sp, attention auto, MLP width "
        f"a multiple of 8; calibration {first['calibration']['samples']} x {first['calibration']['seq_len']} tokens "
        f"of `{first['calibration']['source']}`, seed {first['calibration']['seed']}; the **auto** split is the "
        f"lowest NLL on {first['held_out']} held-out calibration windows). No recovery training. Perplexity: "
        + "; ".join(f"{s}: {p}" for s, p in protocol.get("perplexity", {}).items())
        + "; float32. Zero-shot: " + (f"{zs_proto.get('harness')}, 0-shot, first {zs_proto.get('limit')} documents "
                                      f"of each task (batch {zs_proto.get('batch_size')}, "
                                      f"{zs_proto.get('dtype')}); mean of the seven tasks, and without BoolQ"
                                      if zs_proto else "not run") + ". Speed: `layerfold.bench.speed` "
        f"(greedy `generate`, random {a.get('prompt_len')}-token prompt, {a.get('new_tokens')} new tokens, median of "
        f"{a.get('repeats')}, {a.get('speed_dtype')} copies, modes {a.get('speed_modes')}; static = StaticCache + "
        "torch.compile reduce-overhead, i.e. CUDA graphs; all models in one process, dense first, order "
        "alternating); speed-ups are dense time / pruned time.", "",
        f"Command: `{first['command']}` (layerfold commit {first['layerfold_commit'] or 'unknown'})", "",
        f"Machine: {m.get('gpu', m.get('device'))}" + (f" (`{m['nvidia_smi']}`)" if m.get("nvidia_smi") else "")
        + f", {m.get('cpu_count')} CPUs, torch {m.get('torch')}"
        + (f" (CUDA {m['cuda']})" if m.get("cuda") else "")
        + f", transformers {m.get('transformers')}, lm-eval {m.get('lm_eval')}, python {m.get('python')}, "
        f"{m.get('platform')}.", "",
        "| budget | model | layers | heads (q/kv) | MLP width | params | removed | held-out NLL | WikiText-2 | PTB | "
        "zero-shot mean | mean w/o BoolQ | " + " | ".join(TASK_NAMES.values()) + " |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|" + "---|" * len(TASK_NAMES),
    ]

    def quality_row(budget: str, name: str, r: dict, z: dict | None) -> str:
        ppl = r["perplexity"] or {}
        tasks = (z or {}).get("tasks", {})
        nll = "-" if r.get("heldout_nll") is None else f"{r['heldout_nll']:.4f}"
        return (f"| {budget} | {name} | {r['layers']} | {r['heads']} | {r['intermediate_size']} | {r['params']:,} | "
                f"{r['removed']:.1%} | {nll} | {_num(ppl.get('wikitext2'))} | {_num(ppl.get('ptb'))} | "
                f"{_pct((z or {}).get('zs_mean'))} | {_pct((z or {}).get('zs_mean_without_boolq'))} | "
                + " | ".join(_pct(tasks.get(t)) for t in TASK_NAMES) + " |")

    if "dense" in models:
        lines.append(quality_row("dense", "dense", models["dense"], zs.get("dense")))
    for budget, p in sorted(prunes.items()):
        for cand in p["candidates"]:
            label = label_of(budget, cand["split"])
            auto = cand["split"] == p["chosen_split"]
            z = zs.get(f"{budget:.0%} auto") if auto else zs.get(label)
            name = label.split(" ", 1)[1] + (" **auto**" if auto else "")
            if cand["error"]:
                lines.append(f"| {budget:.0%} | {name} | - | - | - | - | - | {cand['error']} |" + " - |" * 11)
            elif label in models:
                lines.append(quality_row(f"{budget:.0%}", name, models[label], z))
    if speeds:
        lines += ["", "| mode | batch | model | layers | latency s | prefill ms | decode ms/tok | decode tok/s | "
                  "prefill tok/s | peak GiB | speed-up decode | speed-up prefill | speed-up total | ideal L/L' |",
                  "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        picks = {f"{b:.0%} auto": f"{b:.0%} auto (split {p['chosen_split']})" for b, p in prunes.items()}
        for r in speeds.values():
            peak = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 1024**3:.2f}"
            name = picks.get(r["label"], r["label"])
            lines.append(f"| {r['mode']} | {r['batch']} | {name} | {r['layers']} | {r['total_s']:.3f} | "
                         f"{1000 * r['prefill_s']:.1f} | {r['decode_ms_per_token']:.2f} | "
                         f"{r['decode_tokens_per_s']:,.0f} | {r['prefill_tokens_per_s']:,.0f} | {peak} | "
                         f"{r['speedup_decode']:.2f} | {r['speedup_prefill']:.2f} | {r['speedup_total']:.2f} | "
                         f"{r['ideal_layers']:.2f} |")
    lines.append("")
    lines.append("`auto` is the split `--split auto` picks; when it picks 0 or 1 its row is width only or depth "
                 "only. The other splits get perplexity only."
                 + (" Speed: every model and batch size compiled with static shapes (dynamo's automatic dynamic "
                    "shapes off), so no batch size reuses another's graph."
                    if any(r["mode"] != "eager" for r in speeds.values()) else ""))
    for s in skipped:
        lines.append(f"- not measured ({s['reason']}): {s['what']} {s.get('label', '')}"
                     f"{'batch ' + str(s['batch']) if 'batch' in s else ''}")
    if done:
        lines.append(f"\nTotal wall time {done[-1]['seconds']:.0f} s.")
    else:
        lines.append("\nThe run was cut before its end; the rows above are the ones it finished.")
    return "\n".join(lines) + "\n"


def write_section(md_path: Path, section: str) -> None:
    """Replace the GPU section between the markers (or append it), keeping everything else."""
    text = md_path.read_text() if md_path.exists() else ""
    block = f"{BEGIN}\n{section}{END}\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + block + rest.split(END, 1)[1].lstrip("\n")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    md_path.write_text(text)


# --------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    r = sub.add_parser("run")
    r.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M")
    r.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    r.add_argument("--out", type=Path, required=True, help=f"folder; rows are appended to <out>/{JSONL}")
    r.add_argument("--ratios", default="0.2,0.35")
    r.add_argument("--splits", default="0,0.25,0.5,0.75,1")
    r.add_argument("--method", default="slm")
    r.add_argument("--phases", default="ppl,zeroshot,speed",
                   help="what to measure after pruning, in this order: ppl, zeroshot, speed")
    r.add_argument("--calib-samples", type=int, default=10)
    r.add_argument("--calib-seq-len", type=int, default=128)
    r.add_argument("--calib-batch", type=int, default=8)
    r.add_argument("--held-out", type=int, default=16)
    r.add_argument("--ppl-windows", type=int, default=None, help="128-token windows per text (default: all)")
    r.add_argument("--ppl-batch", type=int, default=32)
    r.add_argument("--zs-limit", type=int, default=1000, help="documents per zero-shot task")
    r.add_argument("--zs-batch", type=int, default=64)
    r.add_argument("--speed-modes", default="static", help="static (StaticCache + torch.compile), eager")
    r.add_argument("--speed-batch-sizes", default="1,16")
    r.add_argument("--speed-dtype", default=None, help="default: bfloat16 on cuda, float32 on cpu")
    r.add_argument("--new-tokens", type=int, default=128)
    r.add_argument("--prompt-len", type=int, default=128)
    r.add_argument("--repeats", type=int, default=3)
    r.add_argument("--warmup-tokens", type=int, default=8)
    r.add_argument("--no-compile", action="store_true", help="static cache without torch.compile")
    r.add_argument("--budget-s", type=float, default=300,
                   help="seconds after which no zero-shot model or speed batch size is started (a 'skipped' row "
                        "says so); the longest item, a speed batch size, takes about 1.5 minutes on an H200")
    r.add_argument("--commit", default=None, help="layerfold commit to record (default: git rev-parse HEAD)")
    r.add_argument("--tiny", action="store_true", help="smoke test: first --tiny-layers layers, tiny limits")
    r.add_argument("--tiny-layers", type=int, default=6)
    rep = sub.add_parser("report")
    rep.add_argument("jsonl", type=Path, nargs="+")
    rep.add_argument("--md", type=Path, default=None,
                     help="write the section between markers into this markdown file")
    args = parser.parse_args()
    if args.part == "report":
        section = markdown(read_rows(args.jsonl))
        if args.md is not None:
            write_section(args.md, section)
        print(section)
        return
    if args.tiny:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in sys.argv if a.startswith("--")}
        for key, value in TINY.items():
            if key not in given:
                setattr(args, key, value)
    args.speed_dtype = args.speed_dtype or ("bfloat16" if str(args.device).startswith("cuda") else "float32")
    run(args)


if __name__ == "__main__":
    main()
