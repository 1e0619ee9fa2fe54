"""Arcee Fusion: take the other model's value only where its change from the base matters most."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.ops.sums import pieces

PROB_EPS = 1e-8  # added to both softmax distributions before the KL divergence (mergekit's)
QUARTILES = (0.25, 0.5, 0.75)
IQR_FACTOR = 1.5  # threshold = median + 1.5 · (q3 − q1), an outlier fence (mergekit's)


def importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """`|θ_1 − θ_0| · KL(softmax(θ_1) ‖ softmax(θ_0))`, the divergence taken along the last
    dimension (one value per row, a 1-D tensor being one row), with 1e-8 added to both
    distributions. Each row is summed by one thread, so the values do not depend on the
    thread count."""
    p = torch.softmax(other, dim=-1).add_(PROB_EPS)
    q = torch.softmax(base, dim=-1).add_(PROB_EPS)
    kl = (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    del p, q
    return (other - base).abs_().mul_(kl)


def quantile_index(q: float, n: int) -> int:
    """mergekit's quantile position `int(q · (n − 1))`, the product taken in float32 as PyTorch
    takes it there: the lower neighbour, not an interpolation."""
    return int(np.float32(q) * np.float32(n - 1))


def fusion_threshold(scores: torch.Tensor) -> float:
    """`median + 1.5 · (q3 − q1)` of all the scores, each quartile the exact order statistic
    at `quantile_index` (a k-th value selection on the flattened tensor, no sampling): one
    `np.partition` at the three positions (one copy of the scores), or `torch.kthvalue` where
    a score is NaN or the dtype is not NumPy's."""
    flat = scores.reshape(-1)
    at = [quantile_index(q, flat.numel()) for q in QUARTILES]
    if flat.dtype in (torch.float32, torch.float64) and not bool(flat.isnan().any()):
        part = np.partition(flat.numpy(), sorted(set(at)))
        q1, median, q3 = (float(part[i]) for i in at)
        del part
    else:
        q1, median, q3 = (float(torch.kthvalue(flat, i + 1).values) for i in at)
    # the fence is computed in the scores' dtype, as the sorted values are subtracted there
    fence = torch.tensor([median, q3, q1], dtype=scores.dtype)
    return float(fence[0] + IQR_FACTOR * (fence[1] - fence[2]))


@merge_method(
    "arcee_fusion",
    needs_base=True,
    max_models=1,
    paper="Arcee AI, Arcee Fusion (arcee.ai; mergekit's arcee_fusion)",
)
def arcee_fusion(base: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Take the other model's elements whose importance reaches an outlier fence, the base's elsewhere.

    `s = |θ_1 − θ_0| · KL(softmax(θ_1) ‖ softmax(θ_0))` per element (the divergence one value
    per row, along the last dimension); `τ = median(s) + 1.5 · (q3(s) − q1(s))`; `θ = θ_0 +
    (θ_1 − θ_0) · [s ≥ τ]`.

    As in mergekit 0.1.5, which has no parameters for it: the quartiles are order statistics
    at `int(q · (n − 1))` (no interpolation), over the whole tensor. mergekit estimates them
    from a random sample of 1,000,000 elements (drawn with replacement) for larger tensors;
    neuroloc always takes the exact values, so it agrees with mergekit on tensors of up to a
    million elements and is deterministic on all.
    """
    # row blocks (`ops.sums.pieces` of rows): each row's divergence is its own, so the scores
    # and the result are the same floats as whole-tensor ones, without their temporaries
    other = tensors[0]
    b2 = base.reshape(-1, base.shape[-1]) if base.dim() else base.reshape(1, 1)
    o2 = other.reshape(b2.shape)
    blocks = [slice(c.start // b2.shape[1], c.stop // b2.shape[1]) for c in pieces(b2.numel(), b2.shape[1])] if b2.shape[1] else []
    scores = torch.empty_like(b2)
    for r in blocks:
        scores[r] = importance(b2[r], o2[r])
    keep = scores >= fusion_threshold(scores)
    del scores
    out = torch.empty_like(b2)
    for r in blocks:
        out[r] = (o2[r] - b2[r]).mul_(keep[r]).add_(b2[r])
    return out.view(base.shape)
