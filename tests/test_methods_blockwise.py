"""The block-wise fast path on tensors large enough to take it (several blocks, the sampled
threshold bracket), against whole-tensor computations."""

from __future__ import annotations

import pytest
import torch

from neuroloc_cli.methods import METHODS
from neuroloc_cli.ops.blockwise import BLOCK, Both, magnitude_cut
from neuroloc_cli.ops.sparsify import top_k_mask
from tests.test_methods_reference import ref_breadcrumbs_ties, ref_ties

SHAPE = (300, 700)  # 210,000 elements: 7 blocks, above the exact-kthvalue size


def _apply(cut, base, tuned):
    b, t = base.reshape(-1), tuned.reshape(-1)
    parts = [cut(s, min(s + BLOCK, b.numel()), (t[s : s + BLOCK] - b[s : s + BLOCK]).abs()) for s in range(0, b.numel(), BLOCK)]
    return torch.cat(parts).reshape(base.shape)


def _deltas(kind):
    g = torch.Generator().manual_seed(11)
    base = torch.randn(SHAPE, generator=g)
    if kind == "fp32":
        tuned = base + 0.01 * torch.randn(SHAPE, generator=g)
    elif kind == "bf16":  # bf16 weights: few distinct delta magnitudes, many ties at the threshold
        base = base.bfloat16().float()
        tuned = (base + 0.01 * torch.randn(SHAPE, generator=g)).bfloat16().float()
    else:  # skewed: 99% of the delta is exactly zero, the sample rarely sees the rest
        tuned = base + torch.where(torch.rand(SHAPE, generator=g) < 0.01, torch.randn(SHAPE, generator=g), 0.0)
    return base, tuned


@pytest.mark.parametrize("kind", ["fp32", "bf16", "skewed"])
@pytest.mark.parametrize("density", [0.005, 0.3, 0.5, 0.97])
def test_cut_keeps_exactly_the_top_k_with_position_ties(kind, density):
    base, tuned = _deltas(kind)
    k = int(density * base.numel())
    got = _apply(magnitude_cut(base.reshape(-1), tuned.reshape(-1), k), base, tuned)
    want = top_k_mask((tuned - base).abs(), k)
    assert int(got.sum()) == k
    assert torch.equal(got, want)


def test_breadcrumbs_cut_drops_outliers_and_smallest():
    base, tuned = _deltas("bf16")
    n = base.numel()
    both = Both(magnitude_cut(base.reshape(-1), tuned.reshape(-1), n // 2), magnitude_cut(base.reshape(-1), tuned.reshape(-1), n // 100))
    a = (tuned - base).abs()
    assert torch.equal(_apply(both, base, tuned), top_k_mask(a, n // 2) & ~top_k_mask(a, n // 100))


@pytest.mark.parametrize("kind, weights", [("fp32", (0.7, 0.3)), ("bf16", (0.7, 0.3)), ("bf16", (0.7, -0.3)), ("fp32", (1.0, 0.0))])
@pytest.mark.parametrize("normalize", [True, False])
def test_ties_large_tensor_matches_reference(kind, weights, normalize):
    # positive weights take a shortcut in the sign election; zero and negative ones the general path
    base, t1 = _deltas(kind)
    t2 = base + 0.8 * (t1 - base).flip(0)  # a second task vector that disagrees in sign often
    m = METHODS.get("ties")
    pm = [{"weight": weights[0], "density": 0.4}, {"weight": weights[1], "density": 0.6}]
    got = m(base, [t1, t2], {"normalize": normalize, "rescale": False, "lambda": 1.0}, pm)
    want = ref_ties(base, [t1, t2], list(weights), [0.4, 0.6], normalize=normalize)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-6)


def test_breadcrumbs_ties_large_tensor_matches_reference():
    base, t1 = _deltas("bf16")
    t2 = base + (t1 - base).flip(1)
    m = METHODS.get("breadcrumbs_ties")
    pm = [{"weight": 1.0, "density": 0.5, "gamma": 0.02}, {"weight": 0.5, "density": 0.5, "gamma": 0.02}]
    got = m(base, [t1, t2], {"normalize": False, "rescale": False, "lambda": 1.0}, pm)
    want = ref_breadcrumbs_ties(base, [t1, t2], [1.0, 0.5], [0.5, 0.5], 0.02)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("bracket", [(0.0, 0.0), (5.0, 6.0), (0.0, 1e-9)])
def test_a_missed_bracket_falls_back_to_the_exact_threshold(monkeypatch, bracket):
    import neuroloc_cli.ops.blockwise as bw

    monkeypatch.setattr(bw, "_bracket", lambda base, tuned, k: bracket)
    base, tuned = _deltas("bf16")
    k = base.numel() // 3
    got = _apply(bw.magnitude_cut(base.reshape(-1), tuned.reshape(-1), k), base, tuned)
    assert torch.equal(got, top_k_mask((tuned - base).abs(), k))


@pytest.mark.parametrize("share_zero", [1.0, 0.9])
def test_mostly_unchanged_tensor(share_zero):
    # frozen tensors (all-zero deltas) and nearly frozen ones put one magnitude in the bracket
    base, tuned = _deltas("fp32")
    tuned = torch.where(torch.arange(base.numel()).reshape(SHAPE) < share_zero * base.numel(), base, tuned)
    k = base.numel() // 2
    got = _apply(magnitude_cut(base.reshape(-1), tuned.reshape(-1), k), base, tuned)
    assert torch.equal(got, top_k_mask((tuned - base).abs(), k))
