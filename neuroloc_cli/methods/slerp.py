"""SLERP: spherical linear interpolation between the base model and one other model."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.ops.sums import fixed_dot
from neuroloc_cli.recipe.params import Param

DOT_THRESHOLD = 0.9995  # above this |cos| the two tensors count as colinear: plain lerp (mergekit's)
NORM_EPS = 1e-8  # tensors with a smaller norm are not normalized (mergekit's)


@merge_method(
    "slerp",
    needs_base=True,
    max_models=1,
    params=(Param("t", help="0 gives the base model, 1 the other model"),),
    paper="Shoemake 1985, Animating rotation with quaternion curves (SIGGRAPH); White 2016 (arXiv:1609.04468)",
)
def slerp(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, t: float) -> torch.Tensor:
    """Spherical interpolation of each tensor from the base (t = 0) to the other model (t = 1).

    `sin((1−t)Ω)/sin Ω · θ_0 + sin(tΩ)/sin Ω · θ_1`, Ω the angle between the two tensors.

    Shoemake 1985. As in mergekit: the angle is taken between the flattened tensors
    (normalized when their norm exceeds 1e-8), nearly colinear tensors (|cos Ω| > 0.9995) are
    interpolated linearly, and `models:` may list the base model too (it is the start point).
    """
    v0, v1 = base, tensors[0]
    n0, n1 = fixed_dot(v0, v0) ** 0.5, fixed_dot(v1, v1) ** 0.5
    dot = fixed_dot(v0, v1)
    dot /= (n0 if n0 > NORM_EPS else 1.0) * (n1 if n1 > NORM_EPS else 1.0)
    if abs(dot) > DOT_THRESHOLD:
        return torch.lerp(v0, v1, float(t)) if v0.is_floating_point() else v0
    omega = math.acos(max(-1.0, min(1.0, dot)))
    s0 = math.sin((1 - t) * omega) / math.sin(omega)
    s1 = math.sin(t * omega) / math.sin(omega)
    return torch.mul(v0, s0).add_(v1, alpha=s1)
