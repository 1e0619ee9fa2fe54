"""The merge-method registry.

A merge method is a small, pure function on tensors of one name:

    def task_arithmetic(base, tensors, *, weight, lambda_=1.0, normalize=False) -> Tensor

`base` is the base model's tensor (None for methods that need no base), `tensors` one tensor
per input model, all in the compute dtype; parameters declared `per_model` arrive as one
value per model (`weight=[0.5, 0.5]`), the others as one value (a keyword that is a Python
keyword gets a trailing underscore: `lambda_`). Random methods also receive
`generator: torch.Generator`. The engine, not the method, handles dtypes, masks and I/O.
"""

from __future__ import annotations

import inspect
import keyword
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from neuroloc_cli.recipe.params import Param, Scalar
from neuroloc_cli.registry import Registry

MethodFn = Callable[..., torch.Tensor]


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
    ) -> torch.Tensor:
        """Call the method with parameters resolved for one tensor."""
        kwargs: dict[str, object] = {_pyname(k): v for k, v in whole.items()}
        for p in self.params:
            if p.per_model:
                kwargs[_pyname(p.name)] = [mp[p.name] for mp in per_model]
        if self.random:
            kwargs["generator"] = generator
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
) -> Callable[[MethodFn], MergeMethod]:
    """Register a tensor function as the merge method `name`.

    The function's keyword parameters must match the declared `params` (checked here, so a
    typo fails at import, not in the middle of a merge).
    """

    def wrap(fn: MethodFn) -> MergeMethod:
        accepted = set(inspect.signature(fn).parameters) - {"base", "tensors"}
        expected = {_pyname(p.name) for p in params} | ({"generator"} if random else set())
        if accepted != expected:
            raise TypeError(f"merge method {name}: function takes {sorted(accepted)}, declared {sorted(expected)}")
        return MergeMethod(name, fn, tuple(params), needs_base, min_models, max_models, random, elementwise, output_kind, paper)

    return METHODS.decorator(name, wrap)
