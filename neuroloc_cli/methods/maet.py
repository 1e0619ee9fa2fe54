"""MAET: ability extraction and transfer across languages (Eq. 2–5), in two streaming passes.

Recipe shape:

    merge_method: maet
    base_model: ./base
    ability: {model: ./cpt-math-en, language_model: ./cpt-en}
    languages: [{model: ./cpt-es, weight: 0.5}, {model: ./cpt-zh, weight: 0.5}]
    parameters: {alpha: 0.8, beta: 0.2, gamma: 0.2, eta: 1.0, k2: 0.8}

Inputs reach the tensor function in the order ability.model, ability.language_model,
languages[0..n-1] (`recipe.schema.input_models`). Pass 1 (`select_tensors`) scores every
floating tensor by `S(τ) = ⟨R(A)[τ], R_Lang[τ]⟩`, sorts descending and puts the last
`floor(k2 · N)` tensors into T (floor: the paper's Table 3 shares are counts out of 232 = ⌊0.8 ·
291⌋ tensors of Llama-3 8B), then keeps those whose `transfer` parameter is true (Table 3's
restriction of T to tensor kinds, written with filters). Pass 2 (`maet`) merges each tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from neuroloc_cli.methods.base import Prepared, merge_method
from neuroloc_cli.ops.combine import weighted_delta_sum
from neuroloc_cli.ops.rank import TensorScore, dot, sort_scores
from neuroloc_cli.recipe.params import Param

PAPER = "Chen et al. 2024, Extracting and transferring abilities for building multi-lingual ability-enhanced LLMs, MAET, Eq. 2-5"


def ability_vector(base: torch.Tensor, ability: torch.Tensor, language: torch.Tensor, alpha: float, beta: float) -> torch.Tensor:
    """Eq. 2: `R(A) = α·Δ(ability) − β·Δ(ability's language)`."""
    return weighted_delta_sum(base, [ability, language], [alpha, -beta])


def language_vector(base: torch.Tensor, languages: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Eq. 3: `R_Lang = Σ μ_i·Δ(language_i)`."""
    return weighted_delta_sum(base, languages, weights)


def check_maet_recipe(recipe) -> list[str]:
    """The recipe-shape problems of a maet recipe (no file is read)."""
    problems = []
    if recipe.ability is None:
        problems.append("ability: maet needs 'ability: {model: ..., language_model: ...}'")
    if not recipe.languages:
        problems.append("languages: maet needs at least one '{model: ..., weight: ...}'")
    k2 = recipe.parameters.get("k2")
    if k2 is not None and (isinstance(k2, (list, dict, bool)) or not isinstance(k2, (int, float))):
        problems.append("parameters.k2: must be one number (a share of all tensors), not a per-layer or filtered value")
    return problems


def select_tensors(plan) -> Prepared:
    """Pass 1 (Eq. 4): rank every merged tensor by ⟨R(A), R_Lang⟩ and choose T.

    Returns:
        `in_t` per tensor, and the provenance: the ranking (descending), `k2`, T's size before
        and after the `transfer` restriction, and T itself.
    """
    from neuroloc_cli.merge.run import stream_inputs  # the engine imports the methods

    # A dot product is a sum over rows, so large tensors stream in blocks of rows.
    dots: dict[str, float] = {}
    numel: dict[str, int] = {}
    transfer, k2 = {}, 0.0
    for step, _, (base, tensors, _) in stream_inputs(plan, [s for s in plan.steps if s.merge], blocks=True):
        whole, per_model = plan.resolver.at(step.name, step.t)
        r_a = ability_vector(base, tensors[0], tensors[1], whole["alpha"], whole["beta"])
        r_lang = language_vector(base, tensors[2:], [p["weight"] for p in per_model[2:]])
        dots[step.name] = dots.get(step.name, 0.0) + dot(r_a, r_lang)
        numel[step.name] = numel.get(step.name, 0) + base.numel()
        transfer[step.name] = bool(whole["transfer"])
        k2 = float(whole["k2"])  # one number for the whole merge (check_maet_recipe)
    ranked = sort_scores([TensorScore(name, score, numel[name]) for name, score in dots.items()])
    by_rank = {s.tensor for s in ranked[len(ranked) - _share_count(k2, len(ranked)):]} if k2 > 0 else set()
    chosen = [s.tensor for s in ranked if s.tensor in by_rank and transfer[s.tensor]]
    in_t = set(chosen)
    provenance = {
        "similarity": "dot product of R(A) and R_Lang per tensor (Eq. 4)",
        "k2": k2,
        "tensors_ranked": len(ranked),
        "T_by_rank": len(by_rank),
        "T_size": len(chosen),
        "T": chosen,
        "ranking": [{"rank": i + 1, "tensor": s.tensor, "score": s.score, "in_T": s.tensor in in_t} for i, s in enumerate(ranked)],
    }
    return Prepared({s.tensor: {"in_t": s.tensor in in_t} for s in ranked}, provenance)


@merge_method(
    "maet",
    needs_base=True,
    elementwise=True,  # given pass 1's per-tensor in_t (maet), each element stands alone
    min_models=0,
    inputs="ability",
    prepare=select_tensors,
    context=("in_t",),
    check=check_maet_recipe,
    params=(
        Param("alpha", default=0.8, help="weight of Δ(ability.model) in R(A) (Eq. 2)"),
        Param("beta", default=0.2, help="weight subtracted of Δ(ability.language_model) in R(A) (Eq. 2)"),
        Param("gamma", default=0.2, help="weight of R(A) added to tensors in T (Eq. 5)"),
        Param("eta", default=1.0, help="weight of R_Lang added to tensors in T (Eq. 5)"),
        Param("k2", default=0.8, low=0.0, high=1.0, help="share of tensors, by count, least similar to R_Lang that form T (Eq. 4)"),
        Param("transfer", default=True, boolean=True, help="false keeps a tensor out of T (use filters to restrict T to tensor kinds)"),
        Param("weight", default=1.0, per_model=True, help="μ_i of each language (set in languages[i].weight)"),
    ),
    paper=PAPER,
)
def maet(
    base: torch.Tensor,
    tensors: Sequence[torch.Tensor],
    *,
    alpha: float,
    beta: float,
    gamma: float,
    eta: float,
    k2: float,
    transfer: bool,
    weight: Sequence[float],
    in_t: bool,
) -> torch.Tensor:
    """Eq. 5: `τo + γ·R(A) + η·R_Lang` for tensors in T, else `τo + R_Lang`.

    `k2` and `transfer` act in pass 1 (`select_tensors`), which decides `in_t`.
    """
    del k2, transfer
    r_lang = language_vector(base, tensors[2:], weight[2:])
    if not in_t:
        return r_lang.add_(base)
    r_a = ability_vector(base, tensors[0], tensors[1], alpha, beta)
    return r_a.mul_(gamma).add_(r_lang, alpha=eta).add_(base)


# -- the vectors themselves, written only when asked ------------------------------------------


def _check_ability_only(recipe) -> list[str]:
    problems = [] if recipe.ability is not None else ["ability: ability_vector needs 'ability: {model: ..., language_model: ...}'"]
    return problems + (["languages: ability_vector takes no 'languages:' (see language_vector)"] if recipe.languages else [])


def _check_languages_only(recipe) -> list[str]:
    problems = [] if recipe.languages else ["languages: language_vector needs at least one '{model: ..., weight: ...}'"]
    return problems + (["ability: language_vector takes no 'ability:' (see ability_vector)"] if recipe.ability is not None else [])


@merge_method(
    "ability_vector",
    needs_base=True,
    elementwise=True,
    min_models=0,
    inputs="ability",
    output_kind="delta",
    check=_check_ability_only,
    params=(
        Param("alpha", default=0.8, help="weight of Δ(ability.model) (Eq. 2)"),
        Param("beta", default=0.2, help="weight subtracted of Δ(ability.language_model) (Eq. 2)"),
    ),
    paper=PAPER,
)
def ability_vector_method(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, alpha: float, beta: float) -> torch.Tensor:
    """Eq. 2, R(A), written as a delta checkpoint (for `neuroloc rank` or inspection)."""
    return ability_vector(base, tensors[0], tensors[1], alpha, beta)


@merge_method(
    "language_vector",
    needs_base=True,
    elementwise=True,
    min_models=0,
    inputs="ability",
    output_kind="delta",
    check=_check_languages_only,
    params=(Param("weight", default=1.0, per_model=True, help="μ_i of each language (set in languages[i].weight)"),),
    paper=PAPER,
)
def language_vector_method(base: torch.Tensor, tensors: Sequence[torch.Tensor], *, weight: Sequence[float]) -> torch.Tensor:
    """Eq. 3, R_Lang, written as a delta checkpoint (for `neuroloc rank` or inspection)."""
    return language_vector(base, tensors, weight)


def _share_count(share: float, n: int) -> int:
    """floor(share · n), immune to binary rounding: 0.41 · 300 is 122.99999999999999 in
    floating point, but the share the user wrote means 123."""
    return math.floor(round(share * n, 9))
