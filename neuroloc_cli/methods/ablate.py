"""Ablation: remove or perturb a region of a model (the damage studies of Zhang et al. 2024,
*Unveiling Linguistic Regions in Large Language Models*).

A region is a mask, given as the recipe's `mask:` (or `neuroloc ablate MODEL MASK`). These
methods compute the ablated tensor everywhere; the engine keeps the base, bit for bit,
outside the mask (`merge.masks`), so only the region changes:

- `ablate_zero`: the region's values become 0 (the paper's removal);
- `ablate_mean`: they become the tensor's mean, so the tensor keeps its average;
- `ablate_noise`: Gaussian noise of `scale` × the tensor's standard deviation is added,
  seeded per tensor (`--seed`), so a perturbation study can be repeated exactly.

The mean and the standard deviation are those of the whole tensor, summed in a fixed order
(`ops.sums`) so that they do not depend on the thread count.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.ops.sums import fixed_dot, fixed_sum
from neuroloc_cli.recipe.params import Param

PAPER = "Zhang et al. 2024, Unveiling Linguistic Regions in Large Language Models (damage studies)"
MODES = ("zero", "mean", "noise")


def _mean(t: torch.Tensor) -> float:
    return fixed_sum(t) / t.numel() if t.numel() else 0.0


def _std(t: torch.Tensor) -> float:
    centered = t - _mean(t)  # one copy in the compute dtype; the sum is float64 by blocks
    return math.sqrt(fixed_dot(centered, centered) / t.numel()) if t.numel() else 0.0


def _needs_mask(recipe) -> list[str]:
    """Without a region an ablation would rewrite every tensor of the model."""
    return [] if recipe.mask else [f"mask: {recipe.merge_method} ablates a region: give it as 'mask: FILE' (a mask from neuroloc locate)"]


@merge_method("ablate_zero", needs_base=True, min_models=0, max_models=0, elementwise=True, check=_needs_mask, paper=PAPER)
def ablate_zero(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Zero a region (the recipe's `mask:`); everything else keeps the base."""
    return torch.zeros_like(base)


@merge_method("ablate_mean", needs_base=True, min_models=0, max_models=0, check=_needs_mask, paper=PAPER)
def ablate_mean(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Set a region (the recipe's `mask:`) to its tensor's mean; everything else keeps the base."""
    return torch.full_like(base, _mean(base))


@merge_method(
    "ablate_noise",
    needs_base=True,
    min_models=0,
    max_models=0,
    random=True,
    check=_needs_mask,
    params=(Param("scale", default=1.0, low=0.0, help="noise standard deviation, in units of the tensor's"),),
    paper=PAPER,
)
def ablate_noise(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Add seeded Gaussian noise of `scale` × the tensor's std to a region (the recipe's `mask:`)."""
    noise = torch.randn(base.shape, generator=generator, dtype=torch.float32)
    return base + noise.mul_(scale * _std(base)).to(base.dtype)
