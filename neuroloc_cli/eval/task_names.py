"""Task names checked without lm-eval: an unknown name is refused, with a suggestion, at once.

lm-eval's TaskManager parses its ~14,000 built-in YAMLs (10–20 s) before it can tell whether a
name exists. But every task, group and tag name is written in the text of those YAMLs or of
the templates they include, so a name that the text never mentions is unknown for certain,
and a text scan of the folder takes a fraction of a second. The same scan says which file
defines a known task, so that only its folder need be indexed (see `harness.task_manager`).

The user's --include-path folders are also parsed as YAML, file by file: lm-eval skips a file
it cannot parse without a word, and the tasks in it would only turn up as unknown.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import yaml

from neuroloc_cli.config_models import yaml_problem
from neuroloc_cli.errors import UsageError, did_you_mean
from neuroloc_cli.eval.specs import SHAPES

_IGNORED_DIRS = {"__pycache__", ".ipynb_checkpoints"}  # as lm-eval's index
_NAME_CHAR = r"[^\s,:\[\]{}'\"#|&*!>]"  # what a name can be made of in YAML text
_DEFINITION = re.compile(r"^(?:task|group):\s*['\"]?([^\s'\"#]+)", re.M)
_ANY_NAME = re.compile(r"^[ \t]*(?:-[ \t]*)?['\"]?(?:task|group|tag)['\"]?:[ \t]*['\"]?([^\s'\"#,\]]+)", re.M)


@dataclass(frozen=True)
class TaskFolder:
    """The text of a folder's task YAMLs and include templates (files `*.yaml`, or without suffix)."""

    texts: dict[Path, str]

    @functools.cached_property
    def _blob(self) -> str:
        return "\n".join(self.texts.values())

    def mentions(self, name: str) -> bool:
        """Whether `name` appears as a whole word anywhere: False means no file defines it."""
        if name not in self._blob:  # the common answer for a typo, found in milliseconds
            return False
        return re.search(rf"(?<!{_NAME_CHAR}){re.escape(name)}(?!{_NAME_CHAR})", self._blob) is not None

    @functools.cached_property
    def names(self) -> frozenset[str]:
        """The names written after `task:`, `group:` or `tag:`: the candidates of a suggestion."""
        return frozenset(_ANY_NAME.findall(self._blob))

    @functools.cached_property
    def defining_file(self) -> dict[str, Path]:
        """Top-level `task:`/`group:` name → the YAML file that defines it (the first, in path order)."""
        found: dict[str, Path] = {}
        for path, text in self.texts.items():
            if path.suffix == ".yaml":
                for name in _DEFINITION.findall(text):
                    found.setdefault(name, path)
        return found


def check_task_names(names: Sequence[str], include_paths: Sequence[Path]) -> None:
    """Refuse a task name that no --include-path or built-in YAML mentions.

    Wildcards are left to lm-eval, which expands them against its index.

    Raises:
        UsageError: an --include-path that is no folder or holds a YAML that does not parse,
            or an unknown name (with the closest known one).
    """
    folders = [user_folder(p) for p in include_paths]
    if not names:
        return
    folders.append(builtin_folder())
    for name in names:
        if "*" not in name and not any(f.mentions(name) for f in folders):
            known = set(SHAPES).union(*(f.names for f in folders))
            raise UsageError(
                f"--tasks: unknown task {name!r}{did_you_mean(name, known)}", hint="--include-path DIR adds your own task YAMLs"
            )


def user_folder(root: Path) -> TaskFolder:
    """An --include-path folder, every YAML in it parsed.

    Raises:
        UsageError: the folder is missing, or a YAML file in it does not parse (naming file and line).
    """
    if not root.is_dir():
        raise UsageError(f"--include-path {root}: not a folder")
    folder = TaskFolder(_read_texts(root))
    for path, text in folder.texts.items():
        if path.suffix == ".yaml":
            try:
                yaml.load(text, Loader=_TaskYamlLoader)
            except yaml.YAMLError as e:
                raise UsageError(f"{path}: {yaml_problem(e)}", hint="lm-eval skips a task YAML it cannot parse") from None
    return folder


@functools.lru_cache(maxsize=1)
def builtin_folder() -> TaskFolder:
    """lm-eval's own task folder, found without importing lm-eval (which takes a second)."""
    spec = importlib.util.find_spec("lm_eval")
    return TaskFolder(_read_texts(Path(spec.submodule_search_locations[0]) / "tasks"))


def _read_texts(root: Path) -> dict[Path, str]:
    texts: dict[Path, str] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in _IGNORED_DIRS)
        for name in sorted(files):
            if name.endswith(".yaml") or "." not in name:
                path = Path(folder, name)
                texts[path] = path.read_bytes().decode("utf-8", errors="ignore")
    return texts


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads lm-eval task YAMLs without importing the code their `!function` tags name."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))
