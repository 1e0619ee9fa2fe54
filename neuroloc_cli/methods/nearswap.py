"""NearSwap: take the other model's value where it is near the base's, the base's elsewhere."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.recipe.params import Param

MIN_DISTANCE = 1e-6  # |θ_0 − θ_1| is clamped below at this (mergekit's)


@merge_method(
    "nearswap",
    needs_base=True,
    max_models=1,
    elementwise=True,
    params=(Param("t", low=0.0, help="distance scale: elements closer than t take the other model's value"),),
    paper="alchemonaut, NearSwap (huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001); as in mergekit",
)
def nearswap(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, t: float) -> torch.Tensor:
    """Interpolate each element towards the other model by how near the two values are.

    `w = clamp(t / max(|θ_0 − θ_1|, 1e-6), 0, 1)`; `θ = w·θ_1 + (1 − w)·θ_0`.

    As in mergekit 0.1.5: elements closer than `t` take the other model's value, farther ones
    move towards it by `t / distance`; t = 0 gives the base.
    """
    other = tensors[0]
    w = (float(t) / (base - other).abs().clamp(min=MIN_DISTANCE)).clamp(0, 1)
    return other * w + base * (1 - w)
