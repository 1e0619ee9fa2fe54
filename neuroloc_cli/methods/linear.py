"""Linear averaging of weights."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.ops.combine import weighted_sum
from neuroloc_cli.recipe.params import Param, Scalar


def normalizable(whole: Mapping[str, Scalar], per_model: Sequence[Mapping[str, Scalar]]) -> str | None:
    """`normalize` divides by the sum of the weights, which must not be zero at any tensor."""
    if whole.get("normalize") and sum(float(m["weight"]) for m in per_model) == 0:
        return "the weights sum to zero, so normalize cannot divide by them (set normalize: false, or change a weight)"
    return None


@merge_method(
    "linear",
    needs_base=False,
    elementwise=True,
    params=(
        Param("weight", per_model=True, help="weight of each model"),
        Param("normalize", default=True, boolean=True, help="divide by the sum of the weights"),
    ),
    paper="Wortsman et al. 2022, Model soups (arXiv:2203.05482)",
    check_values=normalizable,
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
