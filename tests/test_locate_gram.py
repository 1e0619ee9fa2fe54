"""`neuroloc locate gram`: each linear layer's input Gram matrix against `XᵀX` of inputs
captured here by an independent forward with hooks, for Llama (`nn.Linear`) and GPT-2
(`Conv1D`) layouts."""

from __future__ import annotations

import json

import pytest
import torch

from neuroloc_cli.masks.importance import Importance
from neuroloc_cli.synthetic import SENTENCES

SAMPLES, SEQ_LEN, BATCH = 6, 16, 4


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"text": f"{SENTENCES[i % 5]} {SENTENCES[(i + 2) % 5]}"}) + "\n" for i in range(40)))
    return path


def _rows(model, path):
    """The first SAMPLES packed rows, built here: each document's ids, then EOS unless it ends with it."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model))
    stream = []
    for line in path.read_text().splitlines():
        ids = tok(json.loads(line)["text"])["input_ids"]
        stream += ids if ids[-1:] == [tok.eos_token_id] else ids + [tok.eos_token_id]
    return torch.tensor(stream[: SAMPLES * SEQ_LEN]).view(SAMPLES, SEQ_LEN)


def _captured_grams(model_path, rows, modules):
    """`XᵀX / n` in float64 of each named module's inputs, from hooks on a plain transformers model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    seen = {m: [] for m in modules}
    found = dict(model.named_modules())
    handles = [found[m].register_forward_hook(lambda mod, args, out, m=m: seen[m].append(args[0].detach())) for m in modules]
    with torch.no_grad():
        model(input_ids=rows)
    for h in handles:
        h.remove()
    out = {}
    for m, xs in seen.items():
        x = torch.cat([x.reshape(-1, x.shape[-1]) for x in xs]).double()
        out[m] = x.T @ x / x.shape[0]
    return out


@pytest.mark.parametrize(
    "arch,checks",
    [
        (
            "llama",
            {
                "model.layers.0.self_attn.q_proj.weight": "model.layers.0.self_attn.q_proj",
                "model.layers.1.mlp.down_proj.weight": "model.layers.1.mlp.down_proj",
            },
        ),
        (
            "gpt2",
            {
                "transformer.h.0.attn.c_attn.weight": "transformer.h.0.attn.c_attn",
                "transformer.h.1.mlp.c_proj.weight": "transformer.h.1.mlp.c_proj",
            },
        ),
    ],
)
def test_gram_equals_xtx_of_hooked_inputs(zoo, cli, corpus, tmp_path, arch, checks):
    fam = zoo.get(arch, dtype=torch.float32)
    out = tmp_path / "gram"
    r = cli(
        "locate", "gram", fam.ft1, "--data", corpus, "--samples", SAMPLES, "--seq-len", SEQ_LEN, "--batch-size", BATCH, "-o", out, "--json"
    )
    assert r.exit_code == 0, r.stderr
    assert r.json()["corpora"]["train"]["tokens"] == SAMPLES * SEQ_LEN
    imp = Importance.open(out / "importance" / "train.safetensors")
    assert imp.meta.score == "gram" and imp.meta.provenance["tokens"] == SAMPLES * SEQ_LEN
    expected = _captured_grams(fam.ft1, _rows(fam.ft1, corpus), list(checks.values()))
    from neuroloc_cli.io.checkpoint import Checkpoint

    ckpt = Checkpoint.open(fam.ft1)
    for name, module in checks.items():
        assert name in ckpt.tensors
        got = imp.read(name).double()
        in_dim = ckpt.tensors[name].shape[0 if arch == "gpt2" else 1]
        assert got.shape == (in_dim, in_dim)
        torch.testing.assert_close(got, expected[module], rtol=1e-5, atol=1e-6)
    # every stored weight of a linear layer in the blocks, and nothing else
    linear = {n for n in imp.shapes}
    assert all(".mlp." in n or "attn" in n for n in linear) and not any("norm" in n or "ln_" in n or "embed" in n for n in linear)
    if arch == "llama":  # q and k read the same input
        assert torch.equal(imp.read("model.layers.0.self_attn.q_proj.weight"), imp.read("model.layers.0.self_attn.k_proj.weight"))


def test_dry_run_states_the_layers_and_writes_nothing(zoo, cli, corpus, tmp_path):
    fam = zoo.get("llama")
    r = cli("locate", "gram", fam.ft1, "--data", f"a={corpus}", "--samples", 2, "--seq-len", 8, "-o", tmp_path / "g", "--dry-run", "--json")
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    assert doc["dry_run"] and doc["tensors"] == 14 and doc["corpora"] == {"a": str(corpus)}  # 2 blocks x 7 projections
    assert doc["memory_bytes"]["accumulators"] == 8 * doc["gram_elements"]
    assert not (tmp_path / "g").exists()


@pytest.mark.parametrize(
    "args,code,message",
    [
        (["--data", "{missing}"], 3, "no such corpus file"),
        (["--data", "a={corpus}", "--data", "a={corpus}"], 2, "--data: corpus 'a' given twice"),
        (["--data", "{corpus}", "--include", "*norm*"], 2, "leave no linear layer to score"),
    ],
)
def test_bad_settings_are_one_line(zoo, cli, corpus, tmp_path, args, code, message):
    fam = zoo.get("llama")
    filled = [a.format(corpus=corpus, missing=tmp_path / "missing.jsonl") for a in args]
    r = cli("locate", "gram", fam.ft1, *filled, "--samples", 2, "--seq-len", 8, "-o", tmp_path / "g")
    assert r.exit_code == code, r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) <= 2, r.stderr
    assert not (tmp_path / "g").exists()
