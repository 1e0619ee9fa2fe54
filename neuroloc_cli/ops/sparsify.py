"""The rules of the sparsifiers that are not loops: how many elements a density keeps,
breadcrumbs' outlier counts, DELLA's keep probabilities and mergekit's L1 rescale factor.
The masks themselves are applied by `neuroloc_cli.ops.blockwise`.

Counts follow mergekit: a density `d` keeps `floor(d · n)` of a tensor's `n` elements, so a
density below `1 / n` keeps nothing (mergekit stops with an assertion there; we keep nothing).
"""

from __future__ import annotations

import math

import torch

from neuroloc_cli.ops.blockwise import magnitude_ranks

RESCALE_EPS = 1e-7  # below this L1 norm a delta counts as zero and is not rescaled (mergekit's)


def keep_count(density: float, numel: int) -> int:
    """How many of `numel` elements a density keeps: `floor(density · numel)`, clipped to [0, numel].

    The product is truncated as mergekit's `int(density · n)` is, binary rounding included
    (0.41 · 300 gives 122), so that a mergekit recipe keeps the same elements; MAET's shares,
    which follow a paper rather than mergekit, round that slip away (`methods.maet`)."""
    return max(0, min(numel, int(density * numel)))


def outlier_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """Breadcrumbs' (largest dropped, smallest dropped) counts of `n` elements; when
    density + gamma > 1 fewer outliers are dropped so that `floor(density · n)` remain."""
    n_top = keep_count(gamma, n)
    n_bottom = n - keep_count(density, n) - n_top
    if n_bottom < 0:
        n_top, n_bottom = n_top + n_bottom, 0
    return n_top, n_bottom


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune keep probabilities: within each row (a 1-D tensor is one row), the
    element of rank r (ascending magnitude, 0-based, of m; equal magnitudes by position) is
    kept with probability `density − ε + 2ε · r / (m − 1)`; a row of one element gets
    `density`.

    Raises:
        ValueError: density ± epsilon leaves (0, 1) (mergekit's rule).
    """
    if not (0 < density - epsilon and density + epsilon < 1):
        raise ValueError(f"della: density ± epsilon must lie in (0, 1), got density {density:g}, epsilon {epsilon:g}")
    m = delta.numel() if delta.dim() < 2 else math.prod(delta.shape[1:])  # row length
    if m <= 1 or delta.numel() == 0:  # one element a row, or none at all
        return torch.full(delta.shape, density)
    rank = magnitude_ranks(delta.float().reshape(-1, m))
    probs = (density - epsilon) + rank.div_(m - 1).mul_(2 * epsilon)
    return probs.reshape(delta.shape)


def l1_rescale_factor(before: float, after: float) -> float:
    """`before / after`: the factor that gives the kept part of a delta (L1 norm `after`) the
    L1 norm `before` of the whole delta (mergekit's `rescale`).

    Returns 1 when either norm is below `RESCALE_EPS` (an all-zero delta stays zero).
    """
    if before < RESCALE_EPS or after < RESCALE_EPS:
        return 1.0
    return before / after
