"""What a tensor name says about its place in a decoder: layer index, kind, pre/post weights.

Works from names alone so that Llama, Mistral, Qwen2 (`model.layers.N.…`), GPT-2
(`transformer.h.N.…` or `h.N.…`) and most other decoders need no per-architecture table.
"""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

_LAYER = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_PRE = re.compile(r"embed|wte|wpe|word_embeddings")

# config.json keys that hold the number of transformer blocks, across architectures
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


def layer_index(name: str) -> int | None:
    """The transformer block a tensor belongs to, or None (embeddings, final norm, head)."""
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


def rename_layer(name: str, new_index: int) -> str:
    """`model.layers.7.mlp.up_proj.weight` → `model.layers.{new_index}.mlp.up_proj.weight`."""
    m = _LAYER.search(name)
    return name if m is None else name[: m.start(1)] + str(new_index) + name[m.end(1) :]


# Weights of GPT-2-style `Conv1D` modules, stored [in, out].
CONV1D_KINDS = frozenset(
    {
        "attn.c_attn.weight",
        "attn.c_proj.weight",
        "attn.q_attn.weight",
        "mlp.c_fc.weight",
        "mlp.c_proj.weight",
        "crossattention.c_attn.weight",
        "crossattention.c_proj.weight",
        "crossattention.q_attn.weight",
    }
)


def tensor_kind(name: str) -> str:
    """The name with the block prefix removed: `mlp.down_proj.weight` for every layer's
    down projection; the whole name for tensors outside the blocks."""
    m = _LAYER.search(name)
    return name[m.end() :] if m else name


def is_pre_weight(name: str) -> bool:
    """Outside the blocks and before them (embeddings), as opposed to after them (final norm,
    LM head); layer stacking takes the one from the first slice and the other from the last."""
    return layer_index(name) is None and _PRE.search(name) is not None


def layer_position(name: str, num_layers: int | None) -> float:
    """Where a tensor sits in depth, in [0, 1], for per-layer parameter lists.

    Block `i` of `n` sits at `i / (n - 1)`. Every tensor outside the blocks (embeddings before
    them, final norm and LM head after them) sits at 0, so it takes a list's first value:
    mergekit 0.1.5's rule: its planner reads the weights before and after the layers with
    `t = 0` (neuroloc used to put the final norm and head at 1).
    """
    i = layer_index(name)
    if i is None:
        return 0.0
    if not num_layers or num_layers <= 1:
        return 0.0
    return min(1.0, i / (num_layers - 1))


def name_matches(pattern: str, name: str) -> bool:
    """The one matching rule for tensor names written by users (recipe filters, `--include`,
    `--tensor`): a substring of the name (mergekit's rule), or, when the pattern has `*`, `?`
    or `[`, a glob matched against the whole name."""
    if any(c in pattern for c in "*?["):
        return fnmatch.fnmatchcase(name, pattern)
    return pattern in name


def in_blocks(name: str) -> bool:
    """Inside a transformer block (`layers.N.`, `h.N.`): not embeddings, final norm or head."""
    return layer_index(name) is not None


@dataclass(frozen=True)
class NameFilter:
    """Which tensors take part, by name: those matching any `include` pattern (or, with no
    `include`, those `default` accepts), less those matching any `exclude` pattern.

    Attributes:
        include: patterns (see `name_matches`); empty means `default`.
        exclude: patterns.
        default: the selection without `include`, e.g. `in_blocks`.
    """

    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    default: Callable[[str], bool] = in_blocks

    @classmethod
    def of(cls, include: Sequence[str] | None, exclude: Sequence[str] | None, default: Callable[[str], bool] = in_blocks) -> NameFilter:
        return cls(tuple(include or ()), tuple(exclude or ()), default)

    def __call__(self, name: str) -> bool:
        chosen = any(name_matches(p, name) for p in self.include) if self.include else self.default(name)
        return chosen and not any(name_matches(p, name) for p in self.exclude)

    def describe(self) -> dict:
        """For provenance: the patterns, and the default's name when no `include` was given."""
        return {"include": list(self.include) or f"default: {self.default.__name__}", "exclude": list(self.exclude)}
