"""The mask artifact: which rows, FFN neurons or elements of each tensor are selected.

File format (version 1) — a safetensors file, so it can be inspected with any safetensors
tool and read lazily:

- one tensor per masked model tensor, stored under the model tensor's own name:
  - granularity `row` or `ffn`: a BOOL vector, one entry per unit along `axis` of the model
    tensor (axis 0 = rows of a `[out, in]` weight; GPT-2's `Conv1D` weights are `[in, out]`,
    so their output units are axis 1; an FFN neuron is a row of gate/up and a column of down);
  - granularity `element`: a U8 vector of the tensor's flattened bits, packed 8 per byte
    (little bit order, as `numpy.packbits(..., bitorder="little")`), so a 7B-parameter element
    mask takes 0.9 GB rather than 7 GB.
- `__metadata__` (strings): `neuroloc.kind` = `mask`, `neuroloc.mask_version` = `1`,
  `granularity`, `tensors` (JSON: name -> {"shape": [...], "axis": int or null}),
  `provenance` (JSON: how the mask was made and from which model).

A tensor of the model that the mask does not list is entirely unselected.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open

from neuroloc_cli.errors import InputError
from neuroloc_cli.io.output import atomic_file
from neuroloc_cli.io.writer import OutTensor, encode_header, write_tensor_bytes

GRANULARITIES = ("row", "ffn", "element")
MASK_VERSION = "1"
LAYOUT_KEY = "model_layout"  # provenance key: `layout_digest` of the model a mask was made for


class MaskEntry:
    """The selection of one tensor.

    Element selections are held packed, 8 per byte, as they are stored (a dense boolean
    element mask of a 7B model is 7 GB, packed 0.9 GB): `bits` is what set algebra, counts and
    saving use, and `selected` / `dense()` unpack one tensor when a caller needs booleans.

    Attributes:
        shape: the model tensor's shape.
        axis: the axis whose units are selected (row/ffn), or None for element masks.
    """

    __slots__ = ("shape", "axis", "_units", "_bits")

    def __init__(self, shape: Sequence[int], axis: int | None, selected: torch.Tensor):
        """Args:
        selected: BOOL; 1-D of length `shape[axis]` (row/ffn), or of `shape` (element).
        """
        self.shape = tuple(shape)
        self.axis = axis
        expected = self.shape if axis is None else (self.shape[axis],)
        if tuple(selected.shape) != tuple(expected) or selected.dtype != torch.bool:
            raise ValueError(f"mask entry of shape {tuple(selected.shape)} {selected.dtype} does not fit {self.shape} along axis {axis}")
        if axis is None:
            self._units, self._bits = None, pack_bits(selected)
        else:
            self._units, self._bits = selected, None

    @classmethod
    def from_bits(cls, shape: Sequence[int], bits: torch.Tensor) -> MaskEntry:
        """An element entry from its packed bits (U8, `ceil(n / 8)` bytes, little bit order);
        bits past the tensor's last element are cleared.

        Raises:
            ValueError: the byte count does not fit the shape.
        """
        n = math.prod(shape)
        if bits.dtype != torch.uint8 or tuple(bits.shape) != ((n + 7) // 8,):
            raise ValueError(f"{bits.numel()} packed bytes ({bits.dtype}) do not fit {n} elements of shape {tuple(shape)}")
        entry = cls.__new__(cls)
        entry.shape, entry.axis, entry._units = tuple(shape), None, None
        bits = bits.contiguous()
        if n % 8:
            bits = bits.clone()
            bits[-1] &= (1 << (n % 8)) - 1
        entry._bits = bits
        return entry

    @property
    def bits(self) -> torch.Tensor:
        """The packed selection of an element entry (U8)."""
        if self._bits is None:
            raise ValueError("a row/ffn entry has unit selections, not packed element bits")
        return self._bits

    @property
    def selected(self) -> torch.Tensor:
        """BOOL: one per unit along `axis`, or (element entries, unpacked) of `shape`."""
        if self._units is not None:
            return self._units
        return unpack_bits(self._bits, self.shape)

    def dense(self) -> torch.Tensor:
        """A BOOL tensor of the model tensor's shape (a view where possible)."""
        if self.axis is None:
            return self.selected
        view = [1] * len(self.shape)
        view[self.axis] = self.shape[self.axis]
        return self._units.view(view).expand(self.shape)

    def dense_rows(self, start: int, stop: int) -> torch.Tensor:
        """`dense()[start:stop]`, unpacking only the bytes of those rows (a merge reads large
        tensors a block of rows at a time)."""
        if self.axis is not None:
            return self.dense()[start:stop]
        row = math.prod(self.shape[1:])
        first, last = start * row, stop * row
        window = self._bits[first // 8 : (last + 7) // 8]
        flat = np.unpackbits(window.numpy(), bitorder="little")[first % 8 : first % 8 + last - first]
        return torch.from_numpy(flat.view(np.bool_)).reshape((stop - start, *self.shape[1:]))

    @property
    def units(self) -> int:
        return math.prod(self.shape) if self.axis is None else self.shape[self.axis]

    @property
    def span(self) -> int:
        """Elements of the model tensor that one unit covers (1 for element masks); computed
        without dividing, so that a tensor with a zero-size dimension spans 0 elements."""
        return 1 if self.axis is None else math.prod(d for i, d in enumerate(self.shape) if i != self.axis)

    @property
    def selected_units(self) -> int:
        return count_bits(self._bits) if self._bits is not None else int(self._units.sum())

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, MaskEntry):
            return NotImplemented
        mine, theirs = (self._bits, other._bits) if self.axis is None else (self._units, other._units)
        return self.shape == other.shape and self.axis == other.axis and torch.equal(mine, theirs)

    def __repr__(self) -> str:
        return f"MaskEntry(shape={list(self.shape)}, axis={self.axis}, selected={self.selected_units} of {self.units})"


def pack_bits(selected: torch.Tensor) -> torch.Tensor:
    """BOOL of any shape -> its flattened bits, 8 per byte, little bit order (U8)."""
    return torch.from_numpy(np.packbits(selected.reshape(-1).numpy(), bitorder="little"))


def count_bits(bits: torch.Tensor) -> int:
    """Set bits of packed U8 bits (a population count, without unpacking)."""
    return int(np.bitwise_count(bits.numpy()).sum(dtype=np.int64))


def unpack_bits(bits: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """`pack_bits`'s inverse: a BOOL tensor of `shape`."""
    n = math.prod(shape)
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=n, bitorder="little").view(np.bool_)).reshape(tuple(shape))


@dataclass
class Mask:
    """A saved selection over a model's tensors (see the module docstring for the format)."""

    granularity: str
    entries: dict[str, MaskEntry]
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"unknown mask granularity {self.granularity!r} (use {', '.join(GRANULARITIES)})")

    # -- persistence ------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Write the mask to `path` atomically (a temporary file renamed into place).

        The same mask always gives the same bytes: the header is written in a fixed order
        (`safetensors.save_file` orders `__metadata__` differently in each process).

        Raises:
            OutputError: the file cannot be written.
        """

        tensors, layout = {}, {}
        for name, e in self.entries.items():
            layout[name] = {"shape": list(e.shape), "axis": e.axis}
            tensors[name] = e.bits if e.axis is None else e.selected.contiguous()
        metadata = {
            "neuroloc.kind": "mask",
            "neuroloc.mask_version": MASK_VERSION,
            "granularity": self.granularity,
            "tensors": json.dumps(layout, separators=(",", ":")),
            "provenance": json.dumps(self.provenance, separators=(",", ":"), default=str),
        }
        layout_out = [OutTensor(name, tuple(t.shape), t.dtype) for name, t in tensors.items()]
        with atomic_file(path, "mask") as tmp, open(tmp, "wb") as f:
            f.write(encode_header(layout_out, metadata))
            for t in tensors.values():
                write_tensor_bytes(f, t)

    @property
    def data_bytes(self) -> int:
        """The bytes `save` writes after the header: a bit per element of an element mask, a
        byte per unit of a row or neuron mask."""
        return sum(e.bits.numel() if e.axis is None else e.selected.numel() * e.selected.element_size() for e in self.entries.values())

    @classmethod
    def load(cls, path: Path | str) -> Mask:
        """Read a mask file.

        Raises:
            InputError: the file is missing, not a neuroloc mask, or inconsistent.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such mask file")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                if meta.get("neuroloc.kind") != "mask":
                    raise InputError(f"{path}: not a neuroloc mask (no 'neuroloc.kind: mask' in its metadata)")
                if meta.get("neuroloc.mask_version") != MASK_VERSION:
                    raise InputError(
                        f"{path}: mask format version {meta.get('neuroloc.mask_version')!r} is not supported (expected {MASK_VERSION})"
                    )
                layout = json.loads(meta["tensors"])
                entries = {name: _read_entry(f, name, spec, path) for name, spec in layout.items()}
                return cls(meta["granularity"], entries, json.loads(meta.get("provenance", "{}")))
        except InputError:
            raise
        except Exception as e:  # safetensors' and json's own errors: a damaged file
            raise InputError(f"{path}: cannot read mask ({e})") from None

    # -- checks -----------------------------------------------------------------------------

    def check_shapes(self, shapes: dict[str, tuple[int, ...]], what: str) -> None:
        """Refuse a model (or mask) whose tensors do not match this mask's.

        Args:
            shapes: tensor name -> shape of the model or mask to combine with.
            what: its name, for the message.

        Raises:
            InputError: naming the first tensor that is missing or of another shape.
        """
        for name, e in self.entries.items():
            if name not in shapes:
                raise InputError(f"mask tensor {name} is not in {what}", hint="the mask was made for another architecture")
            if tuple(shapes[name]) != e.shape:
                raise InputError(f"mask tensor {name} has shape {list(e.shape)} but {what} has {list(shapes[name])}")

    @property
    def selected(self) -> int:
        """Number of selected elements of the model (a selected row counts all its elements)."""
        return sum(e.selected_units * e.span for e in self.entries.values())


def layout_digest(shapes: Mapping[str, Sequence[int]]) -> str:
    """A short digest of a model's tensor names and shapes: masks record the layout of the
    model they were made for (provenance key `model_layout`), so that masks of two different
    architectures are not combined by accident."""
    text = "\n".join(f"{name}:{','.join(map(str, shape))}" for name, shape in sorted(shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_entry(f: Any, name: str, spec: dict[str, Any], path: Path) -> MaskEntry:
    shape, axis = tuple(spec["shape"]), spec["axis"]
    stored = f.get_tensor(name)
    try:
        if axis is None:
            return MaskEntry.from_bits(shape, stored)  # kept packed: never expanded on load
        return MaskEntry(shape, axis, stored.to(torch.bool))
    except ValueError as e:
        raise InputError(f"{path}: mask tensor {name}: {e}") from None
