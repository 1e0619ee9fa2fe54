"""Putting outputs in place: the renames that no signal may split, and the record of what a
command has written.

A command interrupted after it has put an output in place must not say "nothing was
written": the command line asks `written` what is there. The module imports no torch, so
the command line and the training log can use it at no cost.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# Every output this process has put in place, oldest first (see `note_written`).
_written: list[Path] = []


def note_written(path: Path) -> None:
    """Record that `path` now holds output of this process: an atomic output just put in
    place, or a file appended to line by line (a sweep's results, a training log)."""
    if path not in _written:
        _written.append(path)


def written(since: int = 0) -> list[Path]:
    """The outputs noted since the first `since` (see `written_count`) that still exist."""
    return [p for p in _written[since:] if p.exists()]


def written_count() -> int:
    """A mark for `written(since=...)`: the number of outputs noted so far."""
    return len(_written)


@contextmanager
def signals_held() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM over a few system calls that must not be split (an old output
    moved aside and the new one not yet in its place); the first signal that came meanwhile is
    raised as the block ends. Only the main thread receives signals, so elsewhere this does
    nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    caught: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM)
    before = {s: signal.signal(s, lambda signum, frame: caught.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, handler in before.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)  # None: set outside Python
        if caught:  # the first: its exception ends the command, as a second one would
            signal.raise_signal(caught[0])
