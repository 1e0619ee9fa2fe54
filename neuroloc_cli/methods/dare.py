"""DARE: drop and rescale, then mix linearly (dare_linear) or with TIES sign election (dare_ties)."""

from __future__ import annotations

from neuroloc_cli.methods.gta import Family
from neuroloc_cli.ops.sparsify import RANDOM

DARE = Family(RANDOM, rescale=True, paper="Yu et al. 2024, Language Models are Super Mario (DARE, arXiv:2311.03099)")

DARE.register(
    "dare_linear",
    consensus=False,
    normalize=False,
    doc="""Drop task-vector entries at random, rescale the survivors, add the weighted sum.

    Each entry is dropped with probability `1 − density`: `θ_0 + λ · Σ w_i · s_i · (m_i ⊙ δ_i)`.

    Yu et al. 2024 (arXiv:2311.03099). The paper rescales survivors by `s_i = 1/density`
    (`paper_rescale: true`); mergekit, and our default, by the one factor per tensor that
    restores the delta's L1 norm. `rescale: false` keeps survivors as they are. Density 1
    keeps every element (no random draw), density 0 none. Draws come from a generator seeded
    by the run's seed and the tensor's name.
    """,
)

DARE.register(
    "dare_ties",
    consensus=True,
    normalize=False,
    doc="""DARE drop-and-rescale, then TIES sign election by summed mass.

    Yu et al. 2024 (arXiv:2311.03099) with Yadav et al. 2023 (arXiv:2306.01708). Defaults as
    mergekit: `normalize: false`, `rescale: true` (L1-norm match; `paper_rescale: true` for
    the paper's 1/density).
    """,
)
