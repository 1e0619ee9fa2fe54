"""Checkpoint reading and streaming writing, checked against the safetensors library."""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from neuroloc_cli.errors import InputError
from neuroloc_cli.io.checkpoint import Checkpoint
from neuroloc_cli.io.format import read_header
from neuroloc_cli.io.writer import OutTensor, ShardedWriter, parse_size, plan_shards
from neuroloc_cli.synthetic import ARCHITECTURES
from tests.helpers import load_all


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "a.weight": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "b.bias": torch.randn(5, generator=g),
        "c.scalar": torch.tensor(3.5, dtype=torch.float16),
        "d.ints": torch.arange(6, dtype=torch.int64).reshape(2, 3),
        "e.mask": torch.tensor([True, False, True]),
    }


@pytest.mark.parametrize("max_bytes", [10**9, 64])
def test_writer_output_reads_back_with_safetensors(tmp_path, max_bytes):
    tensors = _tensors()
    planned = [OutTensor(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    writer = ShardedWriter(tmp_path, planned, max_bytes, {"k": "v"})
    for n, t in tensors.items():
        writer.write(n, t)
    writer.close()
    back = load_all(tmp_path)
    assert set(back) == set(tensors)
    for n, t in tensors.items():
        assert back[n].dtype == t.dtype and torch.equal(back[n], t), n
    first = sorted(tmp_path.glob("*.safetensors"))[0]
    with safe_open(str(first), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "k": "v"}
    sharded = (tmp_path / "model.safetensors.index.json").exists()
    assert sharded == (max_bytes == 64)
    if sharded:
        index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        assert set(index["weight_map"]) == set(tensors)


def test_writer_refuses_out_of_plan_tensor(tmp_path):
    writer = ShardedWriter(tmp_path, [OutTensor("a", (2,), torch.float32)], 100, {})
    with pytest.raises(RuntimeError, match="writer expected a"):
        writer.write("a", torch.zeros(2, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="writer got more rows than planned for a"):
        writer.write("a", torch.zeros(3))


def test_writer_accepts_a_tensor_in_row_blocks(tmp_path):
    t = torch.arange(12, dtype=torch.float32).reshape(4, 3)
    writer = ShardedWriter(tmp_path, [OutTensor("a", (4, 3), torch.float32), OutTensor("b", (1,), torch.float32)], 10**6, {})
    writer.write("a", t[:1])
    writer.write("a", t[1:4])
    writer.write("b", torch.ones(1))
    writer.close()
    back = load_all(tmp_path)
    assert torch.equal(back["a"], t) and torch.equal(back["b"], torch.ones(1))


def test_plan_shards_caps_size_and_keeps_order():
    ts = [OutTensor(f"t{i}", (10,), torch.float32) for i in range(7)]  # 40 bytes each
    shards = plan_shards(ts, 100)
    assert [[t.name for t in s] for s in shards] == [["t0", "t1"], ["t2", "t3"], ["t4", "t5"], ["t6"]]
    assert plan_shards([OutTensor("big", (100,), torch.float32)], 10)[0][0].name == "big"


@pytest.mark.parametrize("text,expected", [("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("1234", 1234)])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


def test_checkpoint_matches_safetensors_for_every_architecture(zoo):
    for arch in ARCHITECTURES:
        for sharded in (True, False):
            fam = zoo.get(arch, sharded=sharded)
            ckpt = Checkpoint.open(fam.base)
            expected = load_all(fam.base)
            assert set(ckpt.tensors) == set(expected)
            assert ckpt.num_parameters == sum(t.numel() for t in expected.values())
            name = next(iter(expected))
            assert torch.equal(ckpt.read(name), expected[name])
            assert ckpt.num_layers == 2


def test_header_parse_matches_library_on_a_library_written_file(tmp_path):
    tensors = _tensors()
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    header = read_header(tmp_path / "model.safetensors")
    assert {n: i.shape for n, i in header.tensors.items()} == {n: tuple(t.shape) for n, t in tensors.items()}
    assert header.metadata == {"format": "pt"}


def test_truncated_shard_is_reported_with_file_and_tensor(zoo, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(zoo.get("llama").base, copy)
    shard = sorted(copy.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(
        InputError, match=r"model-0000\d-of-0000\d\.safetensors: tensor '.*' ends at byte \d+ but the file holds \d+ data bytes"
    ):
        Checkpoint.open(copy)


def test_corrupt_header_and_missing_shard(zoo, tmp_path):
    copy = tmp_path / "m"
    shutil.copytree(zoo.get("llama").base, copy)
    shards = sorted(copy.glob("model-*.safetensors"))
    shards[0].write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    with pytest.raises(InputError, match="invalid safetensors header"):
        Checkpoint.open(copy)
    shards[0].unlink()
    with pytest.raises(InputError, match="shard listed in model.safetensors.index.json is missing"):
        Checkpoint.open(copy)


def test_fingerprint_distinguishes_finetunes_with_identical_headers(zoo):
    fam = zoo.get("llama")
    base, ft = Checkpoint.open(fam.base), Checkpoint.open(fam.ft1)
    assert [h.raw for h in base.headers.values()] == [h.raw for h in ft.headers.values()]
    assert base.fingerprint != ft.fingerprint
    assert base.fingerprint == Checkpoint.open(fam.base).fingerprint


def test_read_returns_a_private_tensor(zoo):
    """safe_open hands out views of a copy-on-write mapping; read() must not, or one caller's
    in-place change would show in every later read (float32 files, where no dtype copy hides it)."""
    ckpt = Checkpoint.open(zoo.get("llama", dtype=torch.float32).base)
    name = "model.layers.0.mlp.up_proj.weight"
    first = ckpt.read(name)
    original = first.clone()
    first.add_(1.0)
    ckpt.read(name, rows=(0, 2)).zero_()
    assert torch.equal(ckpt.read(name), original)
    assert ckpt.read(name, dtype=torch.float64).dtype == torch.float64


@pytest.mark.skipif(os.name != "posix", reason="checks process ids the POSIX way")
def test_a_killed_runs_temporary_folder_is_removed_by_the_next_run(tmp_path):
    import socket
    import subprocess
    import sys

    from neuroloc_cli.io.output import atomic_output_dir

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True, check=True)
    dead_pid, host = int(gone.stdout), socket.gethostname()
    stale = tmp_path / f".out.neuroloc-tmp-{host}-{dead_pid}-0123abcd"
    live = tmp_path / f".out.neuroloc-tmp-{host}-{os.getpid()}-0123abcd"  # a run still going
    elsewhere = tmp_path / f".out.neuroloc-tmp-{host}x-{dead_pid}-0123abcd"  # another machine's
    older = tmp_path / ".out.neuroloc-tmp-0123abcd"  # the form without host and process
    other = tmp_path / f".other.neuroloc-tmp-{host}-{dead_pid}-0123abcd"  # another target's
    for folder in (stale, live, elsewhere, older, other):
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"partial")
    with atomic_output_dir(tmp_path / "out") as tmp:
        assert tmp.name.startswith(f".out.neuroloc-tmp-{host}-{os.getpid()}-")
        (tmp / "x").write_text("done")
    assert not stale.exists()
    assert live.exists() and elsewhere.exists() and older.exists() and other.exists()
    assert (tmp_path / "out" / "x").read_text() == "done"


def test_a_signal_during_the_commit_is_held_until_the_output_is_in_place(tmp_path, monkeypatch):
    # Ctrl-C between moving the old output aside and renaming the new one in would leave
    # neither at the target; the renames are one step, and the signal is raised after them.
    import signal

    from neuroloc_cli.io import commit
    from neuroloc_cli.io import output as output_mod

    target = tmp_path / "out"
    target.mkdir()
    (target / "x").write_text("old")
    real_replace = os.replace

    def replace_then_ctrl_c(src, dst):
        real_replace(src, dst)
        os.kill(os.getpid(), signal.SIGINT)  # lands after the first of the renames

    monkeypatch.setattr(output_mod.os, "replace", replace_then_ctrl_c)
    mark = commit.written_count()
    with pytest.raises(KeyboardInterrupt):
        with output_mod.atomic_output_dir(target, overwrite=True) as tmp:
            (tmp / "x").write_text("new")
    assert (target / "x").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # neither the old nor the temporary folder
    assert commit.written(since=mark) == [target]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_signals_held_raises_a_held_signal_after_the_block_and_nothing_without_one():
    import signal

    from neuroloc_cli.io.commit import signals_held

    reached = False
    with pytest.raises(KeyboardInterrupt):
        with signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)  # a signal not held would have raised by now
            reached = True
    assert reached
    with signals_held():  # nothing pending is raised again, and nothing is raised without a signal
        pass


# -- malformed safetensors headers: one InputError naming the file and tensor -----------------


def _safetensors_bytes(header: object, data: bytes = b"", declared: int | None = None) -> bytes:
    """A file of `header` (a JSON value, or the JSON text itself, or its bytes), then `data`;
    `declared` overrides the length field."""
    if isinstance(header, bytes):
        raw = header
    else:
        raw = header.encode() if isinstance(header, str) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if declared is None else declared) + raw + data


def _one(dtype: object = "F32", shape: object = (1,), offsets: object = (0, 4), data: bytes = b"\0" * 4, **extra: object) -> bytes:
    """A file of one tensor 't' whose entry has these fields."""
    entry = {"dtype": dtype, "shape": list(shape) if isinstance(shape, tuple) else shape, **extra}
    entry["data_offsets"] = list(offsets) if isinstance(offsets, tuple) else offsets
    return _safetensors_bytes({"t": entry}, data)


def _two(a: tuple[int, int], b: tuple[int, int], data_len: int) -> bytes:
    """A file of two U8 tensors 'a' and 'b' at these byte ranges."""
    header = {n: {"dtype": "U8", "shape": [r[1] - r[0]], "data_offsets": list(r)} for n, r in (("a", a), ("b", b))}
    return _safetensors_bytes(header, b"\0" * data_len)


ENTRY = '"dtype": "F32", "shape": [1], "data_offsets": [0, 4]'

# (id, file content, message fragment after "<file>: ", whether safe_open opens it all the same)
MALFORMED = [
    ("dtype-list", _one(dtype=["F32"]), "tensor 't' has unsupported dtype ['F32']", False),
    ("dtype-number", _one(dtype=3), "tensor 't' has unsupported dtype 3", False),
    ("dtype-null", _one(dtype=None), "tensor 't' has unsupported dtype None", False),
    ("dtype-outside-table", _one(dtype="U16", shape=(2,)), "tensor 't' has unsupported dtype 'U16'", True),
    ("shape-strings", _one(shape=["1"]), "tensor 't' has invalid shape ['1']", False),
    ("shape-floats", _one(shape=[1.0]), "tensor 't' has invalid shape [1.0]", False),
    ("shape-bool", _one(shape=[True]), "tensor 't' has invalid shape [True]", False),
    ("shape-negative", _one(shape=[-1]), "tensor 't' has invalid shape [-1]", False),
    ("shape-nested", _one(shape=[[1]]), "tensor 't' has invalid shape [[1]]", False),
    ("shape-not-a-list", _one(shape=1), "tensor 't' has invalid shape 1", False),
    (
        "shape-5000-digits",
        _safetensors_bytes('{"t": {"dtype": "F32", "shape": [%s], "data_offsets": [0, 4]}}' % ("9" * 5000), b"\0" * 4),
        "tensor 't' has invalid shape [inf]",
        False,
    ),
    ("offsets-strings", _one(offsets=["0", "4"]), "tensor 't' has invalid data_offsets ['0', '4']", False),
    ("offsets-floats", _one(offsets=[0, 4.0]), "tensor 't' has invalid data_offsets [0, 4.0]", False),
    ("offsets-bools", _one(dtype="U8", offsets=[False, True], data=b"\0"), "tensor 't' has invalid data_offsets [False, True]", False),
    ("offsets-three", _one(offsets=[0, 4, 4]), "tensor 't' has invalid data_offsets [0, 4, 4]", False),
    ("offsets-one", _one(offsets=[4]), "tensor 't' has invalid data_offsets [4]", False),
    ("offsets-negative", _one(offsets=[-4, 0]), "tensor 't' has invalid data_offsets [-4, 0]", False),
    (
        "offsets-minus-zero",
        _safetensors_bytes('{"t": {"dtype": "F32", "shape": [1], "data_offsets": [-0, 4]}}', b"\0" * 4),
        "tensor 't' has invalid data_offsets [-0.0, 4]",
        False,
    ),
    ("offsets-reversed", _one(shape=[0], offsets=[4, 0]), "tensor 't' has invalid data_offsets [4, 0]", False),
    ("size-mismatch", _one(shape=[2]), "tensor 't' has inconsistent byte range 0..4 for shape [2] of F32", False),
    (
        "size-overflow",
        _one(shape=[2**40, 2**40, 0], offsets=[0, 0], data=b""),
        "tensor 't' has shape [1099511627776, 1099511627776, 0], too large for any file",
        False,
    ),
    (
        "dim-too-large-for-torch",
        _one(shape=[2**63, 0], offsets=[0, 0], data=b""),
        "tensor 't' has invalid shape [9223372036854775808, 0]",
        True,
    ),
    ("truncated", _one(data=b"\0" * 3), "tensor 't' ends at byte 4 but the file holds 3 data bytes", False),
    (
        "entry-list",
        _safetensors_bytes({"t": ["F32", [1], [0, 4]]}, b"\0" * 4),
        "tensor 't' has an invalid header entry (expected an object with dtype, shape, data_offsets, got ['F32', [1], [0, 4]])",
        True,
    ),
    ("entry-string", _safetensors_bytes({"t": "F32"}), "tensor 't' has an invalid header entry (expected an object", False),
    (
        "entry-missing-key",
        _safetensors_bytes({"t": {"dtype": "F32", "shape": [0]}}),
        "tensor 't' has an invalid header entry (no 'data_offsets')",
        False,
    ),
    ("entry-extra-key", _one(offsets_=1), "tensor 't' has an invalid header entry (unexpected key 'offsets_')", True),
    (
        "metadata-string",
        _safetensors_bytes({"__metadata__": "x"}),
        "invalid safetensors header (__metadata__ is 'x', not an object of strings)",
        False,
    ),
    (
        "metadata-list",
        _safetensors_bytes({"__metadata__": ["x"]}),
        "invalid safetensors header (__metadata__ is ['x'], not an object of strings)",
        False,
    ),
    (
        "metadata-number-value",
        _safetensors_bytes({"__metadata__": {"step": 3}}),
        "invalid safetensors header (__metadata__ value of 'step' is 3, not a string)",
        False,
    ),
    (
        "metadata-object-value",
        _safetensors_bytes({"__metadata__": {"cfg": {}}}),
        "invalid safetensors header (__metadata__ value of 'cfg' is {}, not a string)",
        False,
    ),
    (
        "duplicate-tensor",
        _safetensors_bytes(f'{{"t": {{{ENTRY}}}, "t": {{{ENTRY}}}}}', b"\0" * 4),
        "invalid safetensors header (key 't' appears twice)",
        True,
    ),
    (
        "duplicate-field",
        _safetensors_bytes(f'{{"t": {{{ENTRY}, "dtype": "F32"}}}}', b"\0" * 4),
        "invalid safetensors header (key 'dtype' appears twice)",
        False,
    ),
    (
        "lone-surrogate",
        _safetensors_bytes(f'{{"\\ud800": {{{ENTRY}}}}}', b"\0" * 4),
        "invalid safetensors header (string '\\ud800' is not valid Unicode)",
        False,
    ),
    ("not-utf8", _safetensors_bytes(b'{"\xff": {}}'), "invalid safetensors header (not UTF-8 at byte 10)", False),
    ("utf16", struct.pack("<Q", 6) + "{}".encode("utf-16"), "invalid safetensors header (not UTF-8 at byte 8)", False),
    ("not-json", _safetensors_bytes("{not json}"), "invalid safetensors header (Expecting property name enclosed in double quotes", False),
    ("json-not-an-object", _safetensors_bytes([]), "invalid safetensors header (the JSON is not an object)", False),
    ("json-nested-deeply", _safetensors_bytes("[" * 100_000 + "]" * 100_000), "invalid safetensors header (JSON nested too deeply)", False),
    ("zero-length", struct.pack("<Q", 0) + b"{}", "invalid safetensors header (declared length 0 bytes)", False),
    ("length-past-end", _safetensors_bytes({}, declared=3), "invalid safetensors header (declared length 3 bytes, file 10 bytes)", False),
    ("eight-bytes-short", b"\0" * 5, "not a safetensors file (only 5 bytes)", False),
    ("overlap", _two((0, 8), (4, 12), 12), "tensor 'b' (bytes 4..12) overlaps tensor 'a' (bytes 0..8)", False),
    ("overlap-empty-tensor", _two((0, 8), (4, 4), 8), "tensor 'b' (bytes 4..4) overlaps tensor 'a' (bytes 0..8)", False),
    ("gap", _two((0, 4), (6, 8), 8), "data bytes 4..6 before tensor 'b' belong to no tensor", False),
    ("gap-at-start", _two((2, 4), (4, 8), 8), "data bytes 0..2 before tensor 'a' belong to no tensor", False),
    ("trailing-bytes", _two((0, 4), (4, 8), 10), "data bytes 8..10 after tensor 'b' belong to no tensor", False),
    ("data-but-no-tensors", _safetensors_bytes({}, b"\0" * 4), "data bytes 0..4 belong to no tensor", False),
]


@pytest.mark.parametrize("content,fragment,library_opens", [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED])
def test_read_header_refuses_a_malformed_file_in_one_line(tmp_path, content, fragment, library_opens):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(InputError) as caught:
        read_header(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: {fragment}"), message
    assert "\n" not in message
    try:
        with safe_open(str(path), framework="pt"):
            opens = True
    except Exception:  # safetensors raises its own error types
        opens = False
    assert opens == library_opens


def test_read_header_refuses_a_header_over_the_size_limit_without_reading_it(tmp_path):
    path = tmp_path / "model.safetensors"
    with open(path, "wb") as f:  # sparse: the 10^8 bytes the length claims take no disk
        f.write(struct.pack("<Q", 100_000_001))
        f.truncate(8 + 100_000_001)
    with pytest.raises(InputError, match=r"declared length 100000001 bytes, over the 100000000-byte limit"):
        read_header(path)


@pytest.mark.parametrize(
    "content",
    [
        _safetensors_bytes({}),
        _safetensors_bytes({"__metadata__": None, "z": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}),
        _two((0, 0), (0, 8), 8),  # an empty tensor before another at the same offset
        _two((4, 8), (0, 4), 8),  # listed out of offset order
        _two((0, 8), (8, 8), 8),  # an empty tensor at the very end
        _safetensors_bytes("  " + json.dumps({"t": {"dtype": "U8", "shape": [], "data_offsets": [0, 1]}}) + "    ", b"\0"),
    ],
    ids=["empty", "null-metadata-and-empty-tensor", "empty-first", "out-of-order", "empty-last", "padded-json"],
)
def test_read_header_accepts_what_the_library_opens(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    header = read_header(path)
    with safe_open(str(path), framework="pt") as f:
        assert set(f.keys()) == set(header.tensors)
        assert {n: tuple(f.get_slice(n).get_shape()) for n in f.keys()} == {n: t.shape for n, t in header.tensors.items()}


# -- checkpoint folders whose index cannot be used -----------------------------------------------


def _sharded(folder, weight_map: object = None) -> None:
    """A two-shard checkpoint: 'a' in s1.safetensors, 'b' in s2.safetensors, and an index
    holding `weight_map` (the right one if None)."""
    folder.mkdir()
    save_file({"a": torch.zeros(2)}, str(folder / "s1.safetensors"))
    save_file({"b": torch.ones(3)}, str(folder / "s2.safetensors"))
    if weight_map is None:
        weight_map = {"a": "s1.safetensors", "b": "s2.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


INDEX = "model.safetensors.index.json"
BAD_INDEXES = [
    ("empty-weight-map", {}, f"{INDEX}: 'weight_map' lists no tensors"),
    ("number-as-shard", {"a": 3}, f"{INDEX}: tensor 'a' is mapped to 3, not a shard file name"),
    ("null-shard", {"a": None}, f"{INDEX}: tensor 'a' is mapped to None, not a shard file name"),
    (
        "parent-folder",
        {"a": "../s1.safetensors"},
        f"{INDEX}: tensor 'a' is mapped to '../s1.safetensors', which is not a file in the checkpoint folder",
    ),
    (
        "absolute-path",
        {"a": "/etc/s1.safetensors"},
        f"{INDEX}: tensor 'a' is mapped to '/etc/s1.safetensors', which is not a file in the checkpoint folder",
    ),
    (
        "subfolder",
        {"a": "sub/s1.safetensors"},
        f"{INDEX}: tensor 'a' is mapped to 'sub/s1.safetensors', which is not a file in the checkpoint folder",
    ),
    ("dot-dot", {"a": ".."}, f"{INDEX}: tensor 'a' is mapped to '..', which is not a file in the checkpoint folder"),
    (
        "missing-shard",
        {"a": "s1.safetensors", "b": "s3.safetensors"},
        f"s3.safetensors: shard listed in {INDEX} is missing (it should hold tensor 'b')",
    ),
    (
        "swapped-shards",
        {"a": "s2.safetensors", "b": "s1.safetensors"},
        f"s2.safetensors: tensor 'a' is listed in {INDEX} but not in the shard (it is in s1.safetensors; fix the index)",
    ),
    (
        "wrong-shard",
        {"a": "s2.safetensors", "b": "s2.safetensors"},
        f"s2.safetensors: tensor 'a' is listed in {INDEX} but not in the shard",
    ),
    ("weight-map-a-list", ["a"], f"{INDEX}: invalid index (expected a JSON object with a 'weight_map')"),
]


@pytest.mark.parametrize("weight_map,fragment", [c[1:] for c in BAD_INDEXES], ids=[c[0] for c in BAD_INDEXES])
def test_open_refuses_an_unusable_index(tmp_path, weight_map, fragment):
    _sharded(tmp_path / "m", weight_map)
    with pytest.raises(InputError) as caught:
        Checkpoint.open(tmp_path / "m")
    assert fragment in str(caught.value) and str(caught.value).startswith(str(tmp_path / "m")), str(caught.value)


@pytest.mark.parametrize(
    "index_text,fragment",
    [
        ("{not json", f"{INDEX}: invalid JSON ("),
        ("[]", f"{INDEX}: invalid index (expected a JSON object)"),
        ('{"metadata": {}}', "expected a JSON object with a 'weight_map'"),
    ],
    ids=["not-json", "not-an-object", "no-weight-map"],
)
def test_open_refuses_an_index_that_is_not_an_index(tmp_path, index_text, fragment):
    _sharded(tmp_path / "m")
    (tmp_path / "m" / INDEX).write_text(index_text)
    with pytest.raises(InputError, match=re.escape(fragment)):
        Checkpoint.open(tmp_path / "m")


def test_open_refuses_a_checkpoint_without_tensors(tmp_path):
    (tmp_path / "m").mkdir()
    save_file({}, str(tmp_path / "m" / "model.safetensors"))
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'm' / 'model.safetensors'}: holds no tensors")):
        Checkpoint.open(tmp_path / "m")


def test_open_refuses_a_config_that_is_not_an_object(tmp_path):
    _sharded(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('["LlamaForCausalLM"]')
    with pytest.raises(InputError, match=re.escape(f"{tmp_path / 'm' / 'config.json'}: invalid config (expected a JSON object)")):
        Checkpoint.open(tmp_path / "m")


def test_open_reads_a_sound_two_shard_index(tmp_path):
    _sharded(tmp_path / "m")
    ckpt = Checkpoint.open(tmp_path / "m")
    assert {n: t.file for n, t in ckpt.tensors.items()} == {"a": "s1.safetensors", "b": "s2.safetensors"}
    assert torch.equal(ckpt.read("b"), torch.ones(3))
