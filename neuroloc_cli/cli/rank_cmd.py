"""`neuroloc rank`: tensors ranked by the similarity of two deltas (MAET Eq. 4)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from neuroloc_cli.cli import render
from neuroloc_cli.cli.options import JsonOpt


def rank(
    a: Annotated[Path, typer.Argument(help="Model A (with --base) or delta checkpoint A.", show_default=False)],
    b: Annotated[Path, typer.Argument(help="Model B (with --base) or delta checkpoint B.", show_default=False)],
    base: Annotated[Optional[Path], typer.Option("--base", help="Base model; the deltas are A − BASE and B − BASE.")] = None,
    metric: Annotated[str, typer.Option("--metric", help="dot (MAET Eq. 4) or cosine.")] = "dot",
    as_json: JsonOpt = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV instead of a table.")] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check the checkpoints' headers (same tensors and shapes) and print the memory the ranking holds; read no weights. It writes nothing to disk in any case.",
        ),
    ] = False,
) -> None:
    """Per-tensor similarity of the deltas of A and B, sorted descending."""
    from neuroloc_cli.errors import UsageError
    from neuroloc_cli.merge.stats import plan_rank, rank_deltas

    if as_json and as_csv:
        raise UsageError("--json and --csv exclude each other")
    if dry_run:
        _render_plan(plan_rank(a, b, base, metric), as_json)
        return
    rows = [s.as_dict() for s in rank_deltas(a, b, base, metric)]
    if as_json:
        render.print_json(rows)
    elif as_csv:
        writer = csv.DictWriter(sys.stdout, fieldnames=["tensor", "layer", "kind", "score", "numel"], lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    else:
        _table(rows, metric)


def _table(rows: list[dict], metric: str) -> None:
    from rich.table import Table

    table = Table(title=f"tensors by {metric} similarity of the two deltas (descending)")
    for col in ("#", "tensor", "layer", "kind", "score"):
        table.add_column(col, justify="right" if col in ("#", "score") else "left")
    for i, r in enumerate(rows, 1):
        table.add_row(str(i), r["tensor"], "-" if r["layer"] is None else str(r["layer"]), r["kind"], f"{r['score']:.6g}")
    render.out().print(table)


def _render_plan(doc: dict, as_json: bool) -> None:
    if as_json:
        render.print_json(doc)
        return
    mem = doc["memory_bytes"]
    render.out().print(
        f"would rank {doc['tensors']} tensors ({render.human_count(doc['elements'])} elements) by {doc['metric']}; "
        f"disk: nothing written; memory: blocks {render.human_bytes(mem['blocks'])} + float64 {render.human_bytes(mem['float64'])} "
        f"= {render.human_bytes(mem['total'])}"
    )
