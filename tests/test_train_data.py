"""Training data and recipe schema: reading, packing, held-out split, mixture sampling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from neuroloc_cli.errors import InputError, RecipeError
from neuroloc_cli.runtime.data import framing_of, load_tokenizer, read_documents
from neuroloc_cli.train.config import DataSource, build_config, parse_data_spec
from neuroloc_cli.train.data import Corpus, MixtureSampler, load_corpora

RECIPES = sorted((Path(__file__).parent.parent / "recipes").glob("train-*.yaml"))


@pytest.fixture(scope="module")
def tokenizer(zoo):
    return load_tokenizer(zoo.get("llama").base)


@pytest.fixture(scope="module")
def packed(tokenizer):
    return framing_of(tokenizer, "packed", "paragraph")


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def test_packing_matches_independent_tokenization(tmp_path, tokenizer, packed):
    texts = [f"The fox number {i} jumps over the lazy dog." for i in range(40)]
    path = _jsonl(tmp_path / "c.jsonl", texts)
    [corpus] = load_corpora([DataSource(path=str(path))], tokenizer, packed, seq_len=16, eval_share=0.25)
    stream = []
    for t in texts:
        stream += tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(stream) // 16
    expected = torch.tensor(stream[: n * 16]).view(n, 16)
    held = int(n * 0.25)
    assert corpus.tokens == len(stream)
    assert torch.equal(corpus.train, expected[: n - held])
    assert torch.equal(corpus.held_out, expected[n - held :])


def test_txt_documents_split_at_blank_lines(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("first line\nstill first\n\nsecond\n\n\n")
    docs = read_documents(path)
    assert docs.texts == ["first line\nstill first", "second"]
    import hashlib

    assert docs.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "\n\n  \n", "empty.txt: empty corpus (no text)"),
        ("bad.jsonl", '{"text": "ok"}\n{"body": "x"}\n', "bad.jsonl:2: no string field 'text'"),
        ("broken.jsonl", '{"text": "ok"\n', "broken.jsonl:1: not a JSON record"),
        ("data.csv", "a,b\n", "data.csv: unknown corpus kind '.csv'"),
    ],
)
def test_bad_corpora(tmp_path, tokenizer, packed, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError) as e:
        load_corpora([DataSource(path=str(path))], tokenizer, packed, seq_len=8, eval_share=0.0)
    assert message in str(e.value)


def test_corpus_shorter_than_one_sequence(tmp_path, tokenizer, packed):
    path = _jsonl(tmp_path / "short.jsonl", ["The quick brown fox."])
    n = len(tokenizer("The quick brown fox.", add_special_tokens=False)["input_ids"]) + 1
    with pytest.raises(InputError) as e:
        load_corpora([DataSource(path=str(path))], tokenizer, packed, seq_len=512, eval_share=0.0)
    assert str(e.value).startswith(f"{path}: corpus has {n} tokens, shorter than one sequence of 512 tokens")


def _corpus(name: str, n: int, offset: int, weight: float) -> Corpus:
    # Unique rows, so that repeated draws are visible.
    rows = torch.arange(offset, offset + 4 * n).view(n, 4)
    return Corpus(Path(name), weight, rows, rows[:0], 4 * n, "0" * 64)


def test_mixture_sampler_follows_weights_and_resumes():
    a, b = _corpus("a", 200, 0, 3.0), _corpus("b", 200, 10_000, 1.0)
    s = MixtureSampler([a, b], seed=7)
    batches = [s.next_batch(step, 64) for step in range(10)]
    drawn = torch.cat(batches)
    from_a = drawn[drawn[:, 0] < 10_000]
    assert len(from_a) == s.counters[0] and len(drawn) - len(from_a) == s.counters[1]
    assert 0.68 < s.counters[0] / len(drawn) < 0.82  # a 3:1 mixture over 640 draws
    # Within one pass over a corpus no sequence repeats (a permutation, not draws with replacement).
    first_pass = [tuple(r.tolist()) for r in from_a[: len(a.train)]]
    assert len(set(first_pass)) == len(a.train)
    # A sampler restored from counters continues exactly like the original.
    fresh = MixtureSampler([a, b], seed=7)
    for step in range(5):
        fresh.next_batch(step, 64)
    resumed = MixtureSampler([a, b], seed=7, counters=list(fresh.counters))
    assert all(torch.equal(resumed.next_batch(st, 64), batches[st]) for st in range(5, 10))
    # Another seed draws another order.
    assert not torch.equal(MixtureSampler([a, b], seed=8).next_batch(0, 64), batches[0])


def test_parse_data_spec():
    assert parse_data_spec("a/b.jsonl:0.7") == {"path": "a/b.jsonl", "weight": 0.7}
    assert parse_data_spec("a/b.jsonl") == {"path": "a/b.jsonl"}
    assert parse_data_spec("C:/data/b.txt") == {"path": "C:/data/b.txt"}


def test_config_reports_every_problem(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: ./base\ndata: [./a.txt]\nlrr: 1\nbatch_size: 0\n")
    with pytest.raises(RecipeError) as e:
        build_config(recipe, {})
    assert e.value.lines() == [
        f"{recipe}: batch_size: Input should be greater than 0",
        f"{recipe}: unknown key 'lrr' (did you mean \"lr\"?)",
    ]


def test_config_paths_relative_to_recipe_and_flags_override(tmp_path):
    recipe = tmp_path / "sub" / "r.yaml"
    recipe.parent.mkdir()
    recipe.write_text("model: ./base\ndata:\n  - {path: ./a.jsonl, weight: 2}\n  - ./b.txt:0.5\nlr: 1.0e-4\n")
    cfg = build_config(recipe, {"lr": 3e-4, "seed": None})
    assert cfg.model == str(recipe.parent / "base")
    assert [(d.path, d.weight) for d in cfg.data] == [(str(recipe.parent / "a.jsonl"), 2.0), (str(recipe.parent / "b.txt"), 0.5)]
    assert cfg.lr == 3e-4 and cfg.seed == 0


def test_config_refuses_two_masks():
    with pytest.raises(RecipeError) as e:
        build_config(None, {"model": "m", "data": ["a.txt"], "train_mask": "a", "freeze_mask": "b"})
    assert "train_mask and freeze_mask cannot be combined" in str(e.value)


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_example_recipes_validate(recipe):
    cfg = build_config(recipe, {})
    if cfg.method == "landermt":  # trains the neurons of its --masks folder, on translation pairs
        assert cfg.masks and cfg.pair and all(Path(p.partition("=")[2]).is_absolute() for p in cfg.pair)
    else:
        assert cfg.train_mask or cfg.freeze_mask


def test_linguistic_regions_recipe_has_public_settings():
    [recipe] = [r for r in RECIPES if "linguistic" in r.name]
    cfg = build_config(recipe, {})
    assert (cfg.adam_betas, cfg.lr, cfg.weight_decay, cfg.schedule, cfg.warmup, cfg.grad_clip, cfg.seq_len) == (
        (0.9, 0.95),
        5e-5,
        0.001,
        "cosine",
        100,
        1.0,
        512,
    )


def test_crlf_text_still_splits_documents_at_blank_lines(tmp_path):
    from neuroloc_cli.runtime.data import read_documents

    f = tmp_path / "c.txt"
    f.write_bytes(b"doc one line\r\n\r\ndoc two line\r\n\r\ndoc three\r\n")
    assert read_documents(f).texts == ["doc one line", "doc two line", "doc three"]


def test_mixing_weighted_and_unweighted_corpora_is_refused(tmp_path):
    import pytest
    from pydantic import ValidationError

    from neuroloc_cli.train.config import TrainConfig

    with pytest.raises(ValidationError, match=r"give a weight to every corpus or to none \(b.txt has none"):
        TrainConfig(model="m", data=["a.txt:0.5", "b.txt"])
    assert TrainConfig(model="m", data=["a.txt:0.5", "b.txt:0.5"]).data[1].weight == 0.5


def test_rewinding_the_log_for_a_resume_drops_later_steps_and_a_half_written_line(tmp_path):
    from neuroloc_cli.train.events import EvalEvent, EventLog, StepEvent, event_from_dict

    log = EventLog(tmp_path / "run" / "log.jsonl")
    written = [
        EvalEvent(step=0, perplexity={"c.txt": 9.5}),
        *(StepEvent(step=s, loss=2.5, lr=1e-4, grad_norm=None, tokens=64 * s, tokens_per_s=1e3, trainable=10) for s in (1, 2, 3)),
    ]
    for event in written:
        log.write(event)
    lines = log.path.read_text().splitlines()
    assert [list(json.loads(line)) for line in lines[:2]] == [
        ["time", "event", "step", "perplexity"],
        ["time", "event", "step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "trainable"],
    ]
    assert [event_from_dict(json.loads(line)) for line in lines] == written
    with open(log.path, "a") as f:
        f.write('{"event": "step", "step": 4, "lo')  # what kill -9 leaves
    assert log.rewind(2) == written[:3]
    assert log.path.read_text().splitlines() == lines[:3]
    assert EventLog(tmp_path / "none.jsonl").rewind(2) == []


def test_example_recipes_are_there():
    # the parametrized check above runs once per file found: none found must not pass quietly
    assert len(RECIPES) >= 3
