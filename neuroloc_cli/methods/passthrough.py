"""Passthrough: copy one model's tensors, optionally scaled; with `slices:`, layer stacking."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.recipe.params import Param


@merge_method(
    "passthrough",
    needs_base=False,
    max_models=1,
    params=(Param("scale", default=1.0, per_model=True, help="multiply the tensor by this"),),
    paper="Goddard et al. 2024, Arcee's MergeKit (arXiv:2403.13257)",
)
def passthrough(base: torch.Tensor | None, tensors: Sequence[torch.Tensor], *, scale: Sequence[float]) -> torch.Tensor:
    """Each output tensor is one input tensor, times `scale` (default 1: an exact copy).

    With `slices:` the recipe stacks layer ranges of several models ("frankenmerges"): output
    layers are renumbered in order, embeddings come from the first slice's model, the final
    norm and head from the last slice's, and config.json gets the new layer count (mergekit's
    conventions). `scale` takes filters, e.g. `{filter: o_proj, value: 0.5}`.
    """
    return tensors[0] if scale[0] == 1 else torch.mul(tensors[0], scale[0])
