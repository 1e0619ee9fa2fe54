"""How many tokens a model holds, and generation lengths that fit in it.

lm-eval generates with the prompt and the new tokens in one window of the model's positions:
it refuses (with an AssertionError from deep inside a run) a generation length that fills the
window, and cuts prompts from the left to make room for the rest. So a generation length is
checked against the model's positions before any model loads: one the user asked for must fit,
and the default one is lowered to half the window, leaving the other half to the prompt.
"""

from __future__ import annotations

from pathlib import Path

from neuroloc_cli.errors import UsageError

# lm-eval's HFLM generates this many tokens when a task does not say; translations too.
DEFAULT_GEN_TOKS = 256


def fitting_gen_toks(positions: int | None) -> int | None:
    """The most tokens a default generation may take: half the model's positions (None: no limit known)."""
    return None if positions is None else max(1, positions // 2)


def check_max_gen_toks(max_gen_toks: int | None, model: Path, positions: int | None) -> None:
    """Refuse a --max-gen-toks that leaves no room for the prompt in `model`'s positions.

    Raises:
        UsageError: naming --max-gen-toks, the model and its positions.
    """
    if max_gen_toks is None or positions is None or max_gen_toks < positions:
        return
    raise UsageError(
        f"--max-gen-toks {max_gen_toks}: {model} holds {positions} positions, prompt and generated tokens together",
        hint=f"pass less than {positions}, e.g. {fitting_gen_toks(positions)}, or leave it out to fit the model",
    )
