"""Helpers shared by the depth-pruning baselines: calibration loss from cached layer
inputs, layer-by-layer reruns, and plans made of dropped layers."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from layerfold.calibrate import LayerCache
from layerfold.errors import LayerfoldError
from layerfold.plan import Operation

Hidden = list[torch.Tensor]  # one tensor per calibration batch, as in LayerCache.inputs

_LOGIT_ROWS = 2048  # tokens per lm-head chunk: bounds the logits' memory on large vocabularies


def batch_targets(cache: LayerCache) -> list[torch.Tensor]:
    """The calibration token ids split as the cached batches are."""
    sizes = [h.shape[0] for h in cache.inputs[0]]
    return list(torch.split(cache.tokens, sizes))


def output_head(cache: LayerCache) -> nn.Module:
    head = cache.model.get_output_embeddings()
    if head is None:
        raise LayerfoldError(f"{type(cache.model).__name__} has no output embeddings (lm head): "
                             "a loss-based method cannot score it")
    return head


def nll_sum(cache: LayerCache, hidden: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token negative log-likelihood of ``targets`` ([B, T]) given the last layer's
    output ``hidden`` ([B, T, H], before the final norm), and the number of tokens scored.

    The model's own final norm and lm head are applied (and its final logit soft-capping, where
    the config has one), so the figure is the model's calibration loss."""
    norm = cache.arch.final_norm_module(cache.model)
    states = norm(hidden)[:, :-1].reshape(-1, hidden.shape[-1])
    labels = targets[:, 1:].reshape(-1).to(states.device)
    total = states.new_zeros((), dtype=torch.float32)
    for start in range(0, states.shape[0], _LOGIT_ROWS):
        logits = _logits(cache, states[start:start + _LOGIT_ROWS])
        chunk = labels[start:start + _LOGIT_ROWS].to(logits.device)  # the head may sit on another GPU
        total = total + nn.functional.cross_entropy(logits, chunk, reduction="sum").to(total.device)
    return total, labels.numel()


def _logits(cache: LayerCache, states: torch.Tensor) -> torch.Tensor:
    """Float logits from final-normed states ([N, H]): the model's own lm head and final logit
    soft-capping, where the config has one."""
    logits = output_head(cache)(states).float()
    softcap = getattr(cache.model.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


@torch.no_grad()
def output_kl(cache: LayerCache, outputs: Hidden) -> float:
    """Mean KL(original || pruned) of the next-token distributions over every calibration token,
    from the pruned model's last-layer per-batch ``outputs`` (before the final norm); the
    original's are the cache's last outputs.  Logits are made ``_LOGIT_ROWS`` tokens at a time
    for both models, so memory stays bounded on large vocabularies."""
    return output_kls(cache, [outputs])[0]


@torch.no_grad()
def output_kls(cache: LayerCache, variants: list[Hidden]) -> list[float]:
    """:func:`output_kl` of several pruned models' ``variants`` at once: the original's
    distributions are made once for all of them."""
    norm = cache.arch.final_norm_module(cache.model)
    totals, count = [0.0] * len(variants), 0
    for ref, *outs in zip(cache.inputs[cache.num_layers], *variants, strict=True):
        width = ref.shape[-1]
        ref_states = norm(ref.to(cache.device)).reshape(-1, width)
        out_states = [norm(out.to(cache.device)).reshape(-1, width) for out in outs]
        for start in range(0, ref_states.shape[0], _LOGIT_ROWS):
            p = torch.log_softmax(_logits(cache, ref_states[start:start + _LOGIT_ROWS]), dim=-1)
            weights = p.exp()
            for i, states in enumerate(out_states):
                q = torch.log_softmax(_logits(cache, states[start:start + _LOGIT_ROWS]), dim=-1).to(p.device)
                totals[i] += float((weights * (p - q)).sum())
        count += ref_states.shape[0]
    return [total / count for total in totals]


@torch.no_grad()
def calibration_loss(cache: LayerCache, outputs: Hidden) -> float:
    """Mean next-token NLL on the calibration tokens, from the last layer's per-batch outputs."""
    total, count = 0.0, 0
    for h, targets in zip(outputs, batch_targets(cache), strict=True):
        s, n = nll_sum(cache, h.to(cache.device), targets)
        total += float(s)
        count += n
    return total / count


def original_modules(cache: LayerCache, indices: Sequence[int]) -> list[tuple[nn.Module, int]]:
    layers = cache.layers
    return [(layers[i], i) for i in indices]


def loss_without(cache: LayerCache, hidden: Hidden, above: Sequence[int]) -> float:
    """Calibration loss when ``hidden`` enters the original layers ``above`` (and nothing else)."""
    outs = cache.run(0, original_modules(cache, above), hidden=hidden) if above else hidden
    return calibration_loss(cache, outs)


def rerun_inputs(cache: LayerCache, kept: Sequence[int], start: int, first: Hidden) -> list[Hidden]:
    """Inputs of every kept layer from position ``start`` up (and the last output), given the
    input ``first`` of position ``start``; stored like the cache's."""
    hidden = [first]
    for i in kept[start:]:
        outs = cache.run(0, [(cache.layers[i], i)], hidden=hidden[-1])
        hidden.append([o.to(cache.store_device) for o in outs])
    return hidden


def lowest(scores: dict[int, float], n: int, candidates: Sequence[int] | None = None) -> list[int]:
    """The ``n`` keys with the smallest scores (ties to the lower index), sorted."""
    pool = list(scores) if candidates is None else list(candidates)
    if n > len(pool):
        raise LayerfoldError(f"only {len(pool)} layers can be removed here, {n} asked for")
    return sorted(sorted(pool, key=lambda i: (scores[i], i))[:n])


def drop_ops(layers: Sequence[int], scores: dict[int, float] | None = None,
             detail: dict[int, dict] | None = None) -> list[Operation]:
    scores = scores or {}
    detail = detail or {}
    return [Operation("drop", i, i, score=scores.get(i), detail=detail.get(i, {})) for i in sorted(layers)]


def check_candidates(name: str, num_layers: int, keep_first: int, keep_last: int, remove: int) -> list[int]:
    """Layers a method may remove when the first ``keep_first`` and last ``keep_last`` stay."""
    if keep_first < 0 or keep_last < 0:
        raise LayerfoldError(f"{name}: keep_first and keep_last must be 0 or more")
    candidates = list(range(keep_first, num_layers - keep_last))
    if remove > len(candidates):
        raise LayerfoldError(f"{name}: {remove} layers to remove, but only {len(candidates)} of {num_layers} may go "
                             f"when the first {keep_first} and last {keep_last} are kept; lower keep_first/keep_last "
                             "or ask for fewer")
    return candidates
