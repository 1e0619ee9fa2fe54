"""The `neuroloc` command: its Typer app, and the one place errors become exit codes.

Command modules define plain functions (and the sub-apps `recipe`, `locate`, `mask`, `importance`); this
module registers them. They never import this module, so each can be imported on its own.
"""

from __future__ import annotations

import os
import signal
import sys
import traceback
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from neuroloc_cli import __version__
from neuroloc_cli.cli import (
    checkpoint_cmds,
    demo_cmd,
    eval_cmd,
    importance_cmds,
    locate_cmds,
    mask_cmds,
    merge_cmds,
    rank_cmd,
    sweep_cmd,
    train_cmd,
)
from neuroloc_cli.errors import WRITE_ERRNOS, NeurolocError, RecipeError
from neuroloc_cli.io import commit

# Exceptions through which the command-line layer itself reports: `--help` and `--version`
# (Exit), usage errors of the command line (a missing argument, an unknown option, `--seed
# abc`), and aborts. They are passed on untouched, so that Typer prints them and exits 0 or 2.
_CLI_SIGNALS: tuple[type[BaseException], ...] = (typer.Exit, typer.Abort, typer.TyperException)


class Terminated(KeyboardInterrupt):
    """SIGTERM (sent by `timeout`, schedulers and containers), handled like Ctrl-C: every
    atomic output removes its temporary folder on the way out."""


class _Group(TyperGroup):
    """Maps the core's errors to one stderr line and an exit code (see `neuroloc_cli.errors`)."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        """Run the command; usage errors of the command line, too, are one line on stderr."""
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            code = super().main(*args, standalone_mode=False, **kwargs)
        except typer.TyperException as e:
            ctx = getattr(e, "ctx", None)
            if ctx is None or type(e).__name__ == "NoArgsIsHelpError":  # `neuroloc mask`: the help, exit 2
                e.show()  # type: ignore[attr-defined]
            else:
                typer.echo(f"error: {e.format_message()} (see '{ctx.command_path} --help')", err=True)
            sys.exit(e.exit_code)
        except typer.Abort:
            typer.echo("neuroloc: aborted; nothing was written", err=True)
            sys.exit(130)
        sys.exit(code if isinstance(code, int) else 0)

    def invoke(self, ctx: Any) -> Any:
        mark = commit.written_count()
        try:
            return super().invoke(ctx)
        except _CLI_SIGNALS:
            raise
        except KeyboardInterrupt as e:
            what = "terminated" if isinstance(e, Terminated) else "interrupted"
            _fail(ctx, f"neuroloc: {what}; {_what_was_written(commit.written(since=mark))}", 143 if isinstance(e, Terminated) else 130)
        except NeurolocError as e:
            if _debug(ctx):
                traceback.print_exc()
            _fail(ctx, [f"error: {line}" for line in (e.lines() if isinstance(e, RecipeError) else [str(e)])], e.exit_code)
        except OSError as e:
            if e.errno not in WRITE_ERRNOS or _debug(ctx):
                return _bug(ctx, e)
            _fail(ctx, f"error: {e.filename or 'output'}: cannot write ({os.strerror(e.errno)})", 4)
        except Exception as e:  # a bug: say so briefly, show the traceback on request
            _bug(ctx, e)


def _what_was_written(paths: list[Path]) -> str:
    """The end of an interrupted command's message: nothing was written, or which outputs are
    already in place, each whole (at most three named)."""
    if not paths:
        return "nothing was written"
    named = ", ".join(str(p) for p in paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
    return f"already written, each whole: {named}"


def _fail(ctx: Any, lines: str | list[str], code: int) -> None:
    for line in [lines] if isinstance(lines, str) else lines:
        typer.echo(line, err=True)
    ctx.exit(code)


def _bug(ctx: Any, e: Exception) -> None:
    if _debug(ctx):
        raise e
    _fail(ctx, f"internal error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", 1)


def _debug(ctx: Any) -> bool:
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
    version: Annotated[bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")] = False,
) -> None:
    ctx.obj = {"debug": debug}


app.command()(checkpoint_cmds.inspect)
app.command()(checkpoint_cmds.delta)
app.command()(checkpoint_cmds.ablate)
app.command("export-pair")(checkpoint_cmds.export_pair)
app.command()(checkpoint_cmds.convert)
app.command()(merge_cmds.merge)
app.command()(merge_cmds.methods)
app.add_typer(merge_cmds.recipe_app, name="recipe")
app.command()(rank_cmd.rank)
app.add_typer(locate_cmds.locate_app, name="locate")
app.add_typer(mask_cmds.mask_app, name="mask")
app.add_typer(importance_cmds.importance_app, name="importance")
app.command()(train_cmd.train)
app.command("eval")(eval_cmd.eval_)
app.command()(sweep_cmd.sweep)
app.command()(demo_cmd.demo)


def _on_sigterm(signum: int, frame: Any) -> None:
    raise Terminated


def main() -> None:
    """Console-script entry point."""
    signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        app(prog_name="neuroloc")  # exits through SystemExit with the command's code
    finally:
        # The command is over: its outputs are in place, its message printed and its exit code
        # decided. What remains is the interpreter's teardown (freeing tensors, joining reader
        # threads), which can take most of a second; a signal there would only turn a finished
        # command into a silent death by signal. SIGKILL still ends a teardown that hangs.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
