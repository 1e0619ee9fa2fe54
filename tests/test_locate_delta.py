"""`neuroloc locate delta` (MAET Eq. 1) against importances computed here from the formula."""

from __future__ import annotations

import re

import pytest
import torch

from neuroloc_cli.locate.select import global_threshold
from neuroloc_cli.masks import Mask
from neuroloc_cli.synthetic import build_checkpoint, tiny_config
from tests.helpers import load_all

# The units of each architecture, written out from the definitions (not from the code):
# row = output rows of [out, in] weights (GPT-2 Conv1D: columns) + bias; ffn = MLP neurons.
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
FFN = {
    "llama": {"mlp.gate_proj.weight": 0, "mlp.up_proj.weight": 0, "mlp.down_proj.weight": 1},
    "qwen2": {"mlp.gate_proj.weight": 0, "mlp.up_proj.weight": 0, "mlp.down_proj.weight": 1},
    "gpt2": {"mlp.c_fc.weight": 1, "mlp.c_fc.bias": 0, "mlp.c_proj.weight": 0},
}


def _in_block(name: str) -> bool:
    return ".layers." in name or name.startswith(("transformer.h.", "h."))


def _row_importance(base, ft, keep=lambda name: True):
    """{weight name: (axis, ‖Δ row‖ including its bias entry)} for every 2-D weight `keep`
    accepts (by default all of them: token rows of the embedding and head are rows too)."""
    out = {}
    for name, w in base.items():
        if not keep(name) or w.dim() < 2:
            continue
        axis = 1 if name.endswith(CONV1D) else 0
        d = ft[name].double() - w.double()
        sq = d.square().sum(dim=1 - axis)
        bias = name[: -len("weight")] + "bias"
        if bias in base:
            sq = sq + (ft[bias].double() - base[bias].double()).square()
        out[name] = (axis, sq.sqrt())
    return out


def _ffn_importance(base, ft, arch):
    out = {}
    for prefix in sorted({re.match(r"(.*?\.(?:layers|h)\.\d+\.)", n).group(1) for n in base if _in_block(n)}):
        sq = 0
        for kind, axis in FFN[arch].items():
            d = ft[prefix + kind].double() - base[prefix + kind].double()
            sq = sq + (d.square().sum(dim=1 - axis) if d.dim() == 2 else d.square())
        out[prefix] = sq.sqrt()
    return out


def _check_top(selected: torch.Tensor, importance: torch.Tensor, share: float):
    """Exactly int(share·n) selected (mergekit's rule, as every share in neuroloc), and none
    unselected more important than a selected one."""
    assert int(selected.sum()) == int(share * importance.numel())
    if selected.any() and (~selected).any():
        assert importance[selected].min() >= importance[~selected].max()


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_row_locate_matches_eq1(zoo, cli, tmp_path, arch, scope):
    fam = zoo.get(arch)
    out = tmp_path / "m.safetensors"
    r = cli("locate", "delta", fam.base, fam.ft1, "--top", "0.1", "--scope", scope, "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    mask, base, ft = Mask.load(out), load_all(fam.base), load_all(fam.ft1)
    imp = _row_importance(base, ft)
    assert {n for n in mask.entries if n.endswith("weight")} == set(imp)
    for name, (axis, _) in imp.items():
        assert mask.entries[name].axis == axis
        bias = name[: -len("weight")] + "bias"
        if bias in base:  # a bias entry follows its weight's rows
            assert torch.equal(mask.entries[bias].selected, mask.entries[name].selected)
    if scope == "global":
        _check_top(torch.cat([mask.entries[n].selected for n in imp]), torch.cat([v for _, v in imp.values()]), 0.1)
    else:
        for name, (_, v) in imp.items():
            _check_top(mask.entries[name].selected, v, 0.1)
    assert r.json()["selected_units"] == sum(int(mask.entries[n].selected.sum()) for n in imp)


@pytest.mark.parametrize(
    "flags,keep",
    [
        (["--include", "*.layers.*"], _in_block),
        (["--exclude", "embed_tokens", "--exclude", "lm_head.*"], lambda n: "embed_tokens" not in n and not n.startswith("lm_head.")),
        (["--include", "*embed*", "--include", "lm_head.weight"], lambda n: "embed" in n or n == "lm_head.weight"),
    ],
    ids=["blocks only", "without token rows", "token rows only"],
)
def test_row_locate_include_and_exclude(zoo, cli, tmp_path, flags, keep):
    fam = zoo.get("llama")
    out = tmp_path / "m.safetensors"
    r = cli("locate", "delta", fam.base, fam.ft1, "--top", "0.1", *flags, "-o", out)
    assert r.exit_code == 0, r.stderr
    mask, base, ft = Mask.load(out), load_all(fam.base), load_all(fam.ft1)
    imp = _row_importance(base, ft, keep)
    assert set(mask.entries) == set(imp)
    _check_top(torch.cat([mask.entries[n].selected for n in imp]), torch.cat([v for _, v in imp.values()]), 0.1)
    assert mask.provenance["tensors"]["include" if "--include" in flags else "exclude"] == flags[1::2]


def test_filters_that_leave_nothing_are_a_usage_error(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    r = cli("locate", "delta", fam.base, fam.ft1, "--include", "nothing*", "-o", tmp_path / "m.safetensors")
    assert r.exit_code == 2 and r.stderr.startswith("error: --include/--exclude leave no tensor to rank at row granularity")
    assert not (tmp_path / "m.safetensors").exists()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_ffn_locate_matches_eq1(zoo, cli, tmp_path, arch, scope):
    fam = zoo.get(arch)
    out = tmp_path / "m.safetensors"
    r = cli("locate", "delta", fam.base, fam.ft1, "--top", "0.05", "--granularity", "ffn", "--scope", scope, "-o", out)
    assert r.exit_code == 0, r.stderr
    mask, base, ft = Mask.load(out), load_all(fam.base), load_all(fam.ft1)
    imp = _ffn_importance(base, ft, arch)
    assert mask.granularity == "ffn"
    selections = {}
    for prefix in imp:
        sels = [mask.entries[prefix + kind] for kind in FFN[arch]]
        assert [e.axis for e in sels] == list(FFN[arch].values())
        assert all(torch.equal(e.selected, sels[0].selected) for e in sels)
        selections[prefix] = sels[0].selected
        if scope == "tensor":
            _check_top(selections[prefix], imp[prefix], 0.05)
    if scope == "global":
        _check_top(torch.cat(list(selections.values())), torch.cat(list(imp.values())), 0.05)


@pytest.mark.parametrize("scope", ["global", "tensor"])
def test_element_locate_matches_eq1(zoo, cli, tmp_path, scope):
    fam = zoo.get("mistral")
    out = tmp_path / "m.safetensors"
    r = cli("locate", "delta", fam.base, fam.ft1, "--top", "0.05", "--granularity", "element", "--scope", scope, "-o", out)
    assert r.exit_code == 0, r.stderr
    mask, base, ft = Mask.load(out), load_all(fam.base), load_all(fam.ft1)
    names = [n for n in base if _in_block(n)]
    assert set(mask.entries) == set(names)
    imp = {n: (ft[n].double() - base[n].double()).abs().reshape(-1) for n in names}
    sel = {n: mask.entries[n].selected.reshape(-1) for n in names}
    if scope == "global":
        _check_top(torch.cat([sel[n] for n in names]), torch.cat([imp[n] for n in names]), 0.05)
    else:
        for n in names:
            _check_top(sel[n], imp[n], 0.05)


def test_global_threshold_refines_within_its_memory_cap():
    gen = torch.Generator().manual_seed(0)
    # Many ties (values rounded to 1/64) and a long tail, split over tensors of several sizes.
    chunks = [(torch.randn(n, generator=gen).abs() * 3).mul(64).round().div(64) for n in (1000, 257, 4000, 33)]
    values = torch.cat(chunks)
    for k in (1, 17, 500, values.numel()):
        t = global_threshold(lambda: iter(chunks), k, cap=40)
        expected = values.sort(descending=True).values[k - 1]
        assert t.value == float(expected)
        assert t.greater == int((values > expected).sum())
    assert global_threshold(lambda: iter(chunks), 500, cap=40).passes > 2  # refined, not collected at once


def test_locate_accepts_a_delta_checkpoint(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    assert cli("delta", fam.base, fam.ft1, "-o", tmp_path / "d").exit_code == 0
    a, b = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    assert cli("locate", "delta", fam.base, fam.ft1, "-o", a).exit_code == 0
    assert cli("locate", "delta", fam.base, tmp_path / "d", "-o", b).exit_code == 0
    ma, mb = Mask.load(a), Mask.load(b)
    assert all(torch.equal(ma.entries[n].selected, mb.entries[n].selected) for n in ma.entries)


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--top", "0"], 2, "--top must be a share in (0, 1], got 0.0"),
        (["--granularity", "neuron"], 2, "--granularity must be one of row, ffn, element, got 'neuron'"),
        (["--scope", "layer"], 2, "--scope must be one of global, tensor, got 'layer'"),
    ],
)
def test_locate_refuses_bad_options(zoo, cli, tmp_path, args, code, message):
    fam = zoo.get("llama")
    r = cli("locate", "delta", fam.base, fam.ft1, "-o", tmp_path / "m.safetensors", *args)
    assert r.exit_code == code
    assert message in r.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_locate_refuses_another_architecture_naming_the_tensor(zoo, cli, tmp_path):
    r = cli("locate", "delta", zoo.get("llama").base, zoo.get("gpt2").ft1, "-o", tmp_path / "m.safetensors")
    assert r.exit_code == 3
    assert "tensor model.embed_tokens.weight is missing" in r.stderr
    other = build_checkpoint(tiny_config("llama", hidden=32), tmp_path / "small", tokenizer=False)
    r = cli("locate", "delta", zoo.get("llama").base, other, "-o", tmp_path / "m.safetensors")
    assert r.exit_code == 3
    assert "tensor model.embed_tokens.weight has shape [512, 32]" in r.stderr
    assert not (tmp_path / "m.safetensors").exists()


def test_global_element_locate_on_float32_checkpoints_selects_the_exact_share(zoo, cli, tmp_path):
    """Element locating reads each delta several times; on float32 files a read that aliased
    the file mapping used to be corrupted by the previous pass (42 % selected instead of 10 %)."""
    fam = zoo.get("llama", dtype=torch.float32)
    out = tmp_path / "m.safetensors"
    r = cli("locate", "delta", fam.base, fam.ft2, "--granularity", "element", "--top", "0.1", "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    assert doc["selected_units"] == int(0.1 * doc["units"])  # the one share rule (ops.sparsify.share_count)
    r = cli("locate", "delta", fam.base, fam.base, "--granularity", "element", "--top", "0.1", "-o", tmp_path / "z.safetensors")
    assert r.exit_code == 0, r.stderr
