"""`neuroloc demo`: the main job on a small built-in default, for a first run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from neuroloc_cli.cli import render

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
    folder: Annotated[Path, typer.Argument(help="Where to build the example.")] = Path("example"),
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Rebuild an existing example folder.")] = False,
) -> None:
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
        (folder / _MARKER).write_text("made by `neuroloc demo`; `neuroloc demo --overwrite` may delete this folder\n")
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
