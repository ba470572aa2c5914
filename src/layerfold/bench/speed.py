"""Inference speed of a dense model and its pruned versions, measured in one process.

Every model generates from the same random prompt (speed does not depend on token values)
through ``transformers``' ``generate``, in two modes:

- ``eager``: the default dynamic KV cache, no compilation (what a plain ``generate`` does);
- ``static``: a static KV cache reused across calls, with the decoding forward compiled by
  ``torch.compile`` (``reduce-overhead``: CUDA graphs on a GPU), the way transformers serves
  fast; ``--no-compile`` keeps the static cache but runs it eagerly.

One call gives the whole latency (``total``); a stopping-criteria hook, called by
``generate`` after each new token, reads the clock when the first token exists, so the
prefill (time to first token, generate's set-up included) and the decode of the other
``new_tokens - 1`` tokens are reported apart.  Repetitions alternate the models' order and
the median is kept.  Each decode step is set against the memory-bandwidth floor: the bytes
of weights read per token over the HBM bandwidth (4.8 TB/s on an H200 by its datasheet).
"""

from __future__ import annotations

import gc
import inspect
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from layerfold.errors import LayerfoldError
from layerfold.models.arch import architecture_for

HBM_BYTES_PER_S = 4.8e12  # NVIDIA H200 datasheet
MODES = ("eager", "static")
GIB = 1024**3


@dataclass(frozen=True)
class SpeedConfig:
    """What to measure. ``warmup_tokens``: length of the untimed call that precedes each
    model's timed calls at each batch size (it triggers compilation and graph capture)."""

    batch_sizes: tuple[int, ...] = (1, 16, 64)
    new_tokens: int = 128
    prompt_len: int = 128
    repeats: int = 3
    compile: bool = True
    modes: tuple[str, ...] = MODES
    warmup_tokens: int = 8
    seed: int = 0
    bandwidth: float = HBM_BYTES_PER_S

    def __post_init__(self) -> None:
        if not self.batch_sizes or min(self.batch_sizes) < 1:
            raise LayerfoldError("--batch-sizes must list positive integers, e.g. 1,16,64")
        if self.new_tokens < 2:
            raise LayerfoldError("--new-tokens must be at least 2 (prefill and decode are reported apart)")
        if self.bandwidth <= 0:
            raise LayerfoldError("--bandwidth must be positive")
        if self.prompt_len < 1 or self.repeats < 1 or self.warmup_tokens < 1:
            raise LayerfoldError("--prompt-len, --repeats and the warm-up length must be at least 1")
        unknown = set(self.modes) - set(MODES)
        if unknown or not self.modes:
            raise LayerfoldError(f"unknown mode(s) {sorted(unknown)}: choose among {', '.join(MODES)}")

    def mode_label(self, mode: str) -> str:
        if mode == "eager":
            return "eager"
        return "static+compile" if self.compile else "static"

    def describe(self) -> dict:
        out = asdict(self)
        out["modes"] = [self.mode_label(m) for m in self.modes]
        return out


@dataclass
class Timing:
    total_s: float
    prefill_s: float
    decode_s: float


# ---------------------------------------------------------------------------- models


def load_for_bench(name: str | None, dtype: str = "bfloat16", device: str = "auto") -> tuple[str, nn.Module]:
    """(label, model) from a hub id, a local folder or the embedded default; no tokenizer
    is needed, since prompts are random token ids."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from layerfold.models.load import resolve_device, resolve_dtype, resolve_source

    label, path = resolve_source(name)
    try:
        config = AutoConfig.from_pretrained(path)
    except OSError as exc:
        raise LayerfoldError(f"cannot load model '{label}': {str(exc).splitlines()[0]}") from exc
    architecture_for(config)
    target = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype))
    return label, model.to(target).eval()


def _unique_parameters(model: nn.Module) -> list[torch.Tensor]:
    seen: dict[int, torch.Tensor] = {}
    for p in model.parameters():
        seen.setdefault(id(p), p)
    return list(seen.values())


def model_facts(model: nn.Module) -> dict:
    """Layer count, parameters and the bytes a decode step must read.

    ``read_bytes``: every weight once, except an untied input embedding, of which a decode
    step reads only the rows of its tokens."""
    arch = architecture_for(model.config)
    params = _unique_parameters(model)
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    read_bytes = weight_bytes
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed is not None and (head is None or head.weight is not embed.weight):
        read_bytes -= embed.weight.numel() * embed.weight.element_size()
    layers = len(arch.layer_list(model))
    return {"layers": layers, "parameters": sum(p.numel() for p in params), "weight_bytes": weight_bytes,
            "read_bytes": read_bytes, "kv_bytes_per_token": _kv_bytes_per_token(model, layers),
            "dtype": str(params[0].dtype).replace("torch.", "")}


def _kv_bytes_per_token(model: nn.Module, layers: int) -> int | None:
    """Bytes of keys and values one token adds to the cache over all layers."""
    cfg = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    heads = getattr(cfg, "num_attention_heads", None)
    hidden = getattr(cfg, "hidden_size", None)
    if not heads or not hidden:
        return None
    kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
    head_dim = getattr(cfg, "head_dim", None) or hidden // heads
    element = next(model.parameters()).element_size()
    return layers * 2 * kv_heads * head_dim * element


# --------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _FirstTokenClock(StoppingCriteria):
    """Never stops generation; records when the first new token exists."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.at: float | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if self.at is None:
            _sync(self.device)
            self.at = time.perf_counter()
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def _cache_argument(model: nn.Module) -> str:
    """The name under which ``generate`` takes a cache object (renamed in transformers 5.2x)."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


class _Runner:
    """One model in one mode at one batch size; the static cache lives as long as the runner,
    so that compiled graphs see the same buffers on every call."""

    def __init__(self, model: nn.Module, mode: str, config: SpeedConfig, device: torch.device) -> None:
        self.model, self.mode, self.config, self.device = model, mode, config, device
        self.cache = None
        self.pad = _pad_token(model)
        if mode == "static":
            from transformers import StaticCache

            self.cache = StaticCache(config=model.config, max_cache_len=config.prompt_len + config.new_tokens)

    def _kwargs(self, new_tokens: int, clock: _FirstTokenClock) -> dict:
        kwargs = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False,
                  "pad_token_id": self.pad, "stopping_criteria": StoppingCriteriaList([clock])}
        if self.cache is None:
            kwargs["disable_compile"] = True
            return kwargs
        self.cache.reset()
        kwargs[_cache_argument(self.model)] = self.cache
        if self.config.compile:
            kwargs["compile_config"] = _compile_config(self.device)
        else:
            kwargs["disable_compile"] = True
        return kwargs

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> Timing:
        clock = _FirstTokenClock(self.device)
        kwargs = self._kwargs(new_tokens, clock)
        mask = torch.ones_like(prompt)
        _sync(self.device)
        start = time.perf_counter()
        out = self.model.generate(prompt, attention_mask=mask, **kwargs)
        _sync(self.device)
        end = time.perf_counter()
        if out.shape[1] != prompt.shape[1] + new_tokens or clock.at is None:
            raise LayerfoldError(f"generate returned {out.shape[1] - prompt.shape[1]} new tokens, "
                                 f"{new_tokens} were asked for")
        return Timing(total_s=end - start, prefill_s=clock.at - start, decode_s=end - clock.at)


def _pad_token(model: nn.Module) -> int:
    gen = getattr(model, "generation_config", None)
    for value in (getattr(gen, "pad_token_id", None), getattr(gen, "eos_token_id", None)):
        if isinstance(value, list):
            value = value[0] if value else None
        if value is not None:
            return int(value)
    return 0


def _compile_config(device: torch.device):
    from transformers import CompileConfig

    config = CompileConfig(mode="reduce-overhead" if device.type == "cuda" else "default")
    config._compile_all_devices = True  # let generate compile on CPU too when asked
    return config


def _raise_recompile_limits() -> None:
    """Each model and batch size is one more compiled entry of the same frame."""
    import torch._dynamo

    for name in ("recompile_limit", "cache_size_limit", "accumulated_recompile_limit",
                 "accumulated_cache_size_limit"):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))


# ------------------------------------------------------------------------ measuring


def _device_of(models: dict[str, nn.Module]) -> torch.device:
    devices = {next(m.parameters()).device for m in models.values()}
    if len(devices) != 1:
        raise LayerfoldError(f"all models must be on one device, got {sorted(map(str, devices))}")
    return devices.pop()


def _allocated(device: torch.device) -> int:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else 0


def _prompt(models: dict[str, nn.Module], batch: int, config: SpeedConfig, device: torch.device) -> torch.Tensor:
    vocab = min(m.get_input_embeddings().num_embeddings for m in models.values())
    gen = torch.Generator().manual_seed(config.seed * 1000 + batch)
    return torch.randint(0, vocab, (batch, config.prompt_len), generator=gen).to(device)


def _measure_cell(models: dict[str, nn.Module], facts: dict[str, dict], mode: str, batch: int,
                  config: SpeedConfig, device: torch.device, log: Callable[[str], None]) -> list[dict]:
    prompt = _prompt(models, batch, config, device)
    runners: dict[str, _Runner] = {}
    held: dict[str, int] = {}
    warmup: dict[str, float] = {}
    for name, model in models.items():
        before = _allocated(device)
        runners[name] = _Runner(model, mode, config, device)
        start = time.perf_counter()
        runners[name].generate(prompt, min(config.warmup_tokens, config.new_tokens))
        warmup[name] = time.perf_counter() - start
        held[name] = _allocated(device) - before
        log(f"{config.mode_label(mode)} batch {batch} {name}: warm-up {warmup[name]:.1f} s")
    timings: dict[str, list[Timing]] = {name: [] for name in models}
    peak: dict[str, int | None] = {name: None for name in models}
    names = list(models)
    for rep in range(config.repeats):
        for name in names if rep % 2 == 0 else names[::-1]:
            if rep == 0 and device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                start_bytes = _allocated(device)
            timings[name].append(runners[name].generate(prompt, config.new_tokens))
            if rep == 0 and device.type == "cuda":
                transient = torch.cuda.max_memory_allocated(device) - start_bytes
                peak[name] = facts[name]["weight_bytes"] + held[name] + transient
    del runners
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return [_row(name, facts[name], mode, batch, config, timings[name], peak[name], warmup[name]) for name in names]


def _row(name: str, fact: dict, mode: str, batch: int, config: SpeedConfig, runs: list[Timing],
         peak: int | None, warmup_s: float) -> dict:
    total = statistics.median(t.total_s for t in runs)
    prefill = statistics.median(t.prefill_s for t in runs)
    decode = statistics.median(t.decode_s for t in runs)
    steps = config.new_tokens - 1
    decode_ms = 1000 * decode / steps
    floor_ms = 1000 * fact["read_bytes"] / config.bandwidth
    row = {"mode": config.mode_label(mode), "batch": batch, "model": name, "layers": fact["layers"],
           "total_s": total, "prefill_s": prefill, "decode_s": decode, "decode_ms_per_token": decode_ms,
           "prefill_tokens_per_s": batch * config.prompt_len / prefill,
           "decode_tokens_per_s": batch * steps / decode, "tokens_per_s": batch * config.new_tokens / total,
           "floor_ms_per_token": floor_ms, "x_floor": decode_ms / floor_ms, "floor_kv_ms_per_token": None,
           "peak_memory_bytes": peak, "warmup_s": warmup_s,
           "runs": {"total_s": [t.total_s for t in runs], "prefill_s": [t.prefill_s for t in runs],
                    "decode_s": [t.decode_s for t in runs]}}
    if fact["kv_bytes_per_token"] is not None:
        # an ideal kernel reads each cached token once per step; on average P + N/2 of them
        kv = batch * (config.prompt_len + config.new_tokens / 2) * fact["kv_bytes_per_token"]
        row["floor_kv_ms_per_token"] = 1000 * (fact["read_bytes"] + kv) / config.bandwidth
    return row


def _add_ratios(rows: list[dict], facts: dict[str, dict], reference: str) -> None:
    refs = {(r["mode"], r["batch"]): r for r in rows if r["model"] == reference}
    for row in rows:
        ref = refs[(row["mode"], row["batch"])]
        ideal = ref["layers"] / row["layers"]
        row["speedup_decode"] = ref["decode_s"] / row["decode_s"]
        row["speedup_prefill"] = ref["prefill_s"] / row["prefill_s"]
        row["speedup_total"] = ref["total_s"] / row["total_s"]
        row["ideal_layers"] = ideal
        row["ideal_bytes"] = facts[reference]["read_bytes"] / facts[row["model"]]["read_bytes"]
        row["decode_share_of_ideal"] = row["speedup_decode"] / ideal if ideal != 1 else None


def machine_info(device: torch.device) -> dict:
    import transformers

    info = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=torch.cuda.get_device_name(device), gpu_memory_bytes=props.total_memory,
                    cuda=torch.version.cuda)
    return info


def measure_models(models: dict[str, nn.Module], config: SpeedConfig | None = None,
                   log: Callable[[str], None] | None = None) -> dict:
    """Measure every model (the first is the reference) in every mode and batch size.

    Returns a JSON-ready dict: ``config``, ``machine``, ``models`` (facts), ``reference`` and
    ``results`` (one row per mode, batch size and model)."""
    config = config or SpeedConfig()
    if not models:
        raise LayerfoldError("nothing to measure")
    log = log or (lambda _msg: None)
    device = _device_of(models)
    if config.compile and "static" in config.modes:
        _raise_recompile_limits()
    facts = {name: model_facts(m) for name, m in models.items()}
    for m in models.values():
        m.eval()
    rows: list[dict] = []
    for mode in config.modes:
        for batch in config.batch_sizes:
            rows.extend(_measure_cell(models, facts, mode, batch, config, device, log))
    reference = next(iter(models))
    _add_ratios(rows, facts, reference)
    return {"config": config.describe(), "machine": machine_info(device), "models": facts,
            "reference": reference, "results": rows}


# -------------------------------------------------------------------------- output


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def results_table(results: dict, title: str | None = None):
    """A rich table of :func:`measure_models`' results."""
    from rich.table import Table

    cfg = results["config"]
    table = Table(title=title or f"prompt {cfg['prompt_len']} tokens, {cfg['new_tokens']} new tokens, "
                                 f"median of {cfg['repeats']}; reference: {results['reference']}")
    for column in ("mode", "batch", "model", "layers"):
        table.add_column(column)
    for column in ("latency s", "prefill ms", "decode ms/tok", "x floor", "decode tok/s", "prefill tok/s",
                   "peak GiB", "speed-up decode", "speed-up total", "ideal L/L'"):
        table.add_column(column, justify="right")
    for r in results["results"]:
        peak = None if r["peak_memory_bytes"] is None else r["peak_memory_bytes"] / GIB
        table.add_row(r["mode"], str(r["batch"]), r["model"], str(r["layers"]), f"{r['total_s']:.3f}",
                      f"{1000 * r['prefill_s']:.1f}", f"{r['decode_ms_per_token']:.2f}", f"{r['x_floor']:.1f}",
                      f"{r['decode_tokens_per_s']:,.0f}", f"{r['prefill_tokens_per_s']:,.0f}", _fmt(peak, ".1f"),
                      f"{r['speedup_decode']:.2f}", f"{r['speedup_total']:.2f}", f"{r['ideal_layers']:.2f}")
    return table


def floor_note(results: dict) -> str:
    bw = results["config"]["bandwidth"] / 1e12
    parts = [f"{name}: {f['read_bytes'] / GIB:.3g} GiB read per decode step -> floor "
             f"{1000 * f['read_bytes'] / results['config']['bandwidth']:.3g} ms/token"
             for name, f in results["models"].items()]
    return f"memory-bandwidth floor at {bw:.1f} TB/s (weights only): " + "; ".join(parts)
