"""Weighted sums of tensors and of deltas, in place where it saves memory."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def weighted_sum(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """`Σ w_i · t_i` as a new tensor."""
    out = torch.mul(tensors[0], weights[0])
    for t, w in zip(tensors[1:], weights[1:]):
        out.add_(t, alpha=w)
    return out


def weighted_delta_sum(base: torch.Tensor, tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """`Σ w_i · (t_i − base)` as a new tensor.

    Each difference is taken before weighting: for bf16 or fp16 inputs held in fp32 the
    difference is exact, so small fine-tuning deltas keep all their bits instead of
    cancelling out of `Σ w_i·t_i − (Σ w_i)·base`.
    """
    out = torch.zeros_like(base)
    scratch = torch.empty_like(base)
    for t, w in zip(tensors, weights):
        torch.sub(t, base, out=scratch)
        out.add_(scratch, alpha=w)
    return out
