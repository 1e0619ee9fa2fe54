"""LANDeRMT's conditional awareness routing (`runtime.routing`) and `neuroloc export-pair`.

The routed model is checked against an MLP forward written out here from the weights,
h = FFN_G(c·x) + FFN_S((1 − c)·x) with other languages' neurons left out; the exported
checkpoint, loaded with plain transformers, against the routed model; and the export bit for
bit outside the up-side rows of the kept blocks.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from neuroloc_cli.arch import layer_index
from neuroloc_cli.errors import InputError, UsageError
from neuroloc_cli.io.checkpoint import Checkpoint
from neuroloc_cli.locate.units import ffn_groups, floating
from neuroloc_cli.masks.format import layout_digest
from neuroloc_cli.runtime.model import load_model, parameter_names
from neuroloc_cli.runtime.routing import ROUTING_FILE, Routing, attach, fold
from tests.helpers import load_all

LANGS = ("de", "en", "fr")
DIRECTIONS = ("de-en", "en-de", "fr-en")


def _routing_doc(model: Path, layers: tuple[int, ...] = (1,), seed: int = 0) -> dict:
    """A routing.json for `model` as the locator writes it: per kept block about half the
    neurons general, the rest spread over three languages; a random c per direction."""
    ckpt = Checkpoint.open(model)
    g = torch.Generator().manual_seed(seed)
    blocks = {}
    for group in ffn_groups(floating(ckpt.tensors), str(model)):
        layer = layer_index(group.key + ".")
        if layer not in layers:
            continue
        perm = torch.randperm(group.size, generator=g).tolist()
        n = group.size // 2
        rest = perm[n:]
        blocks[group.key] = {
            "layer": layer,
            "size": group.size,
            "parts": [[p.name, p.axis] for p in group.parts],
            "general": sorted(perm[:n]),
            "specific": {lang: sorted(rest[i :: len(LANGS)]) for i, lang in enumerate(LANGS)},
        }
    coefficient = {d: {k: round(0.2 + 0.6 * float(torch.rand((), generator=g)), 4) for k in blocks} for d in DIRECTIONS}
    return {
        "neuroloc.kind": "landermt-routing",
        "version": 1,
        "model": str(model.resolve()),
        "model_fingerprint": ckpt.fingerprint,
        "model_layout": layout_digest({n: i.shape for n, i in ckpt.tensors.items()}),
        "template": "Translate from {src} to {tgt}: {text}",
        "languages": list(LANGS),
        "directions": list(DIRECTIONS),
        "layers": list(layers),
        "blocks": blocks,
        "coefficient": coefficient,
    }


def _finetuned(model: Path, folder: Path, doc: dict | None = None) -> Path:
    """A copy of `model` with a routing.json (as `train --method landermt` leaves it)."""
    shutil.copytree(model, folder)
    (folder / ROUTING_FILE).write_text(json.dumps(doc if doc is not None else _routing_doc(model)))
    return folder


def _sets(block: dict, direction: str) -> tuple[list[int], list[int]]:
    src, tgt = direction.split("-")
    return block["general"], sorted(set(block["specific"][src]) | set(block["specific"][tgt]))


def _reference_mlp(arch: str, mlp: torch.nn.Module, general: list[int], specific: list[int], c: float):
    """The MLP forward of Eq. 6–9 from the weights: FFN_G(c·x) + FFN_S((1 − c)·x), other
    languages' neurons absent; the down projection's bias (GPT-2) added once."""

    def sub(x: torch.Tensor, idx: list[int], scale: float) -> torch.Tensor:
        xs = scale * x
        if arch == "llama":
            a = mlp.act_fn(xs @ mlp.gate_proj.weight[idx].T) * (xs @ mlp.up_proj.weight[idx].T)
            return a @ mlp.down_proj.weight[:, idx].T
        a = mlp.act(xs @ mlp.c_fc.weight[:, idx] + mlp.c_fc.bias[idx])  # Conv1D: [in, out]
        return a @ mlp.c_proj.weight[idx, :]

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = sub(x, general, c) + sub(x, specific, 1 - c)
        return h if arch == "llama" else h + mlp.c_proj.bias

    return forward


def _reference_logits(arch: str, model, doc: dict, direction: str, ids: torch.Tensor) -> torch.Tensor:
    mlps = []
    for key, block in doc["blocks"].items():
        mlp = model.get_submodule(key)
        general, specific = _sets(block, direction)
        mlp.forward = _reference_mlp(arch, mlp, general, specific, doc["coefficient"][direction][key])
        mlps.append(mlp)
    try:
        with torch.no_grad():
            return model(ids).logits
    finally:
        for mlp in mlps:
            del mlp.forward  # the class's forward again


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


IDS = torch.randint(3, 512, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_attach_routes_as_eq_6_to_9_and_switches_and_removes(zoo, tmp_path, arch):
    fam = zoo.get(arch, dtype=torch.float32)
    doc = _routing_doc(fam.base, layers=(0, 1))
    (tmp_path / ROUTING_FILE).write_text(json.dumps(doc))
    routing = Routing.load(tmp_path / ROUTING_FILE)
    model = load_model(fam.base)
    names = parameter_names(model, Checkpoint.open(fam.base))
    plain = _logits(model, IDS)
    with attach(model, routing, "de-en", names) as hooks:
        de_en = _logits(model, IDS)
        hooks.set_direction("fr-en")
        fr_en = _logits(model, IDS)
    assert torch.equal(_logits(model, IDS), plain)  # hooks gone
    for direction, routed in (("de-en", de_en), ("fr-en", fr_en)):
        torch.testing.assert_close(routed, _reference_logits(arch, model, doc, direction, IDS), rtol=1e-5, atol=1e-5)
    assert (de_en - plain).abs().max() > 1e-2 and (de_en - fr_en).abs().max() > 1e-3  # the routing does something


def test_scales_per_neuron(tmp_path, zoo):
    fam = zoo.get("llama", dtype=torch.float32)
    doc = _routing_doc(fam.base)
    (tmp_path / ROUTING_FILE).write_text(json.dumps(doc))
    routing = Routing.load(tmp_path / ROUTING_FILE)
    key, block = next(iter(doc["blocks"].items()))
    c = doc["coefficient"]["en-de"][key]
    s = routing.scales("en-de")[key]
    assert s.dtype == torch.float32
    assert torch.all(s[block["general"]] == torch.tensor(c, dtype=torch.float32))
    assert torch.all(s[block["specific"]["de"] + block["specific"]["en"]] == torch.tensor(1 - c, dtype=torch.float32))
    assert torch.all(s[block["specific"]["fr"]] == 0)
    assert routing.pair("en-de") == ("en", "de") and routing.sha256 == hashlib.sha256((tmp_path / ROUTING_FILE).read_bytes()).hexdigest()


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_exported_pair_loads_with_transformers_as_the_routed_model(zoo, cli, tmp_path, arch):
    from transformers import AutoModelForCausalLM

    fam = zoo.get(arch, dtype=torch.float32)
    doc = _routing_doc(fam.base, layers=(0, 1), seed=1)
    ft = _finetuned(fam.base, tmp_path / "ft", doc)
    r = cli("export-pair", ft, "--pair", "en-de", "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.stderr
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "out"), dtype=torch.float32)
    model = load_model(ft)
    with attach(model, Routing.load(ft / ROUTING_FILE), "en-de", parameter_names(model, Checkpoint.open(ft))):
        routed = _logits(model, IDS)
    torch.testing.assert_close(_logits(exported, IDS), routed, rtol=1e-5, atol=1e-5)
    # and `fold` on the whole checkpoint is what the streamed export wrote, bit for bit
    folded = fold(load_all(ft), Routing.load(ft / ROUTING_FILE), "en-de")
    out = load_all(tmp_path / "out")
    assert folded.keys() == out.keys() and all(torch.equal(folded[n], out[n]) for n in out)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_gradients_through_the_hooks_are_those_of_the_folded_weights(zoo, tmp_path, arch):
    """d/dW of the routed model = s ⊙ d/dW' of the folded one (W' = s W), d/db = [s ≠ 0] ⊙ d/db':
    what training through `attach` updates is what `fold` later writes."""
    fam = zoo.get(arch, dtype=torch.float32)
    (tmp_path / ROUTING_FILE).write_text(json.dumps(_routing_doc(fam.base, seed=3)))
    routing = Routing.load(tmp_path / ROUTING_FILE)
    routed, folded = load_model(fam.base), load_model(fam.base)
    names = parameter_names(routed, Checkpoint.open(fam.base))
    params = dict(folded.named_parameters())
    with torch.no_grad():
        for name, t in fold({n: params[p].detach().clone() for n, p in names.items()}, routing, "de-en").items():
            params[names[name]].copy_(t)
    with attach(routed, routing, "de-en", names):
        routed(IDS, labels=IDS).loss.backward()
    folded(IDS, labels=IDS).loss.backward()
    grads = {n: p.grad for n, p in routed.named_parameters()}
    scales = routing.scales("de-en")
    for key, block in routing.blocks.items():
        for name, axis in block.parts[:-1]:
            shape = [1] * params[names[name]].dim()
            shape[axis] = -1
            s = scales[key].reshape(shape)
            want = params[names[name]].grad * (s != 0 if name.endswith(".bias") else s)
            torch.testing.assert_close(grads[names[name]], want, rtol=1e-4, atol=1e-7)
            assert torch.all(grads[names[name]][(s == 0).expand_as(want)] == 0), name


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int16) if t.element_size() == 2 else t.view(torch.int32)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_export_is_bit_exact_outside_the_up_side_rows(zoo, cli, tmp_path, arch):
    fam = zoo.get(arch)  # bfloat16, sharded
    doc = _routing_doc(fam.base, layers=(1,), seed=2)
    ft = _finetuned(fam.base, tmp_path / "ft", doc)
    r = cli("export-pair", ft, "--pair", "de-en", "-o", tmp_path / "out", "--max-shard-size", "60000", "--json")
    assert r.exit_code == 0, r.stderr
    assert len(r.json()["shards"]) > 1
    src, out = load_all(ft), load_all(tmp_path / "out")
    assert out.keys() == src.keys() and all(out[n].dtype == src[n].dtype for n in src)
    expected_changed = set()
    for key, block in doc["blocks"].items():
        general, specific = _sets(block, "de-en")
        c = doc["coefficient"]["de-en"][key]
        s = torch.zeros(block["size"])
        s[general], s[specific] = c, 1 - c
        for name, axis in block["parts"][:-1]:
            expected_changed.add(name)
            w, o = src[name], out[name]
            shape = [1] * w.dim()
            shape[axis] = -1
            sv = s.reshape(shape)
            scaled = w if name.endswith(".bias") else (w.float() * sv).to(w.dtype)  # a bias is kept, not scaled
            want = torch.where(sv != 0, scaled, torch.zeros_like(w))  # switched-off neurons: +0.0
            assert torch.equal(_bits(o), _bits(want)), name
    for name in src.keys() - expected_changed:
        assert torch.equal(_bits(out[name]), _bits(src[name])), name
    for side in ("config.json", "tokenizer.json"):
        assert (tmp_path / "out" / side).read_bytes() == (ft / side).read_bytes()
    assert not (tmp_path / "out" / ROUTING_FILE).exists()
    prov = json.loads((tmp_path / "out" / "neuroloc.json").read_text())
    assert prov["command"] == "export-pair" and prov["pair"] == "de-en"
    assert prov["routing"]["sha256"] == hashlib.sha256((ft / ROUTING_FILE).read_bytes()).hexdigest()


# -- bad inputs -------------------------------------------------------------------------------


def _edit(path, value):
    """A function that sets (or, with value None, deletes) the key at `path` of a document."""

    def apply(doc):
        *head, last = path
        for k in head:
            doc = doc[k]
        if value is None:
            del doc[last]
        else:
            doc[last] = value(doc[last]) if callable(value) else value

    return apply


BLOCK = "model.layers.1.mlp"


def _also_general(doc):
    block = doc["blocks"][BLOCK]
    block["specific"]["de"].append(block["general"][0])


BAD = [
    (_edit(["languages"], None), "key languages: missing"),
    (_edit(["neuroloc.kind"], "lape-mask"), "key neuroloc.kind: is 'lape-mask', not 'landermt-routing' (not a LANDeRMT routing file)"),
    (_edit(["version"], 2), "key version: is 2; this neuroloc reads version 1 (upgrade neuroloc)"),
    (_edit(["layers"], "1"), "key layers: expected a list, got str"),
    (_edit(["blocks", BLOCK, "size"], True), f"key blocks.{BLOCK}.size: expected an integer, got bool"),
    (
        _edit(["blocks", BLOCK, "general"], lambda g: [*g, 128]),
        f"key blocks.{BLOCK}.general: neuron index 128 out of range for a block of 128",
    ),
    (_also_general, f"key blocks.{BLOCK}.specific.de: neuron "),
    (_edit(["blocks", BLOCK, "general"], lambda g: g[1:]), f"key blocks.{BLOCK}: 1 neuron(s) neither general nor specific (first: "),
    (_edit(["blocks", BLOCK, "specific", "xx"], []), f"key blocks.{BLOCK}.specific: 'xx' is not one of the languages (de, en, fr)"),
    (_edit(["directions"], ["de-en", "de-it"]), "key directions: 'de-it' is not SOURCE-TARGET of two of the languages (de, en, fr)"),
    (_edit(["coefficient", "en-de"], None), "key coefficient.en-de: missing"),
    (_edit(["coefficient", "en-de", BLOCK], 1.5), f"key coefficient.en-de.{BLOCK}: 1.5 is not in [0, 1]"),
    (
        _edit(["blocks", BLOCK, "parts"], lambda p: p[-1:]),
        f"key blocks.{BLOCK}.parts: expected the up-side weights, then the down projection",
    ),
]


@pytest.mark.parametrize("edit,message", BAD)
def test_bad_routing_files_are_one_line_naming_file_and_key(zoo, tmp_path, edit, message):
    doc = copy.deepcopy(_routing_doc(zoo.get("llama", dtype=torch.float32).base))
    edit(doc)
    file = tmp_path / ROUTING_FILE
    file.write_text(json.dumps(doc))
    with pytest.raises(InputError) as e:
        Routing.load(file)
    text = str(e.value)
    assert "\n" not in text and text.startswith(f"{file}: key ")
    assert text.startswith(f"{file}: {message}"), text
    if edit is _also_general:
        assert text.endswith(" is also general")


def test_unknown_direction_and_a_routing_for_another_model(zoo, tmp_path):
    llama, gpt2 = zoo.get("llama", dtype=torch.float32), zoo.get("gpt2", dtype=torch.float32)
    (tmp_path / ROUTING_FILE).write_text(json.dumps(_routing_doc(llama.base)))
    routing = Routing.load(tmp_path / ROUTING_FILE)
    with pytest.raises(UsageError, match=r"no direction 'zz-qq' \(directions: de-en, en-de, fr-en\)"):
        routing.scales("zz-qq")
    model = load_model(gpt2.base)
    with pytest.raises(InputError, match=f"block {BLOCK}: tensor model.layers.1.mlp.gate_proj.weight is not in the model"):
        attach(model, routing, "de-en", parameter_names(model, Checkpoint.open(gpt2.base)))


def test_export_pair_bad_inputs_write_nothing(zoo, cli, tmp_path):
    fam = zoo.get("llama", dtype=torch.float32)
    out = tmp_path / "out"

    r = cli("export-pair", fam.base, "--pair", "de-en", "-o", out)
    assert (r.exit_code, r.stderr.strip()) == (
        3,
        f"error: {fam.base}: has no routing.json (give the folder written by train --method landermt)",
    )

    ft = _finetuned(fam.base, tmp_path / "ft")
    r = cli("export-pair", ft, "--pair", "de-enn", "-o", out)
    assert r.exit_code == 2 and r.stderr.strip() == (
        f"error: {ft / ROUTING_FILE}: no direction 'de-enn' (did you mean \"de-en\"?) (directions: de-en, en-de, fr-en)"
    )

    other = _routing_doc(zoo.get("gpt2", dtype=torch.float32).base)
    ft2 = _finetuned(fam.base, tmp_path / "ft2", {**_routing_doc(fam.base), "model_layout": other["model_layout"]})
    r = cli("export-pair", ft2, "--pair", "de-en", "-o", out)
    assert r.exit_code == 3 and r.stderr.startswith(
        f"error: {ft2 / ROUTING_FILE}: made for another model layout ({other['model_layout']}; "
    )
    assert len(r.stderr.strip().splitlines()) == 1

    out.mkdir()
    r = cli("export-pair", ft, "--pair", "de-en", "-o", out)
    assert r.exit_code == 4 and "already exists" in r.stderr
    assert list(out.iterdir()) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["ft", "ft2", "out"]
