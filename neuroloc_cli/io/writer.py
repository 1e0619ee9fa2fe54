"""A streaming, size-capped safetensors writer.

The `safetensors` library writes a file from a dict of tensors held in memory, which for a
5 GB shard means 5 GB of private memory. Since a merge knows every output tensor's name,
shape and dtype before it computes any of them, we lay the shards out up front, write each
header first and then stream tensor bytes as they are produced: memory stays at one tensor.
The format is the one `neuroloc_cli.io.format` reads; tests read our files back with
`safetensors.safe_open` and transformers.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from neuroloc_cli.io.checkpoint import INDEX_FILE, SINGLE_FILE
from neuroloc_cli.io.format import TORCH_TO_ST

DEFAULT_MAX_SHARD_BYTES = 5 * 1024**3  # what transformers' save_pretrained uses


@dataclass(frozen=True)
class OutTensor:
    """An output tensor as planned: name, shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def parse_size(text: str) -> int:
    """Parse '5GB', '500MB', '2GiB' or a plain byte count."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    s = text.strip().upper().replace(" ", "")
    num = s.rstrip("KMGIB")
    unit = s[len(num) :]
    try:
        value = float(num) * units[unit]
    except (KeyError, ValueError):
        value = float("nan")
    if not value >= 1 or value == float("inf"):
        raise ValueError(f"invalid size {text!r} (use e.g. 5GB, 500MB or a byte count)")
    return int(value)


def plan_shards(tensors: Sequence[OutTensor], max_shard_bytes: int) -> list[list[OutTensor]]:
    """Split tensors, in order, into shards of at most `max_shard_bytes` (a larger tensor
    gets a shard of its own)."""
    shards: list[list[OutTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards if shards[0] else []


class ShardedWriter:
    """Writes planned tensors, in plan order, into `folder` as HF-style shards + index.

    Args:
        folder: an existing (temporary) folder to write into.
        tensors: every output tensor, in the order `write` will be called.
        max_shard_bytes: shard size cap.
        metadata: string metadata stored in every shard (`format: pt` is added, as
            transformers requires it).
    """

    def __init__(self, folder: Path, tensors: Sequence[OutTensor], max_shard_bytes: int, metadata: dict[str, str]):
        self.folder = folder
        self.shards = plan_shards(tensors, max_shard_bytes)
        self.metadata = {"format": "pt", **metadata}
        n = len(self.shards)
        self.files = [SINGLE_FILE] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._order = [(s, t) for s, shard in enumerate(self.shards) for t in shard]
        self._next = 0
        self._written = 0  # bytes of the current tensor written so far
        self._file: BinaryIO | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Write the next planned tensor, whole or as consecutive blocks of leading rows.

        The tensor must be the next one planned, with its dtype; a block must have the
        planned trailing dimensions, and the blocks of a tensor must add up to its shape.
        """
        shard, planned = self._order[self._next]
        whole = tuple(tensor.shape) == planned.shape
        block = tensor.dim() == len(planned.shape) > 0 and tuple(tensor.shape[1:]) == planned.shape[1:]
        if name != planned.name or tensor.dtype != planned.dtype or not (whole or block):
            raise RuntimeError(
                f"writer expected {planned.name} {planned.shape} {planned.dtype}, got {name} {tuple(tensor.shape)} {tensor.dtype}"
            )
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        if self._written + data.numel() > planned.nbytes:
            raise RuntimeError(f"writer got more rows than planned for {planned.name}")
        if self._file is None:
            self._file = self._open_shard(shard)
        self._file.write(memoryview(data.numpy()))
        self._written += data.numel()
        if self._written < planned.nbytes:
            return
        self._written = 0
        self._next += 1
        if self._next == len(self._order) or self._order[self._next][0] != shard:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Check every planned tensor was written and write the index (sharded output)."""
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise RuntimeError(f"writer closed before tensor {missing} was written")
        if len(self.files) > 1:
            weight_map = {t.name: self.files[s] for s, t in self._order}
            total = sum(t.nbytes for _, t in self._order)
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (self.folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open_shard(self, shard: int) -> BinaryIO:
        f = open(self.folder / self.files[shard], "wb")
        f.write(encode_header(self.shards[shard], self.metadata))
        return f


def encode_header(tensors: Sequence[OutTensor], metadata: dict[str, str]) -> bytes:
    """The 8-byte length and the JSON header of a safetensors file that holds `tensors`, in
    this order, back to back; the same tensors and metadata always give the same bytes."""
    header: dict[str, object] = {"__metadata__": metadata}
    offset = 0
    for t in tensors:
        header[t.name] = {"dtype": TORCH_TO_ST[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # safetensors aligns the data section to 8 bytes
    return len(raw).to_bytes(8, "little") + raw


def write_tensor_bytes(f: BinaryIO, tensor: torch.Tensor) -> None:
    """Append a tensor's raw little-endian bytes (as `encode_header` laid them out)."""
    f.write(memoryview(tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()))
