"""RegMean (Jin et al. 2023): each linear layer merged in closed form from its inputs' Gram matrices.

Recipe shape:

    merge_method: regmean
    models:
      - model: ./a
        parameters: {gram: ./a-gram}     # written by `neuroloc locate gram ./a --data a.jsonl -o a-gram`
      - model: ./b
        parameters: {gram: ./b-gram}
    parameters: {alpha: 0.9}

For a linear layer `y = W x`, the weight that minimises `Σ_i ||X_i W*ᵀ − X_i W_iᵀ||²` over every
model's inputs `X_i` is `W*ᵀ = (Σ_i G_i)⁻¹ Σ_i G_i W_iᵀ` with `G_i = X_iᵀ X_i`, the Gram matrix
of the layer's inputs on model i's data (`locate.gram`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from neuroloc_cli.arch import CONV1D_KINDS, tensor_kind
from neuroloc_cli.errors import InputError
from neuroloc_cli.methods.base import merge_method
from neuroloc_cli.methods.linear import linear
from neuroloc_cli.recipe.params import Param, Scalar, SideFile


def is_conv1d(name: str) -> bool:
    """GPT-2's `Conv1D` stores its weight [in, out]; `nn.Linear` stores [out, in]."""
    return tensor_kind(name) in CONV1D_KINDS


def gram_shape(name: str, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """A linear layer's Gram matrix is [in, in]; a tensor that is not 2-D has none."""
    if len(shape) != 2:
        return None
    k = shape[0] if is_conv1d(name) else shape[1]
    return (k, k)


GRAM_FILE = SideFile(
    scores=("gram",),
    shape=gram_shape,
    what="a Gram matrix",
    hint="write one with `neuroloc locate gram MODEL --data FILE -o DIR`",
)


def _check(whole: Mapping[str, Scalar], per_model: Sequence[Mapping[str, Scalar]]) -> str | None:
    if sum(float(m["weight"]) for m in per_model) <= 0:
        return "the weights sum to zero; give at least one model a positive weight"
    return None


def scaled_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """The paper's `G̃ = α·G + (1 − α)·diag(G)`: off-diagonal entries times α, the diagonal kept."""
    out = gram.mul(alpha)
    out.diagonal().copy_(gram.diagonal())
    return out


@merge_method(
    "regmean",
    needs_base=False,
    params=(
        Param("weight", default=1.0, per_model=True, low=0.0, help="weight of each model's Gram matrix (1: the paper)"),
        Param("gram", per_model=True, file=GRAM_FILE, help="the model's Gram matrices: a file of `neuroloc locate gram` (or its folder)"),
        Param("alpha", default=0.9, low=0.0, high=1.0, help="scale of the Gram matrices' off-diagonal entries (1: exact RegMean)"),
    ),
    context=("name",),
    paper="Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models (arXiv:2212.09849)",
    check_values=_check,
)
def regmean(
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    weight: Sequence[float],
    gram: Sequence[torch.Tensor | None],
    alpha: float,
    name: str,
) -> torch.Tensor:
    """Closed-form merge of each linear layer: `W* = (Σ_i w_i G̃_i)⁻¹ Σ_i w_i G̃_i W_i` (on `Wᵀ`).

    `G̃_i` is model i's Gram matrix with its off-diagonal entries scaled by `alpha` (the
    paper's regularisation; its public code uses 0.9). Solved in float64 with
    `torch.linalg.solve`, never an explicit inverse; returned in float32 at least. Tensors without a Gram matrix in every
    model's file (norms, biases, embeddings) get the weighted average `Σ w_i θ_i / Σ w_i`;
    with identical Gram matrices a layer gets it too.

    Raises:
        InputError: the summed Gram matrix of a layer is singular (an input dimension that no
            model's data ever used, with `alpha: 1`).
    """
    if any(g is None for g in gram) or tensors[0].dim() != 2:
        return linear.fn(None, tensors, weight=weight, normalize=True)
    conv = is_conv1d(name)
    lhs: torch.Tensor | None = None
    rhs: torch.Tensor | None = None
    for t, g, w in zip(tensors, gram, weight, strict=True):
        assert g is not None
        scaled = scaled_gram(g.to(torch.float64), alpha).mul_(w)
        w_in_out = t.to(torch.float64) if conv else t.to(torch.float64).T  # [in, out]
        term = scaled @ w_in_out
        lhs = scaled if lhs is None else lhs.add_(scaled)
        rhs = term if rhs is None else rhs.add_(term)
    assert lhs is not None and rhs is not None
    try:
        merged = torch.linalg.solve(lhs, rhs)  # [in, out]
    except torch.linalg.LinAlgError:
        raise InputError(
            f"regmean: the summed Gram matrix of {name} is singular",
            hint="lower alpha (below 1 the diagonal keeps it invertible unless an input is always zero), or score more tokens",
        ) from None
    out = merged if conv else merged.T
    return out.to(torch.promote_types(tensors[0].dtype, torch.float32)).contiguous()
