"""NuSLERP: spherical interpolation of two models, or of their task vectors from a base."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.ops.flat import Input, flat, whole
from neuroloc_cli.ops.sums import fixed_dot, fixed_gram, pieces
from neuroloc_cli.recipe.params import Param

NORM_EPS = 1e-7  # norms are clamped below at this before normalizing (mergekit's)
COLINEAR_EPS = 1e-8  # rows with 1 − cos² ≤ this² are interpolated linearly (mergekit's)
WEIGHT_EPS = 1e-6  # weights summing to less than this in magnitude give t = 0.5 (mergekit's)


def base_not_listed(recipe) -> list[str]:
    """For methods whose base is optional: the base model may not also be one of `models:`.

    mergekit drops such an entry (the base is not an input); neuroloc, which passes the base
    only when a method needs one, would count it as a model, so it refuses the recipe instead.
    """
    if recipe.base_model is None:
        return []
    return [
        f"models[{i}]: is the base model; {recipe.merge_method} with a base_model takes the other models only (remove this entry)"
        for i, m in enumerate(recipe.models or [])
        if m.model == recipe.base_model
    ]


def interpolation_t(weight: Sequence[float]) -> float:
    """mergekit's `t = w_2 / (w_1 + w_2)`, or 0.5 where the weights sum to ~0."""
    total = sum(weight)
    return 0.5 if abs(total) < WEIGHT_EPS else weight[1] / total


def _rows(v: torch.Tensor, row_wise: bool) -> torch.Tensor:
    """The vectors that are interpolated without `nuslerp_flatten`, one per row of the result."""
    if row_wise:  # mergekit's `dim=0`: the vectors run along the first dimension
        v = v.transpose(0, -1).contiguous()
    return v.reshape(-1, v.shape[-1]) if v.dim() else v.reshape(1, 1)


def _unrows(out: torch.Tensor, like: torch.Tensor, row_wise: bool) -> torch.Tensor:
    if not row_wise or like.dim() < 2:
        return out.reshape(like.shape)
    shape = list(like.transpose(0, -1).shape)
    return out.reshape(shape).transpose(0, -1).contiguous()


def slerp_rows(v0: torch.Tensor, v1: torch.Tensor, t: float) -> torch.Tensor:
    """Spherical interpolation of each row of `v0` towards the same row of `v1` (2-D tensors).

    Rows are normalized with norms clamped at 1e-7; rows with `1 − cos² ≤ 1e-16` (colinear)
    are interpolated linearly. Dots are taken in float64, in a fixed order for a single row.
    """
    if v0.shape[0] == 1:  # one vector (a flattened tensor): sums in a fixed order (`ops.sums`)
        dots = torch.tensor([[fixed_dot(v0, v0), fixed_dot(v1, v1), fixed_dot(v0, v1)]], dtype=torch.float64)
    else:  # one sum per row, each row summed by one thread
        a, b = v0.double(), v1.double()
        dots = torch.stack([(a * a).sum(-1), (b * b).sum(-1), (a * b).sum(-1)], dim=-1)
    s0, s1 = slerp_scales(dots, t, v0.dtype)
    return v0 * s0 + v1 * s1


def slerp_scales(dots: torch.Tensor, t: float, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the factors of `v0` and `v1` (columns, in `dtype`) from its float64
    `[⟨v0, v0⟩, ⟨v1, v1⟩, ⟨v0, v1⟩]` (one row of `dots` per vector)."""
    n0, n1 = dots[:, 0].sqrt().clamp(min=NORM_EPS), dots[:, 1].sqrt().clamp(min=NORM_EPS)
    cos = (dots[:, 2] / (n0 * n1)).clamp(-1, 1)
    colinear = (1 - cos.square()) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0, cos))
    sin = torch.where(colinear, 1, torch.sin(theta))
    s0 = torch.where(colinear, 1 - t, torch.sin((1 - t) * theta) / sin).unsqueeze(-1).to(dtype)
    s1 = torch.where(colinear, t, torch.sin(t * theta) / sin).unsqueeze(-1).to(dtype)
    return s0, s1


@merge_method(
    "nuslerp",
    needs_base=False,
    min_models=2,
    max_models=2,
    params=(
        Param("weight", per_model=True, help="weight of each model; t = w_2 / (w_1 + w_2)"),
        Param("nuslerp_row_wise", default=False, boolean=True, help="without flatten: vectors along the first dimension (columns)"),
        Param("nuslerp_flatten", default=True, boolean=True, help="one interpolation of the whole flattened tensor"),
    ),
    paper="mergekit's NuSLERP (arcee-ai/mergekit); Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH)",
    check=base_not_listed,
    reads_in_pieces=True,
)
def nuslerp(
    base: Input | None,
    tensors: Sequence[Input],
    *,
    weight: Sequence[float],
    nuslerp_row_wise: bool,
    nuslerp_flatten: bool,
) -> Iterator[torch.Tensor]:
    """Spherical interpolation of two models by their weights, or of their task vectors from a base.

    `t = w_2 / (w_1 + w_2)`; `slerp(v_1, v_2, t) = (sin((1−t)Ω) v_1 + sin(tΩ) v_2) / sin Ω`, with
    `v_i = θ_i` without a base and `v_i = θ_i − θ_0` (and `θ_0 +` the result) with one.

    As in mergekit 0.1.5: with `nuslerp_flatten` (default) the whole tensor is one vector;
    without it each row is (the last dimension), or with `nuslerp_row_wise` each column (the
    first dimension). Norms are clamped at 1e-7, colinear vectors (`1 − cos² ≤ 1e-16`) are
    interpolated linearly, and weights summing to ~0 (|Σ| < 1e-6) give t = 0.5.

    The flattened interpolation reads its inputs piece by piece (two passes: the dot products,
    then the result); the row and column modes take the tensors whole.
    """
    t = interpolation_t(weight)
    if nuslerp_flatten:
        yield from _slerp_flat(base, tensors[0], tensors[1], t)
        return
    row_wise = bool(nuslerp_row_wise)
    b, v0, v1 = None if base is None else whole(base), whole(tensors[0]), whole(tensors[1])
    if b is not None:
        v0, v1 = v0 - b, v1 - b
    out = _unrows(slerp_rows(_rows(v0, row_wise), _rows(v1, row_wise), t), v0, row_wise)
    yield out if b is None else out.add_(b)


def _slerp_flat(base: Input | None, x0: Input, x1: Input, t: float) -> Iterator[torch.Tensor]:
    """`slerp_rows` of the whole flattened tensors (task vectors when `base` is given), plus
    the base: the same floats, worked out piece by piece (`ops.sums.pieces`), the task vectors
    recomputed in each of the two passes."""
    f0, f1 = flat(x0), flat(x1)
    fb = None if base is None else flat(base)

    def vectors(c: slice) -> tuple[torch.Tensor, torch.Tensor]:
        return (f0[c], f1[c]) if fb is None else (f0[c] - fb[c], f1[c] - fb[c])

    gram = fixed_gram(f0.numel(), 2, vectors)
    dots = torch.tensor([[gram[0][0], gram[1][1], gram[0][1]]], dtype=torch.float64)
    s0, s1 = slerp_scales(dots, t, x0.dtype)
    for c in pieces(f0.numel()):
        a, b = vectors(c)
        out = (a * s0 + b * s1).reshape(-1)
        yield out if fb is None else out.add_(fb[c])
