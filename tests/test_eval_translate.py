"""Translation: BLEU and chrF equal the `sacrebleu` command line on the saved hypotheses;
templates, tokenizer choice and options."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from neuroloc_cli.eval import runner
from neuroloc_cli.eval.specs import SAMPLES_DIR
from neuroloc_cli.eval.translate import TEMPLATES, TranslationSettings, build_prompts
from tests.eval_fakes import OracleLM

SAMPLE = SAMPLES_DIR / "translate_en-es.jsonl"


def _sacrebleu_cli(refs: list[str], hyp_file: Path, tmp: Path, tok: str) -> dict[str, dict]:
    ref_file = tmp / "refs.txt"
    ref_file.write_text("".join(r + "\n" for r in refs), encoding="utf-8")
    cmd = [
        sys.executable,
        "-m",
        "sacrebleu",
        str(ref_file),
        "-i",
        str(hyp_file),
        "-m",
        "bleu",
        "chrf",
        "--smooth-method",
        "none",
        "-tok",
        tok,
        "-w",
        "10",
        "-f",
        "json",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return {d["name"]: d for d in json.loads(done.stdout)}


def _drop_last_word(doc):
    return " " + " ".join(doc["target"].split()[:-1])


@pytest.mark.parametrize("fake", [None, _drop_last_word], ids=["tiny-llama", "partial-translations"])
def test_scores_equal_sacrebleu_command_line(cli, zoo, tmp_path, monkeypatch, fake):
    if fake is not None:  # non-zero BLEU: the tiny random model's output shares no 4-gram with Spanish
        monkeypatch.setattr(runner, "load_lm", lambda *a, **k: OracleLM(translate=fake))
    out = tmp_path / "out"
    r = cli("eval", zoo.get("llama").base, "--translate", SAMPLE, "--src", "en", "--tgt", "es", "--max-gen-toks", "6", "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    metrics = r.json()["models"][0]["tasks"]["translate_en-es"]
    records = [json.loads(line) for line in SAMPLE.read_text().splitlines() if line.strip()]
    hyps = (out / "hypotheses.txt").read_text(encoding="utf-8").split("\n")
    assert len(hyps) == len(records) + 1 and hyps[-1] == ""  # one line per record
    expected = _sacrebleu_cli([r["target"] for r in records], out / "hypotheses.txt", tmp_path, "13a")
    assert metrics["bleu"]["value"] == pytest.approx(expected["BLEU"]["score"], abs=1e-8)
    assert metrics["chrf"]["value"] == pytest.approx(expected["chrF2"]["score"], abs=1e-8)
    assert metrics["bleu"]["signature"] == expected["BLEU"]["signature"]
    assert metrics["chrf"]["signature"] == expected["chrF2"]["signature"]
    if fake is not None:
        assert 0 < metrics["bleu"]["value"] < 100


def test_chinese_target_uses_the_zh_tokenizer(cli, zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "load_lm", lambda *a, **k: OracleLM(translate=lambda d: " " + d["target"][:-2]))
    data = tmp_path / "en-zh.jsonl"
    pairs = [("The fox jumps.", "狐狸跳了起来。"), ("I like tea.", "我喜欢喝茶。"), ("It is raining today.", "今天下雨了。")]
    data.write_text("".join(json.dumps({"source": s, "target": t}, ensure_ascii=False) + "\n" for s, t in pairs), encoding="utf-8")
    out = tmp_path / "out"
    r = cli("eval", zoo.get("llama").base, "--translate", data, "--src", "en", "--tgt", "zh", "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    bleu = r.json()["models"][0]["tasks"]["translate_en-zh"]["bleu"]
    expected = _sacrebleu_cli([t for _, t in pairs], out / "hypotheses.txt", tmp_path, "zh")["BLEU"]
    assert "tok:zh" in bleu["signature"] and bleu["signature"] == expected["signature"]
    assert bleu["value"] == pytest.approx(expected["score"], abs=1e-8)


def test_templates_fill_language_names_and_source():
    s = TranslationSettings(SAMPLE, "en", "de")
    assert build_prompts([{"source": "Hi.", "target": "Hallo."}], s) == ["Translate the following.\n\nEnglish: Hi.\n\nGerman:"]
    custom = TranslationSettings(SAMPLE, "en", "xx", template="{src}->{tgt} {tgt_lang}: {source} =")
    assert build_prompts([{"source": "Hi.", "target": ""}], custom) == ["en->xx xx: Hi. ="]
    assert all("{source}" in t for t in TEMPLATES.values())


@pytest.mark.parametrize(
    "args, message",
    [
        (["--template", "flan-nope"], "error: --template: 'flan-nope' is neither a template name nor contains {source}"),
        (["--bleu-tokenize", "moses"], "error: --bleu-tokenize: unknown sacrebleu tokenizer 'moses'"),
        (["--bleu-smooth", "laplace"], "error: --bleu-smooth: unknown smoothing method 'laplace'"),
    ],
)
def test_bad_translation_options(cli, zoo, monkeypatch, args, message):
    monkeypatch.setattr(runner, "load_lm", lambda *a, **k: pytest.fail("model loaded despite a bad option"))
    r = cli("eval", zoo.get("llama").base, "--translate", SAMPLE, "--src", "en", "--tgt", "es", *args)
    assert r.exit_code == 2
    assert r.stderr.splitlines()[0].startswith(message), r.stderr


def test_translation_record_without_target(cli, zoo, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"source": "a", "target": "b"}\n{"source": "c"}\n')
    r = cli("eval", zoo.get("llama").base, "--translate", data, "--src", "en", "--tgt", "es")
    assert r.exit_code == 3
    assert r.stderr.splitlines()[0] == f"error: {data}:2: record lacks key(s) 'target' (each record needs source, target)"
