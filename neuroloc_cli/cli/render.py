"""Output helpers shared by commands: one JSON document on stdout, Rich for people on stderr.

Results go to stdout (a Rich table, or exactly one JSON document with `--json`); progress,
notes and errors go to stderr, without animation when stderr is not a terminal. Rich honours
`NO_COLOR`.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

# Created lazily so that tests which swap sys.stdout/sys.stderr (CliRunner) see their output.


def out() -> Console:
    console = Console(file=sys.stdout, soft_wrap=True)
    if not console.is_terminal:  # piped or redirected: keep long tensor names on one line
        console.width = max(console.width, 160)
    return console


def err() -> Console:
    return Console(file=sys.stderr, soft_wrap=True)


def print_json(doc: Any) -> None:
    """Write exactly one JSON document to stdout."""
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def human_count(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)


@contextmanager
def progress(description: str, total: int, completed: int = 0) -> Iterator[Any]:
    """A progress bar on stderr; yields `advance(n=1, status=None)`, `status` a short text
    shown after the bar (a sweep's best so far). Silent when stderr is not a terminal."""
    console = err()
    bar = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[status]}", markup=False),
        console=console,
        disable=not console.is_terminal,
        transient=False,
    )
    with bar:
        task = bar.add_task(description, total=total, completed=completed, status="")

        def advance(n: int = 1, status: str | None = None) -> None:
            bar.update(task, advance=n, **({"status": status} if status is not None else {}))

        yield advance


def merge_result(result: Any, as_json: bool) -> None:
    """What `merge`, `delta` and `ablate` print about the checkpoint they wrote (a `MergeResult`)."""
    doc = {
        "output": str(result.path),
        "tensors": result.tensors,
        "bytes": result.bytes,
        "shards": result.shards,
        "seconds": round(result.seconds, 3),
        "warnings": result.warnings,
    }
    for line in result.warnings:
        err().print(f"warning: {line}", markup=False, highlight=False)
    if as_json:
        print_json(doc)
    else:
        out().print(
            f"wrote [bold]{result.path}[/bold]: {result.tensors} tensors, {human_bytes(result.bytes)} in {len(result.shards)} shard(s), {result.seconds:.1f}s"
        )


def merge_plan(plan: Any, as_json: bool, what: str = "recipe") -> None:
    """What `recipe validate` and `--dry-run` print about a `MergePlan` (`what` was checked)."""
    from rich.table import Table

    from neuroloc_cli.merge.estimate import merge_memory
    from neuroloc_cli.merge.plan import describe_plan

    doc = describe_plan(plan)
    memory = merge_memory(plan).describe()
    for line in doc["warnings"]:
        err().print(f"warning: {line}", markup=False, highlight=False)
    if as_json:
        print_json({"valid": True, **doc, "memory_bytes": memory})
        return
    table = Table(
        title=f"{doc['method']} merge: {doc['tensors']} tensors, {human_bytes(doc['out_bytes'])} out, compute {doc['compute_dtype']}"
    )
    for col in ("role", "path", "tensors", "parameters"):
        table.add_column(col)
    for i in doc["inputs"]:
        table.add_row(i["role"], i["path"], str(i["tensors"]), human_count(i["parameters"]))
    out().print(table)
    parts = ("inputs", "next_inputs", "work", "masks")
    rows = "" if memory["peak_rows"] is None else f" rows {memory['peak_rows'][0]}-{memory['peak_rows'][1]}"
    out().print(
        f"disk: {human_bytes(doc['out_bytes'])} of tensors; memory at most "
        + " + ".join(f"{k.replace('_', ' ')} {human_bytes(memory[k])}" for k in parts if memory[k])
        + f" = {human_bytes(memory['total'])} (at {memory['peak_tensor']}{rows})"
    )
    for note in doc["notes"]:
        err().print(f"note: {note}")
    err().print(f"[green]{what} is valid[/green]: no tensor data was read, nothing was written")


def picture(doc: dict, mass: str) -> None:
    """What `mask show` / `importance show` wrote, and the concentration of the tensors they
    report (`mass`: what is counted, "selected elements" or "importance")."""
    from rich.table import Table

    from neuroloc_cli.masks.dimensions import NO_PROJECTIONS, TABLE_COLUMNS, describe, table_row, table_title

    console = out()
    console.print(f"wrote [bold]{doc['output']}[/bold] ({doc['width']}×{doc['height']} px)")
    if doc["concentration"] is not None:
        console.print(describe(doc["concentration"], mass), markup=False, highlight=False)
    if doc["dimensions"] is not None:
        table = Table(title=table_title(mass))
        for col, justify in TABLE_COLUMNS:
            table.add_column(col, justify=justify)
        for c in doc["dimensions"]:
            table.add_row(*table_row(c))
        console.print(table if doc["dimensions"] else NO_PROJECTIONS)
