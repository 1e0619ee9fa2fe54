"""mergekit recipes as they are written in the wild: per-layer lists outside the blocks,
per-model parameters a method ignores, `chat_template:`, and `.bin` checkpoints (`convert`).

Expected values are computed here from the formulas; the reference behaviour is mergekit 0.1.5's.
"""

from __future__ import annotations

import json

import pytest
import torch

from neuroloc_cli.arch import layer_index, layer_position
from tests.conftest import write_recipe
from tests.helpers import load_all


def _f64(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() for k, v in tensors.items()}


@pytest.mark.parametrize(
    ("name", "t"),
    [
        ("model.embed_tokens.weight", 0.0),
        ("model.layers.0.mlp.up_proj.weight", 0.0),
        ("model.layers.3.mlp.up_proj.weight", 1.0),
        ("model.norm.weight", 0.0),  # mergekit 0.1.5: post-layer weights at t = 0
        ("lm_head.weight", 0.0),
        ("transformer.ln_f.weight", 0.0),
    ],
)
def test_layer_position_outside_blocks_is_zero(name, t):
    assert layer_position(name, 4) == t


def test_per_layer_list_gives_norm_and_head_the_first_value(zoo, cli, tmp_path):
    """weight [0.1, 0.7] over 2 layers: layer 0 → 0.1, layer 1 → 0.7, and embeddings, final
    norm and LM head → 0.1 (mergekit 0.1.5 reads them at t = 0)."""
    fam = zoo.get("llama", tie=False)
    recipe = write_recipe(
        tmp_path,
        f"""
merge_method: task_arithmetic
base_model: {fam.base}
models:
  - model: {fam.ft1}
    parameters: {{weight: [0.1, 0.7]}}
out_dtype: float32
""",
    )
    r = cli("merge", recipe, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    merged = load_all(tmp_path / "out")
    base, ft = _f64(load_all(fam.base)), _f64(load_all(fam.ft1))
    assert {"model.norm.weight", "lm_head.weight"} <= set(base)
    for name in base:
        w = {None: 0.1, 0: 0.1, 1: 0.7}[layer_index(name)]
        torch.testing.assert_close(merged[name].double(), base[name] + w * (ft[name] - base[name]), rtol=1e-6, atol=1e-7, msg=name)


def _slerp_recipe(fam, tmp_path, param: str = "weight"):
    return write_recipe(
        tmp_path,
        f"""
merge_method: slerp
base_model: {fam.base}
models:
  - model: {fam.base}
  - model: {fam.ft1}
    parameters: {{{param}: 0.5}}
parameters: {{t: 0.5}}
""",
    )


def test_unused_model_parameter_is_a_warning(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    recipe = _slerp_recipe(fam, tmp_path)
    line = "warning: models[1].parameters.weight: slerp does not use it (ignored)"
    r = cli("recipe", "validate", recipe)
    assert r.exit_code == 0, r.stderr
    assert line in r.stderr.splitlines()
    r = cli("recipe", "validate", recipe, "--json")
    assert r.exit_code == 0
    assert r.json()["warnings"] == ["models[1].parameters.weight: slerp does not use it (ignored)"]
    r = cli("merge", recipe, "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.stderr
    assert r.json()["warnings"] == ["models[1].parameters.weight: slerp does not use it (ignored)"]
    assert line in r.stderr.splitlines()


def test_unknown_names_stay_errors(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    r = cli("recipe", "validate", _slerp_recipe(fam, tmp_path, param="wieght"))
    assert r.exit_code == 2
    assert "models[1].parameters.wieght: slerp has no parameter 'wieght'" in r.stderr
    top = write_recipe(
        tmp_path,
        f"merge_method: slerp\nbase_model: {fam.base}\nmodels:\n  - model: {fam.ft1}\nparameters: {{t: 0.5, weight: 1}}\n",
        "top.yaml",
    )
    r = cli("recipe", "validate", top)
    assert r.exit_code == 2
    assert "parameters.weight: slerp has no parameter 'weight'" in r.stderr


CHATML_RENDERED = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize(
    ("value", "rendered"),
    [
        ("chatml", CHATML_RENDERED),
        ("\"{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\\n{% endfor %}\"", "[user] hi\n"),
    ],
)
def test_chat_template_is_written_and_used(zoo, cli, tmp_path, value, rendered):
    from transformers import AutoTokenizer

    fam = zoo.get("llama")
    recipe = write_recipe(
        tmp_path, f"merge_method: linear\nmodels:\n  - model: {fam.base}\n    parameters: {{weight: 1.0}}\nchat_template: {value}\n"
    )
    r = cli("merge", recipe, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    base_config = json.loads((fam.base / "tokenizer_config.json").read_text())
    assert {k: v for k, v in config.items() if k != "chat_template"} == {k: v for k, v in base_config.items() if k != "chat_template"}
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    got = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=value == "chatml")
    assert got == rendered


def test_unknown_chat_template_is_refused(zoo, cli, tmp_path):
    fam = zoo.get("llama")
    recipe = write_recipe(
        tmp_path, f"merge_method: linear\nmodels:\n  - model: {fam.base}\n    parameters: {{weight: 1.0}}\nchat_template: vicuna\n"
    )
    r = cli("recipe", "validate", recipe)
    assert r.exit_code == 2
    assert "chat_template: unknown chat template 'vicuna'; give one of: chatml" in r.stderr


def _bin_folder(zoo, tmp_path, sharded: bool):
    """The zoo's base as a `.bin` checkpoint, as older `save_pretrained(..., safe_serialization=False)`
    wrote it (transformers 5 always writes safetensors, so the pickles are written here)."""
    fam = zoo.get("llama", sharded=False, tie=False)
    tensors = load_all(fam.base)
    folder = tmp_path / "bin"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((fam.base / name).read_bytes())
    if not sharded:
        torch.save(tensors, folder / "pytorch_model.bin")
        return fam, tensors, folder
    names = sorted(tensors)
    parts = [names[: len(names) // 2], names[len(names) // 2 :]]
    weight_map = {}
    for i, part in enumerate(parts):
        file = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        torch.save({n: tensors[n] for n in part}, folder / file)
        weight_map |= {n: file for n in part}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return fam, tensors, folder


@pytest.mark.parametrize("sharded", [False, True])
def test_convert_round_trip(zoo, cli, tmp_path, sharded):
    from transformers import AutoModelForCausalLM

    fam, tensors, folder = _bin_folder(zoo, tmp_path, sharded)
    r = cli("convert", folder, "-o", tmp_path / "out", "--json")
    assert r.exit_code == 0, r.stderr
    got = load_all(tmp_path / "out")
    assert got.keys() == tensors.keys()
    for name, t in tensors.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name
    assert (tmp_path / "out" / "tokenizer_config.json").read_bytes() == (fam.base / "tokenizer_config.json").read_bytes()
    AutoModelForCausalLM.from_pretrained(tmp_path / "out")  # loads as a model
    r = cli("inspect", tmp_path / "out")
    assert r.exit_code == 0, r.stderr


class _NotATensor:
    pass


def test_convert_refuses_objects(cli, tmp_path):
    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"w": torch.zeros(2), "x": _NotATensor()}, folder / "pytorch_model.bin")
    r = cli("convert", folder, "-o", tmp_path / "out")
    assert r.exit_code == 3
    assert r.stderr.startswith(f"error: {folder / 'pytorch_model.bin'}: holds objects other than tensors")
    assert len(r.stderr.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil"]


def test_bin_elsewhere_points_to_convert(zoo, cli, tmp_path):
    _, _, folder = _bin_folder(zoo, tmp_path, sharded=False)
    r = cli("inspect", folder)
    assert r.exit_code == 3
    assert "holds only PyTorch .bin weights" in r.stderr and f"neuroloc convert {folder} -o OUT" in r.stderr


def test_exponent_floats_read_as_numbers():
    """Published recipes write `epsilon: 1e-4`; YAML 1.1 (PyYAML's default) would make it a
    string and the recipe an error."""
    from neuroloc_cli.config_models import load_yaml

    doc = load_yaml("a: 1e-4\nb: 5E+3\nc: '1e-4'\nd: 1.5\ne: e10\n")
    assert doc == {"a": 1e-4, "b": 5000.0, "c": "1e-4", "d": 1.5, "e": "e10"}


# -- named chat templates and `auto` ------------------------------------------------------------

CONVERSATION = [{"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello!"}]


def _render(template: str, messages, add_generation_prompt: bool = False) -> str:
    """Render as transformers' `apply_chat_template` does (a sandboxed Jinja environment with
    `trim_blocks` and `lstrip_blocks`)."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize(
    ("name", "rendered"),
    [
        # Meta's Llama 3 prompt format: headers, a blank line, content, <|eot_id|>
        (
            "llama3",
            "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi there<|eot_id|>"
            "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>",
        ),
        # Mistral's instruction format: <s>[INST] user [/INST]assistant</s>
        ("mistral", "<s>[INST] Hi there [/INST]Hello!</s>"),
        # Stanford Alpaca's prompt: the preamble, then instruction and response sections
        (
            "alpaca",
            "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
            "### Instruction:\nHi there\n\n### Response:\nHello!\n\n",
        ),
        ("chatml", "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\nHello!<|im_end|>\n"),
    ],
)
def test_named_chat_template_renders_the_family_format(name, rendered):
    from neuroloc_cli.io.chat_templates import resolve_chat_template

    assert _render(resolve_chat_template(name), CONVERSATION) == rendered


def test_named_chat_templates_with_a_system_message_and_generation_prompt():
    from neuroloc_cli.io.chat_templates import resolve_chat_template

    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert _render(resolve_chat_template("llama3"), chat, True) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    assert _render(resolve_chat_template("mistral"), chat) == "<s>[INST] Be brief.\n\nHi [/INST]"
    assert _render(resolve_chat_template("alpaca"), chat, True) == "Be brief.\n\n### Instruction:\nHi\n\n### Response:\n"


def _tokenizer_dir(root, name, template):
    folder = root / name
    folder.mkdir()
    doc = {"tokenizer_class": "PreTrainedTokenizerFast"} | ({} if template is None else {"chat_template": template})
    (folder / "tokenizer_config.json").write_text(json.dumps(doc))
    return folder


def test_auto_chat_template_picks_the_majority_then_the_first(tmp_path):
    from neuroloc_cli.io.chat_templates import resolve_chat_template

    a, b = "{{ 'A' }}", "{{ 'B' }}"
    # three inputs: B twice (once with surrounding whitespace, stripped), A once, one without any
    dirs = [_tokenizer_dir(tmp_path, n, t) for n, t in (("m1", a), ("m2", b + "\n"), ("m3", None), ("m4", b))]
    assert resolve_chat_template("auto", dirs) == b
    # a tie: the first of the inputs in order
    assert resolve_chat_template("auto", dirs[:2]) == a
    # a list of named templates gives the `default` one
    named = _tokenizer_dir(tmp_path, "m5", [{"name": "tool_use", "template": a}, {"name": "default", "template": b}])
    assert resolve_chat_template("auto", [named]) == b
    # no input has one: nothing to write; validation alone (no models) accepts the name
    assert resolve_chat_template("auto", [dirs[2], tmp_path / "missing"]) is None
    assert resolve_chat_template("auto") is None


def test_auto_chat_template_in_a_merge_takes_the_inputs_majority(zoo, cli, tmp_path):
    import shutil

    fam = zoo.get("llama")
    folders = []
    for i, (src, template) in enumerate(((fam.base, None), (fam.ft1, "{{ 'A' }}"), (fam.ft2, "{{ 'A' }}"))):
        folder = tmp_path / f"m{i}"
        shutil.copytree(src, folder)
        if template:
            config = json.loads((folder / "tokenizer_config.json").read_text())
            (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": template}))
        folders.append(folder)
    models = "".join(f"  - model: {f}\n    parameters: {{weight: 1.0}}\n" for f in folders)
    recipe = write_recipe(tmp_path, f"merge_method: linear\nmodels:\n{models}chat_template: auto\n")
    r = cli("merge", recipe, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["chat_template"] == "{{ 'A' }}"


@pytest.mark.parametrize("tie", [True, False])
def test_convert_drops_a_shared_head_only_when_the_config_ties_it(cli, tmp_path, tie):
    folder = tmp_path / "bin"
    folder.mkdir()
    w = torch.randn(8, 4)
    torch.save({"lm_head.weight": w, "model.embed_tokens.weight": w, "model.norm.weight": torch.ones(4)}, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"tie_word_embeddings": tie}))
    r = cli("convert", folder, "-o", tmp_path / "out")
    assert r.exit_code == 0, r.stderr
    got = load_all(tmp_path / "out")
    assert torch.equal(got["model.embed_tokens.weight"], w)  # the embedding is kept, whatever the file order
    assert ("lm_head.weight" in got) is not tie


def test_auto_reads_a_saved_chat_template_jinja(tmp_path):
    from neuroloc_cli.io.chat_templates import auto_chat_template

    folders = []
    for i, (where, template) in enumerate((("jinja", "{{ 'J' }}"), ("jinja", "{{ 'J' }}"), ("config", "{{ 'C' }}"))):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        if where == "jinja":  # what recent transformers releases save
            (folder / "chat_template.jinja").write_text(template + "\n")
        else:
            (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
        folders.append(folder)
    assert auto_chat_template(folders) == "{{ 'J' }}"
