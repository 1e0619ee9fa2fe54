"""Writing the trained model as a normal HF checkpoint, streamed tensor by tensor, with the
provenance that says how it was made.

Tensors that did not train are copied from the input checkpoint as stored (so they are
bit-for-bit the input's); trained ones are the model's fp32 values, split slices written
back, cast to the input tensor's dtype (or `--out-dtype`).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from neuroloc_cli import __version__
from neuroloc_cli.io.checkpoint import Checkpoint
from neuroloc_cli.io.format import TensorInfo
from neuroloc_cli.io.output import checkpoint_output
from neuroloc_cli.io.writer import OutTensor
from neuroloc_cli.train.inputs import RunInputs
from neuroloc_cli.train.selection import TrainableModel

LOG_FILE = "train_log.jsonl"

# Settings that say where a run wrote its files and how it was started, not what it computed:
# left out of the shards' provenance (`neuroloc.json` keeps them), so that two runs with the
# same inputs and settings write byte-identical weight files whatever their output paths.
RUN_ONLY_SETTINGS = ("output", "run_dir", "keep_state", "log", "overwrite", "resume")


def output_dtype(info: TensorInfo, out_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a source tensor is written in: `out_dtype` for floating tensors when given,
    else its own."""
    dt = info.torch_dtype
    return out_dtype if out_dtype is not None and dt.is_floating_point else dt


def write_model(
    out_dir: Path,
    source: Checkpoint,
    trained: TrainableModel,
    *,
    inputs: list[Path],
    out_dtype: torch.dtype | None,
    max_shard_bytes: int,
    overwrite: bool,
    provenance: dict[str, Any],
    log_file: Path | None,
    extra_files: Mapping[str, Path] | None = None,
) -> list[str]:
    """Stream the trained checkpoint into `out_dir`, which appears only when complete.

    Args:
        source: the input checkpoint (tensor order, dtypes, untouched tensors, side files).
        trained: the trained model.
        inputs: paths the output must not overlap.
        out_dtype: dtype of floating tensors, or None to keep each input tensor's.
        log_file: the JSONL training log, copied in as `train_log.jsonl`.
        extra_files: name in the output -> file copied there (LANDeRMT's routing.json).

    Returns:
        The shard file names written.
    """
    changed = trained.plan.trained
    infos = list(source.tensors.values())

    def dtype_of(info) -> torch.dtype:
        return output_dtype(info, out_dtype)

    dtypes = {dtype_of(i) for i in infos if i.torch_dtype.is_floating_point}
    with checkpoint_output(
        out_dir,
        [OutTensor(i.name, i.shape, dtype_of(i)) for i in infos],
        kind="model",
        provenance=provenance,
        source=source.path,
        inputs=inputs,
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
        config_dtype=dtypes.pop() if len(dtypes) == 1 else None,
        shard_provenance=_shard_provenance(provenance),
    ) as (writer, tmp):
        for info in infos:
            t = trained.tensor(info.name) if info.name in changed else source.read(info.name)
            writer.write(info.name, t.to("cpu").to(dtype_of(info)))
        if log_file is not None and log_file.is_file():
            shutil.copyfile(log_file, tmp / LOG_FILE)
        for name, path in (extra_files or {}).items():
            shutil.copyfile(path, tmp / name)
    return writer.files


def provenance(
    inputs: RunInputs,
    identity: dict[str, Any],
    *,
    world_size: int,
    steps: int,
    tokens: int,
    counts: dict[str, int],
    perplexity: dict[str, dict[str, float]],
) -> dict[str, Any]:
    """What `neuroloc.json` records of a run: versions and time, the inputs with their
    fingerprints, the framing and hyper-parameters, what trained, and the results.

    Args:
        identity: from `state.run_identity` (the mask's sha256 is taken from it, not hashed again).
    """
    cfg = inputs.config
    mask = None
    if inputs.mask is not None:
        mask = {
            "path": str(Path(cfg.mask_path).resolve()),
            "role": identity["mask_role"],
            "sha256": identity["mask"],
            "granularity": inputs.mask.granularity,
        }
    return {
        "neuroloc_version": __version__,
        "command": "train",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "base_model": {"path": str(Path(cfg.model).resolve()), "fingerprint": inputs.source.fingerprint},
        "mask": mask,
        "routing": {"path": str(inputs.routing.path.resolve()), "sha256": inputs.routing.sha256} if inputs.routing is not None else None,
        "data": identity["data"],
        "framing": identity["framing"],
        "hyper_parameters": cfg.hyper_parameters(),
        "world_size": world_size,
        "steps": steps,
        "tokens": tokens,
        "counts": counts,
        "perplexity": perplexity,
        "config": cfg.model_dump(),
    }


def _shard_provenance(provenance: dict[str, Any]) -> dict[str, Any]:
    """The provenance less its `created` time and the `RUN_ONLY_SETTINGS` of its `config`."""
    shard = {k: v for k, v in provenance.items() if k != "created"}
    if isinstance(shard.get("config"), dict):
        shard["config"] = {k: v for k, v in shard["config"].items() if k not in RUN_ONLY_SETTINGS}
    return shard
