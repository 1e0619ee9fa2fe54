"""What a training run may update, and the three ways it keeps everything else exactly.

1. **Whole tensors** (`--trainable GLOB`, or full CPT): the parameter trains as usual; every
   other parameter has `requires_grad=False` and is not given to the optimizer.
2. **Split slices** (a `--train-mask` of row or FFN-neuron granularity, and LANDeRMT's neuron
   groups): the selected rows
   (or columns, per the mask's axis) of a tensor become their own parameter, the only one
   the optimizer sees, so its state follows the selection. The model keeps computing with
   the whole tensor: after backward, the selected rows of its gradient move to the slice
   (and the whole-tensor gradient is dropped); after each optimizer step the slice is copied
   back into those rows in place. Unselected rows are never written. Copying in place (not a
   parametrization building `index_copy(...)` on every forward) allocates nothing per step,
   and keeps tied weights (GPT-2's embedding and head) consistent. The weight-gradient
   matmul is still done for the whole tensor, as in full training. A tensor may be split into
   several named groups (LANDeRMT: the general neurons, and each language's specific ones);
   `set_active` then says which groups a batch trains: the others get no gradient at all,
   so AdamW skips them (no moment update, no weight decay) and they stay bit for bit.
3. **Gradient masking + restore** (a `--train-mask` of element granularity, or any
   `--freeze-mask`): the whole tensor trains, the gradient of frozen elements is zeroed
   before clipping (so they do not count in the gradient norm), and after every optimizer
   step their saved values are written back, because AdamW's decoupled weight decay would
   otherwise still move them. Cost: full Adam state for the tensor, plus a BOOL mask
   (1 byte/element) and a copy of the frozen values.

Tensors are named as in the checkpoint (and the mask); `runtime.model.parameter_names` maps them
to the model's parameter names (GPT-2 checkpoints saved without the `transformer.` prefix, for
example).
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass, field

import torch
from torch import nn

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
    groups: dict[str, dict[str, tuple[int, torch.Tensor]]] = field(default_factory=dict)
    """group -> tensor -> (axis, indices): split slices trained only while their group is active."""

    @property
    def trained(self) -> set[str]:
        return {*self.whole, *self.split, *self.masked, *(n for g in self.groups.values() for n in g)}

    def counts(self) -> dict[str, int]:
        """Trainable and frozen element counts, and the elements the optimizer holds state for."""
        numel = {n: math.prod(s) for n, s in self.shapes.items()}
        total = sum(numel.values())
        slices = [*self.split.items(), *(item for g in self.groups.values() for item in g.items())]
        split = sum(math.prod(self.shapes[n]) // self.shapes[n][a] * len(i) for n, (a, i) in slices)
        masked = sum(numel[n] - int(f.sum()) for n, f in self.masked.items())
        whole = sum(numel[n] for n in self.whole)
        trainable = whole + split + masked
        return {
            "parameters": total,
            "trainable": trainable,
            "frozen": total - trainable,
            "optimizer_elements": whole + split + sum(numel[n] for n in self.masked),
        }


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


def plan_groups(shapes: dict[str, tuple[int, ...]], groups: dict[str, dict[str, tuple[int, torch.Tensor]]]) -> SelectionPlan:
    """Only named groups of slices train (LANDeRMT's neuron sets); everything else is frozen.

    Args:
        shapes: floating tensors of the checkpoint -> shape.
        groups: group -> tensor -> (axis, indices); groups must not overlap within a tensor.
    """
    return SelectionPlan((), {}, {}, dict(shapes), {g: dict(t) for g, t in groups.items()})


def _match_globs(names: list[str], globs: list[str] | tuple[str, ...]) -> set[str]:
    matched: set[str] = set()
    for g in globs:
        hits = {n for n in names if fnmatch.fnmatchcase(n, g)}
        if not hits:
            raise UsageError(
                f"--trainable {g!r}: matches no tensor of the model", hint="names look like 'model.layers.0.mlp.up_proj.weight'"
            )
        matched |= hits
    return matched


@dataclass
class _Split:
    param: nn.Parameter  # the model's whole tensor (computes, never in the optimizer)
    axis: int
    index: torch.Tensor
    slice: nn.Parameter  # the selected rows: what the optimizer updates


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
    params: dict[str, nn.Parameter]  # checkpoint name (+ "#slice", or "#GROUP" for groups) -> parameter
    _frozen: dict[str, _Frozen] = field(default_factory=dict)
    _splits: dict[str, _Split] = field(default_factory=dict)
    _names: dict[str, str] = field(default_factory=dict)  # checkpoint name -> model name
    _groups: dict[str, list[_Split]] = field(default_factory=dict)  # group -> its slices
    active: set[str] | None = None  # the groups the next batch trains (None: all)

    @property
    def groups(self) -> list[str]:
        """The selection groups (empty without `plan_groups`)."""
        return list(self._groups)

    def set_active(self, groups: set[str]) -> None:
        """Train only these groups' slices from the next backward on; the others receive no
        gradient (None), which AdamW skips entirely."""
        unknown = groups - set(self._groups)
        if unknown:
            raise ValueError(f"unknown selection groups {sorted(unknown)}")
        self.active = set(groups)

    def active_params(self) -> list[nn.Parameter]:
        """The optimizer's parameters that the next step may move: all but the slices of
        inactive groups (the same on every process, so that an all-reduce over them matches)."""
        inactive = {id(s.slice) for g, slices in self._groups.items() if self.active is not None and g not in self.active for s in slices}
        return [p for p in self.params.values() if id(p) not in inactive]

    @torch.no_grad()
    def collect_gradients(self) -> None:
        """After backward: move split tensors' selected gradient rows to their slices (active
        groups only) and zero frozen elements' gradients (before any all-reduce or clipping, so
        that neither sees what cannot move)."""
        grouped = [(g, s) for g, slices in self._groups.items() for s in slices]
        for group, s in [(None, s) for s in self._splits.values()] + grouped:
            if s.param.grad is not None and (group is None or self.active is None or group in self.active):
                s.slice.grad = s.param.grad.index_select(s.axis, s.index)
            else:
                s.slice.grad = None
        for s in [*self._splits.values(), *(s for _, s in grouped)]:
            s.param.grad = None
        for f in self._frozen.values():
            if f.param.grad is not None:
                f.param.grad.masked_fill_(f.frozen, 0)

    @torch.no_grad()
    def after_step(self) -> None:
        """After every optimizer step (and after loading a checkpoint): copy slices into their
        rows, and write frozen elements' saved values back."""
        for s in [*self._splits.values(), *(s for slices in self._groups.values() for s in slices)]:
            s.param.index_copy_(s.axis, s.index, s.slice)
        for f in self._frozen.values():
            f.param.masked_scatter_(f.frozen, f.values)

    @torch.no_grad()
    def tensor(self, name: str) -> torch.Tensor:
        """The current value of a checkpoint tensor, fp32."""
        return self.model.get_parameter(self._names[name]).detach()


def apply_selection(model: nn.Module, plan: SelectionPlan, names: dict[str, str]) -> TrainableModel:
    """Freeze the model, then make trainable exactly what `plan` says.

    Args:
        model: the HF model, fp32, on its device.
        plan: from `plan_selection`.
        names: from `neuroloc_cli.runtime.model.parameter_names`.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    out = TrainableModel(model, plan, {}, _names=names)
    for name in plan.shapes:  # checkpoint order, so optimizer state order is deterministic
        if name not in plan.trained:
            continue
        param = model.get_parameter(names[name])
        param.requires_grad_(True)
        if name in plan.split:
            axis, index = plan.split[name]
            index = index.to(param.device)
            piece = nn.Parameter(param.detach().index_select(axis, index).clone())
            out._splits[name] = _Split(param, axis, index, piece)
            out.params[name + "#slice"] = piece
            continue
        if any(name in g for g in plan.groups.values()):
            for group, tensors in plan.groups.items():
                if name in tensors:
                    axis, index = tensors[name]
                    index = index.to(param.device)
                    piece = nn.Parameter(param.detach().index_select(axis, index).clone())
                    out._groups.setdefault(group, []).append(_Split(param, axis, index, piece))
                    out.params[f"{name}#{group}"] = piece
            continue
        out.params[name] = param
        if name in plan.masked:
            frozen = plan.masked[name].to(param.device)
            out._frozen[name] = _Frozen(param, frozen, param.detach()[frozen].clone())
    for group in plan.groups:
        out._groups.setdefault(group, [])
    return out
