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
from tests.helpers import read_inputs_whole, record_reads

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


def test_tokenizer_block_and_tokenizer_source_are_refused_together(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    text = (
        f"merge_method: linear\nmodels:\n  - model: {fam.ft1}\n  - model: {fam.ft2}\ntokenizer_source: base\ntokenizer:\n  source: union\n"
    )
    r = cli("merge", write_recipe(tmp_path, text), "-o", tmp_path / "out")
    assert r.exit_code == 2
    assert "give either 'tokenizer_source' or a 'tokenizer:' block, not both" in r.stderr


def test_tokenizer_source_must_name_an_input(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    text = f"merge_method: linear\nmodels:\n  - model: {fam.ft1}\n  - model: {fam.ft2}\ntokenizer_source: {fam.base}\n"
    r = cli("merge", write_recipe(tmp_path, text), "-o", tmp_path / "out")
    assert r.exit_code == 2
    assert "not one of the recipe's models (name 'base', 'union' or one of the models)" in r.stderr


# The `tokenizer:` block: per-token sources, force and padding. a lacks b's three added tokens;
# two tokens neither has are added by the block. Each listed token's rows in a and b, as
# mergekit 0.1.5's `PermutedVocabulary` computes them, are spelled out below.
PAD = 64


def _block_recipe(a: Path, b: Path, common: str, donor: str) -> str:
    return f"""
merge_method: linear
models:
  - model: {a}
    parameters: {{weight: {W[0]}}}
  - model: {b}
    parameters: {{weight: {W[1]}}}
dtype: float32
tokenizer:
  source: union
  tokens:
    <tool>:
      source: {{kind: zero}}
    <|im_start|>:
      source: {{kind: model_token, model: {b}, token_id: 5}}
    <lang_xx>:
      source: {{kind: model_token, model: {a}, token: {json.dumps(donor)}}}
      force: true
    {json.dumps(common)}:
      source: {b}
      force: true
    <|im_end|>:
      source: {{kind: zero}}
  pad_to_multiple_of: {PAD}
"""


def test_tokenizer_block_sources_force_and_padding(tmp_path, cli):
    a, b = _build(tmp_path / "models", tie=False)
    va, vb = _vocab(a), _vocab(b)
    by_id = {i: t for t, i in va.items()}
    common, donor = by_id[100], by_id[50]
    out = tmp_path / "out"
    r = cli("merge", write_recipe(tmp_path, _block_recipe(a, b, common, donor)), "-o", out)
    assert r.exit_code == 0, r.stderr
    n = len(va)
    expected_vocab = {**va, **{t: n + i for i, t in enumerate([*EXTRA, *EXTRA_SPECIAL, "<|im_start|>", "<|im_end|>"])}}
    assert _vocab(out) == expected_vocab
    rows = -(-len(expected_vocab) // PAD) * PAD
    assert rows > len(expected_vocab)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == rows
    merged, ta, tb = _tensors(out), _tensors(a), _tensors(b)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        ea, eb = ta[name], tb[name]
        zero = torch.zeros(ea.shape[1])
        # (a's row, b's row) of each listed token, else a token's own rows, b's standing in for a
        listed = {
            "<tool>": (zero, eb[vb["<tool>"]]),  # not forced: only a, which lacks it, takes zeros
            "<|im_start|>": (eb[5], eb[5]),  # neither has it: b's row 5 in both
            "<lang_xx>": (ea[va[donor]], ea[va[donor]]),  # forced: a's row of another token in both
            common: (eb[vb[common]], eb[vb[common]]),  # forced: b's row of the token in both
            "<|im_end|>": (zero, zero),
        }
        mapped_a, mapped_b = torch.zeros(rows, ea.shape[1]), torch.zeros(rows, ea.shape[1])
        for tok, i in expected_vocab.items():
            ra, rb = listed[tok] if tok in listed else (ea[va[tok]] if tok in va else eb[vb[tok]], eb[vb[tok]])
            mapped_a[i], mapped_b[i] = ra, rb
        k = len(expected_vocab)
        mapped_a[k:], mapped_b[k:] = mapped_a[:k].mean(0), mapped_b[:k].mean(0)  # padding: each model's mean row
        assert merged[name].shape == (rows, ea.shape[1])
        torch.testing.assert_close(merged[name], W[0] * mapped_a + W[1] * mapped_b, rtol=0, atol=1e-6)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    assert tok("<|im_start|>hi<|im_end|>", add_special_tokens=False)["input_ids"][0] == n + 3
    assert tok.convert_ids_to_tokens([n + 3, n + 4]) == ["<|im_start|>", "<|im_end|>"]


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("<tool>:\n      source: {a}", "tokenizer.tokens.<tool>.source: {a} lacks the token '<tool>'"),
        ("<tool>:\n      force: true", "tokenizer.tokens.<tool>.source: required, since force is set"),
        (
            "<x>:\n      source: {{kind: model_token, model: {a}, token_id: 100000}}",
            "tokenizer.tokens.<x>.source: token_id 100000 is not a row of",
        ),
        ("<x>:\n      source: {{kind: zero, model: {a}}}", "tokenizer.tokens.<x>.source: a model path, {{kind: zero}}"),
    ],
)
def test_tokenizer_block_errors_name_the_key(pair, cli, tmp_path, entry, message):
    a, b = pair
    text = f"merge_method: linear\nmodels:\n  - model: {a}\n  - model: {b}\ntokenizer:\n  tokens:\n    {entry.format(a=a)}\n"
    r = cli("merge", write_recipe(tmp_path, text), "-o", tmp_path / "out")
    assert r.exit_code == 2, r.stderr
    assert message.format(a=a) in r.stderr


@pytest.mark.parametrize("method", ["linear", "karcher"])
def test_token_rows_are_read_a_block_at_a_time(tmp_path, cli, monkeypatch, method):
    """The embedding and head are read onto the output vocabulary a unit at a time (linear:
    blocks of 64 rows; karcher: pieces of 2048 elements), never whole, and the merge equals
    one whose token-indexed inputs are remapped whole; `pad_to_multiple_of` included."""
    from neuroloc_cli.merge import stream, vocab
    from neuroloc_cli.ops import sums

    a, b = _build(tmp_path / "models", tie=False)
    recipe = write_recipe(
        tmp_path,
        f"merge_method: {method}\nmodels:\n  - model: {a}\n  - model: {b}\n"
        + ("parameters: {weight: 0.5}\n" if method == "linear" else "")
        + "dtype: float32\n"
        f"tokenizer:\n  source: union\n  tokens:\n    <tool>:\n      source: {{kind: zero}}\n  pad_to_multiple_of: {PAD}\n",
    )
    monkeypatch.setattr(vocab, "_ROW_BLOCK", 64)  # the padding row's mean, too
    monkeypatch.setattr(stream, "BLOCK_ELEMENTS", 64 * 64)  # rows of 64 elements: 64 rows a block
    monkeypatch.setattr(sums, "PIECE", 2048)
    reads = record_reads(monkeypatch)
    r = cli("merge", recipe, "-o", tmp_path / "blocks")
    assert r.exit_code == 0, r.stderr
    token_reads = [rows for t, rows in reads if t in ("model.embed_tokens.weight", "lm_head.weight")]
    assert token_reads and all(rows is not None and rows[1] - rows[0] <= 64 for rows in token_reads)
    monkeypatch.setattr(stream, "BLOCK_ELEMENTS", 2**30)  # whole tensors, remapped whole
    read_inputs_whole(monkeypatch)
    r = cli("merge", recipe, "-o", tmp_path / "whole")
    assert r.exit_code == 0, r.stderr
    x, y = _tensors(tmp_path / "blocks"), _tensors(tmp_path / "whole")
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
    assert x["model.embed_tokens.weight"].shape[0] % PAD == 0
