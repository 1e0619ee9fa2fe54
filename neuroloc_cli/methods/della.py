"""DELLA: drop task-vector entries at random with magnitude-ranked probabilities (MagPrune)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from neuroloc_cli.methods.gta import Family
from neuroloc_cli.ops.sparsify import MAGPRUNE, magprune_fits
from neuroloc_cli.recipe.params import Param, Scalar

EPSILON = Param("epsilon", default=0.15, per_model=True, low=0.0, high=1.0, help="spread of keep probabilities around density")


def _probabilities_fit(whole: Mapping[str, Scalar], per_model: Sequence[Mapping[str, Scalar]]) -> str | None:
    """MagPrune's keep probabilities `density ± epsilon` must lie in (0, 1) (mergekit's rule)
    for every model whose density does not keep or drop everything."""
    for m in per_model:
        d, e = float(m["density"]), float(m["epsilon"])
        if 0 < d < 1 and not magprune_fits(d, e):
            return f"density ± epsilon must lie in (0, 1), got density {d:g}, epsilon {e:g} (lower epsilon)"
    return None


DELLA = Family(
    MAGPRUNE,
    rescale=True,
    paper="Deep et al. 2024, DELLA-Merging (arXiv:2406.11617)",
    params=(EPSILON,),
    check_values=_probabilities_fit,
)

DELLA.register(
    "della",
    consensus=True,
    normalize=True,
    doc="""DELLA: magnitude-ranked random drop (MagPrune), rescale, TIES sign election.

    Deep et al. 2024 (arXiv:2406.11617). Within each row (a 1-D tensor is one row), entries
    are ranked by magnitude and kept with probability from `density − ε` (smallest) to
    `density + ε` (largest); `density ± ε` must lie in (0, 1). Density 1 keeps all, 0 none.
    Rescaling: mergekit's one L1-norm factor per tensor by default; the paper's `1/p_i` per
    survivor with `paper_rescale: true`. Defaults as mergekit: normalize on, rescale on.
    """,
)

DELLA.register(
    "della_linear",
    consensus=False,
    normalize=False,
    doc="""DELLA's MagPrune and rescale, then a plain weighted sum (no sign election).

    `normalize` defaults to false, as in mergekit.""",
)
