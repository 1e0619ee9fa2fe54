"""A toy multilingual world, generated deterministically from a seed.

Four languages share one set of concepts (people and animals, things, places, actions,
qualities) and one semantic distribution; each has its own words, its own clause order (SVO,
VSO, SOV, VOS), its own adjective position, function words and punctuation. Only the digits
are shared. One ability, sums of two digits below ten (`what is 3 plus 4 ? 7 .`), is
taught in one language only; general text in every language uses the same question frame
(`what is the dog sees ? the ball .`) and the word `plus` (`the dog plus the cat ...`), so
that the ability has something to transfer along. A share of the pretraining documents are
code-switched (words swapped with another language's word for the same concept): without
them a model learns four unrelated languages and nothing transfers between them.

    world = World.generate(seed=0)
    world.write(folder)            # text files, jsonl tasks, and tokenizer.json

Every document is words separated by single spaces, numbers written as digits; the
word-level tokenizer (`tokenizer()`) splits a number into one token per digit and decodes
every document back to itself.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LANGUAGES = ("ka", "mo", "sel", "vu")
"""The world's language codes (none is a real language's code, so that prompts show them as they are)."""
ABILITY_LANGUAGE = "ka"
"""The language the arithmetic is taught in."""
ORDERS = {"ka": "SVO", "mo": "VSO", "sel": "SOV", "vu": "VOS"}
ADJ_AFTER = {"ka": False, "mo": True, "sel": False, "vu": True}
"""Whether a language puts its adjective after the noun."""
SPECIALS = ("<unk>", "<s>", "</s>", "<pad>")
TRANSLATE_TEMPLATE = "{src} : {source} {tgt} :"
"""The translation prompt of the world (`eval --translate --template`, `train --method landermt`):
only words of the tokenizer, so that no prompt token is unknown."""
MATH_PROMPT = "{{question}}"
"""The `neuroloc_math` prompt (`--task-option neuroloc_math.prompt=...`): the question as it is."""
MATH_UNTIL = "."
"""Where a generated answer stops: the language's full stop (each language's own, see `full_stop`)."""

# Concept inventory: kinds and counts. Actions take objects of some kinds only (selectional
# preferences), which gives the model something to learn beyond word frequencies.
_KINDS = {"agent": 12, "thing": 16, "place": 8, "quality": 10}
_ACTIONS = {
    "act0": ("thing",),
    "act1": ("thing",),
    "act2": ("thing", "agent"),
    "act3": ("agent",),
    "act4": ("thing",),
    "act5": ("thing", "agent"),
}
_ACTIONS.update({f"act{i}": ("thing",) for i in range(6, 10)})
_FUNCTION = ("det", "in", "what", "is", "plus", "qmark", "stop", "and")
_CONSONANTS = "ptkbdgmnlrsfvzhjw"
_VOWELS = "aeiou"


def _rng(seed: int, stream: str) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`: the same on every platform and run.
    return random.Random(f"neuroloc-demo/{seed}/{stream}")


def _concepts() -> list[str]:
    names = [f"{kind}{i}" for kind, n in _KINDS.items() for i in range(n)]
    return names + list(_ACTIONS) + list(_FUNCTION)


def _lexicon(seed: int) -> dict[str, dict[str, str]]:
    """language -> concept -> word; no word is shared between languages or concepts."""
    used: set[str] = set()
    lex: dict[str, dict[str, str]] = {}
    for lang in LANGUAGES:
        r = _rng(seed, f"lexicon/{lang}")
        consonants = "".join(r.sample(_CONSONANTS, 9))  # each language sounds its own
        vowels = "".join(r.sample(_VOWELS, 3))
        words: dict[str, str] = {}
        for concept in _concepts():
            if concept in ("qmark", "stop"):
                continue
            short = concept in _FUNCTION
            while True:
                syllables = 1 if short else r.choice((2, 2, 3))
                word = "".join(r.choice(consonants) + r.choice(vowels) for _ in range(syllables))
                if word not in used:
                    break
            used.add(word)
            words[concept] = word
        lex[lang] = words
    marks = ["?", "!", "¿", ";"], [".", "|", "~", "%"]
    for i, lang in enumerate(LANGUAGES):
        lex[lang]["qmark"], lex[lang]["stop"] = marks[0][i], marks[1][i]
    return lex


@dataclass(frozen=True)
class Clause:
    """One meaning: who does what to what (and where), language-free."""

    subject: tuple[str, ...]  # concepts of the subject phrase: (noun,), (noun, quality) or (noun, "plus", noun)
    action: str
    obj: tuple[str, ...]
    place: str | None


@dataclass(frozen=True)
class World:
    """The generated world: its lexicon and its corpora (lists of documents per language)."""

    seed: int
    lexicon: dict[str, dict[str, str]]
    general: dict[str, list[str]]
    heldout: dict[str, list[str]]
    code_switched: list[str]
    math_train: list[str]
    math_test: dict[str, list[dict[str, Any]]]
    parallel: dict[str, list[dict[str, str]]]  # "src-tgt" -> [{source, target}]
    parallel_test: dict[str, list[dict[str, str]]]

    @classmethod
    def generate(
        cls, seed: int = 0, *, docs: int = 600, heldout: int = 60, math_docs: int = 400, math_test: int = 40, pairs: int = 300
    ) -> World:
        """Generate the world.

        Args:
            seed: everything follows from it.
            docs: general documents per language (a few clauses each).
            heldout: held-out general documents per language, for perplexity.
            math_docs: arithmetic documents (in ABILITY_LANGUAGE only).
            math_test: test questions per language (the same sums in every language, at most 55).
            pairs: parallel sentences per translation direction (and a tenth as many for test).
        """
        lex = _lexicon(seed)
        world = _Writer(seed, lex)
        general, held = {}, {}
        for lang in LANGUAGES:
            r = _rng(seed, f"general/{lang}")
            general[lang] = [world.document(r, lang) for _ in range(docs)]
            r = _rng(seed, f"heldout/{lang}")
            held[lang] = [world.document(r, lang) for _ in range(heldout)]
        r = _rng(seed, "code-switched")
        switched = [world.code_switch(r) for _ in range(max(1, docs // 5) * len(LANGUAGES))]
        train_sums, test_sums = _sums(_rng(seed, "sums"), math_test)
        r = _rng(seed, "math")
        math_train = [
            " ".join(world.sum_line(ABILITY_LANGUAGE, *r.choice(train_sums)) for _ in range(r.randint(2, 4))) for _ in range(math_docs)
        ]
        tests = {lang: [{"question": world.sum_question(lang, a, b), "answer_number": a + b} for a, b in test_sums] for lang in LANGUAGES}
        parallel, parallel_test = {}, {}
        for src in LANGUAGES:
            for tgt in LANGUAGES:
                if src != tgt:
                    r = _rng(seed, f"parallel/{src}-{tgt}")
                    parallel[f"{src}-{tgt}"] = [world.pair(r, src, tgt) for _ in range(pairs)]
                    parallel_test[f"{src}-{tgt}"] = [world.pair(r, src, tgt) for _ in range(max(1, pairs // 10))]
        return cls(seed, lex, general, held, switched, math_train, tests, parallel, parallel_test)

    def documents(self) -> list[str]:
        """Every generated document and sentence (what the tokenizer must round-trip)."""
        out = [d for docs in (*self.general.values(), *self.heldout.values()) for d in docs]
        out += self.code_switched + self.math_train
        out += [t["question"] for tests in self.math_test.values() for t in tests]
        for pairs in (*self.parallel.values(), *self.parallel_test.values()):
            out += [p[k] for p in pairs for k in ("source", "target")]
        return out

    def vocabulary(self) -> list[str]:
        """The tokenizer's words: special tokens, the word boundary, digits, then every word."""
        words = sorted({w for lang in LANGUAGES for w in self.lexicon[lang].values()} | set(LANGUAGES) | {":"})
        return [*SPECIALS, "▁", *map(str, range(10)), *(f"▁{w}" for w in words)]

    def tokenizer(self):
        """A `transformers` fast tokenizer over `vocabulary()` (WordLevel; one token per digit).

        Returns:
            A `PreTrainedTokenizerFast` that appends EOS to nothing by itself (the trainer adds
            EOS per document) and decodes every generated document back to itself.
        """
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from transformers import PreTrainedTokenizerFast

        vocab = {w: i for i, w in enumerate(self.vocabulary())}
        tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
        # "what is 23" -> ▁what ▁is ▁ 2 3: the word boundary, then one token per digit
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Digits(individual_digits=True)])
        tok.decoder = decoders.Metaspace()
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")

    def write(self, folder: Path) -> dict[str, Path]:
        """Write the corpora, tasks and tokenizer into `folder` (created); returns the paths by role.

        Layout: general/LANG.txt (one document per paragraph), code-switched.txt, math-LANG.txt,
        heldout/LANG.jsonl ({"text"}), math/LANG.jsonl ({"question", "answer_number"}),
        parallel/SRC-TGT.jsonl and parallel-test/SRC-TGT.jsonl ({"source", "target"}),
        tokenizer/ (tokenizer.json, tokenizer_config.json, special_tokens_map.json).
        """
        folder.mkdir(parents=True, exist_ok=True)
        paths: dict[str, Path] = {}

        def put(rel: str, text: str) -> None:
            path = folder / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            paths[rel] = path

        def lines(records: list[dict[str, Any]]) -> str:
            return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)

        for lang in LANGUAGES:
            put(f"general/{lang}.txt", "\n\n".join(self.general[lang]) + "\n")
            put(f"heldout/{lang}.jsonl", lines([{"text": d} for d in self.heldout[lang]]))
            put(f"math/{lang}.jsonl", lines(self.math_test[lang]))
        put("code-switched.txt", "\n\n".join(self.code_switched) + "\n")
        put(f"math-{ABILITY_LANGUAGE}.txt", "\n\n".join(self.math_train) + "\n")
        for direction in self.parallel:
            put(f"parallel/{direction}.jsonl", lines(self.parallel[direction]))
            put(f"parallel-test/{direction}.jsonl", lines(self.parallel_test[direction]))
        self.tokenizer().save_pretrained(folder / "tokenizer")
        paths["tokenizer"] = folder / "tokenizer"
        return paths

    def full_stop(self, lang: str) -> str:
        """The language's sentence-final mark."""
        return self.lexicon[lang]["stop"]


def _sums(r: random.Random, n_test: int) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """The 55 sums a + b of single digits below 10 (a one-digit answer), all taught; the test
    asks `n_test` of them (all 55 when `n_test` >= 55) in every language.

    Two-digit sums without carry were only a third learned after 400 steps of the quick
    model; single digits are learned in under 200. What the demo measures is whether an
    ability taught in one language answers in the others, not whether it reaches new sums.
    """
    every = [(a, b) for a in range(10) for b in range(10) if a + b < 10]
    test = list(every)
    r.shuffle(test)
    return every, test[: min(n_test, len(every))]


class _Writer:
    """Renders meanings in a language."""

    def __init__(self, seed: int, lexicon: dict[str, dict[str, str]]) -> None:
        self.seed = seed
        self.lex = lexicon
        self.concepts = {kind: [f"{kind}{i}" for i in range(n)] for kind, n in _KINDS.items()}

    # meanings ---------------------------------------------------------------------------
    def clause(self, r: random.Random) -> Clause:
        action = r.choice(list(_ACTIONS))
        subject: tuple[str, ...] = (r.choice(self.concepts["agent"]),)
        roll = r.random()
        if roll < 0.15:
            subject = (subject[0], "plus", r.choice(self.concepts["agent"]))
        elif roll < 0.45:
            subject = (subject[0], r.choice(self.concepts["quality"]))
        obj: tuple[str, ...] = (r.choice(self.concepts[r.choice(_ACTIONS[action])]),)
        if r.random() < 0.3:
            obj = (obj[0], r.choice(self.concepts["quality"]))
        elif r.random() < 0.15:
            obj = (obj[0], str(r.randint(2, 9)))  # a count: digits are shared by every language
        place = r.choice(self.concepts["place"]) if r.random() < 0.3 else None
        return Clause(subject, action, obj, place)

    # rendering --------------------------------------------------------------------------
    def phrase(self, lang: str, concepts: tuple[str, ...]) -> list[str]:
        w = self.lex[lang]
        if len(concepts) == 3:  # noun plus noun
            return [*self.phrase(lang, concepts[:1]), w["plus"], *self.phrase(lang, concepts[2:])]
        noun = [w[concepts[0]]]
        if len(concepts) == 1:
            return [w["det"], *noun]
        mod = concepts[1] if concepts[1].isdigit() else w[concepts[1]]
        return [w["det"], *noun, mod] if ADJ_AFTER[lang] else [w["det"], mod, *noun]

    def sentence(self, lang: str, c: Clause) -> list[str]:
        w = self.lex[lang]
        parts = {"S": self.phrase(lang, c.subject), "V": [w[c.action]], "O": self.phrase(lang, c.obj)}
        words = [word for role in ORDERS[lang] for word in parts[role]]
        if c.place:
            words += [w["in"], w["det"], w[c.place]]
        return [*words, w["stop"]]

    def question(self, lang: str, c: Clause) -> list[str]:
        """`what is <subject> <action> ? <object> .`: the frame the arithmetic shares."""
        w = self.lex[lang]
        return [w["what"], w["is"], *self.phrase(lang, c.subject), w[c.action], w["qmark"], *self.phrase(lang, c.obj), w["stop"]]

    def document(self, r: random.Random, lang: str) -> str:
        clauses = [self.clause(r) for _ in range(r.randint(2, 5))]
        words = [word for c in clauses for word in self.sentence(lang, c)]
        if r.random() < 0.5:
            words += self.question(lang, r.choice(clauses))
        return " ".join(words)

    def code_switch(self, r: random.Random) -> str:
        """A document of one language with a third of its words in another language."""
        lang, other = r.sample(LANGUAGES, 2)
        clauses = [self.clause(r) for _ in range(r.randint(2, 5))]
        inverse = {word: concept for concept, word in self.lex[lang].items()}
        words = []
        for c in clauses:
            for word in self.sentence(lang, c) + (self.question(lang, c) if r.random() < 0.3 else []):
                concept = inverse.get(word)
                words.append(self.lex[other][concept] if concept and r.random() < 0.33 else word)
        return " ".join(words)

    def sum_question(self, lang: str, a: int, b: int) -> str:
        w = self.lex[lang]
        return " ".join([w["what"], w["is"], str(a), w["plus"], str(b), w["qmark"]])

    def sum_line(self, lang: str, a: int, b: int) -> str:
        return f"{self.sum_question(lang, a, b)} {a + b} {self.lex[lang]['stop']}"

    def pair(self, r: random.Random, src: str, tgt: str) -> dict[str, str]:
        c = self.clause(r)
        return {"source": " ".join(self.sentence(src, c)), "target": " ".join(self.sentence(tgt, c))}
