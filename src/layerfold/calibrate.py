"""Capture every decoder layer's inputs on the calibration set once, then run spans of
layers directly from those inputs.

All methods and the SLM engine see the model through :class:`LayerCache`, so a candidate
fused window is evaluated by running one new layer and the layers above it, never the whole
model, and never a deep copy of it.

Every module runs on its own execution device (:func:`layerfold.streaming.execution_device`):
the device of its weights, the GPU of a model spread over several by accelerate's
``device_map``, or the compute device of a layer streamed from the CPU
(:mod:`layerfold.streaming`, ``--max-gpu-memory``); hidden states and call arguments are moved
there before each call.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from layerfold.finite import ActivationWatch
from layerfold.models.arch import Architecture
from layerfold.streaming import LayerStreamer, execution_device

_DROP_KWARGS = ("past_key_values", "past_key_value", "cache", "layer_past")


@dataclass
class LayerCache:
    """``inputs[i][b]``: hidden states entering layer ``i`` for batch ``b`` (``inputs[L]`` is
    the last layer's output); ``extras[i][b]``: the other positional and keyword arguments the
    model passed to layer ``i`` (masks, position embeddings)."""

    model: nn.Module
    arch: Architecture
    tokens: torch.Tensor
    inputs: list[list[torch.Tensor]] = field(default_factory=list)
    extras: list[list[tuple[tuple, dict]]] = field(default_factory=list)
    store_device: torch.device = torch.device("cpu")
    streamer: LayerStreamer | None = None  # set when layers are streamed from the CPU
    layer_seconds: float | None = None  # one decoder layer over all the tokens, timed during capture

    @property
    def num_layers(self) -> int:
        return len(self.inputs) - 1

    @property
    def layers(self) -> nn.ModuleList:
        return self.arch.layer_list(self.model)

    @property
    def device(self) -> torch.device:
        """Where the run starts (embeddings, final norm and LM head live here): the streaming
        compute device, else the device of the model's first parameter."""
        if self.streamer is not None and self.streamer.active:
            return self.streamer.device
        return next(self.model.parameters()).device

    def batches(self) -> int:
        return len(self.extras[0]) if self.extras else len(self.inputs[0])

    def input_of(self, i: int) -> torch.Tensor:
        """Hidden states entering layer ``i`` on all samples (``i == L``: the last layer's
        output), ``[N, T, H]`` on CPU."""
        return torch.cat([h.cpu() for h in self.inputs[i]])

    def output(self, i: int) -> torch.Tensor:
        """Output of layer ``i`` (= input of ``i + 1``) on all samples, ``[N, T, H]`` on CPU."""
        return self.input_of(i + 1)

    def run(self, start: int, modules: Sequence[tuple[nn.Module, int]], hidden: list[torch.Tensor] | None = None,
            final_norm: bool = False) -> list[torch.Tensor]:
        """Run ``modules`` (each with the original index whose call arguments it uses) from the
        cached input of layer ``start`` (or from ``hidden``); return per-batch outputs."""
        hidden = hidden if hidden is not None else self.inputs[start]
        norm = self.arch.final_norm_module(self.model) if final_norm else None
        outs = []
        with torch.no_grad():
            if self.streamer is not None and self.streamer.active:
                # module by module, every batch through each: one transfer per module and run
                outs = [h.to(self.device) for h in hidden]
                for module, src in modules:
                    with self.streamer.on_device(module):
                        outs = [call_layer(module, h, self.extras[src][b], self.device) for b, h in enumerate(outs)]
                return [_norm(norm, h) for h in outs] if norm is not None else outs
            for b, h in enumerate(hidden):
                h = h.to(self.device)
                for module, src in modules:
                    h = call_layer(module, h, self.extras[src][b], self.device)
                if norm is not None:
                    h = _norm(norm, h)
                outs.append(h)
        return outs

    def final(self, outs: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([o.float().cpu() for o in outs])


def call_layer(module: nn.Module, hidden: torch.Tensor, extra: tuple[tuple, dict], device) -> torch.Tensor:
    """Run one decoder layer (or fused layer) on ``hidden`` with the call arguments ``extra``,
    on the module's own execution device (``device`` if it has no weights)."""
    device = execution_device(module, device)
    args, kwargs = extra
    args = tuple(_to(a, device) for a in args)
    kwargs = {k: _to(v, device) for k, v in kwargs.items()}
    out = module(hidden.to(device), *args, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def _norm(norm: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    return norm(hidden.to(execution_device(norm, hidden.device)))


def _to(value, device):
    if isinstance(value, torch.Tensor):
        return value.to(device)
    if isinstance(value, tuple):
        return tuple(_to(v, device) for v in value)
    return value


def capture(model: nn.Module, arch: Architecture, tokens: torch.Tensor, batch_size: int = 8,
            store_device: str | torch.device | None = None, progress: bool = True,
            streamer: LayerStreamer | None = None, keep: Collection[int] | None = None) -> LayerCache:
    """One forward pass over ``tokens`` ([N, T]) recording each layer's inputs and arguments.

    ``keep`` limits the stored hidden states to those entering the layers it names (``L``: the
    last layer's output); the call arguments of every layer are stored all the same, so spans
    can still be run from a kept input.  With an attached ``streamer`` (layers streamed from the
    CPU), the activations are stored on the CPU and later runs bring each module to the
    streamer's device."""
    layers = arch.layer_list(model)
    n_layers = len(layers)
    if streamer is not None and streamer.active:
        store = torch.device("cpu") if store_device is None else torch.device(store_device)
    else:
        streamer = None
        stored = n_layers if keep is None else len(keep) - 1  # _default_store counts n_layers + 1 tensors
        store = torch.device(store_device) if store_device is not None else _default_store(model, tokens, stored)
    cache = LayerCache(model=model, arch=arch, tokens=tokens, store_device=store, streamer=streamer,
                       inputs=[[] for _ in range(n_layers + 1)], extras=[[] for _ in range(n_layers)])
    handles = []
    watch = ActivationWatch(n_layers)  # NaN/Inf activations name their layer (checked after the pass)

    def pre_hook(idx):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            rest_args = args[1:] if args else ()
            rest = {k: _detach(v) for k, v in kwargs.items() if k != "hidden_states" and k not in _DROP_KWARGS}
            if "use_cache" in rest:
                rest["use_cache"] = False
            watch.see(idx, hidden)
            if keep is None or idx in keep:
                cache.inputs[idx].append(hidden.detach().to(store))
            cache.extras[idx].append((tuple(_detach(a) for a in rest_args), rest))

        return hook

    def last_hook(module, args, output):
        out = output[0] if isinstance(output, tuple) else output
        watch.see(n_layers, out)
        if keep is None or n_layers in keep:
            cache.inputs[n_layers].append(out.detach().to(store))

    clock = _LayerClock(cache.device)
    handles.append(layers[0].register_forward_pre_hook(clock.start))
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(pre_hook(i), with_kwargs=True))
    handles.append(layers[-1].register_forward_hook(last_hook))
    handles.append(layers[-1].register_forward_hook(clock.stop))
    device = cache.device
    # the logits are not needed: with logits_to_keep=1 the LM head runs on one position, not all
    head = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    try:
        with torch.no_grad():
            chunks = list(torch.split(tokens, batch_size))
            for chunk in tqdm(chunks, desc="calibration forward", disable=not progress, leave=False):
                model(input_ids=chunk.to(device), use_cache=False, **head)
    finally:
        for h in handles:
            h.remove()
    cache.layer_seconds = clock.seconds / n_layers
    watch.check()
    return cache


class _LayerClock:
    """Wall time from the first decoder layer's start to the last one's end, per batch (the GPU
    synchronised at both ends): what the layers cost on the calibration tokens, for the planning
    time estimate (:mod:`layerfold.methods.slm.estimate`).  ``seconds`` is all the tokens at the
    fastest batch's rate per token, so that the first batch's one-off costs (kernel set-up, first
    allocations) do not count."""

    def __init__(self, device: torch.device) -> None:
        self.device, self._start = device, 0.0
        self._batches: list[tuple[float, int]] = []  # (seconds, tokens)

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def start(self, _module, args) -> None:
        self._start = self._now()
        self._tokens = args[0].shape[:-1].numel() if args else 0

    def stop(self, *_args) -> None:
        self._batches.append((self._now() - self._start, self._tokens))

    @property
    def seconds(self) -> float:
        timed = [(s, n) for s, n in self._batches if n]
        if not timed:
            return sum(s for s, _ in self._batches)
        return min(s / n for s, n in timed) * sum(n for _, n in self._batches)


def _default_store(model: nn.Module, tokens: torch.Tensor, n_layers: int, limit_gib: float = 4.0) -> torch.device:
    """Keep activations beside the model when they are small (no host round trips), else on the CPU."""
    param = next(model.parameters())
    hidden = getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", 0)
    size = tokens.numel() * hidden * (n_layers + 1) * param.element_size()
    return param.device if param.device.type != "cpu" and size < limit_gib * 2**30 else torch.device("cpu")


def _detach(value):
    if isinstance(value, torch.Tensor):
        return value.detach()
    if isinstance(value, tuple):
        return tuple(_detach(v) for v in value)
    return value
