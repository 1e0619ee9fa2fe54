"""Options and parsers that several commands share.

This module imports no command module (and nothing heavy), so that any command module can be
imported on its own: `app.py` imports the commands, never the other way round.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON document instead of tables.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output.")]
ModelArg = Annotated[Path, typer.Argument(help="Checkpoint folder (safetensors, config.json).", show_default=False)]

# The data locators' shared options (`locate gradient`, `locate lape`)
LanguagesOpt = Annotated[
    list[str],
    typer.Option("--data", help="LANG=PATH: one language's corpus (.txt, .jsonl or a folder); repeatable, at least 2.", show_default=False),
]
SeqLenOpt = Annotated[
    Optional[int],
    typer.Option("--seq-len", help="Tokens per row. Default: the smaller of 512 and the model's positions.", show_default=False),
]
ExcludeOpt = Annotated[
    Optional[list[str]],
    typer.Option("--exclude", help="Leave out tensors matching this glob or substring (repeatable).", show_default=False),
]


def shard_size_option(text: str) -> int:
    """Parse `--max-shard-size`, naming the option in the error."""
    from neuroloc_cli.errors import UsageError
    from neuroloc_cli.io.writer import parse_size

    try:
        return parse_size(text)
    except ValueError as e:
        raise UsageError(f"--max-shard-size: {e}") from None


RecipeArg = Annotated[
    Path, typer.Argument(help="Merge recipe (YAML, mergekit's shape); - reads it from standard input.", show_default=False)
]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        "--set",
        help="PATH=VALUE: change a recipe key before it is checked, e.g. parameters.gamma=0.5, models.0.parameters.weight=0.7 (repeatable; null removes a key).",
        show_default=False,
    ),
]
