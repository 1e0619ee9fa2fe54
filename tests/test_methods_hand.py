"""Merge methods on 2×3 tensors with values worked out by hand (the reasoning is in comments),
plus the edge cases the methods document: density 0 and 1, gamma 0, all-zero deltas, a single
model, one-element and empty tensors and 1-D norm weights."""

from __future__ import annotations

import math

import pytest
import torch

from neuroloc_cli.methods import METHODS
from neuroloc_cli.methods.gta import VARIANTS
from neuroloc_cli.ops.reference import top_k
from neuroloc_cli.ops.sparsify import della_keep_probabilities, share_count

BASE = torch.ones(2, 3)
D1 = torch.tensor([[1.0, -2.0, 3.0], [-4.0, 5.0, -6.0]])
D2 = torch.tensor([[-3.0, 1.0, 1.0], [2.0, -2.0, 4.0]])


def call(name, base, deltas, whole=None, per_model=None, seed=0):
    """Run a registered method with its defaults, overridden by `whole` and `per_model`."""
    m = METHODS.get(name)
    w = {p.name: p.default for p in m.params if not p.per_model}
    w.update(whole or {})
    pm = []
    for i in range(len(deltas)):
        d = {p.name: p.default for p in m.params if p.per_model}
        d.update((per_model or [{}] * len(deltas))[i])
        pm.append(d)
    gen = torch.Generator().manual_seed(seed) if m.random else None
    tensors = [base + d for d in deltas]
    return m(base, tensors, w, pm, gen)


def test_top_k_keeps_exactly_k_and_breaks_ties_by_position():
    magnitude = torch.tensor([2.0, 1.0, 2.0, 2.0, 0.5])
    # the two largest are two of the three 2.0s: the first two by position
    assert top_k(magnitude, 2).tolist() == [True, False, True, False, False]
    assert top_k(magnitude, 0).sum() == 0 and top_k(magnitude, 5).all()


def test_density_keeps_floor_of_density_times_n():
    # 6 elements, density 0.5 -> 3 kept (|-4|, |5|, |-6| in ties); density 0.49 -> floor(2.94) = 2
    assert share_count(0.5, 6) == 3 and share_count(0.49, 6) == 2
    assert top_k(D1.abs(), share_count(0.5, 6)).tolist() == [[False, False, False], [True, True, True]]


@pytest.mark.parametrize(
    "share, n, expected",
    [
        # mergekit's int(share · n), binary rounding included: 0.29 · 100 = 28.999999999999996
        (0.29, 100, 28),
        (0.41, 300, 122),
        (0.3, 10, 3),
        (0.8, 291, 232),
        (0.5, 1, 0),
        (1.0, 7, 7),
        (0.0, 7, 0),
    ],
)
def test_one_share_to_count_rule(share, n, expected):
    assert share_count(share, n) == expected


def test_ties_hand_computed():
    # trim at density 0.5 (3 of 6): d1 keeps -4, 5, -6; d2 keeps 4, -3 and the first 2 (at [1,0])
    # weighted (0.5, 1): wd1 = [[0,0,0],[-2,2.5,-3]], wd2 = [[-3,0,0],[2,0,4]]
    # summed mass [[-3,0,0],[0,2.5,1]] -> signs [[-,+,+],[+,+,+]] (0 elects +)
    # agreeing values / agreeing weights: [[-3/1, 0, 0], [2/1, 2.5/0.5, 4/1]]
    out = call("ties", BASE, [D1, D2], per_model=[{"weight": 0.5, "density": 0.5}, {"weight": 1.0, "density": 0.5}])
    assert torch.equal(out, BASE + torch.tensor([[-3.0, 0, 0], [2, 5, 4]]))


def test_ties_without_normalize_and_with_lambda():
    # same election, no division, times lambda 2: [[-3,0,0],[2,2.5,4]] * 2
    out = call(
        "ties", BASE, [D1, D2], {"normalize": False, "lambda": 2.0}, [{"weight": 0.5, "density": 0.5}, {"weight": 1.0, "density": 0.5}]
    )
    assert torch.equal(out, BASE + torch.tensor([[-6.0, 0, 0], [4, 5, 8]]))


def test_ties_rescale_restores_l1_norm():
    # one model, density 0.5: kept -4, 5, -6 (L1 15) rescaled to L1 21 -> factor 21/15 = 1.4
    out = call("ties", BASE, [D1], {"rescale": True}, [{"weight": 1.0, "density": 0.5}])
    assert torch.allclose(out, BASE + torch.tensor([[0.0, 0, 0], [-5.6, 7.0, -8.4]]))


@pytest.mark.parametrize(
    "density, gamma, expected",
    [
        # 3 kept of 6; gamma 0.2 drops floor(1.2) = 1 outlier (-6) and the 2 smallest (1, -2)
        (0.5, 0.2, [[0, 0, 3], [-4, 5, 0]]),
        # gamma 0: plain magnitude trimming
        (0.5, 0.0, [[0, 0, 0], [-4, 5, -6]]),
        # density 0.9 -> 5 kept; gamma 0.5 would drop 3, so only 1 outlier is dropped
        (0.9, 0.5, [[1, -2, 3], [-4, 5, 0]]),
        # density 1 keeps all, gamma does not apply
        (1.0, 0.3, [[1, -2, 3], [-4, 5, -6]]),
    ],
)
def test_breadcrumbs_hand_computed(density, gamma, expected):
    out = call("breadcrumbs", BASE, [D1], per_model=[{"weight": 2.0, "density": density, "gamma": gamma}])
    assert torch.equal(out, BASE + 2 * torch.tensor(expected, dtype=torch.float32))


def test_breadcrumbs_ties_hand_computed():
    # gamma 0.2, density 0.5: d1 keeps [[0,0,3],[-4,5,0]]; d2 (|.| 3,1,1,2,2,4) drops 4 and
    # the two smallest (the 1s) -> [[-3,0,0],[2,-2,0]]. Weights 1: sum [[-3,0,3],[-2,3,0]]
    # signs [[-,+,+],[-,+,+]]; no normalize: [[-3,0,3],[-4,5,0]]
    pm = [{"weight": 1.0, "density": 0.5, "gamma": 0.2}] * 2
    out = call("breadcrumbs_ties", BASE, [D1, D2], per_model=pm)
    assert torch.equal(out, BASE + torch.tensor([[-3.0, 0, 3], [-4, 5, 0]]))


def test_slerp_hand_computed():
    base = torch.tensor([[1.0, 0, 0], [0, 0, 0]])
    other = torch.tensor([[0.0, 1, 0], [0, 0, 0]])
    # orthogonal unit tensors, Ω = π/2, t = 0.5: sin(π/4)/sin(π/2) each
    out = METHODS.get("slerp")(base, [other], {"t": 0.5}, [{}])
    h = math.sqrt(0.5)
    assert torch.allclose(out, torch.tensor([[h, h, 0], [0, 0, 0]]))
    # t = 0 is the base, t = 1 the other model
    assert torch.allclose(METHODS.get("slerp")(base, [other], {"t": 0.0}, [{}]), base)
    assert torch.allclose(METHODS.get("slerp")(base, [other], {"t": 1.0}, [{}]), other)


def test_slerp_colinear_is_lerp():
    base = torch.tensor([[1.0, 2, 3], [4, 5, 6]])
    out = METHODS.get("slerp")(base, [2 * base], {"t": 0.25}, [{}])
    assert torch.allclose(out, 1.25 * base)


def test_model_stock_hand_computed():
    # offsets row 0: [1,1,0] and [1,0,1]; row 1: [1,0,0] and [-1,0,0]
    d1 = torch.tensor([[1.0, 1, 0], [1, 0, 0]])
    d2 = torch.tensor([[1.0, 0, 1], [-1, 0, 0]])
    # whole tensor: dot 1 - 1 = 0 -> cos 0 -> t 0 -> the base
    out = METHODS.get("model_stock")(BASE, [BASE + d1, BASE + d2], {"filter_wise": False}, [{}, {}])
    assert torch.equal(out, BASE)
    # per row: row 0 cos 1/2 -> t = 2·½ / (1 + ½) = 2/3; mean offset [1, .5, .5] -> 1 + 2/3·[1,.5,.5]
    # row 1 cos −1 -> 1 + (N−1)cos = 0 -> documented: keep the base row
    out = METHODS.get("model_stock")(BASE, [BASE + d1, BASE + d2], {"filter_wise": True}, [{}, {}])
    assert torch.allclose(out, torch.tensor([[5 / 3, 4 / 3, 4 / 3], [1, 1, 1]]))


def test_passthrough_copies_and_scales():
    x = BASE + D1
    assert METHODS.get("passthrough")(None, [x], {}, [{"scale": 1.0}]) is x
    assert torch.equal(METHODS.get("passthrough")(None, [x], {}, [{"scale": 0.5}]), 0.5 * x)


def test_della_probabilities_hand_computed():
    # row [1,-2,3]: ranks 0,1,2 -> density − ε + 2ε·r/2 = 0.4, 0.5, 0.6; row [-4,5,-6] the same
    probs = della_keep_probabilities(D1, 0.5, 0.1)
    assert torch.allclose(probs, torch.tensor([[0.4, 0.5, 0.6], [0.4, 0.5, 0.6]]))
    with pytest.raises(ValueError, match=r"della: density ± epsilon must lie in \(0, 1\), got density 0.5, epsilon 0.5"):
        della_keep_probabilities(D1, 0.5, 0.5)


# -- edge cases ------------------------------------------------------------------------------

SPARSE = sorted(VARIANTS)  # every sparsify-then-mix method: ties, dare_*, breadcrumbs*, della*


@pytest.mark.parametrize("name", SPARSE)
def test_density_zero_keeps_the_base(name):
    out = call(name, BASE, [D1, D2], per_model=[{"weight": 1.0, "density": 0.0}] * 2)
    assert torch.equal(out, BASE)


@pytest.mark.parametrize("name", SPARSE)
def test_density_one_is_task_arithmetic_or_ties_without_trimming(name):
    pm = [{"weight": 0.5, "density": 1.0}, {"weight": 1.0, "density": 1.0}]
    out = call(name, BASE, [D1, D2], {"normalize": False}, pm)
    wd1, wd2 = 0.5 * D1, D2
    if not VARIANTS[name].consensus:
        expected = BASE + wd1 + wd2
    else:  # sign election over untrimmed weighted deltas
        pos = (wd1 + wd2) >= 0
        agree = lambda wd: torch.where(pos, wd > 0, wd < 0)
        expected = BASE + wd1 * agree(wd1) + wd2 * agree(wd2)
    assert torch.allclose(out, expected)


@pytest.mark.parametrize("name", SPARSE + ["slerp", "model_stock"])
def test_all_zero_deltas_give_the_base(name):
    zero = torch.zeros(2, 3)
    if name == "slerp":
        out = METHODS.get("slerp")(BASE, [BASE.clone()], {"t": 0.3}, [{}])
    elif name == "model_stock":
        out = METHODS.get("model_stock")(BASE, [BASE.clone(), BASE.clone()], {"filter_wise": False}, [{}, {}])
    else:
        out = call(name, BASE, [zero, zero], per_model=[{"weight": 1.0, "density": 0.5}] * 2)
    assert torch.equal(out, BASE)


def test_single_model_ties_divides_out_the_weight():
    # normalize: Σ a·w·δ / Σ a·w = δ̂ for one model, whatever its weight
    out = call("ties", BASE, [D1], per_model=[{"weight": 0.3, "density": 0.5}])
    assert torch.allclose(out, BASE + torch.tensor([[0.0, 0, 0], [-4, 5, -6]]))


@pytest.mark.parametrize("name", SPARSE)
def test_one_element_tensor(name):
    base, delta = torch.tensor([2.0]), torch.tensor([0.5])
    # int(0.5 · 1) = 0 kept by magnitude methods; random ones keep it or not, never anything else
    out = call(name, base, [delta], per_model=[{"weight": 1.0, "density": 0.5, "epsilon": 0.1}])
    assert out.shape == (1,) and float(out) in (2.0, 2.5)
    if not VARIANTS[name].sparsifier.random:
        assert float(out) == 2.0
    assert float(call(name, base, [delta], per_model=[{"weight": 1.0, "density": 1.0}])) == 2.5


@pytest.mark.parametrize("name", SPARSE)
@pytest.mark.parametrize("shape", [(0,), (0, 4), (3, 0)])
def test_empty_tensor(name, shape):
    empty = torch.zeros(shape)
    out = call(name, empty, [empty, empty], {"rescale": True}, [{"weight": 1.0, "density": 0.5, "epsilon": 0.1}] * 2)
    assert out.shape == shape


def test_della_on_a_1d_norm_weight_ranks_the_whole_vector():
    norm = torch.linspace(-1, 1, 11)  # magnitudes 1, .8, ... 0 ... 1
    probs = della_keep_probabilities(norm, 0.5, 0.2)
    # one row of 11: the zero in the middle is smallest (0.3), the ends largest; equal
    # magnitudes rank by position, so the first end gets rank 9 and the last rank 10
    assert probs[5] == pytest.approx(0.3)
    assert probs[0] == pytest.approx(0.3 + 0.4 * 9 / 10) and probs[10] == pytest.approx(0.7)
    assert probs.mean() == pytest.approx(0.5)


def test_model_stock_filter_wise_on_1d_is_the_whole_tensor():
    base = torch.tensor([1.0, 2, 3])
    ts = [base + torch.tensor([1.0, 1, 0]), base + torch.tensor([1.0, 0, 1])]
    a = METHODS.get("model_stock")(base, ts, {"filter_wise": True}, [{}, {}])
    b = METHODS.get("model_stock")(base, ts, {"filter_wise": False}, [{}, {}])
    assert torch.equal(a, b) and torch.allclose(a, base + 2 / 3 * torch.tensor([1.0, 0.5, 0.5]))


_TENSOR = "model.layers.0.mlp.up_proj.weight"


def _value(p, shape, g):
    """A parameter's value for a call: a file parameter's is the model's side tensor."""
    if p.file is not None:
        return torch.rand(p.file.shape(_TENSOR, shape), generator=g).add_(0.1)
    return p.default if p.default is not None else 0.5


def test_no_method_changes_its_inputs():
    """Methods are pure: the engine may hand the same tensor to several roles (on_missing:
    base, masks reading the base), so an in-place change to an input would corrupt others."""
    from neuroloc_cli.methods import METHODS

    g = torch.Generator().manual_seed(0)
    for name, method in METHODS.items():
        # role methods get two languages; other methods one or two models
        roles = [r for r in method.roles for _ in range(2 if r == "languages" else 1)]
        n_models = len(roles) or max(method.min_models, 1 if method.max_models == 1 else 2)
        base = torch.randn(6, 5, generator=g)
        tensors = [base + 0.1 * torch.randn(6, 5, generator=g) for _ in range(n_models)]
        whole = {p.name: _value(p, tuple(base.shape), g) for p in method.params if not p.per_model}
        per_model = [{p.name: _value(p, tuple(base.shape), g) for p in method.params if p.per_model} for _ in tensors]
        side = [v for m in per_model for v in m.values() if isinstance(v, torch.Tensor)]
        before = [base.clone()] + [t.clone() for t in tensors] + [t.clone() for t in side]
        context = {c: {"in_t": True, "name": _TENSOR}[c] for c in method.context} or None
        method(base, tensors, whole, per_model, torch.Generator().manual_seed(1), context, roles=roles)
        assert all(torch.equal(x, y) for x, y in zip(before, [base] + tensors + side)), name
