"""Speed benchmarks on random-initialised models of real shapes (speed does not depend on weight values).

    python benchmarks/speed/run.py inference --shape 7b --remove 11 --out inference-7b.json
    python benchmarks/speed/run.py inference --shape 7b --remove 6,11 --modes graph,graph-compiled --budget-s 420 \
        --out graph-compiled-7b.json
    python benchmarks/speed/run.py pruning --shape 7b --matrices fast --repeats 3 --out pruning-7b.json
    python benchmarks/speed/run.py markdown inference-7b.json pruning-7b.json

The committed runs are rows of results.jsonl (each with commit, date, machine and the result), and
report.py writes RESULTS.md from them with this script's markdown.

``inference``: layerfold's speed bench (``layerfold.bench.speed``) on the dense model and one
copy per ``--remove`` count (e.g. ``6,11``: 20% and 35% of 32 layers), pruned in memory by
``layerfold.surgery.apply_plan``.  ``--modes``: any of ``eager``, ``static`` (generate, compiled),
``graph`` (a static cache and one decode step replayed as a CUDA graph, no generate) and
``graph-compiled`` (the same step compiled by torch.compile/inductor first, then captured, so that
the graph replays fused kernels; ``--compile-mode`` picks inductor's mode).  Each batch size is one
``measure_models`` call; ``--budget-s`` starts no further batch size once the time spent plus the
last batch size's time would pass the budget (compilation dominates graph-compiled: one compile
per model and batch size).  The markdown puts the modes side by side (decode ms/token, x floor,
share of the ideal L/L') when a file holds several.

``pruning``: what planning costs.  layerfold's SLM engine (``api.make_plan``) at one
threshold and as a target-size search, against the authors' naive loop
(``benchmarks/naive_slm.py``: deep copy and full forward at batch 1 per candidate), checking
that both take the same windows; the analysis cost (capture + similarity matrices) against
one plain batched forward; and where one engine candidate spends its time.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

from layerfold.bench.speed import (
    COMPILE_MODES,
    GIB,
    MODES,
    SpeedConfig,
    floor_note,
    machine_info,
    measure_models,
    results_table,
)
from layerfold.plan import Operation, Plan
from layerfold.surgery import apply_plan

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: the authors' loop
from naive_slm import naive_slm  # noqa: E402

SHAPES = {
    "7b": dict(num_hidden_layers=32, hidden_size=4096, intermediate_size=11008, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "13b": dict(num_hidden_layers=40, hidden_size=5120, intermediate_size=13824, num_attention_heads=40,
                num_key_value_heads=40, vocab_size=32000, max_position_embeddings=4096, rms_norm_eps=1e-5),
    "tiny": dict(num_hidden_layers=8, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=256, max_position_embeddings=512),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def build_random(shape: str, dtype: torch.dtype, device: str, seed: int = 0) -> torch.nn.Module:
    """A Llama of the given shape with transformers' own random initialisation."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**SHAPES[shape]))
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def drop_plan(num_layers: int, remove: int) -> Plan:
    """Drop ``remove`` layers just below the last one (speed is the same for dropped or fused layers)."""
    ops = [Operation("drop", i, i) for i in range(num_layers - 1 - remove, num_layers - 1)]
    return Plan(method="bench", num_layers=num_layers, operations=ops)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn: Callable[[], object]) -> tuple[float, object]:
    sync()
    start = time.perf_counter()
    value = fn()
    sync()
    return time.perf_counter() - start, value


def median_time(fn: Callable[[], object], repeats: int = 3, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    return statistics.median(timed(fn)[0] for _ in range(repeats))


def free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class PeakMemory:
    """Peak GPU memory allocated inside the block (None on CPU)."""

    def __enter__(self) -> PeakMemory:
        free()
        self.peak = None
        if torch.cuda.is_available():
            torch.cuda.reset_peak_memory_stats()
        return self

    def __exit__(self, *exc) -> None:
        if torch.cuda.is_available():
            sync()
            self.peak = torch.cuda.max_memory_allocated()


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values())


# ------------------------------------------------------------------------ inference


def remove_counts(value: str, num_layers: int) -> list[int]:
    """``--remove``: one count or several separated by commas (``6,11``), each 1..num_layers-1."""
    try:
        counts = [int(v) for v in str(value).split(",") if v.strip()]
    except ValueError as exc:
        raise SystemExit(f"--remove expects integers separated by commas, got '{value}'") from exc
    bad = [c for c in counts if not 0 < c < num_layers]
    if not counts or bad or len(set(counts)) != len(counts):
        raise SystemExit(f"--remove: distinct counts between 1 and {num_layers - 1}, got '{value}'")
    return counts


def run_inference(args) -> dict:
    """One ``measure_models`` call per batch size (the ratios are per batch size anyway), the
    JSON rewritten after each, so that a run cut short keeps what it measured."""
    n = SHAPES[args.shape]["num_hidden_layers"]
    removes = remove_counts(args.remove, n)
    modes = tuple(args.modes.split(","))
    SpeedConfig(modes=modes, compile=not args.no_compile, compile_mode=args.compile_mode)  # fails before the build
    started = time.perf_counter()
    log(f"building {args.shape} ({args.dtype}) on {args.device}")
    dense = build_random(args.shape, DTYPES[args.dtype], args.device)
    models = {f"dense-{n}": dense}
    for remove in removes:
        models[f"pruned-{n - remove}"] = apply_plan(copy.deepcopy(dense), drop_plan(n, remove))
        free()
    results: dict = {}
    skipped: list[int] = []
    last_s = 0.0
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        spent = time.perf_counter() - started
        if results and args.budget_s is not None and spent + last_s > args.budget_s:
            log(f"batch {batch} skipped: {spent:.0f} s spent + {last_s:.0f} s for the last batch size "
                f"> --budget-s {args.budget_s:.0f}")
            skipped.append(batch)
            results["skipped_batch_sizes"] = skipped
            save(results, args.out)
            continue
        config = SpeedConfig(batch_sizes=(batch,), new_tokens=args.new_tokens, prompt_len=args.prompt_len,
                             repeats=args.repeats, compile=not args.no_compile, modes=modes,
                             warmup_tokens=args.warmup_tokens, compile_mode=args.compile_mode)
        start = time.perf_counter()
        part = measure_models(models, config, log=log)
        last_s = time.perf_counter() - start
        log(f"batch {batch}: {last_s:.0f} s, {time.perf_counter() - started:.0f} s in all")
        if results:
            results["results"].extend(part["results"])
            results["config"]["batch_sizes"].append(batch)
        else:
            results = part
            results["config"]["batch_sizes"] = [batch]
            results["shape"] = {"name": args.shape, **SHAPES[args.shape], "dtype": args.dtype}
            results["command"] = " ".join(sys.argv)
        save(results, args.out)
    from rich.console import Console

    Console(width=250).print(results_table(results))
    print(floor_note(results))
    if len({r["mode"] for r in results["results"]}) > 1:
        print(modes_markdown(results))
    return results


def save(result: dict, path: Path | None) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2, default=str) + "\n")


# -------------------------------------------------------------------------- pruning


def plain_forward(model, tokens: torch.Tensor, batch_size: int) -> None:
    device = next(model.parameters()).device
    with torch.no_grad():
        for chunk in torch.split(tokens, batch_size):
            model(input_ids=chunk.to(device), use_cache=False)


def pick_threshold(cache) -> tuple[float, list[float]]:
    """A threshold between two adjacent pair similarities, so that about a quarter of the
    pairs pass on their own: the greedy loop then makes a few windows (random weights give
    no redundancy to find), and no candidate sits right at the threshold."""
    from layerfold.methods.slm import SlmEngine

    engine = SlmEngine(cache, "output-cosine", "diff", "base")
    sims = [engine.similarity((), lo, lo + 1) for lo in range(cache.num_layers - 1)]
    ranked = sorted(sims, reverse=True)
    k = max(1, len(ranked) // 4)
    return (ranked[k - 1] + ranked[k]) / 2, sims


def engine_margin(cache, threshold: float) -> dict:
    """Smallest distance between a candidate's similarity and the threshold (engine's memo)."""
    from layerfold.methods.slm import SlmEngine

    engine = SlmEngine(cache, "output-cosine", "diff", "base")
    run = engine.run(threshold)
    values = list(engine.memo.values())
    return {"windows": sorted(run.windows), "candidates": len(values),
            "closest_to_threshold": min(abs(v - threshold) for v in values),
            "similarities": {f"{list(c)}|{lo}-{hi}": v for (c, lo, hi), v in engine.memo.items()}}


def analysis_cost(model, arch, tokens, batch_size: int, cka_pairs: int, matrices: str) -> tuple[dict, object]:
    """Capture and similarity matrices against one plain batched forward.

    ``matrices``: ``pairwise`` times ``similarity.similarity_matrix`` (one call per pair; CKA on
    ``cka_pairs`` pairs, extrapolated), ``fast`` times ``report.analysis.layer_similarity`` (the
    path of ``layerfold analyze``: each layer's kernel or features built once), ``both`` both."""
    from layerfold.calibrate import capture

    out: dict = {"forward_s": median_time(lambda: plain_forward(model, tokens, batch_size))}
    out["capture_s"] = median_time(lambda: capture(model, arch, tokens, batch_size=batch_size, progress=False))
    cache = capture(model, arch, tokens, batch_size=batch_size, progress=False)
    t, outputs = timed(lambda: [cache.output(i) for i in range(cache.num_layers)])
    out["gather_outputs_s"] = t
    if matrices in ("pairwise", "both"):
        out["matrices"] = pairwise_matrices(outputs, cka_pairs)
    if matrices in ("fast", "both"):
        from layerfold.report.analysis import layer_similarity

        out["matrices_fast"] = {}
        for kind in ("cosine", "angular", "cka-linear", "cka-rbf"):
            out["matrices_fast"][kind] = {"seconds": timed(lambda k=kind: layer_similarity(outputs, k))[0]}
            log(f"{kind} matrix (analyze path): {out['matrices_fast'][kind]['seconds']:.1f} s")
    return out, cache


def pairwise_matrices(outputs: list[torch.Tensor], cka_pairs: int) -> dict:
    from layerfold.similarity import SIMILARITIES, similarity_matrix

    n = len(outputs)
    pairs = n * (n - 1) // 2
    res: dict = {}
    for kind in ("cosine", "angular"):
        res[kind] = {"seconds": timed(lambda k=kind: similarity_matrix(outputs, k))[0], "pairs": pairs,
                     "measured_pairs": pairs}
        log(f"{kind} matrix: {res[kind]['seconds']:.1f} s")
    for kind in ("cka-linear", "cka-rbf"):
        fn = SIMILARITIES.get(kind)
        some = min(cka_pairs, n - 1)
        t, _ = timed(lambda fn=fn, some=some: [fn(outputs[0], outputs[j]) for j in range(1, some + 1)])
        res[kind] = {"seconds": t * pairs / some, "pairs": pairs, "measured_pairs": some,
                     "measured_seconds": t, "extrapolated": some < pairs}
        log(f"{kind}: {some} pairs in {t:.1f} s")
    return res


def candidate_breakdown(cache, repeats: int = 5) -> dict:
    """Where one engine candidate (a fused pair below the top layer) spends its time."""
    from layerfold.merge import build_fused_layer
    from layerfold.methods.slm import SlmEngine
    from layerfold.similarity import sample_cosine

    engine = SlmEngine(cache, "output-cosine", "diff", "base")
    reference = engine.reference_output()
    lo, hi = cache.num_layers - 3, cache.num_layers - 2
    layers = cache.layers
    fused = build_fused_layer([layers[lo], layers[hi]])
    modules = [(fused, lo)] + engine.stack_above((), hi + 1)
    outs = cache.run(lo, modules, final_norm=True)
    final = cache.final(outs)
    device = cache.device
    ref_dev = reference.to(device)
    ref_cpu = reference.float().cpu()
    res = {
        "build_fused_s": median_time(lambda: build_fused_layer([layers[lo], layers[hi]]), repeats),
        "run_layers_s": median_time(lambda: cache.run(lo, modules, final_norm=True), repeats),
        "to_cpu_float_s": median_time(lambda: cache.final(outs), repeats),
        "cosine_cpu_float64_s": median_time(lambda: sample_cosine(final, ref_cpu), repeats),
        "cosine_on_device_float64_s": median_time(
            lambda: sample_cosine(torch.cat([o.float() for o in outs]), ref_dev), repeats),
        "layers_run": len(modules),
    }
    return res


def paper_options() -> dict:
    """The naive loop's settings, spelled out so that a change of the method's defaults
    cannot make the comparison unfair."""
    import layerfold.methods  # noqa: F401  (registers the methods)
    from layerfold.methods.base import METHODS

    options = {"criterion": "output-cosine", "merge": "diff", "norms": "base"}
    if "selection" in METHODS.get("slm").model_fields:
        options["selection"] = "sliding"
    return options


def run_pruning(args) -> dict:
    from layerfold import api
    from layerfold.methods.base import Target
    from layerfold.models.arch import architecture_for

    log(f"building {args.shape} ({args.dtype}) on {args.device}")
    model = build_random(args.shape, DTYPES[args.dtype], args.device)
    arch = architecture_for(model.config)
    gen = torch.Generator().manual_seed(1234)
    tokens = torch.randint(0, model.config.vocab_size, (args.samples, args.seq_len), generator=gen)
    weights = weight_bytes(model)
    out: dict = {"shape": {"name": args.shape, **SHAPES[args.shape], "dtype": args.dtype},
                 "calibration": {"samples": args.samples, "seq_len": args.seq_len, "tokens": "random ids, seed 1234"},
                 "weight_bytes": weights, "machine": machine_info(next(model.parameters()).device),
                 "command": " ".join(sys.argv)}

    log("analysis cost")
    out["analysis"], cache = analysis_cost(model, arch, tokens, 8, args.cka_pairs, args.matrices)
    threshold, pair_sims = (args.threshold, None) if args.threshold is not None else pick_threshold(cache)
    out["threshold"] = threshold
    out["pair_similarities"] = pair_sims
    log(f"threshold {threshold:.6f}")
    out["engine_margin"] = engine_margin(cache, threshold)
    out["candidate_breakdown"] = candidate_breakdown(cache)
    save(out, args.out)
    del cache
    free()

    def repeated(fn: Callable[[], object]) -> tuple[float, list[float], int | None, object]:
        """Median wall time of ``--repeats`` runs after the first (cold) one, every run's time, the
        largest peak of any run, and the last value.  The engine and the naive loop get the same
        treatment; with ``--repeats 0`` the single cold run is the figure."""
        times, peak, value = [], None, None
        for _ in range(1 + args.repeats):
            with PeakMemory() as mem:
                seconds, value = timed(fn)
            times.append(seconds)
            peak = mem.peak if peak is None else max(peak, mem.peak)
            free()
        steady = times[1:] or times
        return statistics.median(steady), times, peak, value

    def slm(options: dict | None = None, **kw) -> dict:
        options = {**paper_options(), **(options or {})}
        seconds, times, peak, result = repeated(lambda: api.make_plan(model, "slm", tokens=tokens, progress=False,
                                                                      options=options, **kw))
        plan = result.plan
        return {"seconds": seconds, "runs_s": times, "candidates": plan.scores.get("candidates_evaluated"),
                "windows": plan.windows(), "removed": plan.removed_layers, "threshold": plan.threshold,
                "peak_bytes": peak, "peak_x_weights": None if peak is None else peak / weights}

    log("engine, one threshold")
    out["engine"] = slm(options={"threshold": threshold})
    log(f"  {out['engine']['seconds']:.2f} s (runs {out['engine']['runs_s']}), windows {out['engine']['windows']}")
    save(out, args.out)
    free()
    log("naive loop, one threshold")
    seconds, times, peak, (windows, candidates) = repeated(lambda: naive_slm(model, tokens, threshold))
    out["naive"] = {"seconds": seconds, "runs_s": times, "candidates": candidates,
                    "windows": [list(w) for w in windows], "peak_bytes": peak,
                    "peak_x_weights": None if peak is None else peak / weights}
    log(f"  {seconds:.2f} s, windows {windows}")
    out["same_windows"] = [tuple(w) for w in out["naive"]["windows"]] == [tuple(w) for w in out["engine"]["windows"]]
    save(out, args.out)
    free()
    out["search"] = {}
    for ratio in args.ratios:
        log(f"target search, ratio {ratio}")
        out["search"][str(ratio)] = slm(target=Target(ratio=ratio))
        log(f"  {out['search'][str(ratio)]['seconds']:.2f} s")
        save(out, args.out)
        free()
    naive_s = out["naive"]["seconds"]
    out["goals"] = {
        "engine_speedup_vs_naive": naive_s / out["engine"]["seconds"],
        "engine_peak_x_weights": out["engine"]["peak_x_weights"],
        "search_over_naive": {r: s["seconds"] / naive_s for r, s in out["search"].items()},
    }
    print(json.dumps(out["goals"], indent=2))
    return out


# ------------------------------------------------------------------------- markdown


def _gib(b) -> str:
    return "-" if b is None else f"{b / GIB:.1f}"


def inference_markdown(res: dict) -> str:
    lines = [f"Shape {res['shape']['name']} ({res['shape']['dtype']}); {floor_note(res)}.", "",
             "| mode | batch | model | layers | latency s | prefill ms | decode ms/tok | x floor (weights) | "
             "x floor (weights+KV) | decode tok/s | prefill tok/s | peak GiB | speed-up decode | speed-up prefill | "
             "speed-up total | ideal L/L' | decode share of ideal | warm-up s |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["results"]:
        kv = r["decode_ms_per_token"] / r["floor_kv_ms_per_token"] if r["floor_kv_ms_per_token"] else None
        share = r.get("decode_share_of_ideal")
        lines.append(
            f"| {r['mode']} | {r['batch']} | {r['model']} | {r['layers']} | {r['total_s']:.3f} | "
            f"{1000 * r['prefill_s']:.1f} | {r['decode_ms_per_token']:.2f} | {r['x_floor']:.2f} | "
            f"{'-' if kv is None else f'{kv:.2f}'} | {r['decode_tokens_per_s']:,.0f} | "
            f"{r['prefill_tokens_per_s']:,.0f} | "
            f"{_gib(r['peak_memory_bytes'])} | {r['speedup_decode']:.2f} | {r['speedup_prefill']:.2f} | "
            f"{r['speedup_total']:.2f} | {r['ideal_layers']:.2f} | {'-' if share is None else f'{share:.2f}'} | "
            f"{r['warmup_s']:.1f} |")
    if res.get("skipped_batch_sizes"):
        lines += ["", f"Not run (--budget-s): batch sizes {', '.join(map(str, res['skipped_batch_sizes']))}."]
    side = modes_markdown(res)
    return "\n".join(lines + (["", side] if side else []))


def modes_markdown(res: dict) -> str:
    """The modes side by side: decode ms/token, x the weight floor and share of the ideal L/L'
    per batch size and model ("" when the results hold one mode)."""
    modes = list(dict.fromkeys(r["mode"] for r in res["results"]))
    if len(modes) < 2:
        return ""
    cells = {(r["batch"], r["model"], r["mode"]): r for r in res["results"]}
    keys = list(dict.fromkeys((r["batch"], r["model"], r["layers"]) for r in res["results"]))
    head = "| batch | model | layers | " + " | ".join(
        f"{m} ms/tok | {m} x floor | {m} share of ideal" for m in modes) + " |"
    lines = ["Modes side by side (decode of one token; x floor: over the weight floor; share of ideal: "
             "speed-up over dense / L/L').", "", head, "|---:|---|---:|" + "---:|---:|---:|" * len(modes)]
    for batch, model, layers in keys:
        parts = []
        for m in modes:
            r = cells.get((batch, model, m))
            share = None if r is None else r.get("decode_share_of_ideal")
            parts += ["-", "-", "-"] if r is None else [
                f"{r['decode_ms_per_token']:.2f}", f"{r['x_floor']:.2f}", "-" if share is None else f"{share:.2f}"]
        lines.append(f"| {batch} | {model} | {layers} | " + " | ".join(parts) + " |")
    return "\n".join(lines)


def pruning_markdown(res: dict) -> str:
    w = res["weight_bytes"]
    rows = [("layerfold engine, one threshold", res["engine"]), ("naive loop, one threshold", res["naive"])]
    rows += [(f"layerfold target search, ratio {r}", s) for r, s in res["search"].items()]
    lines = [f"Shape {res['shape']['name']} ({res['shape']['dtype']}), weights {_gib(w)} GiB; threshold "
             f"{res['threshold']:.6f}; same windows: {res['same_windows']}.", "",
             "| run | wall s (median) | every run s (first = cold) | candidates | windows | peak GiB "
             "| peak / weights |",
             "|---|---:|---|---:|---|---:|---:|"]
    for name, r in rows:
        x = "-" if r["peak_x_weights"] is None else f"{r['peak_x_weights']:.2f}"
        wins = ", ".join(f"{lo}-{hi}" for lo, hi in r["windows"])
        runs = ", ".join(f"{t:.2f}" for t in r.get("runs_s", [r["seconds"]]))
        lines.append(f"| {name} | {r['seconds']:.2f} | {runs} | {r['candidates']} | {wins} | {_gib(r['peak_bytes'])} "
                     f"| {x} |")
    a = res["analysis"]
    lines += ["", "| analysis step | seconds |", "|---|---:|",
              f"| one plain batched forward (batch 8) | {a['forward_s']:.3f} |",
              f"| capture (all layer inputs) | {a['capture_s']:.3f} |",
              f"| gather the layer outputs on the CPU | {a['gather_outputs_s']:.3f} |"]
    for kind, m in a.get("matrices", {}).items():
        note = f" (extrapolated from {m['measured_pairs']} of {m['pairs']} pairs)" if m.get("extrapolated") else ""
        lines.append(f"| {kind} matrix{note} | {m['seconds']:.2f} |")
    for kind, m in a.get("matrices_fast", {}).items():
        lines.append(f"| {kind} matrix, `layerfold analyze` path | {m['seconds']:.2f} |")
    b = res["candidate_breakdown"]
    lines += ["", f"One engine candidate (fused pair, {b['layers_run']} layers run):", "",
              "| step | ms |", "|---|---:|"]
    for key in ("build_fused_s", "run_layers_s", "to_cpu_float_s", "cosine_cpu_float64_s",
                "cosine_on_device_float64_s"):
        lines.append(f"| {key[:-2]} | {1000 * b[key]:.1f} |")
    return "\n".join(lines)


def markdown(paths: list[str]) -> str:
    parts = []
    for path in paths:
        res = json.loads(Path(path).read_text())
        parts.append(inference_markdown(res) if "results" in res else pruning_markdown(res))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    for name in ("inference", "pruning"):
        p = sub.add_parser(name)
        p.add_argument("--shape", choices=sorted(SHAPES), default="7b")
        p.add_argument("--dtype", choices=sorted(DTYPES), default="bfloat16")
        p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
        p.add_argument("--out", type=Path)
    inf = sub.choices["inference"]
    inf.add_argument("--remove", default="11",
                     help="layers dropped from a pruned copy; several counts, comma-separated, make several copies")
    inf.add_argument("--batch-sizes", default="1,16,64")
    inf.add_argument("--new-tokens", type=int, default=128)
    inf.add_argument("--prompt-len", type=int, default=128)
    inf.add_argument("--repeats", type=int, default=3)
    inf.add_argument("--modes", default="eager,static", help=f"comma-separated: {', '.join(MODES)}")
    inf.add_argument("--no-compile", action="store_true",
                     help="static: generate runs eagerly; graph-compiled is refused (graph never compiles)")
    inf.add_argument("--compile-mode", choices=COMPILE_MODES, default="default",
                     help="inductor mode of graph-compiled (max-autotune-no-cudagraphs: autotuned matmuls, "
                          "minutes more compilation)")
    inf.add_argument("--budget-s", type=float, default=None,
                     help="start no further batch size once seconds spent + the last batch size's seconds pass this")
    inf.add_argument("--warmup-tokens", type=int, default=8,
                     help="length of the untimed call before each model's timed calls (per batch size)")
    pr = sub.choices["pruning"]
    pr.add_argument("--samples", type=int, default=10)
    pr.add_argument("--seq-len", type=int, default=128)
    pr.add_argument("--threshold", type=float, default=None, help="default: picked from the pair similarities")
    pr.add_argument("--ratios", type=float, nargs="*", default=[0.2, 0.35])
    pr.add_argument("--repeats", type=int, default=3,
                    help="timed runs after one cold run, engine and naive loop alike (median reported)")
    pr.add_argument("--cka-pairs", type=int, default=31, help="CKA pairs timed (the rest extrapolated)")
    pr.add_argument("--matrices", choices=("pairwise", "fast", "both"), default="both",
                    help="similarity-matrix paths to time (the committed H200 run predates this option: "
                         "it timed the pairwise path only)")
    md = sub.add_parser("markdown")
    md.add_argument("paths", nargs="+")
    args = parser.parse_args()
    if args.part == "markdown":
        print(markdown(args.paths))
        return
    result = run_inference(args) if args.part == "inference" else run_pruning(args)
    save(result, args.out)
    log(f"done{'' if args.out is None else f', written {args.out}'}")


if __name__ == "__main__":
    main()
