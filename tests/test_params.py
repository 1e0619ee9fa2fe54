"""Parameter forms, ranges and the precedence rule, unit by unit."""

from __future__ import annotations

import pytest

from neuroloc_cli.recipe.params import Param, ParameterResolver, check_parameters, check_value
from tests.conftest import write_recipe

DENSITY = Param("density", per_model=True, low=0.0, high=1.0)


@pytest.mark.parametrize(
    "value,problems",
    [
        (0.5, []),
        (1.5, ["p: must be in [0, 1], got 1.5"]),
        ([0.1, -0.2], ["p[1]: must be in [0, 1], got -0.2"]),
        ([{"filter": "mlp", "value": [0.1, 2]}, {"value": 0.3}], ["p[0].value[1]: must be in [0, 1], got 2"]),
        ([{"filter": "mlp"}], ["p[0]: an entry needs 'value' and may have 'filter', got keys ['filter']"]),
        ([], ["p: an empty list has no value"]),
        (True, ["p: must be a number, got True"]),
    ],
)
def test_check_value_forms_and_ranges(value, problems):
    assert check_value(value, DENSITY, "p") == problems


def test_precedence_model_then_global_then_default():
    declared = [Param("weight", per_model=True), Param("density", default=0.9, per_model=True), Param("lambda", default=1.0)]
    r = ParameterResolver(declared, {"weight": 2.0, "lambda": 0.5}, [{"weight": [{"filter": "mlp", "value": 3.0}]}, {}])
    whole, per_model = r.at("model.layers.0.mlp.up_proj.weight", 0.0)
    assert whole == {"lambda": 0.5}
    assert per_model == [{"weight": 3.0, "density": 0.9}, {"weight": 2.0, "density": 0.9}]
    # the model's filter does not match: fall through to the top-level value
    _, per_model = r.at("model.layers.0.self_attn.q_proj.weight", 0.0)
    assert per_model[0]["weight"] == 2.0


def test_required_parameter_missing_everywhere():
    problems = check_parameters([Param("weight", per_model=True)], {}, [{"weight": 1}, {}], "m")
    assert problems == ["models[1].parameters: m needs 'weight' for every model (or once in 'parameters')"]


def test_filter_list_without_default_that_misses_a_tensor(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    text = f"""
merge_method: task_arithmetic
base_model: {fam.base}
models:
  - model: {fam.ft1}
    parameters:
      weight: [{{filter: mlp, value: 1.0}}]
"""
    r = cli("recipe", "validate", write_recipe(tmp_path, text))
    assert r.exit_code == 2
    assert (
        "parameters: parameter 'weight' has no value for tensor model.embed_tokens.weight (add an entry without 'filter' as the default)"
        in r.stderr
    )
