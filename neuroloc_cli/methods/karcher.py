"""Karcher mean: the models' weighted Fréchet mean on the unit hypersphere, rescaled."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.methods.nuslerp import base_not_listed
from neuroloc_cli.ops.sums import fixed_dot
from neuroloc_cli.recipe.params import Param


def _norm(v: torch.Tensor) -> float:
    return math.sqrt(fixed_dot(v, v))


def karcher_mean(vectors: Sequence[torch.Tensor], alphas: Sequence[float], max_iter: int, tol: float) -> torch.Tensor:
    """The weighted Karcher mean of `vectors`' directions, times `Σ α_i ‖v_i‖`.

    Vectors with norm ≤ `tol` take no part in the direction (their α do in the scale).
    Iterates `m ← cos‖τ‖ m + sin‖τ‖ τ/‖τ‖`, `τ = Σ α̂_i θ_i/sin θ_i (u_i − cos θ_i m)`, up to
    `max_iter` times, until ‖τ‖ < `tol`; inputs within angle `tol` of `m` add nothing to `τ`.
    """
    norms = [_norm(v) for v in vectors]
    units = [torch.zeros_like(v) if n == 0 else v / n for v, n in zip(vectors, norms)]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(vectors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    units = [units[i] for i in valid]
    mean = torch.zeros_like(units[0])
    for a, u in zip(weights, units):
        mean.add_(u, alpha=a)
    mean_norm = _norm(mean)
    mean = units[0].clone() if mean_norm < tol else mean / mean_norm
    for _ in range(int(max_iter)):
        tangent = torch.zeros_like(mean)
        for a, u in zip(weights, units):
            cos = max(-1.0, min(1.0, fixed_dot(mean, u)))
            theta = math.acos(cos)
            if theta < tol:
                continue
            tangent.add_(u - mean * cos, alpha=a * theta / math.sin(theta))
        tangent_norm = _norm(tangent)
        if tangent_norm < tol:
            break
        mean = mean * math.cos(tangent_norm) + tangent * (math.sin(tangent_norm) / tangent_norm)
        unit_norm = _norm(mean)
        if unit_norm > tol:
            mean /= unit_norm
    return mean * sum(a * n for a, n in zip(alphas, norms))


@merge_method(
    "karcher",
    needs_base=False,
    min_models=1,
    params=(
        Param("max_iter", default=10, low=0, help="most iterations of the mean on the sphere"),
        Param("tol", default=1e-5, low=0.0, help="stop when the tangent step is shorter; smaller norms and angles count as zero"),
    ),
    paper="Karcher mean merging (arXiv:2603.04972); Karcher 1977, Riemannian center of mass; as in mergekit",
    check=base_not_listed,
)
def karcher(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], *, max_iter: float, tol: float) -> torch.Tensor:
    """Equal-weight Karcher (Fréchet) mean of the models' directions, scaled by their mean norm.

    `u_i = θ_i / ‖θ_i‖`; `m = argmin Σ d(m, u_i)²` on the unit sphere (iterated from the
    normalized mean of the `u_i`); result `(Σ ‖θ_i‖ / N) · m`.

    As in mergekit 0.1.5: every input counts, the base model too when `base_model` is given
    (first); one input is returned unchanged; the whole tensor is one vector; `max_iter` (10)
    and `tol` (1e-5) as there. Whole-tensor sums are in float64.
    """
    inputs = ([base] if base is not None else []) + list(tensors)
    if len(inputs) == 1:
        return inputs[0].clone()
    return karcher_mean(inputs, [1.0 / len(inputs)] * len(inputs), int(max_iter), float(tol))
