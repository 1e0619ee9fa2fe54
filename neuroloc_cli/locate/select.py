"""Choosing the top share of units: exactly `k`, globally or within each tensor, streaming.

Row and FFN importances are small (one float per unit), so a global top-k concatenates them.
Element importances are as large as the model, so the global threshold is found without
holding them: each pass streams every tensor's |Δ| and counts it into histogram bins
(log-spaced first, then linear inside the bin that holds the k-th largest value), until that
bin holds at most `cap` elements; a last counting pass collects its distinct values with their
counts, which gives the k-th largest value exactly. Memory: the bins, one tensor, and at most
`cap` values. Ties at the threshold are taken in stream order, so exactly `k` are selected.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from neuroloc_cli.ops.sparsify import share_count

DEFAULT_CAP = 8_000_000  # values collected at once to settle the threshold (32 MB)
_OCTAVE_BINS = 16
_LOG2_LOW, _LOG2_HIGH = -150, 129  # every positive float32 lies in [2^-150, 2^129)
_LINEAR_BINS = 4096


def top_units(importance: Sequence[torch.Tensor], share: float, scope: str) -> list[torch.Tensor]:
    """BOOL selections of the top `share` of units, over all vectors (global) or each one.

    Args:
        importance: one float vector per unit group.
        share: in (0, 1].
        scope: "global" or "tensor".

    Returns:
        One BOOL vector per input, exactly `share_count(share, n)` True overall (or per
        vector of n units).
    """
    if scope == "tensor":
        return [_top_mask(v, share_count(share, v.numel())) for v in importance]
    flat = torch.cat([v.reshape(-1).float() for v in importance])
    chosen = _top_mask(flat, share_count(share, flat.numel()))
    return list(chosen.split([v.numel() for v in importance]))


def _top_mask(v: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros(v.numel(), dtype=torch.bool)
    if k > 0:
        out[torch.topk(v.reshape(-1).float(), k, sorted=False).indices] = True
    return out.reshape(v.shape)


@dataclass(frozen=True)
class Threshold:
    """The k-th largest value `value`, how many values exceed it, and the passes it took."""

    value: float
    greater: int
    passes: int


def global_threshold(stream: Callable[[], Iterable[torch.Tensor]], k: int, cap: int = DEFAULT_CAP) -> Threshold:
    """The k-th largest of all values yielded by `stream()` (each call streams them anew).

    Args:
        stream: returns an iterable of float32 tensors of non-negative values.
        k: 1 ≤ k ≤ the number of values.
        cap: most values held at once in the last pass.

    Returns:
        The threshold `t` and the count of values > t (so k − greater ties at t complete k).
    """
    edges = torch.cat(
        [
            torch.zeros(1),
            torch.exp2(torch.arange(_LOG2_LOW * _OCTAVE_BINS + 1, _LOG2_HIGH * _OCTAVE_BINS + 1) / _OCTAVE_BINS),
            torch.tensor([float("inf")]),
        ]
    )
    lo, hi, above, passes = 0.0, float("inf"), 0, 0
    while True:
        counts = torch.zeros(edges.numel() - 1, dtype=torch.int64)
        for a in stream():
            a = _within(a.reshape(-1), lo, hi)
            counts += torch.bincount(torch.bucketize(a, edges, right=True) - 1, minlength=counts.numel())[: counts.numel()]
        passes += 1
        from_top = counts.flip(0).cumsum(0).flip(0)  # from_top[b] = count in bins ≥ b
        b = int((above + from_top >= k).nonzero().max())
        above += int(from_top[b + 1]) if b + 1 < counts.numel() else 0
        lo, hi, inside = float(edges[b]), float(edges[b + 1]), int(counts[b])
        finer = torch.linspace(lo, hi, _LINEAR_BINS + 1) if hi != float("inf") else None
        if inside <= cap or finer is None or finer.unique().numel() < 3:
            break
        edges = finer
        edges[-1] = hi
    values, counts = _distinct(stream, lo, hi)
    passes += 1
    desc = torch.argsort(values, descending=True)
    cum = above + counts[desc].cumsum(0)
    j = int((cum >= k).nonzero().min())
    greater = int(cum[j] - counts[desc][j])
    return Threshold(float(values[desc][j]), greater, passes)


def _within(a: torch.Tensor, lo: float, hi: float) -> torch.Tensor:
    if lo == 0.0 and hi == float("inf"):
        return a
    return a[(a >= lo) & (a < hi)]


def _distinct(stream: Callable[[], Iterable[torch.Tensor]], lo: float, hi: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct values in [lo, hi) with their counts, merged over the stream."""
    values, counts = torch.empty(0), torch.empty(0, dtype=torch.int64)
    for a in stream():
        v, c = torch.unique(_within(a.reshape(-1), lo, hi), return_counts=True)
        merged, inverse = torch.unique(torch.cat([values, v]), return_inverse=True)
        total = torch.zeros(merged.numel(), dtype=torch.int64).index_add_(0, inverse, torch.cat([counts, c]))
        values, counts = merged, total
    return values, counts


def threshold_select(a: torch.Tensor, t: Threshold, ties_left: int) -> tuple[torch.Tensor, int]:
    """Select values > t, and the first `ties_left` values == t (stream order).

    Returns:
        (BOOL selection of `a`'s shape, ties still to take in later tensors).
    """
    sel = a > t.value
    if ties_left > 0:
        eq = (a == t.value).reshape(-1).nonzero().reshape(-1)[:ties_left]
        sel.reshape(-1)[eq] = True
        ties_left -= eq.numel()
    return sel, ties_left
