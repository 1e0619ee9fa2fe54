"""LANDeRMT's conditional awareness routing (Eq. 6–9): one module for training and export.

A LANDeRMT locator writes `routing.json`: its kept MLP blocks, each block's neurons split into
language-general ones and ones specific to one language, and per translation direction and
block a coefficient `c`. For direction S-T the block computes

    h = FFN_G(c · x) + FFN_S((1 − c) · x),     S = specific(S) ∪ specific(T),

and the neurons specific to any other language take no part. Per neuron `i` this is a scale
`s_i` of the block's input (`scales`): `c` for general neurons, `1 − c` for the pair's specific
ones, `0` for the others (switched off).

Where the scale goes. `x` reaches neuron `i` only through its up-side rows (gate and up for a
gated MLP), which are linear: with weight row `w_i` and bias `b_i`, feeding `s_i · x` gives the
pre-activation `s_i · (w_i · x) + b_i`. So the routing is the weight rows times `s_i`, the bias
left as it is: `h(s · x)`, not `s · h(x)`. For a gated MLP, `act(s g·x + b_g) · (s u·x + b_u)`,
exactly the gated FFN of `s · x`. The down projection's bias belongs to the whole FFN, not to a
neuron: it is added once, not once per sub-FFN.

A switched-off neuron (`s_i = 0`) is removed, not fed zero: with a bias, `act(b_i)` would still
reach the output. Its up-side weight rows *and* bias entries become 0, so its activation is
`act(0) · 0 = 0` (gated) or `act(0) = 0` (GELU, ReLU, SiLU: every MLP layout of
`locate.units.MLP_LAYOUTS`).

Two forms of the same map, equal up to float rounding:

- `attach`: forward hooks on the up-side modules turn their output `W x + b` into
  `s ⊙ (out − b) + b`, and 0 for switched-off neurons; `set_direction` switches the pair per
  batch (training).
- `fold`: the same scales written into the weights, `W'_i = s_i W_i`, `b'_i = b_i` (0 where
  `s_i = 0`), computed in float32 and stored in the tensor's dtype (export).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuroloc_cli.errors import InputError, UsageError, did_you_mean
from neuroloc_cli.io.checkpoint import KIND_KEY

ROUTING_FILE = "routing.json"
ROUTING_KIND = "landermt-routing"
ROUTING_VERSION = 1


@dataclass(frozen=True)
class RoutedBlock:
    """One kept MLP block of a routing.

    Attributes:
        key: the block's name (`model.layers.3.mlp`).
        layer: its layer index.
        size: its neuron count.
        parts: (tensor name, axis along which neuron i is slice i); the down projection last.
        general: the language-general neurons, sorted.
        specific: language -> the neurons specific to it, sorted (every language present).
    """

    key: str
    layer: int
    size: int
    parts: tuple[tuple[str, int], ...]
    general: tuple[int, ...]
    specific: Mapping[str, tuple[int, ...]]

    @property
    def up_weights(self) -> tuple[tuple[str, int], ...]:
        """The up-side weights (gate and up; `c_fc` of GPT-2) with their neuron axes: the
        tensors the routing scales. Their biases are found by name (`X.weight` -> `X.bias`)."""
        return tuple((n, a) for n, a in self.parts[:-1] if n.endswith(".weight"))


@dataclass(frozen=True)
class Routing:
    """A `routing.json`, checked (see the module docstring).

    Attributes:
        path: the file.
        sha256: of its bytes (for provenance).
        model_layout: `masks.format.layout_digest` of the model it was made for.
        languages, directions: as listed; a direction is `S-T` of two languages.
        layers: the kept layers.
        blocks: block key -> the block.
        coefficient: direction -> block key -> c, in [0, 1].
        model, model_fingerprint, template: what the locator recorded ("" when absent).
    """

    path: Path
    sha256: str
    model_layout: str
    languages: tuple[str, ...]
    directions: tuple[str, ...]
    layers: tuple[int, ...]
    blocks: Mapping[str, RoutedBlock]
    coefficient: Mapping[str, Mapping[str, float]]
    model: str = ""
    model_fingerprint: str = ""
    template: str = ""

    @classmethod
    def load(cls, path: Path) -> Routing:
        """Read and check a routing file.

        Raises:
            InputError: unreadable or not JSON; a missing or wrong field, a wrong kind or
                version, a neuron index out of range, a neuron in two sets, a block whose sets
                do not cover every neuron, or a direction without a coefficient in [0, 1]; the
                message names the file and the key.
        """
        path = Path(path)
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise InputError(f"{path}: cannot read ({e.strerror or e})") from None
        try:
            doc = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{path}: not a JSON file ({e})") from None
        return _parse(path, hashlib.sha256(raw).hexdigest(), doc)

    def pair(self, direction: str) -> tuple[str, str]:
        """The (source, target) languages of one of the routing's directions.

        Raises:
            UsageError: the routing has no such direction.
        """
        if direction not in self.directions:
            raise UsageError(
                f"{self.path}: no direction {direction!r}{did_you_mean(direction, self.directions)}",
                hint=f"directions: {', '.join(self.directions)}",
            )
        pair = _split_direction(direction, self.languages)
        assert pair is not None  # every direction was checked at load
        return pair

    def check_model(self, shapes: Mapping[str, Sequence[int]], source: str) -> None:
        """Refuse a model whose tensors do not fit the routing: every part of every kept block
        must exist with the block's neuron count along its axis (checked before any weight
        is loaded).

        Raises:
            InputError: naming the routing file, the block and the tensor.
        """
        for block in self.blocks.values():
            for name, axis in block.parts:
                _check_part(self, block, name, axis, shapes.get(name), source)

    def scales(self, direction: str) -> dict[str, torch.Tensor]:
        """Block key -> float32 vector of `size`: `c` for general neurons, `1 − c` for the
        neurons specific to the direction's source or target, 0 for those of other languages.

        Raises:
            UsageError: the routing has no such direction.
        """
        source, target = self.pair(direction)
        out = {}
        for key, block in self.blocks.items():
            c = self.coefficient[direction][key]
            s = torch.zeros(block.size, dtype=torch.float32)
            s[list(block.general)] = c
            for lang in {source, target}:
                s[list(block.specific[lang])] = 1 - c
            out[key] = s
        return out


# -- folding into weights -----------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class Fold:
    """How one up-side tensor changes for a direction: its slices along `axis` times `scale`
    (a weight), or kept where `scale` is not 0 and zeroed elsewhere (a bias)."""

    axis: int
    scale: torch.Tensor
    bias: bool


def fold_factors(routing: Routing, direction: str, shapes: Mapping[str, Sequence[int]], source: str = "the model") -> dict[str, Fold]:
    """Tensor name -> its `Fold`, for every up-side weight of the kept blocks and the bias of
    each (by name: `X.weight` -> `X.bias`, if `shapes` has it).

    Args:
        shapes: the checkpoint's tensors (name -> shape).
        source: the checkpoint, for messages.

    Raises:
        UsageError: the routing has no such direction.
        InputError: a tensor of a block is missing from `shapes` or has another neuron count.
    """
    scales = routing.scales(direction)
    out = {}
    for key, block in routing.blocks.items():
        for name, axis in block.up_weights:
            _check_part(routing, block, name, axis, shapes.get(name), source)
            out[name] = Fold(axis, scales[key], bias=False)
            bias = name.removesuffix(".weight") + ".bias"
            if bias in shapes:
                _check_part(routing, block, bias, 0, shapes[bias], source)
                out[bias] = Fold(0, scales[key], bias=True)
    return out


def fold_tensor(tensor: torch.Tensor, fold: Fold, rows: tuple[int, int] | None = None) -> torch.Tensor:
    """One tensor (or its rows `[start, stop)`) with the routing folded in, in its own dtype:
    a weight's slices times the scale (computed in float32, switched-off slices exactly +0),
    a bias's entries kept bit for bit, or 0 for switched-off neurons."""
    s = fold.scale if rows is None or fold.axis != 0 else fold.scale[rows[0] : rows[1]]
    shape = [1] * tensor.dim()
    shape[fold.axis] = -1
    s = s.reshape(shape)
    on = s != 0
    if fold.bias:
        return torch.where(on, tensor, torch.zeros((), dtype=tensor.dtype))
    return torch.where(on, tensor.float() * s, 0.0).to(tensor.dtype)


def fold(tensors: Mapping[str, torch.Tensor], routing: Routing, direction: str) -> dict[str, torch.Tensor]:
    """A whole checkpoint's tensors with the routing of `direction` folded into the up-side
    weights (see `fold_tensor`); every other tensor is passed through as it is.

    Raises:
        UsageError, InputError: see `fold_factors`.
    """
    folds = fold_factors(routing, direction, {n: tuple(t.shape) for n, t in tensors.items()})
    return {n: fold_tensor(t, folds[n]) if n in folds else t for n, t in tensors.items()}


# -- hooks on a model -----------------------------------------------------------------------


class RoutingHooks:
    """Forward hooks that route a model's kept MLP blocks for one direction at a time.

    Use as a context manager, or call `remove()`; `set_direction` switches the pair without
    registering the hooks again (a training loop switches per batch). Gradients follow the
    routed forward: a weight row's gradient is scaled by `s_i`, a switched-off neuron gets none.
    """

    def __init__(self, model: nn.Module, routing: Routing, direction: str, names: Mapping[str, str]):
        self.routing = routing
        routing.pair(direction)  # raises for a direction the routing does not have
        self.direction = direction
        # (direction, block, device) -> the block's float32 scale and nonzero mask: a training
        # loop switches direction every step, and the scales never change
        self._cache: dict[tuple[str, str, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}
        params = dict(model.named_parameters(remove_duplicate=False))
        shapes = {n: tuple(params[p].shape) for n, p in names.items() if p in params}
        self._handles = []
        for key, block in routing.blocks.items():
            for name, axis in block.up_weights:
                _check_part(routing, block, name, axis, shapes.get(name), "the model")
                module = model.get_submodule(names[name].rpartition(".")[0])
                self._handles.append(module.register_forward_hook(self._hook(key)))

    def set_direction(self, direction: str) -> None:
        """Route for another direction of the routing from the next forward pass on.

        Raises:
            UsageError: the routing has no such direction.
        """
        self.routing.pair(direction)  # raises for a direction the routing does not have
        self.direction = direction

    def remove(self) -> None:
        """Remove every hook: the model computes as it did before `attach`."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> RoutingHooks:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def _scale(self, key: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The block's float32 scale and its nonzero mask on `device` (cached)."""
        k = (self.direction, key, device)
        if k not in self._cache:
            s = self.routing.scales(self.direction)[key].to(device)
            self._cache[k] = (s, s != 0)
        return self._cache[k]

    def _hook(self, key: str):
        def hook(module: nn.Module, args: Any, out: torch.Tensor) -> torch.Tensor:
            # Neurons are the output's last dimension, for Linear and GPT-2's Conv1D alike. In
            # float32, as `fold` computes: in bfloat16, `out − b` would cancel away bits.
            s, on = self._scale(key, out.device)
            bias = getattr(module, "bias", None)
            if bias is None:
                routed = s * out.float()
            else:
                b = bias.float()
                routed = s * (out.float() - b) + b  # W (s x) + b
            return torch.where(on, routed, 0.0).to(out.dtype)

        return hook


def attach(model: nn.Module, routing: Routing, direction: str, names: Mapping[str, str]) -> RoutingHooks:
    """Route `model`'s kept MLP blocks for `direction` (forward hooks on the up-side modules).

    Args:
        names: checkpoint tensor name -> model parameter name (`runtime.model.parameter_names`).

    Returns:
        The hooks: `set_direction(d)`, `remove()`, or use as a context manager.

    Raises:
        UsageError: the routing has no such direction.
        InputError: a routed tensor is not a parameter of the model, or has another neuron count.
    """
    return RoutingHooks(model, routing, direction, names)


def refuse_routed(model: Path) -> None:
    """Refuse to read a `train --method landermt` output as a plain model: its weights were
    trained behind the routing, which only `export-pair` puts into them.

    Raises:
        InputError: the folder holds a routing.json.
    """
    if (Path(model) / ROUTING_FILE).is_file():
        raise InputError(
            f"{model}: is a LANDeRMT training output; its weights are only right with the routing of one direction",
            hint=f"make a model per direction with `neuroloc export-pair {model} --pair SRC-TGT -o OUT`",
        )


# -- reading routing.json -------------------------------------------------------------------


def _check_part(routing: Routing, block: RoutedBlock, name: str, axis: int, shape: Sequence[int] | None, source: str) -> None:
    if shape is None:
        raise InputError(
            f"{routing.path}: block {block.key}: tensor {name} is not in {source}", hint="the routing was made for another model"
        )
    if axis >= len(shape) or shape[axis] != block.size:
        raise InputError(
            f"{routing.path}: block {block.key}: tensor {name} of {source} has shape {tuple(shape)}, not {block.size} neurons along axis {axis}"
        )


def _split_direction(direction: str, languages: Sequence[str]) -> tuple[str, str] | None:
    """`S-T` as (S, T) for two of `languages` (codes may hold '-' themselves: `zh-Hans-en`)."""
    pairs = [(a, b) for a in languages for b in languages if f"{a}-{b}" == direction]
    return pairs[0] if len(pairs) == 1 else None


class _Fields:
    """Typed reads of a JSON object, each error naming the file and the key."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, key: str, problem: str, hint: str | None = None) -> InputError:
        return InputError(f"{self.path}: key {key}: {problem}", hint=hint)

    def get(self, doc: Mapping[str, Any], field: str, kind: type | tuple[type, ...], prefix: str = "", required: bool = True) -> Any:
        key = f"{prefix}{field}"
        if field not in doc:
            if required:
                raise self.fail(key, "missing")
            return None
        value = doc[field]
        if not isinstance(value, kind) or isinstance(value, bool):  # JSON true is no number
            raise self.fail(key, f"expected {_kind_name(kind)}, got {type(value).__name__}")
        return value

    def strings(self, doc: Mapping[str, Any], field: str) -> tuple[str, ...]:
        values = self.get(doc, field, list)
        if not values or not all(isinstance(v, str) and v for v in values):
            raise self.fail(field, "expected a non-empty list of names")
        if len(set(values)) != len(values):
            raise self.fail(field, "lists a name twice")
        return tuple(values)

    def indices(self, value: Any, key: str, size: int) -> tuple[int, ...]:
        if not isinstance(value, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in value):
            raise self.fail(key, "expected a list of neuron indices")
        bad = [i for i in value if not 0 <= i < size]
        if bad:
            raise self.fail(key, f"neuron index {bad[0]} out of range for a block of {size}")
        if len(set(value)) != len(value):
            raise self.fail(key, "lists a neuron twice")
        return tuple(sorted(value))


def _kind_name(kind: type | tuple[type, ...]) -> str:
    names = {str: "a string", int: "an integer", float: "a number", list: "a list", dict: "an object"}
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _parse(path: Path, sha256: str, doc: Any) -> Routing:
    f = _Fields(path)
    if not isinstance(doc, dict):
        raise InputError(f"{path}: expected a JSON object, got {type(doc).__name__}")
    kind = f.get(doc, KIND_KEY, str)
    if kind != ROUTING_KIND:
        raise f.fail(KIND_KEY, f"is {kind!r}, not {ROUTING_KIND!r} (not a LANDeRMT routing file)")
    version = f.get(doc, "version", int)
    if version != ROUTING_VERSION:
        raise f.fail("version", f"is {version}; this neuroloc reads version {ROUTING_VERSION}", hint="upgrade neuroloc")
    languages = f.strings(doc, "languages")
    directions = f.strings(doc, "directions")
    for d in directions:
        if _split_direction(d, languages) is None:
            raise f.fail("directions", f"{d!r} is not SOURCE-TARGET of two of the languages ({', '.join(languages)})")
    layers = f.get(doc, "layers", list)
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise f.fail("layers", "expected a list of layer indices")
    blocks_doc = f.get(doc, "blocks", dict)
    if not blocks_doc:
        raise f.fail("blocks", "holds no block")
    blocks = {key: _parse_block(f, key, spec, languages, layers) for key, spec in blocks_doc.items()}
    coefficient_doc = f.get(doc, "coefficient", dict)
    coefficient = {}
    for d in directions:
        per_block = f.get(coefficient_doc, d, dict, prefix="coefficient.")
        values = {}
        for key in blocks:
            c = f.get(per_block, key, (int, float), prefix=f"coefficient.{d}.")
            if not (math.isfinite(c) and 0 <= c <= 1):
                raise f.fail(f"coefficient.{d}.{key}", f"{c} is not in [0, 1]")
            values[key] = float(c)
        coefficient[d] = values
    optional = {k: f.get(doc, k, str, required=False) or "" for k in ("model", "model_fingerprint", "template")}
    return Routing(
        path=path,
        sha256=sha256,
        model_layout=f.get(doc, "model_layout", str),
        languages=languages,
        directions=directions,
        layers=tuple(layers),
        blocks=blocks,
        coefficient=coefficient,
        **optional,
    )


def _parse_block(f: _Fields, key: str, spec: Any, languages: Sequence[str], layers: Sequence[int]) -> RoutedBlock:
    at = f"blocks.{key}."
    if not isinstance(spec, dict):
        raise f.fail(f"blocks.{key}", f"expected an object, got {type(spec).__name__}")
    layer = f.get(spec, "layer", int, prefix=at)
    if layer not in layers:
        raise f.fail(f"{at}layer", f"{layer} is not one of the kept layers {list(layers)}")
    size = f.get(spec, "size", int, prefix=at)
    if size < 1:
        raise f.fail(f"{at}size", f"{size} is not a neuron count")
    parts_doc = f.get(spec, "parts", list, prefix=at)
    parts = []
    for i, part in enumerate(parts_doc):
        ok = isinstance(part, list) and len(part) == 2 and isinstance(part[0], str) and isinstance(part[1], int) and part[1] in (0, 1)
        if not ok:
            raise f.fail(f"{at}parts[{i}]", "expected [tensor name, axis 0 or 1]")
        parts.append((part[0], part[1]))
    if len(parts) < 2 or not any(n.endswith(".weight") for n, _ in parts[:-1]):
        raise f.fail(f"{at}parts", "expected the up-side weights, then the down projection")
    general = f.indices(f.get(spec, "general", list, prefix=at), f"{at}general", size)
    specific_doc = f.get(spec, "specific", dict, prefix=at)
    unknown = [lang for lang in specific_doc if lang not in languages]
    if unknown:
        raise f.fail(f"{at}specific", f"{unknown[0]!r} is not one of the languages ({', '.join(languages)})")
    specific = {lang: f.indices(specific_doc.get(lang, []), f"{at}specific.{lang}", size) for lang in languages}
    owner = dict.fromkeys(general, "general")
    for lang, ids in specific.items():
        for i in ids:
            if i in owner:
                raise f.fail(f"{at}specific.{lang}", f"neuron {i} is also {owner[i]}")
            owner[i] = f"specific to {lang}"
    if len(owner) != size:
        missing = next(i for i in range(size) if i not in owner)
        raise f.fail(f"blocks.{key}", f"{size - len(owner)} neuron(s) neither general nor specific (first: {missing})")
    return RoutedBlock(key, layer, size, tuple(parts), general, specific)
