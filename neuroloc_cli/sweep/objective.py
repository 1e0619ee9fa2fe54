"""The number a sweep sorts by: one metric, or a weighted sum of them.

    neuroloc_math.exact_match
    0.5*neuroloc_math_de.exact_match + 0.5*neuroloc_math_fr.exact_match - 0.01*ppl_es.token_perplexity

A term is `[±][WEIGHT*]TASK.METRIC`, TASK and METRIC as `neuroloc eval` names them (its table's
first two columns). Higher is better unless `--minimize`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from neuroloc_cli.errors import UsageError

_TERM = re.compile(r"^(?:(?P<weight>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*\*\s*)?(?P<metric>\S+)$")

# metrics of `neuroloc eval` where lower is better: a default objective on them is negated
LOWER_IS_BETTER = ("perplexity", "bits_per_byte")


@dataclass(frozen=True)
class Objective:
    """`Σ weight · TASK.METRIC`, as written."""

    terms: tuple[tuple[float, str, str], ...]  # (weight, task, metric)
    text: str

    def value(self, tasks: dict[str, dict[str, dict[str, Any]]]) -> float:
        """The objective of one result (`ModelResult.tasks`); NaN when a metric has no value.

        Raises:
            UsageError: a term names a task or metric the evaluation did not produce (the
                message lists the ones it did).
        """
        total = 0.0
        for weight, task, metric in self.terms:
            if task not in tasks or metric not in tasks[task]:
                have = [f"{t}.{m}" for t, ms in tasks.items() for m in ms]
                raise UsageError(f"--objective {self.text!r}: the evaluation has no {task}.{metric}; it has {', '.join(have) or 'nothing'}")
            v = tasks[task][metric].get("value")
            total += weight * (float(v) if isinstance(v, (int, float)) else math.nan)
        return total


def parse_objective(text: str, tasks: list[str]) -> Objective:
    """Parse `--objective`; `tasks` are the task names the evaluation will produce, so a term
    `TASK.METRIC` splits at the task's name even when the metric holds a dot or a dash
    (`exact_match,flexible-extract`): terms are joined by ` + ` or ` - ` with spaces.

    Raises:
        UsageError: a malformed term, or a task not among `tasks`.
    """
    pieces = re.split(r"\s+([+-])\s+", " " + text.strip() + " ")
    signed = [("+", pieces[0])] + list(zip(pieces[1::2], pieces[2::2]))
    terms = []
    for sign, body in signed:
        body = body.strip()
        if body.startswith(("-", "+")):
            sign, body = ("-" if (sign == "-") != (body[0] == "-") else "+"), body[1:].strip()
        m = _TERM.match(body)
        if not m:
            raise UsageError(f"--objective {text!r}: cannot read {body!r}; write [WEIGHT*]TASK.METRIC terms joined by ' + ' or ' - '")
        name = m.group("metric")
        task = next((t for t in sorted(tasks, key=len, reverse=True) if name.startswith(t + ".")), None)
        if task is None:
            raise UsageError(f"--objective {text!r}: {name!r} is not TASK.METRIC for a task of --eval ({', '.join(tasks)})")
        weight = float(m.group("weight")) if m.group("weight") else 1.0
        terms.append(((-weight if sign == "-" else weight), task, name[len(task) + 1 :]))
    return Objective(tuple(terms), text)


def default_objective(task_names: list[str], perplexity_tasks: list[str]) -> str:
    """Without `--objective`: the first task's main metric that is not perplexity (`acc` or
    `exact_match` as lm-eval reports them is not known before the run, so the caller resolves
    `TASK.*`), else the first perplexity task's token perplexity, negated."""
    for name in task_names:
        if name not in perplexity_tasks:
            return f"{name}.*"
    return f"-{perplexity_tasks[0]}.token_perplexity"


def resolve_default(text: str, tasks: dict[str, dict[str, dict[str, Any]]]) -> str:
    """`TASK.*` → `TASK.METRIC` with the task's first reported metric (lower-is-better ones negated)."""
    if not text.endswith(".*"):
        return text
    task = text[:-2]
    metrics = list(tasks.get(task, {}))
    if not metrics:
        raise UsageError(f"the evaluation gave no metric for {task}; pass --objective TASK.METRIC")
    metric = metrics[0]
    return f"-{task}.{metric}" if any(k in metric for k in LOWER_IS_BETTER) else f"{task}.{metric}"
