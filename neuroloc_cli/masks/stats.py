"""Statistics of a mask: selected share per tensor, per layer and per tensor kind.

Shares are in elements (a selected row counts all its elements), so row, FFN and element
masks read the same way. Only tensors the mask lists are counted: a mask does not know the
tensors of the model it leaves out (locators list every tensor they considered).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from neuroloc_cli.arch import layer_index, tensor_kind
from neuroloc_cli.masks.algebra import selected_elements
from neuroloc_cli.masks.format import Mask


@dataclass(frozen=True)
class Count:
    """Selected and total elements of a group of tensors."""

    key: str
    selected: int
    total: int

    @property
    def share(self) -> float:
        return self.selected / self.total if self.total else 0.0

    def as_dict(self, key_name: str) -> dict:
        return {key_name: self.key, "selected": self.selected, "total": self.total, "share": self.share}


def mask_stats(mask: Mask) -> dict:
    """The mask's statistics as one JSON-able document.

    Returns:
        `granularity`, `selected` (elements), `total` (elements of the listed tensors),
        `share`, `units`/`selected_units` (rows, FFN neurons or elements), `provenance`, and
        lists `tensors` (with `layer`, `kind`, `shape`, `axis`), `layers` and `kinds`.
    """
    tensors, layers, kinds = [], {}, {}
    units = selected_units = 0
    for name, e in mask.entries.items():
        c = Count(name, selected_elements(e), math.prod(e.shape))
        layer, kind = layer_index(name), tensor_kind(name)
        tensors.append(
            {
                **c.as_dict("tensor"),
                "layer": layer,
                "kind": kind,
                "shape": list(e.shape),
                "axis": e.axis,
                "units": e.units,
                "selected_units": e.selected_units,
            }
        )
        _add(layers, "-" if layer is None else str(layer), c)
        _add(kinds, kind, c)
        units += e.units
        selected_units += e.selected_units
    total = Count("(all)", sum(t["selected"] for t in tensors), sum(t["total"] for t in tensors))
    return {
        "granularity": mask.granularity,
        "selected": total.selected,
        "total": total.total,
        "share": total.share,
        "units": units,
        "selected_units": selected_units,
        "provenance": mask.provenance,
        "tensors": tensors,
        "layers": [c.as_dict("layer") for c in layers.values()],
        "kinds": [c.as_dict("kind") for c in kinds.values()],
    }


def _add(groups: dict[str, Count], key: str, c: Count) -> None:
    old = groups.get(key)
    groups[key] = Count(key, c.selected + (old.selected if old else 0), c.total + (old.total if old else 0))
