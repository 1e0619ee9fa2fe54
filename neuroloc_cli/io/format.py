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
import reprlib
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, TypeGuard

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

# The same names as a type, for the pydantic models of recipes and training configs (one
# table: a dtype added above is accepted everywhere).
DtypeName = Literal[tuple(DTYPE_NAMES)]  # type: ignore[valid-type]

# Limits safetensors itself enforces when it opens a file: a header of at most 10^8 bytes,
# and sizes computed in 64-bit unsigned arithmetic (an overflow refuses the file).
_MAX_HEADER = 100_000_000
_USIZE_MAX = 2**64 - 1
_DIM_MAX = 2**63 - 1  # torch sizes are signed 64-bit: a larger dimension cannot be built
_ENTRY_KEYS = ("dtype", "shape", "data_offsets")
_CORRUPTED = "the file is corrupted or not a safetensors file"

_short = reprlib.Repr()  # bounded reprs, so a corrupted header cannot flood a message
_short.maxstring, _short.maxother, _short.maxlist, _short.maxlevel = 100, 100, 6, 2


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

    The rules are those `safetensors.safe_open` applies, so a file this accepts is one the
    library opens, and a byte-range fault (truncation, overlap, gap, trailing bytes) is
    reported here, naming the file and tensor, rather than halfway through a merge:

    - an 8-byte length `N`, 0 < N <= 10^8, with the file at least 8 + N bytes long;
    - N bytes of UTF-8 JSON: one object, whose optional `__metadata__` (or null) maps
      strings to strings and whose every other key names a tensor;
    - each tensor an object of exactly `dtype` (a name from `DTYPES`), `shape` (non-negative
      integers) and `data_offsets` ([begin, end], begin <= end), with end - begin the size of
      the shape in that dtype, computed without overflowing 64 bits;
    - sorted by offsets, the tensors tile the data section exactly: no overlap, no gap, no
      byte after the last.

    It is stricter than the library in a few ways no real writer trips: a repeated JSON key,
    a key other than those three in a tensor's entry, a dtype outside `DTYPES`, a dimension
    of 2^63 or more (torch cannot hold it).

    Raises:
        InputError: the file is missing, truncated or has an invalid header.
    """
    raw, size = _read_raw_header(path)
    doc = _parse_json(path, raw)
    metadata = _metadata(path, doc.pop("__metadata__", None))
    data_len = size - 8 - len(raw)
    tensors = {name: _tensor_info(path, name, entry, data_len) for name, entry in doc.items()}
    _check_tiling(path, tensors.values(), data_len)
    return Header(tensors=tensors, metadata=metadata, raw=raw, data_start=8 + len(raw))


def _read_raw_header(path: Path) -> tuple[bytes, int]:
    """The header's JSON bytes and the file's size. The length field is checked against the
    file before anything is read, so a corrupted one cannot make this allocate much."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            prefix = f.read(8)
            if len(prefix) < 8:
                raise InputError(f"{path}: not a safetensors file (only {size} bytes)")
            (n,) = struct.unpack("<Q", prefix)
            _check_header_length(path, n, size)
            raw = f.read(n)
    except OSError as e:
        raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
    if len(raw) < n:
        raise InputError(f"{path}: the file shrank while its header was read", hint="retry once nothing writes to it")
    return raw, size


def _check_header_length(path: Path, n: int, size: int) -> None:
    """Refuse a length field that no valid file has, before that many bytes are read."""
    if n == 0:
        raise InputError(f"{path}: invalid safetensors header (declared length 0 bytes)", hint=_CORRUPTED)
    if 8 + n > size:
        raise InputError(
            f"{path}: invalid safetensors header (declared length {n} bytes, file {size} bytes)",
            hint="the file is truncated or not a safetensors file",
        )
    if n > _MAX_HEADER:
        raise InputError(
            f"{path}: invalid safetensors header (declared length {n} bytes, over the {_MAX_HEADER}-byte limit)",
            hint=_CORRUPTED,
        )


def _parse_json(path: Path, raw: bytes) -> dict[str, object]:
    """The header as a dict. Decoding is strict UTF-8, as in the library (`json.loads` would
    also take UTF-16 or UTF-32 bytes), and a too-deep nesting is an error, not a crash."""
    try:
        doc = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_int=_parse_int)
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: invalid safetensors header (not UTF-8 at byte {8 + e.start})", hint=_CORRUPTED) from None
    except RecursionError:
        raise InputError(f"{path}: invalid safetensors header (JSON nested too deeply)", hint=_CORRUPTED) from None
    except ValueError as e:
        raise InputError(f"{path}: invalid safetensors header ({e})", hint=_CORRUPTED) from None
    if not isinstance(doc, dict):
        raise InputError(f"{path}: invalid safetensors header (the JSON is not an object)", hint=_CORRUPTED)
    return doc


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """Build a JSON object, refusing what the library's parser refuses or would read
    differently: a repeated key (Python keeps the last silently) and a lone surrogate
    escape such as "\\ud800" (not Unicode text)."""
    out: dict[str, object] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"key {_short.repr(key)} appears twice")
        for text in (key, value) if isinstance(value, str) else (key,):
            if not _is_unicode(text):
                raise ValueError(f"string {_short.repr(text)} is not valid Unicode")
        out[key] = value
    return out


def _parse_int(literal: str) -> int | float:
    """A JSON integer as an int, except where the library's parser reads a float, and so
    refuses it as a dimension or an offset: `-0`, and integers too long for 64 bits (which
    also spares Python's limit on converting very long strings of digits)."""
    return float(literal) if literal == "-0" or len(literal) > 20 else int(literal)


def _is_unicode(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _metadata(path: Path, value: object) -> dict[str, str]:
    """`__metadata__`: absent or null for none, else an object of strings only."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InputError(f"{path}: invalid safetensors header (__metadata__ is {_short.repr(value)}, not an object of strings)")
    for key, text in value.items():
        if not isinstance(text, str):
            raise InputError(
                f"{path}: invalid safetensors header (__metadata__ value of {_short.repr(key)} is {_short.repr(text)}, not a string)"
            )
    return value


def _tensor_info(path: Path, name: str, entry: object, data_len: int) -> TensorInfo:
    """Check one tensor's entry on its own: its fields, and its byte range against its shape
    and the data section's length."""
    where = f"{path}: tensor {_short.repr(name)}"
    dtype, shape, offsets = _entry_fields(where, entry)
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise InputError(f"{where} has unsupported dtype {_short.repr(dtype)}", hint=f"neuroloc reads {', '.join(DTYPES)}")
    if not _are_sizes(shape, _DIM_MAX):
        raise InputError(f"{where} has invalid shape {_short.repr(shape)}", hint="expected a list of non-negative integers")
    if not (_are_sizes(offsets, _USIZE_MAX) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise InputError(f"{where} has invalid data_offsets {_short.repr(offsets)}", hint="expected [begin, end] with 0 <= begin <= end")
    begin, end = offsets
    nbytes = _byte_size(shape, itemsize(dtype))
    if nbytes is None:
        raise InputError(
            f"{where} has shape {_short.repr(shape)}, too large for any file (its size in {dtype} overflows 64 bits)", hint=_CORRUPTED
        )
    if nbytes != end - begin:
        raise InputError(f"{where} has inconsistent byte range {begin}..{end} for shape {_short.repr(shape)} of {dtype}", hint=_CORRUPTED)
    if end > data_len:
        raise InputError(
            f"{where} ends at byte {end} but the file holds {data_len} data bytes",
            hint="the shard is truncated; download or copy it again",
        )
    return TensorInfo(name=name, dtype=dtype, shape=tuple(shape), file=path.name, offsets=(begin, end))


def _entry_fields(where: str, entry: object) -> tuple[object, object, object]:
    """An entry's dtype, shape and data_offsets; refuses any other form of entry."""
    if not isinstance(entry, dict):
        problem = f"expected an object with {', '.join(_ENTRY_KEYS)}, got {_short.repr(entry)}"
    else:
        missing = [k for k in _ENTRY_KEYS if k not in entry]
        extra = [k for k in entry if k not in _ENTRY_KEYS]
        if not missing and not extra:
            return entry["dtype"], entry["shape"], entry["data_offsets"]
        problem = f"no {missing[0]!r}" if missing else f"unexpected key {_short.repr(extra[0])}"
    raise InputError(f"{where} has an invalid header entry ({problem})", hint=_CORRUPTED)


def _are_sizes(value: object, most: int) -> TypeGuard[list[int]]:
    """Whether `value` is a list of integers in [0, most]; `True` is an int in Python, but not
    in JSON, so booleans are refused."""
    return isinstance(value, list) and all(type(v) is int and 0 <= v <= most for v in value)


def _byte_size(shape: list[int], itemsize: int) -> int | None:
    """The bytes a tensor of `shape` takes, multiplied out in order as the library does, or
    None where that overflows 64 bits: the library refuses such a file even when a later
    dimension is 0, and stopping early keeps the numbers small whatever the header says."""
    count = 1
    for dim in shape:
        count *= dim
        if count > _USIZE_MAX:
            return None
    nbytes = count * itemsize
    return None if nbytes * 8 > _USIZE_MAX else nbytes


def _check_tiling(path: Path, tensors: Iterable[TensorInfo], data_len: int) -> None:
    """Require the byte ranges, sorted, to tile the data section exactly, as the library does:
    an overlap would let one tensor's data change another's, and a gap or trailing bytes mean
    the header does not describe the file."""
    ordered = sorted(tensors, key=lambda t: t.offsets)
    pos = 0
    for i, info in enumerate(ordered):
        begin, end = info.offsets
        if begin < pos:  # so i > 0, and the tensor before ends at pos
            other = ordered[i - 1]
            raise InputError(
                f"{path}: tensor {_short.repr(info.name)} (bytes {begin}..{end}) overlaps tensor "
                f"{_short.repr(other.name)} (bytes {other.offsets[0]}..{other.offsets[1]})",
                hint=_CORRUPTED,
            )
        if begin > pos:
            raise InputError(
                f"{path}: data bytes {pos}..{begin} before tensor {_short.repr(info.name)} belong to no tensor", hint=_CORRUPTED
            )
        pos = end
    if pos < data_len:  # not beyond: each tensor's end was checked against data_len
        after = f" after tensor {_short.repr(ordered[-1].name)}" if ordered else ""
        raise InputError(f"{path}: data bytes {pos}..{data_len}{after} belong to no tensor", hint=_CORRUPTED)
