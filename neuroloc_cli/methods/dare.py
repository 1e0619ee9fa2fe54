"""DARE: drop and rescale, then mix linearly (dare_linear) or with TIES sign election (dare_ties)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.methods.gta import (
    DENSITY,
    LAMBDA,
    PAPER_RESCALE,
    WEIGHT,
    model_keys,
    normalize_param,
    rescale_param,
    sparse_task_arithmetic,
)
from neuroloc_cli.ops.blockwise import KEEP_NONE, Keep

_PARAMS = (WEIGHT, DENSITY, normalize_param(False), rescale_param(True), PAPER_RESCALE, LAMBDA)
_PAPER = "Yu et al. 2024, Language Models are Super Mario (DARE, arXiv:2311.03099)"


def _dare(base, tensors, weight, density, normalize, rescale, paper_rescale, lambda_, generator, consensus):
    keys = model_keys(generator, len(tensors))

    def make_keep(base: torch.Tensor, tuned: torch.Tensor, i: int) -> Keep | None:
        d = float(density[i])
        if d >= 1:
            return None
        if d <= 0:
            return Keep(cut=KEEP_NONE)
        return Keep(p=d, key=keys[i])

    return sparse_task_arithmetic(
        base, tensors, weight, make_keep, consensus=consensus, normalize=normalize, rescale=rescale, paper_rescale=paper_rescale, lambda_=lambda_
    )


@merge_method("dare_linear", needs_base=True, params=_PARAMS, random=True, paper=_PAPER)
def dare_linear(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    normalize: bool,
    rescale: bool,
    paper_rescale: bool,
    lambda_: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Drop task-vector entries at random, rescale the survivors, add the weighted sum.

    Each entry is dropped with probability `1 − density`: `θ_0 + λ · Σ w_i · s_i · (m_i ⊙ δ_i)`.

    Yu et al. 2024 (arXiv:2311.03099). The paper rescales survivors by `s_i = 1/density`
    (`paper_rescale: true`); mergekit, and our default, by the one factor per tensor that
    restores the delta's L1 norm. `rescale: false` keeps survivors as they are. Density 1
    keeps every element (no random draw), density 0 none. Draws come from a generator seeded
    by the run's seed and the tensor's name.
    """
    return _dare(base, tensors, weight, density, normalize, rescale, paper_rescale, lambda_, generator, consensus=False)


@merge_method("dare_ties", needs_base=True, params=_PARAMS, random=True, paper=_PAPER)
def dare_ties(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    normalize: bool,
    rescale: bool,
    paper_rescale: bool,
    lambda_: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """DARE drop-and-rescale, then TIES sign election by summed mass.

    Yu et al. 2024 (arXiv:2311.03099) with Yadav et al. 2023 (arXiv:2306.01708). Defaults as
    mergekit: `normalize: false`, `rescale: true` (L1-norm match; `paper_rescale: true` for
    the paper's 1/density).
    """
    return _dare(base, tensors, weight, density, normalize, rescale, paper_rescale, lambda_, generator, consensus=True)
