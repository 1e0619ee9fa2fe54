"""`neuroloc rank` (MAET Eq. 4): scores equal dot products computed directly."""

from __future__ import annotations

import csv
import io

import pytest
import torch

from tests.helpers import load_all


def _direct(base, a, b, metric):
    out = {}
    for name, t in base.items():
        da, db = (a[name].double() - t.double()).reshape(-1), (b[name].double() - t.double()).reshape(-1)
        out[name] = float(da @ db) if metric == "dot" else float(da @ db / (da.norm() * db.norm()))
    return out


@pytest.mark.parametrize("arch,metric", [("llama", "dot"), ("gpt2", "dot"), ("qwen2", "cosine")])
def test_rank_scores_equal_direct_dot_products(zoo, cli, arch, metric):
    fam = zoo.get(arch)
    r = cli("rank", "--base", fam.base, fam.ft1, fam.ft2, "--metric", metric, "--json")
    assert r.exit_code == 0, r.stderr
    rows = r.json()
    expected = _direct(load_all(fam.base), load_all(fam.ft1), load_all(fam.ft2), metric)
    assert {row["tensor"] for row in rows} == set(expected)
    for row in rows:
        assert row["score"] == pytest.approx(expected[row["tensor"]], rel=1e-9, abs=1e-15)
    scores = [row["score"] for row in rows]
    assert scores == sorted(scores, reverse=True)
    layer_rows = [row for row in rows if row["layer"] is not None]
    assert all(f".{row['layer']}." in row["tensor"] and row["tensor"].endswith(row["kind"]) for row in layer_rows)


def test_rank_of_delta_checkpoints_without_base_and_csv(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    for ft, out in ((fam.ft1, "d1"), (fam.ft2, "d2")):
        assert cli("delta", fam.base, ft, "-o", tmp_path / out).exit_code == 0
    with_base = cli("rank", "--base", fam.base, fam.ft1, fam.ft2, "--json").json()
    r = cli("rank", tmp_path / "d1", tmp_path / "d2", "--csv")
    assert r.exit_code == 0, r.stderr
    rows = list(csv.DictReader(io.StringIO(r.stdout)))
    assert [row["tensor"] for row in rows] == [row["tensor"] for row in with_base]
    assert [float(row["score"]) for row in rows] == pytest.approx([row["score"] for row in with_base], rel=1e-12)


def test_rank_needs_base_for_models(zoo, cli):
    fam = zoo.get("llama")
    r = cli("rank", fam.ft1, fam.ft2)
    assert r.exit_code == 2
    assert f"A ({fam.ft1}) is a model, not a delta checkpoint" in r.stderr


def test_rank_refuses_mismatched_shapes_naming_the_tensor(zoo, cli):
    r = cli("rank", "--base", zoo.get("llama").base, zoo.get("llama").ft1, zoo.get("gpt2").ft1)
    assert r.exit_code == 3
    assert "tensor model.embed_tokens.weight is missing" in r.stderr


def test_rank_cosine_of_a_zero_delta_is_zero():
    from neuroloc_cli.ops.rank import similarity_from_sums
    from neuroloc_cli.ops.sums import fixed_dot

    z, x = torch.zeros(3, 4), torch.randn(3, 4)
    sums = {"ab": fixed_dot(z, x), "aa": fixed_dot(z, z), "bb": fixed_dot(x, x)}
    assert similarity_from_sums(sums, "cosine") == 0.0
    assert fixed_dot(x, x) == pytest.approx(float((x.double() ** 2).sum()))
