"""Planning recipes written with mergekit's `slices:`.

Three forms are supported:

- **layer stacking** (`passthrough`): each slice has one source, `{model, layer_range: [a, b]}`
  (layers `a..b-1`); output layers are the slices' layers in order, renumbered from 0. Tensors
  before the blocks (embeddings) come from the first slice's model, those after them (final
  norm, LM head) from the last slice's, as in mergekit, and config.json gets the new layer
  count. Each output tensor maps to one (source model, source tensor name): `Step.origin`.
- **whole models in slice form** (any other method): one slice whose sources each cover all
  layers of their model, the shape mergekit users write for slerp and ties; it means the same
  as `models:` and is planned as such.
- **merging slice by slice** (any other method, any other slices): the i-th layer of every
  source of a slice is merged into output layer `offset + i`, with the slice's `parameters`
  over the top-level ones and each source's over both; per-layer lists run over the slice's
  own depth (`t = i / (n - 1)`, 1 for a one-layer slice). The tensors before the blocks are
  merged from the first slice's sources with its parameters, those after them from the last
  slice's, both at `t = 0`, as mergekit 0.1.5 plans them. Each source position (the base, then
  the k-th other source) is read through one `_StitchedView`: a checkpoint, made of headers
  only, whose output tensor names map to each slice's model and source tensor. A slice's own
  `base_model` is its base, over the top-level one (mergekit's rule): the base position then
  reads each slice's base.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from neuroloc_cli.arch import LAYER_COUNT_KEYS, is_pre_weight, layer_index, layer_position, rename_layer, tensor_kind
from neuroloc_cli.errors import NeurolocError, RecipeError
from neuroloc_cli.io.checkpoint import Checkpoint, resolve_model_path
from neuroloc_cli.io.format import DTYPE_NAMES, TensorInfo
from neuroloc_cli.merge.plan import (
    NO_OP_PARAMETERS,
    MergePlan,
    Source,
    Step,
    _check_config,
    _check_resolution,
    _check_tensors,
    _open,
    _use_vocabulary,
    _vocabulary,
    build_plan,
    fixed_out_dtype,
    known_parameters,
    make_step,
)
from neuroloc_cli.merge.vocab import Vocabulary
from neuroloc_cli.methods import METHODS, MergeMethod
from neuroloc_cli.recipe.params import ParameterResolver, check_parameters, unused_parameters
from neuroloc_cli.recipe.schema import InputModel, MergeRecipe

STACKING_METHODS = ("passthrough",)


def build_slices_plan(recipe: MergeRecipe, base_dir: Path, source: str) -> MergePlan:
    """Plan a recipe that uses `slices:` (see the module docstring).

    Raises:
        RecipeError: every problem found, at once (exit code 3 when all are input problems).
    """
    try:
        method = METHODS.get(recipe.merge_method)
    except NeurolocError as e:
        raise RecipeError(source, [f"merge_method: {e}"]) from None
    sources, problems = _open_sources(recipe, base_dir)
    if problems:
        raise RecipeError(source, problems, exit_code=3)
    if method.name in STACKING_METHODS:
        return _stacking_plan(recipe, source, method, sources)
    if _whole_models(recipe, sources):
        return build_plan(_as_models(recipe), base_dir, source)
    return _sliced_plan(recipe, source, method, sources, base_dir)


def _open_sources(recipe: MergeRecipe, base_dir: Path) -> tuple[list[list[Source]], list[str]]:
    """Open every slice source's checkpoint (each folder once)."""
    opened: dict[str, Source | NeurolocError] = {}
    problems: list[str] = []
    out: list[list[Source]] = []
    for i, sl in enumerate(recipe.slices):
        row = []
        for j, src in enumerate(sl.sources):
            role = f"slices[{i}].sources[{j}]"
            if src.model not in opened:
                try:
                    opened[src.model] = _open(role, src.model, base_dir)
                except NeurolocError as e:
                    opened[src.model] = e
                    problems.append(f"{role}.model: {e}")
            got = opened[src.model]
            if isinstance(got, Source):
                row.append(Source(role=role, spec=src.model, checkpoint=got.checkpoint))
        out.append(row)
    return out, problems


def _whole_models(recipe: MergeRecipe, sources: list[list[Source]]) -> bool:
    """One slice whose every source covers all layers of its model."""
    if len(recipe.slices) != 1:
        return False
    return all(list(src.layer_range) == [0, opened.checkpoint.num_layers] for src, opened in zip(recipe.slices[0].sources, sources[0]))


def _as_models(recipe: MergeRecipe) -> MergeRecipe:
    """A one-slice, all-layers recipe rewritten with `models:` (the slice's parameters over the top-level ones)."""
    sl = recipe.slices[0]
    models = [InputModel(model=s.model, parameters=s.parameters) for s in sl.sources]
    update = {"models": models, "slices": [], "parameters": {**recipe.parameters, **sl.parameters}}
    return recipe.model_copy(update=update | ({"base_model": sl.base_model} if sl.base_model is not None else {}))


def _stacking_plan(recipe: MergeRecipe, source: str, method: MergeMethod, sources: list[list[Source]]) -> MergePlan:
    problems = _check_stacking(recipe, sources, method)
    flat = [row[0] for row in sources]
    params = [{**sl.parameters, **sl.sources[0].parameters} for sl in recipe.slices]
    labels = [f"slices[{i}].sources[0]" for i in range(len(flat))]
    known = known_parameters()
    problems += check_parameters(
        method.params, recipe.parameters, params, method.name, NO_OP_PARAMETERS, model_labels=labels, unused_ok=known
    )
    problems += _check_layer_shapes(flat)
    if problems:
        raise RecipeError(source, problems)
    fixed_out = fixed_out_dtype(recipe, method)
    ranges = [sl.sources[0].layer_range for sl in recipe.slices]
    total = sum(b - a for a, b in ranges)
    steps: list[Step] = []
    first, last = flat[0].checkpoint, flat[-1].checkpoint
    steps += _outside_steps(first, 0, pre=True, num_layers=first.num_layers, fixed_out=fixed_out)
    out_layer = 0
    for index, (src, (a, b)) in enumerate(zip(flat, ranges)):
        for layer in range(a, b):
            t = (layer - a) / (b - a - 1) if b - a > 1 else 1.0  # mergekit: position within the slice
            for name, info in src.checkpoint.tensors.items():
                if layer_index(name) == layer:
                    steps.append(_step(rename_layer(name, out_layer), info, t, index, name, fixed_out))
            out_layer += 1
    steps += _outside_steps(last, len(flat) - 1, pre=False, num_layers=last.num_layers, fixed_out=fixed_out)
    resolver = ParameterResolver(method.params, recipe.parameters, params)
    compute = DTYPE_NAMES[recipe.dtype or "float32"]
    plan = MergePlan(recipe, source, method, None, flat, steps, compute, total, resolver)
    plan.config_updates = _config_updates(flat, ranges, total)
    plan.notes.append(f"layer stacking: {total} layers from {len(flat)} slice(s)")
    plan.warnings += unused_parameters(method.params, params, method.name, known, model_labels=labels)
    return plan


def _check_stacking(recipe: MergeRecipe, sources: list[list[Source]], method: MergeMethod) -> list[str]:
    problems = []
    if recipe.base_model is not None:
        problems.append("base_model: layer stacking takes no base model (embeddings come from the first slice, the head from the last)")
    if recipe.tokenizer_source is not None or recipe.tokenizer is not None:
        key = "tokenizer_source" if recipe.tokenizer is None else "tokenizer"
        problems.append(f"{key}: not supported with layer stacking ({method.name} over slices)")
    for i, (sl, row) in enumerate(zip(recipe.slices, sources)):
        if sl.base_model is not None:
            problems.append(f"slices[{i}].base_model: layer stacking takes no base model")
        if len(sl.sources) != 1:
            problems.append(f"slices[{i}].sources: {method.name} takes one source per slice, got {len(sl.sources)}")
            continue
        a, b = sl.sources[0].layer_range
        n = row[0].checkpoint.num_layers or 0
        if not 0 <= a < b <= n:
            problems.append(
                f"slices[{i}].sources[0].layer_range: [{a}, {b}] is not a non-empty range within the {n} layers of {sl.sources[0].model}"
            )
    return problems


def _check_layer_shapes(flat: list[Source]) -> list[str]:
    """Stacked layers must have the first model's tensor kinds and shapes."""
    ref = _kind_shapes(flat[0])
    problems = []
    for src in flat[1:]:
        theirs = _kind_shapes(src)
        if theirs != ref:
            diff = sorted(set(ref.items()) ^ set(theirs.items()))
            problems.append(f"{src.role} ({src.checkpoint.path}): its layers differ from {flat[0].role}'s, e.g. {diff[0][0]}")
    return problems


def _kind_shapes(src: Source) -> dict[str, tuple[int, ...]]:
    return {tensor_kind(n): tuple(i.shape) for n, i in src.checkpoint.tensors.items() if layer_index(n) is not None}


def _outside_steps(ckpt, index: int, *, pre: bool, num_layers: int | None, fixed_out) -> list[Step]:
    """Tensors outside the blocks: before them (pre) or after them."""
    steps = []
    for name, info in ckpt.tensors.items():
        if layer_index(name) is None and is_pre_weight(name) == pre:
            steps.append(_step(name, info, layer_position(name, num_layers), index, name, fixed_out))
    return steps


def _step(out_name: str, info, t: float, index: int, name: str, fixed_out) -> Step:
    return make_step(out_name, info, t, fixed_out, (True,), origin=(index, name))


def _config_updates(flat: list[Source], ranges: list[tuple[int, int]], total: int) -> dict:
    """The layer count, and per-layer config lists (e.g. Qwen2's `layer_types`), restacked."""
    cfg = flat[0].checkpoint.config or {}
    updates: dict = {k: total for k in LAYER_COUNT_KEYS if isinstance(cfg.get(k), int)}
    if isinstance(cfg.get("layer_types"), list):
        stacked = []
        for src, (a, b) in zip(flat, ranges):
            types = (src.checkpoint.config or {}).get("layer_types") or []
            stacked += types[a:b] if len(types) >= b else [cfg["layer_types"][0]] * (b - a)
        updates["layer_types"] = stacked
    return updates


# -- merging slice by slice -------------------------------------------------------------------


@dataclass
class _StitchedView(Checkpoint):
    """One source position of a sliced merge read as one checkpoint: output tensor `name` is
    tensor `parts[name][1]` of checkpoint `parts[name][0]` (headers only; nothing is read until
    `read`). `path`, `headers` and `config` are the first slice's model's."""

    parts: dict[str, tuple[Checkpoint, str]] | None = None

    def read(self, name: str, rows: tuple[int, int] | None = None, dtype=None):
        assert self.parts is not None
        ckpt, inner = self.parts[name]
        return ckpt.read(inner, rows, dtype)

    @cached_property
    def fingerprint(self) -> str:
        assert self.parts is not None
        inputs = {id(c): c for c, _ in self.parts.values()}.values()
        return hashlib.sha256("\0".join(c.fingerprint for c in inputs).encode()).hexdigest()


@dataclass(frozen=True)
class _StitchedSource(Source):
    """A source position of a sliced merge; `parts` are its real inputs, one per slice."""

    parts: tuple[Source, ...] = ()

    def input_paths(self) -> list[Path]:
        return [p for part in self.parts for p in part.input_paths()]

    def provenance(self) -> dict:
        return {"role": self.role, "slices": [part.provenance() for part in self.parts]}


class _SliceResolver:
    """`ParameterResolver.at` with each output tensor resolved by its slice's resolver."""

    def __init__(self, resolvers: list[ParameterResolver], slice_of: dict[str, int]):
        self.resolvers, self.slice_of = resolvers, slice_of

    def at(self, tensor_name: str, t: float):
        return self.resolvers[self.slice_of.get(tensor_name, 0)].at(tensor_name, t)


def _sliced_plan(recipe: MergeRecipe, source: str, method: MergeMethod, sources: list[list[Source]], base_dir: Path) -> MergePlan:
    """Plan a merge slice by slice (see the module docstring)."""
    problems, lengths = _check_slices(recipe, method, sources)
    if problems:
        raise RecipeError(source, problems)
    # the base is an input of methods built on it only; for the others every source is a model
    base_at = _base_positions(recipe, base_dir) if method.needs_base else [None] * len(sources)
    with_base = method.needs_base
    problems = [
        f"slices[{i}].sources: {method.name} needs the base model {base} among every slice's sources (mergekit's rule)"
        for i, (j, base) in enumerate(zip(base_at, _slice_bases(recipe)))
        if with_base and j is None and base is not None
    ]
    if problems:
        raise RecipeError(source, problems)
    order = [[j] + [k for k in range(len(row)) if k != j] if with_base else list(range(len(row))) for j, row in zip(base_at, sources)]
    counts = sorted({len(o) - with_base for o in order})
    if len(counts) > 1:
        problems.append(
            f"slices: {method.name} needs the same number of models in every slice, got {counts} (give each slice the same models)"
        )
    n_models = len(order[0]) - with_base
    if n_models < method.min_models:
        problems.append(f"slices[0].sources: {method.name} needs at least {method.min_models} model(s) besides the base, got {n_models}")
    if method.max_models is not None and n_models > method.max_models:
        problems.append(f"slices[0].sources: {method.name} takes at most {method.max_models} model(s), got {n_models}")
    if method.roles or method.check is not None:
        problems.append(f"slices: {method.name} is not merged slice by slice; give 'models:', or one slice over whole models")
    if recipe.mask is not None:
        problems.append("mask: not supported with several slices; give 'models:', or one slice over whole models")
    slice_problems, warnings = _check_slice_parameters(recipe, method, order, with_base)
    problems += slice_problems
    if problems:
        raise RecipeError(source, problems)

    views, slice_of, positions = _stitch(recipe, sources, order, lengths, with_base)
    base = views[0] if with_base else None
    models = views[1:] if with_base else views
    reference = base or models[0]
    fixed_out = fixed_out_dtype(recipe, method)
    steps = [
        make_step(n, info, positions[n], fixed_out, tuple(n in m.checkpoint.tensors for m in models))
        for n, info in reference.checkpoint.tensors.items()
    ]
    resolvers = [
        ParameterResolver(method.params, {**recipe.parameters, **sl.parameters}, [sl.sources[k].parameters for k in o[with_base:]])
        for sl, o in zip(recipe.slices, order)
    ]
    total = sum(lengths)
    compute = DTYPE_NAMES[recipe.dtype or "float32"]
    plan = MergePlan(recipe, source, method, base, models, steps, compute, total, _SliceResolver(resolvers, slice_of))  # type: ignore[arg-type]
    plan.warnings += warnings
    vocab, problems = _slice_vocabulary(recipe, method, sources, order, with_base, base_dir)
    if vocab is not None:
        _use_vocabulary(plan, vocab)
    problems += _check_tensors(reference, models, recipe.on_missing, vocab) + _check_config(reference, method)
    problems += _check_layer_shapes([row[o[0]] for row, o in zip(sources, order)])
    problems = problems or _check_resolution(plan)
    if problems:
        raise RecipeError(source, problems, exit_code=2)
    firsts = [row[o[0]] for row, o in zip(sources, order)]
    plan.config_updates |= _config_updates(firsts, [tuple(sl.sources[o[0]].layer_range) for sl, o in zip(recipe.slices, order)], total)
    plan.notes.append(f"merged slice by slice: {total} layers from {len(recipe.slices)} slice(s)")
    return plan


def _check_slices(recipe: MergeRecipe, method: MergeMethod, sources: list[list[Source]]) -> tuple[list[str], list[int]]:
    """Every range within its model, and the sources of a slice of one length; each slice's length."""
    problems: list[str] = []
    lengths: list[int] = []
    bases = _slice_bases(recipe)
    if method.needs_base and all(b is None for b in bases):
        problems.append(f"base_model: {method.name} needs a base model (one of every slice's sources)")
    elif method.needs_base:
        problems += [
            f"slices[{i}].base_model: {method.name} needs a base model; give one here or a top-level base_model"
            for i, b in enumerate(bases)
            if b is None
        ]
    for i, (sl, row) in enumerate(zip(recipe.slices, sources)):
        for j, (src, opened) in enumerate(zip(sl.sources, row)):
            a, b = src.layer_range
            n = opened.checkpoint.num_layers or 0
            if not 0 <= a < b <= n:
                problems.append(
                    f"slices[{i}].sources[{j}].layer_range: [{a}, {b}] is not a non-empty range within the {n} layers of {src.model}"
                )
        first = sl.sources[0].layer_range
        for j, src in enumerate(sl.sources[1:], 1):
            if src.layer_range[1] - src.layer_range[0] != first[1] - first[0]:
                problems.append(
                    f"slices[{i}].sources[{j}].layer_range: {list(src.layer_range)} has {src.layer_range[1] - src.layer_range[0]} layers, "
                    f"slices[{i}].sources[0] has {first[1] - first[0]}; the sources of a slice give the same number of layers"
                )
        lengths.append(first[1] - first[0])
    return problems, lengths


def _slice_bases(recipe: MergeRecipe) -> list[str | None]:
    """Each slice's base model: its own `base_model`, else the top-level one (mergekit's rule)."""
    return [sl.base_model or recipe.base_model for sl in recipe.slices]


def _base_positions(recipe: MergeRecipe, base_dir: Path) -> list[int | None]:
    """Where its base model is among each slice's sources (None where it is not, or it has none)."""
    out: list[int | None] = []
    for sl, spec in zip(recipe.slices, _slice_bases(recipe)):
        base = None if spec is None else resolve_model_path(spec, base_dir).resolve()
        out.append(
            next((j for j, s in enumerate(sl.sources) if s.model == spec or resolve_model_path(s.model, base_dir).resolve() == base), None)
            if spec is not None
            else None
        )
    return out


def _check_slice_parameters(
    recipe: MergeRecipe, method: MergeMethod, order: list[list[int]], with_base: bool
) -> tuple[list[str], list[str]]:
    """Each slice's parameters as the method reads them: the problems, each named by its recipe
    key, and the warnings (per-model parameters the method does not use, as mergekit's own
    recipes carry)."""
    problems: list[str] = []
    warnings: list[str] = []
    known = known_parameters()
    for i, (sl, o) in enumerate(zip(recipe.slices, order)):
        labels = [f"slices[{i}].sources[{k}]" for k in o[with_base:]]
        per_model = [sl.sources[k].parameters for k in o[with_base:]]
        merged = {**recipe.parameters, **sl.parameters}
        for text in check_parameters(method.params, merged, per_model, method.name, NO_OP_PARAMETERS, model_labels=labels, unused_ok=known):
            key = text.partition(":")[0].removeprefix("parameters.")
            problems.append(f"slices[{i}].{text}" if key in sl.parameters else text)
        warnings += unused_parameters(method.params, per_model, method.name, known, model_labels=labels)
    return list(dict.fromkeys(problems)), list(dict.fromkeys(warnings))


def _stitch(
    recipe: MergeRecipe, sources: list[list[Source]], order: list[list[int]], lengths: list[int], with_base: bool
) -> tuple[list[Source], dict[str, int], dict[str, float]]:
    """One `_StitchedSource` per source position; each output tensor's slice and `t`."""
    n_pos = len(order[0])
    parts: list[dict[str, tuple[Checkpoint, str]]] = [{} for _ in range(n_pos)]
    infos: list[dict[str, TensorInfo]] = [{} for _ in range(n_pos)]
    slice_of: dict[str, int] = {}
    positions: dict[str, float] = {}

    def add(pos: int, sl: int, ckpt: Checkpoint, inner: str, out: str, t: float) -> None:
        parts[pos][out] = (ckpt, inner)
        infos[pos][out] = ckpt.tensors[inner]
        slice_of[out], positions[out] = sl, t

    last = len(recipe.slices) - 1
    for edge, pre in ((0, True), (None, None), (last, False)):
        if edge is None:  # the blocks, slice by slice
            offset = 0
            for i, (sl, row, o) in enumerate(zip(recipe.slices, sources, order)):
                for step in range(lengths[i]):
                    t = step / (lengths[i] - 1) if lengths[i] > 1 else 1.0  # mergekit: position within the slice
                    for pos, k in enumerate(o):
                        ckpt, a = row[k].checkpoint, sl.sources[k].layer_range[0]
                        for name in ckpt.tensors:
                            if layer_index(name) == a + step:
                                add(pos, i, ckpt, name, rename_layer(name, offset + step), t)
                offset += lengths[i]
            continue
        for pos, k in enumerate(order[edge]):
            ckpt = sources[edge][k].checkpoint
            for name in ckpt.tensors:
                if layer_index(name) is None and is_pre_weight(name) == pre:
                    add(pos, edge, ckpt, name, name, 0.0)  # mergekit reads these with t = 0
    views: list[Source] = []
    for pos in range(n_pos):
        first = sources[0][order[0][pos]]
        view = _StitchedView(
            path=first.checkpoint.path,
            tensors=infos[pos],
            headers=first.checkpoint.headers,
            config=first.checkpoint.config,
            parts=parts[pos],
        )
        role = "base_model" if with_base and pos == 0 else f"slices[*].models[{pos - with_base}]"
        views.append(
            _StitchedSource(role=role, spec=first.spec, checkpoint=view, parts=tuple(row[o[pos]] for row, o in zip(sources, order)))
        )
    return views, slice_of, positions


def _slice_vocabulary(
    recipe: MergeRecipe, method: MergeMethod, sources: list[list[Source]], order: list[list[int]], with_base: bool, base_dir: Path
) -> tuple[Vocabulary | None, list[str]]:
    """The output vocabulary of a sliced `tokenizer_source` (or `tokenizer:`) recipe.

    Only the tensors outside the blocks are indexed by token: the embeddings, merged from the
    first slice's sources, and the head, from the last slice's. Each source position maps its
    rows through one model's vocabulary, so the first and last slices must take the same model
    at each position (the common shape: the same models in every slice); the vocabulary is
    built from those models, and every other slice's model must be one of them, so that a
    `union` holds every input's tokens as mergekit's does.
    """
    if recipe.tokenizer_source is None and recipe.tokenizer is None:
        return None, []
    key = "tokenizer_source" if recipe.tokenizer is None else "tokenizer.source"
    last = len(recipe.slices) - 1
    edge = [sources[0][k] for k in order[0]]
    problems = []
    for k0, k1 in zip(order[0], order[last]):
        if _identity(sources[0][k0]) != _identity(sources[last][k1]):
            problems.append(
                f"{key}: slices[{last}].sources[{k1}] ({recipe.slices[last].sources[k1].model}) stands where slices[0].sources[{k0}] "
                f"({recipe.slices[0].sources[k0].model}) does; with slices, the first and last slices take the same models in the "
                "same places (the embeddings and the head are each mapped through one model's vocabulary)"
            )
    known = {_identity(s) for s in edge}
    for i, row in enumerate(sources):
        problems += [
            f"{key}: slices[{i}].sources[{j}] ({recipe.slices[i].sources[j].model}) is not a source of the first and last slices, "
            "whose models make the vocabulary; give every slice the same models"
            for j, src in enumerate(row)
            if _identity(src) not in known
        ]
    if problems:
        return None, problems
    base = edge[0] if with_base else None
    return _vocabulary(recipe, method, base, edge[1:] if with_base else edge, base_dir)


def _identity(src: Source) -> tuple[Path, ...]:
    """What a source reads (its model's folder, and a LoRA adapter's), to tell inputs apart."""
    return tuple(p.resolve() for p in src.input_paths())
