"""`tokenizer_source`: two tiny models whose vocabularies differ (the second has three added
tokens and an embedding resized to fit them), merged with `linear`. Every expected row is
computed here from the two vocabularies and the linear formula; with two models a token only
one has takes that model's row in both (mergekit 0.1.5's default; identical to its output).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from neuroloc_cli.synthetic import build_checkpoint, tiny_config, write_tokenizer
from tests.conftest import write_recipe

EXTRA = ["<tool>", "<lang_xx>"]
EXTRA_SPECIAL = ["<extra_sp>"]
W = (0.3, 0.7)


def _vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


def _build(root: Path, tie: bool) -> tuple[Path, Path]:
    from transformers import AutoTokenizer

    write_tokenizer(root / "probe", 512)
    n = len(AutoTokenizer.from_pretrained(root / "probe"))
    a = build_checkpoint(tiny_config("llama", vocab=n, tie=tie), root / "a", seed=0)
    b = build_checkpoint(tiny_config("llama", vocab=n + 3, tie=tie), root / "b", seed=1)
    tok = AutoTokenizer.from_pretrained(b)
    tok.add_tokens(EXTRA)
    tok.add_tokens(EXTRA_SPECIAL, special_tokens=True)
    tok.save_pretrained(b)
    return a, b


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def pair(request, tmp_path_factory):
    return _build(tmp_path_factory.mktemp(f"vocab-{request.param}"), request.param)


def _merge(cli, tmp_path: Path, a: Path, b: Path, source: str) -> Path:
    text = f"""
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: {W[0]}}}
  - model: {b}
    parameters: {{weight: {W[1]}}}
dtype: float32
tokenizer_source: {source}
"""
    out = tmp_path / f"out-{source.replace('/', '_')}"
    r = cli("merge", write_recipe(tmp_path, text, f"{source.replace('/', '_')}.yaml"), "-o", out)
    assert r.exit_code == 0, r.stderr
    return out


def _tensors_shape(folder: Path, name: str) -> tuple[int, ...]:
    from neuroloc_cli.io.checkpoint import Checkpoint

    return tuple(Checkpoint.open(folder).tensors[name].shape)


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


@pytest.mark.parametrize("source", ["union", "base", "b"])
def test_rows_land_where_the_vocabulary_says(pair, cli, tmp_path, source):
    a, b = pair
    out = _merge(cli, tmp_path, a, b, str(b) if source == "b" else source)
    va, vb = _vocab(a), _vocab(b)
    if source == "base":
        expected_vocab = va
    else:  # union: a's tokens, then b's added tokens with the next ids; `b`: b's own
        expected_vocab = {**va, **{t: len(va) + i for i, t in enumerate(EXTRA + EXTRA_SPECIAL)}}
        assert expected_vocab == vb
    merged, ta, tb = _tensors(out), _tensors(a), _tensors(b)
    vocab_names = [n for n in ta if n.endswith(("embed_tokens.weight", "lm_head.weight"))]
    assert ("lm_head.weight" in merged) == ("lm_head.weight" in ta)
    for name in vocab_names:
        assert merged[name].shape == (len(expected_vocab), ta[name].shape[1])
        for tok, i in expected_vocab.items():
            ra = ta[name][va[tok]] if tok in va else tb[name][vb[tok]]  # a lacks it: b's row stands in
            rb = tb[name][vb[tok]]
            torch.testing.assert_close(merged[name][i], W[0] * ra + W[1] * rb, rtol=0, atol=1e-6)
    for name in ta:
        if name not in vocab_names:
            torch.testing.assert_close(merged[name], W[0] * ta[name] + W[1] * tb[name], rtol=0, atol=1e-6)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(expected_vocab)
    assert _vocab(out) == expected_vocab


def test_output_tokenizer_encodes_the_extra_tokens(pair, cli, tmp_path):
    from transformers import AutoTokenizer

    a, b = pair
    out = _merge(cli, tmp_path, a, b, "union")
    tok = AutoTokenizer.from_pretrained(out)
    n = len(_vocab(a))
    ids = tok("hi <tool> <lang_xx> <extra_sp>", add_special_tokens=False)["input_ids"]
    assert [i for i in ids if i >= n] == [n, n + 1, n + 2]
    assert tok.convert_ids_to_tokens([n + 2]) == ["<extra_sp>"]
    # base: the extra tokens are plain text again, in the base's vocabulary
    base_tok = AutoTokenizer.from_pretrained(_merge(cli, tmp_path, a, b, "base"))
    assert max(base_tok("hi <tool>", add_special_tokens=False)["input_ids"]) < n


def test_identical_vocabularies_copy_the_tokenizer_files(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    out = _merge(cli, tmp_path, fam.ft1, fam.base, "base")
    assert (out / "tokenizer.json").read_bytes() == (fam.ft1 / "tokenizer.json").read_bytes()
    n = len(_vocab(fam.base))
    assert _tensors_shape(out, "model.embed_tokens.weight")[0] == n
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["vocab_size"] == n  # rows past the tokenizer's last token are dropped, as mergekit does


def test_tokenizer_block_is_refused_naming_what_works(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    text = f"merge_method: linear\nmodels:\n  - model: {fam.ft1}\n  - model: {fam.ft2}\ntokenizer:\n  source: union\n"
    r = cli("merge", write_recipe(tmp_path, text), "-o", tmp_path / "out")
    assert r.exit_code == 2
    assert "the 'tokenizer:' block (per-token sources, pad_to_multiple_of) is not supported" in r.stderr
    assert "tokenizer_source: base" in r.stderr


def test_tokenizer_source_must_name_an_input(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    text = f"merge_method: linear\nmodels:\n  - model: {fam.ft1}\n  - model: {fam.ft2}\ntokenizer_source: {fam.base}\n"
    r = cli("merge", write_recipe(tmp_path, text), "-o", tmp_path / "out")
    assert r.exit_code == 2
    assert "not one of the recipe's models (name 'base', 'union' or one of the models)" in r.stderr
