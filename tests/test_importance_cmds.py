"""`neuroloc importance stats|show`: numbers against numpy float64, planted concentrations, bad inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from neuroloc_cli.masks import Mask, MaskEntry
from neuroloc_cli.masks.importance import Importance, ImportanceMeta, write_importance
from neuroloc_cli.masks.show import importance_sums, layer_kind_grid, scale_columns

PROVENANCE = {"model": "/m", "model_fingerprint": "sha256:abc", "settings": {"samples": 4}}


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    heavy = lambda *shape: torch.rand(*shape, generator=gen) ** 8  # a few large scores, many small ones
    t = {}
    for i in range(2):
        t[f"model.layers.{i}.self_attn.o_proj.weight"] = heavy(40, 30) * (i + 1)
        t[f"model.layers.{i}.mlp.down_proj.weight"] = heavy(30, 50)
    t["model.layers.1.mlp.up_proj.weight"] = torch.full((20, 10), 0.5)  # ties everywhere
    t["model.layers.1.input_layernorm.weight"] = torch.zeros(30)  # nothing to share
    t["model.norm.weight"] = heavy(30)
    return t


@pytest.fixture
def imp_file(tmp_path):
    path = tmp_path / "imp.safetensors"
    write_importance(path, _tensors(), ImportanceMeta("taylor", "sum", "de", PROVENANCE))
    return path


def _top_share(values: np.ndarray) -> float | None:
    k = min(values.size, max(1, int(0.01 * values.size)))
    total = values.sum()
    return float(np.sort(values)[::-1][:k].sum() / total) if total > 0 else None


def _expected(groups: dict[str, list[np.ndarray]], file_sum: float) -> dict[str, dict]:
    out = {}
    for key, parts in groups.items():
        v = np.concatenate(parts)
        out[key] = {
            "elements": v.size,
            "sum": v.sum(),
            "mean": v.mean(),
            "max": v.max(),
            "share": v.sum() / file_sum,
            "top_share": _top_share(v),
        }
    return out


def _check(rows: list[dict], key: str, expected: dict[str, dict]) -> None:
    assert [r[key] for r in rows] == list(expected)
    for r in rows:
        e = expected[r[key]]
        assert r["elements"] == e["elements"]
        assert r["max"] == pytest.approx(e["max"], abs=0)
        for k in ("sum", "mean", "share"):
            assert r[k] == pytest.approx(e[k], rel=1e-9), (r[key], k)
        assert (r["top_share"] is None) == (e["top_share"] is None)
        if e["top_share"] is not None:
            assert r["top_share"] == pytest.approx(e["top_share"], rel=1e-9), (r[key], "top_share")


def test_stats_match_numpy(imp_file, cli):
    r = cli("importance", "stats", imp_file, "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    tensors = {n: t.numpy().astype(np.float64).reshape(-1) for n, t in _tensors().items()}
    everything = np.concatenate(list(tensors.values()))
    file_sum = everything.sum()
    assert {k: doc[k] for k in ("file", "score", "aggregate", "source", "granularity", "fingerprints", "tensor_count", "top")} == {
        "file": str(imp_file),
        "score": "taylor",
        "aggregate": "sum",
        "source": "de",
        "granularity": "element",
        "fingerprints": {"model_fingerprint": "sha256:abc"},
        "tensor_count": len(tensors),
        "top": 0.01,
    }
    assert doc["provenance"] == PROVENANCE
    assert doc["elements"] == everything.size
    assert doc["sum"] == pytest.approx(file_sum, rel=1e-9)
    assert doc["mean"] == pytest.approx(everything.mean(), rel=1e-9)
    assert doc["max"] == everything.max()
    assert doc["top_share"] == pytest.approx(_top_share(everything), rel=1e-9)

    layer_of = lambda n: n.split(".")[2] if n.startswith("model.layers.") else "-"
    kind_of = lambda n: ".".join(n.split(".")[3:]) if n.startswith("model.layers.") else n
    by_layer: dict[str, list] = {}
    by_kind: dict[str, list] = {}
    for n, v in tensors.items():
        by_layer.setdefault(layer_of(n), []).append(v)
        by_kind.setdefault(kind_of(n), []).append(v)
    _check(doc["tensors"], "tensor", _expected({n: [v] for n, v in tensors.items()}, file_sum))
    _check(doc["layers"], "layer", _expected(by_layer, file_sum))
    _check(doc["kinds"], "kind", _expected(by_kind, file_sum))
    ties = next(t for t in doc["tensors"] if t["tensor"] == "model.layers.1.mlp.up_proj.weight")
    assert ties["top_share"] == pytest.approx(2 / 200)  # 1 % of 200 equal scores
    assert ties["shape"] == [20, 10] and ties["layer"] == 1 and ties["kind"] == "mlp.up_proj.weight"


def test_stats_tables(imp_file, cli):
    r = cli("importance", "stats", imp_file)
    assert r.exit_code == 0, r.stderr
    assert r.stdout.startswith(f"{imp_file}: taylor scores of de (element, aggregate sum), 7 tensors, 5660 elements")
    assert "model_fingerprint: sha256:abc" in r.stdout
    for title in ("per layer", "per tensor kind", "per tensor"):
        assert title in r.stdout


def test_heat_map_is_the_mean_scaled_per_kind(imp_file):
    grid = scale_columns(layer_kind_grid(importance_sums(Importance.open(imp_file))))
    means = {n: float(t.double().mean()) for n, t in _tensors().items()}
    o_proj = [means[f"model.layers.{i}.self_attn.o_proj.weight"] for i in range(2)]
    col = grid.cols.index("self_attn.o_proj.weight")
    for i in range(2):
        assert float(grid.values[grid.rows.index(str(i)), col]) == pytest.approx(o_proj[i] / max(o_proj), rel=1e-5)
    assert float(grid.values[grid.rows.index("1"), grid.cols.index("input_layernorm.weight")]) == 0.0  # zeros stay zeros
    assert torch.isnan(grid.values[grid.rows.index("0"), grid.cols.index("mlp.up_proj.weight")])  # no such tensor


def _planted(tmp_path):
    """All importance in column 7 of one tensor, in rows 0-1 of another; a GPT-2 Conv1D c_proj."""
    col = torch.zeros(200, 100)
    col[:, 7] = 1.0
    rows = torch.zeros(200, 100)
    rows[:2] = torch.rand(2, 100) + 0.1
    gen = torch.Generator().manual_seed(1)
    tensors = {
        "model.layers.0.self_attn.o_proj.weight": col,
        "model.layers.0.mlp.down_proj.weight": rows,
        "model.layers.0.mlp.up_proj.weight": torch.rand(100, 200, generator=gen),
        "h.0.mlp.c_proj.weight": torch.rand(120, 30, generator=gen) ** 4,
        "h.0.attn.c_proj.weight": torch.rand(30, 30, generator=gen),
    }
    path = tmp_path / "planted.safetensors"
    write_importance(path, tensors, ImportanceMeta("taylor", "sum", "fr"))
    return path, tensors


def test_show_reports_a_planted_concentration(tmp_path, cli):
    path, _ = _planted(tmp_path)
    out = tmp_path / "pics" / "imp.png"
    r = cli("importance", "show", path, "-o", out, "--tensor", "layers.0.self_attn.o_proj", "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (doc["width"], doc["height"])
    assert sorted(p.name for p in out.parent.iterdir()) == ["imp.png"]  # nothing left of the atomic write
    c = doc["concentration"]
    assert doc["tensor"] == c["tensor"] == "model.layers.0.self_attn.o_proj.weight"
    assert (c["rows"], c["cols"], c["top_rows"], c["top_cols"], c["row_dim"], c["col_dim"]) == (200, 100, 2, 1, "output", "input")
    assert c["col_share"] == pytest.approx(1.0) and c["row_share"] == pytest.approx(2 / 200)
    assert c["mass"] == pytest.approx(200.0)
    assert doc["dimensions"] is None

    r = cli("importance", "show", path, "-o", out, "--overwrite", "--tensor", "model.layers.0.mlp.down_proj.weight")
    assert r.exit_code == 0, r.stderr
    assert "top 1 % of rows (2 of 200, output dims) hold 100.0 % of its importance" in r.stdout


def test_dimensions_lists_every_output_projection(tmp_path, cli):
    path, tensors = _planted(tmp_path)
    r = cli("importance", "show", path, "-o", tmp_path / "d.png", "--dimensions", "--json")
    assert r.exit_code == 0, r.stderr
    rows = r.json()["dimensions"]
    assert [d["tensor"] for d in rows] == [n for n in tensors if "up_proj" not in n]
    for d in rows:
        v = tensors[d["tensor"]].numpy().astype(np.float64)
        by_row, by_col = np.sort(v.sum(1))[::-1], np.sort(v.sum(0))[::-1]
        k_rows, k_cols = max(1, int(0.01 * v.shape[0])), max(1, int(0.01 * v.shape[1]))
        assert (d["top_rows"], d["top_cols"]) == (k_rows, k_cols)
        assert d["row_share"] == pytest.approx(by_row[:k_rows].sum() / v.sum(), rel=1e-6)
        assert d["col_share"] == pytest.approx(by_col[:k_cols].sum() / v.sum(), rel=1e-6)
        assert d["even_row_share"] == pytest.approx(k_rows / v.shape[0])
        conv1d = d["tensor"].startswith("h.")
        assert (d["row_dim"], d["col_dim"]) == (("input", "output") if conv1d else ("output", "input"))
    r = cli("importance", "show", path, "-o", tmp_path / "d.png", "--dimensions", "--overwrite")
    assert r.exit_code == 0, r.stderr
    assert "h.0.mlp.c_proj.weight" in r.stdout and "rows are" in r.stdout


def test_unknown_tensor_is_a_usage_error_with_a_suggestion(imp_file, tmp_path, cli):
    out = tmp_path / "x.png"
    r = cli("importance", "show", imp_file, "-o", out, "--tensor", "model.layers.1.self_attn.o_proj.weigth")
    assert r.exit_code == 2
    assert r.stderr.strip() == (
        "error: --tensor 'model.layers.1.self_attn.o_proj.weigth': no tensor of the importance file matches "
        '(did you mean "model.layers.1.self_attn.o_proj.weight"?)'
    )
    assert not out.exists()


def _mask_file(tmp_path):
    path = tmp_path / "mask.safetensors"
    Mask("row", {"model.layers.0.self_attn.o_proj.weight": MaskEntry((4, 3), 0, torch.tensor([True, False, True, False]))}).save(path)
    return path


def _checkpoint_file(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"model.layers.0.self_attn.o_proj.weight": torch.ones(4, 3)}, str(path))
    return path


@pytest.mark.parametrize("command", [["stats"], ["show", "-o", "out.png"]])
@pytest.mark.parametrize("make,why", [(_mask_file, "its kind is 'mask'"), (_checkpoint_file, "not a neuroloc importance file")])
def test_a_mask_or_checkpoint_is_refused_in_one_line(tmp_path, cli, monkeypatch, command, make, why):
    monkeypatch.chdir(tmp_path)
    path = make(tmp_path)
    r = cli("importance", command[0], path, *command[1:])
    assert r.exit_code == 3  # InputError
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: not a neuroloc importance file") and why in lines[0]
    assert r.stdout == "" and not (tmp_path / "out.png").exists()


def test_a_checkpoint_folder_is_refused(tmp_path, cli):
    r = cli("importance", "stats", tmp_path)
    assert r.exit_code == 3
    assert r.stderr.strip() == f"error: {tmp_path}: no such importance file"


@pytest.mark.parametrize("path", [["importance"], ["importance", "stats"], ["importance", "show"]])
def test_help(cli, path):
    r = cli(*path, "--help")
    assert r.exit_code == 0 and "Usage" in r.stdout
