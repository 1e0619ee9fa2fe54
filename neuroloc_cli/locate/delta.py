"""The `delta` locator: MAET Eq. 1, importance of a unit = the norm of its change.

`I_j = ‖Θ~_j − Θo_j‖₂` over every slice that makes up unit `j` (see `units`); the top share of
units is kept, over the whole model (`global`, the paper) or within each tensor / MLP block
(`tensor`). Streams: one tensor of each checkpoint is in memory at a time.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from neuroloc_cli.arch import NameFilter, in_blocks
from neuroloc_cli.errors import UsageError
from neuroloc_cli.io.checkpoint import Checkpoint
from neuroloc_cli.io.delta_reader import DeltaReader, check_same_tensors
from neuroloc_cli.locate.base import locator
from neuroloc_cli.locate.select import DEFAULT_CAP, global_threshold, threshold_select, top_units
from neuroloc_cli.locate.units import UnitGroup, element_tensors, every_tensor, ffn_groups, row_groups
from neuroloc_cli.masks.format import GRANULARITIES, LAYOUT_KEY, Mask, MaskEntry, layout_digest
from neuroloc_cli.ops.sparsify import share_count

SCOPES = ("global", "tensor")
PAPER = "Chen et al. 2024, MAET, Eq. 1"


class _Deltas:
    """The base (whose tensors are ranked) and the deltas of the tuned model against it."""

    def __init__(self, base: Path, tuned: Path):
        self.base = Checkpoint.open(base, spec=str(base))
        self.tuned = DeltaReader(tuned, self.base, "TUNED")

    def check(self, names: list[str]) -> None:
        check_same_tensors(names, self.base, [self.tuned.ckpt])

    def read(self, name: str) -> torch.Tensor:
        return self.tuned.read(name)


@locator("delta", paper=PAPER)
def locate_delta(
    base: Path,
    tuned: Path,
    *,
    top: float = 0.05,
    granularity: str = "row",
    scope: str = "global",
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    cap: int = DEFAULT_CAP,
) -> Mask:
    """Units whose weights changed most from BASE to TUNED (MAET Eq. 1).

    Args:
        base: the base checkpoint folder.
        tuned: the trained checkpoint folder (or a delta checkpoint of it).
        top: the share of units to keep, in (0, 1].
        granularity: "row", "ffn" or "element".
        scope: "global" (rank all units of the model together) or "tensor" (each tensor, or
            each MLP block for ffn, keeps its own top share).
        include, exclude: name patterns of the tensors that take part (see
            `arch.NameFilter`); without `include`, rows come from every 2-D weight, token rows
            included, and FFN neurons and elements from the transformer blocks
            (`locate.units`).
        cap: values held at once when settling a global element threshold.

    Returns:
        The mask, listing every tensor that was ranked (selected or not).

    Raises:
        UsageError: a bad share, granularity or scope, or filters that leave no tensor.
        InputError: unreadable checkpoints, missing or mismatched tensors, no MLP for ffn.
    """
    if not 0 < top <= 1:
        raise UsageError(f"--top must be a share in (0, 1], got {top}", hint="e.g. --top 0.05 for 5 %")
    if granularity not in GRANULARITIES:
        raise UsageError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if scope not in SCOPES:
        raise UsageError(f"--scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    keep = NameFilter.of(include, exclude, every_tensor if granularity == "row" else in_blocks)
    deltas = _Deltas(base, tuned)
    provenance = {
        "locator": "delta",
        "importance": "L2 norm of each unit's weight change (MAET Eq. 1)",
        "base": str(Path(base).resolve()),
        "tuned": str(Path(tuned).resolve()),
        "base_fingerprint": deltas.base.fingerprint,
        LAYOUT_KEY: layout_digest({n: t.shape for n, t in deltas.base.tensors.items()}),
        "tuned_fingerprint": deltas.tuned.ckpt.fingerprint,
        "top": top,
        "granularity": granularity,
        "scope": scope,
        "tensors": keep.describe(),
    }
    tensors = deltas.base.tensors
    if granularity == "element":
        units: list = element_tensors(tensors, keep)
    else:
        units = row_groups(tensors, keep) if granularity == "row" else ffn_groups(tensors, str(deltas.base.path), keep)
    if not units:
        raise UsageError(f"--include/--exclude leave no tensor to rank at {granularity} granularity", hint=f"patterns: {keep.describe()}")
    entries, extra = _element_mask(deltas, units, top, scope, cap) if granularity == "element" else _unit_mask(deltas, units, top, scope)
    return Mask(granularity, entries, {**provenance, **extra})


def group_importance(deltas: _Deltas, group: UnitGroup) -> torch.Tensor:
    """`‖Δ_j‖₂` of each unit of a group, summing squares over all its parts' slices."""
    sq = torch.zeros(group.size, dtype=torch.float64)
    for part in group.parts:
        d = deltas.read(part.name)
        dims = [i for i in range(d.dim()) if i != part.axis]
        # squares in float32 are exact enough; the float64 sum keeps millions of them apart
        sq += d.square_().sum(dim=dims, dtype=torch.float64) if dims else d.square_().double()
    return sq.sqrt()


def _unit_mask(deltas: _Deltas, groups: list[UnitGroup], top: float, scope: str) -> tuple[dict[str, MaskEntry], dict]:
    deltas.check([p.name for g in groups for p in g.parts])
    importance = [group_importance(deltas, g) for g in groups]
    chosen = top_units(importance, top, scope)
    entries = {}
    for g, sel in zip(groups, chosen):
        for p in g.parts:
            entries[p.name] = MaskEntry(deltas.base.tensors[p.name].shape, p.axis, sel.clone())
    units = sum(g.size for g in groups)
    return entries, {"units": units, "selected_units": int(sum(int(s.sum()) for s in chosen))}


def _element_mask(deltas: _Deltas, names: list[str], top: float, scope: str, cap: int) -> tuple[dict[str, MaskEntry], dict]:
    deltas.check(names)
    shapes = {n: deltas.base.tensors[n].shape for n in names}
    if scope == "tensor":
        entries = {}
        for n in names:
            a = deltas.read(n).abs_()
            entries[n] = MaskEntry(shapes[n], None, top_units([a], top, "tensor")[0])
        return entries, {"units": sum(e.units for e in entries.values()), "selected_units": sum(e.selected_units for e in entries.values())}

    def stream() -> Iterator[torch.Tensor]:
        for n in names:
            yield deltas.read(n).abs_()

    total = sum(deltas.base.tensors[n].numel for n in names)
    k = share_count(top, total)
    entries = {}
    if k == 0:
        return {n: MaskEntry(shapes[n], None, torch.zeros(shapes[n], dtype=torch.bool)) for n in names}, {
            "units": total,
            "selected_units": 0,
            "k": 0,
        }
    t = global_threshold(stream, k, cap)
    ties = k - t.greater
    for n, a in zip(names, stream()):
        sel, ties = threshold_select(a, t, ties)
        entries[n] = MaskEntry(shapes[n], None, sel)
    return entries, {"units": total, "selected_units": k, "k": k, "threshold": t.value, "passes": t.passes + 1}
