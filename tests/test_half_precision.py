"""A half-precision `dtype` means arithmetic in that dtype, op by op, as mergekit computes it;
`accumulate: float32` means float32 arithmetic rounded once.

The expected values are written here from the formulas, one PyTorch op per step in the
recipe's dtype (each op rounded as PyTorch rounds it), not taken from neuroloc's code.
"""

from __future__ import annotations

import json

import pytest
import torch

from neuroloc_cli.methods import METHODS
from tests.conftest import write_recipe
from tests.helpers import load_all

W1, W2 = 0.7, 0.3  # neither is a bf16 number: the bf16 weights are 0.69921875 and 0.30078125


def _top(delta: torch.Tensor, k: int) -> torch.Tensor:
    """The k largest magnitudes as 0/1 in delta's dtype; equal magnitudes by position."""
    order = torch.sort(delta.abs().float().reshape(-1), descending=True, stable=True).indices
    keep = torch.zeros(delta.numel(), dtype=delta.dtype)
    keep[order[:k]] = 1
    return keep.reshape(delta.shape)


def _ties_in(dtype, base, tuned, weights, densities):
    """TIES in `dtype`: trim by magnitude, elect the sign by weighted mass, disjoint weighted mean."""
    base = base.to(dtype)
    w = [torch.tensor(x, dtype=dtype) for x in weights]
    trimmed = []
    for t, density in zip(tuned, densities):
        delta = t.to(dtype) - base
        trimmed.append(delta * _top(delta, int(density * delta.numel())))
    wd = [d * wi for d, wi in zip(trimmed, w)]
    total = wd[0]
    for x in wd[1:]:
        total = total + x
    sign = torch.where(total >= 0, 1, -1)
    mixed = torch.zeros_like(base)
    divisor = torch.zeros_like(base)
    for x, wi in zip(wd, w):
        agree = torch.sign(x) == sign
        mixed = mixed + torch.where(agree, x, 0)
        divisor = divisor + torch.where(agree, wi, 0)
    return base + mixed / torch.where(divisor == 0, 1, divisor)


def _small(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(16, 40, generator=g).bfloat16()
    tuned = [(base.float() + 0.02 * torch.randn(16, 40, generator=g)).bfloat16() for _ in range(2)]
    return base, tuned


def _call(name, base, tensors, per_model, **whole):
    m = METHODS.get(name)
    whole = {p.name: p.default for p in m.params if not p.per_model} | whole
    per_model = [{p.name: p.default for p in m.params if p.per_model} | pm for pm in per_model]
    return m(base, tensors, whole, per_model, torch.Generator().manual_seed(0) if m.random else None)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ties_is_computed_in_the_half_dtype(dtype):
    base, tuned = _small()
    base, tuned = base.to(dtype), [t.to(dtype) for t in tuned]
    got = _call("ties", base, tuned, [{"weight": W1, "density": 0.4}, {"weight": W2, "density": 0.6}])
    want = _ties_in(dtype, base, tuned, [W1, W2], [0.4, 0.6])
    assert got.dtype == dtype
    assert torch.equal(got.view(torch.int16), want.view(torch.int16))
    # not the float32 computation rounded once: the difference is what the dtype decides
    assert not torch.equal(got, _ties_in(torch.float32, base, tuned, [W1, W2], [0.4, 0.6]).to(dtype))


def _recipe(zoo_family, accumulate: str | None) -> str:
    base, ft1, ft2 = zoo_family.base, zoo_family.ft1, zoo_family.ft2
    return f"""merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: {W1}, density: 0.5}}
  - model: {ft2}
    parameters: {{weight: {W2}, density: 0.5}}
dtype: bfloat16
""" + (f"accumulate: {accumulate}\n" if accumulate else "")


@pytest.mark.parametrize("accumulate", [None, "float32"])
def test_merge_gives_the_formula_bit_for_bit(zoo, cli, tmp_path, accumulate):
    family = zoo.get("llama", sharded=False)
    out = tmp_path / "out"
    r = cli("merge", write_recipe(tmp_path, _recipe(family, accumulate)), "-o", out)
    assert r.exit_code == 0, r.stderr
    got, base = load_all(out), load_all(family.base)
    ft1, ft2 = load_all(family.ft1), load_all(family.ft2)
    floating = [n for n in got if got[n].is_floating_point()]
    assert len(floating) > 5
    differs = 0
    for name in floating:
        inputs = (base[name], [ft1[name], ft2[name]], [W1, W2], [0.5, 0.5])
        if accumulate is None:
            want = _ties_in(torch.bfloat16, *inputs)
        else:  # float32 from the bf16 inputs, rounded once
            want = _ties_in(torch.float32, *inputs).bfloat16()
            differs += not torch.equal(want, _ties_in(torch.bfloat16, *inputs))
        assert torch.equal(got[name].view(torch.int16), want.view(torch.int16)), name
    assert accumulate is None or differs  # the two choices are different computations
    prov = json.loads((out / "neuroloc.json").read_text())
    assert prov["compute_dtype"] == "bfloat16"
    assert prov["accumulate"] == (accumulate or "bfloat16")
    assert prov["recipe"].get("accumulate") == accumulate


def test_accumulate_takes_only_float32(cli, tmp_path, zoo):
    family = zoo.get("llama", sharded=False)
    r = cli("recipe", "validate", write_recipe(tmp_path, _recipe(family, "float64")))
    assert r.exit_code != 0
    assert "accumulate" in r.stderr
