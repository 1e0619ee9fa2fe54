"""`neuroloc mask stats|union|intersect|diff|overlap|show`: masks as artifacts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from neuroloc_cli.cli import render
from neuroloc_cli.cli.options import JsonOpt, OverwriteOpt

mask_app = typer.Typer(help="Inspect, combine and draw masks.", no_args_is_help=True)

MaskArg = Annotated[Path, typer.Argument(help="Mask file (.safetensors, written by `neuroloc locate`).", show_default=False)]
OutOpt = Annotated[Path, typer.Option("-o", "--output", help="Mask file to write.")]


@mask_app.command("stats")
def stats(mask: MaskArg, as_json: JsonOpt = False) -> None:
    """Selected share per tensor, layer and tensor kind, and the total selected count."""
    from rich.table import Table

    from neuroloc_cli.masks import Mask
    from neuroloc_cli.masks.stats import mask_stats

    doc = mask_stats(Mask.load(mask))
    if as_json:
        render.print_json(doc)
        return
    console = render.out()
    console.print(
        f"[bold]{mask}[/bold]: {doc['granularity']} mask, {doc['selected_units']} of {doc['units']} units, "
        f"selected {doc['selected']} of {doc['total']} elements ({100 * doc['share']:.3f} %)"
    )
    for title, key, rows in (
        ("per layer", "layer", doc["layers"]),
        ("per tensor kind", "kind", doc["kinds"]),
        ("per tensor", "tensor", doc["tensors"]),
    ):
        table = Table(title=title)
        for col in (key, "selected", "total", "share"):
            table.add_column(col, justify="left" if col == key else "right")
        for r in rows:
            table.add_row(str(r[key]), str(r["selected"]), str(r["total"]), f"{100 * r['share']:.2f} %")
        console.print(table)


def _set_op(op: str, a: Path, b: Path, output: Path, overwrite: bool, as_json: bool, dry_run: bool = False) -> None:
    from neuroloc_cli.io.output import check_output_file
    from neuroloc_cli.masks import Mask
    from neuroloc_cli.masks.algebra import combine
    from neuroloc_cli.masks.stats import mask_stats

    check_output_file(output, [a, b], overwrite)
    result = combine(op, Mask.load(a), Mask.load(b), str(a), str(b))
    doc = mask_stats(result)
    if dry_run:  # masks are small (a byte per unit, a bit per element): the whole result is computed, not written
        data = result.data_bytes
        plan = {
            "output": str(output),
            "dry_run": True,
            "operation": op,
            **{k: doc[k] for k in ("granularity", "selected", "total", "share")},
        }
        plan.update(disk_bytes={"total": data}, memory_bytes={"total": sum(p.stat().st_size for p in (a, b)) + data})
        if as_json:
            render.print_json(plan)
        else:
            render.out().print(
                f"would write {output}: {op}, {doc['selected']} of {doc['total']} elements selected; disk "
                f"{render.human_bytes(data)}; memory {render.human_bytes(plan['memory_bytes']['total'])}"
            )
        return
    result.save(output)
    doc = {"output": str(output), "operation": op, **{k: doc[k] for k in ("granularity", "selected", "total", "share")}}
    if as_json:
        render.print_json(doc)
    else:
        render.out().print(
            f"wrote [bold]{output}[/bold]: {op}, {doc['granularity']} mask, {doc['selected']} of {doc['total']} elements selected"
        )


@mask_app.command("union")
def union(
    a: MaskArg,
    b: MaskArg,
    output: OutOpt,
    overwrite: OverwriteOpt = False,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Combine the masks and print the bytes the result takes on disk and in memory; write nothing.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Units selected in A or B."""
    _set_op("union", a, b, output, overwrite, as_json, dry_run)


@mask_app.command("intersect")
def intersect(a: MaskArg, b: MaskArg, output: OutOpt, overwrite: OverwriteOpt = False, as_json: JsonOpt = False) -> None:
    """Units selected in both A and B."""
    _set_op("intersect", a, b, output, overwrite, as_json)


@mask_app.command("diff")
def diff(a: MaskArg, b: MaskArg, output: OutOpt, overwrite: OverwriteOpt = False, as_json: JsonOpt = False) -> None:
    """Units selected in A but not in B."""
    _set_op("diff", a, b, output, overwrite, as_json)


@mask_app.command("overlap")
def overlap(a: MaskArg, b: MaskArg, as_json: JsonOpt = False) -> None:
    """Jaccard overlap of two masks' selected elements, per tensor and overall."""
    from rich.table import Table

    from neuroloc_cli.masks import Mask
    from neuroloc_cli.masks.algebra import overlap as compute

    rows, total = compute(Mask.load(a), Mask.load(b), str(a), str(b))
    if as_json:
        render.print_json({"jaccard": total.jaccard, "overall": total.as_dict(), "tensors": [r.as_dict() for r in rows]})
        return
    table = Table(title=f"overlap of {a} and {b}: Jaccard {total.jaccard:.4f}")
    for col in ("tensor", "A", "B", "A∩B", "A∪B", "Jaccard"):
        table.add_column(col, justify="left" if col == "tensor" else "right")
    for r in [*rows, total]:
        table.add_row(r.tensor, str(r.a), str(r.b), str(r.intersection), str(r.union), f"{r.jaccard:.4f}")
    render.out().print(table)


@mask_app.command("show")
def show(
    mask: MaskArg,
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG file to write.")],
    tensor: Annotated[
        Optional[str],
        typer.Option(
            "--tensor",
            help="Also draw this tensor's density by row and column, and report its concentration (name, glob or unique substring).",
        ),
    ] = None,
    dimensions: Annotated[
        bool,
        typer.Option(
            "--dimensions",
            help="Report, for every o_proj / down_proj (GPT-2: attn.c_proj / mlp.c_proj), the share of its selected elements "
            "in its top 1 % of rows and of columns.",
        ),
    ] = False,
    overwrite: OverwriteOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Draw a heat map of the selected share per layer × tensor kind (and one tensor's rows/columns).

    Concentration: the share of a tensor's selected elements in its top 1 % of rows (ranked by
    their own count) and of columns. Linear weights are [out, in] (rows: output dimensions);
    GPT-2's Conv1D weights are [in, out] (rows: input dimensions).
    """
    from neuroloc_cli.io.output import check_output_file
    from neuroloc_cli.masks import Mask
    from neuroloc_cli.masks.show import render_png

    check_output_file(output, [mask], overwrite)
    doc = render_png(Mask.load(mask), output, tensor, dimensions)
    if as_json:
        render.print_json(doc)
        return
    render.picture(doc, "selected elements")
