"""A Hugging Face checkpoint folder, opened lazily.

Opening reads `config.json`, the shard index and every shard's header; tensor data is read
one tensor at a time, on request, through `safetensors.safe_open`.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import Enum
from functools import cached_property
from pathlib import Path, PurePath
from typing import Any

import torch
from safetensors import safe_open

from neuroloc_cli.errors import InputError
from neuroloc_cli.io.format import Header, TensorInfo, read_header

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PROVENANCE_FILE = "neuroloc.json"
KIND_KEY = "neuroloc.kind"  # safetensors metadata key: a `Kind`


class Kind(str, Enum):
    """What a checkpoint holds (its shards' `neuroloc.kind`): weights, or weight deltas."""

    MODEL = "model"
    DELTA = "delta"

    def __str__(self) -> str:
        return self.value


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SAMPLE = 64 * 1024  # bytes sampled at three places of each shard for the fingerprint


def resolve_model_path(spec: str, relative_to: Path | None = None) -> Path:
    """Turn a path written by a user (absolute, or relative to a recipe) into a Path."""
    p = Path(spec).expanduser()
    if not p.is_absolute() and relative_to is not None:
        p = relative_to / p
    return p


def check_model_folder(path: Path, spec: str | None = None) -> None:
    """Raise a clear error when `path` is not an existing folder.

    Args:
        path: the resolved path.
        spec: what the user wrote, to recognise hub names such as `org/name`.
    """
    if path.is_dir():
        return
    spec = spec or str(path)
    if not path.exists() and _HUB_NAME.match(spec) and not spec.startswith("."):
        raise InputError(
            f"{spec}: no such folder, and neuroloc does not download from a model hub",
            hint=f"download it elsewhere (e.g. `huggingface-cli download {spec} --local-dir ./{spec.split('/')[-1]}`) and give the local path",
        )
    if path.exists():
        raise InputError(f"{path}: not a folder", hint="give the checkpoint folder, not a file in it")
    raise InputError(f"{path}: no such folder")


# Files that hold a tokenizer's vocabulary (fast tokenizers, SentencePiece, BPE, tiktoken).
_VOCABULARY_FILES = ("tokenizer.json", "*.model", "vocab.*", "*.tiktoken")


def check_tokenizer_files(model: Path) -> None:
    """Refuse a model folder without tokenizer files, or with a tokenizer config but no vocabulary,
    before any weights load (transformers' own error for these spans several lines).

    Raises:
        InputError: naming the folder and the files it lacks.
    """
    if not any((model / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")):
        raise InputError(
            f"{model}: no tokenizer (tokenizer.json or tokenizer_config.json) in the model folder",
            hint="copy the base model's tokenizer files into it",
        )
    if not any(any(model.glob(pattern)) for pattern in _VOCABULARY_FILES):
        raise InputError(
            f"{model}: tokenizer_config.json but no vocabulary (tokenizer.json, tokenizer.model or vocab.json) in the model folder",
            hint="copy the base model's tokenizer files into it",
        )


@dataclass
class Checkpoint:
    """A checkpoint folder: its tensors (from headers), config and metadata.

    Use `Checkpoint.open(path)`; read a tensor with `read(name)`.
    """

    path: Path
    tensors: dict[str, TensorInfo]
    headers: dict[str, Header]  # shard file name -> header
    config: dict[str, Any] | None
    _handles: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def open(cls, path: Path | str, spec: str | None = None) -> Checkpoint:
        """Open a checkpoint folder, reading its index and every shard header.

        Raises:
            InputError: the folder, a shard or the index is missing or invalid, or the
                checkpoint holds no tensors.
        """
        path = Path(path)
        check_model_folder(path, spec)
        shard_of = _weight_map(path)
        if shard_of is None:  # single file: every tensor of its header
            header = read_header(path / SINGLE_FILE)
            if not header.tensors:
                raise InputError(f"{path / SINGLE_FILE}: holds no tensors", hint="the checkpoint is empty; give one with weights")
            return cls(path=path, tensors=dict(header.tensors), headers={SINGLE_FILE: header}, config=_read_config(path))
        headers = _read_shards(path, shard_of)
        return cls(path=path, tensors=_indexed_tensors(path, shard_of, headers), headers=headers, config=_read_config(path))

    # -- what the checkpoint is -------------------------------------------------------------

    @property
    def metadata(self) -> dict[str, str]:
        """The `__metadata__` of the first shard (neuroloc writes the same into every shard)."""
        first = next(iter(self.headers.values()), None)
        return first.metadata if first else {}

    @property
    def kind(self) -> Kind:
        """`Kind.DELTA` for a delta checkpoint written by `neuroloc delta`, else `Kind.MODEL`."""
        return Kind.DELTA if self.metadata.get(KIND_KEY) == Kind.DELTA else Kind.MODEL

    @property
    def architecture(self) -> str | None:
        archs = (self.config or {}).get("architectures")
        return archs[0] if isinstance(archs, list) and archs and isinstance(archs[0], str) else None

    @property
    def num_layers(self) -> int | None:
        """The number of transformer blocks, from config.json or, failing that, tensor names."""
        from neuroloc_cli.arch import LAYER_COUNT_KEYS, layer_index

        cfg = self.config or {}
        for key in LAYER_COUNT_KEYS:
            if isinstance(cfg.get(key), int):
                return cfg[key]

        indices = [i for i in (layer_index(n) for n in self.tensors) if i is not None]
        return max(indices) + 1 if indices else None

    @property
    def num_parameters(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @cached_property
    def fingerprint(self) -> str:
        """A cheap content fingerprint: sha256 of every header, file size and three 64 KiB
        samples of each shard's data. Distinguishes fine-tunes of one base (their headers are
        identical) without reading gigabytes; it is not a full-content hash."""
        h = hashlib.sha256()
        for shard, header in sorted(self.headers.items()):
            file = self.path / shard
            size = file.stat().st_size
            h.update(f"{shard}\0{size}\0".encode())
            h.update(header.raw)
            data_len = size - header.data_start
            with open(file, "rb") as f:
                for start in {0, max(0, data_len // 2 - _SAMPLE // 2), max(0, data_len - _SAMPLE)}:
                    f.seek(header.data_start + start)
                    h.update(f.read(_SAMPLE))
        return h.hexdigest()

    def summary(self) -> dict[str, Any]:
        """What `neuroloc inspect --json` prints: architecture, counts, dtypes, shards, tensors."""
        dtypes: dict[str, int] = {}
        for t in self.tensors.values():
            dtypes[t.dtype] = dtypes.get(t.dtype, 0) + t.numel
        shards = [
            {"file": f, "bytes": (self.path / f).stat().st_size, "tensors": sum(t.file == f for t in self.tensors.values())}
            for f in self.headers
        ]
        return {
            "path": str(self.path),
            "kind": self.kind,
            "architecture": self.architecture,
            "model_type": (self.config or {}).get("model_type"),
            "num_layers": self.num_layers,
            "parameters": self.num_parameters,
            "dtypes": dtypes,
            "shards": shards,
            "fingerprint": self.fingerprint,
            "tensors": [
                {"name": t.name, "shape": list(t.shape), "dtype": t.dtype, "shard": t.file, "numel": t.numel} for t in self.tensors.values()
            ],
        }

    # -- reading tensors --------------------------------------------------------------------

    def read(self, name: str, rows: tuple[int, int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Read one tensor, or only its rows `[start, stop)`, from its shard (the shard is
        opened on first use; a row range reads only those bytes).

        The result is the caller's own tensor, in `dtype` if given: `safe_open` hands out views
        of a copy-on-write mapping of the file, so an in-place change to one of them would show
        in every later read of that tensor through the same handle. Copying here, in the same
        step as the dtype conversion, makes that impossible at the cost of at most one copy.
        """
        info = self.tensors[name]
        handle = self._handles.get(info.file)
        if handle is None:
            try:
                handle = safe_open(str(self.path / info.file), framework="pt")
            except Exception as e:  # safetensors raises its own error types
                raise InputError(f"{self.path / info.file}: cannot open ({e})") from None
            self._handles[info.file] = handle
        try:
            view = handle.get_tensor(name) if rows is None else handle.get_slice(name)[rows[0] : rows[1]]
            return view.to(dtype or view.dtype, copy=True)
        except Exception as e:
            raise InputError(f"{self.path / info.file}: cannot read tensor {name!r} ({e})") from None

    def close(self) -> None:
        self._handles.clear()

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(frozen=True)
class TensorDiff:
    """How one checkpoint's tensors differ from a reference's (names in the reference's order).

    Attributes:
        reshaped: (name, its shape, the reference's shape) where the shapes differ.
        missing: reference tensors it lacks.
        extra: its tensors that the reference lacks.
    """

    reshaped: list[tuple[str, list[int], list[int]]]
    missing: list[str]
    extra: list[str]


def compare_tensors(reference: Checkpoint, other: Checkpoint, names: Iterable[str] | None = None) -> TensorDiff:
    """Compare `other`'s tensor names and shapes with `reference`'s (only `names`, if given:
    then nothing counts as extra)."""
    ref, theirs = reference.tensors, other.tensors
    wanted = list(ref if names is None else names)
    return TensorDiff(
        reshaped=[(n, list(theirs[n].shape), list(ref[n].shape)) for n in wanted if n in theirs and theirs[n].shape != ref[n].shape],
        missing=[n for n in wanted if n not in theirs],
        extra=[] if names is not None else [n for n in theirs if n not in ref],
    )


# config.json keys of a model's context length, in the order lm-eval reads them
_POSITION_KEYS = ("n_positions", "max_position_embeddings", "n_ctx")


def model_positions(config: dict[str, Any] | None) -> int | None:
    """The model's positions (prompt and generation together), from its config.json as lm-eval
    reads them (a multimodal model's `text_config` first); None when the config names none."""
    config = config or {}
    text = config.get("text_config")
    for cfg in (text, config) if isinstance(text, dict) else (config,):
        for key in _POSITION_KEYS:
            if isinstance(cfg.get(key), int):
                return cfg[key]
    return None


def _weight_map(path: Path) -> dict[str, str] | None:
    """Tensor name -> shard file from the index; None for a single-file checkpoint."""
    index = path / INDEX_FILE
    if index.is_file():
        return _read_index(index)
    if (path / SINGLE_FILE).is_file():
        return None
    if any(path.glob("*.bin")) or any(path.glob("*.pth")):
        raise InputError(
            f"{path}: holds only PyTorch .bin weights; neuroloc reads safetensors",
            hint=f"convert it once with `neuroloc convert {path} -o OUT`",
        )
    raise InputError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE} in this folder")


def _read_index(index: Path) -> dict[str, str]:
    """The index's weight map, refused unless every tensor maps to a shard file of the folder
    itself: an empty map would make a merge "succeed" with no weights, and a path such as
    `../x.safetensors` would read (and fingerprint) a file outside the checkpoint."""
    doc = _read_json(index, "index")
    weight_map = doc.get("weight_map")
    if not isinstance(weight_map, dict):
        raise InputError(f"{index}: invalid index (expected a JSON object with a 'weight_map')")
    if not weight_map:
        raise InputError(f"{index}: 'weight_map' lists no tensors", hint="the index is incomplete; write or download it again")
    for name, shard in weight_map.items():
        if not isinstance(shard, str):
            raise InputError(f"{index}: tensor {name!r} is mapped to {shard!r}, not a shard file name")
        if not _is_plain_file_name(shard):
            raise InputError(
                f"{index}: tensor {name!r} is mapped to {shard!r}, which is not a file in the checkpoint folder",
                hint="the index must name shard files that sit next to it",
            )
    return weight_map


def _is_plain_file_name(name: str) -> bool:
    """Whether `name` is a bare file name: no folder part, not absolute, not `.` or `..`."""
    return name not in ("", ".", "..") and PurePath(name).name == name


def _read_shards(path: Path, shard_of: dict[str, str]) -> dict[str, Header]:
    """Every shard's header, each read once, in file-name order."""
    first_tensor: dict[str, str] = {}
    for name, shard in shard_of.items():
        first_tensor.setdefault(shard, name)
    headers: dict[str, Header] = {}
    for shard in sorted(first_tensor):
        file = path / shard
        if not file.is_file():
            raise InputError(f"{file}: shard listed in {INDEX_FILE} is missing (it should hold tensor {first_tensor[shard]!r})")
        headers[shard] = read_header(file)
    return headers


def _indexed_tensors(path: Path, shard_of: dict[str, str], headers: dict[str, Header]) -> dict[str, TensorInfo]:
    """The index's tensors, in its order, each from the shard it names."""
    tensors: dict[str, TensorInfo] = {}
    for name, shard in shard_of.items():
        info = headers[shard].tensors.get(name)
        if info is None:
            elsewhere = [s for s, h in headers.items() if name in h.tensors]
            raise InputError(
                f"{path / shard}: tensor {name!r} is listed in {INDEX_FILE} but not in the shard",
                hint=f"it is in {elsewhere[0]}; fix the index" if elsewhere else None,
            )
        tensors[name] = info
    return tensors


def _read_config(path: Path) -> dict[str, Any] | None:
    file = path / "config.json"
    if not file.is_file():
        return None
    return _read_json(file, "config")


def _read_json(file: Path, what: str) -> dict[str, Any]:
    """A JSON object from `file` (`what` it is, for messages)."""
    try:
        doc = json.loads(file.read_text(encoding="utf-8"))
    except OSError as e:
        raise InputError(f"{file}: cannot read ({e.strerror or e})") from None
    except RecursionError:
        raise InputError(f"{file}: invalid JSON (nested too deeply)") from None
    except ValueError as e:
        raise InputError(f"{file}: invalid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise InputError(f"{file}: invalid {what} (expected a JSON object)")
    return doc
