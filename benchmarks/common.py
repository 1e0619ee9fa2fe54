"""What the merge benchmarks share: synthetic inputs, and the minimal streaming reference.

- `build_family`: a synthetic bf16 Llama of a preset (base and fine-tunes, sharded), built
  once per folder and reused by later runs.
- `reference_merge`: the least a streaming task arithmetic can do: per input shard, open it
  in every model with `safe_open`, `base + Σ w·(model − base)` per tensor in float32, cast
  to bf16, one `save_file` per shard. No checks, no prefetch, no provenance.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout, not an installed copy

INPUT_SHARD = 200 * 1024**2


def build_family(folder: Path, preset: str, n_models: int, scale: float = 0.01) -> tuple[Path, list[Path]]:
    """`folder/base` and `folder/ft1..ftN` (built only where missing)."""
    import torch

    from neuroloc_cli.synthetic import build_checkpoint, derive_finetune, preset_config

    base = folder / "base"
    if not base.exists():
        print(f"building {preset} checkpoints in {folder} ...", file=sys.stderr)
        build_checkpoint(preset_config(preset), base, seed=0, dtype=torch.bfloat16, max_shard_bytes=INPUT_SHARD, tokenizer=False)
    fts = []
    for seed in range(1, n_models + 1):
        ft = folder / f"ft{seed}"
        if not ft.exists():
            derive_finetune(base, ft, seed=seed, scale=scale, max_shard_bytes=INPUT_SHARD)
        fts.append(ft)
    return base, fts


def reference_merge(base: Path, models: list[Path], weights: list[float], out: Path) -> None:
    """Minimal streaming task arithmetic of `models` onto `base` into `out` (see above)."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    out.mkdir(parents=True)
    index = base / "model.safetensors.index.json"
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else ["model.safetensors"]
    for shard in shards:
        b_file = safe_open(str(base / shard), framework="pt")
        m_files = [safe_open(str(m / shard), framework="pt") for m in models]
        merged = {}
        for name in b_file.keys():
            b = b_file.get_tensor(name).float()
            acc = b.clone()
            for f, w in zip(m_files, weights):
                acc.add_(f.get_tensor(name).float().sub_(b), alpha=w)
            merged[name] = acc.to(torch.bfloat16)
        save_file(merged, str(out / shard), metadata={"format": "pt"})
