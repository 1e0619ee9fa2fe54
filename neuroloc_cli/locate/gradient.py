"""The `gradient` locator: linguistic regions (Zhang et al. 2024) from per-language importance.

Given each language's element importance (computed by `locate.scoring`, which runs the
model; this module only selects), every mask is per tensor, as the paper's code does: a
tensor of `n` elements keeps `share_count(top, n)` of them.

- `core`: the top of the sum over languages of importance, the region all languages use;
- `bottom`: the lowest of that sum, the same count (a control);
- `random`: a seeded draw of the same count (a control);
- `top-LANG`: the top of one language's importance;
- `mono-LANG`: LANG's top minus every other language's top, the region only LANG uses.

Every selection is the shared selector's (`locate.select`, element granularity, per tensor)
and every difference the mask algebra's; each is exact, with ties broken by `torch.topk`,
which the counts do not depend on.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator

from neuroloc_cli.arch import NameFilter
from neuroloc_cli.errors import UsageError
from neuroloc_cli.locate.base import DataOptions, FilterOptions, locator
from neuroloc_cli.locate.folder import save_folder
from neuroloc_cli.locate.scoring import ScoringPlan, plan_scoring, score_languages
from neuroloc_cli.locate.select import ScoreSource, Selection, SummedScores, TensorScores, select_units
from neuroloc_cli.masks.algebra import combine, overlap
from neuroloc_cli.masks.format import LAYOUT_KEY, Mask, layout_digest
from neuroloc_cli.masks.importance import ImportanceMeta
from neuroloc_cli.masks.stats import mask_stats

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
    is_main: bool = True  # under accelerate launch, whether this process writes

    def save(self, output: Path, inputs: Sequence[Path] = (), overwrite: bool = False) -> None:
        """Write the folder atomically (see `locate.folder.save_folder`).

        Raises:
            OutputError: the folder exists (without `overwrite`), overlaps an input, or cannot
                be written.
        """
        save_folder(
            output,
            inputs,
            overwrite,
            importance=self.importance,
            importance_meta=self.importance_meta,
            masks=self.masks,
            summary=self.summary,
        )


class GradientOptions(DataOptions, FilterOptions):
    """Settings of `locate gradient`."""

    top: float = Field(default=0.01, description="share of each tensor's elements a region keeps (the paper: 0.01)")
    score: str = Field(default="taylor", description="taylor: gradient times weight; fisher: sum of squared gradients")
    abs_per_batch: bool = Field(default=False, description="sum_b |g_b * theta| instead of |sum_b g_b * theta| (the paper's code)")
    seed: int = Field(default=0, description="seed of the random control")

    @model_validator(mode="after")
    def _settings(self) -> GradientOptions:
        if not 0 < self.top <= 1:
            raise UsageError(f"--top must be a share in (0, 1], got {self.top}", hint="e.g. --top 0.01 for 1 %")
        if self.score not in ("taylor", "fisher"):
            raise UsageError(f"--score must be taylor or fisher, got {self.score!r}")
        if self.score == "fisher" and self.abs_per_batch:
            raise UsageError("--abs-per-batch applies to --score taylor only (a Fisher score is a sum of squares already)")
        return self

    @property
    def order(self) -> str:
        """The scorer's name for the score (see `locate.scoring`)."""
        return "fisher" if self.score == "fisher" else ("abs" if self.abs_per_batch else "signed")

    def scoring(self) -> dict[str, Any]:
        """The keywords of `score_languages` and `plan_scoring`."""
        keep = NameFilter.of(self.include, self.exclude)
        return dict(
            keep=keep, samples=self.samples, max_tokens=self.max_tokens, seq_len=self.seq_len, batch_size=self.batch_size, score=self.order
        )


@dataclass(frozen=True)
class GradientPlan:
    """What `locate gradient` would score, hold and write, from headers only (`--dry-run`).

    Disk, the folder's tensor data without headers: a float32 importance per scored element
    and language, and the element masks (core, bottom, random, and top- and mono- per
    language) at a bit per element, each tensor's bits rounded up to a byte (at most 7 bits
    more per tensor, counted as such).
    """

    scoring: ScoringPlan

    def disk_bytes(self) -> dict[str, int]:
        n, tensors, langs = self.scoring.scored_elements, len(self.scoring.names), len(self.scoring.languages)
        parts = {"importance": 4 * n * langs, "masks": (3 + 2 * langs) * ((n + 7 * tensors) // 8)}
        return {**parts, "total": sum(parts.values())}

    def describe(self) -> dict[str, Any]:
        return {**self.scoring.describe(), "disk_bytes": self.disk_bytes()}


def plan_gradient(opts: GradientOptions) -> GradientPlan:
    """What `locate gradient` would score, hold and write, from headers only (`--dry-run`).

    Raises:
        UsageError: bad settings, or filters that leave no tensor.
        InputError: an unreadable model, tokenizer or corpus.
    """
    return GradientPlan(plan_scoring(opts.model, opts.languages, **opts.scoring())[1])


@locator("gradient", options=GradientOptions, reads="a model on one corpus per language: gradients", paper=PAPER)
def locate_gradient(opts: GradientOptions) -> Regions:
    """Core, monolingual and control regions from per-language gradients (linguistic regions).

    Raises:
        UsageError: bad settings, or filters that leave no tensor.
        InputError: an unreadable model, tokenizer or corpus, or a corpus too short.
    """
    scoring = opts.scoring()
    scores = score_languages(opts.model, opts.languages, **scoring)
    provenance = {"model": str(Path(opts.model).resolve()), "model_fingerprint": scores.fingerprint, **scores.settings}
    provenance["tensors"] = scoring["keep"].describe()
    regions = regions_from_importance(
        {s.language: s.tensors for s in scores.languages},
        top=opts.top,
        seed=opts.seed,
        provenance=provenance,
        shapes=scores.shapes,
        languages={s.language: s.describe() for s in scores.languages},
    )
    regions.is_main = scores.is_main
    return regions


def regions_from_importance(
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

    def mask(role: str, sel: Selection, **extra: Any) -> Mask:
        return Mask("element", sel.entries, {**base, "region": role, **extra})

    sources = {lang: TensorScores(importance[lang], "sum", lang) for lang in langs}
    total = SummedScores(list(sources.values()), "the sum over languages")
    every = NameFilter(default=lambda name: True)  # the scorer chose the tensors already

    def pick(src: ScoreSource, how: str) -> Selection:
        return select_units(src, top=top, granularity="element", scope="tensor", pick=how, keep=every, seed=seed)

    core, bottom, random = (pick(total, how) for how in ("top", "bottom", "random"))
    tops = {lang: pick(sources[lang], "top") for lang in langs}
    top_masks = {lang: mask(f"top-{lang}", tops[lang], language=lang) for lang in langs}
    monos = {}
    for lang in langs:
        others = [top_masks[o] for o in langs if o != lang]
        union = others[0]
        for other in others[1:]:
            union = combine("union", union, other)
        monos[lang] = combine("diff", top_masks[lang], union).entries

    masks = {
        "core": mask("core", core, importance="top of the sum over languages"),
        "bottom": mask("bottom", bottom, importance="bottom of the sum over languages"),
        "random": mask("random", random, seed=seed),
    }
    masks.update({f"top-{lang}": top_masks[lang] for lang in langs})
    masks.update({f"mono-{lang}": Mask("element", monos[lang], {**base, "region": f"mono-{lang}", "language": lang}) for lang in langs})
    summary = _summary(masks, top_masks, base, languages or {})
    score = str(base.get("score", "signed"))
    meta = {
        lang: ImportanceMeta(_SCORE_NAMES.get(score, score), "sum", lang, {**base, **dict((languages or {}).get(lang, {}))})
        for lang in langs
    }
    return Regions(masks, summary, {lang: dict(importance[lang]) for lang in langs}, meta)


def _summary(
    masks: dict[str, Mask],
    tops: dict[str, Mask],
    base: dict[str, Any],
    languages: Mapping[str, Mapping[str, Any]],
) -> dict[str, Any]:
    """Selected counts and shares per mask, pairwise Jaccard of the languages' top sets, and
    where the core region lies: each tensor kind's share of its elements."""
    core = mask_stats(masks["core"])
    elements = core["total"]
    langs = list(tops)
    jaccard = {}
    for i, a in enumerate(langs):
        for b in langs[i + 1 :]:
            jaccard[f"{a}/{b}"] = overlap(tops[a], tops[b])[1].jaccard
    return {
        "top": base["top"],
        "scope": "tensor",
        "tensors": len(masks["core"].entries),
        "elements": elements,
        "languages": {lang: dict(languages.get(lang, {})) for lang in langs},
        "masks": {stem: {"selected": m.selected, "share": m.selected / elements if elements else 0.0} for stem, m in masks.items()},
        "jaccard": jaccard,
        "core_by_kind": {
            k["kind"]: (k["selected"] / core["selected"] if core["selected"] else 0.0)
            for k in sorted(core["kinds"], key=lambda k: k["kind"])
        },
        "provenance": base,
    }
