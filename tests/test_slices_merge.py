"""Non-passthrough merges over several `slices:` (`merge.slices`, "merging slice by slice"):
every output tensor against the formula computed here from the inputs, in float64."""

from __future__ import annotations

import json
import re

import pytest
import torch

from neuroloc_cli.arch import layer_index
from neuroloc_cli.synthetic import build_checkpoint, derive_finetune, tiny_config
from tests.conftest import write_recipe
from tests.helpers import load_all


@pytest.fixture(scope="module")
def four(tmp_path_factory):
    """Three 4-layer llama checkpoints (float32): A, and two fine-tunes of it far enough from
    it that slerp is not a lerp."""
    root = tmp_path_factory.mktemp("four")
    a = build_checkpoint(tiny_config("llama", layers=4), root / "A", seed=0, dtype=torch.float32)
    b = derive_finetune(a, root / "B", seed=1, scale=0.5)
    c = derive_finetune(a, root / "C", seed=2, scale=0.5)
    return a, b, c


def _tensors(path):
    return {k: v.double() for k, v in load_all(path).items()}


def _renamed(name: str, layer: int) -> str:
    return re.sub(r"\.layers\.\d+\.", f".layers.{layer}.", name)


def _merge(cli, tmp_path, text):
    out = tmp_path / "out"
    r = cli("merge", write_recipe(tmp_path, text), "-o", out)
    assert r.exit_code == 0, r.stderr
    return out, _tensors(out)


def _expected(models, layer_map, edge_pre, edge_post, combine):
    """Output tensor name -> expected value: `layer_map[out_layer] = (slice, [(model, in_layer)])`;
    pre/post weights from `edge_pre` / `edge_post` slices; `combine(slice, t, tensors, name)`."""
    ref = models["A"]
    expected = {}
    outside = [n for n in ref if layer_index(n) is None]
    for name in outside:
        pre = "embed" in name
        sl, inputs = edge_pre if pre else edge_post
        expected[name] = combine(sl, 0.0, [models[m][name] for m in inputs], name)
    for out_layer, (sl, t, inputs) in layer_map.items():
        for name in ref:
            if layer_index(name) == 0:
                srcs = [models[m][_renamed(name, i)] for m, i in inputs]
                expected[_renamed(name, out_layer)] = combine(sl, t, srcs, name)
    return expected


def _check(out, merged, expected, layers):
    assert set(merged) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6, msg=name)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == layers


LINEAR = """
merge_method: linear
parameters: {{weight: 5.0}}
slices:
  - sources:
      - {{model: {a}, layer_range: [0, 2], parameters: {{weight: 0.3}}}}
      - {{model: {b}, layer_range: [2, 4], parameters: {{weight: 0.7}}}}
  - sources:
      - {{model: {a}, layer_range: [2, 4]}}
      - {{model: {c}, layer_range: [0, 2], parameters: {{weight: 2.0}}}}
    parameters: {{weight: [1.0, 3.0]}}
  - sources:
      - {{model: {c}, layer_range: [3, 4]}}
      - {{model: {a}, layer_range: [0, 1]}}
out_dtype: float32
"""


def test_linear_over_three_slices_matches_formula(four, cli, tmp_path):
    a, b, c = four
    out, merged = _merge(cli, tmp_path, LINEAR.format(a=a, b=b, c=c))
    models = {"A": _tensors(a), "B": _tensors(b), "C": _tensors(c)}
    # weights per slice: (weight of the 1st source, of the 2nd) at t
    weights = {
        0: lambda t: (0.3, 0.7),
        1: lambda t: (1.0 + 2.0 * t, 2.0),  # slice list over its own 2 layers; C's own weight wins
        2: lambda t: (5.0, 5.0),  # top-level
    }

    def combine(sl, t, xs, name):
        w = weights[sl](t)
        return sum(wi * x for wi, x in zip(w, xs)) / sum(w)

    layer_map = {
        0: (0, 0.0, [("A", 0), ("B", 2)]),
        1: (0, 1.0, [("A", 1), ("B", 3)]),
        2: (1, 0.0, [("A", 2), ("C", 0)]),
        3: (1, 1.0, [("A", 3), ("C", 1)]),
        4: (2, 1.0, [("C", 3), ("A", 0)]),  # a one-layer slice sits at t = 1 (mergekit)
    }
    # embeddings from the first slice's sources and parameters; norm and head from the last's
    expected = _expected(models, layer_map, (0, ["A", "B"]), (2, ["C", "A"]), combine)
    _check(out, merged, expected, 5)


SLERP = """
merge_method: slerp
base_model: {a}
parameters: {{t: 0.5}}
slices:
  - sources:
      - {{model: {a}, layer_range: [0, 2]}}
      - {{model: {b}, layer_range: [0, 2]}}
    parameters: {{t: 0.3}}
  - sources:
      - {{model: {b}, layer_range: [1, 4]}}
      - {{model: {a}, layer_range: [1, 4]}}
    parameters: {{t: [0.2, 0.8]}}
out_dtype: float32
"""


def _slerp(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation as mergekit 0.1.5 defines it (lerp when nearly colinear)."""
    a, b = v0.flatten(), v1.flatten()
    na, nb = a / a.norm().clamp_min(1e-8), b / b.norm().clamp_min(1e-8)
    dot = float((na * nb).sum())
    if abs(dot) > 0.9995:
        return (1 - t) * v0 + t * v1
    theta0 = torch.arccos(torch.tensor(dot, dtype=torch.float64))
    theta = theta0 * t
    s0 = torch.sin(theta0 - theta) / torch.sin(theta0)
    s1 = torch.sin(theta) / torch.sin(theta0)
    return s0 * v0 + s1 * v1


def test_slerp_over_two_slices_matches_formula(four, cli, tmp_path):
    a, b, _ = four
    out, merged = _merge(cli, tmp_path, SLERP.format(a=a, b=b))
    models = {"A": _tensors(a), "B": _tensors(b)}
    ts = {0: lambda t: 0.3, 1: lambda t: 0.2 + 0.6 * t}

    def combine(sl, t, xs, name):  # xs in source order; the base A is v0 wherever it is listed
        base, other = (xs[0], xs[1]) if sl == 0 else (xs[1], xs[0])
        return _slerp(ts[sl](t), base, other)

    layer_map = {
        0: (0, 0.0, [("A", 0), ("B", 0)]),
        1: (0, 1.0, [("A", 1), ("B", 1)]),
        2: (1, 0.0, [("B", 1), ("A", 1)]),
        3: (1, 0.5, [("B", 2), ("A", 2)]),
        4: (1, 1.0, [("B", 3), ("A", 3)]),
    }
    expected = _expected(models, layer_map, (0, ["A", "B"]), (1, ["B", "A"]), combine)
    _check(out, merged, expected, 5)


def test_plan_reads_headers_only_and_records_every_input(four, cli, tmp_path):
    a, b, _ = four
    recipe = write_recipe(tmp_path, SLERP.format(a=a, b=b))
    r = cli("recipe", "validate", recipe, "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    assert doc["num_layers"] == 5 and any("slice by slice" in n for n in doc["notes"])
    steps = {s["tensor"]: s for s in doc["steps"]}
    assert steps["model.layers.3.self_attn.q_proj.weight"]["parameters"]["t"] == pytest.approx(0.5)
    assert steps["model.embed_tokens.weight"]["parameters"]["t"] == pytest.approx(0.3)
    assert steps["lm_head.weight"]["parameters"]["t"] == pytest.approx(0.2)


def _problems(cli, tmp_path, text):
    r = cli("recipe", "validate", write_recipe(tmp_path, text))
    assert r.exit_code != 0
    return r.stderr


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (
            "  - sources: [{{model: {a}, layer_range: [0, 2]}}, {{model: {b}, layer_range: [0, 2]}}]\n"
            "  - sources: [{{model: {a}, layer_range: [3, 6]}}, {{model: {b}, layer_range: [1, 4]}}]\n",
            "slices[1].sources[0].layer_range: [3, 6] is not a non-empty range within the 4 layers",
        ),
        (
            "  - sources: [{{model: {a}, layer_range: [0, 2]}}, {{model: {b}, layer_range: [0, 3]}}]\n"
            "  - sources: [{{model: {a}, layer_range: [2, 4]}}, {{model: {b}, layer_range: [2, 4]}}]\n",
            "slices[0].sources[1].layer_range: [0, 3] has 3 layers, slices[0].sources[0] has 2",
        ),
        (
            "  - sources: [{{model: {a}, layer_range: [0, 2]}}, {{model: {b}, layer_range: [0, 2]}}]\n"
            "  - sources: [{{model: {b}, layer_range: [2, 4]}}, {{model: {c}, layer_range: [2, 4]}}]\n",
            "slices[1].sources: slerp needs the base model",
        ),
        (
            "  - sources: [{{model: {a}, layer_range: [0, 2]}}, {{model: {b}, layer_range: [0, 2]}}]\n"
            "    parameters: {{tt: 0.5}}\n"
            "  - sources: [{{model: {a}, layer_range: [2, 4]}}, {{model: {b}, layer_range: [2, 4]}}]\n",
            "slices[0].parameters.tt: slerp has no parameter 'tt'",
        ),
    ],
)
def test_bad_slices_name_the_key(four, cli, tmp_path, body, key):
    a, b, c = four
    text = f"merge_method: slerp\nbase_model: {a}\nparameters: {{t: 0.5}}\nslices:\n" + body.format(a=a, b=b, c=c)
    assert key in _problems(cli, tmp_path, text)


def test_slerp_slices_without_base_model(four, cli, tmp_path):
    a, b, _ = four
    text = SLERP.format(a=a, b=b).replace(f"base_model: {a}\n", "")
    assert "base_model: slerp needs a base model" in _problems(cli, tmp_path, text)


def test_unused_per_model_parameters_in_slices_warn_and_merge(four, cli, tmp_path):
    """mergekit's slerp recipes carry weight: on sources; slice by slice it warns, as with models:."""
    a, b, _ = four
    text = SLERP.format(a=a, b=b).replace(
        f"{{model: {b}, layer_range: [0, 2]}}", f"{{model: {b}, layer_range: [0, 2], parameters: {{weight: 1.0}}}}"
    )
    assert "weight: 1.0" in text
    r = cli("merge", write_recipe(tmp_path, text), "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.stderr
    assert any("slices[0].sources[1].parameters.weight: slerp does not use it" in w for w in r.json()["warnings"]), r.json()["warnings"]
