"""Token rows (embedding and LM head) located by `locate delta` and carried by the mask into
`train --train-mask` and `merge`: inside the selected rows things move, outside bit for bit
nothing does."""

from __future__ import annotations

import json
import random

import pytest
import torch

from neuroloc_cli.masks import Mask
from tests.conftest import write_recipe
from tests.helpers import load_all

TOKEN_ROWS = ("model.embed_tokens.weight", "lm_head.weight")


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32) if t.dtype == torch.float32 else t.view(torch.int16)


@pytest.fixture
def token_mask(zoo, cli, tmp_path):
    fam = zoo.get("llama", dtype=torch.float32)
    path = tmp_path / "tokens.safetensors"
    r = cli("locate", "delta", fam.base, fam.ft1, "--top", "0.1", "--include", "*embed_tokens*", "--include", "lm_head.weight", "-o", path)
    assert r.exit_code == 0, r.stderr
    mask = Mask.load(path)
    assert set(mask.entries) == set(TOKEN_ROWS) and all(e.axis == 0 for e in mask.entries.values())
    return fam, path, mask


def test_a_token_row_mask_restricts_a_merge(cli, tmp_path, token_mask):
    fam, path, mask = token_mask
    recipe = write_recipe(
        tmp_path,
        f"merge_method: task_arithmetic\nbase_model: {fam.base}\nmask: {path}\nmodels: [{{model: {fam.ft1}, parameters: {{weight: 1.0}}}}]\n",
    )
    r = cli("merge", recipe, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    base, ft, out = load_all(fam.base), load_all(fam.ft1), load_all(tmp_path / "out")
    for name in base:
        sel = mask.entries[name].dense() if name in mask.entries else torch.zeros_like(base[name], dtype=torch.bool)
        assert torch.equal(_bits(out[name])[~sel], _bits(base[name])[~sel]), name  # outside: the base, bit for bit
        # inside: base + 1.0·(ft − base), computed here in float32 as the recipe says
        assert torch.equal(out[name][sel], (base[name] + (ft[name] - base[name]))[sel]), name


def test_a_token_row_mask_restricts_training(cli, tmp_path, token_mask):
    fam, path, mask = token_mask
    rng = random.Random(0)
    words = ["the", "fox", "jumps", "over", "lazy", "dog", "river", "stone"]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join(json.dumps({"text": " ".join(rng.choice(words) for _ in range(12))}) + "\n" for _ in range(80)))
    r = cli(
        "train",
        fam.base,
        "--data",
        corpus,
        "--train-mask",
        path,
        "-o",
        tmp_path / "out",
        "--max-steps",
        "3",
        "--lr",
        "1e-2",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--eval-share",
        "0",
        "--seed",
        "0",
    )
    assert r.exit_code == 0, r.stderr
    base, out = load_all(fam.base), load_all(tmp_path / "out")
    moved = 0
    for name in base:
        if name not in mask.entries:
            assert torch.equal(_bits(out[name]), _bits(base[name])), name
            continue
        sel = mask.entries[name].dense()
        assert torch.equal(_bits(out[name])[~sel], _bits(base[name])[~sel]), name
        moved += int((out[name] != base[name]).any(dim=1).sum())
    assert moved > 0  # the selected token rows did train
