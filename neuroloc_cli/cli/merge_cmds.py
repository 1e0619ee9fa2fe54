"""`neuroloc merge`, `neuroloc recipe validate`, `neuroloc methods`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from neuroloc_cli.cli import render
from neuroloc_cli.cli.options import JsonOpt, RecipeArg, SetOpt, shard_size_option

recipe_app = typer.Typer(help="Check and explain merge recipes.", no_args_is_help=True)


def _load_plan(recipe: Path, sets: list[str] | None = None):
    from neuroloc_cli.merge.plan import build_plan
    from neuroloc_cli.recipe.overrides import parse_assignment, read_recipe_source

    assignments = [parse_assignment(s) for s in sets or []]
    source = read_recipe_source(recipe)
    return build_plan(source.recipe(assignments), source.folder, source.name)


@recipe_app.command("validate")
def validate(recipe: RecipeArg, set_: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Check a recipe and its checkpoints' headers; print the plan; read no tensor data."""
    render.merge_plan(_load_plan(recipe, set_), as_json)


def merge(
    recipe: RecipeArg,
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Output folder (appears atomically).")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Validate and print the plan; write nothing.")] = False,
    seed: Annotated[Optional[int], typer.Option("--seed", help="Seed for random methods (overrides random_seed).")] = None,
    max_shard_size: Annotated[str, typer.Option("--max-shard-size", help="Output shard size cap, e.g. 5GB, 500MB.")] = "5GB",
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")] = False,
    set_: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Merge checkpoints as a YAML recipe says, streaming tensor by tensor."""
    from neuroloc_cli.errors import UsageError
    from neuroloc_cli.merge.run import run_merge

    plan = _load_plan(recipe, set_)
    if dry_run:
        render.merge_plan(plan, as_json)
        return
    if output is None:
        raise UsageError("merge needs an output folder", hint="pass -o OUT_DIR, or --dry-run to only check the recipe")
    shard_bytes = shard_size_option(max_shard_size)
    with render.progress(f"{plan.method.name}", len(plan.steps)) as advance:
        result = run_merge(plan, output, max_shard_bytes=shard_bytes, overwrite=overwrite, seed=seed, on_tensor=lambda _: advance())
    render.merge_result(result, as_json)


def methods(as_json: JsonOpt = False) -> None:
    """List merge methods with their parameters, defaults and papers."""
    from rich.table import Table

    from neuroloc_cli.methods import METHODS

    docs = [
        {
            "name": name,
            "summary": m.summary,
            "needs_base": m.needs_base,
            "paper": m.paper,
            "parameters": [
                {"name": p.name, "default": p.default, "per_model": p.per_model, "required": p.required, "help": p.help} for p in m.params
            ],
        }
        for name, m in METHODS.items()
    ]
    if as_json:
        render.print_json(docs)
        return
    table = Table(title="merge methods")
    for col in ("method", "parameters (default)", "base", "paper"):
        table.add_column(col)
    for d in docs:
        params = ", ".join(
            f"{p['name']}{'' if p['required'] else '=' + str(p['default'])}{' (per model)' if p['per_model'] else ''}"
            for p in d["parameters"]
        )
        table.add_row(f"[bold]{d['name']}[/bold]\n{d['summary']}", params or "-", "yes" if d["needs_base"] else "no", d["paper"])
    render.out().print(table)
