"""`neuroloc sweep`, `merge --set` and recipes on standard input.

A sweep point is checked against what a user would do by hand: `merge --set` to disk, then
`eval` of the folder; the numbers must be the same to the last bit."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from typer.testing import CliRunner

from neuroloc_cli.cli.app import app
from neuroloc_cli.synthetic import SENTENCES
from tests.conftest import write_recipe
from tests.helpers import load_all

TA = """\
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.5}}
dtype: float32
out_dtype: bfloat16
"""


@pytest.fixture
def world(zoo, tmp_path):
    fam = zoo.get("llama")
    recipe = write_recipe(tmp_path, TA.format(base=fam.base, ft1=fam.ft1, ft2=fam.ft2))
    data = tmp_path / "es.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    return fam, recipe, data


def _rows(doc):
    """A sweep's points without timings, for comparing two runs."""
    return [{k: p[k] for k in ("index", "values", "objective", "metrics")} for p in doc["points"]]


def test_a_point_equals_merge_to_disk_then_eval(world, cli, tmp_path):
    fam, recipe, data = world
    r = cli("sweep", recipe, "--grid", "models.0.parameters.weight=0.2,0.9", "--eval", f"ppl={data}:es", "-o", tmp_path / "sw", "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    assert doc["objective"] == "-ppl_es.token_perplexity"
    assert len(doc["points"]) == 2
    for point in doc["points"]:
        w = point["values"]["models.0.parameters.weight"]
        out = tmp_path / f"merged-{w}"
        m = cli("merge", recipe, "--set", f"models.0.parameters.weight={w}", "-o", out)
        assert m.exit_code == 0, m.stderr
        e = cli("eval", out, "--ppl", f"{data}:es", "--bootstrap-iters", "0", "--json")
        assert e.exit_code == 0, e.stderr
        by_disk = {m: v["value"] for m, v in e.json()["models"][0]["tasks"]["ppl_es"].items()}
        assert point["metrics"]["ppl_es"] == by_disk  # exactly: same tensors, same evaluator
        assert point["objective"] == -by_disk["token_perplexity"]
    # the two weights give different models, so the sweep measured something
    assert doc["points"][0]["objective"] > doc["points"][1]["objective"]


def test_best_recipe_runs_anywhere_and_gives_the_best_point(world, cli, tmp_path, monkeypatch):
    fam, recipe, data = world
    r = cli("sweep", recipe, "--grid", "weight=0.0,1.0", "--eval", f"ppl={data}:es", "-o", tmp_path / "sw", "--write-best", "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    best = doc["best"]["values"]["weight"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    m = cli("merge", tmp_path / "sw" / "best.yaml", "-o", "from-best")
    assert m.exit_code == 0, m.stderr
    by_hand = cli("merge", recipe, "--set", f"weight={best}", "-o", "by-hand")
    assert by_hand.exit_code == 0, by_hand.stderr
    a, b, c = load_all(elsewhere / "from-best"), load_all(elsewhere / "by-hand"), load_all(tmp_path / "sw" / "best")
    assert a.keys() == b.keys() == c.keys()
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    csv = (tmp_path / "sw" / "results.csv").read_text().splitlines()
    assert csv[0].startswith("rank,point,weight,objective,ppl_es.")
    assert len(csv) == 3 and (tmp_path / "sw" / "objective.png").read_bytes()[:4] == b"\x89PNG"


def test_a_killed_sweep_resumes_to_the_same_table(world, tmp_path):
    from neuroloc_cli.recipe.overrides import read_recipe_source
    from neuroloc_cli.sweep.run import RESULTS_FILE, SweepSpec, parse_eval_options, plan_sweep, run_sweep
    from neuroloc_cli.sweep.space import parse_grid

    fam, recipe, data = world
    spec = SweepSpec(
        read_recipe_source(recipe), grid=[parse_grid("weight=0.0,0.5,1.0")], eval_options=parse_eval_options([f"ppl={data}:es"])
    )
    whole = run_sweep(plan_sweep(spec), tmp_path / "whole")

    class Killed(Exception):
        pass

    def kill_after_two(point, best, done, total):
        if done == 2:
            raise Killed

    with pytest.raises(Killed):
        run_sweep(plan_sweep(spec), tmp_path / "part", on_point=kill_after_two)
    with open(tmp_path / "part" / RESULTS_FILE, "ab") as f:  # a kill in the middle of a line
        f.write(b'{"index": 2, "val')
    resumed = run_sweep(plan_sweep(spec), tmp_path / "part")
    assert resumed.resumed == 2
    assert _rows(resumed.to_json()) == _rows(whole.to_json())
    lines = (tmp_path / "part" / RESULTS_FILE).read_text().splitlines()
    assert [json.loads(x)["index"] for x in lines] == [0, 1, 2]
    assert {json.loads(x)["objective_text"] for x in lines} == {"-ppl_es.token_perplexity"}  # what a resumed run sorts by


def test_ctrl_c_after_a_point_names_the_results_kept_for_resume(world, cli, tmp_path, monkeypatch):
    from neuroloc_cli.sweep import run as run_mod

    fam, recipe, data = world
    real_append = run_mod._append

    def append_then_ctrl_c(path, result):
        real_append(path, result)
        raise KeyboardInterrupt

    monkeypatch.setattr(run_mod, "_append", append_then_ctrl_c)
    r = cli("sweep", recipe, "--grid", "weight=0.0,1.0", "--eval", f"ppl={data}:es", "-o", tmp_path / "sw")
    assert r.exit_code == 130
    assert r.stderr.startswith("neuroloc: interrupted; already written, each whole: ") and r.stderr.count("\n") == 1
    assert str(tmp_path / "sw" / run_mod.RESULTS_FILE) in r.stderr
    assert len((tmp_path / "sw" / run_mod.RESULTS_FILE).read_text().splitlines()) == 1


def test_a_seeded_search_is_reproducible_and_resumable(world, tmp_path):
    from neuroloc_cli.recipe.overrides import read_recipe_source
    from neuroloc_cli.sweep.run import SweepSpec, parse_eval_options, plan_sweep, run_sweep
    from neuroloc_cli.sweep.space import parse_search

    fam, recipe, data = world

    def spec(seed):
        return SweepSpec(
            read_recipe_source(recipe),
            search=[parse_search("weight=0:1")],
            trials=4,
            seed=seed,
            eval_options=parse_eval_options([f"ppl={data}:es", "limit=3"]),
        )

    a = run_sweep(plan_sweep(spec(7)), tmp_path / "a").to_json()
    b = run_sweep(plan_sweep(spec(7)), tmp_path / "b").to_json()
    c = run_sweep(plan_sweep(spec(8)), tmp_path / "c").to_json()
    assert _rows(a) == _rows(b)
    drawn = sorted(p["values"]["weight"] for p in a["points"])
    assert drawn != sorted(p["values"]["weight"] for p in c["points"])
    assert all(0 <= w <= 1 for w in drawn) and len(set(drawn)) == 4

    class Killed(Exception):
        pass

    def kill(point, best, done, total):
        if done == 3:
            raise Killed

    with pytest.raises(Killed):
        run_sweep(plan_sweep(spec(7)), tmp_path / "d", on_point=kill)
    assert _rows(run_sweep(plan_sweep(spec(7)), tmp_path / "d").to_json()) == _rows(a)


def test_maet_sweep_scores_its_tensors_once(zoo, tmp_path):
    from neuroloc_cli.recipe.overrides import read_recipe_source
    from neuroloc_cli.sweep.run import SweepSpec, parse_eval_options, plan_sweep, run_sweep
    from neuroloc_cli.sweep.space import parse_grid

    fam = zoo.get("llama")
    recipe = write_recipe(
        tmp_path,
        f"""merge_method: maet
base_model: {fam.base}
ability: {{model: {fam.ft1}, language_model: {fam.ft2}}}
languages: [{{model: {fam.ft2}, weight: 1.0}}]
parameters: {{gamma: 0.2, k2: 0.5}}
dtype: float32
""",
    )
    data = tmp_path / "es.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES))
    calls = []
    spec = SweepSpec(
        read_recipe_source(recipe),
        grid=[parse_grid("gamma=0.2,1.0"), parse_grid("k2=0.5,1.0")],
        eval_options=parse_eval_options([f"ppl={data}:es", "limit=2"]),
    )
    plan = plan_sweep(spec)
    import neuroloc_cli.methods.maet as maet

    counted = maet.ALIGNMENT.fn

    @functools.wraps(counted)  # the same signature: the memo keys on the parameters it names
    def counting(*a, **k):
        calls.append(1)
        return counted(*a, **k)

    object.__setattr__(maet.ALIGNMENT, "fn", counting)
    try:
        result = run_sweep(plan, tmp_path / "sw")
    finally:
        object.__setattr__(maet.ALIGNMENT, "fn", counted)
    merged = [s for s in plan.first.steps if s.merge]
    assert len(calls) == len(merged)  # four points, one scoring of each tensor
    assert len({json.dumps(p.metrics, sort_keys=True) for p in result.points}) == 4  # γ and k2 change the model


def test_merge_set_and_stdin_give_the_edited_recipe(world, cli, tmp_path):
    fam, recipe, data = world
    edited = write_recipe(tmp_path, recipe.read_text().replace("weight: 0.5}", "weight: 0.7}", 1), "edited.yaml")
    assert cli("merge", edited, "-o", tmp_path / "edited").exit_code == 0
    r = cli("merge", recipe, "--set", "models.0.parameters.weight=0.7", "-o", tmp_path / "set")
    assert r.exit_code == 0, r.stderr
    runner = CliRunner()
    piped = runner.invoke(app, ["merge", "-", "-o", str(tmp_path / "piped")], input=edited.read_text(), catch_exceptions=False)
    assert piped.exit_code == 0, piped.stderr
    a, b, c = (load_all(tmp_path / n) for n in ("edited", "set", "piped"))
    assert all(torch.equal(a[k], b[k]) and torch.equal(a[k], c[k]) for k in a)
    untouched = cli("merge", recipe, "-o", tmp_path / "plain")
    assert untouched.exit_code == 0
    assert not all(torch.equal(a[k], load_all(tmp_path / "plain")[k]) for k in a)
    recorded = json.loads((tmp_path / "set" / "neuroloc.json").read_text())["recipe"]
    assert recorded["models"][0]["parameters"]["weight"] == 0.7


def test_bare_names_set_every_place_the_recipe_gives_them():
    from neuroloc_cli.recipe.overrides import Assignment, apply_assignments

    doc = {
        "merge_method": "ties",
        "models": [{"model": "a", "parameters": {"density": 0.5, "weight": 1}}, {"model": "b", "parameters": {"weight": 2}}],
        "parameters": {"normalize": True},
    }
    out = apply_assignments(doc, [Assignment("density", 0.3), Assignment("normalize", False), Assignment("dtype", "bfloat16")], "r")
    assert out["models"][0]["parameters"]["density"] == 0.3
    assert "density" not in out["models"][1]["parameters"]  # only where the recipe gives it
    assert out["parameters"] == {"normalize": False} and out["dtype"] == "bfloat16"
    assert apply_assignments(doc, [Assignment("lambda", 0.5)], "r")["parameters"]["lambda"] == 0.5  # given nowhere: global
    assert apply_assignments(doc, [Assignment("models.1.parameters.weight", None)], "r")["models"][1]["parameters"] == {}
    assert doc["models"][0]["parameters"]["density"] == 0.5  # the input is not changed


@pytest.mark.parametrize(
    ("args", "code", "words"),
    [
        (["--grid", "weight=0.5", "--eval", "nonsense=1"], 2, "--eval 'nonsense=1'"),
        (["--grid", "weight=0.5", "--eval", "ppl={data}:es", "--objective", "ppl_es.nope"], 2, "no ppl_es.nope"),
        (["--grid", "weight=0.5", "--eval", "ppl={data}:es", "--objective", "other.acc"], 2, "not TASK.METRIC"),
        (["--eval", "ppl={data}:es"], 2, "nothing to sweep"),
        (["--grid", "weight=0.5", "--search", "lambda=0:1", "--eval", "ppl={data}:es"], 2, "not both"),
        (["--grid", "models.7.parameters.weight=1", "--eval", "ppl={data}:es"], 2, "models.7: the list has 2 item(s)"),
        (["--grid", "lambda=abc", "--eval", "ppl={data}:es"], 2, "lambda=abc"),
        (["--search", "weight=1:0", "--eval", "ppl={data}:es"], 2, "LOW < HIGH"),
    ],
)
def test_bad_sweeps_fail_before_loading(world, cli, tmp_path, args, code, words):
    fam, recipe, data = world
    r = cli("sweep", recipe, *[a.format(data=data) for a in args], "-o", tmp_path / "sw")
    assert r.exit_code == code, (r.stdout, r.stderr)
    assert words in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    if "nope" not in words:  # the objective's metric is known only after the first point
        assert not (tmp_path / "sw").exists()


def test_a_folder_of_another_sweep_is_refused(world, cli, tmp_path):
    fam, recipe, data = world
    out = tmp_path / "sw"
    assert cli("sweep", recipe, "--grid", "weight=0.5", "--eval", f"ppl={data}:es", "--eval", "limit=2", "-o", out).exit_code == 0
    r = cli("sweep", recipe, "--grid", "weight=0.6", "--eval", f"ppl={data}:es", "--eval", "limit=2", "-o", out)
    assert r.exit_code == 4 and "different sweep" in r.stderr
    again = cli("sweep", recipe, "--grid", "weight=0.5", "--eval", f"ppl={data}:es", "--eval", "limit=2", "-o", out, "--json")
    assert again.exit_code == 0 and again.json()["resumed"] == 1


def test_dry_run_states_points_and_memory(world, cli, tmp_path):
    fam, recipe, data = world
    r = cli("sweep", recipe, "--grid", "weight=0.1,0.2,0.3", "--eval", f"ppl={data}:es", "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    assert doc["points"] == 3 and [p["weight"] for p in doc["grid"]] == [0.1, 0.2, 0.3]
    from neuroloc_cli.io.checkpoint import Checkpoint

    ckpt = Checkpoint.open(fam.base)
    floats = sum(i.numel for i in ckpt.tensors.values() if i.torch_dtype.is_floating_point)
    assert doc["memory_bytes"]["live_model"] == floats * 2  # bf16 output, loaded as written
    assert doc["memory_bytes"]["input_cache"] == floats * 2 * 3  # base and two models, as stored (bf16)


def test_objective_terms():
    from neuroloc_cli.sweep.objective import parse_objective

    o = parse_objective("0.5*a.exact_match,flexible-extract + b.acc - 1e-3*ppl_es.token_perplexity", ["a", "b", "ppl_es"])
    assert o.terms == ((0.5, "a", "exact_match,flexible-extract"), (1.0, "b", "acc"), (-0.001, "ppl_es", "token_perplexity"))
    tasks = {
        "a": {"exact_match,flexible-extract": {"value": 0.4}},
        "b": {"acc": {"value": 0.2}},
        "ppl_es": {"token_perplexity": {"value": 50.0}},
    }
    assert math.isclose(o.value(tasks), 0.5 * 0.4 + 0.2 - 0.05)


def test_inputs_are_read_from_disk_once(world, tmp_path, monkeypatch):
    from neuroloc_cli.io.checkpoint import Checkpoint
    from neuroloc_cli.recipe.overrides import read_recipe_source
    from neuroloc_cli.sweep.run import SweepSpec, parse_eval_options, plan_sweep, run_sweep
    from neuroloc_cli.sweep.space import parse_grid

    fam, recipe, data = world
    reads = []
    real = Checkpoint.read

    def counting(self, name, rows=None, dtype=None):
        reads.append((str(self.path), name))
        return real(self, name, rows, dtype)

    spec = SweepSpec(
        read_recipe_source(recipe), grid=[parse_grid("weight=0.1,0.4,0.7")], eval_options=parse_eval_options([f"ppl={data}:es", "limit=2"])
    )
    plan = plan_sweep(spec)
    monkeypatch.setattr(Checkpoint, "read", counting)
    run_sweep(plan, tmp_path / "sw")
    merged = [s.name for s in plan.first.steps if s.merge]
    assert sorted(reads) == sorted((str(p), n) for p in (fam.base, fam.ft1, fam.ft2) for n in merged)


def test_a_model_plus_lora_input_is_cached_as_merge_reads_it(zoo, tmp_path):
    from neuroloc_cli.io.checkpoint import Checkpoint
    from neuroloc_cli.io.lora import LoraCheckpoint
    from neuroloc_cli.sweep.live import CachedCheckpoint
    from tests.test_lora import LLAMA_TARGETS, write_adapter

    fam = zoo.get("llama")  # bf16
    write_adapter(tmp_path / "lora", fam.base, LLAMA_TARGETS)
    view = LoraCheckpoint.wrap(Checkpoint.open(fam.base), tmp_path / "lora")
    cached = CachedCheckpoint(view)
    name = f"{next(iter(LLAMA_TARGETS))}.weight"
    for dtype in (torch.float32, torch.bfloat16, torch.float32):  # W + scale·BA in the dtype asked for
        assert torch.equal(cached.read(name, None, dtype), view.read(name, None, dtype)), dtype
        assert torch.equal(cached.read(name, (1, 3), dtype), view.read(name, (1, 3), dtype)), dtype


@pytest.mark.parametrize(
    ("grid", "words"),
    [
        ("out_dtype=bfloat16,float32", "change the dtype the merged model is evaluated in"),
    ],
)
def test_keys_that_change_the_evaluated_dtype_are_refused(world, cli, tmp_path, grid, words):
    fam, recipe, data = world
    r = cli("sweep", recipe, "--grid", grid, "--eval", f"ppl={data}:es", "-o", tmp_path / "sw")
    assert r.exit_code == 2 and words in r.stderr, r.stderr


def test_minimize_needs_an_objective(world, cli, tmp_path):
    fam, recipe, data = world
    r = cli("sweep", recipe, "--grid", "weight=0.5", "--eval", f"ppl={data}:es", "--minimize", "-o", tmp_path / "sw")
    assert r.exit_code == 2 and "--minimize needs --objective" in r.stderr


def test_grid_values_may_be_lists_and_are_plotted_in_numeric_order():
    from neuroloc_cli.sweep.report import sketch
    from neuroloc_cli.sweep.run import PointResult
    from neuroloc_cli.sweep.space import parse_grid

    assert parse_grid("weight=[0.1, 0.7],[0.3, 0.5],0.2").values == ([0.1, 0.7], [0.3, 0.5], 0.2)
    points = [PointResult(i, {"w": w}, float(w), {}, 0.0) for i, w in enumerate([10, 0.5, 2, 1])]
    assert [line.split("█")[0].replace(" ", "") for line in sketch(points, ["w"])] == ["w=0.5", "w=1", "w=2", "w=10"]


def test_best_recipe_makes_file_parameters_absolute(tmp_path):
    from neuroloc_cli.recipe.overrides import with_absolute_paths

    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "f.safetensors").write_bytes(b"")
    doc = {"models": [{"model": "./a", "parameters": {"fisher": "./a/f.safetensors", "weight": 1.0}}]}
    out = with_absolute_paths(doc, tmp_path, extra_keys={"fisher"})
    assert out["models"][0]["parameters"]["fisher"] == str((tmp_path / "a" / "f.safetensors").resolve())
    assert out["models"][0]["model"] == str((tmp_path / "a").resolve())
    assert with_absolute_paths(doc, tmp_path)["models"][0]["parameters"]["fisher"] == "./a/f.safetensors"
