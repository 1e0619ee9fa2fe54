"""`--help` of every command and subcommand, through the installed console script, as a
user's shell runs it: exit 0, the help on stdout, nothing that looks like an error on stderr.

A new typer release once made every `--help` exit 1 while the in-process tests passed; only
the real entry point shows that.
"""

from __future__ import annotations

import subprocess
from concurrent.futures import ThreadPoolExecutor

import pytest
import typer.main

from neuroloc_cli.cli.app import app
from tests.helpers import console_script


def _paths(cmd, prefix=()):
    yield prefix
    for name, sub in sorted(getattr(cmd, "commands", {}).items()):
        if not sub.hidden:
            yield from _paths(sub, (*prefix, name))


COMMANDS = list(_paths(typer.main.get_command(app)))


def test_every_command_is_reached():
    names = {" ".join(p) for p in COMMANDS}
    assert {"", "merge", "recipe validate", "locate delta", "mask show", "train", "eval", "demo"} <= names
    assert len(COMMANDS) >= 18


def test_every_help_exits_0_through_the_console_script():
    exe = console_script()
    assert exe is not None, "the `neuroloc` console script is not installed (pip install -e '.[test]')"

    def run(path):
        return path, subprocess.run([exe, *path, "--help"], capture_output=True, text=True, timeout=120)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, COMMANDS))
    failures = [
        f"neuroloc {' '.join(p)} --help: exit {r.returncode}, stderr {r.stderr.strip()[:200]!r}"
        for p, r in results
        if r.returncode != 0 or "error" in r.stderr.lower() or "Usage" not in r.stdout
    ]
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize(
    "args,message",
    [
        (["merge"], "error: Missing argument 'recipe'. (see 'neuroloc merge --help')"),
        (["merge", "r.yaml", "--bogus"], "error: No such option: --bogus (see 'neuroloc merge --help')"),
        (["merge", "r.yaml", "--seed", "abc"], "error: Invalid value for '--seed'"),
        (["bogus"], "error: No such command 'bogus'."),
    ],
)
def test_command_line_usage_errors_are_one_line_and_exit_2(cli, args, message):
    r = cli(*args)
    assert r.exit_code == 2
    assert r.stderr.startswith(message) and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert r.stdout == ""


def test_the_command_line_imports_no_heavy_library():
    """`--help` and usage errors must be instant: torch, transformers and lm-eval are imported
    inside the commands that need them."""
    import subprocess
    import sys

    code = "import sys, neuroloc_cli.cli.app; print(sorted(m for m in ('torch', 'transformers', 'lm_eval', 'numba') if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == "[]"
