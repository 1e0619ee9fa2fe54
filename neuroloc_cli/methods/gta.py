"""The shared body of the sparsify-then-mix methods (ties, dare_*, breadcrumbs*, della*).

Each method is "generalized task arithmetic" (mergekit's name): take every model's task
vector `δ_i = θ_i − θ_0`, keep part of it (`keep`), optionally rescale the survivors, then mix
the vectors with or without TIES sign election (`neuroloc_cli.ops.blockwise`).

Rescaling, when `rescale` is true:
- mergekit (default): the survivors of a tensor are multiplied by one factor that restores the
  delta's L1 norm, `‖δ‖₁ / ‖keep ⊙ δ‖₁` (no change when either norm is ~0);
- paper (`paper_rescale: true`, DARE and DELLA only): DARE multiplies survivors by
  `1 / density`, DELLA each survivor by `1 / p` with `p` its own keep probability.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from neuroloc_cli.ops.blockwise import Mask, l1_norms, mix_blocks
from neuroloc_cli.ops.sparsify import l1_rescale_factor
from neuroloc_cli.recipe.params import Param

# make_mask(base, tuned, model_index) -> (block mask over the flat tensor, or None to keep all,
# the paper's rescale: a factor, a flat per-element tensor, or None where there is none)
MaskFn = Callable[[torch.Tensor, torch.Tensor, int], tuple["Mask | None", "float | torch.Tensor | None"]]

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


def model_generators(generator: torch.Generator, n: int) -> list[torch.Generator]:
    """One generator per model, seeded from the tensor's generator, so that each model's draws
    can be replayed (rescale pass, then mixing pass) independently of the others."""
    seeds = torch.randint(2**62, (n,), generator=generator).tolist()
    return [torch.Generator().manual_seed(s) for s in seeds]


def rescale_param(default: bool) -> Param:
    return Param("rescale", default=default, boolean=True, help="rescale survivors (L1 norm match, or 1/p with paper_rescale)")


def sparse_task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    make_mask: MaskFn,
    *,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    paper_rescale: bool,
    lambda_: float,
) -> torch.Tensor:
    """Sparsify each task vector, rescale it, and mix them (block-wise, see `ops.blockwise`).

    Args:
        base: the base tensor; tensors: one per model (compute dtype).
        weights: per-model weights.
        make_mask: the sparsifier (see `MaskFn`).
        consensus: TIES sign election.
        normalize, lambda_: see `neuroloc_cli.ops.blockwise.mix_blocks`.
        rescale: rescale survivors; paper_rescale: by the paper's 1/p rather than the L1 norm.

    Returns:
        The merged tensor.
    """
    flat_base = base.reshape(-1)
    flat = [t.reshape(-1) for t in tensors]
    masks, scales = [], []
    for i, t in enumerate(flat):
        mask, paper_scale = make_mask(base, tensors[i], i)
        scale: float | torch.Tensor = 1.0
        if rescale and mask is not None:
            if paper_rescale and paper_scale is not None:
                scale = paper_scale
            else:
                before, after, mask = l1_norms(flat_base, t, mask)
                scale = l1_rescale_factor(before, after)
        masks.append(mask)
        scales.append(scale)
    out = mix_blocks(flat_base, flat, masks, scales, weights, consensus=consensus, normalize=normalize, lambda_=lambda_)
    return out.reshape(base.shape)
