"""RAM: average each parameter over the models that changed it (Reinforced Agent Merging)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch

from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.ops.flat import Input, flat
from neuroloc_cli.ops.sums import pieces
from neuroloc_cli.recipe.params import Param

PAPER = "Reinforced Agent Merging, RAM and RAM+ (arXiv:2601.13572); as in mergekit"
EPSILON = Param("epsilon", default=1e-5, low=0.0, help="a task-vector element counts as changed where its magnitude exceeds this")


def _changed(
    base: torch.Tensor, tensors: Sequence[torch.Tensor], epsilon: float
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Each model's task vector with its unchanged elements zeroed, its changed-mask, and per
    element the number of models that changed it."""
    deltas = [t - base for t in tensors]
    changed = [d.abs() > epsilon for d in deltas]
    kept = [d.masked_fill_(~c, 0) for d, c in zip(deltas, changed)]
    counts = torch.stack(changed).sum(dim=0)
    return kept, changed, counts


@merge_method("ram", needs_base=True, elementwise=True, params=(EPSILON,), paper=PAPER)
def ram(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, epsilon: float) -> torch.Tensor:
    """Add to the base each changed parameter's task-vector mean over the models that changed it.

    `θ = θ_0 + Σ_i δ_i·[|δ_i| > ε] / max(1, Σ_i [|δ_i| > ε])`, `δ_i = θ_i − θ_0`.

    As in mergekit 0.1.5 (`epsilon` 1e-5): a parameter changed by one model takes that
    model's change whole (its "unique" part), one changed by several their mean ("shared").
    """
    kept, _, counts = _changed(base, tensors, float(epsilon))
    total = kept[0]
    for d in kept[1:]:
        total.add_(d)
    return total.div_(counts.clamp(min=1)).add_(base)


@merge_method(
    "ramplus_tl",
    needs_base=True,
    params=(
        Param("r", default=0.1, help="gain of the unique parts' rescaling"),
        Param("alpha", default=0.2, low=0.0, help="cap of the shared-to-unique ratio ρ"),
        EPSILON,
    ),
    paper=PAPER,
    reads_in_pieces=True,
)
def ramplus_tl(base: Input, tensors: Sequence[Input], *, r: float, alpha: float, epsilon: float) -> Iterator[torch.Tensor]:
    """RAM with each model's unique changes scaled up by how much it shares, per tensor (RAM+).

    `λ_i = 1 + r · clamp(ρ_i, 0, α)`, `ρ_i = S_i / max(U_i, ε)`, where `S_i` and `U_i` count the
    tensor's elements that model i changes together with others and alone; unique changes are
    multiplied by `λ_i`, shared ones averaged as in `ram`.

    As in mergekit 0.1.5 (`r` 0.1, `alpha` 0.2, `epsilon` 1e-5): the counts are per tensor
    ("tensor-local"), not over the whole model.
    """
    # two passes, piece by piece: the counts S_i and U_i, then the result; the task vectors are
    # recomputed in each. float32 and float64 run compiled loops with the floats of
    # `_ramplus_counts` and `_ramplus_mix` (`ops.kernels.ram_counts`, `ram_mix`)
    eps = float(epsilon)
    flat_base, flats = flat(base), [flat(t) for t in tensors]
    n, m = flat_base.numel(), len(flats)
    fused = base.dtype in (torch.float32, torch.float64)
    if fused:
        from neuroloc_cli.ops import kernels as loops  # Numba, imported only when used

        dt = np.float32 if base.dtype == torch.float32 else np.float64
        shared, unique = np.zeros(m, np.int64), np.zeros(m, np.int64)
        for c in pieces(n):
            loops.ram_counts(flat_base[c].numpy(), torch.stack([t[c] for t in flats]).numpy(), dt(eps), shared, unique)
        shared_n, unique_n = shared.tolist(), unique.tolist()
    else:
        shared_n, unique_n = [0] * m, [0] * m
        for c in pieces(n):
            s, u = _ramplus_counts(flat_base[c], [t[c] for t in flats], eps)
            shared_n, unique_n = [a + b for a, b in zip(shared_n, s)], [a + b for a, b in zip(unique_n, u)]
    scales = [1 + float(r) * min(max(s / max(u, eps), 0.0), float(alpha)) for s, u in zip(shared_n, unique_n)]
    for c in pieces(n):
        if fused:
            out = torch.empty(c.stop - c.start, dtype=base.dtype)
            loops.ram_mix(flat_base[c].numpy(), torch.stack([t[c] for t in flats]).numpy(), dt(eps), np.array(scales, dt), out.numpy())
            yield out
        else:
            yield _ramplus_mix(flat_base[c], [t[c] for t in flats], eps, scales)


def _ramplus_counts(base: torch.Tensor, tuned: Sequence[torch.Tensor], eps: float) -> tuple[list[int], list[int]]:
    """Per model, the elements of one piece it changes (`|δ| > ε`) together with another
    model, and those it changes alone."""
    changed = [(t - base).abs_() > eps for t in tuned]
    shared = _count(changed, torch.int32) > 1
    both = [int(torch.count_nonzero(ch & shared)) for ch in changed]
    return both, [int(torch.count_nonzero(ch)) - b for ch, b in zip(changed, both)]  # a change is shared or unique


def _ramplus_mix(base: torch.Tensor, tuned: Sequence[torch.Tensor], eps: float, scales: Sequence[float]) -> torch.Tensor:
    """One piece of RAM+'s result: unique changes times their model's scale, shared ones
    averaged over the models that made them, plus the base."""
    deltas = [t - base for t in tuned]
    changed = [d.abs() > eps for d in deltas]
    for d, ch in zip(deltas, changed):
        d.masked_fill_(~ch, 0)
    counts = _count(changed, base.dtype)  # small whole numbers: exact in any float dtype
    unique = counts == 1
    divisor = counts.clamp_(min=1)
    total = torch.zeros_like(deltas[0])
    for d, scale in zip(deltas, scales):
        total.add_(torch.where(unique, d * scale, d / divisor))
    return total.add_(base)


def _count(changed: list[torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
    """Per element, how many of the masks are set, as `dtype`."""
    total = changed[0].to(dtype)
    for ch in changed[1:]:
        total += ch
    return total
