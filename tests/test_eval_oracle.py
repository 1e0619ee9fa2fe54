"""A model that always answers correctly scores 1.0 on the shipped math and choice tasks;
one that always answers wrongly scores 0.0; perplexities follow their formulas."""

from __future__ import annotations

import json
import math

import pytest

from neuroloc_cli.eval import runner
from neuroloc_cli.eval.specs import SAMPLES_DIR
from tests.eval_fakes import OracleLM


def _use(monkeypatch, lm: OracleLM) -> OracleLM:
    monkeypatch.setattr(runner, "load_lm", lambda *a, **k: lm)
    return lm


def _metrics(doc, task):
    return {k: v["value"] for k, v in doc["models"][0]["tasks"][task].items()}


@pytest.mark.parametrize("wrong, expected", [(False, 1.0), (True, 0.0)])
def test_oracle_scores_math_and_choice(cli, zoo, monkeypatch, wrong, expected):
    _use(monkeypatch, OracleLM(wrong=wrong))
    r = cli("eval", zoo.get("llama").base, "--tasks", "neuroloc_math,neuroloc_choice", "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    assert _metrics(doc, "neuroloc_math") == {"exact_match,strict-match": expected, "exact_match,flexible-extract": expected}
    assert _metrics(doc, "neuroloc_choice") == {"acc": expected, "acc_norm": expected}
    n_records = sum(1 for line in (SAMPLES_DIR / "math_es.jsonl").read_text().splitlines() if line.strip())
    assert doc["models"][0]["n_samples"]["neuroloc_math"] == n_records


def test_number_extraction_takes_the_last_number_of_a_sentence(cli, zoo, monkeypatch):
    # A chatty answer with a thousands separator: only flexible-extract finds the number.
    _use(monkeypatch, OracleLM(math_answer=" Son 3 pasos, así que la respuesta es {n:,}."))
    r = cli("eval", zoo.get("llama").base, "--tasks", "neuroloc_math", "--json")
    assert r.exit_code == 0, r.stderr
    assert _metrics(r.json(), "neuroloc_math") == {"exact_match,strict-match": 0.0, "exact_match,flexible-extract": 1.0}


def test_perplexity_per_language_follows_the_formulas(cli, zoo, monkeypatch, tmp_path):
    nats = 0.7
    _use(monkeypatch, OracleLM(nats_per_byte=nats))
    de = tmp_path / "german.jsonl"
    texts = ["Der schnelle braune Fuchs.", "Zwei und drei ist fünf."]
    de.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    r = cli("eval", zoo.get("llama").base, "--ppl", SAMPLES_DIR / "ppl" / "es.jsonl", "--ppl", f"{de}:de", "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    assert set(doc["models"][0]["tasks"]) == {"ppl_es", "ppl_de"}
    m = _metrics(doc, "ppl_de")
    total_bytes = sum(len(t.encode()) for t in texts)
    total_words = sum(len(t.split()) for t in texts)
    assert m["byte_perplexity"] == pytest.approx(math.exp(nats))
    assert m["bits_per_byte"] == pytest.approx(nats / math.log(2))
    assert m["word_perplexity"] == pytest.approx(math.exp(nats * total_bytes / total_words))
    assert doc["models"][0]["tasks"]["ppl_de"]["byte_perplexity"]["stderr"] is None
