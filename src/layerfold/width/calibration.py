"""Calibration tokens for width pruning, and held-out windows of the same source (never an
evaluation set) that pick between attention shares and depth/width splits."""

from __future__ import annotations

from dataclasses import replace

import torch

from layerfold.data.tokens import CalibrationConfig, sample_windows
from layerfold.errors import LayerfoldError


def calibration_tokens(tokenizer, calibration, tokens: torch.Tensor | None) -> torch.Tensor:
    if tokens is not None:
        return tokens
    if tokenizer is None:
        raise LayerfoldError("width pruning needs calibration tokens: pass tokens= or a model with a tokenizer")
    return sample_windows(tokenizer, calibration or CalibrationConfig())


def held_out_windows(tokenizer, calibration, held_out: int) -> torch.Tensor:
    """Windows of the calibration source that are not calibration windows.

    Drawing ``samples + held_out`` windows with the same seed yields a superset of the
    calibration windows (the same permutation, or the same strides, extended); the extra
    ones are held out.
    """
    cal = sample_windows(tokenizer, calibration)
    both = sample_windows(tokenizer, replace(calibration, samples=calibration.samples + held_out))
    seen = {tuple(row.tolist()) for row in cal}
    rows = [row for row in both if tuple(row.tolist()) not in seen]
    if not rows:
        raise LayerfoldError("no held-out calibration windows could be drawn; use more text or fewer samples")
    return torch.stack(rows)
