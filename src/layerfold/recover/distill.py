"""Losses for healing: next-token cross-entropy, and distillation from the original model.

Distillation loss = ``kl_weight * T^2 * KL(teacher_T || student_T)`` (forward KL between the
next-token distributions softened by temperature ``T``, summed over the vocabulary and
averaged over token positions; the ``T^2`` keeps gradient size comparable across
temperatures, as in Hinton et al.) ``+ ce_weight * CE`` on the text ``+ hidden_weight *``
relative squared error between the final hidden states (the output of the final norm, the
input of the LM head), ``||s - t||^2 / ||t||^2``, which is scale-free so the weight reads the
same on every model.  Losses are computed in float32 on the positions that predict a next
token in the block.

The two logit losses never hold a float32 copy of the whole logits tensor (batch x positions x
vocabulary; 4 GiB for 16 blocks of 256 tokens at Gemma's 262k vocabulary): they run over slices of
positions and write the gradient with respect to the logits in the same pass, so backward only
scales it (``_SlicedLogitLoss``).
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


SLICE_ELEMENTS = 2**24  # logits a slice holds (64 MiB in float32)


class _SlicedLogitLoss(torch.autograd.Function):
    """Mean over the next-token positions (all but each block's last) of a per-position loss, in float32,
    one slice of positions at a time.  ``part(lo, hi, s)`` gets the float32 logits ``s`` of flattened
    positions ``lo:hi`` and returns (each position's loss, d loss / d s); the gradient is stored in the
    logits' dtype, as autograd would hand it to them, and backward only scales it."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, part) -> torch.Tensor:
        batch, length, vocab = logits.shape
        if length < 2:
            raise ValueError("a block needs at least two tokens to predict one")
        rows = logits.reshape(-1, vocab)
        keep = (torch.arange(rows.shape[0], device=logits.device) % length != length - 1).float()
        keep /= batch * (length - 1)
        want_grad = ctx.needs_input_grad[0]
        grad = torch.empty_like(rows) if want_grad else None  # every row is written below
        total = torch.zeros((), dtype=torch.float32, device=logits.device)
        step = max(1, SLICE_ELEMENTS // vocab)
        for lo in range(0, rows.shape[0], step):
            hi = min(lo + step, rows.shape[0])
            loss, g = part(lo, hi, rows[lo:hi].float())
            total += (loss * keep[lo:hi]).sum()
            if want_grad:
                grad[lo:hi] = g * keep[lo:hi, None]
        ctx.save_for_backward(grad)
        ctx.logits_shape = logits.shape
        return total

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor):
        (grad,) = ctx.saved_tensors
        return (grad * grad_output).view(ctx.logits_shape), None


def next_token_ce(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of each next token, mean over positions."""
    targets = input_ids.roll(-1, dims=1).reshape(-1)  # each block's last target wraps around: weighed 0

    def part(lo, hi, s):
        log_p = F.log_softmax(s, dim=-1)
        t = targets[lo:hi]
        grad = log_p.exp()
        grad[torch.arange(hi - lo, device=s.device), t] -= 1
        return -log_p.gather(-1, t[:, None]).squeeze(-1), grad

    return _SlicedLogitLoss.apply(logits, part)


def logits_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """``T^2 * KL(softmax(teacher/T) || softmax(student/T))`` at the next-token positions (all but each
    block's last), mean over positions."""
    T = temperature  # noqa: N806 (the usual name)
    teacher_rows = teacher.reshape(-1, teacher.shape[-1])

    def part(lo, hi, s):
        log_s = F.log_softmax(s / T, dim=-1)
        log_t = F.log_softmax(teacher_rows[lo:hi].float() / T, dim=-1)
        p_t = log_t.exp()
        return T**2 * (p_t * (log_t - log_s)).sum(-1), T * (log_s.exp() - p_t)  # d(T^2 KL)/ds = T(p_s - p_t)

    return _SlicedLogitLoss.apply(student, part)


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
        parts["kl"] = logits_kl(student_out.logits, teacher_out.logits, weights.temperature)
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
