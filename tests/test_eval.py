"""`neuroloc eval` on a tiny real model: its numbers equal lm-eval's own `simple_evaluate`
called directly on the same model and task; outputs, JSON and errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from neuroloc_cli.eval.specs import SAMPLES_DIR, TASKS_DIR

BATCH, GEN = 4, 8


def _direct(model: Path, tasks: list[dict]) -> dict:
    """lm-eval alone: its HFLM on the folder, its TaskManager, the shipped YAMLs as dicts."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=str(model), device="cpu", batch_size=BATCH)
    out = lm_eval.simple_evaluate(model=lm, tasks=tasks, task_manager=TaskManager(include_defaults=False), gen_kwargs={"max_gen_toks": GEN})
    return out["results"]


def _task(shape: str, name: str, data: Path) -> dict:
    cfg = yaml.safe_load((TASKS_DIR / f"{shape}.yaml").read_text())
    cfg.update(task=name, dataset_kwargs={"data_files": {"test": str(data)}})
    return cfg


def test_numbers_equal_lm_eval_simple_evaluate(cli, zoo, tmp_path):
    model = zoo.get("llama").base
    ppl = SAMPLES_DIR / "ppl" / "es.jsonl"
    out = tmp_path / "out"
    r = cli(
        "eval",
        model,
        "--tasks",
        "neuroloc_math,neuroloc_choice",
        "--ppl",
        ppl,
        "--batch-size",
        BATCH,
        "--max-gen-toks",
        GEN,
        "-o",
        out,
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    ours = r.json()["models"][0]["tasks"]
    direct = _direct(
        model,
        [
            _task("neuroloc_math", "neuroloc_math", SAMPLES_DIR / "math_es.jsonl"),
            _task("neuroloc_choice", "neuroloc_choice", SAMPLES_DIR / "choice_es.jsonl"),
            _task("neuroloc_ppl", "ppl_es", ppl),
        ],
    )
    compared = 0
    for task, entry in direct.items():
        for key, value in entry.items():
            if "," not in key or "_stderr," in key:
                continue
            metric, filt = key.split(",")
            name = metric if filt == "none" else key
            assert ours[task][name]["value"] == pytest.approx(value, rel=1e-9), (task, key)
            stderr = entry[f"{metric}_stderr,{filt}"]
            assert ours[task][name]["stderr"] == (None if stderr == "N/A" else pytest.approx(stderr, rel=1e-9)), (task, key)
            compared += 1
    assert compared == 2 + 2 + 3
    assert ours["ppl_es"]["byte_perplexity"]["value"] > 1  # a real forward pass, not a constant


def test_output_folder_and_json_document(cli, zoo, tmp_path):
    fam = zoo.get("llama")
    out = tmp_path / "out"
    r = cli("eval", fam.base, fam.ft1, "--tasks", "neuroloc_choice", "--limit", "2", "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()  # exactly one JSON document on stdout
    assert [m["label"] for m in doc["models"]] == ["base", "ft1"]
    from neuroloc_cli.io.checkpoint import Checkpoint

    assert [m["fingerprint"] for m in doc["models"]] == [Checkpoint.open(fam.base).fingerprint, Checkpoint.open(fam.ft1).fingerprint]
    assert doc["seeds"] == {"random_seed": 0, "numpy_random_seed": 1234, "torch_random_seed": 1234, "fewshot_random_seed": 1234}
    import lm_eval
    import sacrebleu

    assert doc["versions"]["lm_eval"] == lm_eval.__version__ and doc["versions"]["sacrebleu"] == sacrebleu.__version__
    assert json.loads((out / "results.json").read_text()) == doc
    for label in ("base", "ft1"):
        samples = (out / label / "samples_neuroloc_choice.jsonl").read_text().splitlines()
        assert len(samples) == 2 and json.loads(samples[0])["doc"]["answer"] == 1


def test_table_shows_models_side_by_side(cli, zoo, monkeypatch):
    from neuroloc_cli.eval import runner
    from tests.eval_fakes import OracleLM

    monkeypatch.setattr(runner, "load_lm", lambda *a, **k: OracleLM())
    fam = zoo.get("llama")
    r = cli("eval", fam.base, fam.ft2, "--tasks", "neuroloc_choice")
    assert r.exit_code == 0, r.stderr
    row = next(line for line in r.stdout.splitlines() if "acc_norm" in line)
    assert row.count("1.0000 ± 0.0000") == 2
    assert "base" in r.stdout and "ft2" in r.stdout


@pytest.mark.parametrize(
    "args, code, message",
    [
        (["--limit", "1"], 2, "error: nothing to evaluate (pass --tasks, --ppl or --translate)"),
        (["--translate", "x.jsonl"], 2, "error: --translate needs --src and --tgt language codes"),
        (
            ["--tasks", "neuroloc_mathh=a.jsonl"],
            2,
            "error: --tasks neuroloc_mathh=a.jsonl: only a shipped task takes a data file; unknown task 'neuroloc_mathh'",
        ),
        (["--tasks", "neuroloc_math="], 2, "error: --tasks neuroloc_math=: no data file after '='"),
        (["--tasks", "neuroloc_math", "--device", "tpu"], 2, "error: --device 'tpu': use cpu, cuda or cuda:N"),
        (["--tasks", "neuroloc_math", "--include-path", "/no/such/dir"], 2, "error: --include-path /no/such/dir: not a folder"),
    ],
)
def test_usage_errors(cli, zoo, args, code, message):
    r = cli("eval", zoo.get("llama").base, *args)
    assert r.exit_code == code
    assert r.stderr.splitlines()[0].startswith(message), r.stderr


def test_missing_model_folder(cli, tmp_path):
    r = cli("eval", tmp_path / "nope", "--tasks", "neuroloc_math")
    assert r.exit_code == 3
    assert r.stderr.strip() == f"error: {tmp_path / 'nope'}: no such folder"


def test_existing_output_is_refused_before_evaluating(cli, zoo, tmp_path, monkeypatch):
    from neuroloc_cli.eval import runner

    monkeypatch.setattr(runner, "load_lm", lambda *a, **k: pytest.fail("model loaded although the output is refused"))
    (tmp_path / "out").mkdir()
    r = cli("eval", zoo.get("llama").base, "--tasks", "neuroloc_math", "-o", tmp_path / "out")
    assert r.exit_code == 4
    assert "already exists" in r.stderr
