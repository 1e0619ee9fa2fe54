"""Changing a recipe from the command line: `--set PATH=VALUE` (`merge`, `recipe validate`) and
the swept keys of `neuroloc sweep`, applied to the YAML mapping before it is validated.

A path names a key by its place in the YAML, dots between the steps and list indices as
numbers: `parameters.gamma`, `models.0.parameters.weight`, `slices.1.sources.0.parameters.t`.
A bare name without a dot is a recipe key when the recipe schema has one (`dtype`,
`random_seed`) and otherwise a merge parameter, set where the recipe gives it:

- in every `models[i].parameters` (and `slices[j].sources[k].parameters`) that has it, and in
  the top-level `parameters` if that has it too, so the new value is the one the precedence
  rule (`recipe.params`) finds for every model;
- as `languages[i].weight` for `weight` in a MAET recipe;
- in `parameters` when the recipe gives it nowhere.

A value is read as YAML (`0.5`, `[0.1, 0.7]`, `true`, `bfloat16`); `null` removes the key.
The changed recipe is validated like any other, so a bad value is a recipe error naming its
key, and it is the resolved recipe that a merge records in its provenance.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from neuroloc_cli.config_models import load_yaml
from neuroloc_cli.errors import RecipeError, UsageError
from neuroloc_cli.recipe.schema import MergeRecipe, recipe_document, split_model_reference, validate_recipe

STDIN = "-"
"""The recipe argument that means: read the recipe from standard input."""

Step = str | int
KeyPath = tuple[Step, ...]


@dataclass(frozen=True)
class Assignment:
    """One `PATH=VALUE`: the key as written (a bare name or a dotted path) and its value."""

    key: str
    value: Any

    @property
    def text(self) -> str:
        return f"{self.key}={self.value!r}"


def parse_assignment(text: str, flag: str = "--set") -> Assignment:
    """`PATH=VALUE` → an `Assignment`, the value read as YAML.

    Raises:
        UsageError: no `=`, an empty path or step, or a value that is not YAML.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UsageError(f"{flag} {text!r}: expected PATH=VALUE, e.g. parameters.gamma=0.5 or models.0.parameters.weight=0.7")
    if any(not step for step in key.split(".")):
        raise UsageError(f"{flag} {text!r}: empty step in the path {key!r}")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except ValueError as e:
        raise UsageError(f"{flag} {text!r}: the value is not YAML ({e})") from None
    return Assignment(key, value)


def split_path(key: str) -> KeyPath:
    """`models.0.parameters.weight` → `("models", 0, "parameters", "weight")`."""
    return tuple(int(s) if s.isdigit() else s for s in key.split("."))


def paths_for(doc: dict[str, Any], key: str) -> list[KeyPath]:
    """Where `key` is set in `doc`: its dotted path, or, for a bare name, the places the
    module docstring lists (never empty)."""
    if "." in key or key in MergeRecipe.model_fields:
        return [split_path(key)]
    found: list[KeyPath] = []
    for i, entry in enumerate(_list(doc, "models")):
        if isinstance(entry, dict) and isinstance(entry.get("parameters"), dict) and key in entry["parameters"]:
            found.append(("models", i, "parameters", key))
    for j, piece in enumerate(_list(doc, "slices")):
        for k, src in enumerate(_list(piece, "sources") if isinstance(piece, dict) else []):
            if isinstance(src, dict) and isinstance(src.get("parameters"), dict) and key in src["parameters"]:
                found.append(("slices", j, "sources", k, "parameters", key))
    if key == "weight":
        found += [("languages", i, "weight") for i, lang in enumerate(_list(doc, "languages")) if isinstance(lang, dict)]
    params = doc.get("parameters")
    if not found or (isinstance(params, dict) and key in params):
        found.append(("parameters", key))
    return found


def apply_assignments(doc: dict[str, Any], assignments: Iterable[Assignment], source: str) -> dict[str, Any]:
    """A copy of the recipe mapping `doc` with every assignment made, in order.

    Raises:
        RecipeError: a path that cannot be followed (a list index past the end, a step into a
            number); every such problem at once.
    """
    out = copy.deepcopy(doc)
    problems = []
    for a in assignments:
        for path in paths_for(out, a.key):
            problem = _set(out, path, a.value)
            if problem:
                problems.append(f"--set {a.key}: {problem}")
    if problems:
        raise RecipeError(source, problems)
    return out


def _set(doc: dict[str, Any], path: KeyPath, value: Any) -> str | None:
    """Set `path` in `doc` to `value` (None deletes it); missing mappings on the way are made.

    Returns:
        What is wrong with the path, or None.
    """
    node: Any = doc
    for depth, step in enumerate(path[:-1]):
        where = _dotted(path[: depth + 1])
        nxt = path[depth + 1]
        if isinstance(node, list):
            if not isinstance(step, int) or step >= len(node):
                return f"{where}: the list has {len(node)} item(s)" if isinstance(step, int) else f"{where}: a list needs a number here"
            if not isinstance(node[step], (dict, list)):
                return f"{where}: holds {node[step]!r}, which has no key {nxt!r}"
            node = node[step]
        elif isinstance(node, dict):
            key = str(step)
            if key not in node or node[key] is None:
                if isinstance(nxt, int):
                    return f"{where}: not in the recipe (a list must exist to index it)"
                node[key] = {}
            elif not isinstance(node[key], (dict, list)):
                return f"{where}: holds {node[key]!r}, which has no key {nxt!r}"
            node = node[key]
    last = path[-1]
    if isinstance(node, list):
        if not isinstance(last, int) or last >= len(node):
            return f"{_dotted(path)}: the list has {len(node)} item(s)"
        if value is None:
            return f"{_dotted(path)}: a list item cannot be removed with null"
        node[last] = value
    elif value is None:
        node.pop(str(last), None)
    else:
        node[str(last)] = value
    return None


def _list(doc: Any, key: str) -> list[Any]:
    value = doc.get(key) if isinstance(doc, dict) else None
    return value if isinstance(value, list) else []


def _dotted(path: Sequence[Step]) -> str:
    return ".".join(str(s) for s in path)


@dataclass(frozen=True)
class RecipeSource:
    """A recipe as read: its mapping, its name in messages and the folder its relative paths
    are relative to (the file's folder; the working directory for standard input)."""

    document: dict[str, Any]
    name: str
    folder: Path

    def recipe(self, assignments: Sequence[Assignment] = ()) -> MergeRecipe:
        """The recipe with `assignments` made, validated."""
        return validate_recipe(apply_assignments(self.document, assignments, self.name), self.name)


def read_recipe_source(path: Path) -> RecipeSource:
    """Read a recipe file, or standard input for `-`.

    Raises:
        RecipeError: the file cannot be read, or is not a YAML mapping.
    """
    if str(path) == STDIN:
        if sys.stdin.isatty():
            raise UsageError(
                "the recipe is '-' (standard input), but standard input is a terminal", hint="pipe a recipe in, or give a file"
            )
        return RecipeSource(recipe_document(sys.stdin.read(), "<stdin>"), "<stdin>", Path.cwd())
    try:
        text = path.read_text()
    except OSError as e:
        raise RecipeError(str(path), [f"cannot read ({e.strerror})"]) from None
    return RecipeSource(recipe_document(text, str(path)), str(path), path.resolve().parent)


# Recipe keys whose string values are checkpoint, adapter or mask paths.
_PATH_KEYS = frozenset({"model", "base_model", "language_model", "mask", "tokenizer_source", "source"})


def with_absolute_paths(doc: dict[str, Any], folder: Path, extra_keys: Iterable[str] = ()) -> dict[str, Any]:
    """A copy of `doc` whose relative paths (models, adapters, masks, tokenizer sources, and
    the values of `extra_keys`, a method's file parameters, that exist relative to `folder`)
    are absolute, so the recipe runs from any folder."""
    keys = _PATH_KEYS | set(extra_keys)

    def absolute(p: str) -> str:
        return str((folder / p).resolve()) if not Path(p).is_absolute() and (folder / p).exists() else p

    def fix(value: str) -> str:
        if (folder / value).exists():  # a folder whose name holds a '+' is that folder
            return absolute(value)
        try:
            model, adapter = split_model_reference(value)
        except ValueError:  # validation reports it
            return value
        return absolute(model) if adapter is None else f"{absolute(model)}+{absolute(adapter)}"

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {k: fix(v) if k in keys and isinstance(v, str) else walk(v) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    return walk(doc)
