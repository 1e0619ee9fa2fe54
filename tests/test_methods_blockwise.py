"""The fused path on tensors large enough to take it (several kernel blocks, the sampled
threshold bracket, several parallel chunks), against whole-tensor computations."""

from __future__ import annotations

import pytest
import torch

import neuroloc_cli.ops.blockwise as bw
from neuroloc_cli.methods import METHODS
from neuroloc_cli.ops.blockwise import magnitude_cut
from neuroloc_cli.ops.sparsify import top_k_mask
from tests.test_methods_reference import ref_breadcrumbs_ties, ref_ties

SHAPE = (300, 700)  # 210,000 elements: 206 kernel blocks, above the exact-selection size
SMALL_CHUNK = 1 << 14  # 13 parallel chunks of SHAPE, the last one short


@pytest.fixture(params=["one chunk", "13 chunks"])
def chunks(request, monkeypatch):
    """Run each test on one parallel chunk, and on many (regions, offsets, per-chunk counts)."""
    if request.param == "13 chunks":
        monkeypatch.setattr(bw, "_CHUNK", SMALL_CHUNK)
    return request.param


def _apply(cut, base, tuned):
    return cut.mask((tuned - base).abs().reshape(-1)).reshape(base.shape)


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
def test_cut_keeps_exactly_the_top_k_with_position_ties(kind, density, chunks):
    base, tuned = _deltas(kind)
    k = int(density * base.numel())
    got = _apply(magnitude_cut(base.reshape(-1), tuned.reshape(-1), k), base, tuned)
    want = top_k_mask((tuned - base).abs(), k)
    assert int(got.sum()) == k
    assert torch.equal(got, want)


def test_breadcrumbs_cut_drops_outliers_and_smallest():
    base, tuned = _deltas("bf16")
    n = base.numel()
    inner, outer = (magnitude_cut(base.reshape(-1), tuned.reshape(-1), k) for k in (n // 2, n // 100))
    a = (tuned - base).abs()
    assert torch.equal(_apply(inner, base, tuned) & ~_apply(outer, base, tuned), top_k_mask(a, n // 2) & ~top_k_mask(a, n // 100))


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


# (0, 100) puts every element in the bracket: the chunks' candidate regions overflow
@pytest.mark.parametrize("bracket", [(0.0, 0.0), (5.0, 6.0), (0.0, 1e-9), (0.0, 100.0)])
def test_a_missed_bracket_falls_back_to_the_exact_threshold(monkeypatch, bracket, chunks):
    monkeypatch.setattr(bw, "_bracket", lambda base, tuned, k: bracket)
    base, tuned = _deltas("bf16")
    k = base.numel() // 3
    got = _apply(bw.magnitude_cut(base.reshape(-1), tuned.reshape(-1), k), base, tuned)
    assert torch.equal(got, top_k_mask((tuned - base).abs(), k))


@pytest.mark.parametrize("share_zero", [1.0, 0.9])
def test_mostly_unchanged_tensor(share_zero, chunks):
    # frozen tensors (all-zero deltas) and nearly frozen ones put one magnitude in the bracket
    base, tuned = _deltas("fp32")
    tuned = torch.where(torch.arange(base.numel()).reshape(SHAPE) < share_zero * base.numel(), base, tuned)
    k = base.numel() // 2
    got = _apply(magnitude_cut(base.reshape(-1), tuned.reshape(-1), k), base, tuned)
    assert torch.equal(got, top_k_mask((tuned - base).abs(), k))


@pytest.mark.parametrize("name", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
@pytest.mark.parametrize("rescale", [False, True])
def test_bytes_do_not_depend_on_threads_or_chunks(monkeypatch, name, rescale):
    # draws are a function of (seed, model, position) and cuts are exact, so how the work is
    # split never changes a bit; the float64 L1 sums of `rescale` are added chunk by chunk,
    # so they are compared at one chunk size, across thread counts
    base, t1 = _deltas("bf16")
    t2 = base + 0.8 * (t1 - base).flip(0)
    m = METHODS.get(name)
    whole = {p.name: p.default for p in m.params if not p.per_model} | {"rescale": rescale}
    pm = [{p.name: p.default for p in m.params if p.per_model} | {"weight": w, "density": 0.4} for w in (0.7, 0.3)]

    def run(threads):
        torch.set_num_threads(threads)
        return m(base, [t1, t2], whole, pm, *([torch.Generator().manual_seed(5)] if m.random else []))

    default = torch.get_num_threads()
    try:
        one_chunk = run(2)
        monkeypatch.setattr(bw, "_CHUNK", SMALL_CHUNK)
        two, one = run(2), run(1)
    finally:
        torch.set_num_threads(default)
    assert torch.equal(two, one)
    if not rescale:
        assert torch.equal(one_chunk, two)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_compute_dtypes(dtype):
    # float64 runs the loops in float64; half precision is mixed in float32 and cast back
    base, t1 = _deltas("fp32")
    t2 = base + 0.8 * (t1 - base).flip(0)
    base, t1, t2 = (x.to(dtype) for x in (base, t1, t2))
    pm = [{"weight": 0.7, "density": 0.4}, {"weight": 0.3, "density": 0.6}]
    got = METHODS.get("ties")(base, [t1, t2], {"normalize": True, "rescale": False, "lambda": 1.0}, pm)
    assert got.dtype == dtype
    work = torch.float64 if dtype == torch.float64 else torch.float32
    want = ref_ties(base.to(work), [t1.to(work), t2.to(work)], [0.7, 0.3], [0.4, 0.6]).to(dtype)
    if dtype == torch.float64:
        assert torch.allclose(got, want, atol=1e-12, rtol=1e-12)
    else:  # the float32 results agree to ~1e-7, far inside a bf16 rounding step
        assert torch.equal(got, want)
