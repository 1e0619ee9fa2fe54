"""The memory and disk figures of `--dry-run` against what the code does.

Merges: the estimate of `merge.estimate` is compared with the peak of the bytes held by live
tensors, tracked on both of the engine's threads, on a tiny model, for an elementwise method
(streamed in blocks of rows) and a method that takes whole tensors. Training: the figures of
`train --dry-run` against a hand computation from the model's shapes.
"""

from __future__ import annotations

import threading
import weakref
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from neuroloc_cli.io.checkpoint import Checkpoint
from neuroloc_cli.merge import stream
from neuroloc_cli.merge.estimate import merge_memory
from neuroloc_cli.merge.plan import build_plan
from neuroloc_cli.merge.run import run_merge
from neuroloc_cli.ops import sums
from neuroloc_cli.recipe.schema import parse_recipe
from tests.conftest import write_recipe


class LiveBytes(TorchDispatchMode):
    """The peak of the bytes of live CPU storages that torch operators create, while active
    (on each thread that enters it): a storage counts from its creation until it is freed."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, int] = {}
        self.now = self.peak = 0
        self.lock = threading.Lock()

    def _free(self, key: int) -> None:
        with self.lock:
            self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # a view or an in-place result shares an argument's storage: not new memory (and the
        # memory-mapped file behind a checkpoint read is the page cache's, not the process's)
        given = {_storage_ptr(a) for a in tree_flatten((args, kwargs))[0]}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu" and _storage_ptr(t) not in given:
                storage = t.untyped_storage()
                with self.lock:
                    if id(storage) not in self.live:
                        self.live[id(storage)] = storage.nbytes()
                        self.now += storage.nbytes()
                        self.peak = max(self.peak, self.now)
                        weakref.finalize(storage, self._free, id(storage))
        return out


def _storage_ptr(x) -> int | None:
    if isinstance(x, torch.Tensor):
        return x.untyped_storage().data_ptr()
    if isinstance(x, torch.UntypedStorage):
        return x.data_ptr()
    return None


def _measured_peak(plan, out: Path, monkeypatch) -> int:
    tracker = LiveBytes()
    load = stream._load

    def tracked_load(*args):  # the reader thread's reads count too
        with tracker:
            return load(*args)

    monkeypatch.setattr(stream, "_load", tracked_load)
    with tracker:
        run_merge(plan, out)
    return tracker.peak


RECIPES = {
    "linear": "models:\n  - model: {ft1}\n    parameters: {{weight: 0.5}}\n  - model: {ft2}\n    parameters: {{weight: 0.5}}\nmerge_method: linear\ndtype: float32\n",
    "ties": "base_model: {base}\nmodels:\n  - model: {ft1}\n    parameters: {{weight: 0.5, density: 0.5}}\n  - model: {ft2}\n    parameters: {{weight: 0.5, density: 0.5}}\nmerge_method: ties\ndtype: float32\n",
    # methods that read their inputs in pieces
    "sce": "base_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\nmerge_method: sce\nparameters: {{select_topk: 0.5}}\ndtype: float32\nout_dtype: bfloat16\n",
    "karcher": "models:\n  - model: {ft1}\n  - model: {ft2}\nmerge_method: karcher\ndtype: float32\n",
}


@pytest.mark.parametrize("method", list(RECIPES))
def test_merge_memory_bounds_the_tracked_peak(zoo, tmp_path, monkeypatch, method):
    monkeypatch.setattr(stream, "BLOCK_ELEMENTS", 4096)  # so that the tiny model's large tensors go in blocks
    monkeypatch.setattr(sums, "PIECE", sums.BLOCK)  # or in pieces, small beside the tensor (as on a real model)
    fam = zoo.get("llama")
    path = write_recipe(tmp_path, RECIPES[method].format(base=fam.base, ft1=fam.ft1, ft2=fam.ft2))
    plan = build_plan(parse_recipe(path.read_text(), str(path)), tmp_path, str(path))
    estimate = merge_memory(plan)
    measured = _measured_peak(plan, tmp_path / "out", monkeypatch)
    assert measured <= estimate.total <= 2 * measured  # a bound, and not a loose one


def test_merge_memory_of_blocks_by_hand(zoo, tmp_path, monkeypatch):
    """linear of two models in float32, blocks of 4096 elements (16 KiB): at the peak, two
    inputs of this block and two of the next, and the NaN/inf check of the result: the result,
    its absolute values (float32) and three boolean masks of 4096 bytes, which is more than
    the method's result and scratch (two blocks)."""
    monkeypatch.setattr(stream, "BLOCK_ELEMENTS", 4096)
    fam = zoo.get("llama")
    path = write_recipe(tmp_path, RECIPES["linear"].format(base=fam.base, ft1=fam.ft1, ft2=fam.ft2))
    doc = merge_memory(build_plan(parse_recipe(path.read_text(), str(path)), tmp_path, str(path))).describe()
    block = 4 * 4096
    assert (doc["inputs"], doc["next_inputs"], doc["masks"]) == (2 * block, 2 * block, 0)
    assert doc["work"] == block + block + 3 * 4096
    assert doc["total"] == 4 * block + doc["work"] and doc["peak_rows"] is not None


def test_train_dry_run_figures_by_hand(zoo, cli, tmp_path):
    """Whole tensors by glob: float32 weights of everything, gradients and AdamW moments of
    what trains, the output in the checkpoint's bf16."""
    fam = zoo.get("llama")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(["the quick brown fox jumps over the lazy dog"] * 200) + "\n")
    r = cli(
        "train",
        fam.base,
        "--data",
        corpus,
        "--trainable",
        "*mlp*",
        "--max-steps",
        "2",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--dry-run",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    ckpt = Checkpoint.open(fam.base)
    numel = {n: i.numel for n, i in ckpt.tensors.items() if i.torch_dtype.is_floating_point}
    trained = {n: v for n, v in numel.items() if ".mlp." in n}
    mem = doc["memory_bytes"]
    assert mem["weights"] == 4 * sum(numel.values())
    assert mem["gradients"] == 4 * sum(trained.values()) and mem["selection"] == 0
    assert mem["optimizer_state"] == doc["optimizer_state_bytes"] == 8 * sum(trained.values()) + 4 * len(trained)
    assert mem["activations"] > 0 and mem["total"] == sum(v for k, v in mem.items() if k != "total")
    assert doc["disk_bytes"]["output"] == sum(i.numel * i.torch_dtype.itemsize for i in ckpt.tensors.values())
