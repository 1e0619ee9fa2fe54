"""`neuroloc train` faced with a short-context model and with bad input: the default sequence
length fits the model and is recorded; every mistake is one line on stderr naming the flag,
file or folder, with exit code 2 or 3, and nothing is written."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

from neuroloc_cli.synthetic import SENTENCES, build_checkpoint, tiny_config
from neuroloc_cli.train.state import default_run_dir

POSITIONS = 128


@pytest.fixture(scope="module")
def short(tmp_path_factory) -> Path:
    """A tiny llama of 128 positions."""
    cfg = tiny_config("llama")
    cfg.max_position_embeddings = POSITIONS
    return build_checkpoint(cfg, tmp_path_factory.mktemp("short") / "llama")


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "mix.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(SENTENCES) for _ in range(3))}) + "\n" for _ in range(60)))
    return path


def _one_error_line(r, code: int) -> str:
    assert r.exit_code == code, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def _assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists() and not default_run_dir(tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.neuroloc-tmp-*"))


# -- the default --seq-len ------------------------------------------------------------------


def test_default_seq_len_fits_the_model_and_dry_run_shows_it(cli, short, corpus, tmp_path):
    r = cli("train", short, "--data", corpus, "-o", tmp_path / "out", "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    assert (doc["seq_len"], doc["seq_len_default"], doc["positions"]) == (POSITIONS, True, POSITIONS)
    assert doc["hyper_parameters"]["seq_len"] == POSITIONS
    text = cli("train", short, "--data", corpus, "-o", tmp_path / "out", "--dry-run")
    assert text.exit_code == 0, text.stderr
    assert "in sequences of 128 (default: the model's 128 positions)" in text.stdout
    _assert_nothing_written(tmp_path)


def test_default_seq_len_is_512_when_the_model_holds_more(cli, corpus, tmp_path):
    cfg = tiny_config("llama")
    cfg.max_position_embeddings = 2048
    model = build_checkpoint(cfg, tmp_path / "long")
    big = tmp_path / "big.jsonl"
    big.write_text(corpus.read_text() * 3)
    r = cli("train", model, "--data", big, "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    assert (r.json()["seq_len"], r.json()["positions"]) == (512, 2048)


def test_default_seq_len_is_recorded_in_the_log_and_provenance(cli, short, corpus, tmp_path):
    out = tmp_path / "out"
    r = cli("train", short, "--data", corpus, "-o", out, "--max-steps", "1", "--batch-size", "2")
    assert r.exit_code == 0, r.stderr
    [start] = [e for e in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if e["event"] == "start"]
    assert (start["seq_len"], start["seq_len_default"], start["positions"]) == (POSITIONS, True, POSITIONS)
    prov = json.loads((out / "neuroloc.json").read_text())
    assert prov["hyper_parameters"]["seq_len"] == POSITIONS and prov["config"]["seq_len"] == POSITIONS


def test_explicit_seq_len_beyond_the_model_is_a_usage_error(cli, short, corpus, tmp_path):
    r = cli("train", short, "--data", corpus, "-o", tmp_path / "out", "--seq-len", "256")
    assert _one_error_line(r, 2) == "error: --seq-len 256 exceeds the model's 128 positions (use --seq-len 128 or less)"
    _assert_nothing_written(tmp_path)


# -- bad flags and recipe values ------------------------------------------------------------


@pytest.mark.parametrize(
    "flag, value, message",
    [
        ("--lr", "0", "error: --lr 0.0: Input should be greater than 0"),
        ("--lr", "-1e-4", "error: --lr -0.0001: Input should be greater than 0"),
        ("--weight-decay", "-0.1", "error: --weight-decay -0.1: Input should be greater than or equal to 0"),
        ("--batch-size", "0", "error: --batch-size 0: Input should be greater than 0"),
        ("--batch-size", "-4", "error: --batch-size -4: Input should be greater than 0"),
        ("--grad-accum", "0", "error: --grad-accum 0: Input should be greater than 0"),
        ("--max-steps", "0", "error: --max-steps 0: Input should be greater than 0"),
        ("--max-steps", "-3", "error: --max-steps -3: Input should be greater than 0"),
        ("--adam-betas", "0.9", "error: --adam-betas: '0.9' is not B1,B2 (e.g. 0.9,0.95)"),
        ("--adam-betas", "0.9,1.5", "error: --adam-betas 0.9,1.5: each beta must be in [0, 1)"),
    ],
)
def test_bad_flag_is_named(cli, short, corpus, tmp_path, flag, value, message):
    r = cli("train", short, "--data", corpus, "-o", tmp_path / "out", flag, value)
    assert _one_error_line(r, 2) == message
    _assert_nothing_written(tmp_path)


def test_bad_data_weight_names_the_data_flag(cli, short, corpus, tmp_path):
    r = cli("train", short, "--data", f"{corpus}:0", "-o", tmp_path / "out")
    assert _one_error_line(r, 2) == f"error: --data {corpus}:0: weight: Input should be greater than 0"


def test_bad_recipe_value_names_the_recipe_and_a_bad_flag_the_flag(cli, short, corpus, tmp_path):
    recipe = tmp_path / "train.yaml"
    recipe.write_text(f"model: {short}\ndata: [{corpus}]\noutput: {tmp_path / 'out'}\nlr: 0\n")
    r = cli("train", "--config", recipe)
    assert _one_error_line(r, 2) == f"error: {recipe}: lr: Input should be greater than 0"
    recipe.write_text(f"model: {short}\ndata: [{corpus}]\noutput: {tmp_path / 'out'}\n")
    r = cli("train", "--config", recipe, "--grad-accum", "0")
    assert _one_error_line(r, 2) == "error: --grad-accum 0: Input should be greater than 0"
    _assert_nothing_written(tmp_path)


# -- bad corpora and model folders ----------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("c.txt", "", "{f}: empty corpus (no text)"),
        ("c.jsonl", "\n\n", "{f}: empty corpus (no text)"),
        (
            "c.jsonl",
            '{"text": "The fox."}\n',
            "{f}: corpus has 5 tokens, shorter than one sequence of 128 tokens (add text or lower --seq-len)",
        ),
        ("c.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": "c"\n', "{f}:3: not a JSON record ("),
        ("c.jsonl", '{"text": "a"}\n{"body": "b"}\n', "{f}:2: no string field 'text'"),
        ("c.jsonl", None, "{f}: no such corpus file"),
    ],
    ids=["empty-txt", "empty-jsonl", "short", "invalid-json", "no-text", "missing"],
)
def test_bad_corpus_is_one_line_naming_the_file(cli, short, tmp_path, name, content, message):
    data = tmp_path / name
    if content is not None:
        data.write_text(content)
    r = cli("train", short, "--data", data, "-o", tmp_path / "out")
    assert _one_error_line(r, 3).startswith("error: " + message.format(f=data))
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    "removed, message",
    [
        (("tokenizer*",), "no tokenizer (tokenizer.json or tokenizer_config.json) in the model folder"),
        (
            ("tokenizer.json",),
            "tokenizer_config.json but no vocabulary (tokenizer.json, tokenizer.model or vocab.json) in the model folder",
        ),
    ],
    ids=["none", "config-only"],
)
def test_model_folder_without_tokenizer_files(cli, short, corpus, tmp_path, removed, message):
    model = tmp_path / "model"
    shutil.copytree(short, model, ignore=shutil.ignore_patterns(*removed))
    for dry in ([], ["--dry-run"]):
        r = cli("train", model, "--data", corpus, "-o", tmp_path / "out", *dry)
        assert _one_error_line(r, 3) == f"error: {model}: {message} (copy the base model's tokenizer files into it)"
    _assert_nothing_written(tmp_path)
