"""mergekit recipe shapes that came last: the `exaone` chat template, a slice's own
`base_model:`, and `tokenizer_source` with `slices:`. Every merged tensor is checked against
the formula computed here, in float64, from the inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from neuroloc_cli.arch import layer_index
from neuroloc_cli.synthetic import build_checkpoint, derive_finetune, tiny_config, write_tokenizer
from tests.conftest import write_recipe
from tests.helpers import load_all, read_inputs_whole, record_reads

# -- the exaone chat template -------------------------------------------------------------------


def _render(template: str, messages, add_generation_prompt: bool = False) -> str:
    """Render as transformers' `apply_chat_template` does (sandboxed, `trim_blocks`, `lstrip_blocks`)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize(
    ("messages", "prompt", "rendered"),
    [
        # EXAONE 3.x: [|system|]...[|endofturn|]\n, [|user|]...\n, [|assistant|]...[|endofturn|]\n
        (
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "Hi there"},
                {"role": "assistant", "content": "Hello!"},
                {"role": "user", "content": "Again"},
            ],
            True,
            "[|system|]Be brief.[|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello![|endofturn|]\n[|user|]Again\n[|assistant|]",
        ),
        # no system message: the released template opens with an empty system turn
        (
            [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}],
            False,
            "[|system|][|endofturn|]\n[|user|]Hi there\n[|assistant|]Hello![|endofturn|]\n",
        ),
    ],
)
def test_exaone_renders_the_documented_format(messages, prompt, rendered):
    from neuroloc_cli.io.chat_templates import resolve_chat_template

    assert _render(resolve_chat_template("exaone"), messages, prompt) == rendered


def test_exaone_is_written_by_a_merge(zoo, cli, tmp_path):
    from neuroloc_cli.io.chat_templates import CHAT_TEMPLATES

    fam = zoo.get("llama")
    text = f"merge_method: linear\nmodels:\n  - model: {fam.base}\n    parameters: {{weight: 1.0}}\nchat_template: exaone\n"
    r = cli("merge", write_recipe(tmp_path, text), "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATES["exaone"]


def test_unknown_chat_template_lists_exaone(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    text = f"merge_method: linear\nmodels:\n  - model: {fam.base}\n    parameters: {{weight: 1.0}}\nchat_template: vicuna\n"
    r = cli("recipe", "validate", write_recipe(tmp_path, text))
    assert r.exit_code == 2
    assert "unknown chat template 'vicuna'; give one of: chatml, alpaca, llama3, mistral, exaone, auto" in r.stderr


# -- a slice's own base_model -------------------------------------------------------------------


@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Three 4-layer float32 llama checkpoints: A, and fine-tunes B and C of it."""
    root = tmp_path_factory.mktemp("three")
    a = build_checkpoint(tiny_config("llama", layers=4), root / "A", seed=0, dtype=torch.float32)
    return a, derive_finetune(a, root / "B", seed=1, scale=0.5), derive_finetune(a, root / "C", seed=2, scale=0.5)


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in load_all(path).items()}


def _renamed(name: str, layer: int) -> str:
    return re.sub(r"\.layers\.\d+\.", f".layers.{layer}.", name)


def _merge(cli, tmp_path: Path, text: str) -> tuple[Path, dict[str, torch.Tensor]]:
    out = tmp_path / "out"
    r = cli("merge", write_recipe(tmp_path, text), "-o", out)
    assert r.exit_code == 0, r.stderr
    return out, _tensors(out)


SLICE_BASES = """
merge_method: task_arithmetic
base_model: {a}
slices:
  - sources:
      - {{model: {a}, layer_range: [0, 2]}}
      - {{model: {b}, layer_range: [0, 2], parameters: {{weight: 0.6}}}}
  - base_model: {b}
    sources:
      - {{model: {c}, layer_range: [2, 4], parameters: {{weight: 0.8}}}}
      - {{model: {b}, layer_range: [2, 4]}}
out_dtype: float32
"""


def test_task_arithmetic_per_slice_uses_that_slices_base(three, cli, tmp_path):
    """Slice 0 adds 0.6·(B − A) to A; slice 1 names B its base: B + 0.8·(C − B). The embeddings
    follow the first slice (base A), the final norm and head the last (base B)."""
    a, b, c = three
    out, merged = _merge(cli, tmp_path, SLICE_BASES.format(a=a, b=b, c=c))
    m = {"A": _tensors(a), "B": _tensors(b), "C": _tensors(c)}

    def ta(base, other, w, name):
        return m[base][name] + w * (m[other][name] - m[base][name])

    expected = {}
    for name in m["A"]:
        layer = layer_index(name)
        if layer is None:
            expected[name] = ta("A", "B", 0.6, name) if "embed" in name else ta("B", "C", 0.8, name)
        elif layer < 2:
            expected[name] = ta("A", "B", 0.6, name)
        else:
            expected[name] = ta("B", "C", 0.8, name)
    assert set(merged) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(merged[name], value, rtol=1e-5, atol=1e-6, msg=name)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4


def test_a_single_whole_model_slice_takes_its_base_model(three, cli, tmp_path):
    a, b, _ = three
    text = f"""
merge_method: task_arithmetic
slices:
  - base_model: {b}
    sources:
      - {{model: {a}, layer_range: [0, 4], parameters: {{weight: 0.5}}}}
      - {{model: {b}, layer_range: [0, 4]}}
out_dtype: float32
"""
    _, merged = _merge(cli, tmp_path, text)
    ma, mb = _tensors(a), _tensors(b)
    for name in ma:
        torch.testing.assert_close(merged[name], mb[name] + 0.5 * (ma[name] - mb[name]), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (  # the slice's base must be one of its sources
            SLICE_BASES.replace("  - base_model: {b}\n", "  - base_model: {a}\n"),
            "slices[1].sources: task_arithmetic needs the base model {a} among every slice's sources",
        ),
        (  # no top-level base, and the first slice names none
            SLICE_BASES.replace("base_model: {a}\nslices:", "slices:"),
            "slices[0].base_model: task_arithmetic needs a base model; give one here or a top-level base_model",
        ),
        (
            "merge_method: passthrough\nslices:\n  - base_model: {a}\n    sources: [{{model: {a}, layer_range: [0, 2]}}]\n",
            "slices[0].base_model: layer stacking takes no base model",
        ),
    ],
)
def test_bad_slice_base_model_names_the_key(three, cli, tmp_path, text, message):
    a, b, c = three
    r = cli("recipe", "validate", write_recipe(tmp_path, text.format(a=a, b=b, c=c)))
    assert r.exit_code != 0
    assert message.format(a=a) in r.stderr, r.stderr


# -- tokenizer_source with slices ---------------------------------------------------------------

EXTRA = ["<tool>", "<lang_xx>"]


@pytest.fixture(scope="module")
def differing(tmp_path_factory):
    """Two 4-layer models whose vocabularies differ: Y has two added tokens (and rows for them)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("vocab-slices")
    write_tokenizer(root / "probe", 512)
    n = len(AutoTokenizer.from_pretrained(root / "probe"))
    x = build_checkpoint(tiny_config("llama", layers=4, vocab=n), root / "X", seed=0, dtype=torch.float32)
    y = build_checkpoint(tiny_config("llama", layers=4, vocab=n + 2), root / "Y", seed=1, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(y)
    tok.add_tokens(EXTRA)
    tok.save_pretrained(y)
    return x, y


def _vocab(folder: Path) -> dict[str, int]:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder).get_vocab()


SLICED_UNION = """
merge_method: linear
slices:
  - sources:
      - {{model: {x}, layer_range: [0, 2], parameters: {{weight: 0.3}}}}
      - {{model: {y}, layer_range: [0, 2], parameters: {{weight: 0.7}}}}
  - sources:
      - {{model: {x}, layer_range: [2, 4], parameters: {{weight: 0.9}}}}
      - {{model: {y}, layer_range: [2, 4], parameters: {{weight: 0.1}}}}
dtype: float32
tokenizer_source: union
"""


def test_union_vocabulary_over_slices(differing, cli, tmp_path):
    """The embeddings (first slice's weights) and the head (last slice's) have one row per
    token of the union; a token X lacks takes Y's row in X's place (mergekit's default)."""
    x, y = differing
    out, merged = _merge(cli, tmp_path, SLICED_UNION.format(x=x, y=y))
    vx, vy, vout = _vocab(x), _vocab(y), _vocab(out)
    assert vout == {**vx, **{t: len(vx) + i for i, t in enumerate(EXTRA)}}
    tx, ty = _tensors(x), _tensors(y)
    for name in tx:
        layer = layer_index(name)
        w = (0.3, 0.7) if (layer is None and "embed" in name) or (layer is not None and layer < 2) else (0.9, 0.1)
        if name.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert merged[name].shape == (len(vout), tx[name].shape[1])
            for token, i in vout.items():
                ry = ty[name][vy[token]]
                rx = tx[name][vx[token]] if token in vx else ry
                torch.testing.assert_close(merged[name][i], w[0] * rx + w[1] * ry, rtol=1e-5, atol=1e-6, msg=f"{name} {token}")
        else:
            torch.testing.assert_close(merged[name], w[0] * tx[name] + w[1] * ty[name], rtol=1e-5, atol=1e-6, msg=name)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(vout)


def test_tokenizer_block_over_slices(differing, cli, tmp_path):
    """The `tokenizer:` block slice by slice: `<tool>`, which X lacks, is zero in X's place and
    Y's own row in Y's, so the merged row is 0.7·Y's row in the embeddings (first slice) and
    0.1·Y's row in the head (last slice)."""
    x, y = differing
    text = SLICED_UNION.format(x=x, y=y).replace(
        "tokenizer_source: union\n", "tokenizer:\n  source: union\n  tokens:\n    <tool>: {source: {kind: zero}}\n"
    )
    out, merged = _merge(cli, tmp_path, text)
    vy, vout, ty = _vocab(y), _vocab(out), _tensors(y)
    row = vout["<tool>"]
    torch.testing.assert_close(merged["model.embed_tokens.weight"][row], 0.7 * ty["model.embed_tokens.weight"][vy["<tool>"]])
    torch.testing.assert_close(merged["lm_head.weight"][row], 0.1 * ty["lm_head.weight"][vy["<tool>"]])


def test_sliced_vocabulary_needs_the_same_models_in_the_same_places(differing, cli, tmp_path):
    x, y = differing
    swapped = SLICED_UNION.replace(
        "      - {{model: {x}, layer_range: [2, 4], parameters: {{weight: 0.9}}}}\n"
        "      - {{model: {y}, layer_range: [2, 4], parameters: {{weight: 0.1}}}}\n",
        "      - {{model: {y}, layer_range: [2, 4], parameters: {{weight: 0.1}}}}\n"
        "      - {{model: {x}, layer_range: [2, 4], parameters: {{weight: 0.9}}}}\n",
    )
    r = cli("recipe", "validate", write_recipe(tmp_path, swapped.format(x=x, y=y)))
    assert r.exit_code != 0
    assert f"tokenizer_source: slices[1].sources[0] ({y}) stands where slices[0].sources[0] ({x}) does" in r.stderr, r.stderr


def test_layer_stacking_refuses_tokenizer_source(differing, cli, tmp_path):
    x, _ = differing
    text = f"merge_method: passthrough\nslices:\n  - sources: [{{model: {x}, layer_range: [0, 2]}}]\ntokenizer_source: base\n"
    r = cli("recipe", "validate", write_recipe(tmp_path, text))
    assert r.exit_code != 0
    assert "tokenizer_source: not supported with layer stacking (passthrough over slices)" in r.stderr, r.stderr


# -- the whole-tensor methods, piece by piece ---------------------------------------------------

PIECEWISE = [
    ("sce", True, 2, {"select_topk": 0.3}, None),
    ("sce", True, 3, {"select_topk": 0.5}, None),
    ("ramplus_tl", True, 3, {"r": 0.5, "alpha": 0.9}, None),
    ("nuslerp", True, 2, {}, [0.6, 0.4]),
    ("nuslerp", False, 2, {}, [0.3, 0.7]),
    ("multislerp", True, 2, {}, [0.6, 0.4]),
    ("multislerp", False, 3, {"normalize_weights": False}, [0.2, 0.3, 0.5]),
    ("karcher", True, 2, {}, None),
    ("arcee_fusion", True, 1, {}, None),
]


def _run(name, base, tensors, whole, weights):
    from neuroloc_cli.methods import METHODS

    m = METHODS.get(name)
    w = {p.name: p.default for p in m.params if not p.per_model} | whole
    pm = [{p.name: p.default for p in m.params if p.per_model} | ({"weight": weights[i]} if weights else {}) for i in range(len(tensors))]
    return m(base, tensors, w, pm)


@pytest.mark.parametrize(("name", "with_base", "n", "whole", "weights"), PIECEWISE)
def test_methods_give_the_same_bits_in_any_number_of_pieces(monkeypatch, name, with_base, n, whole, weights):
    """sce, ramplus_tl, arcee_fusion and the spherical methods work through a tensor a piece at
    a time (`ops.sums.pieces`); pieces of 16384 elements (16 rows for arcee_fusion) give the
    bytes of one piece, and the inputs are left as they were."""
    import neuroloc_cli.ops.sums as sums

    g = torch.Generator().manual_seed(3)
    base = torch.randn(50, 1000, generator=g)
    tensors = [base + 0.05 * torch.randn(50, 1000, generator=g) for _ in range(n)]
    tensors[0].view(-1)[::7] = base.view(-1)[::7]  # unchanged elements (ram) and ties (sce)
    before = [base.clone()] + [t.clone() for t in tensors]
    whole_tensor = _run(name, base if with_base else None, tensors, whole, weights)
    monkeypatch.setattr(sums, "PIECE", 4 * sums.BLOCK)
    in_pieces = _run(name, base if with_base else None, tensors, whole, weights)
    assert torch.equal(whole_tensor, in_pieces)
    assert all(torch.equal(x, y) for x, y in zip(before, [base] + tensors))


def test_sce_variance_is_torchs_to_the_bit():
    from neuroloc_cli.methods.sce import _variance

    g = torch.Generator().manual_seed(4)
    for dtype in (torch.float32, torch.float64):
        a, b = (torch.randn(300_000, generator=g, dtype=dtype) * 10.0 ** torch.randint(-3, 3, (300_000,), generator=g) for _ in range(2))
        a[::5] = b[::5]
        expected = torch.var(torch.stack([a, b]), dim=0, unbiased=False)
        assert torch.equal(_variance([a, b]), expected)


@pytest.mark.parametrize("masked", [False, True], ids=["all", "selected"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sce_loops_give_the_floats_of_the_pytorch_formulation(monkeypatch, dtype, masked):
    """`ops.kernels.sce_variance2`, `sce_squares` and `sce_mix` against `_variance`,
    `dot_blocks` and `_mix`, bit for bit, the variance's counts against PyTorch's, and the
    model energies against `fixed_dot`: zero task vectors, sums that cancel exactly, a NaN and
    an infinity included."""
    import numpy as np

    from neuroloc_cli.methods.sce import WEIGHT_EPS, _energies, _mix, _variance
    from neuroloc_cli.ops import kernels, sums
    from neuroloc_cli.ops.sums import dot_blocks, product_blocks

    g = torch.Generator().manual_seed(6)
    n = 50_000
    base = torch.randn(n, generator=g, dtype=dtype)
    tuned = [base + 0.01 * torch.randn(n, generator=g, dtype=dtype) for _ in range(3)]
    tuned[0][::5] = base[::5]  # unchanged
    tuned[1][::7] = 2 * base[::7] - tuned[2][::7]  # δ_1 = −δ_2
    tuned[1][::13] = tuned[0][::13]  # δ_0 = δ_1: no variance
    tuned[2][3], tuned[1][11] = float("nan"), float("inf")
    tuned[0][17] = float("nan")  # a NaN variance
    keep = torch.rand(n, generator=g) < 0.6
    dt = np.float32 if dtype == torch.float32 else np.float64
    var = torch.empty(n, dtype=dtype)
    counts = kernels.sce_variance2(base.numpy(), tuned[0].numpy(), tuned[1].numpy(), var.numpy())
    expected = _variance([tuned[0] - base, tuned[1] - base])
    torch.testing.assert_close(var, expected, rtol=0, atol=0, equal_nan=True)
    assert counts == (int(torch.count_nonzero(expected)), int(expected.isnan().sum()))
    assert counts[1] > 0 and counts[0] < n  # both counts are exercised
    weights = [0.2, 0.5, 0.3]
    deltas = [(t - base) * keep if masked else t - base for t in tuned]
    mask = keep.numpy() if masked else np.empty(0, np.bool_)
    squares = torch.empty(n, dtype=torch.float64)
    for t, d in zip(tuned, deltas):
        kernels.sce_squares(base.numpy(), t.numpy(), mask, masked, squares.numpy())
        blocks = torch.tensor([product_blocks(squares), dot_blocks(d, d)], dtype=torch.float64)
        torch.testing.assert_close(blocks[0], blocks[1], rtol=0, atol=0, equal_nan=True)
    monkeypatch.setattr(sums, "PIECE", 4 * sums.BLOCK)  # several pieces, the last one shorter
    energies = _energies(base, tuned, keep if masked else None, lambda c: [d[c] for d in deltas])
    expected = [sums.fixed_dot(d, d) for d in deltas]
    torch.testing.assert_close(
        torch.tensor(energies, dtype=torch.float64), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=0, equal_nan=True
    )
    out = torch.empty(n, dtype=dtype)
    kernels.sce_mix(base.numpy(), torch.stack(tuned).numpy(), mask, masked, np.array(weights, dt), dt(WEIGHT_EPS), out.numpy())
    torch.testing.assert_close(out, _mix(base, deltas, weights), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("eps", [1e-5, 0.1])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ramplus_loops_give_the_floats_of_the_pytorch_formulation(dtype, eps):
    """`ops.kernels.ram_counts` and `ram_mix` against `_ramplus_counts` and `_ramplus_mix`, bit
    for bit: changes at exactly ε (0.1 rounds up in float32, so ε is compared in the tensor's
    dtype, as PyTorch compares), unchanged and shared elements, a NaN and an infinity."""
    import numpy as np

    from neuroloc_cli.methods.ram import _ramplus_counts, _ramplus_mix
    from neuroloc_cli.ops import kernels

    g = torch.Generator().manual_seed(7)
    n = 40_000
    base = torch.randn(n, generator=g, dtype=dtype)
    tuned = [base + eps * torch.randn(n, generator=g, dtype=dtype) * 3 for _ in range(3)]
    tuned[0][::5] = base[::5]
    tuned[1][::9] = base[::9] + torch.tensor(eps, dtype=dtype)  # |δ| at ε itself, in the dtype
    tuned[2][4], tuned[1][13] = float("nan"), float("inf")
    dt = np.float32 if dtype == torch.float32 else np.float64
    shared, unique = np.zeros(3, np.int64), np.zeros(3, np.int64)
    kernels.ram_counts(base.numpy(), torch.stack(tuned).numpy(), dt(eps), shared, unique)
    assert (shared.tolist(), unique.tolist()) == _ramplus_counts(base, tuned, eps)
    scales = [1.05, 1.2, 1.0]
    out = torch.empty(n, dtype=dtype)
    kernels.ram_mix(base.numpy(), torch.stack(tuned).numpy(), dt(eps), np.array(scales, dt), out.numpy())
    torch.testing.assert_close(out, _ramplus_mix(base, tuned, eps, scales), rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("share", [0.01, 0.3, 0.97])
def test_sce_selection_equals_a_stable_sort(share):
    """The k-th value selection keeps what a stable descending sort of the variances keeps,
    ties (many, on a coarse grid) in position order; 200,000 elements take the bracketed path."""
    from neuroloc_cli.methods.sce import select_mask, selected_count

    g = torch.Generator().manual_seed(5)
    base = torch.zeros(200_000)
    tensors = [(torch.randn(200_000, generator=g) * 4).round() / 4 for _ in range(2)]
    var = torch.var(torch.stack(tensors), dim=0, unbiased=False).double()
    k = selected_count(int(torch.count_nonzero(var)), share)
    expected = torch.zeros(200_000, dtype=torch.bool)
    expected[torch.sort(var, descending=True, stable=True).indices[:k]] = True
    got = select_mask(base, tensors, share)
    assert int(got.sum()) == k and torch.equal(got, expected)


# -- the whole-tensor methods in a merge: inputs read piece by piece from the checkpoints ------

IN_PIECES = {
    "sce": "base_model: {base}\nmodels: [{{model: {ft1}}}, {{model: {ft2}}}]\nparameters: {{select_topk: 0.4}}\n",
    "ramplus_tl": "base_model: {base}\nmodels: [{{model: {ft1}}}, {{model: {ft2}}}]\n",
    "nuslerp": "base_model: {base}\nmodels: [{{model: {ft1}, parameters: {{weight: 0.3}}}}, {{model: {ft2}, parameters: {{weight: 0.7}}}}]\n",
    "multislerp": "base_model: {base}\nmodels: [{{model: {ft1}, parameters: {{weight: 0.6}}}}, {{model: {ft2}, parameters: {{weight: 0.4}}}}]\n",
    "karcher": "base_model: {base}\nmodels: [{{model: {ft1}}}, {{model: {ft2}}}]\n",
    "arcee_fusion": "base_model: {base}\nmodels: [{{model: {ft1}}}]\n",
}


@pytest.fixture(scope="module")
def odd_rows(tmp_path_factory):
    """A bf16 Llama whose rows (48 and 96 elements) do not divide the pieces of these tests."""
    root = tmp_path_factory.mktemp("odd")
    base = build_checkpoint(tiny_config("llama", hidden=48, vocab=300), root / "base", dtype=torch.bfloat16, tokenizer=False)
    return base, derive_finetune(base, root / "ft1", seed=1), derive_finetune(base, root / "ft2", seed=2)


@pytest.mark.parametrize(
    ("name", "dtypes"),
    [(m, "dtype: float32\nout_dtype: bfloat16\n") for m in IN_PIECES] + [("karcher", "dtype: bfloat16\naccumulate: float32\n")],
)
def test_inputs_read_in_pieces_give_the_bytes_of_whole_inputs(odd_rows, cli, tmp_path, monkeypatch, name, dtypes):
    """The engine hands these methods inputs that read the rows holding each piece; the merge
    equals one whose inputs are read whole, and no merged tensor is ever read whole."""
    from neuroloc_cli.ops import sums

    base, ft1, ft2 = odd_rows
    monkeypatch.setattr(sums, "PIECE", 2 * sums.BLOCK)  # 8192 elements: pieces end mid-row
    recipe = write_recipe(tmp_path, f"merge_method: {name}\n" + IN_PIECES[name].format(base=base, ft1=ft1, ft2=ft2) + dtypes)
    reads = record_reads(monkeypatch)
    r = cli("merge", recipe, "-o", tmp_path / "pieces")
    assert r.exit_code == 0, r.stderr
    merged = {t for t, rows in reads if rows is not None}
    assert "model.embed_tokens.weight" in merged and not merged & {t for t, rows in reads if rows is None}
    read_inputs_whole(monkeypatch)
    r = cli("merge", recipe, "-o", tmp_path / "whole")
    assert r.exit_code == 0, r.stderr
    a, b = load_all(tmp_path / "pieces"), load_all(tmp_path / "whole")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], load_all(base)[k]) for k in a)  # the merge did something
