"""Masks: the saved result of locating, consumed by `merge` and `train`."""

from neuroloc_cli.masks.format import GRANULARITIES, Mask, MaskEntry

__all__ = ["GRANULARITIES", "Mask", "MaskEntry"]
