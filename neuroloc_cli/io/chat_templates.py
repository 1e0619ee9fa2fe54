"""Chat templates a merge recipe can name (`chat_template:`), and how a value is read.

A recipe's `chat_template` is either a name below (mergekit 0.1.5 names its shipped
templates the same way), `auto`, or a literal Jinja template (a string containing `{%` or
`{{`). The result is written into the output's `tokenizer_config.json`
(`io.output.copy_side_files`).

`auto` is the template most common among the input models' `tokenizer_config.json`
`chat_template` fields (compared after stripping surrounding whitespace); among equally
common ones the first in the order of the inputs wins, and where no input has one nothing is
written, so the output keeps the template of the tokenizer files it copies, as in mergekit
0.1.5.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

AUTO = "auto"

# ChatML: each turn is `<|im_start|>ROLE\nCONTENT<|im_end|>\n`; a generation prompt opens an
# assistant turn.
_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

# Llama 3, as Meta documents it ("Meta Llama 3" model card and prompt formats,
# llama.com/docs/model-cards-and-prompt-formats/meta-llama-3/): `<|begin_of_text|>` once,
# then each turn `<|start_header_id|>ROLE<|end_header_id|>\n\nCONTENT<|eot_id|>` (content
# trimmed); a generation prompt opens the assistant's header.
_LLAMA3 = (
    "{{ '<|begin_of_text|>' }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

# Mistral instruct, as Mistral AI documents it (the Mistral-7B-Instruct model cards' "Instruction
# format", huggingface.co/mistralai/Mistral-7B-Instruct-v0.1, and docs.mistral.ai's guide to
# tokenization): `<s>` once, each user turn `[INST] CONTENT [/INST]`, each assistant turn
# `CONTENT</s>`. The format has no system role; a system message is put before the first user
# message, separated by a blank line.
_MISTRAL = (
    "{{ '<s>' }}"
    "{% set system = namespace(text='') %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% set system.text = message['content'] + '\\n\\n' %}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' + system.text + message['content'] + ' [/INST]' }}"
    "{% set system.text = '' %}"
    "{% else %}{{ message['content'] + '</s>' }}{% endif %}"
    "{% endfor %}"
)

# Alpaca, as the Stanford Alpaca repository documents its prompt (README, "Data Release",
# github.com/tatsu-lab/stanford_alpaca): a preamble, then `### Instruction:\n...` and
# `### Response:\n...` sections separated by blank lines. A system message replaces the
# preamble; a generation prompt opens a response section.
_ALPACA_PREAMBLE = "Below is an instruction that describes a task. Write a response that appropriately completes the request."
_ALPACA = (
    "{% if messages and messages[0]['role'] == 'system' %}{{ messages[0]['content'] + '\\n\\n' }}"
    "{% set turns = messages[1:] %}"
    "{% else %}{{ '" + _ALPACA_PREAMBLE + "\\n\\n' }}{% set turns = messages %}{% endif %}"
    "{% for message in turns %}"
    "{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
    "{% else %}{{ '### Response:\\n' + message['content'] + '\\n\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
)

# EXAONE 3.x, as LG AI Research documents it (the EXAONE-3.0-7.8B-Instruct and EXAONE-3.5 model
# cards, huggingface.co/LGAI-EXAONE): a role tag `[|system|]`, `[|user|]` or `[|assistant|]`
# right before the content; a system or assistant turn ends with `[|endofturn|]` and a newline,
# a user turn with a newline only. The released template opens with an empty system turn when
# the conversation has no system message; a generation prompt is the assistant's tag.
_EXAONE = (
    "{% if messages and messages[0]['role'] != 'system' %}{{ '[|system|][|endofturn|]\\n' }}{% endif %}"
    "{% for message in messages %}"
    "{{ '[|' + message['role'] + '|]' + message['content'] }}"
    "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
)

CHAT_TEMPLATES: dict[str, str] = {"chatml": _CHATML, "alpaca": _ALPACA, "llama3": _LLAMA3, "mistral": _MISTRAL, "exaone": _EXAONE}


def is_literal_template(value: str) -> bool:
    """A Jinja template written out, rather than a name."""
    return "{%" in value or "{{" in value


def model_chat_template(folder: Path) -> str | None:
    """A model folder's chat template, stripped, or None: where transformers reads it, first
    `chat_template.jinja` (what recent releases save), then `chat_template.json`, then the
    `chat_template` field of `tokenizer_config.json`.

    A list of named templates (`[{"name": ..., "template": ...}]`) gives the one named
    `default`. A missing or unreadable file gives None, as a model without a template does.
    """
    folder = Path(folder)
    try:
        text = (folder / "chat_template.jinja").read_text(encoding="utf-8")
        if text.strip():
            return text.strip()
    except OSError:
        pass
    for name in ("chat_template.json", "tokenizer_config.json"):
        try:
            doc = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        found = _template_of(doc)
        if found is not None:
            return found
    return None


def _template_of(doc: object) -> str | None:
    template = doc.get("chat_template") if isinstance(doc, dict) else None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    if isinstance(template, dict):
        template = template.get("default")
    return template.strip() if isinstance(template, str) and template.strip() else None


def auto_chat_template(models: Sequence[Path]) -> str | None:
    """The template most common among `models`' tokenizer configs; on a tie the first of them
    in `models`' order; None where none has one."""
    found = [t for t in (model_chat_template(m) for m in models) if t is not None]
    return Counter(found).most_common(1)[0][0] if found else None  # most_common keeps first-seen order on ties


def resolve_chat_template(value: str, models: Sequence[Path] | None = None) -> str | None:
    """The Jinja text for a recipe's `chat_template` value.

    Args:
        value: a name, `auto`, or a literal template.
        models: the input model folders, which `auto` reads; None when only checking the
            value (recipe validation): `auto` is then accepted and gives None.

    Returns:
        The template, or None for `auto` when no input has one (nothing is to be written).

    Raises:
        ValueError: neither a known name nor a literal template; the message lists the names.
    """
    if is_literal_template(value):
        return value
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if value == AUTO:
        return None if models is None else auto_chat_template(models)
    names = ", ".join([*CHAT_TEMPLATES, AUTO])
    raise ValueError(f"unknown chat template {value!r}; give one of: {names}, or the Jinja template itself (containing '{{%' or '{{{{')")
