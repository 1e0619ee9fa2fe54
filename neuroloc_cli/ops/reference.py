"""The sparsify-and-mix methods in plain PyTorch: the executable specification.

Whole tensors, full sorts and one step per line: everything the fused path
(`neuroloc_cli.ops.blockwise` driving `neuroloc_cli.ops.kernels`) avoids in order to be fast.
The two must agree, and the tests hold the fused path to these functions: the same elements
kept, bit for bit, and the same merged values up to rounding (the loops add in another
order). Each sparsifier's own rule is written beside its fused form in
`neuroloc_cli.ops.sparsify`; what the rules share is here: the top k, the random draws, the
magnitude ranks, and the mix that follows them.

One function here is also a production path: `merge_in_dtype`, the mix rounded op by op in a
half-precision dtype (mergekit's arithmetic), which `neuroloc_cli.methods.gta` runs for a
recipe's `dtype: bfloat16` or `float16`; the fused loops compute in float32 or float64 only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

# splitmix64's increment and multipliers (Steele, Lea & Flood 2014)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)
DRAW_BITS = 24  # a draw is uniform on the 2^24 steps of [0, 1)


@dataclass(frozen=True)
class Kept:
    """What a reference rule keeps of one task vector.

    Attributes:
        mask: the surviving elements (BOOL, the task vector's shape).
        p: for a random draw, the keep probability (a number, or a tensor of the task
            vector's shape) that the papers' rescale divides survivors by; None otherwise.
    """

    mask: torch.Tensor
    p: float | torch.Tensor | None = None


def top_k(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """The `k` largest of `magnitude` as a BOOL mask of its shape; equal values are taken in
    position order, so exactly `k` are kept. A NaN ranks below every number: it is never
    chosen while a number is left."""
    flat = magnitude.reshape(-1)
    flat = torch.where(flat.isnan(), -1.0, flat)
    order = torch.sort(flat, descending=True, stable=True).indices
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[order[:k]] = True
    return mask.reshape(magnitude.shape)


def draws(key: int, n: int) -> torch.Tensor:
    """The draws of random stream `key` at flat positions 0 … n − 1: the top 24 bits of
    splitmix64's output for the state `key + (i + 1)·φ` (mod 2^64), as int64 in [0, 2^24).

    A draw depends on the stream and the position only, so any split of a tensor into blocks
    or threads draws the same numbers."""
    z = np.uint64(key) + np.arange(1, n + 1, dtype=np.uint64) * _GOLDEN  # uint64 wraps mod 2^64
    z = (z ^ (z >> np.uint64(30))) * _MIX1
    z = (z ^ (z >> np.uint64(27))) * _MIX2
    z = (z ^ (z >> np.uint64(31))) >> np.uint64(64 - DRAW_BITS)
    return torch.from_numpy(z.astype(np.int64))


def random_keep(delta: torch.Tensor, p: float | torch.Tensor, key: int) -> torch.Tensor:
    """Keep each element of `delta` with probability `p` (a number, or a tensor of its shape):
    where its draw is below `p · 2^24`, compared in `delta`'s dtype (a probability of p to
    within 2^-24)."""
    u = draws(key, delta.numel()).to(delta.dtype).reshape(delta.shape)
    return u < torch.as_tensor(p, dtype=delta.dtype) * 2**DRAW_BITS


def row_length(shape: Sequence[int]) -> int:
    """The length of the rows that rank-based rules work in: a 1-D tensor is one row."""
    return math.prod(shape) if len(shape) < 2 else math.prod(shape[1:])


def magnitude_ranks(delta: torch.Tensor) -> torch.Tensor:
    """The rank of each element's float32 magnitude within its row (`row_length`), ascending
    from 0, equal magnitudes by position, as float32 of `delta`'s shape."""
    rows = delta.float().abs().reshape(-1, row_length(delta.shape))
    order = rows.argsort(dim=1, stable=True)
    ranks = torch.empty_like(order).scatter_(1, order, torch.arange(rows.shape[1]).expand_as(order).contiguous())
    return ranks.float().reshape(delta.shape)


def merge(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    kept: Sequence[Kept],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    paper_rescale: bool,
    lambda_: float,
) -> torch.Tensor:
    """The family's mix of the kept task vectors, in the base's dtype (float32 arithmetic for
    half precision: the specification of the fused loops; `merge_in_dtype` is the mix rounded
    op by op).

    Args:
        base, tensors: the base tensor and one tensor per model.
        kept: per model, what its sparsifier keeps of `tensor − base`.
        weights: per model, `w_i`.
        consensus: TIES sign election: `sign = +` where `Σ wd_i ≥ 0`, else `−`; only the
            `wd_i` of that sign count (a zero never agrees).
        normalize: divide by the weights of the agreeing models (0 → 1), or without
            consensus by `Σ w_i` (below 1e-8 in magnitude → 1).
        rescale: multiply survivors by `1 / p` (`paper_rescale`, for a random draw), or else
            by the one factor that restores the task vector's L1 norm (none below an L1 norm of 1e-7,
            mergekit's rule; written out here, not taken from the fused path).
        lambda_: the scale of the mixed task vector.

    Returns:
        `base + λ · mixed`, with `wd_i = w_i · rescaled(mask_i · δ_i)` (a dropped infinite
        delta becomes NaN, `inf · 0`, as in mergekit).
    """
    work = base.dtype if base.dtype in (torch.float32, torch.float64) else torch.float32
    b = base.to(work)
    weighted = []
    for tuned, k, w in zip(tensors, kept, weights):
        delta = tuned.to(work) - b
        survivors = delta * k.mask
        if rescale and paper_rescale and k.p is not None:
            survivors = survivors / torch.as_tensor(k.p, dtype=work)
        elif rescale:
            before, after = float(delta.double().abs().sum()), float(survivors.double().abs().sum())
            survivors = survivors * (before / after if before >= 1e-7 and after >= 1e-7 else 1.0)
        weighted.append(w * survivors)
    stack = torch.stack(weighted)
    w = torch.tensor(list(weights), dtype=work).reshape(-1, *[1] * b.dim())
    if consensus:
        sign = torch.where(stack.sum(0) >= 0, 1.0, -1.0)
        agree = torch.sign(stack) == sign
        mixed, divisor = (stack * agree).sum(0), (w * agree).sum(0)
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        total = float(sum(weights))
        mixed, divisor = stack.sum(0), 1.0 if abs(total) < 1e-8 else total
    return (b + lambda_ * (mixed / divisor if normalize else mixed)).to(base.dtype)


def merge_in_dtype(
    base: torch.Tensor,
    deltas: Sequence[torch.Tensor],
    kept: Sequence[Kept | None],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    paper_rescale: bool,
    lambda_: float,
) -> torch.Tensor:
    """The family's mix with every op in the base's dtype, in mergekit 0.1.5's order: what a
    half-precision recipe computes (and, for rules that do not draw, mergekit's bytes).

    Unlike `merge`, nothing is widened: the weights are rounded to the dtype, the L1 norms are
    sums in the dtype (PyTorch accumulates a sum in float32 and rounds the total) and their
    ratio too, and each product, sum and quotient is rounded as PyTorch rounds it.

    Args:
        base: the base tensor, in the dtype the arithmetic runs in.
        deltas: per model, `tuned − base` in that dtype.
        kept: per model, what its sparsifier keeps of that delta; None: everything, unrescaled
            (density 1).
        weights, consensus, normalize, rescale, paper_rescale, lambda_: as in `merge`.

    Returns:
        `base + λ · mixed`, in the base's dtype.
    """
    dtype = base.dtype
    rows = []
    for delta, k in zip(deltas, kept):
        if k is None:
            rows.append(delta)
            continue
        survivors = delta * k.mask.to(dtype)
        if rescale and paper_rescale and k.p is not None:
            survivors = survivors / torch.as_tensor(k.p, dtype=dtype)
        elif rescale:
            before, after = delta.abs().sum(), survivors.abs().sum()
            if not (before < 1e-7 or after < 1e-7):
                survivors = survivors * (before / after)
        rows.append(survivors)
    stack = torch.stack(rows)
    w = torch.tensor(list(weights), dtype=dtype).reshape(-1, *[1] * base.dim())
    stack.mul_(w)
    if consensus:
        majority = (stack.sum(0) >= 0).to(dtype) * 2 - 1
        agree = stack.sign() == majority
        mixed, divisor = (stack * agree).sum(0), (w * agree).sum(0)
        divisor[divisor == 0] = 1
    else:
        mixed, divisor = stack.sum(0), w.sum(0)
        divisor[divisor.abs() < 1e-8] = 1
    if normalize:
        mixed /= divisor
    if lambda_ != 1:
        mixed *= lambda_
    return base + mixed
