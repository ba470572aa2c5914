"""Fixed-length token perplexity, the protocol of depth-pruning papers.

The text is tokenized once (no special tokens) and cut into consecutive non-overlapping
windows of ``seq_len`` tokens (stride = ``seq_len``; the last partial window is dropped).
Without BOS, each window's first token is context only and the other ``seq_len - 1`` are
scored.  With BOS, a window holds BOS plus ``seq_len - 1`` text tokens, all scored.
Perplexity = exp(mean token negative log-likelihood) over all scored tokens.  This differs
from lm-evaluation-harness's ``wikitext`` task, which reports word perplexity over rolling
windows.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from layerfold.data.sources import load_text, source_description
from layerfold.data.tokens import leading_bos, token_stream
from layerfold.errors import LayerfoldError


@dataclass
class PerplexityResult:
    source: str
    perplexity: float
    nll: float
    tokens_scored: int
    windows: int
    seq_len: int
    bos: bool
    protocol: str

    def to_dict(self) -> dict:
        return asdict(self)


def windows_from_stream(stream: torch.Tensor, seq_len: int, bos_id: int | None,
                        max_windows: int | None = None) -> torch.Tensor:
    text_len = seq_len - 1 if bos_id is not None else seq_len
    n = len(stream) // text_len
    if max_windows is not None:
        n = min(n, max_windows)
    if n < 1:
        raise LayerfoldError(f"text has {len(stream)} tokens: fewer than one window of {seq_len}")
    windows = stream[: n * text_len].view(n, text_len)
    if bos_id is not None:
        windows = torch.cat([torch.full((n, 1), bos_id, dtype=windows.dtype), windows], dim=1)
    return windows


_LOGIT_ELEMENTS = 2**30


@torch.no_grad()
def perplexity_of_windows(model, windows: torch.Tensor, bos: bool, batch_size: int = 8,
                          progress: bool = True, desc: str = "perplexity") -> tuple[float, int]:
    """(mean NLL, tokens scored).  Batches are cut down so that one batch's float32 logits stay
    under about 4 GiB (long windows on large vocabularies)."""
    device = next(model.parameters()).device
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 1
    batch_size = max(1, min(batch_size, _LOGIT_ELEMENTS // max(1, windows.shape[1] * vocab)))
    total_nll, total_tokens = 0.0, 0
    for chunk in tqdm(torch.split(windows, batch_size), desc=desc, disable=not progress, leave=False):
        chunk = chunk.to(device)
        logits = model(input_ids=chunk, use_cache=False).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logp.gather(-1, chunk[:, 1:, None]).squeeze(-1)
        total_nll += float(nll.sum())
        total_tokens += nll.numel()
    return total_nll / total_tokens, total_tokens


def bos_by_default(tokenizer) -> bool:
    """Whether perplexity windows start with BOS unless told otherwise: where the tokenizer puts BOS in
    front of every text (Gemma, Llama), as their models were trained."""
    return leading_bos(tokenizer) is not None


def perplexity(model, tokenizer, source: str, seq_len: int = 128, bos: bool | None = None, batch_size: int = 8,
               max_windows: int | None = None, progress: bool = True) -> PerplexityResult:
    """Perplexity over non-overlapping ``seq_len``-token windows of ``source``. ``bos=None`` puts BOS
    first in each window where the tokenizer puts BOS in front of every text (Gemma, Llama: their
    models were trained that way and are far off without it), and not otherwise (SmolLM2)."""
    if seq_len < 2:
        raise LayerfoldError("--seq-len must be at least 2")
    if bos is None:
        bos = bos_by_default(tokenizer)
    bos_id = None
    if bos:
        bos_id = tokenizer.bos_token_id
        if bos_id is None:
            raise LayerfoldError("this tokenizer has no BOS token; run without --bos")
    stream = token_stream(tokenizer, load_text(source))
    windows = windows_from_stream(stream, seq_len, bos_id, max_windows)
    nll, scored = perplexity_of_windows(model, windows, bos, batch_size, progress, desc=f"perplexity {source}")
    protocol = (f"{source_description(source)}; {len(windows)} non-overlapping windows of {seq_len} tokens"
                f"{' (BOS first)' if bos else ', no BOS'}; exp(mean NLL) over {scored} tokens")
    return PerplexityResult(source=source, perplexity=math.exp(nll), nll=nll, tokens_scored=scored,
                            windows=len(windows), seq_len=seq_len, bos=bos, protocol=protocol)


def perplexities(loaded, sources: tuple[str, ...], windows: int | None, progress: bool = True,
                 max_gpu_memory: str | int | None = None, compute_device=None,
                 remember: bool = False) -> dict[str, float]:
    """Perplexity of ``loaded`` on each source (128-token windows, the first ``windows``), streamed
    through the GPU when ``max_gpu_memory`` is given (:func:`layerfold.streaming.streaming_for`).

    ``remember``: a figure measured before for the same weights (their fingerprint), source,
    windows, dtype and device kind is read from layerfold's cache instead of measured again, and a
    new one is written there: the unpruned model's check, which every prune of it repeats."""
    from layerfold.data.tokens import CalibrationConfig
    from layerfold.streaming import streaming_for

    if not sources:
        return {}
    protocol = {"seq_len": 128, "bos": bos_by_default(loaded.tokenizer), "batch_size": 8, "max_windows": windows}
    keys = _memo_paths(loaded, sources, protocol, max_gpu_memory) if remember else {}
    known = {s: _read_memo(path) for s, path in keys.items()}
    todo = [s for s in sources if known.get(s) is None]
    if todo:
        with streaming_for(loaded, max_gpu_memory, compute_device, CalibrationConfig(samples=8)):
            for s in todo:
                known[s] = perplexity(loaded.model, loaded.tokenizer, s, **protocol, progress=progress).perplexity
                if s in keys:
                    _write_memo(keys[s], known[s])
    if progress and len(todo) < len(sources):
        tqdm.write(f"perplexity of the unpruned model on {', '.join(s for s in sources if s not in todo)}: "
                   "from an earlier run's measurement (layerfold cache)")
    return {s: known[s] for s in sources}


def _memo_paths(loaded, sources: tuple[str, ...], protocol: dict, max_gpu_memory) -> dict[str, Path]:
    """Where each source's remembered figure lives: a digest of everything that decides it."""
    from layerfold.assets import cache_dir
    from layerfold.models.fingerprint import model_fingerprint
    from layerfold.version import __version__

    param = next(loaded.model.parameters())
    device = "streamed" if max_gpu_memory is not None else param.device.type
    facts = {"model": model_fingerprint(loaded.model), **protocol, "dtype": str(param.dtype), "device": device,
             "layerfold": __version__, "torch": torch.__version__}

    def digest(source: str) -> str:
        return hashlib.sha256(json.dumps({**facts, "source": source}, sort_keys=True).encode()).hexdigest()[:24]

    return {s: cache_dir() / "perplexity" / f"{digest(s)}.json" for s in sources}


def _read_memo(path: Path) -> float | None:
    try:
        value = json.loads(path.read_text())["perplexity"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def _write_memo(path: Path, value: float) -> None:
    """Written whole or not at all; a cache that cannot be written is skipped."""
    from layerfold.assets import write_atomic

    try:
        write_atomic(path, json.dumps({"perplexity": value}))
    except OSError:
        pass
