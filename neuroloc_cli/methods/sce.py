"""SCE: select high-variance elements, calculate per-model weights, erase minority signs."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch

from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.ops.blockwise import magnitude_cut
from neuroloc_cli.ops.flat import Input, flat
from neuroloc_cli.ops.reference import top_k
from neuroloc_cli.ops.sums import dot_blocks, pieces, product_blocks
from neuroloc_cli.recipe.params import Param

WEIGHT_EPS = 1e-6  # model weights summing to less give equal weights; the divisor's floor (mergekit's)


def selected_count(nonzero: int, share: float) -> int:
    """mergekit's `int(count_nonzero(var) · select_topk)`, the product taken in float32 as
    PyTorch takes it there (so 0.29 of 100 selects 29, where neuroloc's `share_count` gives 28)."""
    return int(np.float32(nonzero) * np.float32(share))


def select_mask(base: Input, tensors: Sequence[Input], share: float) -> torch.Tensor:
    """The elements (of the flat tensors) whose task-vector variance across models is among the
    largest `share` of the elements with non-zero variance (ties in position order).

    The variance is computed piece by piece into one buffer, and the k-th largest found by
    `ops.blockwise.magnitude_cut` (a sample, one pass, a selection among the candidates), not
    by a sort: the mask of `ops.reference.top_k`, which remains the path for variances with a
    NaN (it ranks them) and for half precision. The mask is built piece by piece, so the
    variance and the mask are the only tensors of the tensor's size.
    """
    n = base.numel()
    var = torch.empty(n, dtype=base.dtype)
    if len(tensors) == 2 and base.dtype in (torch.float32, torch.float64):
        from neuroloc_cli.ops import kernels as loops  # Numba, imported only when used

        nonzero = nans = 0
        for c in pieces(n):  # `_variance`'s floats in one loop, which counts as it goes
            counts = loops.sce_variance2(base[c].numpy(), tensors[0][c].numpy(), tensors[1][c].numpy(), var[c].numpy())
            nonzero, nans = nonzero + counts[0], nans + counts[1]
    else:
        for c in pieces(n):
            var[c] = _variance([t[c] - base[c] for t in tensors])
        nonzero, nans = int(torch.count_nonzero(var)), int(var.isnan().sum())
    k = selected_count(nonzero, share) if share > 0 else 0
    if var.dtype not in (torch.float32, torch.float64) or nans:
        return top_k(var.abs(), k)
    cut = magnitude_cut(None, var, k)  # |var| = var: it is never negative
    keep = torch.empty(n, dtype=torch.bool)
    last = n - 1 if cut.last_tie is None else cut.last_tie
    for c in pieces(n):
        piece = var[c]
        keep[c] = piece > cut.value
        if c.start <= last:
            ties = piece[: last + 1 - c.start] == cut.value
            keep[c][: ties.numel()] |= ties
    return keep


def _variance(deltas: list[torch.Tensor]) -> torch.Tensor:
    """`torch.var(torch.stack(deltas), dim=0, unbiased=False)`, the same floats. For two float32
    or float64 tensors it is written out as PyTorch's CPU kernel computes it (Welford's update
    in float64, twice: `δ = x_1 − x_0`, `mean = x_0 + δ / 2`, `m2 = δ · (x_1 − mean)`, `var = m2 / 2`),
    about ten times faster than the strided reduction over the stack."""
    if len(deltas) != 2 or deltas[0].dtype not in (torch.float32, torch.float64):
        return torch.var(torch.stack(deltas), dim=0, unbiased=False)
    a, b = deltas[0].double(), deltas[1].double()
    d = b - a
    mean = a + d / 2.0
    return (b - mean).mul_(d).div_(2.0).to(deltas[0].dtype)


@merge_method(
    "sce",
    needs_base=True,
    params=(Param("select_topk", default=1.0, low=0.0, high=1.0, help="share of elements kept, by variance across models"),),
    paper="Wan et al. 2024, FuseChat: Knowledge fusion of chat models, SCE (arXiv:2408.07990)",
    reads_in_pieces=True,
)
def sce(base: Input, tensors: Sequence[Input], *, select_topk: float) -> Iterator[torch.Tensor]:
    """Keep the task-vector elements that vary most across models, weight models by their
    mean squared task vector, and average the ones agreeing with the elected sign.

    `δ_i = θ_i − θ_0`, times the selection mask when `select_topk` < 1; `w_i = mean(δ_i²) /
    Σ_j mean(δ_j²)`; sign `s = sign⁺(Σ δ_i)`; `θ = θ_0 + Σ w_i a_i δ_i / max(Σ w_i a_i, 1e-6)`
    with `a_i = [sign(δ_i) = s]` (zeros never agree).

    Wan et al. 2024 (arXiv:2408.07990), as in mergekit 0.1.5: selection, weights and signs are
    per tensor; weights summing to < 1e-6 become 1/N; the selected count is
    `int(nonzero · select_topk)` in float32, of the elements whose variance is non-zero.

    The task vectors are recomputed piece by piece (`ops.sums.pieces`) in each pass: the
    variance, the weights, the result; whole-tensor sums in float64 in a fixed order.
    """
    flat_base, flats = flat(base), [flat(t) for t in tensors]
    n, share = flat_base.numel(), float(select_topk)
    keep = select_mask(flat_base, flats, share) if share < 1 else None

    def deltas(c: slice) -> list[torch.Tensor]:
        ds = [t[c] - flat_base[c] for t in flats]
        return ds if keep is None else [d.mul_(keep[c]) for d in ds]  # mergekit's `δ · mask`

    energy = [e / max(n, 1) for e in _energies(flat_base, flats, keep, deltas)]
    total = sum(energy)
    weights = [1.0 / len(flats)] * len(flats) if abs(total) < WEIGHT_EPS else [e / total for e in energy]
    if base.dtype in (torch.float32, torch.float64):  # `_mix`'s floats in one loop (`ops.kernels.sce_mix`)
        from neuroloc_cli.ops import kernels as loops

        dt = np.float32 if base.dtype == torch.float32 else np.float64
        w, eps = np.array(weights, dt), dt(WEIGHT_EPS)
        for c in pieces(n):
            out = torch.empty(c.stop - c.start, dtype=base.dtype)
            tuned = torch.stack([t[c] for t in flats]).numpy()
            loops.sce_mix(flat_base[c].numpy(), tuned, _mask(keep, c), keep is not None, w, eps, out.numpy())
            yield out
        return
    for c in pieces(n):
        yield _mix(flat_base[c], deltas(c), weights)


def _energies(
    base: Input, tensors: Sequence[Input], keep: torch.Tensor | None, deltas: Callable[[slice], list[torch.Tensor]]
) -> list[float]:
    """`‖δ_i‖²` of each model's (selected) task vector, as `ops.sums.fixed_dot(δ_i, δ_i)`
    gives it; for float32 and float64, the float64 squares are made by a compiled loop
    (`ops.kernels.sce_squares`) and summed as `dot_blocks` sums its products."""
    blocks: list[list[float]] = [[] for _ in tensors]
    if base.dtype not in (torch.float32, torch.float64):
        for c in pieces(base.numel()):
            for part, d in zip(blocks, deltas(c)):
                part += dot_blocks(d, d)
        return [math.fsum(part) for part in blocks]
    from neuroloc_cli.ops import kernels as loops

    cs = list(pieces(base.numel()))
    squares = torch.empty(cs[0].stop if cs else 0, dtype=torch.float64)  # one piece, reused: the first is the longest
    for c in cs:
        sq = squares[: c.stop - c.start]
        for part, t in zip(blocks, tensors):
            loops.sce_squares(base[c].numpy(), t[c].numpy(), _mask(keep, c), keep is not None, sq.numpy())
            part += product_blocks(sq)
    return [math.fsum(part) for part in blocks]


def _mask(keep: torch.Tensor | None, c: slice) -> np.ndarray:
    """The compiled loops' view of the selection at piece `c` (an empty array when all is kept)."""
    return np.empty(0, np.bool_) if keep is None else keep[c].numpy()


def _mix(base: torch.Tensor, deltas: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """The erase-and-mix of one piece: the elected sign of the summed task vectors, and `base
    + Σ w_i a_i δ_i / max(Σ w_i a_i, 1e-6)` over the vectors that agree with it."""
    mass = deltas[0].clone()
    for d in deltas[1:]:
        mass.add_(d)
    elected = torch.where(mass >= 0, 1.0, -1.0).to(base.dtype)
    merged, divisor = torch.zeros_like(mass), torch.zeros_like(mass)
    for d, w in zip(deltas, weights):
        agree = (torch.sign(d) == elected).to(base.dtype) * w
        merged.add_(d * agree)
        divisor.add_(agree)
    return merged.div_(divisor.clamp(min=WEIGHT_EPS)).add_(base)
