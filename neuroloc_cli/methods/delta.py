"""The weight delta of one model against a base (what `neuroloc delta` writes)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neuroloc_cli.io.checkpoint import Kind
from neuroloc_cli.methods.base import merge_method


@merge_method("delta", elementwise=True, needs_base=True, max_models=1, output_kind=Kind.DELTA)
def delta(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The task vector `Δ = θ_tuned − θ_base`, written as a delta checkpoint."""
    return torch.sub(tensors[0], base)
