"""`neuroloc importance stats|show`: importance files as artifacts, inspected as masks are."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from neuroloc_cli.cli import render
from neuroloc_cli.cli.options import JsonOpt, OverwriteOpt

importance_app = typer.Typer(help="Inspect and draw importance files (the scores masks are selected from).", no_args_is_help=True)

ImportanceArg = Annotated[
    Path, typer.Argument(help="Importance file (.safetensors, written by `neuroloc locate ...`).", show_default=False)
]


@importance_app.command("stats")
def stats(file: ImportanceArg, as_json: JsonOpt = False) -> None:
    """Sum, mean, max and share of the importance per tensor, layer and tensor kind, and how
    much of it the top 1 % of elements hold. Reads one tensor at a time."""
    from rich.table import Table

    from neuroloc_cli.masks.importance import Importance
    from neuroloc_cli.masks.importance_stats import importance_stats

    doc = importance_stats(Importance.open(file))
    if as_json:
        render.print_json(doc)
        return
    console = render.out()
    source = f" of {doc['source']}" if doc["source"] else ""
    console.print(
        f"[bold]{file}[/bold]: {doc['score']} scores{source} ({doc['granularity']}, aggregate {doc['aggregate']}), "
        f"{doc['tensor_count']} tensors, {doc['elements']} elements; sum {_num(doc['sum'])}, mean {_num(doc['mean'])}, "
        f"max {_num(doc['max'])}; top 1 % of elements hold {_pct(doc['top_share'])}"
    )
    for key, value in doc["fingerprints"].items():
        console.print(f"{key}: {value}")
    for title, key, rows in (
        ("per layer", "layer", doc["layers"]),
        ("per tensor kind", "kind", doc["kinds"]),
        ("per tensor", "tensor", doc["tensors"]),
    ):
        table = Table(title=title)
        for col in (key, "elements", "sum", "mean", "max", "share", "top 1 % hold"):
            table.add_column(col, justify="left" if col == key else "right")
        for r in rows:
            table.add_row(
                str(r[key]), str(r["elements"]), _num(r["sum"]), _num(r["mean"]), _num(r["max"]), _pct(r["share"]), _pct(r["top_share"])
            )
        console.print(table)


@importance_app.command("show")
def show(
    file: ImportanceArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG file to write.")],
    tensor: Annotated[
        Optional[str],
        typer.Option(
            "--tensor",
            help="Also draw this tensor's importance by row and column, and report its concentration (name, glob or unique substring).",
        ),
    ] = None,
    dimensions: Annotated[
        bool,
        typer.Option(
            "--dimensions",
            help="Report, for every o_proj / down_proj (GPT-2: attn.c_proj / mlp.c_proj), the share of its importance "
            "in its top 1 % of rows and of columns.",
        ),
    ] = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Draw a heat map of the mean importance per layer × tensor kind, each kind's column scaled
    to its largest mean (and one tensor's importance by row and column).

    Concentration: the share of a tensor's importance in its top 1 % of rows (ranked by their
    own sum) and of columns. Linear weights are [out, in] (rows: output dimensions); GPT-2's
    Conv1D weights are [in, out] (rows: input dimensions).
    """
    from neuroloc_cli.io.output import check_output_file
    from neuroloc_cli.masks.importance import Importance
    from neuroloc_cli.masks.show import render_importance_png

    check_output_file(output, [file], overwrite)
    doc = render_importance_png(Importance.open(file), output, tensor, dimensions)
    if as_json:
        render.print_json(doc)
        return
    render.picture(doc, "importance")


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def _pct(share: float | None) -> str:
    return "-" if share is None else f"{100 * share:.2f} %"
