"""The `maet` method (Eq. 2–5) and `mask:` in merges, against computations written here."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch

from neuroloc_cli.masks import Mask, MaskEntry
from neuroloc_cli.synthetic import derive_finetune
from tests.conftest import write_recipe
from tests.helpers import load_all

PARAMS = dict(alpha=0.8, beta=0.2, gamma=0.2, eta=1.0)


@pytest.fixture(scope="module")
def langs(zoo, tmp_path_factory):
    """Two more fine-tunes per architecture, so the four MAET inputs all differ."""
    out = {}
    for arch in ("llama", "gpt2"):
        fam = zoo.get(arch)
        root = tmp_path_factory.mktemp(f"langs-{arch}")
        out[arch] = [derive_finetune(fam.base, root / f"l{s}", seed=s, max_shard_bytes=60_000) for s in (3, 4)]
    return out


def _maet_recipe(base, ability, language, langs, weights, *, k2, extra=""):
    lines = "\n".join(f"  - {{model: {m}, weight: {w}}}" for m, w in zip(langs, weights))
    return f"""merge_method: maet
base_model: {base}
ability: {{model: {ability}, language_model: {language}}}
languages:
{lines}
parameters: {{alpha: {PARAMS["alpha"]}, beta: {PARAMS["beta"]}, gamma: {PARAMS["gamma"]}, eta: {PARAMS["eta"]}, k2: {k2}{extra}}}
dtype: float32
out_dtype: float32
"""


def _expected_maet(base, ability, language, langs, weights, k2, allowed=lambda n: True):
    """Eq. 2–5 in float64: (merged tensors, ranking names, T)."""
    scores, r_a, r_lang = {}, {}, {}
    for name, b in base.items():
        b64 = b.double()
        r_a[name] = PARAMS["alpha"] * (ability[name].double() - b64) - PARAMS["beta"] * (language[name].double() - b64)
        r_lang[name] = sum(w * (lang[name].double() - b64) for lang, w in zip(langs, weights))
        scores[name] = float((r_a[name] * r_lang[name]).sum())
    ranking = sorted(scores, key=lambda n: -scores[n])
    last = ranking[len(ranking) - math.floor(k2 * len(ranking)) :]
    t = [n for n in last if allowed(n)]
    merged = {n: b.double() + (PARAMS["gamma"] * r_a[n] + PARAMS["eta"] * r_lang[n] if n in t else r_lang[n]) for n, b in base.items()}
    return merged, ranking, scores, t


@pytest.mark.parametrize("arch,k2", [("llama", 0.8), ("gpt2", 0.6)])
def test_maet_merge_equals_eq2_to_eq5(zoo, langs, cli, tmp_path, arch, k2):
    fam = zoo.get(arch)
    weights = [0.5, 0.25]
    recipe = write_recipe(tmp_path, _maet_recipe(fam.base, fam.ft1, fam.ft2, langs[arch], weights, k2=k2))
    r = cli("merge", recipe, "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.stderr
    base = load_all(fam.base)
    merged, ranking, scores, t = _expected_maet(base, load_all(fam.ft1), load_all(fam.ft2), [load_all(p) for p in langs[arch]], weights, k2)
    out = load_all(tmp_path / "out")
    for name, expected in merged.items():
        assert torch.allclose(out[name].double(), expected, rtol=0, atol=1e-6), name
    prov = __import__("json").loads((tmp_path / "out" / "neuroloc.json").read_text())["maet"]
    assert [row["tensor"] for row in prov["ranking"]] == ranking
    # the engine forms R(A) and R_Lang in the recipe's compute dtype (float32), then sums in float64
    assert [row["score"] for row in prov["ranking"]] == pytest.approx([scores[n] for n in ranking], rel=1e-4)
    assert prov["T"] == t and prov["T_size"] == math.floor(k2 * len(base)) == prov["T_by_rank"]


def test_maet_transfer_filter_restricts_t_to_tensor_kinds(zoo, langs, cli, tmp_path):
    fam = zoo.get("llama")
    extra = ', transfer: [{filter: "*.mlp.*", value: true}, {value: false}]'
    recipe = write_recipe(tmp_path, _maet_recipe(fam.base, fam.ft1, fam.ft2, langs["llama"], [1.0, 1.0], k2=0.8, extra=extra))
    r = cli("merge", recipe, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    base = load_all(fam.base)
    merged, _, _, t = _expected_maet(
        base, load_all(fam.ft1), load_all(fam.ft2), [load_all(p) for p in langs["llama"]], [1.0, 1.0], 0.8, lambda n: ".mlp." in n
    )
    out = load_all(tmp_path / "out")
    assert t and all(".mlp." in n for n in t)
    for name, expected in merged.items():
        assert torch.allclose(out[name].double(), expected, rtol=0, atol=1e-6), name
    prov = __import__("json").loads((tmp_path / "out" / "neuroloc.json").read_text())["maet"]
    assert prov["T"] == t and prov["T_by_rank"] == math.floor(0.8 * len(base))


@pytest.mark.parametrize(
    "body,message",
    [
        (
            "merge_method: maet\nbase_model: {base}\nlanguages: [{{model: {ft}}}]\n",
            "ability: maet needs 'ability: {model: ..., language_model: ...}'",
        ),
        (
            "merge_method: maet\nbase_model: {base}\nability: {{model: {ft}, language_model: {ft}}}\n",
            "languages: maet needs at least one '{model: ..., weight: ...}'",
        ),
        (
            "merge_method: task_arithmetic\nbase_model: {base}\nmodels: [{{model: {ft}, parameters: {{weight: 1}}}}]\nability: {{model: {ft}, language_model: {ft}}}\n",
            "ability/languages: task_arithmetic takes 'models:'",
        ),
        (
            "merge_method: maet\nbase_model: {base}\nability: {{model: {ft}, language_model: {ft}}}\nlanguages: [{{model: {ft}}}]\nparameters: {{k2: [0.5, 0.9]}}\n",
            "parameters.k2: must be one number",
        ),
        (
            "merge_method: maet\nbase_model: {base}\nability: {{model: {ft}, language_model: {ft}}}\nlanguages: [{{model: {ft}}}]\nparameters: {{k2: 1.5}}\n",
            "parameters.k2: must be in [0, 1], got 1.5",
        ),
    ],
)
def test_maet_recipe_problems_are_named(zoo, cli, tmp_path, body, message):
    fam = zoo.get("llama")
    recipe = write_recipe(tmp_path, body.format(base=fam.base, ft=fam.ft1))
    r = cli("recipe", "validate", recipe)
    assert r.exit_code == 2
    assert message in r.stderr


# -- masks in merges ---------------------------------------------------------------------------


def _bits_equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Element-wise bit identity (NaN-safe), for same-dtype tensors."""
    view = {torch.bfloat16: torch.int16, torch.float16: torch.int16, torch.float32: torch.int32}[a.dtype]
    return a.view(view) == b.view(view)


def test_mask_restricted_merge_keeps_unselected_elements_bit_identical(zoo, cli, tmp_path):
    fam = zoo.get("mistral")
    mask_path = tmp_path / "m.safetensors"
    assert cli("locate", "delta", fam.base, fam.ft1, "--top", "0.1", "--granularity", "ffn", "-o", mask_path).exit_code == 0
    recipe = write_recipe(
        tmp_path,
        f"merge_method: task_arithmetic\nbase_model: {fam.base}\nmodels:\n  - {{model: {fam.ft1}, parameters: {{weight: 0.7}}}}\n"
        f"  - {{model: {fam.ft2}, parameters: {{weight: 0.5}}}}\nmask: {mask_path}\n",
    )
    plan = cli("recipe", "validate", recipe, "--json").json()
    selected = Mask.load(mask_path).selected
    assert plan["notes"] == [f"mask {mask_path}: ffn mask over 6 tensors, {selected} elements selected; outside it the base is kept"]
    r = cli("merge", recipe, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    mask, base, a, b, out = Mask.load(mask_path), load_all(fam.base), load_all(fam.ft1), load_all(fam.ft2), load_all(tmp_path / "out")
    changed = 0
    for name, t in base.items():
        entry = mask.entries.get(name)
        inside = entry.dense() if entry is not None else torch.zeros(t.shape, dtype=torch.bool)
        assert bool(_bits_equal(out[name], t)[~inside].all()), name
        expected = (t.float() + 0.7 * (a[name].float() - t.float()) + 0.5 * (b[name].float() - t.float())).to(t.dtype)
        assert torch.allclose(out[name][inside].float(), expected[inside].float(), atol=1e-2)
        changed += int((~_bits_equal(out[name], t))[inside].sum())
    assert changed > 0  # the merge did act inside the mask


def test_per_model_masks_restrict_each_delta(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    base, a, b = load_all(fam.base), load_all(fam.ft1), load_all(fam.ft2)
    gen = torch.Generator().manual_seed(0)
    masks = []
    for i in range(2):
        entries = {n: MaskEntry(tuple(t.shape), None, torch.rand(t.shape, generator=gen) < 0.3) for n, t in base.items() if t.dim() == 2}
        masks.append(Mask("element", entries))
        masks[-1].save(tmp_path / f"m{i}.safetensors")
    recipe = write_recipe(
        tmp_path,
        f"merge_method: task_arithmetic\nbase_model: {fam.base}\nmodels:\n"
        f"  - {{model: {fam.ft1}, parameters: {{weight: 1.0}}, mask: m0.safetensors}}\n"
        f"  - {{model: {fam.ft2}, parameters: {{weight: 1.0}}, mask: m1.safetensors}}\ndtype: float32\nout_dtype: float32\n",
    )
    r = cli("merge", recipe, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    out = load_all(tmp_path / "out")
    for name, t in base.items():
        in0 = masks[0].entries[name].dense() if name in masks[0].entries else torch.zeros(t.shape, dtype=torch.bool)
        in1 = masks[1].entries[name].dense() if name in masks[1].entries else torch.zeros(t.shape, dtype=torch.bool)
        t64 = t.double()
        expected = t64 + in0 * (a[name].double() - t64) + in1 * (b[name].double() - t64)
        assert torch.allclose(out[name].double(), expected, atol=1e-6), name
        assert bool((out[name][~(in0 | in1)] == t.float()[~(in0 | in1)]).all())


def test_mask_with_mismatched_shapes_is_refused_at_plan_time(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    bad = Mask("row", {"model.layers.0.mlp.up_proj.weight": MaskEntry((64, 64), 0, torch.ones(64, dtype=torch.bool))})
    bad.save(tmp_path / "bad.safetensors")
    recipe = write_recipe(
        tmp_path,
        f"merge_method: task_arithmetic\nbase_model: {fam.base}\nmodels: [{{model: {fam.ft1}, parameters: {{weight: 1}}}}]\nmask: bad.safetensors\n",
    )
    r = cli("merge", recipe, "-o", tmp_path / "out")
    assert r.exit_code == 3
    assert f"mask: mask tensor model.layers.0.mlp.up_proj.weight has shape [64, 64] but base_model ({fam.base}) has [128, 64]" in r.stderr
    assert not (tmp_path / "out").exists()
    recipe = write_recipe(
        tmp_path, f"merge_method: linear\nmodels: [{{model: {fam.ft1}, parameters: {{weight: 1}}, mask: bad.safetensors}}]\n", "r2.yaml"
    )
    r = cli("recipe", "validate", recipe)
    assert r.exit_code == 2
    assert "models[0].mask: a mask needs base_model" in r.stderr


def test_maet_with_a_global_mask(zoo, langs, cli, tmp_path):
    fam = zoo.get("gpt2")
    mask_path = tmp_path / "m.safetensors"
    assert cli("locate", "delta", fam.base, fam.ft1, "--top", "0.2", "-o", mask_path).exit_code == 0
    text = _maet_recipe(fam.base, fam.ft1, fam.ft2, langs["gpt2"], [0.5, 0.5], k2=0.8).replace("out_dtype: float32", "out_dtype: bfloat16")
    recipe = write_recipe(tmp_path, text + f"mask: {mask_path}\n")
    r = cli("merge", recipe, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    mask, base, out = Mask.load(mask_path), load_all(fam.base), load_all(tmp_path / "out")
    for name, t in base.items():
        entry = mask.entries.get(name)
        inside = entry.dense() if entry is not None else torch.zeros(t.shape, dtype=torch.bool)
        assert bool(_bits_equal(out[name], t)[~inside].all()), name


# -- the shipped recipes -----------------------------------------------------------------------

RECIPES = Path(__file__).resolve().parent.parent / "recipes"


@pytest.mark.parametrize("name,k2", [("maet-math.yaml", 0.8), ("maet-science.yaml", 0.6)])
def test_shipped_recipes_validate_and_run(zoo, langs, cli, tmp_path, name, k2):
    import yaml

    fam = zoo.get("llama")
    doc = yaml.safe_load((RECIPES / name).read_text())
    assert doc["parameters"] == {"alpha": 0.8, "beta": 0.2, "gamma": 0.2, "eta": 1.0, "k2": k2}
    shutil.copy(RECIPES / name, tmp_path / name)
    sources = [fam.ft1, fam.ft2, *langs["llama"], fam.ft1, fam.ft2]
    links = [doc["base_model"], doc["ability"]["model"], doc["ability"]["language_model"], *(lang["model"] for lang in doc["languages"])]
    for link, target in zip(links, [fam.base, *sources]):
        (tmp_path / link).symlink_to(target)
    assert cli("recipe", "validate", tmp_path / name).exit_code == 0
    r = cli("merge", tmp_path / name, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    prov = __import__("json").loads((tmp_path / "out" / "neuroloc.json").read_text())["maet"]
    assert prov["T_size"] == math.floor(k2 * prov["tensors_ranked"])


def test_vectors_written_as_deltas_rank_like_maet_pass_1(zoo, langs, cli, tmp_path):
    fam = zoo.get("llama")
    ability = f"merge_method: ability_vector\nbase_model: {fam.base}\nability: {{model: {fam.ft1}, language_model: {fam.ft2}}}\nparameters: {{alpha: 0.8, beta: 0.2}}\n"
    languages = f"merge_method: language_vector\nbase_model: {fam.base}\nlanguages: [{{model: {langs['llama'][0]}, weight: 0.5}}, {{model: {langs['llama'][1]}, weight: 0.25}}]\n"
    assert cli("merge", write_recipe(tmp_path, ability, "a.yaml"), "-o", tmp_path / "ra").exit_code == 0
    assert cli("merge", write_recipe(tmp_path, languages, "l.yaml"), "-o", tmp_path / "rl").exit_code == 0
    base = load_all(fam.base)
    _, ranking, scores, _ = _expected_maet(
        base, load_all(fam.ft1), load_all(fam.ft2), [load_all(p) for p in langs["llama"]], [0.5, 0.25], 0.8
    )
    ra, a, l0 = load_all(tmp_path / "ra"), load_all(fam.ft1), load_all(fam.ft2)
    for name, b in base.items():
        expected = 0.8 * (a[name].double() - b.double()) - 0.2 * (l0[name].double() - b.double())
        assert ra[name].dtype == torch.float32 and torch.allclose(ra[name].double(), expected, rtol=0, atol=1e-7), name
    rows = cli("rank", tmp_path / "ra", tmp_path / "rl", "--json").json()
    assert [r["tensor"] for r in rows] == ranking
    assert [r["score"] for r in rows] == pytest.approx([scores[n] for n in ranking], rel=1e-4)


def test_row_blocks_do_not_change_masked_merges_or_maet_ranking(zoo, cli, tmp_path, monkeypatch):
    """Masks and MAET's pass-1 dot products work per block of rows; tiny blocks must give the
    same bytes and the same ranking as whole tensors."""
    import json as _json

    from neuroloc_cli.masks import Mask, MaskEntry
    from neuroloc_cli.merge import stream

    fam = zoo.get("llama")
    g = torch.Generator().manual_seed(3)
    mask = Mask("row", {"model.embed_tokens.weight": MaskEntry((512, 64), 0, torch.rand(512, generator=g) < 0.3)})
    mask.save(tmp_path / "m.safetensors")
    ta = write_recipe(
        tmp_path,
        f"merge_method: task_arithmetic\nbase_model: {fam.base}\nmask: {tmp_path / 'm.safetensors'}\n"
        f"models: [{{model: {fam.ft1}, parameters: {{weight: 0.5}}}}]\n",
        "ta.yaml",
    )
    maet = write_recipe(
        tmp_path,
        f"merge_method: maet\nbase_model: {fam.base}\nability: {{model: {fam.ft1}, language_model: {fam.ft2}}}\n"
        f"languages: [{{model: {fam.ft2}, weight: 1.0}}]\nparameters: {{k2: 0.5}}\n",
        "maet.yaml",
    )
    for recipe in (ta, maet):
        assert cli("merge", recipe, "-o", tmp_path / f"{recipe.stem}-whole").exit_code == 0
    monkeypatch.setattr(stream, "BLOCK_ELEMENTS", 1000)
    for recipe in (ta, maet):
        assert cli("merge", recipe, "-o", tmp_path / f"{recipe.stem}-blocks").exit_code == 0
        whole, blocks = load_all(tmp_path / f"{recipe.stem}-whole"), load_all(tmp_path / f"{recipe.stem}-blocks")
        assert all(torch.equal(whole[n], blocks[n]) for n in whole)
    rank = [_json.loads((tmp_path / f"maet-{k}" / "neuroloc.json").read_text())["maet"]["T"] for k in ("whole", "blocks")]
    assert rank[0] == rank[1]


def test_masked_delta_outputs_are_zero_outside_the_mask(zoo, cli, tmp_path):
    from neuroloc_cli.masks import Mask, MaskEntry

    fam = zoo.get("llama")
    name = "model.layers.0.mlp.down_proj.weight"
    rows = torch.zeros(64, dtype=torch.bool)
    rows[:5] = True
    Mask("row", {name: MaskEntry((64, 128), 0, rows)}).save(tmp_path / "m.safetensors")
    recipe = write_recipe(
        tmp_path,
        f"merge_method: ability_vector\nbase_model: {fam.base}\nmask: {tmp_path / 'm.safetensors'}\n"
        f"ability: {{model: {fam.ft1}, language_model: {fam.ft2}}}\n",
    )
    assert cli("merge", recipe, "-o", tmp_path / "ra").exit_code == 0
    ra, base, a, b = (load_all(p) for p in (tmp_path / "ra", fam.base, fam.ft1, fam.ft2))
    expected = 0.8 * (a[name].float() - base[name].float()) - 0.2 * (b[name].float() - base[name].float())
    assert torch.equal(ra[name][5:], torch.zeros_like(ra[name][5:]))
    torch.testing.assert_close(ra[name][:5], expected[:5], rtol=1e-6, atol=1e-7)
    assert all(torch.equal(t, torch.zeros_like(t)) for n, t in ra.items() if n != name)
