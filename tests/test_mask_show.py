"""`neuroloc mask show` writes a valid PNG; density maps equal direct averages."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from neuroloc_cli.masks import Mask, MaskEntry
from neuroloc_cli.masks.show import density_map, layer_kind_grid


def _mask() -> Mask:
    gen = torch.Generator().manual_seed(0)
    entries = {
        f"model.layers.{i}.self_attn.o_proj.weight": MaskEntry((40, 30), None, torch.rand(40, 30, generator=gen) < 0.1 * (i + 1))
        for i in range(3)
    }
    entries["model.layers.0.mlp.down_proj.weight"] = MaskEntry((30, 50), 1, torch.rand(50, generator=gen) < 0.3)
    return Mask("element", entries)


def test_show_writes_a_valid_png(tmp_path, cli):
    path = tmp_path / "mask.safetensors"
    _mask().save(path)
    out = tmp_path / "pics" / "m.png"
    r = cli("mask", "show", path, "-o", out, "--tensor", "layers.1.self_attn.o_proj", "--json")
    assert r.exit_code == 0, r.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(out) as img:
        img.verify()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (r.json()["width"], r.json()["height"])
    assert r.json()["tensor"] == "model.layers.1.self_attn.o_proj.weight"


def test_show_names_an_ambiguous_tensor(tmp_path, cli):
    path = tmp_path / "mask.safetensors"
    _mask().save(path)
    r = cli("mask", "show", path, "-o", tmp_path / "m.png", "--tensor", "o_proj")
    assert r.exit_code == 2
    assert "--tensor 'o_proj': matches 3 tensors" in r.stderr
    assert not (tmp_path / "m.png").exists()


def test_layer_kind_grid_is_the_selected_share():
    mask = _mask()
    grid = layer_kind_grid(mask)
    for name, e in mask.entries.items():
        layer, kind = name.split(".")[2], ".".join(name.split(".")[3:])
        share = float(e.dense().float().mean())
        assert float(grid.values[grid.rows.index(layer), grid.cols.index(kind)]) == pytest.approx(share)
    assert torch.isnan(grid.values[grid.rows.index("1"), grid.cols.index("mlp.down_proj.weight")])


@pytest.mark.parametrize("name", ["model.layers.2.self_attn.o_proj.weight", "model.layers.0.mlp.down_proj.weight"])
def test_density_map_row_and_column_shares(name):
    e = _mask().entries[name]
    grid, rows, cols = density_map(e, max_side=8)
    dense = e.dense().float()
    assert torch.allclose(rows, dense.mean(1))
    assert torch.allclose(cols, dense.mean(0))
    assert grid.shape == (8, 8)
    assert float(grid.mean()) == pytest.approx(float(dense.mean()), abs=0.05)  # block means of unequal blocks
