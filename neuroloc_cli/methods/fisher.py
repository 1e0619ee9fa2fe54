"""Fisher-weighted averaging (Matena & Raffel 2022): each element averaged by its diagonal Fisher.

Recipe shape:

    merge_method: fisher
    models:
      - model: ./math-tuned
        parameters: {weight: 1.0, fisher: ./math-fisher/importance/math.safetensors}
      - model: ./spanish-tuned
        parameters: {weight: 1.0, fisher: ./es-fisher/importance/es.safetensors}
    parameters: {fisher_floor: 1.0e-6}

Each model's Fisher is an importance file of `neuroloc locate gradient MODEL --score fisher`
(Σ_b g_b², on that model's own data), read tensor by tensor beside the model's weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.methods.linear import linear
from neuroloc_cli.recipe.params import Param, Scalar, SideFile

FISHER_FILE = SideFile(
    scores=("fisher",),
    what="a diagonal Fisher",
    hint="write one with `neuroloc locate gradient MODEL --data LANG=FILE ... --score fisher -o DIR`",
)


def _check(whole: Mapping[str, Scalar], per_model: Sequence[Mapping[str, Scalar]]) -> str | None:
    if float(whole["fisher_floor"]) <= 0:
        return "fisher_floor must be positive: an element whose Fisher is zero in every model would divide by zero"
    if sum(float(m["weight"]) for m in per_model) <= 0:
        return "the weights sum to zero; give at least one model a positive weight"
    return None


@merge_method(
    "fisher",
    needs_base=False,
    elementwise=True,
    params=(
        Param("weight", default=1.0, per_model=True, low=0.0, help="weight of each model (the paper's λ_i)"),
        Param("fisher", per_model=True, file=FISHER_FILE, help="the model's diagonal Fisher: an importance file (or a folder of one)"),
        Param("fisher_floor", default=1e-6, low=0.0, help="lower bound on each Fisher value, so no element divides by zero"),
    ),
    paper="Matena & Raffel 2022, Merging Models with Fisher-Weighted Averaging (arXiv:2111.09832)",
    check_values=_check,
)
def fisher(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    weight: Sequence[float],
    fisher: Sequence[torch.Tensor | None],
    fisher_floor: float,
) -> torch.Tensor:
    """Per-element average of the models' weights by their diagonal Fisher: `Σ w_i F_i θ_i / Σ w_i F_i`.

    `F_i` is floored at `fisher_floor` (`max(F_i, floor)`, the reference code's rule, whose
    default is 1e-6), so an element that no model's data touched gets the weighted average.
    A tensor that some model's file does not cover (an embedding left out of scoring) gets
    the weighted average `Σ w_i θ_i / Σ w_i`. With equal Fisher tensors it is `linear`.
    Arithmetic in float32 at least (Fisher values are often tiny).
    """
    if any(f is None for f in fisher):
        return linear.fn(None, tensors, weight=weight, normalize=True)
    dtype = torch.promote_types(tensors[0].dtype, torch.float32)
    num = torch.zeros(tensors[0].shape, dtype=dtype)
    den = torch.zeros(tensors[0].shape, dtype=dtype)
    for t, w, f in zip(tensors, weight, fisher, strict=True):
        assert f is not None
        wf = f.to(dtype).clamp_min(fisher_floor).mul_(w)
        num.addcmul_(wf, t.to(dtype))
        den.add_(wf)
    return num.div_(den)
