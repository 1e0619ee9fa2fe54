"""Faults a user meets mid-run: Ctrl-C and SIGTERM at random points of a merge of a model of
a few hundred MB, a disk that fills up, a folder that cannot be written.

Each must end with its own exit code (130, 143, 4), one line on stderr, no output and no
hidden temporary folder left behind, and every input byte-identical.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from neuroloc_cli.synthetic import build_checkpoint, derive_finetune, tiny_config
from tests.conftest import write_recipe
from tests.helpers import console_script


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.iterdir()):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def big(tmp_path_factory) -> tuple[Path, Path]:
    """A base of ~140M bf16 parameters (~280 MB in 4 shards) and one fine-tune."""
    root = tmp_path_factory.mktemp("big")
    cfg = tiny_config("llama", layers=8, hidden=1024, vocab=32000)
    base = build_checkpoint(cfg, root / "base", dtype=torch.bfloat16, max_shard_bytes=80_000_000, tokenizer=False)
    return base, derive_finetune(base, root / "ft", seed=1, max_shard_bytes=80_000_000)


def _recipe(folder: Path, base: Path, ft: Path) -> Path:
    text = f"merge_method: task_arithmetic\nbase_model: {base}\nmodels:\n  - model: {ft}\n    parameters: {{weight: 0.5}}\n"
    return write_recipe(folder, text)


def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if "neuroloc-" in p.name or p.name == "out")


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_at_random_points_of_a_merge_leaves_nothing(big, tmp_path, sig, code, word):
    base, ft = big
    before = (_digest(base), _digest(ft))
    recipe = _recipe(tmp_path, base, ft)
    exe = console_script()
    assert exe is not None, "the `neuroloc` console script is not installed"
    rng = random.Random(int(sig))
    sent = 0
    for trial in range(3):
        out = tmp_path / "out"
        proc = subprocess.Popen([exe, "merge", str(recipe), "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        # wait until the merge is writing (its hidden folder exists), then a random moment more
        deadline = time.monotonic() + 120
        while not any(p.name.startswith(".out.neuroloc-tmp-") for p in tmp_path.iterdir()):
            assert proc.poll() is None, proc.stderr.read()
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(rng.uniform(0.0, 0.4))
        if proc.poll() is not None:  # finished first: that moment was not a fault; try another
            shutil.rmtree(out)
            continue
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
        if out.exists():  # the signal came after the output was in place: see the test below
            _assert_whole_after_signal(proc.returncode, err, out, code, word)
            shutil.rmtree(out)
            continue
        sent += 1
        assert proc.returncode == code, err
        assert err == f"neuroloc: {word}; nothing was written\n"
        assert _leftovers(tmp_path) == [], f"trial {trial}"
    assert sent >= 1, "every merge finished before its signal: no fault was tested"
    assert (_digest(base), _digest(ft)) == before


@pytest.mark.parametrize("sig,code,word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_signal_after_the_output_is_in_place_never_says_nothing_was_written(big, tmp_path, sig, code, word):
    # Between the rename that puts the output in place and the end of the process lie the
    # command's last lines and the interpreter's teardown (most of a second for this model).
    base, ft = big
    recipe = _recipe(tmp_path, base, ft)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [console_script(), "merge", str(recipe), "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 120
    while not out.exists():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.001)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    _assert_whole_after_signal(proc.returncode, err, out, code, word)


def _assert_whole_after_signal(returncode: int, err: str, out: Path, code: int, word: str) -> None:
    """A signal after the output is in place: the output is whole and nothing is left beside
    it; the merge exits 0 (the signal came in its teardown) or with the signal's code, naming
    the output."""
    assert returncode in (0, code), (returncode, err)
    if returncode == code:
        assert err == f"neuroloc: {word}; already written, each whole: {out}\n"
    assert (out / "neuroloc.json").is_file() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in out.parent.iterdir() if p.name != "recipe.yaml") == ["out"]


def _mount_tmpfs(folder: Path, options: str) -> None:
    folder.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command here; the injected ENOSPC test covers a full disk")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(folder)], capture_output=True)
    if r.returncode != 0:  # not root, or no mount rights in this container: the injected ENOSPC test covers it
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")


@pytest.fixture
def small_disk(tmp_path):
    folder = tmp_path / "small"
    _mount_tmpfs(folder, "size=2m")
    yield folder
    subprocess.run(["umount", str(folder)], check=True)


def test_full_disk_during_a_merge_is_an_output_error(zoo, cli, small_disk, tmp_path):
    fam = zoo.get("llama")
    # a recipe whose output (bf16, ~0.2 MB a copy) fits only after the disk is nearly filled
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * (2 * 2**20 - 100_000))
    recipe = write_recipe(
        tmp_path, f"merge_method: task_arithmetic\nbase_model: {fam.base}\nmodels: [{{model: {fam.ft1}, parameters: {{weight: 1}}}}]\n"
    )
    r = cli("merge", recipe, "-o", small_disk / "out")
    assert r.exit_code == 4, r.stderr
    assert r.stderr.startswith(f"error: {small_disk / 'out'}: cannot write") and "No space left on device" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_full_disk_during_a_mask_write_is_an_output_error(zoo, cli, small_disk):
    fam = zoo.get("llama")
    (small_disk / "filler").write_bytes(b"\0" * (2 * 2**20 - 2_000))
    r = cli("locate", "delta", fam.base, fam.ft1, "--granularity", "element", "-o", small_disk / "m.safetensors")
    assert r.exit_code == 4, r.stderr
    assert r.stderr.startswith(f"error: {small_disk / 'm.safetensors'}: cannot write") and len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


def test_read_only_output_folder(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    folder = tmp_path / "ro"
    _mount_tmpfs(folder, "ro,size=1m")
    try:
        recipe = write_recipe(
            tmp_path, f"merge_method: task_arithmetic\nbase_model: {fam.base}\nmodels: [{{model: {fam.ft1}, parameters: {{weight: 1}}}}]\n"
        )
        r = cli("merge", recipe, "-o", folder / "out")
        assert r.exit_code == 4 and r.stderr.startswith(f"error: {folder / 'out'}: cannot create output folder (Read-only file system)"), (
            r.stderr
        )
        r = cli("locate", "delta", fam.base, fam.ft1, "-o", folder / "m.safetensors")
        assert r.exit_code == 4 and r.stderr.startswith(f"error: {folder / 'm.safetensors'}: cannot write"), r.stderr
        assert list(folder.iterdir()) == []
    finally:
        subprocess.run(["umount", str(folder)], check=True)
