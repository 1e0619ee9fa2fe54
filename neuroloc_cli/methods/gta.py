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

import dataclasses
from collections.abc import Callable, Sequence

import torch

from neuroloc_cli.ops.blockwise import Keep, l1_norms, mix
from neuroloc_cli.ops.sparsify import l1_rescale_factor
from neuroloc_cli.recipe.params import Param

# make_keep(base, tuned, model_index) -> what survives of that model's flat delta (None: all)
KeepFn = Callable[[torch.Tensor, torch.Tensor, int], "Keep | None"]

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


def model_keys(generator: torch.Generator, n: int) -> list[int]:
    """One random stream key per model, from the tensor's generator (see `Keep.key`)."""
    return torch.randint(2**62, (n,), generator=generator).tolist()


def rescale_param(default: bool) -> Param:
    return Param("rescale", default=default, boolean=True, help="rescale survivors (L1 norm match, or 1/p with paper_rescale)")


def sparse_task_arithmetic(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    weights: Sequence[float],
    make_keep: KeepFn,
    *,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    paper_rescale: bool,
    lambda_: float,
) -> torch.Tensor:
    """Sparsify each task vector, rescale it, and mix them (see `ops.blockwise`).

    Args:
        base: the base tensor; tensors: one per model (compute dtype; half precision is
            computed in float32 and cast back).
        weights: per-model weights.
        make_keep: the sparsifier (see `KeepFn`); it sees flat tensors.
        consensus: TIES sign election.
        normalize, lambda_: see `neuroloc_cli.ops.blockwise.mix`.
        rescale: rescale survivors; paper_rescale: of a random draw, by the paper's 1/p
            rather than by the L1 norm.

    Returns:
        The merged tensor.
    """
    work = base.dtype if base.dtype in (torch.float32, torch.float64) else torch.float32
    flat_base = base.reshape(-1).to(work).contiguous()
    flat = [t.reshape(-1).to(work).contiguous() for t in tensors]
    keeps, scales = [], []
    for i, t in enumerate(flat):
        keep = make_keep(flat_base, t, i)
        scale = 1.0
        if keep is None:
            keep = Keep()
        elif rescale and paper_rescale and keep.p is not None:
            keep = dataclasses.replace(keep, inverse_p=True)
        elif rescale:
            before, after, keep = l1_norms(flat_base, t, keep)  # keep now holds its draws
            scale = l1_rescale_factor(before, after)
        keeps.append(keep)
        scales.append(scale)
    out = mix(flat_base, flat, keeps, scales, weights, consensus=consensus, normalize=normalize, lambda_=lambda_)
    return out.reshape(base.shape).to(base.dtype)
