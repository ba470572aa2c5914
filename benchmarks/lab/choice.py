"""A continuation-choice probe: does a pruned model still pick a passage's true continuation?

Zero-shot multiple-choice tasks score each answer by its summed log-likelihood after the
question and take the highest; token measures (perplexity, KL to the original) do not order
pruned models as those tasks do at small scale (docs/measured-options.md).  This probe
has the tasks' shape but needs no task data: each item is a ``context`` of a text, its true
``continuation`` (choice 0) and the spans at the same place ``offsets`` tokens further on (the
distractors, the same kind of text); a model wins an item when the true continuation scores
highest.  Method ``slm-lab`` with ``pick=choice`` compares its candidate plans by it on the
calibration source, never on evaluation text; ``benchmarks/studies/mc_predictors`` scores it on
PTB-valid.

The models are run as the planners run them: the items' hidden states are captured once at
the first layer any plan removes, then each plan's kept layers run from there with each
layer's own call arguments (:class:`layerfold.calibrate.LayerCache`).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from layerfold.errors import LayerfoldError

CONTEXT, CONTINUATION, OFFSETS = 96, 32, (256, 512, 768)


@dataclass(frozen=True)
class ChoiceScore:
    accuracy: float  # share of items whose true continuation scores highest
    nll: float  # mean -log of the true continuation's share of the softmax over the choices' scores

    def key(self) -> tuple[float, float]:
        """Higher is better: accuracy first, then the graded score."""
        return self.accuracy, -self.nll


def items_fit(stream_length: int, context: int = CONTEXT, continuation: int = CONTINUATION,
              offsets: tuple[int, ...] = OFFSETS) -> int:
    """How many items a stream of ``stream_length`` tokens holds."""
    step = context + continuation
    return max(0, (stream_length - max(offsets) - step) // step + 1)


def choice_items(stream: torch.Tensor, count: int, bos_id: int | None = None, context: int = CONTEXT,
                 continuation: int = CONTINUATION, offsets: tuple[int, ...] = OFFSETS) -> torch.Tensor:
    """``[count, 1 + len(offsets), length]`` token ids: per item a context followed by its true
    continuation (choice 0) and by the continuations found ``offsets`` tokens further on; items
    start every ``context + continuation`` tokens, BOS first when ``bos_id`` is given."""
    if count < 1:
        raise LayerfoldError("the continuation-choice probe needs at least 1 item")
    if items_fit(len(stream), context, continuation, offsets) < count:
        raise LayerfoldError(f"{len(stream)} tokens hold {items_fit(len(stream), context, continuation, offsets)} "
                             f"continuation-choice items, fewer than the {count} asked for")
    step = context + continuation
    items = []
    for k in range(count):
        start = k * step
        ctx = stream[start:start + context]
        choices = [stream[start + context + off:start + context + off + continuation] for off in (0, *offsets)]
        items.append(torch.stack([torch.cat([ctx, c]) for c in choices]))
    ids = torch.stack(items)
    if bos_id is not None:
        ids = torch.cat([torch.full((*ids.shape[:2], 1), bos_id, dtype=ids.dtype), ids], dim=-1)
    return ids


def continuation_logprob(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed log-likelihood (on the CPU) of each row's ``targets`` ([B, C]) under the ``logits``
    ([B, C, V]) that predict them."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return logp.gather(-1, targets.to(logp.device).unsqueeze(-1)).squeeze(-1).sum(-1).cpu()


def score_from_logprobs(scores: torch.Tensor) -> ChoiceScore:
    """``scores``: ``[items, choices]`` summed log-likelihoods, choice 0 the true one."""
    scores = scores.double()
    return ChoiceScore(accuracy=(scores.argmax(-1) == 0).double().mean().item(),
                       nll=-torch.log_softmax(scores, dim=-1)[:, 0].mean().item())


@torch.no_grad()
def model_choice_score(model, items: torch.Tensor, continuation: int = CONTINUATION,
                       batch_size: int = 8) -> ChoiceScore:
    """The probe for a whole causal LM (any ``model(ids).logits``)."""
    flat = items.flatten(0, 1)
    device = next(model.parameters(), torch.empty(0)).device
    sums = []
    for start in range(0, len(flat), batch_size):
        ids = flat[start:start + batch_size].to(device)
        sums.append(continuation_logprob(model(ids).logits[:, -continuation - 1:-1], ids[:, -continuation:]))
    return score_from_logprobs(torch.cat(sums).view(items.shape[:2]))


@torch.no_grad()
def plan_choice_scores(loaded, plans: Mapping[str, Collection[int]], items: torch.Tensor,
                       continuation: int = CONTINUATION, batch_size: int = 8, streamer=None,
                       progress: bool = True) -> dict[str, ChoiceScore]:
    """The probe for the model without the layers of each plan (name -> removed layer indices),
    run from one capture of the items at the first layer any plan removes."""
    from layerfold.calibrate import capture
    from layerfold.methods._common import _logits

    arch = loaded.arch
    layers = arch.layer_list(loaded.model)
    n_layers = len(layers)
    start = min((min(r) for r in plans.values() if r), default=n_layers)
    flat = items.flatten(0, 1)
    cache = capture(loaded.model, arch, flat, batch_size=batch_size, progress=progress, streamer=streamer,
                    keep={start})
    norm = arch.final_norm_module(loaded.model)
    targets = list(torch.split(flat[:, -continuation:], batch_size))
    scores = {}
    for name, removed in tqdm(list(plans.items()), desc="continuation choice", disable=not progress, leave=False):
        kept = [(layers[i], i) for i in range(start, n_layers) if i not in removed]
        outs = cache.run(start, kept)
        sums = []
        for hidden, target in zip(outs, targets, strict=True):
            states = norm(hidden[:, -continuation - 1:-1].to(cache.device))
            logits = _logits(cache, states.reshape(-1, states.shape[-1])).view(*states.shape[:2], -1)
            sums.append(continuation_logprob(logits, target))
        scores[name] = score_from_logprobs(torch.cat(sums).view(items.shape[:2]))
    return scores
