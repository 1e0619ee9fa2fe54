"""The command line: help, version, --json, exit codes and the wording of errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neuroloc_cli import __version__
from tests.conftest import write_recipe


def _ta(fam, **extra) -> str:
    lines = [
        "merge_method: task_arithmetic",
        f"base_model: {fam.base}",
        "models:",
        f"  - model: {fam.ft1}",
        "    parameters: {weight: 0.5}",
    ]
    return "\n".join(lines + [f"{k}: {v}" for k, v in extra.items()]) + "\n"


def test_help_lists_subcommands_and_version(cli):
    r = cli("--help")
    assert r.exit_code == 0
    for cmd in ("inspect", "delta", "merge", "recipe", "methods", "demo"):
        assert cmd in r.stdout
    r = cli("--version")
    assert r.exit_code == 0 and r.stdout.strip() == f"neuroloc {__version__}"


def test_inspect_json_is_one_document_naming_every_tensor(zoo, cli):
    fam = zoo.get("qwen2")
    r = cli("inspect", fam.base, "--json")
    assert r.exit_code == 0
    doc = json.loads(r.stdout)  # raises if stdout holds anything but one JSON document
    from tests.helpers import load_all

    tensors = load_all(fam.base)
    assert {t["name"] for t in doc["tensors"]} == set(tensors)
    assert doc["parameters"] == sum(t.numel() for t in tensors.values())
    assert doc["architecture"] == "Qwen2ForCausalLM" and doc["num_layers"] == 2 and doc["kind"] == "model"
    assert {s["file"] for s in doc["shards"]} == {t["shard"] for t in doc["tensors"]}


def test_inspect_table_for_people(zoo, cli):
    r = cli("inspect", zoo.get("gpt2").base)
    assert r.exit_code == 0 and "GPT2LMHeadModel" in r.stdout and "transformer.h.0.mlp.c_fc.weight" in r.stdout


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["inspect", "/nonexistent/model"], 3, "error: /nonexistent/model: no such folder"),
        (["inspect", "meta-llama/Llama-3-8B"], 3, "meta-llama/Llama-3-8B: no such folder, and neuroloc does not download from a model hub"),
        (["merge", "/nonexistent/recipe.yaml", "-o", "x"], 2, "error: /nonexistent/recipe.yaml: cannot read (No such file or directory)"),
    ],
)
def test_missing_inputs(cli, args, code, message):
    r = cli(*args)
    assert r.exit_code == code
    assert message in r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""


def test_folder_without_weights(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    r = cli("inspect", tmp_path / "empty")
    assert r.exit_code == 3 and "no model.safetensors or model.safetensors.index.json in this folder" in r.stderr


def test_unknown_method_and_key_get_did_you_mean(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    text = _ta(fam).replace("task_arithmetic", "task_arithmetc") + "out_dtyp: bfloat16\n"
    r = cli("recipe", "validate", write_recipe(tmp_path, text))
    assert r.exit_code == 2
    assert "unknown key 'out_dtyp' (did you mean \"out_dtype\"?)" in r.stderr
    text = _ta(fam).replace("task_arithmetic", "task_arithmetc")
    r = cli("recipe", "validate", write_recipe(tmp_path, text))
    assert "merge_method: unknown merge method 'task_arithmetc' (did you mean \"task_arithmetic\"?)" in r.stderr


def test_validate_reports_every_problem_at_once(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    text = f"""
merge_method: task_arithmetic
base_model: {fam.base}
models:
  - model: {fam.ft1}
    parameters: {{weight: 0.5, lambda: 2}}
  - model: ./does-not-exist
  - model: {fam.ft2}
    parameters: {{wieght: 1}}
parameters:
  normalize: maybe
"""
    r = cli("recipe", "validate", write_recipe(tmp_path, text))
    assert r.exit_code == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 6, r.stderr
    assert all(line.startswith(f"error: {tmp_path / 'recipe.yaml'}: ") for line in lines)
    joined = "\n".join(lines)
    assert "models[0].parameters.lambda: 'lambda' applies to the whole merge; set it in the top-level 'parameters'" in joined
    assert "models[2].parameters.wieght: task_arithmetic has no parameter 'wieght' (did you mean \"weight\"?)" in joined
    assert "parameters.normalize: must be true or false, got 'maybe'" in joined
    assert "models[1].parameters: task_arithmetic needs 'weight' for every model (or once in 'parameters')" in joined
    assert "models[2].parameters: task_arithmetic needs 'weight' for every model (or once in 'parameters')" in joined
    assert f"models[1].model: {tmp_path / 'does-not-exist'}: no such folder" in joined


def test_bad_parameter_value_names_the_key(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    text = _ta(fam).replace("weight: 0.5", "weight: [0.5, abc]")
    r = cli("recipe", "validate", write_recipe(tmp_path, text))
    assert r.exit_code == 2 and "models[0].parameters.weight[1]: must be a number, got 'abc'" in r.stderr


def test_shape_mismatch_names_tensor_and_model(zoo, cli, tmp_path):
    llama, qwen = zoo.get("llama"), zoo.get("gpt2")
    text = f"merge_method: task_arithmetic\nbase_model: {llama.base}\nmodels: [{{model: {qwen.ft1}, parameters: {{weight: 1}}}}]\n"
    r = cli("merge", write_recipe(tmp_path, text), "-o", tmp_path / "out")
    assert r.exit_code == 3
    assert f"models[0].model ({qwen.ft1}): tensor model.embed_tokens.weight is missing (present in base_model" in r.stderr
    assert not (tmp_path / "out").exists()


def test_dry_run_and_validate_write_nothing_and_print_the_plan(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    recipe = write_recipe(tmp_path, _ta(fam))
    before = sorted(p.name for p in tmp_path.iterdir())
    r = cli("merge", recipe, "-o", tmp_path / "out", "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    plan = r.json()
    assert plan["valid"] and plan["method"] == "task_arithmetic" and plan["tensors"] == len(plan["steps"])
    assert plan["steps"][0]["model_parameters"] == [{"weight": 0.5}]
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    r = cli("recipe", "validate", recipe)
    assert r.exit_code == 0 and "recipe is valid" in r.stderr


def test_output_path_rules(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    recipe = write_recipe(tmp_path, _ta(fam))
    r = cli("merge", recipe, "-o", fam.base / "merged")
    assert r.exit_code == 4 and f"{fam.base / 'merged'}: output path overlaps input {fam.base}" in r.stderr
    assert not (fam.base / "merged").exists()
    r = cli("merge", recipe)
    assert r.exit_code == 2 and "merge needs an output folder" in r.stderr
    out = tmp_path / "out"
    assert cli("merge", recipe, "-o", out).exit_code == 0
    r = cli("merge", recipe, "-o", out)
    assert r.exit_code == 4 and f"{out}: already exists (pass --overwrite" in r.stderr
    assert cli("merge", recipe, "-o", out, "--overwrite").exit_code == 0
    assert not [p for p in tmp_path.iterdir() if "neuroloc-" in p.name]


def test_merge_json_result(zoo, cli, tmp_path):
    fam = zoo.get("llama", sharded=False)
    r = cli("merge", write_recipe(tmp_path, _ta(fam)), "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0
    doc = r.json()
    assert doc["shards"] == ["model.safetensors"] and doc["tensors"] > 0


def test_full_disk_mid_merge_is_an_output_error_and_leaves_nothing(zoo, cli, tmp_path, monkeypatch):
    from neuroloc_cli.io import writer as writer_mod

    fam = zoo.get("llama")
    calls = {"n": 0}
    real_write = writer_mod.ShardedWriter.write

    def failing_write(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 7:
            raise OSError(28, "No space left on device")
        real_write(self, name, tensor)

    monkeypatch.setattr(writer_mod.ShardedWriter, "write", failing_write)
    r = cli("merge", write_recipe(tmp_path, _ta(fam)), "-o", tmp_path / "out")
    assert r.exit_code == 4 and r.stderr == f"error: {tmp_path / 'out'}: cannot write the output (No space left on device)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_ctrl_c_mid_merge_leaves_nothing(zoo, cli, tmp_path, monkeypatch):
    # In process, at a known point; tests/test_faults.py sends real signals at random points.
    from neuroloc_cli.io import writer as writer_mod

    fam = zoo.get("llama")
    calls = {"n": 0}
    real_write = writer_mod.ShardedWriter.write

    def interrupted(self, name, tensor):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt
        real_write(self, name, tensor)

    monkeypatch.setattr(writer_mod.ShardedWriter, "write", interrupted)
    r = cli("merge", write_recipe(tmp_path, _ta(fam)), "-o", tmp_path / "out")
    assert r.exit_code == 130 and r.stderr == "neuroloc: interrupted; nothing was written\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_ctrl_c_after_the_output_is_in_place_names_it(zoo, cli, tmp_path, monkeypatch):
    # "nothing was written" would be false once the merged folder is in place.
    from neuroloc_cli.io import commit

    fam = zoo.get("llama")
    real_note = commit.note_written

    def noted_then_ctrl_c(path):
        real_note(path)
        os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(commit, "note_written", noted_then_ctrl_c)
    monkeypatch.setattr("neuroloc_cli.io.output.note_written", noted_then_ctrl_c)
    out = tmp_path / "out"
    r = cli("merge", write_recipe(tmp_path, _ta(fam)), "-o", out)
    assert r.exit_code == 130 and r.stderr == f"neuroloc: interrupted; already written, each whole: {out}\n"
    assert (out / "neuroloc.json").is_file() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "recipe.yaml"]


def test_kill_9_mid_merge_leaves_nothing_at_target(zoo, tmp_path):
    """A merge killed with SIGKILL part-way: the target never appears."""
    fam = zoo.get("llama")
    recipe = write_recipe(tmp_path, _ta(fam))
    out = tmp_path / "out"
    slow = (
        "import time, sys\n"
        "from neuroloc_cli.io import writer\n"
        "real = writer.ShardedWriter.write\n"
        "def slow(self, n, t):\n"
        "    real(self, n, t); print('wrote', n, flush=True); time.sleep(0.2)\n"
        "writer.ShardedWriter.write = slow\n"
        "from neuroloc_cli.cli.app import main\n"
        f"sys.argv = ['neuroloc', 'merge', {str(recipe)!r}, '-o', {str(out)!r}]\n"
        "main()\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    proc = subprocess.Popen([sys.executable, "-c", slow], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
    try:
        for _ in range(3):  # let it write a few tensors
            assert proc.stdout.readline().startswith("wrote"), proc.stderr.read()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.neuroloc-tmp-")]
    assert len(leftovers) == 1  # the temporary folder is the only trace, beside the target
    shutil.rmtree(tmp_path / leftovers[0])


def test_a_bug_is_exit_1_with_one_line_and_nothing_written(zoo, cli, tmp_path, monkeypatch):
    from neuroloc_cli.io import writer as writer_mod

    def boom(self, name, tensor):
        raise RuntimeError("boom")

    monkeypatch.setattr(writer_mod.ShardedWriter, "write", boom)
    r = cli("merge", write_recipe(tmp_path, _ta(zoo.get("llama"))), "-o", tmp_path / "out")
    assert r.exit_code == 1
    assert r.stderr == "internal error: RuntimeError: boom (rerun with --debug for the traceback)\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["recipe.yaml"]


def test_debug_shows_traceback(zoo, cli, tmp_path, monkeypatch):
    from neuroloc_cli.io import writer as writer_mod

    def boom(self, name, tensor):
        raise RuntimeError("boom")

    monkeypatch.setattr(writer_mod.ShardedWriter, "write", boom)
    fam = zoo.get("llama")
    with pytest.raises(RuntimeError, match="boom"):
        cli("--debug", "merge", write_recipe(tmp_path, _ta(fam)), "-o", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_console_script_exit_code(zoo, tmp_path):
    """The installed entry point (not only the in-process runner) exits non-zero on errors."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    start = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "neuroloc_cli", "inspect", str(tmp_path / "nope")], capture_output=True, text=True, env=env)
    assert p.returncode == 3 and p.stderr.strip() == f"error: {tmp_path / 'nope'}: no such folder"
    assert time.perf_counter() - start < 60


def test_truncated_shard_in_a_merge_is_refused_before_writing(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    broken = tmp_path / "broken"
    shutil.copytree(fam.ft1, broken)
    shard = sorted(broken.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    text = f"merge_method: task_arithmetic\nbase_model: {fam.base}\nmodels: [{{model: {broken}, parameters: {{weight: 1}}}}]\n"
    r = cli("merge", write_recipe(tmp_path, text), "-o", tmp_path / "out")
    assert r.exit_code == 3
    assert f"models[0].model: {shard}: invalid safetensors header" in r.stderr
    assert not (tmp_path / "out").exists()


def test_delta_with_missing_folder(zoo, cli, tmp_path):
    r = cli("delta", zoo.get("llama").base, tmp_path / "nope", "-o", tmp_path / "d")
    assert r.exit_code == 3 and r.stderr.strip() == f"error: {tmp_path / 'nope'}: no such folder"


def test_demo_overwrite_deletes_only_a_folder_the_demo_made(cli, tmp_path):
    """`neuroloc demo . --overwrite` must not wipe the folder a user happens to stand in."""
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    r = cli("demo", mine, "--overwrite")
    assert r.exit_code == 4 and "not a folder neuroloc demo made" in r.stderr
    assert (mine / "thesis.tex").read_text() == "years of work"
    assert cli("demo", tmp_path / "ex").exit_code == 0
    assert cli("demo", tmp_path / "ex").exit_code == 4  # exists, no --overwrite
    r = cli("demo", tmp_path / "ex", "--overwrite")
    assert r.exit_code == 0 and (tmp_path / "ex" / "merged" / "neuroloc.json").is_file()
