"""The output folder of a data locator (`gradient`, `lape`, `awareness`), written atomically."""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from neuroloc_cli.io.output import atomic_output_dir
from neuroloc_cli.masks.format import Mask
from neuroloc_cli.masks.importance import ImportanceMeta, write_importance


def save_folder(
    output: Path,
    inputs: Sequence[Path],
    overwrite: bool,
    *,
    importance: Mapping[str, Mapping[str, torch.Tensor]],
    importance_meta: Mapping[str, ImportanceMeta],
    masks: Mapping[str, Mask],
    summary: Mapping[str, Any],
    extra: Callable[[Path], None] | None = None,
) -> None:
    """Write `importance/STEM.safetensors` per scored source, `STEM.safetensors` per mask,
    `summary.json`, and what `extra(folder)` adds (a locator's own files); a failure leaves no
    partial folder.

    Raises:
        OutputError: the folder exists (without `overwrite`), overlaps an input, or cannot be
            written.
    """
    with atomic_output_dir(output, inputs, overwrite) as tmp:
        (tmp / "importance").mkdir()
        for stem, tensors in importance.items():
            write_importance(tmp / "importance" / f"{stem}.safetensors", tensors, importance_meta[stem])
        for stem, mask in masks.items():
            mask.save(tmp / f"{stem}.safetensors")
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        if extra is not None:
            extra(tmp)
