"""lm-eval tasks through its Python API: `simple_evaluate` on an already loaded model.

The task index is built once per command; tasks are loaded here, one spec at a time, so
that a dataset that cannot be loaded becomes one error naming its task (lm-eval would raise
a bare `ConnectionError` from deep inside `simple_evaluate`).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroloc_cli.errors import UsageError, did_you_mean
from neuroloc_cli.eval.offline import is_missing_dataset, missing_dataset_error
from neuroloc_cli.eval.specs import TaskRequest

# lm-eval's defaults, restated so that results can record them.
DEFAULT_SEEDS = {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}


@dataclass(frozen=True)
class HarnessSettings:
    """The lm-eval settings that change numbers; all are recorded in the results.

    Attributes:
        limit: at most this many documents per task (None: all).
        num_fewshot: override of every task's few-shot count (None: the tasks' own).
        max_gen_toks: override of generate-until tasks' generation length (None: the tasks' own).
        bootstrap_iters: bootstrap resamples for stderrs of non-mean metrics (lm-eval's default).
        seeds: lm-eval's four seeds.
    """

    limit: int | None = None
    num_fewshot: int | None = None
    max_gen_toks: int | None = None
    bootstrap_iters: int = 100000
    seeds: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SEEDS))


@dataclass
class TaskResults:
    """lm-eval's output for one model: per-task metrics, samples, document counts, few-shot counts."""

    metrics: dict[str, dict[str, dict[str, Any]]]
    samples: dict[str, list[dict[str, Any]]]
    n_samples: dict[str, int]
    n_shot: dict[str, int]


def task_manager(request: TaskRequest, include_paths: list[Path]):
    """An lm-eval TaskManager that knows every name `request` uses.

    Indexing lm-eval's thousands of built-in YAMLs takes 10–20 seconds, so names are looked
    up first in the --include-path folders, then in the built-in folders that a text scan says
    define them; the full index is built only when that fails (unknown names, groups, tags).

    Raises:
        UsageError: an --include-path folder is missing, or a name is no task, group or tag.
    """
    for p in include_paths:
        if not p.is_dir():
            raise UsageError(f"--include-path {p}: not a folder")
    paths = tuple(str(p.resolve()) for p in include_paths)
    manager = _manager(paths, False)
    if all(n in manager.all_tasks or manager.match_tasks([n]) for n in request.named):
        return manager
    # Fast path: index only the built-in folders that define the names asked for (later
    # paths win in lm-eval, so the user's folders come last). Only for plain tasks: a group
    # or tag may gather tasks from other folders.
    located = _builtin_yaml_of()
    if all(n in located for n in request.named):
        dirs = tuple(sorted({str(located[n].parent) for n in request.named}))
        manager = _manager(dirs + paths, False)
        if all(n in manager.all_subtasks for n in request.named):
            return manager
    manager = _manager(paths, True)
    for name in request.named:
        if name not in manager.all_tasks and not manager.match_tasks([name]):
            raise UsageError(f"--tasks: unknown task {name!r}{did_you_mean(name, manager.all_tasks)}", hint="--include-path DIR adds your own task YAMLs")
    return manager


@functools.lru_cache(maxsize=1)
def _builtin_yaml_of() -> dict[str, Path]:
    """Task and group names of lm-eval's built-in YAMLs → the file naming them, by a text scan
    (a fifth of the time of lm-eval's full index, which parses every file)."""
    import lm_eval.tasks

    pattern = re.compile(r"^(?:task|group):\s*['\"]?([^\s'\"#]+)", re.M)
    found: dict[str, Path] = {}
    for path in sorted(Path(lm_eval.tasks.__file__).parent.rglob("*.yaml")):
        for m in pattern.finditer(path.read_text(encoding="utf-8", errors="ignore")):
            found.setdefault(m.group(1), path)
    return found


@functools.lru_cache(maxsize=4)
def _manager(paths: tuple[str, ...], defaults: bool):
    # Cached: the index of built-in tasks is costly and does not change within a process.
    from lm_eval.tasks import TaskManager

    return TaskManager(include_defaults=defaults, include_path=list(paths) or None)


def load_tasks(manager, request: TaskRequest, online: bool) -> list:
    """Build the lm-eval Task/Group objects (this loads their datasets).

    Raises:
        InputError: a task's dataset cannot be loaded (offline, or not found).
    """
    specs: list[tuple[str, Any]] = [(t.name, t.config()) for t in request.local]
    for name in request.named:
        specs.extend((n, n) for n in (manager.match_tasks([name]) if "*" in name else [name]))
    built = []
    for name, spec in specs:
        try:
            loaded = manager.load([spec])
        except Exception as e:  # lm-eval wraps nothing; classify by type
            if is_missing_dataset(e):
                raise missing_dataset_error(name, e, online) from None
            raise
        built.extend(loaded["groups"].values() if loaded.get("groups") else loaded["tasks"].values())
    return built


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
