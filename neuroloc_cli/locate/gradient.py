"""The `gradient` locator: linguistic regions (Zhang et al. 2024) from per-language importance.

Given each language's element importance (computed by `locate.scoring`, which runs the
model; this module only selects), every mask is per tensor, as the paper's code does: a
tensor of `n` elements keeps `share_count(top, n)` of them.

- `core`: the top of the sum over languages of importance, the region all languages use;
- `bottom`: the lowest of that sum, the same count (a control);
- `random`: a seeded draw of the same count (a control);
- `top-LANG`: the top of one language's importance;
- `mono-LANG`: LANG's top minus every other language's top, the region only LANG uses.

Each selection is exact; ties are broken by `torch.topk`, which the counts do not depend on.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neuroloc_cli.arch import tensor_kind
from neuroloc_cli.errors import UsageError
from neuroloc_cli.io.output import atomic_output_dir
from neuroloc_cli.locate.base import locator
from neuroloc_cli.locate.select import top_units
from neuroloc_cli.masks.format import LAYOUT_KEY, Mask, MaskEntry, layout_digest
from neuroloc_cli.masks.importance import ImportanceMeta, write_importance
from neuroloc_cli.ops.sparsify import share_count

PAPER = "Zhang et al. 2024, linguistic regions"
# the scorer's orders as importance files name them
_SCORE_NAMES = {"signed": "taylor", "abs": "taylor-abs", "fisher": "fisher"}


@dataclass
class Regions:
    """The masks (file stem -> Mask), the summary, and the importance they came from."""

    masks: dict[str, Mask]
    summary: dict[str, Any]
    importance: dict[str, dict[str, torch.Tensor]]  # language -> tensor name -> fp32
    importance_meta: dict[str, ImportanceMeta]  # language -> what its file records

    def save(self, output: Path, inputs: Sequence[Path] = (), overwrite: bool = False) -> None:
        """Write the folder atomically: `importance/LANG.safetensors`, one file per mask, and
        `summary.json`; a failure leaves no partial folder.

        Raises:
            OutputError: the folder exists (without `overwrite`), overlaps an input, or cannot
                be written.
        """
        with atomic_output_dir(output, inputs, overwrite) as tmp:
            (tmp / "importance").mkdir()
            for lang, tensors in self.importance.items():
                write_importance(tmp / "importance" / f"{lang}.safetensors", tensors, self.importance_meta[lang])
            for stem, mask in self.masks.items():
                mask.save(tmp / f"{stem}.safetensors")
            (tmp / "summary.json").write_text(json.dumps(self.summary, indent=2) + "\n")


@locator("gradient", paper=PAPER)
def locate_gradient(
    importance: Mapping[str, Mapping[str, torch.Tensor]],
    *,
    top: float = 0.01,
    seed: int = 0,
    provenance: Mapping[str, Any] | None = None,
    shapes: Mapping[str, Sequence[int]] | None = None,
    languages: Mapping[str, Mapping[str, Any]] | None = None,
) -> Regions:
    """Core, monolingual and control regions from per-language gradient importance.

    Args:
        importance: language -> checkpoint tensor name -> importance (every language the
            same tensors and shapes).
        top: the share of each tensor's elements a region keeps, in (0, 1].
        seed: the random control's seed.
        provenance: what every mask and importance file records (model, data, settings).
        shapes: every tensor of the model, for the layout digest (default: the scored ones).
        languages: language -> its data description, for the importance files' metadata.

    Raises:
        UsageError: a bad share, or fewer than two languages.
    """
    if not 0 < top <= 1:
        raise UsageError(f"--top must be a share in (0, 1], got {top}", hint="e.g. --top 0.01 for 1 %")
    langs = list(importance)
    if len(langs) < 2:
        raise UsageError(f"--data: {len(langs)} language given, need at least 2")
    names = list(importance[langs[0]])
    shape_of = {n: tuple(importance[langs[0]][n].shape) for n in names}
    base = {
        "locator": "gradient",
        **dict(provenance or {}),
        LAYOUT_KEY: layout_digest(shapes or shape_of),
        "top": top,
        "scope": "tensor",
        "languages": langs,
    }

    def mask(role: str, sel: Mapping[str, torch.Tensor], **extra: Any) -> Mask:
        entries = {n: MaskEntry(shape_of[n], None, sel[n]) for n in names}
        return Mask("element", entries, {**base, "region": role, **extra})

    def per_tensor_top(values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: top_units([values[n]], top, "tensor")[0] for n in names}

    total = {n: sum(importance[lang][n].float() for lang in langs) for n in names}
    core = per_tensor_top(total)
    bottom = {n: top_units([-total[n]], top, "tensor")[0] for n in names}
    gen = torch.Generator().manual_seed(seed)
    random = {}
    for n in names:
        flat = torch.zeros(total[n].numel(), dtype=torch.bool)
        flat[torch.randperm(flat.numel(), generator=gen)[: share_count(top, flat.numel())]] = True
        random[n] = flat.reshape(shape_of[n])
    tops = {lang: per_tensor_top(importance[lang]) for lang in langs}
    monos = {}
    for lang in langs:
        others = [tops[o] for o in langs if o != lang]
        monos[lang] = {n: tops[lang][n] & ~torch.stack([o[n] for o in others]).any(0) for n in names}

    masks = {
        "core": mask("core", core, importance="top of the sum over languages"),
        "bottom": mask("bottom", bottom, importance="bottom of the sum over languages"),
        "random": mask("random", random, seed=seed),
    }
    masks.update({f"top-{lang}": mask(f"top-{lang}", tops[lang], language=lang) for lang in langs})
    masks.update({f"mono-{lang}": mask(f"mono-{lang}", monos[lang], language=lang) for lang in langs})
    summary = _summary(masks, tops, core, names, shape_of, base, languages or {})
    score = str(base.get("score", "signed"))
    meta = {
        lang: ImportanceMeta(_SCORE_NAMES.get(score, score), "sum", lang, {**base, **dict((languages or {}).get(lang, {}))})
        for lang in langs
    }
    return Regions(masks, summary, {lang: dict(importance[lang]) for lang in langs}, meta)


def _summary(
    masks: dict[str, Mask],
    tops: dict[str, dict[str, torch.Tensor]],
    core: dict[str, torch.Tensor],
    names: list[str],
    shape_of: dict[str, tuple[int, ...]],
    base: dict[str, Any],
    languages: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """Selected counts and shares per mask, pairwise Jaccard of the languages' top sets, and
    where the core region lies: each tensor kind's share of its elements."""
    elements = sum(int(torch.Size(shape_of[n]).numel()) for n in names)
    counts = {stem: m.selected for stem, m in masks.items()}
    langs = list(tops)
    jaccard = {}
    for i, a in enumerate(langs):
        for b in langs[i + 1 :]:
            inter = sum(int((tops[a][n] & tops[b][n]).sum()) for n in names)
            union = sum(int((tops[a][n] | tops[b][n]).sum()) for n in names)
            jaccard[f"{a}/{b}"] = inter / union if union else 0.0
    kinds: dict[str, int] = {}
    for n in names:
        kinds[tensor_kind(n)] = kinds.get(tensor_kind(n), 0) + int(core[n].sum())
    core_total = counts["core"]
    return {
        "top": base["top"],
        "scope": "tensor",
        "tensors": len(names),
        "elements": elements,
        "languages": {lang: dict(languages.get(lang, {})) for lang in langs},
        "masks": {stem: {"selected": c, "share": c / elements if elements else 0.0} for stem, c in counts.items()},
        "jaccard": jaccard,
        "core_by_kind": {k: (v / core_total if core_total else 0.0) for k, v in sorted(kinds.items())},
        "provenance": base,
    }
