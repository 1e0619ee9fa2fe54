"""`MODEL+LORA` references: a PEFT LoRA adapter applied per tensor as the model is read."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from neuroloc_cli.io.checkpoint import Checkpoint
from neuroloc_cli.io.lora import LoraAdapter
from tests.conftest import write_recipe

LLAMA_TARGETS = {f"model.layers.{i}.self_attn.{p}": None for i in (0, 1) for p in ("q_proj", "v_proj")}
GPT2_TARGETS = {f"transformer.h.{i}.attn.c_attn": None for i in (0, 1)}


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    ckpt = Checkpoint.open(folder)
    return {name: ckpt.read(name) for name in ckpt.tensors}


def write_adapter(
    folder: Path, base: Path, modules: dict, *, r: int = 4, alpha: float = 8.0, seed: int = 0, conv1d: bool = False, **config
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """A PEFT-shaped adapter on `modules` of `base`: random A [r, in] and B [out, r] (B is
    not zero, unlike a fresh PEFT adapter, so the delta shows). Returns module → (A, B)."""
    shapes = Checkpoint.open(base).tensors
    g = torch.Generator().manual_seed(seed)
    tensors, ab = {}, {}
    for module in modules:
        shape = shapes[f"{module}.weight"].shape
        fan_in, fan_out = (shape[0], shape[1]) if conv1d else (shape[1], shape[0])
        a, b = torch.randn(r, fan_in, generator=g) * 0.1, torch.randn(fan_out, r, generator=g) * 0.1
        tensors[f"base_model.model.{module}.lora_A.weight"] = a
        tensors[f"base_model.model.{module}.lora_B.weight"] = b
        ab[module] = (a, b)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    doc = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": sorted({m.rsplit(".", 1)[1] for m in modules})}
    doc.update(bias="none", fan_in_fan_out=conv1d, **config)
    (folder / "adapter_config.json").write_text(json.dumps(doc))
    return ab


def expected(base: Path, ab: dict, scale: float, conv1d: bool = False) -> dict[str, torch.Tensor]:
    """W + scale · B @ A in float32, rounded once to W's dtype; other tensors as stored."""
    out = load_all(base)
    for module, (a, b) in ab.items():
        w = out[f"{module}.weight"]
        delta = scale * (b @ a)
        out[f"{module}.weight"] = (w.to(torch.float32) + (delta.t() if conv1d else delta)).to(w.dtype)
    return out


def linear_recipe(ref: str) -> str:
    return f"merge_method: linear\nmodels:\n  - model: {ref}\n    parameters: {{weight: 1.0}}\n"


def assert_merged(out: Path, want: dict[str, torch.Tensor], targets) -> None:
    got = load_all(out)
    assert set(got) == set(want)
    for name, w in want.items():
        assert got[name].dtype == w.dtype and torch.equal(got[name], w), name
    assert any(f"{m}.weight" in want for m in targets)


@pytest.mark.parametrize("rslora", [False, True])
def test_linear_of_model_plus_lora_applies_the_adapter(zoo, cli, tmp_path, rslora):
    fam = zoo.get("llama")
    ab = write_adapter(tmp_path / "lora", fam.base, LLAMA_TARGETS, r=4, alpha=8.0, use_rslora=rslora)
    r = cli("merge", write_recipe(tmp_path, linear_recipe(f"{fam.base}+{tmp_path / 'lora'}")), "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    scale = 8.0 / (math.sqrt(4) if rslora else 4)
    want = expected(fam.base, ab, scale)
    assert_merged(tmp_path / "out", want, LLAMA_TARGETS)
    base = load_all(fam.base)
    assert all(not torch.equal(want[f"{m}.weight"], base[f"{m}.weight"]) for m in LLAMA_TARGETS)
    prov = json.loads((tmp_path / "out" / "neuroloc.json").read_text())
    lora = prov["inputs"][0]["lora"]
    assert lora["path"] == str((tmp_path / "lora").resolve())
    assert lora["sha256"] == hashlib.sha256((tmp_path / "lora" / "adapter_model.safetensors").read_bytes()).hexdigest()


def test_gpt2_conv1d_delta_is_transposed_and_relative_paths_resolve(zoo, cli, tmp_path):
    fam = zoo.get("gpt2")
    ab = write_adapter(tmp_path / "my-lora", fam.base, GPT2_TARGETS, r=2, alpha=4.0, conv1d=True)
    recipe = write_recipe(
        tmp_path, f"merge_method: passthrough\nslices:\n  - sources:\n      - model: {fam.base}+./my-lora\n        layer_range: [0, 2]\n"
    )
    r = cli("merge", recipe, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    assert_merged(tmp_path / "out", expected(fam.base, ab, 2.0, conv1d=True), GPT2_TARGETS)


def test_validate_reads_no_tensor_data(zoo, cli, tmp_path, monkeypatch):
    fam = zoo.get("llama")
    write_adapter(tmp_path / "lora", fam.base, LLAMA_TARGETS)

    def refuse(self, name, *args, **kwargs):
        raise AssertionError(f"tensor {name} was read")

    monkeypatch.setattr(Checkpoint, "read", refuse)
    monkeypatch.setattr(LoraAdapter, "_read", refuse)
    r = cli("recipe", "validate", write_recipe(tmp_path, linear_recipe(f"{fam.base}+{tmp_path / 'lora'}")), "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["inputs"][0]["lora"] == str(tmp_path / "lora")


def _break(folder: Path, how: str) -> str:
    """Spoil an adapter one way; return what the error line must contain."""
    weights, config = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    doc = json.loads(config.read_text())
    tensors = load_file(str(weights))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    if how == "no weights":
        weights.unlink()
        return f"{weights}: missing"
    if how == "no config":
        config.unlink()
        return f"{config}: missing"
    if how in ("use_dora", "modules_to_save", "bias"):
        doc[how] = {"use_dora": True, "modules_to_save": ["lm_head"], "bias": "lora_only"}[how]
        config.write_text(json.dumps(doc))
        return f"{config}: {how}: "
    if how == "shape":
        tensors[key] = torch.zeros(4, 63)
        save_file(tensors, str(weights))
        return f"{weights}: tensor {key}: B @ A gives [64, 63], but tensor model.layers.0.self_attn.q_proj.weight has shape [64, 64]"
    if how == "rank":
        tensors[key] = torch.zeros(3, 64)
        save_file(tensors, str(weights))
        return f"{weights}: tensor {key} has shape [3, 64], expected [r=4, in]"
    if how == "no match":
        stray = "base_model.model.model.layers.0.self_attn.x_proj.lora_A.weight"
        tensors[stray] = tensors[key].clone()
        tensors[stray.replace("lora_A", "lora_B")] = tensors[key.replace("lora_A", "lora_B")].clone()
        save_file(tensors, str(weights))
        return f"{weights}: tensor {stray} matches no tensor of"
    if how == "dora tensor":
        tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = torch.ones(64)
        save_file(tensors, str(weights))
        return "lora_magnitude_vector: DoRA magnitude vectors (use_dora) are not supported"
    raise AssertionError(how)


@pytest.mark.parametrize(
    "how", ["no weights", "no config", "use_dora", "modules_to_save", "bias", "shape", "rank", "no match", "dora tensor"]
)
def test_bad_adapters_are_refused_in_one_line_with_exit_3(zoo, cli, tmp_path, how):
    fam = zoo.get("llama")
    write_adapter(tmp_path / "lora", fam.base, LLAMA_TARGETS)
    message = _break(tmp_path / "lora", how)
    r = cli("merge", write_recipe(tmp_path, linear_recipe(f"{fam.base}+{tmp_path / 'lora'}")), "-o", tmp_path / "out")
    assert r.exit_code == 3 and message in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_missing_adapter_folder_and_two_plus_signs(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    r = cli("merge", write_recipe(tmp_path, linear_recipe(f"{fam.base}+./nowhere")), "-o", tmp_path / "out")
    assert r.exit_code == 3 and f"{tmp_path / 'nowhere'}: no such adapter folder" in r.stderr, r.stderr
    r = cli("merge", write_recipe(tmp_path, linear_recipe(f"{fam.base}+./a+./b")), "-o", tmp_path / "out")
    assert r.exit_code == 2 and "with one '+'" in r.stderr, r.stderr
