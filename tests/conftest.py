"""Shared fixtures: tiny random checkpoints, built once per test session, and a CLI runner.

`zoo.get(arch, sharded=...)` returns a `Family`: a base checkpoint and two "fine-tunes"
(base plus small noise), built on first use and reused by every test. Architectures: llama,
mistral, qwen2, gpt2. Tests must treat these folders as read-only.
"""

from __future__ import annotations

import json
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from neuroloc_cli.cli.app import app
from neuroloc_cli.synthetic import build_checkpoint, derive_finetune, tiny_config

SHARD_BYTES = 60_000  # small enough that every tiny model is split into several shards


def pytest_configure(config: pytest.Config) -> None:
    # Hypothesis caches constants and Unicode tables in `./.hypothesis`, some while pytest
    # collects; a run of the suite writes nothing into the checkout.
    from hypothesis.configuration import set_hypothesis_home_dir

    set_hypothesis_home_dir(tempfile.mkdtemp(prefix="neuroloc-hypothesis-"))
    # Let Ctrl-C reach the tests that send it. A shell starts a background job (`cmd &`) with
    # SIGINT ignored, and Python then installs no handler for it, in this process or in the
    # `neuroloc` processes the fault tests start: every SIGINT they send would be lost.
    # Catching it here also gives those children the default disposition back (exec resets a
    # caught signal).
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@dataclass(frozen=True)
class Family:
    base: Path
    ft1: Path
    ft2: Path


class Zoo:
    def __init__(self, root: Path):
        self.root = root
        self._built: dict[tuple, Family] = {}

    def get(self, arch: str = "llama", *, sharded: bool = True, dtype: torch.dtype = torch.bfloat16, tie: bool | None = None) -> Family:
        key = (arch, sharded, dtype, tie)
        if key not in self._built:
            folder = self.root / f"{arch}-{'sharded' if sharded else 'single'}-{str(dtype)[6:]}-{tie}"
            shard = SHARD_BYTES if sharded else 10**12
            base = build_checkpoint(tiny_config(arch, tie=tie), folder / "base", seed=0, dtype=dtype, max_shard_bytes=shard)
            ft1 = derive_finetune(base, folder / "ft1", seed=1, max_shard_bytes=shard)
            ft2 = derive_finetune(base, folder / "ft2", seed=2, max_shard_bytes=shard)
            self._built[key] = Family(base, ft1, ft2)
        return self._built[key]


@pytest.fixture(scope="session")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> Zoo:
    return Zoo(tmp_path_factory.mktemp("zoo"))


@dataclass
class CliResult:
    exit_code: int
    stdout: str
    stderr: str

    def json(self):
        return json.loads(self.stdout)


@pytest.fixture
def cli():
    """Run `neuroloc ARGS...` in-process; returns exit code, stdout and stderr separately."""
    runner = CliRunner()

    def run(*args: str | Path) -> CliResult:
        r = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
        return CliResult(r.exit_code, r.stdout, r.stderr)

    return run


def write_recipe(folder: Path, text: str, name: str = "recipe.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(text)
    return path
