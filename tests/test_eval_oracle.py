"""A model that always answers correctly scores 1.0 on the shipped math and choice tasks;
one that always answers wrongly scores 0.0, in every answer style and with every option of
the math task; perplexities follow their formulas."""

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


RUN_ON = "{n}\nQuestion: Juan tiene 9 peras y regala 2. ¿Cuántas le quedan?\nAnswer: 7"


@pytest.mark.parametrize(
    "style, strict",
    [
        ("{n}", 1.0),
        (" {n}.", 1.0),
        ("{n} apples", 0.0),
        ("The answer is {n}", 0.0),
        ("#### {n}", 0.0),
        (RUN_ON, 1.0),
        (" {n} apples. Bob has 3 pears and 12 plums", 0.0),
    ],
    ids=["bare", "full-stop", "unit", "sentence", "gsm8k", "run-on", "base-model-goes-on"],
)
@pytest.mark.parametrize("wrong", [False, True], ids=["right", "wrong"])
def test_every_answer_style_is_scored_by_its_first_number(cli, zoo, monkeypatch, style, strict, wrong):
    # The sample's answers are 5, 8 and 30; "wrong" answers one more. The run-on answer goes
    # on with another question and another number, cut at the end of the line; a base model
    # goes on in the same line, with more numbers after the answer.
    _use(monkeypatch, OracleLM(math_answer=style, wrong=wrong))
    r = cli("eval", zoo.get("llama").base, "--tasks", "neuroloc_math", "--json")
    assert r.exit_code == 0, r.stderr
    expected = {"exact_match,strict-match": strict, "exact_match,flexible-extract": 1.0}
    assert _metrics(r.json(), "neuroloc_math") == ({k: 0.0 for k in expected} if wrong else expected)


def test_extract_last_takes_the_last_number_of_a_sentence(cli, zoo, monkeypatch):
    # A chain of thought with a thousands separator: the first number is a step, the last the answer.
    _use(monkeypatch, OracleLM(math_answer=" Son 3 pasos, así que la respuesta es {n:,}."))
    scores = {}
    for extract in ("first", "last"):
        r = cli("eval", zoo.get("llama").base, "--tasks", "neuroloc_math", "--task-option", f"neuroloc_math.extract={extract}", "--json")
        assert r.exit_code == 0, r.stderr
        scores[extract] = _metrics(r.json(), "neuroloc_math")
        assert r.json()["config"]["tasks"]["neuroloc_math"]["options"] == {"extract": extract}
    assert scores["first"] == {"exact_match,strict-match": 0.0, "exact_match,flexible-extract": 0.0}
    assert scores["last"] == {"exact_match,strict-match": 0.0, "exact_match,flexible-extract": 1.0}


@pytest.mark.parametrize(
    "until, stops, flexible",
    [(None, ["\n", "Question:"], 1.0), ('["Question:"]', ["Question:"], 1.0), ("[]", [], 0.0)],
    ids=["default", "question-only", "none"],
)
def test_stop_sequences_decide_where_a_run_on_answer_ends(cli, zoo, monkeypatch, until, stops, flexible):
    # With no stop sequence the run-on answer's own "Answer: 7" is the last number, not the answer.
    lm = _use(monkeypatch, OracleLM(math_answer=RUN_ON))
    options = ["--task-option", f"neuroloc_math.until={until}"] if until else []
    r = cli("eval", zoo.get("llama").base, "--tasks", "neuroloc_math", *options, "--task-option", "neuroloc_math.extract=last", "--json")
    assert r.exit_code == 0, r.stderr
    assert {tuple(k["until"]) for k in lm.gen_kwargs} == {tuple(stops)}
    assert _metrics(r.json(), "neuroloc_math")["exact_match,flexible-extract"] == flexible


def test_prompt_of_a_shape_and_of_one_task(cli, zoo, monkeypatch, tmp_path):
    es, de = tmp_path / "es.jsonl", tmp_path / "de.jsonl"
    es.write_text(json.dumps({"question": "¿2+2?", "answer_number": 4, "tema": "suma"}) + "\n")
    de.write_text(json.dumps({"question": "2+3?", "answer_number": 5}) + "\n")
    lm = _use(monkeypatch, OracleLM())
    r = cli(
        "eval",
        zoo.get("llama").base,
        "--tasks",
        f"neuroloc_math={es},neuroloc_math={de}",
        "--task-option",
        "neuroloc_math_es.prompt=Pregunta ({{tema}}): {{question}}\\nRespuesta:",
        "--task-option",
        "neuroloc_math.prompt=Q: {{question}}\\nA:",
        "--task-option",
        "neuroloc_math.max_gen_toks=40",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    assert sorted(lm.prompts) == ["Pregunta (suma): ¿2+2?\nRespuesta:", "Q: 2+3?\nA:"]  # the task's own prompt wins
    assert {k["max_gen_toks"] for k in lm.gen_kwargs} == {40}
    model = r.json()["models"][0]
    assert model["max_gen_toks"] == {"neuroloc_math_es": 40, "neuroloc_math_de": 40}
    assert {t: m["exact_match,flexible-extract"]["value"] for t, m in model["tasks"].items()} == {
        "neuroloc_math_es": 1.0,
        "neuroloc_math_de": 1.0,
    }


def test_prompt_field_missing_from_a_record_is_named_with_its_line(cli, zoo, monkeypatch, tmp_path):
    monkeypatch.setattr(runner, "load_lm", lambda *a, **k: pytest.fail("a model was loaded despite the mistake"))
    data = tmp_path / "es.jsonl"
    data.write_text(
        json.dumps({"question": "?", "answer_number": 1, "tema": "x"}) + "\n" + json.dumps({"question": "?", "answer_number": 1}) + "\n"
    )
    r = cli(
        "eval", zoo.get("llama").base, "--tasks", f"neuroloc_math={data}", "--task-option", "neuroloc_math.prompt={{tema}}: {{question}}"
    )
    assert r.exit_code == 3
    assert r.stderr.splitlines() == [f"error: {data}:2: record lacks key(s) 'tema' (each record needs question, answer_number, tema)"]


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
    assert m["token_perplexity"] == pytest.approx(math.exp(nats))  # the fake's tokens are bytes
    assert m["byte_perplexity"] == pytest.approx(math.exp(nats))
    assert m["bits_per_byte"] == pytest.approx(nats / math.log(2))
    assert m["word_perplexity"] == pytest.approx(math.exp(nats * total_bytes / total_words))
    assert doc["models"][0]["tasks"]["ppl_de"]["byte_perplexity"]["stderr"] is None
