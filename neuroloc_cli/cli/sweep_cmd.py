"""`neuroloc sweep`: a recipe merged and evaluated over a grid or a seeded search."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Optional

import typer

from neuroloc_cli.cli import render
from neuroloc_cli.cli.options import JsonOpt, RecipeArg, SetOpt

_SWEEP, _EVAL, _RUN = "What to sweep", "How to score", "Running"


def sweep(
    recipe: RecipeArg,
    grid: Annotated[
        Optional[list[str]],
        typer.Option(
            "--grid",
            help="KEY=V1,V2,…: every value of a recipe key (parameters.gamma, models.0.parameters.weight) or parameter (gamma); repeatable, every combination is a point.",
            rich_help_panel=_SWEEP,
            show_default=False,
        ),
    ] = None,
    search: Annotated[
        Optional[list[str]],
        typer.Option(
            "--search",
            help="KEY=LOW:HIGH[:log][:int]: a range the seeded optimizer draws from; repeatable.",
            rich_help_panel=_SWEEP,
            show_default=False,
        ),
    ] = None,
    trials: Annotated[int, typer.Option("--trials", min=1, help="Points a --search draws.", rich_help_panel=_SWEEP)] = 20,
    sampler: Annotated[str, typer.Option("--sampler", help="tpe (optuna's TPE) or random.", rich_help_panel=_SWEEP)] = "tpe",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the --search sampler.", rich_help_panel=_SWEEP)] = 0,
    set_: SetOpt = None,
    eval_: Annotated[
        Optional[list[str]],
        typer.Option(
            "--eval",
            help="KEY=VALUE: an option of `neuroloc eval` for scoring each point (tasks=neuroloc_math=FILE.jsonl, ppl=FILE.jsonl:LANG, limit=N, dtype=…); repeatable.",
            rich_help_panel=_EVAL,
            show_default=False,
        ),
    ] = None,
    objective: Annotated[
        Optional[str],
        typer.Option(
            "--objective",
            help="TASK.METRIC or a weighted sum (0.5*a.acc + 0.5*b.acc - 0.01*ppl_es.token_perplexity). Default: the first task's first metric (a perplexity negated).",
            rich_help_panel=_EVAL,
        ),
    ] = None,
    minimize: Annotated[bool, typer.Option("--minimize", help="Lower objective is better.", rich_help_panel=_EVAL)] = False,
    output: Annotated[
        Optional[Path],
        typer.Option("-o", "--output", help="Sweep folder: results, table, plot, best recipe; rerun to resume.", rich_help_panel=_RUN),
    ] = None,
    write_best: Annotated[
        bool, typer.Option("--write-best", help="Also merge the winner into OUTPUT/best/.", rich_help_panel=_RUN)
    ] = False,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Start afresh in a sweep folder of another sweep.", rich_help_panel=_RUN)
    ] = False,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Check every point's recipe and the evaluation; print the points and memory; load nothing.",
            rich_help_panel=_RUN,
        ),
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Show lm-eval's and transformers' logs.", rich_help_panel=_RUN)] = False,
    as_json: JsonOpt = False,
) -> None:
    """Merge a recipe at many settings and evaluate each point in memory; table, plot, best recipe.

    Each point is merged into one live model (no checkpoint on disk) and scored by the
    evaluator of `neuroloc eval`: its numbers are those of `merge` then `eval` of the same
    recipe. A killed sweep rerun with the same arguments skips its finished points."""
    from neuroloc_cli.errors import UsageError
    from neuroloc_cli.recipe.overrides import parse_assignment, read_recipe_source
    from neuroloc_cli.sweep.run import SweepSpec, parse_eval_options, plan_sweep, run_sweep
    from neuroloc_cli.sweep.space import parse_grid, parse_search

    spec = SweepSpec(
        recipe=read_recipe_source(recipe),
        grid=[parse_grid(g) for g in grid or []],
        search=[parse_search(s) for s in search or []],
        trials=trials,
        seed=seed,
        sampler=sampler,
        eval_options=parse_eval_options(eval_ or []),
        objective=objective,
        minimize=minimize,
        sets=[parse_assignment(s) for s in set_ or []],
    )
    if sampler not in ("tpe", "random"):
        raise UsageError(f"--sampler {sampler!r}: use tpe or random")
    plan = plan_sweep(spec)
    if dry_run:
        _dry_run(plan, as_json)
        return
    if output is None:
        raise UsageError("sweep needs an output folder", hint="pass -o DIR, or --dry-run to only check the sweep")
    total = len(plan.points) if spec.grid else spec.trials
    with render.progress("sweep", total) as advance:

        def on_point(point, best, done, total):
            advance(status=f"best {best.objective:.4g} at {_values(best.values)}" if math.isfinite(best.objective) else "")

        result = run_sweep(plan, output, overwrite=overwrite, write_best=write_best, on_point=on_point, verbose=verbose)
    if as_json:
        render.print_json(result.to_json())
        return
    _print(result)


def _values(values: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in values.items())


def _dry_run(plan, as_json: bool) -> None:
    doc = plan.to_json()
    if as_json:
        render.print_json(doc)
        return
    out = render.out()
    n = doc["points"]
    out.print(f"sweep of {plan.spec.recipe.name} ({doc['method']}): {n} point(s) over {', '.join(doc['keys'])}", markup=False)
    for point in doc["grid"] or []:
        out.print(f"  {_values(point)}", markup=False, highlight=False)
    mem = doc["memory_bytes"]
    out.print(
        f"memory: live model {render.human_bytes(mem['live_model'])} + cached inputs {render.human_bytes(mem['input_cache'])}"
        f" = {render.human_bytes(mem['total'])}, plus one tensor's working copies and the evaluation's activations",
        markup=False,
    )
    out.print(f"scored on: {', '.join(doc['tasks'])}", markup=False)


def _print(result) -> None:
    from rich.table import Table

    from neuroloc_cli.sweep.report import sketch

    keys = result.spec.keys
    table = Table(title=f"sweep: {result.objective} ({'lower' if result.spec.minimize else 'higher'} is better)")
    for col in ("rank", *keys, "objective", "s"):
        table.add_column(col, justify="right")
    for rank, p in enumerate(result.points, 1):
        cells = [f"{p.values[k]:.4g}" if isinstance(p.values[k], float) else str(p.values[k]) for k in keys]
        table.add_row(str(rank), *cells, "nan" if not math.isfinite(p.objective) else f"{p.objective:.4g}", f"{p.seconds:.1f}")
    out = render.out()
    out.print(table)
    for line in sketch(result.points, keys, result.spec.minimize):
        out.print(line, markup=False, highlight=False)
    if result.resumed:
        out.print(f"resumed: {result.resumed} point(s) were already done", markup=False)
    for name, path in result.files.items():
        out.print(f"{name}: {path}", markup=False, highlight=False)
