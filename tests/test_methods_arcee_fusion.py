"""arcee_fusion on small tensors, against the formula written out here in float64 NumPy and
values worked out by hand; the reference is mergekit 0.1.5's method of the same name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from neuroloc_cli.methods import METHODS
from neuroloc_cli.methods.arcee_fusion import PROB_EPS, fusion_threshold, importance, quantile_index
from neuroloc_cli.recipe.schema import parse_recipe


def np_fusion(base: np.ndarray, other: np.ndarray) -> np.ndarray:
    """`s = |θ_1 − θ_0| · KL(softmax(θ_1) + 1e-8 ‖ softmax(θ_0) + 1e-8)` per row; the quartiles
    are the sorted scores at `int(q · (n − 1))`; keep θ_1 where `s ≥ median + 1.5 · (q3 − q1)`."""

    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(other) + 1e-8, softmax(base) + 1e-8
    scores = np.abs(other - base) * (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    ordered = np.sort(scores.ravel())
    q1, med, q3 = (ordered[int(np.float32(f) * np.float32(ordered.size - 1))] for f in (0.25, 0.5, 0.75))
    return np.where(scores >= med + 1.5 * (q3 - q1), other, base)


def call(base, other):
    out = METHODS.get("arcee_fusion")(torch.tensor(base), [torch.tensor(other)], {}, [{}])
    return out.numpy()


@pytest.mark.parametrize("shape", [(7,), (5, 9), (3, 4, 6), (64, 33)])
def test_matches_the_formula(shape):
    rng = np.random.default_rng(sum(shape))
    base = rng.normal(size=shape)
    other = base + rng.normal(scale=0.3, size=shape) * (rng.random(size=shape) < 0.3)
    expected = np_fusion(base, other)
    out = call(base, other)
    np.testing.assert_array_equal(out, expected)  # each element is one input's, bit for bit
    assert 0 < (out != base).sum() < base.size  # the fence keeps some changes, not all


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_scores_in_reused_buffers_are_the_plain_formulas_floats(dtype):
    """`importance` writing into given buffers, reused across pieces of different lengths
    (the method's way), gives the floats of the plain PyTorch formula, bit for bit."""
    g = torch.Generator().manual_seed(5)
    base = torch.randn(40, 96, generator=g).to(dtype)
    other = (base.float() + 0.1 * torch.randn(40, 96, generator=g)).to(dtype)
    p = torch.softmax(other, dim=-1) + PROB_EPS
    q = torch.softmax(base, dim=-1) + PROB_EPS
    expected = (other - base).abs() * (p * torch.log(p / q)).sum(dim=-1, keepdim=True)
    out, work = torch.full_like(base, float("nan")), torch.full((2, 25, 96), float("nan"), dtype=dtype)
    for rows in (slice(0, 25), slice(25, 40)):  # a shorter last piece in the longer buffers
        size = rows.stop - rows.start
        importance(base[rows], other[rows], out[rows], (work[0, :size], work[1, :size]))
    assert torch.equal(out, expected)
    assert torch.equal(importance(base, other), expected)  # fresh buffers


def test_by_hand_one_row():
    # one row: KL is one positive number c, so s = c·|δ|, |δ| = (0, 0, 0, 0, 0, 0, 0, 4) sorted;
    # n − 1 = 7: q1 at index 1, median at 3, q3 at 5 are all 0 -> τ = 0: every element with
    # s ≥ 0 takes the other's value, i.e. the result is the other model (zeros included)
    base = np.zeros(8)
    other = np.array([0, 0, 0, 4.0, 0, 0, 0, 0])
    np.testing.assert_array_equal(call(base, other), other)
    # changes of 1, 2, ..., 8: s = c·k; q1 = 2c (index 1), median 4c (index 3), q3 6c (index 5);
    # τ = 4c + 1.5·4c = 10c: nothing reaches it, the result is the base
    other = np.arange(1.0, 9.0)
    np.testing.assert_array_equal(call(base, other), base)


def test_quartiles_are_lower_order_statistics_in_float32():
    # int(q·(n−1)): 0.25·(10 − 1) = 2.25 -> 2, 0.75·9 = 6.75 -> 6 (no interpolation)
    assert [quantile_index(q, 10) for q in (0.25, 0.5, 0.75)] == [2, 4, 6]
    scores = torch.arange(10.0)
    assert fusion_threshold(scores) == 4 + 1.5 * (6 - 2)


def test_large_tensor_threshold_is_exact_not_sampled():
    # more than mergekit's 1,000,000-element sample: the quartiles are still the exact ones
    scores = torch.randperm(1_200_001, generator=torch.Generator().manual_seed(0)).float()
    n = scores.numel() - 1
    expected = float(int(0.5 * n)) + 1.5 * (int(np.float32(0.75) * np.float32(n)) - int(np.float32(0.25) * np.float32(n)))
    assert fusion_threshold(scores) == pytest.approx(expected, rel=0, abs=0)
    assert fusion_threshold(scores) == fusion_threshold(scores.flip(0))


@pytest.mark.parametrize(("grid", "negative"), [(0, False), (64, False), (64, True)], ids=["distinct", "ties", "partitioned"])
def test_large_tensor_quartiles_equal_a_sort(grid, negative):
    # 300,000 scores, distinct or on a coarse grid (many ties): by `magnitude_cut` when none is
    # negative, by a partition when one is (a KL rounded below zero); either way a sort's values
    scores = torch.rand(300_000, generator=torch.Generator().manual_seed(1))
    if grid:
        scores = (scores * grid).round() / grid
    if negative:
        scores[::1000] = -1e-12
    before = scores.clone()
    ordered = np.sort(scores.numpy())
    q1, median, q3 = (ordered[quantile_index(q, ordered.size)] for q in (0.25, 0.5, 0.75))
    assert fusion_threshold(scores) == float(np.float32(median) + np.float32(1.5) * (np.float32(q3) - np.float32(q1)))
    assert torch.equal(scores, before)  # left as it was


def test_recipe_takes_a_base_and_one_model():
    m = METHODS.get("arcee_fusion")
    assert m.needs_base and m.max_models == 1 and not m.params and not m.random
    recipe = parse_recipe("merge_method: arcee_fusion\nbase_model: b\nmodels:\n  - model: a\n", "r.yaml")
    assert recipe.merge_method == "arcee_fusion"
