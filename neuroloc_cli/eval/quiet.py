"""Keep what lm-eval, transformers and datasets print off neuroloc's own streams.

They write progress bars, INFO and WARNING log lines, Python warnings and even the stderr of
the `git describe` that lm-eval runs for every result; a few `print` calls go to stdout, which
must hold only the table or the one JSON document. Inside `library_output` all of that goes
nowhere, so that an error is the first line on stderr; with `verbose`, it goes to stderr.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout

_LOGGERS = ("lm_eval", "transformers", "datasets", "huggingface_hub")


@contextmanager
def library_output(verbose: bool = False) -> Iterator[None]:
    """While the block runs, libraries' output goes nowhere (`verbose`: to stderr), never to stdout.

    Errors are not affected: they are exceptions, which the CLI prints after the block.
    """
    if verbose:
        with redirect_stdout(sys.stderr):
            yield
        return
    with (
        open(os.devnull, "w") as sink,
        _file_descriptor(2, sink),
        redirect_stdout(sink),
        redirect_stderr(sink),
        _loggers_at(logging.ERROR),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        yield


@contextmanager
def _file_descriptor(fd: int, sink) -> Iterator[None]:
    # Subprocesses (git) and C code write to the descriptor, not to sys.stderr.
    sys.stderr.flush()
    saved = os.dup(fd)
    os.dup2(sink.fileno(), fd)
    try:
        yield
    finally:
        os.dup2(saved, fd)
        os.close(saved)


@contextmanager
def _loggers_at(level: int) -> Iterator[None]:
    # Library loggers may hold a handler bound to the stream that was stderr when they were set up.
    loggers = [logging.getLogger(name) for name in _LOGGERS]
    saved = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(level)
    try:
        yield
    finally:
        for lg, old in zip(loggers, saved):
            lg.setLevel(old)
