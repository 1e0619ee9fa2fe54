"""Reading a merge's inputs: one tensor (or block of rows) of every input at a time, the
next one read on a worker thread while the current one is computed.

Both passes of the engine read through here: the statistics pass (`merge.stats`) and the
merge itself (`merge.run`). Methods with file parameters (`fisher:`, `gram:`) get each model's
side tensor read here too, the same rows, beside the model's (`Inputs.side`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import torch
from safetensors import safe_open

from neuroloc_cli.errors import InputError
from neuroloc_cli.merge.masks import Rows
from neuroloc_cli.merge.plan import MergePlan, SideInput, Step


class Inputs(tuple):
    """(base in the compute dtype, each model's tensor in the compute dtype, base as stored or
    None), unpacked as a triple; and `side`: each file parameter's tensor per model (float32,
    the same rows), or None where that model's file has none for this tensor."""

    side: dict[str, list[torch.Tensor | None]]

    def __new__(
        cls,
        base: torch.Tensor | None,
        tensors: list[torch.Tensor],
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


def _units(steps: Sequence[Step], blocks: bool) -> list[tuple[Step, Rows]]:
    """Work units: whole tensors, or, when `blocks`, blocks of rows of the large merged ones."""
    # token-indexed tensors of a `tokenizer_source` merge are read whole: their rows move
    return [(step, rows) for step in steps for rows in (row_blocks(step.out.shape) if blocks and step.merge and not step.vocab else [None])]


def stream_inputs(plan: MergePlan, steps: Sequence[Step], *, blocks: bool = False) -> Iterator[tuple[Step, Rows, Inputs]]:
    """Yield each step (or, with `blocks`, each block of rows of a large step) with its
    inputs, reading the next unit on a worker thread meanwhile.

    The inputs are (base, models' tensors) in the compute dtype, and the base as stored
    (masked merges only, else None).
    Use `blocks` only for work that is elementwise or additive over rows.

    Memory: a unit read whole that is larger than a block (an embedding for a method that
    needs whole tensors) is not read ahead of, nor while it is computed: the next unit is
    read once the caller asks for it, so two such units' inputs are never held at once. A
    caller that wants this must drop its reference to a unit's inputs before asking for
    the next one.
    """
    units = _units(steps, blocks)
    if not units:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="neuroloc-read") as pool:
        pending = pool.submit(_load, plan, *units[0])
        for i, (step, rows) in enumerate(units):
            inputs, pending = pending.result(), None  # a done future would keep them alive
            last = i + 1 == len(units)
            ahead = not last and not (is_large_unit(*units[i]) or is_large_unit(*units[i + 1]))
            if ahead:
                pending = pool.submit(_load, plan, *units[i + 1])
            yield step, rows, inputs
            del inputs
            if not ahead and not last:
                pending = pool.submit(_load, plan, *units[i + 1])


def is_large_unit(step: Step, rows: Rows) -> bool:
    """A unit read whole that holds more than a block of rows would: never read ahead of."""
    return rows is None and math.prod(step.out.shape) > BLOCK_ELEMENTS


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
