"""Scores of tiny real models that do not depend on how they were asked for: a generation
task's predictions are the same alone, beside another task and at any batch size; a
perplexity is the one transformers gives for the document after one BOS."""

from __future__ import annotations

import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
import torch

WORDS = "Ana tiene manzanas compra más cuántas tren lleva vagones quitan quedan Pedro lee páginas día durante total".split()


def _questions(path: Path, n: int, seed: int) -> Path:
    """Math records whose questions have very different lengths, so that batches need padding."""
    rng = random.Random(seed)
    records = [
        {
            "question": " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 25))) + f" {rng.randint(1, 99)}?",
            "answer_number": rng.randint(1, 99),
        }
        for _ in range(n)
    ]
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def _predictions(cli, model: Path, tasks: str, batch_size: int, out: Path) -> list:
    r = cli("eval", model, "--tasks", tasks, "--batch-size", batch_size, "--bootstrap-iters", "0", "-o", out)
    assert r.exit_code == 0, r.stderr
    lines = (out / "samples_neuroloc_math_a.jsonl").read_text(encoding="utf-8").splitlines()
    return [(s["doc_id"], s["filter"], s["resps"]) for s in map(json.loads, lines)]


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_predictions_do_not_depend_on_company_or_batch_size(cli, zoo, tmp_path, arch):
    # With lm-eval's batched generation, 2 of these 8 bfloat16 llama predictions change at
    # batch size 8, alone or beside the other task: two tokens tie, and padding rounds one up.
    model = zoo.get(arch).base
    a, b = _questions(tmp_path / "a.jsonl", 8, seed=5), _questions(tmp_path / "b.jsonl", 8, seed=105)
    alone_1 = _predictions(cli, model, f"neuroloc_math={a}", 1, tmp_path / "alone1")
    alone_8 = _predictions(cli, model, f"neuroloc_math={a}", 8, tmp_path / "alone8")
    company_8 = _predictions(cli, model, f"neuroloc_math={b},neuroloc_math={a}", 8, tmp_path / "company8")
    assert len(alone_1) == 2 * 8  # a prediction per document and filter
    assert alone_8 == alone_1
    assert company_8 == alone_1


def _bos_adding_copy(model: Path, folder: Path) -> Path:
    """`model` with a tokenizer that puts <s> before every text, as Llama's and Mistral's do."""
    from tokenizers import Tokenizer
    from tokenizers.processors import TemplateProcessing

    shutil.copytree(model, folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 0)])
    tok.save(str(folder / "tokenizer.json"))
    return folder


TEXTS = ["El zorro marrón rápido salta sobre el perro perezoso.", "Dos más tres son cinco, y cinco por cuatro son veinte."]


def _nll_after_one_bos(model: Path, text: str) -> tuple[float, int]:
    """The document's summed negative log-likelihood in nats, computed with transformers alone,
    after the model's BOS and nothing else, and its number of tokens."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    lm = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
    ids = [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids
    with torch.no_grad():
        logits = lm(torch.tensor([ids])).logits[0, :-1]
    return torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="sum").item(), len(ids) - 1


@pytest.mark.parametrize("tokenizer", ["plain", "adds-bos"])
def test_perplexities_are_those_of_the_document_after_one_bos(cli, zoo, tmp_path, tokenizer):
    model = zoo.get("llama").base
    if tokenizer == "adds-bos":
        model = _bos_adding_copy(model, tmp_path / "bos")
    data = tmp_path / "es.jsonl"
    data.write_text("".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in TEXTS), encoding="utf-8")
    out = tmp_path / "out"
    r = cli("eval", model, "--ppl", data, "--dtype", "float32", "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    ours = {k: v["value"] for k, v in r.json()["models"][0]["tasks"]["ppl_es"].items()}
    scored = [_nll_after_one_bos(model, t) for t in TEXTS]
    nll, tokens = sum(s[0] for s in scored), sum(s[1] for s in scored)
    words = sum(len(re.split(r"\s+", t)) for t in TEXTS)
    assert ours["token_perplexity"] == pytest.approx(math.exp(nll / tokens), rel=1e-5)
    assert ours["word_perplexity"] == pytest.approx(math.exp(nll / words), rel=1e-5)
    assert ours["byte_perplexity"] == pytest.approx(math.exp(nll / sum(len(t.encode()) for t in TEXTS)), rel=1e-5)
    samples = [json.loads(line) for line in (out / "samples_ppl_es.jsonl").read_text(encoding="utf-8").splitlines()]
    assert [s["tokens"] for s in samples] == [s[1] for s in scored]


def test_lm_eval_rolling_tasks_get_one_bos_too(zoo, tmp_path):
    # lm-eval's own HFLM (0.4.13) scores a second BOS with this tokenizer; neuroloc's model does not.
    from lm_eval.api.instance import Instance

    from neuroloc_cli.eval.lm import NeurolocLM

    model = _bos_adding_copy(zoo.get("llama").base, tmp_path / "bos")
    request = [Instance("loglikelihood_rolling", {}, (TEXTS[0],), 0)]
    nll, _ = _nll_after_one_bos(model, TEXTS[0])
    ours = NeurolocLM(pretrained=str(model), device="cpu", dtype="float32").loglikelihood_rolling(request)[0]
    assert ours == pytest.approx(-nll, rel=1e-5)
