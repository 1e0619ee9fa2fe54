"""`train --method landermt`: only the general and the pair's specific neurons of the kept layers
move, the other languages' specific neurons get no gradient and no optimizer state, everything
else stays bit for bit; the loss is the target tokens' only; the baseline trains everything."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from neuroloc_cli.masks.format import layout_digest
from neuroloc_cli.synthetic import SENTENCES
from tests.helpers import load_all

LANGS = ("de", "en", "fr")
SIZE = 128  # intermediate size of the tiny llama (2 × hidden 64)


def _routing(base, tmp_path, layers=(0, 1)) -> tuple:
    """A routing.json over the tiny llama's MLPs: per kept layer, a seeded partition of the
    neurons into general (60 %) and one specific set per language."""
    tensors = load_all(base)
    gen = torch.Generator().manual_seed(5)
    blocks, sets = {}, {}
    for layer in layers:
        key = f"model.layers.{layer}.mlp"
        perm = torch.randperm(SIZE, generator=gen).tolist()
        general = sorted(perm[: int(0.6 * SIZE)])
        rest = perm[int(0.6 * SIZE) :]
        specific = {lang: sorted(rest[i :: len(LANGS)]) for i, lang in enumerate(LANGS)}
        parts = [[f"{key}.gate_proj.weight", 0], [f"{key}.up_proj.weight", 0], [f"{key}.down_proj.weight", 1]]
        blocks[key] = {"layer": layer, "size": SIZE, "parts": parts, "general": general, "specific": specific}
        sets[key] = (general, specific)
    doc = {
        "neuroloc.kind": "landermt-routing",
        "version": 1,
        "model": str(base),
        "model_fingerprint": "",
        "model_layout": layout_digest({n: tuple(t.shape) for n, t in tensors.items()}),
        "template": "flan-following",
        "languages": list(LANGS),
        "directions": ["de-en", "en-de", "en-fr"],
        "layers": list(layers),
        "blocks": blocks,
        "coefficient": {d: {k: 0.3 + 0.1 * i for i, k in enumerate(blocks)} for d in ("de-en", "en-de", "en-fr")},
    }
    folder = tmp_path / "landermt"
    folder.mkdir()
    (folder / "routing.json").write_text(json.dumps(doc))
    return folder, sets


def _pairs(tmp_path, n=24):
    out = {}
    for direction in ("de-en", "en-de"):
        path = tmp_path / f"{direction}.jsonl"
        lines = [json.dumps({"source": SENTENCES[i % len(SENTENCES)], "target": SENTENCES[(i + 1) % len(SENTENCES)]}) for i in range(n)]
        path.write_text("\n".join(lines) + "\n")
        out[direction] = path
    return out


def _train(cli, base, tmp_path, *extra, out="ft"):
    pairs = _pairs(tmp_path)
    args = ["train", base, "--method", "landermt", *[a for d, p in pairs.items() for a in ("--pair", f"{d}={p}")]]
    args += ["--max-steps", 4, "--batch-size", 2, "--grad-accum", 2, "--seq-len", 112, "--lr", 1e-2, "--weight-decay", 0.5, "--json"]
    return cli(*args, "-o", tmp_path / out, *extra)


def test_only_the_pairs_neurons_move(zoo, cli, tmp_path):
    base = zoo.get("llama", dtype=torch.float32).base
    masks, sets = _routing(base, tmp_path)
    r = _train(cli, base, tmp_path, "--masks", masks)
    assert r.exit_code == 0, r.stderr
    before, after = load_all(base), load_all(tmp_path / "ft")
    assert (tmp_path / "ft" / "routing.json").read_text() == (masks / "routing.json").read_text()
    kept = {p for key in sets for p in (f"{key}.gate_proj.weight", f"{key}.up_proj.weight", f"{key}.down_proj.weight")}
    for name, t in before.items():
        if name not in kept:
            assert torch.equal(after[name], t), name  # frozen, bit for bit
    trained_elements = 0
    for key, (general, specific) in sets.items():
        for part, axis in (("gate_proj", 0), ("up_proj", 0), ("down_proj", 1)):
            name = f"{key}.{part}.weight"
            b, a = before[name].movedim(axis, 0), after[name].movedim(axis, 0)
            fr = specific["fr"]  # neither side of de-en / en-de: never active, no gradient, no decay
            assert torch.equal(a[fr], b[fr]), name
            for moving in (general, specific["de"], specific["en"]):
                assert not torch.equal(a[moving], b[moving]), name
            trained_elements += (len(general) + len(specific["de"]) + len(specific["en"])) * b.shape[1]
    doc = r.json()
    assert doc["counts"]["trainable"] == trained_elements + sum(len(s["fr"]) * 64 * 3 for _, s in sets.values())
    # Adam state (two fp32 moments + a step) exists only for slices that received a gradient: no fr slice ever did
    moved_slices = 3 * len(sets) * 3  # 3 tensors × layers × (general, de, en)
    assert doc["optimizer_state_bytes"] == 8 * trained_elements + 4 * moved_slices
    assert set(doc["perplexity"]["before"]) == {"de-en", "en-de"}


def test_full_finetune_baseline_trains_everything_on_the_same_data(zoo, cli, tmp_path):
    base = zoo.get("llama", dtype=torch.float32).base
    r = _train(cli, base, tmp_path, "--full-finetune")
    assert r.exit_code == 0, r.stderr
    before, after = load_all(base), load_all(tmp_path / "ft")
    changed = [n for n in before if not torch.equal(before[n], after[n])]
    assert len(changed) == len(before)
    assert not (tmp_path / "ft" / "routing.json").exists()
    assert r.json()["counts"]["frozen"] == 0


def test_loss_is_on_the_target_tokens_only(zoo, tmp_path):
    """target_nll against a cross-entropy written here over the target positions alone."""
    import torch.nn.functional as F
    from transformers import AutoTokenizer

    from neuroloc_cli.runtime.model import load_model
    from neuroloc_cli.runtime.prompts import Pair, pair_rows
    from neuroloc_cli.train.landermt import target_nll

    base = zoo.get("llama", dtype=torch.float32).base
    tok = AutoTokenizer.from_pretrained(str(base))
    sentences = [(SENTENCES[0], SENTENCES[1]), (SENTENCES[2], SENTENCES[3])]
    rows = pair_rows(Pair("de", "en", tmp_path), sentences, tok, "flan-following", 112)
    assert rows.truncated == 0
    model = load_model(base).eval()
    got = target_nll(model, rows.input_ids, rows.labels, rows.attention_mask)
    want = 0.0
    for ids, mask, (_src, tgt) in zip(rows.input_ids, rows.attention_mask, sentences):
        n = int(mask.sum())
        target = tok(" " + tgt, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        logits = model(input_ids=ids[:n].unsqueeze(0)).logits[0]
        start = n - len(target)  # the target and EOS are the last tokens of the example
        want += float(F.cross_entropy(logits[start - 1 : n - 1], torch.tensor(target), reduction="sum").detach())
    assert float(got.detach()) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize(
    "extra,code,message",
    [
        (["--data", "x.txt"], 2, "not --data"),
        ([], 2, "needs --masks DIR"),
        (["--masks", "MISSING"], 3, "no routing.json"),
        (["--masks", "ROUTING", "--train-mask", "m.mask"], 2, "not --train-mask"),
        (["--full-finetune", "--packing", "packed"], 2, "--packing applies to --method cpt only"),
    ],
    ids=["data", "no-masks", "no-routing", "train-mask", "packing"],
)
def test_bad_landermt_runs_are_one_line(zoo, cli, tmp_path, extra, code, message):
    base = zoo.get("llama", dtype=torch.float32).base
    masks, _ = _routing(base, tmp_path)
    (tmp_path / "empty").mkdir()
    extra = [str(tmp_path / "empty") if a == "MISSING" else str(masks) if a == "ROUTING" else a for a in extra]
    r = _train(cli, base, tmp_path, *extra)
    assert r.exit_code == code and message in r.stderr, r.stderr
    assert not (tmp_path / "ft").exists()


def test_a_direction_the_routing_lacks_is_refused(zoo, cli, tmp_path):
    base = zoo.get("llama", dtype=torch.float32).base
    masks, _ = _routing(base, tmp_path)
    doc = json.loads((masks / "routing.json").read_text())
    doc["directions"] = ["en-fr"]
    doc["coefficient"] = {"en-fr": doc["coefficient"]["en-fr"]}
    (masks / "routing.json").write_text(json.dumps(doc))
    r = _train(cli, base, tmp_path, "--masks", masks)
    assert r.exit_code == 3 and "no routing for direction de-en" in r.stderr
    shutil.rmtree(masks)


def test_landermt_end_to_end(zoo, cli, tmp_path):
    """locate awareness -> train --method landermt -> export-pair -> eval, through the CLI: the
    export loads without neuroloc and its logits equal the routed trained model's."""
    from transformers import AutoModelForCausalLM

    from neuroloc_cli.io.checkpoint import Checkpoint
    from neuroloc_cli.runtime.model import load_model, parameter_names
    from neuroloc_cli.runtime.routing import Routing, attach

    base = zoo.get("llama", dtype=torch.float32).base
    pairs = _pairs(tmp_path)
    pair_args = [a for d, p in pairs.items() for a in ("--pair", f"{d}={p}")]
    r = cli("locate", "awareness", base, *pair_args, "--layers", 1, "--general", 0.75, "--seq-len", 112, "-o", tmp_path / "lm", "--json")
    assert r.exit_code == 0, r.stderr
    r = _train(cli, base, tmp_path, "--masks", tmp_path / "lm")
    assert r.exit_code == 0, r.stderr
    r = cli("export-pair", tmp_path / "ft", "--pair", "de-en", "-o", tmp_path / "de-en")
    assert r.exit_code == 0, r.stderr
    ids = torch.tensor([[0, 5, 9, 17, 33, 2, 8]])
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "de-en")).eval()
    routed = load_model(tmp_path / "ft").eval()
    names = parameter_names(routed, Checkpoint.open(tmp_path / "ft"))
    with torch.no_grad(), attach(routed, Routing.load(tmp_path / "ft" / "routing.json"), "de-en", names):
        want = routed(input_ids=ids).logits
    torch.testing.assert_close(exported(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)
    held = tmp_path / "held.jsonl"
    held.write_text("".join(json.dumps({"text": s}) + "\n" for s in SENTENCES[:3]))
    args = ["--translate", pairs["de-en"], "--src", "de", "--tgt", "en", "--limit", 2, "--max-gen-toks", 8, "--ppl", f"{held}:fr"]
    r = cli("eval", tmp_path / "de-en", base, *args, "--json")
    assert r.exit_code == 0, r.stderr
    tasks = json.dumps(r.json())
    assert "translate_de-en" in tasks and "ppl_fr" in tasks  # gain and forgetting in one table
    # the raw training output is right only behind its routing: refused as a plain model
    for argv in (["eval", tmp_path / "ft", "--ppl", f"{held}:fr"], ["train", tmp_path / "ft", "--data", held, "-o", tmp_path / "x"]):
        r = cli(*argv)
        assert r.exit_code == 3 and "is a LANDeRMT training output" in r.stderr and "export-pair" in r.stderr, r.stderr


def test_resume_refuses_a_changed_routing(zoo, cli, tmp_path):
    base = zoo.get("llama", dtype=torch.float32).base
    masks, _ = _routing(base, tmp_path)
    r = _train(cli, base, tmp_path, "--masks", masks, "--save-every", 1, "--max-steps", 3, "--keep-state", "--run-dir", tmp_path / "run")
    assert r.exit_code == 0, r.stderr
    doc = json.loads((masks / "routing.json").read_text())
    doc["coefficient"]["de-en"] = {k: 0.95 for k in doc["coefficient"]["de-en"]}
    (masks / "routing.json").write_text(json.dumps(doc))
    r = _train(cli, base, tmp_path, "--masks", masks, "--max-steps", 3, "--resume", "--run-dir", tmp_path / "run", "--overwrite")
    assert r.exit_code != 0 and "routing" in r.stderr, r.stderr


def test_landermt_flags_are_refused_for_cpt(zoo, cli, tmp_path):
    base = zoo.get("llama", dtype=torch.float32).base
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n\n".join(SENTENCES))
    for flags, message in ((["--template", "flan-to"], "--template applies"), (["--full-finetune"], "--full-finetune applies")):
        r = cli("train", base, "--data", corpus, *flags, "-o", tmp_path / "x", "--dry-run")
        assert r.exit_code == 2 and message in r.stderr, r.stderr
