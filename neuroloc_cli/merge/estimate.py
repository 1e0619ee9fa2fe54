"""How much memory a planned merge holds at its peak, from the plan alone (headers only).

What `merge --dry-run`, `ablate --dry-run` and `recipe validate` print. The figure follows
the engine (`merge.run`, `merge.stream`), unit of work by unit of work:

- A unit is a whole tensor, or, for elementwise methods, a block of at most `BLOCK_ELEMENTS`
  elements of a large merged tensor (`merge.stream.row_blocks`; token-indexed tensors of a
  `tokenizer_source` merge stay whole).
- Its inputs: the base and every model's tensor in the compute dtype; for masked merges the
  base as stored as well; each file parameter's tensor per model in float32 (`fisher:`,
  `gram:`). A tensor copied unchanged is read as stored.
- While a unit is computed, the reader thread holds the next unit's inputs, unless one of
  the two is a whole tensor larger than a block or is read in pieces
  (`merge.stream.read_alone`): those are read one after the other. A unit's inputs and result are released before the next unit is
  handed over.
- A method that reads its inputs in pieces (`merge.stream.reads_in_pieces`) holds a piece of
  each input instead, and its result in the output dtype beside at most one buffer of the
  tensor's size and one boolean mask (`_in_pieces`).
- The computation: the method's result and one scratch buffer in the compute dtype (the
  engine's bound for its methods; a method's short-lived temporaries of a few elements per
  row are not counted), float32 copies of the inputs under `accumulate: float32`, the
  result's copy in the output dtype, and for masks the boolean selections, the base in the
  output dtype and the selected result.
- A token-indexed tensor of a `tokenizer_source` merge is read onto the output vocabulary unit
  by unit (`merge.vocab.MappedRows`): its inputs are the unit's output rows, plus one run of
  rows as read and the rows of the tokens some input lacks.
- Held all run: the loaded masks (a byte per unit, or a bit per element).

Page-cache memory of the memory-mapped input shards is the operating system's and is not
counted: it is given back under pressure.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from neuroloc_cli.merge.masks import Rows
from neuroloc_cli.merge.plan import MergePlan, Step
from neuroloc_cli.merge.run import CHECK_ELEMENTS
from neuroloc_cli.merge.stream import read_alone, reads_in_pieces, row_blocks
from neuroloc_cli.ops import sums


@dataclass(frozen=True)
class MergeMemory:
    """The peak of a merge's private memory and what it is made of, in bytes.

    Attributes:
        inputs: the inputs of the unit computed at the peak.
        next_inputs: the next unit's inputs, read meanwhile (0 for a large whole tensor).
        work: the computation's own tensors at the peak (result, scratch, copies, masks').
        masks: the loaded masks, held all run.
        tensor: the tensor of the peak unit; rows: its block of rows, or None (whole).
    """

    inputs: int
    next_inputs: int
    work: int
    masks: int
    tensor: str
    rows: Rows

    @property
    def total(self) -> int:
        return self.inputs + self.next_inputs + self.work + self.masks

    def describe(self) -> dict[str, Any]:
        """As `memory_bytes` of a dry run's JSON: the parts, `total`, and the peak's tensor."""
        parts = ("inputs", "next_inputs", "work", "masks")
        return {**{k: getattr(self, k) for k in parts}, "total": self.total, "peak_tensor": self.tensor, "peak_rows": self.rows}


@dataclass(frozen=True)
class _Unit:
    step: Step
    rows: Rows
    inputs: int
    work: int
    result: int


def merge_memory(plan: MergePlan) -> MergeMemory:
    """The peak private memory of `run_merge(plan)` (see the module docstring for what counts).

    A statistics pass (MAET's ranking) reads the same inputs in blocks before the merge; its
    peak is counted too, and the larger of the two is returned.
    """
    units = list(_units(plan))
    masks = _mask_bytes(plan)
    if not units:
        return MergeMemory(0, 0, 0, masks, "", None)
    candidates = []
    for i, u in enumerate(units):
        ahead = i + 1 < len(units) and not (read_alone(plan, u.step, u.rows) or read_alone(plan, units[i + 1].step, units[i + 1].rows))
        candidates.append(MergeMemory(u.inputs, units[i + 1].inputs if ahead else 0, u.work, masks, u.step.name, u.rows))
    peak = max(candidates, key=lambda m: m.total)
    stats = _statistics_peak(plan)
    if stats is not None and stats.total + masks > peak.total:
        return MergeMemory(stats.inputs, stats.next_inputs, stats.work, masks, stats.tensor, stats.rows)
    return peak


def _units(plan: MergePlan, *, blocks: bool | None = None, steps: list[Step] | None = None) -> Iterator[_Unit]:
    blocks = plan.method.elementwise if blocks is None else blocks
    for step in plan.steps if steps is None else steps:
        for rows in row_blocks(step.out.shape) if blocks and step.merge and not (step.vocab and plan.side) else [None]:
            yield _unit(plan, step, rows)


def _unit(plan: MergePlan, step: Step, rows: Rows) -> _Unit:
    n = _elements(step.out.shape, rows)
    out = n * step.out.dtype.itemsize
    if not step.merge:  # copied as stored: the read tensor is the result
        stored = _stored(plan, step)
        return _Unit(step, rows, n * stored.itemsize, 0, n * stored.itemsize)
    c = plan.compute_dtype.itemsize
    read = [_source_elements(plan, step, i, rows) for i in range(_inputs_of(plan, step))]
    if rows is None and reads_in_pieces(plan, step):
        return _in_pieces(plan, step, len(read), n, out)
    inputs = c * sum(read)
    masked = plan.masks is not None and plan.base is not None and step.origin is None
    if masked:
        inputs += read[0] * plan.base.checkpoint.tensors[step.name].torch_dtype.itemsize
    inputs += 4 * n * sum(1 for files in plan.side.values() for f in files if step.name in f.shapes)
    if step.vocab:  # one run of an input's rows as read, and the rows of the tokens some input lacks
        assert plan.vocabulary is not None
        inputs += c * n + c * plan.vocabulary.filled_tokens.numel() * math.prod(step.out.shape[1:])
    work = 2 * c * n  # the method's result and one scratch buffer
    if plan.widen:
        work += 4 * n * len(read) + (4 - c) * 2 * n  # float32 inputs; result and scratch in float32
    if step.out.dtype != plan.compute_dtype:
        work += out
    # the NaN/inf check (`merge.run.count_nonfinite`): the result, and for a piece of it a copy
    # (its absolute values) and three boolean masks
    work = max(work, out + (step.out.dtype.itemsize + 3) * min(n, CHECK_ELEMENTS))
    if masked:
        work += c * n * sum(m is not None for m in plan.masks.per_model)  # inputs restricted to their masks
        # two boolean selections of the unit at once (an element mask unpacks only the unit's rows),
        # the base in the output dtype, the result
        work += 2 * n + 2 * out
    return _Unit(step, rows, inputs, work, out)


def _in_pieces(plan: MergePlan, step: Step, count: int, n: int, out: int) -> _Unit:
    """A unit whose method reads it in pieces (`merge.stream.CheckpointFlat`): the piece each
    input keeps (the rows that hold `PIECE` elements, in the compute dtype, then float32 under
    `accumulate: float32`); the result, assembled in the output dtype; one buffer of the
    tensor's size in the compute dtype and one boolean mask (sce's variances and selection,
    arcee_fusion's scores: the most a method of this kind keeps); and a piece's temporaries:
    a float64 copy of each input's piece and five more float64 pieces (a product and its
    padded copy in `ops.sums.fixed_gram`; sce's variance and energies in PyTorch, Welford's
    update and the squares in float64). That is the most of these methods' PyTorch passes;
    sce's compiled loops (float32 and float64, two models) hold one float64 piece, so the
    figure is high by a few such pieces, a few MiB beside a real model's tensors."""
    c = plan.compute_dtype.itemsize
    row = math.prod(step.out.shape[1:]) if step.out.shape else 1
    piece = min(n, sums.PIECE + 2 * row)
    inputs = (c + (4 if plan.widen else 0)) * piece * count
    work = out + c * n + n + 8 * (count + 5) * min(n, sums.PIECE)
    return _Unit(step, None, inputs, work, out)


def _inputs_of(plan: MergePlan, step: Step) -> int:
    """How many tensors a merged unit reads: one for layer stacking, else base and models."""
    if step.origin is not None:
        return 1
    return (1 if plan.base is not None else 0) + len(plan.models)


def _source_elements(plan: MergePlan, step: Step, i: int, rows: Rows) -> int:
    """Elements of input i's read of `step` (the base first, when there is one): a
    token-indexed tensor is read onto the output vocabulary's rows."""
    return _elements(step.out.shape, rows)


def _stored(plan: MergePlan, step: Step) -> torch.dtype:
    if step.origin is not None:
        index, name = step.origin
        return plan.models[index].checkpoint.tensors[name].torch_dtype
    return plan.reference.checkpoint.tensors[step.name].torch_dtype


def _elements(shape: tuple[int, ...], rows: Rows) -> int:
    return math.prod(shape) if rows is None else (rows[1] - rows[0]) * math.prod(shape[1:])


def _mask_bytes(plan: MergePlan) -> int:
    """The loaded masks' data: a byte per unit of row/ffn masks, a bit per element otherwise."""
    if plan.masks is None:
        return 0
    masks = [m for m in (plan.masks.global_mask, *plan.masks.per_model) if m is not None]
    return sum(e.units if e.axis is not None else (math.prod(e.shape) + 7) // 8 for m in masks for e in m.entries.values())


def _statistics_peak(plan: MergePlan) -> MergeMemory | None:
    """The statistics pass's peak: blocks of rows of every merged tensor, the next block read
    meanwhile, and the statistic's result and one scratch buffer per block."""
    if not plan.method.statistics:
        return None
    units = [u for u in _units(plan, blocks=True, steps=[s for s in plan.steps if s.merge])]
    best = None
    for i, u in enumerate(units):
        ahead = i + 1 < len(units) and not (read_alone(plan, u.step, u.rows) or read_alone(plan, units[i + 1].step, units[i + 1].rows))
        following = units[i + 1].inputs if ahead else 0
        work = 2 * plan.compute_dtype.itemsize * _elements(u.step.out.shape, u.rows)
        if best is None or u.inputs + following + work > best.total:
            best = MergeMemory(u.inputs, following, work, 0, u.step.name, u.rows)
    return best
