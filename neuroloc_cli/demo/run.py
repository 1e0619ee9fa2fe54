"""`neuroloc demo`'s core: the world and the base model (cached), then the experiments.

    result = run_demo(folder, settings, seed=0, only=["maet"], runner=run_command, on_experiment=show)

`runner(argv, log)` runs one `neuroloc` command in-process and raises on failure; the command
line passes its own, so that this package never imports the command line.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neuroloc_cli import __version__
from neuroloc_cli.demo.experiments import EXPERIMENTS, RUNNERS, Context, Experiment
from neuroloc_cli.demo.settings import Settings
from neuroloc_cli.demo.world import LANGUAGES, World
from neuroloc_cli.errors import OutputError

Runner = Callable[[list[str], Path], None]


@dataclass
class DemoResult:
    """Everything the demo measured, and how."""

    folder: Path
    seed: int
    settings: Settings
    experiments: list[Experiment]
    base_commands: list[str]
    base_cached: bool
    versions: dict[str, str]
    seconds: float
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "folder": str(self.folder),
            "seed": self.seed,
            "settings": self.settings.to_dict(),
            "versions": self.versions,
            "base": {"cached": self.base_cached, "commands": self.base_commands},
            "experiments": [e.to_dict() for e in self.experiments],
            "seconds": round(self.seconds, 1),
        }


def versions() -> dict[str, str]:
    """The versions every number depends on."""
    import tokenizers
    import torch
    import transformers

    return {
        "neuroloc": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tokenizers": tokenizers.__version__,
    }


def cache_root() -> Path:
    """`$XDG_CACHE_HOME/neuroloc/demo` (default `~/.cache/neuroloc/demo`)."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "neuroloc" / "demo"


def cache_key(settings: Settings, seed: int) -> str:
    """What the world and the base model are a function of: seed, sizes, versions."""
    s = settings.to_dict()
    keys = (
        "docs",
        "heldout",
        "math_docs",
        "math_test",
        "pairs",
        "layers",
        "hidden",
        "pretrain_steps",
        "pretrain_batch",
        "seq_len",
        "lr_pretrain",
        "threads",
    )
    doc = {"seed": seed, **{k: s[k] for k in keys}, "versions": versions(), "code": _code_digest()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _code_digest() -> str:
    """The sources the world and the base model come from (the world generator, the
    checkpoint builder, the trainer): a change to them, within one version, is a new cache."""
    import neuroloc_cli

    root = Path(neuroloc_cli.__file__).parent
    h = hashlib.sha256()
    for file in sorted([root / "demo" / "world.py", root / "synthetic.py", *(root / "train").glob("*.py")]):
        h.update(file.name.encode() + b"\0" + file.read_bytes())
    return h.hexdigest()


@contextmanager
def _inside(folder: Path) -> Iterator[None]:
    """Run with `folder` as the working directory (the printed commands' paths are relative to it)."""
    before = Path.cwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


@contextmanager
def deterministic(threads: int) -> Iterator[None]:
    """Fixed torch threads and deterministic algorithms, restored afterwards."""
    import torch

    threads_before, det_before = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(threads_before)
        torch.use_deterministic_algorithms(det_before)


def pretrain_argv(settings: Settings) -> list[str]:
    """The `neuroloc train` command that pretrains the base from its random initialisation."""
    data = [x for lang in LANGUAGES for x in ("--data", f"world/general/{lang}.txt")] + ["--data", "world/code-switched.txt"]
    s = settings
    return [
        "train", "init", *data, "-o", "base", "--max-steps", str(s.pretrain_steps), "--lr", str(s.lr_pretrain),
        "--warmup", str(max(1, s.pretrain_steps // 15)), "--seq-len", str(s.seq_len), "--batch-size", str(s.pretrain_batch),
        "--seed", "0", "--eval-share", "0.02",
    ]  # fmt: skip


def build_base(folder: Path, settings: Settings, seed: int, runner: Runner) -> list[str]:
    """Write the world (world/), a random-initialised tiny Llama with the world's tokenizer
    (init/) and the pretrained base (base/) into `folder`; returns the commands it ran."""
    import torch

    from neuroloc_cli.synthetic import build_checkpoint, tiny_config

    world = World.generate(seed, **settings.world_options())
    world.write(folder / "world")
    tok = world.tokenizer()
    cfg = tiny_config("llama", layers=settings.layers, hidden=settings.hidden, vocab=len(tok))
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    cfg.max_position_embeddings = max(256, 2 * settings.seq_len)
    build_checkpoint(cfg, folder / "init", seed=seed, dtype=torch.float32, tokenizer=False)
    tok.save_pretrained(folder / "init")
    ctx = Context(folder, settings, runner)
    with _inside(folder):
        ctx.run(*pretrain_argv(settings))
    return ctx.commands


def cached_base(settings: Settings, seed: int, runner: Runner, cache: Path | None) -> tuple[Path, list[str], bool]:
    """The cache folder holding world/, init/ and base/ for (settings, seed): built once,
    atomically (a temporary folder renamed into place). Returns (folder, commands, was cached)."""
    root = cache if cache is not None else cache_root()
    folder = root / cache_key(settings, seed)
    if (folder / "commands.json").is_file():
        return folder, json.loads((folder / "commands.json").read_text()), True
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{folder.name}.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        commands = build_base(tmp, settings, seed, runner)
        (tmp / "commands.json").write_text(json.dumps(commands, indent=1) + "\n")
        try:
            tmp.rename(folder)
        except OSError:  # another demo built it meanwhile: use theirs
            if not (folder / "commands.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder, commands, False


def run_demo(
    folder: Path,
    settings: Settings,
    *,
    seed: int,
    only: list[str],
    runner: Runner,
    on_experiment: Callable[[Experiment], None] = lambda e: None,
    on_step: Callable[[str], None] = lambda s: None,
    cache: Path | None = None,
) -> DemoResult:
    """Build (or reuse) the base, run the chosen experiments in `folder`, write report.md.

    Raises:
        OutputError: `folder` holds something other than an earlier demo.
    """
    from neuroloc_cli.demo.report import write_report

    start = time.monotonic()
    folder = folder.resolve()  # the experiments run inside it
    if folder.exists() and any(folder.iterdir()) and not (folder / MARKER).is_file():
        raise OutputError(
            f"{folder}: exists and is not a folder `neuroloc demo` made (no {MARKER} in it)", hint="give another folder with -o"
        )
    with deterministic(settings.threads):
        on_step("world and base model")
        cached, base_commands, was_cached = cached_base(settings, seed, runner, cache)
        if folder.exists():
            shutil.rmtree(folder)
        folder.mkdir(parents=True)
        (folder / MARKER).write_text("made by `neuroloc demo`; a later `neuroloc demo -o` into this folder replaces it\n")
        for part in ("world", "init", "base"):
            shutil.copytree(cached / part, folder / part)
        ctx = Context(folder, settings, _announcing(runner, on_step))
        done = []
        with _inside(folder):
            for name in EXPERIMENTS:
                if name in only:
                    exp = RUNNERS[name](ctx)
                    done.append(exp)
                    on_experiment(exp)
    result = DemoResult(folder, seed, settings, done, base_commands, was_cached, versions(), time.monotonic() - start)
    write_report(result)
    return result


MARKER = ".neuroloc-demo"


def _announcing(runner: Runner, on_step: Callable[[str], None]) -> Runner:
    def run(argv: list[str], log: Path) -> None:
        on_step(" ".join(argv[:2]) + (f" → {argv[argv.index('-o') + 1]}" if "-o" in argv else ""))
        runner(argv, log)

    return run
