"""`locate awareness` (LANDeRMT, Zhu et al. 2024): the awareness against autograd computed here
and against the loss change of zeroing a neuron, the layer choice and the general/specific
split on planted numbers, routing.json against its schema and its coefficients recomputed from
the importance files, and the command end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neuroloc_cli.errors import UsageError
from neuroloc_cli.io.checkpoint import Checkpoint
from neuroloc_cli.locate import LOCATORS
from neuroloc_cli.locate import awareness as aw
from neuroloc_cli.locate.units import Part, UnitGroup, ffn_groups, floating
from neuroloc_cli.masks import Mask
from neuroloc_cli.masks.format import layout_digest
from neuroloc_cli.masks.importance import Importance
from neuroloc_cli.ops.sparsify import share_count
from neuroloc_cli.runtime.prompts import IGNORE, TEMPLATES, pair_rows, parse_pairs, read_pairs
from neuroloc_cli.runtime.routing import Routing
from neuroloc_cli.synthetic import SENTENCES, build_checkpoint, tiny_config

EXAMPLES, SEQ_LEN, BATCH = 5, 128, 2  # a last, partial batch


def _write_pairs(folder, directions=("de-en", "en-de"), n=EXAMPLES):
    paths = {}
    for k, d in enumerate(directions):
        lines = [json.dumps({"source": SENTENCES[(i + k) % 6], "target": SENTENCES[(i + k + 2) % 6]}) for i in range(n)]
        paths[d] = folder / f"dev.{d}.jsonl"
        paths[d].write_text("\n".join(lines) + "\n")
    return paths


@pytest.fixture
def pairs(tmp_path):
    return _write_pairs(tmp_path)


@pytest.fixture(scope="module")
def deep(tmp_path_factory):
    """A 4-layer Llama: enough layers to choose 2 by score."""
    return build_checkpoint(tiny_config("llama", layers=4), tmp_path_factory.mktemp("deep") / "base", seed=3, dtype=torch.float32)


def _groups(sizes=(10, 10, 10)):
    groups, shapes = [], {"model.embed_tokens.weight": (7, 4)}
    for b, size in enumerate(sizes):
        key = f"model.layers.{b}.mlp"
        parts = (Part(f"{key}.gate_proj.weight", 0), Part(f"{key}.up_proj.weight", 0), Part(f"{key}.down_proj.weight", 1))
        shapes.update({parts[0].name: (size, 4), parts[1].name: (size, 4), parts[2].name: (4, size)})
        groups.append(UnitGroup(key, size, parts))
    return groups, shapes


# -- the awareness against autograd -----------------------------------------------------------


def _reference(model_path, paths, arch):
    """Per direction and side, Σ|h g| and Σ h g by `retain_grad` on h, with the weights requiring
    grad and `backward` of the mean NLL over the batch's targets; rows at full length; and the
    mean activation per layer over the batches."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    blocks = model.model.layers if arch == "llama" else model.transformer.h
    downs = [b.mlp.down_proj if arch == "llama" else b.mlp.c_proj for b in blocks]
    held = {}

    def keep(j):
        def pre(module, args):
            args[0].retain_grad()
            held[j] = args[0]

        return pre

    hooks = [m.register_forward_pre_hook(keep(j)) for j, m in enumerate(downs)]
    sums, tokens, acts = {}, {}, []
    for pair in parse_pairs([f"{d}={p}" for d, p in paths.items()]):
        rows = pair_rows(pair, read_pairs(pair.path), tok, TEMPLATES["flan-following"], SEQ_LEN)
        for start in range(0, EXAMPLES, BATCH):
            ids, labels, mask = (t[start : start + BATCH] for t in (rows.input_ids, rows.labels, rows.attention_mask))
            model.zero_grad()
            logits = model(input_ids=ids, attention_mask=mask).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
            loss.backward()
            side = {"source": (mask == 1) & (labels == IGNORE), "target": labels != IGNORE}
            acts.append([float(held[j].detach()[mask == 1].double().mean()) for j in range(len(downs))])
            for name, where in side.items():
                tokens[(pair.name, name)] = tokens.get((pair.name, name), 0) + int(where.sum())
                for j in range(len(downs)):
                    hg = (held[j] * held[j].grad)[where].double()  # [positions, p]
                    a, s = sums.get((pair.name, name, j), (0, 0))
                    sums[(pair.name, name, j)] = (a + hg.abs().sum(0), s + hg.sum(0))
    for h in hooks:
        h.remove()
    return sums, tokens, np.mean(acts, axis=0)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_awareness_equals_autograd(zoo, pairs, arch):
    base = zoo.get(arch).base
    scores = aw.score_awareness(base, parse_pairs([f"{d}={p}" for d, p in pairs.items()]), seq_len=SEQ_LEN, batch_size=BATCH)
    sums = scores.sums
    want, tokens, acts = _reference(base, pairs, arch)
    keys = [g.key for g in sums.groups]
    assert sums.tokens == {d: {s: tokens[(d, s)] for s in ("source", "target")} for d in pairs}
    assert sums.passes == 2 * 3 and sums.batches == {"de-en": 3, "en-de": 3}
    np.testing.assert_allclose(sums.mean_activation(), acts, rtol=1e-4, atol=1e-9)
    close = dict(rtol=1e-4, atol=1e-12)
    for order in ("abs-mean", "mean-abs"):
        pick = 0 if order == "abs-mean" else 1
        per_direction = sums.direction_awareness(order)
        for d in pairs:
            for j, key in enumerate(keys):
                total = want[(d, "source", j)][pick] + want[(d, "target", j)][pick]
                phi = total.abs() / (tokens[(d, "source")] + tokens[(d, "target")])
                torch.testing.assert_close(per_direction[d][key], phi, **close)
        # a language: the prompt of the direction from it, the target of the direction into it
        per_language = sums.language_awareness(order)
        for lang, parts in {"de": [("de-en", "source"), ("en-de", "target")], "en": [("en-de", "source"), ("de-en", "target")]}.items():
            assert sums.language_parts(lang) == sorted(parts, key=lambda p: list(pairs).index(p[0]))
            for j, key in enumerate(keys):
                phi = sum(want[(d, s, j)][pick] for d, s in parts).abs() / sum(tokens[p] for p in parts)
                torch.testing.assert_close(per_language[lang][key], phi, **close)
        assert all(float(v.max()) > 0 for v in per_language["de"].values())


def test_signed_awareness_is_the_first_order_loss_change(zoo, tmp_path):
    """Σ_t h_i ∂L/∂h_i ≈ L − L(h_i = 0), zeroing neuron i at every position of the batch."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = zoo.get("llama").base
    paths = _write_pairs(tmp_path, ("de-en",))
    pair = parse_pairs([f"de-en={paths['de-en']}"])
    sums = aw.score_awareness(base, pair, seq_len=SEQ_LEN, batch_size=EXAMPLES).sums  # one batch
    tok = AutoTokenizer.from_pretrained(str(base))
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32).eval()
    rows = pair_rows(pair[0], read_pairs(paths["de-en"]), tok, TEMPLATES["flan-following"], SEQ_LEN)

    def loss(layer=None, neuron=None):
        def zero(module, args):
            h = args[0].clone()
            h[..., neuron] = 0
            return (h,)

        hook = model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(zero) if layer is not None else None
        with torch.no_grad():
            logits = model(input_ids=rows.input_ids, attention_mask=rows.attention_mask).logits.double()
        if hook:
            hook.remove()
        return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), rows.labels[:, 1:].flatten(), ignore_index=IGNORE))

    full = loss()
    checked = 0
    for layer, g in enumerate(sums.groups):
        signed = sums.signed_sums["de-en"]["source"][g.key] + sums.signed_sums["de-en"]["target"][g.key]
        for i in torch.argsort(signed.abs(), descending=True)[:3].tolist():
            change = full - loss(layer, i)
            assert change == pytest.approx(float(signed[i]), rel=0.05), (layer, i)
            checked += 1
    assert checked == 6


# -- the pure steps ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "activation,k,want",
    [
        ([0.0, 1.0, 1.5, 5.0, 5.2, 2.0], 2, [2, 4]),  # D = 1, .5, 3.5, .2, 3.2
        ([0.0, 1.0, 1.5, 5.0, 5.2, 2.0], 1, [2]),
        ([0.0, 1.0, 2.0, 3.0], 2, [0, 1]),  # equal scores: the lower layer first
        ([3.0, 1.0, 2.0], 2, [0, 1]),  # |mean difference|: D = 2, 1
        ([-1.0, 1.0, 1.0, -2.0], 3, [0, 1, 2]),
    ],
)
def test_layers_of_largest_activation_change(activation, k, want):
    scores = aw.layer_scores(activation)
    assert scores == [abs(a - b) for a, b in zip(activation[:-1], activation[1:])]
    assert aw.top_layers(scores, k) == want


def test_layer_choice_is_checked():
    with pytest.raises(UsageError, match="--layers 4: the model has 4 MLP layers, so at most 3 can be kept"):
        aw.top_layers([1.0, 2.0, 3.0], 4)
    with pytest.raises(UsageError, match=r"--layer-ids: layer 4 is out of range for a model of 4 MLP layers \(0..3\)"):
        aw.check_layer_choice([0, 1, 2, 3], None, (1, 4))
    aw.check_layer_choice([0, 1, 2, 3], None, (3,))  # the last layer can be named


def test_split_keeps_exactly_the_general_share():
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.random((3, 40)))
    x[:, 7] = x[:, 9] = 0.5  # variance 0: general first
    for eps in (0.9, 0.5, 0.29, 0.01):
        general, owner = aw.split_neurons(x, eps)
        n = share_count(eps, 40)
        assert int(general.sum()) == n
        var = x.numpy().var(axis=0)
        order = np.lexsort((np.arange(40), var))
        assert set(np.flatnonzero(general.numpy())) == set(order[:n].tolist())
        assert (owner[general] == -1).all()
        assert torch.equal(owner[~general], torch.from_numpy(x.numpy().argmax(axis=0))[~general])
    general, owner = aw.split_neurons(torch.tensor([[1.0, 2.0, 3.0, 0.0], [1.0, 2.0, 0.0, 3.0]]), 0.5)
    assert general.tolist() == [True, True, False, False] and owner.tolist() == [-1, -1, 0, 1]
    tied, owner = aw.split_neurons(torch.tensor([[0.0, 1.0], [2.0, 1.0]]), 0.5)
    assert tied.tolist() == [False, True] and owner.tolist() == [1, -1]


def _sums(groups, directions, seed=0, activation=None):
    """AwarenessSums with random sums, every direction and side."""
    gen = torch.Generator().manual_seed(seed)
    rnd = lambda g: torch.rand(g.size, generator=gen, dtype=torch.float64)  # noqa: E731
    sides = ("source", "target")
    abs_sums = {d: {s: {g.key: rnd(g) for g in groups} for s in sides} for d in directions}
    signed = {d: {s: {g.key: rnd(g) - 0.5 for g in groups} for s in sides} for d in directions}
    tokens = {d: {"source": 30 + 7 * i, "target": 11 + i} for i, d in enumerate(directions)}
    act = activation or [0.1 * i for i in range(len(groups))]
    return aw.AwarenessSums(list(groups), list(directions), abs_sums, signed, tokens, {g.key: a for g, a in zip(groups, act)}, 1)


def _selected(mask, g):
    entries = [mask.entries[p.name].selected for p in g.parts]
    assert all(torch.equal(e, entries[0]) for e in entries)
    return entries[0]


@pytest.mark.parametrize("order", ["abs-mean", "mean-abs"])
def test_masks_are_the_split(order):
    groups, shapes = _groups()
    directions = ["de-en", "en-de", "en-fr"]
    sums = _sums(groups, directions, activation=[0.0, 1.0, 3.0])  # D = 1, 2: layer 1 kept
    found = aw.landermt_neurons(sums, shapes=shapes, k=1, general=0.7, order=order)
    assert found.summary["layers"] == [1] == found.routing["layers"]
    kept = groups[1]
    langs = ["de", "en", "fr"]
    assert found.routing["languages"] == langs and found.routing["directions"] == directions
    per_language = sums.language_awareness(order)
    x = torch.stack([per_language[lang][kept.key] for lang in langs])
    general, owner = aw.split_neurons(x, 0.7)
    assert sorted(found.masks) == ["general", "pair-de-en", "pair-en-de", "pair-en-fr", "specific-de", "specific-en", "specific-fr"]
    for mask in found.masks.values():
        assert mask.granularity == "ffn" and set(mask.entries) == {p.name for p in kept.parts}
    assert torch.equal(_selected(found.masks["general"], kept), general) and int(general.sum()) == share_count(0.7, 10) == 7
    spec = {lang: _selected(found.masks[f"specific-{lang}"], kept) for lang in langs}
    union = general.clone()
    for li, lang in enumerate(langs):
        assert torch.equal(spec[lang], owner == li)
        assert not (spec[lang] & union).any()  # disjoint from general and the other languages
        union |= spec[lang]
    assert union.all()
    for d in directions:
        src, tgt = d.split("-")
        assert torch.equal(_selected(found.masks[f"pair-{d}"], kept), general | spec[src] | spec[tgt])
    block = found.routing["blocks"][kept.key]
    assert block["general"] == torch.nonzero(general).flatten().tolist()
    assert block["specific"] == {lang: torch.nonzero(spec[lang]).flatten().tolist() for lang in langs}
    assert found.summary["counts"] == {"1": {"neurons": 10, "general": 7, "specific": {lang: int(spec[lang].sum()) for lang in langs}}}
    # the importance: the kept block only, each language's and each direction's awareness
    assert set(found.importance) == {*langs, *(f"pair-{d}" for d in directions)}
    torch.testing.assert_close(found.importance["fr"][kept.key], per_language["fr"][kept.key].float())
    phi = sums.direction_awareness(order)["en-fr"][kept.key]
    torch.testing.assert_close(found.importance["pair-en-fr"][kept.key], phi.float())
    spec_ef = spec["en"] | spec["fr"]
    assert found.routing["coefficient"]["en-fr"][kept.key] == pytest.approx(
        float(phi[spec_ef].sum() / (phi[spec_ef].sum() + phi[general].sum()))
    )
    assert found.importance_meta["pair-en-fr"].provenance["granularity"] == "ffn"


def test_named_layers_and_a_layer_without_awareness():
    groups, shapes = _groups()
    sums = _sums(groups, ["de-en"])
    for s in ("source", "target"):
        sums.abs_sums["de-en"][s]["model.layers.2.mlp"].zero_()
    found = aw.landermt_neurons(sums, shapes=shapes, layer_ids=(2, 0), general=0.5)
    assert found.routing["layers"] == [0, 2] and list(found.routing["blocks"]) == ["model.layers.0.mlp", "model.layers.2.mlp"]
    # no awareness at all: the neuron-count share (5 general, the other 5 all specific to de)
    assert found.routing["coefficient"]["de-en"]["model.layers.2.mlp"] == 0.5
    with pytest.raises(UsageError, match="--layer-ids: layer 3 is out of range"):
        aw.landermt_neurons(sums, shapes=shapes, layer_ids=(3,))
    with pytest.raises(UsageError, match=r"--general must be in \(0, 1\), got 1"):
        aw.landermt_neurons(sums, shapes=shapes, general=1.0)


def test_options_are_checked():
    loc = LOCATORS.get("awareness")
    assert loc is aw.locate_awareness and loc.options is aw.AwarenessOptions and loc.paper == "Zhu et al. 2024, LANDeRMT"
    ok = dict(model="m", pair=("de-en=a.jsonl",))
    assert loc.parse(**ok, layer_ids="3, 4,21").layer_ids == (3, 4, 21) and loc.parse(**ok).k == 4
    for bad, message in [
        (dict(general=1.5), r"^--general must be in \(0, 1\), got 1.5"),
        (dict(general=0), r"^--general must be in \(0, 1\)"),
        (dict(layers=0), "^--layers must be at least 1, got 0"),
        (dict(layer_ids="3,x"), "^--layer-ids '3,x': expected comma-separated layer numbers"),
        (dict(layer_ids="3,3"), "^--layer-ids: a layer is given twice"),
        (dict(layers=2, layer_ids="1"), "^--layers and --layer-ids both given"),
        (dict(order="abs"), "^--order must be one of abs-mean, mean-abs"),
        (dict(template="nothing"), "^--template: 'nothing' is neither"),
        (dict(batch_size=0), "^--batch-size: Input should be greater than or equal to 1"),
    ]:
        with pytest.raises(UsageError, match=message):
            loc.parse(**{**ok, **bad})
    with pytest.raises(UsageError, match="^--pair 'de=a': expected SRC-TGT=PATH"):
        loc.parse(model="m", pair=("de=a",))
    with pytest.raises(UsageError, match="^--pair: no direction given"):
        loc.parse(model="m", pair=())


# -- the command --------------------------------------------------------------------------------

SCHEMA = {"neuroloc.kind", "version", "model", "model_fingerprint", "model_layout", "template", "languages", "directions", "layers"}


@pytest.fixture
def invoke(cli):
    return lambda *args: cli("locate", "awareness", *args)


def _check_folder(out, base, summary):
    """Files, routing.json's schema, and the coefficients recomputed from the importance files."""
    routing = json.loads((out / "routing.json").read_text())
    langs, directions = routing["languages"], routing["directions"]
    stems = ["general", *(f"specific-{lang}" for lang in langs), *(f"pair-{d}" for d in directions)]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [*(f"{s}.safetensors" for s in stems), "awareness.png", "importance", "routing.json", "summary.json"]
    )
    assert sorted(p.name for p in (out / "importance").iterdir()) == sorted(
        f"{s}.safetensors" for s in [*langs, *(f"pair-{d}" for d in directions)]
    )
    ckpt = Checkpoint.open(base, spec="b")
    groups = {g.key: g for g in ffn_groups(floating(ckpt.tensors), "b")}
    assert set(routing) == SCHEMA | {"blocks", "coefficient"}
    assert routing["neuroloc.kind"] == "landermt-routing" and routing["version"] == 1
    assert routing["model"] == str(base.resolve()) and routing["model_fingerprint"] == ckpt.fingerprint
    assert routing["model_layout"] == layout_digest({n: i.shape for n, i in ckpt.tensors.items()})
    assert routing["template"] == TEMPLATES["flan-following"]
    assert routing["layers"] == summary["layers"] and set(routing["coefficient"]) == set(directions)
    Routing.load(out / "routing.json")  # what training and export read
    for key, block in routing["blocks"].items():
        g = groups[key]
        assert set(block) == {"layer", "size", "parts", "general", "specific"}
        assert block["size"] == g.size and block["parts"] == [[p.name, p.axis] for p in g.parts]
        assert len(block["general"]) == share_count(summary["general"], g.size)
        everything = sorted(block["general"] + [i for lang in langs for i in block["specific"][lang]])
        assert everything == list(range(g.size))
        general = torch.zeros(g.size, dtype=torch.bool)
        general[block["general"]] = True
        assert torch.equal(_selected(Mask.load(out / "general.safetensors"), g), general)
        for d in directions:
            src, tgt = d.split("-")
            phi = Importance.open(out / "importance" / f"pair-{d}.safetensors").read(key).double()
            spec = block["specific"][src] + block["specific"][tgt]
            c = float(phi[spec].sum() / (phi[spec].sum() + phi[block["general"]].sum()))
            assert routing["coefficient"][d][key] == pytest.approx(c, rel=1e-6)
            assert summary["coefficient"][d][str(block["layer"])] == routing["coefficient"][d][key]
            pair_mask = _selected(Mask.load(out / f"pair-{d}.safetensors"), g)
            assert sorted(torch.nonzero(pair_mask).flatten().tolist()) == sorted(block["general"] + spec)
    imp = Importance.open(out / "importance" / f"{langs[0]}.safetensors")
    assert imp.meta.score == "awareness" and imp.meta.source == langs[0] and imp.meta.provenance["granularity"] == "ffn"
    assert imp.shapes == {key: (groups[key].size,) for key in routing["blocks"]}
    assert (out / "awareness.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_the_command_writes_masks_importance_routing_and_summary(zoo, pairs, tmp_path, invoke, arch):
    base = zoo.get(arch).base
    out = tmp_path / "landermt"
    common = [base, *(a for d, p in pairs.items() for a in ("--pair", f"{d}={p}")), "--seq-len", SEQ_LEN, "--batch-size", BATCH]
    r = invoke(*common, "--layers", 1, "--json", "-o", out)
    assert r.exit_code == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert r.json() == {"output": str(out), **summary}
    assert summary["layers"] == [0] and list(summary["layer_scores"]) == ["0"]  # two layers: one score
    assert set(summary["data"]) == {"de-en", "en-de"} and summary["data"]["de-en"]["examples"] == EXAMPLES
    _check_folder(out, base, summary)
    if arch == "gpt2":
        return
    r = invoke(*common, "--layers", 1, "-o", out)  # an existing output: refused, untouched
    assert r.exit_code == 4 and r.stderr.count("\n") == 1 and "already exists" in r.stderr
    assert json.loads((out / "summary.json").read_text()) == summary
    for bad, needle in (
        (["--general", "1.5"], "error: --general must be in (0, 1), got 1.5"),
        (["--layers", "0"], "error: --layers must be at least 1, got 0"),
        (["--layers", "2"], "error: --layers 2: the model has 2 MLP layers, so at most 1 can be kept"),
        (["--layer-ids", "2"], "error: --layer-ids: layer 2 is out of range"),
        (["--pair", "de-de=x.jsonl"], "error: --pair 'de-de=x.jsonl': source and target are both 'de'"),
    ):
        r = invoke(*common, *bad, "-o", tmp_path / "x")
        assert r.exit_code == 2 and r.stderr.startswith(needle) and r.stderr.count("\n") == 1, r.stderr
    r = invoke(base, "--pair", "de-en", "-o", tmp_path / "x")
    assert r.exit_code == 2 and r.stderr.startswith("error: --pair 'de-en': expected SRC-TGT=PATH") and r.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists()
    r = invoke(*common, "--layer-ids", "1", "--order", "mean-abs", "--overwrite", "-o", out)
    assert r.exit_code == 0, r.stderr
    assert "layers [1]" in r.stdout and "routing c de-en" in r.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["layers"] == [1] and summary["order"] == "mean-abs"
    _check_folder(out, base, summary)


def test_layers_chosen_by_score_on_a_deeper_model(deep, tmp_path, invoke):
    paths = _write_pairs(tmp_path, ("de-en", "en-fr"))
    out = tmp_path / "out"
    r = invoke(deep, *(a for d, p in paths.items() for a in ("--pair", f"{d}={p}")), "--layers", 2, "--samples", 3, "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    summary = r.json()
    scores = [summary["layer_scores"][str(i)] for i in range(3)]
    means = [summary["mean_activation"][str(i)] for i in range(4)]
    assert scores == pytest.approx([abs(a - b) for a, b in zip(means[:-1], means[1:])])
    assert summary["layers"] == sorted(sorted(range(3), key=lambda i: (-scores[i], i))[:2])
    assert summary["data"]["en-fr"]["examples"] == 3 and json.loads((out / "routing.json").read_text())["languages"] == ["de", "en", "fr"]
    _check_folder(out, deep, summary)
