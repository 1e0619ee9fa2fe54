"""Errors the core raises for the CLI to render.

The core never prints or exits. It raises one of these, and `neuroloc_cli.cli.app` turns it
into one line on stderr and an exit code. Every message names the file, tensor or recipe key
at fault and, where there is one, how to fix it.

Exit codes (stable, documented in the README):

    0  success
    1  unexpected internal error (a bug: rerun with --debug and report it)
    2  usage error: bad command line, recipe or parameter
    3  input error: missing, truncated or inconsistent checkpoint, mask or data file
    4  output error: the output path cannot be written
    130 interrupted (Ctrl-C)
"""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable, Sequence

# OS errors that are the output's fault wherever they are met (exit 4, not a bug): a full
# disk or quota, a file too large for the file system, a read-only file system.
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


class NeurolocError(Exception):
    """Base class of every error a user can cause and fix."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


class UsageError(NeurolocError):
    """The command line or a parameter is wrong."""

    exit_code = 2


class RecipeError(UsageError):
    """A recipe has one or more problems; all of them are reported at once."""

    def __init__(self, source: str, problems: Sequence[str], exit_code: int = 2):
        self.source = source
        self.exit_code = exit_code
        self.problems = list(problems)
        head = f"{source}: " + self.problems[0]
        if len(self.problems) > 1:
            head += f" (and {len(self.problems) - 1} more problem(s))"
        super().__init__(head)

    def lines(self) -> list[str]:
        """One line per problem, each prefixed with the recipe's file name."""
        return [f"{self.source}: {p}" for p in self.problems]


class InputError(NeurolocError):
    """An input checkpoint, mask or data file is missing, unreadable or inconsistent."""

    exit_code = 3


class OutputError(NeurolocError):
    """The output path cannot be used (it is an input, exists, or cannot be written)."""

    exit_code = 4


def did_you_mean(name: str, choices: Iterable[str]) -> str:
    """Return ' (did you mean "x"?)' for the closest choice, or '' if none is close."""
    close = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.6)
    return f' (did you mean "{close[0]}"?)' if close else ""
