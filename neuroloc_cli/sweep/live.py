"""A sweep's memory: every input tensor read once and kept, and one live model that each
point is merged into and evaluated from, with no checkpoint written in between.

Memory is the live model (the output's size in its load dtype) plus the cached inputs (each
merged tensor of each input, as stored), plus one tensor's working copies.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from neuroloc_cli.errors import InputError, UsageError
from neuroloc_cli.io.checkpoint import Checkpoint, Kind
from neuroloc_cli.io.format import DTYPE_NAMES
from neuroloc_cli.merge.plan import MergePlan


class CachedCheckpoint:
    """A checkpoint whose tensors are read from disk once and then served from memory.

    Everything but `read` is the wrapped checkpoint's. A read hands out the caller's own copy,
    as `Checkpoint.read` does, so nothing a merge does to its inputs reaches the cache.
    """

    def __init__(self, inner: Checkpoint):
        self._inner = inner
        self._tensors: dict[tuple, torch.Tensor] = {}
        # A stored tensor widened to the compute dtype is exact, so one copy as stored serves
        # every dtype and block of rows; a model+LoRA view computes W + scale·BA for the rows
        # and in the dtype asked for (a block's product may round unlike the whole one's), so
        # it is kept as read.
        self._as_read = getattr(inner, "adapter", None) is not None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def read(self, name: str, rows: tuple[int, int] | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        if self._as_read:
            key: tuple = (name, rows, dtype)
            if key not in self._tensors:
                self._tensors[key] = self._inner.read(name, rows, dtype)
            return self._tensors[key].clone()
        stored = self._tensors.get((name,))
        if stored is None:
            stored = self._tensors[(name,)] = self._inner.read(name)
        part = stored if rows is None else stored[rows[0] : rows[1]]
        return part.to(dtype or part.dtype, copy=True)

    def release_files(self) -> None:
        """Close the files once every tensor is in memory (their mapped pages go with them)."""
        self._inner.close()

    @property
    def cached_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self._tensors.values())


class InputCache:
    """One `CachedCheckpoint` per input folder, shared by every point's plan."""

    def __init__(self) -> None:
        self._by_path: dict[Path, CachedCheckpoint] = {}

    def attach(self, plan: MergePlan) -> MergePlan:
        """`plan` reading through the cache (the same folder is read once for every plan)."""

        def cached(source):
            key = source.checkpoint.path.resolve()
            if source.adapter is not None:  # a model+LoRA input is its own tensors
                key = Path(f"{key}+{source.adapter.resolve()}")
            if key not in self._by_path:
                self._by_path[key] = CachedCheckpoint(source.checkpoint)
            return replace(source, checkpoint=self._by_path[key])

        plan.base = cached(plan.base) if plan.base is not None else None
        plan.models = [cached(s) for s in plan.models]
        return plan

    @property
    def bytes(self) -> int:
        return sum(c.cached_bytes for c in self._by_path.values())

    def release_files(self) -> None:
        """After a first merge has read every input: no file is read again."""
        for c in self._by_path.values():
            c.release_files()


def refuse_unsweepable(plan: MergePlan) -> None:
    """A merge whose output is not the reference model with new weights cannot be swept in
    memory: a delta, a new layer count (`slices:`), a new vocabulary.

    Raises:
        UsageError: naming what the recipe does.
    """
    if plan.method.output_kind == Kind.DELTA:
        raise UsageError(
            f"{plan.source}: {plan.method.name} writes a delta checkpoint, which cannot be evaluated; sweep a merge that gives a model"
        )
    if plan.config_updates:
        raise UsageError(
            f"{plan.source}: the merge changes config.json ({', '.join(plan.config_updates)}); sweep cannot merge it into the base model in memory"
        )
    if plan.vocabulary is not None:
        raise UsageError(f"{plan.source}: tokenizer_source changes the vocabulary; sweep cannot merge it into the base model in memory")


def load_dtype(plan: MergePlan, requested: str) -> torch.dtype:
    """The dtype `neuroloc eval --dtype requested` would load the merged folder in: the
    requested one, or, for `auto`, the one the merge writes into config.json (one output
    dtype for every tensor), else the reference's."""
    if requested != "auto":
        return DTYPE_NAMES[requested]
    dtypes = {s.out.dtype for s in plan.steps if s.merge}
    if len(dtypes) == 1:
        return dtypes.pop()
    name = (plan.reference.checkpoint.config or {}).get("torch_dtype") or (plan.reference.checkpoint.config or {}).get("dtype")
    return DTYPE_NAMES.get(name, torch.float32) if isinstance(name, str) else torch.float32


class LiveModel:
    """The reference model, loaded once; each point's merged tensors are copied into it.

    `write(name, tensor)` is the sink of `merge.run.merge_tensors`: large tensors arrive as
    consecutive blocks of rows. `check_complete` after a merge makes sure every parameter
    of the model was written (none keeps a value of the point before).
    """

    def __init__(self, plan: MergePlan, device: str, dtype: torch.dtype):
        from neuroloc_cli.runtime.model import load_model, parameter_names

        reference = plan.reference.checkpoint
        self.folder = reference.path
        self.model = load_model(self.folder, device=device, dtype=dtype)
        names = parameter_names(self.model, reference)
        params = dict(self.model.named_parameters(remove_duplicate=False))
        self._params = {ckpt: params[module] for ckpt, module in names.items()}
        self._filled: dict[str, int] = {}

    @property
    def bytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.model.parameters())

    def write(self, name: str, tensor: torch.Tensor) -> None:
        param = self._params.get(name)
        if param is None:  # integer buffers and tensors the model does not hold
            return
        start = self._filled.get(name, 0)
        stop = start + (tensor.shape[0] if tensor.dim() else 1)
        with torch.no_grad():
            if tensor.dim() and stop - start != param.shape[0]:
                param[start:stop].copy_(tensor)
            else:
                param.copy_(tensor.reshape(param.shape))
        self._filled[name] = stop

    def start(self) -> None:
        """Forget the last point's writes (call before each merge)."""
        self._filled = {}

    def check_complete(self) -> None:
        """Raises InputError if a parameter got no tensor, or only part of its rows."""
        for name, param in self._params.items():
            rows = param.shape[0] if param.dim() else 1
            if self._filled.get(name) != rows:
                raise InputError(f"{self.folder}: the merge gave {self._filled.get(name, 0)} of {rows} row(s) of {name}")


def cache_estimate(plan: MergePlan) -> int:
    """Bytes the input cache will hold for `plan`: each merged tensor of each input once, as
    stored (a bf16 checkpoint's tensors take half the float32 compute copy)."""
    total = 0
    for step in plan.steps:
        if not step.merge:
            continue
        sources = ([plan.base] if plan.base is not None else []) + [m for m, present in zip(plan.models, step.present) if present]
        if step.origin is not None:
            sources = [plan.models[step.origin[0]]]
        name = step.origin[1] if step.origin is not None else step.name
        total += sum(s.checkpoint.tensors[name].nbytes for s in sources)
    return total
