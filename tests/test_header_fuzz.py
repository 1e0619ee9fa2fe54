"""`read_header` fuzzed against the safetensors library itself.

Whatever a file holds, `read_header` returns or raises `InputError`, and quickly. A file it
accepts is one `safe_open` opens, with the same tensors, dtypes, shapes, bytes and metadata.
For the rules about byte ranges (offsets, shapes, truncation, trailing bytes) the two agree
both ways: where the library opens a file, `read_header` accepts it too.

The runs are derandomized and keep no example database, so CI sees the same examples each
time, and Hypothesis' other caches go to a temporary folder: nothing is written into the
repository.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import struct
import time
import tracemalloc
from dataclasses import dataclass, replace
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from neuroloc_cli.errors import InputError
from neuroloc_cli.io.format import DTYPES, itemsize, read_header

FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# What a file looks like to a reader: its metadata and, per tensor, (dtype, shape, data bytes).
View = tuple[dict[str, str], dict[str, tuple[str, tuple[int, ...], bytes]]]


@pytest.fixture(scope="module")
def write(tmp_path_factory: pytest.TempPathFactory):
    """Write bytes to a fresh file (a fresh name each time: `safe_open` maps files, so one
    must not be rewritten under a mapping) and return its path."""
    folder, counter = tmp_path_factory.mktemp("fuzz"), itertools.count()

    def _write(data: bytes) -> Path:
        path = folder / f"{next(counter)}.safetensors"
        path.write_bytes(data)
        return path

    return _write


def ours(path: Path) -> View | None:
    """What `read_header` makes of the file, or None where it refuses it. Any exception
    other than InputError propagates and fails the test."""
    try:
        header = read_header(path)
    except InputError:
        return None
    data = path.read_bytes()[header.data_start :]
    return header.metadata, {n: (t.dtype, t.shape, data[t.offsets[0] : t.offsets[1]]) for n, t in header.tensors.items()}


def library(path: Path) -> View | None:
    """What `safe_open` makes of the file, or None where it refuses it."""
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {}
            for name in f.keys():
                part = f.get_slice(name)
                raw = f.get_tensor(name).reshape(-1).view(torch.uint8).numpy().tobytes()
                tensors[name] = (part.get_dtype(), tuple(part.get_shape()), raw)
            return f.metadata() or {}, tensors
    except Exception:  # its own SafetensorError, or an OS error mapping an odd file
        return None


# -- a structured safetensors file, so that mutations can target one field --------------------


@dataclass(frozen=True)
class Entry:
    name: str
    dtype: object
    shape: object
    offsets: object


@dataclass(frozen=True)
class File:
    entries: tuple[Entry, ...]  # in the order the JSON lists them
    metadata: object  # None: no __metadata__ key
    data: bytes
    padding: int  # spaces after the JSON, as the library's writer pads to 8 bytes
    ascii: bool  # \u-escape non-ASCII names in the JSON or not

    def header(self) -> bytes:
        doc: dict[str, object] = {} if self.metadata is None else {"__metadata__": self.metadata}
        for e in self.entries:
            doc[e.name] = {"dtype": e.dtype, "shape": e.shape, "data_offsets": e.offsets}
        return json.dumps(doc, ensure_ascii=self.ascii).encode() + b" " * self.padding

    def to_bytes(self) -> bytes:
        header = self.header()
        return struct.pack("<Q", len(header)) + header + self.data


names = st.text(st.characters(codec="utf-8"), max_size=12).filter(lambda n: n != "__metadata__")


@st.composite
def valid_files(draw: st.DrawFn) -> File:
    """A file the format allows: tensors of table dtypes and small shapes, their byte ranges
    tiling the data section in offset order, listed in the JSON in any order."""
    entries, pos = [], 0
    for name in draw(st.lists(names, unique=True, max_size=5)):
        dtype = draw(st.sampled_from(sorted(DTYPES)))
        shape = draw(st.lists(st.integers(0, 4), max_size=3))
        nbytes = math.prod(shape) * itemsize(dtype)
        entries.append(Entry(name, dtype, shape, [pos, pos + nbytes]))
        pos += nbytes
    return File(
        entries=tuple(draw(st.permutations(entries))),
        metadata=draw(st.none() | st.dictionaries(names, st.text(st.characters(codec="utf-8"), max_size=8), max_size=3)),
        data=draw(st.binary(min_size=pos, max_size=pos)),
        padding=draw(st.integers(0, 7)),
        ascii=draw(st.booleans()),
    )


def with_entry(draw: st.DrawFn, file: File, **change: object) -> File:
    """`file` with one entry (drawn) changed; `file` itself if it has none."""
    if not file.entries:
        return file
    i = draw(st.integers(0, len(file.entries) - 1))
    entries = list(file.entries)
    entries[i] = replace(entries[i], **{k: v(entries[i]) if callable(v) else v for k, v in change.items()})
    return replace(file, entries=tuple(entries))


deltas = st.sampled_from([d for d in range(-8, 9) if d])


def shift_offset(draw: st.DrawFn, file: File) -> bytes:
    side, delta = draw(st.integers(0, 1)), draw(deltas)
    return with_entry(draw, file, offsets=lambda e: [o + delta if k == side else o for k, o in enumerate(e.offsets)]).to_bytes()


def move_tensor(draw: st.DrawFn, file: File) -> bytes:
    """The last tensor in offset order moved by up to its size, and the data section grown or
    shrunk as much: a pure gap or a pure overlap, the sizes all consistent."""
    if not file.entries:
        return file.to_bytes()
    last = max(file.entries, key=lambda e: e.offsets)
    delta = draw(st.integers(1, last.offsets[1] - last.offsets[0] or 8)) * draw(st.sampled_from([1, -1]))
    moved = [replace(e, offsets=[o + delta for o in e.offsets]) if e is last else e for e in file.entries]
    data = file.data + bytes(delta) if delta > 0 else file.data[: max(len(file.data) + delta, 0)]
    return replace(file, entries=tuple(moved), data=data).to_bytes()


def change_shape(draw: st.DrawFn, file: File) -> bytes:
    new = draw(st.lists(st.integers(0, 6), max_size=3))
    return with_entry(draw, file, shape=new).to_bytes()


def swap_dtype(draw: st.DrawFn, file: File) -> bytes:
    return with_entry(draw, file, dtype=draw(st.sampled_from(sorted(DTYPES)))).to_bytes()


def truncate(draw: st.DrawFn, file: File) -> bytes:
    data = file.to_bytes()
    return data[: draw(st.integers(0, len(data) - 1))]


def append(draw: st.DrawFn, file: File) -> bytes:
    return file.to_bytes() + draw(st.binary(min_size=1, max_size=16))


# Mutations after which the library's verdict and ours must agree: they touch only byte ranges.
BYTE_RANGE_MUTATIONS = [shift_offset, move_tensor, change_shape, swap_dtype, truncate, append]


junk = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=6),
    st.lists(
        st.one_of(
            st.integers(-3, 2**65), st.booleans(), st.floats(allow_nan=False), st.text(max_size=3), st.lists(st.integers(0, 4), max_size=2)
        ),
        max_size=3,
    ),
    st.dictionaries(st.text(max_size=4), st.integers(), max_size=2),
)
junk_dtypes = st.one_of(
    st.sampled_from(["U16", "U32", "U64", "C64", "F4", "F8_E8M0", "f32", "", "float32"]),
    junk.filter(lambda v: not (isinstance(v, str) and v in DTYPES)),
)


def junk_dtype(draw: st.DrawFn, file: File) -> bytes:
    return with_entry(draw, file, dtype=draw(junk_dtypes)).to_bytes()


def junk_shape(draw: st.DrawFn, file: File) -> bytes:
    value = draw(junk.filter(lambda v: not _is_size_list(v, 2**63 - 1)))
    return with_entry(draw, file, shape=value).to_bytes()


def junk_offsets(draw: st.DrawFn, file: File) -> bytes:
    value = draw(junk.filter(lambda v: not (_is_size_list(v, 2**64 - 1) and len(v) == 2)))
    return with_entry(draw, file, offsets=value).to_bytes()


def retype_number(draw: st.DrawFn, file: File) -> bytes:
    """One dimension or offset written as the float, string or (0 or 1) boolean of its value,
    so that the sizes still add up and only the type is wrong."""
    field = draw(st.sampled_from(["shape", "offsets"]))

    def retyped(entry: Entry) -> list[object]:
        values = list(getattr(entry, field))
        if values:
            i = draw(st.integers(0, len(values) - 1))
            kinds = [float, str] + ([bool] if values[i] in (0, 1) else [])
            values[i] = draw(st.sampled_from(kinds))(values[i])
        return values

    return with_entry(draw, file, **{field: retyped}).to_bytes()


def junk_metadata(draw: st.DrawFn, file: File) -> bytes:
    value = draw(junk.filter(lambda v: v is not None and not (isinstance(v, dict) and all(isinstance(x, str) for x in v.values()))))
    return replace(file, metadata=value).to_bytes()


def junk_entry(draw: st.DrawFn, file: File) -> bytes:
    """An entry that is not an object, or has a key too many."""
    if not file.entries:
        return file.to_bytes()
    doc = json.loads(file.header())
    name = draw(st.sampled_from([e.name for e in file.entries]))
    doc[name] = draw(junk.filter(lambda v: not isinstance(v, dict)) | st.just({**doc[name], "extra": 1}))
    header = json.dumps(doc).encode()
    return struct.pack("<Q", len(header)) + header + file.data


# Mutations that leave a file the format refuses, and so must be refused.
INVALID_MUTATIONS = [junk_dtype, junk_shape, junk_offsets, retype_number, junk_metadata, junk_entry]


def change_length(draw: st.DrawFn, file: File) -> bytes:
    data = file.to_bytes()
    n = draw(st.integers(-16, 16).map(lambda d: len(file.header()) + d) | st.integers(0, 2**64 - 1))
    return struct.pack("<Q", max(n, 0)) + data[8:]


def flip_bytes(draw: st.DrawFn, file: File) -> bytes:
    data = bytearray(file.to_bytes())
    for _ in range(draw(st.integers(1, 3))):
        i = draw(st.integers(8, 8 + len(file.header()) - 1))
        data[i] ^= draw(st.integers(1, 255))
    return bytes(data)


# Mutations after which either verdict is fine, as long as an acceptance matches the library.
OTHER_MUTATIONS = [change_length, flip_bytes]


def _is_size_list(value: object, most: int) -> bool:
    return isinstance(value, list) and all(type(v) is int and 0 <= v <= most for v in value)


# -- the properties ------------------------------------------------------------------------------


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes_are_parsed_or_refused(write, data):
    path = write(data)
    mine = ours(path)
    assert mine is None or mine == library(path)


@FUZZ
@given(body=st.binary(max_size=200), declared_extra=st.integers(0, 8))
def test_random_bytes_after_a_plausible_length_are_parsed_or_refused(write, body, declared_extra):
    path = write(struct.pack("<Q", max(len(body) - declared_extra, 0)) + body)
    mine = ours(path)
    assert mine is None or mine == library(path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.floats(allow_nan=False) | st.text(max_size=5),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=12,
)


@FUZZ
@given(doc=json_values, data=st.binary(max_size=32))
def test_random_json_headers_are_parsed_or_refused(write, doc, data):
    header = json.dumps(doc).encode()
    path = write(struct.pack("<Q", len(header)) + header + data)
    mine = ours(path)
    assert mine is None or mine == library(path)


@FUZZ
@given(file=valid_files())
def test_valid_files_parse_as_the_library_reads_them(write, file):
    path = write(file.to_bytes())
    mine = ours(path)
    assert mine is not None
    assert mine == library(path)
    assert set(mine[1]) == {e.name for e in file.entries}


@settings(FUZZ, max_examples=400)
@given(file=valid_files(), data=st.data())
def test_byte_range_mutations_get_the_library_verdict(write, file, data):
    mutation = data.draw(st.sampled_from(BYTE_RANGE_MUTATIONS))
    path = write(mutation(data.draw, file))
    assert ours(path) == library(path), mutation.__name__


@settings(FUZZ, max_examples=300)
@given(file=valid_files(), data=st.data())
def test_invalid_mutations_are_refused(write, file, data):
    mutation = data.draw(st.sampled_from(INVALID_MUTATIONS))
    path = write(mutation(data.draw, file))
    if path.read_bytes() != file.to_bytes():
        assert ours(path) is None, mutation.__name__


@settings(FUZZ, max_examples=300)
@given(file=valid_files(), data=st.data())
def test_other_mutations_are_parsed_as_the_library_reads_them_or_refused(write, file, data):
    mutation = data.draw(st.sampled_from(OTHER_MUTATIONS))
    path = write(mutation(data.draw, file))
    mine = ours(path)
    assert mine is None or mine == library(path), mutation.__name__


# -- no allocation or work in proportion to what a header claims --------------------------------


def _header_file(doc: dict, data: bytes = b"", declared: int | None = None) -> bytes:
    header = json.dumps(doc).encode()
    return struct.pack("<Q", len(header) if declared is None else declared) + header + data


@pytest.mark.parametrize(
    "content",
    [
        # 2^40 F32 elements declared in a file of a few bytes
        _header_file({"t": {"dtype": "F32", "shape": [2**20, 2**20], "data_offsets": [0, 2**42]}}, b"\0" * 16),
        # a size that overflows 64 bits before a final 0 makes it empty
        _header_file({"t": {"dtype": "F32", "shape": [2**40, 2**40, 0], "data_offsets": [0, 0]}}),
        # ten thousand dimensions of 2^32
        _header_file({"t": {"dtype": "F32", "shape": [2**32] * 10_000, "data_offsets": [0, 4]}}, b"\0" * 4),
        # a header length of 2^63 bytes, and one just over the 10^8-byte limit, in a tiny file
        _header_file({}, declared=2**63),
        _header_file({}, declared=100_000_001),
    ],
    ids=["2^40-elements", "overflow-then-zero", "many-huge-dims", "2^63-byte-header", "over-the-header-limit"],
)
def test_huge_claims_are_refused_fast_and_without_allocating(write, content):
    path = write(content)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(InputError, match=re.escape(str(path))):
            read_header(path)
        elapsed = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert elapsed < 1.0 and peak < 4 * 2**20, (elapsed, peak)
    assert library(path) is None
