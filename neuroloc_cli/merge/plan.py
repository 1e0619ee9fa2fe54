"""Planning a merge from a recipe and the inputs' headers, reading no tensor data.

`build_plan` opens every checkpoint's index and headers, checks the recipe against the
method and the tensors against each other, and collects every problem before raising, so
`neuroloc recipe validate` and `merge --dry-run` report them all at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from neuroloc_cli.arch import layer_position
from neuroloc_cli.errors import InputError, NeurolocError, RecipeError, UsageError
from neuroloc_cli.io.checkpoint import Checkpoint, Kind, compare_tensors, resolve_model_path
from neuroloc_cli.io.format import DTYPE_NAMES, TensorInfo
from neuroloc_cli.io.lora import LoraCheckpoint
from neuroloc_cli.io.writer import OutTensor
from neuroloc_cli.masks.importance import Importance
from neuroloc_cli.merge.masks import MergeMasks, describe_masks, load_masks, mask_recipe_problems
from neuroloc_cli.merge.vocab import TokenSourceError, Vocabulary, plan_vocabulary
from neuroloc_cli.methods import METHODS, MergeMethod
from neuroloc_cli.recipe.params import Param, ParameterResolver, check_parameters, unused_parameters
from neuroloc_cli.recipe.schema import InputModel, MergeRecipe, input_models, role_name, split_model_reference

# mergekit parameters that change how it computes, not what: accepted and ignored.
NO_OP_PARAMETERS = frozenset({"int8_mask"})
_MAX_LISTED = 5  # mismatched tensors listed per model before "and N more"


@dataclass(frozen=True)
class Source:
    """One input checkpoint and where the recipe names it (`base_model`, `models[1]`)."""

    role: str
    spec: str
    checkpoint: Checkpoint

    @property
    def adapter(self) -> Path | None:
        """The LoRA adapter folder of a `MODEL+LORA` reference, else None."""
        adapter = getattr(self.checkpoint, "adapter", None)  # a `LoraCheckpoint`'s, or a cached view of one
        return adapter.path if adapter is not None else None

    def input_paths(self) -> list[Path]:
        """The folders this input reads: the model's, and a LoRA adapter's."""
        return [p for p in (self.checkpoint.path, self.adapter) if p is not None]

    def provenance(self) -> dict:
        """How the output's provenance records this input: role, path, fingerprint, and a LoRA
        adapter's folder and the sha256 of its weights."""
        out = {"role": self.role, "path": str(self.checkpoint.path.resolve()), "fingerprint": self.checkpoint.fingerprint}
        if isinstance(self.checkpoint, LoraCheckpoint) and self.checkpoint.adapter is not None:
            out["lora"] = {"path": str(self.checkpoint.adapter.path.resolve()), "sha256": self.checkpoint.adapter.sha256}
        return out


@dataclass(frozen=True)
class SideInput:
    """One model's file for a file parameter of the method (`fisher:`, `gram:`), opened
    header-only: the recipe key that names it, the file, and its tensors' shapes."""

    key: str
    file: Importance

    @property
    def path(self) -> Path:
        return self.file.path

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return self.file.shapes


@dataclass(frozen=True)
class Step:
    """One output tensor: how to make it and what it will be written as.

    `present[i]` is False when model i lacks the tensor and the recipe says
    `on_missing: base` (the base tensor stands in). `merge` is False for tensors that are
    copied from the reference model unchanged (integer and boolean buffers).
    """

    name: str
    out: OutTensor
    t: float
    merge: bool
    present: tuple[bool, ...]
    origin: tuple[int, str] | None = None
    """Set by layer stacking (`slices:`): read only model `origin[0]`'s tensor `origin[1]`."""
    vocab: bool = False
    """Rows indexed by token, mapped onto the output vocabulary first (`tokenizer_source`)."""


@dataclass
class MergePlan:
    """Everything a merge needs, checked; `steps` are in output order."""

    recipe: MergeRecipe
    source: str
    method: MergeMethod
    base: Source | None
    models: list[Source]
    steps: list[Step]
    compute_dtype: torch.dtype
    num_layers: int | None
    resolver: ParameterResolver
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """Recipe content that has no effect but may be a mistake (a model parameter the method
    ignores); shown by `recipe validate`, `--dry-run` and the merge itself."""
    masks: MergeMasks | None = None
    config_updates: dict = field(default_factory=dict)
    """Keys to change in the copied config.json (layer stacking sets the layer count)."""
    vocabulary: Vocabulary | None = None
    """The output vocabulary of a `tokenizer_source` recipe (`merge.vocab`)."""
    side: dict[str, list[SideInput]] = field(default_factory=dict)
    """Each file parameter of the method (`recipe.params.SideFile`) -> one opened file per
    model; `merge.stream` reads their tensors beside the models'."""

    @property
    def reference(self) -> Source:
        """The model whose tensor list, config and tokenizer the output takes."""
        return self.base or self.models[0]

    @property
    def sources(self) -> list[Source]:
        return ([self.base] if self.base else []) + self.models

    @property
    def roles(self) -> list[str]:
        """Each model's role as the method sees it (`recipe.schema.role_name`)."""
        return [role_name(s.role) for s in self.models]

    @property
    def widen(self) -> bool:
        """Whether the recipe asks for float32 arithmetic (`accumulate: float32`) on inputs
        rounded to a narrower compute dtype."""
        return self.recipe.accumulate == "float32" and self.compute_dtype in (torch.bfloat16, torch.float16)

    def input_paths(self) -> list[Path]:
        """Every input folder, LoRA adapters included (an output must not land in one)."""
        return [p for s in self.sources for p in s.input_paths()]

    @property
    def out_bytes(self) -> int:
        return sum(s.out.nbytes for s in self.steps)


def build_plan(recipe: MergeRecipe, base_dir: Path, source: str) -> MergePlan:
    """Check a recipe against its method and its inputs' headers, and plan the merge.

    Args:
        recipe: the parsed recipe.
        base_dir: folder that relative model paths are relative to (the recipe's folder).
        source: the recipe's name, for messages.

    Raises:
        RecipeError: every problem found, at once (exit code 3 when all are input problems).
    """
    if recipe.slices:
        from neuroloc_cli.merge.slices import build_slices_plan

        return build_slices_plan(recipe, base_dir, source)
    problems: list[str] = []
    input_problems = 0

    method: MergeMethod | None = None
    try:
        method = METHODS.get(recipe.merge_method)
    except NeurolocError as e:
        problems.append(f"merge_method: {e}")
    entries = _model_entries(recipe, method, base_dir)
    warnings: list[str] = []
    if method is not None:
        problems += _check_method_shape(recipe, method, len(entries))
        model_params = [m.parameters for _, m in entries]
        labels = [role.removesuffix(".model") for role, _ in entries]
        problems += check_parameters(
            method.params, recipe.parameters, model_params, method.name, NO_OP_PARAMETERS, model_labels=labels, unused_ok=known_parameters()
        )
        warnings = unused_parameters(method.params, model_params, method.name, known_parameters(), model_labels=labels)
    problems += mask_recipe_problems(recipe)

    sources: list[Source | None] = []
    for role, spec in _inputs(recipe, entries):
        try:
            sources.append(_open(role, spec, base_dir))
        except NeurolocError as e:
            problems.append(f"{role}: {e}")
            input_problems += isinstance(e, InputError)
            sources.append(None)

    base = sources[0] if recipe.base_model is not None else None
    models = sources[1:] if recipe.base_model is not None else sources
    plan = None
    if method is not None and all(sources) and (models or (base and method.min_models == 0)):
        opened = [s for s in models if s is not None]
        reference = base or opened[0]
        vocab, vocab_problems = _vocabulary(recipe, method, base, opened, base_dir)
        tensor_problems = vocab_problems + _check_tensors(reference, opened, recipe.on_missing, vocab) + _check_config(reference, method)
        input_problems += len(tensor_problems)
        problems += tensor_problems
        if not tensor_problems:
            plan = _plan(recipe, source, method, base, opened, [m.parameters for _, m in entries])
            if vocab is not None:
                _use_vocabulary(plan, vocab)
            plan.notes += _skipped_base_notes(recipe, entries)
            plan.warnings += warnings
            if not problems:  # parameters are well-formed: check they resolve at every tensor
                problems += _check_resolution(plan)
            if not problems:
                side_problems = _open_side_files(plan, entries, base_dir)
                input_problems += len(side_problems)
                problems += side_problems
            if not problems:
                plan.masks, mask_problems = load_masks(recipe, entries, base_dir, reference)
                input_problems += len(mask_problems)
                problems += mask_problems
                plan.notes += describe_masks(plan.masks, recipe, entries)

    if problems:
        raise RecipeError(source, problems, exit_code=3 if input_problems == len(problems) else 2)
    assert plan is not None
    return plan


def known_parameters() -> frozenset[str]:
    """Every parameter name some registered method declares: on a model, one that its
    method does not use is ignored with a warning (mergekit's slerp and model_stock recipes
    carry `weight:`), while a name no method knows stays an error (a typo, most often)."""
    return frozenset(p.name for _, m in METHODS.items() for p in m.params)


def _model_entries(recipe: MergeRecipe, method: MergeMethod | None, base_dir: Path) -> list[tuple[str, InputModel]]:
    """The method's input models with their recipe roles (see `input_models`).

    mergekit recipes list the base model among `models:` too (often without parameters); for
    methods built on the base (task vectors, slerp, model_stock) that entry is the base
    itself, not another input, and is left out, as mergekit does.
    """
    entries = input_models(recipe)
    if method is None or not method.needs_base or recipe.base_model is None:
        return entries
    base = resolve_model_path(recipe.base_model, base_dir).resolve()
    return [(r, m) for r, m in entries if not (r.startswith("models[") and resolve_model_path(m.model, base_dir).resolve() == base)]


def _skipped_base_notes(recipe: MergeRecipe, entries: list[tuple[str, InputModel]]) -> list[str]:
    kept = {r for r, _ in entries}
    return [
        f"{role.removesuffix('.model')} is the base model: {recipe.merge_method} uses it as the base, not as another input"
        + ("; its parameters are not used" if m.parameters else "")
        for role, m in input_models(recipe)
        if role not in kept
    ]


def _inputs(recipe: MergeRecipe, entries: list[tuple[str, InputModel]]) -> list[tuple[str, str]]:
    pairs = [("base_model", recipe.base_model)] if recipe.base_model is not None else []
    return pairs + [(role, m.model) for role, m in entries]


def _check_method_shape(recipe: MergeRecipe, method: MergeMethod, n: int) -> list[str]:
    problems = []
    if method.needs_base and recipe.base_model is None:
        problems.append(f"base_model: {method.name} needs a base model")
    if not method.roles and (recipe.ability is not None or recipe.languages):
        problems.append(f"ability/languages: {method.name} takes 'models:'; 'ability:' and 'languages:' are for merge_method: maet")
    if method.roles and recipe.models:
        problems.append(f"models: {method.name} takes 'ability:' and 'languages:' instead of 'models:'")
    if method.check is not None:
        problems += method.check(recipe)
    if n < method.min_models:
        problems.append(f"models: {method.name} needs at least {method.min_models} model(s), got {n}")
    if method.max_models is not None and n > method.max_models:
        problems.append(f"models: {method.name} takes at most {method.max_models} model(s), got {n}")
    return problems


def _open(role: str, spec: str, base_dir: Path) -> Source:
    """Open a model reference: a folder, or `MODEL+LORA` read through the adapter (`io.lora`).

    Raises:
        UsageError: a reference with more than one '+'.
        InputError: the model or adapter cannot be used.
    """
    try:
        model, adapter = split_model_reference(spec)
    except ValueError as e:
        raise UsageError(str(e)) from None
    ckpt = Checkpoint.open(resolve_model_path(model, base_dir), spec=model)
    if ckpt.kind == Kind.DELTA:
        raise InputError(f"{ckpt.path}: is a delta checkpoint, not a model", hint="give the fine-tuned model itself")
    if adapter is not None:
        ckpt = LoraCheckpoint.wrap(ckpt, resolve_model_path(adapter, base_dir))
    return Source(role=role, spec=spec, checkpoint=ckpt)


def _check_config(reference: Source, method: MergeMethod) -> list[str]:
    """A model output takes the reference's config.json; without one it could not be loaded."""
    if method.output_kind != Kind.MODEL or reference.checkpoint.config is not None:
        return []
    file = reference.checkpoint.path / "config.json"
    return [
        f"{reference.role}: {file} is missing (the merged model takes its config from {reference.role}, and could not be loaded without one)"
    ]


def _vocabulary(
    recipe: MergeRecipe, method: MergeMethod, base: Source | None, models: list[Source], base_dir: Path
) -> tuple[Vocabulary | None, list[str]]:
    """The output vocabulary of a `tokenizer_source` (or `tokenizer:`) recipe, or the problem that prevents it."""
    block = recipe.tokenizer
    source = block.source if block is not None else recipe.tokenizer_source
    key = "tokenizer.source" if block is not None else "tokenizer_source"
    if source is None:
        return None, []
    if method.statistics or method.roles:
        return None, [f"{key}: not supported with {method.name}"]
    sources = ([base] if base else []) + models
    tokens, pad = (block.tokens, block.pad_to_multiple_of) if block is not None else (None, None)
    try:
        return plan_vocabulary(source, [s.checkpoint for s in sources], base is not None, base_dir, tokens, pad), []
    except TokenSourceError as e:  # names its key already
        return None, [str(e)]
    except NeurolocError as e:
        return None, [f"{key}: {e}"]


def _use_vocabulary(plan: MergePlan, vocab: Vocabulary) -> None:
    """Give the token-indexed steps the output vocabulary's row count, and config.json its size."""
    plan.vocabulary = vocab
    for i, step in enumerate(plan.steps):
        if step.name in vocab.tensors:
            shape = (vocab.rows, *step.out.shape[1:])
            plan.steps[i] = replace(step, out=OutTensor(step.name, shape, step.out.dtype), vocab=True)
    plan.config_updates["vocab_size"] = vocab.rows
    padding = f"; {vocab.rows - vocab.size} padding rows" if vocab.rows > vocab.size else ""
    plan.notes.append(
        f"tokenizer_source {vocab.source}: {vocab.size} tokens; {sum(f is not None for f in vocab.fill)} that some model lacks{padding}"
    )


def _check_tensors(reference: Source, models: list[Source], on_missing: str, vocab: Vocabulary | None = None) -> list[str]:
    """Missing, extra and mismatched tensors of each model against the reference (token-indexed
    tensors may differ in their row count when the recipe maps them onto one vocabulary)."""
    problems: list[str] = []
    for src in models:
        if src is reference:
            continue
        diff = compare_tensors(reference.checkpoint, src.checkpoint)
        reshaped = [(n, a, b) for n, a, b in diff.reshaped if not (vocab and n in vocab.tensors and tuple(a)[1:] == tuple(b)[1:])]
        issues = [f"tensor {n} has shape {theirs}, {reference.role} has {ours}" for n, theirs, ours in reshaped]
        if on_missing == "error":
            issues += [
                f"tensor {n} is missing (present in {reference.role}; set on_missing: base to keep the base value)" for n in diff.missing
            ]
        issues += [f"tensor {n} is not in {reference.role} (it would be dropped)" for n in diff.extra]
        if vocab is not None:  # its rows are mapped from each model's own: a stand-in has none
            issues += [
                f"tensor {n} is missing, and tokenizer_source maps its rows from every model" for n in diff.missing if n in vocab.tensors
            ]
        for text in issues[:_MAX_LISTED]:
            problems.append(f"{src.role} ({src.checkpoint.path}): {text}")
        if len(issues) > _MAX_LISTED:
            problems.append(f"{src.role} ({src.checkpoint.path}): ... and {len(issues) - _MAX_LISTED} more tensor problem(s)")
    return problems


def _open_side_files(plan: MergePlan, entries: list[tuple[str, InputModel]], base_dir: Path) -> list[str]:
    """Open every model's file of each file parameter, header-only, into `plan.side`, and check
    it against the model: its score, its tensors' names and shapes; note the merged tensors
    that a file leaves out (the method merges them without it). Returns the problems, each
    naming the recipe key and the file."""
    params = [p for p in plan.method.params if p.file is not None]
    if not params:
        return []
    if plan.vocabulary is not None:
        return [f"tokenizer_source: not supported with {plan.method.name} (its side files are indexed by the models' own rows)"]
    problems: list[str] = []
    tensors = plan.reference.checkpoint.tensors
    merged = [s.name for s in plan.steps if s.merge]
    for p in params:
        opened: list[SideInput] = []
        for (role, model), src in zip(entries, plan.models):
            label = role.removesuffix(".model")
            in_model = p.name in model.parameters
            key = f"{label}.parameters.{p.name}" if in_model else f"parameters.{p.name}"
            value = model.parameters[p.name] if in_model else plan.recipe.parameters.get(p.name)
            try:
                side = SideInput(key, Importance.open(_side_file(Path(str(value)), base_dir, p)))
            except NeurolocError as e:
                problems.append(f"{key}: {e}")
                continue
            found = _check_side_file(side, p, tensors)
            problems += [f"{key} ({side.path}): {text}" for text in found[:_MAX_LISTED]]
            if len(found) > _MAX_LISTED:
                problems.append(f"{key} ({side.path}): ... and {len(found) - _MAX_LISTED} more tensor problem(s)")
            fingerprint = side.file.meta.provenance.get("model_fingerprint")
            if fingerprint is not None and fingerprint != src.checkpoint.fingerprint:
                plan.warnings.append(f"{key}: {side.path} was computed on another checkpoint than {label} ({src.checkpoint.path})")
            opened.append(side)
        if len(opened) == len(plan.models):
            plan.side[p.name] = opened
            plan.notes += _side_coverage(p, opened, merged)
    return problems


def _side_file(path: Path, base_dir: Path, param: Param) -> Path:
    """The file a file parameter names: the file itself, or the one importance file of a
    folder (`DIR` or `DIR/importance/`, as `neuroloc locate` writes them).

    Raises:
        InputError: the path is missing, or the folder holds no importance file or several.
    """
    path = path if path.is_absolute() else base_dir / path
    if not path.is_dir():
        return path  # a missing file is refused by Importance.open, naming it
    folder = path / "importance" if (path / "importance").is_dir() else path
    found = sorted(folder.glob("*.safetensors"))
    if len(found) == 1:
        return found[0]
    if not found:
        raise InputError(f"{path}: no importance file in this folder", hint=param.file.hint if param.file else "")
    names = ", ".join(f.name for f in found[:_MAX_LISTED]) + (", ..." if len(found) > _MAX_LISTED else "")
    raise InputError(f"{path}: holds {len(found)} importance files ({names}); name one", hint=f"e.g. {found[0]}")


def _check_side_file(side: SideInput, param: Param, tensors: dict[str, TensorInfo]) -> list[str]:
    """The problems of one opened side file: a score the method cannot use, a tensor the model
    lacks, a shape that does not fit its model tensor."""
    assert param.file is not None
    spec = param.file
    if side.file.meta.score not in spec.scores:
        hint = f" ({spec.hint})" if spec.hint else ""
        return [f"holds {side.file.meta.score!r} scores, not {spec.what}{hint}"]
    problems = []
    for name, shape in side.shapes.items():
        info = tensors.get(name)
        if info is None:
            problems.append(f"tensor {name} is not in the model")
            continue
        expected = spec.shape(name, tuple(info.shape))
        if expected is None:
            problems.append(f"tensor {name} {list(info.shape)} cannot have {spec.what}")
        elif tuple(shape) != tuple(expected):
            problems.append(f"tensor {name} has shape {list(shape)}, expected {list(expected)} for the model's {list(info.shape)}")
    return problems


def _side_coverage(param: Param, opened: list[SideInput], merged: list[str]) -> list[str]:
    """A note on the merged tensors that not every model's file covers: the method merges
    those without their side tensors (see the method's own description)."""
    missing = [n for n in merged if not all(n in s.shapes for s in opened)]
    if not missing:
        return []
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    return [
        f"{param.name}: {len(missing)} of {len(merged)} merged tensors are not in every model's {param.name} file "
        f"({missing[0]}{more}); {'it gets' if len(missing) == 1 else 'they get'} the weighted average of the models"
    ]


def _plan(
    recipe: MergeRecipe, source: str, method: MergeMethod, base: Source | None, models: list[Source], model_params: list[dict]
) -> MergePlan:
    reference = base or models[0]
    compute = DTYPE_NAMES[recipe.dtype or "float32"]
    fixed_out = fixed_out_dtype(recipe, method)
    num_layers = reference.checkpoint.num_layers
    steps = []
    for name, info in reference.checkpoint.tensors.items():
        present = tuple(name in m.checkpoint.tensors for m in models)
        steps.append(make_step(name, info, layer_position(name, num_layers), fixed_out, present))
    resolver = ParameterResolver(method.params, recipe.parameters, model_params)
    return MergePlan(recipe, source, method, base, models, steps, compute, num_layers, resolver)


def fixed_out_dtype(recipe: MergeRecipe, method: MergeMethod) -> torch.dtype | None:
    """The output dtype of every floating tensor, or None to keep each input tensor's:
    `out_dtype`, else `dtype` (mergekit's rule), else float32 for delta outputs."""
    name = recipe.out_dtype or recipe.dtype
    if name is None and method.output_kind == Kind.DELTA:
        name = "float32"  # a delta in bf16 would lose most of its bits
    return DTYPE_NAMES[name] if name else None


def make_step(
    out_name: str,
    info: TensorInfo,
    t: float,
    fixed_out: torch.dtype | None,
    present: tuple[bool, ...],
    origin: tuple[int, str] | None = None,
) -> Step:
    """The step for one output tensor; integer and boolean buffers are copied, not merged."""
    floating = info.torch_dtype.is_floating_point
    dtype = (fixed_out or info.torch_dtype) if floating else info.torch_dtype
    return Step(out_name, OutTensor(out_name, info.shape, dtype), t, floating, present, origin=origin)


def _check_resolution(plan: MergePlan) -> list[str]:
    """Every tensor must get a value for every required parameter (filters can miss), and
    values the method can use (`MergeMethod.check_values`): one problem per kind, naming the
    first tensor and how many more share it."""
    found: dict[str, list[str]] = {}
    for step in plan.steps:
        if not step.merge:
            continue
        try:
            whole, per_model = plan.resolver.at(step.name, step.t)
        except ValueError as e:
            return [f"parameters: {e} (add an entry without 'filter' as the default)"]
        problem = plan.method.check_values(whole, per_model) if plan.method.check_values else None
        if problem is not None:
            found.setdefault(problem, []).append(step.name)
    return [
        f"parameters: at tensor {names[0]}{f' (and {len(names) - 1} more)' if len(names) > 1 else ''}: {problem}"
        for problem, names in found.items()
    ]


def plan_delta(base: Path, tuned: Path, out_dtype: str | None = None) -> MergePlan:
    """Plan `tuned − base` for every tensor, written as a delta checkpoint (float32 unless
    `out_dtype` says otherwise)."""
    from neuroloc_cli.io.checkpoint import check_model_folder

    for folder in (base, tuned):  # a plain message for a plain command line, not recipe roles
        check_model_folder(folder)
    recipe = MergeRecipe(merge_method="delta", base_model=str(base), models=[InputModel(model=str(tuned))], out_dtype=out_dtype)
    return build_plan(recipe, Path.cwd(), "delta")


def plan_ablation(model: Path, mask: Path, mode: str, scale: float | None = None) -> MergePlan:
    """Plan `neuroloc ablate`: the `ablate_MODE` method on `model`, restricted to `mask` (a
    recipe written in code, so that `--dry-run` and provenance show it like any merge).

    Raises:
        UsageError: an unknown mode, or `scale` without `noise`.
        InputError: the model folder is missing.
        RecipeError: the model or mask cannot be used (as for any recipe).
    """
    from neuroloc_cli.io.checkpoint import check_model_folder
    from neuroloc_cli.methods.ablate import MODES

    if mode not in MODES:
        raise UsageError(f"--mode must be one of {', '.join(MODES)}, got {mode!r}")
    if scale is not None and mode != "noise":
        raise UsageError("--scale applies to --mode noise only")
    check_model_folder(model)
    params = {"scale": scale} if scale is not None else {}
    recipe = MergeRecipe(merge_method=f"ablate_{mode}", base_model=str(model), mask=str(mask), parameters=params)
    return build_plan(recipe, Path.cwd(), "ablate")


def describe_plan(plan: MergePlan) -> dict:
    """The plan as a JSON-able document (what `recipe validate` and `--dry-run` print)."""
    steps = []
    for step in plan.steps:
        whole, per_model = plan.resolver.at(step.name, step.t) if step.merge else ({}, [])
        steps.append(
            {
                "tensor": step.name,
                "shape": list(step.out.shape),
                "out_dtype": str(step.out.dtype).removeprefix("torch."),
                "merge": step.merge,
                **({"source": {"model": plan.models[step.origin[0]].role, "tensor": step.origin[1]}} if step.origin else {}),
                "parameters": whole,
                "model_parameters": per_model,
            }
        )
    return {
        "method": plan.method.name,
        "output_kind": plan.method.output_kind,
        "compute_dtype": str(plan.compute_dtype).removeprefix("torch."),
        "num_layers": plan.num_layers,
        "inputs": [
            {
                "role": s.role,
                "path": str(s.checkpoint.path),
                **({"lora": str(s.adapter)} if s.adapter is not None else {}),
                "tensors": len(s.checkpoint.tensors),
                "parameters": s.checkpoint.num_parameters,
            }
            for s in plan.sources
        ],
        "tensors": len(plan.steps),
        "out_bytes": plan.out_bytes,
        "side_files": {
            name: [{"key": s.key, "path": str(s.path), "tensors": len(s.shapes)} for s in files] for name, files in plan.side.items()
        },
        "notes": plan.notes,
        "warnings": plan.warnings,
        "steps": steps,
    }
