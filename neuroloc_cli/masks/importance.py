"""The importance artifact: a score per element of each scored tensor, before anything is selected.

Locating is two steps: a scorer (weight changes, gradients on data, activations) writes an
importance file; the one selector (`locate.select`) turns importance into a mask. Keeping the
scores lets a user re-select at another share, granularity or scope without running the
model again, and lets later commands (data-aware merges) read the scores themselves.

File format (version 1) — a safetensors file:

- one float32 tensor per scored model tensor, under the model tensor's own name and shape;
  values are non-negative (a larger value matters more);
- `__metadata__` (strings): `neuroloc.kind` = `importance`, `neuroloc.importance_version` =
  `1`, `score` (what a value is, e.g. `taylor`, `fisher`, `delta`), `aggregate` (how element
  scores make the score of a row or FFN neuron: `sum`, or `l2` for the root of the sum of
  squares), `source` (the data that was scored, e.g. a language; empty for weight changes),
  `provenance` (JSON: the model, its fingerprint and layout, the data, the settings).

Files are written tensor by tensor (`ImportanceWriter`) and read lazily (`Importance.open`),
so neither side holds more than one tensor of scores.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from neuroloc_cli.errors import InputError
from neuroloc_cli.io.format import read_header
from neuroloc_cli.io.output import atomic_file
from neuroloc_cli.io.writer import OutTensor, encode_header, write_tensor_bytes

IMPORTANCE_VERSION = "1"
AGGREGATES = ("sum", "l2")


@dataclass(frozen=True)
class ImportanceMeta:
    """What an importance file scored.

    Attributes:
        score: what a value is (`taylor`, `taylor-abs`, `fisher`, `delta`, ...).
        aggregate: how element scores combine into a unit's (one of AGGREGATES).
        source: the data scored (a language, a pair), or "" for weight changes.
        provenance: the model, its fingerprint, the data and the settings.
    """

    score: str
    aggregate: str
    source: str = ""
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.aggregate not in AGGREGATES:
            raise ValueError(f"unknown aggregate {self.aggregate!r} (use {', '.join(AGGREGATES)})")

    def header(self) -> dict[str, str]:
        return {
            "neuroloc.kind": "importance",
            "neuroloc.importance_version": IMPORTANCE_VERSION,
            "score": self.score,
            "aggregate": self.aggregate,
            "source": self.source,
            "provenance": json.dumps(self.provenance, separators=(",", ":"), default=str),
        }


def write_importance(path: Path, tensors: Mapping[str, torch.Tensor], meta: ImportanceMeta) -> None:
    """Write an importance file atomically; the same scores always give the same bytes.

    Args:
        tensors: model tensor name -> scores of its shape (stored as float32).

    Raises:
        OutputError: the file cannot be written.
    """
    stream_importance(path, {n: tuple(t.shape) for n, t in tensors.items()}, tensors.items(), meta)


def stream_importance(
    path: Path, shapes: Mapping[str, Sequence[int]], items: Iterable[tuple[str, torch.Tensor]], meta: ImportanceMeta
) -> None:
    """Write an importance file from scores produced one tensor at a time, in `shapes`' order.

    Raises:
        OutputError: the file cannot be written.
        ValueError: `items` does not follow `shapes` (a programming error).
    """
    layout = [OutTensor(n, tuple(s), torch.float32) for n, s in shapes.items()]
    with atomic_file(path, "importance file") as tmp, open(tmp, "wb") as f:
        f.write(encode_header(layout, meta.header()))
        expected = iter(layout)
        for name, t in items:
            spec = next(expected, None)
            if spec is None or spec.name != name or tuple(t.shape) != spec.shape:
                raise ValueError(f"importance tensor {name} {tuple(t.shape)} out of the header's order")
            scores = t.detach().to("cpu", torch.float32).contiguous()
            _check_finite(scores, name, "the scores")
            write_tensor_bytes(f, scores)
        if next(expected, None) is not None:
            raise ValueError("fewer importance tensors than the header lists")


@dataclass
class Importance:
    """An importance file opened lazily: names and shapes from its header, scores on `read`."""

    path: Path
    meta: ImportanceMeta
    shapes: dict[str, tuple[int, ...]]

    @classmethod
    def open(cls, path: Path | str) -> Importance:
        """Read an importance file's header.

        Raises:
            InputError: the file is missing, not a neuroloc importance file, or damaged.
        """
        path = Path(path)
        if not path.is_file():
            raise InputError(f"{path}: no such importance file")
        header = read_header(path)  # strict: a damaged file is refused here, naming it
        meta = header.metadata
        if meta.get("neuroloc.kind") != "importance":
            kind = meta.get("neuroloc.kind")
            raise InputError(
                f"{path}: not a neuroloc importance file (its kind is {kind!r})" if kind else f"{path}: not a neuroloc importance file",
                hint="importance files are written by `neuroloc locate ...` (under DIR/importance/, or with --importance FILE)",
            )
        if meta.get("neuroloc.importance_version") != IMPORTANCE_VERSION:
            raise InputError(f"{path}: importance format version {meta.get('neuroloc.importance_version')!r} is not supported")
        shapes = {}
        # in the order the scores were written (data offsets), which ties at a threshold follow
        for info in sorted(header.tensors.values(), key=lambda i: i.offsets):
            if info.dtype != "F32":
                raise InputError(f"{path}: importance tensor {info.name} is {info.dtype}, expected F32")
            shapes[info.name] = info.shape
        try:
            info = ImportanceMeta(meta["score"], meta["aggregate"], meta.get("source", ""), json.loads(meta.get("provenance", "{}")))
        except (KeyError, ValueError) as e:  # a missing key, bad JSON, an unknown aggregate
            raise InputError(f"{path}: damaged importance metadata ({type(e).__name__}: {e})") from None
        return cls(path, info, shapes)

    @property
    def aggregate(self) -> str:
        return self.meta.aggregate

    @property
    def label(self) -> str:
        return str(self.path)

    def read(self, name: str) -> torch.Tensor:
        """The scores of one tensor (float32, a fresh copy the caller may modify).

        Raises:
            InputError: the file holds a NaN or an infinity for it.
        """
        with safe_open(str(self.path), framework="pt") as f:
            return _check_finite(f.get_tensor(name), name, str(self.path))

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Every tensor's scores in file order, one at a time."""
        with safe_open(str(self.path), framework="pt") as f:
            for name in self.shapes:
                yield name, _check_finite(f.get_tensor(name), name, str(self.path))


def _check_finite(scores: torch.Tensor, name: str, where: str) -> torch.Tensor:
    """Refuse NaN and infinite scores: a selection of them would be arbitrary (top-k ranks a
    NaN first, a histogram drops it), so they are an error rather than a silent pick."""
    if not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).sum())
        raise InputError(
            f"{where}: importance of {name} has {bad} non-finite values (NaN or inf)",
            hint="the model gave non-finite gradients or activations on this data; check it in float32",
        )
    return scores
