"""Multi-SLERP: barycentric interpolation of several models on a hypersphere."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from neuroloc_cli.errors import InputError
from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.methods.nuslerp import base_not_listed
from neuroloc_cli.ops.sums import dot_blocks, fixed_dot, pieces
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
    # piece by piece (`ops.sums.pieces`), the vectors and unit vectors recomputed in each pass,
    # so that the mean and the tangent are the only full-size tensors made (the same floats)
    flat, fb = [t.reshape(-1) for t in tensors], None if base is None else base.reshape(-1)
    w = [float(x) for x in weight]
    if normalize_weights:
        total = sum(w)
        w = [x / total for x in w]

    def vectors(c: slice) -> list[torch.Tensor]:
        return [t[c] for t in flat] if fb is None else [t[c] - fb[c] for t in flat]

    def units(c: slice) -> list[torch.Tensor]:
        return [v / (n + eps) for v, n in zip(vectors(c), norms)]

    norms = [math.sqrt(math.fsum(part)) for part in _blocks(flat[0].numel(), lambda c: [(v, v) for v in vectors(c)], len(flat))]
    mean = torch.empty_like(flat[0])
    for c in pieces(mean.numel()):
        us = units(c)
        mean[c] = sum((u * wi for u, wi in zip(us[1:], w[1:])), us[0] * w[0])
    mean_norm = _norm(mean)
    if mean_norm < eps:
        if len(flat) != 2:
            raise InputError(
                "multislerp: the weighted sum of the models' unit vectors is zero at this tensor",
                hint="antipodal models with balancing weights; change a weight",
            )
        for c in pieces(mean.numel()):
            v0, v1 = vectors(c)
            mean[c] = v0 * w[0] + v1 * w[1] if fb is None else (v0 * w[0] + v1 * w[1]).add_(fb[c])
        return mean.view(tensors[0].shape)
    mean /= mean_norm
    dots = [math.fsum(part) for part in _blocks(mean.numel(), lambda c: [(u, mean[c]) for u in units(c)], len(flat))]
    tangent = torch.zeros_like(mean)
    for c in pieces(mean.numel()):
        for u, wi, dot in zip(units(c), w, dots):
            tangent[c].add_(u - mean[c] * dot, alpha=wi)
    tangent_norm = _norm(tangent) + eps
    scale = sum(n * wi for n, wi in zip(norms, w))
    for c in pieces(mean.numel()):  # the result over the mean, which is the method's own
        out = mean[c] * math.cos(tangent_norm) + tangent[c] * (math.sin(tangent_norm) / tangent_norm)
        out *= scale
        mean[c] = out if fb is None else out.add_(fb[c])
    return mean.view(tensors[0].shape)


def _blocks(n: int, pairs, count: int) -> list[list[float]]:
    """`count` float64 dot products, piece by piece: `pairs(c)` gives the count pairs of
    vectors at piece `c`; the block sums of each (`ops.sums.dot_blocks`), for `math.fsum`."""
    out: list[list[float]] = [[] for _ in range(count)]
    for c in pieces(n):
        for part, (a, b) in zip(out, pairs(c)):
            part += dot_blocks(a, b)
    return out
