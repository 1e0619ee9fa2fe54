"""A model with a PEFT LoRA adapter applied, computed one tensor at a time when read.

A recipe names it `MODEL+ADAPTER` (mergekit's syntax). Opening reads the adapter's
`adapter_config.json` and its safetensors header, and checks every adapter tensor against
the model's headers; no tensor data is read until `read`. Reading a targeted tensor forms
`W + scale · B @ A` in float32 (`scale = lora_alpha / r`, or `lora_alpha / sqrt(r)` with
`use_rslora`), transposed for GPT-2's Conv1D modules, and rounds it once to the dtype asked
for; every other tensor is the model's, bit for bit.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from neuroloc_cli.errors import InputError
from neuroloc_cli.io.checkpoint import Checkpoint
from neuroloc_cli.io.format import read_header

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"

# `base_model.model.<module>.lora_A[.<adapter name>].weight`, as PEFT saves an adapter
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")
# keys of adapter kinds this reader does not apply (the rest of a PEFT file is LoRA A and B)
_UNSUPPORTED_KEYS = (
    ("lora_magnitude_vector", "DoRA magnitude vectors (use_dora)"),
    ("lora_embedding_", "LoRA on embeddings"),
)
# GPT-2 keeps these modules as Conv1D, weight [in, out]: PEFT applies their delta transposed
# whatever `fan_in_fan_out` says (it corrects the flag with a warning), and so do we.
_CONV1D = {"gpt2": ("c_attn", "c_proj", "c_fc")}


@dataclass(frozen=True)
class LoraTarget:
    """One model tensor an adapter changes: its A and B keys, and whether the delta is transposed."""

    a_key: str
    b_key: str
    transposed: bool


@dataclass
class LoraAdapter:
    """A PEFT LoRA adapter folder, checked against one model (headers only).

    Use `LoraAdapter.open(folder, model)`.
    """

    path: Path
    scale: float
    targets: dict[str, LoraTarget]
    """Model tensor name → the adapter tensors that change it."""
    _handle: Any = field(default=None, repr=False)

    @classmethod
    def open(cls, path: Path, model: Checkpoint) -> LoraAdapter:
        """Read the adapter's config and header, and map its tensors onto `model`'s.

        Raises:
            InputError: a missing file, an adapter kind other than plain LoRA (DoRA,
                modules_to_save, trained biases, per-module ranks), an adapter tensor that
                matches no model tensor, or shapes that do not fit; naming the file and key.
        """
        if not path.is_dir():
            raise InputError(f"{path}: no such adapter folder" if not path.exists() else f"{path}: not a folder (give the adapter folder)")
        config = _read_config(path / ADAPTER_CONFIG)
        weights = path / ADAPTER_WEIGHTS
        if not weights.is_file():
            hint = "convert adapter_model.bin to safetensors first" if (path / "adapter_model.bin").is_file() else None
            raise InputError(f"{weights}: missing (a PEFT LoRA adapter folder holds {ADAPTER_WEIGHTS})", hint=hint)
        r, scale = _rank_and_scale(path / ADAPTER_CONFIG, config)
        header = read_header(weights)
        pairs: dict[str, dict[str, str]] = {}
        for key in header.tensors:
            what = _unsupported(key)
            if what is not None:
                raise InputError(f"{weights}: tensor {key}: {what} are not supported", hint="merge the adapter with PEFT first")
            m = _KEY.match(key)
            if m is None:
                raise InputError(f"{weights}: tensor {key} is not a LoRA A or B weight", hint="only plain LoRA adapters are supported")
            pairs.setdefault(m["module"], {})[m["ab"]] = key
        if not pairs:
            raise InputError(f"{weights}: holds no LoRA tensors")
        conv1d = _CONV1D.get((model.config or {}).get("model_type", ""))
        targets: dict[str, LoraTarget] = {}
        for module, ab in pairs.items():
            if "A" not in ab or "B" not in ab:
                have = next(iter(ab.values()))
                raise InputError(f"{weights}: tensor {have} has no lora_{'B' if 'A' in ab else 'A'} partner")
            name = _model_tensor(module, model)
            if name is None:
                raise InputError(f"{weights}: tensor {ab['A']} matches no tensor of {model.path} (looked for {module}.weight)")
            transposed = module.rsplit(".", 1)[-1] in conv1d if conv1d is not None else bool(config.get("fan_in_fan_out"))
            a, b = header.tensors[ab["A"]].shape, header.tensors[ab["B"]].shape
            _check_shapes(weights, ab, a, b, r, model.tensors[name].shape, name, transposed)
            targets[name] = LoraTarget(ab["A"], ab["B"], transposed)
        return cls(path=path, scale=scale, targets=targets)

    @cached_property
    def sha256(self) -> str:
        """sha256 of `adapter_model.safetensors` (read in full: an adapter is small)."""
        h = hashlib.sha256()
        with open(self.path / ADAPTER_WEIGHTS, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def delta(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """`scale · B @ A` of one model tensor (or its rows `[start, stop)`), in float32, in the
        model tensor's layout."""
        target = self.targets[name]
        a, b = self._read(target.a_key), self._read(target.b_key)
        if target.transposed:  # W is [in, out]: Δ = (B @ A)ᵀ = Aᵀ @ Bᵀ, rows are columns of A
            a_t = a.t() if rows is None else a[:, rows[0] : rows[1]].t()
            return (a_t @ b.t()).mul_(self.scale)
        return ((b if rows is None else b[rows[0] : rows[1]]) @ a).mul_(self.scale)

    def _read(self, key: str) -> torch.Tensor:
        file = self.path / ADAPTER_WEIGHTS
        try:
            if self._handle is None:
                self._handle = safe_open(str(file), framework="pt")
            return self._handle.get_tensor(key).to(torch.float32)
        except Exception as e:  # safetensors raises its own error types
            raise InputError(f"{file}: cannot read tensor {key!r} ({e})") from None


@dataclass
class LoraCheckpoint(Checkpoint):
    """A model checkpoint read through a LoRA adapter: same tensors, headers and config; a
    targeted tensor is `W + Δ` (see `LoraAdapter.delta`), rounded once to the dtype asked for."""

    adapter: LoraAdapter | None = None

    @classmethod
    def wrap(cls, model: Checkpoint, adapter_path: Path) -> LoraCheckpoint:
        """`model` with the adapter at `adapter_path` applied (headers checked, no data read).

        Raises:
            InputError: see `LoraAdapter.open`.
        """
        adapter = LoraAdapter.open(adapter_path, model)
        return cls(path=model.path, tensors=model.tensors, headers=model.headers, config=model.config, adapter=adapter)

    def read(self, name: str, rows: tuple[int, int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self.adapter is None or name not in self.adapter.targets:
            return super().read(name, rows, dtype)
        w = super().read(name, rows, torch.float32)
        return w.add_(self.adapter.delta(name, rows)).to(dtype or self.tensors[name].torch_dtype)


def _unsupported(key: str) -> str | None:
    """What kind of non-LoRA adapter tensor `key` is, or None."""
    if key.endswith(".bias"):
        return "LoRA biases (bias != 'none')"
    return next((what for marker, what in _UNSUPPORTED_KEYS if marker in key), None)


def _read_config(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise InputError(f"{file}: missing (not a PEFT adapter folder)")
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise InputError(f"{file}: cannot read ({e})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{file}: invalid adapter config (expected a JSON object)")
    peft_type = doc.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise InputError(f"{file}: peft_type {peft_type!r} is not supported (only LORA)")
    refused = {
        "use_dora": (bool(doc.get("use_dora")), "DoRA"),
        "modules_to_save": (bool(doc.get("modules_to_save")), "full copies of modules"),
        "bias": (doc.get("bias", "none") not in (None, "none"), "trained biases"),
        "rank_pattern": (bool(doc.get("rank_pattern")), "per-module ranks"),
        "alpha_pattern": (bool(doc.get("alpha_pattern")), "per-module alphas"),
        "layer_replication": (bool(doc.get("layer_replication")), "layer replication"),
    }
    for key, (bad, what) in refused.items():
        if bad:
            raise InputError(
                f"{file}: {key}: {doc[key]!r} ({what}) is not supported; only plain LoRA is", hint="merge the adapter with PEFT first"
            )
    return doc


def _rank_and_scale(file: Path, config: dict[str, Any]) -> tuple[int, float]:
    r, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        raise InputError(f"{file}: r: expected a positive integer, got {r!r}")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise InputError(f"{file}: lora_alpha: expected a number, got {alpha!r}")
    return r, alpha / (math.sqrt(r) if config.get("use_rslora") else r)


def _model_tensor(module: str, model: Checkpoint) -> str | None:
    """The model tensor a PEFT module name targets. PEFT names modules from the wrapped
    class (`model.layers.0…` for a `*ForCausalLM`); checkpoints saved from the bare model, or
    GPT-2's hub files, drop or add the first component (`transformer.`, `model.`)."""
    _, _, rest = module.partition(".")
    for candidate in (module, rest, f"model.{module}", f"transformer.{module}"):
        if candidate and f"{candidate}.weight" in model.tensors:
            return f"{candidate}.weight"
    return None


def _check_shapes(
    file: Path, ab: dict[str, str], a: tuple[int, ...], b: tuple[int, ...], r: int, w: tuple[int, ...], name: str, transposed: bool
) -> None:
    if len(a) != 2 or a[0] != r:
        raise InputError(f"{file}: tensor {ab['A']} has shape {list(a)}, expected [r={r}, in]")
    if len(b) != 2 or b[1] != r:
        raise InputError(f"{file}: tensor {ab['B']} has shape {list(b)}, expected [out, r={r}]")
    fits = (a[1], b[0]) if transposed else (b[0], a[1])
    if tuple(w) != fits:
        raise InputError(
            f"{file}: tensor {ab['A']}: B @ A gives {list(fits)}{' (transposed, Conv1D)' if transposed else ''}, "
            f"but tensor {name} has shape {list(w)}"
        )
