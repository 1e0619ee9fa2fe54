"""How `neuroloc train` frames documents (BOS, EOS, packed or padded rows, .txt splitting),
that padding is never scored, and that a run leaves no side folder behind.

Expected rows are written out from the documents' plain token ids (`add_special_tokens=False`)
and the tokenizer's ids <s> = 0, </s> = 1, <pad> = 2 (see `neuroloc_cli.synthetic`).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neuroloc_cli.errors import RecipeError
from neuroloc_cli.runtime.data import IGNORE, framing_of, load_tokenizer, read_documents
from neuroloc_cli.synthetic import SENTENCES
from neuroloc_cli.train.config import DataSource, build_config
from neuroloc_cli.train.data import load_corpora
from neuroloc_cli.train.events import StepEvent
from neuroloc_cli.train.run import run_training
from neuroloc_cli.train.state import default_run_dir

ROOT = Path(__file__).resolve().parent.parent
BOS, EOS, PAD = 0, 1, 2
P = IGNORE  # a padded position, in the expected rows below


def _retemplate(base: Path, folder: Path, template: str) -> Path:
    """A copy of `base` whose tokenizer frames every text with `template`, e.g. '<s> $A'."""
    from tokenizers import Tokenizer, processors

    shutil.copytree(base, folder)
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    tok.post_processor = processors.TemplateProcessing(single=template, special_tokens=[("<s>", BOS), ("</s>", EOS)])
    tok.save(str(folder / "tokenizer.json"))
    return folder


@pytest.fixture(scope="module")
def models(zoo, tmp_path_factory) -> dict[str, Path]:
    """Three tokenizers on one tiny llama: the zoo's (adds nothing), one that adds BOS as Llama's
    and Mistral's do, and one that adds BOS and EOS."""
    base = zoo.get("llama", sharded=False, dtype=torch.float32).base
    root = tmp_path_factory.mktemp("framed")
    return {"plain": base, "bos": _retemplate(base, root / "bos", "<s> $A"), "bos_eos": _retemplate(base, root / "bos_eos", "<s> $A </s>")}


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _jsonl(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _rows(model: Path, path: Path, packing: str, seq_len: int, txt_docs: str = "paragraph") -> torch.Tensor:
    tokenizer = load_tokenizer(model)
    [corpus] = load_corpora([DataSource(path=str(path))], tokenizer, framing_of(tokenizer, packing, txt_docs), seq_len, eval_share=0.0)
    return corpus.train


# -- what the tokenizer adds --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "bos_added", "eos_added", "eos_appended"),
    [("plain", False, False, True), ("bos", True, False, True), ("bos_eos", True, True, False)],
)
def test_framing_follows_the_tokenizer(models, kind, bos_added, eos_added, eos_appended):
    tokenizer = load_tokenizer(models[kind])
    f = framing_of(tokenizer, "packed", "paragraph")
    assert (f.bos_added, f.eos_added, f.eos_appended, f.pad_token_id) == (bos_added, eos_added, eos_appended, None)
    assert framing_of(tokenizer, "padded", "line").pad_token_id == PAD


def test_the_zoo_tokenizer_adds_no_special_token(models):
    # why `models` builds a BOS tokenizer: with this one alone the BOS path would go untested
    tokenizer = load_tokenizer(models["plain"])
    assert tokenizer("The fox.")["input_ids"] == _ids(tokenizer, "The fox.")


# -- packed rows ---------------------------------------------------------------------------------


def test_packed_rows_put_bos_before_and_eos_after_every_document(models, tmp_path):
    tokenizer = load_tokenizer(models["bos"])
    a, b, c = (_ids(tokenizer, t) for t in ("The fox.", "Two plus three.", "The lazy dog."))
    assert (len(a), len(b), len(c)) == (4, 6, 6)
    rows = _rows(models["bos"], _jsonl(tmp_path / "c.jsonl", ["The fox.", "Two plus three.", "The lazy dog."]), "packed", 8)
    # 6 + 8 + 8 = 22 tokens: two rows of 8, a row may span documents, the last 6 are dropped
    assert rows.tolist() == [[BOS, *a, EOS, BOS, b[0]], [*b[1:], EOS, BOS, c[0]]]


def test_packed_rows_without_bos_from_the_zoo_tokenizer(models, tmp_path):
    tokenizer = load_tokenizer(models["plain"])
    a, b = _ids(tokenizer, "The fox."), _ids(tokenizer, "Two plus three.")
    rows = _rows(models["plain"], _jsonl(tmp_path / "c.jsonl", ["The fox.", "Two plus three."]), "packed", 4)
    assert rows.tolist() == [a, [EOS, *b[:3]], [*b[3:], EOS]]


def test_a_tokenizer_that_ends_documents_with_eos_gets_no_second_one(models, tmp_path):
    tokenizer = load_tokenizer(models["bos_eos"])
    a, b = _ids(tokenizer, "The fox."), _ids(tokenizer, "Two plus three.")
    rows = _rows(models["bos_eos"], _jsonl(tmp_path / "c.jsonl", ["The fox.", "Two plus three."]), "packed", 7)
    assert rows.tolist() == [[BOS, *a, EOS, BOS], [*b, EOS]]


# -- padded rows ---------------------------------------------------------------------------------


def test_padded_rows_hold_one_document_each_and_split_long_ones(models, tmp_path):
    tokenizer = load_tokenizer(models["bos"])
    texts = ["The fox.", "Two plus three equals five.", "The quick brown fox"]
    a, b, c = (_ids(tokenizer, t) for t in texts)
    assert (len(a), len(b), len(c)) == (4, 10, 7)
    rows = _rows(models["bos"], _jsonl(tmp_path / "c.jsonl", texts), "padded", 8)
    expected = [
        [BOS, *a, EOS, P, P],
        [BOS, *b[:7]],  # 12 framed tokens: split, not truncated ...
        [b[6], *b[7:], EOS, P, P, P],  # ... the next row repeats the last token, so b[7] is a target
        [BOS, *c],  # 9 framed tokens: one full row ...
        [c[6], EOS, P, P, P, P, P, P],  # ... and one that makes EOS a target
    ]
    assert rows.tolist() == expected
    # the loss mask: a target is scored where the row holds a token
    scored = [[t != P for t in row[1:]] for row in expected]
    assert scored == [[True] * 5 + [False] * 2, [True] * 7, [True] * 4 + [False] * 3, [True] * 7, [True] + [False] * 6]
    from neuroloc_cli.train.loss import scored_targets

    assert scored_targets(rows) == sum(map(sum, scored)) == (6 - 1) + (12 - 1) + (9 - 1)  # each framed token but a document's first


def test_padded_rows_without_bos(models, tmp_path):
    tokenizer = load_tokenizer(models["plain"])
    a = _ids(tokenizer, "The fox.")
    rows = _rows(models["plain"], _jsonl(tmp_path / "c.jsonl", ["The fox.", "The fox."]), "padded", 8)
    assert rows.tolist() == [[*a, EOS, P, P, P]] * 2


# -- .txt documents ------------------------------------------------------------------------------


@pytest.mark.parametrize("newline", ["\n", "\r\n"], ids=["unix", "windows"])
def test_txt_paragraphs_and_lines(tmp_path, newline):
    path = tmp_path / "c.txt"
    path.write_bytes(newline.join(["one a", "one b", "", "two", " \t", "three", "", "", ""]).encode())
    assert read_documents(path).texts == ["one a\none b", "two", "three"]  # a blank or whitespace line ends a document
    assert read_documents(path, txt_docs="line").texts == ["one a", "one b", "two", "three"]
    assert read_documents(path).warnings == read_documents(path, txt_docs="line").warnings == []


def test_a_paragraph_txt_of_many_lines_and_no_blank_one_is_warned_about(tmp_path):
    path = tmp_path / "c.txt"
    path.write_text("".join(f"document {i}\n" for i in range(30)))
    docs = read_documents(path)
    assert docs.texts == ["\n".join(f"document {i}" for i in range(30))]
    assert docs.warnings == [f"{path}: 30 lines and no blank line, read as one document (--txt-docs line reads one document per line)"]
    assert read_documents(path, txt_docs="line").warnings == []
    path.write_text("".join(f"line {i}\n" for i in range(19)))  # a short text of one paragraph is fine
    assert read_documents(path).warnings == []


# -- the loss and perplexity over real tokens only -----------------------------------------------


def _hand_nll(model: Path, docs: list[list[int]]) -> tuple[float, int]:
    """Summed NLL of the documents' next tokens and their count, from a batch padded here with
    <pad> and an attention mask, scoring only targets inside each document."""
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    width = max(map(len, docs))
    ids = torch.tensor([d + [PAD] * (width - len(d)) for d in docs])
    mask = torch.tensor([[1] * len(d) + [0] * (width - len(d)) for d in docs])
    with torch.no_grad():
        logits = lm(input_ids=ids, attention_mask=mask).logits
    nll, count = 0.0, 0
    for i, d in enumerate(docs):
        n = len(d) - 1
        nll += float(torch.nn.functional.cross_entropy(logits[i, :n], ids[i, 1 : n + 1], reduction="sum"))
        count += n
    return nll, count


@pytest.mark.parametrize("grad_accum", [1, 2])
def test_padded_loss_and_perplexity_score_only_real_tokens(models, tmp_path, grad_accum):
    model = models["bos"]
    tokenizer = load_tokenizer(model)
    texts = [
        "The fox.",
        "Two plus three equals five.",
        "The dog.",
        "Le chien.",
        "The quick brown fox.",
        "five",
        "The lazy dog.",
        "Two plus three.",
    ]
    docs = [[BOS, *_ids(tokenizer, t), EOS] for t in texts]
    assert max(map(len, docs)) <= 16  # one row each
    data = _jsonl(tmp_path / "c.jsonl", texts)
    # 8 rows, a quarter held out: the last two documents; one step of a batch of the other six
    cfg = build_config(
        None,
        {
            "model": str(model),
            "data": [str(data)],
            "output": str(tmp_path / "out"),
            "packing": "padded",
            "seq_len": 16,
            "batch_size": 6 // grad_accum,
            "grad_accum": grad_accum,
            "eval_share": 0.25,
            "max_steps": 1,
            "lr": 1e-6,
        },
    )
    result = run_training(cfg)
    nll, count = _hand_nll(model, docs[:6])
    # the step's loss is the mean over the batch's scored targets, however they split into micro-batches
    assert result.first_loss == pytest.approx(nll / count, rel=1e-5)
    held_nll, held_count = _hand_nll(model, docs[6:])
    [before] = result.perplexity["before"].values()
    assert before == pytest.approx(torch.tensor(held_nll / held_count).exp().item(), rel=1e-5)
    # the checks can fail: scoring padding, or averaging micro-batch means, gives other values
    assert _padding_scored_loss(model, docs[:6], 16) != pytest.approx(nll / count, rel=1e-4)
    if grad_accum > 1:
        assert result.first_loss != pytest.approx(_mean_of_micro_means(model, data, cfg), rel=1e-4)


def _mean_of_micro_means(model: Path, data: Path, cfg) -> float:
    """What averaging each micro-batch's own mean loss would report for the first step."""
    from neuroloc_cli.train.data import MixtureSampler

    tokenizer = load_tokenizer(model)
    corpora = load_corpora(cfg.data, tokenizer, framing_of(tokenizer, "padded", "paragraph"), cfg.seq_len, cfg.eval_share)
    batch = MixtureSampler(corpora, cfg.seed).next_batch(0, cfg.batch_size * cfg.grad_accum)
    means = []
    for micro in batch.split(cfg.batch_size):
        nll, count = _hand_nll(model, [[t for t in row.tolist() if t != IGNORE] for row in micro])
        means.append(nll / count)
    return sum(means) / len(means)


def _padding_scored_loss(model: Path, docs: list[list[int]], width: int) -> float:
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32).eval()
    ids = torch.tensor([d + [PAD] * (width - len(d)) for d in docs])
    with torch.no_grad():
        return float(lm(input_ids=ids, labels=ids).loss)


# -- reporting and recording the framing ---------------------------------------------------------


def _corpus(tmp_path: Path, name: str = "c.jsonl") -> Path:
    return _jsonl(tmp_path / name, [SENTENCES[i % len(SENTENCES)] for i in range(40)])


FAST = ("--seq-len", "32", "--batch-size", "2", "--eval-share", "0.1")


def test_framing_is_in_the_start_event_dry_run_and_provenance(models, cli, tmp_path):
    data = _corpus(tmp_path)
    expected = {"packing": "padded", "txt_docs": "line", "bos_added": True, "eos_added": False, "eos_appended": True, "pad_token_id": PAD}
    out = tmp_path / "out"
    plan = cli("train", models["bos"], "--data", data, "-o", out, *FAST, "--packing", "padded", "--txt-docs", "line", "--dry-run", "--json")
    assert plan.exit_code == 0, plan.stderr
    assert plan.json()["framing"] == expected and plan.json()["warnings"] == []
    text = cli("train", models["bos"], "--data", data, "-o", out, *FAST, "--packing", "padded", "--dry-run")
    assert "documents: BOS from the tokenizer, EOS appended; one per row, padded with token 2 (not scored)" in text.stdout
    r = cli("train", models["bos"], "--data", data, "-o", out, *FAST, "--packing", "padded", "--txt-docs", "line", "--max-steps", "1")
    assert r.exit_code == 0, r.stderr
    [start] = [e for e in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if e["event"] == "start"]
    assert start["framing"] == expected
    prov = json.loads((out / "neuroloc.json").read_text())
    assert prov["framing"] == expected and (prov["config"]["packing"], prov["config"]["txt_docs"]) == ("padded", "line")


def test_a_txt_warning_reaches_the_start_event_and_stderr(models, cli, tmp_path):
    data = tmp_path / "lines.txt"
    data.write_text("".join(f"The fox number {i} jumps over the lazy dog.\n" for i in range(40)))
    out = tmp_path / "out"
    r = cli("train", models["plain"], "--data", data, "-o", out, *FAST, "--max-steps", "1")
    assert r.exit_code == 0, r.stderr
    warning = f"{data}: 40 lines and no blank line, read as one document (--txt-docs line reads one document per line)"
    assert f"warning: {warning}" in r.stderr
    [start] = [e for e in map(json.loads, (out / "train_log.jsonl").read_text().splitlines()) if e["event"] == "start"]
    assert start["warnings"] == [warning]


def test_framing_settings_have_yaml_forms_and_are_checked(tmp_path, cli, models):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: ./m\ndata: [./a.txt]\npacking: padded\ntxt_docs: line\nkeep_state: true\n")
    cfg = build_config(recipe, {})
    assert (cfg.packing, cfg.txt_docs, cfg.keep_state) == ("padded", "line", True)
    recipe.write_text("model: ./m\ndata: [./a.txt]\npacking: pad\n")
    with pytest.raises(RecipeError) as e:
        build_config(recipe, {})
    assert e.value.lines() == [f"{recipe}: packing: Input should be 'packed' or 'padded'"]
    r = cli("train", models["plain"], "--data", _corpus(tmp_path), "-o", tmp_path / "out", "--txt-docs", "lines")
    assert r.exit_code == 2 and r.stderr.strip() == "error: --txt-docs lines: Input should be 'paragraph' or 'line'"


class _Crash(Exception):
    pass


def _crash_at(step: int):
    def on_event(event):
        if isinstance(event, StepEvent) and event.step == step:
            raise _Crash

    return on_event


def test_resume_refuses_other_framing(models, tmp_path):
    data = _corpus(tmp_path)
    flags = {
        "model": str(models["plain"]),
        "data": [str(data)],
        "output": str(tmp_path / "out"),
        "seq_len": 32,
        "batch_size": 2,
        "max_steps": 4,
        "save_every": 2,
    }
    with pytest.raises(_Crash):
        run_training(build_config(None, flags), _crash_at(3))
    from neuroloc_cli.errors import UsageError

    with pytest.raises(UsageError) as e:
        run_training(build_config(None, {**flags, "resume": True, "packing": "padded"}))
    assert str(e.value).startswith(
        f"--resume: {default_run_dir(tmp_path / 'out') / 'step-00000002'} was made with a different framing ({{'packing': 'packed', "
    )
    assert not (tmp_path / "out").exists()


# -- the run folder ------------------------------------------------------------------------------


def test_a_completed_run_leaves_no_side_folder(models, cli, tmp_path):
    data = _corpus(tmp_path)
    r = cli("train", models["plain"], "--data", data, "-o", tmp_path / "out", *FAST, "--max-steps", "3", "--save-every", "1")
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "out"]
    log = [json.loads(line) for line in (tmp_path / "out" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["event"] == "checkpoint"] == [1, 2]  # checkpoints were made, then removed


def test_keep_state_and_run_dir_keep_the_run_folder(models, cli, tmp_path):
    data = _corpus(tmp_path)
    r = cli(
        "train", models["plain"], "--data", data, "-o", tmp_path / "out", *FAST, "--max-steps", "3", "--save-every", "2", "--keep-state"
    )
    assert r.exit_code == 0, r.stderr
    state = default_run_dir(tmp_path / "out")
    assert sorted(p.name for p in state.iterdir()) == ["log.jsonl", "step-00000002"]
    assert (state / "log.jsonl").read_text() == (tmp_path / "out" / "train_log.jsonl").read_text()
    r = cli(
        "train",
        models["plain"],
        "--data",
        data,
        "-o",
        tmp_path / "out2",
        *FAST,
        "--max-steps",
        "3",
        "--save-every",
        "2",
        "--run-dir",
        tmp_path / "mine",
    )
    assert r.exit_code == 0, r.stderr
    assert sorted(p.name for p in (tmp_path / "mine").iterdir()) == ["log.jsonl", "step-00000002"]
    assert not default_run_dir(tmp_path / "out2").exists()


_KILLED_RUN = """
import os, signal, sys
from neuroloc_cli.train.config import build_config
from neuroloc_cli.train.events import StepEvent
from neuroloc_cli.train.run import run_training

def on_event(event):
    if isinstance(event, StepEvent) and event.step == 5:
        os.kill(os.getpid(), signal.SIGKILL)

model, data, out = sys.argv[1:]
run_training(build_config(None, {"model": model, "data": [data], "output": out, "seq_len": 32, "batch_size": 2,
                                 "max_steps": 6, "save_every": 2, "packing": "padded"}), on_event)
"""


def test_a_killed_run_resumes_from_its_hidden_folder(models, cli, tmp_path):
    data, out = _corpus(tmp_path), tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    killed = subprocess.run([sys.executable, "-c", _KILLED_RUN, str(models["plain"]), str(data), str(out)], env=env, timeout=240)
    assert killed.returncode == -signal.SIGKILL
    state = default_run_dir(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == [state.name, "c.jsonl"]  # hidden: nothing visible but the data
    assert sorted(p.name for p in state.glob("step-*")) == ["step-00000002", "step-00000004"]
    r = cli(
        "train",
        models["plain"],
        "--data",
        data,
        "-o",
        out,
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--max-steps",
        "6",
        "--save-every",
        "2",
        "--packing",
        "padded",
        "--resume",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    assert r.json()["steps"] == 6
    log = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["event"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.jsonl", "out"]
