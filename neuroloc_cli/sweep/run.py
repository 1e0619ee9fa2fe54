"""`neuroloc sweep`: merge a recipe at many settings and evaluate each, with no checkpoint on
disk per point.

Every point is the recipe with the swept keys set (`recipe.overrides`), planned and checked
like `neuroloc merge` plans it, merged by the engine's own loop (`merge.run.merge_tensors`)
into one live model (`sweep.live`), its inputs read from disk once and kept, and scored by
the evaluator `neuroloc eval` uses (`eval.runner.Evaluator`) on that model: a point's
numbers are those of `merge` to disk and `eval` of the folder.

The sweep folder holds `sweep.json` (what was asked), `results.jsonl` (one line per finished
point, appended whole), `results.csv`, `best.yaml` (the winning recipe, paths absolute, for
`neuroloc merge`), `objective.png` and, with `write_best`, the winner's checkpoint `best/`.
Run again with the same arguments, a sweep skips its finished points.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from neuroloc_cli.errors import OutputError, UsageError
from neuroloc_cli.io.commit import note_written
from neuroloc_cli.io.output import atomic_file
from neuroloc_cli.recipe.overrides import Assignment, RecipeSource, apply_assignments, with_absolute_paths
from neuroloc_cli.sweep.objective import Objective, default_objective, parse_objective, resolve_default
from neuroloc_cli.sweep.space import GridAxis, Point, SearchRange, bounds_points, check_axes, grid_points, next_trial

SWEEP_FILE, RESULTS_FILE, CSV_FILE, BEST_RECIPE, PLOT_FILE, BEST_MODEL = (
    "sweep.json",
    "results.jsonl",
    "results.csv",
    "best.yaml",
    "objective.png",
    "best",
)


@dataclass(frozen=True)
class SweepSpec:
    """What `neuroloc sweep` was asked for.

    Attributes:
        recipe: the recipe as read (`recipe.overrides.read_recipe_source`).
        grid / search: the swept keys (one of the two is empty).
        trials: points a search draws.
        seed: seeds the search's sampler (merges use the recipe's `random_seed`).
        sampler: "tpe" or "random".
        eval_options: `eval.runner.build_request`'s keywords, from `--eval KEY=VALUE`.
        objective: `--objective`, or None for the default (see `objective.default_objective`).
        minimize: lower objective is better.
        sets: `--set` assignments made before every point's own.
    """

    recipe: RecipeSource
    grid: list[GridAxis] = field(default_factory=list)
    search: list[SearchRange] = field(default_factory=list)
    trials: int = 20
    seed: int = 0
    sampler: str = "tpe"
    eval_options: dict[str, Any] = field(default_factory=dict)
    objective: str | None = None
    minimize: bool = False
    sets: list[Assignment] = field(default_factory=list)

    def identity(self) -> dict[str, Any]:
        """What makes two sweeps the same sweep (`sweep.json`; a restart must match it)."""
        return {
            "recipe": apply_assignments(self.recipe.document, self.sets, self.recipe.name),
            "recipe_folder": str(self.recipe.folder),
            "grid": [a.describe() for a in self.grid],
            "search": [r.describe() for r in self.search],
            "trials": self.trials if self.search else None,
            "seed": self.seed if self.search else None,
            "sampler": self.sampler if self.search else None,
            "eval": {k: _jsonable(v) for k, v in sorted(self.eval_options.items())},
            "objective": self.objective,
            "minimize": self.minimize,
        }

    def assignments(self, point: Point) -> list[Assignment]:
        return [*self.sets, *(Assignment(k, v) for k, v in point.items())]

    @property
    def keys(self) -> list[str]:
        return [a.key for a in self.grid] + [r.key for r in self.search]


@dataclass
class PointResult:
    """One finished point: its values, objective, every metric and how long it took."""

    index: int
    values: Point
    objective: float
    metrics: dict[str, dict[str, float | None]]
    seconds: float
    objective_text: str = ""
    """The objective as resolved (the default's metric is known only once a point is scored)."""

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "values": self.values,
            "objective": _finite(self.objective),
            "objective_text": self.objective_text,
            "metrics": self.metrics,
            "seconds": round(self.seconds, 3),
        }

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> PointResult:
        objective = doc["objective"]
        value = math.nan if objective is None else float(objective)
        return cls(doc["index"], doc["values"], value, doc["metrics"], float(doc["seconds"]), doc.get("objective_text", ""))


@dataclass
class SweepResult:
    """Every point, sorted best first, and where the files are."""

    spec: SweepSpec
    folder: Path
    points: list[PointResult]
    objective: str
    resumed: int
    memory: dict[str, int]
    files: dict[str, str]

    @property
    def best(self) -> PointResult | None:
        return self.points[0] if self.points and math.isfinite(self.points[0].objective) else None

    def to_json(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "objective": self.objective,
            "minimize": self.spec.minimize,
            "keys": self.spec.keys,
            "points": [p.to_json() for p in self.points],
            "best": self.best.to_json() if self.best else None,
            "resumed": self.resumed,
            "memory_bytes": self.memory,
            "files": self.files,
        }


# --- the evaluation options -------------------------------------------------------------------


def parse_eval_options(specs: list[str]) -> dict[str, Any]:
    """`--eval KEY=VALUE` → `build_request` keywords. KEY is an option of `neuroloc eval`
    (`tasks`, `ppl`, `limit`, `task-option`, `translate`, `dtype`, …); repeatable options
    (`ppl`, `task-option`, `include-path`) may be given more than once.

    Raises:
        UsageError: an unknown key, a value of the wrong type, a single option given twice.
    """
    from neuroloc_cli.eval.runner import build_request

    hints = typing.get_type_hints(build_request)
    out: dict[str, Any] = {"bootstrap_iters": 0}  # a sweep sorts by values; stderrs only cost time
    given: set[str] = set()
    for spec in specs:
        key, sep, value = spec.partition("=")
        name = key.strip().replace("-", "_")
        if not sep or name in ("", "models") or name not in hints or name == "return":
            known = ", ".join(k.replace("_", "-") for k in hints if k not in ("models", "return"))
            raise UsageError(f"--eval {spec!r}: expected KEY=VALUE with KEY one of {known}")
        kind = hints[name]
        args = [a for a in typing.get_args(kind) if a is not type(None)] or [kind]
        target = args[0]
        if typing.get_origin(target) is list:
            item = typing.get_args(target)[0]
            out.setdefault(name, []).append(item(value))
            continue
        if name in given:
            raise UsageError(f"--eval {spec!r}: {key} is given twice")
        given.add(name)
        try:
            out[name] = _typed(target, value)
        except ValueError:
            raise UsageError(f"--eval {spec!r}: {key} needs a {target.__name__}") from None
    return out


def _typed(kind: type, value: str) -> Any:
    if kind is bool:
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ValueError(value)
        return value.lower() in ("true", "1", "yes")
    return kind(value)


# --- planning ---------------------------------------------------------------------------------


@dataclass
class SweepPlan:
    """A sweep checked before anything is loaded: the grid's points (or a search's bounds)
    planned as merges, and the memory the run will hold."""

    spec: SweepSpec
    points: list[Point]
    first: Any  # MergePlan of the first point
    request: Any  # EvalRequest
    objective_tasks: list[str]
    memory: dict[str, int]

    def to_json(self) -> dict[str, Any]:
        return {
            "dry_run": True,
            "method": self.first.method.name,
            "keys": self.spec.keys,
            "points": len(self.points) if self.spec.grid else self.spec.trials,
            "grid": self.points if self.spec.grid else None,
            "tasks": self.objective_tasks,
            "memory_bytes": self.memory,
        }


def plan_sweep(spec: SweepSpec) -> SweepPlan:
    """Check everything that can be checked from headers: each grid point's recipe (a value
    the recipe cannot take fails here, naming the point), the merge's shape, the evaluation
    request and the objective's terms.

    Raises:
        UsageError / RecipeError / InputError: as `neuroloc merge --dry-run` and `neuroloc eval`.
    """
    import torch

    from neuroloc_cli.eval.runner import build_request, check_request
    from neuroloc_cli.merge.plan import build_plan
    from neuroloc_cli.sweep.live import cache_estimate, load_dtype, refuse_unsweepable

    check_axes(spec.grid, spec.search)
    points = grid_points(spec.grid) if spec.grid else bounds_points(spec.search)
    plans = []
    for point in points:
        recipe = spec.recipe.recipe(spec.assignments(point))
        plans.append(build_plan(recipe, spec.recipe.folder, f"{spec.recipe.name} at {_describe(point)}"))
    first = plans[0]
    refuse_unsweepable(first)
    references = {p.reference.checkpoint.path.resolve() for p in plans}
    if len(references) > 1:
        raise UsageError("the swept keys change the reference model (the base or first model); sweep parameters, not inputs")
    request = build_request([first.reference.checkpoint.path], **spec.eval_options)
    check_request(request)
    dtypes = {load_dtype(p, request.dtype) for p in plans}
    if len(dtypes) > 1:  # one live model serves every point
        raise UsageError(
            "the swept keys change the dtype the merged model is evaluated in "
            f"({', '.join(sorted(str(d).removeprefix('torch.') for d in dtypes))})",
            hint="sweep one output dtype at a time, or fix it with --eval dtype=…",
        )
    if spec.minimize and spec.objective is None:
        raise UsageError("--minimize needs --objective", hint="the default objective is already oriented so that higher is better")
    tasks = [t.name for t in request.tasks.local] + list(request.tasks.named)
    if request.translation is not None:
        tasks.append(request.translation.task_name)
    if spec.objective is not None:
        parse_objective(spec.objective.lstrip("-"), tasks)
    dtype = load_dtype(first, request.dtype)
    live = sum(i.numel for i in first.reference.checkpoint.tensors.values() if i.torch_dtype.is_floating_point)
    memory = {"live_model": live * torch.empty((), dtype=dtype).element_size(), "input_cache": cache_estimate(first)}
    memory["total"] = memory["live_model"] + memory["input_cache"]
    return SweepPlan(spec, points if spec.grid else [], first, request, tasks, memory)


def _describe(point: Point) -> str:
    return ", ".join(f"{k}={v}" for k, v in point.items())


# --- the sweep folder -------------------------------------------------------------------------


def open_folder(folder: Path, spec: SweepSpec, overwrite: bool, inputs: list[Path]) -> list[PointResult]:
    """Create the sweep folder, or reopen one made by the same sweep and return its finished
    points (a last line cut short by a kill is dropped).

    Raises:
        OutputError: the folder holds something else, or another sweep (unless `overwrite`,
            which replaces only a sweep folder), or overlaps an input.
    """
    import shutil

    from neuroloc_cli.io.output import check_output_path

    identity = _identity_text(spec)
    marker = folder / SWEEP_FILE
    if folder.exists():
        if not marker.is_file():
            raise OutputError(f"{folder}: exists and is not a sweep folder (no {SWEEP_FILE})", hint="give a new folder")
        if marker.read_text() != identity:
            if not overwrite:
                raise OutputError(
                    f"{folder}: holds a different sweep (another recipe, keys, values or evaluation)",
                    hint="give another folder, or --overwrite to start this one afresh",
                )
            shutil.rmtree(folder)
        elif overwrite:
            shutil.rmtree(folder)
    if not folder.exists():
        check_output_path(folder, inputs, overwrite=False)
        folder.mkdir(parents=True)
        _write_text(marker, identity, "sweep description")
        return []
    return _read_results(folder / RESULTS_FILE)


def _identity_text(spec: SweepSpec) -> str:
    return json.dumps({"neuroloc_sweep": 1, **spec.identity()}, indent=1, sort_keys=True) + "\n"


def _read_results(path: Path) -> list[PointResult]:
    if not path.exists():
        return []
    data = path.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):  # killed mid-line: keep the whole lines only
        with open(path, "r+b") as f:
            f.truncate(len(complete))
    return [PointResult.from_json(json.loads(line)) for line in complete.decode().splitlines() if line.strip()]


def _append(path: Path, result: PointResult) -> None:
    """One line, written with one `write` on an append-only descriptor and synced: a kill
    leaves either the whole line or a cut one that the next run drops."""
    line = (json.dumps(result.to_json(), sort_keys=True) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    note_written(path)


# --- running ----------------------------------------------------------------------------------


def run_sweep(
    plan: SweepPlan,
    folder: Path,
    *,
    overwrite: bool = False,
    write_best: bool = False,
    on_point: Callable[[PointResult, PointResult | None, int, int], None] | None = None,
    verbose: bool = False,
) -> SweepResult:
    """Run (or resume) the sweep `plan` into `folder`.

    Args:
        on_point: called after each point with (the point, the best so far, points done, total).
        verbose: let lm-eval and transformers log to stderr.

    Raises:
        OutputError: the folder is unusable (see `open_folder`).
        UsageError: the objective names a metric the evaluation does not give.
    """
    from neuroloc_cli.eval.runner import Evaluator
    from neuroloc_cli.merge.plan import build_plan
    from neuroloc_cli.merge.run import merge_tensors
    from neuroloc_cli.sweep.live import InputCache, LiveModel, load_dtype

    spec = plan.spec
    inputs = plan.first.input_paths()
    finished = open_folder(folder, spec, overwrite, inputs)
    resumed = len(finished)
    total = len(plan.points) if spec.grid else spec.trials
    evaluator = Evaluator(plan.request, verbose)
    reference = evaluator.models[0]
    cache, memo = InputCache(), {}
    live = lm = None  # loaded for the first point to run (a finished sweep loads nothing)
    objective_text = spec.objective
    objective: Objective | None = None
    results = list(finished)
    if finished and objective_text is None:  # the one the first run resolved (metrics are saved sorted)
        objective_text = finished[0].objective_text or resolve_default(
            default_objective(plan.objective_tasks, _ppl_tasks(plan.request)), _metrics_as_tasks(finished[0])
        )
    if objective_text is not None:
        objective = parse_objective(objective_text, plan.objective_tasks)
    for i in range(total):
        if i < len(finished):
            expected = plan.points[i] if spec.grid else None
            if expected is not None and finished[i].values != expected:
                raise OutputError(
                    f"{folder / RESULTS_FILE}: point {i} is {finished[i].values}, the grid says {expected}",
                    hint="--overwrite starts afresh",
                )
            continue
        point = (
            plan.points[i]
            if spec.grid
            else next_trial(spec.search, [(r.values, r.objective) for r in results], i, spec.seed, spec.sampler, not spec.minimize)
        )
        start = time.perf_counter()
        if live is None:
            live = LiveModel(plan.first, plan.request.device, load_dtype(plan.first, plan.request.dtype))
            lm = evaluator.wrap(live.model, live.folder)
        merge_plan = cache.attach(
            build_plan(spec.recipe.recipe(spec.assignments(point)), spec.recipe.folder, f"{spec.recipe.name} at {_describe(point)}")
        )
        live.start()
        merge_tensors(merge_plan, live.write, stats_memo=memo)
        live.check_complete()
        cache.release_files()  # every input is in memory now
        scored, _ = evaluator.score(replace(reference, label=f"point {i}", fingerprint=_point_fingerprint(spec, point)), lm=lm)
        if objective is None:
            objective_text = resolve_default(default_objective(plan.objective_tasks, _ppl_tasks(plan.request)), scored.tasks)
            objective = parse_objective(objective_text, plan.objective_tasks)
        metrics = {task: {m: v.get("value") for m, v in ms.items()} for task, ms in scored.tasks.items()}
        result = PointResult(i, point, objective.value(scored.tasks), metrics, time.perf_counter() - start, objective_text)
        _append(folder / RESULTS_FILE, result)
        results.append(result)
        if on_point is not None:
            on_point(result, _sorted(results, spec.minimize)[0], len(results), total)
    assert objective_text is not None
    ranked = _sorted(results, spec.minimize)
    files = _write_reports(folder, spec, ranked, objective_text, write_best)
    live_bytes = live.bytes if live is not None else 0
    memory = {"live_model": live_bytes, "input_cache": cache.bytes, "total": live_bytes + cache.bytes}
    return SweepResult(spec, folder, ranked, objective_text, resumed, memory, files)


def _ppl_tasks(request) -> list[str]:
    return [t.name for t in request.tasks.perplexity]


def _metrics_as_tasks(result: PointResult) -> dict[str, dict[str, dict[str, Any]]]:
    return {t: {m: {"value": v} for m, v in ms.items()} for t, ms in result.metrics.items()}


def _sorted(results: list[PointResult], minimize: bool) -> list[PointResult]:
    """Best first; NaN objectives last; ties in point order."""

    def key(r: PointResult):
        bad = not math.isfinite(r.objective)
        return (bad, 0.0 if bad else (r.objective if minimize else -r.objective), r.index)

    return sorted(results, key=key)


def _point_fingerprint(spec: SweepSpec, point: Point) -> str:
    doc = apply_assignments(spec.recipe.document, spec.assignments(point), spec.recipe.name)
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


def best_recipe_text(spec: SweepSpec, best: PointResult, objective: str) -> str:
    """The winning point's recipe as YAML that `neuroloc merge` runs from any folder."""
    import yaml

    from neuroloc_cli.methods import METHODS

    doc = apply_assignments(spec.recipe.document, spec.assignments(best.values), spec.recipe.name)
    method = METHODS.get(doc["merge_method"])  # the sweep's plans checked the name
    files = {p.name for p in method.params if p.file is not None}
    doc = with_absolute_paths(doc, spec.recipe.folder, extra_keys=files)
    head = [
        f"# The best point of a neuroloc sweep of {spec.recipe.name}: {_describe(best.values)}",
        f"# objective {objective} = {best.objective:.6g} ({'lower' if spec.minimize else 'higher'} is better)",
        "# Run: neuroloc merge best.yaml -o OUT_DIR",
    ]
    return "\n".join(head) + "\n" + yaml.safe_dump(doc, sort_keys=False, allow_unicode=True)


def _write_reports(folder: Path, spec: SweepSpec, ranked: list[PointResult], objective: str, write_best: bool) -> dict[str, str]:
    from neuroloc_cli.sweep.report import csv_text, plot_png

    files = {"results": str(folder / RESULTS_FILE)}
    _write_text(folder / CSV_FILE, csv_text(ranked, spec.keys), "results table")
    files["csv"] = str(folder / CSV_FILE)
    best = ranked[0] if ranked and math.isfinite(ranked[0].objective) else None
    if best is not None:
        _write_text(folder / BEST_RECIPE, best_recipe_text(spec, best, objective), "recipe")
        files["best_recipe"] = str(folder / BEST_RECIPE)
    if plot_png(folder / PLOT_FILE, ranked, spec.keys, objective):
        files["plot"] = str(folder / PLOT_FILE)
    if write_best and best is not None:
        files["best_model"] = str(_write_best_model(folder, spec, best))
    return files


def _write_best_model(folder: Path, spec: SweepSpec, best: PointResult) -> Path:
    from neuroloc_cli.merge.plan import build_plan
    from neuroloc_cli.merge.run import run_merge

    plan = build_plan(spec.recipe.recipe(spec.assignments(best.values)), spec.recipe.folder, spec.recipe.name)
    out = folder / BEST_MODEL
    run_merge(plan, out, overwrite=out.exists(), command="sweep --write-best")
    return out


def _write_text(path: Path, text: str, what: str) -> None:
    with atomic_file(path, what) as tmp:
        tmp.write_text(text)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _jsonable(v: Any) -> Any:
    if isinstance(v, Path):
        return str(v)
    if isinstance(v, list):
        return [_jsonable(x) for x in v]
    return v
