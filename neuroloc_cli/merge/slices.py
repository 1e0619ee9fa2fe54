"""Planning recipes written with mergekit's `slices:`.

Two forms are supported:

- **layer stacking** (`passthrough`): each slice has one source, `{model, layer_range: [a, b]}`
  (layers `a..b-1`); output layers are the slices' layers in order, renumbered from 0. Tensors
  before the blocks (embeddings) come from the first slice's model, those after them (final
  norm, LM head) from the last slice's, as in mergekit, and config.json gets the new layer
  count. Each output tensor maps to one (source model, source tensor name): `Step.origin`.
- **whole models in slice form** (any other method): one slice whose sources each cover all
  layers of their model, the shape mergekit users write for slerp and ties; it means the same
  as `models:` and is planned as such.
"""

from __future__ import annotations

from pathlib import Path

from neuroloc_cli.arch import LAYER_COUNT_KEYS, is_pre_weight, layer_index, layer_position, rename_layer, tensor_kind
from neuroloc_cli.errors import NeurolocError, RecipeError
from neuroloc_cli.io.format import DTYPE_NAMES
from neuroloc_cli.merge.plan import (
    NO_OP_PARAMETERS,
    MergePlan,
    Source,
    Step,
    _open,
    build_plan,
    fixed_out_dtype,
    known_parameters,
    make_step,
)
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
    if method.name not in STACKING_METHODS:
        return build_plan(_as_models(recipe, sources, method, source), base_dir, source)
    return _stacking_plan(recipe, source, method, sources)


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


def _as_models(recipe: MergeRecipe, sources: list[list[Source]], method: MergeMethod, source: str) -> MergeRecipe:
    """A one-slice, all-layers recipe rewritten with `models:`."""
    problems = []
    if len(recipe.slices) != 1:
        problems.append(
            f"slices: {method.name} merges whole models; give one slice whose sources cover every layer "
            f"(layer stacking with several slices is for {', '.join(STACKING_METHODS)})"
        )
    else:
        for j, (src, opened) in enumerate(zip(recipe.slices[0].sources, sources[0])):
            n = opened.checkpoint.num_layers
            if list(src.layer_range) != [0, n]:
                problems.append(
                    f"slices[0].sources[{j}].layer_range: {method.name} merges whole models, so it must be [0, {n}] "
                    f"for {src.model}, got {list(src.layer_range)}"
                )
    if problems:
        raise RecipeError(source, problems)
    models = [InputModel(model=s.model, parameters=s.parameters) for s in recipe.slices[0].sources]
    return recipe.model_copy(update={"models": models, "slices": []})


def _stacking_plan(recipe: MergeRecipe, source: str, method: MergeMethod, sources: list[list[Source]]) -> MergePlan:
    problems = _check_stacking(recipe, sources, method)
    flat = [row[0] for row in sources]
    params = [sl.sources[0].parameters for sl in recipe.slices]
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
    for i, (sl, row) in enumerate(zip(recipe.slices, sources)):
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
