"""The merge-method registry.

A merge method is a small, pure function on tensors of one name:

    def task_arithmetic(base, tensors, *, weight, lambda_=1.0, normalize=False) -> Tensor

`base` is the base model's tensor (None for methods that need no base), `tensors` one tensor
per input model, all in the compute dtype; parameters declared `per_model` arrive as one
value per model (`weight=[0.5, 0.5]`), the others as one value (a keyword that is a Python
keyword gets a trailing underscore: `lambda_`). Random methods also receive
`generator: torch.Generator`. The engine, not the method, handles dtypes, masks and I/O.

Methods that need statistics of the whole model before merging any tensor (MAET ranks
every tensor first) declare `prepare`: the engine calls it once with the plan (a first
streaming pass), and passes what it returns for each tensor as extra keyword arguments
(declared in `context`) to the tensor function in the second pass.
"""

from __future__ import annotations

import inspect
import keyword
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from neuroloc_cli.recipe.params import Param, Scalar
from neuroloc_cli.registry import Registry

MethodFn = Callable[..., torch.Tensor]


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
        output_kind: "model", or "delta" for methods whose output is a weight delta.
        paper: the reference, for docstrings and `neuroloc methods`.
        inputs: "models" (the recipe's `models:`), or "ability" (`ability:` + `languages:`).
        prepare: the statistics pass, `prepare(plan) -> Prepared`, or None.
        context: names of the per-tensor arguments `prepare` provides.
        check: extra recipe checks, `check(recipe) -> list of problems`, or None.
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
    output_kind: str = "model"
    paper: str = ""
    inputs: str = "models"
    prepare: Callable[..., Prepared] | None = None
    context: tuple[str, ...] = ()
    check: Callable[..., list[str]] | None = None
    check_values: Callable[[dict[str, Scalar], Sequence[dict[str, Scalar]]], str | None] | None = None

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
    ) -> torch.Tensor:
        """Call the method with parameters resolved for one tensor (and `prepare`'s context)."""
        kwargs: dict[str, object] = {_pyname(k): v for k, v in whole.items()}
        for p in self.params:
            if p.per_model:
                kwargs[_pyname(p.name)] = [mp[p.name] for mp in per_model]
        if self.random:
            kwargs["generator"] = generator
        kwargs.update(context or {})
        return self.fn(base, tensors, **kwargs)


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
    output_kind: str = "model",
    paper: str = "",
    inputs: str = "models",
    prepare: Callable[..., Prepared] | None = None,
    context: Sequence[str] = (),
    check: Callable[..., list[str]] | None = None,
    check_values: Callable[[dict[str, Scalar], Sequence[dict[str, Scalar]]], str | None] | None = None,
) -> Callable[[MethodFn], MergeMethod]:
    """Register a tensor function as the merge method `name`.

    The function's keyword parameters must match the declared `params` (checked here, so a
    typo fails at import, not in the middle of a merge).
    """

    def wrap(fn: MethodFn) -> MergeMethod:
        accepted = set(inspect.signature(fn).parameters) - {"base", "tensors"}
        expected = {_pyname(p.name) for p in params} | ({"generator"} if random else set()) | set(context)
        if accepted != expected:
            raise TypeError(f"merge method {name}: function takes {sorted(accepted)}, declared {sorted(expected)}")
        return MergeMethod(
            name, fn, tuple(params), needs_base, min_models, max_models, random, elementwise, output_kind, paper,
            inputs, prepare, tuple(context), check, check_values,
        )

    return METHODS.decorator(name, wrap)
