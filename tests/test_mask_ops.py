"""Mask set operations, overlap and stats against Python set arithmetic on the indices."""

from __future__ import annotations

import itertools

import pytest
import torch

from neuroloc_cli.errors import InputError
from neuroloc_cli.masks import Mask, MaskEntry
from neuroloc_cli.masks.algebra import combine, overlap
from neuroloc_cli.masks.stats import mask_stats

SHAPES = {
    "model.layers.0.mlp.up_proj.weight": (6, 4),
    "model.layers.0.mlp.down_proj.weight": (4, 6),
    "model.layers.1.self_attn.o_proj.weight": (5, 5),
}


def _random_mask(granularity: str, seed: int, names=None, axis_of=None) -> Mask:
    gen = torch.Generator().manual_seed(seed)
    entries = {}
    for name in names or SHAPES:
        shape = SHAPES[name]
        axis = None if granularity == "element" else (axis_of or {}).get(name, 0)
        n = shape if axis is None else (shape[axis],)
        entries[name] = MaskEntry(shape, axis, torch.rand(n, generator=gen) < 0.4)
    return Mask(granularity, entries, {"seed": seed})


def _elements(mask: Mask) -> set[tuple[str, tuple[int, ...]]]:
    """The selected elements as a Python set of (tensor, index) — computed by enumeration."""
    out = set()
    for name, e in mask.entries.items():
        for idx in itertools.product(*(range(s) for s in e.shape)):
            unit = idx if e.axis is None else (idx[e.axis],)
            if bool(e.selected[unit]):
                out.add((name, idx))
    return out


PAIRS = [
    ("row", "row", None),
    ("element", "element", None),
    ("row", "element", None),
    ("row", "row", {"model.layers.0.mlp.down_proj.weight": 1}),
]


@pytest.mark.parametrize("ga,gb,axis_b", PAIRS)
@pytest.mark.parametrize("op,py", [("union", set.__or__), ("intersect", set.__and__), ("diff", set.__sub__)])
def test_set_ops_equal_python_sets(ga, gb, axis_b, op, py):
    a = _random_mask(ga, 1)
    b = _random_mask(gb, 2, names=list(SHAPES)[1:], axis_of=axis_b)  # B lacks one tensor of A
    result = combine(op, a, b)
    assert _elements(result) == py(_elements(a), _elements(b))
    same_units = ga == gb == "row" and axis_b is None
    assert result.granularity == ("row" if same_units else "element")
    if result.granularity == "element":
        assert all(e.axis is None for e in result.entries.values())


def test_set_ops_survive_save_and_load(tmp_path):
    a, b = _random_mask("row", 3), _random_mask("element", 4)
    path = tmp_path / "u.safetensors"
    combine("union", a, b).save(path)
    assert _elements(Mask.load(path)) == _elements(a) | _elements(b)


@pytest.mark.parametrize("ga,gb,axis_b", PAIRS)
def test_overlap_is_jaccard_of_index_sets(ga, gb, axis_b):
    a, b = _random_mask(ga, 5), _random_mask(gb, 6, axis_of=axis_b)
    rows, total = overlap(a, b)
    sa, sb = _elements(a), _elements(b)
    assert total.jaccard == pytest.approx(len(sa & sb) / len(sa | sb))
    for r in rows:
        ta = {x for x in sa if x[0] == r.tensor}
        tb = {x for x in sb if x[0] == r.tensor}
        assert (r.a, r.b, r.intersection, r.union) == (len(ta), len(tb), len(ta & tb), len(ta | tb))


def test_mismatched_shapes_are_refused_naming_the_tensor():
    a = _random_mask("row", 1)
    b = Mask("row", {"model.layers.0.mlp.up_proj.weight": MaskEntry((7, 4), 0, torch.ones(7, dtype=torch.bool))})
    with pytest.raises(InputError, match=r"mask tensor model\.layers\.0\.mlp\.up_proj\.weight has shape \[6, 4\] in A but \[7, 4\] in B"):
        combine("union", a, b)
    with pytest.raises(InputError, match=r"up_proj\.weight has shape \[6, 4\] in A but \[7, 4\] in B"):
        overlap(a, b)


def test_stats_count_selected_elements_per_tensor_layer_and_kind():
    mask = _random_mask("row", 7)
    doc = mask_stats(mask)
    elements = _elements(mask)
    assert doc["selected"] == len(elements)
    assert doc["total"] == sum(h * w for h, w in SHAPES.values())
    for t in doc["tensors"]:
        assert t["selected"] == sum(1 for n, _ in elements if n == t["tensor"])
    layer0 = next(r for r in doc["layers"] if r["layer"] == "0")
    assert layer0["selected"] == sum(1 for n, _ in elements if ".layers.0." in n)
    kinds = {r["kind"]: r["selected"] for r in doc["kinds"]}
    assert kinds["self_attn.o_proj.weight"] == sum(1 for n, _ in elements if n.endswith("o_proj.weight"))


def test_cli_set_ops_overlap_and_stats(tmp_path, cli):
    a, b = _random_mask("row", 8), _random_mask("element", 9)
    pa, pb = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    a.save(pa)
    b.save(pb)
    for op, py in (("union", set.__or__), ("intersect", set.__and__), ("diff", set.__sub__)):
        r = cli("mask", op, pa, pb, "-o", tmp_path / f"{op}.safetensors", "--json")
        assert r.exit_code == 0, r.stderr
        assert r.json()["selected"] == len(py(_elements(a), _elements(b)))
        assert _elements(Mask.load(tmp_path / f"{op}.safetensors")) == py(_elements(a), _elements(b))
    r = cli("mask", "overlap", pa, pb, "--json")
    sa, sb = _elements(a), _elements(b)
    assert r.json()["jaccard"] == pytest.approx(len(sa & sb) / len(sa | sb))
    r = cli("mask", "stats", pa, "--json")
    assert r.json()["selected"] == len(sa)
    r = cli("mask", "union", pa, pb, "-o", tmp_path / "union.safetensors")
    assert r.exit_code == 4 and "union.safetensors: already exists" in r.stderr


def test_cli_refuses_a_file_that_is_not_a_mask(tmp_path, cli):
    bad = tmp_path / "x.safetensors"
    bad.write_bytes(b"not a mask")
    r = cli("mask", "stats", bad)
    assert r.exit_code == 3
    assert f"{bad}: cannot read mask" in r.stderr


def test_element_masks_stay_packed_in_memory(tmp_path):
    """An element entry holds one bit per element, loaded and combined without unpacking;
    bits past a tensor's last element never count."""
    a, b = _random_mask("element", 11), _random_mask("element", 12)
    a.save(tmp_path / "a.mask")
    loaded = Mask.load(tmp_path / "a.mask")
    for name, e in loaded.entries.items():
        n = torch.Size(SHAPES[name]).numel()
        assert e.bits.dtype == torch.uint8 and e.bits.numel() == (n + 7) // 8
        assert torch.equal(e.selected, a.entries[name].selected)
    for op, fn in (("union", set.union), ("intersect", set.intersection), ("diff", set.difference)):
        result = combine(op, loaded, b)
        assert all(e.bits.numel() == (e.units + 7) // 8 for e in result.entries.values())
        assert _elements(result) == fn(_elements(a), _elements(b))
    # 5×5 = 25 elements: the last byte has 7 unused bits; set them and they must be cleared
    bits = torch.full((4,), 0xFF, dtype=torch.uint8)
    entry = MaskEntry.from_bits((5, 5), bits)
    assert entry.selected_units == 25 and bool(entry.selected.all())
    with pytest.raises(ValueError):
        MaskEntry.from_bits((5, 5), torch.zeros(3, dtype=torch.uint8))


@pytest.mark.parametrize("shape", [(7, 5), (16, 8), (3, 3, 3), (9,)])
def test_dense_rows_equals_rows_of_dense(shape):
    g = torch.Generator().manual_seed(sum(shape))
    entry = MaskEntry(shape, None, torch.rand(shape, generator=g) > 0.5)
    for start in range(shape[0]):
        for stop in range(start + 1, shape[0] + 1):
            assert torch.equal(entry.dense_rows(start, stop), entry.dense()[start:stop]), (start, stop)
