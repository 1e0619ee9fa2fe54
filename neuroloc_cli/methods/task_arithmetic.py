"""Task arithmetic: add weighted task vectors to a base model."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.methods.linear import normalizable
from neuroloc_cli.ops.combine import weighted_delta_sum
from neuroloc_cli.recipe.params import Param


@merge_method(
    "task_arithmetic",
    needs_base=True,
    elementwise=True,
    params=(
        Param("weight", per_model=True, help="weight of each model's task vector"),
        Param("lambda", default=1.0, help="scale of the summed task vectors"),
        Param("normalize", default=False, boolean=True, help="divide the sum by the sum of the weights"),
    ),
    paper="Ilharco et al. 2023, Editing models with task arithmetic (arXiv:2212.04089)",
    check_values=normalizable,
)
def task_arithmetic(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weight: Sequence[float], lambda_: float, normalize: bool
) -> torch.Tensor:
    """Base plus weighted task vectors: `θ_0 + λ · Σ w_i·(θ_i − θ_0)` (÷ Σ w_i if normalize)."""
    out = weighted_delta_sum(base, tensors, weight)
    if normalize:
        total = sum(weight)
        if total == 0:
            raise ValueError("task_arithmetic: the weights sum to zero; cannot normalize (set normalize: false)")
        out.div_(total)
    return out.mul_(lambda_).add_(base)
