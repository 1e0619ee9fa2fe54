"""The fused path on tensors large enough to take it (several kernel blocks, the sampled
threshold bracket, several parallel parts), against the plain-PyTorch specification
(`neuroloc_cli.ops.reference`)."""

from __future__ import annotations

import pytest
import torch

import neuroloc_cli.ops.blockwise as bw
from neuroloc_cli.methods import METHODS
from neuroloc_cli.methods.gta import VARIANTS
from neuroloc_cli.ops.blockwise import magnitude_cut
from neuroloc_cli.ops.reference import top_k

SHAPE = (300, 700)  # 210,000 elements: 206 kernel blocks, above the exact-selection size


def _split(monkeypatch, threads):
    """Share tensors out to `threads` parts, however small (torch's thread count is the knob)."""
    monkeypatch.setattr(bw, "_MIN_PART", 1)
    default = torch.get_num_threads()
    torch.set_num_threads(threads)
    return default


@pytest.fixture(params=[1, 7], ids=["one part", "7 parts"])
def parts(request, monkeypatch):
    """Run each test in one part, and in several (buffers, offsets, per-part counts)."""
    default = _split(monkeypatch, request.param)
    yield request.param
    torch.set_num_threads(default)


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
def test_cut_keeps_exactly_the_top_k_with_position_ties(kind, density, parts):
    base, tuned = _deltas(kind)
    k = int(density * base.numel())
    got = _apply(magnitude_cut(base.reshape(-1), tuned.reshape(-1), k), base, tuned)
    want = top_k((tuned - base).abs(), k)
    assert int(got.sum()) == k
    assert torch.equal(got, want)


def test_breadcrumbs_cut_drops_outliers_and_smallest():
    base, tuned = _deltas("bf16")
    n = base.numel()
    inner, outer = (magnitude_cut(base.reshape(-1), tuned.reshape(-1), k) for k in (n // 2, n // 100))
    a = (tuned - base).abs()
    assert torch.equal(_apply(inner, base, tuned) & ~_apply(outer, base, tuned), top_k(a, n // 2) & ~top_k(a, n // 100))


def _both(name, base, tensors, whole, per_model, seed=5):
    """(fused, reference) results of method `name`, called alike: the same resolved
    parameters, the same seed."""
    m = METHODS.get(name)
    whole = {p.name: p.default for p in m.params if not p.per_model} | whole
    per_model = [{p.name: p.default for p in m.params if p.per_model} | pm for pm in per_model]

    def run(fn=None):
        return m(base, tensors, whole, per_model, torch.Generator().manual_seed(seed) if m.random else None, fn=fn)

    return run(), run(VARIANTS[name].reference)


def _rescales(name):
    """A method's rescales: none, mergekit's L1 match, and for random draws the paper's 1/p."""
    return ("off", "L1", "paper") if VARIANTS[name].sparsifier.random else ("off", "L1")


RESCALES = [(name, rescale) for name in sorted(VARIANTS) for rescale in _rescales(name)]


@pytest.mark.parametrize("name, rescale", RESCALES)
# zero and negative weights too: agreement is judged on the weighted values
@pytest.mark.parametrize("kind, weights", [("fp32", (0.7, 0.3)), ("bf16", (0.7, -0.3)), ("fp32", (1.0, 0.0))])
@pytest.mark.parametrize("normalize", [True, False])
def test_large_tensor_matches_the_reference(name, rescale, kind, weights, normalize):
    base, t1 = _deltas(kind)
    t2 = base + 0.8 * (t1 - base).flip(0)  # a second task vector that disagrees in sign often
    whole = {"normalize": normalize, "rescale": rescale != "off", "lambda": 0.9}
    if VARIANTS[name].sparsifier.random:
        whole["paper_rescale"] = rescale == "paper"
    own = {"gamma": 0.02, "epsilon": 0.1}
    pm = [{"weight": weights[0], "density": 0.4}, {"weight": weights[1], "density": 0.6}]
    pm = [m | {p: own[p] for p in VARIANTS[name].sparsifier.params} for m in pm]
    got, want = _both(name, base, [t1, t2], whole, pm)
    assert torch.allclose(got, want, atol=1e-6, rtol=1e-6)


# (0, 100) puts every element in the bracket: the parts' candidate buffers overflow
@pytest.mark.parametrize("bracket", [(0.0, 0.0), (5.0, 6.0), (0.0, 1e-9), (0.0, 100.0)])
def test_a_missed_bracket_falls_back_to_the_exact_threshold(monkeypatch, bracket, parts):
    monkeypatch.setattr(bw, "_bracket", lambda base, tuned, k: bracket)
    base, tuned = _deltas("bf16")
    k = base.numel() // 3
    got = _apply(bw.magnitude_cut(base.reshape(-1), tuned.reshape(-1), k), base, tuned)
    assert torch.equal(got, top_k((tuned - base).abs(), k))


@pytest.mark.parametrize("share_zero", [1.0, 0.9])
def test_mostly_unchanged_tensor(share_zero, parts):
    # frozen tensors (all-zero deltas) and nearly frozen ones put one magnitude in the bracket
    base, tuned = _deltas("fp32")
    tuned = torch.where(torch.arange(base.numel()).reshape(SHAPE) < share_zero * base.numel(), base, tuned)
    k = base.numel() // 2
    got = _apply(magnitude_cut(base.reshape(-1), tuned.reshape(-1), k), base, tuned)
    assert torch.equal(got, top_k((tuned - base).abs(), k))


@pytest.mark.parametrize("name", ["ties", "dare_ties", "breadcrumbs_ties", "della"])
@pytest.mark.parametrize("rescale", [False, True])
def test_bytes_do_not_depend_on_the_thread_count(monkeypatch, name, rescale):
    # draws are a function of (seed, model, position), cuts are exact, and L1 norms are sums
    # of per-block sums in a fixed order: how the work is shared out never changes a bit
    base, t1 = _deltas("bf16")
    t2 = base + 0.8 * (t1 - base).flip(0)
    m = METHODS.get(name)
    whole = {p.name: p.default for p in m.params if not p.per_model} | {"rescale": rescale}
    pm = [{p.name: p.default for p in m.params if p.per_model} | {"weight": w, "density": 0.4} for w in (0.7, 0.3)]

    def run(threads):
        torch.set_num_threads(threads)
        return m(base, [t1, t2], whole, pm, *([torch.Generator().manual_seed(5)] if m.random else []))

    default = _split(monkeypatch, 1)
    try:
        results = [run(threads) for threads in (1, 2, 3, 7)]
    finally:
        torch.set_num_threads(default)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("name", ["ties", "dare_linear", "della"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_compute_dtypes(name, dtype):
    # float64 runs the loops in float64; half precision runs op by op in that dtype, one path for both
    base, t1 = _deltas("fp32")
    t2 = base + 0.8 * (t1 - base).flip(0)
    base, t1, t2 = (x.to(dtype) for x in (base, t1, t2))
    pm = [{"weight": 0.7, "density": 0.4, "epsilon": 0.1}, {"weight": 0.3, "density": 0.6, "epsilon": 0.1}]
    pm = [{k: v for k, v in m.items() if k in {p.name for p in METHODS.get(name).params}} for m in pm]
    got, want = _both(name, base, [t1, t2], {}, pm)
    assert got.dtype == want.dtype == dtype
    if dtype == torch.float64:
        assert torch.allclose(got, want, atol=1e-12, rtol=1e-12)
    else:  # the float32 results agree to ~1e-7, far inside a bf16 rounding step
        assert torch.equal(got, want)


@pytest.mark.parametrize("shape", [(300, 700), (1, 5000), (7, 1)])
def test_magnitude_ranks_are_a_stable_sort_of_each_row(shape, parts):
    # bf16 values: many equal magnitudes, ranked by position; a NaN ranks above everything
    g = torch.Generator().manual_seed(2)
    rows = torch.randn(shape, generator=g).bfloat16().float()
    rows.view(-1)[len(rows.view(-1)) // 2] = float("nan")
    order = rows.abs().argsort(dim=1, stable=True)
    want = torch.empty_like(order).scatter_(1, order, torch.arange(shape[1]).expand(shape).contiguous())
    assert torch.equal(bw.magnitude_ranks(rows), want.float())


@pytest.mark.parametrize("n, k", [(32, 16), (210_000, 1), (210_000, 10_000)])
def test_a_nan_delta_is_never_selected_and_stays_nan(n, k, parts):
    # small tensors and small k take the whole-tensor selection, the others the bracket: a
    # NaN must mean the same on both paths (not selected, not counted) and never crash
    base = torch.zeros(n)
    tuned = torch.randn(n, generator=torch.Generator().manual_seed(0))
    tuned[3] = float("nan")
    cut = magnitude_cut(base, tuned, k)
    kept = cut.mask((tuned - base).abs())
    assert int(kept.sum()) == k and not kept[3]
    assert torch.equal(kept, top_k(torch.nan_to_num((tuned - base).abs(), nan=-1.0), k))
    out = METHODS.get("ties")(base, [tuned], {"normalize": True, "rescale": False, "lambda": 1.0}, [{"weight": 1.0, "density": k / n}])
    assert torch.isnan(out[3]) and int(torch.isnan(out).sum()) == 1


def test_infinite_outliers_are_dropped():
    # breadcrumbs' outlier cut lands on +inf when the largest deltas are infinite: they are
    # dropped like any outlier (× 0, so NaN), not mistaken for "no outlier cut"
    base = torch.zeros(8)
    tuned = torch.tensor([1.0, float("inf"), 2.0, 3.0, float("inf"), 5.0, float("inf"), 7.0])
    outliers = magnitude_cut(base, tuned, 2)
    keep = bw.Keep(cut=bw.KEEP_ALL, outliers=outliers)
    out = bw.mix(base, [tuned], [keep], [1.0], [1.0], consensus=False, normalize=False, lambda_=1.0)
    dropped = outliers.mask(tuned.abs())
    assert dropped.tolist() == [False, True, False, False, True, False, False, False]
    assert torch.isnan(out[dropped]).all() and torch.equal(out[~dropped], tuned[~dropped])


def test_tensors_of_other_sizes_are_refused():
    # the compiled loops do not check bounds: a short tensor must not be read past its end
    base, short = torch.zeros(32), torch.ones(28)
    pm = [{"weight": 1.0, "density": 0.5}]
    with pytest.raises(ValueError, match="28 elements where 32 are expected"):
        METHODS.get("ties")(base, [short], {"normalize": True, "rescale": False, "lambda": 1.0}, pm)
    with pytest.raises(ValueError, match="28 elements where 32 are expected"):
        bw.mix(base, [base], [bw.Keep(p=torch.full((28,), 0.5))], [1.0], [1.0], consensus=False, normalize=False, lambda_=1.0)


def test_strided_tensors_are_read_correctly():
    base, t1 = _deltas("fp32")
    strided = t1.t().contiguous().t()  # same values, column-major
    pm = [{"weight": 1.0, "density": 0.3}]
    whole = {"normalize": True, "rescale": False, "lambda": 1.0}
    assert torch.equal(METHODS.get("ties")(base, [strided], whole, pm), METHODS.get("ties")(base, [t1], whole, pm))
    flat = base.reshape(-1)
    assert torch.equal(
        bw.mix(flat[::2], [t1.reshape(-1)[::2]], [bw.Keep()], [1.0], [1.0], consensus=False, normalize=False, lambda_=1.0),
        t1.reshape(-1)[::2],
    )


def test_the_loops_run_where_no_cache_folder_is_writable():
    # Numba refuses `cache=True` when it finds no writable cache folder (a read-only install
    # and a read-only home): the loops must still compile and run, uncached
    import subprocess
    import sys

    import numba.core.caching

    if not hasattr(numba.core.caching.CacheImpl, "_locator_classes"):
        pytest.skip("this Numba locates caches differently")
    code = (
        "import numba.core.caching as c; c.CacheImpl._locator_classes = []\n"
        "import torch\n"
        "from neuroloc_cli.methods import METHODS\n"
        "b = torch.zeros(8); t = torch.arange(8.0)\n"
        "out = METHODS.get('ties')(b, [t], {'normalize': True, 'rescale': False, 'lambda': 1.0}, [{'weight': 1.0, 'density': 0.5}])\n"
        "assert out.tolist() == [0, 0, 0, 0, 4, 5, 6, 7], out\n"
    )
    r = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
