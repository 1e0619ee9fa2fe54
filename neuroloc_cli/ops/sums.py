"""Sums and dot products that give the same float at any thread count.

PyTorch (and MKL under `torch.dot`) split a long reduction across threads, so the order of
the additions, and with it the last bits, depends on how many threads run. A MAET ranking or
a model_stock ratio computed on a laptop would then differ from the cluster's. Here values
are summed in float64 in blocks of `BLOCK` consecutive elements (one block is reduced by one
thread, whatever the thread count), and the block sums are added exactly (`math.fsum`), so
the result depends only on the values.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

BLOCK = 4096
CHUNK = 1 << 22  # elements converted to float64 at a time: no whole-tensor float64 copy


def fixed_sum(values: torch.Tensor) -> float:
    """Σ of every element of `values`, in float64."""
    flat = values.reshape(-1)
    return math.fsum(s for i in range(0, flat.numel(), CHUNK) for s in _block_sums(flat[i : i + CHUNK].double()))


def fixed_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """⟨a, b⟩ of the flattened tensors (of one size), in float64."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    return math.fsum(
        s for i in range(0, fa.numel(), CHUNK) for s in _block_sums(fa[i : i + CHUNK].double() * fb[i : i + CHUNK].double())
    )


def _block_sums(part: torch.Tensor) -> list[float]:
    pad = -part.numel() % BLOCK
    return F.pad(part, (0, pad)).view(-1, BLOCK).sum(dim=1).tolist()
