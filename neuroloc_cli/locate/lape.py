"""The `lape` locator: language-specific neurons by activation-probability entropy (LAPE,
Tang et al. 2024).

A neuron here is an FFN intermediate unit: one output of an MLP's activation module, which is
`act_fn(gate_proj(x))` in Llama, Mistral and Qwen2 (before the product with `up_proj(x)`) and
`act(c_fc(x))` in GPT-2. Scoring (`activation_probabilities`) runs the model over each
language's packed rows and counts, per neuron, the token positions where that output is
positive; a neuron's probability for a language is its count over the language's tokens.

Selection (`lape_neurons`, pure: it takes the probabilities and the MLP unit groups):

1. the threshold is the `filter_percentile` quantile of every probability of the model, all
   blocks, neurons and languages together: the k-th smallest of the n values with
   `k = round(filter_percentile · n)`, as the public code's `kthvalue` takes it;
2. a neuron whose probability exceeds the threshold for no language is dropped, and so is one
   that never fires (its probabilities sum to 0: they have no distribution to take the
   entropy of);
3. each remaining neuron's probabilities are normalised over languages, `p̂ = p / Σ p`, and
   its entropy is `−Σ p̂ log p̂` (with `0 log 0 = 0`): low when one or a few languages make it
   fire;
4. the `share_count(top, N)` lowest-entropy neurons are kept, over all `N` FFN neurons of the
   model together (fewer when fewer survive step 2); equal entropies go to the neuron that
   comes first, block by block;
5. a kept neuron belongs to every language whose probability exceeds the threshold, so a
   neuron may be specific to several languages at once.

The output is one `ffn` mask per language, the probabilities as importance files (one vector
per MLP block, under the block's key), and a summary. Under `accelerate launch` every process
counts its share of the batches and the counts are summed once at the end; counts are
integers, so two processes give exactly one process's probabilities.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import nn

from neuroloc_cli.arch import layer_index
from neuroloc_cli.errors import InputError, UsageError
from neuroloc_cli.locate.base import DataOptions, Language, locator
from neuroloc_cli.locate.folder import save_folder
from neuroloc_cli.locate.scoring import DEFAULT_SAMPLES, language_sources, plan_scoring, scoring_model
from neuroloc_cli.locate.units import BLOCKS, UnitGroup, ffn_groups, floating
from neuroloc_cli.masks.format import LAYOUT_KEY, Mask, MaskEntry, layout_digest
from neuroloc_cli.masks.importance import ImportanceMeta
from neuroloc_cli.ops.sparsify import share_count
from neuroloc_cli.runtime.data import TaggedBatch, TaggedRows, tagged_batches
from neuroloc_cli.runtime.distributed import sum_over_processes

PAPER = "Tang et al. 2024, LAPE"
DEFAULT_TOP = 0.01
DEFAULT_FILTER_PERCENTILE = 0.95
SCORE = "activation-probability"
# Names transformers gives an MLP's activation module: Llama/Mistral/Qwen2/Gemma, GPT-2/NeoX/J,
# Phi, BLOOM.
ACTIVATION_NAMES = ("act_fn", "act", "activation_fn", "activation", "gelu_impl")
_ACTIVATION_MODULES = ("torch.nn.modules.activation", "transformers.activations")


@dataclass
class Probabilities:
    """Every language's activation probabilities, and how they were counted (for provenance).

    Attributes:
        groups: the MLP blocks, in model order (`locate.units.ffn_groups`).
        probabilities: language -> block key -> float64 vector, one probability per neuron.
        rows: each language's rows, as read.
        shapes: every tensor of the checkpoint (mask entries and the layout digest).
        is_main: under `accelerate launch`, whether this process writes the result.
    """

    model: Path
    fingerprint: str
    shapes: dict[str, tuple[int, ...]]
    groups: list[UnitGroup]
    probabilities: dict[str, dict[str, torch.Tensor]]
    rows: list[TaggedRows]
    settings: dict[str, Any]
    is_main: bool = True

    def describe(self) -> dict[str, dict[str, Any]]:
        """Language -> its data (path, sha256, rows, tokens)."""
        out = {}
        for r in self.rows:
            d = r.describe()
            out[d.pop("source")] = d
        return out


@dataclass
class LanguageNeurons:
    """The masks (language -> Mask), the summary, and the probabilities they came from."""

    masks: dict[str, Mask]
    summary: dict[str, Any]
    importance: dict[str, dict[str, torch.Tensor]]  # language -> block key -> fp32 probabilities
    importance_meta: dict[str, ImportanceMeta]
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


def check_shares(top: float, filter_percentile: float) -> None:
    """Refuse a `--top` outside (0, 1] or a `--filter-percentile` outside (0, 1).

    Raises:
        UsageError: naming the flag.
    """
    if not 0 < top <= 1:
        raise UsageError(f"--top must be a share in (0, 1], got {top}", hint="e.g. --top 0.01 for 1 % of the FFN neurons")
    if not 0 < filter_percentile < 1:
        raise UsageError(f"--filter-percentile must be in (0, 1), got {filter_percentile}", hint="e.g. 0.95, the paper's")


def activation_probabilities(
    model_path: Path,
    languages: Sequence[Language],
    *,
    samples: int | None = DEFAULT_SAMPLES,
    max_tokens: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    text_field: str = "text",
) -> Probabilities:
    """Per language, the share of its tokens at which each FFN neuron's activation is positive.

    Args:
        model_path: the checkpoint folder (with its tokenizer).
        languages: from `locate.base.parse_languages`.
        samples, max_tokens: rows, or tokens, per language (see `locate.scoring.plan_scoring`).
        seq_len: tokens per row; None: the smaller of 512 and the model's positions.
        batch_size: rows per forward pass.
        text_field: the JSONL field holding the text.

    Raises:
        UsageError: a bad count or sequence length.
        InputError: an unreadable model, tokenizer or corpus, a corpus too short for its
            rows, no MLP of a known layout, or an MLP block without an activation module to
            hook.
    """
    ckpt, plan = plan_scoring(
        model_path, languages, keep=BLOCKS, samples=samples, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size
    )
    groups = ffn_groups(floating(ckpt.tensors), str(model_path))
    sources, framing = language_sources(model_path, languages, plan, text_field)
    accelerator, model, by_module = scoring_model(model_path, ckpt)
    found = {g.key: activation_module(_mlp_of(model, g, by_module, model_path), g.key, model_path) for g in groups}
    activations = {key: m for key, (_, m) in found.items()}
    batches = tagged_batches(sources, batch_size, rank=accelerator.process_index, world=accelerator.num_processes)
    counts, tokens = positive_counts(
        model, groups, activations, batches, [s.source for s in sources], autocast=accelerator.autocast, world=accelerator.num_processes
    )
    probabilities = {lang: {k: c.double() / tokens[lang] for k, c in per_block.items()} for lang, per_block in counts.items()}
    hooked = sorted({name for name, _ in found.values()})
    settings = {
        "activation": f"P(output of mlp.{'/'.join(hooked)} > 0) over each language's tokens",
        "samples": plan.rows,
        "seq_len": plan.seq_len,
        "batch_size": batch_size,
        "processes": accelerator.num_processes,
        "framing": framing.describe(),
    }
    shapes = {n: tuple(i.shape) for n, i in ckpt.tensors.items()}
    return Probabilities(Path(model_path), ckpt.fingerprint, shapes, groups, probabilities, sources, settings, accelerator.is_main_process)


def activation_module(mlp: nn.Module, key: str, source: Path | str) -> tuple[str, nn.Module]:
    """The activation module of an MLP block, and its name in the block: a child named one of
    ACTIVATION_NAMES, else its one child module from `torch.nn`'s or transformers' activations.

    Raises:
        InputError: naming the block, when it has no such child (or several unnamed ones).
    """
    children = dict(mlp.named_children())
    for name in ACTIVATION_NAMES:
        if name in children:
            return name, children[name]
    found = [(n, m) for n, m in children.items() if type(m).__module__ in _ACTIVATION_MODULES]
    if len(found) == 1:
        return found[0]
    raise InputError(
        f"{source}: MLP block {key} ({type(mlp).__name__}) has no activation module to hook",
        hint=f"lape counts the output of a child module named {', '.join(ACTIVATION_NAMES)}",
    )


def positive_counts(
    model: nn.Module,
    groups: Sequence[UnitGroup],
    activations: Mapping[str, nn.Module],
    batches: Iterable[TaggedBatch],
    languages: Sequence[str],
    *,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    world: int = 1,
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, int]]:
    """Per language and block, how many token positions make each neuron's activation positive.

    Args:
        groups: the MLP blocks; `activations` maps each key to its activation module, whose
            output's last dimension is the block's neurons.
        batches: this process's share, each tagged with its language (one of `languages`).
        autocast: the forward pass's autocast context (bf16 on CUDA under accelerate).
        world: processes whose counts are added at the end (each ran its own share).

    Returns:
        language -> block key -> int64 counts on the CPU, and language -> tokens counted.

    Raises:
        InputError: two blocks share one activation module, or a block's activation did not run
            exactly once per token (an MLP that calls its activation otherwise).
    """
    modules = [activations[g.key] for g in groups]
    for i, m in enumerate(modules):
        if any(m is other for other in modules[:i]):
            other = groups[next(j for j in range(i) if modules[j] is m)].key
            raise InputError(f"MLP blocks {other} and {groups[i].key} share one activation module", hint="lape hooks one module per block")
    offsets = [0]
    for g in groups:
        offsets.append(offsets[-1] + g.size)
    device = next(model.parameters()).device
    # one buffer, so that processes add their counts in one all-reduce: [languages, neurons] then tokens
    total = torch.zeros(len(languages) * offsets[-1] + len(languages), dtype=torch.int64, device=device)
    counts = total[: len(languages) * offsets[-1]].view(len(languages), offsets[-1])
    tokens = total[len(languages) * offsets[-1] :]
    current = {"lang": 0}
    seen = [0] * len(groups)

    def hook_for(j: int) -> Callable[..., None]:
        size, lo = groups[j].size, offsets[j]

        def count(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if output.shape[-1] != size:
                raise InputError(f"{groups[j].key}: its activation has {output.shape[-1]} outputs, but the block has {size} neurons")
            flat = output.reshape(-1, size)
            counts[current["lang"], lo : lo + size] += (flat > 0).sum(0)
            seen[j] += flat.shape[0]

        return count

    index = {lang: i for i, lang in enumerate(languages)}
    runner = getattr(model, "base_model", model)  # the LM head's logits are not needed
    hooks = [m.register_forward_hook(hook_for(j)) for j, m in enumerate(modules)]
    try:
        with torch.no_grad():
            for batch in batches:
                current["lang"] = index[batch.source]
                seen[:] = [0] * len(groups)
                with autocast():
                    runner(input_ids=batch.input_ids.to(device), use_cache=False)
                n = batch.input_ids.numel()
                for g, s in zip(groups, seen):
                    if s != n:
                        raise InputError(
                            f"{g.key}: its activation ran on {s} positions for a batch of {n} tokens",
                            hint="lape counts one activation output per token; this MLP calls it otherwise",
                        )
                tokens[current["lang"]] += n
    finally:
        for h in hooks:
            h.remove()
    sum_over_processes(total, world)
    counts, tokens = counts.cpu(), tokens.cpu()
    out = {lang: {g.key: counts[i, offsets[j] : offsets[j + 1]].clone() for j, g in enumerate(groups)} for lang, i in index.items()}
    return out, {lang: int(tokens[i]) for lang, i in index.items()}


class LapeOptions(DataOptions):
    """Settings of `locate lape`."""

    top: float = Field(default=DEFAULT_TOP, description="share of all FFN neurons kept, lowest entropy first (the paper: 0.01)")
    filter_percentile: float = Field(
        default=DEFAULT_FILTER_PERCENTILE, description="quantile of all probabilities a neuron must exceed for a language (the paper: 0.95)"
    )

    @model_validator(mode="after")
    def _shares(self) -> LapeOptions:
        check_shares(self.top, self.filter_percentile)
        return self


@locator("lape", options=LapeOptions, reads="a model on one corpus per language: activations", paper=PAPER)
def locate_lape(opts: LapeOptions) -> LanguageNeurons:
    """Language-specific FFN neurons by activation-probability entropy (LAPE).

    Raises:
        UsageError: bad settings.
        InputError: an unreadable model, tokenizer or corpus, a corpus too short, or an MLP
            whose activation cannot be hooked.
    """
    probs = activation_probabilities(
        opts.model, opts.languages, samples=opts.samples, max_tokens=opts.max_tokens, seq_len=opts.seq_len, batch_size=opts.batch_size
    )
    provenance = {"model": str(Path(opts.model).resolve()), "model_fingerprint": probs.fingerprint, **probs.settings}
    found = lape_neurons(
        probs.probabilities,
        probs.groups,
        shapes=probs.shapes,
        top=opts.top,
        filter_percentile=opts.filter_percentile,
        provenance=provenance,
        languages=probs.describe(),
    )
    found.is_main = probs.is_main
    return found


def lape_neurons(
    probabilities: Mapping[str, Mapping[str, torch.Tensor]],
    groups: Sequence[UnitGroup],
    *,
    shapes: Mapping[str, Sequence[int]],
    top: float = DEFAULT_TOP,
    filter_percentile: float = DEFAULT_FILTER_PERCENTILE,
    provenance: Mapping[str, Any] | None = None,
    languages: Mapping[str, Mapping[str, Any]] | None = None,
) -> LanguageNeurons:
    """Language-specific FFN neurons: the lowest activation-probability entropy (LAPE).

    Args:
        probabilities: language -> block key -> probability per neuron (a vector of the
            block's size, every language every block).
        groups: the MLP blocks (`locate.units.ffn_groups`), whose parts the masks list.
        shapes: tensor name -> shape, every part of every group included (and, for the
            layout digest, every other tensor of the model).
        top: the share of all FFN neurons kept, in (0, 1].
        filter_percentile: the quantile of all probabilities a neuron must exceed for some
            language, in (0, 1).
        provenance: what every mask and importance file records (model, data, settings).
        languages: language -> its data description, for the summary and importance files.

    Returns:
        One `ffn` mask per language, the probabilities, and the summary.

    Raises:
        UsageError: a bad share or percentile, or fewer than two languages.
        InputError: a language without a block's probabilities, or of the wrong length.
    """
    check_shares(top, filter_percentile)
    langs = list(probabilities)
    if len(langs) < 2:
        raise UsageError(f"--data: {len(langs)} language given, need at least 2", hint="LAPE compares languages")
    for lang in langs:
        for g in groups:
            v = probabilities[lang].get(g.key)
            if v is None or tuple(v.shape) != (g.size,):
                got = "none" if v is None else f"shape {list(v.shape)}"
                raise InputError(f"probabilities of {lang} at {g.key}: {got}, expected {g.size} values")
    p = torch.stack([torch.cat([probabilities[lang][g.key].double().cpu() for g in groups]) for lang in langs])  # [L, N]
    n = p.shape[1]
    threshold = lape_threshold(p, filter_percentile)
    above = p > threshold  # [L, N]
    entropy = activation_entropy(p)
    survivors = torch.nonzero(above.any(0) & (p.sum(0) > 0)).flatten()
    k = min(share_count(top, n), len(survivors))
    order = torch.sort(entropy[survivors], stable=True).indices  # survivors ascend: ties go to the first
    selected = torch.zeros(n, dtype=torch.bool)
    selected[survivors[order[:k]]] = True
    chosen = {lang: selected & above[i] for i, lang in enumerate(langs)}

    base = {
        "locator": "lape",
        **dict(provenance or {}),
        LAYOUT_KEY: layout_digest(shapes),
        "top": top,
        "filter_percentile": filter_percentile,
        "threshold": threshold,
        "scope": "global",
        "languages": langs,
    }
    spans = list(zip(groups, accumulate((g.size for g in groups[:-1]), initial=0)))  # (block, its first neuron)
    masks = {}
    for lang in langs:
        entries = {}
        for g, lo in spans:
            sel = chosen[lang][lo : lo + g.size]
            for part in g.parts:
                entries[part.name] = MaskEntry(shapes[part.name], part.axis, sel.clone())
        extra = {"language": lang, "units": n, "selected_units": int(chosen[lang].sum())}
        masks[lang] = Mask("ffn", entries, {**base, **extra})
    described = {lang: dict((languages or {}).get(lang, {})) for lang in langs}
    importance = {lang: {g.key: p[i, lo : lo + g.size].float() for g, lo in spans} for i, lang in enumerate(langs)}
    meta = {lang: ImportanceMeta(SCORE, "sum", lang, {**base, "granularity": "ffn", **described[lang]}) for lang in langs}
    stats = {"neurons": n, "above_threshold": len(survivors), "selected": k}
    summary = _summary(chosen, spans, stats, base, described)
    return LanguageNeurons(masks, summary, importance, meta)


def lape_threshold(p: torch.Tensor, percentile: float) -> float:
    """The `percentile` quantile of every value of `p`: its k-th smallest, `k = round(percentile · n)`
    clipped to [1, n] (the public code's `kthvalue`)."""
    flat = p.reshape(-1).double()
    k = min(max(round(percentile * flat.numel()), 1), flat.numel())
    return float(torch.kthvalue(flat, k).values)


def activation_entropy(p: torch.Tensor) -> torch.Tensor:
    """`−Σ p̂ log p̂` over languages (dim 0) of `p̂ = p / Σ p`, float64; a neuron whose
    probabilities sum to 0 gets +inf (it has no distribution)."""
    p = p.double()
    total = p.sum(0)
    q = p / total.clamp_min(torch.finfo(torch.float64).tiny)
    h = -torch.where(q > 0, q * q.log(), torch.zeros_like(q)).sum(0)
    return torch.where(total > 0, h, torch.full_like(h, float("inf")))


def _summary(
    chosen: dict[str, torch.Tensor],
    spans: list[tuple[UnitGroup, int]],
    stats: dict[str, int],
    base: dict[str, Any],
    data: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """Neurons per language and per layer, and how the languages' sets overlap."""
    langs = list(chosen)
    per_language = {}
    for lang in langs:
        layers = {}
        for g, lo in spans:
            layer = layer_index(g.key)
            layers[g.key if layer is None else str(layer)] = int(chosen[lang][lo : lo + g.size].sum())
        count = int(chosen[lang].sum())
        per_language[lang] = {"neurons": count, "share": count / stats["neurons"] if stats["neurons"] else 0.0, "per_layer": layers}
    overlaps = {}
    for i, a in enumerate(langs):
        for b in langs[i + 1 :]:
            shared = int((chosen[a] & chosen[b]).sum())
            union = int((chosen[a] | chosen[b]).sum())
            overlaps[f"{a}/{b}"] = {"shared": shared, "jaccard": shared / union if union else 0.0}
    return {
        "locator": "lape",
        "top": base["top"],
        "filter_percentile": base["filter_percentile"],
        "threshold": base["threshold"],
        **stats,
        "languages": per_language,
        "overlaps": overlaps,
        "data": data,
        "provenance": base,
    }


def _mlp_of(model: nn.Module, group: UnitGroup, by_module: Mapping[str, str], source: Path) -> nn.Module:
    """The MLP module of a block, found through its first part's parameter name (the model may
    prefix checkpoint names, e.g. GPT-2's `transformer.`)."""
    part = group.parts[0].name
    if part not in by_module:
        raise InputError(f"{source}: tensor {part} of {group.key} is not a parameter of the model")
    prefix = by_module[part][: len(by_module[part]) - len(part)]
    try:
        return model.get_submodule(prefix + group.key)
    except AttributeError:
        raise InputError(f"{source}: the model has no module {prefix + group.key} for MLP block {group.key}") from None
