"""Same inputs, same settings and seed -> the same bytes, for every command that writes.

Each command runs four times, in four processes: twice with one thread and twice with two
(`OMP_NUM_THREADS` and `MKL_NUM_THREADS`, which PyTorch reads at start-up; the thread count
also sets how many parts the sparsifying loops split a tensor into), each process with its
own string-hash seed. The model is tiny, but its embedding and head have 294,984 elements,
enough for PyTorch, MKL and the sparsifying loops to share them out between two threads, and
an odd number of rows, so that the threads' shares do not end on a vector boundary.

What is guaranteed (on one machine, with one set of library versions), and checked here:

- `merge` (every method that `neuroloc methods` lists, random ones with `--seed`; merges
  with a recipe `mask:` and with per-model masks), `delta`, `locate delta` (row, ffn and
  element granularity; global and tensor scope) and `mask union|intersect|diff`: every weight
  and mask file, the shard index, `config.json` and the copied tokenizer files are
  byte-identical across runs and across thread counts, so `sha256sum` of two runs agree.
  Whole-tensor sums (MAET's ranking, model_stock's and slerp's norms and dots) are added in
  a fixed order for that (`neuroloc_cli.ops.sums`).
  `neuroloc.json` is identical but for its `created` time, which the shards do not record.
- `train --seed`: the same across runs at one thread count, whatever the output folder;
  `neuroloc.json` and the training log agree but for times, throughput and the paths the run
  wrote to (which the shards do not record either).

What is not guaranteed (the thread-count comparisons are expected failures):

- `train` at different thread counts: the forward and backward passes sum (matrix products in
  MKL, reductions) in an order that depends on how many threads share the work, so results
  differ in their last bits and the optimizer carries the difference on. That is the nature
  of multi-threaded floating point; only a fixed thread count makes training reproducible.
- Times: `created` in `neuroloc.json`, `time` and `tokens_per_s` in the training log.

Commands run through `neuroloc_cli.cli.app.main`, as `python -m neuroloc_cli` runs them,
several in one process to keep this file fast; `test_python_m_gives_the_same_bytes` runs a
few through `python -m neuroloc_cli` itself.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from neuroloc_cli.masks import Mask
from neuroloc_cli.methods import METHODS
from neuroloc_cli.synthetic import SENTENCES, build_checkpoint, derive_finetune, tiny_config

RUNS = [(1, "a"), (1, "b"), (2, "a"), (2, "b")]  # (threads, run)
SHARD = "300KB"
SEED = "7"

# Merge recipes, less their `merge_method:` and `out_dtype: float32` lines: one per method,
# and two masked merges (a recipe `mask:`; a mask per model). Paths are filled in by `inputs`.
WEIGHTS = "models:\n  - model: {ft1}\n    parameters: {{weight: 0.6{extra}}}\n  - model: {ft2}\n    parameters: {{weight: 0.4{extra}}}\n"
SPARSE = WEIGHTS.replace("{extra}", ", density: 0.5")
PLAIN = WEIGHTS.replace("{extra}", "")
ABILITY = "ability: {{model: {ft1}, language_model: {ft2}}}\n"
LANGUAGES = "languages: [{{model: {ft1}, weight: 0.5}}, {{model: {ft2}, weight: 0.25}}]\n"
METHOD_RECIPES = {
    "linear": PLAIN,
    "task_arithmetic": "base_model: {base}\n" + PLAIN + "parameters: {{lambda: 0.9}}\n",
    "ties": "base_model: {base}\n" + SPARSE,
    "dare_linear": "base_model: {base}\n" + SPARSE,
    "dare_ties": "base_model: {base}\n" + SPARSE,
    "breadcrumbs": "base_model: {base}\n" + SPARSE + "parameters: {{rescale: true}}\n",
    "breadcrumbs_ties": "base_model: {base}\n" + SPARSE,
    "della": "base_model: {base}\n" + SPARSE,
    "della_linear": "base_model: {base}\n" + SPARSE,
    "slerp": "base_model: {base}\nmodels:\n  - model: {ft1}\nparameters: {{t: 0.3}}\n",
    "model_stock": "base_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n",
    "passthrough": "slices:\n  - sources: [{{model: {ft1}, layer_range: [0, 2]}}]\n  - sources: [{{model: {ft2}, layer_range: [1, 2]}}]\n"
    'parameters:\n  scale:\n    - filter: "*.mlp.*"\n      value: 0.5\n    - value: 1.0\n',
    "delta": "base_model: {base}\nmodels:\n  - model: {ft1}\n",
    "ability_vector": "base_model: {base}\n" + ABILITY,
    "language_vector": "base_model: {base}\n" + LANGUAGES,
    "maet": "base_model: {base}\n" + ABILITY + "languages: [{{model: {ft2}, weight: 1.0}}]\nparameters: {{k2: 0.5}}\n",
    "ablate_zero": "base_model: {base}\nmask: {elements}\n",
    "ablate_mean": "base_model: {base}\nmask: {elements}\n",
    "ablate_noise": "base_model: {base}\nmask: {elements}\nparameters: {{scale: 0.5}}\n",
    "nuslerp": "base_model: {base}\n" + PLAIN,
    "nearswap": "base_model: {base}\nmodels:\n  - model: {ft1}\nparameters: {{t: 0.01}}\n",
    "multislerp": "base_model: {base}\n" + PLAIN,
    "karcher": "models:\n  - model: {ft1}\n  - model: {ft2}\n",
    "sce": "base_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\nparameters: {{select_topk: 0.5}}\n",
    "ram": "base_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\n",
    "ramplus_tl": "base_model: {base}\nmodels:\n  - model: {ft1}\n  - model: {ft2}\nparameters: {{r: 0.5}}\n",
    "arcee_fusion": "base_model: {base}\nmodels:\n  - model: {ft1}\n",
    "fisher": WEIGHTS.replace("{extra}", ", fisher: {fisher1}", 1).replace("{extra}", ", fisher: {fisher2}"),
    "regmean": WEIGHTS.replace("{extra}", ", gram: {gram1}", 1).replace("{extra}", ", gram: {gram2}"),
}
MASKED_RECIPES = {  # name: (method, recipe)
    "masked": ("ties", "base_model: {base}\nmask: {rows}\n" + SPARSE),
    "model-masks": (
        "dare_ties",
        "base_model: {base}\nmodels:\n"
        "  - model: {ft1}\n    mask: {elements}\n    parameters: {{weight: 0.6, density: 0.5}}\n"
        "  - model: {ft2}\n    mask: {ffn}\n    parameters: {{weight: 0.4, density: 0.5}}\n",
    ),
}
RECIPES = {f"merge-{m}": (m, body) for m, body in METHOD_RECIPES.items()} | {f"merge-{n}": mb for n, mb in MASKED_RECIPES.items()}
LOCATE = [(g, s) for g in ("row", "ffn", "element") for s in ("global", "tensor")]
MASK_OPS = {"union": ("rows", "rows2"), "intersect": ("rows", "elements"), "diff": ("elements", "rows2")}

CHECKPOINTS = [*RECIPES, "delta"]
MASKS = [f"locate-{g}-{s}.mask" for g, s in LOCATE] + [f"{op}.mask" for op in MASK_OPS]
TRAIN = ["--max-steps", "3", "--seq-len", "32", "--batch-size", "2", "--lr", "1e-2", "--eval-share", "0.1", "--seed", SEED,
         "--max-shard-size", SHARD]  # fmt: skip

# Runs `neuroloc ARGS` for each ARGS of a JSON list, as `python -m neuroloc_cli ARGS` would.
DRIVER = """
import json, sys, torch
from neuroloc_cli.cli.app import main
print(json.dumps({"threads": torch.get_num_threads()}), flush=True)
for argv in json.load(open(sys.argv[1])):
    sys.argv = ["neuroloc", *argv]
    try:
        main()
    except SystemExit as e:
        if e.code not in (0, None):
            sys.exit(f"neuroloc {' '.join(argv)}: exit code {e.code}")
"""


def _env(threads: int, run: str) -> dict[str, str]:
    # Each run gets its own string-hash seed, so an order that follows hashing would show.
    return os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads), "PYTHONHASHSEED": {"a": "1", "b": "2"}[run]}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory) -> dict[str, Path]:
    """A base, two fine-tunes, four masks, a corpus and the recipes, shared by every run."""
    root = tmp_path_factory.mktemp("determinism")
    shard = 300_000
    base = build_checkpoint(tiny_config("llama", hidden=72, vocab=4097), root / "base", seed=0, dtype=torch.bfloat16, max_shard_bytes=shard)
    paths = {"root": root, "base": base}
    for i in (1, 2):
        paths[f"ft{i}"] = derive_finetune(base, root / f"ft{i}", seed=i, max_shard_bytes=shard)
    from neuroloc_cli.locate import LOCATORS

    locate = LOCATORS.get("delta").run
    for name, tuned, granularity in (
        ("rows", "ft1", "row"),
        ("rows2", "ft2", "row"),
        ("elements", "ft1", "element"),
        ("ffn", "ft2", "ffn"),
    ):
        paths[name] = root / f"{name}.mask"
        locate(base=base, tuned=paths[tuned], top=0.3, granularity=granularity).save(paths[name])
    _side_files(paths)
    rng = random.Random(0)
    paths["corpus"] = root / "corpus.jsonl"
    paths["corpus"].write_text("".join(json.dumps({"text": " ".join(rng.choice(SENTENCES) for _ in range(3))}) + "\n" for _ in range(60)))
    for name, (method, body) in RECIPES.items():
        paths[name] = root / f"{name}.yaml"
        paths[name].write_text(f"merge_method: {method}\n" + body.format(**paths) + "out_dtype: float32\n")
    return paths


def _side_files(paths: dict[str, Path]) -> None:
    """Seeded Fisher and Gram files of the block tensors for `fisher` and `regmean`."""
    from neuroloc_cli.arch import in_blocks
    from neuroloc_cli.io.checkpoint import Checkpoint
    from neuroloc_cli.masks.importance import ImportanceMeta, write_importance

    tensors = {n: i.shape for n, i in Checkpoint.open(paths["base"]).tensors.items() if in_blocks(n)}
    for i in (1, 2):
        g = torch.Generator().manual_seed(100 + i)
        fisher = {n: torch.rand(shape, generator=g).pow_(3) for n, shape in tensors.items()}
        grams = {}
        for n, shape in tensors.items():
            if len(shape) == 2:
                x = torch.randn(2 * shape[1], shape[1], generator=g)
                grams[n] = x.T @ x / len(x)
        paths[f"fisher{i}"], paths[f"gram{i}"] = paths["root"] / f"fisher{i}.safetensors", paths["root"] / f"gram{i}.safetensors"
        write_importance(paths[f"fisher{i}"], fisher, ImportanceMeta("fisher", "sum"))
        write_importance(paths[f"gram{i}"], grams, ImportanceMeta("gram", "sum"))


def _commands(p: dict[str, Path], out: Path) -> list[list[str]]:
    """Every writing command, its outputs under `out`."""
    cmds = []
    for name, (method, _) in RECIPES.items():
        seed = ["--seed", SEED] if METHODS.get(method).random else []
        cmds.append(["merge", str(p[name]), "-o", str(out / name), "--max-shard-size", SHARD, *seed])
    cmds.append(["delta", str(p["base"]), str(p["ft1"]), "-o", str(out / "delta"), "--max-shard-size", SHARD])
    for g, s in LOCATE:
        cmds.append(["locate", "delta", str(p["base"]), str(p["ft1"]), "-o", str(out / f"locate-{g}-{s}.mask"), "--top", "0.2",
                     "--granularity", g, "--scope", s])  # fmt: skip
    for op, (a, b) in MASK_OPS.items():
        cmds.append(["mask", op, str(p[a]), str(p[b]), "-o", str(out / f"{op}.mask")])
    cmds.append(["train", str(p["base"]), "--data", str(p["corpus"]), "-o", str(out / "train"), *TRAIN])
    return cmds


def _run_all(jobs: list[tuple[list[str], dict[str, str]]]) -> list[str]:
    """Run the processes (argv, env) side by side; return their stdouts once all succeeded."""
    procs = [
        subprocess.Popen([sys.executable, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for argv, env in jobs
    ]
    results = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, results):
        assert p.returncode == 0, err[-3000:]
    return [out for out, _ in results]


@pytest.fixture(scope="module")
def runs(inputs) -> dict[tuple[int, str], Path]:
    """Every command of `_commands`, in one process per (threads, run) of RUNS; a one-thread
    and a two-thread process at a time (the results do not depend on what runs beside)."""
    outs = {key: inputs["root"] / f"threads{key[0]}-{key[1]}" for key in RUNS}
    for run in ("a", "b"):
        jobs = []
        for threads in (1, 2):
            batch = inputs["root"] / f"commands-{threads}-{run}.json"
            batch.write_text(json.dumps(_commands(inputs, outs[threads, run])))
            jobs.append((["-c", DRIVER, str(batch)], _env(threads, run)))
        for threads, stdout in zip((1, 2), _run_all(jobs)):
            assert json.loads(stdout.splitlines()[0]) == {"threads": threads}  # the knob took effect
    return outs


def test_every_method_is_covered():
    assert set(METHOD_RECIPES) == set(METHODS)


# -- comparing outputs --------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _provenance(folder: Path) -> dict:
    """`neuroloc.json` less what may differ: the time, and the paths a training run wrote to."""
    from neuroloc_cli.train.export import RUN_ONLY_SETTINGS

    doc = json.loads((folder / "neuroloc.json").read_text())
    assert doc.pop("created")
    if isinstance(doc.get("config"), dict):
        doc["config"] = {k: v for k, v in doc["config"].items() if k not in RUN_ONLY_SETTINGS}
    return doc


VOLATILE_LOG = {"time", "tokens_per_s"}


def _log(folder: Path) -> list[dict]:
    """The training log less its times and throughput."""
    lines = (folder / "train_log.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in VOLATILE_LOG} for line in lines]


def _differing(a: Path, b: Path) -> list[str]:
    """The files of checkpoint folders `a` and `b` that differ (all but the two side files
    compared by `_provenance` and `_log`), and those only one of them has."""
    names = {p.name for p in a.iterdir()} | {p.name for p in b.iterdir()}
    skip = {"neuroloc.json", "train_log.jsonl"}
    return sorted(n for n in names - skip if not ((a / n).is_file() and (b / n).is_file() and _sha(a / n) == _sha(b / n)))


def _assert_same_checkpoint(a: Path, b: Path) -> None:
    assert not _differing(a, b), f"{a.name}: files differ between {a.parent.name} and {b.parent.name}: {_differing(a, b)}"
    assert _provenance(a) == _provenance(b)
    if (a / "train_log.jsonl").is_file() or (b / "train_log.jsonl").is_file():
        assert _log(a) == _log(b)


def _assert_same(a: Path, b: Path) -> None:
    """Checkpoint folders: see `_assert_same_checkpoint`; mask files: the same bytes."""
    if a.suffix == ".mask":
        Mask.load(a)  # a mask that neuroloc reads back
        assert _sha(a) == _sha(b), f"{a.name}: {b.parent.name} differs from {a.parent.name}"
    else:
        assert len(list(a.glob("*.safetensors"))) > 1  # sharded: the index is compared too
        _assert_same_checkpoint(a, b)


# Outputs whose bytes depend on the thread count; see the module docstring.
THREAD_DEPENDENT = {
    "train": "multi-threaded matrix products and reductions sum in a thread-count-dependent order",
}


@pytest.mark.parametrize("name", [*CHECKPOINTS, *MASKS, "train"])
def test_same_bytes_across_runs(runs, name):
    for threads in (1, 2):
        _assert_same(runs[threads, "a"] / name, runs[threads, "b"] / name)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.xfail(reason=THREAD_DEPENDENT[n])) if n in THREAD_DEPENDENT else n
        for n in [*CHECKPOINTS, *MASKS, "train"]
    ],
)
def test_same_bytes_at_one_and_two_threads(runs, name):
    # Non-strict expected failures: where a library happens not to split the work (another
    # CPU, another MKL), the thread-dependent outputs may agree too.
    _assert_same(runs[1, "a"] / name, runs[2, "a"] / name)


def test_thread_dependent_outputs_differ_only_in_their_tensors_and_scores(runs):
    # What stays byte-identical even where the thread count matters: the side files, the
    # layout (index), and all but the thread-dependent numbers of neuroloc.json.
    for name in THREAD_DEPENDENT:
        one, two = runs[1, "a"] / name, runs[2, "a"] / name
        assert all(n.endswith(".safetensors") for n in _differing(one, two)), name
        p1, p2 = _provenance(one), _provenance(two)
        for doc in (p1, p2):
            doc.pop("perplexity", None)
            for row in doc.get("maet", {}).get("ranking", []):
                row.pop("score")
        assert p1 == p2, name


def test_shards_record_no_time_nor_output_path(runs):
    for name in [*CHECKPOINTS, "train"]:
        folder = runs[RUNS[0]] / name
        assert "created" in json.loads((folder / "neuroloc.json").read_text())
        for shard in folder.glob("*.safetensors"):
            with safe_open(str(shard), framework="pt") as f:
                provenance = json.loads(f.metadata()["neuroloc.provenance"])
            assert "created" not in provenance and provenance["command"] in ("merge", "delta", "train")
            assert str(runs[RUNS[0]]) not in json.dumps(provenance)


def test_python_m_gives_the_same_bytes(inputs, runs, tmp_path):
    # The batches above run commands through `main` in one process; `python -m neuroloc_cli`
    # gives the same bytes (a random method, a mask).
    merge = ["merge", str(inputs["merge-dare_ties"]), "-o", str(tmp_path / "merge"), "--max-shard-size", SHARD, "--seed", SEED]
    locate = [
        "locate",
        "delta",
        str(inputs["base"]),
        str(inputs["ft1"]),
        "-o",
        str(tmp_path / "m.mask"),
        "--top",
        "0.2",
        "--granularity",
        "element",
    ]
    _run_all([(["-m", "neuroloc_cli", *argv], _env(2, "a")) for argv in (merge, locate)])
    _assert_same(runs[1, "a"] / "merge-dare_ties", tmp_path / "merge")
    assert _sha(tmp_path / "m.mask") == _sha(runs[1, "a"] / "locate-element-global.mask")
