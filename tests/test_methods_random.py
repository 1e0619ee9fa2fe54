"""DARE and DELLA: kept share vs density, one rescale factor per tensor, seeded bytes."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

from neuroloc_cli.io.checkpoint import Checkpoint
from neuroloc_cli.methods import METHODS
from tests.conftest import write_recipe

N = 200_000


def _run(name, delta, whole, per_model, seed=0):
    base = torch.zeros_like(delta)
    m = METHODS.get(name)
    w = {p.name: p.default for p in m.params if not p.per_model} | whole
    pm = {p.name: p.default for p in m.params if p.per_model} | per_model
    return m(base, [delta], w, [pm], torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def delta():
    return torch.randn(N // 400, 400, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_kept_share_matches_density(name, density, delta):
    out = _run(name, delta, {"rescale": False}, {"weight": 1.0, "density": density, "epsilon": min(0.05, density / 2)})
    share = float((out != 0).float().mean())
    sigma = math.sqrt(density * (1 - density) / N)
    assert abs(share - density) < 5 * sigma
    # without rescale every survivor is the delta itself
    kept = out != 0
    assert torch.equal(out[kept], delta[kept])


@pytest.mark.parametrize("name", ["dare_linear", "dare_ties", "della", "della_linear"])
def test_survivors_share_one_factor_that_restores_l1(name, delta):
    out = _run(name, delta, {}, {"weight": 1.0, "density": 0.3, "epsilon": 0.1})
    kept = out != 0
    ratios = out[kept] / delta[kept]
    assert torch.allclose(ratios, ratios[0].expand_as(ratios), rtol=1e-5)
    assert float(out.abs().sum()) == pytest.approx(float(delta.abs().sum()), rel=1e-4)


def test_dare_paper_rescale_is_one_over_density(delta):
    out = _run("dare_linear", delta, {"paper_rescale": True}, {"weight": 1.0, "density": 0.25})
    kept = out != 0
    assert torch.allclose(out[kept], delta[kept] * 4.0)


def test_della_paper_rescale_is_one_over_each_probability():
    row = torch.tensor([[1.0, -2.0, 3.0, -4.0, 5.0]])
    out = _run("della_linear", row, {"paper_rescale": True}, {"weight": 1.0, "density": 0.5, "epsilon": 0.2})
    # ranks 0..4 -> p = 0.3, 0.4, 0.5, 0.6, 0.7
    p = torch.tensor([[0.3, 0.4, 0.5, 0.6, 0.7]])
    kept = out != 0
    assert torch.allclose(out[kept], (row / p)[kept])


def test_same_seed_same_draws_other_seed_other_draws(delta):
    a = _run("dare_ties", delta, {}, {"weight": 1.0, "density": 0.5}, seed=1)
    b = _run("dare_ties", delta, {}, {"weight": 1.0, "density": 0.5}, seed=1)
    c = _run("dare_ties", delta, {}, {"weight": 1.0, "density": 0.5}, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def _tensor_bytes(folder):
    ckpt = Checkpoint.open(folder)
    out = {}
    for shard in ckpt.headers:
        with safe_open(str(folder / shard), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name).view(torch.uint8).flatten().numpy().tobytes()
    return out


@pytest.mark.parametrize("method", ["dare_ties", "della_linear"])
def test_merge_seed_gives_identical_bytes(zoo, cli, tmp_path, method):
    fam = zoo.get("llama")
    recipe = write_recipe(
        tmp_path,
        f"""
merge_method: {method}
base_model: {fam.base}
models:
  - model: {fam.ft1}
    parameters: {{weight: 0.6, density: 0.5}}
  - model: {fam.ft2}
    parameters: {{weight: 0.4, density: 0.5}}
random_seed: 7
""",
    )
    runs = {}
    for label, extra in [("recipe7", []), ("flag7", ["--seed", "7"]), ("again7", ["--seed", "7"]), ("flag8", ["--seed", "8"])]:
        r = cli("merge", recipe, "-o", tmp_path / label, *extra)
        assert r.exit_code == 0, r.stderr
        runs[label] = _tensor_bytes(tmp_path / label)
    assert runs["recipe7"] == runs["flag7"] == runs["again7"]
    assert runs["flag8"].keys() == runs["flag7"].keys()
    differing = [n for n in runs["flag7"] if runs["flag7"][n] != runs["flag8"][n]]
    assert len(differing) > len(runs["flag7"]) // 2  # every matrix is redrawn


def _drawn(p, key, n=N):
    """The keep mask of one draw stream, read back through the mixing loop (1 kept, 0 dropped)."""
    from neuroloc_cli.ops.blockwise import Keep, mix

    zeros, ones = torch.zeros(n), torch.ones(n)
    return mix(zeros, [ones], [Keep(p=p, key=key)], [1.0], [1.0], consensus=False, normalize=False, lambda_=1.0)


@pytest.mark.parametrize("p", [0.05, 0.5])
def test_draw_streams_are_independent_across_models_and_positions(p):
    # the counter-based generator (splitmix64 of key and position) is written by hand: check
    # that streams of different keys, and neighbouring positions of one stream, are uncorrelated
    a, b = _drawn(p, 1), _drawn(p, 2)
    assert set(a.unique().tolist()) <= {0.0, 1.0}

    def close(share, expected):
        return abs(share - expected) < 5 * math.sqrt(expected * (1 - expected) / N)

    assert close(float(a.mean()), p) and close(float(b.mean()), p)
    assert close(float((a * b).mean()), p * p)  # two models
    assert close(float((a[1:] * a[:-1]).mean()), p * p)  # neighbours
    assert close(float((a[1024:] * a[:-1024]).mean()), p * p)  # one kernel block apart
    assert not torch.equal(_drawn(p, 1)[:1000], _drawn(p, 1 + 2**40)[:1000])  # high key bits matter
