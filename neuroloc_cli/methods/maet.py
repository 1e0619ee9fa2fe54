"""MAET: ability extraction and transfer across languages (Eq. 2–5), in two streaming passes.

Recipe shape:

    merge_method: maet
    base_model: ./base
    ability: {model: ./cpt-math-en, language_model: ./cpt-en}
    languages: [{model: ./cpt-es, weight: 0.5}, {model: ./cpt-zh, weight: 0.5}]
    parameters: {alpha: 0.8, beta: 0.2, gamma: 0.2, eta: 1.0, k2: 0.8}

The functions take their inputs by role: `ability` (ability.model), `language_model`
(ability.language_model) and `languages` (languages[i].model, with `weight` one per language).
The engine's statistics pass computes `S(τ) = ⟨R(A)[τ], R_Lang[τ]⟩` per floating tensor
(`ALIGNMENT`); `select_tensors` sorts descending and puts the last `share_count(k2, N)` = `int(k2 · N)` tensors
into T (floor: the paper's Table 3 shares are counts out of 232 = ⌊0.8 · 291⌋ tensors of
Llama-3 8B), then keeps those whose `transfer` parameter is true (Table 3's restriction of T
to tensor kinds, written with filters). The merge pass (`maet`) then merges each tensor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from neuroloc_cli.io.checkpoint import Kind
from neuroloc_cli.methods.base import Prepared, Statistic, TensorStatistics, merge_method
from neuroloc_cli.ops.combine import weighted_delta_sum
from neuroloc_cli.ops.rank import TensorScore, sort_scores
from neuroloc_cli.ops.sparsify import share_count
from neuroloc_cli.ops.sums import fixed_dot
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


def alignment(
    base: torch.Tensor,
    *,
    ability: torch.Tensor,
    language_model: torch.Tensor,
    languages: Sequence[torch.Tensor],
    alpha: float,
    beta: float,
    weight: Sequence[float],
    **_: object,
) -> float:
    """Eq. 4's score of one tensor (or block of rows): `⟨R(A), R_Lang⟩`."""
    return fixed_dot(ability_vector(base, ability, language_model, alpha, beta), language_vector(base, languages, weight))


ALIGNMENT = Statistic("alignment", alignment)


def select_tensors(stats: TensorStatistics) -> Prepared:
    """Eq. 4: rank every merged tensor by ⟨R(A), R_Lang⟩ and choose T.

    Returns:
        `in_t` per tensor, and the provenance: the ranking (descending), `k2`, T's size before
        and after the `transfer` restriction, and T itself.
    """
    ranked = sort_scores([TensorScore(name, v[ALIGNMENT.name], stats.numel[name]) for name, v in stats.values.items()])
    k2 = float(next(iter(stats.params.values()))["k2"]) if stats.params else 0.0  # one number (check_maet_recipe)
    by_rank = {s.tensor for s in ranked[len(ranked) - share_count(k2, len(ranked)) :]} if k2 > 0 else set()
    chosen = [s.tensor for s in ranked if s.tensor in by_rank and stats.params[s.tensor]["transfer"]]
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


ROLES = ("ability", "language_model", "languages")


@merge_method(
    "maet",
    needs_base=True,
    elementwise=True,  # given pass 1's per-tensor in_t (maet), each element stands alone
    min_models=0,
    roles=ROLES,
    statistics=(ALIGNMENT,),
    select=select_tensors,
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
    *,
    ability: torch.Tensor,
    language_model: torch.Tensor,
    languages: Sequence[torch.Tensor],
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
    r_lang = language_vector(base, languages, weight)
    if not in_t:
        return r_lang.add_(base)
    r_a = ability_vector(base, ability, language_model, alpha, beta)
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
    roles=ROLES[:2],
    output_kind=Kind.DELTA,
    check=_check_ability_only,
    params=(
        Param("alpha", default=0.8, help="weight of Δ(ability.model) (Eq. 2)"),
        Param("beta", default=0.2, help="weight subtracted of Δ(ability.language_model) (Eq. 2)"),
    ),
    paper=PAPER,
)
def ability_vector_method(
    base: torch.Tensor, *, ability: torch.Tensor, language_model: torch.Tensor, alpha: float, beta: float
) -> torch.Tensor:
    """Eq. 2, R(A), written as a delta checkpoint (for `neuroloc rank` or inspection)."""
    return ability_vector(base, ability, language_model, alpha, beta)


@merge_method(
    "language_vector",
    needs_base=True,
    elementwise=True,
    min_models=0,
    roles=ROLES[2:],
    output_kind=Kind.DELTA,
    check=_check_languages_only,
    params=(Param("weight", default=1.0, per_model=True, help="μ_i of each language (set in languages[i].weight)"),),
    paper=PAPER,
)
def language_vector_method(base: torch.Tensor, *, languages: Sequence[torch.Tensor], weight: Sequence[float]) -> torch.Tensor:
    """Eq. 3, R_Lang, written as a delta checkpoint (for `neuroloc rank` or inspection)."""
    return language_vector(base, languages, weight)
