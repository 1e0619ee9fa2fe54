"""Executing a merge plan: stream tensors in, compute, stream shards out, atomically.

Memory: the reader thread holds the next tensor's inputs while the main thread computes the
current one, so private memory stays at a few copies of the largest tensor (inputs in the
compute dtype, the result and one scratch buffer), whatever the model size.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from neuroloc_cli import __version__
from neuroloc_cli.errors import UsageError
from neuroloc_cli.io.checkpoint import KIND_KEY
from neuroloc_cli.io.output import atomic_output_dir, copy_side_files, write_provenance
from neuroloc_cli.io.writer import DEFAULT_MAX_SHARD_BYTES, ShardedWriter
from neuroloc_cli.merge.plan import MergePlan, Step

_Inputs = tuple[torch.Tensor | None, list[torch.Tensor]]


@dataclass(frozen=True)
class MergeResult:
    """What a merge wrote."""

    path: Path
    tensors: int
    bytes: int
    shards: list[str]
    seconds: float


def run_merge(
    plan: MergePlan,
    out_dir: Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    seed: int | None = None,
    on_tensor: Callable[[Step], None] | None = None,
    command: str = "merge",
) -> MergeResult:
    """Run a planned merge into `out_dir`, which appears only if everything succeeds.

    Args:
        plan: from `build_plan`.
        out_dir: the output folder (must not exist unless `overwrite`, nor overlap an input).
        max_shard_bytes: output shard size cap.
        seed: seed for random methods; overrides the recipe's `random_seed`.
        on_tensor: called after each tensor is written (progress display).
        command: recorded in the provenance.

    Raises:
        OutputError: the output path is unusable.
        InputError: a tensor cannot be read.
        UsageError: the method rejects its parameters at some tensor (named).
    """
    start = time.perf_counter()
    seed = seed if seed is not None else plan.recipe.random_seed
    provenance = _provenance(plan, seed, command)
    metadata = {
        KIND_KEY: plan.method.output_kind,
        "neuroloc.version": __version__,
        "neuroloc.provenance": json.dumps(provenance, separators=(",", ":"), default=str),
    }
    with atomic_output_dir(out_dir, plan.input_paths(), overwrite) as tmp:
        writer = ShardedWriter(tmp, [s.out for s in plan.steps], max_shard_bytes, metadata)
        try:
            _stream(plan, writer, seed, on_tensor)
        finally:
            writer.abort()
        writer.close()
        dtypes = {s.out.dtype for s in plan.steps if s.merge}
        copy_side_files(plan.reference.checkpoint.path, tmp, dtypes.pop() if len(dtypes) == 1 else None)
        if plan.config_updates:
            _update_config(tmp / "config.json", plan.config_updates)
        write_provenance(tmp, provenance)
    return MergeResult(out_dir, len(plan.steps), plan.out_bytes, writer.files, time.perf_counter() - start)


def _stream(plan: MergePlan, writer: ShardedWriter, seed: int | None, on_tensor: Callable[[Step], None] | None) -> None:
    """Read step i+1 on a worker thread while step i is computed and written."""
    steps = plan.steps
    if not steps:
        return
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="neuroloc-read") as pool:
        pending = pool.submit(_load, plan, steps[0])
        for i, step in enumerate(steps):
            inputs = pending.result()
            if i + 1 < len(steps):
                pending = pool.submit(_load, plan, steps[i + 1])
            writer.write(step.name, _compute(plan, step, inputs, seed).to(step.out.dtype))
            if on_tensor is not None:
                on_tensor(step)


def _update_config(path: Path, updates: dict) -> None:
    if path.is_file():
        doc = json.loads(path.read_text())
        doc.update(updates)
        path.write_text(json.dumps(doc, indent=2) + "\n")


def _load(plan: MergePlan, step: Step) -> _Inputs:
    """Read one tensor of every input, converted to the compute dtype."""
    if step.origin is not None:  # layer stacking: one tensor of one model, maybe renamed
        index, name = step.origin
        tensor = plan.models[index].checkpoint.read(name)
        return (None, [tensor.to(plan.compute_dtype)]) if step.merge else (tensor, [])
    if not step.merge:
        return plan.reference.checkpoint.read(step.name), []
    dtype = plan.compute_dtype
    base = plan.base.checkpoint.read(step.name).to(dtype) if plan.base else None
    tensors = []
    for src, present in zip(plan.models, step.present):
        if present:
            tensors.append(src.checkpoint.read(step.name).to(dtype))
        else:
            assert base is not None  # on_missing: base is only planned with a base model
            tensors.append(base)
    return base, tensors


def _compute(plan: MergePlan, step: Step, inputs: _Inputs, seed: int | None) -> torch.Tensor:
    base, tensors = inputs
    if not step.merge:
        assert base is not None
        return base
    whole, per_model = plan.resolver.at(step.name, step.t)
    if step.origin is not None:
        per_model = [per_model[step.origin[0]]]
    generator = _generator(seed, step.name) if plan.method.random else None
    try:
        return plan.method(base, tensors, whole, per_model, generator)
    except ValueError as e:
        raise UsageError(f"tensor {step.name}: {e}") from None


def _generator(seed: int | None, tensor_name: str) -> torch.Generator:
    """A generator seeded from the run's seed and the tensor's name, so that a tensor's random
    draws do not depend on which tensors came before it."""
    digest = hashlib.sha256(f"{seed if seed is not None else 0}:{tensor_name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _provenance(plan: MergePlan, seed: int | None, command: str) -> dict:
    return {
        "neuroloc_version": __version__,
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": plan.method.name,
        "output_kind": plan.method.output_kind,
        "recipe": plan.recipe.model_dump(exclude_none=True),
        "seed": seed,
        "compute_dtype": str(plan.compute_dtype).removeprefix("torch."),
        "inputs": [
            {"role": s.role, "path": str(s.checkpoint.path.resolve()), "fingerprint": s.checkpoint.fingerprint}
            for s in plan.sources
        ],
    }
