"""TIES-merging: trim, elect sign, disjoint merge."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.methods.gta import DENSITY, LAMBDA, WEIGHT, normalize_param, rescale_param, sparse_task_arithmetic
from neuroloc_cli.ops.blockwise import Keep, magnitude_cut
from neuroloc_cli.ops.sparsify import keep_count


@merge_method(
    "ties",
    needs_base=True,
    params=(WEIGHT, DENSITY, normalize_param(True), rescale_param(False), LAMBDA),
    paper="Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)",
)
def ties(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    normalize: bool,
    rescale: bool,
    lambda_: float,
) -> torch.Tensor:
    """Trim task vectors to their largest magnitudes, elect signs by mass, average the agreeing.

    `θ_0 + λ · Σ a_i w_i δ̂_i / Σ a_i w_i`, δ̂_i the trimmed task vectors, a_i agreement.

    Yadav et al. 2023 (arXiv:2306.01708). As in mergekit: trimming keeps `floor(density · n)`
    elements per tensor (density 1 keeps all, 0 none), the sign is elected on the *weighted*
    trimmed deltas, the average is over agreeing models' weights (`normalize: true`, the
    default; the paper's disjoint mean is the case of equal weights), and `rescale` (default
    off) restores each trimmed delta's L1 norm. A single model gives `θ_0 + λ·δ̂` whatever its
    weight (normalization divides it out).
    """

    def make_keep(base: torch.Tensor, tuned: torch.Tensor, i: int) -> Keep | None:
        if density[i] >= 1:
            return None
        return Keep(cut=magnitude_cut(base, tuned, keep_count(density[i], base.numel())))

    return sparse_task_arithmetic(
        base, tensors, weight, make_keep, consensus=True, normalize=normalize, rescale=rescale, paper_rescale=False, lambda_=lambda_
    )
