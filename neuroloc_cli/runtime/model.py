"""A checkpoint folder as a transformers causal LM, and the map between their tensor names.

Every command that runs a checkpoint's model loads it here: `train`, the data locators
(`locate gradient`, `locate lape`) and `eval` (which hands the loaded model to lm-eval) call
`load_model`, `--dry-run` plans from `model_skeleton` (names and shapes only), and parameters
are reached by checkpoint name through `parameter_names`.

Why a map is needed: a checkpoint names its tensors as `save_pretrained` wrote them, and the
module built from it may name the same parameter differently (a GPT-2 checkpoint saved
without the `transformer.` prefix) or tie two stored names into one parameter (the embedding
and the LM head). Masks, selections, importance files and written shards all use checkpoint
names.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from neuroloc_cli.errors import InputError
from neuroloc_cli.io.checkpoint import Checkpoint


def load_model(path: Path, *, device: torch.device | str = "cpu", dtype: torch.dtype | str = torch.float32) -> nn.Module:
    """The checkpoint folder's causal LM with its weights, in `dtype` on `device`.

    Args:
        dtype: a torch dtype, or "auto" for the one the checkpoint's config names.

    Raises:
        InputError: transformers cannot build or load it (an unknown architecture, a bad config).
    """
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own progress bar is on stderr; one is enough
    with _model_errors(path):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device)


def model_skeleton(path: Path) -> nn.Module:
    """The checkpoint folder's causal LM on the `meta` device: its parameter names, shapes and
    ties, without reading a weight or allocating memory (what `--dry-run` plans from)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with _model_errors(path), torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(str(path)))


@contextmanager
def _model_errors(path: Path) -> Iterator[None]:
    """transformers' many error types (unknown architecture, bad config) as one input error line."""
    try:
        yield
    except Exception as e:
        raise InputError(f"{path}: cannot load the model ({type(e).__name__}: {' '.join(str(e).split())[:300]})") from None


def parameter_names(model: nn.Module, checkpoint: Checkpoint) -> dict[str, str]:
    """Checkpoint tensor name -> the model's parameter name, for every floating tensor of the
    checkpoint that the model has (buffers and integer tensors have no parameter).

    Raises:
        InputError: the checkpoint stores two tensors that the model ties into one parameter;
            updating that parameter would write the pair apart.
    """
    floating = [n for n, info in checkpoint.tensors.items() if info.torch_dtype.is_floating_point]
    names = _resolve_names(model, floating)
    tied = _tied_duplicates(model, names)
    if tied:
        kept, alias = tied[0]
        raise InputError(
            f"{checkpoint.path}: stores both {kept} and {alias}, which the model ties into one parameter",
            hint="re-save it with save_pretrained (which stores the pair once), or untie the weights in config.json",
        )
    return names


def _resolve_names(model: nn.Module, names: list[str]) -> dict[str, str]:
    """Checkpoint tensor name -> model parameter name, for the names the model has, with or
    without its `base_model_prefix`."""
    params = dict(model.named_parameters(remove_duplicate=False))  # tied names too
    prefix = getattr(model, "base_model_prefix", "")
    out = {}
    for n in names:
        if n in params:
            out[n] = n
        elif prefix and f"{prefix}.{n}" in params:
            out[n] = f"{prefix}.{n}"
    return out


def _tied_duplicates(model: nn.Module, names: dict[str, str]) -> list[tuple[str, str]]:
    """Pairs of checkpoint tensors that the model ties into one parameter (a checkpoint that
    stores both `model.embed_tokens.weight` and `lm_head.weight` with tied embeddings).

    Args:
        names: from `_resolve_names` (checkpoint name -> model parameter name).
    """
    groups: dict[int, list[str]] = {}
    for param_name, p in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(p), []).append(param_name)
    by_param = {v: k for k, v in names.items()}
    pairs = []
    for param_names in groups.values():
        stored = [by_param[n] for n in param_names if n in by_param]
        pairs += [(stored[0], other) for other in stored[1:]]
    return pairs
