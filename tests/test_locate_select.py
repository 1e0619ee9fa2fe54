"""Score, then select: `neuroloc locate select` turns importance files into the masks the
locators make, and its bottom, random and difference picks are exact."""

from __future__ import annotations

import pytest
import torch

from neuroloc_cli.errors import InputError, UsageError
from neuroloc_cli.masks import Mask
from neuroloc_cli.masks.importance import Importance, ImportanceMeta, write_importance
from neuroloc_cli.synthetic import SENTENCES

SHAPES = {
    "model.layers.0.self_attn.o_proj.weight": (8, 8),
    "model.layers.0.mlp.gate_proj.weight": (12, 8),
    "model.layers.0.mlp.up_proj.weight": (12, 8),
    "model.layers.0.mlp.down_proj.weight": (8, 12),
    "model.layers.1.mlp.gate_proj.weight": (12, 8),
    "model.layers.1.mlp.up_proj.weight": (12, 8),
    "model.layers.1.mlp.down_proj.weight": (8, 12),
}


def _scores(seed: int) -> dict[str, torch.Tensor]:
    """Distinct positive values, so that every top and bottom set is unique."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(s, generator=gen) + 1e-3 for n, s in SHAPES.items()}


def _file(tmp_path, name: str, tensors, aggregate: str = "sum"):
    path = tmp_path / f"{name}.safetensors"
    write_importance(path, tensors, ImportanceMeta("test", aggregate, name))
    return path


def _same(a: Mask, b: Mask) -> bool:
    return a.granularity == b.granularity and a.entries.keys() == b.entries.keys() and all(a.entries[n] == b.entries[n] for n in a.entries)


@pytest.mark.parametrize(
    "granularity,scope,top", [("row", "global", 0.05), ("row", "tensor", 0.1), ("ffn", "tensor", 0.2), ("element", "global", 0.02)]
)
def test_delta_importance_reselects_to_the_same_mask(zoo, cli, tmp_path, granularity, scope, top):
    fam = zoo.get("llama")
    imp, direct = tmp_path / "delta.imp", tmp_path / "direct.mask"
    flags = ["--top", top, "--granularity", granularity, "--scope", scope]
    r = cli("locate", "delta", fam.base, fam.ft1, "-o", direct, "--importance", imp, *flags)
    assert r.exit_code == 0, r.stderr
    meta = Importance.open(imp).meta
    assert (meta.score, meta.aggregate) == ("delta", "l2")
    r = cli("locate", "select", imp, "-o", tmp_path / "again.mask", *flags)
    assert r.exit_code == 0, r.stderr
    assert _same(Mask.load(direct), Mask.load(tmp_path / "again.mask"))


def test_gradient_regions_are_selections_of_their_importance(zoo, cli, tmp_path):
    """core = top of the summed files; mono-en = top of en minus the other tops."""
    base = zoo.get("llama").base
    data = []
    for i, lang in enumerate(("en", "es", "fr")):
        (tmp_path / f"{lang}.txt").write_text("\n\n".join([SENTENCES[i], SENTENCES[i + 3]] * 20))
        data += ["--data", f"{lang}={tmp_path / f'{lang}.txt'}"]
    out = tmp_path / "regions"
    r = cli("locate", "gradient", base, *data, "--samples", 4, "--seq-len", 16, "--batch-size", 2, "--top", 0.05, "-o", out)
    assert r.exit_code == 0, r.stderr
    imp = sorted((out / "importance").glob("*.safetensors"))
    assert cli("locate", "select", *imp, "--top", 0.05, "-o", tmp_path / "core.mask").exit_code == 0
    assert _same(Mask.load(tmp_path / "core.mask"), Mask.load(out / "core.safetensors"))
    assert cli("locate", "select", *imp, "--top", 0.05, "--bottom", "-o", tmp_path / "bottom.mask").exit_code == 0
    assert _same(Mask.load(tmp_path / "bottom.mask"), Mask.load(out / "bottom.safetensors"))
    minus = ["--minus", out / "top-es.safetensors", "--minus", out / "top-fr.safetensors"]
    assert (
        cli("locate", "select", out / "importance" / "en.safetensors", "--top", 0.05, *minus, "-o", tmp_path / "mono.mask").exit_code == 0
    )
    assert _same(Mask.load(tmp_path / "mono.mask"), Mask.load(out / "mono-en.safetensors"))


@pytest.mark.parametrize("scope", ["tensor", "global"])
def test_bottom_is_the_exact_lowest_share(cli, tmp_path, scope):
    scores = _scores(0)
    path = _file(tmp_path, "s", scores)
    r = cli("locate", "select", path, "--top", 0.1, "--scope", scope, "--bottom", "-o", tmp_path / "b.mask", "--json")
    assert r.exit_code == 0, r.stderr
    mask = Mask.load(tmp_path / "b.mask")
    if scope == "tensor":
        for n, t in scores.items():
            k = int(0.1 * t.numel())
            want = set(torch.argsort(t.reshape(-1).double())[:k].tolist())
            assert set(mask.entries[n].selected.reshape(-1).nonzero().view(-1).tolist()) == want
    else:
        flat = torch.cat([t.reshape(-1).double() for t in scores.values()])
        k = int(0.1 * flat.numel())
        threshold = torch.sort(flat).values[k - 1]
        for n, t in scores.items():
            assert torch.equal(mask.entries[n].selected, t.double() <= threshold)
        assert r.json()["selected"] == k


def test_random_keeps_the_top_count_per_tensor_and_follows_the_seed(cli, tmp_path):
    path = _file(tmp_path, "s", _scores(1))
    masks = {}
    for name, flags in {"top": [], "r0": ["--random"], "r0b": ["--random"], "r1": ["--random", "--seed", 1]}.items():
        assert cli("locate", "select", path, "--top", 0.07, "--scope", "global", *flags, "-o", tmp_path / f"{name}.mask").exit_code == 0
        masks[name] = Mask.load(tmp_path / f"{name}.mask")
    for n in SHAPES:
        counts = {name: m.entries[n].selected_units for name, m in masks.items()}
        assert len(set(counts.values())) == 1, (n, counts)
    assert _same(masks["r0"], masks["r0b"]) and not _same(masks["r0"], masks["r1"])
    assert not _same(masks["r0"], masks["top"])


def test_several_files_are_summed(cli, tmp_path):
    a, b = _scores(2), _scores(3)
    fa, fb = _file(tmp_path, "a", a), _file(tmp_path, "b", b)
    summed = _file(tmp_path, "ab", {n: a[n] + b[n] for n in a})
    for granularity in ("element", "ffn"):
        flags = ["--top", 0.1, "--granularity", granularity]
        assert cli("locate", "select", fa, fb, *flags, "-o", tmp_path / f"two-{granularity}.mask").exit_code == 0
        assert cli("locate", "select", summed, *flags, "-o", tmp_path / f"one-{granularity}.mask").exit_code == 0
        assert _same(Mask.load(tmp_path / f"two-{granularity}.mask"), Mask.load(tmp_path / f"one-{granularity}.mask"))


def test_ffn_units_sum_their_slices(cli, tmp_path):
    """An FFN neuron's score is its gate row + up row + down column, summed."""
    scores = _scores(4)
    path = _file(tmp_path, "s", scores)
    assert cli("locate", "select", path, "--top", 0.25, "--granularity", "ffn", "-o", tmp_path / "f.mask").exit_code == 0
    mask = Mask.load(tmp_path / "f.mask")
    for layer in (0, 1):
        p = f"model.layers.{layer}.mlp."
        unit = scores[p + "gate_proj.weight"].double().sum(1) + scores[p + "up_proj.weight"].double().sum(1)
        unit += scores[p + "down_proj.weight"].double().sum(0)
        want = set(torch.topk(unit, 3).indices.tolist())
        for part in ("gate_proj", "up_proj", "down_proj"):
            assert set(mask.entries[p + part + ".weight"].selected.nonzero().view(-1).tolist()) == want


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda tmp: [_file(tmp, "a", _scores(0)), _file(tmp, "b", _scores(0), aggregate="l2")], "aggregates units by"),
        (lambda tmp: [_file(tmp, "a", _scores(0)), _file(tmp, "b", dict(list(_scores(0).items())[:3]))], "score different tensors"),
    ],
    ids=["aggregate", "tensors"],
)
def test_files_that_cannot_be_summed_are_refused(cli, tmp_path, make, message):
    r = cli("locate", "select", *make(tmp_path), "-o", tmp_path / "x.mask")
    assert r.exit_code == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) <= 2
    assert not (tmp_path / "x.mask").exists()


def test_a_mask_is_not_an_importance_file(cli, tmp_path):
    path = _file(tmp_path, "s", _scores(0))
    assert cli("locate", "select", path, "-o", tmp_path / "m.mask").exit_code == 0
    r = cli("locate", "select", tmp_path / "m.mask", "-o", tmp_path / "x.mask")
    assert r.exit_code == 3 and "not a neuroloc importance file (its kind is 'mask')" in r.stderr  # an input error
    r = cli("locate", "select", path, "--bottom", "--random", "-o", tmp_path / "x.mask")
    assert r.exit_code == 2 and "--bottom and --random" in r.stderr
    assert not (tmp_path / "x.mask").exists()


def test_per_neuron_scores_are_refused(cli, tmp_path):
    """LAPE's files hold one probability per FFN neuron under the block's key: not elements."""
    path = tmp_path / "lape.safetensors"
    write_importance(
        path, {"model.layers.0.mlp": torch.rand(12)}, ImportanceMeta("activation-probability", "sum", "en", {"granularity": "ffn"})
    )
    r = cli("locate", "select", path, "-o", tmp_path / "x.mask")
    assert r.exit_code == 3 and "one score per ffn unit" in r.stderr


def test_every_locator_lists_its_options_and_validates_them(cli):
    """`locate list` is built from the options models; each locator's command takes exactly
    those flags (so a field without a flag, or a flag without a field, fails here)."""
    from typer.main import get_command

    from neuroloc_cli.cli.locate_cmds import locate_app
    from neuroloc_cli.locate import LOCATORS

    r = cli("locate", "list", "--json")
    assert r.exit_code == 0, r.stderr
    docs = {d["name"]: d for d in r.json()}
    assert set(docs) == {"awareness", "delta", "gradient", "lape", "select"}
    group = get_command(locate_app)
    for name, doc in docs.items():
        assert doc["reads"] and doc["summary"]
        fields = {o["flag"] for o in doc["options"]}
        assert "--cap" not in fields and "--pick" not in fields  # internal settings are not advertised
        params = group.commands[name].params
        flags = {opt for p in params for opt in p.opts if opt.startswith("--")}
        positional = {p.name.upper() for p in params if not p.opts[0].startswith("-")}
        assert fields <= flags | positional, (name, fields - flags - positional)
    with pytest.raises(UsageError, match="--top must be a share"):
        LOCATORS.get("gradient").parse(model="m", data=("en=a", "es=b"), top=2)
    with pytest.raises(UsageError, match="--batch-size: Input should be greater than or equal to 1"):
        LOCATORS.get("lape").parse(model="m", data=("en=a", "es=b"), batch_size=0)
    with pytest.raises(UsageError, match="--data: 1 language given"):
        LOCATORS.get("lape").parse(model="m", data=("en=a",))


def test_non_finite_scores_are_refused(cli, tmp_path):
    scores = _scores(0)
    scores["model.layers.0.mlp.up_proj.weight"][3, 2] = float("nan")
    with pytest.raises(InputError, match=r"importance of model.layers.0.mlp.up_proj.weight has 1 non-finite"):
        _file(tmp_path, "s", scores)
    assert not (tmp_path / "s.safetensors").exists()  # atomic: nothing half-written
