"""`neuroloc mask show` writes a valid PNG; density maps equal direct averages; concentration in rows
and columns against planted masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from neuroloc_cli.masks import Mask, MaskEntry
from neuroloc_cli.masks.dimensions import concentration, profile
from neuroloc_cli.masks.show import density_map, layer_kind_grid, mask_sums


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
    grid = layer_kind_grid(mask_sums(mask))
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


def _planted() -> Mask:
    """Element mask: every selected element in column 3; row mask: 2 of 200 rows; GPT-2 Conv1D
    c_proj ([in, out]) with FFN neurons as its rows; an up_proj that --dimensions leaves out."""
    column = torch.zeros(40, 30, dtype=torch.bool)
    column[:, 3] = True
    column[::2, 3] = False  # 20 of 40 rows
    gen = torch.Generator().manual_seed(3)
    return Mask(
        "element",
        {
            "model.layers.0.self_attn.o_proj.weight": MaskEntry((40, 30), None, column),
            "model.layers.0.mlp.down_proj.weight": MaskEntry((200, 100), 0, torch.arange(200) < 2),
            "model.layers.0.mlp.up_proj.weight": MaskEntry((100, 200), None, torch.rand(100, 200, generator=gen) < 0.2),
            "h.0.mlp.c_proj.weight": MaskEntry((120, 30), 0, torch.rand(120, generator=gen) < 0.3),
            "h.1.attn.c_proj.weight": MaskEntry((30, 30), None, torch.rand(30, 30, generator=gen) < 0.1),
        },
    )


def test_concentration_of_planted_masks():
    mask = _planted()
    c = concentration("model.layers.0.self_attn.o_proj.weight", profile(mask.entries["model.layers.0.self_attn.o_proj.weight"].dense()))
    assert (c["top_rows"], c["top_cols"], c["mass"]) == (1, 1, 20)
    assert c["col_share"] == 1.0 and c["row_share"] == pytest.approx(1 / 20)
    assert (c["row_dim"], c["col_dim"]) == ("output", "input")
    c = concentration("model.layers.0.mlp.down_proj.weight", profile(mask.entries["model.layers.0.mlp.down_proj.weight"].dense()))
    assert (c["top_rows"], c["top_cols"]) == (2, 1)
    assert c["row_share"] == 1.0 and c["col_share"] == pytest.approx(2 / 200)
    assert c["even_row_share"] == pytest.approx(2 / 200) and c["even_col_share"] == pytest.approx(1 / 100)
    empty = MaskEntry((40, 30), None, torch.zeros(40, 30, dtype=torch.bool))
    c = concentration("model.layers.0.self_attn.o_proj.weight", profile(empty.dense()))
    assert c["mass"] == 0 and c["row_share"] is None and c["col_share"] is None


def test_show_prints_the_tensors_concentration(tmp_path, cli):
    path = tmp_path / "mask.safetensors"
    _planted().save(path)
    r = cli("mask", "show", path, "-o", tmp_path / "m.png", "--tensor", "self_attn.o_proj", "--json")
    assert r.exit_code == 0, r.stderr
    c = r.json()["concentration"]
    assert c["tensor"] == "model.layers.0.self_attn.o_proj.weight" and c["col_share"] == 1.0
    r = cli("mask", "show", path, "-o", tmp_path / "m.png", "--tensor", "self_attn.o_proj", "--overwrite")
    assert r.exit_code == 0, r.stderr
    assert "model.layers.0.self_attn.o_proj.weight [40, 30]: top 1 % of rows (1 of 40, output dims) hold 5.0 % " in r.stdout
    assert "of columns (1 of 30, input dims) 100.0 %" in r.stdout


def test_dimensions_reports_every_output_projection(tmp_path, cli):
    mask = _planted()
    path = tmp_path / "mask.safetensors"
    mask.save(path)
    r = cli("mask", "show", path, "-o", tmp_path / "m.png", "--dimensions", "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    assert doc["tensor"] is None and doc["concentration"] is None
    assert [d["tensor"] for d in doc["dimensions"]] == [n for n in mask.entries if "up_proj" not in n]
    for d in doc["dimensions"]:
        dense = mask.entries[d["tensor"]].dense().numpy().astype(np.float64)
        k_rows, k_cols = max(1, int(0.01 * dense.shape[0])), max(1, int(0.01 * dense.shape[1]))
        assert d["mass"] == dense.sum()
        assert d["row_share"] == pytest.approx(np.sort(dense.sum(1))[::-1][:k_rows].sum() / dense.sum())
        assert d["col_share"] == pytest.approx(np.sort(dense.sum(0))[::-1][:k_cols].sum() / dense.sum())
        assert (d["row_dim"], d["col_dim"]) == (("input", "output") if d["tensor"].startswith("h.") else ("output", "input"))
    r = cli("mask", "show", path, "-o", tmp_path / "m.png", "--dimensions", "--overwrite")
    assert r.exit_code == 0, r.stderr
    assert "h.1.attn.c_proj.weight" in r.stdout and "up_proj" not in r.stdout


def test_dimensions_without_projections_says_so(tmp_path, cli):
    path = tmp_path / "mask.safetensors"
    Mask("row", {"model.layers.0.mlp.up_proj.weight": MaskEntry((4, 3), 0, torch.tensor([True, False, True, False]))}).save(path)
    r = cli("mask", "show", path, "-o", tmp_path / "m.png", "--dimensions")
    assert r.exit_code == 0, r.stderr
    assert "no o_proj / down_proj / c_proj tensors" in r.stdout


def test_help(cli):
    r = cli("mask", "show", "--help")
    assert r.exit_code == 0 and "--dimensions" in r.stdout
