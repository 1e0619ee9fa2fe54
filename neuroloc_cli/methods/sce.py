"""SCE: select high-variance elements, calculate per-model weights, erase minority signs."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.ops.reference import top_k
from neuroloc_cli.ops.sums import fixed_dot
from neuroloc_cli.recipe.params import Param

WEIGHT_EPS = 1e-6  # model weights summing to less give equal weights; the divisor's floor (mergekit's)


def selected_count(nonzero: int, share: float) -> int:
    """mergekit's `int(count_nonzero(var) · select_topk)`, the product taken in float32 as
    PyTorch takes it there (so 0.29 of 100 selects 29, where neuroloc's `share_count` gives 28)."""
    return int(np.float32(nonzero) * np.float32(share))


def select_mask(deltas: Sequence[torch.Tensor], share: float) -> torch.Tensor:
    """The elements whose task-vector variance across models is among the largest `share` of
    the elements with non-zero variance (ties in position order)."""
    var = torch.var(torch.stack(list(deltas)), dim=0, unbiased=False)
    k = selected_count(int(torch.count_nonzero(var)), share) if share > 0 else 0
    return top_k(var.abs(), k)


@merge_method(
    "sce",
    needs_base=True,
    params=(Param("select_topk", default=1.0, low=0.0, high=1.0, help="share of elements kept, by variance across models"),),
    paper="Wan et al. 2024, FuseChat: Knowledge fusion of chat models, SCE (arXiv:2408.07990)",
)
def sce(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, select_topk: float) -> torch.Tensor:
    """Keep the task-vector elements that vary most across models, weight models by their
    mean squared task vector, and average the ones agreeing with the elected sign.

    `δ_i = θ_i − θ_0`, times the selection mask when `select_topk` < 1; `w_i = mean(δ_i²) /
    Σ_j mean(δ_j²)`; sign `s = sign⁺(Σ δ_i)`; `θ = θ_0 + Σ w_i a_i δ_i / max(Σ w_i a_i, 1e-6)`
    with `a_i = [sign(δ_i) = s]` (zeros never agree).

    Wan et al. 2024 (arXiv:2408.07990), as in mergekit 0.1.5: selection, weights and signs are
    per tensor; weights summing to < 1e-6 become 1/N; the selected count is
    `int(nonzero · select_topk)` in float32, of the elements whose variance is non-zero.
    """
    deltas = [t - base for t in tensors]
    share = float(select_topk)
    if share < 1:
        keep = select_mask(deltas, share)
        deltas = [d.masked_fill_(~keep, 0) for d in deltas]
    energy = [fixed_dot(d, d) / max(d.numel(), 1) for d in deltas]
    total = sum(energy)
    weights = [1.0 / len(deltas)] * len(deltas) if abs(total) < WEIGHT_EPS else [e / total for e in energy]
    mass = deltas[0].clone()
    for d in deltas[1:]:
        mass.add_(d)
    elected = torch.where(mass >= 0, 1.0, -1.0).to(base.dtype)
    merged, divisor = torch.zeros_like(base), torch.zeros_like(base)
    for d, w in zip(deltas, weights):
        agree = (torch.sign(d) == elected).to(base.dtype) * w
        merged.add_(d * agree)
        divisor.add_(agree)
    return merged.div_(divisor.clamp(min=WEIGHT_EPS)).add_(base)
