"""Masks: the saved result of locating, consumed by `merge` and `train`.

`format` is the artifact itself; `ops` set operations and overlap, `stats` statistics,
`show` pictures (imported on use: it needs Pillow).
"""

from neuroloc_cli.masks.format import GRANULARITIES, Mask, MaskEntry

__all__ = ["GRANULARITIES", "Mask", "MaskEntry"]
