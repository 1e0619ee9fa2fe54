"""The safetensors file format: headers read without touching tensor data, dtype names.

A safetensors file is an 8-byte little-endian header length `N`, `N` bytes of JSON mapping
each tensor name to `{dtype, shape, data_offsets}` (plus an optional `__metadata__` of
strings), then the raw little-endian tensor bytes. Reading the header ourselves lets `inspect`
and `recipe validate` check names, shapes and file sizes while reading no tensor data, and
catch a truncated shard before a merge has written anything.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from neuroloc_cli.errors import InputError

# safetensors dtype name -> torch dtype
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
TORCH_TO_ST = {v: k for k, v in DTYPES.items()}

# Names users write in recipes and flags -> torch dtype
DTYPE_NAMES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}

_MAX_HEADER = 100 * 1024 * 1024  # the limit safetensors itself enforces


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor; no data is read to build it."""

    name: str
    dtype: str  # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    file: str  # shard file name, relative to the checkpoint folder
    offsets: tuple[int, int]  # byte range within the file's data section

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return self.offsets[1] - self.offsets[0]


@dataclass(frozen=True)
class Header:
    """A parsed safetensors header."""

    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    raw: bytes  # the JSON bytes, for fingerprints
    data_start: int  # absolute file offset of the data section


def itemsize(dtype: str) -> int:
    return DTYPES[dtype].itemsize


def read_header(path: Path) -> Header:
    """Parse and check the header of one safetensors file.

    Checks every tensor's dtype, shape and byte range against the file size, so a truncated
    or corrupted shard is reported here, naming the file and tensor.

    Raises:
        InputError: the file is missing, truncated or has an invalid header.
    """
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InputError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", prefix)
            if n > _MAX_HEADER or 8 + n > size:
                raise InputError(
                    f"{path}: invalid safetensors header (declared length {n} bytes, file {size} bytes)",
                    hint="the file is truncated or not a safetensors file",
                )
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror})") from None
    try:
        doc = json.loads(raw)
        if not isinstance(doc, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: invalid safetensors header ({e})", hint="the file is corrupted") from None

    metadata = doc.pop("__metadata__", None) or {}
    data_len = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for name, entry in doc.items():
        tensors[name] = _tensor_info(path, name, entry, data_len)
    return Header(tensors=tensors, metadata=dict(metadata), raw=raw, data_start=8 + n)


def _tensor_info(path: Path, name: str, entry: object, data_len: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]  # type: ignore[index]
        shape = tuple(int(d) for d in shape)
    except (TypeError, KeyError, ValueError):
        raise InputError(f"{path}: tensor {name!r} has an invalid header entry", hint="the file is corrupted") from None
    if dtype not in DTYPES:
        raise InputError(f"{path}: tensor {name!r} has unsupported dtype {dtype!r}")
    expected = math.prod(shape) * itemsize(dtype)
    if end - begin != expected or begin < 0:
        raise InputError(f"{path}: tensor {name!r} has inconsistent byte range {begin}..{end} for shape {list(shape)}")
    if end > data_len:
        raise InputError(
            f"{path}: tensor {name!r} ends at byte {end} but the file holds {data_len} data bytes",
            hint="the shard is truncated; download or copy it again",
        )
    return TensorInfo(name=name, dtype=dtype, shape=shape, file=path.name, offsets=(begin, end))
