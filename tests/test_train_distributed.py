"""`accelerate launch` with 2 CPU processes (gloo): data-parallel training keeps frozen bits, and
data-parallel gradient scoring equals one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from neuroloc_cli.masks import Mask, MaskEntry
from neuroloc_cli.synthetic import SENTENCES
from tests.helpers import load_all

ROOT = Path(__file__).resolve().parent.parent


def test_two_process_run_keeps_frozen_bits(zoo, tmp_path):
    base = zoo.get("llama").base
    inputs = load_all(base)
    gen = torch.Generator().manual_seed(9)
    entries = {n: MaskEntry(tuple(t.shape), None, torch.rand(t.shape, generator=gen) < 0.3) for n, t in inputs.items() if ".layers." in n}
    Mask("element", entries).save(tmp_path / "core.mask")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(" ".join(SENTENCES[(i + j) % len(SENTENCES)] for j in range(3)) for i in range(60)))
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "neuroloc_cli",
        "train",
        str(base),
        "--data",
        str(corpus),
        "-o",
        str(tmp_path / "out"),
        "--freeze-mask",
        str(tmp_path / "core.mask"),
        "--max-steps",
        "3",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
        "--weight-decay",
        "0.5",
        "--json",
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.loads(r.stdout)  # exactly one JSON document: only the main process reports
    assert doc["tokens"] == 3 * 2 * 2 * 32  # steps x processes x batch x seq_len
    prov = json.loads((tmp_path / "out" / "neuroloc.json").read_text())
    assert prov["world_size"] == 2
    outputs = load_all(tmp_path / "out")
    for name, e in entries.items():
        frozen = e.dense()
        assert torch.equal(outputs[name].view(torch.int16)[frozen], inputs[name].view(torch.int16)[frozen]), name
        assert (outputs[name][~frozen] != inputs[name][~frozen]).any(), name


def _launch(*args: str, processes: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(processes), "--num_machines", "1"]
    cmd += ["--multi_gpu"] if processes > 1 else []
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no", "-m", "neuroloc_cli", *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)


def test_two_process_gradient_scores_equal_one_process(zoo, tmp_path):
    """Each process scores every second batch; the sums, added once at the end, equal one
    process's up to float summation order (5 batches: 3 on one process, 2 on the other)."""
    from safetensors.torch import load_file

    base = zoo.get("llama").base
    data = []
    for i, lang in enumerate(("en", "es")):
        (tmp_path / f"{lang}.txt").write_text("\n\n".join([SENTENCES[i], SENTENCES[i + 2]] * 30))
        data += ["--data", f"{lang}={tmp_path / f'{lang}.txt'}"]
    common = ["locate", "gradient", str(base), *data, "--samples", "9", "--seq-len", "16", "--batch-size", "2", "--top", "0.05", "--json"]
    for name, processes in (("one", 1), ("two", 2)):
        r = _launch(*common, "-o", str(tmp_path / name), processes=processes)
        assert r.returncode == 0, r.stderr[-3000:]
        assert json.loads(r.stdout)["provenance"]["processes"] == processes  # one document: only the main process reports
    for lang in ("en", "es"):
        one = load_file(str(tmp_path / "one" / "importance" / f"{lang}.safetensors"))
        two = load_file(str(tmp_path / "two" / "importance" / f"{lang}.safetensors"))
        assert one.keys() == two.keys()
        for n in one:
            torch.testing.assert_close(two[n], one[n], rtol=1e-4, atol=1e-7 * float(one[n].abs().max()) + 1e-12, msg=n)


def test_two_process_lape_counts_equal_one_process_exactly(zoo, tmp_path):
    """Activation counts are integers: two processes give one process's probabilities bit for bit."""
    from safetensors.torch import load_file

    base = zoo.get("llama").base
    data = []
    for i, lang in enumerate(("en", "es")):
        (tmp_path / f"{lang}.txt").write_text("\n\n".join([SENTENCES[i], SENTENCES[i + 2]] * 30))
        data += ["--data", f"{lang}={tmp_path / f'{lang}.txt'}"]
    common = ["locate", "lape", str(base), *data, "--samples", "9", "--seq-len", "16", "--batch-size", "2", "--top", "0.1", "--json"]
    for name, processes in (("one", 1), ("two", 2)):
        r = _launch(*common, "-o", str(tmp_path / name), processes=processes)
        assert r.returncode == 0, r.stderr[-3000:]
        json.loads(r.stdout)  # one document: only the main process reports
    for lang in ("en", "es"):
        one = load_file(str(tmp_path / "one" / "importance" / f"{lang}.safetensors"))
        two = load_file(str(tmp_path / "two" / "importance" / f"{lang}.safetensors"))
        assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)
        assert Mask.load(tmp_path / "one" / f"{lang}.safetensors").entries == Mask.load(tmp_path / "two" / f"{lang}.safetensors").entries


def test_two_process_landermt_run_equals_one_process(zoo, tmp_path):
    """The same global batches (one process × 2 rows, or two × 1 row): the same trained neurons,
    up to float summation order; the never-active language's neurons bit for bit.

    The updates are compared as tensors, not element by element: AdamW moves an element by
    about the learning rate whatever the size of its gradient, so one whose gradient nearly
    cancels can move differently on a different summation order (seen: 2.7e-5 on a few of
    8192 elements, lr 1e-2). Gradients that were not averaged across the processes would
    change most elements' updates, by far more than the tolerance."""
    from tests.test_train_landermt import _pairs, _routing

    base = zoo.get("llama", dtype=torch.float32).base
    masks, sets = _routing(base, tmp_path)
    pairs = [a for d, p in _pairs(tmp_path).items() for a in ("--pair", f"{d}={p}")]
    common = ["train", str(base), "--method", "landermt", *pairs, "--masks", str(masks), "--max-steps", "3", "--grad-accum", "2"]
    common += ["--seq-len", "112", "--lr", "1e-2", "--json"]
    for name, processes, batch in (("one", 1, "2"), ("two", 2, "1")):
        r = _launch(*common, "--batch-size", batch, "-o", str(tmp_path / name), processes=processes)
        assert r.returncode == 0, r.stderr[-3000:]
    one, two, before = load_all(tmp_path / "one"), load_all(tmp_path / "two"), load_all(base)
    for n in before:
        step_one, step_two = one[n] - before[n], two[n] - before[n]
        if not step_one.any():  # not trained: untouched in both
            assert torch.equal(two[n], before[n]), n
            continue
        assert float((step_two - step_one).norm() / step_one.norm()) < 1e-3, n
    for key, (_, specific) in sets.items():
        for part, axis in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            name = f"{key}.{part}.weight"
            assert torch.equal(two[name].movedim(axis, 0)[specific["fr"]], before[name].movedim(axis, 0)[specific["fr"]])
