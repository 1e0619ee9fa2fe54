"""YAML documents validated into frozen pydantic models: the one base class, YAML reading and
the wording of their errors, shared by merge recipes (`recipe.schema`) and training configs
(`train.config`).

Errors are worded for the person who wrote the file: the key path (`models.1.parameters`),
"unknown key 'x' (did you mean "y"?)" with the suggestion taken from the model the key sits
in, and the YAML line where parsing failed.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict

from neuroloc_cli.errors import did_you_mean


class Frozen(BaseModel):
    """A configuration model: immutable once read, and no key it does not know."""

    model_config = ConfigDict(frozen=True, extra="forbid")


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, reading numbers as YAML 1.2 (and every other tool) does: `1e-4` is
    a float, where YAML 1.1 wants `1.0e-4` and reads `1e-4` as a string."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """Parse a YAML document.

    Raises:
        ValueError: 'line N: invalid YAML (what PyYAML says)'.
    """
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ValueError(yaml_problem(e)) from None


def yaml_problem(e: yaml.YAMLError) -> str:
    """'line N: invalid YAML (what PyYAML says)': the line is where the user looks first."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}: " if mark else ""
    return f"{where}invalid YAML ({getattr(e, 'problem', None) or e})"


def describe_error(err: Any, root: type[BaseModel]) -> str:
    """One pydantic error (an item of `ValidationError.errors()`) of a `root` document."""
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        parent = _model_at(root, loc[:-1])
        hint = did_you_mean(loc[-1], parent.model_fields) if parent else ""
        return f"unknown key {key!r}{hint}"
    if err["type"] == "missing":
        return f"missing required key {key!r}"
    msg = err["msg"].removeprefix("Value error, ")
    return f"{key}: {msg}" if key else msg


def _model_at(root: type[BaseModel], loc: list[str]) -> type[BaseModel] | None:
    """The model class that a location inside a `root` document refers to."""
    model = root
    for part in loc:
        if part.isdigit():
            continue
        field = model.model_fields.get(part)
        inner = getattr(field, "annotation", None) if field else None
        args = getattr(inner, "__args__", ())
        nested = next((a for a in (inner, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nested is None:
            return None
        model = nested
    return model
