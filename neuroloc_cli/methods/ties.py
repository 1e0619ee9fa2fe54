"""TIES-merging: trim, elect sign, disjoint merge."""

from __future__ import annotations

from neuroloc_cli.methods.gta import Family
from neuroloc_cli.ops.sparsify import MAGNITUDE

TIES = Family(MAGNITUDE, rescale=False, paper="Yadav et al. 2023, TIES-Merging (arXiv:2306.01708)")

TIES.register(
    "ties",
    consensus=True,
    normalize=True,
    doc="""Trim task vectors to their largest magnitudes, elect signs by mass, average the agreeing.

    `θ_0 + λ · Σ a_i w_i δ̂_i / Σ a_i w_i`, δ̂_i the trimmed task vectors, a_i agreement.

    Yadav et al. 2023 (arXiv:2306.01708). As in mergekit: trimming keeps `int(density · n)`
    elements per tensor (density 1 keeps all, 0 none), the sign is elected on the *weighted*
    trimmed deltas, the average is over agreeing models' weights (`normalize: true`, the
    default; the paper's disjoint mean is the case of equal weights), and `rescale` (default
    off) restores each trimmed delta's L1 norm. A single model gives `θ_0 + λ·δ̂` whatever its
    weight (normalization divides it out).
    """,
)
