"""The sparsify-then-mix methods (ties, dare_*, breadcrumbs*, della*): one body, declared once.

Each method is "generalized task arithmetic" (mergekit's name): take every model's task
vector `δ_i = θ_i − θ_0`, keep part of it (a sparsifier, `neuroloc_cli.ops.sparsify`),
optionally rescale the survivors, then mix the vectors with or without TIES sign election
(`neuroloc_cli.ops.blockwise`).

A `Family` is a sparsifier with its paper, its own parameters and its `rescale` default;
`Family.register` adds one variant: the mix (with or without sign election) and its
`normalize` default. The tensor function and its parameter list are built from that
description, so a variant is one call and every parameter is declared once, here or in the
family.

Rescaling, when `rescale` is true:
- mergekit (default): the survivors of a tensor are multiplied by one factor that restores the
  delta's L1 norm, `‖δ‖₁ / ‖keep ⊙ δ‖₁` (no change when either norm is ~0);
- paper (`paper_rescale: true`, the random sparsifiers only): DARE multiplies survivors by
  `1 / density`, DELLA each survivor by `1 / p` with `p` its own keep probability.
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from neuroloc_cli.methods.base import _pyname, merge_method
from neuroloc_cli.ops import reference
from neuroloc_cli.ops.blockwise import KEEP_ALL, KEEP_NONE, Keep, l1_norms, l1_rescale_factor, mix
from neuroloc_cli.ops.sparsify import Sparsifier, TaskVector
from neuroloc_cli.recipe.params import Param, Scalar

WEIGHT = Param("weight", per_model=True, help="weight of each model's task vector")
DENSITY = Param("density", default=1.0, per_model=True, low=0.0, high=1.0, help="share of each task vector kept")
LAMBDA = Param("lambda", default=1.0, help="scale of the mixed task vector")
PAPER_RESCALE = Param(
    "paper_rescale", default=False, boolean=True, help="with rescale: the paper's 1/p scaling instead of mergekit's L1-norm match"
)

HALF = (torch.bfloat16, torch.float16)  # compute dtypes merged op by op in that dtype (`Variant._in_dtype`)

CheckValues = Callable[[Mapping[str, Scalar], Sequence[Mapping[str, Scalar]]], "str | None"]


def _normalize(default: bool) -> Param:
    return Param("normalize", default=default, boolean=True, help="divide by the sum of the (agreeing) weights")


def _rescale(default: bool) -> Param:
    return Param("rescale", default=default, boolean=True, help="rescale survivors (L1 norm match, or 1/p with paper_rescale)")


@dataclass(frozen=True)
class Family:
    """What the variants of one sparsify-then-mix method share.

    Attributes:
        sparsifier: the keep rule.
        rescale: the default of `rescale`.
        paper: the reference, for `neuroloc methods`.
        params: the sparsifier's own per-model parameters (`gamma`), in `sparsifier.params`
            order.
        check_values: a check of resolved parameters (see `MergeMethod.check_values`).
    """

    sparsifier: Sparsifier
    rescale: bool
    paper: str
    params: tuple[Param, ...] = ()
    check_values: CheckValues | None = None

    def __post_init__(self) -> None:
        if tuple(p.name for p in self.params) != self.sparsifier.params:
            raise TypeError(f"sparsifier {self.sparsifier.name} takes {self.sparsifier.params}, declared {[p.name for p in self.params]}")

    def register(self, name: str, *, consensus: bool, normalize: bool, doc: str) -> None:
        """Register the variant `name` as a merge method.

        Args:
            consensus: TIES sign election in the mix.
            normalize: the default of `normalize`.
            doc: the method's docstring (its first line is `neuroloc methods`' summary).
        """
        variant = Variant(self.sparsifier, consensus)
        params = (WEIGHT, DENSITY, *self.params, _normalize(normalize), _rescale(self.rescale))
        params += (PAPER_RESCALE,) if self.sparsifier.random else ()
        params += (LAMBDA,)
        fn = _tensor_function(name, variant, params, doc)
        merge_method(name, needs_base=True, params=params, random=self.sparsifier.random, paper=self.paper, check_values=self.check_values)(
            fn
        )
        VARIANTS[name] = variant


class _Model(NamedTuple):
    """What a sparsifier is given for one model: its task vector, density and own parameters."""

    vector: TaskVector
    density: float
    params: dict[str, Any]


@dataclass(frozen=True)
class Variant:
    """One registered sparsify-then-mix method: its sparsifier and whether it elects signs.

    `merge` and `reference` take the arguments of the method's tensor function (`base`,
    `tensors`, then the parameters by keyword: per-model lists, `lambda_`, and `generator`
    for a random sparsifier) in the compute dtype. float32 and float64 run the fused loops in
    that dtype; half precision (the recipe's `dtype: bfloat16` or `float16`) runs
    `reference.merge_in_dtype`, every op rounded to that dtype in mergekit 0.1.5's order, so
    that a deterministic recipe gives mergekit's bytes (`accumulate: float32` in the recipe
    hands the method float32 tensors instead, see `neuroloc_cli.merge.run`).
    """

    sparsifier: Sparsifier
    consensus: bool

    def merge(self, base: torch.Tensor, tensors: Sequence[torch.Tensor], **args: Any) -> torch.Tensor:
        """The merged tensor, by the fused loops (in half precision: `_in_dtype`)."""
        if base.dtype in HALF:
            return self._in_dtype(base, tensors, args)
        flat_base, models = self._models(base, tensors, args)
        keeps = [self.sparsifier.keep(m.vector, m.density, **m.params) for m in models]
        tuned = [m.vector.tuned for m in models]
        out = sparse_task_arithmetic(flat_base, tuned, keeps, args["weight"], **self._mixing(args))
        return out.reshape(base.shape).to(base.dtype)

    def reference(self, base: torch.Tensor, tensors: Sequence[torch.Tensor], **args: Any) -> torch.Tensor:
        """The merged tensor, by the plain-PyTorch specification (`neuroloc_cli.ops.reference`):
        what the tests hold `merge` to. Half precision has one path (`_in_dtype`), held to hand formulas
        by `tests/test_half_precision.py`."""
        if base.dtype in HALF:
            return self._in_dtype(base, tensors, args)
        _, models = self._models(base, tensors, args)
        kept = [self.sparsifier.keep_reference(m.vector, m.density, **m.params) for m in models]
        return reference.merge(base, tensors, kept, args["weight"], **self._mixing(args))

    def _in_dtype(self, base: torch.Tensor, tensors: Sequence[torch.Tensor], args: dict[str, Any]) -> torch.Tensor:
        """The merge in the tensors' half dtype, as mergekit computes it: each delta rounded to
        the dtype, the masks chosen on those rounded deltas (their magnitudes are exact in
        float32, which the rules compare in), the rescale and mix rounded op by op."""
        deltas = [torch.sub(t, base) for t in tensors]
        zero = torch.zeros(base.numel())  # so that a task vector's delta is the rounded delta, exact in float32
        keys = model_keys(args["generator"], len(tensors)) if self.sparsifier.random else [0] * len(tensors)
        kept: list[reference.Kept | None] = []
        for i, (d, key) in enumerate(zip(deltas, keys)):
            density = float(args["density"][i])
            vector = TaskVector(zero, d.reshape(-1).float(), base.shape, key)
            kept.append(None if density >= 1 else self._kept(vector, density, {p: args[p][i] for p in self.sparsifier.params}))
        return reference.merge_in_dtype(base, deltas, kept, args["weight"], **self._mixing(args))

    def _kept(self, v: TaskVector, density: float, params: dict[str, Any]) -> reference.Kept:
        """What the sparsifier keeps of `v`, as a mask: a rule of magnitude cuts by the fused
        selection (no full sort; the same elements as the reference's), a draw by the reference."""
        keep = self.sparsifier.keep(v, density, **params)
        if keep is None or keep.p is not None:
            return self.sparsifier.keep_reference(v, density, **params)
        magnitude = v.tuned.abs()
        mask = (keep.cut or KEEP_ALL).mask(magnitude) & ~(keep.outliers or KEEP_NONE).mask(magnitude)
        return reference.Kept(mask.reshape(v.shape))

    def _models(self, base: torch.Tensor, tensors: Sequence[torch.Tensor], args: dict[str, Any]) -> tuple[torch.Tensor, list[_Model]]:
        """The flat base in the work dtype, and per model what its sparsifier is given. The
        stream keys are drawn first, one per model."""
        work = base.dtype if base.dtype in (torch.float32, torch.float64) else torch.float32
        flat_base = base.reshape(-1).to(work).contiguous()
        keys = model_keys(args["generator"], len(tensors)) if self.sparsifier.random else [0] * len(tensors)
        models = [
            _Model(
                TaskVector(flat_base, t.reshape(-1).to(work).contiguous(), base.shape, key),
                float(args["density"][i]),
                {p: args[p][i] for p in self.sparsifier.params},
            )
            for i, (t, key) in enumerate(zip(tensors, keys))
        ]
        return flat_base, models

    def _mixing(self, args: dict[str, Any]) -> dict[str, Any]:
        return {
            "consensus": self.consensus,
            "normalize": args["normalize"],
            "rescale": args["rescale"],
            "paper_rescale": args.get("paper_rescale", False),
            "lambda_": args["lambda_"],
        }


VARIANTS: dict[str, Variant] = {}  # every registered sparsify-then-mix method, by name


def _tensor_function(name: str, variant: Variant, params: Sequence[Param], doc: str) -> Callable[..., torch.Tensor]:
    """The method's pure tensor function, with the signature the engine checks and calls
    (`base, tensors, *, <params>[, generator]`), made from `params`."""

    def fn(base: torch.Tensor, tensors: Sequence[torch.Tensor], **args: Any) -> torch.Tensor:
        return variant.merge(base, tensors, **args)

    keywords = [_pyname(p.name) for p in params] + (["generator"] if variant.sparsifier.random else [])
    fn.__signature__ = inspect.Signature(
        [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in ("base", "tensors")]
        + [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in keywords]
    )
    fn.__name__ = fn.__qualname__ = name
    fn.__doc__ = doc
    return fn


def model_keys(generator: torch.Generator, n: int) -> list[int]:
    """One random stream key per model, from the tensor's generator (see `Keep.key`)."""
    return torch.randint(2**62, (n,), generator=generator).tolist()


def sparse_task_arithmetic(
    base: torch.Tensor,
    tuned: Sequence[torch.Tensor],
    keeps: Sequence[Keep | None],
    weights: Sequence[float],
    *,
    consensus: bool,
    normalize: bool,
    rescale: bool,
    paper_rescale: bool,
    lambda_: float,
) -> torch.Tensor:
    """Rescale each model's kept task vector and mix them, by the fused loops.

    Args:
        base, tuned: flat float32 or float64 tensors.
        keeps: per model, what its sparsifier keeps (None: everything, and no rescale).
        weights: per model, its weight.
        consensus: TIES sign election.
        normalize, lambda_: see `neuroloc_cli.ops.blockwise.mix`.
        rescale: rescale survivors; paper_rescale: of a random draw, by the paper's 1/p
            rather than by the L1 norm.

    Returns:
        The merged flat tensor.
    """
    rescaled, scales = [], []
    for t, keep in zip(tuned, keeps):
        scale = 1.0
        if keep is None:
            keep = Keep()
        elif rescale and paper_rescale and keep.p is not None:
            keep = dataclasses.replace(keep, inverse_p=True)
        elif rescale:
            before, after, keep = l1_norms(base, t, keep)  # keep now holds its draws
            scale = l1_rescale_factor(before, after)
        rescaled.append(keep)
        scales.append(scale)
    return mix(base, tuned, rescaled, scales, weights, consensus=consensus, normalize=normalize, lambda_=lambda_)
