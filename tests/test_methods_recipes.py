"""mergekit recipes as they are: base listed among models, slices, layer stacking; what
neuroloc lacks is rejected by name before any tensor is read; `neuroloc methods`."""

from __future__ import annotations

import json
import re

import pytest
import torch

from neuroloc_cli.errors import RecipeError
from neuroloc_cli.io.checkpoint import Checkpoint
from neuroloc_cli.merge.plan import build_plan
from neuroloc_cli.recipe.schema import parse_recipe
from tests.conftest import write_recipe
from tests.helpers import load_all

ALL_METHODS = {
    "linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "slerp", "model_stock", "passthrough",
    "nuslerp", "nearswap", "multislerp", "karcher", "sce", "ram", "ramplus_tl", "arcee_fusion",
}  # fmt: skip


def _localize(text: str, fam) -> str:
    """Point an example recipe's placeholder paths at the tiny zoo models."""
    names: dict[str, str] = {}
    others = [fam.ft1, fam.ft2]

    def sub(m):
        spec = m.group(2)
        if spec not in names:
            names[spec] = str(fam.base) if spec == "./base" else str(others[(len(names) - ("./base" in names)) % 2])
        return m.group(1) + names[spec]

    return re.sub(r"((?:model|base_model): )(\S+)", sub, text)


def test_every_method_is_listed_with_parameters_defaults_and_paper(cli):
    r = cli("methods", "--json")
    assert r.exit_code == 0
    docs = {d["name"]: d for d in r.json()}
    assert ALL_METHODS <= set(docs)
    ties = {p["name"]: p for p in docs["ties"]["parameters"]}
    assert ties["density"]["default"] == 1.0 and ties["normalize"]["default"] is True and ties["weight"]["required"]
    assert {p["name"]: p["default"] for p in docs["dare_ties"]["parameters"]}["rescale"] is True
    assert {p["name"]: p["default"] for p in docs["breadcrumbs"]["parameters"]}["gamma"] == 0.01
    assert {p["name"]: p["default"] for p in docs["della"]["parameters"]}["epsilon"] == 0.15
    assert all(docs[m]["paper"] for m in ALL_METHODS)


def _no_reads(monkeypatch):
    def refuse(self, name):
        raise AssertionError(f"tensor {name} was read")

    monkeypatch.setattr(Checkpoint, "read", refuse)


def test_unsupported_method_is_rejected_by_name_before_reading(zoo, tmp_path, monkeypatch):
    # neuroloc has every method mergekit 0.1.5 registers; this name is in neither (mergekit's is `breadcrumbs`)
    fam = zoo.get("llama")
    _no_reads(monkeypatch)
    recipe = parse_recipe(f"merge_method: model_breadcrumbs\nbase_model: {fam.base}\nmodels:\n  - model: {fam.ft1}\n", "r.yaml")
    with pytest.raises(RecipeError) as e:
        build_plan(recipe, tmp_path, "r.yaml")
    assert e.value.problems[0].startswith("merge_method: unknown merge method 'model_breadcrumbs'")


def test_unsupported_key_is_rejected_with_did_you_mean(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    text = f"""
merge_method: ties
base_model: {fam.base}
models:
  - model: {fam.ft1}
    parameters: {{weight: 1.0, densty: 0.5}}
trust_remote_code: true
"""
    r = cli("merge", write_recipe(tmp_path, text), "-o", tmp_path / "out")
    assert r.exit_code == 2
    assert "unknown key 'trust_remote_code'" in r.stderr
    assert not (tmp_path / "out").exists()
    text = text.replace("trust_remote_code: true\n", "")
    r = cli("merge", write_recipe(tmp_path, text), "-o", tmp_path / "out")
    assert r.exit_code == 2
    assert "models[0].parameters.densty: ties has no parameter 'densty' (did you mean \"density\"?)" in r.stderr


def test_hub_name_gets_an_offline_message(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    text = f"merge_method: ties\nbase_model: mistralai/Mistral-7B-v0.1\nmodels:\n  - model: {fam.ft1}\n    parameters: {{weight: 1.0}}\n"
    r = cli("merge", write_recipe(tmp_path, text), "-o", tmp_path / "out")
    assert r.exit_code == 3
    assert "mistralai/Mistral-7B-v0.1: no such folder, and neuroloc does not download from a model hub" in r.stderr


def test_base_listed_in_models_is_the_base_and_noted(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    text = f"""
merge_method: task_arithmetic
base_model: {fam.base}
models:
  - model: {fam.base}
    parameters: {{weight: 5.0}}
  - model: {fam.ft1}
    parameters: {{weight: 1.0}}
parameters: {{normalize: true}}
"""
    r = cli("recipe", "validate", write_recipe(tmp_path, text), "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    assert [i["role"] for i in doc["inputs"]] == ["base_model", "models[1].model"]
    assert doc["notes"] == [
        "models[0] is the base model: task_arithmetic uses it as the base, not as another input; its parameters are not used"
    ]


def test_slerp_needs_t(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    text = f"merge_method: slerp\nbase_model: {fam.base}\nmodels:\n  - model: {fam.ft1}\n"
    r = cli("recipe", "validate", write_recipe(tmp_path, text))
    assert r.exit_code == 2
    assert "parameters: slerp needs 't'" in r.stderr


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_layer_stacking(zoo, cli, tmp_path, arch):
    fam = zoo.get(arch)
    text = f"""
slices:
  - sources:
      - model: {fam.ft1}
        layer_range: [0, 2]
  - sources:
      - model: {fam.ft2}
        layer_range: [1, 2]
  - sources:
      - model: {fam.base}
        layer_range: [0, 1]
merge_method: passthrough
parameters:
  scale:
    - filter: "*.mlp.*"
      value: 0.5
    - value: 1.0
"""
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path, text)
    block = "model.layers." if arch != "gpt2" else "transformer.h."
    r = cli("recipe", "validate", recipe, "--json")
    assert r.exit_code == 0, r.stderr
    sources = {st["tensor"]: st["source"] for st in r.json()["steps"]}
    up = "mlp.up_proj.weight" if arch != "gpt2" else "mlp.c_fc.weight"
    assert sources[f"{block}2.{up}"] == {"model": "slices[1].sources[0]", "tensor": f"{block}1.{up}"}
    r = cli("merge", recipe, "-o", out)
    assert r.exit_code == 0, r.stderr
    got = load_all(out)
    ft1, ft2, base = load_all(fam.ft1), load_all(fam.ft2), load_all(fam.base)
    # output layer → (source tensors, source layer): 0,1 ← ft1 0,1; 2 ← ft2 1; 3 ← base 0
    plan = [(ft1, 0), (ft1, 1), (ft2, 1), (base, 0)]
    expected = {}
    for out_layer, (src, layer) in enumerate(plan):
        for name, t in src.items():
            if name.startswith(f"{block}{layer}."):
                new = f"{block}{out_layer}." + name[len(f"{block}{layer}.") :]
                expected[new] = t * 0.5 if ".mlp." in name else t
    for name, t in ft1.items():  # embeddings: first slice's model
        if not name.startswith(block) and ("embed" in name or "wte" in name or "wpe" in name):
            expected[name] = t
    for name, t in base.items():  # final norm and head: last slice's model
        if not name.startswith(block) and name not in expected:
            expected[name] = t
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name].to(got[name].dtype)), name
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers" if arch != "gpt2" else "n_layer"] == 4
    if arch == "qwen2":  # per-layer config lists are restacked with the layers
        assert len(config["layer_types"]) == 4

    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_hidden_layers == 4
    logits = model(torch.tensor([[3, 4, 5]])).logits
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "slices, message",
    [
        (
            "[{sources: [{model: M1, layer_range: [1, 5]}]}]",
            "slices[0].sources[0].layer_range: [1, 5] is not a non-empty range within the 2 layers of",
        ),
        (
            "[{sources: [{model: M1, layer_range: [0, 2]}, {model: M2, layer_range: [0, 2]}]}]",
            "slices[0].sources: passthrough takes one source per slice, got 2",
        ),
    ],
)
def test_layer_stacking_errors(zoo, cli, tmp_path, slices, message):
    fam = zoo.get("llama")
    text = f"merge_method: passthrough\nslices: {slices}\n".replace("M1", str(fam.ft1)).replace("M2", str(fam.ft2))
    r = cli("merge", write_recipe(tmp_path, text), "-o", tmp_path / "out")
    assert r.exit_code == 2 and message in r.stderr, r.stderr
    assert not (tmp_path / "out").exists()


def test_a_slice_of_fewer_layers_merges_just_those(zoo, cli, tmp_path):
    """mergekit 0.1.5 merges a slice's layers with any method; the output has the slices' layers."""
    fam = zoo.get("llama")
    text = f"""
merge_method: slerp
base_model: {fam.base}
parameters: {{t: 0.5}}
slices:
  - sources:
      - {{model: {fam.base}, layer_range: [0, 1]}}
      - {{model: {fam.ft1}, layer_range: [0, 1]}}
"""
    r = cli("merge", write_recipe(tmp_path, text), "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 1
    assert not any(".layers.1." in n for n in load_all(tmp_path / "out"))


def test_models_and_slices_are_exclusive():
    with pytest.raises(RecipeError) as e:
        parse_recipe("merge_method: passthrough\nmodels: [{model: a}]\nslices: [{sources: [{model: a, layer_range: [0, 1]}]}]\n", "r.yaml")
    assert e.value.problems == ["give either 'models' or 'slices', not both"]
