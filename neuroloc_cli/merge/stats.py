"""The engine's statistics passes: per-tensor numbers summed over a streaming read.

- `statistics_pass`: a merge method's declared `Statistic`s (MAET's ⟨R(A), R_Lang⟩ per
  tensor), over the merge's own inputs, before the merge proper.
- `rank_deltas`: `neuroloc rank`'s ⟨Δ_A, Δ_B⟩ (or their cosine) per tensor; `plan_rank`, its
  `--dry-run`.

Large tensors are read in blocks of rows; each block's value is one float64 number in a fixed
order (`ops.sums`), and a tensor's total is the exact sum of its blocks' (`BlockSums`), so a
statistic is the same whatever the block size and the thread count.
"""

from __future__ import annotations

import inspect
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from neuroloc_cli.errors import UsageError
from neuroloc_cli.io.checkpoint import Checkpoint
from neuroloc_cli.io.delta_reader import DeltaReader, check_same_tensors
from neuroloc_cli.merge.plan import MergePlan
from neuroloc_cli.merge.stream import row_blocks, stream_inputs
from neuroloc_cli.methods.base import Prepared, TensorStatistics
from neuroloc_cli.ops.rank import METRICS, TensorScore, similarity_from_sums, sort_scores
from neuroloc_cli.ops.sums import CHUNK, fixed_dot


class BlockSums:
    """Per-tensor, per-key sums of values found block by block, added exactly."""

    def __init__(self) -> None:
        self._parts: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def add(self, tensor: str, key: str, value: float) -> None:
        self._parts[tensor][key].append(value)

    def totals(self) -> dict[str, dict[str, float]]:
        """`{tensor: {key: sum}}`, tensors in the order they were first added."""
        return {t: {k: math.fsum(v) for k, v in keys.items()} for t, keys in self._parts.items()}


def statistics_pass(plan: MergePlan, memo: dict[tuple, float] | None = None) -> Prepared | None:
    """Compute the method's statistics over every merged tensor and let it `select`.

    Args:
        memo: values found before, kept across calls (`neuroloc sweep`): a block's value is
            looked up by inputs, tensor, rows, statistic and the parameters the statistic reads, so
            a sweep over parameters it does not read (MAET's γ and k2) computes it once.

    Returns:
        What `select` made of them, or None for methods without statistics.
    """
    method = plan.method
    if not method.statistics:
        return None
    assert method.select is not None  # merge_method requires one with statistics
    steps = [s for s in plan.steps if s.merge]
    resolved = {s.name: plan.resolver.at(s.name, s.t) for s in steps}
    sums = BlockSums()
    # a memoised value is of these inputs, read in this dtype, by this method
    inputs = repr((method.name, str(plan.compute_dtype), [(s.role, [str(p) for p in s.input_paths()]) for s in plan.sources]))
    for step, rows, (base, tensors, _) in stream_inputs(plan, steps, blocks=True):
        whole, per_model = resolved[step.name]
        for stat in method.statistics:
            key = (
                (inputs, step.name, step.present, rows, stat.name, _read_parameters(stat.fn, whole, per_model))
                if memo is not None
                else None
            )
            if key is not None and key in memo:
                value = memo[key]
            else:
                value = float(method(base, tensors, whole, per_model, roles=plan.roles, fn=stat.fn))
                if key is not None:
                    memo[key] = value
            sums.add(step.name, stat.name, value)
        del base, tensors  # before the next unit is read (see `stream_inputs`)
    numel = {s.name: math.prod(s.out.shape) for s in steps}
    return method.select(TensorStatistics(sums.totals(), numel, {name: whole for name, (whole, _) in resolved.items()}))


def _read_parameters(fn, whole: dict, per_model: list[dict]) -> str:
    """The parameters a statistic's function names (its keywords), with their values at one
    tensor: what its value can depend on besides the inputs."""
    names = {n.removesuffix("_") for n in inspect.signature(fn).parameters}  # `lambda` is passed as `lambda_`

    def read(params: dict) -> list:
        return [(k, v) for k, v in sorted(params.items()) if k in names]

    return repr((read(whole), [read(m) for m in per_model]))


def _rank_inputs(a: Path, b: Path, base: Path | None, metric: str) -> tuple[DeltaReader, DeltaReader, dict]:
    """A's and B's delta readers and their floating tensors, checked (`rank_deltas`, `plan_rank`)."""
    if metric not in METRICS:
        raise UsageError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    base_ckpt = Checkpoint.open(base, spec=str(base)) if base is not None else None
    ra, rb = DeltaReader(a, base_ckpt, "A"), DeltaReader(b, base_ckpt, "B")
    infos = {n: i for n, i in ra.ckpt.tensors.items() if i.torch_dtype.is_floating_point}
    check_same_tensors(infos, ra.ckpt, [rb.ckpt] + ([] if base_ckpt is None else [base_ckpt]))
    return ra, rb, infos


def rank_deltas(a: Path, b: Path, base: Path | None = None, metric: str = "dot") -> list[TensorScore]:
    """Every floating tensor's similarity of `Δ_A` and `Δ_B` (MAET Eq. 4), sorted descending.

    Args:
        a, b: models (with `base`) or delta checkpoints.
        base: the base model, or None when A and B are deltas.
        metric: "dot" (MAET Eq. 4) or "cosine".

    Raises:
        UsageError: unknown metric, or a model given without `base`.
        InputError: unreadable checkpoints, a tensor missing or of another shape, NaN or inf.
    """
    ra, rb, infos = _rank_inputs(a, b, base, metric)
    sums = BlockSums()
    for name, info in infos.items():
        for rows in row_blocks(info.shape):
            da, db = ra.read(name, rows), rb.read(name, rows)
            sums.add(name, "ab", fixed_dot(da, db))
            if metric == "cosine":
                sums.add(name, "aa", fixed_dot(da, da))
                sums.add(name, "bb", fixed_dot(db, db))
    totals = sums.totals()
    return sort_scores([TensorScore(n, similarity_from_sums(totals[n], metric), infos[n].numel) for n in infos])


def plan_rank(a: Path, b: Path, base: Path | None = None, metric: str = "dot") -> dict[str, Any]:
    """What `rank_deltas` would compare and the memory it holds, from headers only (`rank --dry-run`).

    Memory: a block of rows of the largest tensor (`row_blocks`) read in float32 from A and B,
    and twice more from BASE when A and B are models (each delta is the model's read minus the
    base's); and the float64 copies of a chunk (`ops.sums.CHUNK`) that a dot product takes at
    a time (both operands and their product).

    Raises:
        UsageError: unknown metric, or a model given without `base`.
        InputError: unreadable checkpoints, a tensor missing or of another shape.
    """
    _, _, infos = _rank_inputs(a, b, base, metric)

    def block(shape: tuple[int, ...]) -> int:
        rows = row_blocks(shape)[0]
        return math.prod(shape) if rows is None else (rows[1] - rows[0]) * math.prod(shape[1:])

    largest = max((block(i.shape) for i in infos.values()), default=0)
    memory = {"blocks": 4 * largest * (4 if base is not None else 2), "float64": 3 * 8 * min(largest, CHUNK)}
    memory["total"] = sum(memory.values())
    return {
        "dry_run": True,
        "metric": metric,
        "tensors": len(infos),
        "elements": sum(i.numel for i in infos.values()),
        "disk_bytes": {"total": 0},
        "memory_bytes": memory,
    }
