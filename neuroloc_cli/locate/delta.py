"""The `delta` locator: MAET Eq. 1, importance of a unit = the norm of its change.

`I_j = ‖Θ~_j − Θo_j‖₂` over every slice that makes up unit `j` (see `units`); the top share of
units is kept, over the whole model (`global`, the paper) or within each tensor / MLP block
(`tensor`). Score, then select: `DeltaScores` gives `|Δ|` per element with an L2 aggregate,
and `locate.select` picks the units (optionally writing the scores as an importance file).
Streams: one tensor of each checkpoint is in memory at a time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from neuroloc_cli.arch import NameFilter, in_blocks
from neuroloc_cli.errors import UsageError
from neuroloc_cli.io.checkpoint import Checkpoint
from neuroloc_cli.io.delta_reader import DeltaReader, check_same_tensors
from neuroloc_cli.locate.base import ARGUMENT, INTERNAL, FilterOptions, locator
from neuroloc_cli.locate.select import DEFAULT_CAP, check_selection, select_units
from neuroloc_cli.locate.units import UnitGroup, element_tensors, every_tensor, ffn_groups, floating, row_groups
from neuroloc_cli.masks.format import LAYOUT_KEY, Mask, layout_digest
from neuroloc_cli.masks.importance import ImportanceMeta, stream_importance
from neuroloc_cli.ops.sparsify import share_count

PAPER = "Chen et al. 2024, MAET, Eq. 1"


class DeltaScores:
    """The scorer of `locate delta`: `|Θ~ − Θo|` per element, read from the two checkpoints
    one tensor at a time; units aggregate it as an L2 norm (MAET Eq. 1)."""

    aggregate = "l2"

    def __init__(self, base: Path, tuned: Path, names: Sequence[str] | None = None):
        self.base = Checkpoint.open(base, spec=str(base))
        self.tuned = DeltaReader(tuned, self.base, "TUNED")
        self.label = str(base)
        floats = floating(self.base.tensors)
        self.shapes = {n: floats[n] for n in names} if names is not None else floats

    def restrict(self, names: Sequence[str]) -> DeltaScores:
        """The same scorer over `names` only, after checking that TUNED has them all."""
        check_same_tensors(list(names), self.base, [self.tuned.ckpt])
        out = DeltaScores.__new__(DeltaScores)
        out.base, out.tuned, out.label = self.base, self.tuned, self.label
        out.shapes = {n: self.shapes[n] for n in names}
        return out

    def read(self, name: str) -> torch.Tensor:
        return self.tuned.read(name).abs_()

    def meta(self) -> ImportanceMeta:
        provenance = {
            "scorer": "delta",
            "base": str(self.base.path.resolve()),
            "tuned": str(Path(self.tuned.ckpt.path).resolve()),
            "base_fingerprint": self.base.fingerprint,
            "tuned_fingerprint": self.tuned.ckpt.fingerprint,
            LAYOUT_KEY: layout_digest({n: t.shape for n, t in self.base.tensors.items()}),
        }
        return ImportanceMeta("delta", "l2", "", provenance)


class DeltaOptions(FilterOptions):
    """Settings of `locate delta`."""

    base: Path = Field(description="base checkpoint folder", json_schema_extra=ARGUMENT)
    tuned: Path = Field(description="trained checkpoint folder (or a delta checkpoint of it)", json_schema_extra=ARGUMENT)
    top: float = Field(default=0.05, description="share of units kept")
    granularity: str = Field(default="row", description="row (output neurons), ffn (MLP neurons) or element")
    scope: str = Field(default="global", description="global: all units ranked together (the paper); tensor: per tensor or MLP block")
    cap: int = Field(
        default=DEFAULT_CAP, ge=1, description="values held at once while settling a global element threshold", json_schema_extra=INTERNAL
    )
    importance: Path | None = Field(default=None, description="also write |delta| of every ranked tensor to this importance file")

    @model_validator(mode="after")
    def _selection(self) -> DeltaOptions:
        check_selection(self.top, self.granularity, self.scope)  # raises the selector's own usage errors
        return self


def _ranked(opts: DeltaOptions) -> tuple[DeltaScores, NameFilter, list[UnitGroup], list[str]]:
    """The scorer over the tensors `opts` ranks, the filter, the unit groups (row/ffn) and the names.

    Raises:
        UsageError: filters that leave no tensor.
        InputError: unreadable checkpoints, missing or mismatched tensors, no MLP for ffn.
    """
    granularity = opts.granularity
    keep = NameFilter.of(opts.include, opts.exclude, every_tensor if granularity == "row" else in_blocks)
    scores = DeltaScores(opts.base, opts.tuned)
    groups: list[UnitGroup] = []
    if granularity == "element":
        names = element_tensors(scores.shapes, keep)
    else:
        groups = row_groups(scores.shapes, keep) if granularity == "row" else ffn_groups(scores.shapes, str(scores.base.path), keep)
        names = [p.name for g in groups for p in g.parts]
    if not names:
        raise UsageError(f"--include/--exclude leave no tensor to rank at {granularity} granularity", hint=f"patterns: {keep.describe()}")
    return scores.restrict(names), keep, groups, names


@dataclass(frozen=True)
class DeltaPlan:
    """What `locate delta` would read, hold and write, from the two checkpoints' headers only
    (`--dry-run`).

    Attributes:
        units, selected_units: the ranked units and how many the share keeps.
        mask_bytes: the mask file's tensor data (1 byte per unit and part tensor for row/ffn,
            1 bit per element for element masks), without its JSON header.
        importance_bytes: the `--importance` file's data (float32 per ranked element), or 0.
        memory_bytes: see `memory`.
    """

    granularity: str
    scope: str
    tensors: int
    ranked_elements: int
    units: int
    selected_units: int
    mask_bytes: int
    importance_bytes: int
    memory_bytes: dict[str, int]

    def describe(self) -> dict[str, Any]:
        return {
            "granularity": self.granularity,
            "scope": self.scope,
            "tensors": self.tensors,
            "ranked_elements": self.ranked_elements,
            "units": self.units,
            "selected_units": self.selected_units,
            "disk_bytes": {"mask": self.mask_bytes, "importance": self.importance_bytes, "total": self.mask_bytes + self.importance_bytes},
            "memory_bytes": self.memory_bytes,
        }


def plan_delta(opts: DeltaOptions) -> DeltaPlan:
    """What `locate delta` would rank, hold and write, reading headers only (`--dry-run`).

    Memory, as the run holds it: the largest ranked tensor read from both checkpoints in
    float32 (the delta is taken in place in the first) plus its finite check (1 byte per
    element); the unit scores (row/ffn: one float32 per unit, twice for the global top-k's
    concatenation; element: the largest tensor's scores, and for a global scope the `cap`
    values that settle the threshold); and the mask under construction (a byte per unit, or a
    bit per element).

    Raises:
        UsageError: filters that leave no tensor.
        InputError: unreadable checkpoints, missing or mismatched tensors, no MLP for ffn.
    """
    scores, _, groups, names = _ranked(opts)
    shapes = scores.shapes
    numel = {n: math.prod(shapes[n]) for n in names}
    largest = max(numel.values())
    if opts.granularity == "element":
        units = sum(numel.values())
        sizes = list(numel.values())
        mask_bytes = sum((n + 7) // 8 for n in sizes)
        score_bytes = 4 * largest + (4 * opts.cap if opts.scope == "global" else 0)
    else:
        sizes = [g.size for g in groups]
        units = sum(sizes)
        mask_bytes = sum(g.size for g in groups for _ in g.parts)
        score_bytes = 4 * units * (2 if opts.scope == "global" else 1)
    selected = share_count(opts.top, units) if opts.scope == "global" else sum(share_count(opts.top, n) for n in sizes)
    memory = {"tensors": 9 * largest, "scores": score_bytes, "mask": mask_bytes}
    memory["total"] = sum(memory.values())
    return DeltaPlan(
        opts.granularity,
        opts.scope,
        len(names),
        sum(numel.values()),
        units,
        selected,
        mask_bytes,
        4 * sum(numel.values()) if opts.importance is not None else 0,
        memory,
    )


@locator("delta", options=DeltaOptions, reads="two checkpoints: how much each weight changed", paper=PAPER)
def locate_delta(opts: DeltaOptions) -> Mask:
    """Units whose weights changed most from BASE to TUNED (MAET Eq. 1).

    Without `include`, rows come from every 2-D weight, token rows included, and FFN neurons
    and elements from the transformer blocks (`locate.units`).

    Returns:
        The mask, listing every tensor that was ranked (selected or not).

    Raises:
        UsageError: filters that leave no tensor.
        InputError: unreadable checkpoints, missing or mismatched tensors, no MLP for ffn.
    """
    top, granularity, scope, importance = opts.top, opts.granularity, opts.scope, opts.importance
    scores, keep, _, _ = _ranked(opts)
    selection = select_units(scores, top=top, granularity=granularity, scope=scope, keep=keep, cap=opts.cap)
    meta = scores.meta()
    provenance = {
        "locator": "delta",
        "importance": "L2 norm of each unit's weight change (MAET Eq. 1)",
        **{k: v for k, v in meta.provenance.items() if k != "scorer"},
        "top": top,
        "granularity": granularity,
        "scope": scope,
        "tensors": keep.describe(),
        "units": selection.units,
        "selected_units": selection.selected_units,
        **selection.extra,
    }
    if importance is not None:
        meta = replace(meta, provenance={**meta.provenance, "tensors": keep.describe()})
        stream_importance(importance, scores.shapes, ((n, scores.read(n)) for n in scores.shapes), meta)
    return Mask(granularity, selection.entries, provenance)
