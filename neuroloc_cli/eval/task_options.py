"""Options of the shipped task shapes: `--task-option TARGET.KEY=VALUE`, checked before any
model loads and applied to the shape's lm-eval config.

A shipped math task is only as good as its fit to the model: a base model answers "7
apples. Bob has 3…", a model of another language wants its own cue words, a chain of thought
needs room and ends with its answer. So the prompt, the generation length, the stop
sequences and which number counts are options. They are a flag of their own rather than part
of the `--tasks` spec because their values (prompts, stop sequences) contain the `:` and `,`
that the spec is split on.

TARGET is a shipped shape (the option applies to every task of that shape in the command) or
the name of one task made from it (`neuroloc_math_mgsm_es`), which wins over its shape.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from neuroloc_cli.errors import UsageError, did_you_mean

EXTRACTIONS = {"first": 0, "last": -1}  # extract=… → lm-eval's regex filter group_select

# Shape → the options it takes (see `apply_options`); the other shapes take none.
OPTIONS: dict[str, tuple[str, ...]] = {"neuroloc_math": ("prompt", "max_gen_toks", "until", "extract")}


def parse_task_options(specs: Iterable[str], tasks: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Parse `--task-option` values for the shipped-shape tasks of a command.

    Args:
        specs: the flag's values, `TARGET.KEY=VALUE`, in the order given (a later one wins).
        tasks: task name → its shape, for every shipped-shape task of the command.

    Returns:
        task name → option → value (ints, lists of stop strings and texts, parsed), for the
        tasks that have any.

    Raises:
        UsageError: naming the flag's value: not TARGET.KEY=VALUE, a target that is no shipped
            shape or task of this command, an option its shape does not take, a bad value.
    """
    shapes = set(tasks.values())
    shape_wide: dict[str, dict[str, Any]] = {}  # shape → option → value
    own: dict[str, dict[str, Any]] = {}  # task → option → value
    for spec in specs:
        target, key, value = _split(spec)
        if target not in tasks and target not in shapes:
            raise UsageError(
                f"--task-option {spec}: no shipped-shape task {target!r} in this command{did_you_mean(target, [*tasks, *shapes])}",
                hint="options apply to a shipped shape given with --tasks or --ppl, or to a task made from one",
            )
        shape = target if target in shapes else tasks[target]
        (shape_wide if target in shapes else own).setdefault(target, {})[key] = _value(spec, shape, key, value)
    options = {}
    for name, shape in tasks.items():
        merged = {**shape_wide.get(shape, {}), **own.get(name, {})}
        if merged:
            options[name] = merged
    return options


def _split(spec: str) -> tuple[str, str, str]:
    head, sep, value = spec.partition("=")
    target, dot, key = head.strip().rpartition(".")
    if not sep or not dot or not target or not key:
        raise UsageError(f"--task-option {spec}: expected TARGET.KEY=VALUE", hint="e.g. --task-option neuroloc_math.extract=last")
    return target, key, value


def _value(spec: str, shape: str, key: str, value: str) -> Any:
    """The parsed value of option `key` of `shape`."""
    known = OPTIONS.get(shape, ())
    if key not in known:
        takes = f"{shape} takes {', '.join(known)}" if known else f"{shape} takes no options"
        raise UsageError(f"--task-option {spec}: unknown option {key!r}{did_you_mean(key, known)}", hint=takes)
    if key == "prompt":
        return _prompt(spec, value)
    if key == "max_gen_toks":
        if not value.strip().isdigit() or int(value) < 1:
            raise UsageError(f"--task-option {spec}: max_gen_toks must be a whole number of tokens, at least 1")
        return int(value)
    if key == "until":
        return _until(spec, value)
    if value not in EXTRACTIONS:
        raise UsageError(f"--task-option {spec}: extract must be one of {', '.join(EXTRACTIONS)}{did_you_mean(value, EXTRACTIONS)}")
    return value


def _prompt(spec: str, value: str) -> str:
    """A Jinja template as lm-eval's doc_to_text, `\\n` for a line break; it must show the question."""
    import jinja2

    prompt = value.replace("\\n", "\n")
    try:
        fields = _fields(prompt)
    except jinja2.TemplateSyntaxError as e:
        raise UsageError(
            f"--task-option {spec}: the prompt is not a Jinja template ({e.message})", hint="write the record's fields as {{question}}"
        ) from None
    if "question" not in fields:
        raise UsageError(
            f"--task-option {spec}: the prompt never shows {{{{question}}}}", hint="e.g. 'Pregunta: {{question}}\\nRespuesta:'"
        )
    return prompt


def _until(spec: str, value: str) -> list[str]:
    """A JSON list of stop strings, or one stop string (`\\n` for a line break)."""
    if not value.lstrip().startswith("["):
        if not value:
            raise UsageError(
                f"--task-option {spec}: no stop sequence", hint="give one, a JSON list of them, or [] to stop only at the end of text"
            )
        return [value.replace("\\n", "\n")]
    try:
        stops = json.loads(value)
    except json.JSONDecodeError as e:
        raise UsageError(f"--task-option {spec}: until is not a JSON list ({e.msg})", hint='e.g. until=["\\n\\n", "Question:"]') from None
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise UsageError(f"--task-option {spec}: until must be a list of non-empty strings")
    return stops


def prompt_fields(options: dict[str, Any]) -> tuple[str, ...]:
    """The record fields a custom prompt uses besides the question (each record must have them)."""
    return tuple(sorted(_fields(options["prompt"]) - {"question"})) if "prompt" in options else ()


def _fields(prompt: str) -> set[str]:
    import jinja2
    import jinja2.meta

    return jinja2.meta.find_undeclared_variables(jinja2.Environment().parse(prompt))


def apply_options(cfg: dict[str, Any], options: dict[str, Any]) -> dict[str, Any]:
    """`cfg` (a shipped shape's lm-eval config) with `options` applied."""
    if "prompt" in options:
        cfg["doc_to_text"] = options["prompt"]
    generation = cfg.setdefault("generation_kwargs", {})
    for key in ("max_gen_toks", "until"):
        if key in options:
            generation[key] = options[key]
    if "extract" in options:
        flexible = next(f for f in cfg["filter_list"] if f["name"] == "flexible-extract")
        flexible["filter"][0]["group_select"] = EXTRACTIONS[options["extract"]]
    return cfg
