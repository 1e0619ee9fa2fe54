"""The papers' pipelines at their own scale (`recipes/papers/`), every step as `--dry-run`.

Each `pipeline.sh` runs under bash with `NEUROLOC` pointing at a recorder, so that the exact
command lines it builds (variables expanded, loops unrolled) are collected; each is then run
in-process with `--json` against synthetic checkpoints of the paper's shapes. Those are
headers only: a safetensors header and a sparse file of the right length, whose data are
never read. Nothing a dry run writes exists afterwards, so after each step the test puts
stand-ins of its outputs where the next steps look (header-only checkpoints, masks of the
paper's shares), and checks the figures each step printed against values computed here from
the shapes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from neuroloc_cli.io.checkpoint import KIND_KEY, Kind
from neuroloc_cli.io.writer import OutTensor, encode_header
from neuroloc_cli.masks.format import LAYOUT_KEY, Mask, MaskEntry, layout_digest
from neuroloc_cli.synthetic import SENTENCES, parameter_shapes, write_tokenizer

PAPERS = Path(__file__).resolve().parents[1] / "recipes" / "papers"
SEP_ARG, SEP_CMD = "\x1f", "\x1e"
RECORDER = f'#!/usr/bin/env bash\nprintf \'%s{SEP_ARG}\' "$@" >> "$NEUROLOC_LOG"\nprintf \'{SEP_CMD}\' >> "$NEUROLOC_LOG"\n'

needs_bash = pytest.mark.skipif(shutil.which("bash") is None, reason="the pipelines are bash scripts")


# -- synthetic checkpoints of the papers' shapes -------------------------------------------


def _config(path: Path):
    from transformers import AutoConfig

    doc = json.loads(path.read_text())
    return AutoConfig.for_model(doc.pop("model_type"), **doc)


def header_only(folder: Path, shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, kind: Kind, side: Path | None = None) -> Path:
    """A checkpoint folder whose one shard is a safetensors header and a sparse data section
    of the right length (no data on disk), with `side`'s config and tokenizer files."""
    folder.mkdir(parents=True, exist_ok=True)
    header = encode_header([OutTensor(n, s, dtype) for n, s in shapes.items()], {KIND_KEY: kind.value})
    data = sum(math.prod(s) for s in shapes.values()) * dtype.itemsize
    with open(folder / "model.safetensors", "wb") as f:
        f.write(header)
        f.truncate(len(header) + data)  # sparse: the data section takes no disk
    if side is not None:
        for file in side.iterdir():
            if file.is_file() and file.suffix != ".safetensors" and file.name != "routing.json":
                shutil.copy(file, folder / file.name)
    return folder


def _base(tmp: Path, config_file: Path) -> tuple[Path, dict[str, tuple[int, ...]]]:
    config = _config(config_file)
    shapes = dict(parameter_shapes(config))
    folder = tmp / "base"
    header_only(folder, shapes, torch.bfloat16, Kind.MODEL)
    doc = json.loads(config_file.read_text())
    (folder / "config.json").write_text(json.dumps(doc, indent=2) + "\n")
    write_tokenizer(folder, config.vocab_size)
    return folder, shapes


def _row_mask(shapes: dict[str, tuple[int, ...]], share: float, seed: int) -> Mask:
    """A stand-in for `locate delta`'s mask: `share` of each 2-D weight's rows, seeded."""
    gen = torch.Generator().manual_seed(seed)
    entries = {}
    for name, shape in shapes.items():
        if len(shape) == 2:
            sel = torch.zeros(shape[0], dtype=torch.bool)
            sel[torch.randperm(shape[0], generator=gen)[: int(share * shape[0])]] = True
            entries[name] = MaskEntry(shape, 0, sel)
    return Mask("row", entries, {LAYOUT_KEY: layout_digest(shapes)})


# -- running a pipeline ----------------------------------------------------------------------


def recorded_steps(script: Path, tmp: Path, env: dict[str, str]) -> list[list[str]]:
    """The neuroloc command lines `script` runs under DRY_RUN=1, in order."""
    recorder = tmp / "recorder.sh"
    recorder.write_text(RECORDER)
    recorder.chmod(0o755)
    log = tmp / "commands.log"
    full = {**os.environ, **env, "DRY_RUN": "1", "NEUROLOC": str(recorder), "NEUROLOC_LOG": str(log)}
    p = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=full, timeout=60)
    assert p.returncode == 0, p.stderr
    commands = [c.split(SEP_ARG)[:-1] for c in log.read_text().split(SEP_CMD)[:-1]]
    assert commands and all(c[-1] == "--dry-run" for c in commands)
    return commands


def _opt(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def run_dry(cli, argv: list[str]) -> dict:
    """One step as the pipeline gives it, plus --json: exit 0 and its figures."""
    r = cli(*argv, "--json")
    assert r.exit_code == 0, f"{' '.join(argv)}\n{r.stderr}"
    return r.json()


def _bytes(shapes: dict[str, tuple[int, ...]], itemsize: int) -> int:
    return itemsize * sum(math.prod(s) for s in shapes.values())


def check_full_finetune(doc: dict, shapes: dict[str, tuple[int, ...]]) -> None:
    """Every parameter trains: float32 weights and gradients and AdamW's two float32 moments,
    at least 16 bytes per parameter before activations; the output as stored (bf16)."""
    params, mem = sum(math.prod(s) for s in shapes.values()), doc["memory_bytes"]
    assert mem["weights"] == 4 * params and mem["gradients"] == 4 * params and mem["selection"] == 0
    assert mem["optimizer_state"] == doc["optimizer_state_bytes"] == 8 * params + 4 * len(shapes)
    assert mem["weights"] + mem["gradients"] + mem["optimizer_state"] >= 16 * params
    assert mem["activations"] >= 4 * params  # at least the optimizer step's temporary
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    assert doc["disk_bytes"]["output"] == 2 * params


def check_merge_memory(doc: dict, masked: int | None = None) -> None:
    """An elementwise merge streams blocks of 2M elements: at the peak, a block of every input
    in the compute dtype (and of the base as stored, bf16, for a masked one), and the next
    one, whatever the model's size. An element mask is unpacked a whole tensor at a time:
    `masked` is the largest tensor's element count, two such selections at once."""
    mem, c = doc["memory_bytes"], 4 if doc["compute_dtype"] == "float32" else 2
    block = (c * len(doc["inputs"]) + (2 if masked is not None else 0)) * 2 * 2**20
    assert mem["peak_rows"] is not None and mem["inputs"] == block and mem["next_inputs"] == block
    selections = 2 * masked if masked is not None else 0
    assert mem["total"] < 8 * block + selections + mem["masks"]  # a few blocks, not a tensor, let alone a model
    assert mem["total"] == sum(mem[k] for k in ("inputs", "next_inputs", "work", "masks"))


def _write_corpora(data: Path, names: list[str]) -> None:
    data.mkdir(parents=True, exist_ok=True)
    for i, name in enumerate(names):
        text = "\n\n".join([SENTENCES[i % len(SENTENCES)], SENTENCES[3]] * 400) + "\n"
        if name.endswith(".jsonl"):
            text = "".join(json.dumps({"text": s}, ensure_ascii=False) + "\n" for s in text.split("\n\n"))
        (data / name).write_text(text, encoding="utf-8")


# -- MAET on Llama-3-8B -----------------------------------------------------------------------


@needs_bash
def test_maet_pipeline_dry_runs_at_llama_3_8b_scale(cli, tmp_path):
    folder = PAPERS / "maet"
    base, shapes = _base(tmp_path, folder / "llama-3-8b.config.json")
    langs = ["en", "es", "zh", "bn", "te"]
    data, out = tmp_path / "data", tmp_path / "run"
    _write_corpora(data, ["math-en-probe.jsonl", "math-en.jsonl", *(f"general-{lang}{p}.txt" for lang in langs for p in ("", "-probe"))])
    steps = recorded_steps(folder / "pipeline.sh", tmp_path, {"MODEL": str(base), "DATA": str(data), "OUT": str(out)})
    assert [s[0] for s in steps].count("train") == 1 + len(langs) + 2 + 4 and steps[-1][:2] == ["merge", str(folder / "maet-math.yaml")]

    params = sum(math.prod(s) for s in shapes.values())
    assert 8.0e9 < params < 8.1e9  # Llama-3-8B: 8.03B parameters
    rows = sum(s[0] for s in shapes.values() if len(s) == 2)
    largest = max(math.prod(s) for s in shapes.values())
    masks: dict[str, Mask] = {}
    seen = set()
    for argv in steps:
        doc = run_dry(cli, argv)
        cmd = argv[0] if argv[0] not in ("locate", "mask") else " ".join(argv[:2])
        seen.add(cmd)
        if cmd == "train":
            target = Path(_opt(argv, "-o"))
            if "--train-mask" in argv:  # split rows: two fp32 moments per selected element, a step count per slice
                m = masks[_opt(argv, "--train-mask")]
                selected = sum(e.selected_units * e.shape[1] for e in m.entries.values())
                assert doc["trainable"] == selected and 0.04 * params < selected < 0.11 * params
                assert 8 * selected <= doc["optimizer_state_bytes"] <= 8 * selected + 4 * 10 * len(m.entries)
                assert doc["total_steps"] == math.ceil(2e9 / (4 * 64 * 4096))  # Table 5: 2B tokens, 1M-token batches
                # the whole tensor's gradient (its matmul is whole), the slice's own, its copy and indices
                split = [n for n, e in m.entries.items() if e.selected_units]
                mem = doc["memory_bytes"]
                assert mem["weights"] == 4 * params and mem["optimizer_state"] == doc["optimizer_state_bytes"]
                assert mem["gradients"] == 4 * sum(math.prod(shapes[n]) for n in split) + 4 * selected
                assert mem["selection"] == 4 * selected + 8 * sum(m.entries[n].selected_units for n in split)
                assert doc["disk_bytes"]["output"] == 2 * params
            else:  # full finetuning: Adam's two fp32 moments of every parameter (≈ 64 GB)
                assert doc["trainable"] == params
                check_full_finetune(doc, shapes)
            assert doc["tokens_per_step"] == 4 * 64 * 4096 and doc["hyper_parameters"]["lr"] == 5e-5
            header_only(target, shapes, torch.bfloat16, Kind.MODEL, side=base)
        elif cmd == "locate delta":
            assert doc["units"] == rows and doc["selected_units"] == int(0.05 * rows) and doc["scope"] == "global"
            assert doc["disk_bytes"]["mask"] == rows and doc["disk_bytes"]["importance"] == 0
            assert doc["memory_bytes"]["tensors"] == 9 * largest  # two fp32 reads and a finite check of the embedding
            path = _opt(argv, "-o")
            masks[path] = _row_mask(shapes, 0.05, seed=len(masks))
            masks[path].save(Path(path))
        elif cmd == "mask union":
            assert doc["disk_bytes"]["total"] == rows
            r = cli(*argv[:-1])  # masks are small: the real union, for the steps that train on it
            assert r.exit_code == 0, r.stderr
            masks[_opt(argv, "-o")] = Mask.load(_opt(argv, "-o"))
        elif cmd == "merge":
            method = doc["method"]
            itemsize = 2 if method == "maet" else 4  # the vectors are float32 delta checkpoints
            assert doc["out_bytes"] == _bytes(shapes, itemsize) and doc["tensors"] == len(shapes)
            check_merge_memory(doc)
            kind = Kind.MODEL if method == "maet" else Kind.DELTA
            header_only(Path(_opt(argv, "-o")), shapes, torch.float32 if itemsize == 4 else torch.bfloat16, kind, side=base)
        elif cmd == "rank":
            assert doc["tensors"] == len(shapes) and doc["disk_bytes"]["total"] == 0
            assert doc["memory_bytes"]["blocks"] == 2 * 4 * 2 * 2**20  # two float32 blocks of 2M elements
    assert seen == {"train", "locate delta", "mask union", "merge", "rank"}


# -- linguistic regions on Llama-2-7B ---------------------------------------------------------


def _empty_element_mask(path: Path, shapes: dict[str, tuple[int, ...]], names: list[str], model_shapes) -> None:
    """A stand-in element mask over `names` that selects nothing: its header and a sparse data
    section of a bit per element (what `locate gradient` writes, less the selection)."""
    layout = {n: {"shape": list(shapes[n]), "axis": None} for n in names}
    meta = {
        "neuroloc.kind": "mask",
        "neuroloc.mask_version": "1",
        "granularity": "element",
        "tensors": json.dumps(layout, separators=(",", ":")),
        "provenance": json.dumps({LAYOUT_KEY: layout_digest(model_shapes)}),
    }
    tensors = [OutTensor(n, ((math.prod(shapes[n]) + 7) // 8,), torch.uint8) for n in names]
    header = encode_header(tensors, meta)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(header)
        f.truncate(len(header) + sum(t.nbytes for t in tensors))


@needs_bash
def test_linguistic_regions_pipeline_dry_runs_at_llama_2_7b_scale(cli, tmp_path):
    folder = PAPERS / "linguistic-regions"
    base, shapes = _base(tmp_path, folder / "llama-2-7b.config.json")
    langs = ["en", "zh", "ar", "es", "ru", "ko"]
    data, out = tmp_path / "data", tmp_path / "run"
    _write_corpora(data, [f"{lang}.txt" for lang in langs] + ["further-pretraining.txt"])
    steps = recorded_steps(folder / "pipeline.sh", tmp_path, {"MODEL": str(base), "DATA": str(data), "OUT": str(out)})

    params = sum(math.prod(s) for s in shapes.values())
    assert 6.7e9 < params < 6.8e9  # Llama-2-7B: 6.74B parameters
    blocks = [n for n in shapes if ".layers." in n]
    scored = sum(math.prod(shapes[n]) for n in blocks)
    seen = []
    for argv in steps:
        doc = run_dry(cli, argv)
        cmd = argv[0] if argv[0] != "locate" else " ".join(argv[:2])
        seen.append(cmd)
        if cmd == "locate gradient":
            mem = doc["memory_bytes"]
            assert doc["scored_elements"] == scored and doc["tensors"] == len(blocks)
            assert mem["model"] == 4 * params and mem["accumulators"] == 4 * scored  # fp32 model, one fp32 sum per element
            assert mem["gradient"] == 4 * max(math.prod(shapes[n]) for n in blocks)
            assert doc["rows_per_language"] == 10000 and doc["seq_len"] == 512
            assert doc["disk_bytes"]["importance"] == 4 * scored * len(langs)
            assert 0 <= doc["disk_bytes"]["masks"] - (3 + 2 * len(langs)) * scored / 8 <= (3 + 2 * len(langs)) * len(blocks)
            regions = Path(_opt(argv, "-o"))
            # stand-ins over layer 0 only (an unlisted tensor is unselected): the later steps'
            # figures do not depend on the selection, and 26 MB read beat 0.8 GB per step
            layer0 = [n for n in blocks if ".layers.0." in n]
            for stem in ["core", "random", "bottom", *(f"mono-{lang}" for lang in langs)]:
                _empty_element_mask(regions / f"{stem}.safetensors", shapes, layer0, shapes)
        elif cmd == "ablate":
            assert doc["method"] == "ablate_zero" and doc["out_bytes"] == 2 * params
            check_merge_memory(doc, masked=max(math.prod(shapes[n]) for n in layer0))
            # the mask, a bit per element of the tensors it lists (the stand-ins list layer 0)
            assert doc["memory_bytes"]["masks"] == sum((math.prod(shapes[n]) + 7) // 8 for n in layer0)
        elif cmd == "train":  # element masks restore after each step: full AdamW state either way
            check_full_finetune(doc, shapes)  # the stand-in masks freeze nothing
            assert doc["tokens_per_step"] == 8 * 4 * 512 and doc["total_steps"] == 2000
            assert doc["hyper_parameters"]["weight_decay"] == 0.001
    assert seen == ["locate gradient", *["ablate"] * (3 + len(langs)), "locate gradient", "train", "train"]


# -- LANDeRMT on Llama-2-7B -------------------------------------------------------------------

KEPT = [6, 7, 29, 30]  # a stand-in choice: the paper's Fig. 5 shows layers 6-7 and the last ones


def _routing(path: Path, shapes: dict[str, tuple[int, ...]], directions: list[str], general: float) -> None:
    """A stand-in `routing.json` (the schema of docs/landermt.md): `general` of each kept
    block's neurons general, the rest dealt round-robin to the languages."""
    langs = list(dict.fromkeys(lang for d in directions for lang in d.split("-")))
    blocks = {}
    for layer in KEPT:
        key = f"model.layers.{layer}.mlp"
        size = shapes[f"{key}.up_proj.weight"][0]
        g = int(general * size)
        parts = [[f"{key}.gate_proj.weight", 0], [f"{key}.up_proj.weight", 0], [f"{key}.down_proj.weight", 1]]
        rest = list(range(g, size))
        specific = {lang: rest[i :: len(langs)] for i, lang in enumerate(langs)}
        blocks[key] = {"layer": layer, "size": size, "parts": parts, "general": list(range(g)), "specific": specific}
    doc = {
        "neuroloc.kind": "landermt-routing",
        "version": 1,
        "model": "base",
        "model_fingerprint": "",
        "model_layout": layout_digest(shapes),
        "template": "",
        "languages": langs,
        "directions": directions,
        "layers": KEPT,
        "blocks": blocks,
        "coefficient": {d: {k: 0.1 for k in blocks} for d in directions},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc))


@needs_bash
def test_landermt_pipeline_dry_runs_at_llama_2_7b_scale(cli, tmp_path):
    folder = PAPERS / "landermt"
    base, shapes = _base(tmp_path, folder / "llama-2-7b.config.json")
    directions = [f"{a}-{b}" for x in ("de", "it", "fr", "ar", "zh") for a, b in (("en", x), (x, "en"))]
    data, out = tmp_path / "data", tmp_path / "run"
    data.mkdir()
    for d in directions:
        for split in ("dev", "train"):
            rows = [{"source": SENTENCES[i % 6], "target": SENTENCES[(i + 1) % 6]} for i in range(200)]
            (data / f"{split}.{d}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    steps = recorded_steps(folder / "pipeline.sh", tmp_path, {"MODEL": str(base), "DATA": str(data), "OUT": str(out)})

    params = sum(math.prod(s) for s in shapes.values())
    hidden, inter = shapes["model.embed_tokens.weight"][1], shapes["model.layers.0.mlp.up_proj.weight"][0]
    kept_elements = len(KEPT) * inter * 3 * hidden  # gate and up rows, down columns of the kept layers
    langs = 6
    seen = []
    for argv in steps:
        doc = run_dry(cli, argv)
        cmd = argv[0] if argv[0] != "locate" else " ".join(argv[:2])
        seen.append(cmd)
        if cmd == "locate awareness":
            assert doc["kept_blocks"] == 4 and doc["kept_neurons"] == 4 * inter and doc["general_per_block"] == [int(0.9 * inter)] * 4
            assert doc["languages"] == ["en", "de", "it", "fr", "ar", "zh"]
            assert doc["disk_bytes"]["masks"] == (1 + langs + len(directions)) * 4 * 3 * inter
            assert doc["disk_bytes"]["importance"] == (langs + len(directions)) * 4 * 4 * inter
            assert doc["memory_bytes"]["model"] == 4 * params
            _routing(Path(_opt(argv, "-o")) / "routing.json", shapes, directions, 0.9)
        elif cmd == "train":
            assert doc["tokens_per_step"] == 8 * 10 * 256 and doc["hyper_parameters"]["lr"] == 5e-5
            if "--masks" in argv:  # the neurons of the 4 kept layers, as slices of their own
                assert doc["trainable"] == kept_elements
                assert 8 * kept_elements <= doc["optimizer_state_bytes"] <= 8 * kept_elements + 4 * 100
                mem = doc["memory_bytes"]  # whole-tensor gradients of the kept tensors, and the slices' own
                assert mem["gradients"] == 8 * kept_elements and mem["weights"] == 4 * params
                assert mem["selection"] == 4 * kept_elements + 8 * len(KEPT) * 3 * inter  # the slices and their indices
                target = header_only(Path(_opt(argv, "-o")), shapes, torch.bfloat16, Kind.MODEL, side=base)
                shutil.copy(Path(_opt(argv, "--masks")) / "routing.json", target / "routing.json")
            else:
                assert doc["trainable"] == params
                check_full_finetune(doc, shapes)
        elif cmd == "export-pair":
            assert doc["disk_bytes"]["total"] == 2 * params and len(doc["folded_tensors"]) == 2 * len(KEPT)
            assert doc["memory_bytes"]["total"] == (2 + 8) * inter * hidden  # a gate/up weight and two float32 temporaries
    assert seen == ["locate awareness", "train", "train", *["export-pair"] * len(directions)]
