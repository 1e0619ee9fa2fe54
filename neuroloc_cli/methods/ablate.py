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
from neuroloc_cli.ops.sums import fixed_sum
from neuroloc_cli.recipe.params import Param

PAPER = "Zhang et al. 2024, Unveiling Linguistic Regions in Large Language Models (damage studies)"
MODES = ("zero", "mean", "noise")


def _mean_std(t: torch.Tensor) -> tuple[float, float]:
    n = t.numel()
    if n == 0:
        return 0.0, 0.0
    mean = fixed_sum(t) / n
    return mean, math.sqrt(fixed_sum((t.double() - mean).square()) / n)


@merge_method("ablate_zero", needs_base=True, min_models=0, max_models=0, elementwise=True, paper=PAPER)
def ablate_zero(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Zero a region (the recipe's `mask:`); everything else keeps the base."""
    return torch.zeros_like(base)


@merge_method("ablate_mean", needs_base=True, min_models=0, max_models=0, paper=PAPER)
def ablate_mean(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Set a region (the recipe's `mask:`) to its tensor's mean; everything else keeps the base."""
    return torch.full_like(base, _mean_std(base)[0])


@merge_method(
    "ablate_noise",
    needs_base=True,
    min_models=0,
    max_models=0,
    random=True,
    params=(Param("scale", default=1.0, low=0.0, help="noise standard deviation, in units of the tensor's"),),
    paper=PAPER,
)
def ablate_noise(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, scale: float, generator: torch.Generator) -> torch.Tensor:
    """Add seeded Gaussian noise of `scale` × the tensor's std to a region (the recipe's `mask:`)."""
    noise = torch.randn(base.shape, generator=generator, dtype=torch.float32)
    return base + noise.mul_(scale * _mean_std(base)[1]).to(base.dtype)
