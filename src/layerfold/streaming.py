"""Larger than the GPU: stream decoder layers through a GPU one at a time.

With a memory cap (``--max-gpu-memory 8GiB``), the model's weights stay in CPU memory.  The
small modules outside the decoder stack (embeddings, final norm, LM head, rotary tables)
are kept on the compute device for the whole run; each decoder layer, and each candidate
fused layer a method builds (a copy of a decoder layer, so on the CPU too), is brought to the
GPU only while it runs and dropped right after.  Nothing is copied back: the CPU tensors are
never touched, the GPU copies are simply released.  Calibration activations are stored on
the CPU (:class:`layerfold.calibrate.LayerCache` ``store_device``).

How a layer travels: :meth:`LayerStreamer.on_device` swaps the ``.data`` of each of the
module's parameters (and its buffers) for a copy on the compute device and puts the CPU
tensors back afterwards.  The same swap runs from forward hooks on every decoder layer, so a
whole-model forward (calibration capture, perplexity) streams as well; a copy of a layer
(``copy.deepcopy``, which is how fused layers are built) keeps the hooks and streams too.
:meth:`layerfold.calibrate.LayerCache.run` holds each module on the device for all
calibration batches at once, so a span of layers costs one transfer per layer.

accelerate's offloading (``cpu_offload``, ``dispatch_model`` with ``"cpu"`` entries) was not
used: it moves the offloaded weights to the ``meta`` device between calls, and layerfold's
methods read those weights to build fused layers.  Models spread over several GPUs with
accelerate's ``device_map`` are supported separately (:func:`execution_device`).
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from layerfold.errors import LayerfoldError
from layerfold.models.arch import Architecture

GIB = 2**30
STREAM_ATTR = "_layerfold_stream"
_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([a-zA-Z]*)\s*$")


def parse_memory(value: str | int | float) -> int:
    """Bytes in ``value``: ``"8GiB"`` (2^30), ``"8GB"`` (10^9, as transformers and accelerate
    read it), ``"8000MiB"``, ``"8G"`` (binary, as ``docker`` reads it), or a number of bytes."""
    if isinstance(value, bool):
        raise LayerfoldError(f"memory size must be a size like 8GiB, got {value!r}")
    if isinstance(value, (int, float)):
        number, unit = float(value), ""
    else:
        match = _SIZE.match(str(value))
        if not match or match.group(2).lower() not in _UNITS:
            raise LayerfoldError(f"cannot read the memory size '{value}': write a number with a unit, e.g. 8GiB, "
                                 "8GB, 8000MiB (KiB/MiB/GiB/TiB are powers of 2, KB/MB/GB/TB powers of 10)")
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise LayerfoldError(f"memory size must be more than 0 bytes, got '{value}'")
    return size


def format_bytes(size: float) -> str:
    return f"{size / GIB:.2f} GiB"


def execution_device(module: nn.Module, fallback: torch.device | str) -> torch.device:
    """Where ``module`` computes: the compute device of an active stream; else the execution
    device of an accelerate hook (a ``device_map`` model); else the device of its own first
    parameter or buffer; else ``fallback``.  Hidden states are moved there before a call."""
    stream = getattr(module, STREAM_ATTR, None)
    if stream is not None and stream.active:
        return stream.device
    hook = getattr(module, "_hf_hook", None)
    dev = getattr(hook, "execution_device", None)
    if dev is not None:
        return torch.device("cuda", dev) if isinstance(dev, int) else torch.device(dev)
    for tensor in module.parameters():
        return tensor.device
    for tensor in module.buffers():
        return tensor.device
    return torch.device(fallback)


def _owned_tensors(module: nn.Module) -> Iterator[tuple[nn.Module, str, str, torch.Tensor]]:
    """(owner, "p" or "b", name, tensor) for every parameter and buffer under ``module``."""
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if p is not None:
                yield sub, "p", name, p
        for name, b in sub._buffers.items():
            if b is not None:
                yield sub, "b", name, b


def tensor_bytes(module: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for _, _, _, t in _owned_tensors(module):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total


class LayerStreamer:
    """Streams decoder layers (and copies of them) through ``device``; see the module doc.

    ``max_bytes`` is the cap checked by :meth:`check_budget` (None: no check).  ``pin_memory``
    (default: on for CUDA when the host has the memory to spare) moves the decoder layers'
    CPU tensors to page-locked memory once, which about doubles host-to-GPU transfer speed.
    ``stats`` counts transfers and, on CUDA, records the peak GPU memory the run allocated.
    """

    def __init__(self, device: torch.device | str, max_bytes: int | None = None,
                 pin_memory: bool | None = None) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.max_bytes = max_bytes
        self.pin_memory = pin_memory
        self.active = False
        self.model: nn.Module | None = None
        self._hooks: list = []
        self._layers: list[nn.Module] = []
        self._resident: list[tuple[nn.Module, str, str, torch.Tensor]] = []
        self._depth: dict[int, int] = {}
        self._saved: dict[int, list[tuple[nn.Module, str, str, torch.Tensor]]] = {}
        self._sizes: dict[int, int] = {}
        self._live = 0
        self._gpu_base = 0
        self.stats: dict = {"uploads": 0, "bytes_uploaded": 0, "resident_bytes": 0, "max_layer_bytes": 0,
                            "peak_streamed_bytes": 0, "pinned": False}

    def __deepcopy__(self, memo):  # a copied layer streams through the same streamer
        return self

    # -- placement -------------------------------------------------------------------------

    def attach(self, model: nn.Module, arch: Architecture) -> LayerStreamer:
        """Put the modules outside the decoder stack on the device, hook every decoder layer."""
        if self.active:
            raise LayerfoldError("this layer streamer is already attached to a model")
        if getattr(model, "hf_device_map", None) and len(set(model.hf_device_map.values())) > 1:
            raise LayerfoldError("--max-gpu-memory streams a model held in CPU memory; this one was spread "
                                 "over devices with a device_map: load it without --device-map")
        off_cpu = {str(t.device) for _, _, _, t in _owned_tensors(model) if t.device.type != "cpu"}
        if off_cpu:
            raise LayerfoldError(f"--max-gpu-memory streams a model held in CPU memory, but this one has weights "
                                 f"on {', '.join(sorted(off_cpu))}: load it with device='cpu'")
        layers = list(arch.layer_list(model))
        in_layers = {id(t) for layer in layers for _, _, _, t in _owned_tensors(layer)}
        self.model, self._layers = model, layers
        if self.device.type == "cuda":
            self._gpu_base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            if self._should_pin(layers):
                for layer in layers:
                    self._pin(layer)
                self.stats["pinned"] = True
        moved: dict[int, torch.Tensor] = {}
        for owner, kind, name, tensor in _owned_tensors(model):
            if id(tensor) in in_layers or (kind == "p" and id(tensor) in moved):  # moved: a tied parameter
                continue
            self._resident.append((owner, kind, name, tensor.data if kind == "p" else tensor))
            self._swap(owner, kind, name, tensor, moved)
        self.stats["resident_bytes"] = sum(t.numel() * t.element_size() for t in moved.values())
        self.stats["max_layer_bytes"] = max((tensor_bytes(layer) for layer in layers), default=0)
        for layer in layers:
            setattr(layer, STREAM_ATTR, self)
            self._hooks.append(layer.register_forward_pre_hook(_pre_hook))
            self._hooks.append(layer.register_forward_hook(_post_hook, always_call=True))
        self.active = True
        return self

    def detach(self) -> None:
        """Remove the hooks, put the resident modules back on the CPU (their CPU tensors were
        kept: nothing is copied back), and record the peak GPU memory."""
        if not self.active:
            return
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for layer in self._layers:
            if getattr(layer, STREAM_ATTR, None) is self:
                delattr(layer, STREAM_ATTR)
        for owner, kind, name, cpu in self._resident:
            if kind == "p":
                owner._parameters[name].data = cpu
            else:
                owner._buffers[name] = cpu
        self._resident.clear()
        self.active = False
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) - self._gpu_base
            self.stats["gpu_peak_bytes"] = int(peak)
            if self.max_bytes is not None and peak > self.max_bytes:
                warnings.warn(f"streaming allocated {format_bytes(peak)} on {self.device}, more than the "
                              f"{format_bytes(self.max_bytes)} cap", RuntimeWarning, stacklevel=2)
        self.model, self._layers = None, []

    def __enter__(self) -> LayerStreamer:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    @contextmanager
    def on_device(self, module: nn.Module):
        """``module``'s parameters and buffers on the compute device for the duration (re-entrant)."""
        if not self.active:
            yield module
            return
        self.enter(module)
        try:
            yield module
        finally:
            self.exit(module)

    def enter(self, module: nn.Module) -> None:
        key = id(module)
        depth = self._depth.get(key, 0)
        self._depth[key] = depth + 1
        if depth:
            return
        moved: dict[int, torch.Tensor] = {}
        saved = []
        for owner, kind, name, tensor in _owned_tensors(module):
            if tensor.device == self.device and self.device.type != "cpu":
                continue  # already there (a module that was not streamed)
            if kind == "p" and id(tensor) in moved:
                continue  # a parameter tied to one already swapped
            saved.append((owner, kind, name, tensor.data if kind == "p" else tensor))
            self._swap(owner, kind, name, tensor, moved)
        size = sum(t.numel() * t.element_size() for t in moved.values())
        self._saved[key] = saved
        self._live += size
        self.stats["uploads"] += 1
        self.stats["bytes_uploaded"] += size
        self.stats["peak_streamed_bytes"] = max(self.stats["peak_streamed_bytes"], self._live)
        self._sizes[key] = size

    def exit(self, module: nn.Module) -> None:
        key = id(module)
        depth = self._depth.get(key, 0) - 1
        if depth > 0:
            self._depth[key] = depth
            return
        self._depth.pop(key, None)
        for owner, kind, name, cpu in self._saved.pop(key, []):
            if kind == "p":
                owner._parameters[name].data = cpu
            else:
                owner._buffers[name] = cpu
        self._live -= self._sizes.pop(key, 0)

    def _swap(self, owner: nn.Module, kind: str, name: str, tensor: torch.Tensor,
              moved: dict[int, torch.Tensor]) -> None:
        source = tensor.data if kind == "p" else tensor
        key = id(tensor)
        if key not in moved:
            # copy=True: a compute device equal to the home device (tests) still runs on copies
            moved[key] = source.to(self.device, non_blocking=source.is_pinned(), copy=True)
        if kind == "p":
            tensor.data = moved[key]
        else:
            owner._buffers[name] = moved[key]

    def _should_pin(self, layers: list[nn.Module]) -> bool:
        if self.pin_memory is not None:
            return self.pin_memory
        need = 2 * sum(tensor_bytes(layer) for layer in layers)  # the host allocator rounds blocks up
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return False
        return free > need

    @staticmethod
    def _pin(layer: nn.Module) -> None:
        for owner, kind, name, tensor in _owned_tensors(layer):
            if tensor.device.type != "cpu" or tensor.is_pinned():
                continue
            if kind == "p":
                tensor.data = tensor.data.pin_memory()
            else:
                owner._buffers[name] = tensor.pin_memory()

    # -- budget ----------------------------------------------------------------------------

    def check_budget(self, model: nn.Module, arch: Architecture, batch_size: int, seq_len: int,
                     samples: int) -> dict:
        """Estimate the GPU memory of a streamed run and refuse a cap it cannot meet.

        Counted: the resident modules (embeddings, final norm, LM head), one decoder layer
        (twice, as room for the allocator's fragmentation: one module is on the device at a
        time, and a fused candidate is built on the CPU), the hidden states of
        the whole calibration set on the device during a span (input, output, the final
        comparison in float64), and one batch's working memory (attention, MLP, logits)."""
        layers = list(arch.layer_list(model))
        in_layers = {id(t) for layer in layers for _, _, _, t in _owned_tensors(layer)}
        seen: set[int] = set()
        resident = 0
        for _, _, _, t in _owned_tensors(model):
            if id(t) not in in_layers and id(t) not in seen:
                seen.add(id(t))
                resident += t.numel() * t.element_size()
        layer = max((tensor_bytes(m) for m in layers), default=0)
        config = getattr(model, "config", None)
        hidden = _config_int(config, "hidden_size", "n_embd", "d_model")
        inter = _config_int(config, "intermediate_size", "ffn_dim", "n_inner") or 4 * hidden
        heads = _config_int(config, "num_attention_heads", "n_head") or 1
        vocab = _config_int(config, "vocab_size")
        element = next((t.element_size() for t in model.parameters() if t.is_floating_point()), 4)
        batch = min(batch_size, samples)
        tokens = samples * seq_len
        span = tokens * hidden * (4 * element + 2 * 8)
        work = batch * seq_len * (6 * hidden + 3 * inter) * element + 2 * batch * heads * seq_len ** 2 * 4
        logits = 3 * 4 * vocab * max(2048, batch * seq_len)
        activations = span + work + logits
        need = resident + 2 * layer + activations
        estimate = {"resident_bytes": resident, "layer_bytes": layer, "activation_bytes": activations,
                    "needed_bytes": need, "cap_bytes": self.max_bytes}
        self.stats["estimate"] = estimate
        if self.max_bytes is not None and need > self.max_bytes:
            raise LayerfoldError(
                f"--max-gpu-memory {format_bytes(self.max_bytes)} is too small to stream this model: one decoder "
                f"layer ({format_bytes(layer)}, counted twice for fragmentation), the embeddings, "
                f"final norm and LM head kept on the GPU ({format_bytes(resident)}) and the activations of "
                f"{samples} x {seq_len} calibration tokens in batches of {batch} ({format_bytes(activations)}) "
                f"need about {format_bytes(need)}: raise the cap, or use fewer or shorter calibration samples")
        return estimate

    def describe(self) -> dict:
        record = {"device": str(self.device), "max_gpu_memory_bytes": self.max_bytes,
                  **{k: v for k, v in self.stats.items() if k != "estimate"}}
        if "estimate" in self.stats:
            record["estimated_need_bytes"] = self.stats["estimate"]["needed_bytes"]
        return record


def _pre_hook(module: nn.Module, args) -> None:
    stream = getattr(module, STREAM_ATTR, None)
    if stream is not None and stream.active:
        stream.enter(module)


def _post_hook(module: nn.Module, args, output) -> None:
    stream = getattr(module, STREAM_ATTR, None)
    if stream is not None and stream.active:
        stream.exit(module)


def _config_int(config, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return 0


def resolve_compute_device(device: str | torch.device | None) -> torch.device:
    """The GPU to stream through: ``device`` (``cuda``, ``cuda:N``; ``cpu`` only for tests), or the
    current CUDA device."""
    if device is None or str(device) in ("auto", "cuda"):
        if not torch.cuda.is_available():
            raise LayerfoldError("--max-gpu-memory streams layers through a CUDA GPU, and none is available "
                                 "(without a GPU, run without --max-gpu-memory: the model then runs on the CPU)")
        return torch.device("cuda", torch.cuda.current_device())
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise LayerfoldError(f"unknown compute device '{device}': use cuda or cuda:N") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LayerfoldError(f"--max-gpu-memory with {device}: no CUDA device is available")
    return dev


@contextmanager
def layer_streaming(model: nn.Module, arch: Architecture, max_gpu_memory: str | int | None,
                    compute_device: str | torch.device | None = None, *, batch_size: int = 8, seq_len: int = 128,
                    samples: int = 10, pin_memory: bool | None = None):
    """A :class:`LayerStreamer` attached to ``model`` for the block (None without a cap)."""
    if max_gpu_memory is None:
        yield None
        return
    cap = parse_memory(max_gpu_memory)
    streamer = LayerStreamer(resolve_compute_device(compute_device), cap, pin_memory=pin_memory)
    streamer.check_budget(model, arch, batch_size, seq_len, samples)
    streamer.attach(model, arch)
    try:
        yield streamer
    finally:
        streamer.detach()


def streaming_for(loaded, max_gpu_memory: str | int | None, compute_device=None, calibration=None,
                  tokens: torch.Tensor | None = None):
    """Layer streaming for one run over ``loaded`` (a null context without a cap); the budget is
    checked against the calibration batches (``tokens`` if given)."""
    from layerfold.data.tokens import CalibrationConfig

    calibration = calibration or CalibrationConfig()
    samples, seq_len = tokens.shape if tokens is not None else (calibration.samples, calibration.seq_len)
    return layer_streaming(loaded.model, loaded.arch, max_gpu_memory, compute_device,
                           batch_size=calibration.batch_size, seq_len=int(seq_len), samples=int(samples))
