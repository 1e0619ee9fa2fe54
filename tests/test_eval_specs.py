"""Parsing of --tasks and --ppl, checks of users' jsonl files, lm-eval metric keys."""

from __future__ import annotations

import pytest

from neuroloc_cli.errors import InputError, UsageError
from neuroloc_cli.eval.harness import metrics_of
from neuroloc_cli.eval.specs import SAMPLES_DIR, LocalTask, parse_ppl, parse_tasks


def test_shipped_names_builtin_names_and_user_files(tmp_path):
    mine = tmp_path / "mgsm bn.jsonl"
    mine.write_text('{"question": "?", "answer_number": 3}\n')
    req = parse_tasks(f"neuroloc_math, mgsm_direct_es,neuroloc_math={mine},", [str(SAMPLES_DIR / "ppl" / "en.jsonl")])
    assert req.named == ("mgsm_direct_es",)
    assert [(t.shape, t.name, t.data) for t in req.local] == [
        ("neuroloc_math", "neuroloc_math", SAMPLES_DIR / "math_es.jsonl"),
        ("neuroloc_math", "neuroloc_math_mgsm_bn", mine),
        ("neuroloc_ppl", "ppl_en", SAMPLES_DIR / "ppl" / "en.jsonl"),
    ]
    cfg = req.local[1].config()
    assert cfg["task"] == "neuroloc_math_mgsm_bn" and cfg["dataset_kwargs"] == {"data_files": {"test": str(mine)}}
    assert cfg["dataset_path"] == "json" and cfg["output_type"] == "generate_until"


@pytest.mark.parametrize(
    "spec, name, file",
    [
        ("data/es.jsonl", "ppl_es", "data/es.jsonl"),
        ("data/spanish.jsonl:es", "ppl_es", "data/spanish.jsonl"),
        ("c:/x/y.jsonl", "ppl_y", "c:/x/y.jsonl"),
    ],
)
def test_ppl_spec(spec, name, file):
    task = parse_ppl(spec)
    assert task.name == name and task.data.name == file.rsplit("/", 1)[-1] and task.shape == "neuroloc_ppl"


def test_duplicate_task_names_are_refused():
    en = SAMPLES_DIR / "ppl" / "en.jsonl"
    with pytest.raises(UsageError) as e:
        parse_tasks(None, [str(en), f"{SAMPLES_DIR / 'ppl' / 'es.jsonl'}:en"])
    assert str(e.value).startswith("task 'ppl_en' is asked for twice")


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "{f}: no such data file"),
        ("", "{f}: no records"),
        ('{"question": "?", "answer_number": 1}\n{"question": "?"\n', "{f}:2: not a JSON record"),
        ("[1, 2]\n", "{f}:1: a record must be a JSON object"),
        ('\n{"question": "?"}\n', "{f}:2: record lacks key(s) 'answer_number' (each record needs question, answer_number)"),
    ],
)
def test_bad_data_files_name_file_and_line(tmp_path, content, message):
    f = tmp_path / "math.jsonl"
    if content is not None:
        f.write_text(content)
    with pytest.raises(InputError) as e:
        parse_tasks(f"neuroloc_math={f}")
    assert str(e.value).startswith(message.format(f=f))


def test_metrics_of_lm_eval_keys():
    entry = {
        "alias": "x",
        "sample_len": 3,
        "acc,none": 0.5,
        "acc_stderr,none": 0.25,
        "exact_match,flexible-extract": 1.0,
        "exact_match_stderr,flexible-extract": 0.0,
        "word_perplexity,none": 12.5,
        "word_perplexity_stderr,none": "N/A",
    }
    assert metrics_of(entry) == {
        "acc": {"value": 0.5, "stderr": 0.25},
        "exact_match,flexible-extract": {"value": 1.0, "stderr": 0.0},
        "word_perplexity": {"value": 12.5, "stderr": None},
    }


def test_local_task_configs_load_in_lm_eval():
    from lm_eval.tasks import TaskManager

    task = LocalTask("neuroloc_choice", "c", SAMPLES_DIR / "choice_es.jsonl")
    built = TaskManager(include_defaults=False).load([task.config()])["tasks"]["c"]
    doc = next(iter(built.eval_docs))
    assert built.doc_to_choice(doc) == ["A", "B", "C", "D"]
    assert built.doc_to_text(doc).endswith("\nD. El aparato de Golgi\nAnswer:")


@pytest.mark.parametrize(
    "shape, record, problem",
    [
        (
            "neuroloc_choice",
            '{"question": "?", "choices": ["a", "b"], "answer": 2}',
            "'answer' must be the 0-based index of the right choice (0 to 1), not 2",
        ),
        ("neuroloc_choice", '{"question": "?", "choices": "ab", "answer": 0}', "'choices' must be a list of 2 to 10 options"),
        ("neuroloc_math", '{"question": "?", "answer_number": "five"}', "'answer_number' must be a number, not 'five'"),
    ],
)
def test_record_values_are_checked(tmp_path, shape, record, problem):
    f = tmp_path / "data.jsonl"
    f.write_text("\n" + record + "\n")
    with pytest.raises(InputError) as e:
        parse_tasks(f"{shape}={f}")
    assert str(e.value) == f"{f}:2: {problem}"  # the line, not the record: the file starts with a blank line


def test_null_values_are_refused_with_the_line(tmp_path):
    import pytest

    from neuroloc_cli.errors import InputError
    from neuroloc_cli.eval.specs import TRANSLATION_KEYS, read_jsonl

    f = tmp_path / "mt.jsonl"
    f.write_text('{"source": "Hallo", "target": "Hello"}\n{"source": "Welt", "target": null}\n')
    with pytest.raises(InputError, match=r"mt.jsonl:2: key\(s\) 'target' are null"):
        read_jsonl(f, TRANSLATION_KEYS)


MATH = SAMPLES_DIR / "math_es.jsonl"


def test_task_options_parse_per_shape_and_per_task(tmp_path):
    de = tmp_path / "de.jsonl"
    de.write_text('{"question": "?", "answer_number": 3}\n')
    req = parse_tasks(
        f"neuroloc_math={MATH},neuroloc_math={de},neuroloc_choice",
        None,
        [
            "neuroloc_math.max_gen_toks=64",
            "neuroloc_math.until=Pregunta:",
            'neuroloc_math_de.until=["\\n\\n", "Frage:"]',
            "neuroloc_math_de.extract=last",
            "neuroloc_math_de.prompt=Frage: {{question}}\\nAntwort:",
        ],
    )
    options = {t.name: t.options for t in req.local}
    assert options == {
        "neuroloc_math_math_es": {"max_gen_toks": 64, "until": ["Pregunta:"]},
        "neuroloc_math_de": {"max_gen_toks": 64, "until": ["\n\n", "Frage:"], "extract": "last", "prompt": "Frage: {{question}}\nAntwort:"},
        "neuroloc_choice": {},
    }
    cfg = req.local[1].config()
    assert cfg["doc_to_text"] == "Frage: {{question}}\nAntwort:"
    assert cfg["generation_kwargs"] == {"until": ["\n\n", "Frage:"], "do_sample": False, "max_gen_toks": 64}
    assert cfg["filter_list"][1]["filter"][0]["group_select"] == -1
    assert req.local[0].config()["filter_list"][1]["filter"][0]["group_select"] == 0  # the default: the first number


@pytest.mark.parametrize(
    "option, message",
    [
        ("neuroloc_math", "--task-option neuroloc_math: expected TARGET.KEY=VALUE (e.g. --task-option neuroloc_math.extract=last)"),
        ("extract=last", "--task-option extract=last: expected TARGET.KEY=VALUE"),
        (
            "neuroloc_mat.extract=last",
            "--task-option neuroloc_mat.extract=last: no shipped-shape task 'neuroloc_mat' in this command (did you mean \"neuroloc_math\"?)",
        ),
        (
            "mgsm_direct_es.extract=last",
            "--task-option mgsm_direct_es.extract=last: no shipped-shape task 'mgsm_direct_es' in this command",
        ),
        (
            "neuroloc_math.extrct=last",
            "--task-option neuroloc_math.extrct=last: unknown option 'extrct' (did you mean \"extract\"?) (neuroloc_math takes prompt, max_gen_toks, until, extract)",
        ),
        ("neuroloc_choice.prompt=x", "--task-option neuroloc_choice.prompt=x: unknown option 'prompt' (neuroloc_choice takes no options)"),
        (
            "neuroloc_math.max_gen_toks=0",
            "--task-option neuroloc_math.max_gen_toks=0: max_gen_toks must be a whole number of tokens, at least 1",
        ),
        ("neuroloc_math.max_gen_toks=many", "--task-option neuroloc_math.max_gen_toks=many: max_gen_toks must be a whole number"),
        ("neuroloc_math.extract=lst", '--task-option neuroloc_math.extract=lst: extract must be one of first, last (did you mean "last"?)'),
        ("neuroloc_math.prompt=Q: {question}", "--task-option neuroloc_math.prompt=Q: {question}: the prompt never shows {{question}}"),
        ("neuroloc_math.prompt=Q: {{question}", "--task-option neuroloc_math.prompt=Q: {{question}: the prompt is not a Jinja template ("),
        ("neuroloc_math.until=", "--task-option neuroloc_math.until=: no stop sequence"),
        ('neuroloc_math.until=["\\n",', '--task-option neuroloc_math.until=["\\n",: until is not a JSON list ('),
        ('neuroloc_math.until=["", 3]', '--task-option neuroloc_math.until=["", 3]: until must be a list of non-empty strings'),
    ],
)
def test_bad_task_options_are_usage_errors_naming_the_flag(option, message):
    with pytest.raises(UsageError) as e:
        parse_tasks("neuroloc_math,neuroloc_choice,mgsm_direct_es", None, [option])
    assert str(e.value).startswith(message), str(e.value)
