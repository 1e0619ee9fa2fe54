"""A table of recipes in mergekit's published shapes, each checked tensor by tensor against
values computed here from the formulas.

The shapes are those of mergekit's examples and of model cards: per-layer weight lists,
`{filter, value}` lists (`self_attn`, `mlp`, `o_proj`), task_arithmetic with `normalize` and
`lambda`, ties / dare_ties with densities per model, the classic slerp `t` lists, `slices:`
(whole-model slerp sources and passthrough layer stacking), `dtype` with `out_dtype`,
`tokenizer_source: base` and `chat_template: chatml`.

The parameter rules are written out here, as mergekit 0.1.5 applies them (its
`config.evaluate_setting` is the reference):

- block `i` of `n` sits at `t = i / (n - 1)`; every tensor outside the blocks (embeddings,
  final norm, LM head) at `t = 0`;
- a list of numbers is interpolated: `s = t·(L − 1)`, `i0 = int(s)`, `i1 = min(L − 1, i0 + 1)`,
  value `(1 − f)·v[i0] + f·v[i1]` with `f = s − i0`;
- in a list of `{filter, value}` entries the first entry that matches wins, in order; a filter
  matches when it is a substring of the tensor name, and an entry without a filter matches
  every tensor.

The formulas run in float64 on the stored inputs; the outputs are float32 (or bfloat16) made
by a few float32 operations, so each float32 row allows a few float32 roundings (see `F32`).
Copies (passthrough, stacking) are compared exactly.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

from neuroloc_cli.synthetic import build_checkpoint, derive_finetune, tiny_config
from tests.conftest import SHARD_BYTES, write_recipe
from tests.helpers import load_all

# A float32 output of the linear methods is at most ~4 roundings of float32 (2^-24 relative
# each) away from the exact value, on values of magnitude ≤ ~4; rtol 2e-6 is ~32 ulp, atol
# 1e-7 covers values near zero, where a sum of terms of size ~0.1 leaves an absolute error
# of a few 1e-9. A wrong weight (0.01 apart) moves a fine-tune delta of ~0.01 by 1e-4.
F32 = {"rtol": 2e-6, "atol": 1e-7}

DEEP_LAYERS = 5  # per-layer lists need more than the zoo's 2 blocks to interpolate
_BLOCK = re.compile(r"(?:^|\.)(?:layers|h)\.(\d+)\.")


# -- the parameter rules, written out ----------------------------------------------------------


def block(name: str) -> int | None:
    m = _BLOCK.search(name)
    return int(m.group(1)) if m else None


def depth(name: str, n_layers: int) -> float:
    i = block(name)
    return 0.0 if i is None else i / (n_layers - 1)


def value_at(spec, name: str, n_layers: int) -> float:
    """A parameter's value at one tensor (mergekit 0.1.5's rules, above)."""
    if isinstance(spec, list) and spec and isinstance(spec[0], dict):
        for entry in spec:
            if entry.get("filter") is None or entry["filter"] in name:
                return value_at(entry["value"], name, n_layers)
        raise AssertionError(f"no entry for {name}")
    if isinstance(spec, list):
        s = depth(name, n_layers) * (len(spec) - 1)
        i0 = int(s)
        i1 = min(len(spec) - 1, i0 + 1)
        f = s - i0
        return (1 - f) * spec[i0] + f * spec[i1]
    return float(spec)


# -- the formulas, one tensor at a time ---------------------------------------------------------
# Each takes the inputs' tensors at one name (float64, keyed by role) and returns the expected
# output tensor. `n` is the depth of the models.


def linear(models: list[tuple[str, object]], normalize: bool = True):
    def f(x, name, n):
        ws = [value_at(spec, name, n) for _, spec in models]
        out = sum(w * x[role] for (role, _), w in zip(models, ws))
        return out / sum(ws) if normalize else out

    return f


def task_arithmetic(models: list[tuple[str, object]], lam=1.0, normalize: bool = False, base: str = "base"):
    def f(x, name, n):
        ws = [value_at(spec, name, n) for _, spec in models]
        mixed = sum(w * (x[role] - x[base]) for (role, _), w in zip(models, ws))
        if normalize:
            mixed = mixed / sum(ws)
        return x[base] + value_at(lam, name, n) * mixed

    return f


def ties(models: list[tuple[str, object, object]], lam=1.0, normalize: bool = True):
    """Trim each delta to its `int(density·n)` largest magnitudes, elect the sign of the
    weighted sum (≥ 0 is +), keep the agreeing weighted deltas, divide by the agreeing weights."""

    def f(x, name, n):
        wds, ws = [], []
        for role, w_spec, d_spec in models:
            w, density = value_at(w_spec, name, n), value_at(d_spec, name, n)
            delta = x[role] - x["base"]
            if density < 1:
                delta = delta * top_mask(x[role + "@f32"] - x["base@f32"], density)
            wds.append(w * delta)
            ws.append(w)
        plus = sum(wds) >= 0
        agree = [torch.where(plus, wd > 0, wd < 0).double() for wd in wds]
        mixed = sum(a * wd for a, wd in zip(agree, wds))
        if normalize:
            divisor = sum(a * w for a, w in zip(agree, ws))
            mixed = mixed / torch.where(divisor == 0, 1.0, divisor)
        return x["base"] + value_at(lam, name, n) * mixed

    return f


def top_mask(delta32: torch.Tensor, density: float) -> torch.Tensor:
    """1 at the `int(density·numel)` largest |δ| (δ taken in float32, as stored and as the
    merge takes it), else 0. The data must have no tie at the cut: asserted."""
    mag = delta32.abs().flatten()
    k = int(density * mag.numel())
    mask = torch.zeros(mag.numel(), dtype=torch.float64)
    if k:
        ranked = torch.sort(mag, descending=True)
        assert k == mag.numel() or ranked.values[k - 1] > ranked.values[k], "a tie at the cut: pick other data"
        mask[ranked.indices[:k]] = 1.0
    return mask.reshape(delta32.shape)


def slerp(t_spec, base: str = "base", other: str = "other"):
    """mergekit 0.1.5's slerp: the angle between the flattened, normalized tensors; |cos| >
    0.9995 is a plain lerp."""

    def f(x, name, n):
        t = value_at(t_spec, name, n)
        v0, v1 = x[base], x[other]
        n0, n1 = v0.norm(), v1.norm()
        dot = float((v0 / (n0 if n0 > 1e-8 else 1.0) * (v1 / (n1 if n1 > 1e-8 else 1.0))).sum())
        if abs(dot) > 0.9995:
            return (1 - t) * v0 + t * v1
        omega = math.acos(dot)
        return math.sin((1 - t) * omega) / math.sin(omega) * v0 + math.sin(t * omega) / math.sin(omega) * v1

    return f


def scaled(role: str, scale_spec):
    def f(x, name, n):
        return value_at(scale_spec, name, n) * x[role]

    return f


# -- the table ------------------------------------------------------------------------------------

CLASSIC_T = "[{filter: self_attn, value: [0, 0.5, 0.3, 0.7, 1]}, {filter: mlp, value: [1, 0.5, 0.7, 0.3, 0]}, {value: 0.5}]"
CLASSIC_T_PY = [
    {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
    {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
    {"value": 0.5},
]
CHATML_RENDERED = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@dataclass(frozen=True)
class Row:
    """A recipe (`{base}`, `{ft1}`, `{ft2}`, `{other}` stand for the family's folders), its
    formula, and how to compare.

    Attributes:
        family: "deep" (5-block float32 llama, built here) or a zoo architecture (float32,
            2 blocks; `llama_bf16` is the zoo's bfloat16 llama).
        stack: for layer stacking, the slices as (role, start, end); the formula is a copy.
        out_dtype: the dtype every output tensor must have.
        tol: assert_close tolerances; None: exact.
        vocab_from_tokenizer: token-indexed tensors (embeddings, head) have one row per token of
            the base's tokenizer, and config.json's `vocab_size` says so.
        extra: a check of the output folder beyond the tensors.
    """

    id: str
    family: str
    recipe: str
    formula: Callable | None = None
    stack: tuple[tuple[str, int, int], ...] = ()
    out_dtype: torch.dtype = torch.float32
    tol: dict | None = field(default_factory=lambda: F32)
    vocab_from_tokenizer: bool = False
    extra: Callable[[Path, dict[str, Path]], None] | None = None


def _tokenizer_from_base(out: Path, folders: dict[str, Path]) -> None:
    assert (out / "tokenizer.json").read_bytes() == (folders["base"] / "tokenizer.json").read_bytes()


def _chatml(out: Path, folders: dict[str, Path]) -> None:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    template = json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    rendered = env.from_string(template).render(messages=[{"role": "user", "content": "hi"}], add_generation_prompt=True)
    assert rendered == CHATML_RENDERED


def _layers(count: int):
    def check(out: Path, folders: dict[str, Path]) -> None:
        assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == count

    return check


ROWS = [
    # -- linear -------------------------------------------------------------------------------
    Row(
        "linear-scalar",
        "deep",
        """
merge_method: linear
models:
  - model: {ft1}
    parameters: {{weight: 0.3}}
  - model: {ft2}
    parameters: {{weight: 0.7}}
dtype: float32
""",
        linear([("ft1", 0.3), ("ft2", 0.7)]),
    ),
    Row(
        "linear-per-layer-lists",
        "deep",
        """
merge_method: linear
models:
  - model: {ft1}
    parameters:
      weight: [0, 0.25, 1]
  - model: {ft2}
    parameters:
      weight: [1, 0.5, 0.5, 0.1]
""",
        linear([("ft1", [0, 0.25, 1]), ("ft2", [1, 0.5, 0.5, 0.1])]),
    ),
    Row(
        "linear-filters-no-normalize",
        "deep",
        """
merge_method: linear
models:
  - model: {ft1}
    parameters:
      weight:
        - filter: self_attn
          value: [0.2, 0.8]
        - filter: mlp
          value: 0.9
        - value: 0.5
  - model: {ft2}
    parameters:
      weight: 0.5
parameters:
  normalize: false
""",
        linear(
            [("ft1", [{"filter": "self_attn", "value": [0.2, 0.8]}, {"filter": "mlp", "value": 0.9}, {"value": 0.5}]), ("ft2", 0.5)], False
        ),
    ),
    Row(
        "linear-three-models-with-base",
        "deep",
        """
merge_method: linear
models:
  - model: {base}
    parameters: {{weight: 1.0}}
  - model: {ft1}
    parameters: {{weight: 0.5}}
  - model: {ft2}
    parameters: {{weight: 0.5}}
""",
        linear([("base", 1.0), ("ft1", 0.5), ("ft2", 0.5)]),
    ),
    Row(
        "linear-top-level-weight-model-override",
        "deep",
        """
merge_method: linear
models:
  - model: {ft1}
    parameters:
      weight: [{{filter: o_proj, value: 2.0}}, {{filter: norm, value: 0.25}}]
  - model: {ft2}
parameters:
  weight: [0.5, 1.5]
""",
        # ft1: its filters where they match (o_proj, every norm), else the top-level list
        lambda x, name, n: linear([("ft1", 2.0 if "o_proj" in name else 0.25 if "norm" in name else [0.5, 1.5]), ("ft2", [0.5, 1.5])])(
            x, name, n
        ),
    ),
    Row(
        # mergekit 0.1.5 takes the entries in order: an entry without a filter matches every
        # tensor, so here every tensor takes 0.5 and the mlp entry after it is never reached
        "linear-default-entry-first",
        "deep",
        """
merge_method: linear
models:
  - model: {ft1}
    parameters:
      weight: [{{value: 0.5}}, {{filter: mlp, value: 1.5}}]
  - model: {ft2}
    parameters: {{weight: 0.5}}
parameters:
  normalize: false
""",
        linear([("ft1", [{"value": 0.5}, {"filter": "mlp", "value": 1.5}]), ("ft2", 0.5)], False),
    ),
    # -- task arithmetic ---------------------------------------------------------------------
    Row(
        "task-arithmetic-lambda",
        "deep",
        """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.7}}
  - model: {ft2}
    parameters: {{weight: 0.3}}
parameters:
  lambda: 0.5
dtype: float32
""",
        task_arithmetic([("ft1", 0.7), ("ft2", 0.3)], lam=0.5),
    ),
    Row(
        "task-arithmetic-normalize-per-layer",
        "deep",
        """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {base}
  - model: {ft1}
    parameters:
      weight: [1.0, 0.2]
  - model: {ft2}
    parameters:
      weight: [0.5, 0.6, 1.0]
parameters:
  normalize: true
  lambda: 1.2
""",
        task_arithmetic([("ft1", [1.0, 0.2]), ("ft2", [0.5, 0.6, 1.0])], lam=1.2, normalize=True),
    ),
    Row(
        "task-arithmetic-lambda-per-filter",
        "deep",
        """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters:
      weight: [{{filter: self_attn, value: [0, 1]}}, {{filter: mlp, value: [1, 0]}}, {{value: 0.5}}]
  - model: {ft2}
    parameters:
      weight: 0.25
parameters:
  lambda: [{{filter: embed, value: 0.0}}, {{value: [1.0, 2.0]}}]
""",
        task_arithmetic(
            [("ft1", [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": [1, 0]}, {"value": 0.5}]), ("ft2", 0.25)],
            lam=[{"filter": "embed", "value": 0.0}, {"value": [1.0, 2.0]}],
        ),
    ),
    Row(
        "task-arithmetic-qwen2-biases",
        "qwen2",
        """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters:
      weight: [{{filter: bias, value: 2.0}}, {{filter: self_attn, value: [0.1, 0.9]}}, {{value: 1.0}}]
  - model: {ft2}
    parameters: {{weight: -0.5}}
""",
        task_arithmetic(
            [("ft1", [{"filter": "bias", "value": 2.0}, {"filter": "self_attn", "value": [0.1, 0.9]}, {"value": 1.0}]), ("ft2", -0.5)]
        ),
    ),
    # -- ties / dare ------------------------------------------------------------------------------
    Row(
        "ties-density-1",
        "deep",
        """
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.6, density: 1.0}}
  - model: {ft2}
    parameters: {{weight: 0.4, density: 1.0}}
dtype: float32
""",
        ties([("ft1", 0.6, 1.0), ("ft2", 0.4, 1.0)]),
    ),
    Row(
        "ties-densities-per-model-and-filter",
        "deep",
        """
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters:
      weight: 0.5
      density: [{{filter: mlp, value: 0.3}}, {{value: 0.7}}]
  - model: {ft2}
    parameters:
      weight: [0.3, 1.0]
      density: 0.5
parameters:
  normalize: true
  int8_mask: true
""",
        ties([("ft1", 0.5, [{"filter": "mlp", "value": 0.3}, {"value": 0.7}]), ("ft2", [0.3, 1.0], 0.5)]),
    ),
    Row(
        "ties-mistral-no-normalize-lambda",
        "mistral",
        """
merge_method: ties
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: [{{filter: self_attn, value: 0.8}}, {{value: 0.4}}], density: 1}}
  - model: {ft2}
    parameters: {{weight: 0.6, density: 0.5}}
parameters: {{normalize: false, lambda: 1.5}}
""",
        ties([("ft1", [{"filter": "self_attn", "value": 0.8}, {"value": 0.4}], 1.0), ("ft2", 0.6, 0.5)], lam=1.5, normalize=False),
    ),
    Row(
        "dare-ties-density-1-filters",
        "deep",
        """
merge_method: dare_ties
base_model: {base}
models:
  - model: {ft1}
    parameters:
      weight: [{{filter: mlp, value: [0.2, 0.9]}}, {{value: 0.5}}]
      density: 1.0
  - model: {ft2}
    parameters:
      weight: 0.5
      density: 1.0
parameters:
  lambda: 0.8
random_seed: 3
""",
        # dare_ties: no normalize by default
        ties([("ft1", [{"filter": "mlp", "value": [0.2, 0.9]}, {"value": 0.5}], 1.0), ("ft2", 0.5, 1.0)], lam=0.8, normalize=False),
    ),
    Row(
        "dare-linear-density-1",
        "deep",
        """
merge_method: dare_linear
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.6, density: 1}}
  - model: {ft2}
    parameters: {{weight: [0.1, 0.4], density: 1}}
""",
        task_arithmetic([("ft1", 0.6), ("ft2", [0.1, 0.4])]),
    ),
    # -- slerp ------------------------------------------------------------------------------------
    Row(
        "slerp-classic-t-filters",
        "deep",
        f"""
merge_method: slerp
base_model: {{base}}
models:
  - model: {{base}}
  - model: {{other}}
parameters:
  t: {CLASSIC_T.replace("{", "{{").replace("}", "}}")}
dtype: float32
""",
        slerp(CLASSIC_T_PY),
        # the spherical weights come from acos/sin of a dot product of ~20k terms, taken in
        # float32 pieces: cos Ω is good to ~1e-6, which moves s0, s1 by ~1e-6 / sin Ω
        tol={"rtol": 2e-5, "atol": 2e-6},
    ),
    Row(
        "slerp-slices-whole-models",
        "deep",
        f"""
slices:
  - sources:
      - model: {{base}}
        layer_range: [0, {DEEP_LAYERS}]
      - model: {{other}}
        layer_range: [0, {DEEP_LAYERS}]
merge_method: slerp
base_model: {{base}}
parameters:
  t:
    - filter: self_attn
      value: [0, 0.5, 0.3, 0.7, 1]
    - filter: mlp
      value: [1, 0.5, 0.7, 0.3, 0]
    - value: 0.5
dtype: float32
""",
        slerp(CLASSIC_T_PY),
        tol={"rtol": 2e-5, "atol": 2e-6},
    ),
    Row(
        "slerp-near-colinear-is-lerp",
        "deep",
        """
merge_method: slerp
base_model: {base}
models:
  - model: {base}
  - model: {ft1}
    parameters: {{weight: 0.5}}
parameters:
  t: [0.1, 0.9]
""",
        slerp([0.1, 0.9], other="ft1"),
        tol={"rtol": 2e-5, "atol": 2e-6},
    ),
    Row(
        "slerp-gpt2-filters",
        "gpt2",
        """
merge_method: slerp
base_model: {base}
models:
  - model: {ft1}
parameters:
  t: [{{filter: attn, value: [0.2, 0.6]}}, {{filter: mlp, value: 0.9}}, {{value: 0.4}}]
""",
        slerp([{"filter": "attn", "value": [0.2, 0.6]}, {"filter": "mlp", "value": 0.9}, {"value": 0.4}], other="ft1"),
        tol={"rtol": 2e-5, "atol": 2e-6},
    ),
    # -- passthrough ----------------------------------------------------------------------------
    Row(
        "passthrough-scale-filter",
        "deep",
        """
merge_method: passthrough
models:
  - model: {ft1}
    parameters:
      scale: [{{filter: o_proj, value: 0.5}}, {{filter: down_proj, value: 0.25}}, {{value: 1.0}}]
""",
        # scales by powers of two: exact
        scaled("ft1", [{"filter": "o_proj", "value": 0.5}, {"filter": "down_proj", "value": 0.25}, {"value": 1.0}]),
        tol=None,
    ),
    Row(
        "passthrough-slices-stack",
        "deep",
        """
slices:
  - sources:
      - model: {ft1}
        layer_range: [0, 3]
  - sources:
      - model: {ft2}
        layer_range: [2, 5]
merge_method: passthrough
dtype: float32
""",
        stack=(("ft1", 0, 3), ("ft2", 2, 5)),
        tol=None,
        extra=_layers(6),
    ),
    Row(
        "passthrough-slices-frankenmerge",
        "deep",
        """
slices:
  - sources:
      - model: {base}
        layer_range: [0, 2]
  - sources:
      - model: {ft1}
        layer_range: [1, 3]
  - sources:
      - model: {base}
        layer_range: [2, 5]
merge_method: passthrough
""",
        stack=(("base", 0, 2), ("ft1", 1, 3), ("base", 2, 5)),
        tol=None,
        extra=_layers(7),
    ),
    # -- dtypes -----------------------------------------------------------------------------------
    Row(
        "dtype-bfloat16-out-float32",
        "deep",
        """
merge_method: linear
models:
  - model: {ft1}
    parameters: {{weight: 0.3}}
  - model: {ft2}
    parameters: {{weight: 0.7}}
dtype: bfloat16
out_dtype: float32
""",
        lambda x, name, n: (0.3 * x["ft1@bf16"] + 0.7 * x["ft2@bf16"]) / 1.0,
        # arithmetic in bfloat16, each op rounded to 8 significant bits (2^-9 relative): the
        # weights, two products, a sum and a division, ~5·2^-9 ≈ 0.01; the terms share a sign
        # (two fine-tunes of one base) except near zero, where noise of ~0.01 on values of
        # ~0.02 can flip one: there the error is a few roundings of terms |w·θ| ≲ 0.05, i.e.
        # ≲ 1e-4 absolute. A float32 merge would pass too, so the test also asserts every
        # output value is a bfloat16 value.
        tol={"rtol": 1e-2, "atol": 1e-4},
    ),
    Row(
        "dtype-float32-out-bfloat16",
        "deep",
        """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 0.5}}
  - model: {ft2}
    parameters: {{weight: [0.5, 1.0]}}
dtype: float32
out_dtype: bfloat16
""",
        task_arithmetic([("ft1", 0.5), ("ft2", [0.5, 1.0])]),
        out_dtype=torch.bfloat16,
        # float32 arithmetic rounded once to bfloat16: at most one bfloat16 step (2^-8
        # relative) from the exact value rounded (double rounding)
        tol={"rtol": 2**-8, "atol": 1e-6},
    ),
    Row(
        "bfloat16-inputs-float32-arithmetic",
        "llama_bf16",
        """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: [{{filter: mlp, value: 0.9}}, {{value: 0.3}}]}}
  - model: {ft2}
    parameters: {{weight: 0.5}}
dtype: float32
out_dtype: float32
""",
        task_arithmetic([("ft1", [{"filter": "mlp", "value": 0.9}, {"value": 0.3}]), ("ft2", 0.5)]),
    ),
    # -- tokenizer and chat template ------------------------------------------------------------
    Row(
        "tokenizer-source-base",
        "llama",
        """
merge_method: linear
base_model: {base}
models:
  - model: {base}
    parameters: {{weight: 0.5}}
  - model: {ft1}
    parameters: {{weight: 0.5}}
tokenizer_source: base
dtype: float32
""",
        # one vocabulary for all: the embedding and head rows are merged as any tensor, and
        # cut to the tokenizer's size (mergekit 0.1.5 does the same: 400 of the zoo's 512 rows)
        linear([("base", 0.5), ("ft1", 0.5)]),
        vocab_from_tokenizer=True,
        extra=_tokenizer_from_base,
    ),
    Row(
        "chat-template-chatml",
        "llama",
        """
merge_method: task_arithmetic
base_model: {base}
models:
  - model: {ft1}
    parameters: {{weight: 1.0}}
  - model: {ft2}
    parameters: {{weight: 1.0}}
parameters: {{normalize: true}}
chat_template: chatml
""",
        task_arithmetic([("ft1", 1.0), ("ft2", 1.0)], normalize=True),
        extra=_chatml,
    ),
]


# -- running a row ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def families(zoo, tmp_path_factory) -> dict[str, tuple[dict[str, Path], int]]:
    """Each family's folders by role, and its depth, built on first use."""
    built: dict[str, tuple[dict[str, Path], int]] = {}

    def get(key: str):
        if key not in built:
            if key == "deep":
                root = tmp_path_factory.mktemp("deep")
                base = build_checkpoint(
                    tiny_config("llama", layers=DEEP_LAYERS, hidden=32, vocab=256), root / "base", seed=0, max_shard_bytes=SHARD_BYTES
                )
                # an independent model of the same shape: far from the base, so slerp's
                # spherical branch runs (norm weights, all near 1, still take the lerp branch)
                other = build_checkpoint(
                    tiny_config("llama", layers=DEEP_LAYERS, hidden=32, vocab=256), root / "other", seed=5, max_shard_bytes=SHARD_BYTES
                )
                ft1 = derive_finetune(base, root / "ft1", seed=1, max_shard_bytes=SHARD_BYTES)
                ft2 = derive_finetune(base, root / "ft2", seed=2, max_shard_bytes=SHARD_BYTES)
                built[key] = ({"base": base, "ft1": ft1, "ft2": ft2, "other": other}, DEEP_LAYERS)
            else:
                arch, dtype = ("llama", torch.bfloat16) if key == "llama_bf16" else (key, torch.float32)
                fam = zoo.get(arch, dtype=dtype, tie=False if arch == "llama" else None)
                built[key] = ({"base": fam.base, "ft1": fam.ft1, "ft2": fam.ft2}, 2)
        return built[key]

    return get


def _inputs(folders: dict[str, Path]) -> dict[str, dict[str, torch.Tensor]]:
    """Every tensor of every role: float64, and as stored (`role@f32`) and rounded to bfloat16
    (`role@bf16`, as float64)."""
    tensors = {role: load_all(path) for role, path in folders.items()}
    out = {}
    for role, ts in tensors.items():
        out[role] = {k: v.double() for k, v in ts.items()}
        out[role + "@f32"] = {k: v.float() for k, v in ts.items()}
        out[role + "@bf16"] = {k: v.to(torch.bfloat16).double() for k, v in ts.items()}
    return out


def _stacked(inputs, stack, n_layers: int) -> dict[str, torch.Tensor]:
    """Layer stacking: the slices' layers renumbered in order; embeddings from the first
    slice's model, the final norm and head from the last slice's."""
    first, last = stack[0][0], stack[-1][0]
    out = {}
    for name in inputs[first]:
        if block(name) is None:
            out[name] = inputs[first if "embed" in name else last][name]
    j = 0
    for role, start, end in stack:
        for i in range(start, end):
            for name, t in inputs[role].items():
                if block(name) == i:
                    out[name.replace(f"layers.{i}.", f"layers.{j}.", 1)] = t
            j += 1
    return out


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_recipe_row(row: Row, families, cli, tmp_path):
    folders, n_layers = families(row.family)
    recipe = write_recipe(tmp_path, row.recipe.format(**{k: str(v) for k, v in folders.items()}))
    r = cli("merge", recipe, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    merged = load_all(tmp_path / "out")
    inputs = _inputs(folders)
    if row.stack:
        expected = _stacked(inputs, row.stack, n_layers)
    else:
        names = inputs["base"].keys()
        expected = {name: row.formula({role: ts[name] for role, ts in inputs.items()}, name, n_layers) for name in names}
    if row.vocab_from_tokenizer:
        tokenizer = json.loads((folders["base"] / "tokenizer.json").read_text())
        size = 1 + max([*tokenizer["model"]["vocab"].values(), *(t["id"] for t in tokenizer["added_tokens"])])
        expected = {k: v[:size] if k in ("model.embed_tokens.weight", "lm_head.weight") else v for k, v in expected.items()}
        assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == size
    assert merged.keys() == expected.keys()
    for name, want in expected.items():
        got = merged[name]
        assert got.dtype == row.out_dtype, name
        if row.tol is None:
            assert torch.equal(got.double(), want), name
        else:
            torch.testing.assert_close(got.double(), want.double(), **row.tol, msg=lambda m, name=name: f"{name}: {m}")
        if "\ndtype: bfloat16" in row.recipe:
            assert torch.equal(got.to(torch.bfloat16).to(got.dtype), got), f"{name}: not computed in bfloat16"
    if row.extra:
        row.extra(tmp_path / "out", folders)
