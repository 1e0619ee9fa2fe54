"""Mixing sparsified task vectors: TIES sign election and the weighted (normalized) sum.

This is the common second half of every "generalized task arithmetic" method (ties,
dare_*, breadcrumbs*, della*), following mergekit's definitions:

    wd_i  = w_i · δ_i                          (δ_i already sparsified and rescaled)
    sign  = +1 where Σ_i wd_i >= 0, else −1    (election by summed mass; ties go to +)
    a_i   = [sign(wd_i) == sign]               (zeros never agree)
    mixed = Σ_i a_i · wd_i,   divisor = Σ_i a_i · w_i   (0 → 1)
    without consensus: mixed = Σ_i wd_i, divisor = Σ_i w_i (|·| < 1e-8 → 1)
    out   = base + λ · (mixed / divisor if normalize else mixed)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def mix_task_vectors(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    lambda_: float,
) -> torch.Tensor:
    """Combine task vectors into a merged tensor (see the module docstring for the formula).

    Args:
        base: the base tensor (compute dtype).
        deltas: one sparsified task vector per model; they are scaled in place.
        weights: one weight per model.
        consensus: elect a sign per element by summed mass and keep only agreeing values.
        normalize: divide by the (agreeing) weights' sum.
        lambda_: scale of the mixed task vector.

    Returns:
        A new tensor, `base + λ · mixed`.
    """
    for d, w in zip(deltas, weights):
        d.mul_(w)
    if consensus:
        mixed, divisor = _elect(base, deltas, weights, normalize)
    else:
        mixed = _sum(deltas)
        total = float(sum(weights))
        divisor = 1.0 if abs(total) < 1e-8 else total
    if normalize:
        mixed.div_(divisor)
    if lambda_ != 1:
        mixed.mul_(lambda_)
    return mixed.add_(base)


def _sum(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    out = tensors[0].clone()
    for t in tensors[1:]:
        out.add_(t)
    return out


def _elect(
    base: torch.Tensor, weighted: Sequence[torch.Tensor], weights: Sequence[float], need_divisor: bool
) -> tuple[torch.Tensor, torch.Tensor | float]:
    """Sign election by summed mass; returns (Σ agreeing values, Σ agreeing weights with 0 → 1,
    or 1 when no divisor is needed)."""
    positive = _sum(weighted) >= 0  # the elected sign (True = +)
    mixed = torch.zeros_like(base)
    divisor = torch.zeros_like(base) if need_divisor else None
    for wd, w in zip(weighted, weights):
        agree = torch.where(positive, wd > 0, wd < 0)
        mixed.add_(wd.mul_(agree))
        if divisor is not None:
            divisor.add_(agree, alpha=w)
    if divisor is None:
        return mixed, 1.0
    divisor.masked_fill_(divisor == 0, 1.0)
    return mixed, divisor
