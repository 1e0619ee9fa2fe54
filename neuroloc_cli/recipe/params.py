"""Merge parameters: their declaration, their three forms, and the one precedence rule.

A parameter value in a recipe takes one of three forms (mergekit's):

- a scalar: `weight: 0.5` (or a boolean for flags such as `normalize`);
- a per-layer list, interpolated linearly over depth `t = i / (n_layers - 1)`:
  `weight: [0, 0.5, 1]`; tensors outside the blocks take the first value (mergekit 0.1.5's
  rule, see `neuroloc_cli.arch.layer_position`);
- a list of `{filter, value}` entries: the first entry, in order, whose filter matches the
  tensor name wins, and an entry without a filter matches every tensor (so a default belongs
  last; written first, it shadows the entries after it, as in mergekit 0.1.5). A filter is a
  substring of the tensor name (mergekit's rule), or, when it contains `*`, `?` or `[`, a
  glob matched against the whole name (`*.self_attn.*`). The value may itself be a scalar or
  a per-layer list.

Precedence, written once in `ParameterResolver`: a model's own `parameters` → the recipe's
top-level `parameters` → the method's default.

A parameter declared with `file=SideFile(...)` names a file instead (`fisher:`, `gram:`): one
path per model, never per layer or filtered; the engine opens it at plan time and hands the
method that model's tensor from it (see `SideFile`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from neuroloc_cli.arch import name_matches
from neuroloc_cli.errors import did_you_mean

Scalar = float | bool


def same_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """A side tensor of the model tensor's own shape (a diagonal Fisher)."""
    return shape


@dataclass(frozen=True)
class SideFile:
    """What a file parameter names: an importance-format file (`masks.importance`) holding,
    for some of the model's tensors, a tensor that the method reads beside the model's own.

    The planner opens it header-only and checks it (`merge.plan`); the reader streams its
    tensor with each model tensor (`merge.stream`); the method receives, in place of the
    parameter's value, one tensor per model, or None where that model's file has none.

    Attributes:
        scores: the `score` values the file may hold (`fisher`, `gram`).
        shape: the side tensor's shape for a model tensor of this name and shape, or None
            where the method can use none (a Gram matrix of a 1-D tensor).
        what: how messages name the file's content ("a diagonal Fisher").
        hint: how to make such a file, for messages.
    """

    scores: tuple[str, ...]
    shape: Callable[[str, tuple[int, ...]], tuple[int, ...] | None] = same_shape
    what: str = "side tensors"
    hint: str = ""


@dataclass(frozen=True)
class Param:
    """A merge method's parameter.

    Args:
        name: as written in recipes (`weight`, `lambda`).
        default: the value when a recipe gives none; None makes the parameter required.
        per_model: True if each model has its own value (`weight`, `density`); False if one
            value applies to the whole tensor (`lambda`, `normalize`).
        boolean: a flag rather than a number.
        low, high: inclusive bounds for numbers.
        help: one line for `neuroloc methods`.
        file: set for a parameter whose value is a file path (see `SideFile`).
    """

    name: str
    default: Scalar | None = None
    per_model: bool = False
    boolean: bool = False
    low: float | None = None
    high: float | None = None
    help: str = ""
    file: SideFile | None = None

    @property
    def required(self) -> bool:
        return self.default is None

    def check_scalar(self, v: Any) -> str | None:
        """The problem with one literal value, or None."""
        if self.file is not None:
            return None if isinstance(v, str) and v.strip() else f"must be a file or folder path, got {v!r}"
        if self.boolean:
            return None if isinstance(v, bool) else f"must be true or false, got {v!r}"
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return f"must be a number, got {v!r}"
        if self.low is not None and v < self.low or self.high is not None and v > self.high:
            return f"must be in [{_fmt(self.low, '-inf')}, {_fmt(self.high, 'inf')}], got {v}"
        return None


def _fmt(x: float | None, unbounded: str) -> str:
    return unbounded if x is None else f"{x:g}"


def check_value(value: Any, param: Param, where: str) -> list[str]:
    """Every problem with a parameter value in any of its forms; [] if it is valid."""
    if param.file is not None and isinstance(value, list):
        return [f"{where}: a file path cannot vary per layer or by filter; give one path"]
    if isinstance(value, list) and value and all(isinstance(e, dict) for e in value):
        problems = []
        for i, entry in enumerate(value):
            unknown = set(entry) - {"filter", "value"}
            if unknown or "value" not in entry:
                problems.append(f"{where}[{i}]: an entry needs 'value' and may have 'filter', got keys {sorted(entry)}")
                continue
            if entry.get("filter") is not None and not isinstance(entry["filter"], str):
                problems.append(f"{where}[{i}].filter: must be a string")
            problems += check_value(entry["value"], param, f"{where}[{i}].value")
        return problems
    if isinstance(value, list):
        if not value:
            return [f"{where}: an empty list has no value"]
        if param.boolean:
            return [f"{where}: a flag cannot vary per layer"]
        return [f"{where}[{i}]: {p}" for i, v in enumerate(value) if (p := param.check_scalar(v))]
    problem = param.check_scalar(value)
    return [f"{where}: {problem}"] if problem else []


def resolve_value(value: Any, tensor_name: str, t: float) -> Scalar | None:
    """The value a (checked) parameter takes at one tensor; None if no filter applies."""
    if isinstance(value, list) and value and isinstance(value[0], dict):
        # mergekit 0.1.5's rule: the entries in order, the first that matches wins, and an entry
        # without a filter matches every tensor (a default written first shadows the rest)
        chosen = next((e["value"] for e in value if e.get("filter") is None or name_matches(e["filter"], tensor_name)), None)
        return None if chosen is None else resolve_value(chosen, tensor_name, t)
    if isinstance(value, list):
        if len(value) == 1:
            return float(value[0])
        return float(np.interp(t, np.linspace(0.0, 1.0, len(value)), value))
    return value if isinstance(value, (bool, str)) else float(value)  # a string: a file parameter's path


def check_parameters(
    declared: Sequence[Param],
    global_params: Mapping[str, Any],
    model_params: Sequence[Mapping[str, Any]],
    method: str,
    allowed_extra: frozenset[str] = frozenset(),
    model_labels: Sequence[str] | None = None,
    unused_ok: frozenset[str] = frozenset(),
) -> list[str]:
    """Every problem with a recipe's parameters for `method`: unknown names, forms, ranges,
    required per-model values that are missing, per-tensor values set on a model.

    `model_labels` names each model's place in the recipe (default `models[i]`). A model's
    parameter named in `unused_ok` that `method` does not declare is no problem here (see
    `unused_parameters`): mergekit's own slerp and model_stock recipes carry `weight:`."""
    by_name = {p.name: p for p in declared}
    problems = []
    labels = _labels(model_labels, model_params)
    levels = [("parameters", global_params)] + [(f"{label}.parameters", mp) for label, mp in zip(labels, model_params)]
    for where, params in levels:
        for name, value in params.items():
            if name in allowed_extra or (where != "parameters" and name in unused_ok and name not in by_name):
                continue
            p = by_name.get(name)
            if p is None:
                known = ", ".join(by_name) or "none"
                problems.append(
                    f"{where}.{name}: {method} has no parameter {name!r}{did_you_mean(name, by_name)} (its parameters: {known})"
                )
                continue
            if where != "parameters" and not p.per_model:
                problems.append(f"{where}.{name}: {name!r} applies to the whole merge; set it in the top-level 'parameters'")
                continue
            problems += check_value(value, p, f"{where}.{name}")
    for p in declared:
        if p.required and p.name not in global_params:
            if not p.per_model:
                problems.append(f"parameters: {method} needs {p.name!r}")
                continue
            for label, mp in zip(labels, model_params):
                if p.name not in mp:
                    problems.append(f"{label}.parameters: {method} needs {p.name!r} for every model (or once in 'parameters')")
    return problems


def unused_parameters(
    declared: Sequence[Param],
    model_params: Sequence[Mapping[str, Any]],
    method: str,
    unused_ok: frozenset[str],
    model_labels: Sequence[str] | None = None,
) -> list[str]:
    """One warning per model parameter that `method` ignores: a name in `unused_ok` (one that
    other methods use, such as `weight`) that `method` does not declare. Names no method knows
    stay errors (`check_parameters`): they are usually typos."""
    by_name = {p.name for p in declared}
    return [
        f"{label}.parameters.{name}: {method} does not use it (ignored)"
        for label, mp in zip(_labels(model_labels, model_params), model_params)
        for name in mp
        if name in unused_ok and name not in by_name
    ]


def _labels(model_labels: Sequence[str] | None, model_params: Sequence[Mapping[str, Any]]) -> list[str]:
    return list(model_labels) if model_labels is not None else [f"models[{i}]" for i in range(len(model_params))]


class ParameterResolver:
    """Resolves a method's parameters at each tensor, with the one precedence rule.

    Args:
        declared: the method's parameters.
        global_params: the recipe's top-level `parameters`.
        model_params: each input model's `parameters`, in order.
    """

    def __init__(self, declared: Sequence[Param], global_params: Mapping[str, Any], model_params: Sequence[Mapping[str, Any]]):
        self.declared = list(declared)
        self.global_params = global_params
        self.model_params = model_params

    def _one(self, p: Param, levels: Sequence[Mapping[str, Any]], tensor_name: str, t: float) -> Scalar:
        for level in levels:
            if p.name in level:
                v = resolve_value(level[p.name], tensor_name, t)
                if v is not None:
                    return v
        if p.default is None:
            raise ValueError(f"parameter {p.name!r} has no value for tensor {tensor_name}")
        return p.default

    def at(self, tensor_name: str, t: float) -> tuple[dict[str, Scalar], list[dict[str, Scalar]]]:
        """Return (whole-tensor parameters, per-model parameters) at one tensor.

        Raises:
            ValueError: a required parameter has no value here (its filters match nothing and
                there is no default entry); the message names the parameter and tensor.
        """
        whole = {p.name: self._one(p, [self.global_params], tensor_name, t) for p in self.declared if not p.per_model}
        per_model = [
            {p.name: self._one(p, [mp, self.global_params], tensor_name, t) for p in self.declared if p.per_model}
            for mp in self.model_params
        ]
        return whole, per_model
