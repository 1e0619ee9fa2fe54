"""Masks in merges: `mask:` (global, or per model) restricts a method's deltas.

- A model's own `mask:` replaces that model's tensor by the base outside the mask before
  the method runs, so its delta is zero there.
- After the method, the output takes the base value wherever no delta may act: outside the
  global mask, and outside every per-model mask when every model has one. This `where` is
  applied to the output-dtype tensors, with the base read as stored, so every unselected
  element is the base's value bit for bit (when `out_dtype` is the base's dtype).

A tensor the mask does not list is entirely unselected (the mask format's rule). Masks are
loaded and checked against the reference model's shapes at plan time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from neuroloc_cli.errors import NeurolocError
from neuroloc_cli.io.checkpoint import resolve_model_path
from neuroloc_cli.masks.format import Mask
from neuroloc_cli.recipe.schema import InputModel, MergeRecipe, input_models

Rows = tuple[int, int] | None  # a block of rows [start, stop) of a tensor, or the whole tensor


@dataclass
class MergeMasks:
    """The masks of one merge: the global one and one per input model (None where absent)."""

    global_mask: Mask | None
    per_model: list[Mask | None]

    def _select(self, mask: Mask, name: str, shape: tuple[int, ...], rows: Rows) -> torch.Tensor:
        """The mask of tensor `name` (or of its rows `[start, stop)`), shaped like `shape`."""
        entry = mask.entries.get(name)
        if entry is None:
            return torch.zeros(shape, dtype=torch.bool)
        return entry.dense() if rows is None else entry.dense_rows(*rows)

    def restrict_inputs(self, name: str, base: torch.Tensor, tensors: Sequence[torch.Tensor], rows: Rows = None) -> list[torch.Tensor]:
        """Each model's tensor (or block of rows), with the base in its place outside that
        model's mask."""
        shape = tuple(base.shape)
        return [t if m is None else torch.where(self._select(m, name, shape, rows), t, base) for t, m in zip(tensors, self.per_model)]

    def region(self, name: str, shape: tuple[int, ...], rows: Rows = None) -> torch.Tensor | None:
        """Where the output may differ from the base (BOOL, broadcastable), or None: anywhere."""
        region = None
        if all(m is not None for m in self.per_model) and self.per_model:
            region = torch.zeros(shape, dtype=torch.bool)
            for m in self.per_model:
                region |= self._select(m, name, shape, rows)
        if self.global_mask is not None:
            g = self._select(self.global_mask, name, shape, rows)
            region = g if region is None else region & g
        return region

    def apply(self, name: str, merged: torch.Tensor, base: torch.Tensor, rows: Rows = None) -> torch.Tensor:
        """`where(region, merged, base)`; `merged` and `base` in the output dtype."""
        region = self.region(name, tuple(merged.shape), rows)
        return merged if region is None else torch.where(region, merged, base)


def describe_masks(masks: MergeMasks | None, recipe: MergeRecipe, entries: Sequence[tuple[str, InputModel]]) -> list[str]:
    """One note per mask of a plan (what `recipe validate` and `--dry-run` show)."""
    if masks is None:
        return []
    from neuroloc_cli.masks.stats import mask_stats

    keys = [("mask", recipe.mask, masks.global_mask)]
    keys += [(f"{role.removesuffix('.model')}.mask", m.mask, mask) for (role, m), mask in zip(entries, masks.per_model)]
    notes = []
    for key, spec, mask in keys:
        if mask is not None:
            doc = mask_stats(mask)
            notes.append(
                f"{key} {spec}: {doc['granularity']} mask over {len(mask.entries)} tensors, {doc['selected']} elements selected; outside it the base is kept"
            )
    return notes


def mask_recipe_problems(recipe: MergeRecipe) -> list[str]:
    """Problems of a recipe's `mask:` keys that need no file: a mask needs a base model."""
    uses = (["mask"] if recipe.mask else []) + [f"{role.removesuffix('.model')}.mask" for role, m in input_models(recipe) if m.mask]
    if uses and recipe.base_model is None:
        return [f"{uses[0]}: a mask needs base_model (outside the mask the output keeps the base's values)"]
    return []


def load_masks(
    recipe: MergeRecipe, entries: Sequence[tuple[str, InputModel]], base_dir: Path, reference
) -> tuple[MergeMasks | None, list[str]]:
    """Load every mask of a recipe and check it against the reference model's shapes.

    Args:
        recipe: the recipe.
        entries: the merge's input models with their roles, in the plan's order.
        base_dir: folder that relative mask paths are relative to.
        reference: the `Source` whose tensors the output takes.

    Returns:
        (the masks, or None when the recipe has none; problems, each naming the key and tensor).
    """
    models = list(entries)
    if not recipe.mask and not any(m.mask for _, m in models):
        return None, []
    shapes = {n: info.shape for n, info in reference.checkpoint.tensors.items()}
    what = f"{reference.role} ({reference.checkpoint.path})"
    problems: list[str] = []

    def load(key: str, spec: str | None) -> Mask | None:
        if not spec:
            return None
        try:
            mask = Mask.load(resolve_model_path(spec, base_dir))
            mask.check_shapes(shapes, what)
            return mask
        except NeurolocError as e:
            problems.append(f"{key}: {e}")
            return None

    global_mask = load("mask", recipe.mask)
    per_model = [load(f"{role.removesuffix('.model')}.mask", m.mask) for role, m in models]
    return MergeMasks(global_mask, per_model), problems
