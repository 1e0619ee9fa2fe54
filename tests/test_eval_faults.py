"""`neuroloc eval` faced with what users get wrong: a model with a short context, bad data
files, broken task YAMLs, unknown task names. Each mistake is one line on stderr, the right
exit code, no model loaded and nothing written; a successful run leaves stderr empty."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from neuroloc_cli.eval import harness, runner
from neuroloc_cli.eval.specs import SAMPLES_DIR, TASKS_DIR
from neuroloc_cli.synthetic import build_checkpoint, tiny_config
from tests.eval_fakes import OracleLM

POSITIONS = 128
TRANSLATE = SAMPLES_DIR / "translate_en-es.jsonl"


@pytest.fixture(scope="module")
def short(tmp_path_factory) -> dict[str, Path]:
    """Tiny models of 128 positions: llama names them max_position_embeddings, gpt2 n_positions."""
    root = tmp_path_factory.mktemp("short")
    llama, gpt2 = tiny_config("llama"), tiny_config("gpt2")
    llama.max_position_embeddings = gpt2.n_positions = POSITIONS
    return {arch: build_checkpoint(cfg, root / arch) for arch, cfg in (("llama", llama), ("gpt2", gpt2))}


def _no_model(monkeypatch) -> None:
    monkeypatch.setattr(runner, "load_lm", lambda *a, **k: pytest.fail("a model was loaded despite the mistake"))


def _one_error_line(r, code: int, start: str) -> str:
    assert r.exit_code == code, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(start), r.stderr
    return lines[0]


def _task_yaml(folder: Path, shape: str, name: str, data: Path | str, drop: str | None = None, extra: str = "") -> Path:
    """A copy of a shipped task YAML as a user's own task: another name, another data file."""
    text = (TASKS_DIR / f"{shape}.yaml").read_text().replace(f"task: {shape}", f"task: {name}")
    text = text.replace(f"samples/{'math' if shape == 'neuroloc_math' else 'choice'}_es.jsonl", str(data))
    if drop:
        text = "\n".join(line for line in text.splitlines() if drop not in line) + "\n"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text + extra)
    return path


# -- generation length and the model's context --------------------------------------------


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_default_translation_length_is_capped_to_fit_and_recorded(cli, short, tmp_path, arch):
    out = tmp_path / "out"
    r = cli("eval", short[arch], "--translate", TRANSLATE, "--src", "en", "--tgt", "es", "--limit", "2", "-o", out, "--json")
    assert r.exit_code == 0, r.stderr
    assert r.stderr == ""  # libraries' progress bars and logs are kept off stderr
    model = r.json()["models"][0]
    assert (model["positions"], model["max_gen_toks"], model["capped"]) == (POSITIONS, {"translate_en-es": 64}, {"translate_en-es": 256})
    assert r.json()["config"]["translation"]["max_gen_toks"] is None  # none was asked for
    assert json.loads((out / "results.json").read_text()) == r.json()
    table = cli("eval", short[arch], "--translate", TRANSLATE, "--src", "en", "--tgt", "es", "--limit", "1")
    assert table.exit_code == 0, table.stderr
    assert (
        f"{arch}: translate_en-es: generated at most 64 tokens, not 256, to fit the model's 128 positions (--max-gen-toks sets it)"
    ) in table.stdout.splitlines()


def test_default_length_of_a_generation_task_is_capped_to_fit(cli, short, tmp_path):
    # A generate-until task without its own max_gen_toks gets lm-eval's 256, more than 128 positions hold.
    tasks = tmp_path / "tasks"
    _task_yaml(tasks, "neuroloc_math", "long_math", SAMPLES_DIR / "math_es.jsonl", drop="max_gen_toks")
    r = cli("eval", short["llama"], "--tasks", "long_math,neuroloc_math", "--include-path", tasks, "--limit", "2", "--json")
    assert r.exit_code == 0, r.stderr
    model = r.json()["models"][0]
    assert model["max_gen_toks"] == {"long_math": 64, "neuroloc_math": 16}  # the shipped task's own 16 fits
    assert model["capped"] == {"long_math": 256}
    assert "exact_match,flexible-extract" in model["tasks"]["long_math"]


@pytest.mark.parametrize(
    "args",
    [["--translate", str(TRANSLATE), "--src", "en", "--tgt", "es"], ["--tasks", "neuroloc_math"]],
    ids=["translate", "tasks"],
)
def test_explicit_length_the_model_cannot_hold_is_refused(cli, short, tmp_path, monkeypatch, args):
    _no_model(monkeypatch)
    model = short["llama"]
    r = cli("eval", model, *args, "--max-gen-toks", "128", "-o", tmp_path / "out")
    assert _one_error_line(r, 2, "error: ") == (
        f"error: --max-gen-toks 128: {model} holds 128 positions, prompt and generated tokens together "
        "(pass less than 128, e.g. 64, or leave it out to fit the model)"
    )
    assert not (tmp_path / "out").exists()


def test_explicit_length_that_fits_is_used_as_given(cli, short, monkeypatch):
    monkeypatch.setattr(runner, "load_lm", lambda *a, **k: OracleLM())
    r = cli("eval", short["llama"], "--translate", TRANSLATE, "--src", "en", "--tgt", "es", "--max-gen-toks", "100", "--json")
    assert r.exit_code == 0, r.stderr
    model = r.json()["models"][0]
    assert model["max_gen_toks"] == {"translate_en-es": 100} and model["capped"] == {}


def test_verbose_shows_progress_on_stderr_and_keeps_stdout_one_document(cli, zoo, monkeypatch):
    monkeypatch.setattr(runner, "load_lm", lambda *a, **k: OracleLM())
    r = cli("eval", zoo.get("llama").base, "--tasks", "neuroloc_choice", "--verbose", "--json")
    assert r.exit_code == 0, r.stderr
    assert "evaluating base" in r.stderr
    assert r.json()["models"][0]["tasks"]["neuroloc_choice"]["acc"]["value"] == 1.0


# -- data files -----------------------------------------------------------------------------

MATH_OK = '{"question": "2+2?", "answer_number": 4}\n'


@pytest.mark.parametrize(
    "option, content, message",
    [
        ("math", None, "{f}: no such data file"),
        ("math", "", "{f}: no records"),
        ("math", MATH_OK + MATH_OK + '{"question": "2+3?", "answer_number": 5\n', "{f}:3: not a JSON record"),
        (
            "math",
            MATH_OK + '{"question": "2+3?"}\n',
            "{f}:2: record lacks key(s) 'answer_number' (each record needs question, answer_number)",
        ),
        ("math", "\n" + MATH_OK + '{"question": "?", "answer_number": "five"}\n', "{f}:3: 'answer_number' must be a number, not 'five'"),
        ("choice", '{"question": "?", "choices": ["a", "b"]}\n', "{f}:1: record lacks key(s) 'answer'"),
        ("choice", '{"question": "?", "choices": ["a", "b"], "answer": 5}\n', "{f}:1: 'answer' must be the 0-based index"),
        ("ppl", '{"text": "Hola."}\n{"body": "x"}\n', "{f}:2: record lacks key(s) 'text' (each record needs text)"),
        ("ppl", '{"text": ""}\n', "{f}:1: 'text' must be a non-empty string"),
        (
            "translate",
            '{"source": "a", "target": "b"}\n{"target": "c"}\n',
            "{f}:2: record lacks key(s) 'source' (each record needs source, target)",
        ),
        ("translate", "not json\n", "{f}:1: not a JSON record"),
        ("translate", None, "{f}: no such data file"),
    ],
)
def test_bad_data_file_is_one_line_naming_file_and_line(cli, zoo, tmp_path, monkeypatch, option, content, message):
    _no_model(monkeypatch)
    f = tmp_path / "data.jsonl"
    if content is not None:
        f.write_text(content)
    args = {
        "math": ["--tasks", f"neuroloc_math={f}"],
        "choice": ["--tasks", f"neuroloc_choice={f}"],
        "ppl": ["--ppl", f"{f}:es"],
        "translate": ["--translate", f, "--src", "en", "--tgt", "es"],
    }[option]
    r = cli("eval", zoo.get("llama").base, *args, "-o", tmp_path / "out")
    _one_error_line(r, 3, "error: " + message.format(f=f))
    assert not (tmp_path / "out").exists()


def test_model_without_tokenizer_is_refused_before_loading(cli, zoo, tmp_path, monkeypatch):
    import shutil

    _no_model(monkeypatch)
    model = tmp_path / "notok"
    shutil.copytree(zoo.get("llama").base, model, ignore=shutil.ignore_patterns("tokenizer.json"))
    r = cli("eval", model, "--tasks", "neuroloc_choice")
    _one_error_line(r, 3, f"error: {model}: tokenizer_config.json but no vocabulary (tokenizer.json, tokenizer.model or vocab.json)")


# -- the user's own task YAMLs (--include-path) --------------------------------------------


def test_broken_task_yaml_is_named_with_its_line(cli, zoo, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    yaml_file = _task_yaml(
        tmp_path / "tasks", "neuroloc_choice", "my_choice", SAMPLES_DIR / "choice_es.jsonl", extra="doc_to_target: [open\n"
    )
    r = cli("eval", zoo.get("llama").base, "--tasks", "my_choice", "--include-path", tmp_path / "tasks")
    line = _one_error_line(r, 2, f"error: {yaml_file}: line ")
    assert "invalid YAML" in line


def test_unknown_field_in_task_yaml_is_named_with_a_suggestion(cli, zoo, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    yaml_file = _task_yaml(tmp_path / "tasks", "neuroloc_choice", "my_choice", SAMPLES_DIR / "choice_es.jsonl", extra="num_fewshots: 2\n")
    r = cli("eval", zoo.get("llama").base, "--tasks", "my_choice", "--include-path", tmp_path / "tasks")
    _one_error_line(r, 2, f"error: {yaml_file.resolve()}: unknown field 'num_fewshots' (did you mean \"num_fewshot\"?)")


def test_task_yaml_naming_a_missing_data_file(cli, zoo, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    missing = tmp_path / "nowhere.jsonl"
    yaml_file = _task_yaml(tmp_path / "tasks", "neuroloc_choice", "my_choice", missing)
    r = cli("eval", zoo.get("llama").base, "--tasks", "my_choice", "--include-path", tmp_path / "tasks", "-o", tmp_path / "out")
    assert _one_error_line(r, 3, "error: ") == f"error: {yaml_file.resolve()}: data file {missing} does not exist"
    assert not (tmp_path / "out").exists()


def test_task_yaml_with_a_relative_data_path_says_where_it_was_looked_for(cli, zoo, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "mine.jsonl").write_text('{"question": "?", "choices": ["a", "b"], "answer": 0}\n')
    yaml_file = _task_yaml(tmp_path / "tasks", "neuroloc_choice", "my_choice", "mine.jsonl")
    monkeypatch.chdir(tmp_path)  # `datasets` reads relative paths from here, not from the YAML's folder
    r = cli("eval", zoo.get("llama").base, "--tasks", "my_choice", "--include-path", "tasks")
    _one_error_line(r, 3, f"error: {yaml_file.resolve()}: data file mine.jsonl is not in the current folder {tmp_path}")


def test_task_yaml_data_that_is_not_json_lines(cli, zoo, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    data = tmp_path / "mine.jsonl"
    data.write_text('{"question": "?", "choices": ["a", "b"], "answer": 0}\n{"question": \n')
    _task_yaml(tmp_path / "tasks", "neuroloc_choice", "my_choice", data)
    r = cli("eval", zoo.get("llama").base, "--tasks", "my_choice", "--include-path", tmp_path / "tasks")
    _one_error_line(r, 3, f"error: {data}:2: not a JSON record")


def test_task_yaml_that_lm_eval_cannot_build(cli, zoo, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    yaml_file = _task_yaml(
        tmp_path / "tasks",
        "neuroloc_choice",
        "my_choice",
        SAMPLES_DIR / "choice_es.jsonl",
        extra="process_results: !function my_utils.score\n",
    )
    r = cli("eval", zoo.get("llama").base, "--tasks", "my_choice", "--include-path", tmp_path / "tasks")
    _one_error_line(r, 2, f"error: {yaml_file.resolve()}: task 'my_choice' cannot be built (ImportError: ")


# -- task names -----------------------------------------------------------------------------


def test_unknown_task_is_refused_fast_with_a_suggestion(cli, zoo, monkeypatch):
    _no_model(monkeypatch)
    monkeypatch.setattr(harness, "_manager", lambda *a: pytest.fail("lm-eval's task index was built for an unknown name"))
    model = zoo.get("llama").base  # built before the clock starts
    start = time.monotonic()
    r = cli("eval", model, "--tasks", "neuroloc_choice,mgsm_direct_ess")
    elapsed = time.monotonic() - start
    _one_error_line(r, 2, "error: --tasks: unknown task 'mgsm_direct_ess' (did you mean \"mgsm_direct_es\"?)")
    assert elapsed < 5  # a text scan (well under a second), not lm-eval's 10–20 s index


def test_unknown_task_suggests_a_name_from_the_include_path(cli, zoo, tmp_path, monkeypatch):
    _no_model(monkeypatch)
    _task_yaml(tmp_path / "tasks", "neuroloc_choice", "biology_es", SAMPLES_DIR / "choice_es.jsonl")
    r = cli("eval", zoo.get("llama").base, "--tasks", "biolgy_es", "--include-path", tmp_path / "tasks")
    _one_error_line(r, 2, "error: --tasks: unknown task 'biolgy_es' (did you mean \"biology_es\"?)")
