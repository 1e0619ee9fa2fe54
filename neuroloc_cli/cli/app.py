"""The `neuroloc` command: its Typer app, and the one place errors become exit codes."""

from __future__ import annotations

import os
import sys
import traceback
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from neuroloc_cli import __version__
from neuroloc_cli.errors import NeurolocError, RecipeError


class _Group(TyperGroup):
    """Maps the core's errors to one stderr line and an exit code (see `neuroloc_cli.errors`)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.Exit, click.ClickException, click.exceptions.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("neuroloc: interrupted; nothing was written", err=True)
            ctx.exit(130)
        except NeurolocError as e:
            if _debug(ctx):
                traceback.print_exc()
            lines = e.lines() if isinstance(e, RecipeError) else [str(e)]
            for line in lines:
                click.echo(f"error: {line}", err=True)
            ctx.exit(e.exit_code)
        except Exception as e:  # a bug: say so briefly, show the traceback on request
            if _debug(ctx):
                raise
            click.echo(f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", err=True)
            ctx.exit(1)


def _debug(ctx: click.Context) -> bool:
    return bool(ctx.obj and ctx.obj.get("debug")) or os.environ.get("NEUROLOC_DEBUG") == "1"


app = typer.Typer(
    cls=_Group,
    name="neuroloc",
    help="Offline LLM checkpoint surgery: locate abilities and languages in neurons, and move them.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        print(f"neuroloc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks of errors.")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    ctx.obj = {"debug": debug}


def _register() -> None:
    # Each module adds its commands to `app`; imports stay light so `--help` is instant.
    from neuroloc_cli.cli import (  # noqa: F401
        checkpoint_cmds,
        demo_cmd,
        eval_cmd,
        locate_cmds,
        mask_cmds,
        merge_cmds,
        rank_cmd,
        train_cmd,
    )


_register()


def main() -> None:
    """Console-script entry point."""
    sys.exit(app(prog_name="neuroloc"))
