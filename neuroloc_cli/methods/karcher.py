"""Karcher mean: the models' weighted Fréchet mean on the unit hypersphere, rescaled."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.methods.nuslerp import base_not_listed
from neuroloc_cli.ops.sums import dot_blocks, fixed_dot, pieces
from neuroloc_cli.recipe.params import Param


def _norm(v: torch.Tensor) -> float:
    return math.sqrt(fixed_dot(v, v))


def karcher_mean(vectors: Sequence[torch.Tensor], alphas: Sequence[float], max_iter: int, tol: float) -> torch.Tensor:
    """The weighted Karcher mean of `vectors`' directions, times `Σ α_i ‖v_i‖`.

    Vectors with norm ≤ `tol` take no part in the direction (their α do in the scale).
    Iterates `m ← cos‖τ‖ m + sin‖τ‖ τ/‖τ‖`, `τ = Σ α̂_i θ_i/sin θ_i (u_i − cos θ_i m)`, up to
    `max_iter` times, until ‖τ‖ < `tol`; inputs within angle `tol` of `m` add nothing to `τ`.
    """
    # piece by piece (`ops.sums.pieces`), the unit vectors recomputed from the inputs in each
    # pass, so that the mean and the tangent are the only full-size tensors made (the same floats)
    flat = [v.reshape(-1) for v in vectors]
    norms = [_norm(v) for v in flat]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros_like(vectors[0])
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]

    def units(c: slice) -> list[torch.Tensor]:
        return [flat[i][c] / norms[i] for i in valid]  # a valid norm is > tol >= 0

    mean = torch.zeros_like(flat[0])
    for c in pieces(mean.numel()):
        for a, u in zip(weights, units(c)):
            mean[c].add_(u, alpha=a)
    mean_norm = _norm(mean)
    if mean_norm < tol:
        mean = flat[valid[0]] / norms[valid[0]]
    else:
        mean /= mean_norm
    tangent = torch.empty_like(mean)
    for _ in range(int(max_iter)):
        blocks: list[list[float]] = [[] for _ in valid]
        for c in pieces(mean.numel()):
            for part, u in zip(blocks, units(c)):
                part += dot_blocks(mean[c], u)
        steps = []
        for a, part in zip(weights, blocks):
            cos = max(-1.0, min(1.0, math.fsum(part)))
            theta = math.acos(cos)
            steps.append(None if theta < tol else (cos, a * theta / math.sin(theta)))
        tangent.zero_()
        for c in pieces(mean.numel()):
            for step, u in zip(steps, units(c)):
                if step is not None:
                    tangent[c].add_(u - mean[c] * step[0], alpha=step[1])
        tangent_norm = _norm(tangent)
        if tangent_norm < tol:
            break
        for c in pieces(mean.numel()):
            mean[c] = mean[c] * math.cos(tangent_norm) + tangent[c] * (math.sin(tangent_norm) / tangent_norm)
        unit_norm = _norm(mean)
        if unit_norm > tol:
            mean /= unit_norm
    return mean.mul_(sum(a * n for a, n in zip(alphas, norms))).view(vectors[0].shape)


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
