"""Offline by default: a built-in task whose dataset is not cached fails fast and clearly,
before any model loads, and leaves no output behind."""

from __future__ import annotations

import os
import time

import pytest

from neuroloc_cli.eval import runner


def test_builtin_task_offline_is_a_clear_fast_error(cli, zoo, tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "load_lm", lambda *a, **k: pytest.fail("model loaded before the dataset was checked"))
    before = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    start = time.monotonic()
    r = cli("eval", zoo.get("llama").base, "--tasks", "mgsm_direct_es", "-o", tmp_path / "out")
    elapsed = time.monotonic() - start
    assert r.exit_code == 3
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr  # nothing of lm-eval's or datasets' before the error
    assert lines[0].startswith("error: task 'mgsm_direct_es': its dataset is not available offline (")
    assert "--include-path DIR" in lines[0] and "neuroloc_math=FILE.jsonl" in lines[0]
    assert "Traceback" not in r.stderr
    assert elapsed < 60  # lm-eval's index of built-in tasks takes ~10 s on a slow core; no retries
    assert not (tmp_path / "out").exists()
    assert {k: os.environ.get(k) for k in before} == before  # offline switches restored


def test_unknown_task_suggests_a_name(cli, zoo):  # fast: see test_eval_faults
    r = cli("eval", zoo.get("llama").base, "--tasks", "mgsm_direct_ess")
    assert r.exit_code == 2
    assert r.stderr.splitlines()[0].startswith("error: --tasks: unknown task 'mgsm_direct_ess' (did you mean \"mgsm_direct_es\"?)")


def test_include_path_task_with_local_data(cli, zoo, tmp_path, monkeypatch):
    from tests.eval_fakes import OracleLM

    monkeypatch.setattr(runner, "load_lm", lambda *a, **k: OracleLM())
    data = tmp_path / "my.jsonl"
    data.write_text('{"question": "2+2?", "choices": ["3", "4"], "answer": 1}\n')
    yaml_text = runner.__file__.replace("runner.py", "tasks/neuroloc_choice.yaml")
    text = open(yaml_text).read().replace("task: neuroloc_choice", "task: my_choice").replace("samples/choice_es.jsonl", str(data))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "my_choice.yaml").write_text(text)
    r = cli("eval", zoo.get("llama").base, "--tasks", "my_choice", "--include-path", tmp_path / "tasks", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["models"][0]["tasks"]["my_choice"]["acc"]["value"] == 1.0
