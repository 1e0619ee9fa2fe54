"""The shared body of the sparsify-then-mix methods (ties, dare_*, breadcrumbs*, della*).

Each method is "generalized task arithmetic" (mergekit's name): take every model's task
vector `δ_i = θ_i − θ_0`, keep part of it (`keep`), optionally rescale the survivors, then mix
the vectors with or without TIES sign election (`neuroloc_cli.ops.consensus`).

Rescaling, when `rescale` is true:
- mergekit (default): the survivors of a tensor are multiplied by one factor that restores the
  delta's L1 norm, `‖δ‖₁ / ‖keep ⊙ δ‖₁` (no change when either norm is ~0);
- paper (`paper_rescale: true`, DARE and DELLA only): DARE multiplies survivors by
  `1 / density`, DELLA each survivor by `1 / p` with `p` its own keep probability.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from neuroloc_cli.ops.consensus import mix_task_vectors
from neuroloc_cli.ops.sparsify import l1_rescale_factor
from neuroloc_cli.recipe.params import Param

# keep(delta, model_index) -> (boolean keep mask, paper rescale: a factor, a per-element tensor or None)
KeepFn = Callable[[torch.Tensor, int], tuple[torch.Tensor, "float | torch.Tensor | None"]]

WEIGHT = Param("weight", per_model=True, help="weight of each model's task vector")
DENSITY = Param("density", default=1.0, per_model=True, low=0.0, high=1.0, help="share of each task vector kept")
GAMMA = Param("gamma", default=0.01, per_model=True, low=0.0, high=1.0, help="share of largest-magnitude outliers dropped")
EPSILON = Param("epsilon", default=0.15, per_model=True, low=0.0, high=1.0, help="spread of keep probabilities around density")
LAMBDA = Param("lambda", default=1.0, help="scale of the mixed task vector")
PAPER_RESCALE = Param(
    "paper_rescale", default=False, boolean=True, help="with rescale: the paper's 1/p scaling instead of mergekit's L1-norm match"
)


def normalize_param(default: bool) -> Param:
    return Param("normalize", default=default, boolean=True, help="divide by the sum of the (agreeing) weights")


def rescale_param(default: bool) -> Param:
    return Param("rescale", default=default, boolean=True, help="rescale survivors (L1 norm match, or 1/p with paper_rescale)")


def sparse_task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    keep: KeepFn,
    *,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    paper_rescale: bool,
    lambda_: float,
) -> torch.Tensor:
    """Sparsify each task vector with `keep`, rescale it, and mix them.

    Args:
        base: the base tensor; tensors: one per model (compute dtype).
        weights: per-model weights.
        keep: the sparsifier (see `KeepFn`).
        consensus: TIES sign election.
        normalize, lambda_: see `mix_task_vectors`.
        rescale: rescale survivors; paper_rescale: by the paper's 1/p rather than the L1 norm.

    Returns:
        The merged tensor.
    """
    deltas = []
    for i, t in enumerate(tensors):
        delta = torch.sub(t, base)
        mask, paper_factor = keep(delta, i)
        l1_before = float(delta.abs().sum(dtype=torch.float64)) if rescale and not (paper_rescale and paper_factor is not None) else None
        kept = delta.mul_(mask)  # in place: one tensor-sized buffer less per model
        if rescale and paper_rescale and paper_factor is not None:
            kept.mul_(paper_factor)
        elif l1_before is not None:
            factor = l1_rescale_factor(l1_before, kept)
            if factor != 1.0:
                kept.mul_(factor)
        deltas.append(kept)
    return mix_task_vectors(base, deltas, weights, consensus=consensus, normalize=normalize, lambda_=lambda_)
