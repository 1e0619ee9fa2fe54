"""Chat templates a merge recipe can name (`chat_template:`), and how a value is read.

A recipe's `chat_template` is either a name below (mergekit 0.1.5 names its shipped
templates the same way) or a literal Jinja template (a string containing `{%` or `{{`). The
result is written into the output's `tokenizer_config.json` (`io.output.copy_side_files`).
"""

from __future__ import annotations

# ChatML: each turn is `<|im_start|>ROLE\nCONTENT<|im_end|>\n`; a generation prompt opens an
# assistant turn.
_CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

CHAT_TEMPLATES: dict[str, str] = {"chatml": _CHATML}

# Names mergekit 0.1.5 knows that neuroloc does not ship: named in the refusal.
_MERGEKIT_ONLY = ("alpaca", "auto", "exaone", "llama3", "mistral")


def is_literal_template(value: str) -> bool:
    """A Jinja template written out, rather than a name."""
    return "{%" in value or "{{" in value


def resolve_chat_template(value: str) -> str:
    """The Jinja text for a recipe's `chat_template` value.

    Raises:
        ValueError: neither a known name nor a literal template; the message lists the names.
    """
    if is_literal_template(value):
        return value
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    names = ", ".join(CHAT_TEMPLATES)
    why = " (a mergekit name that neuroloc does not ship)" if value in _MERGEKIT_ONLY else ""
    raise ValueError(
        f"unknown chat template {value!r}{why}; give one of: {names}, or the Jinja template itself (containing '{{%' or '{{{{')"
    )
