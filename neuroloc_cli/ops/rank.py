"""Per-tensor similarity of two weight deltas (MAET Eq. 4), and ranking tensors by it.

`S(τ) = ⟨Δ_A[τ], Δ_B[τ]⟩`, the dot product of the flattened slices (the paper's choice), or
their cosine. Sums are accumulated in float64, in a fixed order (`ops.sums`), so that a
ranking of millions of small products is the same on every machine and thread count.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from neuroloc_cli.arch import layer_index, tensor_kind
from neuroloc_cli.errors import UsageError
from neuroloc_cli.io.checkpoint import Checkpoint
from neuroloc_cli.ops.deltas import DeltaReader, check_same_tensors
from neuroloc_cli.ops.sums import fixed_dot

METRICS = ("dot", "cosine")


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """⟨a, b⟩ of the flattened tensors, in float64, the same at any thread count."""
    return fixed_dot(a, b)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """⟨a, b⟩ / (‖a‖·‖b‖); 0 when either is all zeros (no direction to compare)."""
    norms = (fixed_dot(a, a) * fixed_dot(b, b)) ** 0.5
    return fixed_dot(a, b) / norms if norms else 0.0


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
    check_same_tensors(names, ra.ckpt, [rb.ckpt] + ([] if base_ckpt is None else [base_ckpt]))
    scores = [TensorScore(n, similarity(ra.read(n), rb.read(n), metric), ra.ckpt.tensors[n].numel) for n in names]
    return sort_scores(scores)
