"""What a training run will write and hold, from the selection plan and the model's config
alone (`train --dry-run`).

Memory follows the loop (`train.run`, `train.selection`, `train.optim`) on one process:

- weights: every parameter in float32 (the loop's master weights);
- gradients: float32, of every tensor that trains in any way — whole tensors, masked ones
  (gradient masking zeroes frozen elements, the gradient itself is whole) and the tensors
  that split slices come from (the weight-gradient matmul is still done for the whole
  tensor) — and the slices' own gradients, which exist beside those until they are dropped;
- selection: the split slices' float32 copies and int64 indices, and for gradient masking a
  BOOL per element and a float32 copy of the frozen values;
- optimizer state: AdamW's two float32 moments per optimizer element and a step per
  parameter; during `step` its foreach update adds one float32 temporary per element;
- activations, the larger of that temporary and these (they do not coexist): the tensors a
  forward pass saves for backward, per token of a micro-batch (batch × sequence length),
  under bf16 autocast as on CUDA, attention by SDPA (no sequence × sequence matrix): per
  layer, about 34·hidden + 8·kv + 8·intermediate bytes (the norms' float32 inputs and
  outputs, the bf16 casts of each projection's input, q/k/v and rotary temporaries, the MLP's
  gate, up, activation and product), plus 12 bytes per vocabulary entry for the float32
  log-probabilities and their gradients, plus the bf16 copies of the matrices that autocast
  makes and keeps for backward. On CPU (fp32, no autocast) the activations are about twice
  this and there are no copies.

The figure is an estimate of the peak (allocator fragmentation and the framework's
workspaces come on top); it scales as the run's real peak does with the model, the
selection, the batch and the sequence length.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from neuroloc_cli.errors import InputError
from neuroloc_cli.io.checkpoint import Checkpoint
from neuroloc_cli.train.export import output_dtype
from neuroloc_cli.train.selection import SelectionPlan


def output_bytes(source: Checkpoint, out_dtype: torch.dtype | None) -> int:
    """The trained checkpoint's tensor data: every tensor of `source`, floating ones in
    `out_dtype` when given (`train.export.output_dtype`)."""
    return sum(i.numel * output_dtype(i, out_dtype).itemsize for i in source.tensors.values())


def training_memory(plan: SelectionPlan, config: Any, tokens: int) -> dict[str, int]:
    """The peak memory of a training step, in parts (see the module docstring).

    Args:
        plan: what trains (`selection.plan_selection` or `plan_groups`).
        config: the model's transformers config (sizes of layers and vocabulary).
        tokens: tokens of one micro-batch (batch size × sequence length).

    Returns:
        weights, gradients, selection, optimizer_state, activations (the larger of the
        forward's saved tensors and the optimizer step's temporary) and total, in bytes.

    Raises:
        InputError: the config lacks the model's sizes.
    """
    numel = {n: math.prod(s) for n, s in plan.shapes.items()}
    slices = [*plan.split.items(), *(item for g in plan.groups.values() for item in g.items())]
    slice_elements = sum(numel[n] // plan.shapes[n][a] * len(i) for n, (a, i) in slices)
    counts = plan.counts()
    parts = {
        "weights": 4 * counts["parameters"],
        "gradients": 4 * sum(numel[n] for n in plan.trained) + 4 * slice_elements,
        "selection": 4 * slice_elements
        + 8 * sum(len(i) for _, (_, i) in slices)
        + sum(numel[n] + 4 * int(f.sum()) for n, f in plan.masked.items()),
        "optimizer_state": planned_optimizer_bytes(plan),
    }
    matrices = sum(v for n, v in numel.items() if len(plan.shapes[n]) == 2)
    parts["activations"] = max(4 * counts["optimizer_elements"], tokens * activation_bytes_per_token(config) + 2 * matrices)
    return {**parts, "total": sum(parts.values())}


def planned_optimizer_bytes(plan: SelectionPlan) -> int:
    """AdamW's state for `plan`: two float32 moments per element and a step per parameter."""
    return 8 * plan.counts()["optimizer_elements"] + 4 * len(plan.trained)


def activation_bytes_per_token(config: Any) -> int:
    """Bytes a forward pass saves for backward per token, under bf16 autocast (see the module
    docstring for what is counted)."""
    hidden = _first(config, "hidden_size", "n_embd")
    layers = _first(config, "num_hidden_layers", "n_layer")
    heads = _first(config, "num_attention_heads", "n_head")
    inter = getattr(config, "intermediate_size", None) or getattr(config, "n_inner", None) or 4 * hidden
    kv = (getattr(config, "num_key_value_heads", None) or heads) * (getattr(config, "head_dim", None) or hidden // heads)
    return layers * (34 * hidden + 8 * kv + 8 * inter) + 8 * hidden + 12 * config.vocab_size


def _first(config: Any, *names: str) -> int:
    for name in names:
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise InputError(f"the model's config.json has none of {', '.join(names)}", hint="give a transformers config of a causal LM")
