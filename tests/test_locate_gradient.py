"""`neuroloc locate gradient` (linguistic regions) against autograd run here, and its masks'
per-tensor counts checked from their definitions."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from neuroloc_cli.masks import Mask
from neuroloc_cli.synthetic import SENTENCES
from tests.helpers import load_all

SAMPLES, SEQ_LEN, BATCH = 7, 16, 3  # a last, partial batch: the orders differ on it
TOP = 0.05


@pytest.fixture
def corpora(tmp_path):
    """Three languages: .txt paragraphs for en and es, a .jsonl for fr."""
    en = tmp_path / "en.txt"
    en.write_text("\n\n".join([SENTENCES[0], SENTENCES[3]] * 20) + "\n")
    es = tmp_path / "es.txt"
    es.write_text("\n\n".join([SENTENCES[4]] * 30) + "\n")
    fr = tmp_path / "fr.jsonl"
    fr.write_text("".join(json.dumps({"text": SENTENCES[1]}) + "\n" for _ in range(30)))
    return {"en": en, "es": es, "fr": fr}


def _data_args(corpora):
    return [a for lang, p in corpora.items() for a in ("--data", f"{lang}={p}")]


def _run(cli, model, corpora, out, *extra):
    args = ["locate", "gradient", model, *_data_args(corpora), "--samples", SAMPLES, "--seq-len", SEQ_LEN]
    return cli(*args, "--batch-size", BATCH, "--top", TOP, "-o", out, *extra)


def _rows(model, path):
    """The first SAMPLES packed rows of a corpus, built here from the tokenizer: each
    document with the tokenizer's special tokens, then EOS unless it already ends with it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    if path.suffix == ".jsonl":
        docs = [json.loads(line)["text"] for line in path.read_text().splitlines()]
    else:
        docs = [d for d in path.read_text().split("\n\n") if d.strip()]
    stream = []
    for d in docs:
        ids = tok(d.strip("\n"))["input_ids"]
        stream += ids if ids[-1:] == [tok.eos_token_id] else ids + [tok.eos_token_id]
    return torch.tensor(stream[: SAMPLES * SEQ_LEN]).view(SAMPLES, SEQ_LEN)


def _reference(model_path, rows, order):
    """Importance per block tensor: per-batch gradients by torch.autograd.grad."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    params = {n: p for n, p in model.named_parameters() if ".layers." in n}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for start in range(0, len(rows), BATCH):
        b = rows[start : start + BATCH]
        logits = model(input_ids=b).logits
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1))
        grads = torch.autograd.grad(loss, list(params.values()))
        for (n, p), g in zip(params.items(), grads):
            acc[n] += {"signed": g, "abs": (g * p).abs(), "fisher": g * g}[order].detach()
    if order == "signed":
        acc = {n: (a * params[n]).abs().detach() for n, a in acc.items()}
    return acc


@pytest.mark.parametrize("order,flags", [("signed", []), ("abs", ["--abs-per-batch"]), ("fisher", ["--score", "fisher"])])
def test_importance_equals_autograd(zoo, cli, corpora, tmp_path, order, flags):
    base = zoo.get("llama").base
    out = tmp_path / "regions"
    r = _run(cli, base, corpora, out, *flags)
    assert r.exit_code == 0, r.stderr
    for lang, path in corpora.items():
        got = load_file(str(out / "importance" / f"{lang}.safetensors"))
        want = _reference(base, _rows(base, path), order)
        assert set(got) == set(want)
        for n, w in want.items():
            assert got[n].dtype == torch.float32
            torch.testing.assert_close(got[n], w, rtol=1e-4, atol=1e-9 * float(w.abs().max()) + 1e-12, msg=n)


def test_masks_have_exact_per_tensor_counts(zoo, cli, corpora, tmp_path):
    base = zoo.get("llama").base
    out = tmp_path / "regions"
    r = _run(cli, base, corpora, out, "--json")
    assert r.exit_code == 0, r.stderr
    summary = r.json()
    assert summary == {"output": str(out), **json.loads((out / "summary.json").read_text())}
    imp = {lang: load_file(str(out / "importance" / f"{lang}.safetensors")) for lang in corpora}
    total = {n: sum(imp[lang][n] for lang in corpora) for n in imp["en"]}
    masks = {p.stem: Mask.load(p) for p in out.glob("*.safetensors")}
    assert set(masks) == {"core", "bottom", "random", *(f"{k}-{lang}" for k in ("top", "mono") for lang in corpora)}
    layout = masks["core"].provenance["model_layout"]
    for stem, m in masks.items():
        assert m.granularity == "element" and set(m.entries) == set(total)
        assert m.provenance["model_layout"] == layout
        assert summary["masks"][stem]["selected"] == m.selected
    for n, t in total.items():
        k = int(TOP * t.numel())  # share_count's rule
        core, bottom, rand = (masks[s].entries[n].selected for s in ("core", "bottom", "random"))
        assert int(core.sum()) == int(bottom.sum()) == int(rand.sum()) == k
        if 0 < k < t.numel():
            assert t[core].min() >= t[~core].max(), n
            assert t[bottom].max() <= t[~bottom].min(), n
        for lang in corpora:
            top = masks[f"top-{lang}"].entries[n].selected
            assert int(top.sum()) == k
            if 0 < k < t.numel():
                assert imp[lang][n][top].min() >= imp[lang][n][~top].max()
            mono = masks[f"mono-{lang}"].entries[n].selected
            assert not (mono & ~top).any()
            for other in corpora:
                if other != lang:
                    assert not (mono & masks[f"top-{other}"].entries[n].selected).any()
            union = torch.stack([masks[f"top-{o}"].entries[n].selected for o in corpora if o != lang]).any(0)
            assert torch.equal(mono, top & ~union)
    a, b = (masks["top-en"], masks["top-es"])
    inter = sum(int((a.entries[n].selected & b.entries[n].selected).sum()) for n in total)
    union = sum(int((a.entries[n].selected | b.entries[n].selected).sum()) for n in total)
    assert summary["jaccard"]["en/es"] == pytest.approx(inter / union)
    assert sum(summary["core_by_kind"].values()) == pytest.approx(1.0)


def test_random_control_follows_the_seed(zoo, cli, corpora, tmp_path):
    base = zoo.get("llama").base
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        assert _run(cli, base, corpora, tmp_path / name, "--seed", seed, "--json").exit_code == 0
        runs[name] = (tmp_path / name / "random.safetensors").read_bytes()
    assert runs["a"] == runs["b"] != runs["c"]
    assert (tmp_path / "a" / "core.safetensors").read_bytes() == (tmp_path / "c" / "core.safetensors").read_bytes()


@pytest.mark.parametrize(
    "data,code,message",
    [
        (["--data", "en={en}"], 2, "need at least 2"),
        (["--data", "en={en}", "--data", "es"], 2, "expected LANG=PATH"),
        (["--data", "en={en}", "--data", "en={es}"], 2, "given twice"),
        (["--data", "en={en}", "--data", "es={missing}"], 3, "no such corpus file"),
    ],
)
def test_bad_data_is_one_line_and_writes_nothing(zoo, cli, corpora, tmp_path, data, code, message):
    base = zoo.get("llama").base
    out = tmp_path / "regions"
    paths = {**corpora, "missing": tmp_path / "missing.txt"}
    r = cli("locate", "gradient", base, *[a.format(**paths) for a in data], "--samples", 2, "--seq-len", 8, "-o", out)
    assert r.exit_code == code, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert not out.exists() and r.stdout == ""
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_existing_output_is_refused(zoo, cli, corpora, tmp_path):
    base = zoo.get("llama").base
    out = tmp_path / "regions"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    r = _run(cli, base, corpora, out)
    assert r.exit_code == 4 and "already exists" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def test_too_short_corpus_names_the_file(zoo, cli, corpora, tmp_path):
    base = zoo.get("llama").base
    short = tmp_path / "short.txt"
    short.write_text(SENTENCES[2] + "\n")
    r = _run(cli, base, {"en": corpora["en"], "de": short}, tmp_path / "regions")
    assert r.exit_code == 3 and str(short) in r.stderr and "--samples" in r.stderr
    assert not (tmp_path / "regions").exists()


def test_listed_among_the_locators(cli):
    r = cli("locate", "list", "--json")
    assert "gradient" in {d["name"] for d in r.json()}


def test_dry_run_states_the_memory_and_writes_nothing(zoo, cli, corpora, tmp_path):
    """model + one float32 accumulator per scored element + one gradient, from the headers."""
    base = zoo.get("llama").base
    out = tmp_path / "regions"
    r = _run(cli, base, corpora, out, "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    assert not out.exists()
    tensors = load_all(base)
    scored = {n: t for n, t in tensors.items() if ".layers." in n}
    mem = r.json()["memory_bytes"]
    assert mem["model"] == 4 * sum(t.numel() for t in tensors.values())
    assert mem["accumulators"] == 4 * sum(t.numel() for t in scored.values())
    assert mem["gradient"] == 4 * max(t.numel() for t in scored.values())
    assert mem["total"] == mem["model"] + mem["accumulators"] + mem["gradient"]
    assert r.json()["rows_per_language"] == SAMPLES and r.json()["tensors"] == len(scored)
    r = _run(cli, base, corpora, out, "--dry-run", "--max-tokens", 5 * SEQ_LEN + 3, "--samples", 2)
    assert r.exit_code == 2 and "--samples and --max-tokens both given" in r.stderr


def test_stored_float_buffers_are_not_scored(zoo, cli, corpora, tmp_path):
    """An older Llama checkpoint stores rotary `inv_freq` buffers in its blocks: they have no
    gradient, so they are left out rather than refused."""
    import shutil

    from safetensors.torch import save_file

    base = zoo.get("llama", sharded=False, dtype=torch.float32).base
    old = tmp_path / "old"
    shutil.copytree(base, old)
    tensors = load_file(str(old / "model.safetensors"))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    save_file(tensors, str(old / "model.safetensors"), metadata={"format": "pt"})
    r = _run(cli, old, corpora, tmp_path / "regions", "--json")
    assert r.exit_code == 0, r.stderr
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" not in load_file(str(tmp_path / "regions" / "importance" / "en.safetensors"))
