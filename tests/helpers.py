"""Helpers for tests: read whole checkpoints (tiny ones only)."""

from __future__ import annotations

from pathlib import Path

import torch

from neuroloc_cli.io.checkpoint import Checkpoint


def load_all(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a (tiny) checkpoint, as stored, read with safetensors directly."""
    from safetensors import safe_open

    ckpt = Checkpoint.open(path)
    out = {}
    for shard in ckpt.headers:
        with safe_open(str(path / shard), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    return out


def console_script() -> str | None:
    """The `neuroloc` console script of the Python running the tests (not another install on
    PATH), or None when the package is not installed."""
    import sys

    exe = Path(sys.executable).with_name("neuroloc")
    return str(exe) if exe.is_file() else None


def record_reads(monkeypatch) -> list[tuple[str, tuple[int, int] | None]]:
    """Every `Checkpoint.read` from now on, as (tensor name, rows or None for the whole tensor)."""
    reads: list[tuple[str, tuple[int, int] | None]] = []
    real_read = Checkpoint.read

    def recorded(self, tensor, rows=None, dtype=None):
        reads.append((tensor, rows))
        return real_read(self, tensor, rows, dtype)

    monkeypatch.setattr(Checkpoint, "read", recorded)
    return reads


def read_inputs_whole(monkeypatch) -> None:
    """Make the engine hand every method whole tensors, as it did before inputs were read in
    pieces: the reference a merge read piece by piece is compared with."""
    from neuroloc_cli.merge import stream

    monkeypatch.setattr(stream, "reads_in_pieces", lambda plan, step: False)
