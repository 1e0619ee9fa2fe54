"""`neuroloc locate delta` (MAET Eq. 1) and `neuroloc locate list`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from neuroloc_cli.cli import render
from neuroloc_cli.cli.options import JsonOpt

locate_app = typer.Typer(help="Find the units that matter and save them as a mask.", no_args_is_help=True)


@locate_app.command("delta")
def delta(
    base: Annotated[Path, typer.Argument(help="Base checkpoint folder.", show_default=False)],
    tuned: Annotated[Path, typer.Argument(help="Trained checkpoint folder (or a delta checkpoint).", show_default=False)],
    output: Annotated[Path, typer.Option("-o", "--output", help="Mask file to write (.safetensors).")],
    top: Annotated[float, typer.Option("--top", help="Share of units to keep, e.g. 0.05 for 5 %.")] = 0.05,
    granularity: Annotated[str, typer.Option("--granularity", help="row (output neurons), ffn (MLP neurons) or element.")] = "row",
    scope: Annotated[
        str, typer.Option("--scope", help="global: rank all units together (the paper); tensor: top share of each tensor.")
    ] = "global",
    include: Annotated[
        Optional[list[str]],
        typer.Option(
            "--include",
            help="Rank only tensors matching this glob or substring (repeatable). Default: rows of every 2-D weight, token rows of the embedding and LM head included; ffn and element: the transformer blocks.",
            show_default=False,
        ),
    ] = None,
    exclude: Annotated[
        Optional[list[str]],
        typer.Option(
            "--exclude",
            help="Leave out tensors matching this glob or substring (repeatable), e.g. --exclude '*embed*'.",
            show_default=False,
        ),
    ] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing mask file.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Select the units whose weights changed most (importance = norm of the change)."""
    from neuroloc_cli.io.output import check_output_file
    from neuroloc_cli.locate import LOCATORS
    from neuroloc_cli.masks.stats import mask_stats

    check_output_file(output, [base, tuned], overwrite)
    mask = LOCATORS.get("delta").fn(
        base, tuned, top=top, granularity=granularity, scope=scope, include=include or (), exclude=exclude or ()
    )
    stats = mask_stats(mask)
    mask.save(output)
    _render_saved(output, stats, mask.provenance, as_json)


def _render_saved(path: Path, stats: dict, provenance: dict, as_json: bool) -> None:
    # units: the locator's neurons (a bias entry shares its weight row's unit), not mask entries
    doc = {"output": str(path), **{k: stats[k] for k in ("granularity", "selected", "total", "share")}}
    doc.update(units=provenance.get("units", stats["units"]), selected_units=provenance.get("selected_units", stats["selected_units"]))
    if as_json:
        render.print_json(doc)
        return
    render.out().print(
        f"wrote [bold]{path}[/bold]: {doc['granularity']} mask, {doc['selected_units']} of {doc['units']} units, "
        f"{render.human_count(doc['selected'])} of {render.human_count(doc['total'])} elements ({100 * doc['share']:.2f} %)"
    )


@locate_app.command("list")
def list_locators(as_json: JsonOpt = False) -> None:
    """List the locators with their papers."""
    from neuroloc_cli.locate import LOCATORS

    docs = [{"name": name, "summary": loc.summary, "paper": loc.paper} for name, loc in LOCATORS.items()]
    if as_json:
        render.print_json(docs)
        return
    for d in docs:
        render.out().print(f"[bold]{d['name']}[/bold]: {d['summary']} ({d['paper']})")
