"""Healing text -> fixed-length token blocks, in a seeded order.

A data spec is one or more comma-separated parts, each

- a named source of :mod:`layerfold.data.sources` meant for training (``books``: the
  calibration half of the LAMBADA passages; ``ptb-train``; ``ptb-valid``);
- a ``.txt`` file, or a ``.jsonl`` file whose records have a ``text`` field;
- ``hf:NAME[:CONFIG]:SPLIT`` (a hub dataset's ``text`` column; needs the hub).

The evaluation sets (WikiText-2 test, PTB test, the LAMBADA evaluation half) are refused:
healing on them would make every later perplexity meaningless.  The parts are joined,
tokenized once without special tokens (as the calibration and perplexity code does) and
cut into consecutive blocks of ``cutoff`` tokens (the tail shorter than a block is dropped).
"""

from __future__ import annotations

import torch

from layerfold.data.sources import EVALUATION_SOURCES, load_text, source_description
from layerfold.data.tokens import leading_bos, token_stream
from layerfold.errors import LayerfoldError


def parse_hub_spec(spec: str) -> tuple[str, str | None, str]:
    """``hf:NAME[:CONFIG]:SPLIT`` -> (name, config, split); a split may carry a slice, ``train[:1%]``."""
    rest = spec.removeprefix("hf:")
    bracket = ""
    if "[" in rest:
        rest, bracket = rest[:rest.index("[")], rest[rest.index("["):]
    parts = rest.split(":")
    if len(parts) not in (2, 3) or not all(parts):
        raise LayerfoldError(f"hub data '{spec}': expected hf:NAME:SPLIT or hf:NAME:CONFIG:SPLIT")
    name, config, split = (parts[0], None, parts[1]) if len(parts) == 2 else tuple(parts)
    return name, config, split + bracket


def _hub_text(spec: str) -> str:
    name, config, split = parse_hub_spec(spec)
    if split.startswith("test"):
        raise LayerfoldError(f"hub data '{spec}': refusing to heal on a test split")
    try:
        import datasets

        ds = datasets.load_dataset(name, config, split=split)
    except Exception as exc:  # offline, unknown dataset, bad split: all user-facing
        raise LayerfoldError(f"hub dataset '{spec}' is not available ({type(exc).__name__}: "
                             f"{str(exc).splitlines()[0][:160]}); heal on 'books' or a local file instead") from exc
    column = "text" if "text" in ds.column_names else None
    if column is None:
        strings = [c for c, f in ds.features.items() if getattr(f, "dtype", None) == "string"]
        if len(strings) != 1:
            raise LayerfoldError(f"hub dataset '{spec}' has no 'text' column (columns: {', '.join(ds.column_names)})")
        column = strings[0]
    return "\n\n".join(t for t in ds[column] if t)


def data_parts(spec: str) -> list[str]:
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise LayerfoldError("--data is empty: give books, ptb-train, a text/jsonl file or hf:NAME:SPLIT")
    for part in parts:
        if part in EVALUATION_SOURCES:
            raise LayerfoldError(f"'{part}' is an evaluation set: healing on it would spoil every later "
                                 "perplexity. Heal on books (default), ptb-train, a file or a hub dataset")
    return parts


def load_heal_text(spec: str) -> str:
    return "\n\n".join(_hub_text(p) if p.startswith("hf:") else load_text(p) for p in data_parts(spec))


def describe_data(spec: str) -> str:
    if spec.strip() == "self":
        return "text written by the original model from calibration-passage openings or BOS"
    return " + ".join(f"hub dataset {p[3:]}" if p.startswith("hf:") else source_description(p)
                      for p in data_parts(spec))


def token_blocks(tokenizer, spec: str, cutoff: int) -> torch.Tensor:
    """``[blocks, cutoff]`` token ids, consecutive in the text (each led by BOS where the tokenizer
    puts one in front of a text)."""
    return blocks_from_stream(token_stream(tokenizer, load_heal_text(spec)), cutoff, f"--data {spec}",
                              bos=leading_bos(tokenizer))


def blocks_from_stream(stream: torch.Tensor, cutoff: int, what: str, bos: int | None = None) -> torch.Tensor:
    """Cut a token stream into ``[blocks, cutoff]`` (the tail shorter than a block is dropped). With
    ``bos``, each block is that token followed by the next ``cutoff - 1`` tokens of the stream, as a
    model that was trained with BOS in front of every sequence (Gemma, Llama) expects."""
    width = cutoff - (bos is not None)
    n = len(stream) // width if width > 0 else 0
    if n < 1:
        raise LayerfoldError(f"{what} has {len(stream)} tokens: fewer than one block of {cutoff}")
    blocks = stream[: n * width].view(n, width)
    return blocks if bos is None else torch.cat([torch.full((n, 1), bos, dtype=blocks.dtype), blocks], 1)


def block_order(num_blocks: int, count: int, seed: int) -> torch.Tensor:
    """``count`` block indices: a seeded permutation of all blocks per epoch, epochs one after another."""
    gen = torch.Generator().manual_seed(seed)
    epochs = -(-count // num_blocks)
    return torch.cat([torch.randperm(num_blocks, generator=gen) for _ in range(epochs)])[:count]
