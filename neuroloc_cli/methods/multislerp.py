"""Multi-SLERP: barycentric interpolation of several models on a hypersphere."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from neuroloc_cli.errors import InputError
from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.methods.nuslerp import base_not_listed
from neuroloc_cli.ops.sums import fixed_dot
from neuroloc_cli.recipe.params import Param, Scalar


def _norm(v: torch.Tensor) -> float:
    return math.sqrt(fixed_dot(v, v))


def summable(whole: Mapping[str, Scalar], per_model: Sequence[Mapping[str, Scalar]]) -> str | None:
    """`normalize_weights` divides by the sum of the weights, which must not be zero."""
    if whole.get("normalize_weights") and len(per_model) > 1 and sum(float(m["weight"]) for m in per_model) == 0:
        return "the weights sum to zero, so normalize_weights cannot divide by them (set normalize_weights: false, or change a weight)"
    return None


@merge_method(
    "multislerp",
    needs_base=False,
    min_models=1,
    params=(
        Param("weight", per_model=True, help="weight of each model"),
        Param("normalize_weights", default=True, boolean=True, help="divide the weights by their sum"),
        Param("eps", default=1e-8, low=0.0, help="added to norms before dividing by them"),
    ),
    paper="Goddard 2025, Multi-SLERP (goddard.blog/posts/multislerp-wow-what-a-cool-idea); as in mergekit",
    check=base_not_listed,
    check_values=summable,
)
def multislerp(
    base: torch.Tensor | None, tensors: Sequence[torch.Tensor], *, weight: Sequence[float], normalize_weights: bool, eps: float
) -> torch.Tensor:
    """Weighted mean of several models on a hypersphere, through the tangent space at their mean.

    `v_i = θ_i` (or `θ_i − θ_0` with a base), `u_i = v_i / (‖v_i‖ + ε)`, `m = Σ w_i u_i / ‖Σ w_i u_i‖`,
    tangent `τ = Σ w_i (u_i − ⟨u_i, m⟩ m)`, `r = m cos‖τ‖' + τ sin‖τ‖' / ‖τ‖'` with `‖τ‖' = ‖τ‖ + ε`;
    result `(Σ w_i ‖v_i‖) · r` (plus `θ_0`).

    As in mergekit 0.1.5: the whole tensor is one vector; one model gives that model unchanged;
    where the weighted mean of the unit vectors is ~0 (‖·‖ < ε), two models are mixed linearly,
    `w_1 v_1 + w_2 v_2` (plus `θ_0`), and more are an error. Whole-tensor sums are in float64.
    """
    if len(tensors) == 1:
        return tensors[0].clone()
    vectors = [t - base for t in tensors] if base is not None else [t.clone() for t in tensors]
    w = [float(x) for x in weight]
    if normalize_weights:
        total = sum(w)
        w = [x / total for x in w]
    norms = [_norm(v) for v in vectors]
    units = [v / (n + eps) for v, n in zip(vectors, norms)]
    mean = sum((u * wi for u, wi in zip(units[1:], w[1:])), units[0] * w[0])
    mean_norm = _norm(mean)
    if mean_norm < eps:
        if len(vectors) != 2:
            raise InputError(
                "multislerp: the weighted sum of the models' unit vectors is zero at this tensor",
                hint="antipodal models with balancing weights; change a weight",
            )
        out = vectors[0] * w[0] + vectors[1] * w[1]
        return out if base is None else out.add_(base)
    mean /= mean_norm
    tangent = torch.zeros_like(mean)
    for u, wi in zip(units, w):
        tangent.add_(u - mean * fixed_dot(u, mean), alpha=wi)
    tangent_norm = _norm(tangent) + eps
    out = mean * math.cos(tangent_norm) + tangent * (math.sin(tangent_norm) / tangent_norm)
    out *= sum(n * wi for n, wi in zip(norms, w))
    return out if base is None else out.add_(base)
