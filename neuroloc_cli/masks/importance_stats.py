"""Statistics of an importance file: sum, mean, max and concentration per tensor, layer and kind.

Read one tensor at a time (an importance file of a model is as large as the model in fp32).
Sums are float64. "Concentration" is the share of a group's importance held by its top 1 % of
elements: 0.01 for scores spread evenly, near 1 when a few elements hold nearly everything.
The top elements of a layer, a kind and the whole file are found across their tensors
exactly, by keeping candidates above a running threshold (`_TopSum`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from neuroloc_cli.arch import layer_index, tensor_kind
from neuroloc_cli.masks.dimensions import TOP, top_count
from neuroloc_cli.masks.importance import Importance

FINGERPRINT_SUFFIX = "fingerprint"  # provenance keys naming the scored model(s): model_fingerprint, base_fingerprint, ...


class _TopSum:
    """The sum of the `k` largest values fed in, over many tensors, without holding them all.

    Once `k` values are held, the k-th largest so far is a threshold that only rises: a new value
    at or below it cannot change the sum, so it is dropped on arrival. Candidates are compacted
    (a selection, not a sort) when they reach twice `k`.
    """

    def __init__(self, k: int):
        self.k = k
        self.parts: list[torch.Tensor] = []
        self.held = 0
        self.threshold: float | None = None

    def add(self, values: torch.Tensor) -> None:
        if self.k == 0:
            return
        if self.threshold is not None:
            values = values[values > self.threshold]
        self.parts.append(values)
        self.held += values.numel()
        if self.held >= 2 * self.k:
            self._compact()

    def _compact(self) -> None:
        v = torch.cat(self.parts) if len(self.parts) > 1 else self.parts[0]
        if v.numel() >= self.k:
            v = torch.topk(v, self.k, sorted=False).values
            self.threshold = float(v.min())
        self.parts, self.held = [v], v.numel()

    def total(self) -> float:
        if not self.parts:
            return 0.0
        self._compact()
        return float(self.parts[0].sum(dtype=torch.float64))


@dataclass
class _Group:
    """Running figures of a tensor, a layer, a kind or the whole file."""

    key: str
    elements: int
    sum: float = 0.0
    max: float | None = None
    top: _TopSum = field(init=False)
    top_sum: float | None = None  # set by `close`

    def __post_init__(self) -> None:
        self.top = _TopSum(top_count(self.elements))

    def add(self, flat: torch.Tensor, total: float, peak: float | None) -> None:
        self.sum += total
        if peak is not None:
            self.max = peak if self.max is None else max(self.max, peak)
        self.top.add(flat)

    def close(self) -> None:
        """Keep the sum of the top elements only, not its candidates (nothing more is added)."""
        if self.top_sum is None:
            self.top_sum, self.top = self.top.total(), _TopSum(0)

    def as_dict(self, key_name: str, file_sum: float) -> dict:
        self.close()
        top = self.top_sum
        return {
            key_name: self.key,
            "elements": self.elements,
            "sum": self.sum,
            "mean": self.sum / self.elements if self.elements else None,
            "max": self.max,
            "share": self.sum / file_sum if file_sum > 0 else None,
            "top_share": top / self.sum if self.sum > 0 else None,
        }


def importance_stats(imp: Importance) -> dict:
    """An importance file's statistics as one JSON-able document.

    Returns:
        `file`, `score`, `aggregate`, `source`, `granularity` (what a value scores:
        `element`, or `ffn` for one score per FFN neuron), `fingerprints` (provenance keys
        ending in `fingerprint`: the scored model's), `tensor_count`, `elements`, `sum`,
        `mean`, `max`, `top` (0.01), `top_share` (the share of the file's importance held by
        its top 1 % of elements), `provenance`, and lists `tensors` (with `layer`, `kind`,
        `shape`), `layers` and `kinds`, each row with `elements`, `sum`, `mean`, `max`,
        `share` (of the file's importance) and `top_share` (of its own, by its top 1 %).
        Means, shares and maxima are None where there is nothing to divide by.
    """
    prov = imp.meta.provenance
    sizes = {n: math.prod(s) for n, s in imp.shapes.items()}
    # groups are sized from the header first, so that each knows how many elements its top 1 % is
    layers = _groups(sizes, _layer_key)
    kinds = _groups(sizes, tensor_kind)
    whole = _Group("(all)", sum(sizes.values()))
    tensors = []
    for name, t in imp.items():
        flat = t.reshape(-1)
        total = float(flat.sum(dtype=torch.float64))
        peak = float(flat.max()) if flat.numel() else None
        own = _Group(name, flat.numel())
        for g in (own, layers[_layer_key(name)], kinds[tensor_kind(name)], whole):
            g.add(flat, total, peak)
        own.close()
        tensors.append((own, {"layer": layer_index(name), "kind": tensor_kind(name), "shape": list(t.shape)}))
    file_sum = whole.sum
    doc = whole.as_dict("all", file_sum)
    return {
        "file": str(imp.path),
        "score": imp.meta.score,
        "aggregate": imp.meta.aggregate,
        "source": imp.meta.source,
        "granularity": prov.get("granularity", "element"),
        "fingerprints": {k: v for k, v in prov.items() if k.endswith(FINGERPRINT_SUFFIX)},
        "tensor_count": len(sizes),
        "elements": whole.elements,
        "sum": file_sum,
        "mean": doc["mean"],
        "max": whole.max,
        "top": TOP,
        "top_share": doc["top_share"],
        "provenance": prov,
        "tensors": [{**g.as_dict("tensor", file_sum), **extra} for g, extra in tensors],
        "layers": [g.as_dict("layer", file_sum) for g in layers.values()],
        "kinds": [g.as_dict("kind", file_sum) for g in kinds.values()],
    }


def _groups(sizes: dict[str, int], key_of) -> dict[str, _Group]:
    counts: dict[str, int] = {}
    for name, n in sizes.items():
        counts[key_of(name)] = counts.get(key_of(name), 0) + n
    return {k: _Group(k, n) for k, n in counts.items()}


def _layer_key(name: str) -> str:
    layer = layer_index(name)
    return "-" if layer is None else str(layer)
