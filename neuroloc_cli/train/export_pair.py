"""`neuroloc export-pair`: a LANDeRMT-finetuned model as one ordinary checkpoint per direction.

The finetuned folder holds the raw weights and the `routing.json` the training routed with.
For one direction the routing is a per-neuron scale of each kept block's input, which folds
exactly into the up-side weight rows (`runtime.routing`); neurons specific to other
languages are removed (their up-side rows and bias entries 0). Every other tensor, and every
other element of those tensors, is copied bit for bit.

Tensors are streamed one at a time into the atomic, sharded output that merges and `train`
write through (`io.output.checkpoint_output`), with the config and tokenizer files and a
`neuroloc.json` that names the direction and the routing file's sha256. (It lives in `train`,
not beside `merge.plan_ablation`: it needs `runtime.routing`, which `merge` may not import.)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from neuroloc_cli import __version__
from neuroloc_cli.errors import InputError
from neuroloc_cli.io.checkpoint import Checkpoint, Kind, check_model_folder
from neuroloc_cli.io.output import checkpoint_output
from neuroloc_cli.io.writer import DEFAULT_MAX_SHARD_BYTES, OutTensor
from neuroloc_cli.masks.format import layout_digest
from neuroloc_cli.runtime.routing import ROUTING_FILE, Fold, Routing, fold_factors, fold_tensor


@dataclass(frozen=True)
class PairExportResult:
    """What an export wrote (the fields `cli.render.merge_result` shows)."""

    path: Path
    tensors: int
    bytes: int
    shards: list[str]
    seconds: float
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PairExport:
    """A checked export: the finetuned checkpoint, its routing, the direction, and the fold of
    every up-side tensor of the kept blocks."""

    checkpoint: Checkpoint
    routing: Routing
    direction: str
    folds: dict[str, Fold]


def plan_export_pair(model: Path, direction: str) -> PairExport:
    """Open and check everything an export needs, reading no tensor data.

    Args:
        model: a folder with the finetuned weights and its `routing.json`.
        direction: one of the routing's directions (`de-en`).

    Raises:
        InputError: the folder is not a model, has no or a bad routing.json, or the routing
            was made for another layout of tensors.
        UsageError: the routing has no such direction.
    """
    check_model_folder(model)
    ckpt = Checkpoint.open(model, spec=str(model))
    if ckpt.kind == Kind.DELTA:
        raise InputError(f"{model}: is a delta checkpoint, not a model", hint="give the model written by train --method landermt")
    if ckpt.config is None:
        raise InputError(f"{model / 'config.json'}: is missing (the exported model takes its config from {model})")
    file = model / ROUTING_FILE
    if not file.is_file():
        raise InputError(f"{model}: has no {ROUTING_FILE}", hint="give the folder written by train --method landermt")
    routing = Routing.load(file)
    routing.pair(direction)  # an unknown direction first: the cheapest mistake to fix
    shapes = {n: tuple(i.shape) for n, i in ckpt.tensors.items()}
    layout = layout_digest(shapes)
    if routing.model_layout != layout:
        raise InputError(
            f"{file}: made for another model layout ({routing.model_layout}; {model} has {layout})",
            hint="use the routing.json written with this model",
        )
    return PairExport(ckpt, routing, direction, fold_factors(routing, direction, shapes, str(model)))


def describe_export(export: PairExport) -> dict:
    """What `export-pair --dry-run` prints: the tensors, the folded ones, and the bytes.

    Disk: every tensor in its own dtype (the shards' data, without headers and side files).
    Memory: one tensor at a time as read; a folded one also as two float32 temporaries at once
    (`runtime.routing.fold_tensor`: its float32 copy and the scaled product, then the product
    and the selected result, which is then cast back).
    """
    infos = list(export.checkpoint.tensors.values())

    def held(info) -> int:
        stored = info.numel * info.torch_dtype.itemsize
        return stored + (8 * info.numel if info.name in export.folds else 0)

    return {
        "pair": export.direction,
        "tensors": len(infos),
        "folded_tensors": sorted(export.folds),
        "disk_bytes": {"total": sum(i.numel * i.torch_dtype.itemsize for i in infos)},
        "memory_bytes": {"total": max((held(i) for i in infos), default=0)},
    }


def run_export_pair(
    export: PairExport,
    out_dir: Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    on_tensor: Callable[[str], None] | None = None,
) -> PairExportResult:
    """Write the planned export into `out_dir`, which appears only when complete.

    Args:
        export: from `plan_export_pair`.
        on_tensor: called with each tensor's name once it is written (progress display).

    Raises:
        OutputError: the output path is unusable.
        InputError: a tensor cannot be read.
    """
    start = time.perf_counter()
    ckpt, routing, direction = export.checkpoint, export.routing, export.direction
    infos = list(ckpt.tensors.values())
    provenance = {
        "neuroloc_version": __version__,
        "command": "export-pair",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "pair": direction,
        "routing": {
            "path": str(routing.path.resolve()),
            "sha256": routing.sha256,
            "model_layout": routing.model_layout,
            "coefficient": dict(routing.coefficient[direction]),
        },
        "inputs": [{"role": "model", "path": str(ckpt.path.resolve()), "fingerprint": ckpt.fingerprint}],
        "folded_tensors": sorted(export.folds),
    }
    with checkpoint_output(
        out_dir,
        [OutTensor(i.name, i.shape, i.torch_dtype) for i in infos],
        kind=Kind.MODEL,
        provenance=provenance,
        source=ckpt.path,
        inputs=[ckpt.path],
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
    ) as (writer, _):
        for info in infos:
            t = ckpt.read(info.name)
            f = export.folds.get(info.name)
            writer.write(info.name, t if f is None else fold_tensor(t, f))
            if on_tensor is not None:
                on_tensor(info.name)
    nbytes = sum(i.numel * i.torch_dtype.itemsize for i in infos)
    return PairExportResult(out_dir, len(infos), nbytes, writer.files, time.perf_counter() - start)
