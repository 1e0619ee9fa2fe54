"""Set operations on masks: union, intersection, difference, and Jaccard overlap.

Two row/FFN entries selected along the same axis combine as unit vectors (cheap, and the
result keeps its granularity); two element entries combine as their packed bits, 8 elements
per byte operation, never unpacked; any other pair is combined element-wise, and the result
becomes an `element` mask. A tensor listed in only one mask counts as entirely unselected
in the other. Tensors both masks list must have the same shape, or the operation is refused
naming the tensor.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from neuroloc_cli.errors import InputError
from neuroloc_cli.masks.format import LAYOUT_KEY, Mask, MaskEntry, count_bits

_BoolOp = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# Written with the bitwise operators, so that each works on BOOL selections and on packed
# U8 bits alike (padding bits are 0 in both operands and stay 0).
SET_OPS: dict[str, _BoolOp] = {
    "union": lambda a, b: a | b,
    "intersect": lambda a, b: a & b,
    "diff": lambda a, b: a & ~b,
}


def check_compatible(a: Mask, b: Mask, a_name: str = "A", b_name: str = "B") -> None:
    """Refuse two masks made for models of different layouts (their `model_layout`
    provenance differs), or that list one tensor with different shapes.

    Raises:
        InputError: naming both masks, or the first tensor that differs.
    """
    la, lb = a.provenance.get(LAYOUT_KEY), b.provenance.get(LAYOUT_KEY)
    if la and lb and la != lb:
        raise InputError(
            f"{a_name} and {b_name} were made for models with different tensors (layout {la} vs {lb})",
            hint="combine masks of one architecture",
        )
    for name, ea in a.entries.items():
        eb = b.entries.get(name)
        if eb is not None and ea.shape != eb.shape:
            raise InputError(f"mask tensor {name} has shape {list(ea.shape)} in {a_name} but {list(eb.shape)} in {b_name}")


def combine(op: str, a: Mask, b: Mask, a_name: str = "A", b_name: str = "B") -> Mask:
    """`a OP b` for OP in union, intersect, diff, tensor by tensor.

    Args:
        op: one of `SET_OPS`.
        a, b: the masks; `a_name`, `b_name` name them in messages.

    Returns:
        A new mask listing every tensor of `a` (and of `b` for a union); its granularity is
        the inputs' when they share it and no entry had to be expanded, else `element`.

    Raises:
        InputError: the masks were made for models of different layouts, or a tensor has
            different shapes in the two (`check_compatible`).
    """
    check_compatible(a, b, a_name, b_name)
    fn = SET_OPS[op]
    names = list(a.entries) + ([n for n in b.entries if n not in a.entries] if op == "union" else [])
    entries = {n: _combine_entry(fn, a.entries.get(n), b.entries.get(n)) for n in names}
    granularity = a.granularity if a.granularity == b.granularity and all(e.axis is not None for e in entries.values()) else "element"
    if granularity == "element":  # an element mask holds element entries only, as its readers expect
        entries = {n: to_element(e) for n, e in entries.items()}
    provenance = {"operation": op, "inputs": [a_name, b_name], "of": [a.provenance, b.provenance]}
    layout = a.provenance.get(LAYOUT_KEY) or b.provenance.get(LAYOUT_KEY)
    if layout:
        provenance[LAYOUT_KEY] = layout
    return Mask(granularity, entries, provenance)


def _combine_entry(fn: _BoolOp, ea: MaskEntry | None, eb: MaskEntry | None) -> MaskEntry:
    if ea is None or eb is None:
        present = ea or eb
        assert present is not None
        if present.axis is None:
            empty = torch.zeros_like(present.bits)
            sa, sb = (present.bits, empty) if ea is not None else (empty, present.bits)
            return MaskEntry.from_bits(present.shape, fn(sa, sb))
        empty = torch.zeros_like(present.selected)
        sa, sb = (present.selected, empty) if ea is not None else (empty, present.selected)
        return MaskEntry(present.shape, present.axis, fn(sa, sb))
    if ea.axis is None and eb.axis is None:
        return MaskEntry.from_bits(ea.shape, fn(ea.bits, eb.bits))
    if ea.axis == eb.axis:
        return MaskEntry(ea.shape, ea.axis, fn(ea.selected, eb.selected))
    return MaskEntry(ea.shape, None, fn(ea.dense(), eb.dense()).contiguous())


@dataclass(frozen=True)
class Overlap:
    """Element counts of two masks over one tensor (or over all of them)."""

    tensor: str
    a: int
    b: int
    intersection: int
    union: int

    @property
    def jaccard(self) -> float:
        """|A ∩ B| / |A ∪ B|; 1.0 when both are empty (two empty selections agree)."""
        return self.intersection / self.union if self.union else 1.0

    def as_dict(self) -> dict:
        return {
            "tensor": self.tensor,
            "a": self.a,
            "b": self.b,
            "intersection": self.intersection,
            "union": self.union,
            "jaccard": self.jaccard,
        }


def overlap(a: Mask, b: Mask, a_name: str = "A", b_name: str = "B") -> tuple[list[Overlap], Overlap]:
    """Jaccard overlap in selected elements, per tensor (every tensor either lists) and overall.

    Raises:
        InputError: the masks were made for models of different layouts, or a tensor has
            different shapes in the two (`check_compatible`).
    """
    check_compatible(a, b, a_name, b_name)
    names = list(a.entries) + [n for n in b.entries if n not in a.entries]
    rows = [_overlap_entry(n, a.entries.get(n), b.entries.get(n)) for n in names]
    total = Overlap("(all)", *(sum(getattr(r, f) for r in rows) for f in ("a", "b", "intersection", "union")))
    return rows, total


def _overlap_entry(name: str, ea: MaskEntry | None, eb: MaskEntry | None) -> Overlap:
    if ea is None or eb is None:
        present = ea or eb
        assert present is not None
        n = selected_elements(present)
        return Overlap(name, n if ea is not None else 0, n if eb is not None else 0, 0, n)
    if ea.axis is None and eb.axis is None:
        inter, union = count_bits(ea.bits & eb.bits), count_bits(ea.bits | eb.bits)
        return Overlap(name, ea.selected_units, eb.selected_units, inter, union)
    if ea.axis == eb.axis and ea.axis is not None:
        # Same unit axis: count units, then scale by the elements each unit spans.
        span = ea.span
        inter = int((ea.selected & eb.selected).sum()) * span
        union = int((ea.selected | eb.selected).sum()) * span
        return Overlap(name, ea.selected_units * span, eb.selected_units * span, inter, union)
    da, db = ea.dense(), eb.dense()
    return Overlap(name, int(da.sum()), int(db.sum()), int((da & db).sum()), int((da | db).sum()))


def to_element(entry: MaskEntry) -> MaskEntry:
    """The same selection as an element entry (`axis` None)."""
    return entry if entry.axis is None else MaskEntry(entry.shape, None, entry.dense().contiguous())


def selected_elements(entry: MaskEntry) -> int:
    """Selected elements of one entry, without expanding row/FFN entries or unpacking bits."""
    return entry.selected_units * entry.span
