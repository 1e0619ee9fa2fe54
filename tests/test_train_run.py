"""`neuroloc train` end to end on tiny models: loss, exact freezing, split slices, resume,
bad input. Every check compares the output with the input checkpoint read independently."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from neuroloc_cli.masks import Mask, MaskEntry
from neuroloc_cli.synthetic import SENTENCES
from neuroloc_cli.train.config import build_config
from neuroloc_cli.train.events import StepEvent
from neuroloc_cli.train.run import MaskedCPTRecipe, run_training
from neuroloc_cli.train.state import default_run_dir
from tests.helpers import load_all

FAST = dict(seq_len=32, batch_size=2, lr=1e-2, weight_decay=0.1, eval_share=0.1, max_steps=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("corpus") / "mix.jsonl"
    path.write_text("".join(json.dumps({"text": " ".join(rng.choice(SENTENCES) for _ in range(3))}) + "\n" for _ in range(120)))
    return path


def _config(model: Path, corpus: Path, out: Path, **kw):
    return build_config(None, {"model": str(model), "data": [str(corpus)], "output": str(out), **{**FAST, **kw}})


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bits, so that equality means bit-for-bit (and -0.0 != 0.0)."""
    return t.contiguous().view({2: torch.int16, 4: torch.int32}[t.element_size()])


def _random_row_mask(base: Path, names: dict[str, int], share: float, seed: int) -> Mask:
    from neuroloc_cli.io.checkpoint import Checkpoint

    shapes = {n: i.shape for n, i in Checkpoint.open(base).tensors.items()}
    gen = torch.Generator().manual_seed(seed)
    entries = {}
    for name, axis in names.items():
        sel = torch.rand(shapes[name][axis], generator=gen) < share
        sel[0] = True  # never empty
        entries[name] = MaskEntry(shapes[name], axis, sel)
    return Mask("row", entries)


def _loss_on(model_path: Path, sequences: torch.Tensor) -> float:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=torch.float32).eval()
    with torch.no_grad():
        return float(model(input_ids=sequences, labels=sequences).loss)


def test_full_cpt_loss_falls_and_writes_hf_checkpoint(zoo, cli, corpus, tmp_path):
    base = zoo.get("llama").base
    out = tmp_path / "out"
    r = cli(
        "train",
        base,
        "--data",
        corpus,
        "-o",
        out,
        "--max-steps",
        "25",
        "--lr",
        "3e-3",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--eval-share",
        "0.1",
        "--max-shard-size",
        "60KB",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    assert doc["steps"] == 25 and doc["tokens"] == 25 * 4 * 32
    assert doc["counts"]["frozen"] == 0 and doc["counts"]["trainable"] == doc["counts"]["parameters"]
    # The loss on the training data falls, computed here with transformers, independently.
    recipe = MaskedCPTRecipe(_config(base, corpus, tmp_path / "unused"))
    from neuroloc_cli.runtime.data import framing_of, load_tokenizer
    from neuroloc_cli.train.data import load_corpora

    tokenizer = load_tokenizer(base)
    [c] = load_corpora(recipe.cfg.data, tokenizer, framing_of(tokenizer, "packed", "paragraph"), 32, 0.1)
    assert _loss_on(out, c.train) < _loss_on(base, c.train) - 0.3
    [(_, before)] = doc["perplexity"]["before"].items()
    [(_, after)] = doc["perplexity"]["after"].items()
    assert after < before
    # A normal HF checkpoint: same tensors, shapes and dtypes, sharded, config and tokenizer.
    from neuroloc_cli.io.checkpoint import Checkpoint

    src, dst = Checkpoint.open(base), Checkpoint.open(out)
    assert {n: (i.shape, i.dtype) for n, i in src.tensors.items()} == {n: (i.shape, i.dtype) for n, i in dst.tensors.items()}
    assert len(dst.headers) > 1
    assert (out / "tokenizer.json").is_file() and (out / "config.json").is_file()
    prov = json.loads((out / "neuroloc.json").read_text())
    import hashlib

    assert prov["data"][0]["sha256"] == hashlib.sha256(corpus.read_bytes()).hexdigest()
    assert prov["hyper_parameters"]["lr"] == 3e-3 and prov["mask"] is None
    steps = [json.loads(line) for line in (out / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in steps if e["event"] == "step"] == list(range(1, 26))


def test_freeze_mask_keeps_every_frozen_element_bit_exact(zoo, corpus, tmp_path):
    base = zoo.get("llama").base
    inputs = load_all(base)
    gen = torch.Generator().manual_seed(3)
    entries = {n: MaskEntry(tuple(t.shape), None, torch.rand(t.shape, generator=gen) < 0.3) for n, t in inputs.items() if ".layers." in n}
    mask = tmp_path / "core.mask"
    Mask("element", entries).save(mask)
    result = run_training(_config(base, corpus, tmp_path / "out", freeze_mask=str(mask), weight_decay=0.5))
    outputs = load_all(tmp_path / "out")
    for name, e in entries.items():
        frozen = e.dense()
        assert torch.equal(_bits(outputs[name])[frozen], _bits(inputs[name])[frozen]), name
        # The free elements did train (weight decay alone would move them too).
        assert (outputs[name][~frozen] != inputs[name][~frozen]).float().mean() > 0.5, name
    assert not torch.equal(outputs["model.embed_tokens.weight"], inputs["model.embed_tokens.weight"])
    assert result.counts["frozen"] == sum(int(e.selected.sum()) for e in entries.values())
    # Gradient masking holds full Adam state for masked tensors: every parameter.
    assert result.counts["optimizer_elements"] == result.counts["parameters"]


LLAMA_ROWS = {
    "model.layers.0.self_attn.q_proj.weight": 0,
    "model.layers.1.mlp.up_proj.weight": 0,
    "model.layers.1.mlp.gate_proj.weight": 0,
    "model.layers.1.mlp.down_proj.weight": 1,  # an FFN neuron is a column of down_proj
    "model.layers.0.input_layernorm.weight": 0,
}
GPT2_ROWS = {
    "transformer.wte.weight": 0,  # tied with the LM head: both uses must see the trained rows
    "transformer.h.0.mlp.c_fc.weight": 1,  # Conv1D [in, out]: output units are axis 1
    "transformer.h.0.mlp.c_fc.bias": 0,
    "transformer.h.1.attn.c_attn.weight": 1,
    "transformer.h.1.mlp.c_proj.weight": 0,  # FFN neuron of the down projection: its input row
}


@pytest.mark.parametrize(("arch", "rows"), [("llama", LLAMA_ROWS), ("gpt2", GPT2_ROWS)])
def test_train_mask_updates_only_selected_rows(zoo, corpus, tmp_path, arch, rows):
    # fp32 weights, so that every update of a selected row is visible in the output.
    base = zoo.get(arch, dtype=torch.float32).base
    mask = _random_row_mask(base, rows, 0.1, seed=5)
    mask.save(tmp_path / "n.mask")
    recipe = MaskedCPTRecipe(_config(base, corpus, tmp_path / "out", train_mask=str(tmp_path / "n.mask")))
    recipe.setup()
    recipe.train()
    result = recipe.save()
    recipe.cleanup()
    inputs, outputs = load_all(base), load_all(tmp_path / "out")
    selected_elements = 0
    for name in inputs:
        if name not in mask.entries:
            assert torch.equal(_bits(outputs[name]), _bits(inputs[name])), name
            continue
        e = mask.entries[name]
        sel = e.dense()
        assert torch.equal(_bits(outputs[name])[~sel], _bits(inputs[name])[~sel]), name
        changed = (outputs[name] != inputs[name]).movedim(e.axis, 0).reshape(e.units, -1).any(dim=1)
        assert torch.equal(changed, e.selected), name  # every selected row changed, no other
        selected_elements += int(sel.sum())
    # Optimizer state is the selection: two fp32 moments per selected element, a step per slice.
    state = recipe.optimizer.state.values()
    assert sum(s["exp_avg"].numel() for s in state) == selected_elements
    assert result.optimizer_state_bytes == 2 * 4 * selected_elements + 4 * len(rows)
    assert result.counts["trainable"] == selected_elements


def test_trainable_glob_trains_whole_tensors_only(zoo, cli, corpus, tmp_path):
    base = zoo.get("qwen2").base
    r = cli(
        "train",
        base,
        "--data",
        corpus,
        "-o",
        tmp_path / "out",
        "--trainable",
        "*.mlp.up_proj.weight",
        "--trainable",
        "model.norm.weight",
        "--max-steps",
        "3",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--lr",
        "1e-2",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    inputs, outputs = load_all(base), load_all(tmp_path / "out")
    trained = {n for n in inputs if not torch.equal(_bits(inputs[n]), _bits(outputs[n]))}
    assert trained == {n for n in inputs if n.endswith("mlp.up_proj.weight")} | {"model.norm.weight"}
    assert r.json()["counts"]["trainable"] == sum(inputs[n].numel() for n in trained)


class _Crash(Exception):
    pass


@pytest.mark.parametrize(("arch", "extra"), [("gpt2", {}), ("llama", {"mask": LLAMA_ROWS})], ids=["gpt2-full-dropout", "llama-row-mask"])
def test_resume_reproduces_uninterrupted_run(zoo, corpus, tmp_path, arch, extra):
    base = zoo.get(arch).base
    kw = dict(max_steps=6, grad_accum=2, warmup=2, save_every=2, seed=11)
    if "mask" in extra:
        _random_row_mask(base, extra["mask"], 0.2, seed=1).save(tmp_path / "n.mask")
        kw["train_mask"] = str(tmp_path / "n.mask")
    whole = run_training(_config(base, corpus, tmp_path / "straight", **kw))

    def crash_after_step_5(event):
        if isinstance(event, StepEvent) and event.step == 5:
            raise _Crash

    with pytest.raises(_Crash):
        run_training(_config(base, corpus, tmp_path / "resumed", **kw), crash_after_step_5)
    assert not (tmp_path / "resumed").exists()
    state = tmp_path / ".resumed.neuroloc-run"
    assert default_run_dir(tmp_path / "resumed") == state
    assert sorted(p.name for p in state.glob("step-*")) == ["step-00000002", "step-00000004"]
    again = run_training(_config(base, corpus, tmp_path / "resumed", resume=True, **kw))
    # the start of the run is recalled from its log: the weights it was measured on are gone
    assert again.perplexity == whole.perplexity and again.first_loss == whole.first_loss
    straight, resumed = load_all(tmp_path / "straight"), load_all(tmp_path / "resumed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(_bits(straight[name]), _bits(resumed[name])), name
    log = [json.loads(line) for line in (tmp_path / "resumed" / "train_log.jsonl").read_text().splitlines()]
    assert [e["step"] for e in log if e["event"] == "step"] == [1, 2, 3, 4, 5, 6]
    # completed: the run folders of both runs are gone, their logs live in the outputs
    assert not state.exists() and not default_run_dir(tmp_path / "straight").exists()


def test_resume_refuses_other_settings(zoo, corpus, tmp_path, cli):
    base = zoo.get("llama").base
    run_training(_config(base, corpus, tmp_path / "a", max_steps=3, save_every=2, keep_state=True))
    state = default_run_dir(tmp_path / "a")
    r = cli(
        "train",
        base,
        "--data",
        corpus,
        "-o",
        tmp_path / "a2",
        "--run-dir",
        state,
        "--resume",
        "--max-steps",
        "3",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--lr",
        "2e-2",
        "--weight-decay",
        "0.1",
        "--eval-share",
        "0.1",
    )
    assert r.exit_code == 2
    assert f"--resume: {state / 'step-00000002'} was made with a different hyper_parameters" in r.stderr
    assert not (tmp_path / "a2").exists()


def _assert_nothing_written(tmp_path: Path) -> None:
    assert not (tmp_path / "out").exists() and not default_run_dir(tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.neuroloc-tmp-*"))


def test_mask_from_another_architecture(zoo, cli, corpus, tmp_path):
    gpt2_mask = _random_row_mask(zoo.get("gpt2").base, GPT2_ROWS, 0.1, seed=0)
    gpt2_mask.save(tmp_path / "gpt2.mask")
    base = zoo.get("llama").base
    r = cli("train", base, "--data", corpus, "-o", tmp_path / "out", "--train-mask", tmp_path / "gpt2.mask", "--seq-len", "128")
    assert r.exit_code == 3
    assert r.stderr.strip() == (
        f"error: {tmp_path / 'gpt2.mask'}: mask tensor transformer.wte.weight is not in {base} (the mask was made for another architecture)"
    )
    _assert_nothing_written(tmp_path)


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "empty corpus (no text)"), ('{"text": "The fox."}\n', "corpus has 5 tokens, shorter than one sequence of 128 tokens")],
    ids=["empty", "short"],
)
def test_bad_corpus_writes_nothing(zoo, cli, tmp_path, content, message):
    data = tmp_path / "c.jsonl"
    data.write_text(content)
    r = cli("train", zoo.get("llama").base, "--data", data, "-o", tmp_path / "out", "--seq-len", "128")
    assert r.exit_code == 3
    assert r.stderr.startswith(f"error: {data}: {message}")
    assert len(r.stderr.strip().splitlines()) == 1
    _assert_nothing_written(tmp_path)


def test_missing_tokenizer(zoo, cli, corpus, tmp_path):
    import shutil

    model = tmp_path / "notok"
    shutil.copytree(zoo.get("llama").base, model, ignore=shutil.ignore_patterns("tokenizer*", "special_tokens_map.json"))
    r = cli("train", model, "--data", corpus, "-o", tmp_path / "out", "--seq-len", "128")
    assert r.exit_code == 3
    assert r.stderr.strip() == (
        f"error: {model}: no tokenizer (tokenizer.json or tokenizer_config.json) in the model folder "
        "(copy the base model's tokenizer files into it)"
    )
    _assert_nothing_written(tmp_path)


def test_config_file_with_flag_override(zoo, cli, corpus, tmp_path):
    recipe = tmp_path / "train.yaml"
    recipe.write_text(f"model: {zoo.get('llama').base}\ndata: [{corpus}]\noutput: ./out\nseq_len: 32\nbatch_size: 2\nmax_steps: 9\n")
    r = cli("train", "--config", recipe, "--max-steps", "2", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["steps"] == 2 and Path(r.json()["output"]) == tmp_path / "out"


def test_dry_run_plans_without_writing(zoo, cli, corpus, tmp_path):
    base = zoo.get("llama").base
    mask = _random_row_mask(base, LLAMA_ROWS, 0.25, seed=2)
    mask.save(tmp_path / "n.mask")
    r = cli(
        "train",
        base,
        "--data",
        corpus,
        "-o",
        tmp_path / "out",
        "--train-mask",
        tmp_path / "n.mask",
        "--seq-len",
        "32",
        "--batch-size",
        "2",
        "--grad-accum",
        "3",
        "--max-tokens",
        "1000",
        "--dry-run",
        "--json",
    )
    assert r.exit_code == 0, r.stderr
    doc = r.json()
    assert doc["valid"] is True
    assert doc["trainable"] == mask.selected
    assert doc["total_steps"] == -(-1000 // (2 * 3 * 32))  # ceil: the smaller limit wins
    # what AdamW will hold: two fp32 moments per trainable element, a 4-byte step per slice
    assert doc["optimizer_state_bytes"] == 8 * mask.selected + 4 * len(mask.entries)
    _assert_nothing_written(tmp_path)


def test_seq_len_beyond_model_positions(zoo, cli, corpus, tmp_path):
    r = cli("train", zoo.get("llama").base, "--data", corpus, "-o", tmp_path / "out", "--seq-len", "1024")
    assert r.exit_code == 2
    assert r.stderr.strip() == "error: --seq-len 1024 exceeds the model's 256 positions (use --seq-len 256 or less)"


def test_element_train_mask_moves_only_selected_elements(zoo, corpus, tmp_path):
    base = zoo.get("llama", dtype=torch.float32).base
    inputs = load_all(base)
    gen = torch.Generator().manual_seed(4)
    names = ["model.layers.0.mlp.down_proj.weight", "model.layers.1.self_attn.v_proj.weight"]
    entries = {n: MaskEntry(tuple(inputs[n].shape), None, torch.rand(inputs[n].shape, generator=gen) < 0.2) for n in names}
    Mask("element", entries).save(tmp_path / "e.mask")
    result = run_training(_config(base, corpus, tmp_path / "out", train_mask=str(tmp_path / "e.mask"), weight_decay=0.5))
    outputs = load_all(tmp_path / "out")
    for name in inputs:
        keep = ~entries[name].selected if name in entries else torch.ones_like(inputs[name], dtype=torch.bool)
        assert torch.equal(_bits(outputs[name])[keep], _bits(inputs[name])[keep]), name
    for name, e in entries.items():
        assert (outputs[name][e.selected] != inputs[name][e.selected]).all(), name
    assert result.counts["trainable"] == sum(int(e.selected.sum()) for e in entries.values())
    assert result.counts["optimizer_elements"] == sum(inputs[n].numel() for n in names)


def test_checkpoint_storing_both_names_of_tied_weights_is_refused(zoo, cli, corpus, tmp_path):
    """A tied model trains one parameter; a checkpoint that stores it under two names would
    come out with the pair written apart, so it is refused before anything is written."""
    import shutil

    from safetensors.torch import save_file

    fam = zoo.get("llama", tie=True, sharded=False)
    model = tmp_path / "tied-both"
    shutil.copytree(fam.base, model)
    tensors = load_all(fam.base)
    tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    r = cli("train", model, "--data", corpus, "-o", tmp_path / "out", "--max-steps", "1", "--seq-len", "32")
    assert r.exit_code == 3
    assert f"{model}: stores both model.embed_tokens.weight and lm_head.weight, which the model ties into one parameter" in r.stderr
    assert not (tmp_path / "out").exists()
    r = cli("train", fam.base, "--data", corpus, "-o", tmp_path / "ok", "--max-steps", "1", "--seq-len", "32")
    assert r.exit_code == 0, r.stderr
