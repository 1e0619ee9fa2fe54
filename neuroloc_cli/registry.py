"""One generic registry for named, pluggable things (merge methods, locators, ...)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from neuroloc_cli.errors import UsageError, did_you_mean

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to entries; duplicates are a programming error, unknown names a user error.

    Args:
        kind: what the entries are, for messages ("merge method", "locator").
    """

    def __init__(self, kind: str):
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def decorator(self, name: str, wrap: Callable[[Callable], T]) -> Callable[[Callable], T]:
        """Return a decorator that registers `wrap(fn)` under `name`."""

        def _decorate(fn: Callable) -> T:
            return self.register(name, wrap(fn))

        return _decorate

    def get(self, name: str) -> T:
        """Return the entry called `name`.

        Raises:
            UsageError: no entry has that name; the message suggests the closest one.
        """
        try:
            return self._entries[name]
        except KeyError:
            raise UsageError(
                f"unknown {self.kind} {name!r}{did_you_mean(name, self._entries)}",
                hint=f"known: {', '.join(sorted(self._entries))}",
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._entries))

    def items(self) -> list[tuple[str, T]]:
        return sorted(self._entries.items())
