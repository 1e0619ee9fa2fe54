"""`neuroloc convert`: a PyTorch `.bin` checkpoint folder into safetensors, once.

Every other command reads safetensors only; a `.bin` file is a pickle, and unpickling can run
code. Here each file is read with `torch.load(weights_only=True)`, which refuses to build
arbitrary objects, and anything that is not a mapping of names to plain tensors is refused
too. Files are read one at a time (memory-mapped when they are in the zip format, so the
first pass that collects shapes reads no tensor data), and the output is written through
`checkpoint_output`: shards, index, config and tokenizer files and `neuroloc.json` appear
together or not at all.
"""

from __future__ import annotations

import json
import pickle
import re
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from neuroloc_cli.errors import InputError
from neuroloc_cli.io.checkpoint import Kind
from neuroloc_cli.io.output import checkpoint_output
from neuroloc_cli.io.writer import DEFAULT_MAX_SHARD_BYTES, OutTensor

BIN_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class ConvertResult:
    """What `convert` wrote."""

    path: Path
    tensors: int
    bytes: int
    shards: list[str]
    seconds: float
    dropped: list[str]
    """Names that shared storage with an earlier tensor (tied weights), left out as
    `save_pretrained` leaves them out of safetensors."""

    @property
    def warnings(self) -> list[str]:
        return [f"tensor {n}: the LM head tied to the embedding (config.json ties them), so it is not written" for n in self.dropped]


def bin_files(folder: Path) -> list[Path]:
    """The weight files of a `.bin` checkpoint: those its index names, else
    `pytorch_model*.bin`, else every `*.bin` (sorted).

    Raises:
        InputError: not a folder, an unreadable index, or no `.bin` file.
    """
    if not folder.is_dir():
        raise InputError(f"{folder}: no such folder")
    index = folder / BIN_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise InputError(f"{index}: not a valid index (needs a 'weight_map' of tensor name to file)") from None
        files = [folder / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise InputError(f"{index}: names {missing[0]}, which is not in the folder")
        return files
    files = sorted(folder.glob("pytorch_model*.bin")) or sorted(folder.glob("*.bin"))
    if not files:
        raise InputError(f"{folder}: no .bin weight file to convert")
    return files


def _load(file: Path) -> dict[str, torch.Tensor]:
    """One file's tensors, refusing anything but a flat mapping of names to plain tensors."""
    try:
        obj = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as e:
        raise InputError(f"{file}: holds objects other than tensors{_what(e)}; refused (only plain tensors are unpickled)") from None
    except (RuntimeError, EOFError, OSError, ValueError, AttributeError) as e:
        raise InputError(f"{file}: not a readable PyTorch checkpoint ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise InputError(f"{file}: holds a {type(obj).__name__}, not a mapping of tensor names to tensors")
    for name, value in obj.items():
        if not isinstance(name, str) or type(value) is not torch.Tensor:
            raise InputError(f"{file}: entry {name!r} is a {type(value).__name__}, not a tensor; only plain tensors are converted")
    return obj


def _what(e: Exception) -> str:
    """The class torch refused to build, from its (long) message, e.g. ` (__main__.Thing)`."""
    m = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(e))
    return f" ({m.group(1)})" if m else ""


def _storage_key(t: torch.Tensor) -> tuple:
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


# The output-embedding names `save_pretrained` leaves out of a checkpoint with tied weights.
_TIED_HEADS = ("lm_head.weight", "embed_out.weight")


def _plan(files: list[Path], tied: bool) -> tuple[list[OutTensor], list[str]]:
    """Every tensor to write, and those left out: only an LM head that shares its storage with
    another tensor when config.json ties the embeddings (what `save_pretrained` stores once);
    any other shared storage is written twice, as separate tensors."""
    planned: dict[str, OutTensor] = {}
    shared: dict[tuple, list[str]] = {}
    for file in files:
        for name, t in _load(file).items():
            if name in planned:
                raise InputError(f"{file}: tensor {name} is also in an earlier file")
            planned[name] = OutTensor(name, tuple(t.shape), t.dtype)
            if t.numel():
                shared.setdefault(_storage_key(t), []).append(name)
    dropped = []
    if tied:
        for names in shared.values():
            if len(names) > 1:
                dropped += [n for n in names if n in _TIED_HEADS]
    return [o for n, o in planned.items() if n not in dropped], dropped


def _tensors(files: list[Path], keep: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    for file in files:
        for name, t in _load(file).items():
            if name in keep:
                yield name, t


def convert_checkpoint(
    source: Path, out_dir: Path, *, max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False
) -> ConvertResult:
    """Convert a `.bin` checkpoint folder into a safetensors one, tensors unchanged.

    Args:
        source: the folder with `pytorch_model*.bin` (and its index, config, tokenizer files).
        out_dir: the output folder (must not exist unless `overwrite`, nor overlap `source`).
        max_shard_bytes: output shard size cap.

    Raises:
        InputError: no `.bin` file, or a file that is not plain tensors (naming the file);
            nothing is written.
        OutputError: the output path is unusable.
    """
    from neuroloc_cli import __version__

    start = time.perf_counter()
    files = bin_files(source)
    config = _config(source)
    planned, dropped = _plan(files, bool(config.get("tie_word_embeddings", True)))  # every file is checked before anything is written
    provenance = {
        "neuroloc_version": __version__,
        "command": "convert",
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": str(source.resolve()),
        "files": [f.name for f in files],
        "dropped_tied": dropped,
    }
    keep = {t.name for t in planned}
    with checkpoint_output(
        out_dir,
        planned,
        kind=Kind.MODEL,
        provenance=provenance,
        source=source,
        inputs=[source],
        overwrite=overwrite,
        max_shard_bytes=max_shard_bytes,
    ) as (writer, _):
        for name, t in _tensors(files, keep):
            writer.write(name, t)
    total = sum(t.nbytes for t in planned)
    return ConvertResult(out_dir, len(planned), total, writer.files, time.perf_counter() - start, dropped)


def _config(source: Path) -> dict:
    """config.json of the folder ({} if it has none or cannot be read: the default ties)."""
    try:
        doc = json.loads((source / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return doc if isinstance(doc, dict) else {}
