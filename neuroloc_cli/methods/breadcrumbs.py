"""Model Breadcrumbs: drop both the smallest and the largest (outlier) task-vector entries."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.methods.gta import DENSITY, GAMMA, LAMBDA, WEIGHT, normalize_param, rescale_param, sparse_task_arithmetic
from neuroloc_cli.ops.blockwise import Keep, magnitude_cut
from neuroloc_cli.ops.sparsify import outlier_counts

_PARAMS = (WEIGHT, DENSITY, GAMMA, normalize_param(False), rescale_param(False), LAMBDA)
_PAPER = "Davari & Belilovsky 2023, Model Breadcrumbs (arXiv:2312.06795)"


def _breadcrumbs(base, tensors, weight, density, gamma, normalize, rescale, lambda_, consensus):
    def make_keep(base: torch.Tensor, tuned: torch.Tensor, i: int) -> Keep | None:
        if density[i] >= 1:
            return None
        n = base.numel()
        n_top, n_bottom = outlier_counts(n, density[i], gamma[i])
        # the same tie rule in both cuts makes the outliers a subset of the kept top n − n_bottom
        return Keep(cut=magnitude_cut(base, tuned, n - n_bottom), outliers=magnitude_cut(base, tuned, n_top))

    return sparse_task_arithmetic(
        base, tensors, weight, make_keep, consensus=consensus, normalize=normalize, rescale=rescale, paper_rescale=False, lambda_=lambda_
    )


@merge_method("breadcrumbs", needs_base=True, params=_PARAMS, paper=_PAPER)
def breadcrumbs(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    gamma: Sequence[float],
    normalize: bool,
    rescale: bool,
    lambda_: float,
) -> torch.Tensor:
    """Drop task vectors' largest outliers and smallest entries, add the weighted sum.

    Per tensor, the `gamma` share of largest magnitudes and then the smallest ones are dropped
    so that `floor(density · n)` remain: `θ_0 + λ · Σ w_i (m_i ⊙ δ_i)`.

    Davari & Belilovsky 2023 (arXiv:2312.06795); the paper masks per layer, mergekit (and we)
    per tensor. If density + gamma > 1, fewer outliers are dropped so the density holds;
    density 1 keeps everything (gamma does not apply); gamma 0 is plain magnitude trimming.
    """
    return _breadcrumbs(base, tensors, weight, density, gamma, normalize, rescale, lambda_, consensus=False)


@merge_method("breadcrumbs_ties", needs_base=True, params=_PARAMS, paper=_PAPER)
def breadcrumbs_ties(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    weight: Sequence[float],
    density: Sequence[float],
    gamma: Sequence[float],
    normalize: bool,
    rescale: bool,
    lambda_: float,
) -> torch.Tensor:
    """Breadcrumbs masking, then TIES sign election by summed mass.

    mergekit's combination; `normalize` defaults to false as there."""
    return _breadcrumbs(base, tensors, weight, density, gamma, normalize, rescale, lambda_, consensus=True)
