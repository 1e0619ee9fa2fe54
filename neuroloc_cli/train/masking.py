"""What a training run may update, and the three ways it keeps everything else exactly.

1. **Whole tensors** (`--trainable GLOB`, or full CPT): the parameter trains as usual; every
   other parameter has `requires_grad=False` and is not given to the optimizer.
2. **Split slices** (a `--train-mask` of row or FFN-neuron granularity): the selected rows
   (or columns, per the mask's axis) of a tensor become their own parameter; the original
   tensor is frozen and the model sees `original.index_copy(axis, index, slice)` through a
   `torch.nn.utils.parametrize` parametrization. The optimizer holds state only for the
   slices, so its memory follows the selection. Saving writes the slices back.
3. **Gradient masking + restore** (a `--train-mask` of element granularity, or any
   `--freeze-mask`): the whole tensor trains, the gradient of frozen elements is zeroed
   before clipping (so they do not count in the gradient norm), and after every optimizer
   step their saved values are written back, because AdamW's decoupled weight decay would
   otherwise still move them. Cost: full Adam state for the tensor, plus a BOOL mask
   (1 byte/element) and a copy of the frozen values.

Tensors are named as in the checkpoint (and the mask); `_resolve` maps them to the model's
parameter names (GPT-2 checkpoints saved without the `transformer.` prefix, for example).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils import parametrize

from neuroloc_cli.errors import UsageError
from neuroloc_cli.masks import Mask


@dataclass(frozen=True)
class SelectionPlan:
    """What trains, decided from tensor names and shapes only (no weights are read).

    Attributes:
        whole: tensors trained entirely.
        split: tensor -> (axis, selected indices) trained as split slices.
        masked: tensor -> BOOL tensor of the elements that must stay frozen (way 3).
        shapes: every floating tensor of the checkpoint -> shape.
    """

    whole: tuple[str, ...]
    split: dict[str, tuple[int, torch.Tensor]]
    masked: dict[str, torch.Tensor]
    shapes: dict[str, tuple[int, ...]]

    @property
    def trained(self) -> set[str]:
        return {*self.whole, *self.split, *self.masked}

    def counts(self) -> dict[str, int]:
        """Trainable and frozen element counts, and the elements the optimizer holds state for."""
        numel = {n: _numel(s) for n, s in self.shapes.items()}
        total = sum(numel.values())
        split = sum(_numel(self.shapes[n]) // self.shapes[n][a] * len(i) for n, (a, i) in self.split.items())
        masked = sum(numel[n] - int(f.sum()) for n, f in self.masked.items())
        whole = sum(numel[n] for n in self.whole)
        trainable = whole + split + masked
        return {"parameters": total, "trainable": trainable, "frozen": total - trainable,
                "optimizer_elements": whole + split + sum(numel[n] for n in self.masked)}


def plan_selection(
    shapes: dict[str, tuple[int, ...]],
    *,
    train_mask: Mask | None = None,
    freeze_mask: Mask | None = None,
    trainable: list[str] | tuple[str, ...] = (),
) -> SelectionPlan:
    """Decide what trains.

    Rules: with no mask and no glob, everything trains (full CPT). `trainable` globs select
    whole tensors. A train mask adds its selected units (globs win for a tensor both name).
    A freeze mask keeps its selected units frozen inside whatever would train otherwise.

    Args:
        shapes: floating tensors of the checkpoint -> shape.
        train_mask, freeze_mask: at most one of them.
        trainable: glob patterns over tensor names.

    Raises:
        UsageError: a glob matches no tensor.
    """
    names = list(shapes)
    globbed = _match_globs(names, trainable)
    if train_mask is not None:
        whole = [n for n in names if n in globbed]
        split: dict[str, tuple[int, torch.Tensor]] = {}
        masked: dict[str, torch.Tensor] = {}
        for n, e in train_mask.entries.items():
            if n in globbed or e.selected_units == 0 or n not in shapes:
                continue
            if e.selected_units == e.units:
                whole.append(n)
            elif e.axis is None:
                masked[n] = ~e.selected.contiguous()
            else:
                split[n] = (e.axis, e.selected.nonzero().view(-1))
        return SelectionPlan(tuple(n for n in names if n in set(whole)), split, masked, dict(shapes))
    base = [n for n in names if n in globbed] if trainable else names
    masked = {}
    whole = []
    for n in base:
        e = freeze_mask.entries.get(n) if freeze_mask is not None else None
        if e is None or e.selected_units == 0:
            whole.append(n)
        elif e.selected_units < e.units:
            masked[n] = e.dense().contiguous()
    return SelectionPlan(tuple(whole), {}, masked, dict(shapes))


def _match_globs(names: list[str], globs: list[str] | tuple[str, ...]) -> set[str]:
    matched: set[str] = set()
    for g in globs:
        hits = {n for n in names if fnmatch.fnmatchcase(n, g)}
        if not hits:
            raise UsageError(f"--trainable {g!r}: matches no tensor of the model", hint="names look like 'model.layers.0.mlp.up_proj.weight'")
        matched |= hits
    return matched


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


class _SliceOverride(nn.Module):
    """Parametrization: the frozen tensor with the trainable slice copied in along `axis`."""

    def __init__(self, axis: int, index: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.axis = axis
        self.register_buffer("index", index, persistent=False)
        self.slice = nn.Parameter(values)

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return original.index_copy(self.axis, self.index, self.slice.to(original.dtype))


@dataclass
class _Frozen:
    param: nn.Parameter
    frozen: torch.Tensor  # BOOL, the tensor's shape
    values: torch.Tensor  # the frozen elements' original values, in mask order


@dataclass
class TrainableModel:
    """A model prepared by `apply_selection`: its optimizer parameters and the hooks that keep
    frozen elements exact."""

    model: nn.Module
    plan: SelectionPlan
    params: dict[str, nn.Parameter]  # checkpoint name (+ "#slice" for split slices) -> parameter
    _frozen: dict[str, _Frozen] = field(default_factory=dict)
    _names: dict[str, str] = field(default_factory=dict)  # checkpoint name -> model name

    def param_groups(self, weight_decay: float) -> list[dict[str, Any]]:
        """AdamW groups: decay for slices of matrices and whole matrices; none for vectors
        (biases, norms), as nanoGPT and HF Trainer do."""
        decay, no_decay = [], []
        for key, p in self.params.items():
            (decay if len(self.plan.shapes[key.removesuffix("#slice")]) >= 2 else no_decay).append(p)
        return [g for g in ({"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}) if g["params"]]

    @torch.no_grad()
    def mask_gradients(self) -> None:
        """Zero frozen elements' gradients (before clipping, so the norm ignores them)."""
        for f in self._frozen.values():
            if f.param.grad is not None:
                f.param.grad.masked_fill_(f.frozen, 0)

    @torch.no_grad()
    def restore_frozen(self) -> None:
        """Write the frozen elements' saved values back (after every optimizer step)."""
        for f in self._frozen.values():
            f.param.masked_scatter_(f.frozen, f.values)

    @torch.no_grad()
    def tensor(self, name: str) -> torch.Tensor:
        """The current value of a checkpoint tensor (split slices written back), fp32."""
        module_name, _, attr = self._names[name].rpartition(".")
        return getattr(self.model.get_submodule(module_name), attr).detach()


def resolve_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Checkpoint tensor name -> model parameter name, for the names the model has."""
    params = dict(model.named_parameters())
    prefix = getattr(model, "base_model_prefix", "")
    out = {}
    for n in names:
        if n in params:
            out[n] = n
        elif prefix and f"{prefix}.{n}" in params:
            out[n] = f"{prefix}.{n}"
    return out


def apply_selection(model: nn.Module, plan: SelectionPlan, names: dict[str, str]) -> TrainableModel:
    """Freeze the model, then make trainable exactly what `plan` says.

    Args:
        model: the HF model, fp32, on its device.
        plan: from `plan_selection`.
        names: from `resolve_names`.

    Raises:
        UsageError: a split slice on a tied (shared) weight, which parametrization cannot
            update consistently in both places.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    shared = _shared_parameters(model)
    out = TrainableModel(model, plan, {}, _names=names)
    for name in plan.shapes:  # checkpoint order, so optimizer state order is deterministic
        if name not in plan.trained:
            continue
        module_name, _, attr = names[name].rpartition(".")
        module = model.get_submodule(module_name)
        param = getattr(module, attr)
        if name in plan.split:
            if names[name] in shared:
                raise UsageError(f"train mask tensor {name}: row/FFN masks on a tied weight are not supported",
                                 hint="train it whole with --trainable, or use an element mask")
            axis, index = plan.split[name]
            index = index.to(param.device)
            override = _SliceOverride(axis, index, param.detach().index_select(axis, index).clone())
            parametrize.register_parametrization(module, attr, override, unsafe=True)
            out.params[name + "#slice"] = override.slice
            continue
        param.requires_grad_(True)
        out.params[name] = param
        if name in plan.masked:
            frozen = plan.masked[name].to(param.device)
            out._frozen[name] = _Frozen(param, frozen, param.detach()[frozen].clone())
    return out


def _shared_parameters(model: nn.Module) -> set[str]:
    seen: dict[int, list[str]] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        seen.setdefault(id(p), []).append(n)
    return {n for group in seen.values() if len(group) > 1 for n in group}
