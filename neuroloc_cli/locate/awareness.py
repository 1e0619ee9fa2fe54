"""The `awareness` locator: LANDeRMT's language-aware FFN neurons (Zhu et al. 2024, §3.1–3.3).

A neuron is an FFN intermediate unit `i` of an MLP block; its activation `h_i` is the input of
the down projection (`act(gate_proj x) * up_proj x` for gated MLPs, `act(c_fc x)` for GPT-2),
read by a forward pre-hook on `down_proj` / `c_proj`. The data is one jsonl file of
`{"source", "target"}` sentence pairs per translation direction (`--pair de-en=PATH`), each
example the prompt of `runtime.prompts.pair_rows` followed by its target. One pass of the model
over every direction, batch by batch (every batch holds one direction), with no optimizer
step and the model in evaluation mode, gives all the numbers below.

1. **Layers (Eq. 1–2).** `A_{i,n}` is the mean of `h` over all neurons of layer `i` and all
   non-padding positions of pass (batch) `n`, over the batches of every direction together;
   `D_i = |mean_n A_{i,n} − mean_n A_{i+1,n}|` for `i = 0 .. L−2`. "Layer `i`" of a score is
   the lower of the two it compares: the `--layers k` layers with the largest `D` are kept
   (equal scores go to the lower layer), so the last layer is never kept by score.
   `--layer-ids` names the layers instead.
2. **Awareness (Eq. 3–4).** For a batch, `L` is the mean next-token NLL over the batch's
   target tokens (the labels of `pair_rows`, prompt and padding ignored):
   `L = (1 / T_b) Σ_{t target} −log p(y_t | y_<t)`. Per neuron and non-padding position `t`,
   `h_{t,i} · ∂L/∂h_{t,i}` is the first-order estimate of the loss change when `h_{t,i}` is set
   to 0. Over a set of positions (of all batches), `--order abs-mean` (the default) gives
   `Φ(i) = mean_t |h_{t,i} ∂L/∂h_{t,i}|`, `mean-abs` gives `|mean_t h_{t,i} ∂L/∂h_{t,i}|`. A
   direction's awareness is over all its non-padding positions. A language's awareness is
   over the positions of its text: the prompt positions (template and source sentence) of
   the directions from it and the target positions of the directions into it; with
   `abs-mean` that is the token-weighted mean of those sides' awareness. (The paper scores a
   language on its own data and does not say how translation pairs make a language's score.
   Taking every position of each direction the language is part of would give de and en the
   same vector when both de-en and en-de are given, so no neuron could be specific.)
3. **General and specific (Eq. 5).** Within each kept layer, `X_i` is neuron `i`'s vector of
   per-language awareness and `σ(X_i)` its variance (over languages, population variance). The
   `share_count(ε, p) = int(ε·p)` neurons of lowest variance are language-general (equal
   variances: the lower index first); every other neuron is specific to the language of its
   largest awareness (ties: the language listed first). Eq. 5 as printed sorts the variances
   from the highest and takes the `⌊ε·p⌋`-th as the threshold below which neurons are general,
   which read literally makes only `1 − ε` of them general; the paper's appendix (A.4: the
   best BLEU "when language-general neurons constitute 0.9 of the total neuron count", with
   `ε = 0.9`) settles it: `ε` is the general share.
4. **Routing (Eq. 6–9).** Per kept layer and direction S-T, with `Φ_{S-T}` the direction's
   awareness and `spec = specific(S) ∪ specific(T)`:
   `c = ΣΦ_{S-T}(spec) / (ΣΦ_{S-T}(spec) + ΣΦ_{S-T}(general))`; the general neurons take `c·x`,
   the pair's specific ones `(1 − c)·x` (`runtime.routing`). A layer whose awareness sums to 0
   gets the neuron-count share `|spec| / (|spec| + |general|)` instead (the limit of equal
   awareness everywhere).

The output folder (`AwarenessNeurons.save`): `general.safetensors`, `specific-LANG.safetensors`
per language and `pair-S-T.safetensors` per direction (general ∪ specific(S) ∪ specific(T)) as
`ffn` masks over the kept layers' MLP tensors; `importance/LANG.safetensors` and
`importance/pair-S-T.safetensors` (the awareness of the kept blocks, one vector per block key);
`routing.json` (the file `train --method landermt` and `export-pair` read; schema in
docs/landermt.md); `summary.json`; `awareness.png` (mean awareness per layer and language).

Under `accelerate launch` every process takes every `world`-th batch and the sums (activation
means, awareness sums, token counts) are added once at the end.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field, field_validator, model_validator
from torch import nn

from neuroloc_cli.arch import layer_index
from neuroloc_cli.errors import InputError, UsageError
from neuroloc_cli.io.checkpoint import Checkpoint, model_positions
from neuroloc_cli.locate.base import ARGUMENT, LocatorOptions, locator
from neuroloc_cli.locate.folder import save_folder
from neuroloc_cli.locate.scoring import scoring_model
from neuroloc_cli.locate.units import UnitGroup, ffn_groups, floating
from neuroloc_cli.masks.format import LAYOUT_KEY, Mask, MaskEntry, layout_digest
from neuroloc_cli.masks.importance import ImportanceMeta
from neuroloc_cli.masks.show import Grid, grid_png
from neuroloc_cli.ops.sparsify import share_count
from neuroloc_cli.runtime.data import choose_seq_len, load_tokenizer
from neuroloc_cli.runtime.distributed import sum_over_processes
from neuroloc_cli.runtime.prompts import DEFAULT_TEMPLATE, IGNORE, Pair, PairRows, pair_rows, parse_pairs, read_pairs, resolve_template
from neuroloc_cli.runtime.routing import ROUTING_FILE, ROUTING_KIND, ROUTING_VERSION

PAPER = "Zhu et al. 2024, LANDeRMT"
ORDERS = ("abs-mean", "mean-abs")
SIDES = ("source", "target")  # a direction's positions: the prompt, the target tokens
DEFAULT_LAYERS = 4
DEFAULT_GENERAL = 0.9
SCORE = "awareness"  # the importance files' score
PLOT_FILE = "awareness.png"


# -- options --------------------------------------------------------------------------------


class AwarenessOptions(LocatorOptions):
    """Settings of `locate awareness`."""

    model: Path = Field(description="checkpoint folder, with its tokenizer", json_schema_extra=ARGUMENT)
    pair: tuple[str, ...] = Field(description="SRC-TGT=PATH: one direction's jsonl of {source, target} pairs (repeatable)")
    layers: int | None = Field(default=None, description=f"keep the k layers of largest activation change (default {DEFAULT_LAYERS})")
    layer_ids: tuple[int, ...] = Field(default=(), description="keep these layers instead of --layers, e.g. 3,4,21,22")
    general: float = Field(default=DEFAULT_GENERAL, description="share of each kept layer's neurons that are language-general (0.9)")
    samples: int | None = Field(default=None, ge=1, description="examples read per direction, from the top (default: all)")
    seq_len: int | None = Field(default=None, ge=2, description="tokens per example (default: min(512, the model's positions))")
    batch_size: int = Field(default=8, ge=1, description="examples per pass")
    template: str = Field(default=DEFAULT_TEMPLATE, description="instruction template: a name of runtime.prompts.TEMPLATES or a literal")
    order: str = Field(default="abs-mean", description="abs-mean: mean of |h·∂L/∂h| over tokens; mean-abs: |mean of h·∂L/∂h|")

    @field_validator("layer_ids", mode="before")
    @classmethod
    def _layer_list(cls, value: Any) -> Any:
        if isinstance(value, str):
            return parse_layer_ids(value)
        return value

    @model_validator(mode="after")
    def _check(self) -> AwarenessOptions:
        check_settings(self)
        return self

    @property
    def pairs(self) -> list[Pair]:
        return parse_pairs(self.pair)

    @property
    def k(self) -> int:
        return DEFAULT_LAYERS if self.layers is None else self.layers


def parse_layer_ids(text: str) -> tuple[int, ...]:
    """`3,4,21,22` as layer numbers.

    Raises:
        UsageError: a part that is not a non-negative integer.
    """
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(p.isdigit() for p in parts):
        raise UsageError(f"--layer-ids {text!r}: expected comma-separated layer numbers", hint="e.g. --layer-ids 3,4,21,22")
    return tuple(int(p) for p in parts)


def check_settings(opts: AwarenessOptions) -> None:
    """The checks that need no model: one-line usage errors naming the flag.

    Raises:
        UsageError: a bad `--pair`, `--general`, `--layers`, `--layer-ids`, `--order` or `--template`.
    """
    pairs = parse_pairs(opts.pair)
    if not pairs:
        raise UsageError("--pair: no direction given", hint="e.g. --pair de-en=dev.de-en.jsonl --pair en-de=dev.en-de.jsonl")
    if not 0 < opts.general < 1:
        raise UsageError(f"--general must be in (0, 1), got {opts.general}", hint="the share of general neurons; the paper: 0.9")
    if opts.layers is not None and opts.layer_ids:
        raise UsageError("--layers and --layer-ids both given", hint="give the count of layers to keep, or the layers themselves")
    if opts.layers is not None and opts.layers < 1:
        raise UsageError(f"--layers must be at least 1, got {opts.layers}", hint="the paper keeps 4")
    if any(i < 0 for i in opts.layer_ids):
        raise UsageError(f"--layer-ids: layer {min(opts.layer_ids)} is negative")
    if len(set(opts.layer_ids)) != len(opts.layer_ids):
        raise UsageError(f"--layer-ids: a layer is given twice ({','.join(map(str, opts.layer_ids))})")
    if opts.order not in ORDERS:
        raise UsageError(f"--order must be one of {', '.join(ORDERS)}, got {opts.order!r}")
    resolve_template(opts.template)


# -- the pure steps ---------------------------------------------------------------------------


def layer_scores(mean_activation: Sequence[float]) -> list[float]:
    """Eq. 1: `D_i = |Ā_i − Ā_{i+1}|` for consecutive layers, `i = 0 .. L−2`."""
    return [abs(float(a) - float(b)) for a, b in zip(mean_activation[:-1], mean_activation[1:])]


def top_layers(scores: Sequence[float], k: int) -> list[int]:
    """Eq. 2: the positions of the `k` largest scores (equal scores: the lower position first), ascending.

    Raises:
        UsageError: `k` is not in 1 .. len(scores).
    """
    if not 1 <= k <= len(scores):
        raise UsageError(
            f"--layers {k}: the model has {len(scores) + 1} MLP layers, so at most {len(scores)} can be kept",
            hint="a layer's score compares it with the next one; or name the layers with --layer-ids",
        )
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:k])


def split_neurons(awareness: torch.Tensor, general: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 5 within one layer: general neurons, and each specific neuron's language.

    Args:
        awareness: [languages, p], each language's awareness of each neuron.
        general: the general share ε in (0, 1): `share_count(ε, p)` neurons.

    Returns:
        (general: BOOL [p], owner: int64 [p], the row of the language a specific neuron
        belongs to, -1 for general neurons).
    """
    x = awareness.double()
    variance = x.var(dim=0, correction=0)
    n_general = share_count(general, x.shape[1])
    order = torch.sort(variance, stable=True).indices  # ascending; equal variances: lower index first
    is_general = torch.zeros(x.shape[1], dtype=torch.bool)
    is_general[order[:n_general]] = True
    owner = torch.argmax(x, dim=0)  # the first of equal maxima
    owner = torch.where(is_general, torch.full_like(owner, -1), owner)
    return is_general, owner


def routing_coefficient(phi: torch.Tensor, is_general: torch.Tensor, is_specific: torch.Tensor) -> float:
    """Eq. 6: `c = ΣΦ(specific) / (ΣΦ(specific) + ΣΦ(general))` of one layer and direction;
    the neuron-count share when the awareness sums to 0."""
    phi = phi.double()
    spec, gen = float(phi[is_specific].sum()), float(phi[is_general].sum())
    if spec + gen > 0:
        return spec / (spec + gen)
    n_spec, n_gen = int(is_specific.sum()), int(is_general.sum())
    return n_spec / (n_spec + n_gen) if n_spec + n_gen else 0.0


def languages_of(directions: Sequence[str | Pair]) -> list[str]:
    """The languages of the directions, in order of first appearance (`de-en, en-fr` -> de, en, fr)."""
    out: list[str] = []
    for d in directions:
        src, tgt = (d.src, d.tgt) if isinstance(d, Pair) else tuple(d.split("-", 1))
        for lang in (src, tgt):
            if lang not in out:
                out.append(lang)
    return out


# -- scoring --------------------------------------------------------------------------------


@dataclass(frozen=True)
class PairBatch:
    """One batch of one direction's examples (columns past the longest example dropped)."""

    direction: str
    index: int  # the batch's number within its direction, from 0
    input_ids: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor


def pair_batches(rows: Sequence[PairRows], batch_size: int, *, rank: int = 0, world: int = 1) -> Iterator[PairBatch]:
    """Every direction's examples in batches of `batch_size` (the last may be shorter), direction
    by direction; batch `i` of the whole sequence goes to process `i % world`. A batch is cut
    after its longest example: the rows are right-padded and the model causal, so the padding
    columns change nothing."""
    i = 0
    for r in rows:
        for index, start in enumerate(range(0, len(r.input_ids), batch_size)):
            if i % world == rank:
                ids, labels = r.input_ids[start : start + batch_size], r.labels[start : start + batch_size]
                mask = r.attention_mask[start : start + batch_size] if r.attention_mask is not None else torch.ones_like(ids)
                width = max(int(mask.sum(1).max()), 2)
                yield PairBatch(r.pair.name, index, ids[:, :width], labels[:, :width], mask[:, :width])
            i += 1


@dataclass
class AwarenessSums:
    """The sums one pass over the data gives (all processes added), every MLP block included.

    A direction's positions are of two sides: `source`, the prompt (template and source
    sentence), and `target`, the target tokens (labels not IGNORE); padding is neither.

    Attributes:
        groups: the MLP blocks, in model order.
        directions: as given.
        abs_sums, signed_sums: direction -> side -> block key -> float64 [p]: `Σ_t |h g|` and
            `Σ_t h g` over the side's positions, `g = ∂L/∂h` of each batch's loss.
        tokens: direction -> side -> its positions.
        activation: block key -> `Σ_n A_{i,n}`, the batch means of `h` added over batches.
        passes: the batches `N`, every direction together.
        loss: direction -> the sum of its batch losses; batches: direction -> its batch count.
    """

    groups: list[UnitGroup]
    directions: list[str]
    abs_sums: dict[str, dict[str, dict[str, torch.Tensor]]]
    signed_sums: dict[str, dict[str, dict[str, torch.Tensor]]]
    tokens: dict[str, dict[str, int]]
    activation: dict[str, float]
    passes: int
    loss: dict[str, float] = field(default_factory=dict)
    batches: dict[str, int] = field(default_factory=dict)

    def mean_activation(self) -> list[float]:
        """`mean_n A_{i,n}` per block, in model order."""
        return [self.activation[g.key] / self.passes if self.passes else 0.0 for g in self.groups]

    def awareness_over(self, parts: Sequence[tuple[str, str]], order: str) -> dict[str, torch.Tensor]:
        """Block key -> float64 awareness over the positions of `parts` ((direction, side)
        pairs): `abs-mean` `Σ|hg| / T`, `mean-abs` `|Σhg| / T` (0 where there is no position)."""
        if order not in ORDERS:
            raise UsageError(f"--order must be one of {', '.join(ORDERS)}, got {order!r}")
        sums = self.abs_sums if order == "abs-mean" else self.signed_sums
        count = max(sum(self.tokens[d][side] for d, side in parts), 1)
        return {
            g.key: sum((sums[d][side][g.key] for d, side in parts), torch.zeros(g.size, dtype=torch.float64)).abs() / count
            for g in self.groups
        }

    def direction_awareness(self, order: str) -> dict[str, dict[str, torch.Tensor]]:
        """Direction -> block key -> awareness over all the direction's positions."""
        return {d: self.awareness_over([(d, side) for side in SIDES], order) for d in self.directions}

    def language_parts(self, language: str) -> list[tuple[str, str]]:
        """The positions of a language's text: the source side of the directions from it and
        the target side of the directions into it."""
        out = []
        for d in self.directions:
            src, tgt = d.split("-", 1)
            out += [(d, "source")] if src == language else []
            out += [(d, "target")] if tgt == language else []
        return out

    def language_awareness(self, order: str) -> dict[str, dict[str, torch.Tensor]]:
        """Language -> block key -> awareness over the positions of the language's text."""
        return {lang: self.awareness_over(self.language_parts(lang), order) for lang in languages_of(self.directions)}


def awareness_sums(
    model: nn.Module,
    groups: Sequence[UnitGroup],
    down: Mapping[str, nn.Module],
    batches: Iterable[PairBatch],
    directions: Sequence[str],
    *,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    world: int = 1,
) -> AwarenessSums:
    """Activation and awareness sums of every MLP block over `batches` (see the module docstring).

    Args:
        groups: the MLP blocks; `down` maps each key to its down projection, whose input's
            last dimension is the block's neurons (`h`).
        batches: this process's share, each of one of `directions`.
        autocast: the forward pass's autocast context (bf16 on CUDA under accelerate).
        world: processes whose sums are added at the end (each ran its own share).

    The model's weights and `requires_grad` flags are untouched: the gradients are taken with
    respect to `h` alone (`torch.autograd.grad`), through input embeddings that require grad.

    Raises:
        InputError: two blocks share a down projection, or one did not run exactly once per batch.
    """
    modules = [down[g.key] for g in groups]
    for j, m in enumerate(modules):
        if any(m is other for other in modules[:j]):
            raise InputError(f"MLP blocks {groups[modules.index(m)].key} and {groups[j].key} share one down projection")
    offsets = [0]
    for g in groups:
        offsets.append(offsets[-1] + g.size)
    n, nd, ng = offsets[-1], len(directions), len(groups)
    device = next(model.parameters()).device
    # one buffer, so that processes add everything in one all-reduce: [directions, sides,
    # (|hg|, hg), neurons], then tokens [directions, sides], loss and batches per direction,
    # activation per block, passes
    head = nd * 2 * 2 * n
    total = torch.zeros(head + 4 * nd + ng + 1, dtype=torch.float64, device=device)
    hg = total[:head].view(nd, 2, 2, n)
    tokens = total[head : head + 2 * nd].view(nd, 2)
    loss_sum, batch_count = total[head + 2 * nd : head + 3 * nd], total[head + 3 * nd : head + 4 * nd]
    activation = total[head + 4 * nd : head + 4 * nd + ng]
    passes = total[-1:]
    captured: list[torch.Tensor | None] = [None] * ng

    def hook_for(j: int) -> Callable[..., None]:
        size = groups[j].size

        def capture(module: nn.Module, args: Any) -> None:
            h = args[0]
            if h.shape[-1] != size:
                raise InputError(f"{groups[j].key}: its down projection takes {h.shape[-1]} inputs, but the block has {size} neurons")
            if captured[j] is not None:
                raise InputError(f"{groups[j].key}: its down projection ran twice in one pass", hint="awareness reads h once per token")
            captured[j] = h

        return capture

    index = {d: i for i, d in enumerate(directions)}
    embed = model.get_input_embeddings()
    hooks = [m.register_forward_pre_hook(hook_for(j)) for j, m in enumerate(modules)]
    try:
        for batch in batches:
            captured[:] = [None] * ng
            d = index[batch.direction]
            ids, labels, mask = (t.to(device) for t in (batch.input_ids, batch.labels, batch.attention_mask))
            with torch.no_grad():
                embeds = embed(ids)
            embeds.requires_grad_(True)  # every activation then requires grad; no weight does
            with autocast():
                logits = model(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
            targets = labels[:, 1:]
            nll = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE, reduction="sum")
            loss = nll / max(int((targets != IGNORE).sum()), 1)
            missing = [groups[j].key for j, h in enumerate(captured) if h is None]
            if missing:
                raise InputError(f"{missing[0]}: its down projection did not run", hint="awareness reads h at the down projection")
            grads = torch.autograd.grad(loss, captured)
            with torch.no_grad():
                on = mask.bool()
                target_side = labels != IGNORE
                sides = [(on & ~target_side).unsqueeze(-1).float(), (on & target_side).unsqueeze(-1).float()]
                positions = int(on.sum())
                for j, (h, g) in enumerate(zip(captured, grads)):
                    lo, hi = offsets[j], offsets[j + 1]
                    prod = h.float() * g.float()
                    for s, side in enumerate(sides):
                        part = prod * side
                        hg[d, s, 0, lo:hi] += part.abs().sum((0, 1)).double()
                        hg[d, s, 1, lo:hi] += part.sum((0, 1)).double()
                    activation[j] += (h.float() * on.unsqueeze(-1)).double().sum() / (positions * groups[j].size)
                tokens[d] += torch.stack([side.sum() for side in sides]).double()
                loss_sum[d] += float(loss)
                batch_count[d] += 1
                passes += 1
            del grads, logits, loss, nll, embeds
            captured[:] = [None] * ng
    finally:
        for h in hooks:
            h.remove()
    sum_over_processes(total, world)
    total = total.cpu()
    hg = total[:head].view(nd, 2, 2, n)
    tokens = total[head : head + 2 * nd].view(nd, 2).tolist()
    tail = total[head + 2 * nd :].tolist()
    spans = list(zip(groups, offsets[:-1], offsets[1:]))

    def vectors(kind: int) -> dict[str, dict[str, dict[str, torch.Tensor]]]:
        return {
            dname: {side: {g.key: hg[i, s, kind, lo:hi].clone() for g, lo, hi in spans} for s, side in enumerate(SIDES)}
            for dname, i in index.items()
        }

    return AwarenessSums(
        list(groups),
        list(directions),
        vectors(0),
        vectors(1),
        tokens={dname: {side: int(tokens[i][s]) for s, side in enumerate(SIDES)} for dname, i in index.items()},
        activation={g.key: tail[2 * nd + j] for j, g in enumerate(groups)},
        passes=int(tail[-1]),
        loss={dname: tail[i] for dname, i in index.items()},
        batches={dname: int(tail[nd + i]) for dname, i in index.items()},
    )


@dataclass
class AwarenessScores:
    """The sums of one run, and what they were computed from (for provenance)."""

    model: Path
    fingerprint: str
    shapes: dict[str, tuple[int, ...]]
    sums: AwarenessSums
    template: str
    data: dict[str, dict[str, Any]]  # direction -> path, sha256, examples, target tokens, truncated
    settings: dict[str, Any]
    is_main: bool = True


def score_awareness(
    model_path: Path,
    pairs: Sequence[Pair],
    *,
    samples: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    template: str = DEFAULT_TEMPLATE,
) -> AwarenessScores:
    """Run the model over every direction's examples and return the awareness sums.

    Args:
        model_path: the checkpoint folder (with its tokenizer).
        pairs: the directions (`runtime.prompts.parse_pairs`).
        samples: examples per direction, the first of each file; None: all.
        seq_len: tokens per example; None: the smaller of 512 and the model's positions.
        batch_size: examples per pass.
        template: a template name or literal (`runtime.prompts.resolve_template`).

    Raises:
        UsageError: a bad template or sequence length.
        InputError: an unreadable model, tokenizer or data file, a file with fewer examples
            than `samples`, a direction none of whose targets fits `seq_len`, or an MLP whose
            down projection cannot be hooked.
    """
    ckpt = Checkpoint.open(model_path, spec=str(model_path))
    groups = ffn_groups(floating(ckpt.tensors), str(model_path))
    seq_len = choose_seq_len(seq_len, model_positions(ckpt.config))
    resolved = resolve_template(template)
    tokenizer = load_tokenizer(model_path)
    rows, data = [], {}
    for pair in pairs:
        sentences = read_pairs(pair.path)
        if samples is not None:
            if len(sentences) < samples:
                raise InputError(f"{pair.path}: {len(sentences)} sentence pairs, fewer than the --samples {samples} asked for")
            sentences = sentences[:samples]
        r = pair_rows(pair, sentences, tokenizer, resolved, seq_len)
        if not bool((r.labels != IGNORE).any()):
            raise InputError(f"{pair.path}: no target token fits in --seq-len {seq_len}", hint="raise --seq-len")
        rows.append(r)
        data[pair.name] = {**r.describe(), "sha256": hashlib.sha256(pair.path.read_bytes()).hexdigest()}
    accelerator, model, by_module = scoring_model(model_path, ckpt)
    down = {g.key: down_projection(model, g, by_module, model_path) for g in groups}
    batches = pair_batches(rows, batch_size, rank=accelerator.process_index, world=accelerator.num_processes)
    directions = [p.name for p in pairs]
    sums = awareness_sums(model, groups, down, batches, directions, autocast=accelerator.autocast, world=accelerator.num_processes)
    settings = {
        "activation": "h: the input of each MLP's down projection",
        "loss": "mean next-token NLL over each batch's target tokens",
        "seq_len": seq_len,
        "batch_size": batch_size,
        "samples": samples,
        "processes": accelerator.num_processes,
    }
    shapes = {n: tuple(i.shape) for n, i in ckpt.tensors.items()}
    return AwarenessScores(Path(model_path), ckpt.fingerprint, shapes, sums, resolved, data, settings, accelerator.is_main_process)


def down_projection(model: nn.Module, group: UnitGroup, by_module: Mapping[str, str], source: Path | str) -> nn.Module:
    """The module of a block's down projection (its last part), found through the model's
    parameter name (the model may prefix checkpoint names, e.g. GPT-2's `transformer.`).

    Raises:
        InputError: the tensor is not a parameter of the model.
    """
    weight = group.parts[-1].name
    if weight not in by_module:
        raise InputError(f"{source}: tensor {weight} of {group.key} is not a parameter of the model")
    return model.get_submodule(by_module[weight].rpartition(".")[0])


# -- selection --------------------------------------------------------------------------------


def check_layer_choice(layers: Sequence[int], k: int | None, layer_ids: Sequence[int]) -> None:
    """Refuse `--layers` larger than the model allows, or `--layer-ids` of layers it lacks.

    Args:
        layers: the model's MLP layer numbers, in order.

    Raises:
        UsageError: naming the flag.
    """
    missing = [i for i in layer_ids if i not in layers]
    if missing:
        raise UsageError(
            f"--layer-ids: layer {missing[0]} is out of range for a model of {len(layers)} MLP layers ({min(layers)}..{max(layers)})"
        )
    if not layer_ids:
        top_layers([0.0] * (len(layers) - 1), DEFAULT_LAYERS if k is None else k)


@dataclass
class AwarenessNeurons:
    """The masks, importance, routing document, summary and plot of `locate awareness`.

    Attributes:
        masks: file stem -> mask (`general`, `specific-LANG`, `pair-S-T`).
        importance: file stem (`LANG`, `pair-S-T`) -> block key -> float32 awareness.
        routing: the `routing.json` document.
        grid: mean awareness per layer (rows) and language (columns), for the plot.
    """

    masks: dict[str, Mask]
    importance: dict[str, dict[str, torch.Tensor]]
    importance_meta: dict[str, ImportanceMeta]
    routing: dict[str, Any]
    summary: dict[str, Any]
    grid: Grid
    is_main: bool = True

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
            extra=self._write_own,
        )

    def _write_own(self, folder: Path) -> None:
        """routing.json and the per-layer awareness picture."""
        (folder / ROUTING_FILE).write_text(json.dumps(self.routing, indent=2) + "\n")
        grid_png(self.grid, folder / PLOT_FILE, "mean awareness per layer and language (* kept)", "mean awareness")


def landermt_neurons(
    sums: AwarenessSums,
    *,
    shapes: Mapping[str, Sequence[int]],
    k: int | None = DEFAULT_LAYERS,
    layer_ids: Sequence[int] = (),
    general: float = DEFAULT_GENERAL,
    order: str = "abs-mean",
    provenance: Mapping[str, Any] | None = None,
    routing_fields: Mapping[str, Any] | None = None,
    data: Mapping[str, Mapping[str, Any]] | None = None,
) -> AwarenessNeurons:
    """Layers, general and specific neurons, masks and routing from the sums (pure).

    Args:
        sums: from `awareness_sums`.
        shapes: every tensor of the model (mask entries and the layout digest).
        k: layers kept by score (Eq. 2); ignored when `layer_ids` names them.
        layer_ids: the kept layers, by number.
        general: the general share ε in (0, 1).
        order: one of ORDERS.
        provenance: what every mask and importance file records (model, settings).
        routing_fields: `model`, `model_fingerprint` and `template` for routing.json.
        data: direction -> its data description.

    Raises:
        UsageError: a bad share, order or layer choice.
    """
    if not 0 < general < 1:
        raise UsageError(f"--general must be in (0, 1), got {general}")
    groups = sums.groups
    numbers = [layer_index(g.key) for g in groups]
    numbers = [i if n is None else n for i, n in enumerate(numbers)]
    mean_activation = sums.mean_activation()
    scores = layer_scores(mean_activation)
    check_layer_choice(numbers, k, layer_ids)
    kept_pos = sorted(numbers.index(i) for i in layer_ids) if layer_ids else top_layers(scores, DEFAULT_LAYERS if k is None else k)
    kept = [groups[i] for i in kept_pos]
    directions = list(sums.directions)
    langs = languages_of(directions)
    per_direction = sums.direction_awareness(order)
    per_language = sums.language_awareness(order)

    base = {
        "locator": "awareness",
        **dict(provenance or {}),
        LAYOUT_KEY: layout_digest(shapes),
        "general": general,
        "order": order,
        "layers": [numbers[i] for i in kept_pos],
        "languages": langs,
        "directions": directions,
    }
    is_general, specific, blocks, counts = {}, {}, {}, {}
    for pos, g in zip(kept_pos, kept):
        gen, owner = split_neurons(torch.stack([per_language[lang][g.key] for lang in langs]), general)
        is_general[g.key] = gen
        specific[g.key] = {lang: owner == li for li, lang in enumerate(langs)}
        blocks[g.key] = {
            "layer": numbers[pos],
            "size": g.size,
            "parts": [[p.name, p.axis] for p in g.parts],
            "general": torch.nonzero(gen).flatten().tolist(),
            "specific": {lang: torch.nonzero(specific[g.key][lang]).flatten().tolist() for lang in langs},
        }
        counts[str(numbers[pos])] = {
            "neurons": g.size,
            "general": int(gen.sum()),
            "specific": {lang: int(s.sum()) for lang, s in specific[g.key].items()},
        }
    coefficient = {}
    for d in directions:
        src, tgt = d.split("-", 1)
        coefficient[d] = {
            g.key: routing_coefficient(per_direction[d][g.key], is_general[g.key], specific[g.key][src] | specific[g.key][tgt])
            for g in kept
        }

    def mask(stem: str, chosen: Mapping[str, torch.Tensor], extra: Mapping[str, Any]) -> Mask:
        entries = {}
        for g in kept:
            for part in g.parts:
                entries[part.name] = MaskEntry(shapes[part.name], part.axis, chosen[g.key].clone())
        units = sum(g.size for g in kept)
        selected = sum(int(chosen[g.key].sum()) for g in kept)
        return Mask("ffn", entries, {**base, "set": stem, **extra, "units": units, "selected_units": selected})

    masks = {"general": mask("general", is_general, {})}
    for lang in langs:
        masks[f"specific-{lang}"] = mask(f"specific-{lang}", {g.key: specific[g.key][lang] for g in kept}, {"language": lang})
    for d in directions:
        src, tgt = d.split("-", 1)
        chosen = {g.key: is_general[g.key] | specific[g.key][src] | specific[g.key][tgt] for g in kept}
        masks[f"pair-{d}"] = mask(f"pair-{d}", chosen, {"direction": d})

    described = {d: dict((data or {}).get(d, {})) for d in directions}
    importance, meta = {}, {}
    for lang in langs:
        importance[lang] = {g.key: per_language[lang][g.key].float() for g in kept}
        parts = [f"{d}:{side}" for d, side in sums.language_parts(lang)]
        tokens = sum(sums.tokens[d][side] for d, side in sums.language_parts(lang))
        meta[lang] = ImportanceMeta(SCORE, "sum", lang, {**base, "granularity": "ffn", "positions": parts, "tokens": tokens})
    for d in directions:
        importance[f"pair-{d}"] = {g.key: per_direction[d][g.key].float() for g in kept}
        meta[f"pair-{d}"] = ImportanceMeta(SCORE, "sum", d, {**base, "granularity": "ffn", **described[d]})

    fields = dict(routing_fields or {})
    routing = {
        "neuroloc.kind": ROUTING_KIND,
        "version": ROUTING_VERSION,
        "model": str(fields.get("model", "")),
        "model_fingerprint": str(fields.get("model_fingerprint", "")),
        "model_layout": base[LAYOUT_KEY],
        "template": str(fields.get("template", "")),
        "languages": langs,
        "directions": directions,
        "layers": base["layers"],
        "blocks": blocks,
        "coefficient": coefficient,
    }
    label = {numbers[i]: f"{numbers[i]}*" if i in kept_pos else str(numbers[i]) for i in range(len(groups))}
    values = torch.tensor([[float(per_language[lang][g.key].mean()) for lang in langs] for g in groups], dtype=torch.float32)
    grid = Grid(values, [label[n] for n in numbers], langs)
    summary = {
        "locator": "awareness",
        "general": general,
        "order": order,
        "layers": base["layers"],
        "layer_choice": "given (--layer-ids)" if layer_ids else f"top {DEFAULT_LAYERS if k is None else k} by score",
        "layer_scores": {str(numbers[i]): s for i, s in enumerate(scores)},
        "mean_activation": {str(n): a for n, a in zip(numbers, mean_activation)},
        "mean_awareness": {str(n): {lang: float(values[i, li]) for li, lang in enumerate(langs)} for i, n in enumerate(numbers)},
        "counts": counts,
        "coefficient": {d: {str(blocks[key]["layer"]): c for key, c in per.items()} for d, per in coefficient.items()},
        "loss": {d: sums.loss[d] / sums.batches[d] if sums.batches.get(d) else None for d in directions},
        "tokens": dict(sums.tokens),
        "passes": sums.passes,
        "data": described,
        "provenance": base,
    }
    return AwarenessNeurons(masks, importance, meta, routing, summary, grid)


def plan_awareness(opts: AwarenessOptions) -> dict[str, Any]:
    """What `locate awareness` would score, hold and write, from the checkpoint's headers only
    (`--dry-run`); no data file is read.

    Disk: the `ffn` masks (general, one per language, one per direction: a byte per neuron
    and part tensor of the kept blocks, without their JSON headers), the importance files (one
    float32 per kept neuron, per language and direction) and `routing.json` (about 8 bytes per
    kept neuron index, an estimate). Memory: the model in float32 (the scorer's), the float64
    sums of every neuron (|h·g| and h·g per direction and side) and, per batch, the captured
    `h` and its gradient of every MLP block in float32; the rest of the forward and backward
    activations come on top, as in any forward-backward pass.

    Raises:
        UsageError: bad settings, or layers the model does not have.
        InputError: an unreadable checkpoint, or a model with no MLP blocks.
    """
    ckpt = Checkpoint.open(opts.model, spec=str(opts.model))
    groups = ffn_groups(floating(ckpt.tensors), str(opts.model))
    numbers = [layer_index(g.key) for g in groups]
    check_layer_choice([i if n is None else n for i, n in enumerate(numbers)], opts.layers, opts.layer_ids)
    seq_len = choose_seq_len(opts.seq_len, model_positions(ckpt.config))
    directions = [p.name for p in opts.pairs]
    langs = languages_of(directions)
    k = len(opts.layer_ids) or opts.k
    kept = sorted(groups, key=lambda g: g.size, reverse=True)[:k]  # the largest k: an upper bound for any choice
    neurons = sum(g.size for g in kept)
    part_bytes = sum(g.size * len(g.parts) for g in kept)
    masks = 1 + len(langs) + len(directions)
    disk = {
        "masks": masks * part_bytes,
        "importance": (len(langs) + len(directions)) * 4 * neurons,
        "routing": 8 * neurons,
    }
    disk["total"] = sum(disk.values())
    all_neurons = sum(g.size for g in groups)
    floating_elements = sum(i.numel for i in ckpt.tensors.values() if i.torch_dtype.is_floating_point)
    memory = {
        "model": 4 * floating_elements,
        "sums": 8 * len(directions) * 4 * all_neurons,
        "captured": 2 * 4 * opts.batch_size * seq_len * all_neurons,
    }
    memory["total"] = sum(memory.values())
    return {
        "directions": {p.name: str(p.path) for p in opts.pairs},
        "languages": langs,
        "layers": list(opts.layer_ids) or f"the {k} of largest activation change",
        "kept_blocks": k,
        "kept_neurons": neurons,
        "general_per_block": [share_count(opts.general, g.size) for g in kept],
        "seq_len": seq_len,
        "batch_size": opts.batch_size,
        "disk_bytes": disk,
        "memory_bytes": memory,
    }


@locator("awareness", options=AwarenessOptions, reads="a model on translation pairs: activations and their gradients", paper=PAPER)
def locate_awareness(opts: AwarenessOptions) -> AwarenessNeurons:
    """Language-general and language-specific FFN neurons of the layers that matter for translation (LANDeRMT).

    Raises:
        UsageError: bad settings, or layers the model does not have.
        InputError: an unreadable model, tokenizer or data file, or an MLP whose down
            projection cannot be hooked.
    """
    ckpt = Checkpoint.open(opts.model, spec=str(opts.model))
    groups = ffn_groups(floating(ckpt.tensors), str(opts.model))
    numbers = [layer_index(g.key) for g in groups]
    check_layer_choice([i if n is None else n for i, n in enumerate(numbers)], opts.layers, opts.layer_ids)
    scores = score_awareness(
        opts.model, opts.pairs, samples=opts.samples, seq_len=opts.seq_len, batch_size=opts.batch_size, template=opts.template
    )
    model = str(Path(opts.model).resolve())
    provenance = {"model": model, "model_fingerprint": scores.fingerprint, "template": scores.template, **scores.settings}
    found = landermt_neurons(
        scores.sums,
        shapes=scores.shapes,
        k=opts.layers,
        layer_ids=opts.layer_ids,
        general=opts.general,
        order=opts.order,
        provenance=provenance,
        routing_fields={"model": model, "model_fingerprint": scores.fingerprint, "template": scores.template},
        data=scores.data,
    )
    found.is_main = scores.is_main
    return found
