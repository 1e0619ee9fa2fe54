"""Gradient importance of every element per language (linguistic regions, Zhang et al. 2024).

For each language's corpus, the language-modelling loss of `samples` packed rows is
back-propagated batch by batch with no optimizer step, and the gradients `g_b` of the scored
parameters are accumulated in float32. The importance of an element is then

- `signed` (the default, the public code's order): `|Σ_b g_b ⊙ θ|`, the first-order estimate
  of the loss change when the element is zeroed, over all rows together;
- `abs` (`--abs-per-batch`): `Σ_b |g_b ⊙ θ|`, so that batches whose gradients disagree do not
  cancel;
- `fisher` (`--score fisher`): `Σ_b g_b²`, the diagonal empirical Fisher of the batches'
  mean gradients; it shrinks about as 1/batch size, and `--batch-size 1` makes it the
  per-example diagonal empirical Fisher (the data-aware merges' weights).

Each batch's loss is the mean next-token NLL over its targets (what a Hugging Face model
returns for `labels=`), as in the public code; the model runs in evaluation mode, so that a
model with dropout gives the same scores twice.

Memory: the model, one float32 accumulator per scored element, and one gradient at a time:
each parameter's gradient is folded into its accumulator by a post-accumulate hook as soon as
backward has produced it, and freed. Under `accelerate launch` every process takes every
`world`-th batch (`runtime.data.tagged_batches`) and the accumulators are summed once at the
end, so that two processes give one process's scores up to float summation order.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from neuroloc_cli.arch import NameFilter
from neuroloc_cli.errors import UsageError
from neuroloc_cli.io.checkpoint import Checkpoint, model_positions
from neuroloc_cli.locate.base import Language
from neuroloc_cli.runtime.data import Framing, TaggedRows, choose_seq_len, framing_of, load_tokenizer, source_rows, tagged_batches
from neuroloc_cli.runtime.distributed import start_accelerator, sum_over_processes
from neuroloc_cli.runtime.model import load_model, model_skeleton, parameter_names

if TYPE_CHECKING:
    from accelerate import Accelerator

SCORES = ("signed", "abs", "fisher")
DEFAULT_SAMPLES = 64


@dataclass
class LanguageScore:
    """One language's importance: checkpoint tensor name -> float32 tensor of its shape."""

    rows: TaggedRows
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def language(self) -> str:
        return self.rows.source

    def describe(self) -> dict[str, Any]:
        d = self.rows.describe()
        return {"language": d.pop("source"), **d}


@dataclass
class Scores:
    """Every language's importance, and how it was computed (for provenance).

    Under `accelerate launch` every process returns the same sums; `is_main` says which one
    writes them.
    """

    model: Path
    fingerprint: str
    shapes: dict[str, tuple[int, ...]]  # every tensor of the checkpoint, for the layout digest
    languages: list[LanguageScore]
    settings: dict[str, Any]
    is_main: bool = True


@dataclass(frozen=True)
class ScoringPlan:
    """What a scoring run reads and holds, from headers only (`--dry-run`).

    Attributes:
        names: the checkpoint tensors scored.
        scored_elements: their elements (one float32 accumulator each).
        model_elements: every floating element of the checkpoint (the model, in float32).
        largest: elements of the largest scored tensor (the one gradient alive at a time).
        rows, seq_len: per language.
    """

    names: list[str]
    scored_elements: int
    model_elements: int
    largest: int
    rows: int
    seq_len: int
    languages: list[Language]

    def memory_bytes(self) -> dict[str, int]:
        """Bytes of the model (float32), the accumulators, and the one gradient alive at a time;
        activations come on top and grow with batch size and sequence length."""
        parts = {"model": 4 * self.model_elements, "accumulators": 4 * self.scored_elements, "gradient": 4 * self.largest}
        return {**parts, "total": sum(parts.values())}

    def describe(self) -> dict[str, Any]:
        return {
            "languages": {lang.name: str(lang.path) for lang in self.languages},
            "rows_per_language": self.rows,
            "seq_len": self.seq_len,
            "tokens_per_language": self.rows * self.seq_len,
            "tensors": len(self.names),
            "scored_elements": self.scored_elements,
            "memory_bytes": self.memory_bytes(),
        }


def plan_scoring(
    model_path: Path,
    languages: Sequence[Language],
    *,
    keep: NameFilter,
    samples: int | None = DEFAULT_SAMPLES,
    max_tokens: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    score: str = "signed",
) -> tuple[Checkpoint, ScoringPlan]:
    """Check the settings against the checkpoint's headers and say what a run would hold.

    Args:
        samples: packed rows per language; or None with `max_tokens`.
        max_tokens: tokens per language instead (whole rows: `max_tokens // seq_len`).

    Raises:
        UsageError: a bad count, score or sequence length, or filters that leave no tensor.
        InputError: an unreadable checkpoint.
    """
    if score not in SCORES:
        raise UsageError(f"--score must be one of {', '.join(SCORES)}, got {score!r}")
    if samples is not None and max_tokens is not None:
        raise UsageError("--samples and --max-tokens both given", hint="give one: rows per language, or tokens per language")
    for flag, value in (("--samples", samples), ("--max-tokens", max_tokens), ("--batch-size", batch_size)):
        if value is not None and value < 1:
            raise UsageError(f"{flag} must be at least 1, got {value}")
    ckpt = Checkpoint.open(model_path, spec=str(model_path))
    positions = model_positions(ckpt.config)
    if seq_len is not None and seq_len < 2:
        raise UsageError(f"--seq-len must be at least 2, got {seq_len}")
    seq_len = choose_seq_len(seq_len, positions)
    if max_tokens is not None:
        samples = max_tokens // seq_len
        if samples < 1:
            raise UsageError(f"--max-tokens {max_tokens} is less than one row of {seq_len} tokens", hint="raise it, or lower --seq-len")
    elif samples is None:
        samples = DEFAULT_SAMPLES
    # only the model's parameters: a checkpoint may also store floating buffers in the blocks
    # (an older Llama's rotary `inv_freq`, GPT-2's attention `bias`), which have no gradient
    parameters = parameter_names(model_skeleton(model_path), ckpt)
    names = [n for n, info in ckpt.tensors.items() if keep(n) and info.torch_dtype.is_floating_point and n in parameters]
    if not names:
        raise UsageError("--include/--exclude leave no tensor to score", hint=f"patterns: {keep.describe()}")
    floating = [i for i in ckpt.tensors.values() if i.torch_dtype.is_floating_point]
    plan = ScoringPlan(
        names,
        sum(ckpt.tensors[n].numel for n in names),
        sum(i.numel for i in floating),
        max(ckpt.tensors[n].numel for n in names),
        samples,
        seq_len,
        list(languages),
    )
    return ckpt, plan


def language_sources(
    model_path: Path, languages: Sequence[Language], plan: ScoringPlan, text_field: str = "text"
) -> tuple[list[TaggedRows], Framing]:
    """Each language's first `plan.rows` packed rows of `plan.seq_len` tokens, framed by the
    model's own tokenizer, and that framing.

    Raises:
        InputError: an unreadable tokenizer or corpus, or a corpus too short for its rows.
    """
    tokenizer = load_tokenizer(model_path)
    framing = framing_of(tokenizer, "packed", "paragraph")
    rows = [
        source_rows(lang.name, lang.path, tokenizer, framing, rows=plan.rows, seq_len=plan.seq_len, text_field=text_field)
        for lang in languages
    ]
    return rows, framing


def scoring_model(model_path: Path, ckpt: Checkpoint) -> tuple[Accelerator, nn.Module, dict[str, str]]:
    """The run's accelerator, and the checkpoint's model in float32 and evaluation mode (no
    dropout: the same scores twice) on its device, with checkpoint -> module names."""
    accelerator = start_accelerator()
    model = load_model(model_path, device=accelerator.device, dtype=torch.float32)
    model.eval()
    return accelerator, model, parameter_names(model, ckpt)


def score_languages(
    model_path: Path,
    languages: Sequence[Language],
    *,
    keep: NameFilter,
    samples: int | None = DEFAULT_SAMPLES,
    max_tokens: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    score: str = "signed",
    text_field: str = "text",
) -> Scores:
    """Gradient importance of every element that `keep` accepts, for each language.

    Args:
        model_path: the checkpoint folder (with its tokenizer).
        languages: from `locate.base.parse_languages`.
        keep: which checkpoint tensors are scored (by default the transformer blocks).
        samples, max_tokens: rows, or tokens, per language (see `plan_scoring`).
        seq_len: tokens per row; None: the smaller of 512 and the model's positions.
        batch_size: rows per backward pass (what `abs` sums over).
        score: one of SCORES (see the module docstring).
        text_field: the JSONL field holding the text.

    Raises:
        UsageError: a bad count, score or sequence length, or filters that leave no tensor.
        InputError: an unreadable model, tokenizer or corpus, or a corpus too short for
            its rows.
    """
    ckpt, plan = plan_scoring(
        model_path, languages, keep=keep, samples=samples, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size, score=score
    )
    sources, framing = language_sources(model_path, languages, plan, text_field)
    accelerator, model, by_module = scoring_model(model_path, ckpt)
    params = dict(model.named_parameters(remove_duplicate=False))
    scored = {n: params[by_module[n]] for n in plan.names}
    results = []
    for src in sources:
        batches = (b.input_ids for b in tagged_batches([src], batch_size, rank=accelerator.process_index, world=accelerator.num_processes))
        tensors = importance_of(model, scored, batches, score=score, autocast=accelerator.autocast, world=accelerator.num_processes)
        results.append(LanguageScore(src, tensors))
    formula = {"signed": "|sum_b g_b * theta|", "abs": "sum_b |g_b * theta|", "fisher": "sum_b g_b^2"}[score]
    settings = {
        "importance": f"{formula} of the mean next-token loss per batch",
        "samples": plan.rows,
        "seq_len": plan.seq_len,
        "batch_size": batch_size,
        "score": score,
        "processes": accelerator.num_processes,
        "framing": framing.describe(),
    }
    shapes = {n: tuple(i.shape) for n, i in ckpt.tensors.items()}
    return Scores(Path(model_path), ckpt.fingerprint, shapes, results, settings, accelerator.is_main_process)


def importance_of(
    model: Any,
    scored: dict[str, torch.nn.Parameter],
    batches: Iterable[torch.Tensor],
    *,
    score: str,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    world: int = 1,
) -> dict[str, torch.Tensor]:
    """Importance of each scored parameter (by checkpoint name) on `batches`, float32 on the CPU.

    Args:
        scored: checkpoint name -> parameter; every other parameter is left without gradient.
        batches: [b, seq_len] token ids, this process's share.
        autocast: the forward pass's autocast context (bf16 on CUDA under accelerate).
        world: processes whose sums are added at the end (each ran its own share of batches).

    The parameters' values and `requires_grad` flags are as they were when it returns.
    """
    acc = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in scored.items()}
    flags = {p: p.requires_grad for p in model.parameters()}
    hooks = []
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for n, p in scored.items():
            p.requires_grad_(True)
            hooks.append(p.register_post_accumulate_grad_hook(_fold_into(acc[n], score)))
        device = next(iter(scored.values())).device
        for batch in batches:
            batch = batch.to(device)
            with autocast():
                logits = model(input_ids=batch).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten())
            loss.backward()
    finally:
        for h in hooks:
            h.remove()
        for p, flag in flags.items():
            p.grad = None
            p.requires_grad_(flag)
    for a in acc.values():
        sum_over_processes(a, world)
    with torch.no_grad():
        if score == "signed":
            for n, p in scored.items():
                acc[n] = (acc[n] * p.float()).abs_()
    return {n: a.cpu() for n, a in acc.items()}


def _fold_into(acc: torch.Tensor, score: str) -> Callable[[torch.Tensor], None]:
    """A post-accumulate-grad hook: add this batch's gradient term to `acc`, then free the
    gradient, so that one gradient at a time is alive."""

    @torch.no_grad()
    def fold(p: torch.Tensor) -> None:
        g = p.grad.float()
        if score == "signed":
            acc.add_(g)
        elif score == "abs":
            acc.add_((g * p.float()).abs_())
        else:
            acc.add_(g.square())
        p.grad = None

    return fold
