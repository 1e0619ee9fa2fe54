"""Karcher mean: the models' weighted Fréchet mean on the unit hypersphere, rescaled."""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.methods.nuslerp import base_not_listed
from neuroloc_cli.ops.flat import Input, flat
from neuroloc_cli.ops.sums import fixed_gram, gram_product, gram_quadratic, pieces
from neuroloc_cli.recipe.params import Param


def karcher_coefficients(gram: Sequence[Sequence[float]], alphas: Sequence[float], max_iter: int, tol: float) -> list[float]:
    """The weighted Karcher mean of vectors' directions, times `Σ α_i ‖v_i‖`, as coefficients
    `c_i` of the vectors (the mean is `Σ c_i v_i`), from their Gram matrix.

    Vectors with norm ≤ `tol` take no part in the direction (their α do in the scale).
    Iterates `m ← cos‖τ‖ m + sin‖τ‖ τ/‖τ‖`, `τ = Σ α̂_i θ_i/sin θ_i (u_i − cos θ_i m)`, up to
    `max_iter` times, until ‖τ‖ < `tol`; inputs within angle `tol` of `m` add nothing to `τ`.
    Every iterate is a combination of the unit vectors `u_i`, so each is kept as its
    coefficients and every norm and angle is read off the Gram matrix, in float64.
    """
    count = len(gram)
    norms = [math.sqrt(gram[i][i]) for i in range(count)]
    valid = [i for i, x in enumerate(norms) if x > tol]
    if not valid:
        return [0.0] * count
    total = sum(alphas[i] for i in valid)
    weights = [alphas[i] / total for i in valid]
    units = [[gram[i][j] / (norms[i] * norms[j]) for j in valid] for i in valid]  # ⟨u_i, u_j⟩, a valid norm is > tol >= 0
    k = len(valid)

    def length(a: list[float]) -> float:
        return math.sqrt(max(gram_quadratic(units, a), 0.0))

    start = length(weights)  # of the weighted mean of the unit vectors
    mean = [1.0] + [0.0] * (k - 1) if start < tol else [a / start for a in weights]
    for _ in range(int(max_iter)):
        tangent = [0.0] * k
        along = 0.0  # the tangent's part along m: Σ step_i cos θ_i
        for i, (a, cos) in enumerate(zip(weights, gram_product(units, mean))):
            cos = max(-1.0, min(1.0, cos))
            theta = math.acos(cos)
            if theta >= tol:
                step = a * theta / math.sin(theta)
                tangent[i] += step
                along += step * cos
        tangent = [t - along * m for t, m in zip(tangent, mean)]
        tangent_norm = length(tangent)
        if tangent_norm < tol:
            break
        cos, sinc = math.cos(tangent_norm), math.sin(tangent_norm) / tangent_norm
        mean = [m * cos + t * sinc for m, t in zip(mean, tangent)]
        unit = length(mean)
        if unit > tol:
            mean = [m / unit for m in mean]
    scale = math.fsum(a * x for a, x in zip(alphas, norms))
    out = [0.0] * count
    for i, m in zip(valid, mean):
        out[i] = scale * m / norms[i]
    return out


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
    reads_in_pieces=True,
)
def karcher(base: Input | None, tensors: Sequence[Input], *, max_iter: float, tol: float) -> Iterator[torch.Tensor]:
    """Equal-weight Karcher (Fréchet) mean of the models' directions, scaled by their mean norm.

    `u_i = θ_i / ‖θ_i‖`; `m = argmin Σ d(m, u_i)²` on the unit sphere (iterated from the
    normalized mean of the `u_i`); result `(Σ ‖θ_i‖ / N) · m`.

    As in mergekit 0.1.5: every input counts, the base model too when `base_model` is given
    (first); one input is returned unchanged; the whole tensor is one vector; `max_iter` (10)
    and `tol` (1e-5) as there. Two passes over the inputs: their Gram matrix (float64,
    `ops.sums.fixed_gram`), from which the mean is iterated (`karcher_coefficients`), then the
    result `Σ c_i θ_i`.
    """
    inputs = [flat(x) for x in ([base] if base is not None else []) + list(tensors)]
    n = inputs[0].numel()
    if len(inputs) == 1:
        yield from (inputs[0][c] for c in pieces(n))
        return
    gram = fixed_gram(n, len(inputs), lambda c: [x[c] for x in inputs])
    coefficients = karcher_coefficients(gram, [1.0 / len(inputs)] * len(inputs), int(max_iter), float(tol))
    for c in pieces(n):
        out = torch.zeros_like(inputs[0][c])
        for x, k in zip(inputs, coefficients):
            if k:
                out.add_(x[c], alpha=k)
        yield out
