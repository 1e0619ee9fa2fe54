"""Inputs read a flat piece at a time, for methods whose output at one element depends on the
whole tensor (a norm, an angle, a selection).

Such a method (declared `reads_in_pieces`) works through its inputs in the flat pieces of
`ops.sums.pieces`: `flat(x)[c]`, for a slice `c` of flat positions, is that piece of input
`x` as a 1-D tensor, and the method yields its result one piece at a time, in order. An
input comes in one of two forms that read alike:

- a tensor in memory (tests, and callers with tensors at hand): `flat(x)` is its flat view;
- a `Flat`, which reads a piece when it is asked for (the engine's, from the checkpoints:
  `merge.stream.CheckpointFlat`), so that no input is ever whole in memory.

A piece is the method's to read, not to change: a tensor's piece is a view of the input, and
a `Flat` hands the same tensor to repeated reads of one piece.
"""

from __future__ import annotations

import abc
import math

import torch


class Flat(abc.ABC):
    """A tensor of `shape` and `dtype` that is read a flat piece at a time (see the module
    docstring). The last piece read is kept, so that a method reading one input's piece several
    times (each model's task vector takes the base's) reads it once."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype):
        self.shape = torch.Size(shape)
        self.dtype = dtype
        self._last: tuple[tuple[int, int], torch.Tensor] | None = None

    def numel(self) -> int:
        return math.prod(self.shape)

    def __getitem__(self, c: slice) -> torch.Tensor:
        start, stop, step = c.indices(self.numel())
        if step != 1:
            raise ValueError("a Flat is read in consecutive pieces")
        if self._last is None or self._last[0] != (start, stop):
            self._last = None  # released before the next piece is read
            self._last = ((start, stop), self._read(start, stop))
        return self._last[1]

    def whole(self) -> torch.Tensor:
        """The whole tensor, in its shape: for the modes of a method that need it whole."""
        self._last = None
        return self._read(0, self.numel()).reshape(self.shape)

    @abc.abstractmethod
    def _read(self, start: int, stop: int) -> torch.Tensor:
        """Flat positions `[start, stop)`, as a new 1-D tensor of `dtype`."""


Input = torch.Tensor | Flat


def flat(x: Input) -> Input:
    """`x` indexed by flat positions: a tensor's flat view, or the `Flat` itself."""
    return x if isinstance(x, Flat) else x.reshape(-1)


def whole(x: Input) -> torch.Tensor:
    """`x` as a whole tensor in its shape (a `Flat` is read whole)."""
    return x.whole() if isinstance(x, Flat) else x
