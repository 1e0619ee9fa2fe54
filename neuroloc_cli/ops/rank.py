"""Per-tensor similarity of two weight deltas (MAET Eq. 4), and ranking tensors by it.

`S(τ) = ⟨Δ_A[τ], Δ_B[τ]⟩`, the dot product of the flattened slices (the paper's choice), or
their cosine. Sums are accumulated in float64, in a fixed order (`ops.sums`), so that a
ranking of millions of small products is the same on every machine and thread count.
"""

from __future__ import annotations

from dataclasses import dataclass

from neuroloc_cli.arch import layer_index, tensor_kind

METRICS = ("dot", "cosine")


def similarity_from_sums(sums: dict[str, float], metric: str) -> float:
    """The similarity from its sums over blocks: `ab` = ⟨a, b⟩, and for cosine `aa`, `bb`."""
    if metric == "dot":
        return sums["ab"]
    norms = (sums["aa"] * sums["bb"]) ** 0.5
    return sums["ab"] / norms if norms else 0.0


@dataclass(frozen=True)
class TensorScore:
    """One row of a ranking."""

    tensor: str
    score: float
    numel: int

    def as_dict(self) -> dict:
        return {
            "tensor": self.tensor,
            "layer": layer_index(self.tensor),
            "kind": tensor_kind(self.tensor),
            "score": self.score,
            "numel": self.numel,
        }


def sort_scores(scores: list[TensorScore]) -> list[TensorScore]:
    """Descending by score; ties keep checkpoint order (a stable sort)."""
    return sorted(scores, key=lambda s: -s.score)
