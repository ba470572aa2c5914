"""Healing text written by the original model itself: no dataset needed.

The dense model samples continuations of short seeds (the openings of the calibration
passages, ``books``, or a lone BOS token) under a recorded recipe: seed, temperature, top-p,
new tokens per sample and samples per batch.  Batch ``k`` is always generated from the same
seeds and RNG seed, so the text is a deterministic sequence of batches ("chunks"): a larger
budget extends what is cached instead of regenerating it.

Each chunk is cached as raw token ids under ``<layerfold cache>/self-text/<model>-<recipe>/``,
keyed by a fingerprint of the model's weights and the recipe.  When the text is read, each
sample is cut at its first end-of-sequence token; samples that end too early, repeat an
earlier sample's opening, or share any ``NGRAM``-token window with an evaluation text
(WikiText-2 test, PTB test, the LAMBADA evaluation half) are dropped.  Seeds never come from
an evaluation text: only the calibration half of the book passages, or BOS.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tqdm.auto import tqdm

from layerfold.data.tokens import leading_bos, tokens_hash
from layerfold.errors import LayerfoldError

NGRAM = 13  # the contamination window, as in GPT-3's overlap study
DEDUP_PREFIX = 64  # generated tokens compared to find repeated samples
MIN_NEW_TOKENS = 16  # a sample that ends sooner is dropped
_STATIC_CACHE_WORKS: dict[int, bool] = {}  # per model object: False once a static-cache generation failed


class SelfTextRecipe(BaseModel):
    """How the original model writes its healing text (recorded in ``heal.json``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seeds: Literal["books", "bos"] = "books"
    seed_tokens: int = Field(8, ge=1)  # tokens of each passage's opening (books); BOS is one token
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(0.95, gt=0, le=1)
    length: int = Field(256, ge=MIN_NEW_TOKENS)  # new tokens per sample
    batch: int = Field(512, ge=1)  # samples per generation batch (one cached chunk)
    seed: int = 1234

    def key(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:12]


@dataclass
class SelfText:
    """The kept token stream (samples joined by end-of-sequence) and how it was made."""

    stream: torch.Tensor
    record: dict = field(default_factory=dict)


def model_fingerprint(model: torch.nn.Module) -> str:
    """A short hash of the configuration and of every parameter's name, shape, dtype and end values.

    Reading the first and last values of each tensor (not all of them) keeps this instant on a
    large model while still telling apart two checkpoints of one architecture."""
    digest = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in ("_name_or_path", "transformers_version")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        ends = torch.cat([flat[:256], flat[-256:]]).float().cpu()
        digest.update(f"{name}{tuple(p.shape)}{p.dtype}".encode())
        digest.update(ends.numpy().tobytes())
    return digest.hexdigest()[:16]


def seed_ids(tokenizer, recipe: SelfTextRecipe) -> torch.Tensor:
    """``[n, seed_len]`` seeds: openings of the calibration passages, or one BOS token."""
    if recipe.seeds == "bos":
        bos = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        if bos is None:
            raise LayerfoldError("--gen-seeds bos: the tokenizer has no BOS or EOS token; use --gen-seeds books")
        return torch.tensor([[bos]])
    from layerfold.data.sources import BOOKS_SPLIT, lambada_passages

    passages = lambada_passages()[:BOOKS_SPLIT]  # the calibration half only, never the evaluation half
    lead = [] if (bos := leading_bos(tokenizer)) is None else [bos]  # as the model saw every text in training
    openings = [lead + ids[: recipe.seed_tokens] for ids in tokenizer(passages, add_special_tokens=False)["input_ids"]
                if len(ids) >= recipe.seed_tokens]
    if not openings:
        raise LayerfoldError(f"no calibration passage has {recipe.seed_tokens} tokens: lower --gen-seed-tokens")
    return torch.tensor(openings)


def chunk_seeds(seeds: torch.Tensor, recipe: SelfTextRecipe, chunk: int) -> torch.Tensor:
    """The ``batch`` seeds of chunk ``chunk``: a seeded permutation of all seeds, cycled."""
    order = torch.randperm(len(seeds), generator=torch.Generator().manual_seed(recipe.seed))
    index = torch.arange(chunk * recipe.batch, (chunk + 1) * recipe.batch) % len(seeds)
    return seeds[order[index]]


def generation_config(tokenizer, recipe: SelfTextRecipe, static_cache: bool):
    from transformers import GenerationConfig

    eos = tokenizer.eos_token_id
    return GenerationConfig(do_sample=True, temperature=recipe.temperature, top_p=recipe.top_p, top_k=0,
                            max_new_tokens=recipe.length, min_new_tokens=recipe.length if eos is None else 0,
                            eos_token_id=eos, pad_token_id=eos if eos is not None else 0,
                            cache_implementation="static" if static_cache else None)


@torch.no_grad()
def generate_chunk(model, tokenizer, seeds: torch.Tensor, recipe: SelfTextRecipe, chunk: int) -> torch.Tensor:
    """``[batch, seed_len + length]`` token ids (padded with EOS after a sample ends)."""
    device = next(model.parameters()).device
    ids = chunk_seeds(seeds, recipe, chunk).to(device)
    static = device.type == "cuda" and _STATIC_CACHE_WORKS.get(id(model), True)
    try:
        torch.manual_seed(recipe.seed * 1_000_003 + chunk)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=generation_config(tokenizer, recipe, static))
    except Exception as exc:  # noqa: BLE001 - a static cache (and its compiled step) is an optimisation only
        if not static:
            raise
        tqdm.write(f"self-text: generation with a static cache failed ({type(exc).__name__}: "
                   f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); using the dynamic cache")
        _STATIC_CACHE_WORKS[id(model)] = False
        torch.manual_seed(recipe.seed * 1_000_003 + chunk)
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids),
                             generation_config=generation_config(tokenizer, recipe, False))
    width = ids.shape[1] + recipe.length
    if out.shape[1] < width:  # every sample ended early
        fill = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        out = torch.nn.functional.pad(out, (0, width - out.shape[1]), value=fill)
    return out.cpu()


def cache_folder(model: torch.nn.Module, recipe: SelfTextRecipe, seeds: torch.Tensor) -> Path:
    """One folder per model, recipe and seed tokens (so a tokenizer that encodes the openings
    differently, or leads them with BOS, never reads another's text)."""
    from layerfold.assets import cache_dir

    return cache_dir() / "self-text" / f"{model_fingerprint(model)}-{recipe.key()}-{tokens_hash(seeds)[:8]}"


def _chunk_path(folder: Path, chunk: int) -> Path:
    return folder / f"chunk-{chunk:06d}.safetensors"


def _save_chunk(folder: Path, chunk: int, ids: torch.Tensor) -> None:
    from safetensors.torch import save_file

    final = _chunk_path(folder, chunk)
    tmp = final.with_name(f".{final.name}.tmp")
    save_file({"ids": ids.contiguous()}, str(tmp))
    tmp.rename(final)  # a chunk is either complete or absent


def _load_chunk(folder: Path, chunk: int) -> torch.Tensor | None:
    from safetensors.torch import load_file

    path = _chunk_path(folder, chunk)
    return load_file(str(path))["ids"] if path.is_file() else None


def evaluation_ngrams(tokenizer, sources: tuple[str, ...] = ("wikitext2", "ptb", "lambada")) -> tuple[torch.Tensor,
                                                                                                        list[str]]:
    """Sorted hashes of every ``NGRAM``-token window of the evaluation texts that can be loaded."""
    from layerfold.data.sources import load_text
    from layerfold.data.tokens import token_stream

    hashes, missing = [], []
    for source in sources:
        try:
            stream = token_stream(tokenizer, load_text(source))
        except (LayerfoldError, OSError, ImportError):
            missing.append(source)
            continue
        if len(stream) >= NGRAM:
            hashes.append(window_hashes(stream[None])[0])
    joined = torch.cat(hashes) if hashes else torch.empty(0, dtype=torch.int64)
    return torch.unique(joined), missing


def window_hashes(ids: torch.Tensor) -> torch.Tensor:
    """``[rows, L - NGRAM + 1]`` polynomial hashes (int64, wrapping) of each row's windows."""
    windows = ids.to(torch.int64).unfold(1, NGRAM, 1)
    h = torch.zeros(windows.shape[:2], dtype=torch.int64)
    for j in range(NGRAM):
        h = h * 1_000_003 + windows[..., j]
    return h


class _Filter:
    """Cuts samples at EOS and drops the short, the repeated and the contaminated ones."""

    def __init__(self, tokenizer, seed_len: int, eval_hashes: torch.Tensor) -> None:
        self.eos, self.seed_len, self.eval_hashes = tokenizer.eos_token_id, seed_len, eval_hashes
        self.seen: set[bytes] = set()
        self.counts = {"samples": 0, "kept": 0, "short": 0, "duplicate": 0, "contaminated": 0}

    def lengths(self, ids: torch.Tensor) -> torch.Tensor:
        if self.eos is None:
            return torch.full((len(ids),), ids.shape[1])
        is_eos = ids[:, self.seed_len:] == self.eos
        first = torch.where(is_eos.any(1), is_eos.int().argmax(1), torch.tensor(ids.shape[1] - self.seed_len))
        return first + self.seed_len

    def contaminated(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        if len(self.eval_hashes) == 0 or ids.shape[1] < NGRAM:
            return torch.zeros(len(ids), dtype=torch.bool)
        hashes = window_hashes(ids)
        valid = torch.arange(hashes.shape[1])[None] + NGRAM <= lengths[:, None]
        return (torch.isin(hashes, self.eval_hashes) & valid).any(1)

    def __call__(self, ids: torch.Tensor) -> list[torch.Tensor]:
        lengths = self.lengths(ids)
        dirty = self.contaminated(ids, lengths)
        kept = []
        for row, n, bad in zip(ids, lengths.tolist(), dirty.tolist(), strict=True):
            self.counts["samples"] += 1
            if n - self.seed_len < MIN_NEW_TOKENS:
                self.counts["short"] += 1
                continue
            key = row[self.seed_len: self.seed_len + DEDUP_PREFIX].numpy().tobytes()
            if key in self.seen:
                self.counts["duplicate"] += 1
                continue
            self.seen.add(key)
            if bad:
                self.counts["contaminated"] += 1
                continue
            self.counts["kept"] += 1
            kept.append(row[:n])
        return kept


def self_text(model: torch.nn.Module, tokenizer, recipe: SelfTextRecipe, tokens: int, *, progress: bool = True,
              use_cache: bool = True, check_contamination: bool = True) -> SelfText:
    """At least ``tokens`` tokens of kept text written by ``model`` (read from the cache where present)."""
    if tokens < 1:
        raise LayerfoldError("the self-written text needs a positive token count")
    seeds = seed_ids(tokenizer, recipe)
    folder = cache_folder(model, recipe, seeds) if use_cache else None
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "recipe.json").write_text(json.dumps(recipe.model_dump(), indent=1) + "\n")
    eval_hashes, missing = evaluation_ngrams(tokenizer) if check_contamination else (torch.empty(0), [])
    keep = _Filter(tokenizer, seeds.shape[1], eval_hashes)
    eos = torch.tensor([tokenizer.eos_token_id]) if tokenizer.eos_token_id is not None else torch.empty(0).long()
    pieces, have, chunk, made, gen_seconds, times = [], 0, 0, 0, 0.0, []
    was_training = model.training
    model.eval()
    bar = tqdm(total=tokens, desc="self-text", unit="tok", unit_scale=True, disable=not progress)
    while have < tokens:
        ids = _load_chunk(folder, chunk) if folder is not None else None
        if ids is None:
            start = time.perf_counter()
            ids = generate_chunk(model, tokenizer, seeds, recipe, chunk)
            times.append(time.perf_counter() - start)
            gen_seconds += times[-1]
            made += 1
            if folder is not None:
                _save_chunk(folder, chunk, ids)
        for sample in keep(ids):
            pieces += [sample, eos]
            have += len(sample) + len(eos)
        bar.update(min(have, tokens) - bar.n)
        if made:
            bar.set_postfix(gen_tok_s=f"{made * recipe.batch * recipe.length / max(gen_seconds, 1e-9):,.0f}")
        chunk += 1
        if chunk >= 8 and keep.counts["kept"] == 0:
            raise LayerfoldError("the model's samples were all dropped (too short, repeated or copied from an "
                                 "evaluation text): try --gen-temperature 1.0 and --gen-top-p 0.95")
    bar.close()
    model.train(was_training)
    generated = made * recipe.batch * recipe.length  # new tokens only, not the seeds
    record = {"recipe": recipe.model_dump(), "cache": str(folder) if folder is not None else None,
              "chunks": chunk, "chunks_generated_now": made, "tokens_kept": have,
              "tokens_generated_now": generated, "generation_seconds": round(gen_seconds, 2),
              "generation_tokens_per_second": round(generated / gen_seconds) if gen_seconds else None,
              # without the first batch, which pays for compiling the decoding step on CUDA
              "steady_tokens_per_second": round((made - 1) * recipe.batch * recipe.length / sum(times[1:]))
              if made > 1 else None,
              "filter": {**keep.counts, "ngram": NGRAM, "dedup_prefix": DEDUP_PREFIX,
                         "evaluation_texts_unchecked": missing if check_contamination else "all"}}
    return SelfText(stream=torch.cat(pieces)[:tokens] if pieces else torch.empty(0).long(), record=record)
