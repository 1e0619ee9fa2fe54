"""`merge_method: regmean` (Jin et al. 2023): against least squares on the inputs themselves
and a direct `torch.linalg.solve`, both weight layouts, its `linear` limit, and end to end
through `neuroloc locate gram` and `neuroloc merge`."""

from __future__ import annotations

import json

import pytest
import torch

from neuroloc_cli.masks.importance import Importance
from neuroloc_cli.methods import METHODS
from neuroloc_cli.synthetic import SENTENCES
from tests.helpers import load_all

REGMEAN = METHODS.get("regmean")
LINEAR = METHODS.get("linear")
LINEAR_NAME = "model.layers.0.mlp.up_proj.weight"  # nn.Linear: [out, in]
CONV_NAME = "transformer.h.0.mlp.c_fc.weight"  # GPT-2 Conv1D: [in, out]


def _call(tensors, grams, name, alpha=1.0, weights=None):
    weights = weights or [1.0] * len(tensors)
    return REGMEAN(None, tensors, {"alpha": alpha}, [{"weight": w, "gram": g} for w, g in zip(weights, grams)], context={"name": name})


def _models(seed, n_in=6, n_out=4, tokens=(50, 30)):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(t, n_in, generator=g, dtype=torch.float64) for t in tokens]
    ws = [torch.randn(n_out, n_in, generator=g, dtype=torch.float64) for _ in tokens]
    return xs, ws


def test_alpha_one_is_least_squares_on_the_inputs():
    """W* minimises Σ_i ||X_i W*ᵀ − X_i W_iᵀ||²: lstsq on the stacked inputs and targets."""
    xs, ws = _models(0)
    out = _call([w.float() for w in ws], [(x.T @ x).float() for x in xs], LINEAR_NAME)
    expected = torch.linalg.lstsq(torch.cat(xs), torch.cat([x @ w.T for x, w in zip(xs, ws)])).solution.T
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def test_alpha_and_weights_match_a_direct_solve():
    xs, ws = _models(1)
    grams = [x.T @ x for x in xs]
    alpha, weights = 0.6, [0.25, 2.0]
    scaled = [w * (alpha * g + (1 - alpha) * torch.diag(torch.diagonal(g))) for w, g in zip(weights, grams)]
    expected = torch.linalg.solve(sum(scaled), sum(s @ w.T for s, w in zip(scaled, ws))).T
    out = _call([w.float() for w in ws], [g.float() for g in grams], LINEAR_NAME, alpha, weights)
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


def test_conv1d_layout():
    """GPT-2 stores W [in, out] and computes y = x W: least squares on X W without a transpose."""
    xs, ws = _models(2)
    conv = [w.T.contiguous() for w in ws]  # [in, out]
    out = _call([w.float() for w in conv], [(x.T @ x).float() for x in xs], CONV_NAME)
    expected = torch.linalg.lstsq(torch.cat(xs), torch.cat([x @ w for x, w in zip(xs, conv)])).solution
    assert out.shape == conv[0].shape
    torch.testing.assert_close(out.double(), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", [LINEAR_NAME, CONV_NAME])
def test_identical_grams_are_linear(name):
    xs, ws = _models(3, n_in=5, n_out=5)
    gram = (xs[0].T @ xs[0]).float()
    tensors = [w.float() for w in ws]
    weights = [1.0, 3.0]
    expected = LINEAR(None, tensors, {"normalize": True}, [{"weight": w} for w in weights])
    torch.testing.assert_close(_call(tensors, [gram, gram], name, 0.9, weights), expected, rtol=1e-5, atol=1e-5)


def test_tensors_without_a_gram_are_averaged():
    tensors = [torch.randn(7), torch.randn(7)]
    torch.testing.assert_close(_call(tensors, [None, None], "model.norm.weight"), (tensors[0] + tensors[1]) / 2)


def test_a_singular_gram_is_an_input_error():
    from neuroloc_cli.errors import InputError

    zero = torch.zeros(3, 3)
    with pytest.raises(InputError, match=f"summed Gram matrix of {LINEAR_NAME} is singular"):
        _call([torch.randn(2, 3), torch.randn(2, 3)], [zero, zero], LINEAR_NAME)


# -- end to end ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def grams(zoo, tmp_path_factory):
    """Gram folders of GPT-2 ft1 and ft2, each on its own corpus, by `neuroloc locate gram`."""
    from typer.testing import CliRunner

    from neuroloc_cli.cli.app import app

    fam = zoo.get("gpt2")
    root = tmp_path_factory.mktemp("gram")
    out = {}
    for i, name in enumerate(("ft1", "ft2")):
        corpus = root / f"{name}.jsonl"
        corpus.write_text("".join(json.dumps({"text": f"{SENTENCES[(i + k) % 5]} {SENTENCES[k % 3]}"}) + "\n" for k in range(40)))
        args = ["locate", "gram", str(getattr(fam, name)), "--data", str(corpus), "--samples", "8", "--seq-len", "16"]
        r = CliRunner().invoke(app, [*args, "-o", str(root / name)])
        assert r.exit_code == 0, r.output
        out[name] = root / name
    return fam, out


def _recipe(tmp_path, fam, g1, g2):
    path = tmp_path / "regmean.yaml"
    path.write_text(
        f"merge_method: regmean\nmodels:\n  - model: {fam.ft1}\n    parameters: {{gram: {g1}}}\n"
        f"  - model: {fam.ft2}\n    parameters: {{gram: {g2}}}\nparameters: {{alpha: 0.9}}\ndtype: float32\n"
    )
    return path


def test_merge_solves_each_layer_from_the_files(grams, cli, tmp_path):
    fam, folders = grams
    r = cli("merge", _recipe(tmp_path, fam, folders["ft1"], folders["ft2"]), "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    out, a, b = load_all(tmp_path / "out"), load_all(fam.ft1), load_all(fam.ft2)
    ga, gb = (Importance.open(folders[n] / "importance" / f"{n}.safetensors") for n in ("ft1", "ft2"))
    for name in ("transformer.h.0.attn.c_attn.weight", "transformer.h.1.mlp.c_proj.weight"):
        scaled = []
        for g in (ga.read(name).double(), gb.read(name).double()):
            scaled.append(0.9 * g + 0.1 * torch.diag(torch.diagonal(g)))
        expected = torch.linalg.solve(scaled[0] + scaled[1], scaled[0] @ a[name].double() + scaled[1] @ b[name].double())
        torch.testing.assert_close(out[name].double(), expected, rtol=1e-4, atol=1e-5)
    for name in ("transformer.h.0.attn.c_attn.bias", "transformer.h.0.ln_1.weight", "transformer.wte.weight"):
        torch.testing.assert_close(out[name].float(), (a[name].float() + b[name].float()) / 2)


def test_a_bad_gram_path_is_one_line_and_exit_3(grams, cli, tmp_path):
    fam, folders = grams
    empty = tmp_path / "empty"
    empty.mkdir()
    recipe = _recipe(tmp_path, fam, empty, folders["ft2"])
    r = cli("merge", recipe, "-o", tmp_path / "out")
    assert r.exit_code == 3
    assert r.stderr.strip().splitlines() == [
        f"error: {recipe}: models[0].parameters.gram: {empty}: no importance file in this folder (write one with `neuroloc locate gram MODEL --data FILE -o DIR`)"
    ]
    assert not (tmp_path / "out").exists()


def test_a_fisher_file_is_not_a_gram(grams, cli, tmp_path):
    from neuroloc_cli.masks.importance import ImportanceMeta, write_importance

    fam, folders = grams
    fisher = tmp_path / "f.safetensors"
    write_importance(fisher, {"transformer.h.0.attn.c_attn.weight": torch.ones(64, 192)}, ImportanceMeta("fisher", "sum"))
    r = cli("recipe", "validate", _recipe(tmp_path, fam, fisher, folders["ft2"]))
    assert r.exit_code == 3 and "holds 'fisher' scores, not a Gram matrix" in r.stderr, r.stderr


def test_the_example_recipe_runs(grams, cli, tmp_path):
    from pathlib import Path

    fam, folders = grams
    text = (Path(__file__).resolve().parents[1] / "recipes" / "regmean.yaml").read_text()
    assert text.startswith("#") and "neuroloc merge recipes/regmean.yaml" in text
    text = text.replace("../example/math-gram", str(folders["ft1"])).replace("../example/spanish-gram", str(folders["ft2"]))
    text = text.replace("model: ../example/math\n", f"model: {fam.ft1}\n").replace("model: ../example/spanish\n", f"model: {fam.ft2}\n")
    (tmp_path / "r.yaml").write_text(text)
    r = cli("merge", tmp_path / "r.yaml", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    assert all(torch.isfinite(t.float()).all() for t in load_all(tmp_path / "out").values())
