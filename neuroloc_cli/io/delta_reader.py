"""Weight deltas read one tensor at a time: `Δ = X − base`, or a delta checkpoint as stored."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from neuroloc_cli.errors import InputError, UsageError
from neuroloc_cli.io.checkpoint import Checkpoint, Kind, compare_tensors


class DeltaReader:
    """Reads `Δ = X − base` of one tensor at a time in float32 (exact for bf16/fp16 inputs).

    Args:
        path: a model, or a delta checkpoint written by `neuroloc delta` (read as is).
        base: the base model; required when `path` is a model.
        role: its name in messages ("A", "TUNED").

    Raises:
        UsageError: `path` is a model and there is no base.
        InputError: the checkpoint cannot be opened.
    """

    def __init__(self, path: Path, base: Checkpoint | None, role: str):
        self.ckpt = Checkpoint.open(path, spec=str(path))
        self.role = role
        self.base = None if self.ckpt.kind == Kind.DELTA else base
        if self.ckpt.kind != Kind.DELTA and base is None:
            raise UsageError(
                f"{role} ({path}) is a model, not a delta checkpoint", hint="pass --base BASE, or give deltas written by `neuroloc delta`"
            )

    def read(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """`Δ` of one tensor (or of its rows `[start, stop)`) in float32.

        Raises:
            InputError: `Δ` holds NaN or inf (a broken input): no ranking of it means anything.
        """
        x = self.ckpt.read(name, rows, dtype=torch.float32)
        d = x if self.base is None else x.sub_(self.base.read(name, rows, dtype=torch.float32))
        if not bool(torch.isfinite(d).all()):
            bad = int(d.numel() - torch.isfinite(d).sum())
            where = self.ckpt.path if self.base is None else f"{self.ckpt.path} or {self.base.path}"
            raise InputError(
                f"{where}: tensor {name} holds NaN or inf ({bad} of {d.numel()} values of its delta)", hint="check that checkpoint"
            )
        return d


def check_same_tensors(names: Iterable[str], reference: Checkpoint, others: Sequence[Checkpoint]) -> None:
    """Refuse checkpoints that lack one of `names` or hold it with another shape.

    Raises:
        InputError: naming the checkpoint and the first such tensor.
    """
    names = list(names)
    for ckpt in others:
        diff = compare_tensors(reference, ckpt, names)
        if diff.missing:
            raise InputError(f"{ckpt.path}: tensor {diff.missing[0]} is missing (present in {reference.path})")
        if diff.reshaped:
            name, theirs, ours = diff.reshaped[0]
            raise InputError(f"{ckpt.path}: tensor {name} has shape {theirs}, {reference.path} has {ours}")
