"""Executing a merge plan: stream tensors in, compute, stream shards out, atomically.

Methods that declare statistics (`MergeMethod.statistics`, e.g. MAET's tensor ranking) get
a first streaming pass (`merge.stats`); what it finds goes into the provenance. Masks
(`merge.masks`) are applied last, to the output-dtype tensor.

Memory: the reader thread holds the next tensor's inputs while the main thread computes the
current one, so private memory stays at a few copies of the largest tensor (inputs in the
compute dtype, the result and one scratch buffer), whatever the model size.
"""

from __future__ import annotations

import hashlib
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from neuroloc_cli import __version__
from neuroloc_cli.io.chat_templates import resolve_chat_template
from neuroloc_cli.io.checkpoint import Kind
from neuroloc_cli.io.output import check_output_path, checkpoint_output
from neuroloc_cli.io.writer import DEFAULT_MAX_SHARD_BYTES
from neuroloc_cli.merge.masks import Rows
from neuroloc_cli.merge.plan import MergePlan, Step
from neuroloc_cli.merge.stats import statistics_pass
from neuroloc_cli.merge.stream import Inputs, stream_inputs
from neuroloc_cli.merge.vocab import save_tokenizer
from neuroloc_cli.methods.base import Prepared
from neuroloc_cli.ops.flat import Flat, Input


@dataclass(frozen=True)
class MergeResult:
    """What a merge wrote."""

    path: Path
    tensors: int
    bytes: int
    shards: list[str]
    seconds: float
    warnings: list[str] = field(default_factory=list)


def run_merge(
    plan: MergePlan,
    out_dir: Path,
    *,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    overwrite: bool = False,
    seed: int | None = None,
    on_tensor: Callable[[Step], None] | None = None,
    command: str = "merge",
) -> MergeResult:
    """Run a planned merge into `out_dir`, which appears only if everything succeeds.

    Args:
        plan: from `build_plan`.
        out_dir: the output folder (must not exist unless `overwrite`, nor overlap an input).
        max_shard_bytes: output shard size cap.
        seed: seed for random methods; overrides the recipe's `random_seed`.
        on_tensor: called after each tensor is written (progress display).
        command: recorded in the provenance.

    Raises:
        OutputError: the output path is unusable.
        InputError: a tensor cannot be read.
    """
    start = time.perf_counter()
    seed = seed if seed is not None else plan.recipe.random_seed
    provenance = _provenance(plan, seed, command)
    if plan.method.statistics:  # refuse a bad output before a whole statistics pass
        check_output_path(out_dir, plan.input_paths(), overwrite)
    prepared = statistics_pass(plan)
    if prepared is not None:
        provenance[plan.method.name] = prepared.provenance
    dtypes = {s.out.dtype for s in plan.steps if s.merge}
    with (
        _tokenizer_folder(plan) as tokenizer_dir,
        checkpoint_output(
            out_dir,
            [s.out for s in plan.steps],
            kind=plan.method.output_kind,
            provenance=provenance,
            source=plan.reference.checkpoint.path,
            inputs=plan.input_paths(),
            overwrite=overwrite,
            max_shard_bytes=max_shard_bytes,
            config_dtype=dtypes.pop() if len(dtypes) == 1 else None,
            config_updates=plan.config_updates,
            chat_template=resolve_chat_template(plan.recipe.chat_template, [s.checkpoint.path for s in plan.sources])
            if plan.recipe.chat_template
            else None,
            tokenizer_dir=tokenizer_dir,
        ) as (writer, _),
    ):
        nonfinite = _stream(plan, writer.write, seed, on_tensor, prepared)
        if nonfinite:  # neuroloc.json is written as the block ends
            provenance["nonfinite_tensors"] = nonfinite
    warnings = plan.warnings + [
        f"tensor {name}: {n} NaN or inf value(s) in the output (from the inputs, or overflow in the output dtype)"
        for name, n in nonfinite.items()
    ]
    return MergeResult(out_dir, len(plan.steps), plan.out_bytes, writer.files, time.perf_counter() - start, warnings)


@contextmanager
def _tokenizer_folder(plan: MergePlan) -> Iterator[Path | None]:
    """Where the output's tokenizer files come from: the reference (None), the model that
    `tokenizer_source` names, or a temporary folder the union tokenizer is saved into."""
    vocab = plan.vocabulary
    if vocab is None or vocab.tokenizer_dir is not None:
        yield None if vocab is None else vocab.tokenizer_dir
        return
    with tempfile.TemporaryDirectory(prefix="neuroloc-tokenizer-") as folder:
        save_tokenizer(vocab, Path(folder))
        yield Path(folder)


def merge_tensors(
    plan: MergePlan, write: Callable[[str, torch.Tensor], None], *, seed: int | None = None, stats_memo: dict | None = None
) -> tuple[dict[str, int], Prepared | None]:
    """Merge every tensor of `plan` into `write(name, tensor)` instead of a checkpoint folder:
    the in-memory sink `neuroloc sweep` evaluates from. The tensors are exactly those
    `run_merge` writes, in the output dtype and in plan order; a large tensor of an
    elementwise method arrives as consecutive blocks of its rows, first to last.

    Args:
        seed: as `run_merge`'s.
        stats_memo: kept across calls to reuse statistics (`merge.stats.statistics_pass`).

    Returns:
        The tensors with NaN or inf values and their counts, and what the statistics pass found.
    """
    seed = seed if seed is not None else plan.recipe.random_seed
    prepared = statistics_pass(plan, stats_memo)
    return _stream(plan, write, seed, None, prepared), prepared


def _stream(
    plan: MergePlan,
    write: Callable[[str, torch.Tensor], None],
    seed: int | None,
    on_tensor: Callable[[Step], None] | None,
    prepared: Prepared | None = None,
) -> dict[str, int]:
    """Compute and `write` each unit while the next one is read.

    Returns:
        The merged tensors that came out with NaN or inf values, with their counts: inputs
        that hold them pass them on (as in mergekit), and the caller warns.
    """
    nonfinite: dict[str, int] = {}
    for step, rows, inputs in stream_inputs(plan, plan.steps, blocks=plan.method.elementwise):
        context = prepared.per_tensor.get(step.name) if prepared is not None else None
        out = _output(plan, step, rows, inputs, seed, context)
        del inputs  # before the next unit is read (see `stream_inputs`)
        bad = count_nonfinite(out) if step.merge else 0
        if bad:
            nonfinite[step.name] = nonfinite.get(step.name, 0) + bad
        write(step.name, out)
        del out
        if on_tensor is not None and (rows is None or rows[1] == step.out.shape[0]):
            on_tensor(step)
    return nonfinite


CHECK_ELEMENTS = 2**20
"""Elements checked for NaN and inf at a time: the check's temporaries (a copy and three
boolean masks) stay small beside a whole embedding."""


def count_nonfinite(t: torch.Tensor) -> int:
    """NaN and infinite values in `t`, counted a piece of `CHECK_ELEMENTS` at a time."""
    return sum(int(piece.numel() - torch.isfinite(piece).sum()) for piece in t.reshape(-1).split(CHECK_ELEMENTS))


def _output(plan: MergePlan, step: Step, rows: Rows, inputs: Inputs, seed: int | None, context: dict | None) -> torch.Tensor:
    """One unit's output tensor in the output dtype, masks applied."""
    out = _compute(plan, step, rows, inputs, seed, context).to(step.out.dtype)
    if plan.masks is not None and step.merge:
        raw = inputs[2]
        assert raw is not None  # masks are only planned with a base model
        # Outside the mask a model keeps the base; a delta output keeps zero.
        outside = torch.zeros_like(out) if plan.method.output_kind == Kind.DELTA else raw.to(step.out.dtype)
        out = plan.masks.apply(step.name, out, outside, rows)
    return out


def _compute(plan: MergePlan, step: Step, rows: Rows, inputs: Inputs, seed: int | None, context: dict | None = None) -> torch.Tensor:
    base, tensors, _ = inputs
    if not step.merge:
        assert base is not None
        return base
    if plan.masks is not None:
        assert base is not None
        tensors = plan.masks.restrict_inputs(step.name, base, tensors, rows)
    if plan.widen:  # float32 arithmetic on the inputs as rounded to `dtype` (inputs read in pieces are read so)
        base, tensors = (None if base is None else _widened(base)), [_widened(t) for t in tensors]
    whole, per_model = plan.resolver.at(step.name, step.t)
    if step.origin is not None:
        per_model = [per_model[step.origin[0]]]
    side = getattr(inputs, "side", None)
    if side:  # a file parameter's value, at this tensor, is the model's tensor from that file
        per_model = [{**mp, **{name: found[i] for name, found in side.items()}} for i, mp in enumerate(per_model)]
    if "name" in plan.method.context:  # a method that needs the tensor's name (its layout)
        context = {**(context or {}), "name": step.name}
    generator = _generator(seed, step.name) if plan.method.random else None
    return plan.method(base, tensors, whole, per_model, generator, context, roles=plan.roles, out_dtype=step.out.dtype)


def _widened(x: Input) -> Input:
    """A tensor in float32; a `Flat` as it is (it reads its pieces in float32 already)."""
    return x if isinstance(x, Flat) else x.float()


def _generator(seed: int | None, tensor_name: str) -> torch.Generator:
    """A generator seeded from the run's seed and the tensor's name, so that a tensor's random
    draws do not depend on which tensors came before it."""
    digest = hashlib.sha256(f"{seed if seed is not None else 0}:{tensor_name}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def _provenance(plan: MergePlan, seed: int | None, command: str) -> dict:
    return {
        "neuroloc_version": __version__,
        "command": command,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "method": plan.method.name,
        "output_kind": plan.method.output_kind,
        "recipe": plan.recipe.model_dump(exclude_none=True),
        "seed": seed,
        "compute_dtype": str(plan.compute_dtype).removeprefix("torch."),
        # the dtype the arithmetic runs in: `dtype`, or float32 by `accumulate: float32`
        "accumulate": "float32" if plan.widen else str(plan.compute_dtype).removeprefix("torch."),
        "inputs": [s.provenance() for s in plan.sources],
    }
