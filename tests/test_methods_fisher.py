"""`merge_method: fisher` (Matena & Raffel 2022): against a float64 formula, its two limits
(equal Fisher is `linear`; a dominating Fisher returns its model), and end to end through
`neuroloc merge` with Fisher files of `neuroloc locate gradient --score fisher`."""

from __future__ import annotations

import json

import pytest
import torch

from neuroloc_cli.masks.importance import Importance, ImportanceMeta, write_importance
from neuroloc_cli.methods import METHODS
from neuroloc_cli.synthetic import SENTENCES
from tests.helpers import load_all

FISHER = METHODS.get("fisher")
LINEAR = METHODS.get("linear")


def _random(seed: int, shape=(5, 7), n=3):
    g = torch.Generator().manual_seed(seed)
    tensors = [torch.randn(shape, generator=g) for _ in range(n)]
    fishers = [torch.rand(shape, generator=g).pow_(4) for _ in range(n)]  # some below the floor
    return tensors, fishers


def _call(tensors, fishers, weights, floor=1e-6):
    per_model = [{"weight": w, "fisher": f} for w, f in zip(weights, fishers)]
    return FISHER(None, tensors, {"fisher_floor": floor}, per_model)


def test_matches_the_float64_formula():
    tensors, fishers = _random(0)
    weights, floor = [0.5, 1.0, 2.0], 1e-3
    out = _call(tensors, fishers, weights, floor)
    f64 = [torch.clamp(f.double(), min=floor) for f in fishers]
    num = sum(w * f * t.double() for w, f, t in zip(weights, f64, tensors))
    den = sum(w * f for w, f in zip(weights, f64))
    torch.testing.assert_close(out.double(), num / den, rtol=1e-6, atol=1e-7)
    assert bool((fishers[0] < floor).any())  # the floor was exercised


def test_equal_fisher_is_linear():
    tensors, fishers = _random(1)
    weights = [0.2, 0.3, 0.5]
    same = [fishers[0]] * 3
    expected = LINEAR(None, tensors, {"normalize": True}, [{"weight": w} for w in weights])
    torch.testing.assert_close(_call(tensors, same, weights), expected, rtol=1e-6, atol=1e-6)


def test_a_dominating_fisher_returns_its_model():
    tensors, _ = _random(2)
    fishers = [torch.full((5, 7), 1e6), torch.full((5, 7), 1e-6), torch.full((5, 7), 1e-6)]
    torch.testing.assert_close(_call(tensors, fishers, [1.0, 1.0, 1.0]), tensors[0], rtol=1e-5, atol=1e-5)


def test_a_tensor_without_fisher_gets_the_weighted_average():
    tensors, fishers = _random(3)
    expected = LINEAR(None, tensors, {"normalize": True}, [{"weight": w} for w in (1.0, 2.0, 1.0)])
    torch.testing.assert_close(_call(tensors, [fishers[0], None, fishers[2]], [1.0, 2.0, 1.0]), expected)


# -- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fishers(zoo, tmp_path_factory):
    """Fisher folders of ft1 and ft2 (two languages each), by `locate gradient --score fisher`."""
    from typer.testing import CliRunner

    from neuroloc_cli.cli.app import app

    fam = zoo.get("llama")
    root = tmp_path_factory.mktemp("fisher")
    en, es = root / "en.txt", root / "es.jsonl"
    en.write_text("\n\n".join([SENTENCES[0], SENTENCES[3]] * 20) + "\n")
    es.write_text("".join(json.dumps({"text": SENTENCES[4]}) + "\n" for _ in range(30)))
    out = {}
    for name in ("ft1", "ft2"):
        args = ["locate", "gradient", str(getattr(fam, name)), "--data", f"en={en}", "--data", f"es={es}", "--score", "fisher"]
        r = CliRunner().invoke(app, [*args, "--samples", "4", "--seq-len", "16", "--batch-size", "2", "-o", str(root / name)])
        assert r.exit_code == 0, r.output
        out[name] = root / name
    return fam, out


def _recipe(tmp_path, fam, f1, f2, extra=""):
    path = tmp_path / "fisher.yaml"
    path.write_text(
        "merge_method: fisher\nmodels:\n"
        f"  - model: {fam.ft1}\n    parameters: {{weight: 1.0, fisher: {f1}}}\n"
        f"  - model: {fam.ft2}\n    parameters: {{weight: 3.0, fisher: {f2}}}\n"
        f"parameters: {{fisher_floor: 1.0e-8}}\ndtype: float32\n{extra}"
    )
    return path


def test_merge_equals_the_formula_on_the_files(fishers, cli, tmp_path):
    fam, folders = fishers
    f1, f2 = folders["ft1"] / "importance" / "en.safetensors", folders["ft2"] / "importance" / "es.safetensors"
    r = cli("merge", _recipe(tmp_path, fam, f1, f2), "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.stderr
    out, a, b = load_all(tmp_path / "out"), load_all(fam.ft1), load_all(fam.ft2)
    fa, fb = Importance.open(f1), Importance.open(f2)
    name = "model.layers.0.mlp.up_proj.weight"
    fisher_a, fisher_b = (torch.clamp(f.read(name).double(), min=1e-8) for f in (fa, fb))
    expected = (1.0 * fisher_a * a[name].double() + 3.0 * fisher_b * b[name].double()) / (1.0 * fisher_a + 3.0 * fisher_b)
    torch.testing.assert_close(out[name].double(), expected, rtol=1e-5, atol=1e-6)
    # the embedding was not scored: the weighted average, as the plan's note says
    emb = "model.embed_tokens.weight"
    assert emb not in fa.shapes
    torch.testing.assert_close(out[emb], (a[emb].float() + 3.0 * b[emb].float()) / 4.0)


def test_validate_notes_the_tensors_without_fisher(fishers, cli, tmp_path):
    fam, folders = fishers
    recipe = _recipe(tmp_path, fam, folders["ft1"] / "importance" / "en.safetensors", folders["ft2"] / "importance" / "es.safetensors")
    r = cli("recipe", "validate", recipe, "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    notes = [n for n in doc["notes"] if n.startswith("fisher: ")]
    assert len(notes) == 1 and "are not in every model's fisher file (model.embed_tokens.weight and" in notes[0], doc["notes"]
    assert "they get the weighted average" in notes[0]
    assert [s["key"] for s in doc["side_files"]["fisher"]] == ["models[0].parameters.fisher", "models[1].parameters.fisher"]


@pytest.mark.parametrize(
    "which,message",
    [
        ("missing", "models[0].parameters.fisher: {missing}: no such importance file"),
        ("folder", "models[0].parameters.fisher: {folder}: holds 2 importance files (en.safetensors, es.safetensors); name one"),
        ("shape", "models[0].parameters.fisher ({shape}): tensor model.layers.0.mlp.up_proj.weight has shape [3, 3], expected"),
        ("score", "models[0].parameters.fisher ({score}): holds 'taylor' scores, not a diagonal Fisher"),
    ],
)
def test_a_bad_fisher_file_is_one_line_and_exit_3(fishers, cli, tmp_path, which, message):
    fam, folders = fishers
    good = folders["ft2"] / "importance" / "es.safetensors"
    bad = {
        "missing": tmp_path / "nope.safetensors",
        "folder": folders["ft1"] / "importance",
        "shape": tmp_path / "shape.safetensors",
        "score": tmp_path / "score.safetensors",
    }
    write_importance(bad["shape"], {"model.layers.0.mlp.up_proj.weight": torch.ones(3, 3)}, ImportanceMeta("fisher", "sum"))
    write_importance(bad["score"], {"model.layers.0.mlp.up_proj.weight": torch.ones(3, 3)}, ImportanceMeta("taylor", "sum"))
    recipe = _recipe(tmp_path, fam, bad[which], good)
    for args in (
        ("recipe", "validate", recipe),
        ("merge", recipe, "-o", tmp_path / "out", "--dry-run"),
        ("merge", recipe, "-o", tmp_path / "o"),
    ):
        r = cli(*args)
        assert r.exit_code == 3, (args, r.stderr)
        assert message.format(**bad) in r.stderr, r.stderr
        assert not (tmp_path / "o").exists()


def test_a_tokenizer_source_is_refused_naming_the_key(fishers, cli, tmp_path):
    """A Fisher file is indexed by its model's own token rows, which a `tokenizer_source`
    merge would move: refused up front, one line naming the key, nothing written."""
    fam, folders = fishers
    f1, f2 = folders["ft1"] / "importance" / "en.safetensors", folders["ft2"] / "importance" / "es.safetensors"
    recipe = _recipe(tmp_path, fam, f1, f2, extra="tokenizer_source: base\n")
    r = cli("merge", recipe, "-o", tmp_path / "o")
    assert r.exit_code == 3, r.stderr
    assert "tokenizer_source: not supported with fisher (its side files are indexed by the models' own rows)" in r.stderr
    assert not (tmp_path / "o").exists()


def test_listed_with_its_paper(cli):
    r = cli("methods", "--json")
    assert r.exit_code == 0, r.stderr
    doc = {m["name"]: m for m in r.json()}
    assert "Matena & Raffel 2022" in doc["fisher"]["paper"]


def test_the_example_recipe_runs(fishers, cli, tmp_path):
    from pathlib import Path

    fam, folders = fishers
    text = (Path(__file__).resolve().parents[1] / "recipes" / "fisher.yaml").read_text()
    assert text.startswith("#") and "neuroloc merge recipes/fisher.yaml" in text
    text = text.replace("../example/math-fisher/importance/math.safetensors", str(folders["ft1"] / "importance" / "en.safetensors"))
    text = text.replace("../example/spanish-fisher/importance/es.safetensors", str(folders["ft2"] / "importance" / "es.safetensors"))
    text = text.replace("model: ../example/math\n", f"model: {fam.ft1}\n").replace("model: ../example/spanish\n", f"model: {fam.ft2}\n")
    (tmp_path / "r.yaml").write_text(text)
    r = cli("merge", tmp_path / "r.yaml", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    assert all(torch.isfinite(t.float()).all() for t in load_all(tmp_path / "out").values())


def test_works_under_sweep_with_the_numbers_of_merge_then_eval(fishers, cli, tmp_path):
    fam, folders = fishers
    f1, f2 = folders["ft1"] / "importance" / "en.safetensors", folders["ft2"] / "importance" / "es.safetensors"
    recipe = _recipe(tmp_path, fam, f1, f2)
    data = tmp_path / "es.jsonl"
    data.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES[:4]))
    r = cli("sweep", recipe, "--grid", "models.1.parameters.weight=0.5,3.0", "--eval", f"ppl={data}:es", "-o", tmp_path / "sw", "--json")
    assert r.exit_code == 0, r.stderr
    point = next(p for p in r.json()["points"] if p["values"]["models.1.parameters.weight"] == 0.5)
    assert cli("merge", recipe, "--set", "models.1.parameters.weight=0.5", "-o", tmp_path / "m").exit_code == 0
    e = cli("eval", tmp_path / "m", "--ppl", f"{data}:es", "--bootstrap-iters", "0", "--json")
    assert point["metrics"]["ppl_es"] == {k: v["value"] for k, v in e.json()["models"][0]["tasks"]["ppl_es"].items()}
