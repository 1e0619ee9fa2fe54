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


@dataclass
class MaskEntry:
    """The selection of one tensor.

    Attributes:
        shape: the model tensor's shape.
        axis: the axis whose units are selected (row/ffn), or None for element masks.
        selected: BOOL; 1-D of length `shape[axis]` (row/ffn), or of `shape` (element).
    """

    shape: tuple[int, ...]
    axis: int | None
    selected: torch.Tensor

    def __post_init__(self) -> None:
        expected = self.shape if self.axis is None else (self.shape[self.axis],)
        if tuple(self.selected.shape) != tuple(expected) or self.selected.dtype != torch.bool:
            raise ValueError(
                f"mask entry of shape {tuple(self.selected.shape)} {self.selected.dtype} does not fit {self.shape} along axis {self.axis}"
            )

    def dense(self) -> torch.Tensor:
        """A BOOL tensor of the model tensor's shape (a view where possible)."""
        if self.axis is None:
            return self.selected
        view = [1] * len(self.shape)
        view[self.axis] = self.shape[self.axis]
        return self.selected.view(view).expand(self.shape)

    @property
    def units(self) -> int:
        return self.selected.numel()

    @property
    def span(self) -> int:
        """Elements of the model tensor that one unit covers (1 for element masks); computed
        without dividing, so that a tensor with a zero-size dimension spans 0 elements."""
        return 1 if self.axis is None else math.prod(d for i, d in enumerate(self.shape) if i != self.axis)

    @property
    def selected_units(self) -> int:
        return int(self.selected.sum())


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
            if e.axis is None:
                bits = np.packbits(e.selected.reshape(-1).numpy(), bitorder="little")
                tensors[name] = torch.from_numpy(bits)
            else:
                tensors[name] = e.selected.contiguous()
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
        return sum(int(e.dense().sum()) for e in self.entries.values())


def layout_digest(shapes: Mapping[str, Sequence[int]]) -> str:
    """A short digest of a model's tensor names and shapes: masks record the layout of the
    model they were made for (provenance key `model_layout`), so that masks of two different
    architectures are not combined by accident."""
    text = "\n".join(f"{name}:{','.join(map(str, shape))}" for name, shape in sorted(shapes.items()))
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _read_entry(f: Any, name: str, spec: dict[str, Any], path: Path) -> MaskEntry:
    shape, axis = tuple(spec["shape"]), spec["axis"]
    stored = f.get_tensor(name)
    if axis is None:
        n = int(np.prod(shape))
        bits = np.unpackbits(stored.numpy(), count=n, bitorder="little").astype(bool)
        selected = torch.from_numpy(bits).reshape(shape)
    else:
        selected = stored.to(torch.bool)
    try:
        return MaskEntry(shape, axis, selected)
    except ValueError as e:
        raise InputError(f"{path}: mask tensor {name}: {e}") from None
