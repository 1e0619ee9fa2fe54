"""The demo's toy world: deterministic from its seed, round-tripped by its tokenizer, and in
the shapes the eval tasks and the translation readers take."""

from __future__ import annotations

from pathlib import Path

import pytest

from neuroloc_cli.demo.world import ABILITY_LANGUAGE, LANGUAGES, World

SMALL = dict(docs=30, heldout=5, math_docs=20, math_test=6, pairs=20)


def _bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def world() -> World:
    return World.generate(0, **SMALL)


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    World.generate(3, **SMALL).write(tmp_path / "a")
    World.generate(3, **SMALL).write(tmp_path / "b")
    World.generate(4, **SMALL).write(tmp_path / "c")
    a, b, c = _bytes(tmp_path / "a"), _bytes(tmp_path / "b"), _bytes(tmp_path / "c")
    assert a == b and len(a) > 20
    assert set(a) == set(c)
    assert all(a[k] != c[k] for k in a if k.startswith(("general/", "math/", "parallel/")))


def test_documents_differ_from_each_other(world):
    for lang in LANGUAGES:
        assert len(set(world.general[lang])) > 0.9 * len(world.general[lang])


def test_the_saved_tokenizer_round_trips_every_document(world, tmp_path):
    from transformers import AutoTokenizer

    world.write(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path / "tokenizer")
    docs = world.documents()
    assert len(docs) > 500
    for doc in docs:
        ids = tok(doc)["input_ids"]
        assert tok.unk_token_id not in ids, doc
        assert tok.decode(ids) == doc
    assert tok.convert_ids_to_tokens(tok("what 23")["input_ids"])[-3:] == ["▁", "2", "3"]  # one token per digit


def test_languages_share_only_digits(world):
    words = {lang: set(world.lexicon[lang].values()) for lang in LANGUAGES}
    for i, a in enumerate(LANGUAGES):
        for b in LANGUAGES[i + 1 :]:
            assert not words[a] & words[b], (a, b)
    tokens = {lang: {t for d in world.general[lang] for t in d.split()} for lang in LANGUAGES}
    shared = set.intersection(*tokens.values())
    assert shared and shared <= set("0123456789")


def test_code_switched_documents_mix_two_languages(world):
    owner = {w: lang for lang in LANGUAGES for w in world.lexicon[lang].values()}
    for doc in world.code_switched:
        langs = {owner[t] for t in doc.split() if t in owner}
        assert len(langs) == 2, doc


def test_arithmetic_is_taught_in_one_language_and_tested_in_all(world):
    lex = world.lexicon
    plus = {lang: lex[lang]["plus"] for lang in LANGUAGES}
    for doc in world.math_train:
        words = doc.split()
        assert plus[ABILITY_LANGUAGE] in words and not any(plus[o] in words for o in LANGUAGES if o != ABILITY_LANGUAGE)
        for i, w in enumerate(words):  # `what is A plus B ? C .`: single digits, C = A + B below 10
            if w == plus[ABILITY_LANGUAGE]:
                a, b, c = int(words[i - 1]), int(words[i + 1]), int(words[i + 3])
                assert c == a + b < 10 and len(words[i - 1]) == len(words[i + 1]) == 1
    sums = [t["answer_number"] for t in world.math_test[ABILITY_LANGUAGE]]
    for lang in LANGUAGES:
        assert [t["answer_number"] for t in world.math_test[lang]] == sums
        assert all(plus[lang] in t["question"].split() for t in world.math_test[lang])
    # the test asks every sum once, all of them taught: what is measured is the ability in
    # another language, not new sums
    big = World.generate(0, **{**SMALL, "math_docs": 200, "math_test": 100})
    stop = f" {big.full_stop(ABILITY_LANGUAGE)}"
    taught = {" ".join(line.split()[:6]) for d in big.math_train for line in d.split(stop)}
    assert len(big.math_test[ABILITY_LANGUAGE]) == 55 and all(t["question"] in taught for t in big.math_test[ABILITY_LANGUAGE])


def test_files_are_in_the_shapes_eval_and_translation_read(world, tmp_path):
    from neuroloc_cli.eval.specs import read_jsonl
    from neuroloc_cli.runtime.prompts import read_pairs

    world.write(tmp_path)
    for lang in LANGUAGES:
        assert len(read_jsonl(tmp_path / "math" / f"{lang}.jsonl", ("question", "answer_number"))) == SMALL["math_test"]
        assert len(read_jsonl(tmp_path / "heldout" / f"{lang}.jsonl", ("text",))) == SMALL["heldout"]
    pairs = read_pairs(tmp_path / "parallel" / "ka-mo.jsonl")
    assert len(pairs) == SMALL["pairs"]
    assert pairs[0] == (world.parallel["ka-mo"][0]["source"], world.parallel["ka-mo"][0]["target"])
    assert (tmp_path / "general" / "ka.txt").read_text().count("\n\n") == SMALL["docs"] - 1
