"""Checkpoint reading and streaming writing, checked against the safetensors library."""

from __future__ import annotations

import json
import os
import shutil

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
    with pytest.raises(InputError, match=r"model-0000\d-of-0000\d\.safetensors: tensor '.*' ends at byte \d+ but the file holds \d+ data bytes"):
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
