"""JSON Lines files: one JSON object per line (training corpora, eval data, translation pairs).

One reader, one way to name a problem: `FILE:LINE: what is wrong`, the line being the file's
own line number (blank lines count, and are skipped), as compilers and editors write it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from neuroloc_cli.errors import InputError


def records(path: Path, text: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each non-blank line of `text` (the contents of `path`) as (line number, JSON object).

    Lines end at `\n` only (a `\r` before it is dropped): `str.splitlines` would also break at
    U+2028, U+2029 and U+0085, which JSON strings may hold unescaped.

    Raises:
        InputError: `FILE:LINE:` a line that is not JSON, or not a JSON object.
    """
    for number, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise record_error(path, number, f"not a JSON record ({e.msg})") from None
        if not isinstance(record, dict):
            raise record_error(path, number, "a record must be a JSON object")
        yield number, record


def record_error(path: Path, line: int, problem: str, hint: str | None = None) -> InputError:
    """The error for a problem with the record on `line` of `path`."""
    return InputError(f"{path}:{line}: {problem}", hint=hint)
