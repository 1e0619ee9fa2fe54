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
from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

BLOCK = 4096
CHUNK = 1 << 22  # elements converted to float64 at a time: no whole-tensor float64 copy
PIECE = 1 << 18  # elements per piece of `pieces`: a whole number of BLOCKs, 1 MiB in float32 (few temporaries, cache-sized)


def fixed_sum(values: torch.Tensor) -> float:
    """Σ of every element of `values`, in float64."""
    flat = values.reshape(-1)
    return math.fsum(s for i in range(0, flat.numel(), CHUNK) for s in _block_sums(flat[i : i + CHUNK].double()))


def fixed_dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """⟨a, b⟩ of the flattened tensors (of one size), in float64."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    return math.fsum(s for i in range(0, fa.numel(), CHUNK) for s in _block_sums(fa[i : i + CHUNK].double() * fb[i : i + CHUNK].double()))


def pieces(n: int, row: int | None = None) -> Iterator[slice]:
    """Consecutive slices of `range(n)` of `PIECE` elements (the last one shorter): the unit
    of methods that work through a flat tensor a piece at a time, holding only one piece's
    temporaries. Each starts at a multiple of `BLOCK`, so `dot_blocks` over them gives the
    block sums of `fixed_dot`. With `row` (a row's length, dividing `n`), whole rows instead:
    each piece holds `max(1, PIECE // row)` of them."""
    step = PIECE if row is None else max(1, PIECE // row) * row
    return (slice(a, min(a + step, n)) for a in range(0, n, step))


def dot_blocks(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """The float64 block sums of ⟨a, b⟩ (flat tensors of one size): `math.fsum` of the lists
    of the `pieces` of two tensors is their `fixed_dot`, the same float."""
    return [s for i in range(0, a.numel(), CHUNK) for s in _block_sums(a[i : i + CHUNK].double() * b[i : i + CHUNK].double())]


def product_blocks(products: torch.Tensor) -> list[float]:
    """The block sums of a flat float64 tensor of products made elsewhere (by a compiled loop):
    `dot_blocks(a, b)` when `products` is `a.double() * b.double()`, the same floats."""
    return _block_sums(products)


def fixed_gram(n: int, count: int, vectors: Callable[[slice], Sequence[torch.Tensor]]) -> list[list[float]]:
    """The Gram matrix `⟨v_i, v_j⟩` of `count` flat vectors of `n` elements, each entry the
    float of their `fixed_dot`. `vectors(c)` gives the vectors' pieces at each slice `c` of
    `pieces(n)`: one pass, each piece converted to float64 once."""
    sums: dict[tuple[int, int], list[float]] = {(i, j): [] for i in range(count) for j in range(i, count)}
    for c in pieces(n):
        vs = [v.double() for v in vectors(c)]
        for (i, j), part in sums.items():
            part += _block_sums(vs[i] * vs[j])
    gram = [[0.0] * count for _ in range(count)]
    for (i, j), part in sums.items():
        gram[i][j] = gram[j][i] = math.fsum(part)
    return gram


def gram_quadratic(gram: Sequence[Sequence[float]], a: Sequence[float]) -> float:
    """`‖Σ a_i x_i‖²` from the Gram matrix of the `x_i`, summed exactly (`math.fsum`)."""
    return math.fsum(a[i] * a[j] * g for i, row in enumerate(gram) for j, g in enumerate(row))


def gram_product(gram: Sequence[Sequence[float]], a: Sequence[float]) -> list[float]:
    """`⟨x_i, Σ a_j x_j⟩` for each i, from the Gram matrix of the `x_j`."""
    return [math.fsum(g * aj for g, aj in zip(row, a)) for row in gram]


def _block_sums(part: torch.Tensor) -> list[float]:
    pad = -part.numel() % BLOCK
    return F.pad(part, (0, pad)).view(-1, BLOCK).sum(dim=1).tolist()
