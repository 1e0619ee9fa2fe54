"""Helpers for tests: read whole checkpoints (tiny ones only) and whole-tensor forms of rules
that the code applies in loops, for independent computations."""

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


def top_k_mask(magnitude: torch.Tensor, k: int) -> torch.Tensor:
    """Whole-tensor top-k, the reference for the compiled magnitude cut: the `k` largest entries of `magnitude` (any shape) as a boolean mask.

    Ties at the threshold are broken by position (earlier elements first), so the mask holds
    exactly `k` True values.
    """
    flat = magnitude.reshape(-1)
    n = flat.numel()
    if k >= n:
        return torch.ones_like(magnitude, dtype=torch.bool)
    if k <= 0:
        return torch.zeros_like(magnitude, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n - k + 1).values
    mask = flat > threshold
    missing = k - int(mask.sum())
    if missing > 0:
        # Only equal magnitudes remain to fill the count; take the first ones.
        ties = torch.nonzero(flat == threshold).squeeze(1)[:missing]
        mask[ties] = True
    return mask.reshape(magnitude.shape)
