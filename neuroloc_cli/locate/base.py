"""The locator registry: a locator is a name, an options model and a run (score, then select).

`neuroloc locate NAME` parses its flags into the locator's options (`Locator.parse`, one
place where settings are validated and their errors worded), and `Locator.run` scores and
selects. `neuroloc locate list` shows every locator with what it reads and its options, from
the options models' own field descriptions, so the list cannot drift from the code.

Adding a locator: one module in `locate/` with an options model (a `LocatorOptions`
subclass; `DataOptions` for locators that run the model on corpora) and a function taking it,
decorated with `@locator(name, options=..., reads=..., paper=...)`; import it in
`locate/__init__.py`; add its command in `cli/locate_cmds.py` (flags named as the fields).
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, ValidationError, model_validator

from neuroloc_cli.config_models import Frozen
from neuroloc_cli.errors import UsageError
from neuroloc_cli.registry import Registry


@dataclass(frozen=True)
class Language:
    """One language's corpus, as `--data LANG=PATH` gave it."""

    name: str
    path: Path


_LANG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a language name is also a file name


def parse_languages(specs: Sequence[str]) -> list[Language]:
    """The `--data LANG=PATH` values, checked: at least two languages, each named once.

    Raises:
        UsageError: a value without `=`, an empty or odd language name, a repeated
            language, or fewer than two languages.
    """
    out: list[Language] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not path:
            raise UsageError(f"--data {spec!r}: expected LANG=PATH", hint="e.g. --data en=en.txt --data es=es.jsonl")
        if not _LANG.match(name):
            raise UsageError(
                f"--data {spec!r}: language name {name!r} must be letters, digits, '_', '-' or '.'", hint="e.g. en, es, zh-Hans"
            )
        if any(lang.name == name for lang in out):
            raise UsageError(f"--data: language {name!r} given twice")
        out.append(Language(name, Path(path)))
    if len(out) < 2:
        raise UsageError(f"--data: {len(out)} language given, need at least 2", hint="core and monolingual regions compare languages")
    return out


class LocatorOptions(Frozen):
    """A locator's validated settings: every field is a flag of its command (`top` is `--top`),
    or a positional argument where the field says so (`ARGUMENT`)."""


ARGUMENT: dict[str, Any] = {"argument": True}  # `json_schema_extra` of a field given positionally
INTERNAL: dict[str, Any] = {"internal": True}  # a setting for library callers, with no flag


class FilterOptions(LocatorOptions):
    """Which tensors take part, by name."""

    include: tuple[str, ...] = Field(default=(), description="only tensors matching these globs or substrings")
    exclude: tuple[str, ...] = Field(default=(), description="leave out tensors matching these globs or substrings")


class DataOptions(LocatorOptions):
    """A locator that runs a checkpoint's model on one corpus per language."""

    model: Path = Field(description="checkpoint folder, with its tokenizer", json_schema_extra=ARGUMENT)
    data: tuple[str, ...] = Field(description="LANG=PATH, one corpus per language (at least 2)")
    samples: int | None = Field(default=None, ge=1, description="packed rows per language (default 64)")
    max_tokens: int | None = Field(default=None, ge=1, description="tokens per language, instead of samples")
    seq_len: int | None = Field(default=None, ge=2, description="tokens per row (default: min(512, the model's positions))")
    batch_size: int = Field(default=8, ge=1, description="rows per pass")

    @model_validator(mode="after")
    def _data(self) -> DataOptions:
        parse_languages(self.data)  # its usage error, worded for --data, goes straight out
        if self.samples is not None and self.max_tokens is not None:
            raise UsageError("--samples and --max-tokens both given", hint="give one: rows per language, or tokens per language")
        return self

    @property
    def languages(self) -> list[Language]:
        return parse_languages(self.data)


@dataclass(frozen=True)
class Locator:
    """A registered locator.

    Attributes:
        name: as in `neuroloc locate NAME`.
        fn: the function: options -> its result (a `Mask`, or an object with `save`).
        options: the options model `fn` takes.
        reads: what it scores, for `neuroloc locate list` ("two checkpoints", "a model on corpora").
        paper: the reference.
    """

    name: str
    fn: Callable[[Any], Any]
    options: type[LocatorOptions]
    reads: str = ""
    paper: str = ""

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.fn) or ""
        return doc.splitlines()[0] if doc else ""

    def parse(self, **values: Any) -> LocatorOptions:
        """Validate settings (flags by their field names) into the options model.

        Raises:
            UsageError: naming the flag (`--max-tokens`) and what is wrong with its value.
        """
        try:
            return self.options(**values)
        except ValidationError as e:
            err = e.errors()[0]
            flag = "--" + str(err["loc"][0]).replace("_", "-") if err["loc"] else self.name
            msg = err["msg"].removeprefix("Value error, ")
            raise UsageError(
                f"{flag}: {msg}" if not msg.startswith(flag) else msg, hint=f"see 'neuroloc locate {self.name} --help'"
            ) from None

    def run(self, **values: Any) -> Any:
        """Parse the settings and run the locator."""
        return self.fn(self.parse(**values))

    def describe(self) -> dict[str, Any]:
        """Name, summary, what it reads, paper and options (flag, default, description)."""
        options = []
        for name, field in self.options.model_fields.items():
            extra = field.json_schema_extra or {}
            if extra.get("internal"):
                continue
            default = None if field.is_required() else field.get_default(call_default_factory=True)
            argument = extra.get("argument", False)
            options.append(
                {
                    "flag": name.upper() if argument else "--" + name.replace("_", "-"),
                    "required": field.is_required(),
                    "default": list(default) if isinstance(default, tuple) else default,
                    "description": field.description or "",
                }
            )
        options.sort(key=lambda o: not o["flag"].isupper())  # arguments first, as in the usage line
        return {"name": self.name, "summary": self.summary, "reads": self.reads, "paper": self.paper, "options": options}


LOCATORS: Registry[Locator] = Registry("locator")


def locator(name: str, *, options: type[LocatorOptions], reads: str = "", paper: str = "") -> Callable[[Callable], Locator]:
    """Register a function taking `options` as the locator `name`."""
    return LOCATORS.decorator(name, lambda fn: Locator(name, fn, options, reads, paper))
