"""`neuroloc ablate`: inside the mask zeroed, set to the tensor's mean, or perturbed by seeded
noise of scale × std; outside it, bit for bit the input."""

from __future__ import annotations

import math

import pytest
import torch

from neuroloc_cli.masks import Mask, MaskEntry
from tests.helpers import load_all


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


@pytest.fixture
def region(zoo, tmp_path):
    """An element mask over two tensors and a row mask over the embedding, combined."""
    fam = zoo.get("llama", dtype=torch.float32)
    base = load_all(fam.base)
    g = torch.Generator().manual_seed(0)
    entries = {
        name: MaskEntry(tuple(base[name].shape), None, torch.rand(base[name].shape, generator=g) < 0.2)
        for name in ("model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.o_proj.weight")
    }
    Mask("element", entries).save(tmp_path / "region.safetensors")
    return fam, tmp_path / "region.safetensors", entries


def _expected(mode: str, t: torch.Tensor) -> torch.Tensor:
    d = t.double()
    if mode == "zero":
        return torch.zeros_like(t)
    return torch.full_like(t, float(d.mean()))


@pytest.mark.parametrize("mode", ["zero", "mean"])
def test_ablation_inside_the_mask_and_bit_exact_outside(cli, tmp_path, region, mode):
    fam, mask, entries = region
    r = cli("ablate", fam.base, mask, "-o", tmp_path / "out", "--mode", mode, "--json")
    assert r.exit_code == 0, r.stderr
    base, out = load_all(fam.base), load_all(tmp_path / "out")
    assert set(out) == set(base)
    for name, t in base.items():
        sel = entries[name].selected if name in entries else torch.zeros_like(t, dtype=torch.bool)
        assert torch.equal(_bits(out[name])[~sel], _bits(t)[~sel]), name
        assert torch.allclose(out[name][sel], _expected(mode, t)[sel], rtol=0, atol=1e-7), name


def test_noise_is_seeded_and_of_the_asked_size(cli, tmp_path, region):
    fam, mask, entries = region
    runs = {}
    for label, seed in (("a", 1), ("b", 1), ("c", 2)):
        r = cli("ablate", fam.base, mask, "-o", tmp_path / label, "--mode", "noise", "--scale", "0.5", "--seed", seed)
        assert r.exit_code == 0, r.stderr
        runs[label] = load_all(tmp_path / label)
    base = load_all(fam.base)
    name = "model.layers.0.mlp.down_proj.weight"
    sel = entries[name].selected
    assert torch.equal(runs["a"][name], runs["b"][name]) and not torch.equal(runs["a"][name], runs["c"][name])
    z = (runs["a"][name].double() - base[name].double())[sel] / (0.5 * float(base[name].double().std(unbiased=False)))
    n = z.numel()
    assert abs(float(z.mean())) < 4 / math.sqrt(n) and abs(float(z.std()) - 1) < 0.1  # standard normal draws
    assert torch.equal(_bits(runs["a"][name])[~sel], _bits(base[name])[~sel])


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--mode", "shuffle"], 2, "--mode must be one of zero, mean, noise"),
        (["--mode", "zero", "--scale", "2"], 2, "--scale applies to --mode noise only"),
    ],
)
def test_bad_modes(cli, tmp_path, region, args, code, message):
    fam, mask, _ = region
    r = cli("ablate", fam.base, mask, "-o", tmp_path / "out", *args)
    assert r.exit_code == code and r.stderr.startswith(f"error: {message}"), r.stderr
    assert not (tmp_path / "out").exists()


def test_a_mask_of_another_model_is_refused(zoo, cli, tmp_path, region):
    _, mask, _ = region
    r = cli("ablate", zoo.get("gpt2").base, mask, "-o", tmp_path / "out")
    assert r.exit_code == 3 and "mask tensor" in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


def test_dry_run_needs_no_output_and_a_run_does(cli, tmp_path, region):
    fam, mask, _ = region
    r = cli("ablate", fam.base, mask, "--dry-run", "--json")
    assert r.exit_code == 0 and r.json()["method"] == "ablate_zero", r.stderr
    r = cli("ablate", fam.base, mask)
    assert r.exit_code == 2 and r.stderr.startswith("error: ablate needs an output folder")


def test_an_ablation_recipe_without_a_mask_is_refused(cli, tmp_path, region):
    fam, _, _ = region
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"merge_method: ablate_zero\nbase_model: {fam.base}\n")
    r = cli("recipe", "validate", recipe)
    assert r.exit_code == 2 and "mask: ablate_zero ablates a region" in r.stderr
