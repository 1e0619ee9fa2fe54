"""Gram matrices of every linear layer's inputs on a corpus, for RegMean merges (Jin et al. 2023).

For each corpus, `samples` packed rows are run through the model (evaluation mode, no
gradient); a forward hook on every scored `nn.Linear` and GPT-2 `Conv1D` adds `XᵀX` of the
layer's input rows (`X`: [tokens, in]) to an accumulator. Written per corpus as an
importance-format file (`masks.importance`, score `gram`): under each weight's checkpoint
name, the [in, in] mean Gram matrix `XᵀX / n` over the layer's `n` input tokens, which is
what the public RegMean code merges (so that corpora of different sizes weigh alike; the
provenance records `n`, and `n ·` the stored matrix is the raw `XᵀX`).

Precision: each batch's product is taken in float32 (one matrix product of a few thousand
rows, outside autocast) and added into a float64 accumulator, so that the sum over millions
of tokens does not drift, and the merge's solve starts from matrices accurate to float32.
Memory: the model in float32 and one float64 [in, in] accumulator per scored layer (8·in²
bytes each: `--dry-run` states the total). The layers that read the same input (a block's
q, k and v projections) share one product per batch.

Under `accelerate launch` each process runs every `world`-th batch and the sums are added
once at the end.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from neuroloc_cli.arch import CONV1D_KINDS, NameFilter, tensor_kind
from neuroloc_cli.errors import UsageError
from neuroloc_cli.io.checkpoint import Checkpoint
from neuroloc_cli.locate.base import Language
from neuroloc_cli.locate.folder import save_folder
from neuroloc_cli.locate.scoring import ScoringPlan, language_sources, plan_scoring, scoring_model
from neuroloc_cli.masks.importance import ImportanceMeta
from neuroloc_cli.runtime.data import TaggedRows, tagged_batches
from neuroloc_cli.runtime.distributed import sum_over_processes
from neuroloc_cli.runtime.model import model_skeleton, parameter_names

SCORE = "gram"
PAPER = "Jin et al. 2023, Dataless Knowledge Fusion by Merging Weights of Language Models (RegMean)"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # a corpus name is also a file name


def parse_corpora(specs: Sequence[str]) -> list[Language]:
    """`--data [NAME=]PATH` values: a corpus each, named by NAME or by the file's stem.

    Raises:
        UsageError: no corpus, an empty or odd name, or a name given twice.
    """
    out: list[Language] = []
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = Path(spec).stem, spec
        name = name.strip()
        if not path or not _NAME.match(name):
            raise UsageError(f"--data {spec!r}: expected PATH or NAME=PATH, NAME letters, digits, '_', '-' or '.'")
        if any(c.name == name for c in out):
            raise UsageError(f"--data: corpus {name!r} given twice", hint="name them: --data a=x/train.jsonl --data b=y/train.jsonl")
        out.append(Language(name, Path(path)))
    if not out:
        raise UsageError("--data: give at least one corpus")
    return out


@dataclass(frozen=True)
class GramPlan:
    """What a Gram run reads and holds, from headers only (`--dry-run`).

    Attributes:
        layers: checkpoint weight name -> (module name, input size), the layers scored.
        scoring: rows and sequence length per corpus (the data locators' plan).
        model_elements: floating elements of the checkpoint (the model, in float32).
    """

    layers: dict[str, tuple[str, int]]
    scoring: ScoringPlan
    model_elements: int

    def memory_bytes(self) -> dict[str, int]:
        """The model (float32), the float64 accumulators and one float32 batch product;
        activations come on top."""
        sizes = [d * d for _, d in self.layers.values()]
        parts = {"model": 4 * self.model_elements, "accumulators": 8 * sum(sizes), "product": 4 * max(sizes)}
        return {**parts, "total": sum(parts.values())}

    def describe(self) -> dict[str, Any]:
        s = self.scoring
        return {
            "corpora": {c.name: str(c.path) for c in s.languages},
            "rows_per_corpus": s.rows,
            "seq_len": s.seq_len,
            "tokens_per_corpus": s.rows * s.seq_len,
            "tensors": len(self.layers),
            "gram_elements": sum(d * d for _, d in self.layers.values()),
            "memory_bytes": self.memory_bytes(),
        }


def plan_gram(
    model_path: Path,
    corpora: Sequence[Language],
    *,
    keep: NameFilter,
    samples: int | None = None,
    max_tokens: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
) -> tuple[Checkpoint, GramPlan]:
    """Check the settings against the checkpoint's headers and list the layers scored.

    Raises:
        UsageError: a bad count or sequence length, or filters that leave no linear layer.
        InputError: an unreadable checkpoint.
    """
    ckpt, scoring = plan_scoring(
        model_path, corpora, keep=keep, samples=samples, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size
    )
    layers = linear_layers(model_skeleton(model_path), ckpt, set(scoring.names))
    if not layers:
        raise UsageError("--include/--exclude leave no linear layer to score", hint=f"patterns: {keep.describe()}")
    floating = sum(i.numel for i in ckpt.tensors.values() if i.torch_dtype.is_floating_point)
    return ckpt, GramPlan(layers, scoring, floating)


def linear_layers(model: nn.Module, ckpt: Checkpoint, names: set[str]) -> dict[str, tuple[str, int]]:
    """Checkpoint weight name -> (module name, input size) of every `nn.Linear` and `Conv1D`
    whose weight is one of `names`. A module whose weight the checkpoint does not store under
    its own name (an LM head tied to the embedding) is left out, and so is one whose layout
    its name would misreport (the merge tells `Conv1D` from `Linear` by name)."""
    by_param = {param: name for name, param in parameter_names(model, ckpt).items()}
    out = {}
    for module_name, module in model.named_modules():
        conv = _is_conv1d(module)
        if not (isinstance(module, nn.Linear) or conv):
            continue
        name = by_param.get(f"{module_name}.weight")
        if name is None or name not in names or conv != (tensor_kind(name) in CONV1D_KINDS):
            continue
        out[name] = (module_name, _in_size(module))
    return out


def _is_conv1d(module: nn.Module) -> bool:
    """GPT-2's `Conv1D` (transformers' own class, matched by name: no import for other models)."""
    return type(module).__name__ == "Conv1D" and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 2


def _in_size(module: nn.Module) -> int:
    """The input size of a linear layer: `Conv1D` stores its weight [in, out], `nn.Linear` [out, in]."""
    return int(module.weight.shape[0] if _is_conv1d(module) else module.weight.shape[1])


@dataclass
class CorpusGram:
    """One corpus's mean Gram matrices (float32, by checkpoint weight name) and token counts."""

    rows: TaggedRows
    tensors: dict[str, torch.Tensor]
    tokens: int


@dataclass
class Grams:
    """Every corpus's Gram matrices and how they were computed; `save` writes the folder."""

    corpora: list[CorpusGram]
    provenance: dict[str, Any]
    is_main: bool = True

    @property
    def summary(self) -> dict[str, Any]:
        first = self.corpora[0].tensors
        return {
            "tensors": len(first),
            "gram_elements": sum(t.numel() for t in first.values()),
            "corpora": {c.rows.source: {**_describe(c.rows), "tokens": c.tokens} for c in self.corpora},
            "provenance": self.provenance,
        }

    def save(self, output: Path, inputs: Sequence[Path] = (), overwrite: bool = False) -> None:
        """Write `importance/NAME.safetensors` per corpus and `summary.json`, atomically.

        Raises:
            OutputError: the folder exists (without `overwrite`), overlaps an input, or cannot be written.
        """
        meta = {
            c.rows.source: ImportanceMeta(SCORE, "sum", c.rows.source, {**self.provenance, **_describe(c.rows), "tokens": c.tokens})
            for c in self.corpora
        }
        importance = {c.rows.source: c.tensors for c in self.corpora}
        save_folder(output, inputs, overwrite, importance=importance, importance_meta=meta, masks={}, summary=self.summary)


def _describe(rows: TaggedRows) -> dict[str, Any]:
    d = rows.describe()
    return {"corpus": d.pop("source"), **d}


def gram_matrices(
    model_path: Path,
    corpora: Sequence[Language],
    *,
    keep: NameFilter,
    samples: int | None = None,
    max_tokens: int | None = None,
    seq_len: int | None = None,
    batch_size: int = 8,
    text_field: str = "text",
) -> Grams:
    """The mean Gram matrix of every scored linear layer's inputs, per corpus.

    Args:
        model_path: the checkpoint folder (with its tokenizer).
        corpora: from `parse_corpora`.
        keep: which weights are scored (by default the transformer blocks').
        samples, max_tokens, seq_len, batch_size: as for the data locators (`locate.scoring`).

    Raises:
        UsageError: bad settings, or filters that leave no linear layer.
        InputError: an unreadable model, tokenizer or corpus, or a corpus too short.
    """
    ckpt, plan = plan_gram(model_path, corpora, keep=keep, samples=samples, max_tokens=max_tokens, seq_len=seq_len, batch_size=batch_size)
    sources, framing = language_sources(model_path, corpora, plan.scoring, text_field)
    accelerator, model, _ = scoring_model(model_path, ckpt)
    modules = dict(model.named_modules())
    layers = {name: modules[module_name] for name, (module_name, _) in plan.layers.items()}
    results = []
    for src in sources:
        batches = (b.input_ids for b in tagged_batches([src], batch_size, rank=accelerator.process_index, world=accelerator.num_processes))
        sums, counts = input_grams(model, layers, batches, autocast=accelerator.autocast, world=accelerator.num_processes)
        means = {}
        for name in list(sums):  # one float64 accumulator freed per float32 mean made
            means[name] = sums.pop(name).div_(max(counts[name], 1)).to("cpu", torch.float32)
        results.append(CorpusGram(src, means, max(counts.values())))
    provenance = {
        "locator": "gram",
        "model": str(Path(model_path).resolve()),
        "model_fingerprint": ckpt.fingerprint,
        "gram": "X^T X / n of each linear layer's input rows X [n, in]: the mean over its input tokens",
        "accumulator": "float64",
        "samples": plan.scoring.rows,
        "seq_len": plan.scoring.seq_len,
        "batch_size": batch_size,
        "processes": accelerator.num_processes,
        "framing": framing.describe(),
        "tensors": keep.describe(),
    }
    return Grams(results, provenance, accelerator.is_main_process)


def input_grams(
    model: Any,
    layers: Mapping[str, nn.Module],
    batches: Iterable[torch.Tensor],
    *,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    world: int = 1,
) -> tuple[dict[str, torch.Tensor], dict[str, int]]:
    """`Σ XᵀX` (float64, on the model's device) of each layer's input rows over `batches`,
    and the number of rows each layer saw, summed over `world` processes.

    Args:
        layers: checkpoint weight name -> its `nn.Linear` or `Conv1D` module.
        batches: [b, seq_len] token ids, this process's share.
    """
    device = next(model.parameters()).device
    acc = {name: torch.zeros(_in_size(m), _in_size(m), dtype=torch.float64, device=device) for name, m in layers.items()}
    counts = dict.fromkeys(layers, 0)
    last: list[Any] = [None, None]  # the last input seen and its product: q, k and v share one

    def hook(name: str) -> Callable[..., None]:
        def add(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            x = args[0]
            if last[0] is not x:
                flat = x.detach().reshape(-1, x.shape[-1])
                with torch.autocast(device_type=flat.device.type, enabled=False):
                    flat = flat.float()
                    last[0], last[1] = x, flat.T @ flat
            acc[name].add_(last[1])
            counts[name] += x.numel() // x.shape[-1]

        return add

    handles = [m.register_forward_hook(hook(name)) for name, m in layers.items()]
    try:
        with torch.no_grad():
            for batch in batches:
                with autocast():
                    model(input_ids=batch.to(device))
                last[0] = last[1] = None
    finally:
        for h in handles:
            h.remove()
    for name in layers:
        sum_over_processes(acc[name], world)
        n = torch.tensor([counts[name]], dtype=torch.int64, device=device)
        sum_over_processes(n, world)
        counts[name] = int(n.item())
    return acc, counts
