"""Per-tensor similarity of two weight deltas (MAET Eq. 4), and ranking tensors by it.

`S(τ) = ⟨Δ_A[τ], Δ_B[τ]⟩`, the dot product of the flattened slices (the paper's choice), or
their cosine. Sums are accumulated in float64 so that the ranking of millions of small
products does not depend on the order of summation.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from neuroloc_cli.arch import layer_index, tensor_kind
from neuroloc_cli.errors import InputError, UsageError
from neuroloc_cli.io.checkpoint import Checkpoint

METRICS = ("dot", "cosine")


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """⟨a, b⟩ of the flattened tensors, accumulated in float64."""
    return float(torch.dot(a.reshape(-1).double(), b.reshape(-1).double()))


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """⟨a, b⟩ / (‖a‖·‖b‖); 0 when either is all zeros (no direction to compare)."""
    a64, b64 = a.reshape(-1).double(), b.reshape(-1).double()
    norms = float(a64.norm() * b64.norm())
    return float(torch.dot(a64, b64)) / norms if norms else 0.0


def similarity(a: torch.Tensor, b: torch.Tensor, metric: str = "dot") -> float:
    """`dot` or `cosine` similarity of two tensors of one shape."""
    return dot(a, b) if metric == "dot" else cosine(a, b)


@dataclass(frozen=True)
class TensorScore:
    """One row of a ranking."""

    tensor: str
    score: float
    numel: int

    def as_dict(self) -> dict:
        return {"tensor": self.tensor, "layer": layer_index(self.tensor), "kind": tensor_kind(self.tensor), "score": self.score, "numel": self.numel}


def sort_scores(scores: list[TensorScore]) -> list[TensorScore]:
    """Descending by score; ties keep checkpoint order (a stable sort)."""
    return sorted(scores, key=lambda s: -s.score)


class DeltaReader:
    """One tensor at a time of `Δ = X − base` for a model X, or of a delta checkpoint as is.

    Args:
        path: a model or a delta checkpoint folder.
        base: the base model; required when `path` is a model.
        role: its name in messages ("A", "B").
    """

    def __init__(self, path: Path, base: Checkpoint | None, role: str):
        self.ckpt = Checkpoint.open(path, spec=str(path))
        self.role = role
        self.base = None if self.ckpt.kind == "delta" else base
        if self.ckpt.kind != "delta" and base is None:
            raise UsageError(f"{role} ({path}) is a model, not a delta checkpoint", hint="pass --base BASE, or give deltas written by `neuroloc delta`")

    def read(self, name: str) -> torch.Tensor:
        x = self.ckpt.read(name).float()
        return x if self.base is None else x.sub_(self.base.read(name).float())


def rank_deltas(a: Path, b: Path, base: Path | None = None, metric: str = "dot") -> list[TensorScore]:
    """Every floating tensor of A, with its similarity between Δ_A and Δ_B, sorted descending.

    Args:
        a, b: models (with `base`) or delta checkpoints.
        base: the base model, or None when A and B are deltas.
        metric: "dot" (MAET Eq. 4) or "cosine".

    Raises:
        UsageError: unknown metric, or a model given without `base`.
        InputError: unreadable checkpoints, or a tensor missing or of another shape.
    """
    if metric not in METRICS:
        raise UsageError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    base_ckpt = Checkpoint.open(base, spec=str(base)) if base is not None else None
    ra, rb = DeltaReader(a, base_ckpt, "A"), DeltaReader(b, base_ckpt, "B")
    names = [n for n, i in ra.ckpt.tensors.items() if i.torch_dtype.is_floating_point]
    _check_same(names, ra, [rb] + ([] if base_ckpt is None else [base_ckpt]))
    scores = [TensorScore(n, similarity(ra.read(n), rb.read(n), metric), ra.ckpt.tensors[n].numel) for n in names]
    return sort_scores(scores)


def _check_same(names: list[str], ref: DeltaReader, others: list) -> None:
    for other in others:
        ckpt = other.ckpt if isinstance(other, DeltaReader) else other
        for n in names:
            info = ckpt.tensors.get(n)
            if info is None:
                raise InputError(f"{ckpt.path}: tensor {n} is missing (present in {ref.ckpt.path})")
            if info.shape != ref.ckpt.tensors[n].shape:
                raise InputError(f"{ckpt.path}: tensor {n} has shape {list(info.shape)}, {ref.ckpt.path} has {list(ref.ckpt.tensors[n].shape)}")
