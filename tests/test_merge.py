"""Merges against independent computations of their formulas, and the parameter forms."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch
from safetensors import safe_open

from neuroloc_cli.arch import layer_index
from neuroloc_cli.synthetic import ARCHITECTURES
from tests.conftest import write_recipe
from tests.helpers import load_all

ARCHS = list(ARCHITECTURES)


def _f64(d):
    return {k: v.double() for k, v in d.items() if v.is_floating_point()}


def _merge(cli, tmp_path, recipe_text, *extra):
    recipe = write_recipe(tmp_path, recipe_text)
    out = tmp_path / "out"
    r = cli("merge", recipe, "-o", out, *extra)
    assert r.exit_code == 0, r.stderr
    return out, load_all(out)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("sharded", [True, False])
def test_task_arithmetic_matches_formula(zoo, cli, tmp_path, arch, sharded):
    fam = zoo.get(arch, sharded=sharded)
    out, merged = _merge(
        cli,
        tmp_path,
        f"""
merge_method: task_arithmetic
base_model: {fam.base}
models:
  - model: {fam.ft1}
    parameters: {{weight: 0.7}}
  - model: {fam.ft2}
    parameters: {{weight: -0.4}}
parameters: {{lambda: 1.5}}
out_dtype: float32
""",
    )
    base, a, b = _f64(load_all(fam.base)), _f64(load_all(fam.ft1)), _f64(load_all(fam.ft2))
    assert set(merged) == set(base)
    for name in base:
        expected = base[name] + 1.5 * (0.7 * (a[name] - base[name]) - 0.4 * (b[name] - base[name]))
        assert merged[name].dtype == torch.float32
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-6, atol=1e-7, msg=name)


def test_linear_normalized_and_cast_once_to_out_dtype(zoo, cli, tmp_path):
    fam = zoo.get("qwen2")
    _, merged = _merge(
        cli,
        tmp_path,
        f"""
merge_method: linear
models:
  - {{model: {fam.base}, parameters: {{weight: 1}}}}
  - {{model: {fam.ft1}, parameters: {{weight: 3}}}}
dtype: float32
out_dtype: bfloat16
""",
    )
    base, a = load_all(fam.base), load_all(fam.ft1)
    for name in base:
        expected = ((base[name].float() * 1 + a[name].float() * 3) / 4).to(torch.bfloat16)
        assert merged[name].dtype == torch.bfloat16
        # one rounding from float32 to bfloat16: identical bits except ties at a rounding boundary
        diff = (merged[name].float() - expected.float()).abs()
        ulp = expected.float().abs() * 2**-7 + 1e-30
        assert bool((diff <= ulp).all()), name


def test_linear_without_normalize_sums(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    _, merged = _merge(
        cli,
        tmp_path,
        f"""
merge_method: linear
models:
  - {{model: {fam.ft1}, parameters: {{weight: 0.5}}}}
  - {{model: {fam.ft2}, parameters: {{weight: 0.25}}}}
parameters: {{normalize: false}}
out_dtype: float32
""",
    )
    a, b = _f64(load_all(fam.ft1)), _f64(load_all(fam.ft2))
    for name in a:
        torch.testing.assert_close(merged[name].double(), 0.5 * a[name] + 0.25 * b[name], rtol=1e-6, atol=1e-7)


def test_per_layer_lists_interpolate_over_depth(zoo, cli, tmp_path):
    """weight [0, 1] over 2 layers: layer 0 keeps the base, layer 1 takes the full delta;
    every tensor outside the blocks (embeddings, final norm, head) sits at t=0, as in
    mergekit 0.1.5 (whose planner reads pre- and post-layer weights with t=0)."""
    fam = zoo.get("llama")
    _, merged = _merge(
        cli,
        tmp_path,
        f"""
merge_method: task_arithmetic
base_model: {fam.base}
models:
  - model: {fam.ft1}
    parameters: {{weight: [0.0, 1.0]}}
out_dtype: float32
""",
    )
    base, ft = _f64(load_all(fam.base)), _f64(load_all(fam.ft1))
    for name in base:
        i = layer_index(name)
        w = {0: 0.0, 1: 1.0}[i] if i is not None else 0.0  # mergekit 0.1.5: outside the blocks, t = 0
        torch.testing.assert_close(merged[name].double(), base[name] + w * (ft[name] - base[name]), rtol=1e-6, atol=1e-7, msg=name)


def test_three_point_list_uses_linear_interpolation():
    from neuroloc_cli.recipe.params import resolve_value

    assert resolve_value([0.0, 1.0, 0.0], "model.layers.3.mlp.up_proj.weight", 0.25) == pytest.approx(0.5)
    assert resolve_value([0.2, 0.4, 1.0], "x", 0.75) == pytest.approx(float(np.interp(0.75, [0, 0.5, 1], [0.2, 0.4, 1.0])))


def test_filters_substring_glob_default_and_model_precedence(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    _, merged = _merge(
        cli,
        tmp_path,
        f"""
merge_method: task_arithmetic
base_model: {fam.base}
models:
  - model: {fam.ft1}
    parameters:
      weight:
        - filter: "*.layers.1.*"     # glob on the whole name
          value: 0.25
        - filter: self_attn          # mergekit substring rule
          value: 0.5
        - value: 0.1                 # default
  - model: {fam.ft2}                 # no own weight: the top-level one applies
parameters:
  weight: 2.0
out_dtype: float32
""",
    )
    base, a, b = _f64(load_all(fam.base)), _f64(load_all(fam.ft1)), _f64(load_all(fam.ft2))
    for name in base:
        w1 = 0.25 if ".layers.1." in name else 0.5 if "self_attn" in name else 0.1
        expected = base[name] + w1 * (a[name] - base[name]) + 2.0 * (b[name] - base[name])
        torch.testing.assert_close(merged[name].double(), expected, rtol=1e-6, atol=1e-7, msg=name)


def test_filter_entries_are_taken_in_order_a_default_matching_everything():
    """mergekit 0.1.5's rule: the first entry that matches wins, and one without a filter
    matches every tensor, so written first it shadows the entries after it."""
    from neuroloc_cli.recipe.params import resolve_value

    entries = [{"value": 1.0}, {"filter": "mlp", "value": 2.0}]
    assert resolve_value(entries, "model.layers.0.mlp.up_proj.weight", 0) == 1.0
    assert resolve_value(entries, "model.layers.0.self_attn.q_proj.weight", 0) == 1.0
    entries = [{"filter": "mlp", "value": 2.0}, {"value": 1.0}]
    assert resolve_value(entries, "model.layers.0.mlp.up_proj.weight", 0) == 2.0
    assert resolve_value(entries, "model.layers.0.self_attn.q_proj.weight", 0) == 1.0
    assert resolve_value([{"filter": "mlp", "value": 2.0}], "lm_head.weight", 1) is None


def test_glob_does_not_match_substrings_the_way_filters_do():
    from neuroloc_cli.arch import name_matches

    assert name_matches("attn", "model.layers.0.linear_attn.q.weight")  # the known substring trap
    assert not name_matches("*.self_attn.*", "model.layers.0.linear_attn.q.weight")
    assert name_matches("*.self_attn.*", "model.layers.0.self_attn.q_proj.weight")


def test_out_dtype_defaults_to_each_base_tensor_dtype(zoo, cli, tmp_path):
    fam = zoo.get("gpt2", dtype=torch.float16)
    _, merged = _merge(
        cli,
        tmp_path,
        f"""
merge_method: task_arithmetic
base_model: {fam.base}
models: [{{model: {fam.ft1}, parameters: {{weight: 1.0}}}}]
""",
    )
    ft = load_all(fam.ft1)
    for name, t in merged.items():
        assert t.dtype == torch.float16
        # base + 1.0·(ft − base) in float32, rounded to float16 once, is ft itself
        assert torch.equal(t, ft[name]), name


def test_on_missing_base_keeps_base_value_for_absent_tensors(zoo, cli, tmp_path):
    import shutil

    from safetensors.torch import save_file

    fam = zoo.get("llama", sharded=False)
    partial = tmp_path / "partial"
    shutil.copytree(fam.ft1, partial)
    tensors = load_all(fam.ft1)
    dropped = "model.layers.1.mlp.up_proj.weight"
    del tensors[dropped]
    save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
    text = f"""
merge_method: task_arithmetic
base_model: {fam.base}
models: [{{model: {partial}, parameters: {{weight: 1.0}}}}]
out_dtype: float32
"""
    r = cli("merge", write_recipe(tmp_path, text), "-o", tmp_path / "refused")
    assert r.exit_code == 3
    assert f"tensor {dropped} is missing (present in base_model" in r.stderr
    _, merged = _merge(cli, tmp_path, text + "on_missing: base\n")
    assert torch.equal(merged[dropped], load_all(fam.base)[dropped].float())


def test_inputs_are_left_untouched(zoo, cli, tmp_path):
    fam = zoo.get("mistral")

    def digest(folder):
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}

    before = [digest(p) for p in (fam.base, fam.ft1)]
    _merge(
        cli,
        tmp_path,
        f"merge_method: task_arithmetic\nbase_model: {fam.base}\nmodels: [{{model: {fam.ft1}, parameters: {{weight: 0.5}}}}]\n",
    )
    assert [digest(p) for p in (fam.base, fam.ft1)] == before


def test_output_is_a_loadable_hf_checkpoint_with_provenance(zoo, cli, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    fam = zoo.get("llama")
    out, merged = _merge(
        cli,
        tmp_path,
        f"merge_method: task_arithmetic\nbase_model: {fam.base}\nmodels: [{{model: {fam.ft1}, parameters: {{weight: 0.5}}}}]\nout_dtype: bfloat16\n",
        "--max-shard-size",
        "40KB",
    )
    assert (out / "model.safetensors.index.json").exists() and len(list(out.glob("model-*.safetensors"))) > 1
    assert {"config.json", "tokenizer.json", "tokenizer_config.json", "neuroloc.json"} <= {p.name for p in out.iterdir()}
    prov = json.loads((out / "neuroloc.json").read_text())
    assert prov["method"] == "task_arithmetic" and prov["neuroloc_version"]
    assert [i["role"] for i in prov["inputs"]] == ["base_model", "models[0].model"]
    assert all(len(i["fingerprint"]) == 64 for i in prov["inputs"])
    with safe_open(str(next(out.glob("model-*.safetensors"))), framework="pt") as f:
        meta = f.metadata()
    assert meta["neuroloc.kind"] == "model" and json.loads(meta["neuroloc.provenance"])["recipe"]["merge_method"] == "task_arithmetic"

    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
    tok = AutoTokenizer.from_pretrained(out)
    state = model.state_dict()
    for name, t in merged.items():
        assert torch.equal(state[name], t), name
    ids = tok("Two plus three equals five", return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def test_delta_checkpoint_is_exact_and_marked(zoo, cli, tmp_path):
    fam = zoo.get("gpt2")
    out = tmp_path / "delta"
    r = cli("delta", fam.base, fam.ft1, "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["output"] == str(out)
    d, base, ft = load_all(out), load_all(fam.base), load_all(fam.ft1)
    for name in base:
        assert d[name].dtype == torch.float32
        assert torch.equal(d[name], ft[name].float() - base[name].float()), name  # exact for bf16 inputs
    info = cli("inspect", out, "--json").json()
    assert info["kind"] == "delta"
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels: [{{model: {out}, parameters: {{weight: 1}}}}]\n")
    r = cli("merge", recipe, "-o", tmp_path / "x")
    assert r.exit_code == 3 and "is a delta checkpoint, not a model" in r.stderr


def test_row_blocks_give_the_same_bytes_as_whole_tensors(zoo, cli, tmp_path, monkeypatch):
    """Elementwise methods stream big tensors in blocks of rows; the result must not change."""
    from neuroloc_cli.merge import stream

    fam = zoo.get("gpt2")
    text = f"""
merge_method: task_arithmetic
base_model: {fam.base}
models: [{{model: {fam.ft1}, parameters: {{weight: 0.3}}}}, {{model: {fam.ft2}, parameters: {{weight: 0.6}}}}]
out_dtype: bfloat16
"""
    whole_dir, whole = _merge(cli, tmp_path / "whole", text)
    monkeypatch.setattr(stream, "BLOCK_ELEMENTS", 1000)  # embeddings (512×64) now go in ~33 blocks
    plan = _plan_for(tmp_path / "whole" / "recipe.yaml")
    assert plan.method.elementwise and any(rows is not None for s in plan.steps for rows in stream.row_blocks(s.out.shape))
    _, blocked = _merge(cli, tmp_path / "blocked", text)
    for name in whole:
        assert torch.equal(whole[name], blocked[name]), name


def _plan_for(recipe_path):
    from neuroloc_cli.merge.plan import build_plan
    from neuroloc_cli.recipe.overrides import read_recipe_source

    source = read_recipe_source(recipe_path)
    return build_plan(source.recipe(), source.folder, source.name)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_tied_embeddings_merge_and_load(zoo, cli, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    fam = zoo.get(arch, tie=True, sharded=False)
    assert "lm_head.weight" not in load_all(fam.base)
    out, merged = _merge(
        cli,
        tmp_path,
        f"merge_method: task_arithmetic\nbase_model: {fam.base}\nmodels: [{{model: {fam.ft1}, parameters: {{weight: 0.5}}}}]\n",
    )
    assert "lm_head.weight" not in merged
    model = AutoModelForCausalLM.from_pretrained(out)
    emb = merged["model.embed_tokens.weight"]
    assert torch.equal(model.get_output_embeddings().weight.to(emb.dtype), emb)


def test_nonfinite_values_are_counted_across_pieces(monkeypatch):
    from neuroloc_cli.merge import run

    monkeypatch.setattr(run, "CHECK_ELEMENTS", 7)
    t = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    t[0, 3], t[2, 9], t[5, 0] = float("nan"), float("inf"), -float("inf")
    assert run.count_nonfinite(t) == 3 == int((~torch.isfinite(t)).sum())
    assert run.count_nonfinite(torch.ones(3, 5)) == 0
