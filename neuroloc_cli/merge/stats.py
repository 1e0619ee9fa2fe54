"""The engine's statistics passes: per-tensor numbers summed over a streaming read.

- `statistics_pass`: a merge method's declared `Statistic`s (MAET's ⟨R(A), R_Lang⟩ per
  tensor), over the merge's own inputs, before the merge proper.
- `rank_deltas`: `neuroloc rank`'s ⟨Δ_A, Δ_B⟩ (or their cosine) per tensor.

Large tensors are read in blocks of rows; each block's value is one float64 number in a fixed
order (`ops.sums`), and a tensor's total is the exact sum of its blocks' (`BlockSums`), so a
statistic is the same whatever the block size and the thread count.
"""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from neuroloc_cli.errors import UsageError
from neuroloc_cli.io.checkpoint import Checkpoint
from neuroloc_cli.io.delta_reader import DeltaReader, check_same_tensors
from neuroloc_cli.merge.plan import MergePlan
from neuroloc_cli.merge.stream import row_blocks, stream_inputs
from neuroloc_cli.methods.base import Prepared, TensorStatistics
from neuroloc_cli.ops.rank import METRICS, TensorScore, similarity_from_sums, sort_scores
from neuroloc_cli.ops.sums import fixed_dot


class BlockSums:
    """Per-tensor, per-key sums of values found block by block, added exactly."""

    def __init__(self) -> None:
        self._parts: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def add(self, tensor: str, key: str, value: float) -> None:
        self._parts[tensor][key].append(value)

    def totals(self) -> dict[str, dict[str, float]]:
        """`{tensor: {key: sum}}`, tensors in the order they were first added."""
        return {t: {k: math.fsum(v) for k, v in keys.items()} for t, keys in self._parts.items()}


def statistics_pass(plan: MergePlan) -> Prepared | None:
    """Compute the method's statistics over every merged tensor and let it `select`.

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
    for step, _, (base, tensors, _) in stream_inputs(plan, steps, blocks=True):
        whole, per_model = resolved[step.name]
        for stat in method.statistics:
            sums.add(step.name, stat.name, float(method(base, tensors, whole, per_model, roles=plan.roles, fn=stat.fn)))
    numel = {s.name: math.prod(s.out.shape) for s in steps}
    return method.select(TensorStatistics(sums.totals(), numel, {name: whole for name, (whole, _) in resolved.items()}))


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
    if metric not in METRICS:
        raise UsageError(f"--metric must be one of {', '.join(METRICS)}, got {metric!r}")
    base_ckpt = Checkpoint.open(base, spec=str(base)) if base is not None else None
    ra, rb = DeltaReader(a, base_ckpt, "A"), DeltaReader(b, base_ckpt, "B")
    infos = {n: i for n, i in ra.ckpt.tensors.items() if i.torch_dtype.is_floating_point}
    check_same_tensors(infos, ra.ckpt, [rb.ckpt] + ([] if base_ckpt is None else [base_ckpt]))
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
