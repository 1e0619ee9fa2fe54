"""Linear averaging of weights."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.ops.combine import weighted_sum
from neuroloc_cli.recipe.params import Param


@merge_method(
    "linear",
    needs_base=False,
    elementwise=True,
    params=(
        Param("weight", per_model=True, help="weight of each model"),
        Param("normalize", default=True, boolean=True, help="divide by the sum of the weights"),
    ),
    paper="Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
)
def linear(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], *, weight: Sequence[float], normalize: bool) -> torch.Tensor:
    """Weighted average of the models' weights: `Σ w_i·θ_i / Σ w_i` (no division if not normalize).

    As in mergekit, `base_model` takes no part unless it is also listed in `models`.
    """
    out = weighted_sum(tensors, weight)
    if normalize:
        total = sum(weight)
        if total == 0:
            raise ValueError("linear: the weights sum to zero; cannot normalize (set normalize: false)")
        out.div_(total)
    return out
