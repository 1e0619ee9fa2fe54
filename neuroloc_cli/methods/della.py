"""DELLA: drop task-vector entries at random with magnitude-ranked probabilities (MagPrune)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.methods.gta import (
    DENSITY,
    EPSILON,
    LAMBDA,
    PAPER_RESCALE,
    WEIGHT,
    model_keys,
    normalize_param,
    rescale_param,
    sparse_task_arithmetic,
)
from neuroloc_cli.ops.blockwise import KEEP_NONE, Keep
from neuroloc_cli.ops.sparsify import della_keep_probabilities
from neuroloc_cli.recipe.params import Scalar

_PAPER = "Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)"


def _params(normalize: bool):
    return (WEIGHT, DENSITY, EPSILON, normalize_param(normalize), rescale_param(True), PAPER_RESCALE, LAMBDA)


def _probabilities_fit(whole: Mapping[str, Scalar], per_model: Sequence[Mapping[str, Scalar]]) -> str | None:
    """MagPrune's keep probabilities `density ± epsilon` must lie in (0, 1) (mergekit's rule)
    for every model whose density does not keep or drop everything."""
    for m in per_model:
        d, e = float(m["density"]), float(m["epsilon"])
        if 0 < d < 1 and not (0 < d - e and d + e < 1):
            return f"density ± epsilon must lie in (0, 1), got density {d:g}, epsilon {e:g} (lower epsilon)"
    return None


def _della(base, tensors, weight, density, epsilon, normalize, rescale, paper_rescale, lambda_, generator, consensus):
    keys = model_keys(generator, len(tensors))
    shape = base.shape  # DELLA ranks within rows

    def make_keep(base: torch.Tensor, tuned: torch.Tensor, i: int) -> Keep | None:
        d = float(density[i])
        if d >= 1:
            return None
        if d <= 0:
            return Keep(cut=KEEP_NONE)
        probs = della_keep_probabilities(torch.sub(tuned, base).reshape(shape), d, epsilon[i])
        return Keep(p=probs.reshape(-1), key=keys[i])

    return sparse_task_arithmetic(
        base, tensors, weight, make_keep, consensus=consensus, normalize=normalize, rescale=rescale, paper_rescale=paper_rescale, lambda_=lambda_
    )


@merge_method("della", needs_base=True, params=_params(True), random=True, paper=_PAPER, check_values=_probabilities_fit)
def della(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    epsilon: Sequence[float],
    normalize: bool,
    rescale: bool,
    paper_rescale: bool,
    lambda_: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """DELLA: magnitude-ranked random drop (MagPrune), rescale, TIES sign election.

    Deep et al. 2024 (arXiv:2406.11617). Within each row (a 1-D tensor is one row), entries
    are ranked by magnitude and kept with probability from `density − ε` (smallest) to
    `density + ε` (largest); `density ± ε` must lie in (0, 1). Density 1 keeps all, 0 none.
    Rescaling: mergekit's one L1-norm factor per tensor by default; the paper's `1/p_i` per
    survivor with `paper_rescale: true`. Defaults as mergekit: normalize on, rescale on.
    """
    return _della(base, tensors, weight, density, epsilon, normalize, rescale, paper_rescale, lambda_, generator, consensus=True)


@merge_method("della_linear", needs_base=True, params=_params(False), random=True, paper=_PAPER, check_values=_probabilities_fit)
def della_linear(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    epsilon: Sequence[float],
    normalize: bool,
    rescale: bool,
    paper_rescale: bool,
    lambda_: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """DELLA's MagPrune and rescale, then a plain weighted sum (no sign election).

    `normalize` defaults to false, as in mergekit."""
    return _della(base, tensors, weight, density, epsilon, normalize, rescale, paper_rescale, lambda_, generator, consensus=False)
