"""`locate lape` (language-specific neurons, Tang et al. 2024): the selection on planted
probabilities against a float64 numpy computation of its definition, the activation
probabilities against the MLP's activation recomputed here from its input, and the command
end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from neuroloc_cli.arch import layer_index
from neuroloc_cli.errors import InputError, UsageError
from neuroloc_cli.io.checkpoint import Checkpoint
from neuroloc_cli.locate import LOCATORS
from neuroloc_cli.locate import lape as lape_module
from neuroloc_cli.locate.base import parse_languages
from neuroloc_cli.locate.lape import activation_module, activation_probabilities
from neuroloc_cli.locate.units import Part, UnitGroup, ffn_groups, floating
from neuroloc_cli.masks import Mask
from neuroloc_cli.masks.importance import Importance
from neuroloc_cli.synthetic import SENTENCES

LANGS = ("en", "es", "fr")
BLOCKS, SIZE, HIDDEN = 2, 50, 4
SAMPLES, SEQ_LEN, BATCH = 3, 16, 2  # a last, partial batch
locate_lape = lape_module.lape_neurons  # the pure selection


def _groups(blocks: int = BLOCKS, size: int = SIZE) -> tuple[list[UnitGroup], dict[str, tuple[int, ...]]]:
    """Llama-shaped MLP blocks and the shapes of their tensors (plus an embedding)."""
    groups, shapes = [], {"model.embed_tokens.weight": (10, HIDDEN)}
    for b in range(blocks):
        key = f"model.layers.{b}.mlp"
        parts = (Part(f"{key}.gate_proj.weight", 0), Part(f"{key}.up_proj.weight", 0), Part(f"{key}.down_proj.weight", 1))
        shapes.update({parts[0].name: (size, HIDDEN), parts[1].name: (size, HIDDEN), parts[2].name: (HIDDEN, size)})
        groups.append(UnitGroup(key, size, parts))
    return groups, shapes


# planted neurons, as (block, neuron) -> probabilities of en, es, fr
ONE_LANGUAGE = {
    (0, 3): (0.90, 0.02, 0.02),
    (1, 7): (0.85, 0.03, 0.01),
    (0, 10): (0.02, 0.88, 0.02),
    (1, 20): (0.01, 0.91, 0.04),
    (0, 30): (0.03, 0.02, 0.87),
    (1, 40): (0.02, 0.02, 0.93),
}
TWO_LANGUAGES = {(0, 15): (0.80, 0.75, 0.01), (1, 25): (0.01, 0.78, 0.82)}
UNIFORM_HIGH = {(0, 5): (0.90, 0.92, 0.88), (1, 5): (0.89, 0.90, 0.91), (1, 45): (0.95, 0.94, 0.96)}  # fire for all: not specific
BELOW_THRESHOLD = {(0, 40): (0.20, 0.0, 0.0), (1, 0): (0.25, 0.001, 0.0)}  # the lowest entropies, but never frequent
DEAD = {(0, 49): (0.0, 0.0, 0.0)}  # never fires: no entropy


def _planted() -> np.ndarray:
    """[languages, blocks * size]: background neurons fire at 0.30-0.35 for every language."""
    p = 0.30 + 0.05 * np.random.default_rng(0).random((len(LANGS), BLOCKS * SIZE))
    for table in (ONE_LANGUAGE, TWO_LANGUAGES, UNIFORM_HIGH, BELOW_THRESHOLD, DEAD):
        for (b, i), values in table.items():
            p[:, b * SIZE + i] = values
    return p


def _as_mapping(p: np.ndarray) -> dict[str, dict[str, torch.Tensor]]:
    return {
        lang: {f"model.layers.{b}.mlp": torch.from_numpy(p[li, b * SIZE : (b + 1) * SIZE]) for b in range(BLOCKS)}
        for li, lang in enumerate(LANGS)
    }


def _reference(p: np.ndarray, top: float, percentile: float) -> tuple[float, dict[str, np.ndarray]]:
    """LAPE from its definition, float64 numpy: the threshold, and each language's neurons."""
    values = np.sort(p.ravel())
    k = min(max(round(percentile * values.size), 1), values.size)
    threshold = values[k - 1]
    total = p.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        q = p / total
        entropy = -np.where(q > 0, q * np.log(q), 0.0).sum(axis=0)
    alive = ((p > threshold).any(axis=0)) & (total > 0)
    n = p.shape[1]
    order = [i for i in np.lexsort((np.arange(n), entropy)) if alive[i]]  # by entropy, then position
    selected = np.zeros(n, dtype=bool)
    selected[order[: int(top * n)]] = True
    return float(threshold), {lang: selected & (p[li] > threshold) for li, lang in enumerate(LANGS)}


def _chosen(mask: Mask, groups: list[UnitGroup]) -> np.ndarray:
    """A mask's neurons, block after block, checking that every part of a block agrees."""
    out = []
    for g in groups:
        sel = [mask.entries[part.name].selected for part in g.parts]
        assert all(torch.equal(s, sel[0]) for s in sel), g.key
        out.append(sel[0].numpy())
    return np.concatenate(out)


def test_planted_neurons_are_found_exactly():
    groups, shapes = _groups()
    p = _planted()
    found = locate_lape(_as_mapping(p), groups, shapes=shapes, top=0.08, filter_percentile=0.9)
    index = {lang: set() for lang in LANGS}
    for table in (ONE_LANGUAGE, TWO_LANGUAGES):
        for (b, i), values in table.items():
            for lang, v in zip(LANGS, values):
                if v > 0.5:
                    index[lang].add(b * SIZE + i)
    for lang in LANGS:
        mask = found.masks[lang]
        assert mask.granularity == "ffn"
        assert set(mask.entries) == {part.name for g in groups for part in g.parts}
        assert set(np.flatnonzero(_chosen(mask, groups))) == index[lang], lang
    assert found.summary["selected"] == 8  # int(0.08 * 100): the six one-language and two two-language neurons
    assert found.summary["languages"]["es"] == {"neurons": 4, "share": 0.04, "per_layer": {"0": 2, "1": 2}}
    assert found.summary["overlaps"]["en/es"] == {"shared": 1, "jaccard": 1 / 6}
    assert found.summary["overlaps"]["en/fr"] == {"shared": 0, "jaccard": 0.0}


@pytest.mark.parametrize("top,percentile", [(0.08, 0.9), (1.0, 0.9), (0.05, 0.95), (0.01, 0.95), (0.3, 0.5), (1.0, 0.99)])
def test_selection_equals_its_definition(top, percentile):
    groups, shapes = _groups()
    p = _planted()
    threshold, want = _reference(p, top, percentile)
    found = locate_lape(_as_mapping(p), groups, shapes=shapes, top=top, filter_percentile=percentile, provenance={"model": "m"})
    assert found.summary["threshold"] == threshold
    values = np.sort(p.ravel())
    survivors = int((((p > threshold).any(axis=0)) & (p.sum(axis=0) > 0)).sum())
    assert found.summary["above_threshold"] == survivors
    assert found.summary["selected"] == min(int(top * p.shape[1]), survivors)
    assert threshold == values[round(percentile * values.size) - 1]
    union = np.zeros(p.shape[1], dtype=bool)
    for lang in LANGS:
        got = _chosen(found.masks[lang], groups)
        np.testing.assert_array_equal(got, want[lang], err_msg=lang)
        union |= got
        prov = found.masks[lang].provenance
        assert prov["threshold"] == threshold and prov["language"] == lang and prov["model"] == "m"
        assert prov["selected_units"] == int(got.sum()) and prov["units"] == p.shape[1]
        assert found.summary["languages"][lang]["neurons"] == int(got.sum())
    assert int(union.sum()) == found.summary["selected"]  # every kept neuron belongs to some language


def test_equal_entropies_go_to_the_first_neuron():
    groups, shapes = _groups(blocks=2, size=10)
    p = np.full((2, 20), 0.5)
    for i in (12, 2, 5, 18):
        p[:, i] = (0.9, 0.1)
    mapping = {
        lang: {g.key: torch.from_numpy(p[li, b * 10 : (b + 1) * 10]) for b, g in enumerate(groups)} for li, lang in enumerate(("a", "b"))
    }
    found = locate_lape(mapping, groups, shapes=shapes, top=0.1, filter_percentile=0.8)  # 2 of the 4 tied
    assert list(np.flatnonzero(_chosen(found.masks["a"], groups))) == [2, 5]
    assert found.masks["b"].provenance["selected_units"] == 0


def test_the_locator_is_registered_and_checks_its_input():
    groups, shapes = _groups()
    mapping = _as_mapping(_planted())
    assert LOCATORS.get("lape") is lape_module.locate_lape and LOCATORS.get("lape").paper == "Tang et al. 2024, LAPE"
    assert LOCATORS.get("lape").options is lape_module.LapeOptions
    with pytest.raises(UsageError, match=r"--top must be a share in \(0, 1\], got 0"):
        locate_lape(mapping, groups, shapes=shapes, top=0)
    with pytest.raises(UsageError, match=r"--filter-percentile must be in \(0, 1\), got 1"):
        locate_lape(mapping, groups, shapes=shapes, filter_percentile=1)
    with pytest.raises(UsageError, match="1 language given"):
        locate_lape({"en": mapping["en"]}, groups, shapes=shapes)
    short = {**mapping, "fr": {**mapping["fr"], "model.layers.1.mlp": torch.zeros(3)}}
    with pytest.raises(InputError, match=r"probabilities of fr at model.layers.1.mlp: shape \[3\], expected 50 values"):
        locate_lape(short, groups, shapes=shapes)


def test_an_mlp_without_activation_module_is_named():
    class Plain(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = nn.Linear(2, 4), nn.Linear(4, 2)

    with pytest.raises(InputError, match="MLP block model.layers.3.mlp \\(Plain\\) has no activation module"):
        activation_module(Plain(), "model.layers.3.mlp", "ckpt")
    mlp = Plain()
    mlp.nonlinearity = nn.GELU()
    assert activation_module(mlp, "k", "ckpt") == ("nonlinearity", mlp.nonlinearity)


@pytest.fixture
def corpora(tmp_path):
    en = tmp_path / "en.txt"
    en.write_text("\n\n".join([SENTENCES[0], SENTENCES[3]] * 20) + "\n")
    es = tmp_path / "es.txt"
    es.write_text("\n\n".join([SENTENCES[4]] * 30) + "\n")
    return {"en": en, "es": es}


def _rows(model, path):
    """The first SAMPLES packed rows of a paragraph corpus, built here from the tokenizer."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    stream = []
    for d in (d for d in path.read_text().split("\n\n") if d.strip()):
        ids = tok(d.strip("\n"))["input_ids"]
        stream += ids if ids[-1:] == [tok.eos_token_id] else ids + [tok.eos_token_id]
    return torch.tensor(stream[: SAMPLES * SEQ_LEN]).view(SAMPLES, SEQ_LEN)


def _reference_probabilities(model_path, rows, arch):
    """Per layer, the share of positions where the activation is positive, recomputed from each
    MLP's input: silu(x W_gate^T) for Llama, gelu_new(x W_fc + b_fc) for GPT-2."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    blocks = model.model.layers if arch == "llama" else model.transformer.h
    positive = {}

    def hook_for(layer, mlp):
        def pre(module, args):
            x = args[0].reshape(-1, args[0].shape[-1])
            if arch == "llama":
                z = x @ mlp.gate_proj.weight.T
                act = z * torch.sigmoid(z)
            else:
                z = x @ mlp.c_fc.weight + mlp.c_fc.bias
                act = 0.5 * z * (1 + torch.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))
            positive[layer] = positive.get(layer, 0) + (act > 0).sum(0, dtype=torch.int64)

        return pre

    hooks = [b.mlp.register_forward_pre_hook(hook_for(i, b.mlp)) for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(input_ids=rows)
    for h in hooks:
        h.remove()
    return {layer: c.double() / rows.numel() for layer, c in positive.items()}


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_probabilities_equal_the_activation_recomputed(zoo, corpora, arch):
    base = zoo.get(arch).base
    languages = parse_languages([f"{lang}={path}" for lang, path in corpora.items()])
    probs = activation_probabilities(base, languages, samples=SAMPLES, seq_len=SEQ_LEN, batch_size=BATCH)
    assert [g.key for g in probs.groups] == [g.key for g in ffn_groups(floating(Checkpoint.open(base, spec="b").tensors), "b")]
    assert probs.settings["activation"] == f"P(output of mlp.{'act_fn' if arch == 'llama' else 'act'} > 0) over each language's tokens"
    for lang, path in corpora.items():
        want = _reference_probabilities(base, _rows(base, path), arch)
        got = {layer_index(k): v for k, v in probs.probabilities[lang].items()}
        assert set(got) == set(want)
        for layer, w in want.items():
            assert got[layer].dtype == torch.float64
            assert torch.equal(got[layer], w), (lang, layer)
            assert 0 < float(w.mean()) < 1
        assert probs.describe()[lang]["tokens"] == SAMPLES * SEQ_LEN


@pytest.fixture
def invoke(cli):
    return lambda *args: cli("locate", "lape", *args)


def test_the_command_writes_masks_importance_and_summary(zoo, corpora, tmp_path, invoke):
    base = zoo.get("llama").base
    out = tmp_path / "lape"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    data = [a for lang, p in corpora.items() for a in ("--data", f"{lang}={p}")]
    common = [base, *data, "--samples", SAMPLES, "--seq-len", SEQ_LEN, "--batch-size", BATCH, "-o", out]

    r = invoke(*common)  # an existing output: refused, untouched
    assert r.exit_code == 4 and r.stderr.count("\n") == 1 and "already exists" in r.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    for bad, needle in ((["--top", "1.5"], "--top must be a share"), (["--filter-percentile", "0"], "--filter-percentile")):
        r = invoke(*common, *bad)
        assert r.exit_code == 2 and r.stderr.count("\n") == 1 and needle in r.stderr, r.stderr
    r = invoke(base, "--data", f"en={corpora['en']}", "--data", "es", "-o", tmp_path / "x")
    assert r.exit_code == 2 and r.stderr.startswith("error: --data 'es': expected LANG=PATH") and r.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists()

    r = invoke(*common, "--top", "0.1", "--overwrite", "--json")
    assert r.exit_code == 0, r.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert json.loads(r.stdout) == {"output": str(out), **summary}
    assert sorted(p.name for p in out.iterdir()) == ["en.safetensors", "es.safetensors", "importance", "summary.json"]
    groups = ffn_groups(floating(Checkpoint.open(base, spec="b").tensors), "b")
    n = sum(g.size for g in groups)
    assert summary["neurons"] == n and summary["selected"] == min(int(0.1 * n), summary["above_threshold"])
    threshold = summary["threshold"]
    union = np.zeros(n, dtype=bool)
    for lang in corpora:
        mask = Mask.load(out / f"{lang}.safetensors")
        assert mask.granularity == "ffn" and set(mask.entries) == {part.name for g in groups for part in g.parts}
        chosen = _chosen(mask, groups)
        union |= chosen
        imp = Importance.open(out / "importance" / f"{lang}.safetensors")
        assert imp.meta.score == "activation-probability" and imp.meta.source == lang
        assert imp.meta.provenance["granularity"] == "ffn" and imp.meta.provenance["threshold"] == threshold
        assert imp.shapes == {g.key: (g.size,) for g in groups}
        p = np.concatenate([imp.read(g.key).numpy() for g in groups])
        assert (p[chosen] > np.float32(threshold)).all()
        per_layer = {
            str(layer_index(g.key)): int(c.sum()) for g, c in zip(groups, np.split(chosen, np.cumsum([g.size for g in groups])[:-1]))
        }
        assert summary["languages"][lang]["per_layer"] == per_layer
        assert summary["languages"][lang]["neurons"] == int(chosen.sum()) == mask.provenance["selected_units"]
        assert summary["data"][lang]["tokens"] == SAMPLES * SEQ_LEN
    assert int(union.sum()) == summary["selected"] > 0
