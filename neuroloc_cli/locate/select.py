"""The one selector: importance in, a mask's entries out — exactly `k` units, globally or
within each tensor, streaming.

Every locator scores first and selects here (`select_units`): the scores come from any
`ScoreSource` (an importance file, the weight changes of `locate delta`, a sum of several
files), the units from `locate.units` (element, row, FFN neuron), and the pick is the top
share, the bottom share (the complement of the top `n − k`, so that the count is exact too),
or a seeded random draw with the top selection's count in every tensor (or MLP block).

Row and FFN importances are small (one float per unit), so a global top-k concatenates them.
Element importances are as large as the model, so the global threshold is found without
holding them: each pass streams every tensor's |Δ| and counts it into histogram bins
(log-spaced first, then linear inside the bin that holds the k-th largest value), until that
bin holds at most `cap` elements; a last counting pass collects its distinct values with their
counts, which gives the k-th largest value exactly. Memory: the bins, one tensor, and at most
`cap` values. Ties at the threshold are taken in stream order, so exactly `k` are selected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from pydantic import Field, model_validator

from neuroloc_cli.arch import NameFilter, in_blocks
from neuroloc_cli.errors import InputError, UsageError
from neuroloc_cli.locate.base import ARGUMENT, INTERNAL, FilterOptions, locator
from neuroloc_cli.locate.units import BLOCKS, ROW_DEFAULT, UnitGroup, element_tensors, every_tensor, ffn_groups, row_groups
from neuroloc_cli.masks.algebra import combine
from neuroloc_cli.masks.format import GRANULARITIES, LAYOUT_KEY, Mask, MaskEntry
from neuroloc_cli.masks.importance import Importance
from neuroloc_cli.ops.sparsify import share_count

DEFAULT_CAP = 8_000_000  # values collected at once to settle the threshold (32 MB)
_OCTAVE_BINS = 16
_LOG2_LOW, _LOG2_HIGH = -150, 129  # every positive float32 lies in [2^-150, 2^129)
_LINEAR_BINS = 4096
SCOPES = ("global", "tensor")
PICKS = ("top", "bottom", "random")


class ScoreSource(Protocol):
    """Non-negative float32 scores per element of each scored tensor, read one tensor at a time.

    Attributes:
        shapes: scored tensor name -> shape.
        aggregate: how element scores make a unit's: "sum", or "l2" (root of the sum of squares).
        label: what the scores are, for messages (a file name).
    """

    shapes: Mapping[str, tuple[int, ...]]
    aggregate: str
    label: str

    def read(self, name: str) -> torch.Tensor: ...


@dataclass
class TensorScores:
    """Scores held in memory (a scorer's result before it is written)."""

    tensors: Mapping[str, torch.Tensor]
    aggregate: str = "sum"
    label: str = "the scores"

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {n: tuple(t.shape) for n, t in self.tensors.items()}

    def read(self, name: str) -> torch.Tensor:
        return self.tensors[name].float().clone()


@dataclass
class SummedScores:
    """The element-wise sum of several sources over the same tensors (e.g. every language's
    importance, for the region all of them use).

    Raises:
        UsageError: the sources disagree on their tensors, shapes or aggregate.
    """

    sources: Sequence[ScoreSource]
    label: str = "the summed scores"

    def __post_init__(self) -> None:
        first = self.sources[0]
        for other in self.sources[1:]:
            kinds = [getattr(getattr(src, "meta", None), "score", None) for src in (first, other)]
            if None not in kinds and kinds[0] != kinds[1]:
                raise UsageError(f"{other.label} holds {kinds[1]} scores, {first.label} {kinds[0]}: cannot sum them")
            if other.aggregate != first.aggregate:
                raise UsageError(
                    f"{other.label} aggregates units by {other.aggregate}, {first.label} by {first.aggregate}: cannot sum them"
                )
            if dict(other.shapes) != dict(first.shapes):
                diff = sorted(set(other.shapes) ^ set(first.shapes)) or [n for n in first.shapes if first.shapes[n] != other.shapes[n]]
                raise UsageError(f"{other.label} and {first.label} score different tensors (first difference: {diff[0]})")

    @property
    def shapes(self) -> Mapping[str, tuple[int, ...]]:
        return self.sources[0].shapes

    @property
    def aggregate(self) -> str:
        return self.sources[0].aggregate

    def read(self, name: str) -> torch.Tensor:
        total = self.sources[0].read(name)
        for src in self.sources[1:]:
            total += src.read(name)
        return total


@dataclass(frozen=True)
class Selection:
    """A selection's entries (every tensor that took part, selected or not) and its counts."""

    entries: dict[str, MaskEntry]
    units: int
    selected_units: int
    extra: dict[str, Any] = field(default_factory=dict)


def check_selection(top: float, granularity: str, scope: str, pick: str = "top") -> None:
    """Refuse a share, granularity, scope or pick the selector does not know.

    Raises:
        UsageError: naming the flag.
    """
    if not 0 < top <= 1:
        raise UsageError(f"--top must be a share in (0, 1], got {top}", hint="e.g. --top 0.05 for 5 %")
    if granularity not in GRANULARITIES:
        raise UsageError(f"--granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if scope not in SCOPES:
        raise UsageError(f"--scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if pick not in PICKS:
        raise UsageError(f"unknown pick {pick!r} (use {', '.join(PICKS)})")


def select_units(
    scores: ScoreSource,
    *,
    top: float,
    granularity: str = "element",
    scope: str = "tensor",
    pick: str = "top",
    keep: NameFilter | None = None,
    seed: int = 0,
    cap: int = DEFAULT_CAP,
) -> Selection:
    """Select units of the scored tensors.

    Args:
        scores: where the scores come from.
        top: the share of units selected, in (0, 1].
        granularity: "element", "row" or "ffn" (see `locate.units`).
        scope: "global" (all units ranked together) or "tensor" (each tensor, or each MLP
            block for ffn, keeps its own share).
        pick: "top", "bottom", or "random" (the top's count per tensor or block, drawn with
            `seed`).
        keep: which scored tensors take part (default: every tensor for rows, the blocks
            for ffn and elements).
        cap: values held at once while settling a global element threshold.

    Raises:
        UsageError: a bad share, granularity, scope or pick, or no tensor to select from.
        InputError: no MLP of a known layout (ffn).
    """
    check_selection(top, granularity, scope, pick)
    keep = keep or (ROW_DEFAULT if granularity == "row" else BLOCKS)
    if granularity == "element":
        names = element_tensors(scores.shapes, keep)
        if not names:
            raise UsageError(f"no tensor of {scores.label} to select from", hint=f"patterns: {keep.describe()}")
        return _select_elements(scores, names, top, scope, pick, seed, cap)
    groups = row_groups(scores.shapes, keep) if granularity == "row" else ffn_groups(scores.shapes, scores.label, keep)
    if not groups:
        raise UsageError(f"no tensor of {scores.label} to select from at {granularity} granularity", hint=f"patterns: {keep.describe()}")
    return _select_groups(scores, groups, top, scope, pick, seed)


class SelectOptions(FilterOptions):
    """Settings of `locate select`."""

    importance: tuple[Path, ...] = Field(
        min_length=1, description="importance files, summed element-wise when several", json_schema_extra=ARGUMENT
    )
    top: float = Field(default=0.01, description="share of units selected")
    granularity: str = Field(default="element", description="element, row (output neurons) or ffn (MLP neurons)")
    scope: str = Field(default="tensor", description="tensor: each tensor (or MLP block) keeps its share; global: all ranked together")
    pick: str = Field(
        default="top",
        description="top, bottom (a control) or random (the top's count per tensor, a control); the command's --bottom / --random",
        json_schema_extra=INTERNAL,
    )
    seed: int = Field(default=0, description="seed of the random pick")
    minus: tuple[Path, ...] = Field(default=(), description="masks whose units are taken out of the selection")
    cap: int = Field(
        default=DEFAULT_CAP, ge=1, description="values held at once while settling a global element threshold", json_schema_extra=INTERNAL
    )

    @model_validator(mode="after")
    def _selection(self) -> SelectOptions:
        check_selection(self.top, self.granularity, self.scope, self.pick)
        return self


@locator("select", options=SelectOptions, reads="importance files written by the other locators", paper="")
def select_importance(opts: SelectOptions) -> Mask:
    """A mask from importance files: their sum, selected, minus the union of other masks.

    Without `include`, rows come from every scored tensor and FFN neurons and elements from
    the transformer blocks.

    Raises:
        InputError: an unreadable importance or mask file, a per-neuron importance file, or
            masks of another model.
        UsageError: files that score different tensors, or no tensor to select from.
    """
    files, top, granularity, scope, pick, seed, minus = (
        opts.importance,
        opts.top,
        opts.granularity,
        opts.scope,
        opts.pick,
        opts.seed,
        opts.minus,
    )
    keep = NameFilter.of(opts.include, opts.exclude, every_tensor if granularity == "row" else in_blocks)
    cap = opts.cap
    sources = [Importance.open(f) for f in files]
    for f, src in zip(files, sources):
        if src.meta.provenance.get("granularity", "element") != "element":
            raise InputError(
                f"{f}: holds one score per {src.meta.provenance['granularity']} unit, not per element of the model's tensors",
                hint="its locator wrote the masks made from it next to it",
            )
    scores: ScoreSource = sources[0] if len(sources) == 1 else SummedScores(sources, " + ".join(map(str, files)))
    selection = select_units(scores, top=top, granularity=granularity, scope=scope, pick=pick, keep=keep, seed=seed, cap=cap)
    first = sources[0].meta
    provenance: dict[str, Any] = {
        "locator": "select",
        "importance": [{"path": str(Path(f).resolve()), "score": s.meta.score, "source": s.meta.source} for f, s in zip(files, sources)],
        "top": top,
        "granularity": granularity,
        "scope": scope,
        "pick": pick,
        "units": selection.units,
        "selected_units": selection.selected_units,
        **selection.extra,
    }
    if pick == "random":
        provenance["seed"] = seed
    provenance["tensors"] = keep.describe()
    if LAYOUT_KEY in first.provenance:
        provenance[LAYOUT_KEY] = first.provenance[LAYOUT_KEY]
    mask = Mask(granularity, selection.entries, provenance)
    for path in minus:
        diff = combine("diff", mask, Mask.load(path), "the selection", str(path))
        mask = Mask(diff.granularity, diff.entries, provenance)
    if minus:
        # units are no longer the selector's count: say what is left, in elements
        del provenance["selected_units"]
        provenance.update(minus=[str(Path(p).resolve()) for p in minus], selected_elements=mask.selected)
    return mask


def unit_scores(scores: ScoreSource, group: UnitGroup) -> torch.Tensor:
    """Each unit's score (float64): its parts' element scores aggregated over every slice."""
    acc = torch.zeros(group.size, dtype=torch.float64)
    for part in group.parts:
        a = scores.read(part.name)
        if scores.aggregate == "l2":
            a = a.square_()  # squares in float32 are exact enough; the float64 sum keeps millions apart
        dims = [i for i in range(a.dim()) if i != part.axis]
        acc += a.sum(dim=dims, dtype=torch.float64) if dims else a.double()
    return acc.sqrt_() if scores.aggregate == "l2" else acc


def _select_groups(scores: ScoreSource, groups: list[UnitGroup], top: float, scope: str, pick: str, seed: int) -> Selection:
    importance = [unit_scores(scores, g) for g in groups]
    if pick == "bottom":
        chosen = _bottom(importance, top, scope)
    else:
        chosen = top_units(importance, top, scope)
        if pick == "random":
            gen = torch.Generator().manual_seed(seed)
            chosen = [_random_like(c, gen) for c in chosen]
    entries = {}
    for g, sel in zip(groups, chosen):
        for p in g.parts:
            entries[p.name] = MaskEntry(scores.shapes[p.name], p.axis, sel.clone())
    return Selection(entries, sum(g.size for g in groups), sum(int(c.sum()) for c in chosen))


def _bottom(importance: Sequence[torch.Tensor], share: float, scope: str) -> list[torch.Tensor]:
    """The lowest `share_count(share, n)` units: the complement of the top `n − k`."""
    if scope == "tensor":
        return [~_top_mask(v, v.numel() - share_count(share, v.numel())) for v in importance]
    flat = torch.cat([_ranked(v) for v in importance])
    chosen = ~_top_mask(flat, flat.numel() - share_count(share, flat.numel()))
    return list(chosen.split([v.numel() for v in importance]))


def _random_like(selected: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """As many units as `selected` holds, drawn uniformly from its tensor."""
    out = torch.zeros(selected.numel(), dtype=torch.bool)
    out[torch.randperm(out.numel(), generator=gen)[: int(selected.sum())]] = True
    return out.reshape(selected.shape)


def _select_elements(scores: ScoreSource, names: list[str], top: float, scope: str, pick: str, seed: int, cap: int) -> Selection:
    shapes = {n: tuple(scores.shapes[n]) for n in names}
    gen = torch.Generator().manual_seed(seed)
    if scope == "tensor":
        entries = {}
        for n in names:
            a = scores.read(n)
            sel = _bottom([a], top, "tensor")[0] if pick == "bottom" else top_units([a], top, "tensor")[0]
            entries[n] = MaskEntry(shapes[n], None, _random_like(sel, gen) if pick == "random" else sel)
        units = sum(e.units for e in entries.values())
        return Selection(entries, units, sum(e.selected_units for e in entries.values()))

    def stream() -> Iterator[torch.Tensor]:
        for n in names:
            yield scores.read(n)

    total = sum(math.prod(s) for s in shapes.values())
    k = share_count(top, total)
    taken = total - k if pick == "bottom" else k  # the bottom k is the complement of the top n − k
    extra: dict[str, Any] = {"k": k}
    if taken == 0:
        chosen = {n: torch.zeros(shapes[n], dtype=torch.bool) for n in names}
    elif taken == total:
        chosen = {n: torch.ones(shapes[n], dtype=torch.bool) for n in names}
    else:
        t = global_threshold(stream, taken, cap)
        ties = taken - t.greater
        chosen = {}
        for n, a in zip(names, stream()):
            chosen[n], ties = threshold_select(a, t, ties)
        extra.update(threshold=t.value, passes=t.passes + 1)
    entries = {}
    for n in names:
        sel = ~chosen[n] if pick == "bottom" else chosen[n]
        entries[n] = MaskEntry(shapes[n], None, _random_like(sel, gen) if pick == "random" else sel)
    return Selection(entries, total, k, extra)


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
    flat = torch.cat([_ranked(v) for v in importance])
    chosen = _top_mask(flat, share_count(share, flat.numel()))
    return list(chosen.split([v.numel() for v in importance]))


def _ranked(v: torch.Tensor) -> torch.Tensor:
    """Scores as ranked: float64 ones (unit sums) stay float64, so that rounding to float32
    does not make ties of distinct units; others in float32."""
    return v.reshape(-1) if v.dtype == torch.float64 else v.reshape(-1).float()


def _top_mask(v: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros(v.numel(), dtype=torch.bool)
    if k > 0:
        out[torch.topk(_ranked(v), k, sorted=False).indices] = True
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
