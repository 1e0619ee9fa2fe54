"""Deterministic methods, end to end on tiny random checkpoints of several architectures,
against independent implementations (full sorts, numpy, whole-model loads — everything the
streaming code avoids): the sparsify-then-mix methods' plain-PyTorch specification
(`neuroloc_cli.ops.reference`, through `methods.gta.VARIANTS`), and slerp and model_stock
written here from their formulas."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuroloc_cli.arch import layer_position
from neuroloc_cli.io.checkpoint import Checkpoint
from neuroloc_cli.methods.gta import VARIANTS
from tests.conftest import write_recipe
from tests.helpers import load_all

ARCHS = ["llama", "qwen2", "gpt2"]


def ref_slerp(a, b, t):
    """Shoemake's formula in float64 numpy."""
    a64, b64 = a.double().numpy(), b.double().numpy()
    na, nb = np.linalg.norm(a64), np.linalg.norm(b64)
    cos = float(np.sum(a64 * b64) / (na * nb))
    if abs(cos) > 0.9995:
        return torch.from_numpy((1 - t) * a64 + t * b64)
    om = np.arccos(cos)
    return torch.from_numpy(np.sin((1 - t) * om) / np.sin(om) * a64 + np.sin(t * om) / np.sin(om) * b64)


def ref_model_stock(base, fts):
    d = [(ft - base).double().flatten() for ft in fts]
    cos = torch.dot(d[0], d[1]) / (d[0].norm() * d[1].norm())
    t = 2 * cos / (1 + cos)
    return t * (fts[0].double() + fts[1].double()) / 2 + (1 - t) * base.double()


def _merge(cli, tmp_path, text):
    out = tmp_path / "out"
    r = cli("merge", write_recipe(tmp_path, text), "-o", out)
    assert r.exit_code == 0, r.stderr
    return load_all(out)


def _inputs(fam):
    return [{k: v.float() for k, v in load_all(p).items()} for p in (fam.base, fam.ft1, fam.ft2)]


@pytest.mark.parametrize("arch", ARCHS)
def test_ties_matches_reference(zoo, cli, tmp_path, arch):
    fam = zoo.get(arch)
    # mergekit's README shape: the base listed among the models, without parameters
    got = _merge(
        cli,
        tmp_path,
        f"""
models:
  - model: {fam.base}
  - model: {fam.ft1}
    parameters: {{density: 0.5, weight: 0.7}}
  - model: {fam.ft2}
    parameters: {{density: [0.2, 0.8], weight: 0.3}}
merge_method: ties
base_model: {fam.base}
parameters: {{normalize: true, int8_mask: true}}
out_dtype: float32
""",
    )
    base, ft1, ft2 = _inputs(fam)
    n = Checkpoint.open(fam.base).num_layers
    for name, b in base.items():
        d2 = 0.2 + 0.6 * layer_position(name, n)
        want = VARIANTS["ties"].reference(
            b, [ft1[name], ft2[name]], weight=[0.7, 0.3], density=[0.5, d2], normalize=True, rescale=False, lambda_=1.0
        )
        assert torch.allclose(got[name], want, atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_breadcrumbs_ties_matches_reference(zoo, cli, tmp_path, arch):
    fam = zoo.get(arch)
    got = _merge(
        cli,
        tmp_path,
        f"""
merge_method: breadcrumbs_ties
base_model: {fam.base}
models:
  - model: {fam.ft1}
    parameters: {{weight: 1.0}}
  - model: {fam.ft2}
    parameters: {{weight: 0.5}}
parameters: {{density: 0.6, gamma: 0.05}}
out_dtype: float32
""",
    )
    base, ft1, ft2 = _inputs(fam)
    for name, b in base.items():
        want = VARIANTS["breadcrumbs_ties"].reference(
            b,
            [ft1[name], ft2[name]],
            weight=[1.0, 0.5],
            density=[0.6, 0.6],
            gamma=[0.05, 0.05],
            normalize=False,
            rescale=False,
            lambda_=1.0,
        )
        assert torch.allclose(got[name], want, atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("arch", ARCHS)
def test_slerp_matches_reference_with_filters(zoo, cli, tmp_path, arch):
    fam = zoo.get(arch)
    # mergekit's slerp example: slices form, both models listed, t filtered by module
    got = _merge(
        cli,
        tmp_path,
        f"""
slices:
  - sources:
      - model: {fam.base}
        layer_range: [0, 2]
      - model: {fam.ft1}
        layer_range: [0, 2]
merge_method: slerp
base_model: {fam.base}
parameters:
  t:
    - filter: "*.mlp.*"
      value: 0.8
    - filter: attn
      value: 0.3
    - value: 0.5
dtype: float32
out_dtype: float32
""",
    )
    base, ft1, _ = _inputs(fam)
    for name, b in base.items():
        t = 0.8 if ".mlp." in name else 0.3 if "attn" in name else 0.5
        want = ref_slerp(b, ft1[name], t).float()
        assert torch.allclose(got[name], want, atol=1e-6, rtol=1e-5), name


@pytest.mark.parametrize("arch", ["qwen2", "gpt2"])
def test_model_stock_matches_reference(zoo, cli, tmp_path, arch):
    fam = zoo.get(arch)
    got = _merge(
        cli,
        tmp_path,
        f"""
merge_method: model_stock
base_model: {fam.base}
models:
  - model: {fam.base}
  - model: {fam.ft1}
  - model: {fam.ft2}
out_dtype: float32
""",
    )
    base, ft1, ft2 = _inputs(fam)
    for name, b in base.items():
        want = ref_model_stock(b, [ft1[name], ft2[name]]).float()
        assert torch.allclose(got[name], want, atol=1e-6, rtol=1e-5), name
