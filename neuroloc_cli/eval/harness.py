"""lm-eval tasks through its Python API: `simple_evaluate` on an already loaded model.

The task index is built once per command; tasks are loaded here, one spec at a time, so
that a dataset that cannot be loaded becomes one error naming its task (lm-eval would raise
a bare `ConnectionError` from deep inside `simple_evaluate`).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroloc_cli.errors import InputError, UsageError, did_you_mean
from neuroloc_cli.eval.context import DEFAULT_GEN_TOKS
from neuroloc_cli.eval.offline import is_missing_dataset, missing_dataset_error
from neuroloc_cli.eval.specs import TaskRequest, read_jsonl
from neuroloc_cli.eval.task_names import builtin_folder

# lm-eval's defaults, restated so that results can record them.
DEFAULT_SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}


@dataclass(frozen=True)
class HarnessSettings:
    """The lm-eval settings that change numbers; all are recorded in the results.

    Attributes:
        limit: at most this many documents per task (None: all).
        num_fewshot: override of every task's few-shot count (None: the tasks' own).
        max_gen_toks: override of generate-until tasks' generation length (None: the tasks' own,
            lowered to fit the model, see `fit_generation`).
        bootstrap_iters: bootstrap resamples for stderrs of non-mean metrics (lm-eval's default).
        seeds: lm-eval's four seeds.
    """

    limit: int | None = None
    num_fewshot: int | None = None
    max_gen_toks: int | None = None
    bootstrap_iters: int = 100000
    seeds: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SEEDS))


# Keys of a task YAML that lm-eval takes out before it builds the TaskConfig.
_STRUCTURAL_KEYS = {"group", "tag", "task_list", "class"}
# `datasets` builders that read the files named in `data_files` from the local disk.
_LOCAL_BUILDERS = {"json", "csv", "text", "parquet", "arrow"}


@dataclass
class TaskResults:
    """lm-eval's output for one model: per-task metrics, samples, document counts, few-shot counts."""

    metrics: dict[str, dict[str, dict[str, Any]]]
    samples: dict[str, list[dict[str, Any]]]
    n_samples: dict[str, int]
    n_shot: dict[str, int]


def task_manager(request: TaskRequest, include_paths: list[Path]):
    """An lm-eval TaskManager that knows every name `request` uses (`task_names.check_task_names`
    has already refused the names no YAML mentions).

    Indexing lm-eval's thousands of built-in YAMLs takes 10–20 seconds, so names are looked
    up first in the --include-path folders, then in the built-in folders that a text scan says
    define them; the full index is built only when that fails (groups, tags, wildcards).

    Raises:
        UsageError: a name is no task, group or tag; a task YAML of the user's has an unknown field.
        InputError: a task YAML of the user's names a data file that is missing or not JSON lines.
    """
    paths = tuple(str(p.resolve()) for p in include_paths)
    manager = _manager(paths, False)
    if not all(n in manager.all_tasks or manager.match_tasks([n]) for n in request.named):
        manager = _builtin_manager(request.named, paths)
    for name in request.named:
        if name not in manager.all_tasks and not manager.match_tasks([name]):
            raise UsageError(
                f"--tasks: unknown task {name!r}{did_you_mean(name, manager.all_tasks)}", hint="--include-path DIR adds your own task YAMLs"
            )
        yaml_file = user_yaml(manager, name, include_paths)
        if yaml_file is not None and manager.task_index[name].kind.name == "TASK":  # not a group
            check_user_task(yaml_file, manager.task_index[name].cfg or {})
    return manager


def _builtin_manager(names: tuple[str, ...], paths: tuple[str, ...]):
    # Fast path: index only the built-in folders that define the names asked for (later
    # paths win in lm-eval, so the user's folders come last). Only for plain tasks: a group
    # or tag may gather tasks from other folders.
    located = builtin_folder().defining_file
    if all(n in located for n in names):
        dirs = tuple(sorted({str(located[n].parent) for n in names}))
        manager = _manager(dirs + paths, False)
        if all(n in manager.all_subtasks for n in names):
            return manager
    return _manager(paths, True)


@functools.lru_cache(maxsize=4)
def _manager(paths: tuple[str, ...], defaults: bool):
    # Cached: the index of built-in tasks is costly and does not change within a process.
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=defaults, include_path=list(paths) or None)


def user_yaml(manager, name: str, include_paths: list[Path]) -> Path | None:
    """The --include-path YAML that defines task or group `name`; None for a built-in one or a tag."""
    entry = manager.task_index.get(name)
    file = Path(entry.yaml_path).resolve() if entry is not None and entry.yaml_path else None
    if file is not None and any(file.is_relative_to(p.resolve()) for p in include_paths):
        return file
    return None


def check_user_task(yaml_file: Path, cfg: dict[str, Any]) -> None:
    """Check a task YAML of the user's as lm-eval read it (its includes merged): every field is
    one lm-eval knows, and every local data file is there and, for JSON lines, parses.

    Raises:
        UsageError: an unknown field (with the closest known one).
        InputError: a data file is missing, or a line of a .jsonl data file is not a JSON object.
    """
    from lm_eval.api.task import TaskConfig

    if "class" in cfg:  # a Python task, which takes what fields it likes
        return
    known = {f.name for f in dataclasses.fields(TaskConfig)} | _STRUCTURAL_KEYS
    for key in cfg:
        if key not in known:
            raise UsageError(
                f"{yaml_file}: unknown field {key!r}{did_you_mean(key, known)}",
                hint="see lm-eval's task guide for the fields of a task YAML",
            )
    if cfg.get("dataset_path") not in _LOCAL_BUILDERS:
        return
    for file in _data_files((cfg.get("dataset_kwargs") or {}).get("data_files")):
        path = Path(file).expanduser()
        if not path.is_file() and path.is_absolute():
            raise InputError(f"{yaml_file}: data file {file} does not exist")
        if not path.is_file():  # `datasets` reads a relative path from the current folder, not the YAML's
            raise InputError(
                f"{yaml_file}: data file {file} is not in the current folder {Path.cwd()}",
                hint="give an absolute path in dataset_kwargs.data_files",
            )
        if path.suffix == ".jsonl":
            read_jsonl(path, ())


def _data_files(spec: Any) -> list[str]:
    """The local paths in `dataset_kwargs.data_files` (a path, a list, or split → path(s));
    glob patterns and URLs are left to `datasets`."""
    values = spec.values() if isinstance(spec, dict) else [spec]
    files = [f for v in values for f in (v if isinstance(v, list) else [v]) if isinstance(f, str)]
    return [f for f in files if "://" not in f and not any(c in f for c in "*?[")]


@dataclass
class LoadedTasks:
    """One model's lm-eval tasks: what `simple_evaluate` is given, and every task by name
    (the members of groups included)."""

    top: list[Any] = field(default_factory=list)
    leaves: dict[str, Any] = field(default_factory=dict)


def load_tasks(manager, request: TaskRequest, include_paths: list[Path], online: bool) -> LoadedTasks:
    """Build the lm-eval Task/Group objects (this loads their datasets).

    Raises:
        InputError: a task's dataset cannot be loaded (offline, or not found).
        UsageError: a task YAML of the user's cannot be built (naming the file).
    """
    specs: list[tuple[str, Any]] = [(t.name, t.config()) for t in request.harness_local]
    for name in request.named:
        specs.extend((n, n) for n in (manager.match_tasks([name]) if "*" in name else [name]))
    out = LoadedTasks()
    for name, spec in specs:
        try:
            loaded = manager.load([spec])
        except Exception as e:  # lm-eval wraps nothing; classify by type
            yaml_file = user_yaml(manager, name, include_paths) if isinstance(spec, str) else None
            if yaml_file is not None:
                raise _user_task_error(yaml_file, name, e) from None
            if is_missing_dataset(e):
                raise missing_dataset_error(name, e, online) from None
            raise
        # the requested group alone: its subgroups are inside it, and lm-eval refuses a task twice
        groups = loaded.get("groups") or {}
        out.top.extend([groups[name]] if name in groups else groups.values() if groups else loaded["tasks"].values())
        out.leaves.update(loaded["tasks"])
    return out


def _user_task_error(yaml_file: Path, name: str, e: Exception) -> InputError | UsageError:
    reason = f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"
    if is_missing_dataset(e):
        return InputError(f"{yaml_file}: task {name!r}: its data cannot be loaded ({reason})")
    return UsageError(f"{yaml_file}: task {name!r} cannot be built ({reason})")


def fit_generation(leaves: dict[str, Any], settings: HarnessSettings, fit: int | None) -> tuple[dict[str, int], dict[str, int]]:
    """The generation length of every generate-until task in `leaves`, lowering to `fit`
    tokens the ones the user did not set (--max-gen-toks) whose own length is longer.

    Returns:
        task → tokens generated at most; task → the own length it replaced, for those lowered.
    """
    lengths: dict[str, int] = {}
    capped: dict[str, int] = {}
    for name, task in leaves.items():
        if task.get_config("output_type") != "generate_until":
            continue
        own = settings.max_gen_toks or (task.get_config("generation_kwargs") or {}).get("max_gen_toks", DEFAULT_GEN_TOKS)
        if not settings.max_gen_toks and fit is not None and own > fit:
            task.set_config(key="generation_kwargs", value={"max_gen_toks": fit}, update=True)
            capped[name], own = own, fit
        lengths[name] = own
    return lengths, capped


def run_tasks(lm, tasks: list, manager, settings: HarnessSettings) -> TaskResults:
    """Run `simple_evaluate` on `lm` (an lm-eval LM) for the loaded `tasks`."""
    import lm_eval

    gen_kwargs = {"max_gen_toks": settings.max_gen_toks} if settings.max_gen_toks else None
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=tasks,
        task_manager=manager,
        num_fewshot=settings.num_fewshot,
        limit=settings.limit,
        bootstrap_iters=settings.bootstrap_iters,
        gen_kwargs=gen_kwargs,
        log_samples=True,
        **settings.seeds,
    )
    metrics = {task: metrics_of(entry) for task, entry in out["results"].items()}
    n_samples = {task: int(v.get("effective", v.get("original", 0))) for task, v in out.get("n-samples", {}).items()}
    n_shot = {task: int(v) for task, v in out.get("n-shot", {}).items() if isinstance(v, int)}
    return TaskResults(metrics=metrics, samples=out.get("samples", {}), n_samples=n_samples, n_shot=n_shot)


def metrics_of(entry: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Turn lm-eval's flat `{"acc,none": v, "acc_stderr,none": s}` into `{"acc": {value, stderr}}`.

    The filter name is kept when it is not `none` (`exact_match,flexible-extract`), as lm-eval
    prints it; a stderr of "N/A" (perplexities) becomes None.
    """
    out: dict[str, dict[str, Any]] = {}
    for key, value in entry.items():
        if "," not in key or "_stderr," in key:
            continue
        metric, filt = key.split(",", 1)
        name = metric if filt == "none" else f"{metric},{filt}"
        stderr = entry.get(f"{metric}_stderr,{filt}")
        out[name] = {"value": _number(value), "stderr": _number(stderr)}
    return out


def _number(v: Any) -> float | None:
    try:
        return float(v)
    except (TypeError, ValueError):
        return None
