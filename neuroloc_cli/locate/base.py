"""The locator registry, the same generic `Registry` as merge methods."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

from neuroloc_cli.registry import Registry


@dataclass(frozen=True)
class Locator:
    """A registered locator: a function that returns a `Mask`.

    Attributes:
        name: as in `neuroloc locate NAME`.
        fn: the function.
        paper: the reference, for `neuroloc locate list`.
    """

    name: str
    fn: Callable
    paper: str = ""

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.fn) or ""
        return doc.splitlines()[0] if doc else ""


LOCATORS: Registry[Locator] = Registry("locator")


def locator(name: str, *, paper: str = "") -> Callable[[Callable], Locator]:
    """Register a function as the locator `name`."""
    return LOCATORS.decorator(name, lambda fn: Locator(name, fn, paper))
