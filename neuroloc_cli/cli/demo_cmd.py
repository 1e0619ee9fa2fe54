"""`neuroloc demo`: the three papers' experiments on a toy multilingual world, for a first run.

`neuroloc demo --quick` builds the world and a tiny pretrained Llama (cached), then runs
MAET, linguistic regions, LANDeRMT and a sweep of MAET's coefficients as the exact `neuroloc`
commands a user would type, in-process, and writes DIR/report.md. `neuroloc demo FOLDER` (a
folder argument) keeps the older example: tiny random-weight checkpoints merged by a recipe.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from neuroloc_cli.cli import render
from neuroloc_cli.cli.options import JsonOpt

_MARKER = ".neuroloc-demo"

_RECIPE = """\
# Written by `neuroloc demo`: task arithmetic of two tiny "fine-tunes" onto their base.
merge_method: task_arithmetic
base_model: ./base
models:
  - model: ./math
    parameters: {weight: 0.7}
  - model: ./spanish
    parameters:
      weight:
        - filter: "*.mlp.*"   # glob: MLP tensors take more of the Spanish vector
          value: 0.5
        - value: 0.3          # default for every other tensor
parameters:
  lambda: 1.0
dtype: float32
out_dtype: bfloat16
"""


def demo(
    ctx: typer.Context,
    folder: Annotated[
        Optional[Path],
        typer.Argument(help="Instead of the experiments: build the random-weight merge example in this folder.", show_default=False),
    ] = None,
    output: Annotated[
        Path, typer.Option("-o", "--output", help="Folder of the experiments and report.md (replaced if a demo made it).")
    ] = Path("neuroloc-demo"),
    quick: Annotated[bool, typer.Option("--quick", help="The small run: a few minutes on a laptop CPU.")] = False,
    only: Annotated[
        Optional[str], typer.Option("--only", help="Comma-separated experiments: maet, regions, landermt, sweep [all].", show_default=False)
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the world and every run.")] = 0,
    as_json: JsonOpt = False,
    level: Annotated[Optional[str], typer.Option("--level", hidden=True, help="tiny, quick or full (tests use tiny).")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="With FOLDER: rebuild an existing example folder.")] = False,
) -> None:
    """Run the papers' experiments (MAET, linguistic regions, LANDeRMT, a MAET sweep) on a toy multilingual world."""
    if folder is None:
        _experiments(ctx, output, quick=quick, only=only, seed=seed, as_json=as_json, level=level)
        return
    _example(folder, overwrite)


def _experiments(ctx: typer.Context, output: Path, *, quick: bool, only: str | None, seed: int, as_json: bool, level: str | None) -> None:
    from neuroloc_cli.demo.experiments import EXPERIMENTS
    from neuroloc_cli.demo.run import run_demo
    from neuroloc_cli.demo.settings import LEVELS
    from neuroloc_cli.errors import UsageError, did_you_mean

    name = level or ("quick" if quick else "full")
    if name not in LEVELS:
        raise UsageError(f"--level {name!r}: expected one of {', '.join(LEVELS)}")
    chosen = [x.strip() for x in (only or ",".join(EXPERIMENTS)).split(",") if x.strip()]
    for x in chosen:
        if x not in EXPERIMENTS:
            raise UsageError(
                f"--only {x!r}: no such experiment{did_you_mean(x, EXPERIMENTS)}", hint=f"choose from {', '.join(EXPERIMENTS)}"
            )
    log = render.err()
    result = run_demo(
        output,
        LEVELS[name],
        seed=seed,
        only=chosen,
        runner=_runner(ctx),
        on_step=lambda step: log.print(f"[dim]· {step}[/dim]", highlight=False),
        on_experiment=(lambda e: None) if as_json else _show,
    )
    if as_json:
        render.print_json(result.to_dict())
        return
    log.print(f"wrote [bold]{output / 'report.md'}[/bold] in {result.seconds:.0f}s (level {name}, seed {seed})")


def _runner(ctx: typer.Context) -> Any:
    """Runs one neuroloc command in this process, its output into a log file; raises on failure."""
    import contextlib
    import shlex

    from neuroloc_cli.errors import InputError, NeurolocError, OutputError, UsageError

    root = ctx.find_root().command

    def run(argv: list[str], log: Path) -> None:
        with open(log, "w", encoding="utf-8") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            code = root.main(args=list(argv), prog_name="neuroloc", standalone_mode=False)
        if code:
            last = next((line for line in reversed(log.read_text().splitlines()) if line.strip()), "")
            kind = {2: UsageError, 3: InputError, 4: OutputError}.get(code, NeurolocError)
            raise kind(f"demo step `neuroloc {shlex.join(argv)}` failed (exit {code}): {last}", hint=f"its log: {log}")

    return run


def _show(exp: Any) -> None:
    """An experiment's tables and the papers' claims, as it finishes."""
    from rich.table import Table

    console = render.out()
    console.rule(f"[bold]{exp.title}")
    if exp.note:
        console.print(exp.note)
    for t in exp.tables:
        table = Table(title=t.title, title_justify="left")
        for i, c in enumerate(t.columns):
            table.add_column(c, justify="left" if i == 0 else "right")
        for row in t.rows:
            table.add_row(*("–" if v is None else f"{v:g}" if isinstance(v, float) else str(v) for v in row))
        console.print(table)
    for c in exp.claims:
        mark = {True: "[green]seen[/green]", False: "[red]not seen[/red]", None: "cannot tell"}[c.holds]
        console.print(f"{mark}: {c.claim}\n    here: {c.observed}", highlight=False)


def _example(folder: Path, overwrite: bool) -> None:
    """Build tiny example checkpoints (Llama-style, random weights) and merge them with a recipe."""
    import shutil

    import torch

    from neuroloc_cli.errors import OutputError
    from neuroloc_cli.merge.plan import build_plan
    from neuroloc_cli.merge.run import run_merge
    from neuroloc_cli.recipe.schema import parse_recipe
    from neuroloc_cli.synthetic import build_checkpoint, derive_finetune, tiny_config

    if folder.exists():
        if not overwrite:
            raise OutputError(f"{folder}: already exists", hint="pass --overwrite, or give another folder")
        if not (folder / _MARKER).is_file():  # --overwrite deletes the folder: only one the demo made
            raise OutputError(
                f"{folder}: not a folder neuroloc demo made (no {_MARKER} in it); refusing to delete it", hint="give another folder"
            )
        shutil.rmtree(folder)
    log = render.err()
    log.print(f"building tiny checkpoints in {folder}/ (base, math, spanish)")
    try:
        folder.mkdir(parents=True)
        (folder / _MARKER).write_text("made by `neuroloc demo`; `neuroloc demo FOLDER --overwrite` may delete this folder\n")
        build_checkpoint(tiny_config("llama", layers=4, hidden=128), folder / "base", seed=0, dtype=torch.bfloat16, max_shard_bytes=200_000)
        derive_finetune(folder / "base", folder / "math", seed=1)
        derive_finetune(folder / "base", folder / "spanish", seed=2)
        (folder / "recipe.yaml").write_text(_RECIPE)
        plan = build_plan(parse_recipe(_RECIPE, str(folder / "recipe.yaml")), folder, str(folder / "recipe.yaml"))
        with render.progress("task_arithmetic", len(plan.steps)) as advance:
            result = run_merge(plan, folder / "merged", on_tensor=lambda _: advance())
    except BaseException:  # nothing half-built is left behind (errors, Ctrl-C, SIGTERM)
        shutil.rmtree(folder, ignore_errors=True)
        raise
    render.out().print(
        f"merged {result.tensors} tensors into [bold]{result.path}[/bold] in {result.seconds:.2f}s\n"
        f"next: neuroloc inspect {result.path}    ·    neuroloc recipe validate {folder / 'recipe.yaml'}"
    )
