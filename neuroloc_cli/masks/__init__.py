"""Masks and importance files: the saved results of locating, consumed by `merge`, `train`
and `ablate`.

`format` is the mask artifact itself, `importance` the scores masks are selected from;
`algebra` set operations and overlap, `stats` and `importance_stats` statistics,
`dimensions` how concentrated a tensor's selection or importance is in its rows and
columns, `show` pictures of both (imported on use: it needs Pillow).
"""

from neuroloc_cli.masks.format import GRANULARITIES, Mask, MaskEntry

__all__ = ["GRANULARITIES", "Mask", "MaskEntry"]
