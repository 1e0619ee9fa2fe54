"""The merge-method registry.

A merge method is a small, pure function on tensors of one name:

    def task_arithmetic(base, tensors, *, weight, lambda_=1.0, normalize=False) -> Tensor

`base` is the base model's tensor (None for methods that need no base), `tensors` one tensor
per input model, all in the compute dtype; parameters declared `per_model` arrive as one
value per model (`weight=[0.5, 0.5]`), the others as one value (a keyword that is a Python
keyword gets a trailing underscore: `lambda_`). Random methods also receive
`generator: torch.Generator`. The engine, not the method, handles dtypes, masks and I/O.

Methods whose recipes name their inputs by role rather than as a list (MAET's `ability:`
and `languages:`) declare `roles`; the function then takes each role's tensor by keyword
(`ability=`, `language_model=`, and `languages=` as a list) instead of `tensors`, and a
per-model parameter arrives as one value per entry of the list role (`weight` of each
language).

Methods whose output at one element depends on the whole tensor (a norm, an angle, a
selection) declare `reads_in_pieces`: the function reads its inputs a flat piece at a time
(`ops.flat`: the engine hands it inputs read from the checkpoints piece by piece, tests hand
it tensors) and yields its result in consecutive flat pieces, so that neither its inputs nor
a float copy of its result are ever whole in memory. Called as a `MergeMethod`, it returns
the assembled tensor like any other method.

Methods that need numbers of the whole model before merging any tensor (MAET ranks every
tensor first) declare `statistics`: per-tensor `Statistic`s that the engine computes in a
first streaming pass (`merge.stats`), and a `select` that turns them into extra keyword
arguments of the tensor function (declared in `context`) and a provenance record.
"""

from __future__ import annotations

import inspect
import keyword
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from neuroloc_cli.io.checkpoint import Kind
from neuroloc_cli.recipe.params import Param, Scalar
from neuroloc_cli.registry import Registry

MethodFn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Statistic:
    """A number per merged tensor that a method needs before it merges any tensor.

    `fn` is called like the method's function (base, the inputs, the resolved parameters),
    on blocks of rows of large tensors, and the engine adds up its values over the blocks:
    it must be additive over rows (a dot product, a sum of squares).
    """

    name: str
    fn: MethodFn


@dataclass(frozen=True)
class TensorStatistics:
    """What the statistics pass found: `values[tensor][statistic]`, each tensor's element
    count and its whole-tensor parameters, in plan order."""

    values: dict[str, dict[str, float]]
    numel: dict[str, int]
    params: dict[str, dict[str, Scalar]]


@dataclass(frozen=True)
class Prepared:
    """What a method's statistics pass found.

    Attributes:
        per_tensor: tensor name -> extra keyword arguments of the tensor function.
        provenance: recorded in the output's `neuroloc.json` under the method's name.
    """

    per_tensor: dict[str, dict[str, Any]]
    provenance: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    Attributes:
        name: as written in `merge_method:`.
        fn: the pure tensor function.
        params: its declared parameters.
        needs_base: whether `base_model:` is required.
        min_models / max_models: how many `models:` it takes.
        random: whether it draws random numbers (then it gets a seeded generator).
        elementwise: whether each output element depends only on the inputs' elements at the
            same position (no per-tensor statistics); the engine then streams large tensors
            in blocks of rows, so memory stays bounded whatever a tensor's size.
        output_kind: `Kind.MODEL`, or `Kind.DELTA` for methods whose output is a weight delta.
        paper: the reference, for docstrings and `neuroloc methods`.
        roles: the input roles the function takes by keyword (see the module docstring); empty
            for methods of the recipe's `models:` list, which take `tensors`.
        statistics: per-tensor numbers computed in a first pass; `select` turns them into
            the per-tensor `context` arguments (`select(TensorStatistics) -> Prepared`).
        context: names of the per-tensor arguments `select` provides.
        check: extra recipe checks, `check(recipe) -> list of problems`, or None.
        reads_in_pieces: whether the function reads its inputs by flat pieces and yields its
            result in pieces (see the module docstring).
        check_values: a check of the parameters as resolved at one tensor,
            `check_values(whole, per_model) -> problem or None`; the planner runs it at every
            merged tensor, so that values the method cannot use (weights summing to zero
            under `normalize`) are a recipe error before any tensor is read, and a
            `ValueError` from the method itself stays what it is: a bug.
    """

    name: str
    fn: MethodFn
    params: tuple[Param, ...]
    needs_base: bool
    min_models: int = 1
    max_models: int | None = None
    random: bool = False
    elementwise: bool = False
    output_kind: Kind = Kind.MODEL
    paper: str = ""
    roles: tuple[str, ...] = ()
    statistics: tuple[Statistic, ...] = ()
    select: Callable[[TensorStatistics], Prepared] | None = None
    context: tuple[str, ...] = ()
    check: Callable[..., list[str]] | None = None
    check_values: Callable[[dict[str, Scalar], Sequence[dict[str, Scalar]]], str | None] | None = None
    reads_in_pieces: bool = False

    @property
    def summary(self) -> str:
        doc = inspect.getdoc(self.fn) or ""
        return doc.splitlines()[0] if doc else ""

    def __call__(
        self,
        base: torch.Tensor | None,
        tensors: Sequence[torch.Tensor],
        whole: dict[str, Scalar],
        per_model: Sequence[dict[str, Scalar]],
        generator: torch.Generator | None = None,
        context: dict[str, Any] | None = None,
        roles: Sequence[str] = (),
        fn: MethodFn | None = None,
        out_dtype: torch.dtype | None = None,
    ) -> torch.Tensor:
        """Call the method (or, as `fn`, one of its statistics) with parameters resolved for
        one tensor and `select`'s context.

        Args:
            tensors: tensors, or for a method that `reads_in_pieces`, tensors or `ops.flat.Flat`s.
            roles: the role of each of `tensors` (`MergePlan.roles`); used by role methods.
            out_dtype: for a method that `reads_in_pieces`, the dtype its pieces are assembled
                in (each converted as it comes, as `.to(out_dtype)` of the whole would); by
                default the inputs'. Other methods return the compute dtype.
        """
        kwargs: dict[str, Any] = {_pyname(k): v for k, v in whole.items()}
        per_model_params = [p for p in self.params if p.per_model]
        if self.roles:
            listed = [i for i, r in enumerate(roles) if r not in _SINGLE_ROLES]
            per_model = [per_model[i] for i in listed]
            kwargs.update(_by_role(tensors, roles))
        for p in per_model_params:
            kwargs[_pyname(p.name)] = [mp[p.name] for mp in per_model]
        if self.random:
            kwargs["generator"] = generator
        kwargs.update(context or {})
        call = fn or self.fn
        result = call(base, **kwargs) if self.roles else call(base, tensors, **kwargs)
        if self.reads_in_pieces and fn is None:
            like = base if base is not None else tensors[0]
            return _assemble(result, like.shape, out_dtype or like.dtype)
        return result


def _assemble(pieces: Iterator[torch.Tensor], shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """One tensor of `shape` and `dtype` from consecutive flat pieces."""
    out = torch.empty(shape, dtype=dtype)
    flat, at = out.view(-1), 0
    for piece in pieces:
        flat[at : at + piece.numel()] = piece.reshape(-1)
        at += piece.numel()
    if at != flat.numel():
        raise RuntimeError(f"a method yielded {at} elements for a tensor of {flat.numel()}")
    return out


# Roles that name one model; any other role (`languages`) is a list of models.
_SINGLE_ROLES = frozenset({"ability", "language_model"})


def _by_role(tensors: Sequence[torch.Tensor], roles: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tensor, role in zip(tensors, roles, strict=True):
        if role in _SINGLE_ROLES:
            out[role] = tensor
        else:
            out.setdefault(role, []).append(tensor)
    return out


def _pyname(name: str) -> str:
    return name + "_" if keyword.iskeyword(name) else name


METHODS: Registry[MergeMethod] = Registry("merge method")


def merge_method(
    name: str,
    *,
    params: Sequence[Param] = (),
    needs_base: bool,
    min_models: int = 1,
    max_models: int | None = None,
    random: bool = False,
    elementwise: bool = False,
    output_kind: Kind = Kind.MODEL,
    paper: str = "",
    roles: Sequence[str] = (),
    statistics: Sequence[Statistic] = (),
    select: Callable[[TensorStatistics], Prepared] | None = None,
    context: Sequence[str] = (),
    check: Callable[..., list[str]] | None = None,
    check_values: Callable[[dict[str, Scalar], Sequence[dict[str, Scalar]]], str | None] | None = None,
    reads_in_pieces: bool = False,
) -> Callable[[MethodFn], MergeMethod]:
    """Register a tensor function as the merge method `name`.

    The function's keyword parameters must match the declared `params` (checked here, so a
    typo fails at import, not in the middle of a merge).
    """

    def wrap(fn: MethodFn) -> MergeMethod:
        accepted = set(inspect.signature(fn).parameters) - {"base", "tensors"}
        expected = {_pyname(p.name) for p in params} | ({"generator"} if random else set()) | set(context) | set(roles)
        if accepted != expected:
            raise TypeError(f"merge method {name}: function takes {sorted(accepted)}, declared {sorted(expected)}")
        return MergeMethod(
            name,
            fn,
            tuple(params),
            needs_base,
            min_models,
            max_models,
            random,
            elementwise,
            output_kind,
            paper,
            tuple(roles),
            tuple(statistics),
            select,
            tuple(context),
            check,
            check_values,
            reads_in_pieces,
        )

    return METHODS.decorator(name, wrap)
