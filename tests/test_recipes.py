"""Every example recipe in recipes/ is valid and runs against the demo's example models."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import write_recipe
from tests.helpers import load_all

RECIPES = sorted((Path(__file__).resolve().parents[1] / "recipes").glob("*.yaml"))


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The folder `neuroloc demo` builds."""
    root = tmp_path_factory.mktemp("demo")
    from typer.testing import CliRunner

    from neuroloc_cli.cli.app import app

    r = CliRunner().invoke(app, ["demo", str(root / "example")])
    assert r.exit_code == 0, r.output
    return root


def _merge_recipes() -> list[Path]:
    """Merge recipes whose inputs are plain models; `maet` recipes (ability/languages) are run
    by tests/test_maet.py against their own fine-tunes."""
    docs = {p: yaml.safe_load(p.read_text()) for p in RECIPES}
    # fisher and regmean recipes also name files made from data: their own tests run them
    data_aware = {"fisher", "regmean"}
    return [p for p, d in docs.items() if "merge_method" in d and "ability" not in d and d["merge_method"] not in data_aware]


def _localize(text: str, fam) -> str:
    """Point an example recipe's model paths at the tiny zoo models: its base at the base,
    the others alternately at the two fine-tunes."""
    names: dict[str, str] = {}
    others = [fam.ft1, fam.ft2]

    def sub(m):
        spec = m.group(2)
        if spec not in names:
            is_base = spec.endswith("/base")
            names[spec] = str(fam.base) if is_base else str(others[sum(not n.endswith("/base") for n in names) % 2])
        return m.group(1) + names[spec]

    return re.sub(r"((?:model|base_model): )(\S+)", sub, text)


def test_recipes_exist():
    assert len(_merge_recipes()) >= 8


@pytest.mark.parametrize("recipe", _merge_recipes(), ids=lambda p: p.name)
def test_merge_recipe_runs(zoo, cli, tmp_path, recipe):
    text = recipe.read_text()
    assert text.startswith("#") and "neuroloc merge recipes/" in text, "a recipe's header gives the command to run"
    r = cli("merge", write_recipe(tmp_path, _localize(text, zoo.get("llama"))), "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.stderr
    merged = load_all(tmp_path / "out")
    assert merged and all(torch.isfinite(t.float()).all() for t in merged.values())


def test_demo_output_matches_its_recipe(example):
    """The demo's merge equals task arithmetic computed independently from its inputs."""
    base, math_, es = (load_all(example / "example" / n) for n in ("base", "math", "spanish"))
    merged = load_all(example / "example" / "merged")
    for name, t in merged.items():
        w_es = 0.5 if ".mlp." in name else 0.3
        expected = (
            base[name].double() + 0.7 * (math_[name].double() - base[name].double()) + w_es * (es[name].double() - base[name].double())
        )
        assert t.dtype == torch.bfloat16
        assert torch.allclose(t.double(), expected, rtol=2**-7, atol=1e-6), name
