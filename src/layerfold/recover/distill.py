"""Losses for healing: next-token cross-entropy, and distillation from the original model.

Distillation loss = ``kl_weight * T^2 * KL(teacher_T || student_T)`` (forward KL between the
next-token distributions softened by temperature ``T``, summed over the vocabulary and
averaged over token positions; the ``T^2`` keeps gradient size comparable across
temperatures, as in Hinton et al.) ``+ ce_weight * CE`` on the text ``+ hidden_weight *``
relative squared error between the final hidden states (the output of the final norm, the
input of the LM head), ``||s - t||^2 / ||t||^2``, which is scale-free so the weight reads the
same on every model.  Losses are computed in float32 on the positions that predict a next
token in the block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class LossWeights:
    distill: bool = False
    temperature: float = 1.0
    kl: float = 1.0
    ce: float = 0.0
    hidden: float = 0.0

    @property
    def needs_hidden(self) -> bool:
        return self.distill and self.hidden > 0


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), input_ids[:, 1:].flatten())


def logits_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))``, mean over positions."""
    s = F.log_softmax(student.float().flatten(0, -2) / temperature, dim=-1)
    t = F.log_softmax(teacher.float().flatten(0, -2) / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


def hidden_mismatch(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Relative squared error of the final hidden states, ``||s - t||^2 / ||t||^2``."""
    s, t = student.float(), teacher.float()
    return (s - t).pow(2).sum() / t.pow(2).sum().clamp_min(1e-12)


def heal_loss(student_out, input_ids: torch.Tensor, weights: LossWeights,
              teacher_out=None) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss to minimise, its parts as floats for the log)."""
    if not weights.distill:
        ce = next_token_ce(student_out.logits, input_ids)
        return ce, {"ce": float(ce.detach())}
    if teacher_out is None:
        raise ValueError("distillation needs the teacher's outputs")
    parts: dict[str, torch.Tensor] = {}
    if weights.kl > 0:
        parts["kl"] = logits_kl(student_out.logits[:, :-1], teacher_out.logits[:, :-1], weights.temperature)
    if weights.ce > 0:
        parts["ce"] = next_token_ce(student_out.logits, input_ids)
    if weights.hidden > 0:
        parts["hidden"] = hidden_mismatch(student_out.hidden_states[-1], teacher_out.hidden_states[-1])
    scale = {"kl": weights.kl, "ce": weights.ce, "hidden": weights.hidden}
    total = sum(scale[k] * v for k, v in parts.items())
    return total, {k: float(v.detach()) for k, v in parts.items()}


@torch.no_grad()
def teacher_outputs(teacher: torch.nn.Module, input_ids: torch.Tensor, weights: LossWeights):
    return teacher(input_ids=input_ids, use_cache=False, output_hidden_states=weights.needs_hidden)
