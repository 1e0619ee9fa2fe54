"""Model Breadcrumbs: drop both the smallest and the largest (outlier) task-vector entries."""

from __future__ import annotations

from neuroloc_cli.methods.gta import Family
from neuroloc_cli.ops.sparsify import BREADCRUMBS
from neuroloc_cli.recipe.params import Param

GAMMA = Param("gamma", default=0.01, per_model=True, low=0.0, high=1.0, help="share of largest-magnitude outliers dropped")

CRUMBS = Family(BREADCRUMBS, rescale=False, paper="Davari & Belilovsky 2023, Model Breadcrumbs (arXiv:2312.06795)", params=(GAMMA,))

CRUMBS.register(
    "breadcrumbs",
    consensus=False,
    normalize=False,
    doc="""Drop task vectors' largest outliers and smallest entries, add the weighted sum.

    Per tensor, the `gamma` share of largest magnitudes and then the smallest ones are dropped
    so that `int(density · n)` remain: `θ_0 + λ · Σ w_i (m_i ⊙ δ_i)`.

    Davari & Belilovsky 2023 (arXiv:2312.06795); the paper masks per layer, mergekit (and we)
    per tensor. If density + gamma > 1, fewer outliers are dropped so the density holds;
    density 1 keeps everything (gamma does not apply); gamma 0 is plain magnitude trimming.
    """,
)

CRUMBS.register(
    "breadcrumbs_ties",
    consensus=True,
    normalize=False,
    doc="""Breadcrumbs masking, then TIES sign election by summed mass.

    mergekit's combination; `normalize` defaults to false as there.""",
)
