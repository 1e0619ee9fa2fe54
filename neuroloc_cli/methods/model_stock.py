"""Model Stock: move from the base towards the fine-tunes' average by an angle-derived ratio."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.ops.sums import fixed_dot
from neuroloc_cli.recipe.params import Param


@merge_method(
    "model_stock",
    needs_base=True,
    min_models=2,
    params=(Param("filter_wise", default=False, boolean=True, help="one ratio per row instead of per tensor"),),
    paper="Jang et al. 2024, Model Stock (arXiv:2403.19522)",
)
def model_stock(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, filter_wise: bool) -> torch.Tensor:
    """Move from the base towards the fine-tunes' mean by a ratio set by their angle.

    `θ_H = t · mean_i θ_i + (1 − t) · θ_0` with `t = N cos Ω / (1 + (N − 1) cos Ω)`, where
    `cos Ω` is the mean pairwise cosine between the task vectors `θ_i − θ_0`.

    Jang et al. 2024 (arXiv:2403.19522) derive `t` for the angle between two fine-tunes and
    assume all pairwise angles equal; mergekit (and we) average the pairwise cosines, each
    clamped to [−1, 1] with norms clamped below at 1e-6. `filter_wise: true` computes one
    ratio per row (last dimension; a 1-D tensor is one row). An all-zero task vector gives
    cos 0, so t = 0 and the base is kept; where `1 + (N − 1) cos Ω` is 0 we also keep the
    base (mergekit would write inf/NaN).
    """
    shape = base.shape
    if filter_wise and base.dim() >= 2 and base.shape[0] > 1:  # row sums: PyTorch gives each row to one thread
        view = lambda w: w  # noqa: E731
        dot = lambda x, y: (x * y).sum(dim=-1)  # noqa: E731
    else:  # one sum over the whole tensor, in a fixed order (`ops.sums`)
        view = lambda w: w.reshape(-1)  # noqa: E731
        dot = lambda x, y: torch.tensor(fixed_dot(x, y), dtype=x.dtype)  # noqa: E731
    w0 = view(base)
    offsets = [view(w) - w0 for w in tensors]
    norms = [dot(o, o).sqrt() for o in offsets]
    cosines = []
    for i in range(len(offsets)):
        for j in range(i + 1, len(offsets)):
            cosines.append((dot(offsets[i], offsets[j]) / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1, 1))
    cos = torch.stack(cosines).mean(dim=0).unsqueeze(-1)
    n = len(tensors)
    denominator = 1 + (n - 1) * cos
    ratio = torch.where(denominator == 0, torch.zeros_like(cos), n * cos / torch.where(denominator == 0, 1, denominator))
    average = view(torch.stack(list(tensors)).mean(dim=0))
    return (ratio * average + (1 - ratio) * w0).reshape(shape)
