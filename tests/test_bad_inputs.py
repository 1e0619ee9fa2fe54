"""Bad input, as a table: every case is a broken file, recipe or command line a user can
produce, and each must end the same way.

For every case the test asserts:
- the exit code (2 usage, 3 input, 4 output; never 1, which means a bug);
- stderr is exactly one line, starting `error: ` and holding the expected fragment (which
  names the file, tensor or key at fault), with no traceback;
- nothing was written: the case's folder holds the same files, byte for byte, before and after
  (no output, no hidden temporary folder, every input untouched).

Each case builds its inputs in its own folder from copies of the tiny test models.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from neuroloc_cli.synthetic import build_checkpoint, tiny_config


@dataclass
class Case:
    """Where a case runs: copies of a base and two fine-tunes (llama, sharded) in `root`."""

    root: Path
    base: Path
    ft1: Path
    ft2: Path

    def write(self, name: str, text: str) -> Path:
        path = self.root / name
        path.write_text(text)
        return path

    def recipe(self, text: str = "", name: str = "recipe.yaml", **fields: str) -> Path:
        """A task-arithmetic recipe of base + ft1 (weight 0.5), with `fields` replaced/added."""
        doc = {
            "merge_method": "task_arithmetic",
            "base_model": str(self.base),
            "models": f"\n  - model: {self.ft1}\n    parameters: {{weight: 0.5}}",
        }
        doc.update(fields)
        body = "".join(f"{k}: {v}\n" for k, v in doc.items()) + text
        return self.write(name, body)

    def shard(self, model: Path, i: int = 0) -> Path:
        return sorted(model.glob("model-*.safetensors"))[i]

    def mask(self, model: Path | None = None, name: str = "m.safetensors") -> Path:
        """A row mask made by `locate delta` of base → ft1, or of `model` against itself."""
        from neuroloc_cli.locate import LOCATORS

        mask = LOCATORS.get("delta").run(base=model or self.base, tuned=model or self.ft1, top=0.5)
        mask.save(self.root / name)
        return self.root / name

    def corpus(self, name: str = "c.txt", lines: int = 200) -> Path:
        return self.write(name, "".join(f"the fox number {i} jumps over the lazy dog .\n\n" for i in range(lines)))


def _edit_header(shard: Path, edit: Callable[[dict], None]) -> None:
    """Rewrite a shard's JSON header with `edit` applied, keeping its data section."""
    raw = shard.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    edit(header)
    new = json.dumps(header).encode()
    shard.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n :])


def _first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def _by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])


def _set(header: dict, field: str, value) -> None:
    header[_first_tensor(header)][field] = value


def _overlap(model: Path) -> None:
    """Shift the second tensor (by offset) of a shard that has two 4 bytes back, into the first."""
    for shard in sorted(model.glob("model-*.safetensors")):
        n = struct.unpack("<Q", shard.read_bytes()[:8])[0]
        if len(_by_offset(json.loads(shard.read_bytes()[8 : 8 + n]))) >= 2:
            _edit_header(shard, lambda h: h[_by_offset(h)[1]].update(data_offsets=[x - 4 for x in h[_by_offset(h)[1]]["data_offsets"]]))
            return
    raise AssertionError("no shard with two tensors")


def _delta_as_model(c: Case) -> list:
    """Write ft1 − base as a delta checkpoint, then name it as a model of a merge."""
    from neuroloc_cli.merge.plan import plan_delta
    from neuroloc_cli.merge.run import run_merge

    run_merge(plan_delta(c.base, c.ft1), c.root / "d")
    return ["merge", c.recipe(models=f"[{{model: {c.root / 'd'}, parameters: {{weight: 1}}}}]"), "-o", c.root / "out"]


def _truncate(path: Path, keep: int | float) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: keep if isinstance(keep, int) else int(len(data) * keep)])


def _drop_tensor(c: Case, model: Path, name: str) -> None:
    """Remove one tensor from a sharded model (its shard and index rewritten)."""
    from neuroloc_cli.io.checkpoint import Checkpoint
    from tests.helpers import load_all

    tensors = load_all(model)
    shard = Checkpoint.open(model).tensors[name].file
    del tensors[name]
    index = json.loads((model / "model.safetensors.index.json").read_text())
    del index["weight_map"][name]
    keep = {k: v for k, v in tensors.items() if index["weight_map"].get(k) == shard}
    save_file(keep, str(model / shard), metadata={"format": "pt"})
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


def _add_tensor(model: Path, name: str) -> None:
    shard = sorted(model.glob("model-*.safetensors"))[-1]
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = torch.zeros(3)
    save_file(tensors, str(shard), metadata={"format": "pt"})
    index = json.loads((model / "model.safetensors.index.json").read_text())
    index["weight_map"][name] = shard.name
    (model / "model.safetensors.index.json").write_text(json.dumps(index))


def _reshape(model: Path, name: str) -> None:
    from neuroloc_cli.io.checkpoint import Checkpoint

    shard = model / Checkpoint.open(model).tensors[name].file
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    tensors[name] = tensors[name][:-1].clone()
    save_file(tensors, str(shard), metadata={"format": "pt"})


def _poison(model: Path, name: str) -> None:
    from neuroloc_cli.io.checkpoint import Checkpoint

    shard = model / Checkpoint.open(model).tensors[name].file
    from safetensors import safe_open

    with safe_open(str(shard), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    tensors[name] = tensors[name].clone()
    tensors[name].view(-1)[3] = float("nan")
    save_file(tensors, str(shard), metadata=meta)


def _index(model: Path, edit: Callable[[dict], None]) -> None:
    path = model / "model.safetensors.index.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


EMBED = "model.embed_tokens.weight"
UP = "model.layers.0.mlp.up_proj.weight"

# (id, setup(case) -> argv, exit code, stderr fragment). `{root}`, `{base}`, `{ft1}` in the
# fragment are filled in from the case.
CASES: list[tuple[str, Callable[[Case], list], int, str]] = [
    # --- checkpoints: damaged shards ---------------------------------------------------------
    (
        "truncated shard mid-tensor",
        lambda c: (_truncate(c.shard(c.ft1), 0.6), ["merge", c.recipe(), "-o", c.root / "out"])[1],
        3,
        "{ft1}/model-00001-of-",
    ),
    (
        "header length past end of file",
        lambda c: (_truncate(c.shard(c.base), 100), ["inspect", c.base])[1],
        3,
        "invalid safetensors header",
    ),
    (
        "garbage header JSON",
        lambda c: (c.shard(c.base).write_bytes(struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 64), ["inspect", c.base])[1],
        3,
        "invalid safetensors header",
    ),
    ("overlapping data offsets", lambda c: (_overlap(c.ft1), ["recipe", "validate", c.recipe()])[1], 3, "{ft1}/model-0000"),
    (
        "data offsets out of range",
        lambda c: (_edit_header(c.shard(c.base), lambda h: _set(h, "data_offsets", [0, 10**9])), ["inspect", c.base])[1],
        3,
        "tensor",
    ),
    (
        "a list as a dtype",
        lambda c: (_edit_header(c.shard(c.base), lambda h: _set(h, "dtype", ["BF16"])), ["inspect", c.base])[1],
        3,
        "{base}/model-00001-of-",
    ),
    (
        "string data offsets",
        lambda c: (_edit_header(c.shard(c.base), lambda h: _set(h, "data_offsets", ["0", "8"])), ["inspect", c.base])[1],
        3,
        "{base}/model-00001-of-",
    ),
    (
        "a string as __metadata__",
        lambda c: (_edit_header(c.shard(c.base), lambda h: h.update(__metadata__="oops")), ["inspect", c.base])[1],
        3,
        "{base}/model-00001-of-",
    ),
    (
        "unsupported dtype",
        lambda c: (_edit_header(c.shard(c.base), lambda h: _set(h, "dtype", "Q4")), ["inspect", c.base])[1],
        3,
        "unsupported dtype 'Q4'",
    ),
    # --- checkpoints: folders and indexes ----------------------------------------------------
    (
        "empty folder",
        lambda c: ((c.root / "empty").mkdir(), ["inspect", c.root / "empty"])[1],
        3,
        "{root}/empty: no model.safetensors or model.safetensors.index.json",
    ),
    (
        ".bin-only folder",
        lambda c: ((c.root / "bin").mkdir(), (c.root / "bin" / "pytorch_model.bin").write_bytes(b"x"), ["inspect", c.root / "bin"])[2],
        3,
        "holds only PyTorch .bin weights",
    ),
    ("a file, not a folder", lambda c: ["inspect", c.shard(c.base)], 3, "not a folder"),
    (
        "index names a missing shard",
        lambda c: (c.shard(c.base, 1).unlink(), ["inspect", c.base])[1],
        3,
        "shard listed in model.safetensors.index.json is missing",
    ),
    (
        "index points a tensor at the wrong shard",
        lambda c: (
            _index(
                c.base,
                lambda d: (
                    d["weight_map"].update({EMBED: c.shard(c.base, 1).name})
                    if d["weight_map"][EMBED] != c.shard(c.base, 1).name
                    else d["weight_map"].update({EMBED: c.shard(c.base, 0).name})
                ),
            ),
            ["inspect", c.base],
        )[1],
        3,
        EMBED,
    ),
    (
        "index with an empty weight_map",
        lambda c: (_index(c.base, lambda d: d.update(weight_map={})), ["recipe", "validate", c.recipe()])[1],
        3,
        "model.safetensors.index.json",
    ),
    (
        "index that is not JSON",
        lambda c: ((c.base / "model.safetensors.index.json").write_text("{"), ["inspect", c.base])[1],
        3,
        "{base}/model.safetensors.index.json: invalid",
    ),
    (
        "base without config.json",
        lambda c: ((c.base / "config.json").unlink(), ["merge", c.recipe(), "-o", c.root / "out"])[1],
        3,
        "{base}/config.json is missing",
    ),
    (
        "invalid config.json",
        lambda c: ((c.ft1 / "config.json").write_text("{"), ["recipe", "validate", c.recipe()])[1],
        3,
        "{ft1}/config.json: invalid JSON",
    ),
    # --- checkpoints that disagree -----------------------------------------------------------
    (
        "shape differs between models",
        lambda c: (_reshape(c.ft1, UP), ["merge", c.recipe(), "-o", c.root / "out"])[1],
        3,
        f"tensor {UP} has shape",
    ),
    (
        "tensor missing in one model",
        lambda c: (_drop_tensor(c, c.ft1, UP), ["merge", c.recipe(), "-o", c.root / "out"])[1],
        3,
        f"tensor {UP} is missing",
    ),
    (
        "extra tensor in one model",
        lambda c: (_add_tensor(c.ft1, "model.extra.weight"), ["merge", c.recipe(), "-o", c.root / "out"])[1],
        3,
        "tensor model.extra.weight is not in base_model",
    ),
    (
        "NaN in a model, when locating",
        lambda c: (_poison(c.ft1, UP), ["locate", "delta", c.base, c.ft1, "-o", c.root / "m.safetensors"])[1],
        3,
        f"tensor {UP} holds NaN or inf",
    ),
    (
        "NaN in a model, when ranking",
        lambda c: (_poison(c.ft1, UP), ["rank", c.ft1, c.ft2, "--base", c.base])[1],
        3,
        f"tensor {UP} holds NaN or inf",
    ),
    ("delta checkpoint given as a model", _delta_as_model, 3, "is a delta checkpoint, not a model"),
    (
        "hub name",
        lambda c: ["merge", c.recipe(base_model="meta-llama/Llama-3-8B"), "-o", c.root / "out"],
        3,
        "meta-llama/Llama-3-8B: no such folder, and neuroloc does not download",
    ),
    # --- recipes -----------------------------------------------------------------------------
    ("missing recipe", lambda c: ["merge", c.root / "nope.yaml", "-o", c.root / "out"], 2, "{root}/nope.yaml: cannot read"),
    ("empty recipe", lambda c: ["recipe", "validate", c.write("r.yaml", "")], 2, "{root}/r.yaml"),
    ("recipe that is a list", lambda c: ["recipe", "validate", c.write("r.yaml", "- a\n- b\n")], 2, "{root}/r.yaml"),
    ("YAML syntax error", lambda c: ["recipe", "validate", c.write("r.yaml", "merge_method: [linear\n")], 2, "{root}/r.yaml"),
    (
        "unknown method",
        lambda c: ["recipe", "validate", c.recipe(merge_method="task_arithmetc")],
        2,
        "merge_method: unknown merge method 'task_arithmetc' (did you mean \"task_arithmetic\"?)",
    ),
    ("unknown top-level key", lambda c: ["recipe", "validate", c.recipe(out_dtyp="bfloat16")], 2, "unknown key 'out_dtyp'"),
    ("unknown parameter", lambda c: ["recipe", "validate", c.recipe(parameters="{wieght: 1}")], 2, "has no parameter 'wieght'"),
    (
        "parameter of the wrong type",
        lambda c: ["recipe", "validate", c.recipe(models=f"[{{model: {c.ft1}, parameters: {{weight: abc}}}}]")],
        2,
        "models[0].parameters.weight: must be a number, got 'abc'",
    ),
    (
        "density out of range",
        lambda c: [
            "recipe",
            "validate",
            c.recipe(merge_method="ties", models=f"[{{model: {c.ft1}, parameters: {{weight: 1, density: 1.5}}}}]"),
        ],
        2,
        "models[0].parameters.density",
    ),
    (
        "della density ± epsilon out of (0, 1)",
        lambda c: [
            "recipe",
            "validate",
            c.recipe(merge_method="della", models=f"[{{model: {c.ft1}, parameters: {{weight: 1, density: 0.5, epsilon: 0.6}}}}]"),
        ],
        2,
        "density ± epsilon must lie in (0, 1)",
    ),
    (
        "linear weights summing to zero",
        lambda c: [
            "recipe",
            "validate",
            c.recipe(
                merge_method="linear",
                base_model="null",
                models=f"[{{model: {c.ft1}, parameters: {{weight: 1}}}}, {{model: {c.ft2}, parameters: {{weight: -1}}}}]",
            ),
        ],
        2,
        "the weights sum to zero",
    ),
    (
        "empty per-layer list",
        lambda c: ["recipe", "validate", c.recipe(models=f"[{{model: {c.ft1}, parameters: {{weight: []}}}}]")],
        2,
        "models[0].parameters.weight",
    ),
    ("dtype that does not exist", lambda c: ["recipe", "validate", c.recipe(dtype="float12")], 2, "dtype"),
    ("no models", lambda c: ["recipe", "validate", c.recipe(models="[]")], 2, "models"),
    # --- outputs -----------------------------------------------------------------------------
    ("output equal to an input", lambda c: ["merge", c.recipe(), "-o", c.ft1, "--overwrite"], 4, "output path overlaps input"),
    ("output inside an input", lambda c: ["merge", c.recipe(), "-o", c.base / "merged"], 4, "output path overlaps input"),
    (
        "existing output",
        lambda c: ((c.root / "out").mkdir(), ["merge", c.recipe(), "-o", c.root / "out"])[1],
        4,
        "{root}/out: already exists",
    ),
    (
        "mask over one of its inputs",
        lambda c: ["mask", "union", c.mask(), c.mask(name="n.safetensors"), "-o", c.root / "m.safetensors", "--overwrite"],
        4,
        "output is also an input",
    ),
    (
        "mask inside a model folder",
        lambda c: ["locate", "delta", c.base, c.ft1, "-o", c.base / "m.safetensors"],
        4,
        "output lies inside input",
    ),
    ("picture over an existing file", lambda c: ["mask", "show", c.mask(), "-o", c.mask(name="n.safetensors")], 4, "already exists"),
    # --- masks -------------------------------------------------------------------------------
    ("a file that is not a mask", lambda c: ["mask", "stats", c.shard(c.base)], 3, "not a neuroloc mask"),
    ("a truncated mask", lambda c: (_truncate(c.mask(), 0.5), ["mask", "stats", c.root / "m.safetensors"])[1], 3, "{root}/m.safetensors"),
    (
        "masks of two architectures",
        lambda c: (_gpt2(c), ["mask", "union", c.mask(), c.mask(c.root / "g", name="g.safetensors"), "-o", c.root / "u.safetensors"])[1],
        3,
        "were made for models with different tensors",
    ),
    (
        "mask of another architecture in a merge",
        lambda c: (_gpt2(c), ["merge", c.recipe(mask=str(c.mask(c.root / "g", name="g.safetensors"))), "-o", c.root / "out"])[1],
        3,
        "mask tensor",
    ),
    # --- command-line values -----------------------------------------------------------------
    (
        "--top out of range",
        lambda c: ["locate", "delta", c.base, c.ft1, "--top", "1.5", "-o", c.root / "m.safetensors"],
        2,
        "--top must be a share in (0, 1]",
    ),
    (
        "unknown --granularity",
        lambda c: ["locate", "delta", c.base, c.ft1, "--granularity", "neuron", "-o", c.root / "m.safetensors"],
        2,
        "--granularity must be one of",
    ),
    ("unknown --metric", lambda c: ["rank", c.ft1, c.ft2, "--base", c.base, "--metric", "l3"], 2, "--metric must be one of"),
    (
        "bad --max-shard-size",
        lambda c: ["merge", c.recipe(), "-o", c.root / "out", "--max-shard-size", "lots"],
        2,
        "--max-shard-size: invalid size 'lots'",
    ),
    (
        "unknown --out-dtype",
        lambda c: ["delta", c.base, c.ft1, "-o", c.root / "d", "--out-dtype", "int3"],
        2,
        "--out-dtype: unknown dtype 'int3'",
    ),
    (
        "--seed that is not a number",
        lambda c: ["merge", c.recipe(), "-o", c.root / "out", "--seed", "abc"],
        2,
        "Invalid value for '--seed'",
    ),
    ("merge without an output", lambda c: ["merge", c.recipe()], 2, "merge needs an output folder"),
    # --- training ----------------------------------------------------------------------------
    (
        "empty corpus",
        lambda c: ["train", c.base, "--data", c.write("e.txt", "\n\n"), "-o", c.root / "out"],
        3,
        "{root}/e.txt: empty corpus",
    ),
    (
        "corpus too short for one sequence",
        lambda c: ["train", c.base, "--data", c.write("s.txt", "a b c\n"), "-o", c.root / "out", "--seq-len", "64"],
        3,
        "{root}/s.txt",
    ),
    (
        "invalid JSONL corpus",
        lambda c: ["train", c.base, "--data", c.write("b.jsonl", '{"text": "ok"}\n{"text": \n'), "-o", c.root / "out"],
        3,
        "{root}/b.jsonl:2: not a JSON record",
    ),
    (
        "JSONL records without text",
        lambda c: ["train", c.base, "--data", c.write("b.jsonl", '{"body": "x"}\n'), "-o", c.root / "out"],
        3,
        "{root}/b.jsonl:1: no string field 'text'",
    ),
    ("missing corpus file", lambda c: ["train", c.base, "--data", c.root / "nope.txt", "-o", c.root / "out"], 3, "{root}/nope.txt"),
    (
        "model without a tokenizer",
        lambda c: ([p.unlink() for p in c.base.glob("tokenizer*")], ["train", c.base, "--data", c.corpus(), "-o", c.root / "out"])[1],
        3,
        "{base}",
    ),
    ("negative learning rate", lambda c: ["train", c.base, "--data", c.corpus(), "-o", c.root / "out", "--lr", "-1e-4"], 2, "lr"),
    (
        "--seq-len past the model's positions",
        lambda c: ["train", c.base, "--data", c.corpus(), "-o", c.root / "out", "--seq-len", "4096"],
        2,
        "--seq-len 4096 exceeds the model's 256 positions",
    ),
    # --- evaluation --------------------------------------------------------------------------
    ("missing perplexity file", lambda c: ["eval", c.base, "--ppl", c.root / "nope.jsonl"], 3, "{root}/nope.jsonl"),
    ("perplexity file that is not JSONL", lambda c: ["eval", c.base, "--ppl", c.write("p.jsonl", "{broken\n")], 3, "{root}/p.jsonl"),
    ("perplexity records without text", lambda c: ["eval", c.base, "--ppl", c.write("p.jsonl", '{"body": "x"}\n')], 3, "{root}/p.jsonl"),
    (
        "translation without --src",
        lambda c: ["eval", c.base, "--translate", c.write("t.jsonl", '{"source": "a", "target": "b"}\n'), "--tgt", "en"],
        2,
        "--translate needs --src and --tgt",
    ),
    (
        "translation records without target",
        lambda c: ["eval", c.base, "--translate", c.write("t.jsonl", '{"source": "a"}\n'), "--src", "de", "--tgt", "en"],
        3,
        "{root}/t.jsonl",
    ),
]


def _gpt2(c: Case) -> None:
    build_checkpoint(tiny_config("gpt2"), c.root / "g", seed=0, tokenizer=False)


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


def test_the_corpus_is_large_enough():
    assert len(CASES) >= 40
    assert len({name for name, *_ in CASES}) == len(CASES)


@pytest.mark.parametrize("name,setup,code,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input(zoo, cli, tmp_path, name, setup, code, fragment):
    fam = zoo.get("llama")
    case = Case(tmp_path, *(Path(shutil.copytree(p, tmp_path / p.name)) for p in (fam.base, fam.ft1, fam.ft2)))
    argv = setup(case)
    before = _snapshot(tmp_path)
    r = cli(*argv)
    expected = fragment.format(root=tmp_path, base=case.base, ft1=case.ft1)
    lines = r.stderr.strip().splitlines()
    assert r.exit_code == code, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert expected in lines[0], lines[0]
    assert "Traceback" not in r.stderr and r.stdout == ""
    assert _snapshot(tmp_path) == before
