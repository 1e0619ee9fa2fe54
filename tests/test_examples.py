"""The scripts of `examples/`, run end to end through the installed `neuroloc` command on a
tiny model and tiny corpora."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from neuroloc_cli.synthetic import SENTENCES
from tests.helpers import console_script

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
DAMAGE_STUDY = EXAMPLES / "damage_study.sh"
LANGS = {"en": SENTENCES[0], "es": SENTENCES[4]}
REGIONS = ["core", "random", "bottom", *(f"mono-{lang}" for lang in LANGS)]

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="the examples are bash scripts")


def _corpora(folder: Path) -> list[str]:
    """LANG=TRAIN:HELDOUT for each language: paragraphs to locate on, a jsonl to score."""
    specs = []
    for lang, sentence in LANGS.items():
        train = folder / f"{lang}-train.txt"
        train.write_text("\n\n".join([sentence, SENTENCES[3]] * 20) + "\n", encoding="utf-8")
        held = folder / f"{lang}-held.jsonl"
        held.write_text("".join(json.dumps({"text": sentence}, ensure_ascii=False) + "\n" for _ in range(3)), encoding="utf-8")
        specs.append(f"{lang}={train}:{held}")
    return specs


def _run(*args: str | Path) -> subprocess.CompletedProcess:
    exe = console_script()
    assert exe is not None, "the `neuroloc` console script is not installed (pip install -e '.[test]')"
    env = {**os.environ, "NEUROLOC": exe}
    return subprocess.run(["bash", str(DAMAGE_STUDY), *map(str, args)], capture_output=True, text=True, env=env, timeout=600)


@needs_bash
def test_damage_study_writes_every_ablation_and_the_table(zoo, tmp_path):
    base = zoo.get("llama").base
    out = tmp_path / "study"
    p = _run("--samples", 4, "--seq-len", 16, "--batch-size", 2, "--top", 0.05, base, out, *_corpora(tmp_path))
    assert p.returncode == 0, p.stderr

    for region in REGIONS:
        assert (out / "regions" / f"{region}.safetensors").is_file()
        assert (out / f"{region}-removed" / "config.json").is_file(), region
    table = (out / "damage.txt").read_text(encoding="utf-8")
    assert table == p.stdout and all(f"{region}-removed" in table for region in REGIONS)

    doc = json.loads((out / "damage.json").read_text(encoding="utf-8"))
    assert doc == json.loads((out / "eval" / "results.json").read_text(encoding="utf-8"))
    expected = [base.resolve(), *((out / f"{region}-removed").resolve() for region in REGIONS)]
    assert [Path(m["path"]) for m in doc["models"]] == expected
    for m in doc["models"]:
        assert set(m["tasks"]) == {f"ppl_{lang}" for lang in LANGS}, m["label"]
        for lang in LANGS:
            ppl = m["tasks"][f"ppl_{lang}"]["token_perplexity"]["value"]
            assert math.isfinite(ppl) and ppl > 1, (m["label"], lang, ppl)
    assert doc["config"]["dtype"] == "float32"  # the script's default: bf16 log-probabilities are too coarse


@needs_bash
@pytest.mark.parametrize(
    "args,message",
    [
        (["model", "out", "en=a.txt", "es=c:d"], "'en=a.txt': expected LANG=TRAIN:HELDOUT"),
        (["model", "out", "en=a.txt:b:c.jsonl", "es=d.txt:e.jsonl"], "(paths without ':')"),
        (["--bogus", "model", "out", "en=a:b", "es=c:d"], "unknown option --bogus"),
        (["model", "out", "en=a:b"], "usage: damage_study.sh"),
    ],
)
def test_damage_study_usage_errors_exit_2_before_running_anything(tmp_path, args, message):
    p = subprocess.run(["bash", str(DAMAGE_STUDY), *args], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert p.returncode == 2 and message in p.stderr and p.stdout == ""
    assert list(tmp_path.iterdir()) == []
