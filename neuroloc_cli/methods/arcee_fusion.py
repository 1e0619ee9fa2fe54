"""Arcee Fusion: take the other model's value only where its change from the base matters most."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.ops.blockwise import magnitude_cut
from neuroloc_cli.ops.flat import Input, flat
from neuroloc_cli.ops.sums import pieces

PROB_EPS = 1e-8  # added to both softmax distributions before the KL divergence (mergekit's)
QUARTILES = (0.25, 0.5, 0.75)
_SELECT_FROM = 1 << 17  # scores: from this many on, quartiles by `magnitude_cut` rather than a partition
IQR_FACTOR = 1.5  # threshold = median + 1.5 · (q3 − q1), an outlier fence (mergekit's)


def importance(
    base: torch.Tensor, other: torch.Tensor, out: torch.Tensor | None = None, work: tuple[torch.Tensor, torch.Tensor] | None = None
) -> torch.Tensor:
    """`|θ_1 − θ_0| · KL(softmax(θ_1) ‖ softmax(θ_0))`, the divergence taken along the last
    dimension (one value per row, a 1-D tensor being one row), with 1e-8 added to both
    distributions. Each row is summed by one thread, so the values do not depend on the
    thread count.

    `out` receives the scores and `work` (two tensors of `base`'s shape and dtype) holds the
    distributions; fresh ones are made where they are not given. A caller scoring many pieces
    passes the same ones: fresh megabyte temporaries are handed back to the system and
    faulted in again (scoring a 12M-element tensor piece by piece: 37 ms reused against 43 ms
    fresh, 88 ms on a process's first pass)."""
    p, q = work if work is not None else (torch.empty_like(base), torch.empty_like(base))
    torch.softmax(other, dim=-1, out=p).add_(PROB_EPS)
    torch.softmax(base, dim=-1, out=q).add_(PROB_EPS)
    kl = torch.div(p, q, out=q).log_().mul_(p).sum(dim=-1, keepdim=True)  # Σ p · log(p / q)
    return torch.sub(other, base, out=torch.empty_like(base) if out is None else out).abs_().mul_(kl)


def quantile_index(q: float, n: int) -> int:
    """mergekit's quantile position `int(q · (n − 1))`, the product taken in float32 as PyTorch
    takes it there: the lower neighbour, not an interpolation."""
    return int(np.float32(q) * np.float32(n - 1))


def fusion_threshold(scores: torch.Tensor) -> float:
    """`median + 1.5 · (q3 − q1)` of all the scores, each quartile the exact order statistic
    at `quantile_index` (no sampling, no interpolation), `scores` left as they are.

    For a large float32/float64 tensor of non-negative scores (the usual case: |δ| · KL), each
    quartile is a k-th largest found by `ops.blockwise.magnitude_cut` (a sample brackets it, one
    pass collects the few candidates, a selection among them): linear time and no copy. Smaller
    tensors, and ones with a negative score (a KL rounded below zero), take one NumPy partition
    of a copy; ones with a NaN or of another dtype, `torch.kthvalue`."""
    flat = scores.reshape(-1)
    n = flat.numel()
    at = [quantile_index(q, n) for q in QUARTILES]
    if flat.dtype not in (torch.float32, torch.float64) or bool(flat.isnan().any()):
        q1, median, q3 = (float(torch.kthvalue(flat, i + 1).values) for i in at)
    elif n >= _SELECT_FROM and float(flat.min()) >= 0:
        # the i-th smallest is the (n − i)-th largest, and |s| = s
        q1, median, q3 = (magnitude_cut(None, flat, n - i).value for i in at)
    else:
        values = np.partition(flat.numpy(), sorted(set(at)))
        q1, median, q3 = (float(values[i]) for i in at)
    # the fence is computed in the scores' dtype, as the sorted values are subtracted there
    fence = torch.tensor([median, q3, q1], dtype=scores.dtype)
    return float(fence[0] + IQR_FACTOR * (fence[1] - fence[2]))


@merge_method(
    "arcee_fusion",
    needs_base=True,
    max_models=1,
    paper="Arcee AI, Arcee Fusion (arcee.ai; mergekit's arcee_fusion)",
    reads_in_pieces=True,
)
def arcee_fusion(base: Input, tensors: Sequence[Input]) -> Iterator[torch.Tensor]:
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
    # pieces of whole rows (`ops.sums.pieces`): each row's divergence is its own, so the scores
    # are the same floats as whole-tensor ones; the scores are the only tensor of the tensor's size
    fb, fo = flat(base), flat(tensors[0])
    n = fb.numel()
    if n == 0:
        yield torch.empty(0, dtype=base.dtype)
        return
    cols = base.shape[-1] if len(base.shape) else 1
    rows = list(pieces(n, cols))
    scores = torch.empty(n, dtype=base.dtype)
    work = torch.empty(2, rows[0].stop - rows[0].start, dtype=base.dtype)  # the first piece is the longest
    for c in rows:
        p, q = (w[: c.stop - c.start].view(-1, cols) for w in work)
        importance(fb[c].view(-1, cols), fo[c].view(-1, cols), scores[c].view(-1, cols), (p, q))
    fence = fusion_threshold(scores)
    for c in rows:
        yield (fo[c] - fb[c]).mul_(scores[c] >= fence).add_(fb[c])
