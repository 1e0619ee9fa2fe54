"""Gradient importance of every element per language (linguistic regions, Zhang et al. 2024).

For each language's corpus, the language-modelling loss of `samples` packed rows is
back-propagated batch by batch with no optimizer step, and the gradients `g_b` of the scored
parameters are accumulated in float32. The importance of an element is then

- `signed` (the default, the public code's order): `|Σ_b g_b ⊙ θ|`, the first-order estimate
  of the loss change when the element is zeroed, over all rows together;
- `abs` (`--abs-per-batch`): `Σ_b |g_b ⊙ θ|`, so that batches whose gradients disagree do not
  cancel;
- `fisher` (`--score fisher`): `Σ_b g_b²`, the diagonal empirical Fisher.

It lives in `train`, not `locate`, because it runs the model: building it, tokenizing and
packing rows are `train.model` and `train.data`'s jobs, which `locate` may not import.
`locate.gradient` turns these scores into masks.

Each batch's loss is the mean next-token NLL over its targets (what a Hugging Face model
returns for `labels=`), as in the public code; the model runs in evaluation mode, so that a
model with dropout gives the same scores twice.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from neuroloc_cli.arch import NameFilter
from neuroloc_cli.errors import InputError, UsageError
from neuroloc_cli.io.checkpoint import Checkpoint, model_positions
from neuroloc_cli.train.config import DEFAULT_SEQ_LEN
from neuroloc_cli.train.data import framing_of, load_tokenizer, pack, read_documents, tokenize
from neuroloc_cli.train.model import load_model, parameter_names

SCORES = ("signed", "abs", "fisher")
DEFAULT_SAMPLES = 64
_LANG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a language name is also a file name


@dataclass(frozen=True)
class Language:
    """One language's corpus, as `--data LANG=PATH` gave it."""

    name: str
    path: Path


@dataclass
class LanguageScore:
    """One language's importance: checkpoint tensor name -> float32 tensor of its shape."""

    language: str
    path: Path
    sha256: str
    rows: int
    tokens: int
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {"language": self.language, "path": str(self.path), "sha256": self.sha256, "rows": self.rows, "tokens": self.tokens}


@dataclass
class Scores:
    """Every language's importance, and how it was computed (for provenance)."""

    model: Path
    fingerprint: str
    shapes: dict[str, tuple[int, ...]]  # every tensor of the checkpoint, for the layout digest
    languages: list[LanguageScore]
    settings: dict[str, Any]


def parse_languages(specs: Sequence[str]) -> list[Language]:
    """The `--data LANG=PATH` values, checked: at least two languages, each named once.

    Raises:
        UsageError: a value without `=`, an empty or odd language name, a repeated
            language, or fewer than two languages.
    """
    out: list[Language] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        name = name.strip()
        if not sep or not path:
            raise UsageError(f"--data {spec!r}: expected LANG=PATH", hint="e.g. --data en=en.txt --data es=es.jsonl")
        if not _LANG.match(name):
            raise UsageError(
                f"--data {spec!r}: language name {name!r} must be letters, digits, '_', '-' or '.'", hint="e.g. en, es, zh-Hans"
            )
        if any(lang.name == name for lang in out):
            raise UsageError(f"--data: language {name!r} given twice")
        out.append(Language(name, Path(path)))
    if len(out) < 2:
        raise UsageError(f"--data: {len(out)} language given, need at least 2", hint="core and monolingual regions compare languages")
    return out


def score_languages(
    model_path: Path,
    languages: Sequence[Language],
    *,
    keep: NameFilter,
    samples: int = DEFAULT_SAMPLES,
    seq_len: int | None = None,
    batch_size: int = 8,
    score: str = "signed",
    text_field: str = "text",
) -> Scores:
    """Gradient importance of every element that `keep` accepts, for each language.

    Args:
        model_path: the checkpoint folder (with its tokenizer).
        languages: from `parse_languages`.
        keep: which checkpoint tensors are scored (by default the transformer blocks).
        samples: packed rows per language.
        seq_len: tokens per row; None: the smaller of 512 and the model's positions.
        batch_size: rows per backward pass (what `abs` sums over).
        score: one of SCORES (see the module docstring).
        text_field: the JSONL field holding the text.

    Raises:
        UsageError: a bad count, score or sequence length, or filters that leave no tensor.
        InputError: an unreadable model, tokenizer or corpus, or a corpus too short for
            `samples` rows.
    """
    if score not in SCORES:
        raise UsageError(f"--score must be one of {', '.join(SCORES)}, got {score!r}")
    for flag, value in (("--samples", samples), ("--batch-size", batch_size)):
        if value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    ckpt = Checkpoint.open(model_path, spec=str(model_path))
    positions = model_positions(ckpt.config)
    if seq_len is None:
        seq_len = min(DEFAULT_SEQ_LEN, positions or DEFAULT_SEQ_LEN)
    if seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2, got {seq_len}")
    if positions is not None and seq_len > positions:
        raise UsageError(f"--seq-len {seq_len} exceeds the model's {positions} positions", hint=f"use --seq-len {positions} or less")
    names = [n for n, info in ckpt.tensors.items() if keep(n) and info.torch_dtype.is_floating_point]
    if not names:
        raise UsageError("--include/--exclude leave no tensor to score", hint=f"patterns: {keep.describe()}")
    tokenizer = load_tokenizer(model_path)
    framing = framing_of(tokenizer, "packed", "paragraph")
    corpora = [(lang, read_documents(lang.path, text_field)) for lang in languages]
    rows = {}
    for lang, docs in corpora:
        rows[lang.name] = language_rows(lang.path, docs.texts, tokenizer, framing, samples, seq_len)
    model = load_model(model_path, dtype=torch.float32)
    model.eval()
    by_module = parameter_names(model, ckpt)
    missing = [n for n in names if n not in by_module]
    if missing:
        raise InputError(f"{model_path}: tensor {missing[0]} is not a parameter of the model", hint="--exclude it")
    params = dict(model.named_parameters(remove_duplicate=False))
    for p in model.parameters():
        p.requires_grad_(False)
    scored = {n: params[by_module[n]] for n in names}
    for p in scored.values():
        p.requires_grad_(True)
    results = []
    for lang, docs in corpora:
        r = rows[lang.name]
        tensors = importance_of(model, scored, r, batch_size=batch_size, score=score)
        results.append(LanguageScore(lang.name, lang.path, docs.sha256, len(r), r.numel(), tensors))
    formula = {"signed": "|sum_b g_b * theta|", "abs": "sum_b |g_b * theta|", "fisher": "sum_b g_b^2"}[score]
    settings = {
        "importance": f"{formula} of the mean next-token loss per batch",
        "samples": samples,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "score": score,
        "framing": framing.describe(),
    }
    return Scores(Path(model_path), ckpt.fingerprint, {n: tuple(i.shape) for n, i in ckpt.tensors.items()}, results, settings)


def language_rows(path: Path, texts: list[str], tokenizer: Any, framing: Any, samples: int, seq_len: int) -> torch.Tensor:
    """The first `samples` packed rows of a corpus ([samples, seq_len] int64), documents in
    file order: the rows a language is scored on, reproducible from the file alone.

    Raises:
        InputError: the corpus packs into fewer than `samples` rows.
    """
    packed = pack(tokenize(texts, tokenizer, framing), seq_len)
    if len(packed) < samples:
        raise InputError(
            f"{path}: corpus packs into {len(packed)} rows of {seq_len} tokens, fewer than --samples {samples}",
            hint="add text, or lower --samples or --seq-len",
        )
    return packed[:samples]


def importance_of(
    model: Any, scored: dict[str, torch.nn.Parameter], rows: torch.Tensor, *, batch_size: int, score: str
) -> dict[str, torch.Tensor]:
    """Importance of each scored parameter (by checkpoint name) on `rows`, float32 on the CPU.

    `scored` must be the only parameters that require gradients; their values are unchanged.
    """
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in scored.items()}
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size].to(next(iter(scored.values())).device)
        for p in scored.values():
            p.grad = None
        logits = model(input_ids=batch).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
        loss.backward()
        with torch.no_grad():
            for n, p in scored.items():
                g = p.grad.float() if p.grad is not None else torch.zeros_like(acc[n])
                if score == "signed":
                    acc[n] += g
                elif score == "abs":
                    acc[n] += (g * p.float()).abs_()
                else:
                    acc[n] += g.square()
    with torch.no_grad():
        if score == "signed":
            for n, p in scored.items():
                acc[n] = (acc[n] * p.float()).abs_()
        for p in scored.values():
            p.grad = None
    return {n: a.cpu() for n, a in acc.items()}
