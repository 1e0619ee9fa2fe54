"""The merge recipe: YAML in mergekit's shape, validated into frozen pydantic models.

    merge_method: task_arithmetic
    base_model: ./base
    models:
      - model: ./math
        parameters: {weight: 0.7}
    parameters: {lambda: 1.0, normalize: false}
    dtype: float32          # compute dtype
    out_dtype: bfloat16     # output dtype (default: dtype if set, else each base tensor's)
    accumulate: float32     # optional: float32 arithmetic for a half-precision dtype

Parameter values stay untyped here (`Any`): their forms (scalar, per-layer list,
`{filter, value}` list) and ranges are checked by `neuroloc_cli.recipe.params`, which can
name the method's parameters and give better messages than a union type would.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from neuroloc_cli.config_models import Frozen, describe_error, load_yaml
from neuroloc_cli.errors import RecipeError
from neuroloc_cli.io.chat_templates import resolve_chat_template
from neuroloc_cli.io.format import DtypeName


class InputModel(Frozen):
    """One entry of `models:`."""

    model: str
    parameters: dict[str, Any] = Field(default_factory=dict)
    mask: str | None = None
    """A mask file: this model's delta counts only inside it (see `merge.masks`)."""


class AbilitySpec(Frozen):
    """`ability:` of a `maet` recipe: the two masked-CPT models whose difference is R(A)."""

    model: str
    """Θ_{A,L0}: masked CPT on the ability + general corpus."""
    language_model: str
    """Θ_{L0}: masked CPT on the general corpus of the same language."""


class LanguageSpec(Frozen):
    """One entry of `languages:` of a `maet` recipe: R_Lang = Σ weight_i · Δ(model_i)."""

    model: str
    weight: float | None = None
    """μ_i; when absent, the top-level `parameters.weight` (default 1.0)."""


class SliceSource(Frozen):
    """One entry of a slice's `sources:`: layers `[a, b)` of a model (mergekit's shape)."""

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] = Field(default_factory=dict)


class OutputSlice(Frozen):
    """One entry of `slices:`; its sources' layers become consecutive output layers."""

    sources: list[SliceSource] = Field(min_length=1)
    base_model: str | None = None
    """This slice's base model, over the top-level `base_model` (mergekit's rule); one of the
    slice's sources. Not with layer stacking."""
    parameters: dict[str, Any] = Field(default_factory=dict)
    """This slice's parameters: they override the top-level ones, and a source's own
    `parameters` override them (mergekit's order)."""


class ZeroRow(Frozen):
    """`{kind: zero}`: a token's row is zeros."""

    kind: Literal["zero"]


class TokenRow(Frozen):
    """`{kind: model_token, model, token | token_id}`: another token's row of one model (by
    text in that model's vocabulary, or by row index)."""

    kind: Literal["model_token"]
    model: str
    token: str | None = None
    token_id: int | None = None


class TokenEmbedding(Frozen):
    """One entry of `tokenizer.tokens:` (mergekit's `TokenEmbeddingConfig`)."""

    source: str | ZeroRow | TokenRow | None = None
    """Where the token's row comes from for a model that lacks it (for every model with
    `force`): a model path (that model's row of the token), `{kind: zero}`, or
    `{kind: model_token, ...}`."""
    force: bool = False
    """Every model takes the `source` row, also those that have the token."""

    @field_validator("source", mode="before")
    @classmethod
    def _one_source(cls, v: Any) -> Any:
        if v is None or isinstance(v, str):
            return v
        if isinstance(v, dict) and v.get("kind") == "zero" and set(v) == {"kind"}:
            return ZeroRow(kind="zero")
        if isinstance(v, dict) and v.get("kind") == "model_token":
            model, token, token_id = v.get("model"), v.get("token"), v.get("token_id")
            if set(v) - {"kind", "model", "token", "token_id"} or not isinstance(model, str):
                raise ValueError("model_token takes 'model' (a path) and one of 'token' or 'token_id'")
            if (token is None) == (token_id is None):
                raise ValueError("model_token takes one of 'token' or 'token_id', not both or neither")
            if not (isinstance(token, str) or (isinstance(token_id, int) and not isinstance(token_id, bool))):
                raise ValueError("model_token: 'token' is a string, 'token_id' an integer")
            return TokenRow(kind="model_token", model=model, token=token, token_id=token_id)
        raise ValueError("a model path, {kind: zero} or {kind: model_token, model: PATH, token: TEXT | token_id: N}")


class TokenizerBlock(Frozen):
    """mergekit's `tokenizer:` block: `tokenizer_source` with per-token rows and padding."""

    source: str = "union"
    """As `tokenizer_source`: `base`, `union` (the default) or a model path."""
    tokens: dict[str, TokenEmbedding] | None = None
    """Per-token row sources; a token the vocabulary lacks is added to it (not special)."""
    pad_to_multiple_of: int | None = Field(default=None, ge=0)
    """Pad the embedding and head rows to a multiple (0: none); each padding row is that
    model's mean row, and config.json's `vocab_size` counts the padding."""


class MergeRecipe(Frozen):
    """A validated merge recipe (structure only; see `recipe.load` for the rest)."""

    merge_method: str
    base_model: str | None = None
    models: list[InputModel] = Field(default_factory=list)
    slices: list[OutputSlice] = Field(default_factory=list)
    """Layer stacking (`passthrough`), or any other method merged slice by slice; see
    `neuroloc_cli.merge.slices`. Mutually exclusive with `models`."""
    parameters: dict[str, Any] = Field(default_factory=dict)
    dtype: DtypeName | None = None
    out_dtype: DtypeName | None = None
    accumulate: Literal["float32"] | None = None
    """`float32`: a half-precision `dtype` still rounds the inputs, but the arithmetic runs in
    float32 and is rounded once to the output dtype. Absent (default): the arithmetic runs in
    `dtype`, op by op, as mergekit computes it."""
    random_seed: int | None = None
    on_missing: Literal["error", "base"] = "error"
    """What a tensor of the base that a model lacks means: an error (default), or "base",
    i.e. that model leaves the tensor unchanged (a zero delta)."""
    mask: str | None = None
    """A mask file: outside it every element keeps the base value, bit for bit."""
    ability: AbilitySpec | None = None
    languages: list[LanguageSpec] = Field(default_factory=list)
    chat_template: str | None = None
    """Written into the output's tokenizer_config.json: a name (`chatml`) or a literal Jinja
    template (see `neuroloc_cli.io.chat_templates`)."""
    tokenizer_source: str | None = None
    """`base`, `union` or a model path: the output's vocabulary, and every model's embedding
    and head rows mapped onto it before merging (see `neuroloc_cli.merge.vocab`)."""
    tokenizer: TokenizerBlock | None = None
    """mergekit's `tokenizer:` block (see `neuroloc_cli.merge.vocab`); not with `tokenizer_source`."""

    @model_validator(mode="after")
    def _one_tokenizer(self) -> MergeRecipe:
        if self.tokenizer is None:
            return self
        if self.tokenizer_source is not None:
            raise ValueError("give either 'tokenizer_source' or a 'tokenizer:' block, not both (as mergekit)")
        if self.mask is not None or any(m.mask for m in self.models):
            raise ValueError("the 'tokenizer:' block is not supported with masks")
        return self

    @field_validator("chat_template")
    @classmethod
    def _known_chat_template(cls, v: str | None) -> str | None:
        if v is not None:
            resolve_chat_template(v)  # raises ValueError, reported with the key
        return v

    @model_validator(mode="after")
    def _models_or_slices(self) -> MergeRecipe:
        if self.models and self.slices:
            raise ValueError("give either 'models' or 'slices', not both")
        if self.tokenizer_source is not None and (self.mask is not None or any(m.mask for m in self.models)):
            raise ValueError("tokenizer_source is not supported with masks")
        return self


def input_models(recipe: MergeRecipe) -> list[tuple[str, InputModel]]:
    """Every input model but the base, with where the recipe names it.

    `models:` entries for most methods; for recipes in the `maet` shape, `ability.model`,
    `ability.language_model` and each `languages[i]` (its `weight` as a model parameter), in
    that order.
    """
    if recipe.ability is None and not recipe.languages:
        return [(f"models[{i}].model", m) for i, m in enumerate(recipe.models)]
    out = []
    if recipe.ability is not None:
        out += [
            ("ability.model", InputModel(model=recipe.ability.model)),
            ("ability.language_model", InputModel(model=recipe.ability.language_model)),
        ]
    for i, lang in enumerate(recipe.languages):
        params = {} if lang.weight is None else {"weight": lang.weight}
        out.append((f"languages[{i}].model", InputModel(model=lang.model, parameters=params)))
    return out


def role_name(recipe_role: str) -> str:
    """The role of an input as a method sees it (`MergeMethod.roles`): `ability.model` →
    `ability`, `ability.language_model` → `language_model`, `languages[2].model` →
    `languages`, `models[0].model` → `models`."""
    head = recipe_role.removesuffix(".model")
    if head.startswith("ability."):
        return head.removeprefix("ability.")
    return head.partition("[")[0]


def parse_recipe(text: str, source: str) -> MergeRecipe:
    """Parse YAML text into a `MergeRecipe`, reporting every structural problem at once.

    Args:
        text: the YAML document.
        source: the file name, for messages.

    Raises:
        RecipeError: invalid YAML, unknown or missing keys, wrong types.
    """
    return validate_recipe(recipe_document(text, source), source)


def recipe_document(text: str, source: str) -> dict[str, Any]:
    """The recipe's YAML as a plain mapping, before validation (what `--set` edits).

    Raises:
        RecipeError: invalid YAML, or a document that is not a mapping.
    """
    try:
        doc = load_yaml(text)
    except ValueError as e:
        raise RecipeError(source, [str(e)]) from None
    if not isinstance(doc, dict):
        raise RecipeError(source, ["a recipe is a mapping with at least 'merge_method'"])
    return doc


def validate_recipe(doc: dict[str, Any], source: str) -> MergeRecipe:
    """Validate a recipe mapping (see `recipe_document`).

    Raises:
        RecipeError: unknown or missing keys, wrong types; every one of them.
    """
    try:
        return MergeRecipe.model_validate(doc)
    except ValidationError as e:
        raise RecipeError(source, [describe_error(err, MergeRecipe) for err in e.errors()]) from None


def split_model_reference(spec: str) -> tuple[str, str | None]:
    """A model reference as mergekit reads it: `MODEL`, or `MODEL+LORA` (the model with a PEFT
    LoRA adapter applied). mergekit splits at every `+`, so neither path may contain one; an
    existing folder whose name holds a `+` is still read as that folder (it always was here).

    Raises:
        ValueError: more than one `+`, or an empty side.
    """
    if "+" in spec and Path(spec).expanduser().exists():
        return spec, None
    parts = spec.split("+")
    if len(parts) == 1:
        return spec, None
    if len(parts) == 2 and all(p.strip() for p in parts):
        return parts[0], parts[1]
    raise ValueError(
        f"{spec!r}: a model reference is MODEL or MODEL+LORA_ADAPTER, with one '+' (mergekit's rule: paths cannot contain '+')"
    )
