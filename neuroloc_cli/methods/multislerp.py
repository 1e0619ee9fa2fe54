"""Multi-SLERP: barycentric interpolation of several models on a hypersphere."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence

import torch

from neuroloc_cli.errors import InputError
from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.methods.nuslerp import base_not_listed
from neuroloc_cli.ops.flat import Input, flat
from neuroloc_cli.ops.sums import fixed_gram, gram_product, gram_quadratic, pieces
from neuroloc_cli.recipe.params import Param, Scalar


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
    reads_in_pieces=True,
)
def multislerp(
    base: Input | None, tensors: Sequence[Input], *, weight: Sequence[float], normalize_weights: bool, eps: float
) -> Iterator[torch.Tensor]:
    """Weighted mean of several models on a hypersphere, through the tangent space at their mean.

    `v_i = θ_i` (or `θ_i − θ_0` with a base), `u_i = v_i / (‖v_i‖ + ε)`, `m = Σ w_i u_i / ‖Σ w_i u_i‖`,
    tangent `τ = Σ w_i (u_i − ⟨u_i, m⟩ m)`, `r = m cos‖τ‖' + τ sin‖τ‖' / ‖τ‖'` with `‖τ‖' = ‖τ‖ + ε`;
    result `(Σ w_i ‖v_i‖) · r` (plus `θ_0`).

    As in mergekit 0.1.5: the whole tensor is one vector; one model gives that model unchanged;
    where the weighted mean of the unit vectors is ~0 (‖·‖ < ε), two models are mixed linearly,
    `w_1 v_1 + w_2 v_2` (plus `θ_0`), and more are an error.

    Every vector above is a combination of the `v_i`, so the method works on coefficients: one
    pass takes the Gram matrix `⟨v_i, v_j⟩` (float64, `ops.sums.fixed_gram`), the mean and the
    tangent are worked out from it in float64, and a second pass writes `Σ c_i v_i`.
    """
    flats, fb = [flat(t) for t in tensors], None if base is None else flat(base)
    n = flats[0].numel()
    if len(flats) == 1:
        yield from (flats[0][c] for c in pieces(n))
        return
    w = [float(x) for x in weight]
    if normalize_weights:
        total = sum(w)
        w = [x / total for x in w]

    def vectors(c: slice) -> list[torch.Tensor]:
        return [t[c] for t in flats] if fb is None else [t[c] - fb[c] for t in flats]

    gram = fixed_gram(n, len(flats), vectors)
    norms = [math.sqrt(gram[i][i]) for i in range(len(flats))]
    inv = [1.0 / (x + eps) for x in norms]  # u_i = inv_i · v_i
    units = [[g * inv[i] * inv[j] for j, g in enumerate(row)] for i, row in enumerate(gram)]  # ⟨u_i, u_j⟩
    mean_norm = math.sqrt(max(gram_quadratic(units, w), 0.0))
    if mean_norm < eps:
        if len(flats) != 2:
            raise InputError(
                "multislerp: the weighted sum of the models' unit vectors is zero at this tensor",
                hint="antipodal models with balancing weights; change a weight",
            )
        coefficients = w
    else:
        mean = [x / mean_norm for x in w]  # m = Σ mean_i u_i
        along = math.fsum(wi * d for wi, d in zip(w, gram_product(units, mean)))  # Σ w_i ⟨u_i, m⟩
        tangent = [wi - along * mi for wi, mi in zip(w, mean)]  # τ = Σ tangent_i u_i
        tangent_norm = math.sqrt(max(gram_quadratic(units, tangent), 0.0)) + eps
        scale = math.fsum(x * wi for x, wi in zip(norms, w))
        cos, sinc = math.cos(tangent_norm), math.sin(tangent_norm) / tangent_norm
        coefficients = [scale * (mi * cos + ti * sinc) * inv_i for mi, ti, inv_i in zip(mean, tangent, inv)]
    for c in pieces(n):
        vs = vectors(c)
        out = vs[0] * coefficients[0]
        for v, k in zip(vs[1:], coefficients[1:]):
            out.add_(v, alpha=k)
        yield out if fb is None else out.add_(fb[c])
