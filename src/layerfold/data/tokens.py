"""Deterministic token windows: N samples x T tokens from a text source."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from layerfold.data.sources import EVALUATION_SOURCES
from layerfold.errors import LayerfoldError


@dataclass(frozen=True)
class CalibrationConfig:
    """Calibration set: ``samples`` windows of ``seq_len`` tokens from ``source``.

    ``sampling="random"`` draws non-overlapping windows with ``seed``; ``"strided"`` takes the
    windows starting at tokens 0, stride, 2*stride, ... (a fixed, seed-free protocol).
    """

    source: str = "books"
    samples: int = 10
    seq_len: int = 128
    seed: int = 1234
    sampling: str = "random"
    stride: int = 5000
    batch_size: int = 8

    def __post_init__(self) -> None:
        if self.samples < 1 or self.seq_len < 2:
            raise LayerfoldError("calibration needs at least 1 sample of at least 2 tokens")
        if self.sampling not in ("random", "strided"):
            raise LayerfoldError(f"unknown sampling '{self.sampling}': random or strided")
        if self.batch_size < 1:
            raise LayerfoldError("batch size must be at least 1")
        if self.source in EVALUATION_SOURCES:
            raise LayerfoldError(f"'{self.source}' is an evaluation set: calibrating on it would make every later "
                                 "perplexity on it meaningless. Calibrate on books (default), ptb-train, ptb-valid "
                                 "or a file")

    def describe(self) -> dict:
        from layerfold.data.sources import source_description

        return {"source": self.source, "description": source_description(self.source), "samples": self.samples,
                "seq_len": self.seq_len, "seed": self.seed, "sampling": self.sampling,
                **({"stride": self.stride} if self.sampling == "strided" else {})}


def token_stream(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D tensor of token ids, no special tokens."""
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def leading_bos(tokenizer) -> int | None:
    """The BOS id when the tokenizer puts BOS in front of every text it encodes (Gemma, Llama), else
    None (SmolLM2, GPT-2). Models trained that way expect it at the start of each sequence."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("a", return_attention_mask=False)["input_ids"]
    return bos if ids and ids[0] == bos else None


def sample_windows(tokenizer, config: CalibrationConfig) -> torch.Tensor:
    """``[samples, seq_len]`` token ids, the same for the same config and tokenizer."""
    from layerfold.data.sources import load_text

    stream = token_stream(tokenizer, load_text(config.source))
    n, t = config.samples, config.seq_len
    if config.sampling == "strided":
        starts = [i * config.stride for i in range(n)]
        if starts[-1] + t > len(stream):
            raise LayerfoldError(f"{config.source} has {len(stream)} tokens: too few for {n} windows at stride "
                                 f"{config.stride}")
    else:
        slots = len(stream) // t
        if slots < n:
            raise LayerfoldError(f"{config.source} has {len(stream)} tokens: too few for {n} windows of {t}")
        gen = torch.Generator().manual_seed(config.seed)
        starts = sorted((torch.randperm(slots, generator=gen)[:n] * t).tolist())
    return torch.stack([stream[s:s + t] for s in starts])


def tokens_hash(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.numpy().tobytes()).hexdigest()[:16]


def check_calibration_source(config: CalibrationConfig) -> None:
    """Read the calibration text before any model is loaded, so that a missing, empty, non-UTF-8
    or plainly too short file (or an unavailable named source) fails at once in one line.  The
    exact token count is checked when the windows are cut (:func:`sample_windows`)."""
    from layerfold.data.sources import load_text

    text = load_text(config.source)
    if not text.strip():
        raise LayerfoldError(f"calibration text {config.source} is empty")
    needed = config.samples * config.seq_len if config.sampling == "random" else \
        (config.samples - 1) * config.stride + config.seq_len
    most = len(text.encode("utf-8"))  # a tokenizer gives at most one token per byte (byte fallback)
    if most < needed:
        raise LayerfoldError(f"calibration text {config.source} is too short: {most} bytes, fewer than the "
                             f"{needed} tokens that {config.samples} windows of {config.seq_len} need")
