"""What to evaluate: task names, shipped task shapes with the user's jsonl files, perplexity
files, translation files — parsed and checked before any model is loaded.

Shipped task shapes live in `tasks/` as ordinary lm-eval YAMLs (`dataset_path: json`). They
are passed to lm-eval as config dicts with the data path made absolute and the
`--task-option`s applied (`task_options`), so the same YAML serves the shipped sample and any
user file, from any working directory. Perplexity files are scored by neuroloc itself
(`perplexity`), not through lm-eval's task.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from neuroloc_cli.errors import InputError, UsageError
from neuroloc_cli.eval.task_options import apply_options, parse_task_options, prompt_fields
from neuroloc_cli.io import jsonl

TASKS_DIR = Path(__file__).parent / "tasks"
SAMPLES_DIR = TASKS_DIR / "samples"

# Shipped task shapes and the keys every record of their jsonl files must have.
SHAPES: dict[str, tuple[str, ...]] = {
    "neuroloc_math": ("question", "answer_number"),
    "neuroloc_choice": ("question", "choices", "answer"),
    "neuroloc_ppl": ("text",),
}
PPL_SHAPE = "neuroloc_ppl"
TRANSLATION_KEYS = ("source", "target")


@dataclass(frozen=True)
class LocalTask:
    """A shipped task shape evaluated on one jsonl file.

    Attributes:
        shape: the shipped YAML's task name (a key of SHAPES).
        name: the task name in results (the shape, or shape_STEM for a user's file, or ppl_LANG).
        data: the jsonl file, absolute.
        options: its `--task-option`s, parsed (see `task_options`).
    """

    shape: str
    name: str
    data: Path
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def record_keys(self) -> tuple[str, ...]:
        """The keys every record needs: the shape's, and the fields a custom prompt shows."""
        return SHAPES[self.shape] + prompt_fields(self.options)

    def config(self) -> dict[str, Any]:
        """The lm-eval task config dict: the shipped YAML with this name, data file and options."""
        import yaml

        cfg = yaml.safe_load((TASKS_DIR / f"{self.shape}.yaml").read_text())
        cfg["task"] = self.name
        cfg["dataset_kwargs"] = {"data_files": {"test": str(self.data)}}
        return apply_options(cfg, self.options)


@dataclass(frozen=True)
class TaskRequest:
    """Everything `--tasks` and `--ppl` asked for.

    Attributes:
        local: shipped shapes with their data files, in the order given.
        named: other task, group or tag names, resolved by lm-eval (built-in or --include-path).
    """

    local: tuple[LocalTask, ...] = ()
    named: tuple[str, ...] = ()

    @property
    def names(self) -> list[str]:
        return [t.name for t in self.local] + list(self.named)

    @property
    def perplexity(self) -> tuple[LocalTask, ...]:
        """The perplexity tasks, which neuroloc scores itself."""
        return tuple(t for t in self.local if t.shape == PPL_SHAPE)

    @property
    def harness_local(self) -> tuple[LocalTask, ...]:
        """The shipped-shape tasks that lm-eval runs."""
        return tuple(t for t in self.local if t.shape != PPL_SHAPE)

    @property
    def uses_lm_eval(self) -> bool:
        """Whether any task runs through lm-eval (and so needs its task index)."""
        return bool(self.harness_local or self.named)


def parse_tasks(text: str | None, ppl: list[str] | None = None, options: Iterable[str] = ()) -> TaskRequest:
    """Parse `--tasks a,b,SHAPE=FILE.jsonl`, the `--ppl FILE.jsonl[:LANG]` options and the
    `--task-option TARGET.KEY=VALUE` ones.

    Raises:
        UsageError: an unknown shape before '=', nothing after it, two tasks with one name, or
            a bad task option.
        InputError: a data file is missing or a record lacks a key its shape (or prompt) needs.
    """
    local: list[LocalTask] = []
    named: list[str] = []
    for item in (s.strip() for s in (text or "").split(",")):
        if not item:
            continue
        if "=" in item:
            shape, file = (s.strip() for s in item.split("=", 1))
            if shape not in SHAPES:
                raise UsageError(
                    f"--tasks {item}: only a shipped task takes a data file; unknown task {shape!r}", hint=f"use one of {', '.join(SHAPES)}"
                )
            if not file:
                raise UsageError(
                    f"--tasks {item}: no data file after '='", hint=f"{shape}=FILE.jsonl, or {shape} alone for its sample data"
                )
            data = Path(file)
            local.append(LocalTask(shape, f"{shape}_{_slug(data.stem)}", data.resolve()))
        elif item in SHAPES:
            local.append(LocalTask(item, item, _sample(item)))
        else:
            named.append(item)
    for spec in ppl or []:
        local.append(parse_ppl(spec))
    seen: set[str] = set()
    for name in [t.name for t in local] + named:
        if name in seen:
            raise UsageError(
                f"task {name!r} is asked for twice", hint="give each data file a distinct name (file stem, or :LANG for --ppl)"
            )
        seen.add(name)
    parsed = parse_task_options(options, {t.name: t.shape for t in local})
    local = [replace(t, options=parsed.get(t.name, {})) for t in local]
    for task in local:
        read_jsonl(task.data, task.record_keys, functools.partial(_record_problem, task.shape))
    return TaskRequest(tuple(local), tuple(named))


def parse_ppl(spec: str) -> LocalTask:
    """Parse `FILE.jsonl[:LANG]` into the perplexity task `ppl_LANG` (LANG defaults to the file stem)."""
    file, lang = spec, None
    head, sep, tail = spec.rpartition(":")
    if sep and head and tail and "/" not in tail and "\\" not in tail:
        file, lang = head, tail
    data = Path(file)
    return LocalTask("neuroloc_ppl", f"ppl_{_slug(lang or data.stem)}", data.resolve())


def _record_problem(shape: str, record: dict[str, Any]) -> str | None:
    # Values lm-eval would otherwise trip over deep inside a run, with a traceback.
    if shape == "neuroloc_choice":
        choices, answer = record["choices"], record["answer"]
        if not isinstance(choices, list) or not 2 <= len(choices) <= 10:
            return "'choices' must be a list of 2 to 10 options"
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            return f"'answer' must be the 0-based index of the right choice (0 to {len(choices) - 1}), not {answer!r}"
    elif shape == "neuroloc_math":
        if not isinstance(record["answer_number"], (int, float)) or isinstance(record["answer_number"], bool):
            return f"'answer_number' must be a number, not {record['answer_number']!r}"
    elif not isinstance(record["text"], str) or not record["text"]:
        return "'text' must be a non-empty string"
    return None


def _sample(shape: str) -> Path:
    import yaml

    cfg = yaml.safe_load((TASKS_DIR / f"{shape}.yaml").read_text())
    return (TASKS_DIR / cfg["dataset_kwargs"]["data_files"]["test"]).resolve()


def _slug(text: str) -> str:
    # Task names end up in file names (samples_TASK.jsonl) and lm-eval's result keys.
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_") or "data"


def read_jsonl(path: Path, keys: tuple[str, ...], check: Callable[[dict[str, Any]], str | None] | None = None) -> list[dict[str, Any]]:
    """Read a jsonl file whose every record has `keys` (and passes `check`, which returns a
    problem or None).

    Raises:
        InputError: naming the file (and line) that is missing, not JSON, lacks a key, fails
            `check`, or is empty.
    """
    if not path.is_file():
        raise InputError(f"{path}: no such data file")
    found = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read ({e})") from None
    for number, record in jsonl.records(path, text):
        missing = [k for k in keys if k not in record]
        if missing:
            raise jsonl.record_error(
                path, number, f"record lacks key(s) {', '.join(map(repr, missing))}", hint=f"each record needs {', '.join(keys)}"
            )
        empty = [k for k in keys if record[k] is None]
        if empty:
            raise jsonl.record_error(
                path, number, f"key(s) {', '.join(map(repr, empty))} are null", hint=f"each record needs {', '.join(keys)}"
            )
        problem = check(record) if check else None
        if problem:
            raise jsonl.record_error(path, number, problem)
        found.append(record)
    if not found:
        raise InputError(f"{path}: no records")
    return found
