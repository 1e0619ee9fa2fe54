"""Periodic training checkpoints, and resuming from them.

A checkpoint holds only what the run changed: the trainable parameters (split slices,
trained tensors) in fp32, the optimizer state, and the step, token count and data-sampler
counters. Frozen weights come from the input model again on resume — they are, by
construction, identical — so a checkpoint's size follows the selection just as optimizer
memory does.

    RUN_DIR/step-00000050/trainable.safetensors   fp32 values of every optimizer parameter
    RUN_DIR/step-00000050/optimizer.pt            torch.optim state_dict
    RUN_DIR/step-00000050/state.json              step, tokens, sampler counters, fingerprints

Each checkpoint folder appears atomically, so a run killed while saving leaves the previous
one intact. Without `--run-dir`, RUN_DIR is `default_run_dir(OUT)`: hidden beside the output,
so that a killed run leaves no visible clutter and `--resume` with the same `-o` finds it; the
recipe removes it once the output is written (unless `--keep-state`).

A checkpoint records the run's `run_identity`; resuming with other settings or inputs is refused.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from neuroloc_cli.errors import InputError, UsageError
from neuroloc_cli.io.output import atomic_output_dir
from neuroloc_cli.train.inputs import RunInputs

_STEP_DIR = re.compile(r"^step-(\d{8})$")


@dataclass(frozen=True)
class ResumeState:
    """What `load_checkpoint` returns besides the tensors it loads in place."""

    step: int
    tokens: int
    counters: list[int]
    path: Path


def default_run_dir(output: Path) -> Path:
    """`.OUT.neuroloc-run` beside the output folder OUT."""
    return output.with_name(f".{output.name}.neuroloc-run")


def checkpoints(run_dir: Path) -> list[Path]:
    """The run's checkpoint folders, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if _STEP_DIR.match(p.name) and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def run_identity(inputs: RunInputs, world_size: int) -> dict[str, Any]:
    """The settings and input fingerprints that a resumed run must share with the checkpoint's,
    settings first (see `_check_identity`)."""
    cfg = inputs.config
    return {
        "hyper_parameters": cfg.hyper_parameters(),
        "framing": inputs.framing.describe(),
        "world_size": world_size,
        "model": inputs.source.fingerprint,
        "mask": _sha256(Path(cfg.mask_path)) if inputs.mask is not None else None,
        "mask_role": cfg.mask_role,
        "routing": inputs.routing.sha256 if inputs.routing is not None else None,
        "data": [c.describe() for c in inputs.corpora] + [p.describe() for p in inputs.pairs],
    }


def discard_earlier_run(run_dir: Path, log: Path, *, overwrite: bool, delete: bool) -> None:
    """Make way for a fresh run where an earlier one left checkpoints or a log: refused unless
    `overwrite`, since they are what `--resume` would continue.

    Args:
        delete: delete them (on the main process only; the others just check).

    Raises:
        UsageError: they exist and `overwrite` is off.
    """
    found = checkpoints(run_dir)
    if not found and not log.exists():
        return
    if not overwrite:
        raise UsageError(
            f"{run_dir}: holds the checkpoints or log of an earlier run", hint="pass --resume to continue it, or --overwrite to start over"
        )
    if delete:
        for old in found:
            shutil.rmtree(old)
        log.unlink(missing_ok=True)


def save_checkpoint(
    run_dir: Path,
    step: int,
    tokens: int,
    counters: list[int],
    params: dict[str, torch.Tensor],
    optimizer: torch.optim.Optimizer,
    identity: dict[str, Any],
    keep: int,
) -> Path:
    """Write `RUN_DIR/step-NNNNNNNN` atomically and drop all but the newest `keep`.

    Args:
        identity: the run's hyper-parameters and input fingerprints; a resume must match it.
    """
    from safetensors.torch import save_file

    target = run_dir / f"step-{step:08d}"
    with atomic_output_dir(target, overwrite=True) as tmp:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in params.items()}, str(tmp / "trainable.safetensors"))
        torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
        doc = {"step": step, "tokens": tokens, "counters": counters, "identity": identity}
        (tmp / "state.json").write_text(json.dumps(doc, indent=2, default=str) + "\n")
    for old in checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def load_checkpoint(
    run_dir: Path, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer, identity: dict[str, Any]
) -> ResumeState:
    """Load the newest checkpoint of `run_dir` into `params` and `optimizer`.

    Raises:
        UsageError: no checkpoint, or one made with other settings, data, mask or model.
        InputError: a damaged checkpoint.
    """
    from safetensors.torch import load_file

    found = checkpoints(run_dir)
    if not found:
        raise UsageError(f"--resume: no checkpoint in {run_dir}", hint="periodic checkpoints are written with --save-every N")
    path = found[-1]
    try:
        doc = json.loads((path / "state.json").read_text())
        saved = load_file(str(path / "trainable.safetensors"))
        optim_state = torch.load(path / "optimizer.pt", weights_only=True, map_location="cpu")
    except Exception as e:  # json, safetensors and torch raise their own types
        raise InputError(f"{path}: cannot read checkpoint ({e})") from None
    _check_identity(path, json.loads(json.dumps(identity, default=str)), doc.get("identity", {}))
    if set(saved) != set(params):
        raise InputError(f"{path}: checkpoint holds other trainable tensors than this run")
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])
    optimizer.load_state_dict(optim_state)
    return ResumeState(int(doc["step"]), int(doc["tokens"]), [int(c) for c in doc["counters"]], path)


def _check_identity(path: Path, current: dict[str, Any], saved: dict[str, Any]) -> None:
    """Refuse the first difference, in the order of `current`: settings before the inputs they
    shape, so that a changed --packing is named as such, not as the different rows it makes."""
    for key in [*current, *(k for k in saved if k not in current)]:
        if current.get(key) != saved.get(key):
            raise UsageError(
                f"--resume: {path} was made with a different {key} ({saved.get(key)!r}, now {current.get(key)!r})",
                hint="resume with the settings, data and mask of the interrupted run",
            )


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
