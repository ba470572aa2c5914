"""Inference speed of a dense model and its pruned versions, measured in one process.

Every model generates greedily from the same random prompt (speed does not depend on token
values), in one of four modes:

- ``eager``: ``transformers``' ``generate`` with the default dynamic KV cache, no compilation
  (what a plain ``generate`` does);
- ``static``: ``generate`` with a static KV cache reused across calls and the decoding forward
  compiled by ``torch.compile`` (``reduce-overhead``: CUDA graphs on a GPU), the way transformers
  serves fast; ``--no-compile`` keeps the static cache but runs it eagerly;
- ``graph``: no ``generate``: the way serving engines decode.  One eager prefill fills a
  static KV cache, then one decode step (the forward of one token per sequence, greedy argmax,
  every position counter advanced in place) is captured once as a CUDA graph and replayed
  ``new_tokens - 1`` times with no host synchronisation in between, so the per-token Python loop
  and host round trips of ``generate`` vanish.  The replayed kernels are eager PyTorch ones.
  Only on CUDA is the step captured; on the CPU the same step runs eagerly in a Python loop
  (label ``graph(eager)``).  Sliding-window layers whose window is shorter than prompt + new
  tokens are refused (the step passes one full causal mask to every layer).
- ``graph-compiled``: ``graph`` with the decode step first compiled by ``torch.compile``
  (inductor, without inductor's own CUDA graphs, static shapes, one graph where dynamo can
  trace it whole), warmed up, then captured in the same CUDA graph: replay runs inductor's fused
  kernels (RMSNorm, rotary, SiLU*mul as single kernels) with no host work.  On the CPU the
  compiled step runs in a Python loop (label ``graph-compiled(uncaptured)``).  It needs
  ``compile`` (``--compile``, the default); ``compile_mode`` picks inductor's mode (``default``
  or ``max-autotune-no-cudagraphs``, which autotunes matmuls and compiles for much longer).

One call gives the whole latency (``total``) and the prefill (time to first token) and the
decode of the other ``new_tokens - 1`` tokens apart: in the ``generate`` modes a
stopping-criteria hook, called by ``generate`` after each new token, reads the clock when the
first token exists (generate's set-up counts in the prefill); in ``graph`` mode the clock is
read after the prefill's synchronisation.  Repetitions alternate the models' order and the
median is kept.  Each decode step is set against the memory-bandwidth floor: the bytes of
weights read per token over the HBM bandwidth (4.8 TB/s on an H200 by its datasheet).
"""

from __future__ import annotations

import gc
import inspect
import os
import platform
import statistics
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch import nn
from transformers import StoppingCriteria, StoppingCriteriaList

from layerfold.errors import LayerfoldError
from layerfold.models.arch import architecture_for

HBM_BYTES_PER_S = 4.8e12  # NVIDIA H200 datasheet
MODES = ("eager", "static", "graph", "graph-compiled")
DEFAULT_MODES = ("eager", "static")
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # graph-compiled: inductor, never its own CUDA graphs
GRAPH_COMPILE_BACKEND = "inductor"  # graph-compiled's torch.compile backend (tests use aot_eager: no C++ build)
GIB = 1024**3


@dataclass(frozen=True)
class SpeedConfig:
    """What to measure. ``warmup_tokens``: length of the untimed call that precedes each
    model's timed calls at each batch size (it triggers compilation and graph capture).
    ``compile``: ``static`` compiles generate's decoding forward (else runs it eagerly);
    ``graph-compiled`` requires it.  ``compile_mode``: inductor's mode for ``graph-compiled``."""

    batch_sizes: tuple[int, ...] = (1, 16, 64)
    new_tokens: int = 128
    prompt_len: int = 128
    repeats: int = 3
    compile: bool = True
    modes: tuple[str, ...] = DEFAULT_MODES
    warmup_tokens: int = 8
    seed: int = 0
    bandwidth: float = HBM_BYTES_PER_S
    compile_mode: str = "default"

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
        if "graph-compiled" in self.modes and not self.compile:
            raise LayerfoldError("mode graph-compiled compiles the decode step: drop --no-compile, "
                                 "or use mode graph (the uncompiled step)")
        if self.compile_mode not in COMPILE_MODES:
            raise LayerfoldError(f"unknown compile mode '{self.compile_mode}': choose among {', '.join(COMPILE_MODES)}")

    def mode_label(self, mode: str, device: torch.device | None = None) -> str:
        """The mode as results name it; where no CUDA graph is captured (``device`` not CUDA)
        ``graph`` is ``graph(eager)`` and ``graph-compiled`` is ``graph-compiled(uncaptured)``."""
        if mode == "eager":
            return "eager"
        if mode == "graph":
            return "graph" if _captures(device) else "graph(eager)"
        if mode == "graph-compiled":
            return "graph-compiled" if _captures(device) else "graph-compiled(uncaptured)"
        return "static+compile" if self.compile else "static"

    def describe(self, device: torch.device | None = None) -> dict:
        out = asdict(self)
        out["modes"] = [self.mode_label(m, device) for m in self.modes]
        return out


def _captures(device: torch.device | None) -> bool:
    """Whether the graph modes capture their decode step as a CUDA graph (else they call it in a
    Python loop): on CUDA only."""
    return device is not None and device.type == "cuda"


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
        config = AutoConfig.from_pretrained(path, trust_remote_code=False)
    except OSError as exc:
        raise LayerfoldError(f"cannot load model '{label}': {str(exc).splitlines()[0]}") from exc
    architecture_for(config)
    target = resolve_device(device)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype), trust_remote_code=False)
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


# ------------------------------------------------------------------------ graph mode
#
# What the captured decode step runs, checked in transformers 5.24 (5.17 reads the same in
# these places) for a Llama given a 4-D mask and explicit position ids:
# - masking_utils._preprocess_mask_arguments returns a 4-D mask as it is (early exit before
#   any cache.get_seq_length / get_mask_sizes call), so no mask is built and nothing reads the
#   cache length; the model's forward calls get_seq_length only when position_ids is None.
# - cache_utils.StaticLayer.update: lazy_initialization runs on the first update (the prefill,
#   before any capture); afterwards the write index is arange(1) + cumulative_length, a device
#   tensor advanced in place (add_), written by index_copy_: no host read, fixed addresses.
#   StaticSlidingWindowLayer branches on a Python int: correct under capture only while the
#   window holds the whole sequence (it then takes the index_copy_ path every step), which
#   _check_cache demands.  cache.reset() zeroes keys, values and lengths in place.
# - integrations/sdpa_attention: with a mask, is_causal = q_len > 1 and mask is None ... is
#   False; a (B,1,1,L) mask passes pack_gqa unchanged; no .item() outside jit tracing.
# - rotary embedding (default rope type: dynamic_rope_update does nothing; a "dynamic" rope
#   reads max(position_ids) on the host and would break capture), embedding, RMSNorm, MLP,
#   slice_logits_to_keep (int) and argmax are plain kernels; index_fill_/index_copy_ take
#   tensor indices (bounds checked on the device).
# The mask position opened each step (cache_position) and the cache's own write index
# (cumulative_length) agree: both are P after the prefill and advance by one per step.
# transformers 5.17 and 5.24 both take no cache_position argument (the cache keeps its own
# length); it is passed only to a forward that declares it.
#
# graph-compiled: torch.compile traces the same _step (a bound method: the runner's buffers, the
# cache's tensors and the weights are graph inputs, the same objects on every call, so the
# captured graph keeps its addresses).  Dynamo guards on Python values it reads, so one must not
# change from step to step: StaticSlidingWindowLayer.update reads and increments a Python int,
# cumulative_length_int, only to choose its branch (its write index is the device tensor); it is
# pinned to the prompt length before each compiled call, which keeps the index_copy_ branch (the
# window holds the whole sequence, see _check_cache) and one compiled entry.  After the first
# call every call runs under set_stance("fail_on_recompile"), so a guard that fails per step
# is an error, not a silent recompile (or a compile inside the capture).


def _mask_buffer(batch: int, length: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A (batch, 1, 1, length) additive mask, fully closed, whose rows start 16-element aligned:
    PyTorch's memory-efficient SDPA kernel copies a mask with unaligned strides on every call."""
    padded = -(-length // 16) * 16
    storage = torch.full((batch, 1, 1, padded), torch.finfo(dtype).min, dtype=dtype, device=device)
    return storage[..., :length]


def _where(exc: BaseException) -> str:
    """The innermost frames of the first exception in ``exc``'s chain (where an op broke capture)."""
    first, seen = exc, {id(exc)}
    while first.__context__ is not None and id(first.__context__) not in seen:
        first = first.__context__
        seen.add(id(first))
    frames = traceback.extract_tb(first.__traceback__)
    ours = [f for f in frames if f"{os.sep}torch{os.sep}" not in f.filename] or frames
    picked = ours[-2:] if ours else []
    where = "; ".join(f"{f.filename}:{f.lineno} in {f.name}: {(f.line or '').strip()}" for f in picked)
    return f"{type(first).__name__}: {str(first).splitlines()[0] if str(first) else ''} (at {where or 'unknown'})"


class _GraphRunner:
    """Graph mode for one model at one batch size: a static cache and static buffers that live
    as long as the runner, one prefill per call, then ``new_tokens - 1`` decode steps, replayed
    from one CUDA graph when ``capture`` (captured in the first call) and called in a Python loop
    otherwise.  ``compiled``: the step is ``torch.compile``d (``backend``, static shapes, without
    inductor's CUDA graphs) on its first call, before any capture.

    ``tokens``: the last call's generated tokens, (batch, new_tokens), on the model's device.
    ``fullgraph``: with ``compiled``, whether dynamo traced the step as one graph (else it broke
    it in pieces: still captured as one CUDA graph, with host code between the pieces)."""

    WARMUP_STEPS = 3  # steps on a side stream before capture, as PyTorch's CUDA-graph notes advise

    def __init__(self, model: nn.Module, config: SpeedConfig, device: torch.device, capture: bool,
                 compiled: bool = False, backend: str = "inductor") -> None:
        from transformers import StaticCache

        self.model, self.config, self.device, self.capture = model, config, device, capture
        self.compiled, self.backend = compiled, backend
        self.step_fn: Callable[[], None] | None = None
        self.fullgraph: bool | None = None
        self.length = config.prompt_len + config.new_tokens
        self.cache = StaticCache(config=model.config, max_cache_len=self.length)
        _check_cache(model, self.cache, self.length)
        self.pinned = [layer for layer in self.cache.layers if hasattr(layer, "cumulative_length_int")]
        if compiled:
            _raise_recompile_limits()  # one entry of _step per model and batch size
        params = inspect.signature(model.forward).parameters
        self.cache_arg = _cache_argument(model)
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
        self.pass_position = "cache_position" in params
        self.dtype = next(model.parameters()).dtype
        self.batch: int | None = None
        self.graph = None
        self.tokens: torch.Tensor | None = None

    def _allocate(self, batch: int) -> None:
        long = {"dtype": torch.long, "device": self.device}
        self.batch = batch
        self.input_ids = torch.zeros((batch, 1), **long)
        self.position_ids = torch.zeros((batch, 1), **long)
        self.cache_position = torch.zeros((1,), **long)
        self.step_index = torch.zeros((1,), **long)
        self.out = torch.zeros((batch, self.config.new_tokens), **long)
        self.mask = _mask_buffer(batch, self.length, self.dtype, self.device)

    def _reset(self) -> None:
        """Back to an empty cache, in place (the captured graph holds these addresses)."""
        self.cache.reset()
        self.mask.fill_(torch.finfo(self.dtype).min)
        for buffer in (self.input_ids, self.position_ids, self.cache_position, self.step_index, self.out):
            buffer.zero_()

    def _forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        kwargs[self.cache_arg] = self.cache
        return self.model(input_ids=input_ids, use_cache=True, **kwargs, **self.extra).logits

    def _prefill(self, prompt: torch.Tensor) -> None:
        """One eager forward over the prompt (transformers builds its causal mask from a 2-D one,
        as in generate); the first token goes to the input and output buffers."""
        batch, length = prompt.shape
        positions = torch.arange(length, device=self.device)
        kwargs = {"position_ids": positions.unsqueeze(0).expand(batch, -1),
                  "attention_mask": torch.ones_like(prompt)}
        if self.pass_position:
            kwargs["cache_position"] = positions
        token = self._forward(prompt, **kwargs)[:, -1].argmax(-1, keepdim=True)
        self.input_ids.copy_(token)
        self.out[:, :1].copy_(token)
        self.mask[..., :length].fill_(0)
        self.position_ids.fill_(length)
        self.cache_position.fill_(length)
        self.step_index.fill_(1)

    def _step(self) -> None:
        """One decode step on the static buffers alone: no host read, every index a tensor."""
        self.mask.index_fill_(-1, self.cache_position, 0)
        kwargs = {"position_ids": self.position_ids, "attention_mask": self.mask}
        if self.pass_position:
            kwargs["cache_position"] = self.cache_position
        token = self._forward(self.input_ids, **kwargs)[:, -1].argmax(-1, keepdim=True)
        self.input_ids.copy_(token)
        self.out.index_copy_(1, self.step_index, token)
        self.cache_position.add_(1)
        self.position_ids.add_(1)
        self.step_index.add_(1)

    def _compile(self, fullgraph: bool) -> Callable[[], None]:
        kwargs: dict = {"fullgraph": fullgraph, "dynamic": False, "backend": self.backend}
        if self.backend == "inductor":
            if self.config.compile_mode == "default":
                kwargs["options"] = {"triton.cudagraphs": False}
            else:
                kwargs["mode"] = self.config.compile_mode  # a no-cudagraphs mode (COMPILE_MODES)
        return torch.compile(self._step, **kwargs)

    def _first_compiled_step(self) -> None:
        """Compile and run the step: one graph if dynamo can trace it whole (with fullgraph a graph
        break fails at tracing, before anything runs), else with graph breaks."""
        from torch._dynamo.exc import Unsupported

        try:
            try:
                step, fullgraph = self._compile(fullgraph=True), True
                step()
            except Unsupported:
                step, fullgraph = self._compile(fullgraph=False), False
                step()
        except Exception as exc:
            raise LayerfoldError(f"graph-compiled: torch.compile ({self.backend}) of the decode step of "
                                 f"{type(self.model).__name__} failed; {_where(exc)}") from exc
        self.step_fn, self.fullgraph = step, fullgraph

    def _run_step(self) -> None:
        """One decode step, eager or compiled (the call a CUDA graph captures)."""
        if not self.compiled:
            self._step()
            return
        for layer in self.pinned:  # see the note above _mask_buffer
            layer.cumulative_length_int = self.config.prompt_len
        if self.step_fn is None:
            self._first_compiled_step()
            return
        with torch.compiler.set_stance("fail_on_recompile"):
            self.step_fn()

    def _capture(self, prompt: torch.Tensor) -> None:
        self._reset()
        self._prefill(prompt)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        what = "the torch.compiled decode step" if self.compiled else "the decode step"
        try:
            with torch.cuda.stream(stream):  # compiles (compiled), autotunes, loads kernels, sets cuBLAS up
                for _ in range(min(self.WARMUP_STEPS, self.config.new_tokens - 1)):
                    self._run_step()
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self._run_step()
        except LayerfoldError:
            raise
        except Exception as exc:
            raise LayerfoldError(f"graph mode: {what} of {type(self.model).__name__} could not be captured "
                                 f"as a CUDA graph; {_where(exc)}") from exc
        self.graph = graph

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, new_tokens: int) -> Timing:
        batch = prompt.shape[0]
        if prompt.shape[1] != self.config.prompt_len or new_tokens > self.config.new_tokens:
            raise LayerfoldError(f"graph mode holds {self.config.prompt_len} prompt + {self.config.new_tokens} new "
                                 f"tokens, asked for {prompt.shape[1]} + {new_tokens}")
        if self.batch is None:
            self._allocate(batch)
        elif batch != self.batch:
            raise LayerfoldError(f"graph mode runner built for batch {self.batch}, called with {batch}")
        if self.capture and self.graph is None:
            self._capture(prompt)
        self._reset()
        _sync(self.device)
        start = time.perf_counter()
        self._prefill(prompt)
        _sync(self.device)
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._run_step()
        _sync(self.device)
        end = time.perf_counter()
        steps = int(self.step_index.item())
        if steps != new_tokens:
            raise LayerfoldError(f"graph mode produced {steps} new tokens, {new_tokens} were asked for")
        self.tokens = self.out[:, :new_tokens].clone()
        return Timing(total_s=end - start, prefill_s=first - start, decode_s=end - first)


def _check_cache(model: nn.Module, cache, length: int) -> None:
    """Graph mode hands every layer one full causal mask over the static cache: refuse layers
    whose cache is not a plain static one (sliding windows shorter than the sequence, etc.)."""
    from transformers.cache_utils import StaticLayer

    name = getattr(model.config, "model_type", type(model).__name__)
    for index, layer in enumerate(getattr(cache, "layers", [])):
        if not isinstance(layer, StaticLayer):
            raise LayerfoldError(f"graph mode does not support {name}: cache layer {index} is "
                                 f"{type(layer).__name__}, not a static attention cache; use modes eager or static")
        if getattr(layer, "is_sliding", False) and layer.max_cache_len < length:
            raise LayerfoldError(
                f"graph mode does not support {name} here: layer {index} attends through a sliding window of "
                f"{layer.max_cache_len} tokens, shorter than prompt + new tokens ({length}), and the graph decode "
                f"passes one full causal mask to every layer; shorten --prompt-len/--new-tokens to fit the window "
                f"or use modes eager or static")


def _make_runner(model: nn.Module, mode: str, config: SpeedConfig, device: torch.device):
    if mode in ("graph", "graph-compiled"):
        return _GraphRunner(model, config, device, capture=_captures(device), compiled=mode == "graph-compiled",
                            backend=GRAPH_COMPILE_BACKEND)
    return _Runner(model, mode, config, device)


@torch.no_grad()
def graph_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int, capture: bool | None = None,
                 compiled: bool = False, backend: str | None = None) -> torch.Tensor:
    """Greedy tokens (batch, new_tokens) of graph mode for ``prompt`` (batch, prompt_len) ids:
    the same path the benchmark times, for checking it against ``generate``.  ``capture``:
    CUDA-graph capture (default: when the model is on CUDA); ``compiled``: graph-compiled, the
    step compiled first by ``torch.compile`` with ``backend`` (default: ``GRAPH_COMPILE_BACKEND``)."""
    device = next(model.parameters()).device
    config = SpeedConfig(batch_sizes=(prompt.shape[0],), new_tokens=new_tokens, prompt_len=prompt.shape[1])
    runner = _GraphRunner(model, config, device, capture=_captures(device) if capture is None else capture,
                          compiled=compiled, backend=backend or GRAPH_COMPILE_BACKEND)
    runner.generate(prompt.to(device), new_tokens)
    return runner.tokens


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
    label = config.mode_label(mode, device)
    runners: dict[str, _Runner | _GraphRunner] = {}
    held: dict[str, int] = {}
    warmup: dict[str, float] = {}
    for name, model in models.items():
        before = _allocated(device)
        runners[name] = _make_runner(model, mode, config, device)
        start = time.perf_counter()
        runners[name].generate(prompt, min(config.warmup_tokens, config.new_tokens))
        warmup[name] = time.perf_counter() - start
        held[name] = _allocated(device) - before
        breaks = " (torch.compile broke the step into several graphs)" if getattr(
            runners[name], "fullgraph", None) is False else ""
        log(f"{label} batch {batch} {name}: warm-up {warmup[name]:.1f} s{breaks}")
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
    return [_row(name, facts[name], label, batch, config, timings[name], peak[name], warmup[name]) for name in names]


def _row(name: str, fact: dict, label: str, batch: int, config: SpeedConfig, runs: list[Timing],
         peak: int | None, warmup_s: float) -> dict:
    total = statistics.median(t.total_s for t in runs)
    prefill = statistics.median(t.prefill_s for t in runs)
    decode = statistics.median(t.decode_s for t in runs)
    steps = config.new_tokens - 1
    decode_ms = 1000 * decode / steps
    floor_ms = 1000 * fact["read_bytes"] / config.bandwidth
    row = {"mode": label, "batch": batch, "model": name, "layers": fact["layers"],
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
    if config.compile and {"static", "graph-compiled"} & set(config.modes):
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
    return {"config": config.describe(device), "machine": machine_info(device), "models": facts,
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
