"""Sparsifiers: which elements of a task vector the ties / dare / breadcrumbs / della methods keep.

A sparsifier (`Sparsifier`) is one keep rule written twice, side by side:

- `fused`: the rule as the fused loops apply it, a `Keep` (`neuroloc_cli.ops.blockwise`): a
  magnitude cut with its last tie, outliers above a second cut, a keep probability (one, or
  one an element) drawn from the model's random stream. No mask is stored.
- `reference`: the same rule on the whole tensor in plain PyTorch (full sorts, see
  `neuroloc_cli.ops.reference`): the executable specification the tests hold `fused` to.

Both see only densities strictly between 0 and 1: every sparsifier keeps everything at
density 1 and nothing at density 0 (`Sparsifier.keep`, `Sparsifier.keep_reference`).

How many elements a share keeps is one rule for all of neuroloc, mergekit's (`share_count`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from neuroloc_cli.ops import reference
from neuroloc_cli.ops.blockwise import KEEP_NONE, Keep, magnitude_cut, magnitude_ranks
from neuroloc_cli.ops.reference import Kept


def share_count(share: float, n: int) -> int:
    """How many of `n` things a share selects: `int(share · n)`, clipped to [0, n].

    The one rule for every share in neuroloc: the elements a density keeps, the units
    `locate` selects, the tensors in MAET's T. It is mergekit's `int(density · n)`, floating
    point included: 0.29 · 100 is 28.999999999999996, so 28 are kept, exactly as mergekit
    keeps them (and 0.5 of 1 element keeps none).
    """
    return max(0, min(n, int(share * n)))


@dataclass(frozen=True)
class TaskVector:
    """One model's task vector at one tensor, as a sparsifier sees it.

    Attributes:
        base, tuned: flat, contiguous, in the compute dtype (float32 or float64).
        shape: the tensor's shape (DELLA ranks within rows).
        key: the model's random stream (`neuroloc_cli.ops.kernels.draw`); 0 for rules that
            do not draw.
    """

    base: torch.Tensor
    tuned: torch.Tensor
    shape: torch.Size
    key: int = 0

    @property
    def numel(self) -> int:
        return self.base.numel()

    def delta(self) -> torch.Tensor:
        """`tuned − base`, in the tensor's shape."""
        return torch.sub(self.tuned, self.base).reshape(self.shape)


@dataclass(frozen=True)
class Sparsifier:
    """A keep rule in its two forms (see the module docstring).

    Attributes:
        name: the rule's name.
        fused: `fused(v, density, **params) -> Keep` for a `TaskVector` v, 0 < density < 1.
        reference: `reference(v, density, **params) -> Kept`, the same rule in plain PyTorch.
        params: the per-model parameters the rule takes besides density (`gamma`), by keyword.
        random: whether the rule draws (from `v.key`).
    """

    name: str
    fused: Callable[..., Keep]
    reference: Callable[..., Kept]
    params: tuple[str, ...] = ()
    random: bool = False

    def keep(self, v: TaskVector, density: float, **params: float) -> Keep | None:
        """What the fused loops keep of `v`: None (no mask at all) at density 1, nothing at 0."""
        if density >= 1:
            return None
        if density <= 0:
            return Keep(cut=KEEP_NONE)
        return self.fused(v, density, **params)

    def keep_reference(self, v: TaskVector, density: float, **params: float) -> Kept:
        """What the reference keeps of `v`, with the same rule at densities 1 and 0."""
        if density >= 1 or density <= 0:
            return Kept(torch.full(tuple(v.shape), density >= 1))
        return self.reference(v, density, **params)


# -- the rules --------------------------------------------------------------------------------


def _magnitude(v: TaskVector, density: float) -> Keep:
    return Keep(cut=magnitude_cut(v.base, v.tuned, share_count(density, v.numel)))


def _magnitude_reference(v: TaskVector, density: float) -> Kept:
    return Kept(reference.top_k(v.delta().abs(), share_count(density, v.numel)))


MAGNITUDE = Sparsifier("magnitude", _magnitude, _magnitude_reference)
"""TIES trimming: the `share_count(density, n)` largest magnitudes, equal ones by position."""


def outlier_counts(n: int, density: float, gamma: float) -> tuple[int, int]:
    """Breadcrumbs' (largest dropped, smallest dropped) counts of `n` elements; when
    density + gamma > 1 fewer outliers are dropped so that `share_count(density, n)` remain."""
    n_top = share_count(gamma, n)
    n_bottom = n - share_count(density, n) - n_top
    if n_bottom < 0:
        n_top, n_bottom = n_top + n_bottom, 0
    return n_top, n_bottom


def _breadcrumbs(v: TaskVector, density: float, gamma: float) -> Keep:
    n_top, n_bottom = outlier_counts(v.numel, density, gamma)
    # the same tie rule in both cuts makes the outliers a subset of the kept top n − n_bottom
    return Keep(cut=magnitude_cut(v.base, v.tuned, v.numel - n_bottom), outliers=magnitude_cut(v.base, v.tuned, n_top))


def _breadcrumbs_reference(v: TaskVector, density: float, gamma: float) -> Kept:
    n_top, n_bottom = outlier_counts(v.numel, density, gamma)
    magnitude = v.delta().abs()
    return Kept(reference.top_k(magnitude, v.numel - n_bottom) & ~reference.top_k(magnitude, n_top))


BREADCRUMBS = Sparsifier("breadcrumbs", _breadcrumbs, _breadcrumbs_reference, params=("gamma",))
"""Model Breadcrumbs: the `gamma` share of largest magnitudes and then the smallest dropped,
so that `share_count(density, n)` remain (`outlier_counts`)."""


def _random(v: TaskVector, density: float) -> Keep:
    return Keep(p=density, key=v.key)


def _random_reference(v: TaskVector, density: float) -> Kept:
    return Kept(reference.random_keep(v.delta(), density, v.key), density)


RANDOM = Sparsifier("random", _random, _random_reference, random=True)
"""DARE's drop: each element kept with probability `density`."""


def magprune_fits(density: float, epsilon: float) -> bool:
    """Whether MagPrune's keep probabilities `density ± epsilon` lie in (0, 1) (mergekit's rule)."""
    return 0 < density - epsilon and density + epsilon < 1


def della_keep_probabilities(delta: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """DELLA's MagPrune keep probabilities: within each row (a 1-D tensor is one row), the
    element of rank r (ascending magnitude, 0-based, of m; equal magnitudes by position) is
    kept with probability `density − ε + 2ε · r / (m − 1)`; a row of one element gets
    `density`.

    Raises:
        ValueError: density ± epsilon leaves (0, 1) (mergekit's rule).
    """
    if not magprune_fits(density, epsilon):
        raise ValueError(f"della: density ± epsilon must lie in (0, 1), got density {density:g}, epsilon {epsilon:g}")
    m = reference.row_length(delta.shape)
    if m <= 1 or delta.numel() == 0:  # one element a row, or none at all
        return torch.full(delta.shape, density)
    rank = magnitude_ranks(delta.float().reshape(-1, m))
    probs = (density - epsilon) + rank.div_(m - 1).mul_(2 * epsilon)
    return probs.reshape(delta.shape)


def _magprune(v: TaskVector, density: float, epsilon: float) -> Keep:
    return Keep(p=della_keep_probabilities(v.delta(), density, epsilon).reshape(-1), key=v.key)


def _magprune_reference(v: TaskVector, density: float, epsilon: float) -> Kept:
    delta = v.delta()
    m = reference.row_length(delta.shape)
    if m <= 1:
        probs = torch.full(delta.shape, density)
    else:
        probs = (density - epsilon) + reference.magnitude_ranks(delta) / (m - 1) * (2 * epsilon)
    return Kept(reference.random_keep(delta, probs, v.key), probs)


MAGPRUNE = Sparsifier("magprune", _magprune, _magprune_reference, params=("epsilon",), random=True)
"""DELLA's MagPrune: each element kept with a probability that grows with its magnitude's rank
in its row (`della_keep_probabilities`)."""
