"""`neuroloc demo`: each experiment runs at the tiny level, its numbers come from the commands
the report prints, and the same seed gives the same tables."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

import pytest

from neuroloc_cli.demo.experiments import read_scores


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch_module) -> Path:
    """One demo cache per module: the tiny world and base are built once."""
    root = tmp_path_factory.mktemp("cache")
    monkeypatch_module.setenv("XDG_CACHE_HOME", str(root))
    return root


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def _cli(*args: str | Path):
    from typer.testing import CliRunner

    from neuroloc_cli.cli.app import app

    return CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=False)


def _demo(out: Path, *args: str) -> dict:
    r = _cli("demo", "--level", "tiny", "-o", out, "--json", *args)
    assert r.exit_code == 0, r.stderr[-2000:]
    return json.loads(r.stdout)


def _by_name(doc: dict) -> dict:
    return {e["name"]: e for e in doc["experiments"]}


@pytest.fixture(scope="module")
def maet_run(cache, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("demo") / "maet"
    return out, _demo(out, "--only", "maet,sweep")


def test_maet_runs_and_reports_every_model_and_language(maet_run):
    out, doc = maet_run
    exp = _by_name(doc)["maet"]
    accuracy, ppl = exp["tables"]
    assert [r[0] for r in accuracy["rows"]] == ["base", "full-cpt", "task-vector", "cpt-math-ka", "maet"]
    assert accuracy["columns"] == ["model", "ka", "mo", "sel", "vu"]
    assert all(0 <= v <= 1 for row in accuracy["rows"] for v in row[1:])
    assert all(v > 1 for row in ppl["rows"] for v in row[1:])
    assert (out / "maet" / "maet" / "neuroloc.json").is_file() and (out / "recipes" / "maet.yaml").is_file()
    assert len(exp["claims"]) == 2 and all("observed" in c for c in exp["claims"])
    report = (out / "report.md").read_text()
    assert "neuroloc merge recipes/maet.yaml -o maet/maet" in report and (out / exp["plots"][0]).read_bytes()[:4] == b"\x89PNG"


def test_the_report_numbers_are_those_of_its_printed_commands(maet_run, cli):
    """Rerun the printed eval command (into another folder) and read the same numbers."""
    out, doc = maet_run
    table = _by_name(doc)["maet"]["tables"][1]
    argv = shlex.split(table["source"])
    assert argv[0] == "neuroloc" and argv[1] == "eval" and table["source"] in (out / "report.md").read_text()
    argv[argv.index("-o") + 1] = "rerun"
    before = Path.cwd()
    os.chdir(out)  # the report's commands run from the demo folder
    try:
        r = cli(*argv[1:])
    finally:
        os.chdir(before)
    assert r.exit_code == 0, r.stderr
    scores = read_scores(out / "rerun" / "results.json")
    for row in table["rows"]:
        got = [round(scores[row[0]][f"ppl_{lang}"]["token_perplexity"], 2) for lang in table["columns"][1:]]
        assert got == row[1:]


def test_regions_twice_same_seed_same_tables_base_from_the_cache(cli, cache, tmp_path, maet_run):
    one = _demo(tmp_path / "one", "--only", "regions")
    two = _demo(tmp_path / "two", "--only", "regions")
    assert one["base"]["cached"] and two["base"]["cached"]  # built by the maet run already
    t1, t2 = (_by_name(d)["regions"]["tables"] for d in (one, two))
    assert [t["rows"] for t in t1] == [t["rows"] for t in t2]
    labels = [r[0] for r in t1[0]["rows"]]
    assert labels == [
        "base",
        "core-removed",
        "random-removed",
        "bottom-removed",
        "mono-ka-removed",
        "mono-mo-removed",
        "mono-sel-removed",
        "mono-vu-removed",
    ]
    assert t1[0]["rows"][0] != t1[0]["rows"][1]  # removing the core region changes something
    assert [r[0] for r in t1[1]["rows"]] == ["base", "cpt-vu", "cpt-vu-frozen-core"]


def test_landermt(cli, cache, tmp_path, maet_run):
    doc = _demo(tmp_path / "lm", "--only", "landermt")
    lm = _by_name(doc)["landermt"]
    table = lm["tables"][0]
    assert table["columns"][:3] == ["model", "BLEU", "chrF"]
    assert [r[0] for r in table["rows"]] == ["base", "full-ft", "landermt-ka-mo"]
    assert any(c.startswith("neuroloc train base --method landermt --masks landermt/aware") for c in lm["commands"])


def test_the_sweep_after_maet_reuses_its_models_and_reports_the_grid(maet_run):
    out, doc = maet_run
    exp = _by_name(doc)["sweep"]
    (table,) = exp["tables"]
    assert table["columns"] == ["γ", "k2", "mean held-out", "mo", "sel", "vu", "ka"]
    assert [(r[0], r[1]) for r in table["rows"]] == [(0.2, 0.8), (1.0, 0.8)]  # the tiny grid
    for row in table["rows"]:
        assert row[2] == pytest.approx(sum(row[3:6]) / 3, abs=1e-3)  # the objective: the held-out languages' mean
    assert [c.split()[1] for c in exp["commands"]] == ["sweep"]  # MAET's checkpoints, not new ones
    merged = next(r for r in _by_name(doc)["maet"]["tables"][0]["rows"] if r[0] == "maet")  # γ 0.2, k2 0.8 on disk
    assert table["rows"][0][3:] == [*merged[2:], merged[1]]  # the sweep's point: the same accuracies
    assert "--objective '0.333333*neuroloc_math_mo.exact_match,flexible-extract + " in exp["commands"][0]
    assert exp["plots"] == ["sweep/maet/objective.png"] and (out / "sweep" / "maet" / "objective.png").read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "neuroloc sweep recipes/maet.yaml --grid gamma=0.2,1 --grid k2=0.8" in report
    assert "![" in report and "(sweep/maet/objective.png)" in report


def test_the_sweep_alone_builds_what_it_needs_and_gives_the_same_table(cache, tmp_path, maet_run):
    _, with_maet = maet_run
    doc = _demo(tmp_path / "sw", "--only", "sweep")
    exp = _by_name(doc)["sweep"]
    assert any(c.startswith("neuroloc train base --data world/math-ka.txt:0.8") for c in exp["commands"])
    assert exp["commands"][-1] == _by_name(with_maet)["sweep"]["commands"][0]
    assert exp["tables"][0]["rows"] == _by_name(with_maet)["sweep"]["tables"][0]["rows"]


def test_bad_experiment_name_and_a_folder_the_demo_did_not_make(cli, tmp_path):
    r = cli("demo", "--level", "tiny", "--only", "maet,regons", "-o", tmp_path / "x")
    assert r.exit_code == 2 and "--only 'regons': no such experiment" in r.stderr and "regions" in r.stderr
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    r = cli("demo", "--level", "tiny", "-o", mine)
    assert r.exit_code == 4 and "not a folder `neuroloc demo` made" in r.stderr
    assert (mine / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_the_quick_demo_runs_every_experiment(cli, cache, tmp_path):
    r = cli("demo", "--quick", "-o", tmp_path / "q", "--json")
    assert r.exit_code == 0, r.stderr[-2000:]
    doc = json.loads(r.stdout)
    assert [e["name"] for e in doc["experiments"]] == ["maet", "regions", "landermt", "sweep"]
    assert (tmp_path / "q" / "report.md").is_file()
