"""nuslerp, nearswap, multislerp, karcher, sce, ram and ramplus_tl on small tensors, against
values worked out by hand (the reasoning is in comments) and the formulas written out here in
float64 NumPy; the reference for each is mergekit 0.1.5's method of the same name."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from neuroloc_cli.errors import InputError
from neuroloc_cli.methods import METHODS
from neuroloc_cli.methods.sce import selected_count
from neuroloc_cli.recipe.schema import parse_recipe

RNG = np.random.default_rng(0)
BASE = RNG.normal(size=(3, 4))
TUNED = [BASE + RNG.normal(scale=0.5, size=(3, 4)) for _ in range(3)]


def call(name, base, tensors, whole=None, per_model=None):
    """Run a registered method in float64 with its defaults, overridden by `whole` and `per_model`."""
    m = METHODS.get(name)
    w = {p.name: p.default for p in m.params if not p.per_model}
    w.update(whole or {})
    pm = [{p.name: p.default for p in m.params if p.per_model} | (per_model[i] if per_model else {}) for i in range(len(tensors))]
    as_tensor = lambda a: torch.tensor(np.asarray(a, dtype=np.float64))  # noqa: E731
    out = m(None if base is None else as_tensor(base), [as_tensor(t) for t in tensors], w, pm)
    return out.numpy()


def weights(*ws):
    return [{"weight": w} for w in ws]


# -- nuslerp ------------------------------------------------------------------------------------


def np_slerp(v0, v1, t):
    """Slerp of two 1-D float64 vectors, mergekit's way (norms clamped at 1e-7, lerp if colinear)."""
    cos = np.clip(v0 @ v1 / (max(np.linalg.norm(v0), 1e-7) * max(np.linalg.norm(v1), 1e-7)), -1, 1)
    if 1 - cos**2 <= 1e-16:
        return (1 - t) * v0 + t * v1
    omega = math.acos(cos)
    return (math.sin((1 - t) * omega) * v0 + math.sin(t * omega) * v1) / math.sin(omega)


def test_nuslerp_orthogonal_task_vectors_by_hand():
    # deltas [[1,0],[0,0]] and [[0,2],[0,0]] are orthogonal: Ω = π/2, sin Ω = 1;
    # weights (1, 3) -> t = 3/4: base + sin(π/8)·δ1 + sin(3π/8)·δ2
    base = np.ones((2, 2))
    d1, d2 = np.array([[1.0, 0], [0, 0]]), np.array([[0.0, 2], [0, 0]])
    out = call("nuslerp", base, [base + d1, base + d2], per_model=weights(1.0, 3.0))
    expected = base + math.sin(math.pi / 8) * d1 + math.sin(3 * math.pi / 8) * d2
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


def test_nuslerp_flattened_with_base_matches_the_formula():
    out = call("nuslerp", BASE, TUNED[:2], per_model=weights(0.7, 0.3))
    expected = BASE + np_slerp((TUNED[0] - BASE).ravel(), (TUNED[1] - BASE).ravel(), 0.3).reshape(BASE.shape)
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


def test_nuslerp_without_base_per_row_and_per_column():
    # nuslerp_flatten: false slerps each row; with nuslerp_row_wise each column (mergekit's dim=0)
    a, b = TUNED[0], TUNED[1]
    rows = call("nuslerp", None, [a, b], {"nuslerp_flatten": False}, weights(0.4, 0.6))
    np.testing.assert_allclose(rows, np.stack([np_slerp(a[i], b[i], 0.6) for i in range(3)]), rtol=0, atol=1e-12)
    cols = call("nuslerp", None, [a, b], {"nuslerp_flatten": False, "nuslerp_row_wise": True}, weights(0.4, 0.6))
    np.testing.assert_allclose(cols, np.stack([np_slerp(a[:, j], b[:, j], 0.6) for j in range(4)], axis=1), rtol=0, atol=1e-12)


def test_nuslerp_zero_weight_sum_gives_half_and_colinear_gives_lerp():
    # weights 1 and -1 sum to 0: t = 0.5 (mergekit's rule); b = 3a is colinear: plain lerp
    a = np.array([1.0, 2.0, -1.0])
    out = call("nuslerp", None, [a, 3 * a], per_model=weights(1.0, -1.0))
    np.testing.assert_allclose(out, 0.5 * a + 0.5 * 3 * a, rtol=0, atol=1e-12)


def test_base_listed_among_models_is_refused_where_the_base_is_optional():
    text = "merge_method: nuslerp\nbase_model: ./b\nmodels:\n  - model: ./b\n  - model: ./x\n  - model: ./y\n"
    problems = METHODS.get("nuslerp").check(parse_recipe(text, "r.yaml"))
    assert problems == ["models[0]: is the base model; nuslerp with a base_model takes the other models only (remove this entry)"]


# -- nearswap -----------------------------------------------------------------------------------


def test_nearswap_by_hand():
    # t = 0.1; |base − other| = [0.001, 0.5, 2, 0] -> w = clamp(0.1 / max(d, 1e-6), 0, 1) = [1, 0.2, 0.05, 1]
    base = np.zeros(4)
    other = np.array([0.001, 0.5, -2.0, 0.0])
    out = call("nearswap", base, [other], {"t": 0.1})
    np.testing.assert_allclose(out, [0.001, 0.2 * 0.5, 0.05 * -2.0, 0.0], rtol=0, atol=1e-15)
    assert np.array_equal(call("nearswap", base, [other], {"t": 0.0}), base)


# -- multislerp ---------------------------------------------------------------------------------


def np_multislerp(vectors, w, eps=1e-8):
    vs = [v.ravel() for v in vectors]
    norms = [np.linalg.norm(v) for v in vs]
    units = [v / (n + eps) for v, n in zip(vs, norms)]
    mean = sum(wi * u for wi, u in zip(w, units))
    mean = mean / np.linalg.norm(mean)
    tangent = sum(wi * (u - (u @ mean) * mean) for wi, u in zip(w, units))
    tn = np.linalg.norm(tangent) + eps
    r = mean * math.cos(tn) + tangent * math.sin(tn) / tn
    return (r * sum(n * wi for n, wi in zip(norms, w))).reshape(vectors[0].shape)


def test_multislerp_with_base_matches_the_formula():
    out = call("multislerp", BASE, TUNED, per_model=weights(0.5, 0.3, 0.2))
    np.testing.assert_allclose(out, BASE + np_multislerp([t - BASE for t in TUNED], [0.5, 0.3, 0.2]), rtol=0, atol=1e-12)


def test_multislerp_normalizes_weights_unless_told_not_to():
    # weights (1, 2) become (1/3, 2/3)
    out = call("multislerp", None, TUNED[:2], per_model=weights(1.0, 2.0))
    np.testing.assert_allclose(out, np_multislerp(TUNED[:2], [1 / 3, 2 / 3]), rtol=0, atol=1e-12)
    raw = call("multislerp", None, TUNED[:2], {"normalize_weights": False}, weights(1.0, 2.0))
    np.testing.assert_allclose(raw, np_multislerp(TUNED[:2], [1.0, 2.0]), rtol=0, atol=1e-12)


def test_multislerp_one_model_and_orthogonal_pair_by_hand():
    # one model: returned as it is, whatever the base
    assert np.array_equal(call("multislerp", BASE, TUNED[:1], per_model=weights(0.3)), TUNED[0])
    # [2, 0] and [0, 2], equal weights: m = [1, 1]/√2 (the tangent cancels: τ = 0, τ' = ε ~ 0),
    # scale (2 + 2)/2 = 2 -> [√2, √2] up to ε
    out = call("multislerp", None, [np.array([2.0, 0.0]), np.array([0.0, 2.0])], per_model=weights(0.5, 0.5))
    np.testing.assert_allclose(out, [math.sqrt(2), math.sqrt(2)], rtol=0, atol=1e-7)


def test_multislerp_antipodal_models():
    # a and −a with equal weights: the mean of the unit vectors is 0; two models are mixed
    # linearly (0.5a − 0.5a = 0), three are an input error
    a = np.array([1.0, -2.0, 0.5])
    assert np.array_equal(call("multislerp", None, [a, -a], per_model=weights(0.5, 0.5)), np.zeros(3))
    with pytest.raises(InputError, match="weighted sum of the models' unit vectors is zero"):
        call("multislerp", None, [a, -a, np.zeros(3)], per_model=weights(0.5, 0.5, 0.0))


def test_multislerp_zero_weight_sum_is_a_recipe_problem():
    check = METHODS.get("multislerp").check_values
    assert "sum to zero" in check({"normalize_weights": True, "eps": 1e-8}, weights(1.0, -1.0))
    assert check({"normalize_weights": False, "eps": 1e-8}, weights(1.0, -1.0)) is None


# -- karcher ------------------------------------------------------------------------------------


def test_karcher_orthogonal_pair_by_hand():
    # u = [1,0], [0,1]; the start m = [1,1]/√2 is already the mean (the two tangent
    # contributions ±[0.5,−0.5]·(π/4)/sin(π/4) cancel); scale (2 + 4)/2 = 3
    out = call("karcher", None, [np.array([2.0, 0.0]), np.array([0.0, 4.0])])
    np.testing.assert_allclose(out, [3 / math.sqrt(2), 3 / math.sqrt(2)], rtol=0, atol=1e-12)


def test_karcher_converges_to_the_point_where_the_log_maps_cancel():
    # the Karcher mean m of the unit vectors u_i is where Σ θ_i/sin θ_i (u_i − cos θ_i m) = 0;
    # its scale is the mean norm
    out = call("karcher", None, TUNED, {"max_iter": 200, "tol": 1e-12}).ravel()
    norms = [np.linalg.norm(t) for t in TUNED]
    assert np.linalg.norm(out) == pytest.approx(sum(norms) / 3, rel=1e-12)
    m = out / np.linalg.norm(out)
    residual = np.zeros_like(m)
    for t, n in zip(TUNED, norms):
        u = t.ravel() / n
        theta = math.acos(np.clip(u @ m, -1, 1))
        residual += theta / math.sin(theta) * (u - math.cos(theta) * m)
    assert np.linalg.norm(residual) < 1e-9


def test_karcher_counts_the_base_and_zero_inputs():
    # with a base model, the base is one more input: [2,0], [0,4] as base and model = the pair above
    out = call("karcher", np.array([2.0, 0.0]), [np.array([0.0, 4.0])])
    np.testing.assert_allclose(out, [3 / math.sqrt(2), 3 / math.sqrt(2)], rtol=0, atol=1e-12)
    # a zero input has no direction but counts in the scale: [3,0] and 0 -> (3 + 0)/2 · [1, 0]
    np.testing.assert_allclose(call("karcher", None, [np.array([3.0, 0.0]), np.zeros(2)]), [1.5, 0.0], rtol=0, atol=1e-15)
    # one input: unchanged
    assert np.array_equal(call("karcher", None, TUNED[:1]), TUNED[0])


# -- sce ----------------------------------------------------------------------------------------

D1 = np.array([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
D2 = np.array([[-3.0, 1.0, 1.0], [2.0, -2.0, 4.0]])


def test_sce_without_selection_by_hand():
    # w ∝ mean(δ²): 91/6 and 35/6 -> w1 = 91/126, w2 = 35/126
    # Σδ = [[-2,-1,4],[-2,3,-2]] -> signs [[-,-,+],[-,+,-]]; δ1 agrees at all but [0,0], δ2 at [0,0] and [0,2]
    # [0,2]: (w1·3 + w2·1)/(w1 + w2) = (91·3 + 35)/126
    base = np.ones((2, 3))
    out = call("sce", base, [base + D1, base + D2])
    expected = base + np.array([[-3.0, -2.0, (91 * 3 + 35) / 126], [-4.0, 5.0, -6.0]])
    np.testing.assert_allclose(out, expected, rtol=0, atol=1e-12)


def test_sce_selects_by_variance_across_models():
    # population variance ((δ1 − δ2)/2)² = [[4, 2.25, 1], [9, 12.25, 25]], 6 non-zero; 0.5 of 6 -> 3:
    # row 1 is kept, row 0 zeroed (a zero never agrees, so row 0 keeps the base);
    # row 1's signs: Σ = [-2, 3, -2], δ1 agrees everywhere, δ2 nowhere
    base = np.ones((2, 3))
    out = call("sce", base, [base + D1, base + D2], {"select_topk": 0.5})
    np.testing.assert_allclose(out, base + np.array([[0.0, 0, 0], [-4, 5, -6]]), rtol=0, atol=1e-12)
    # select_topk 0 keeps nothing: the base
    assert np.array_equal(call("sce", base, [base + D1, base + D2], {"select_topk": 0.0}), base)


def test_sce_count_is_mergekits_float32_product():
    # float32(100) · float32(0.29) rounds to 29.0 (in float64 the product is 28.999999999999996)
    assert selected_count(100, 0.29) == 29 and int(0.29 * 100) == 28
    assert selected_count(6, 0.5) == 3 and selected_count(1, 0.5) == 0


# -- ram and ramplus_tl -------------------------------------------------------------------------


def test_ram_by_hand():
    # epsilon 1e-5: δ1 changes [_, 2, 3] (1e-6 is below), δ2 changes [_, 4, _]
    # -> [0, (2 + 4)/2, 3] (shared averaged, unique whole)
    base = np.full(3, 0.5)
    out = call("ram", base, [base + np.array([1e-6, 2.0, 3.0]), base + np.array([0.0, 4.0, 0.0])])
    np.testing.assert_allclose(out, base + np.array([0.0, 3.0, 3.0]), rtol=0, atol=1e-12)


def test_ramplus_tl_by_hand():
    # δ1 = [1,2,3,0,7], δ2 = [0,4,5,6,0]: counts [1,2,2,1,1]
    # model 1: shared 2 (idx 1, 2), unique 2 (idx 0, 4) -> ρ = 1; model 2: shared 2, unique 1 (idx 3) -> ρ = 2
    # r = 0.5, alpha = 1.5: λ1 = 1 + 0.5·1 = 1.5, λ2 = 1 + 0.5·1.5 = 1.75
    # -> [1·1.5, (2+4)/2, (3+5)/2, 6·1.75, 7·1.5]
    base = np.zeros(5)
    d1, d2 = np.array([1.0, 2, 3, 0, 7]), np.array([0.0, 4, 5, 6, 0])
    out = call("ramplus_tl", base, [d1, d2], {"r": 0.5, "alpha": 1.5})
    np.testing.assert_allclose(out, [1.5, 3.0, 4.0, 10.5, 10.5], rtol=0, atol=1e-12)


def test_ramplus_tl_defaults_and_a_model_with_no_unique_change():
    # defaults r 0.1, alpha 0.2; δ2 changes only shared elements: U = 0 -> ρ = S/ε, capped at 0.2
    # model 1: shared 1, unique 1 -> ρ = 1 -> capped: λ1 = 1.02
    base = np.zeros(2)
    out = call("ramplus_tl", base, [np.array([1.0, 2.0]), np.array([0.0, 4.0])])
    np.testing.assert_allclose(out, [1.02, 3.0], rtol=0, atol=1e-12)
