"""Reading a merge's inputs: one tensor (or block of rows) of every input at a time, the
next one read on a worker thread while the current one is computed.

Both passes of the engine read through here: the statistics pass (`merge.stats`) and the
merge itself (`merge.run`). Methods with file parameters (`fisher:`, `gram:`) get each model's
side tensor read here too, the same rows, beside the model's (`Inputs.side`).

A method that reads its inputs in pieces (`MergeMethod.reads_in_pieces`: the whole-tensor
methods, such as sce and karcher) gets `CheckpointFlat`s instead of tensors: nothing is read
ahead, and each pass of the method reads the rows that hold the piece it asks for, so that
memory stays at a piece of each input, whatever the tensor's size. Merges that apply masks or
read file parameters give such a method whole tensors, as to any other.

The token-indexed tensors of a `tokenizer_source` merge are read on the output vocabulary
(`merge.vocab.MappedRows`): each unit's output rows are gathered from the rows each input has,
runs of consecutive rows at a time, so that no input is ever whole in memory for them either.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from safetensors import safe_open

from neuroloc_cli.errors import InputError
from neuroloc_cli.io.checkpoint import Checkpoint
from neuroloc_cli.merge.masks import Rows
from neuroloc_cli.merge.plan import MergePlan, SideInput, Step
from neuroloc_cli.merge.vocab import MappedRows
from neuroloc_cli.ops.flat import Flat, Input


class Inputs(tuple):
    """(base in the compute dtype, each model's tensor in the compute dtype, base as stored or
    None), unpacked as a triple; and `side`: each file parameter's tensor per model (float32,
    the same rows), or None where that model's file has none for this tensor. For a method
    that reads in pieces, the base and the models' tensors are `CheckpointFlat`s."""

    side: dict[str, list[torch.Tensor | None]]

    def __new__(
        cls,
        base: Input | None,
        tensors: list[Input],
        raw: torch.Tensor | None,
        side: dict[str, list[torch.Tensor | None]] | None = None,
    ) -> Inputs:
        self = super().__new__(cls, (base, tensors, raw))
        self.side = side or {}
        return self


# Elementwise work processes tensors larger than this in blocks of rows (8 MB in float32).
BLOCK_ELEMENTS = 2 * 2**20


def row_blocks(shape: tuple[int, ...]) -> list[Rows]:
    """`[None]` (the whole tensor) for a tensor of at most `BLOCK_ELEMENTS` elements, else
    consecutive ranges of rows that hold at most that many each (at least one row)."""
    if not shape or math.prod(shape) <= BLOCK_ELEMENTS:
        return [None]
    rows = max(1, BLOCK_ELEMENTS // math.prod(shape[1:]))
    return [(a, min(a + rows, shape[0])) for a in range(0, shape[0], rows)]


def _units(plan: MergePlan, steps: Sequence[Step], blocks: bool) -> list[tuple[Step, Rows]]:
    """Work units: whole tensors, or, when `blocks`, blocks of rows of the large merged ones
    (token-indexed tensors of a `tokenizer_source` merge in blocks of output rows, except with
    file parameters, whose rows follow each model's own vocabulary)."""
    return [
        (step, rows)
        for step in steps
        for rows in (row_blocks(step.out.shape) if blocks and step.merge and not (step.vocab and plan.side) else [None])
    ]


def stream_inputs(plan: MergePlan, steps: Sequence[Step], *, blocks: bool = False) -> Iterator[tuple[Step, Rows, Inputs]]:
    """Yield each step (or, with `blocks`, each block of rows of a large step) with its
    inputs, reading the next unit on a worker thread meanwhile.

    The inputs are (base, models' tensors) in the compute dtype, and the base as stored
    (masked merges only, else None).
    Use `blocks` only for work that is elementwise or additive over rows.

    Memory: a unit read whole that is larger than a block (an embedding for a method that
    needs whole tensors), or read in pieces by its method, is not read ahead of, nor while it
    is computed (`read_alone`): the next unit is read once the caller asks for it, so two
    such units' inputs are never held at once. A caller that wants this must drop its
    reference to a unit's inputs before asking for the next one.
    """
    units = _units(plan, steps, blocks)
    mapped: dict[str, list[MappedRows]] = {}  # a vocabulary step's inputs, from its first unit to its last
    if not units:
        return

    def load(step: Step, rows: Rows) -> Inputs:
        if not (step.vocab and step.merge):
            return _load(plan, step, rows)
        inputs = mapped.get(step.name) or mapped.setdefault(step.name, _mapped(plan, step))
        if rows is None or rows[1] == step.out.shape[0]:
            del mapped[step.name]
        return _load_mapped(plan, step, rows, inputs)

    def start(unit: tuple[Step, Rows]) -> Future[Inputs] | Inputs:
        # inputs read in pieces are only described here: no thread to hand them over from
        return load(*unit) if unit[1] is None and reads_in_pieces(plan, unit[0]) else pool.submit(load, *unit)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="neuroloc-read") as pool:
        pending = start(units[0])
        for i, (step, rows) in enumerate(units):
            inputs = pending.result() if isinstance(pending, Future) else pending
            pending = None  # a done future would keep them alive
            last = i + 1 == len(units)
            ahead = not last and not (read_alone(plan, *units[i]) or read_alone(plan, *units[i + 1]))
            if ahead:
                pending = start(units[i + 1])
            yield step, rows, inputs
            del inputs
            if not ahead and not last:
                pending = start(units[i + 1])


class CheckpointFlat(Flat):
    """One input tensor of a merge, read a flat piece at a time: the rows that hold the piece,
    from its checkpoint or (for a token-indexed tensor of a `tokenizer_source` merge) from its
    rows on the output vocabulary, in the compute dtype (and then in float32 under
    `accumulate: float32`, as a tensor read whole would be)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, read_rows: Callable[[int, int], torch.Tensor], widen: bool):
        super().__init__(shape, torch.float32 if widen else dtype)
        self.read_rows, self.widen = read_rows, widen

    @classmethod
    def of(cls, checkpoint: Checkpoint, name: str, dtype: torch.dtype, widen: bool) -> CheckpointFlat:
        """Tensor `name` of `checkpoint`."""
        shape = tuple(checkpoint.tensors[name].shape)
        if not shape:  # a scalar: read whole
            return cls(shape, dtype, lambda a, b: checkpoint.read(name, None, dtype), widen)
        return cls(shape, dtype, lambda a, b: checkpoint.read(name, (a, b), dtype), widen)

    def _read(self, start: int, stop: int) -> torch.Tensor:
        row = math.prod(self.shape[1:])
        first, last = (0, 1) if not self.shape else (start // row, -(-stop // row))
        t = self.read_rows(first, max(last, first)).reshape(-1)[start - first * row : stop - first * row]
        return t.float() if self.widen else t


def read_alone(plan: MergePlan, step: Step, rows: Rows) -> bool:
    """A unit that is not read ahead of, nor while it is computed: one read whole that holds
    more than a block of rows would, or one whose method reads it in pieces (on the caller's
    thread, as it computes)."""
    return rows is None and (math.prod(step.out.shape) > BLOCK_ELEMENTS or reads_in_pieces(plan, step))


def reads_in_pieces(plan: MergePlan, step: Step) -> bool:
    """Whether `step`'s inputs reach its method as `CheckpointFlat`s (see the module docstring)."""
    return plan.method.reads_in_pieces and step.merge and step.origin is None and plan.masks is None and not plan.side


def _load(plan: MergePlan, step: Step, rows: Rows) -> Inputs:
    """Read one tensor (or block of rows) of every input, in the compute dtype; and, for
    masked merges, the base as stored."""
    if step.origin is not None:  # layer stacking: one tensor of one model, maybe renamed
        index, name = step.origin
        if not step.merge:
            return Inputs(plan.models[index].checkpoint.read(name, rows), [], None)
        return Inputs(None, [plan.models[index].checkpoint.read(name, rows, plan.compute_dtype)], None)
    if not step.merge:
        return Inputs(plan.reference.checkpoint.read(step.name), [], None)
    dtype = plan.compute_dtype
    if rows is None and reads_in_pieces(plan, step):
        widen = plan.widen
        base_flat = CheckpointFlat.of(plan.base.checkpoint, step.name, dtype, widen) if plan.base else None
        flats = [
            CheckpointFlat.of(src.checkpoint, step.name, dtype, widen) if present else base_flat
            for src, present in zip(plan.models, step.present)
        ]  # a model without the tensor (`on_missing: base`) reads the base's: pieces are read-only
        return Inputs(base_flat, flats, None)
    raw = base = None
    if plan.base and plan.masks is not None:  # masks put the stored base back outside them
        raw = plan.base.checkpoint.read(step.name, rows)
        base = raw.to(dtype)
    elif plan.base:
        base = plan.base.checkpoint.read(step.name, rows, dtype)
    tensors = []
    for src, present in zip(plan.models, step.present):
        if present:
            tensors.append(src.checkpoint.read(step.name, rows, dtype))
        else:
            assert base is not None  # on_missing: base is only planned with a base model
            tensors.append(base.clone())  # its own tensor, like every other input
    side = {name: [read_side(f, step.name, rows) for f in files] for name, files in plan.side.items()}
    return Inputs(base, tensors, raw, side)


def _mapped(plan: MergePlan, step: Step) -> list[MappedRows]:
    """A token-indexed step's inputs (the base first) on the output vocabulary; a model that
    lacks the tensor (`on_missing: base`) stands in with the base's, with the base's rows."""
    assert plan.vocabulary is not None
    dtype = plan.compute_dtype

    def reader(checkpoint: Checkpoint) -> Callable[[int, int], torch.Tensor]:
        return lambda a, b: checkpoint.read(step.name, (a, b), dtype)

    first = 1 if plan.base else 0
    readers = [reader(plan.base.checkpoint)] if plan.base else []
    owners = [0] if plan.base else []
    for i, (src, present) in enumerate(zip(plan.models, step.present)):
        readers.append(reader(src.checkpoint if present else plan.base.checkpoint))
        owners.append(first + i if present else 0)
    return plan.vocabulary.mapped(readers, owners, tuple(step.out.shape[1:]), dtype)


def _load_mapped(plan: MergePlan, step: Step, rows: Rows, mapped: list[MappedRows]) -> Inputs:
    """A token-indexed step's unit: its output rows of every input, or for a method that reads
    in pieces, `CheckpointFlat`s of those rows."""
    if rows is None and reads_in_pieces(plan, step):
        tensors: list[Input] = [CheckpointFlat(step.out.shape, plan.compute_dtype, m, plan.widen) for m in mapped]
    else:
        a, b = rows or (0, step.out.shape[0])
        tensors = [m(a, b) for m in mapped]
    side = {name: [read_side(f, step.name, rows) for f in files] for name, files in plan.side.items()}
    return Inputs(tensors[0], tensors[1:], None, side) if plan.base else Inputs(None, tensors, None, side)


def read_side(side: SideInput, name: str, rows: Rows) -> torch.Tensor | None:
    """One model's side tensor for tensor `name` (or its block of rows), float32; None if the
    file has none for it.

    Raises:
        InputError: the file holds NaN or infinite values for it.
    """
    if name not in side.shapes:
        return None
    with safe_open(str(side.path), framework="pt") as f:
        t = f.get_tensor(name) if rows is None else f.get_slice(name)[rows[0] : rows[1]]
    if not bool(torch.isfinite(t).all()):
        raise InputError(f"{side.key}: {side.path}: tensor {name} holds NaN or infinite values", hint="recompute the file in float32")
    return t
