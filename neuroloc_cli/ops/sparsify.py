"""Sparsifiers for task vectors: which elements of a delta survive, and how they are rescaled.

These are the whole-tensor forms (one boolean keep-mask, or keep probabilities, per tensor,
computed in fp32 whatever the input dtype); the merge methods run the same rules block by
block through `neuroloc_cli.ops.blockwise`, and the tests hold the two to each other. Magnitude selection uses a k-th value selection
(`torch.kthvalue`, linear time) rather than a full sort, and breaks ties at the threshold by
position, so exactly `k` elements are kept even in bf16 deltas where equal magnitudes are
common.

Counts follow mergekit: a density `d` keeps `floor(d · n)` of a tensor's `n` elements, so a
density below `1 / n` keeps nothing (mergekit stops with an assertion there; we keep nothing).
"""

from __future__ import annotations

import math

import torch

from neuroloc_cli.ops.blockwise import magnitude_ranks

RESCALE_EPS = 1e-7  # below this L1 norm a delta counts as zero and is not rescaled (mergekit's)


def keep_count(density: float, numel: int) -> int:
    """How many of `numel` elements a density keeps: `floor(density · numel)`, clipped to [0, numel]."""
    return max(0, min(numel, int(density * numel)))


def top_k_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` largest entries of `magnitude` (any shape) as a boolean mask.

    Ties at the threshold are broken by position (earlier elements first), so the mask holds
    exactly `k` True values.
    """
    flat = magnitude.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n - k + 1).values
    mask = flat > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        # Only equal magnitudes remain to fill the count; take the first ones.
        ties = torch.nonzero(flat == threshold).squeeze(1)[:missing]
        mask[ties] = True
    return mask.reshape(magnitude.shape)


def magnitude_mask(delta: torch.Tensor, density: float) -> torch.Tensor:
    """TIES trimming: keep the `floor(density · n)` largest-magnitude elements.

    Args:
        delta: a task vector (any shape, any float dtype).
        density: share of elements to keep; >= 1 keeps all, 0 keeps none.

    Returns:
        A boolean mask of `delta`'s shape.
    """
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    return top_k_mask(delta.float().abs(), keep_count(density, delta.numel()))


def magnitude_outliers_mask(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Model Breadcrumbs: drop the `gamma` share of largest magnitudes (outliers) and then the
    smallest, so that `floor(density · n)` elements remain.

    As in mergekit, when density + gamma > 1 fewer outliers are dropped to reach the density.
    gamma = 0 drops no outlier (plain magnitude trimming; mergekit 0.1.x keeps nothing there,
    an indexing slip we do not copy).

    Returns:
        A boolean mask of `delta`'s shape.
    """
    if density >= 1:
        return torch.ones_like(delta, dtype=torch.bool)
    n = delta.numel()
    n_top, n_bottom = outlier_counts(n, density, gamma)
    magnitude = delta.float().abs()
    # Ties are broken the same way in both masks, so the outliers are a subset of the top n-n_bottom.
    return top_k_mask(magnitude, n - n_bottom) & ~top_k_mask(magnitude, n_top)


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
